r"""8-bit optimizer states: the storage format and its NumPy reference (the oracle of the 8-bit kernels).

A state tensor of ``size`` elements is stored as ``codes`` (uint8, one per element, in the tensor's flat order) and
``scales`` (float32, one per block of ``BLOCK`` = 256 consecutive elements; the last block may be short; an empty
tensor has no blocks). A code stands for a value in [-1, 1] (signed states) or [0, 1] (non-negative states), the
**code map**; the element's value is that times its block's scale, the block's absmax. Tensors with fewer than
``min_8bit_size`` elements (``MIN_8BIT_SIZE`` = 4096, as bitsandbytes) stay float32.

The code map: sign-magnitude little floats relative to the absmax (chosen by measurement over bitsandbytes' dynamic
map: ``bench/RESULTS_QUANTIZATION.md``). A magnitude code ``k`` in 1..K is the float32 whose bit pattern is
``(k + OFFSET) << (23 - M)``: an exponent and M = 3 mantissa bits, with no subnormals, the largest code exactly 1.0
and ``k = 0`` exactly 0. Each binade holds 8 codes, so every nonzero value is within 1/16 (relative) of its code.

==============  =========================  ========  ======  =================================================
map             codes                      K         OFFSET  range of nonzero magnitudes
==============  =========================  ========  ======  =================================================
signed (e4m3)   ``sign << 7 | k``          127       889     1.25 * 2^-16 (1.9e-5) .. 1, 0x80 is -0.0
unsigned (e5m3) ``k``                      255       761     1.25 * 2^-32 (2.9e-10) .. 1
==============  =========================  ========  ======  =================================================

The unsigned map spans twice the binades of the signed one: a second moment is a square, so its spread within a
block is the square of the first moment's.

**The exact arithmetic** (what a Numba or CUDA kernel must do to produce the same bytes; every step is exact or a
single IEEE float32 operation rounded to nearest even, with no FMA contraction, no flush of subnormals to zero,
and no exp/log/pow):

1. *Scale.* ``s = max |v|`` over the block's float32 values (exact). If any value of the block is NaN or
   infinite, the block is **marked**: ``s = NaN`` is stored and every code of the block is 0, so every element
   decodes to NaN (see "Non-finite values" below; a kernel must find NaN apart from its max: CUDA's ``fmaxf``
   drops NaN). If ``s < 2^-126`` (zero, or subnormal) the block is **zero**: ``s = 0`` is stored and every code is
   0 (a subnormal absmax would overflow the reciprocal; no optimizer feels values below 1.2e-38).
2. *Encode* (any other block): ``r = 1 / s`` once per block, then ``x = v * r`` per element: two float32
   operations, each correctly rounded (CUDA: ``__frcp_rn(s)`` or ``__fdiv_rn(1.0f, s)``, and ``__fmul_rn(v, r)``;
   Numba and NumPy: ``/`` and ``*`` on float32 operands, no fastmath). ``|x|`` may exceed 1 by an ulp at the
   absmax; the clamp below takes care of it. Then, on the bits of ``x`` as integers (``b`` = the uint32 pattern,
   ``a = b & 0x7FFFFFFF``)::

       k = ((a + (1 << (22 - M))) >> (23 - M)) - OFFSET      # round the mantissa to M bits, ties away from 0
       k = min(max(k, 1), K)
       if a < HALF: k = 0                                     # HALF = bits of magnitude(1) / 2
       code = (b >> 24 & 0x80) | k      (signed)
       code = 0 if b >> 31 else k       (unsigned: a negative value's nearest map value is 0)

   This is exactly the nearest map value to ``x``, ties (x halfway between two map values: all midpoints are
   float32 numbers) to the larger magnitude, and the sign of x kept (signed map: ``encode(-x) = encode(x) ^ 0x80``,
   -0.0 encodes as 0x80). A search over the 256 map values gives the same codes (the tests check both). About 10
   integer operations, no branch (selects), no memory access; a search is 8 dependent table loads.
3. *Decode*: ``value = MAP[code] * s``, one float32 multiplication (CUDA: ``__fmul_rn``, so that it is not
   contracted into an FMA with what the rule adds next). ``MAP[code]`` is ``SIGNED_MAP`` or ``UNSIGNED_MAP``
   (256 float32), or the same number built from the bits: ``((k + OFFSET) << (23 - M)) | (code & 0x80) << 24`` for
   ``k = code & 0x7F > 0``, else ``(code & 0x80) << 24``. Products below 2^-126 are subnormal: kernels must not
   flush them (no ``-ftz``).

Decoding and re-encoding a block gives back its codes and scale (the absmax element decodes to exactly ``s``;
every other decoded value is within a few ulps of ``MAP[code] * s``, far from any midpoint), as long as the
decoded values are normal floats (``s`` above about 2^-94, unsigned; 2^-110, signed).

**Non-finite values.** A NaN or infinity in a state is never turned into a finite number silently: the block that
holds it is marked (scale NaN, codes 0) and decodes to NaN in all its elements, so the next update writes NaN
into the params it touches, where the loss shows it. The guard (``fastopt.Guard``, which skips a step with
non-finite grads, leaving codes and scales untouched) is what keeps NaN out of the states in the first place.

**One 8-bit update** (:func:`update_8bit`) is what a fused kernel does per block: decode every 8-bit state of the
tensor, run the rule's float32 element math, take each state's new absmax, encode. Blocks are independent, so
doing it a whole tensor at a time, as here, is the same.
"""
from dataclasses import dataclass

