// The generic part of a fused step, written once for every rule, for the CUDA kernels and the host test shim: what
// fastopt/kernels/cpu/fused.py does around a rule's element function (its rule_step, run_chunk and chunk_loop).
//
// A rule (rules/<kernel>.cuh, a struct named as its kernel) supplies ``coefficients`` (the tensor's step scalars,
// computed in double from its group's row, the group's learning rate and its step count, each rounded once into the
// math dtype T, as torch passes Python floats) and ``element`` (one element's update), and the constants COLUMNS (its
// group row's width), ALWAYS_LIVE and OPTIONAL_LIVE (the state slots it always uses and may use, bit k for slot k).
// Everything else is here: the coefficient row (the rule's scalars, then the grad factors), the grad each element
// sees (unscaled, clipped, negated for maximize), lr_scale, which state slots are read and written, and the chunk loop
// over every storage format.
//
// ``chunk_loop`` is one block's loop over its chunk, for the thread ``thread`` of BLOCK: each thread handles ILP
// elements BLOCK apart per iteration, loading all of them (every stream it needs) before computing and storing any,
// so a thread has ILP independent loads in flight; loads are coalesced across the block. Absent streams (lr_scale,
// the state slots the group does not use) are never read, and a slot the rule never has costs nothing: it is known at
// compile time. The kernels call it with threadIdx.x, the host shim with every thread index in turn, so the host
// build runs the device's loop. A tensor with a stream stored in another format than T converts in registers:
// 16-bit and float32 streams are widened exactly after the load and rounded at the store (storage.cuh).
#pragma once

#include "host_device.cuh"
#include "layout.cuh"
#include "schedule_math.cuh"
#include "storage.cuh"

