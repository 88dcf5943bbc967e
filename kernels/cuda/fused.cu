// Fused multi-tensor optimizer steps: every tensor of one math dtype updated by one kernel launch per step.
//
// This source is compiled once per rule: -DFASTOPT_RULE names the rule's struct (fastopt::rules::<kernel>),
// -DFASTOPT_RULE_HEADER its header ("rules/<kernel>.cuh") and -DFASTOPT_RULE_NORMS whether its step is two passes
// with per-tensor norms between them; fastopt.backends.cuda.rule_options passes them. Nothing here knows an optimizer:
// adding one is adding its rules/<kernel>.cuh.
//
// Like apex's multi_tensor_apply and the CPU kernels in fastopt/kernels/cpu/fused.py, a launch reads a table of
// buffer addresses (one row per tensor) and a table of chunks (tensor, start, length); here one thread block
// runs one chunk, so a launch has one block per chunk and its size never depends on how the params are split
// into tensors. The tables live in device memory and are uploaded by the host only when they change (see
// layout.cuh for their layout).
//
// Step scalars come from device memory, not from the host, so a captured CUDA graph replays with the schedule
// advancing: each block's first thread reads the optimizer step count (counters[OPTIMIZER_STEP]), its tensor's step
// count and running scalars and the step's grad_control, evaluates its group's schedule, and computes the tensor's
// coefficient row in double, rounding each once into T (step_math.cuh: tensor_coefficients, which advances a copy of
// the running scalars for this step); the other threads wait for it at a barrier and copy it into registers. The
// counts and running scalars are advanced race-free by the last block to finish, chosen by an atomic ticket: every
// block reads them before taking its ticket, so when the last ticket is drawn no block will read them again in this
// launch.
//
// A rule with per-tensor norms (LAMB) takes two launches per step, as the Numba kernel takes two passes: ``norms_*``
// updates the moments from the grads and writes each chunk's sums of squares of the param and of the update direction
// (a fixed block tree, block_sum.cuh) into chunk_norms; each block of ``apply_*`` adds up its tensor's chunk sums
// (tensor_chunks: where each tensor's chunks are), every thread a share and then the block tree, forms the trust ratio
// and moves its chunk's params; its last block advances the counts. The totals are the same bits in every block of a
// tensor and in every run; they differ from the Numba kernel's, whose chunks and order of additions differ, by double
// rounding. (One thread adding all the tensor's chunk sums in order, as the Numba kernel does once, would cost each
// block a chain of dependent loads as long as its tensor has chunks: thousands for one large tensor.) Neither launch
// reads anything from the host: the pair is captured in a CUDA graph like one launch.
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
//
// 8-bit states (float math only; fastopt.quantization's format, codes.cuh): a tensor whose STATE_CODES is set has
// uint8 codes in its 8-bit state slots and float32 block scales in their SCALES slots. Its chunks run the 8-bit loop of
// step_math.cuh (code_chunk_loop below): CODE_BLOCK elements and one scale per 8-bit state at a time, decoded in
// registers, the rule's math in float, each block's new absmax across the threads that hold it (block_max.cuh), the
// new codes and scale written once: one pass over memory, the CPU kernels' bytes. Buckets with 8-bit states launch
// ``step_float_8bit`` (float32 throughout) or ``step_float_8bit_mixed`` (any formats, RUNTIME loops), whose other
// chunks (tensors below min_8bit_size) run chunk_loop; the other kernels keep their registers. A skipped step writes
// no code and no scale.
#include "block_max.cuh"
#include "block_sum.cuh"
#include "host_device.cuh"
#include "layout.cuh"
#include "step_math.cuh"
#include "storage.cuh"

#if !defined(FASTOPT_MAX_CHUNK) || !defined(FASTOPT_RULE) || !defined(FASTOPT_RULE_HEADER) || \
    !defined(FASTOPT_RULE_NORMS)
#error "compile with the -D options of fastopt.backends.cuda.compile_options() and rule_options() (block size, ILP, chunk size, rule)"
#endif

#include FASTOPT_RULE_HEADER