import numpy as np

from .kernels.cpu import layout as kernel_layout

BLOCK = kernel_layout.CODE_BLOCK  # 256
MIN_8BIT_SIZE = 4096
MANTISSA_BITS = 3
SMALLEST_SCALE = np.float32(2.0 ** -126)  # a block whose absmax is below it (zero or subnormal) is stored as zero

# Which fastopt states are signed (True), non-negative (False), or kept float32 (None: not a moment), by torch's
# state name across the rules (fastopt/rules/*.py STATE_SLOTS).
STATE_SIGNED = {
    "exp_avg": True,  # Adam/AdamW/AMSGrad, LAMB, Lion: first moment
    "momentum_buffer": True,  # SGD (the update direction itself), RMSprop with momentum
    "grad_avg": True,  # RMSprop centered: sqrt(square_avg - grad_avg^2) can go negative (NaN) from 8-bit errors
    "exp_avg_sq": False,  # Adam/AdamW, LAMB, AdamWScheduleFree: second moment
    "max_exp_avg_sq": False,  # AMSGrad: a running max of the (quantized) second moment
    "sum": False,  # Adagrad: grows without decay, values of all ages share a block
    "square_avg": False,  # RMSprop
    "z": None,  # schedule-free's base iterate: param-like, not a moment; 8 bits would cost the params' precision
}


# ------------------------------------------------------------------------------------------------------ code maps
def _float_map_constants(signed, mantissa_bits):
    """(K, OFFSET, shift, HALF): K nonzero magnitudes, magnitude k has the float32 bits (k + OFFSET) << shift, the
    largest (k = K) is 1.0; HALF is the bit pattern of half the smallest (values below it encode as 0)."""
    largest = 127 if signed else 255
    shift = 23 - mantissa_bits
    offset = (127 << mantissa_bits) - largest
    half = ((1 + offset) << shift) - (1 << 23)
    if half < (1 << 23):
        raise ValueError(f"{mantissa_bits} mantissa bits leave the smallest code below float32's normal range")
    return largest, offset, shift, half


def float_code_map(signed, mantissa_bits=MANTISSA_BITS):
    """The 256 values of the sign-magnitude float code map, by code (float32; the signed map's 0x80 is -0.0)."""
    largest, offset, shift, _ = _float_map_constants(signed, mantissa_bits)
    codes = np.arange(256, dtype=np.int64)
    magnitude = codes & 0x7F if signed else codes
    bits = np.where(magnitude > 0, (magnitude + offset) << shift, 0)
    if signed:
        bits |= (codes & 0x80) << 24
    return bits.astype(np.uint32).view(np.float32)


def encode_float_codes(x, signed, mantissa_bits=MANTISSA_BITS, noise=None):
    """Codes of float32 ``x`` in the float code map: the closed form on the bits of x (module docstring, step 2), in
    int64 NumPy arithmetic, as the kernels do it in int32. ``|x|`` is at most 1 and an ulp (larger values take the
    top code); NaN never gets here (its block is marked).

    ``noise`` (uint32 per element, uniform): stochastic rounding instead, to one of the two map values around
    ``|x|`` with probabilities that make the code's expected value ``x`` (exactly; below the smallest nonzero
    magnitude ``c1``, to ``c1 * 2^-20``). With the top ``S = 23 - M`` bits of the noise as ``r`` (a larger ``r``
    rounds up more often): from ``c1`` up, ``k = ((a + r) >> S) - OFFSET``, clamped to K (the values between two
    codes are linear in their bits); below it, ``k = 1`` if ``|x| >= (2^S - r) * 2^-S * c1`` (float32 products,
    exact), else 0. A value on a code keeps it, so zero stays zero and the absmax element stays exact."""
    largest, offset, shift, half = _float_map_constants(signed, mantissa_bits)
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.int64)
    magnitude_bits = bits & 0x7FFFFFFF
    if noise is None:
        magnitude = ((magnitude_bits + (1 << (shift - 1))) >> shift) - offset
        magnitude = np.where(magnitude_bits < half, 0, np.clip(magnitude, 1, largest))
    else:
        r = np.asarray(noise, dtype=np.uint32).astype(np.int64) >> (32 - shift)
        smallest = (1 + offset) << shift  # the bits of c1
        threshold = ((1 << shift) - r).astype(np.float32) * np.float32(2.0 ** -shift) * np.uint32(smallest).view(
            np.float32)
        below = np.where(np.abs(np.asarray(x, dtype=np.float32)) >= threshold, 1, 0)
        magnitude = np.where(magnitude_bits < smallest, below,
                             np.clip(((magnitude_bits + r) >> shift) - offset, 1, largest))
    negative = bits >> 31
    codes = (negative << 7) | magnitude if signed else np.where(negative == 1, 0, magnitude)
    return codes.astype(np.uint8)


