"""The CPU backend: builds the kernels' tables once and calls one fused Numba kernel per param dtype per step.

Per step the host work is proportional to the number of tensors, not elements: the grads' addresses go into
the address table, and the group table and packed schedules are rebuilt only when a group's hyperparameters
changed.
"""
import numpy as np

from .. import schedules
from . import HostArrays
from ..kernels.cpu import fused, tables


def _address(array):
    return array.__array_interface__["data"][0] if array.size else 0


class _DtypeBucket:
    """The tensors of one dtype and the tables one kernel call reads."""

    def __init__(self, dtype, indices, params):
        self.dtype = dtype
        self.indices = np.asarray(indices, dtype=np.int64)
        self.params = [params[i] for i in indices]
        count = len(indices)
        self.addresses = np.zeros((count, tables.SLOTS), dtype=np.int64)
        self.tensor_group = np.zeros(count, dtype=np.int64)
        self.tensor_step = np.zeros(count, dtype=np.int64)
        self.coefficients = np.zeros((count, tables.COEFFICIENTS), dtype=dtype)
        # Stands in for absent buffers (see kernels/cpu/fused.stream): one chunk of distinct memory per slot.
        # Filled explicitly: the vectorised loops load it, and loads from never-written calloc pages were 10x
        # slower than from written ones on this machine.
        self.scratch = np.empty(tables.SLOTS * tables.CHUNK, dtype=dtype)
        self.scratch.fill(0)
        tensor, start, length = [], [], []
        for position, param in enumerate(self.params):
            for offset in range(0, param.size, tables.CHUNK):
                tensor.append(position)
                start.append(offset)
                length.append(min(tables.CHUNK, param.size - offset))
        self.chunk_tensor = np.asarray(tensor, dtype=np.int64)
        self.chunk_start = np.asarray(start, dtype=np.int64)
        self.chunk_length = np.asarray(length, dtype=np.int64)


class CpuBackend(HostArrays):
    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.kernel = getattr(fused, optimizer.KERNEL)
        params = optimizer._params
        by_dtype = {}
        for index, param in enumerate(params):
            by_dtype.setdefault(param.dtype, []).append(index)
        self.buckets = [_DtypeBucket(dtype, indices, params) for dtype, indices in by_dtype.items()]
        self.group_hyper = None
        self.schedule_program = None
        self.schedule_base = None

    def _refresh_groups(self):
        optimizer = self.optimizer
        groups = optimizer.param_groups
        self.group_hyper = np.array([[optimizer.group_row(group)[name] for name in optimizer.COLUMNS]
                                     for group in groups], dtype=np.float64)
        programs, bases, offset = [], [], 0
        for group in groups:
            program = schedules.as_schedule(group["lr"]).program()
            programs.append(program)
            bases.append(offset)
            offset += program.size
        self.schedule_program = np.concatenate(programs)
        self.schedule_base = np.asarray(bases, dtype=np.int64)
        group_of, lr_scale_of = [], []
        for number, group in enumerate(groups):
            group_of += [number] * len(group["params"])
            lr_scale_of += list(group["lr_scale"] or [None] * len(group["params"]))
        for bucket in self.buckets:
            for position, index in enumerate(bucket.indices):
                bucket.tensor_group[position] = group_of[index]
                scale = lr_scale_of[index]
                bucket.addresses[position, tables.PARAM] = _address(bucket.params[position])
                bucket.addresses[position, tables.LR_SCALE] = 0 if scale is None else _address(scale)
                state = optimizer.state[index]
                for slot, name in enumerate(optimizer.STATE_SLOTS):
                    buffer = state.get(name)
                    bucket.addresses[position, tables.STATE0 + slot] = 0 if buffer is None else _address(buffer)

    @staticmethod
    def _set_grads(bucket, grads):
        column = bucket.addresses[:, tables.GRAD]
        for position, index in enumerate(bucket.indices):
            grad = grads[index]
            # An empty tensor has no address; mark it present with a dummy so its step still counts.
            column[position] = 0 if grad is None else (_address(grad) or -1)

    def grad_stats(self, grads):
        """(sum of squares, number of non-finite values) over all grads, one parallel read."""
        sum_of_squares, nonfinite = 0.0, 0
        for bucket in self.buckets:
            self._set_grads(bucket, grads)
            total, count = fused.grad_stats(bucket.addresses, bucket.chunk_tensor, bucket.chunk_start,
                                            bucket.chunk_length, bucket.scratch)
            sum_of_squares += total
            nonfinite += count
        return sum_of_squares, nonfinite

    def step(self, grads, step_count, groups_changed, lr_factor=1.0):
        if groups_changed or self.group_hyper is None:
            self._refresh_groups()
        for bucket in self.buckets:
            self._set_grads(bucket, grads)
            self.kernel(bucket.addresses, bucket.chunk_tensor, bucket.chunk_start, bucket.chunk_length,
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
