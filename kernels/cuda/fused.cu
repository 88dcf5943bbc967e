// Fused multi-tensor optimizer steps: every tensor of one dtype updated by one kernel launch per step.
//
// Like apex's multi_tensor_apply and the CPU kernels in fastopt/kernels/cpu/fused.py, a launch reads a table of
// buffer addresses (one row per tensor) and a table of chunks (tensor, start, length); here one thread block
// runs one chunk, so a launch has one block per chunk and its size never depends on how the params are split
// into tensors. The tables live in device memory and are uploaded by the host only when they change (see
// tables.cuh for their layout).
//
// Step scalars come from device memory, not from the host, so a captured CUDA graph replays with the schedule
// advancing: each block's first thread reads the optimizer step count (counters[OPTIMIZER_STEP]) and its
// tensor's step count, evaluates its group's schedule, and computes the tensor's coefficients in double,
// rounding each once into T (step_math.cuh); the other threads wait for them at a barrier. The counts are
// advanced race-free by the last block to finish, chosen by an atomic ticket: every block reads the counts
// before taking its ticket, so when the last ticket is drawn no block will read them again in this launch.
//
// Tensors whose GRAD address is 0 have no gradient this step and are skipped, step count included (torch
// skips parameters whose .grad is None). An empty tensor has no chunks; the host gives it a dummy nonzero
// GRAD address so that its step still counts, as on the CPU.
//
// Element loop: each thread handles ILP elements BLOCK apart per iteration, loading all of them (every stream
// it needs) before computing and storing any, so a thread has ILP independent loads in flight; loads are
// coalesced across the block. Absent streams (lr_scale, unused state) are never read.
#include "host_device.cuh"
#include "step_math.cuh"
#include "tables.cuh"

#if !defined(FASTOPT_BLOCK) || !defined(FASTOPT_ILP) || !defined(FASTOPT_MAX_CHUNK)
#error "compile with the -D options of fastopt.backends.cuda.compile_options() (block size, ILP, chunk size)"
#endif

