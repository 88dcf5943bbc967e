"""8-bit state codes in the fused kernels: decoding an element, encoding a block (CUDA twin: kernels/cuda/codes.cuh).

The format and its exact arithmetic are fastopt/quantization.py's (the NumPy oracle these must equal byte for byte):
uint8 codes and one float32 scale (the absmax) per CODE_BLOCK elements; the code maps are little floats with M = 3
mantissa bits, built from the bits rather than looked up. The kernels see a slot's codes as ``int8`` where its map is
signed and ``uint8`` where it is unsigned (the same bytes; the element type picks the map when compiled, as uint16
picks bfloat16 in conversions.load).
"""
import warnings

import numba
import numpy as np
from numba import types
from numba.extending import overload

from .conversions import counter_hash, float32_bits, float32_from_bits, load, store
from .jit import jit
from .layout import CODE_BLOCK
from .views import window

# jit.py's options plus inlining into the caller's Numba IR, for the per-block encoding the fused loops run: left to
# LLVM, it stayed two levels of out-of-line calls per block (the views passed on the stack, some 50 reference-count
# calls, the loop's vector registers reloaded after each block), and the 8-bit AdamW step took 1.72 ns per element
# instead of 1.31 (one thread, in L2; bench/RESULTS_8BIT.md).
block_jit = numba.njit(cache=True, error_model="numpy", nogil=True, inline="always")
# Inlined into the loops, the finish functions' variables leave Numba's scope bookkeeping (debug information only)
# behind, and its pedantic check warns once per compiled loop, asking for a bug report; the loops' bits are tested.
warnings.filterwarnings("ignore", message=r".*variable '_finish_state__locals__finish_coded",
                        category=numba.core.errors.NumbaIRAssumptionWarning)

MANTISSA_SHIFT = np.uint32(20)  # 23 - M
ROUNDING_BIAS = np.uint32(1 << 19)  # half a code's mantissa step: ties round away from zero
MAGNITUDE_MASK = np.uint32(0x7FFFFFFF)
SMALLEST_NORMAL_BITS = np.uint32(0x00800000)
INFINITY_BITS = np.uint32(0x7F800000)
# (OFFSET, K, HALF) of each map: magnitude code k (1..K) is the float32 with bits (k + OFFSET) << 20; HALF is the bit
# pattern of half the smallest, below which a value encodes as 0.
SIGNED_OFFSET, SIGNED_LARGEST = 889, 127
UNSIGNED_OFFSET, UNSIGNED_LARGEST = 761, 255
SIGNED_HALF = np.uint32(((1 + SIGNED_OFFSET) << 20) - (1 << 23))  # halving a normal float takes 1 off its exponent
UNSIGNED_HALF = np.uint32(((1 + UNSIGNED_OFFSET) << 20) - (1 << 23))
MARKED_SCALE = np.float32(np.nan)
NOISE_SHIFT = np.uint32(32 - 20)  # stochastic rounding adds the top 23 - M bits of 32 random ones
NOISE_LEVELS = np.uint32(1 << 20)
NOISE_STEP = np.float32(2.0 ** -20)
NOISE_STRIDE = np.uint32(0x9E3779B9)  # fastopt.reference.CODE_NOISE_STRIDE
SIGNED_SMALLEST_BITS = np.uint32((1 + SIGNED_OFFSET) << 20)  # the bits of the smallest nonzero magnitude
UNSIGNED_SMALLEST_BITS = np.uint32((1 + UNSIGNED_OFFSET) << 20)


def is_signed(codes):
    """Whether ``codes`` (int8: signed map, uint8: unsigned map) holds a signed state: a constant when compiled."""
    raise NotImplementedError("fastopt.kernels.cpu.codes.is_signed is compiled only")


@overload(is_signed, jit_options=dict(cache=True))
def _is_signed(codes):
    signed = codes.dtype == types.int8
    return lambda codes: signed


# Numba widens integer arithmetic to 64 bits; every result below is cast back to 32 bits, so that LLVM keeps eight
# lanes per AVX2 vector rather than four (2x, measured).
@jit
def decode(code, scale, signed):
    """The float32 value of one code (int8 or uint8) in a block of ``scale``: the map's value times the scale."""
    bits = np.uint32(np.uint8(code))
    if signed:
        magnitude = np.uint32(bits & np.uint32(0x7F))
        sign = np.uint32((bits & np.uint32(0x80)) << np.uint32(24))
        value = np.uint32((magnitude + np.uint32(SIGNED_OFFSET)) << MANTISSA_SHIFT)
        value_bits = np.uint32(sign | (value if magnitude != 0 else np.uint32(0)))
    else:
        value = np.uint32((bits + np.uint32(UNSIGNED_OFFSET)) << MANTISSA_SHIFT)
        value_bits = value if bits != 0 else np.uint32(0)
    return float32_from_bits(value_bits) * scale


