"""Conversions between float32 (the math dtype of mixed precision) and the 16-bit storage formats, on raw bits.

bfloat16 and float16 values are stored as uint16 bit patterns (NumPy has no bfloat16; ``ml_dtypes.bfloat16``
and torch/CuPy half arrays are viewed as uint16). Every conversion is exact where the value is representable,
rounds to nearest, ties to even otherwise, and keeps NaN a NaN (quiet, same sign), infinities infinite and
subnormals subnormal, as IEEE 754 and ``ml_dtypes``/NumPy do.

Stochastic rounding (``float32_to_bfloat16_stochastic``) rounds up with probability equal to the distance to the
lower neighbour, using a counter-based random number keyed by (seed, step, element): the same inputs give the
same bits in any thread order, on any backend.

The fused kernels (fused.py) read and write every stream through ``load`` and ``store`` (below), which pick the
conversion from the array's element type when compiled; the array versions (``widen_bits``, ``narrow_bits``...)
serve the grad-norm kernel and the tests.
"""
import numpy as np
from numba import types
from numba.extending import intrinsic, overload

from .jit import jit
from .layout import BFLOAT16_STOCHASTIC, FLOAT16


@intrinsic
def float32_bits(typingctx, value):
    """The IEEE bits of a float32 as a uint32."""
    signature = types.uint32(types.float32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return signature, codegen


@intrinsic
def float32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the uint32 ``bits``."""
    signature = types.float32(types.uint32)

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return signature, codegen


@intrinsic
def float16_bits_to_float32(typingctx, bits):
    """A float16 (uint16 bits) widened to float32: exact (LLVM's fpext; vcvtph2ps on x86)."""
    signature = types.float32(types.uint16)

    def codegen(context, builder, sig, args):
        import llvmlite.ir as ir
        half = builder.bitcast(args[0], ir.HalfType())
        return builder.fpext(half, context.get_value_type(types.float32))

    return signature, codegen


@intrinsic
def float32_to_float16_bits(typingctx, value):
    """A float32 rounded to the nearest float16, ties to even (LLVM's fptrunc under the default rounding mode;
    vcvtps2ph on x86), as uint16 bits."""
    signature = types.uint16(types.float32)

    def codegen(context, builder, sig, args):
        import llvmlite.ir as ir
        half = builder.fptrunc(args[0], ir.HalfType())
        return builder.bitcast(half, context.get_value_type(types.uint16))

    return signature, codegen


BFLOAT16_QUIET_BIT = np.uint32(0x0040)
FLOAT32_ABS_MASK = np.uint32(0x7FFFFFFF)
FLOAT32_INFINITY_BITS = np.uint32(0x7F800000)


@jit
def bfloat16_bits_to_float32(bits):
    """A bfloat16 (uint16 bits) widened to float32: the bits are float32's upper half, so this is exact."""
    return float32_from_bits(np.uint32(bits) << np.uint32(16))


@jit
def float32_to_bfloat16_bits(value):
    """A float32 rounded to the nearest bfloat16, ties to even, as uint16 bits. NaN stays NaN (made quiet, sign
    kept); the carry of a round up moves into the exponent, so overflow gives infinity and subnormals round
    like any other value (bfloat16 has float32's exponent range)."""
    bits = float32_bits(value)
    if bits & FLOAT32_ABS_MASK > FLOAT32_INFINITY_BITS:
        return np.uint16((bits >> np.uint32(16)) | BFLOAT16_QUIET_BIT)
    lower_half_bias = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return np.uint16((bits + lower_half_bias) >> np.uint32(16))


@jit
def counter_hash(seed, step, element):
    """A 32-bit random number from (seed, step, element): SplitMix64's finaliser over a mix of the three, a
    bijection of its 64-bit input with full avalanche, so neighbouring elements and steps get independent bits."""
    state = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
             ^ np.uint64(step) * np.uint64(0xC2B2AE3D27D4EB4F)
             ^ np.uint64(element) * np.uint64(0x165667B19E3779F9))
    state = (state ^ (state >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    state = (state ^ (state >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    state = state ^ (state >> np.uint64(31))
    return np.uint32(state >> np.uint64(32))


@jit
def float32_to_bfloat16_stochastic(value, seed, step, element):
    """A float32 rounded to one of its two bfloat16 neighbours, up with probability (value - lower) / (upper -
    lower): adding 16 random bits below the kept half and truncating. Unbiased in expectation; exact values stay
    exact; NaN and infinities as in round to nearest."""
    bits = float32_bits(value)
    if bits & FLOAT32_ABS_MASK >= FLOAT32_INFINITY_BITS:
        return float32_to_bfloat16_bits(value)
    noise = counter_hash(seed, step, element) >> np.uint32(16)
    return np.uint16((bits + noise) >> np.uint32(16))


@jit
def bfloat16_to_float32_array(bits, out):
    for i in range(bits.shape[0]):
        out[i] = bfloat16_bits_to_float32(bits[i])


@jit
def float32_to_bfloat16_array(values, out):
    for i in range(values.shape[0]):
        out[i] = float32_to_bfloat16_bits(values[i])


@jit
def float16_to_float32_array(bits, out):
    for i in range(bits.shape[0]):
        out[i] = float16_bits_to_float32(bits[i])


@jit
def float32_to_float16_array(values, out):
    for i in range(values.shape[0]):
        out[i] = float32_to_float16_bits(values[i])


@jit
def float32_to_bfloat16_stochastic_array(values, seed, step, out):
    for i in range(values.shape[0]):
        out[i] = float32_to_bfloat16_stochastic(values[i], seed, step, i)


@jit
def widen_bits(bits, storage_format, out):
    """``out[i]`` = the 16-bit value ``bits[i]`` (BFLOAT16 or FLOAT16 bits; BFLOAT16_STOCHASTIC reads as
    BFLOAT16), exactly. One loop per format, each vectorised."""
    if storage_format == FLOAT16:
        for i in range(out.shape[0]):
            out[i] = float16_bits_to_float32(bits[i])
    else:
        for i in range(out.shape[0]):
            out[i] = bfloat16_bits_to_float32(bits[i])


@jit
def widen_float(values, out):
    """``out[i]`` = ``values[i]``: float32 into float64, exactly."""
    for i in range(out.shape[0]):
        out[i] = values[i]


@jit
def narrow_bits(values, storage_format, out, seed, step, first_element):
    """``out[i]`` = the float32 ``values[i]`` rounded to the 16-bit ``storage_format``: to nearest even, or for
    BFLOAT16_STOCHASTIC stochastically, keyed by (seed, step, first_element + i)."""
    if storage_format == FLOAT16:
        for i in range(out.shape[0]):
            out[i] = float32_to_float16_bits(values[i])
    elif storage_format == BFLOAT16_STOCHASTIC:
        for i in range(out.shape[0]):
            out[i] = float32_to_bfloat16_stochastic(values[i], seed, step, first_element + i)
    else:
        for i in range(out.shape[0]):
            out[i] = float32_to_bfloat16_bits(values[i])


# ---------------------------------------------------------------- typed element access of the fused loops
# The fused loops read and write every stream through load/store, resolved at compile time from the array's
# element type: float arrays are read and written as they are (the float32/float64 loops are unchanged), uint16
# arrays hold bfloat16 bits and int16 arrays float16 bits (Numba has no 16-bit float type), widened exactly on
# load and rounded to nearest even on store.
def load(array, i):
    """``array[i]`` as a float (the Python twin of the Numba overload)."""
    raise NotImplementedError("fastopt.kernels.cpu.conversions.load is compiled only")


def store(array, i, value):
    """``array[i] = value``, rounded to the array's storage (the Python twin of the Numba overload)."""
    raise NotImplementedError("fastopt.kernels.cpu.conversions.store is compiled only")


@overload(load, jit_options=dict(cache=True))
def _load(array, i):
    if array.dtype == types.uint16:
        return lambda array, i: bfloat16_bits_to_float32(array[i])
    if array.dtype == types.int16:
        return lambda array, i: float16_bits_to_float32(np.uint16(array[i]))
    return lambda array, i: array[i]


@overload(store, jit_options=dict(cache=True))
def _store(array, i, value):
    if array.dtype == types.uint16:
        def store_bfloat16(array, i, value):
            array[i] = float32_to_bfloat16_bits(value)
        return store_bfloat16
    if array.dtype == types.int16:
        def store_float16(array, i, value):
            array[i] = np.int16(float32_to_float16_bits(value))
        return store_float16

    def store_float(array, i, value):
        array[i] = value
    return store_float
