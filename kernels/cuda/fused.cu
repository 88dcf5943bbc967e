// Fused multi-tensor optimizer steps: every tensor of one math dtype updated by one kernel launch per step.
//
// This source is compiled once per rule: -DFASTOPT_RULE names the rule's struct (fastopt::rules::<kernel>) and
// -DFASTOPT_RULE_HEADER its header ("rules/<kernel>.cuh"); fastopt.backends.cuda.rule_options passes both. Nothing
// here knows an optimizer: adding one is adding its rules/<kernel>.cuh.
//
// Like apex's multi_tensor_apply and the CPU kernels in fastopt/kernels/cpu/fused.py, a launch reads a table of
// buffer addresses (one row per tensor) and a table of chunks (tensor, start, length); here one thread block
// runs one chunk, so a launch has one block per chunk and its size never depends on how the params are split
// into tensors. The tables live in device memory and are uploaded by the host only when they change (see
// layout.cuh for their layout).
//
// Step scalars come from device memory, not from the host, so a captured CUDA graph replays with the schedule
// advancing: each block's first thread reads the optimizer step count (counters[OPTIMIZER_STEP]), its tensor's step
// count and the step's grad_control, evaluates its group's schedule, and computes the tensor's coefficient row in
// double, rounding each once into T (step_math.cuh: tensor_coefficients); the other threads wait for it at a barrier
// and copy it into registers. The counts are advanced race-free by the last block to finish, chosen by an atomic
// ticket: every block reads the counts before taking its ticket, so when the last ticket is drawn no block will read
// them again in this launch.
//
// Tensors whose GRAD address is 0 have no gradient this step and are skipped, step count included (torch
// skips parameters whose .grad is None). An empty tensor has no chunks; the host gives it a dummy nonzero
// GRAD address so that its step still counts, as on the CPU. A launch that finds grad_control[SKIP] set (non-finite
// grads, decided on the device by finish_grad_control in grad_control.cu) writes nothing, advances no step count and
// only counts the skip (counters[SKIPPED_STEPS]).
//
// Mixed precision: a tensor whose param, grad or states are stored in another format than T (bfloat16, float16,
// float32 grads under double math, a float32 MASTER copy of a 16-bit param: tensor_format) converts in registers:
// step_math.cuh's run_chunk runs the loop compiled for its formats (the common combinations: no per-element branch on
// a format, two adjacent elements per access) or else the generic RUNTIME loop; the others run the plain loop. The
// choice is per chunk, uniform across the block. Each kernel comes twice: ``step_<T>`` for buckets stored entirely in
// T, built with the plain loop only (its registers, and so its occupancy, are the plain loop's), and
// ``step_<T>_mixed`` for the others.
#include "host_device.cuh"
#include "layout.cuh"
#include "step_math.cuh"
#include "storage.cuh"

#if !defined(FASTOPT_MAX_CHUNK) || !defined(FASTOPT_RULE) || !defined(FASTOPT_RULE_HEADER)
#error "compile with the -D options of fastopt.backends.cuda.compile_options() and rule_options() (block size, ILP, chunk size, rule)"
#endif

#include FASTOPT_RULE_HEADER

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

