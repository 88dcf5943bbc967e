// The blend p = lerp(p, state, w): each tensor's param moved toward one of its state buffers by its own weight, one
// block per chunk (Numba: blend_toward_state; the loop is step_math.cuh's blend_chunk). Schedule-free's move of the
// params between where grads are taken and the average evaluated (train()/eval()). No rule is involved: this source
// is compiled once, for every optimizer.
#include "host_device.cuh"
#include "layout.cuh"
#include "step_math.cuh"

namespace fastopt {

// Blends each chunk whose tensor has a buffer in address slot ``slot``, with the tensor's weight ``tensor_weight``
// (in T, as the Numba kernel's); the others are left alone.
template <typename T>
__device__ void blend_toward_state(const int64* addresses, const int64* tensor_format, const int64* chunk_tensor,
                                   const int64* chunk_start, const int64* chunk_length, int64 chunk_count, int64 slot,
                                   const T* tensor_weight) {
    const int64 chunk = blockIdx.x;
    if (chunk >= chunk_count) {
        return;
    }
    const int64 tensor = chunk_tensor[chunk];
    const int64* address_row = addresses + tensor * SLOTS;
    if (address_row[slot] == 0) {
        return;
    }
    blend_chunk<T>(address_row, tensor_format + tensor * FORMAT_COLUMNS, chunk_start[chunk], int(chunk_length[chunk]),
                   int(slot), tensor_weight[tensor], int(threadIdx.x));
}

}  // namespace fastopt

// ---------------------------------------------------------------- entry points, one per math dtype
#define FASTOPT_BLEND_KERNEL(T)                                                                                     \
    extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK) blend_##T(                                          \
        const fastopt::int64* addresses, const fastopt::int64* tensor_format, const fastopt::int64* chunk_tensor,   \
        const fastopt::int64* chunk_start, const fastopt::int64* chunk_length, fastopt::int64 chunk_count,          \
        fastopt::int64 slot, const T* tensor_weight) {                                                              \
        fastopt::blend_toward_state<T>(addresses, tensor_format, chunk_tensor, chunk_start, chunk_length,           \
                                       chunk_count, slot, tensor_weight);                                           \
    }

FASTOPT_BLEND_KERNEL(float)
FASTOPT_BLEND_KERNEL(double)
