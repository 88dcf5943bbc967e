// 8-bit optimizer states: decoding an element and encoding it in its block, for the CUDA kernels and the host test
// shim: the twin of fastopt/kernels/cpu/codes.py (same names, same arithmetic).
//
// The format and its exact arithmetic are fastopt/quantization.py's (the NumPy oracle these must equal byte for
// byte): a state stored in 8 bits is uint8 ``codes`` (one per element) and float32 ``scales`` (one per CODE_BLOCK
// consecutive elements of the tensor: the block's absmax). A code stands for a little float with CODE_MANTISSA_BITS
// mantissa bits relative to the absmax, built from its bits (no table): the signed map (e4m3, sign << 7 | k, for
// signed states) or the unsigned map (e5m3, k, for non-negative states).
//
// - decode: value = MAP[code] * scale, one float32 multiplication, never contracted into an FMA with what the rule
//   does next (__fmul_rn on the device; the host shim is built with -ffp-contract=off).
// - A block's absmax and its non-finite check are one integer max over the magnitude bits of its values (bits &
//   0x7FFFFFFF): at least INFINITY_BITS means a NaN or infinity is among them, a **marked block** (scale NaN, every
//   code 0: every element decodes to NaN); below SMALLEST_NORMAL_BITS it is a **zero block** (scale 0, every code 0).
//   A float max would not do: fmaxf drops NaN.
// - encode (any other block): r = 1 / scale correctly rounded, once per block (__frcp_rn), x = value * r
//   (__fmul_rn), then integer operations on the bits of x give the nearest code, ties to the larger magnitude; or,
//   for a state whose codes round stochastically, one of the two codes around x, unbiased, from 32 random bits
//   (encode_stochastic: fastopt.quantization.encode_float_codes with noise).
//
// No -ftz and no fast math anywhere: decoded values may be subnormal, and the reciprocal of a large scale is.
#pragma once

#include "conversions.cuh"
#include "host_device.cuh"
#include "layout.cuh"

#if !defined(FASTOPT_CODE_MANTISSA_BITS)
#error "compile with the -D options of fastopt.backends.cuda.compile_options() (the 8-bit code maps)"
#endif

