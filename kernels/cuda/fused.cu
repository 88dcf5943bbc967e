// Fused multi-tensor optimizer steps: every tensor of one math dtype updated by one kernel launch per step.
//
// Like apex's multi_tensor_apply and the CPU kernels in fastopt/kernels/cpu/fused.py, a launch reads a table of
// buffer addresses (one row per tensor) and a table of chunks (tensor, start, length); here one thread block
// runs one chunk, so a launch has one block per chunk and its size never depends on how the params are split
// into tensors. The tables live in device memory and are uploaded by the host only when they change (see
// tables.cuh for their layout).
//
// Step scalars come from device memory, not from the host, so a captured CUDA graph replays with the schedule
// advancing: each block's first thread reads the optimizer step count (counters[OPTIMIZER_STEP]), its tensor's step
// count and the step's grad_control, evaluates its group's schedule, and computes the tensor's coefficients in
// double, rounding each once into T (step_math.cuh); the other threads wait for them at a barrier. The counts are
// advanced race-free by the last block to finish, chosen by an atomic ticket: every block reads the counts
// before taking its ticket, so when the last ticket is drawn no block will read them again in this launch.
//
// Tensors whose GRAD address is 0 have no gradient this step and are skipped, step count included (torch
// skips parameters whose .grad is None). An empty tensor has no chunks; the host gives it a dummy nonzero
// GRAD address so that its step still counts, as on the CPU. A launch that finds grad_control[SKIP] set (non-finite
// grads, decided on the device by finish_grad_control) writes nothing, advances no step count and only counts the
// skip (counters[SKIPPED_STEPS]).
//
// Mixed precision: a tensor whose param, grad or states are stored in another format than T (bfloat16, float16,
// float32 grads under double math, a float32 MASTER copy of a 16-bit param: tensor_format) converts in registers:
// step_math.cuh's run_chunk runs the loop compiled for its formats (the common combinations: no per-element branch on
// a format, two adjacent elements per access) or else the generic RUNTIME loop; the others run the plain loop. The
// choice is per chunk, uniform across the block. Each kernel comes twice: ``<name>_<T>`` for buckets stored entirely
// in T, built with the plain loop only (its registers, and so its occupancy, are the plain loop's), and
// ``<name>_<T>_mixed`` for the others.
#include "host_device.cuh"
#include "step_math.cuh"
#include "storage.cuh"
#include "tables.cuh"

#if !defined(FASTOPT_MAX_CHUNK)
#error "compile with the -D options of fastopt.backends.cuda.compile_options() (block size, ILP, chunk size)"
#endif