namespace fastopt {

static_assert(HasNorms<FASTOPT_RULE>::value == (FASTOPT_RULE_NORMS != 0),
              "rule_options' FASTOPT_RULE_NORMS (the Numba rule's NORMS) and the CUDA rule's NORMS agree");

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

// group_learning_rate as a call of its own, for the last block: inlined there, its cos's slow path (itself a call)
// made the compiler spill registers in the chunk loop (sm_90, schedule-free's step_float).
__device__ __noinline__ double last_block_learning_rate(Program program, int64 base, int64 optimizer_step,
                                                        double lr_factor) {
    return group_learning_rate(program, base, optimizer_step, lr_factor);
}

// The end of every step: the last block to finish advances, for each tensor that had a gradient, its running scalars
// and (where its group counts steps: group column COUNTS_STEP) its step count (step_math.cuh: advance_tensor), then
// the optimizer's step count, and resets the ticket for the next launch. The stream order makes them visible to the
// next launch.
template <typename Rule>
__device__ void advance_step_counts(int64* counters, int64* tensor_step, double* tensor_scalars, int64 tensor_count,
                                    const int64* addresses, const int64* tensor_group, const double* group_hyper,
                                    Program program, const int64* schedule_base, double lr_factor) {
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
    const int64 optimizer_step = counters[OPTIMIZER_STEP];
    for (int64 tensor = threadIdx.x; tensor < tensor_count; tensor += BLOCK) {
        if (addresses[tensor * SLOTS + GRAD] != 0) {
            const int64 group = tensor_group[tensor];
            double lr = 0.0;
            if constexpr (KeepsScalars<Rule>::value) {
                lr = last_block_learning_rate(program, schedule_base[group], optimizer_step, lr_factor);
            }
            advance_tensor<Rule>(group_hyper + group * Rule::COLUMNS, lr, tensor_step + tensor,
                                 tensor_scalars + tensor * TENSOR_SCALARS);
        }
    }
    __syncthreads();  // every thread has read the optimizer step count
    if (threadIdx.x == 0) {
        counters[OPTIMIZER_STEP] += 1;
        counters[TICKET] = 0;
    }
}

// One block's loop over a chunk with 8-bit states whose streams are stored as F (step_math.cuh's 8-bit loop): per
// iteration each thread's first half, the code blocks' absmax (one barrier), each thread's second half. Every thread
// runs every iteration (the barrier and the warp reductions need them all); a thread past the chunk's end loads and
// stores nothing. Returns the thread's sums of squares of the NORMS pass.
template <typename Rule, int PASS, typename F>
__device__ NormSums code_chunk_loop(const ChunkStreams<float>& s, const CodeStreams& codes, int length, const float* c,
                                    ChunkFlags flags) {
    const bool aligned = streams_quad_aligned<F>(s, Rule::CODES);
    const int blocks = (length + CODE_BLOCK - 1) / CODE_BLOCK;
    NormSums sums{0.0, 0.0};
    int parity = 0;
    for (int first_block = 0; first_block < blocks; first_block += CODE_BLOCKS_AT_ONCE) {
        CodeThread held;
        code_thread_compute<Rule, PASS, F>(s, codes, length, c, flags, aligned, first_block, int(threadIdx.x), held);
        if constexpr (PASS != APPLY) {
            uint32 absmax_bits[STATE_SLOTS];
            code_block_absmax<Rule::ALWAYS_LIVE | Rule::OPTIONAL_LIVE>(held.absmax_bits, absmax_bits, parity);
            parity ^= 1;
            code_thread_store<Rule, PASS, F>(s, codes, length, c, flags, aligned, first_block, int(threadIdx.x), held,
                                             absmax_bits, sums);
        }
    }
    return sums;
}

// The arguments of every step kernel, in the order of the Numba kernels' arguments (the optimizer step is
// read from ``counters`` instead of being passed; the table sizes come along, as C arrays carry none; tensor_chunks
// [tensors + 1]: tensor t's chunks are [tensor_chunks[t], tensor_chunks[t + 1]) of the chunk table).
#define FASTOPT_STEP_PARAMETERS                                                                                     \
    const fastopt::int64 *addresses, const fastopt::int64 *tensor_format, const fastopt::int64 *chunk_tensor,       \
        const fastopt::int64 *chunk_start, const fastopt::int64 *chunk_length, fastopt::int64 chunk_count,          \
        const fastopt::int64 *tensor_group, fastopt::int64 *tensor_step, double *tensor_scalars,                   \
        fastopt::int64 tensor_count, const double *group_hyper, const double *schedule_program,                     \
        fastopt::int64 schedule_size, const fastopt::int64 *schedule_base, fastopt::int64 *counters,                \
        double lr_factor, const double *grad_control, double *chunk_norms, const fastopt::int64 *tensor_chunks,     \
        fastopt::int64 rounding_seed
#define FASTOPT_STEP_ARGUMENTS                                                                                 \
    addresses, tensor_format, chunk_tensor, chunk_start, chunk_length, chunk_count, tensor_group, tensor_step, \
        tensor_scalars, tensor_count, group_hyper, schedule_program, schedule_size, schedule_base, counters,   \
        lr_factor, grad_control, chunk_norms, tensor_chunks, rounding_seed

// One pass (step_math.cuh's Pass) of a step of Rule over all tensors of one math dtype: UPDATE, the whole step of a
// one-pass rule; NORMS and APPLY, the two launches of a rule with per-tensor norms. ANY_MIXED: some tensor may be
// stored in another format than T (else every chunk runs the plain loop). CODES (float math only): some tensor may
// have 8-bit states; its chunks run the 8-bit loop, the others chunk_loop, both for the plain formats or (ANY_MIXED)
// the RUNTIME ones, whatever each chunk's formats (two loops only: a kernel holding more of the 8-bit loops spilled
// registers at the four blocks per multiprocessor of the plain kernels). The pass that ends the step (UPDATE, APPLY)
// counts a skip and advances the counts; NORMS only honours the skip.
template <typename Rule, int PASS, typename T, bool ANY_MIXED, bool CODES = false>
__device__ void step_pass(FASTOPT_STEP_PARAMETERS) {
    static_assert(!CODES || sizeof(T) == 4, "8-bit states exist under float math only");
    if (PASS == NORMS ? grad_control[SKIP] != 0 : skips_step(grad_control, counters)) {
        return;
    }
    __shared__ double lr;
    __shared__ T coefficients[COEFFICIENTS];
    __shared__ Rounding rounding;
    __shared__ double block_param[PASS == UPDATE ? 1 : BLOCK], block_update[PASS == UPDATE ? 1 : BLOCK];
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
        if constexpr (PASS == APPLY) {  // the tensor's sums of squares, for its first thread (step_math.cuh)
            const int64 tensor = chunk_tensor[chunk];
            const NormSums share = thread_norm_sums(chunk_norms, tensor_chunks[tensor], tensor_chunks[tensor + 1],
                                                    int(threadIdx.x));
            block_sum(block_param, block_update, share.param, share.update);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            const int64 tensor = chunk_tensor[chunk];
            const double* hyper = group_hyper + tensor_group[tensor] * Rule::COLUMNS;
            tensor_coefficients<Rule>(hyper, lr, tensor_step[tensor], tensor_scalars + tensor * TENSOR_SCALARS,
                                      grad_control, coefficients);
            if constexpr (PASS == APPLY) {
                Rule::norm_coefficients(hyper, lr, block_param[0], block_update[0], coefficients);
            }
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
        NormSums sums{0.0, 0.0};
        const int length = int(chunk_length[chunk]);
        if constexpr (CODES) {
            typedef typename CodeLoopFormats<ANY_MIXED>::type F;
            if (has_codes(format_row)) {
                ChunkStreams<float> coded_streams = streams;
                const CodeStreams codes = code_streams(coded_streams, address_row, format_row, chunk_start[chunk]);
                sums = code_chunk_loop<Rule, PASS, F>(coded_streams, codes, length, c, flags);
            } else {
                chunk_loop<Rule, PASS, float, F, 1>(streams, length, c, flags, int(threadIdx.x), sums);
            }
        } else {
            run_chunk<Rule, PASS, ANY_MIXED>(streams, mixed, length, c, flags, int(threadIdx.x), sums);
        }
        if constexpr (PASS == NORMS) {
            block_sum(block_param, block_update, sums.param, sums.update);
            if (threadIdx.x == 0) {
                chunk_norms[chunk * NORM_SUMS + NORM_PARAM] = block_param[0];
                chunk_norms[chunk * NORM_SUMS + NORM_UPDATE] = block_update[0];
            }
        }
    }
    if constexpr (PASS != NORMS) {
        advance_step_counts<Rule>(counters, tensor_step, tensor_scalars, tensor_count, addresses, tensor_group,
                                  group_hyper, Program{schedule_program, schedule_size}, schedule_base, lr_factor);
    }
}

}  // namespace fastopt