namespace fastopt {

// The code maps' constants (fastopt.quantization._float_map_constants): magnitude code k (1..LARGEST) is the float32
// whose bits are (k + OFFSET) << MANTISSA_SHIFT, the largest exactly 1.0; HALF is the bit pattern of half the smallest,
// below which a value encodes as 0.
constexpr int CODE_MANTISSA_BITS = FASTOPT_CODE_MANTISSA_BITS;
constexpr uint32 MANTISSA_SHIFT = 23 - CODE_MANTISSA_BITS;
constexpr uint32 ROUNDING_BIAS = 1u << (MANTISSA_SHIFT - 1);  // half a code's mantissa step: ties away from zero
constexpr uint32 MAGNITUDE_MASK = FLOAT32_ABS_MASK;
constexpr uint32 INFINITY_BITS = FLOAT32_INFINITY_BITS;
constexpr uint32 SMALLEST_NORMAL_BITS = 0x00800000;  // 2^-126: a smaller absmax is a zero block
constexpr uint32 MARKED_SCALE_BITS = 0x7FC00000;     // the scale of a marked block: NumPy's NaN, as the CPU stores
constexpr int SIGNED_LARGEST = 127, UNSIGNED_LARGEST = 255;
constexpr int SIGNED_OFFSET = (127 << CODE_MANTISSA_BITS) - SIGNED_LARGEST;
constexpr int UNSIGNED_OFFSET = (127 << CODE_MANTISSA_BITS) - UNSIGNED_LARGEST;
constexpr uint32 SIGNED_HALF = (uint32(1 + SIGNED_OFFSET) << MANTISSA_SHIFT) - (1u << 23);
constexpr uint32 UNSIGNED_HALF = (uint32(1 + UNSIGNED_OFFSET) << MANTISSA_SHIFT) - (1u << 23);
static_assert(SIGNED_HALF >= SMALLEST_NORMAL_BITS && UNSIGNED_HALF >= SMALLEST_NORMAL_BITS,
              "the smallest code is a normal float32");
static_assert((uint32(UNSIGNED_LARGEST + UNSIGNED_OFFSET) << MANTISSA_SHIFT) == 0x3F800000 &&
                  (uint32(SIGNED_LARGEST + SIGNED_OFFSET) << MANTISSA_SHIFT) == 0x3F800000,
              "the largest code is 1.0");

// a * b, rounded once: never contracted into an FMA (the kernels are built with --fmad=false too, the shim with
// -ffp-contract=off; the intrinsic says it where it matters).
FASTOPT_HOST_DEVICE float rounded_product(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

// The float32 value of ``code`` in its map (fastopt.quantization's SIGNED_MAP / UNSIGNED_MAP), from the bits.
FASTOPT_HOST_DEVICE float code_value(uint32 code, bool is_signed) {
    const uint32 magnitude = is_signed ? code & 0x7F : code;
    const uint32 sign = is_signed ? (code & 0x80) << 24 : 0;
    const uint32 offset = uint32(is_signed ? SIGNED_OFFSET : UNSIGNED_OFFSET);
    return float32_from_bits(sign | (magnitude != 0 ? (magnitude + offset) << MANTISSA_SHIFT : 0));
}

// The float32 value of one code in a block of ``scale``: the map's value times the scale (NaN in a marked block).
FASTOPT_HOST_DEVICE float decode(uint32 code, float scale, bool is_signed) {
    return rounded_product(code_value(code, is_signed), scale);
}

// The code of ``x`` = value / absmax (|x| at most 1 and an ulp: the clamp takes the ulp): the map's nearest value,
// ties to the larger magnitude, the sign kept (signed map; -0.0 is 0x80), a negative value 0 (unsigned map).
FASTOPT_HOST_DEVICE uint32 encode(float x, bool is_signed) {
    const uint32 bits = float32_bits(x);
    const uint32 magnitude_bits = bits & MAGNITUDE_MASK;
    const int rounded = int((magnitude_bits + ROUNDING_BIAS) >> MANTISSA_SHIFT);
    const int largest = is_signed ? SIGNED_LARGEST : UNSIGNED_LARGEST;
    int magnitude = rounded - (is_signed ? SIGNED_OFFSET : UNSIGNED_OFFSET);
    magnitude = magnitude < 1 ? 1 : magnitude > largest ? largest : magnitude;
    magnitude = magnitude_bits < (is_signed ? SIGNED_HALF : UNSIGNED_HALF) ? 0 : magnitude;
    if (is_signed) {
        return ((bits >> 24) & 0x80) | uint32(magnitude);
    }
    return (bits >> 31) != 0 ? 0 : uint32(magnitude);
}

// The code of ``x`` (as for encode) rounded stochastically with the random bits ``noise``: with r its top
// MANTISSA_SHIFT bits, from the smallest nonzero magnitude c1 up the magnitude bits plus r, truncated (the values
// between two codes are linear in their bits), clamped to the largest; below c1, code 1 where |x| >= (2^MANTISSA_SHIFT -
// r) * 2^-MANTISSA_SHIFT * c1 (each product exact), else 0. A value on a code keeps it.
FASTOPT_HOST_DEVICE uint32 encode_stochastic(float x, bool is_signed, uint32 noise) {
    const uint32 bits = float32_bits(x);
    const uint32 magnitude_bits = bits & MAGNITUDE_MASK;
    const uint32 r = noise >> (32 - MANTISSA_SHIFT);
    const int offset = is_signed ? SIGNED_OFFSET : UNSIGNED_OFFSET;
    const int largest = is_signed ? SIGNED_LARGEST : UNSIGNED_LARGEST;
    const uint32 smallest_bits = uint32(1 + offset) << MANTISSA_SHIFT;
    int magnitude;
    if (magnitude_bits >= smallest_bits) {
        magnitude = int((magnitude_bits + r) >> MANTISSA_SHIFT) - offset;
        magnitude = magnitude > largest ? largest : magnitude;
    } else {
        const float noise_step = float32_from_bits(uint32(127 - MANTISSA_SHIFT) << 23);  // 2^-MANTISSA_SHIFT
        const float threshold = rounded_product(rounded_product(float((1u << MANTISSA_SHIFT) - r), noise_step),
                                                float32_from_bits(smallest_bits));
        magnitude = float32_from_bits(magnitude_bits) >= threshold ? 1 : 0;
    }
    if (is_signed) {
        return ((bits >> 24) & 0x80) | uint32(magnitude);
    }
    return (bits >> 31) != 0 ? 0 : uint32(magnitude);
}

// The key of element ``element`` of state slot ``slot``'s stochastically rounded codes in the tensor whose param's
// stochastic rounding counts from ``first_element`` ((tensor << 40) + chunk start): (slot + 1) << 62 on top of the
// param's, so the streams never meet (fastopt.backends.layout.Layout.stochastic_code_key).
FASTOPT_HOST_DEVICE int64 stochastic_code_key(int slot, int64 element) {
    return int64((uint64(slot + 1) << 62) | uint64(element));
}

// lowbias32: a 32-bit integer hash (fastopt.reference.mix32).
FASTOPT_HOST_DEVICE uint32 mix32(uint32 x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

// The random bits of element ``i`` of a code block whose own bits are ``block_bits`` (counter_hash of the key of its
// first element): one 64-bit hash per block, a 32-bit one per element (fastopt.reference.code_noise).
constexpr uint32 CODE_NOISE_STRIDE = 0x9E3779B9u;
FASTOPT_HOST_DEVICE uint32 code_noise(uint32 block_bits, int i) { return mix32(block_bits + uint32(i) * CODE_NOISE_STRIDE); }

// What a block's absmax is found from: the magnitude bits of one value (NaN above INFINITY_BITS). Their largest over
// the block (an integer max: absmax_bits) says whether the block is marked, zero, or coded, and gives its absmax.
FASTOPT_HOST_DEVICE uint32 magnitude_bits(float value) { return float32_bits(value) & MAGNITUDE_MASK; }

// Whether a block whose largest magnitude bits are ``absmax_bits`` is encoded (neither marked nor zero).
FASTOPT_HOST_DEVICE bool is_coded_block(uint32 absmax_bits) {
    return absmax_bits >= SMALLEST_NORMAL_BITS && absmax_bits < INFINITY_BITS;
}

// The scale stored for a block whose largest magnitude bits are ``absmax_bits``: NaN for a marked block, 0 for a zero
// block, else the absmax itself.
FASTOPT_HOST_DEVICE float block_scale(uint32 absmax_bits) {
    if (absmax_bits >= INFINITY_BITS) {
        return float32_from_bits(MARKED_SCALE_BITS);
    }
    return absmax_bits < SMALLEST_NORMAL_BITS ? 0.0f : float32_from_bits(absmax_bits);
}

// 1 / scale, correctly rounded (subnormal for a scale above 2^126): the factor encode_in_block multiplies by. Only a
// coded block's is used.
FASTOPT_HOST_DEVICE float scale_reciprocal(float scale) {
#if defined(__CUDA_ARCH__)
    return __frcp_rn(scale);
#else
    return 1.0f / scale;
#endif
}

// The code of ``value`` in a block whose largest magnitude bits are ``absmax_bits`` and whose scale's reciprocal is
// ``reciprocal``: 0 in a marked or zero block.
FASTOPT_HOST_DEVICE uint32 encode_in_block(float value, float reciprocal, uint32 absmax_bits, bool is_signed) {
    return is_coded_block(absmax_bits) ? encode(rounded_product(value, reciprocal), is_signed) : 0;
}

// encode_in_block, rounded stochastically with the random bits ``noise``.
FASTOPT_HOST_DEVICE uint32 encode_in_block_stochastic(float value, float reciprocal, uint32 absmax_bits,
                                                      bool is_signed, uint32 noise) {
    return is_coded_block(absmax_bits) ? encode_stochastic(rounded_product(value, reciprocal), is_signed, noise) : 0;
}

}  // namespace fastopt
