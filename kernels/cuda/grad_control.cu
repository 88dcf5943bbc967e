// Grad statistics and grad control: one read of every grad, then one block that decides this step's grad factors
// and skip flag on the device (no host synchronisation). The step kernels of fused.cu read what finish_grad_control
// writes. No rule is involved: this source is compiled once, for every optimizer.
//
// No fast math: NaN and inf grads must be counted. The sums are added in a fixed order (each thread a fixed stride,
// then a fixed tree), so a replay or a rerun gives the same bits.
#include "block_sum.cuh"
#include "grad_control.cuh"
#include "host_device.cuh"
#include "layout.cuh"
#include "storage.cuh"

namespace fastopt {

// Sum of squares (in double) and count of non-finite values of this thread's elements of one chunk's grad.
template <typename T, int FORMAT>
__device__ void chunk_grad_stats(const void* grad, int format, int length, double& total, int64& nonfinite) {
    for (int i = threadIdx.x; i < length; i += BLOCK) {
        const double value = double(widen<T, FORMAT>(load_bits<T, FORMAT>(grad, format, i), format));
        total += value * value;
        nonfinite += isfinite(value) ? 0 : 1;
    }
}

// Sum of squares and count of non-finite values of each chunk's grad, in any storage format, one block per chunk
// (the Numba kernel's grad_stats, whose totals finish_grad_control forms here). No fast math: NaN and inf must
// count.
template <typename T>
__device__ void grad_stats(const int64* addresses, const int64* tensor_format, const int64* chunk_tensor,
                           const int64* chunk_start, const int64* chunk_length, int64 chunk_count,
                           double* chunk_sum_of_squares, int64* chunk_nonfinite) {
    __shared__ double block_total[BLOCK];
    __shared__ int64 block_nonfinite[BLOCK];
    const int64 chunk = blockIdx.x;
    double total = 0.0;
    int64 nonfinite = 0;
    if (chunk < chunk_count) {
        const int64 tensor = chunk_tensor[chunk];
        const int format = int(tensor_format[tensor * FORMAT_COLUMNS + GRAD_FORMAT]);
        const void* grad = stored_pointer<T>(addresses[tensor * SLOTS + GRAD], format, chunk_start[chunk]);
        // An empty tensor's dummy address never reaches here: it has no chunks.
        if (grad != nullptr) {
            const int length = int(chunk_length[chunk]);
            // The grad formats there are, each with its own loop (no per-element branch on the format).
            if (format == NATIVE) {
                chunk_grad_stats<T, NATIVE>(grad, format, length, total, nonfinite);
            } else if (sizeof(T) == 8 || format == FLOAT32) {
                chunk_grad_stats<T, FLOAT32>(grad, format, length, total, nonfinite);
            } else if (format == FLOAT16) {
                chunk_grad_stats<T, FLOAT16>(grad, format, length, total, nonfinite);
            } else {
                chunk_grad_stats<T, BFLOAT16>(grad, format, length, total, nonfinite);
            }
        }
    }
    block_sum(block_total, block_nonfinite, total, nonfinite);
    if (threadIdx.x == 0 && chunk < chunk_count) {
        chunk_sum_of_squares[chunk] = block_total[0];
        chunk_nonfinite[chunk] = block_nonfinite[0];
    }
}

// The step's grad control from the per-chunk statistics of every bucket (one array, bucket after bucket), added in
// a fixed order (each thread a fixed stride, then a fixed tree), so a replay or a rerun gives the same bits; one
// block. The loss scale's inverse is the host's ``unscale``, or float32(1 / scale) of a device array (as the host
// rounds it, as GradScaler's inverse scale). ``max_norm`` < 0: no clipping. ``skip_nonfinite`` 0: NaN/inf grads do
// not skip the step. No host synchronisation: the skip is decided here, and the step kernels read it.
__device__ void finish_grad_control(const double* chunk_sum_of_squares, const int64* chunk_nonfinite,
                                    int64 chunk_count, double unscale, const void* scale, int64 scale_format,
                                    double max_norm, int64 skip_nonfinite, double* grad_control, double* statistics) {
    __shared__ double block_total[BLOCK];
    __shared__ int64 block_nonfinite[BLOCK];
    double total = 0.0;
    int64 nonfinite = 0;
    for (int64 i = threadIdx.x; i < chunk_count; i += BLOCK) {
        total += chunk_sum_of_squares[i];
        nonfinite += chunk_nonfinite[i];
    }
    block_sum(block_total, block_nonfinite, total, nonfinite);
    if (threadIdx.x == 0) {
        if (scale_format == SCALE_FLOAT32) {
            unscale = double(float(1.0 / double(*static_cast<const float*>(scale))));
        } else if (scale_format == SCALE_FLOAT64) {
            unscale = double(float(1.0 / *static_cast<const double*>(scale)));
        }
        set_grad_control(block_total[0], block_nonfinite[0], unscale, max_norm, skip_nonfinite != 0, grad_control,
                         statistics);
    }
}

}  // namespace fastopt

// ---------------------------------------------------------------- entry points
#define FASTOPT_GRAD_STATS_KERNEL(T)                                                                               \
    extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK) grad_stats_##T(                                    \
        const fastopt::int64* addresses, const fastopt::int64* tensor_format, const fastopt::int64* chunk_tensor,  \
        const fastopt::int64* chunk_start, const fastopt::int64* chunk_length, fastopt::int64 chunk_count,         \
        double* chunk_sum_of_squares, fastopt::int64* chunk_nonfinite) {                                           \
        fastopt::grad_stats<T>(addresses, tensor_format, chunk_tensor, chunk_start, chunk_length, chunk_count,     \
                               chunk_sum_of_squares, chunk_nonfinite);                                             \
    }

FASTOPT_GRAD_STATS_KERNEL(float)
FASTOPT_GRAD_STATS_KERNEL(double)

extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK) finish_grad_control(
    const double* chunk_sum_of_squares, const fastopt::int64* chunk_nonfinite, fastopt::int64 chunk_count,
    double unscale, const void* scale, fastopt::int64 scale_format, double max_norm, fastopt::int64 skip_nonfinite,
    double* grad_control, double* statistics) {
    fastopt::finish_grad_control(chunk_sum_of_squares, chunk_nonfinite, chunk_count, unscale, scale, scale_format,
                                 max_norm, skip_nonfinite, grad_control, statistics);
}