// ---------------------------------------------------------------- entry points, one per pass and math dtype
// <pass>_T runs buckets whose tensors are all stored in T; <pass>_T_mixed any bucket (a mixed chunk's loop needs more
// registers, which would cost the plain kernel occupancy). The passes: ``step`` for a one-pass rule; ``norms`` then
// ``apply`` for a rule with per-tensor norms (fastopt.backends.cuda.rule_passes).
// MIXED_MIN_BLOCKS: the float mixed kernels are held to as many blocks per multiprocessor as the plain float ones
// (65536 registers / 64 per thread / BLOCK threads): left alone, their widest loop takes 72 registers on sm_90 (three
// blocks of 256, not four); at 64 they do not spill. The double ones would spill: 1, no constraint.
#define FASTOPT_PASS_KERNELS(NAME, PASS, T, MIXED_MIN_BLOCKS)                                                      \
    extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK) NAME##_##T(FASTOPT_STEP_PARAMETERS) {            \
        fastopt::step_pass<FASTOPT_RULE, fastopt::PASS, T, false>(FASTOPT_STEP_ARGUMENTS);                      \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK, MIXED_MIN_BLOCKS)                               \
        NAME##_##T##_mixed(FASTOPT_STEP_PARAMETERS) {                                                           \
        fastopt::step_pass<FASTOPT_RULE, fastopt::PASS, T, true>(FASTOPT_STEP_ARGUMENTS);                       \
    }

