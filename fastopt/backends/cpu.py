"""The CPU backend: builds the kernels' tables from the optimizer's frozen layout and calls one fused Numba kernel
per math dtype per step.

Per step the host work is proportional to the number of tensors, not elements: the grads' addresses go into
the address table; the group table and packed schedules are taken in only when the optimizer hands a new
GroupTable, the other addresses only when it hands a new Layout (a buffer changed).

One bucket per math dtype: float32, bfloat16 and float16 params share its tables. The kernels take the storage
of each stream from the element type of a typed scratch array (uint16: bfloat16 bits, int16: float16 bits, see
kernels/cpu/conversions.load), so a bucket whose tensors are stored in several ways is stepped by one kernel call
per way ("kind"), each with the grads of the other kinds masked out.
"""
import numpy as np

from . import GradControl, HostArrays
from .. import dtypes, kernel_cache
from .layout import chunk_table, fill_tensor_tables, set_grads
from .processes import ParallelKernel
from ..kernels.cpu import fused, layout as kernel_layout
from ..kernels.cpu.jit import serial_twin

_grad_stats = ParallelKernel(fused.grad_stats, serial_twin(fused.grad_stats))
kernel_cache.name_kernels((_grad_stats.parallel, _grad_stats.serial), "grad-control", kind="kernel")
_blend = ParallelKernel(fused.blend_toward_state, serial_twin(fused.blend_toward_state))
kernel_cache.name_kernels((_blend.parallel, _blend.serial), "train/eval", kind="kernel")

# The element type the kernels see for each storage (Numba has no 16-bit floats).
_KERNEL_DTYPES = {"bfloat16": np.dtype(np.uint16), "float16": np.dtype(np.int16), "float32": np.dtype(np.float32),
                  "float64": np.dtype(np.float64)}
# The element type the kernels see for 8-bit codes: the map's signedness (kernels/cpu/codes.py), by Layout.coded.
_CODE_DTYPES = {True: np.dtype(np.int8), False: np.dtype(np.uint8)}
_SCALES_DTYPE = np.dtype(np.float32)


def _address(array):
    return HostArrays.address(array) if array.size else 0


class _DtypeBucket:
    """The tensors of one math dtype and the tables one kernel call reads."""

    def __init__(self, dtype, indices, params, kernels):
        self.dtype = dtype
        self.indices = np.asarray(indices, dtype=np.int64)
        count = len(indices)
        self.addresses = np.zeros((count, kernel_layout.SLOTS), dtype=np.int64)
        self.tensor_format = np.zeros((count, kernel_layout.FORMAT_COLUMNS), dtype=np.int64)
        self.tensor_group = np.zeros(count, dtype=np.int64)
        self.tensor_step = np.zeros(count, dtype=np.int64)
        self.tensor_scalars = np.zeros((count, kernel_layout.TENSOR_SCALARS), dtype=np.float64)
        self.grad_ends = np.zeros(count, dtype=np.int64)  # where each grad's memory ends (set_grads' overlap check)
        self.coefficients = np.zeros((count, kernel_layout.COEFFICIENTS), dtype=dtype)
        # Stands in for absent buffers (see kernels/cpu/fused.stream): one chunk of distinct memory per slot.
        # Filled explicitly: loads from never-written calloc pages were 10x slower than from written ones here,
        # should a loop variant ever read it.
        self.scratch = np.empty(kernel_layout.SLOTS * kernel_layout.CHUNK, dtype=dtype)
        self.scratch.fill(0)
        self.chunk_tensor, self.chunk_start, self.chunk_length = chunk_table([params[i].size for i in indices],
                                                                             kernel_layout.CHUNK)
        self.chunk_norms = np.zeros((self.chunk_tensor.size, kernel_layout.NORM_SUMS))  # workspace of LAMB's passes
        serial = int(self.chunk_length.sum()) < kernel_layout.SERIAL_BELOW
        self.kernel = kernels[1] if serial else ParallelKernel(*kernels)
        self.blend = _blend.serial if serial else _blend
        self.scratches = {self.scratch.dtype: self.scratch}
        # per tensor: (param dtype, (each state slot's dtype), master?, stochastic?) as the kernels see them
        self.static_kinds = None
        self.kinds, self.kinds_key = {}, None  # CpuBackend._kinds: {kind: positions}, and what they were found for

    def like(self, dtype):
        """A scratch array of ``dtype`` (SLOTS chunks of distinct, written memory, as ``scratch``): it types a
        kernel's stream and stands in for that stream's absent buffers."""
        if dtype not in self.scratches:
            self.scratches[dtype] = np.zeros(kernel_layout.SLOTS * kernel_layout.CHUNK, dtype=dtype)
        return self.scratches[dtype]