@jit
def encode(x, signed):
    """The code of ``x`` = value / absmax (float32, |x| at most 1 and an ulp): the map's nearest value, ties to the
    larger magnitude, from the bits of x. The rounded bits are clamped to the map's range before the offset is taken
    off, so that the arithmetic stays unsigned. Unsigned map: a negative x (its bits as a signed integer below HALF,
    as are those of magnitudes below half the smallest code) encodes as 0, its nearest map value; its clamp from
    below is taken on the bits before rounding (up to those of the smallest code, which round to its code: the same
    codes for every x, checked over all 2^32, and 30% less time in a loop of them, measured)."""
    bits = float32_bits(x)
    if signed:
        magnitude_bits = np.uint32(bits & MAGNITUDE_MASK)
        lowest, highest, half = np.uint32(SIGNED_OFFSET + 1), np.uint32(SIGNED_OFFSET + SIGNED_LARGEST), SIGNED_HALF
        rounded = np.uint32(np.uint32(magnitude_bits + ROUNDING_BIAS) >> MANTISSA_SHIFT)
        rounded = rounded if rounded > lowest else lowest
    else:
        lowest, highest, half = (np.uint32(UNSIGNED_OFFSET + 1), np.uint32(UNSIGNED_OFFSET + UNSIGNED_LARGEST),
                                 UNSIGNED_HALF)
        smallest_bits = np.uint32(lowest << MANTISSA_SHIFT)
        lifted = bits if np.int32(bits) > np.int32(smallest_bits) else smallest_bits  # a negative x's is never used
        rounded = np.uint32(np.uint32(lifted + ROUNDING_BIAS) >> MANTISSA_SHIFT)
    rounded = rounded if rounded < highest else highest
    magnitude = np.uint32(rounded - (lowest - np.uint32(1)))
    if signed:
        magnitude = np.uint32(0) if magnitude_bits < half else magnitude
        return np.uint32(np.uint32(np.uint32(bits >> np.uint32(24)) & np.uint32(0x80)) | magnitude)
    return np.uint32(0) if np.int32(bits) < np.int32(half) else magnitude


@jit
def encode_stochastic(x, signed, noise):
    """The code of ``x`` (as for ``encode``) rounded stochastically with the 32 random bits ``noise``
    (fastopt.quantization.encode_float_codes with noise): with r their top 20 bits, from the smallest nonzero magnitude
    c1 up, the magnitude bits plus r, truncated and clamped to the largest code; below c1, code 1 where |x| >= (2^20 -
    r) * 2^-20 * c1 (exact products), else 0."""
    bits = float32_bits(x)
    magnitude_bits = np.uint32(bits & MAGNITUDE_MASK)
    r = np.uint32(noise >> NOISE_SHIFT)
    if signed:
        smallest_bits, highest = SIGNED_SMALLEST_BITS, np.uint32(SIGNED_OFFSET + SIGNED_LARGEST)
    else:
        smallest_bits, highest = UNSIGNED_SMALLEST_BITS, np.uint32(UNSIGNED_OFFSET + UNSIGNED_LARGEST)
    rounded = np.uint32(np.uint32(magnitude_bits + r) >> MANTISSA_SHIFT)
    rounded = rounded if rounded < highest else highest
    above = np.uint32(rounded - (np.uint32(smallest_bits >> MANTISSA_SHIFT) - np.uint32(1)))
    threshold = np.float32(np.float32(np.float32(NOISE_LEVELS - r) * NOISE_STEP) * float32_from_bits(smallest_bits))
    below = np.uint32(1) if float32_from_bits(magnitude_bits) >= threshold else np.uint32(0)
    magnitude = above if magnitude_bits >= smallest_bits else below
    if signed:
        return np.uint32(np.uint32(np.uint32(bits >> np.uint32(24)) & np.uint32(0x80)) | magnitude)
    return np.uint32(0) if np.int32(bits) < 0 else magnitude


@jit
def mix32(x):
    """fastopt.reference.mix32: lowbias32, in uint32 arithmetic (16 lanes of AVX-512)."""
    x = np.uint32(x ^ np.uint32(x >> np.uint32(16)))
    x = np.uint32(x * np.uint32(0x7FEB352D))
    x = np.uint32(x ^ np.uint32(x >> np.uint32(15)))
    x = np.uint32(x * np.uint32(0x846CA68B))
    return np.uint32(x ^ np.uint32(x >> np.uint32(16)))