def dynamic_code_map(signed):
    """bitsandbytes' dynamic (tree) map, ``bitsandbytes.functional.create_dynamic_map(signed)`` (7 exponent bits,
    8 bits in all), rebuilt bit for bit in NumPy: in each decade 10^(i-6)..10^(i-5), i = 0..6, the midpoints of
    2^i (signed; 2^(i+1) unsigned) equal intervals of float32 ``torch.linspace(0.1, 1)``, times 10^(i-6) in float32;
    the signed map adds their negatives; both add 0 and 1.0; sorted ascending."""
    def linspace(count):  # torch's float32 linspace: step rounded to float32, start + step * i rounded once
        start, end = np.float32(0.1), np.float32(1.0)
        step = np.float32((end - start) / np.float32(count - 1))
        index = np.arange(count)
        exact = np.where(index < count // 2, np.float64(start) + np.float64(step) * index,
                         np.float64(end) - np.float64(step) * (count - 1 - index))
        return exact.astype(np.float32)

    values = [np.float32(0.0), np.float32(1.0)]
    for decade in range(7):
        bounds = linspace(2 ** decade + 1 if signed else 2 ** (decade + 1) + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        scaled = np.float32(10.0 ** (decade - 6)) * means
        values += list(scaled) + (list(-scaled) if signed else [])
    assert len(values) == 256
    return np.sort(np.array(values, dtype=np.float32))


def linear_code_map(signed):
    """Evenly spaced codes (a baseline, not a candidate): k / 127 for k in -127..127 plus -1 (signed), k / 255."""
    if signed:
        return np.concatenate([[-1.0], np.arange(-127, 128) / 127.0]).astype(np.float32)
    return (np.arange(256) / 255.0).astype(np.float32)


def nearest_codes(x, code_map):
    """Codes of the nearest values of ``code_map`` (256 float32 values, 0 among them) to float32 ``x``, ties to the
    larger magnitude: the definition of encoding, for any map (a search; the format's own map has a closed form).
    Where two codes hold the same value (+0.0 and -0.0), the first is used."""
    code_map = np.asarray(code_map, dtype=np.float32)
    _, first = np.unique(code_map, return_index=True)  # sorted distinct values, and the first code of each
    if code_map[first].min() > 0 or code_map[first].max() < 0:
        raise ValueError("a code map must hold 0")
    values = code_map[first].astype(np.float64)
    midpoints = (values[:-1] + values[1:]) / 2  # exact: two float32s' sum fits a float64
    x = np.asarray(x, dtype=np.float32).astype(np.float64)
    above = np.searchsorted(midpoints, x, side="right")  # a tie at a positive midpoint goes up
    below = np.searchsorted(midpoints, x, side="left")  # a tie at a negative midpoint goes down
    return first[np.where(x >= 0, above, below)].astype(np.uint8)


SIGNED_MAP = float_code_map(True)
UNSIGNED_MAP = float_code_map(False)


def code_map_of(signed):
    """The format's map for a signed (True) or non-negative (False) state."""
    return SIGNED_MAP if signed else UNSIGNED_MAP


# --------------------------------------------------------------------------------------------- quantize, dequantize
def block_count(size, block=BLOCK):
    return -(-int(size) // block)


def stores_8bit(size, min_8bit_size=MIN_8BIT_SIZE):
    """Whether a state tensor of ``size`` elements is stored in 8 bits (else float32)."""
    return int(size) >= min_8bit_size


def quantize(values, signed, block=BLOCK, code_map=None, noise=None):
    """``values`` (any shape; float64 is rounded to float32 first, as a kernel's results are) as
    ``(codes uint8 [size], scales float32 [ceil(size / block)])``, by the module docstring's arithmetic.
    ``code_map`` None: the format's map (closed-form encode); else any 256-value map, encoded by
    :func:`nearest_codes` (the benchmark's candidates). ``noise`` (uint32, one per value; format's map only):
    stochastic rounding of the codes (:func:`encode_float_codes`); the scales are the same."""
    if noise is not None and code_map is not None:
        raise ValueError("stochastic rounding (noise) is defined for the format's map only")
    flat = np.asarray(values).astype(np.float32).reshape(-1)
    count = block_count(flat.size, block)
    padded = np.zeros(count * block, dtype=np.float32)
    padded[:flat.size] = flat  # zero padding changes no absmax
    blocks = padded.reshape(count, block)
    with np.errstate(invalid="ignore"):
        scales = np.abs(blocks).max(axis=1) if count else np.zeros(0, np.float32)  # NaN if the block holds one
    marked = ~np.isfinite(scales)
    scales[marked] = np.nan
    scales[scales < SMALLEST_SCALE] = 0  # zero or subnormal: a zero block
    live = scales > 0  # False for NaN
    reciprocal = np.float32(1) / scales[live]  # float32: correctly rounded
    x = np.zeros_like(blocks)
    x[live] = blocks[live] * reciprocal[:, None]  # float32: correctly rounded
    if noise is not None:
        padded_noise = np.zeros(count * block, dtype=np.uint32)
        padded_noise[:flat.size] = np.asarray(noise, dtype=np.uint32).reshape(-1)
        noise = padded_noise.reshape(count, block)
    codes = encode_float_codes(x, signed, noise=noise) if code_map is None else nearest_codes(x, code_map)
    codes[~live] = 0
    return codes.reshape(-1)[:flat.size].copy(), scales.astype(np.float32)


def dequantize(codes, scales, signed, block=BLOCK, code_map=None):
    """float32 values of ``codes`` (any shape, blocks in flat order: a state's codes as stored, shaped like its param)
    and ``scales``, shaped like ``codes``: ``map[code] * scale``, one float32 multiplication."""
    codes = np.asarray(codes)
    scales = np.asarray(scales)
    if codes.dtype != np.uint8 or scales.dtype != np.float32:
        raise TypeError(f"codes must be uint8 and scales float32, got {codes.dtype} and {scales.dtype}")
    if scales.shape != (block_count(codes.size, block),):
        raise ValueError(f"{codes.size} codes in blocks of {block} need {block_count(codes.size, block)} scales, "
                         f"got shape {scales.shape}")
    table = code_map_of(signed) if code_map is None else np.asarray(code_map, dtype=np.float32)
    per_element = np.repeat(scales, block)[:codes.size]
    return (table[codes.reshape(-1)] * per_element).reshape(codes.shape)


def round_trip(values, signed, block=BLOCK, code_map=None):
    """``values`` quantized and dequantized: float32, same shape."""
    codes, scales = quantize(values, signed, block, code_map)
    return dequantize(codes, scales, signed, block, code_map).reshape(np.shape(values))


# ------------------------------------------------------------------------------------------------- 8-bit states
@dataclass
class QuantizedTensor:
    """One state tensor in 8 bits: ``codes`` uint8 [size] (flat order), ``scales`` float32 [ceil(size / BLOCK)]."""
    codes: np.ndarray
    scales: np.ndarray
    signed: bool
    shape: tuple

    @classmethod
    def from_values(cls, values, signed):
        codes, scales = quantize(values, signed)
        return cls(codes, scales, bool(signed), tuple(np.shape(values)))

    def values(self):
        """The float32 values (a new array of ``shape``)."""
        return dequantize(self.codes, self.scales, self.signed).reshape(self.shape)

    @property
    def nbytes(self):
        return self.codes.nbytes + self.scales.nbytes


def compress(values, signed, min_8bit_size=MIN_8BIT_SIZE):
    """A state as it is stored: a :class:`QuantizedTensor`, or a float32 copy below ``min_8bit_size`` elements
    (``signed`` None, a state that is not a moment: always float32)."""
    if signed is None or not stores_8bit(np.size(values), min_8bit_size):
        return np.array(values, dtype=np.float32)
    return QuantizedTensor.from_values(values, signed)


def decompress(stored):
    """float32 values of a stored state (a float32 state is returned as it is, to be updated in place)."""
    return stored.values() if isinstance(stored, QuantizedTensor) else stored


def update_8bit(update, states):
    """One step on stored states, as a fused kernel does it: decode each 8-bit state to float32, ``update(*values)``
    (the rule's float32 math; it changes the arrays in place, and the params it closes over), then encode each
    8-bit state against its new absmax. float32 states are updated in place. Returns the new stored states."""
    values = [decompress(stored) for stored in states]
    update(*values)
    return [QuantizedTensor.from_values(value, stored.signed) if isinstance(stored, QuantizedTensor) else stored
            for stored, value in zip(states, values)]