// The end of every step kernel: the last block to finish advances the optimizer's step count and the step count of
// each tensor that had a gradient and whose group counts steps (group column COUNTS_STEP), then resets the ticket for
// the next launch. The stream order makes the counts visible to the next launch.
__device__ void advance_step_counts(int64* counters, int64* tensor_step, int64 tensor_count, const int64* addresses,
                                    const int64* tensor_group, const double* group_hyper, int group_columns) {
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
        if (addresses[tensor * SLOTS + GRAD] != 0 && group_hyper[tensor_group[tensor] * group_columns + COUNTS_STEP] != 0) {
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

// One step of Rule over all tensors of one math dtype. ANY_MIXED: some tensor may be stored in another format than T
// (else every chunk runs the plain loop).
template <typename Rule, typename T, bool ANY_MIXED>
__device__ void step(FASTOPT_STEP_PARAMETERS) {
    if (skips_step(grad_control, counters)) {
        return;
    }
    __shared__ double lr;
    __shared__ T coefficients[COEFFICIENTS];
    __shared__ Rounding rounding;
    const int64 chunk = blockIdx.x;
    if (chunk < chunk_count && addresses[chunk_tensor[chunk] * SLOTS + GRAD] != 0) {
        // The block's first thread evaluates the schedule alone, then forms the coefficients: cos's slow path is a
        // call, and what is live across a call is saved on the stack (a spill). The barrier between the two ends every
        // live range, as the compiler must read the tables again after it.
        if (threadIdx.x == 0) {
            const int64 group = tensor_group[chunk_tensor[chunk]];
            lr = group_learning_rate(Program{schedule_program, schedule_size}, schedule_base[group],
                                     counters[OPTIMIZER_STEP], lr_factor);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            const int64 tensor = chunk_tensor[chunk];
            const double* hyper = group_hyper + tensor_group[tensor] * Rule::COLUMNS;
            tensor_coefficients<Rule>(hyper, lr, tensor_step[tensor], grad_control, coefficients);
            rounding = chunk_rounding(rounding_seed, counters[OPTIMIZER_STEP], tensor, chunk_start[chunk]);
        }
        __syncthreads();
        const int64 tensor = chunk_tensor[chunk];
        const int64* address_row = addresses + tensor * SLOTS;
        const int64* format_row = tensor_format + tensor * FORMAT_COLUMNS;
        T c[COEFFICIENTS];
        FASTOPT_UNROLL
        for (int k = 0; k < COEFFICIENTS; ++k) {
            c[k] = coefficients[k];  // the rule's unused entries are never read: no register holds them
        }
        const bool mixed = ANY_MIXED && is_mixed(format_row);
        const ChunkStreams<T> streams =
            mixed ? chunk_streams<T, true>(address_row, format_row, chunk_start[chunk], rounding)
                  : chunk_streams<T, false>(address_row, format_row, chunk_start[chunk], rounding);
        // Every thread reads its flags from the tables (broadcast loads): held in shared memory instead, they cost
        // step_float_mixed spills at its 64-register bound (Adam, sm_80 and sm_90).
        const ChunkFlags flags = chunk_flags(address_row, group_hyper + tensor_group[tensor] * Rule::COLUMNS);
        run_chunk<Rule, ANY_MIXED>(streams, mixed, int(chunk_length[chunk]), c, flags, int(threadIdx.x));
    }
    advance_step_counts(counters, tensor_step, tensor_count, addresses, tensor_group, group_hyper, Rule::COLUMNS);
}

}  // namespace fastopt

// ---------------------------------------------------------------- entry points, one per math dtype
// step_T runs buckets whose tensors are all stored in T; step_T_mixed any bucket (a mixed chunk's loop needs more
// registers, which would cost the plain kernel occupancy).
// MIXED_MIN_BLOCKS: the float mixed kernels are held to as many blocks per multiprocessor as the plain float ones
// (65536 registers / 64 per thread / BLOCK threads): left alone, their widest loop takes 72 registers on sm_90 (three
// blocks of 256, not four); at 64 they do not spill. The double ones would spill: 1, no constraint.
#define FASTOPT_STEP_KERNEL(T, MIXED_MIN_BLOCKS)                                                                   \
    extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK) step_##T(FASTOPT_STEP_PARAMETERS) {              \
        fastopt::step<FASTOPT_RULE, T, false>(FASTOPT_STEP_ARGUMENTS);                                          \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK, MIXED_MIN_BLOCKS)                               \
        step_##T##_mixed(FASTOPT_STEP_PARAMETERS) {                                                             \
        fastopt::step<FASTOPT_RULE, T, true>(FASTOPT_STEP_ARGUMENTS);                                           \
    }

FASTOPT_STEP_KERNEL(float, 65536 / 64 / FASTOPT_BLOCK)
FASTOPT_STEP_KERNEL(double, 1)