namespace fastopt {

// Threads per block: every kernel here is launched with exactly this many. The element loops stride by the constant
// and index with ints, so the ILP loads of a stream are one address plus immediate offsets (with blockDim.x and
// 64-bit indices each load needed its own 64-bit address: adam_step_double took 147 registers on sm_90, not 94).
constexpr int BLOCK = FASTOPT_BLOCK;
constexpr int ILP = FASTOPT_ILP;  // elements in flight per thread

// Chunks hold at most fastopt.backends.cuda.MAX_CHUNK elements: indices within a chunk are ints.
static_assert(FASTOPT_MAX_CHUNK <= (1 << 30), "indices within a chunk must fit an int");

// Elements [start, start + chunk length) of the buffer in ``slot``; nullptr for an absent buffer, which the
// flags guarantee is never read.
template <typename T>
__device__ T* stream(const int64* addresses, int64 tensor, int slot, int64 start) {
    const int64 address = addresses[tensor * SLOTS + slot];
    return address == 0 ? nullptr : reinterpret_cast<T*>(address) + start;
}

// The end of every step kernel: the last block to finish advances the optimizer's step count and the step
// count of each tensor that had a gradient (for SGD only with momentum, as SGD counts momentum steps), then
// resets the ticket for the next launch. The stream order makes the counts visible to the next launch.
__device__ void advance_step_counts(int64* counters, int64* tensor_step, int64 tensor_count, const int64* addresses,
                                    const int64* tensor_group, const double* group_hyper, bool counts_momentum_steps) {
    __shared__ bool last_block;
    __syncthreads();  // every thread of this block is done with its chunk
    if (threadIdx.x == 0) {
        __threadfence();  // this block's reads of the counts are complete before its ticket is seen
        const unsigned long long ticket = atomicAdd(reinterpret_cast<unsigned long long*>(counters + TICKET), 1ULL);
        last_block = ticket == gridDim.x - 1;
    }
    __syncthreads();
    if (!last_block) {
        return;
    }
    __threadfence();
    for (int64 tensor = threadIdx.x; tensor < tensor_count; tensor += blockDim.x) {
        if (addresses[tensor * SLOTS + GRAD] == 0) {
            continue;
        }
        if (!counts_momentum_steps || sgd_counts_step(group_hyper + tensor_group[tensor] * SGD_COLUMNS)) {
            tensor_step[tensor] += 1;
        }
    }
    if (threadIdx.x == 0) {
        counters[OPTIMIZER_STEP] += 1;
        counters[TICKET] = 0;
    }
}

// The arguments of every step kernel, in the order of the Numba kernels' arguments (the optimizer step is
// read from ``counters`` instead of being passed; the table sizes come along, as C arrays carry none).
#define FASTOPT_STEP_PARAMETERS                                                                             \
    const fastopt::int64 *addresses, const fastopt::int64 *chunk_tensor, const fastopt::int64 *chunk_start, \
        const fastopt::int64 *chunk_length, fastopt::int64 chunk_count, const fastopt::int64 *tensor_group, \
        fastopt::int64 *tensor_step, fastopt::int64 tensor_count, const double *group_hyper,                \
        const double *schedule_program, fastopt::int64 schedule_size, const fastopt::int64 *schedule_base,  \
        fastopt::int64 *counters, double lr_factor
#define FASTOPT_STEP_ARGUMENTS                                                                                \
    addresses, chunk_tensor, chunk_start, chunk_length, chunk_count, tensor_group, tensor_step, tensor_count, \
        group_hyper, schedule_program, schedule_size, schedule_base, counters, lr_factor

// The learning rate of ``tensor``'s group at the optimizer step held on the device.
__device__ double tensor_learning_rate(int64 tensor, const int64* tensor_group, const double* schedule_program,
                                       int64 schedule_size, const int64* schedule_base, const int64* counters,
                                       double lr_factor) {
    return group_learning_rate(Program{schedule_program, schedule_size}, schedule_base[tensor_group[tensor]],
                               counters[OPTIMIZER_STEP], lr_factor);
}

// ---------------------------------------------------------------- SGD
template <typename T>
__device__ void sgd_chunk(T* param, const T* grad, const T* lr_scale, T* momentum_buffer, int length,
                          const SgdCoefficients<T>& c, bool has_lr_scale) {
    const bool reads_buffer = sgd_reads_momentum_buffer(c);
    for (int first = threadIdx.x; first < length; first += ILP * BLOCK) {
        T p[ILP], g[ILP], s[ILP], b[ILP];
#pragma unroll
        for (int k = 0; k < ILP; ++k) {
            const int i = first + k * BLOCK;
            p[k] = g[k] = s[k] = b[k] = T(0);
            if (i < length) {
                p[k] = param[i];
                g[k] = grad[i];
                if (has_lr_scale) s[k] = lr_scale[i];
                if (reads_buffer) b[k] = momentum_buffer[i];
            }
        }
#pragma unroll
        for (int k = 0; k < ILP; ++k) {
            const int i = first + k * BLOCK;
            if (i < length) {
                sgd_chunk_element(p[k], g[k], s[k], b[k], c, has_lr_scale);
                param[i] = p[k];
                if (c.use_momentum) momentum_buffer[i] = b[k];
            }
        }
    }
}

// One SGD step over all tensors of one dtype; ``tensor_step`` counts momentum steps (0: the buffer starts as
// the gradient).
template <typename T>
__device__ void sgd_step(FASTOPT_STEP_PARAMETERS) {
    __shared__ SgdCoefficients<T> coefficients;
    const int64 chunk = blockIdx.x;
    if (chunk < chunk_count) {
        const int64 tensor = chunk_tensor[chunk];
        if (addresses[tensor * SLOTS + GRAD] != 0) {
            if (threadIdx.x == 0) {
                const double lr = tensor_learning_rate(tensor, tensor_group, schedule_program, schedule_size,
                                                       schedule_base, counters, lr_factor);
                coefficients = sgd_coefficients<T>(group_hyper + tensor_group[tensor] * SGD_COLUMNS, lr,
                                                   tensor_step[tensor]);
            }
            __syncthreads();
            const SgdCoefficients<T> c = coefficients;
            const int64 start = chunk_start[chunk];
            sgd_chunk(stream<T>(addresses, tensor, PARAM, start), stream<T>(addresses, tensor, GRAD, start),
                      stream<T>(addresses, tensor, LR_SCALE, start), stream<T>(addresses, tensor, STATE0, start),
                      int(chunk_length[chunk]), c, addresses[tensor * SLOTS + LR_SCALE] != 0);
        }
    }
    advance_step_counts(counters, tensor_step, tensor_count, addresses, tensor_group, group_hyper, true);
}

// ---------------------------------------------------------------- RMSprop
template <typename T>
__device__ void rmsprop_chunk(T* param, const T* grad, const T* lr_scale, T* square_avg, T* momentum_buffer,
                              T* grad_avg, int length, const RmspropCoefficients<T>& c, bool has_lr_scale) {
    for (int first = threadIdx.x; first < length; first += ILP * BLOCK) {
        T p[ILP], g[ILP], s[ILP], v[ILP], b[ILP], a[ILP];
#pragma unroll
        for (int k = 0; k < ILP; ++k) {
            const int i = first + k * BLOCK;
            p[k] = g[k] = s[k] = v[k] = b[k] = a[k] = T(0);
            if (i < length) {
                p[k] = param[i];
                g[k] = grad[i];
                if (has_lr_scale) s[k] = lr_scale[i];
                v[k] = square_avg[i];
                if (c.use_momentum) b[k] = momentum_buffer[i];
                if (c.centered) a[k] = grad_avg[i];
            }
        }
#pragma unroll
        for (int k = 0; k < ILP; ++k) {
            const int i = first + k * BLOCK;
            if (i < length) {
                rmsprop_chunk_element(p[k], g[k], s[k], v[k], b[k], a[k], c, has_lr_scale);
                param[i] = p[k];
                square_avg[i] = v[k];
                if (c.use_momentum) momentum_buffer[i] = b[k];
                if (c.centered) grad_avg[i] = a[k];
            }
        }
    }
}

// One RMSprop step over all tensors of one dtype (state slots: square_avg, momentum_buffer, grad_avg).
template <typename T>
__device__ void rmsprop_step(FASTOPT_STEP_PARAMETERS) {
    __shared__ RmspropCoefficients<T> coefficients;
    const int64 chunk = blockIdx.x;
    if (chunk < chunk_count) {
        const int64 tensor = chunk_tensor[chunk];
        if (addresses[tensor * SLOTS + GRAD] != 0) {
            if (threadIdx.x == 0) {
                const double lr = tensor_learning_rate(tensor, tensor_group, schedule_program, schedule_size,
                                                       schedule_base, counters, lr_factor);
                coefficients = rmsprop_coefficients<T>(group_hyper + tensor_group[tensor] * RMSPROP_COLUMNS, lr);
            }
            __syncthreads();
            const RmspropCoefficients<T> c = coefficients;
            const int64 start = chunk_start[chunk];
            rmsprop_chunk(stream<T>(addresses, tensor, PARAM, start), stream<T>(addresses, tensor, GRAD, start),
                          stream<T>(addresses, tensor, LR_SCALE, start), stream<T>(addresses, tensor, STATE0, start),
                          stream<T>(addresses, tensor, STATE1, start), stream<T>(addresses, tensor, STATE2, start),
                          int(chunk_length[chunk]), c, addresses[tensor * SLOTS + LR_SCALE] != 0);
        }
    }
    advance_step_counts(counters, tensor_step, tensor_count, addresses, tensor_group, group_hyper, false);
}

// ---------------------------------------------------------------- Adam and AdamW
template <typename T>
__device__ void adam_chunk(T* param, const T* grad, const T* lr_scale, T* exp_avg, T* exp_avg_sq, T* max_exp_avg_sq,
                           int length, const AdamCoefficients<T>& c, bool has_lr_scale) {
    for (int first = threadIdx.x; first < length; first += ILP * BLOCK) {
        T p[ILP], g[ILP], s[ILP], m[ILP], v[ILP], v_max[ILP];
#pragma unroll
        for (int k = 0; k < ILP; ++k) {
            const int i = first + k * BLOCK;
            p[k] = g[k] = s[k] = m[k] = v[k] = v_max[k] = T(0);
            if (i < length) {
                p[k] = param[i];
                g[k] = grad[i];
                if (has_lr_scale) s[k] = lr_scale[i];
                m[k] = exp_avg[i];
                v[k] = exp_avg_sq[i];
                if (c.amsgrad) v_max[k] = max_exp_avg_sq[i];
            }
        }
#pragma unroll
        for (int k = 0; k < ILP; ++k) {
            const int i = first + k * BLOCK;
            if (i < length) {
                adam_chunk_element(p[k], g[k], s[k], m[k], v[k], v_max[k], c, has_lr_scale);
                param[i] = p[k];
                exp_avg[i] = m[k];
                exp_avg_sq[i] = v[k];
                if (c.amsgrad) max_exp_avg_sq[i] = v_max[k];
            }
        }
    }
}

// One Adam/AdamW step over all tensors of one dtype (state slots: exp_avg, exp_avg_sq, max_exp_avg_sq).
template <typename T>
__device__ void adam_step(FASTOPT_STEP_PARAMETERS) {
    __shared__ AdamCoefficients<T> coefficients;
    const int64 chunk = blockIdx.x;
    if (chunk < chunk_count) {
        const int64 tensor = chunk_tensor[chunk];
        if (addresses[tensor * SLOTS + GRAD] != 0) {
            if (threadIdx.x == 0) {
                const double lr = tensor_learning_rate(tensor, tensor_group, schedule_program, schedule_size,
                                                       schedule_base, counters, lr_factor);
                // The tensor's step count including this step, as the CPU kernel's after its increment.
                coefficients = adam_coefficients<T>(group_hyper + tensor_group[tensor] * ADAM_COLUMNS, lr,
                                                    tensor_step[tensor] + 1);
            }
            __syncthreads();
            const AdamCoefficients<T> c = coefficients;
            const int64 start = chunk_start[chunk];
            adam_chunk(stream<T>(addresses, tensor, PARAM, start), stream<T>(addresses, tensor, GRAD, start),
                       stream<T>(addresses, tensor, LR_SCALE, start), stream<T>(addresses, tensor, STATE0, start),
                       stream<T>(addresses, tensor, STATE1, start), stream<T>(addresses, tensor, STATE2, start),
                       int(chunk_length[chunk]), c, addresses[tensor * SLOTS + LR_SCALE] != 0);
        }
    }
    advance_step_counts(counters, tensor_step, tensor_count, addresses, tensor_group, group_hyper, false);
}

// ---------------------------------------------------------------- the divergence guard's statistics
// Sum of squares (in double) and count of non-finite values of each chunk's grad, one block per chunk; the host
// adds the per-chunk results (a fixed order, so the sum is the same from run to run). No fast math: NaN and
// inf must count.
template <typename T>
__device__ void grad_stats(const int64* addresses, const int64* chunk_tensor, const int64* chunk_start,
                           const int64* chunk_length, int64 chunk_count, double* chunk_sum_of_squares,
                           int64* chunk_nonfinite) {
    __shared__ double block_total[BLOCK];
    __shared__ int64 block_nonfinite[BLOCK];
    const int64 chunk = blockIdx.x;
    double total = 0.0;
    int64 nonfinite = 0;
    if (chunk < chunk_count) {
        const int64 tensor = chunk_tensor[chunk];
        const T* grad = stream<T>(addresses, tensor, GRAD, chunk_start[chunk]);
        // An empty tensor's dummy address never reaches here: it has no chunks.
        if (grad != nullptr) {
            const int64 length = chunk_length[chunk];
            for (int64 i = threadIdx.x; i < length; i += blockDim.x) {
                const double value = double(grad[i]);
                total += value * value;
                nonfinite += isfinite(value) ? 0 : 1;
            }
        }
    }
    block_total[threadIdx.x] = total;
    block_nonfinite[threadIdx.x] = nonfinite;
    for (int half = BLOCK / 2; half > 0; half /= 2) {
        __syncthreads();
        if (threadIdx.x < half) {
            block_total[threadIdx.x] += block_total[threadIdx.x + half];
            block_nonfinite[threadIdx.x] += block_nonfinite[threadIdx.x + half];
        }
    }
    if (threadIdx.x == 0 && chunk < chunk_count) {
        chunk_sum_of_squares[chunk] = block_total[0];
        chunk_nonfinite[chunk] = block_nonfinite[0];
    }
}

static_assert((BLOCK & (BLOCK - 1)) == 0, "grad_stats reduces over a power-of-two block");

}  // namespace fastopt

