// A block's sum of one pair of values per thread, added in a fixed tree, so that a rerun or a graph replay gives the
// same bits: grad_control.cu's grad statistics and fused.cu's per-chunk norms. Device code only.
#pragma once

#include "host_device.cuh"
#include "layout.cuh"

namespace fastopt {

static_assert((BLOCK & (BLOCK - 1)) == 0, "block_sum reduces over a power-of-two block");

// Each thread's (a, b) added over the block in a fixed tree: thread t adds t + half at every level. The sums land in
// element 0 of the shared arrays (BLOCK elements each), for thread 0 (which makes the last addition itself) to read.
template <typename A, typename B>
__device__ void block_sum(A* block_a, B* block_b, A a, B b) {
    block_a[threadIdx.x] = a;
    block_b[threadIdx.x] = b;
    for (int half = BLOCK / 2; half > 0; half /= 2) {
        __syncthreads();
        if (threadIdx.x < half) {
            block_a[threadIdx.x] += block_a[threadIdx.x + half];
            block_b[threadIdx.x] += block_b[threadIdx.x + half];
        }
    }
}

}  // namespace fastopt