namespace fastopt {

// The group's schedule at the optimizer step, times ``lr_factor`` (the divergence guard's back-off; 1.0 leaves
// the rate exactly as scheduled). Numba: group_learning_rates.
FASTOPT_HOST_DEVICE double group_learning_rate(Program program, int64 base, int64 optimizer_step, double lr_factor) {
    return schedule_value(program, base, optimizer_step) * lr_factor;
}

// The gradient the update uses: unscaled (GradScaler's multiply by 1 / scale), clipped (clip_grad_norm_'s multiply
// by the clip factor), in that order as in torch, then negated for maximize. Both factors are exactly 1 without a
// loss scale or clipping, and x * 1 is x for every x. Numba: unscaled_grad.
template <typename T>
FASTOPT_HOST_DEVICE T unscaled_grad(T grad, T grad_unscale, T grad_clip, bool maximize) {
    const T g = grad * grad_unscale * grad_clip;
    return maximize ? -g : g;
}

// A tensor's coefficient row ``c`` (COEFFICIENTS values): the rule's step scalars, then grad_control's factors, each
// rounded once into T (Numba: the first loop of rule_step). ``hyper`` is its group's row; ``tensor_step`` its step
// count before this step: the rule sees the count including this step where the group counts steps.
template <typename Rule, typename T>
FASTOPT_HOST_DEVICE void tensor_coefficients(const double* hyper, double lr, int64 tensor_step,
                                             const double* grad_control, T* c) {
    for (int k = 0; k < RULE_COEFFICIENTS; ++k) {
        c[k] = T(0);  // every entry defined, whatever the rule writes
    }
    Rule::coefficients(hyper, lr, tensor_step + (hyper[COUNTS_STEP] != 0 ? 1 : 0), c);
    c[COEFFICIENT_GRAD_UNSCALE] = T(grad_control[GRAD_UNSCALE]);
    c[COEFFICIENT_GRAD_CLIP] = T(grad_control[GRAD_CLIP]);
}

// What a chunk's loop needs besides its streams and coefficients: uniform across the block.
struct ChunkFlags {
    bool has_lr_scale;  // the tensor has an lr_scale stream
    bool maximize;      // the group's MAXIMIZE: the grad is negated
    int live;           // the group's LIVE_STATES: bit k set, state slot k is read and written
};

FASTOPT_HOST_DEVICE ChunkFlags chunk_flags(const int64* address_row, const double* hyper) {
    return ChunkFlags{address_row[LR_SCALE] != 0, hyper[MAXIMIZE] != 0, int(hyper[LIVE_STATES])};
}

// Whether state slot SLOT is read and written: decided at compile time where the rule always or never uses it.
template <typename Rule, int SLOT>
FASTOPT_HOST_DEVICE bool slot_live(int live) {
    if constexpr ((Rule::ALWAYS_LIVE >> SLOT & 1) != 0) {
        return true;
    } else if constexpr (((Rule::ALWAYS_LIVE | Rule::OPTIONAL_LIVE) >> SLOT & 1) == 0) {
        return false;
    } else {
        return (live >> SLOT & 1) != 0;
    }
}

// One thread's share of one chunk whose streams are stored as F, WIDTH adjacent elements per access (Numba:
// chunk_loop). An absent stream's placeholder is the grad, as on the CPU.
template <typename Rule, typename T, typename F, int WIDTH>
FASTOPT_HOST_DEVICE void chunk_loop(const ChunkStreams<T>& s, int length, const T* c, ChunkFlags flags, int thread) {
    const bool has_lr_scale = flags.has_lr_scale;
    const bool live0 = slot_live<Rule, 0>(flags.live);
    const bool live1 = slot_live<Rule, 1>(flags.live);
    const bool live2 = slot_live<Rule, 2>(flags.live);
    const T grad_unscale = c[COEFFICIENT_GRAD_UNSCALE];
    const T grad_clip = c[COEFFICIENT_GRAD_CLIP];
    constexpr int LOOP_ILP = loop_ilp<F, WIDTH>();
    const int accesses = length / WIDTH;
    for (int first = thread; first < accesses; first += LOOP_ILP * BLOCK) {
        typename Access<T, F::param, WIDTH>::type p[LOOP_ILP];
        typename Access<T, F::grad, WIDTH>::type g[LOOP_ILP];
        typename Access<T, NATIVE, WIDTH>::type scale[LOOP_ILP];
        typename Access<T, F::state, WIDTH>::type s0[LOOP_ILP], s1[LOOP_ILP], s2[LOOP_ILP];
        FASTOPT_UNROLL
        for (int k = 0; k < LOOP_ILP; ++k) {
            const int j = first + k * BLOCK;
            p[k] = 0;
            g[k] = 0;
            scale[k] = 0;
            s0[k] = s1[k] = s2[k] = 0;
            if (j < accesses) {
                p[k] = load_access<T, F::param, WIDTH>(s.param, s.param_format, j);
                g[k] = load_access<T, F::grad, WIDTH>(s.grad, s.grad_format, j);
                if (has_lr_scale) scale[k] = load_access<T, NATIVE, WIDTH>(s.lr_scale, NATIVE, j);
                if (live0) s0[k] = load_access<T, F::state, WIDTH>(s.state0, s.state_format, j);
                if (live1) s1[k] = load_access<T, F::state, WIDTH>(s.state1, s.state_format, j);
                if (live2) s2[k] = load_access<T, F::state, WIDTH>(s.state2, s.state_format, j);
            }
        }
        FASTOPT_UNROLL
        for (int k = 0; k < LOOP_ILP; ++k) {
            const int j = first + k * BLOCK;
            if (j < accesses) {
                T param[WIDTH], state0[WIDTH], state1[WIDTH], state2[WIDTH];
                FASTOPT_UNROLL
                for (int h = 0; h < WIDTH; ++h) {
                    param[h] = access_element<T, F::param, WIDTH>(p[k], s.param_format, h);
                    const T grad = unscaled_grad(access_element<T, F::grad, WIDTH>(g[k], s.grad_format, h),
                                                 grad_unscale, grad_clip, flags.maximize);
                    const T lr_scale = has_lr_scale ? access_element<T, NATIVE, WIDTH>(scale[k], NATIVE, h) : grad;
                    state0[h] = live0 ? access_element<T, F::state, WIDTH>(s0[k], s.state_format, h) : grad;
                    state1[h] = live1 ? access_element<T, F::state, WIDTH>(s1[k], s.state_format, h) : grad;
                    state2[h] = live2 ? access_element<T, F::state, WIDTH>(s2[k], s.state_format, h) : grad;
                    Rule::element(param[h], grad, state0[h], state1[h], state2[h], lr_scale, has_lr_scale, live0,
                                  live1, live2, c);
                }
                store_param_access<T, F, WIDTH>(s, j, param);
                if (live0) store_access<T, F::state, WIDTH>(s.state0, s.state_format, j, state0, s.rounding);
                if (live1) store_access<T, F::state, WIDTH>(s.state1, s.state_format, j, state1, s.rounding);
                if (live2) store_access<T, F::state, WIDTH>(s.state2, s.state_format, j, state2, s.rounding);
            }
        }
    }
}

// ---------------------------------------------------------------- choosing a chunk's loop
template <typename... List>
struct FormatList {};

// The storage combinations (float math) that get a loop of their own, with fixed formats and pairs of elements:
// bfloat16 params, to nearest or as the rounding of a float32 MASTER, with bfloat16 grads and float32 or bfloat16
// states, and a MASTER with float32 grads. Any other combination, and a chunk of odd length or with a stream not
// aligned to a pair, runs the RUNTIME loop (each loop costs NVRTC time and code size: add the ones that matter).
#define FASTOPT_PARAM_FORMATS(PARAM, ROUNDED, GRAD16) \
    Formats<PARAM, ROUNDED, GRAD16, NATIVE>, Formats<PARAM, ROUNDED, GRAD16, BFLOAT16>
typedef FormatList<FASTOPT_PARAM_FORMATS(BFLOAT16, NO_STREAM, BFLOAT16),
                   FASTOPT_PARAM_FORMATS(NATIVE, BFLOAT16, BFLOAT16), Formats<NATIVE, BFLOAT16, NATIVE, NATIVE>>
    FixedFormats;
#undef FASTOPT_PARAM_FORMATS

template <typename Rule, typename T>
FASTOPT_HOST_DEVICE bool run_fixed_formats(FormatList<>, const ChunkStreams<T>&, int, const T*, ChunkFlags, int) {
    return false;
}

// Runs the loop of the first formats of the list that are the chunk's, if its streams allow pairs.
template <typename Rule, typename T, typename F, typename... Rest>
FASTOPT_HOST_DEVICE bool run_fixed_formats(FormatList<F, Rest...>, const ChunkStreams<T>& s, int length, const T* c,
                                           ChunkFlags flags, int thread) {
    if (!has_formats<F>(s)) {
        return run_fixed_formats<Rule>(FormatList<Rest...>(), s, length, c, flags, thread);
    }
    if (length % 2 != 0 || !streams_pair_aligned<F>(s)) {
        return false;
    }
    chunk_loop<Rule, T, F, 2>(s, length, c, flags, thread);
    return true;
}

// One thread's share of one chunk (Numba: run_chunk): the plain loop for a chunk stored in T throughout (``mixed``
// false), else the loop compiled for the chunk's formats (FixedFormats), else the RUNTIME loop. The choice depends on
// the chunk only: uniform across a block, made once per block, never per element. ANY_MIXED false compiles the plain
// loop alone.
template <typename Rule, bool ANY_MIXED, typename T>
FASTOPT_HOST_DEVICE void run_chunk(const ChunkStreams<T>& s, bool mixed, int length, const T* c, ChunkFlags flags,
                                   int thread) {
    if constexpr (ANY_MIXED) {
        if (mixed) {
            if constexpr (sizeof(T) == 4) {
                if (run_fixed_formats<Rule>(FixedFormats(), s, length, c, flags, thread)) {
                    return;
                }
            }
            chunk_loop<Rule, T, RuntimeFormats, 1>(s, length, c, flags, thread);
            return;
        }
    }
    chunk_loop<Rule, T, PlainFormats, 1>(s, length, c, flags, thread);
}

}  // namespace fastopt
