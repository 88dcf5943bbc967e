"""The CPU backend: builds the kernels' tables once and calls one fused Numba kernel per param dtype per step.

Per step the host work is proportional to the number of tensors, not elements: the grads' addresses go into
the address table; the group table and packed schedules are rebuilt only when a group's hyperparameters
changed, the other addresses only when the optimizer's buffers did (its ``_layout_version``).
"""
import numpy as np

from . import HostArrays
from .tables import chunk_table, fill_tensor_tables, group_tables, indices_by_dtype, set_grad_addresses
from ..kernels.cpu import fused, tables


def _address(array):
    return array.__array_interface__["data"][0] if array.size else 0


class _DtypeBucket:
    """The tensors of one dtype and the tables one kernel call reads."""

    def __init__(self, dtype, indices, params, kernel_name):
        self.dtype = dtype
        self.indices = np.asarray(indices, dtype=np.int64)
        self.params = [params[i] for i in indices]
        count = len(indices)
        self.addresses = np.zeros((count, tables.SLOTS), dtype=np.int64)
        self.tensor_group = np.zeros(count, dtype=np.int64)
        self.tensor_step = np.zeros(count, dtype=np.int64)
        self.coefficients = np.zeros((count, tables.COEFFICIENTS), dtype=dtype)
        # Stands in for absent buffers (see kernels/cpu/fused.stream): one chunk of distinct memory per slot.
        # Filled explicitly: loads from never-written calloc pages were 10x slower than from written ones here,
        # should a loop variant ever read it.
        self.scratch = np.empty(tables.SLOTS * tables.CHUNK, dtype=dtype)
        self.scratch.fill(0)
        self.chunk_tensor, self.chunk_start, self.chunk_length = chunk_table([p.size for p in self.params],
                                                                             tables.CHUNK)
        serial = int(self.chunk_length.sum()) < tables.SERIAL_BELOW
        self.kernel = getattr(fused, kernel_name + ("_serial" if serial else ""))


class CpuBackend(HostArrays):
    def __init__(self, optimizer):
        self.optimizer = optimizer
        params = optimizer._params
        self.buckets = [_DtypeBucket(dtype, indices, params, optimizer.KERNEL)
                        for dtype, indices in indices_by_dtype(params).items()]
        self.group_hyper = self.schedule_program = self.schedule_base = None
        self.layout_version = None

    def _refresh_tables(self, groups_changed):
        optimizer = self.optimizer
        if groups_changed or self.group_hyper is None:
            self.group_hyper, self.schedule_program, self.schedule_base = group_tables(optimizer)
        if self.layout_version != optimizer._layout_version:
            for bucket in self.buckets:
                fill_tensor_tables(optimizer, bucket.indices, bucket.addresses, bucket.tensor_group, _address)
            self.layout_version = optimizer._layout_version

    def grad_stats(self, grads):
        """(sum of squares, number of non-finite values) over all grads, one parallel read."""
        sum_of_squares, nonfinite = 0.0, 0
        for bucket in self.buckets:
            set_grad_addresses(bucket.addresses, bucket.indices, grads, _address)
            total, count = fused.grad_stats(bucket.addresses, bucket.chunk_tensor, bucket.chunk_start,
                                            bucket.chunk_length, bucket.scratch)
            sum_of_squares += total
            nonfinite += count
        return sum_of_squares, nonfinite

    def step(self, grads, step_count, groups_changed, lr_factor=1.0):
        self._refresh_tables(groups_changed)
        for bucket in self.buckets:
            set_grad_addresses(bucket.addresses, bucket.indices, grads, _address)
            bucket.kernel(bucket.addresses, bucket.chunk_tensor, bucket.chunk_start, bucket.chunk_length,
                        bucket.tensor_group, bucket.tensor_step, self.group_hyper, self.schedule_program,
                        self.schedule_base, np.int64(step_count), np.float64(lr_factor), bucket.coefficients,
                        bucket.scratch)

    def tensor_steps(self):
        steps = np.zeros(len(self.optimizer._params), dtype=np.int64)
        for bucket in self.buckets:
            steps[bucket.indices] = bucket.tensor_step
        return steps

    def set_tensor_steps(self, steps):
        for bucket in self.buckets:
            bucket.tensor_step[:] = steps[bucket.indices]