namespace fastopt {

// Chunks hold at most fastopt.backends.cuda.MAX_CHUNK elements: indices within a chunk are ints.
static_assert(FASTOPT_MAX_CHUNK <= (1 << 30), "indices within a chunk must fit an int");

// Whether this launch skips the step (grad_control[SKIP], uniform across the grid); its first thread counts the skip.
__device__ bool skips_step(const double* grad_control, int64* counters) {
    if (grad_control[SKIP] == 0) {
        return false;
    }
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        counters[SKIPPED_STEPS] += 1;
    }
    return true;
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
    for (int64 tensor = threadIdx.x; tensor < tensor_count; tensor += BLOCK) {
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
#define FASTOPT_STEP_PARAMETERS                                                                                     \
    const fastopt::int64 *addresses, const fastopt::int64 *tensor_format, const fastopt::int64 *chunk_tensor,       \
        const fastopt::int64 *chunk_start, const fastopt::int64 *chunk_length, fastopt::int64 chunk_count,          \
        const fastopt::int64 *tensor_group, fastopt::int64 *tensor_step, fastopt::int64 tensor_count,               \
        const double *group_hyper, const double *schedule_program, fastopt::int64 schedule_size,                    \
        const fastopt::int64 *schedule_base, fastopt::int64 *counters, double lr_factor, const double *grad_control, \
        fastopt::int64 rounding_seed
#define FASTOPT_STEP_ARGUMENTS                                                                                 \
    addresses, tensor_format, chunk_tensor, chunk_start, chunk_length, chunk_count, tensor_group, tensor_step, \
        tensor_count, group_hyper, schedule_program, schedule_size, schedule_base, counters, lr_factor,        \
        grad_control, rounding_seed

// The learning rate of ``tensor``'s group at the optimizer step held on the device.
__device__ double tensor_learning_rate(int64 tensor, const int64* tensor_group, const double* schedule_program,
                                       int64 schedule_size, const int64* schedule_base, const int64* counters,
                                       double lr_factor) {
    return group_learning_rate(Program{schedule_program, schedule_size}, schedule_base[tensor_group[tensor]],
                               counters[OPTIMIZER_STEP], lr_factor);
}

// One step of one optimizer over all tensors of one math dtype. ``COEFFICIENTS`` is the block's first thread's
// computation of the tensor's coefficients (from hyper, lr, tensor_step[tensor] and grad_control). ANY_MIXED: some
// tensor may be stored in another format than T (else every chunk runs the plain loop).
#define FASTOPT_STEP_BODY(LOOP, COEFFICIENTS_TYPE, COEFFICIENTS, COUNTS_MOMENTUM_STEPS)                              \
    if (skips_step(grad_control, counters)) {                                                                       \
        return;                                                                                                     \
    }                                                                                                               \
    __shared__ COEFFICIENTS_TYPE<T> coefficients;                                                                   \
    __shared__ Rounding rounding;                                                                                   \
    const int64 chunk = blockIdx.x;                                                                                 \
    if (chunk < chunk_count && addresses[chunk_tensor[chunk] * SLOTS + GRAD] != 0) {                                \
        if (threadIdx.x == 0) {                                                                                     \
            const int64 tensor = chunk_tensor[chunk];                                                               \
            rounding = chunk_rounding(rounding_seed, counters[OPTIMIZER_STEP], tensor, chunk_start[chunk]);         \
            const double lr = tensor_learning_rate(tensor, tensor_group, schedule_program, schedule_size,           \
                                                   schedule_base, counters, lr_factor);                             \
            coefficients = COEFFICIENTS;                                                                            \
        }                                                                                                           \
        /* The barrier also ends every live range of thread 0's work, which may call cos's slow path (what is */   \
        /* live across a call is saved on the stack): the chunk's tables are read again after it. */               \
        __syncthreads();                                                                                            \
        {                                                                                                           \
            const int64 tensor = chunk_tensor[chunk];                                                               \
            const int64 start = chunk_start[chunk];                                                                 \
            const int64* address_row = addresses + tensor * SLOTS;                                                  \
            const COEFFICIENTS_TYPE<T> c = coefficients;                                                            \
            const int64* format_row = tensor_format + tensor * FORMAT_COLUMNS;                                      \
            const bool has_lr_scale = address_row[LR_SCALE] != 0;                                                   \
            const bool mixed = ANY_MIXED && is_mixed(format_row);                                                   \
            const ChunkStreams<T> streams = mixed ? chunk_streams<T, true>(address_row, format_row, start, rounding) \
                                                  : chunk_streams<T, false>(address_row, format_row, start, rounding); \
            run_chunk<LOOP, ANY_MIXED>(streams, mixed, int(chunk_length[chunk]), c, has_lr_scale, int(threadIdx.x)); \
        }                                                                                                           \
    }                                                                                                               \
    advance_step_counts(counters, tensor_step, tensor_count, addresses, tensor_group, group_hyper,                  \
                        COUNTS_MOMENTUM_STEPS);

// One SGD step; ``tensor_step`` counts momentum steps (0: the buffer starts as the gradient).
template <typename T, bool ANY_MIXED>
__device__ void sgd_step(FASTOPT_STEP_PARAMETERS) {
    FASTOPT_STEP_BODY(SgdLoop, SgdCoefficients,
                      sgd_coefficients<T>(group_hyper + tensor_group[tensor] * SGD_COLUMNS, lr, tensor_step[tensor],
                                          grad_control),
                      true)
}

// One RMSprop step (state slots: square_avg, momentum_buffer, grad_avg).
template <typename T, bool ANY_MIXED>
__device__ void rmsprop_step(FASTOPT_STEP_PARAMETERS) {
    FASTOPT_STEP_BODY(RmspropLoop, RmspropCoefficients,
                      rmsprop_coefficients<T>(group_hyper + tensor_group[tensor] * RMSPROP_COLUMNS, lr, grad_control),
                      false)
}

// One Adam/AdamW step (state slots: exp_avg, exp_avg_sq, max_exp_avg_sq); the tensor's step count including this
// step, as the CPU kernel's after its increment.
template <typename T, bool ANY_MIXED>
__device__ void adam_step(FASTOPT_STEP_PARAMETERS) {
    FASTOPT_STEP_BODY(AdamLoop, AdamCoefficients,
                      adam_coefficients<T>(group_hyper + tensor_group[tensor] * ADAM_COLUMNS, lr,
                                           tensor_step[tensor] + 1, grad_control),
                      false)
}

#undef FASTOPT_STEP_BODY

// ---------------------------------------------------------------- gradient statistics
// Each thread's (total, nonfinite) added over the block in a fixed tree (the same bits on every run): the sums land
// in element 0 of the shared arrays, for thread 0 (which makes the last addition itself) to read.
__device__ void block_sum(double* block_total, int64* block_nonfinite, double total, int64 nonfinite) {
    block_total[threadIdx.x] = total;
    block_nonfinite[threadIdx.x] = nonfinite;
    for (int half = BLOCK / 2; half > 0; half /= 2) {
        __syncthreads();
        if (threadIdx.x < half) {
            block_total[threadIdx.x] += block_total[threadIdx.x + half];
            block_nonfinite[threadIdx.x] += block_nonfinite[threadIdx.x + half];
        }
    }
}

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

static_assert((BLOCK & (BLOCK - 1)) == 0, "grad_stats and finish_grad_control reduce over a power-of-two block");

}  // namespace fastopt

// ---------------------------------------------------------------- entry points, one per kernel and math dtype
// NAME_T runs buckets whose tensors are all stored in T; NAME_T_mixed any bucket (a mixed chunk's loop needs more
// registers, which would cost the plain kernel occupancy).
// MIXED_MIN_BLOCKS: the float mixed kernels are held to as many blocks per multiprocessor as the plain float ones
// (65536 registers / 64 per thread / BLOCK threads): left alone, their widest loop takes 72 registers on sm_90 (three
// blocks of 256, not four); at 64 they do not spill. The double ones would spill: 1, no constraint.
#define FASTOPT_STEP_KERNEL(NAME, T, MIXED_MIN_BLOCKS)                                                                               \
    extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK) NAME##_##T(FASTOPT_STEP_PARAMETERS) {             \
        fastopt::NAME<T, false>(FASTOPT_STEP_ARGUMENTS);                                                          \
    }                                                                                                             \
    extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK, MIXED_MIN_BLOCKS) NAME##_##T##_mixed(FASTOPT_STEP_PARAMETERS) { \
        fastopt::NAME<T, true>(FASTOPT_STEP_ARGUMENTS);                                                           \
    }

FASTOPT_STEP_KERNEL(sgd_step, float, 65536 / 64 / FASTOPT_BLOCK)
FASTOPT_STEP_KERNEL(sgd_step, double, 1)
FASTOPT_STEP_KERNEL(rmsprop_step, float, 65536 / 64 / FASTOPT_BLOCK)
FASTOPT_STEP_KERNEL(rmsprop_step, double, 1)
FASTOPT_STEP_KERNEL(adam_step, float, 65536 / 64 / FASTOPT_BLOCK)
FASTOPT_STEP_KERNEL(adam_step, double, 1)

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
