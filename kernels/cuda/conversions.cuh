// Conversions between float32 (the math dtype of mixed precision) and the 16-bit storage formats, on raw bits:
// the CUDA twin of fastopt/kernels/cpu/conversions.py, same names, same constants, same operations.
//
// bfloat16 and float16 values are uint16 bit patterns. Every conversion is exact where the value is
// representable, rounds to nearest, ties to even otherwise, and keeps NaN a NaN (quiet, same sign), infinities
// infinite and subnormals subnormal, bit for bit as the Numba functions (and, NaN payloads aside, ml_dtypes and
// NumPy). All of it is integer arithmetic on the bits, so it needs no cuda_fp16.h (NVRTC has no CUDA headers),
// rounds the same on the host and the device, and does not depend on --ftz or the rounding mode.
//
// Stochastic rounding (float32_to_bfloat16_stochastic) draws its random bits from counter_hash(seed, step,
// element): the same inputs give the same bits in any thread order, on any backend. The fused kernels mix (seed,
// step) once per block (counter_key) and each element in (counter_hash_keyed): the same hash, split in two.
//
// storage.cuh uses these to load and store the kernels' 16-bit streams.
#pragma once

#include "host_device.cuh"

#if !defined(__CUDACC_RTC__)
#include <string.h>  // memcpy, the host's bit cast (NVRTC has no C library headers, and needs none here)
#endif