def block_noise(rounding):
    """What a block's codes draw their random bits from (fastopt.reference.code_noise): None (``rounding`` None), or
    for ``rounding`` = (seed, step, key of the block's first element, stochastic) the block's 32 bits,
    counter_hash(seed, step, key), and ``stochastic``."""
    raise NotImplementedError("compiled only")


@overload(block_noise, jit_options=dict(cache=True), inline="always")
def _block_noise(rounding):
    if rounding is None or isinstance(rounding, (types.NoneType, types.Omitted)):
        return lambda rounding: None

    def of_block(rounding):
        seed, step, key, stochastic = rounding
        return counter_hash(seed, step, key), stochastic
    return of_block


@block_jit
def encode_values(values, reciprocal, codes, signed):
    """codes[i] = encode(values[i] * reciprocal) over a block (truncated to the codes' 8 bits)."""
    for i in range(codes.shape[0]):
        codes[i] = encode(values[i] * reciprocal, signed)


@block_jit
def encode_values_stochastic(values, reciprocal, codes, signed, bits):
    """encode_values with stochastic rounding: element i's random bits mix32(bits + i * NOISE_STRIDE)."""
    for i in range(codes.shape[0]):
        noise = mix32(np.uint32(bits + np.uint32(np.uint32(i) * NOISE_STRIDE)))
        codes[i] = encode_stochastic(values[i] * reciprocal, signed, noise)


def encode_codes(values, reciprocal, codes, signed, noise):
    """A block's codes: ``encode_values`` (``noise`` None), or with ``noise`` = (the block's random bits,
    stochastic) ``encode_values_stochastic`` where ``stochastic``: one loop each, with no test inside."""
    raise NotImplementedError("compiled only")


@overload(encode_codes, jit_options=dict(cache=True), inline="always")
def _encode_codes(values, reciprocal, codes, signed, noise):
    if isinstance(noise, types.NoneType):
        return lambda values, reciprocal, codes, signed, noise: encode_values(values, reciprocal, codes, signed)

    def maybe_stochastic(values, reciprocal, codes, signed, noise):
        bits, stochastic = noise
        if stochastic:
            encode_values_stochastic(values, reciprocal, codes, signed, bits)
        else:
            encode_values(values, reciprocal, codes, signed)
    return maybe_stochastic


@jit
def absmax_bits(values):
    """The largest ``bits & 0x7FFFFFFF`` over float32 ``values``: the bits of the absmax, and at least those of
    infinity where any value is NaN or infinite (an integer max, unlike a float max, cannot drop a NaN)."""
    largest = np.uint32(0)
    for i in range(values.shape[0]):
        magnitude = np.uint32(float32_bits(values[i]) & MAGNITUDE_MASK)
        largest = magnitude if magnitude > largest else largest
    return largest


@block_jit
def encode_block(values, codes, rounding=None):
    """Encode float32 ``values`` (one block) into ``codes`` (int8/uint8, as long) and return the block's scale: NaN
    for a marked block (a NaN or infinity among the values; codes 0), 0 for a zero block (absmax below 2^-126; codes
    0), else the absmax. ``rounding``: None, or the block's (seed, step, key of its first element, whether its codes
    round stochastically) (``encode_codes``)."""
    signed = is_signed(codes)
    largest = absmax_bits(values)
    if largest >= INFINITY_BITS or largest < SMALLEST_NORMAL_BITS:
        for i in range(codes.shape[0]):
            codes[i] = 0
        return MARKED_SCALE if largest >= INFINITY_BITS else np.float32(0)
    scale = float32_from_bits(largest)
    reciprocal = np.float32(1) / scale
    encode_codes(values, reciprocal, codes, signed, block_noise(rounding))
    return scale


# ---------------------------------------------------------------- state streams of the fused loops
# A state slot's stream in a chunk is either its buffer (a float or 16-bit array, read and written through
# conversions.load/store) or, stored in 8 bits, the tuple (codes, scales, strip, rounding): the chunk's codes, the
# scales of its blocks, a float32 strip of one block, where the loop writes the block's new values before they are
# encoded, and None (codes rounded to nearest, in a kernel built without stochastic codes) or (seed, step, key of the
# chunk's first element, whether this slot's codes round stochastically). The loops walk a chunk in blocks (one block
# for plain states) and see each block of a stream through a *view*: a window of the buffer, or (codes window, the
# block's scale, strip window, the one-element window of the scales where the block's new scale goes, the block's
# rounding): finishing a block needs only its view. The functions below are resolved per type when
# compiled: the loops have no per-element branch on the format. (The helpers at the end live here, with what they call,
# rather than in fused.py: Numba's cache checks only the time stamp of a function's own file.) Decoding each block into
# the strip before the element loop instead, so that the loop is exactly the float32 states' one, was slower: 2.2-2.4
# times the float32 step's cost per element against 1.8 (one thread, in L2, two runs each).
def is_coded(state):
    return isinstance(state, types.BaseTuple)


