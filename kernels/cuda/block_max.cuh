// The largest magnitude bits of each 8-bit state over a code block, across the CODE_THREADS threads that hold it:
// what step_math.cuh's 8-bit loop needs between the halves of an iteration (its absmax, and whether it is marked or
// zero; codes.cuh). Device code only: the host shim takes the maxima over its threads itself.
//
// An integer max is exact and does not depend on the order, so the result is the same bits as the CPU's max over the
// block. Each warp reduces its lanes (redux.sync on sm_80 and later, shuffles before), its first lane writes the
// warp's maxima to shared memory, and after one barrier every thread reads those of its code block's warps.
#pragma once

#include "host_device.cuh"
#include "layout.cuh"
#include "step_math.cuh"

namespace fastopt {

constexpr int WARP = 32;
constexpr int CODE_WARPS = CODE_THREADS / WARP;  // the warps that hold one code block
static_assert(CODE_THREADS % WARP == 0 && BLOCK % WARP == 0, "a code block is held by whole warps");

// The largest ``value`` over the calling warp (every lane calls it).
__device__ __forceinline__ uint32 warp_max(uint32 value) {
#if __CUDA_ARCH__ >= 800
    return __reduce_max_sync(0xFFFFFFFFu, value);
#else
    FASTOPT_UNROLL
    for (int offset = WARP / 2; offset > 0; offset /= 2) {
        const uint32 other = __shfl_xor_sync(0xFFFFFFFFu, value, offset);
        value = other > value ? other : value;
    }
    return value;
#endif
}

// Each state slot's largest ``thread_absmax_bits`` over the threads of the caller's code block, into ``absmax_bits``
// (for the slots of SLOT_MASK, bit k for slot k: those the rule may have). Every thread of the block calls it, once per
// iteration, with ``parity`` alternating between iterations: a warp writes one iteration's maxima only after every
// warp has passed the barrier of the iteration before, so every read of the other buffer (before that barrier) is
// done, and one barrier per iteration suffices.
template <int SLOT_MASK>
__device__ void code_block_absmax(const uint32* thread_absmax_bits, uint32* absmax_bits, int parity) {
    __shared__ uint32 warp_absmax_bits[2][BLOCK / WARP][STATE_SLOTS];
    const int warp = int(threadIdx.x) / WARP;
    FASTOPT_UNROLL
    for (int k = 0; k < STATE_SLOTS; ++k) {
        if ((SLOT_MASK >> k & 1) != 0) {
            const uint32 largest = warp_max(thread_absmax_bits[k]);
            if (threadIdx.x % WARP == 0) {
                warp_absmax_bits[parity][warp][k] = largest;
            }
        }
    }
    __syncthreads();
    const int first_warp = warp - warp % CODE_WARPS;
    FASTOPT_UNROLL
    for (int k = 0; k < STATE_SLOTS; ++k) {
        uint32 largest = 0;
        if ((SLOT_MASK >> k & 1) != 0) {
            FASTOPT_UNROLL
            for (int w = 0; w < CODE_WARPS; ++w) {
                const uint32 bits = warp_absmax_bits[parity][first_warp + w][k];
                largest = bits > largest ? bits : largest;
            }
        }
        absmax_bits[k] = largest;
    }
}

}  // namespace fastopt