namespace fastopt {

typedef unsigned short uint16;
typedef unsigned int uint32;
typedef unsigned long long uint64;
static_assert(sizeof(uint16) == 2 && sizeof(uint32) == 4 && sizeof(uint64) == 8, "the bit widths of the formats");

constexpr uint32 BFLOAT16_QUIET_BIT = 0x0040;
constexpr uint32 FLOAT32_ABS_MASK = 0x7FFFFFFF;
constexpr uint32 FLOAT32_INFINITY_BITS = 0x7F800000;

// float16's fields, and the float32 bit patterns where float32 -> float16 rounding changes regime.
constexpr uint32 FLOAT16_QUIET_BIT = 0x0200;
constexpr uint32 FLOAT16_INFINITY_BITS = 0x7C00;
constexpr uint32 FLOAT16_EXPONENT_REBIAS = (127 - 15) << 23;  // float32's exponent bias minus float16's, in place
constexpr uint32 FLOAT16_OVERFLOW_BITS = 0x477FF000;  // 65520: halfway from 65504 (the largest) up; ties to inf
constexpr uint32 FLOAT16_SMALLEST_NORMAL_BITS = 0x38800000;  // 2^-14
constexpr uint32 FLOAT16_SUBNORMAL_FLOOR_EXPONENT = 102;  // 2^-25, half the smallest subnormal: below it, zero

// The IEEE bits of a float32 as a uint32. A bit cast, never a union (undefined behaviour in C++): the device's
// intrinsic, and on the host memcpy, which the compiler turns into a register move.
FASTOPT_HOST_DEVICE uint32 float32_bits(float value) {
#if defined(__CUDA_ARCH__)
    return __float_as_uint(value);
#else
    uint32 bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
#endif
}

// The float32 whose IEEE bits are ``bits``.
FASTOPT_HOST_DEVICE float float32_from_bits(uint32 bits) {
#if defined(__CUDA_ARCH__)
    return __uint_as_float(bits);
#else
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
#endif
}

// A bfloat16 widened to float32: the bits are float32's upper half, so this is exact.
FASTOPT_HOST_DEVICE float bfloat16_bits_to_float32(uint16 bits) { return float32_from_bits(uint32(bits) << 16); }

// A float32 rounded to the nearest bfloat16, ties to even. NaN stays NaN (made quiet, sign kept); the carry of a
// round up moves into the exponent, so overflow gives infinity and subnormals round like any other value
// (bfloat16 has float32's exponent range).
FASTOPT_HOST_DEVICE uint16 float32_to_bfloat16_bits(float value) {
    const uint32 bits = float32_bits(value);
    if ((bits & FLOAT32_ABS_MASK) > FLOAT32_INFINITY_BITS) {
        return uint16((bits >> 16) | BFLOAT16_QUIET_BIT);
    }
    const uint32 lower_half_bias = 0x7FFF + ((bits >> 16) & 1);
    return uint16((bits + lower_half_bias) >> 16);
}

// A float16 widened to float32, exactly. NaN is made quiet, payload and sign kept, as the hardware conversions
// Numba's fpext compiles to (vcvtph2ps on x86, fcvt on Arm) do.
FASTOPT_HOST_DEVICE float float16_bits_to_float32(uint16 bits) {
    const uint32 sign = uint32(bits & 0x8000) << 16;
    const uint32 exponent = (bits >> 10) & 0x1F;
    const uint32 mantissa = bits & 0x03FF;
    if (exponent == 0x1F) {
        const uint32 quiet = mantissa != 0 ? FLOAT16_QUIET_BIT : 0;
        return float32_from_bits(sign | FLOAT32_INFINITY_BITS | ((mantissa | quiet) << 13));
    }
    if (exponent == 0) {
        // Zero or a subnormal, mantissa * 2^-24: the product is exact (a normal float32, a power-of-two scale),
        // and simpler than normalising the mantissa bit by bit.
        return float32_from_bits(sign | float32_bits(float(mantissa) * 0x1p-24f));
    }
    return float32_from_bits(sign | ((exponent << 23) + FLOAT16_EXPONENT_REBIAS) | (mantissa << 13));
}

// A float32 rounded to the nearest float16, ties to even, as bits: NaN made quiet (sign and upper payload kept,
// as Numba's fptrunc: vcvtps2ph on x86), overflow to infinity, subnormal results rounded on their own grid.
FASTOPT_HOST_DEVICE uint16 float32_to_float16_bits(float value) {
    const uint32 bits = float32_bits(value);
    const uint32 sign = (bits >> 16) & 0x8000;
    const uint32 magnitude = bits & FLOAT32_ABS_MASK;
    if (magnitude > FLOAT32_INFINITY_BITS) {
        return uint16(sign | FLOAT16_INFINITY_BITS | FLOAT16_QUIET_BIT | ((bits >> 13) & 0x01FF));
    }
    if (magnitude >= FLOAT16_OVERFLOW_BITS) {
        return uint16(sign | FLOAT16_INFINITY_BITS);
    }
    if (magnitude >= FLOAT16_SMALLEST_NORMAL_BITS) {
        // Rebias the exponent, then round off 13 bits as float32_to_bfloat16_bits rounds off 16: the carry of a
        // round up moves into the exponent (values from 65520 up, which would carry past it, are handled above).
        const uint32 rebiased = magnitude - FLOAT16_EXPONENT_REBIAS;
        const uint32 lower_bits_bias = 0x0FFF + ((rebiased >> 13) & 1);
        return uint16(sign | ((rebiased + lower_bits_bias) >> 13));
    }
    const uint32 exponent = magnitude >> 23;
    if (exponent < FLOAT16_SUBNORMAL_FLOOR_EXPONENT) {
        return uint16(sign);  // below 2^-25 (float32 subnormals included): rounds to zero
    }
    // A subnormal result is the significand (implicit bit restored) scaled by 2^(exponent - 126) onto the 2^-24
    // grid: a right shift by 14..24, rounded to nearest even with the same bias trick. A round up from the
    // largest subnormal carries into 0x0400, the smallest normal, as it should.
    const uint32 significand = (magnitude & 0x007FFFFF) | 0x00800000;
    const uint32 shift = 126 - exponent;
    const uint32 bias = (1u << (shift - 1)) - 1 + ((significand >> shift) & 1);
    return uint16(sign | ((significand + bias) >> shift));
}

// The (seed, step) part of counter_hash's input mix, computed once for many elements.
FASTOPT_HOST_DEVICE uint64 counter_key(int64 seed, int64 step) {
    return uint64(seed) * 0x9E3779B97F4A7C15ull ^ uint64(step) * 0xC2B2AE3D27D4EB4Full;
}

// counter_hash(seed, step, element) given counter_key(seed, step): the mix is an exclusive or, so the key can be
// formed first.
FASTOPT_HOST_DEVICE uint32 counter_hash_keyed(uint64 key, int64 element) {
    uint64 state = key ^ uint64(element) * 0x165667B19E3779F9ull;
    state = (state ^ (state >> 30)) * 0xBF58476D1CE4E5B9ull;
    state = (state ^ (state >> 27)) * 0x94D049BB133111EBull;
    state = state ^ (state >> 31);
    return uint32(state >> 32);
}

// A 32-bit random number from (seed, step, element): SplitMix64's finaliser over a mix of the three, a bijection
// of its 64-bit input with full avalanche, so neighbouring elements and steps get independent bits. Negative
// arguments wrap modulo 2^64, as np.uint64 does in the Numba function.
FASTOPT_HOST_DEVICE uint32 counter_hash(int64 seed, int64 step, int64 element) {
    return counter_hash_keyed(counter_key(seed, step), element);
}

// float32_to_bfloat16_stochastic with the random bits of counter_hash_keyed(key, element).
FASTOPT_HOST_DEVICE uint16 float32_to_bfloat16_stochastic_keyed(float value, uint64 key, int64 element) {
    const uint32 bits = float32_bits(value);
    if ((bits & FLOAT32_ABS_MASK) >= FLOAT32_INFINITY_BITS) {
        return float32_to_bfloat16_bits(value);
    }
    const uint32 noise = counter_hash_keyed(key, element) >> 16;
    return uint16((bits + noise) >> 16);
}

// A float32 rounded to one of its two bfloat16 neighbours, up with probability (value - lower) / (upper - lower):
// adding 16 random bits below the kept half and truncating. Unbiased in expectation; exact values stay exact;
// NaN and infinities as in round to nearest.
FASTOPT_HOST_DEVICE uint16 float32_to_bfloat16_stochastic(float value, int64 seed, int64 step, int64 element) {
    return float32_to_bfloat16_stochastic_keyed(value, counter_key(seed, step), element);
}

}  // namespace fastopt
