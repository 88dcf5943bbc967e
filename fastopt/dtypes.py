"""Storage dtypes: what fastopt keeps params, grads and states in, and the dtype its math runs in.

Params may be stored as float64, float32, bfloat16 or float16; the math runs in float64 for float64 params and
in float32 otherwise. NumPy has no bfloat16 of its own: fastopt uses ``ml_dtypes.bfloat16`` (the maintained
NumPy bfloat16 dtype, as JAX does). Libraries without a bfloat16 dtype (CuPy) hand their bfloat16 arrays over as
``uint16`` views of the bits; each engine says which dtypes it reads as which storage (``storage_name``).
"""
import functools

import numpy as np

from .kernels.cpu import layout

FLOAT32 = np.dtype(np.float32)
FLOAT64 = np.dtype(np.float64)
FLOAT16 = np.dtype(np.float16)

try:
    import ml_dtypes

    BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # bfloat16 NumPy arrays cannot exist without it
    BFLOAT16 = None

SIXTEEN_BIT = ("bfloat16", "float16")


@functools.lru_cache(maxsize=None)  # called per tensor per step: a dict lookup, not NumPy's dtype.name
def storage_name(dtype):
    """'float64', 'float32', 'bfloat16' or 'float16' for a NumPy dtype fastopt can store values in, else None."""
    dtype = np.dtype(dtype)
    if dtype in (FLOAT32, FLOAT64, FLOAT16):
        return dtype.name
    if BFLOAT16 is not None and dtype == BFLOAT16:
        return "bfloat16"
    return None


def math_dtype(name):
    """The dtype the update math of a param stored as ``name`` runs in."""
    return FLOAT64 if name == "float64" else FLOAT32


@functools.lru_cache(maxsize=None)
def kernel_format(name, math, *, stochastic=False):
    """The kernels' storage-format code (kernels/cpu/layout.py) of values stored as ``name`` under ``math``."""
    if name == math.name:
        return layout.NATIVE
    if name == "float32":
        return layout.FLOAT32
    if name == "float16":
        return layout.FLOAT16
    return layout.BFLOAT16_STOCHASTIC if stochastic else layout.BFLOAT16


def numpy_dtype(name):
    """The NumPy dtype of storage ``name`` (bfloat16 needs ml_dtypes)."""
    if name == "bfloat16":
        if BFLOAT16 is None:
            raise ImportError("bfloat16 arrays need ml_dtypes: pip install ml_dtypes")
        return BFLOAT16
    return np.dtype(name)


def epsilon(name):
    """The machine epsilon of storage ``name`` (2**-7 for bfloat16's 8-bit significand)."""
    return 2.0 ** -7 if name == "bfloat16" else float(np.finfo(np.dtype(name)).eps)
