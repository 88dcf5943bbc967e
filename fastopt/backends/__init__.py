"""Engines that run an optimizer's step, chosen from the params' array type.

- ``cpu``: fused Numba kernels over NumPy arrays (:mod:`.cpu`).
- ``reference``: the float64 NumPy reference, for debugging (:mod:`.reference`).
- ``cuda``: fused CUDA kernels over CuPy arrays (:mod:`.cuda`, needs CuPy and a GPU).

An engine class provides the array checks and buffer handling the optimizer needs for its kind of array
(``check_array``, ``storage_name``, ``storage_dtype``, ``address``, ``allocate_state``, ``allocate_buffer``,
``copy_widened``, ``to_numpy``, ``copy_from_numpy``, ``all_finite_nonnegative``) and, as an instance bound to one optimizer, ``grad_control``,
``step``, ``tensor_steps`` and ``set_tensor_steps``.
"""
import math

import numpy as np

from .. import dtypes
from ..kernels.cpu import layout as kernel_layout

NAMES = ("auto", "cpu", "reference", "cuda")


def _describe(array):
    return f"{type(array).__module__}.{type(array).__name__}"


def is_gpu_array(array):
    return hasattr(array, "__cuda_array_interface__") and not isinstance(array, np.ndarray)


def select(name, params):
    """The engine class for ``name``; ``"auto"`` picks ``cuda`` for GPU arrays and ``cpu`` otherwise."""
    if name not in NAMES:
        raise ValueError(f"unknown backend {name!r}; choose one of {NAMES}")
    if name == "auto":
        first = next(iter(params), None)
        name = "cuda" if is_gpu_array(first) else "cpu"
    if name == "cpu":
        from .cpu import CpuBackend
        return CpuBackend
    if name == "reference":
        from .reference import ReferenceBackend
        return ReferenceBackend
    from .cuda import CudaBackend
    return CudaBackend


# torch.nn.utils.clip_grad_norm_'s guard against a zero norm: clip factor = max_norm / (norm + 1e-6).
CLIP_EPSILON = 1e-6


class GradControl:
    """One step's gradient handling, decided on the host: ``values`` is the kernels' ``grad_control`` (1 / loss
    scale, clip factor, skip), ``norm`` the global L2 norm of the unscaled grads, ``nonfinite`` the number of
    NaN/inf grad values (any skips the step, unless ``skip_nonfinite`` is False: a guard that lets them through)."""

    def __init__(self, sum_of_squares, nonfinite, unscale, max_norm, skip_nonfinite=True):
        self.norm = math.sqrt(sum_of_squares) * unscale
        self.nonfinite = int(nonfinite)
        self.clip = 1.0  # clip_grad_norm_'s factor
        if max_norm is not None and not math.isnan(self.norm):  # an overflowing (inf) norm clips to 0, as in torch
            self.clip = min(1.0, max_norm / (self.norm + CLIP_EPSILON))
        self.values = np.zeros(kernel_layout.GRAD_CONTROLS)
        skip = skip_nonfinite and self.nonfinite > 0
        self.values[[kernel_layout.GRAD_UNSCALE, kernel_layout.GRAD_CLIP, kernel_layout.SKIP]] = (unscale, self.clip,
                                                                                                 float(skip))

    @staticmethod
    def plain():
        """The control of a step without loss scale, clipping or check: the grads as they are."""
        return GradControl(0.0, 0, 1.0, None)

    def skip(self):
        self.values[kernel_layout.SKIP] = 1.0

    @property
    def skipped(self):
        return bool(self.values[kernel_layout.SKIP])


def _data_pointer(array):
    return array.ctypes.data


_compiled_data_pointer = None  # _data_pointer compiled on first use (importing the schedules alone needs no Numba)
# ``__array_interface__`` builds a dict per call (2 us here, the largest per-tensor cost of a step): Numba reads the
# pointer in 0.4 us. It takes the dtypes below; 16-bit floats are read through their integer bits.
_POINTER_DTYPES = {np.dtype(dtype): np.dtype(dtype) for dtype in (np.float64, np.float32, np.uint16, np.int16, np.uint8)}
_POINTER_DTYPES[np.dtype(np.float16)] = np.dtype(np.int16)
if dtypes.BFLOAT16 is not None:
    _POINTER_DTYPES[dtypes.BFLOAT16] = np.dtype(np.uint16)