def block_length(state0, state1, state2, plain):
    """Elements per block of the loops: CODE_BLOCK if any state is 8-bit, else ``plain`` (a whole chunk, or a strip)."""
    raise NotImplementedError("compiled only")


@overload(block_length, jit_options=dict(cache=True))
def _block_length(state0, state1, state2, plain):
    if is_coded(state0) or is_coded(state1) or is_coded(state2):
        return lambda state0, state1, state2, plain: CODE_BLOCK
    return lambda state0, state1, state2, plain: plain


def state_view(state, offset, length):
    """Elements [offset, offset + length) of a state stream, a block (starting at a multiple of CODE_BLOCK)."""
    raise NotImplementedError("compiled only")


@overload(state_view, jit_options=dict(cache=True))
def _state_view(state, offset, length):
    if is_coded(state):
        def coded_view(state, offset, length):
            codes, scales, strip, rounding = state
            block = offset // CODE_BLOCK
            return (window(codes, offset, length), scales[block], window(strip, 0, length), window(scales, block, 1),
                    block_rounding(rounding, offset))
        return coded_view
    return lambda state, offset, length: window(state, offset, length)


def load_state(view, i):
    """Element ``i`` of a view, as the math's float (decoded from its code and block scale)."""
    raise NotImplementedError("compiled only")


@overload(load_state, jit_options=dict(cache=True))
def _load_state(view, i):
    if is_coded(view):
        return lambda view, i: decode(view[0][i], view[1], is_signed(view[0]))
    return lambda view, i: load(view, i)


def store_state(view, i, value):
    """Element ``i`` of a view set to ``value``: rounded to a 16-bit buffer's storage, or into the strip of an 8-bit
    block (encoded by ``finish_state`` once the whole block is known)."""
    raise NotImplementedError("compiled only")


@overload(store_state, jit_options=dict(cache=True))
def _store_state(view, i, value):
    if is_coded(view):
        def store_coded(view, i, value):
            view[2][i] = value
        return store_coded
    return lambda view, i, value: store(view, i, value)


def finish_state(view):
    """After a block's new values are stored: an 8-bit state's block encoded against its new absmax (codes and scale
    written once); nothing for other storage."""
    raise NotImplementedError("compiled only")


@overload(finish_state, jit_options=dict(cache=True), inline="always")
def _finish_state(view):
    if is_coded(view):
        def finish_coded(view):
            view[3][0] = encode_block(view[2], view[0], view[4])
        return finish_coded
    return lambda view: None


def slot_rounding(code_seed, step, code_slots, first_element, slot):
    """The rounding of state slot ``slot``'s codes in a chunk: None (``code_seed`` None: a kernel without stochastic
    codes), else (seed, step, the key of the slot's first element: the chunk's first element as a param's stochastic
    rounding keys it, (tensor << 40) + start, with (slot + 1) << 62 on top, whether the slot's codes round
    stochastically: its bit in the mask ``code_slots``)."""
    raise NotImplementedError("compiled only")


@overload(slot_rounding, jit_options=dict(cache=True))
def _slot_rounding(code_seed, step, code_slots, first_element, slot):
    if isinstance(code_seed, types.NoneType):
        return lambda code_seed, step, code_slots, first_element, slot: None

    def rounding_of_slot(code_seed, step, code_slots, first_element, slot):
        key = np.uint64(np.uint64(slot + 1) << np.uint64(62)) | np.uint64(first_element)
        return code_seed, step, key, (code_slots >> slot) & 1 != 0
    return rounding_of_slot


def block_rounding(rounding, offset):
    """A chunk's slot rounding (``slot_rounding``) for its block at ``offset``: its key moved on by ``offset``."""
    raise NotImplementedError("compiled only")


@overload(block_rounding, jit_options=dict(cache=True))
def _block_rounding(rounding, offset):
    if isinstance(rounding, types.NoneType):
        return lambda rounding, offset: None

    def rounding_of_block(rounding, offset):
        seed, step, key, stochastic = rounding
        return seed, step, key + np.uint64(offset), stochastic
    return rounding_of_block


@jit
def block_views(state0, state1, state2, offset, length):
    """The views of the three state streams' block [offset, offset + length) (codes.state_view)."""
    return state_view(state0, offset, length), state_view(state1, offset, length), state_view(state2, offset, length)


@block_jit
def finish_states(view0, view1, view2, live0, live1, live2):
    """After a block's loop: each live state's block finished (codes.finish_state: 8-bit blocks encoded)."""
    if live0:
        finish_state(view0)
    if live1:
        finish_state(view1)
    if live2:
        finish_state(view2)
