"""Engines that run an optimizer's step, chosen from the params' array type.

- ``cpu``: fused Numba kernels over NumPy arrays (:mod:`.cpu`).
- ``reference``: the float64 NumPy reference, for debugging (:mod:`.reference`).
- ``cuda``: fused CUDA kernels over CuPy arrays (:mod:`.cuda`, needs CuPy and a GPU).

An engine class provides the array checks and buffer handling the optimizer needs for its kind of array
(``check_array``, ``address``, ``allocate_state``, ``to_numpy``, ``copy_from_numpy``,
``all_finite_nonnegative``) and, as an instance bound to one optimizer, ``step``, ``tensor_steps`` and
``set_tensor_steps``.
"""
import numpy as np

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


class HostArrays:
    """Array handling shared by the engines that work on NumPy arrays in host memory."""

    @staticmethod
    def check_array(array, where, *, writable):
        if not isinstance(array, np.ndarray):
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
        return array.__array_interface__["data"][0]

    @staticmethod
    def allocate_state(param, ordinal):
        """A zeroed buffer shaped like ``param``, starting on a cache line (NumPy's large arrays start 16 bytes
        past one, which cost up to 20% bandwidth here) and staggered by a few lines per buffer: equal-sized
        buffers that all begin at the same page offset alias in the cache and lose bandwidth."""
        itemsize = param.dtype.itemsize
        spare = (64 + (ordinal % 16) * 256) // itemsize
        base = np.zeros(param.size + spare, dtype=param.dtype)
        start = (-base.__array_interface__["data"][0] % 64) // itemsize + (ordinal % 16) * 256 // itemsize
        return base[start:start + param.size].reshape(param.shape)

    @staticmethod
    def to_numpy(buffer):
        return buffer.copy()

    @staticmethod
    def copy_from_numpy(buffer, values):
        buffer[...] = values

    @staticmethod
    def all_finite_nonnegative(array):
        return bool(np.all(np.isfinite(array)) and not np.any(array < 0))