// ---------------------------------------------------------------- entry points, one per kernel and dtype
#define FASTOPT_STEP_KERNEL(NAME, T) \
    extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK) NAME##_##T(FASTOPT_STEP_PARAMETERS) { \
        fastopt::NAME<T>(FASTOPT_STEP_ARGUMENTS);                                                     \
    }

FASTOPT_STEP_KERNEL(sgd_step, float)
FASTOPT_STEP_KERNEL(sgd_step, double)
FASTOPT_STEP_KERNEL(rmsprop_step, float)
FASTOPT_STEP_KERNEL(rmsprop_step, double)
FASTOPT_STEP_KERNEL(adam_step, float)
FASTOPT_STEP_KERNEL(adam_step, double)

#define FASTOPT_GRAD_STATS_KERNEL(T)                                                                            \
    extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK) grad_stats_##T(                                 \
        const fastopt::int64* addresses, const fastopt::int64* chunk_tensor, const fastopt::int64* chunk_start, \
        const fastopt::int64* chunk_length, fastopt::int64 chunk_count, double* chunk_sum_of_squares,           \
        fastopt::int64* chunk_nonfinite) {                                                                      \
        fastopt::grad_stats<T>(addresses, chunk_tensor, chunk_start, chunk_length, chunk_count,                 \
                               chunk_sum_of_squares, chunk_nonfinite);                                          \
    }

FASTOPT_GRAD_STATS_KERNEL(float)
FASTOPT_GRAD_STATS_KERNEL(double)