class CpuBackend(HostArrays):
    def __init__(self, layout):
        rule = layout.rule  # its step, for the state slots it always uses and those only some groups use
        kernels = fused.step_kernels(rule.KERNEL, rule.slot_mask(set(rule.STATE_SLOTS) - set(rule.OPTIONAL_STATES)),
                                     rule.slot_mask(rule.OPTIONAL_STATES))
        kernel_cache.name_kernels(kernels, rule.__name__)  # its compiles are logged under the optimizer's name
        self.buckets = [_DtypeBucket(dtype, indices, layout.params, kernels)
                        for dtype, indices in layout.indices_by_math_dtype().items()]
        self.parameter_count = len(layout.params)
        self.plain_control = GradControl.plain().values
        self.layout = None

    def _refresh_tables(self, layout):
        if layout is self.layout:
            return
        for bucket in self.buckets:
            fill_tensor_tables(layout, bucket.indices, bucket.addresses, bucket.tensor_group, bucket.tensor_format,
                               bucket.dtype, _address)
            bucket.static_kinds = [
                (_KERNEL_DTYPES[layout.param_storage[index]], self._state_dtypes(layout, index),
                 layout.master[index] is not None, layout.stochastic and layout.param_storage[index] == "bfloat16")
                for index in bucket.indices]
            bucket.kinds_key = None
        self.layout = layout

    @staticmethod
    def _state_dtypes(layout, index):
        """The element type of each state slot of param ``index`` as the kernels see it: its storage's, or its codes'
        where it is stored in 8 bits."""
        plain = _KERNEL_DTYPES[layout.state_storage[index]]
        return tuple(plain if layout.coded(index, slot) is None else _CODE_DTYPES[layout.coded(index, slot)]
                     for slot in range(kernel_layout.STATE_SLOTS))

    def _state_likes(self, bucket, state_dtypes):
        """The kernels' ``state_likes``: a scratch array per state slot, typed as it is stored, and one for scales."""
        return tuple(bucket.like(dtype) for dtype in state_dtypes) + (bucket.like(_SCALES_DTYPE),)

    def bind_grads(self, layout, grads):
        """Take this step's grads (their addresses and formats) into the tables that ``grad_control`` and ``step``
        read, after checking that none overlaps a buffer the step writes (ValueError: nothing is written)."""
        for bucket in self.buckets:
            set_grads(layout, bucket.addresses, bucket.grad_ends, bucket.tensor_format, bucket.indices, grads,
                      bucket.dtype, _address, self.storage_name)

    def grad_stats(self, layout, grads):
        """(sum of squares, number of non-finite values) over all grads (as bound by ``bind_grads``), one parallel
        read."""
        self._refresh_tables(layout)
        sum_of_squares, nonfinite = 0.0, 0
        for bucket in self.buckets:
            total, count = _grad_stats(bucket.addresses, bucket.tensor_format, bucket.chunk_tensor,
                                       bucket.chunk_start, bucket.chunk_length, bucket.scratch,
                                       bucket.like(_KERNEL_DTYPES["bfloat16"]), bucket.like(_KERNEL_DTYPES["float32"]))
            sum_of_squares += total
            nonfinite += count
        return sum_of_squares, nonfinite

    def grad_control(self, layout, grads, unscale, max_norm, skip_nonfinite=True):
        """This step's :class:`GradControl` from one read of the grads."""
        return GradControl(*self.grad_stats(layout, grads), unscale, max_norm, skip_nonfinite)

    def step(self, layout, groups, grads, step_count, lr_factor=1.0, control=None):
        self._refresh_tables(layout)
        values = self.plain_control if control is None else control.values
        seed = np.int64(layout.seed)
        # The state slots whose 8-bit codes round stochastically (a kernel without them is built when there are none).
        code_slots = sum(1 << slot for slot, name in enumerate(layout.state_slots) if name in layout.stochastic_codes)
        code_seed = seed if code_slots else None
        for bucket in self.buckets:
            for kind, addresses in self._kinds(bucket, grads):
                param_dtype, state_dtypes, has_master, stochastic, grad_dtype = kind
                bucket.kernel(addresses, bucket.chunk_tensor, bucket.chunk_start, bucket.chunk_length,
                              bucket.tensor_group, bucket.tensor_step, bucket.tensor_scalars, groups.group_hyper,
                              groups.schedule_program, groups.schedule_base, np.int64(step_count),
                              np.float64(lr_factor), values, bucket.coefficients, bucket.chunk_norms, bucket.scratch,
                              bucket.like(param_dtype), bucket.like(grad_dtype),
                              self._state_likes(bucket, state_dtypes),
                              bucket.scratch if has_master else None, seed if stochastic else None, code_seed,
                              np.int64(code_slots))

    def blend(self, layout, slot, weights):
        """``p = lerp(p, state, weights[i])`` for each param ``i`` that has a buffer in state slot ``slot`` (see
        kernels/cpu/fused.blend_toward_state), one pass per storage kind; ``weights`` per param, in float64."""
        self._refresh_tables(layout)
        for bucket in self.buckets:
            tensor_weight = np.asarray(weights, dtype=np.float64)[bucket.indices].astype(bucket.dtype)
            kinds = {}
            for position, kind in enumerate(bucket.static_kinds):
                kinds.setdefault(kind[:3], []).append(position)
            for (param_dtype, state_dtypes, has_master), positions in kinds.items():
                addresses = bucket.addresses
                if len(kinds) > 1:
                    addresses = np.zeros_like(bucket.addresses)
                    addresses[positions] = bucket.addresses[positions]
                bucket.blend(addresses, bucket.chunk_tensor, bucket.chunk_start, bucket.chunk_length,
                             np.int64(kernel_layout.STATE0 + slot), tensor_weight, bucket.dtype.type(1),
                             bucket.like(param_dtype), bucket.like(state_dtypes[slot]),
                             bucket.scratch if has_master else None)

    @staticmethod
    def _kinds(bucket, grads):
        """[(kind, address table)]: the ways the bucket's tensors with a grad this step are stored, each with the
        address table of one kernel call (the bucket's own when there is one kind; else a copy in which the
        grads of the other kinds are 0, so that call skips them). The kinds are worked out again only when the
        layout, the grads' formats or which tensors have grads changed (a per-tensor loop: the step's largest
        host cost otherwise)."""
        key = (bucket.tensor_format[:, kernel_layout.GRAD_FORMAT].tobytes(),
               (bucket.addresses[:, kernel_layout.GRAD] != 0).tobytes())
        if key != bucket.kinds_key:
            bucket.kinds = {}
            for position, index in enumerate(bucket.indices):
                grad = grads[index]
                if grad is not None:
                    kind = bucket.static_kinds[position] + (_KERNEL_DTYPES[dtypes.storage_name(grad.dtype)],)
                    bucket.kinds.setdefault(kind, []).append(position)
            bucket.kinds_key = key
        kinds = bucket.kinds
        if len(kinds) <= 1:
            return [(kind, bucket.addresses) for kind in kinds]
        calls = []
        for kind, positions in kinds.items():
            addresses = bucket.addresses.copy()
            keep = np.zeros(len(bucket.indices), dtype=bool)
            keep[positions] = True
            addresses[~keep, kernel_layout.GRAD] = 0
            calls.append((kind, addresses))
        return calls

    def tensor_steps(self):
        steps = np.zeros(self.parameter_count, dtype=np.int64)
        for bucket in self.buckets:
            steps[bucket.indices] = bucket.tensor_step
        return steps

    def set_tensor_steps(self, steps):
        for bucket in self.buckets:
            bucket.tensor_step[:] = steps[bucket.indices]

    def tensor_scalars(self):
        scalars = np.zeros((self.parameter_count, kernel_layout.TENSOR_SCALARS))
        for bucket in self.buckets:
            scalars[bucket.indices] = bucket.tensor_scalars
        return scalars

    def set_tensor_scalars(self, scalars):
        for bucket in self.buckets:
            bucket.tensor_scalars[:] = scalars[bucket.indices]