class HostArrays:
    """Array handling shared by the engines that work on NumPy arrays in host memory."""

    @staticmethod
    def storage_name(dtype):
        """How this engine stores values of ``dtype``: 'float64', 'float32', 'bfloat16' (``ml_dtypes.bfloat16``)
        or 'float16'; None if it cannot."""
        return dtypes.storage_name(dtype)

    @staticmethod
    def check_array(array, where, *, writable):
        if not isinstance(array, np.ndarray):
            if type(array).__module__.partition(".")[0] == "torch":  # told apart without importing torch
                raise TypeError(f"{where} is a {_describe(array)}, but this optimizer works on NumPy arrays; for "
                                "torch tensors use the same class from fastopt.torch (e.g. fastopt.torch.Adam)")
            if is_gpu_array(array):
                raise TypeError(f"{where} is a GPU array ({_describe(array)}) but this optimizer works on NumPy "
                                "arrays in host memory; params, grads and lr_scale must be on one device")
            raise TypeError(f"{where} must be a numpy.ndarray, got {_describe(array)}")
        if not array.flags.c_contiguous:
            raise ValueError(f"{where} is not C-contiguous (strides {array.strides}); pass "
                             "np.ascontiguousarray(...) (and for a param keep that array: updates are in place)")
        if writable and not array.flags.writeable:
            raise ValueError(f"{where} is read-only; the optimizer updates params in place")

    @staticmethod
    def address(array):
        """The address of ``array``'s first element (any address for an empty one)."""
        global _compiled_data_pointer
        view = _POINTER_DTYPES.get(array.dtype)
        if view is None:
            return array.__array_interface__["data"][0]
        if _compiled_data_pointer is None:
            from ..kernels.cpu.jit import jit
            _compiled_data_pointer = jit(_data_pointer)
        return _compiled_data_pointer(array if view is array.dtype else array.view(view))

    @staticmethod
    def allocate_state(param, ordinal, storage, value=0.0):
        """A buffer shaped like ``param`` stored as ``storage`` (a storage name), holding ``value`` rounded to the
        storage (a rule's initial state: Adagrad's accumulator; zeros by default), starting on a cache line
        (NumPy's large arrays start 16 bytes past one, which cost up to 20% bandwidth here) and staggered by a few
        lines per buffer: equal-sized buffers that all begin at the same page offset alias in the cache and lose
        bandwidth."""
        buffer = HostArrays.allocate_buffer(param.shape, dtypes.numpy_dtype(storage), ordinal)
        if value != 0:
            buffer.fill(value)
        return buffer

    @staticmethod
    def storage_dtype(storage):
        """The NumPy dtype of this engine's buffers stored as ``storage`` (a storage name)."""
        return dtypes.numpy_dtype(storage)

    @staticmethod
    def allocate_buffer(shape, dtype, ordinal):
        """A zeroed buffer of ``shape`` and ``dtype`` (8-bit codes, block scales), aligned and staggered as
        ``allocate_state``'s."""
        dtype = np.dtype(dtype)
        size = math.prod(shape)
        spare = (64 + (ordinal % 16) * 256) // dtype.itemsize
        base = np.zeros(size + spare, dtype=dtype)
        start = (-base.__array_interface__["data"][0] % 64) // dtype.itemsize + (ordinal % 16) * 256 // dtype.itemsize
        return base[start:start + size].reshape(shape)

    @staticmethod
    def copy_widened(target, source):
        """``target[...] = source`` for a float32 master copy of a 16-bit param: exact."""
        target[...] = source.astype(target.dtype)

    @staticmethod
    def to_numpy(buffer):
        return buffer.copy()

    @staticmethod
    def copy_from_numpy(buffer, values):
        buffer[...] = values

    @staticmethod
    def all_finite_nonnegative(array):
        return bool(np.all(np.isfinite(array)) and not np.any(array < 0))