// <pass>_float_8bit runs float buckets with 8-bit states (8-bit states exist under float math only) stored in float32
// throughout, at the plain kernels' four blocks per multiprocessor; <pass>_float_8bit_mixed any other (its RUNTIME
// loops take 78 to 110 registers, so two blocks: at three, 80 registers, some spilled).
#define FASTOPT_CODE_KERNEL(NAME, PASS)                                                                            \
    extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK, 65536 / 64 / FASTOPT_BLOCK)                      \
        NAME##_float_8bit(FASTOPT_STEP_PARAMETERS) {                                                            \
        fastopt::step_pass<FASTOPT_RULE, fastopt::PASS, float, false, true>(FASTOPT_STEP_ARGUMENTS);            \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(FASTOPT_BLOCK, 2) NAME##_float_8bit_mixed(FASTOPT_STEP_PARAMETERS) { \
        fastopt::step_pass<FASTOPT_RULE, fastopt::PASS, float, true, true>(FASTOPT_STEP_ARGUMENTS);             \
    }

#if FASTOPT_RULE_NORMS
#define FASTOPT_STEP_KERNELS(T, MIXED_MIN_BLOCKS) \
    FASTOPT_PASS_KERNELS(norms, NORMS, T, MIXED_MIN_BLOCKS) FASTOPT_PASS_KERNELS(apply, APPLY, T, MIXED_MIN_BLOCKS)
#define FASTOPT_CODE_KERNELS FASTOPT_CODE_KERNEL(norms, NORMS) FASTOPT_CODE_KERNEL(apply, APPLY)
#else
#define FASTOPT_STEP_KERNELS(T, MIXED_MIN_BLOCKS) FASTOPT_PASS_KERNELS(step, UPDATE, T, MIXED_MIN_BLOCKS)
#define FASTOPT_CODE_KERNELS FASTOPT_CODE_KERNEL(step, UPDATE)
#endif

FASTOPT_STEP_KERNELS(float, 65536 / 64 / FASTOPT_BLOCK)
FASTOPT_STEP_KERNELS(double, 1)
FASTOPT_CODE_KERNELS
