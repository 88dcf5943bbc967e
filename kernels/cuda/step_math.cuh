// The generic part of a fused step, written once for every rule, for the CUDA kernels and the host test shim: what
// fastopt/kernels/cpu/fused.py does around a rule's element function (its rule_step, run_chunk and chunk_loop).
//
// A rule (rules/<kernel>.cuh, a struct named as its kernel) supplies ``coefficients`` (the tensor's step scalars,
// computed in double from its group's row, the group's learning rate, its step count and its running scalars, each
// rounded once into the math dtype T, as torch passes Python floats) and ``element`` (one element's update), and the
// constants COLUMNS (its group row's width), ALWAYS_LIVE and OPTIONAL_LIVE (the state slots it always uses and may use,
// bit k for slot k). A rule that keeps running scalars per tensor (schedule-free's weight sum) adds
// ``advance_scalars``; a rule with per-tensor norms (LAMB: NORMS true) has ``moments``, ``direction``,
// ``norm_coefficients`` and ``apply`` instead of ``element``, and its step is two passes (NORMS, then APPLY; fused.cu).
// Everything else is here: the coefficient row (the rule's scalars, then the grad factors), the grad each element
// sees (unscaled, clipped, negated for maximize), lr_scale, which state slots are read and written, and the chunk loop
// of each pass over every storage format.
//
// ``chunk_loop`` is one block's loop over its chunk, for the thread ``thread`` of BLOCK: each thread handles ILP
// elements BLOCK apart per iteration, loading all of them (every stream it needs) before computing and storing any,
// so a thread has ILP independent loads in flight; loads are coalesced across the block. Absent streams (lr_scale,
// the state slots the group does not use) are never read, and a slot the rule never has costs nothing: it is known at
// compile time. The kernels call it with threadIdx.x, the host shim with every thread index in turn, so the host
// build runs the device's loop. A tensor with a stream stored in another format than T converts in registers:
// 16-bit and float32 streams are widened exactly after the load and rounded at the store (storage.cuh).
#pragma once

#include "codes.cuh"
#include "element_math.cuh"
#include "host_device.cuh"
#include "layout.cuh"
#include "schedule_math.cuh"
#include "storage.cuh"

namespace fastopt {

// What a rule has beyond ``coefficients`` and ``element`` (Numba: the getattr defaults of step_kernels).
template <typename...>
using Void = void;
// Whether Rule keeps running scalars (its ``advance_scalars``; absent: none).
template <typename Rule, typename = void>
struct KeepsScalars {
    static constexpr bool value = false;
};
template <typename Rule>
struct KeepsScalars<Rule, Void<decltype(&Rule::advance_scalars)>> {
    static constexpr bool value = true;
};
// Whether Rule's step is two passes with per-tensor norms between them (its NORMS constant; absent: false).
template <typename Rule, typename = void>
struct HasNorms {
    static constexpr bool value = false;
};
template <typename Rule>
struct HasNorms<Rule, Void<decltype(Rule::NORMS)>> {
    static constexpr bool value = Rule::NORMS;
};

// The passes of a step: one fused UPDATE, or for a rule with per-tensor norms a NORMS pass (moments updated, partial
// norms summed) and an APPLY pass (the param moved by the norms' ratio). Numba: UPDATE, NORMS, APPLY.
enum Pass { UPDATE, NORMS, APPLY };

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

// The tensor's step count as the rule sees it in this step: including this step where its group counts steps.
FASTOPT_HOST_DEVICE int64 counted_step(const double* hyper, int64 tensor_step) {
    return tensor_step + (hyper[COUNTS_STEP] != 0 ? 1 : 0);
}

// A tensor's coefficient row ``c`` (COEFFICIENTS values): the rule's step scalars, then grad_control's factors, each
// rounded once into T (Numba: the first loop of rule_step). ``hyper`` is its group's row; ``tensor_step`` its step
// count and ``tensor_scalars`` its running scalars before this step: the rule sees a copy of the scalars advanced for
// this step (the table itself is advanced once, by advance_tensor in the last block of the step).
template <typename Rule, typename T>
FASTOPT_HOST_DEVICE void tensor_coefficients(const double* hyper, double lr, int64 tensor_step,
                                             const double* tensor_scalars, const double* grad_control, T* c) {
    const int64 step = counted_step(hyper, tensor_step);
    double scalars[TENSOR_SCALARS];
    for (int k = 0; k < TENSOR_SCALARS; ++k) {
        scalars[k] = tensor_scalars[k];
    }
    if constexpr (KeepsScalars<Rule>::value) {
        Rule::advance_scalars(hyper, lr, step, scalars);
    }
    for (int k = 0; k < RULE_COEFFICIENTS; ++k) {
        c[k] = T(0);  // every entry defined, whatever the rule writes
    }
    Rule::coefficients(hyper, lr, step, scalars, c);
    c[COEFFICIENT_GRAD_UNSCALE] = T(grad_control[GRAD_UNSCALE]);
    c[COEFFICIENT_GRAD_CLIP] = T(grad_control[GRAD_CLIP]);
}

// The end of a step for one tensor that had a gradient: its running scalars advanced for this step (with ``lr``, its
// group's learning rate, which a rule that keeps scalars needs) and its step count advanced where its group counts
// steps (Numba: rule_step's advance_scalars and its last loop). Run once per step and tensor, by the last block.
template <typename Rule>
FASTOPT_HOST_DEVICE void advance_tensor(const double* hyper, double lr, int64* tensor_step, double* tensor_scalars) {
    if constexpr (KeepsScalars<Rule>::value) {
        Rule::advance_scalars(hyper, lr, counted_step(hyper, *tensor_step), tensor_scalars);
    }
    if (hyper[COUNTS_STEP] != 0) {
        *tensor_step += 1;
    }
}

// One thread's partial sums of squares (of the param and of the update direction, in double): in the NORMS pass over
// the thread's elements of its chunk, in the APPLY pass over its share of its tensor's chunk sums.
struct NormSums {
    double param;
    double update;
};

// One thread's share of a tensor's sums of squares in the APPLY pass: the sums of the tensor's chunks first + thread,
// first + thread + BLOCK, ... (its chunks are [first, end) of the chunk table; ``chunk_norms``, written by the NORMS
// pass) added in turn. fused.cu adds the threads' shares in block_sum's tree, so that every block of the tensor forms
// the same bits, each in a few loads per thread. (Numba adds its chunks' sums in chunk order; its chunks, and the
// order within a chunk, differ from these anyway: the totals agree to double rounding.)
FASTOPT_HOST_DEVICE NormSums thread_norm_sums(const double* chunk_norms, int64 first, int64 end, int thread) {
    NormSums share{0.0, 0.0};
    for (int64 k = first + thread; k < end; k += BLOCK) {
        share.param += chunk_norms[k * NORM_SUMS + NORM_PARAM];
        share.update += chunk_norms[k * NORM_SUMS + NORM_UPDATE];
    }
    return share;
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

// One thread's share of one chunk of the pass PASS whose streams are stored as F, WIDTH adjacent elements per access
// (Numba: update_loop, norm_loop and apply_loop). UPDATE reads every live stream and writes the param and the live
// states. NORMS reads the param, the grad and the live states, writes the states and adds the squares of the param
// and of the rule's direction, computed from the states as stored, to ``sums``. APPLY reads the param, lr_scale and
// the live states (no grad), recomputes the direction and writes the param. An absent stream's placeholder is the
// grad (APPLY: the param), as on the CPU.
template <typename Rule, int PASS, typename T, typename F, int WIDTH>
FASTOPT_HOST_DEVICE void chunk_loop(const ChunkStreams<T>& s, int length, const T* c, ChunkFlags flags, int thread,
                                    NormSums& sums) {
    const bool has_lr_scale = PASS != NORMS && flags.has_lr_scale;
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
                if (PASS != APPLY) g[k] = load_access<T, F::grad, WIDTH>(s.grad, s.grad_format, j);
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
                    T grad = param[h];
                    if constexpr (PASS != APPLY) {
                        grad = unscaled_grad(access_element<T, F::grad, WIDTH>(g[k], s.grad_format, h), grad_unscale,
                                             grad_clip, flags.maximize);
                    }
                    const T lr_scale = has_lr_scale ? access_element<T, NATIVE, WIDTH>(scale[k], NATIVE, h) : grad;
                    state0[h] = live0 ? access_element<T, F::state, WIDTH>(s0[k], s.state_format, h) : grad;
                    state1[h] = live1 ? access_element<T, F::state, WIDTH>(s1[k], s.state_format, h) : grad;
                    state2[h] = live2 ? access_element<T, F::state, WIDTH>(s2[k], s.state_format, h) : grad;
                    if constexpr (PASS == UPDATE) {
                        Rule::element(param[h], grad, state0[h], state1[h], state2[h], lr_scale, has_lr_scale, live0,
                                      live1, live2, c);
                    } else if constexpr (PASS == NORMS) {
                        Rule::moments(param[h], grad, state0[h], state1[h], state2[h], live0, live1, live2, c);
                        // The states as they will be stored (16-bit states rounded): what APPLY reads back.
                        if (live0) state0[h] = as_stored<T, F::state>(state0[h], s.state_format);
                        if (live1) state1[h] = as_stored<T, F::state>(state1[h], s.state_format);
                        if (live2) state2[h] = as_stored<T, F::state>(state2[h], s.state_format);
                        const T update =
                            Rule::direction(param[h], state0[h], state1[h], state2[h], live0, live1, live2, c);
                        sums.param += double(param[h]) * double(param[h]);
                        sums.update += double(update) * double(update);
                    } else {
                        const T update =
                            Rule::direction(param[h], state0[h], state1[h], state2[h], live0, live1, live2, c);
                        param[h] = Rule::apply(param[h], update, lr_scale, has_lr_scale, c);
                    }
                }
                if (PASS != NORMS) store_param_access<T, F, WIDTH>(s, j, param);
                if (PASS != APPLY) {
                    if (live0) store_access<T, F::state, WIDTH>(s.state0, s.state_format, j, state0, s.rounding);
                    if (live1) store_access<T, F::state, WIDTH>(s.state1, s.state_format, j, state1, s.rounding);
                    if (live2) store_access<T, F::state, WIDTH>(s.state2, s.state_format, j, state2, s.rounding);
                }
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

template <typename Rule, int PASS, typename T>
FASTOPT_HOST_DEVICE bool run_fixed_formats(FormatList<>, const ChunkStreams<T>&, int, const T*, ChunkFlags, int,
                                           NormSums&) {
    return false;
}

// Runs the loop of the first formats of the list that are the chunk's, if its streams allow pairs.
template <typename Rule, int PASS, typename T, typename F, typename... Rest>
FASTOPT_HOST_DEVICE bool run_fixed_formats(FormatList<F, Rest...>, const ChunkStreams<T>& s, int length, const T* c,
                                           ChunkFlags flags, int thread, NormSums& sums) {
    if (!has_formats<F>(s)) {
        return run_fixed_formats<Rule, PASS>(FormatList<Rest...>(), s, length, c, flags, thread, sums);
    }
    if (length % 2 != 0 || !streams_pair_aligned<F>(s)) {
        return false;
    }
    chunk_loop<Rule, PASS, T, F, 2>(s, length, c, flags, thread, sums);
    return true;
}

// One thread's share of one chunk in the pass PASS (Numba: run_chunk): the plain loop for a chunk stored in T
// throughout (``mixed`` false), else the loop compiled for the chunk's formats (FixedFormats), else the RUNTIME loop.
// The choice depends on the chunk only: uniform across a block, made once per block, never per element. ANY_MIXED
// false compiles the plain loop alone. The NORMS pass adds this thread's sums of squares to ``sums``.
template <typename Rule, int PASS, bool ANY_MIXED, typename T>
FASTOPT_HOST_DEVICE void run_chunk(const ChunkStreams<T>& s, bool mixed, int length, const T* c, ChunkFlags flags,
                                   int thread, NormSums& sums) {
    if constexpr (ANY_MIXED) {
        if (mixed) {
            if constexpr (sizeof(T) == 4) {
                if (run_fixed_formats<Rule, PASS>(FixedFormats(), s, length, c, flags, thread, sums)) {
                    return;
                }
            }
            chunk_loop<Rule, PASS, T, RuntimeFormats, 1>(s, length, c, flags, thread, sums);
            return;
        }
    }
    chunk_loop<Rule, PASS, T, PlainFormats, 1>(s, length, c, flags, thread, sums);
}

// ---------------------------------------------------------------- the 8-bit loop
// A chunk of a tensor with 8-bit states (storage.cuh: has_codes) runs block by block, CODE_BLOCK elements and one
// scale per 8-bit state each (Numba: the fused loops over CODE_BLOCK windows): every 8-bit state element is decoded in
// registers, the rule's element math runs in float as in chunk_loop, the block's new absmax of each 8-bit state is
// found across the threads that hold the block, then its new values are encoded and stored with its scale, once. One
// pass over memory. States that are not 8-bit (schedule-free's z) are read and written as in chunk_loop.
//
// Which of a rule's states are 8-bit in such a tensor, and which use the signed map, is the rule's CODES (STATE_CODES'
// bits, from fastopt.quantization.STATE_SIGNED: compile_defines' FASTOPT_<KERNEL>_CODES), known when compiled, so that
// a state's codes are held four to a register and no element branches on its storage. The host checks that every
// tensor's STATE_CODES is 0 or the rule's (less the states it lacks).
//
// CODE_THREADS threads hold a block, a quad of QUAD elements each (storage.cuh), and BLOCK threads take
// CODE_BLOCKS_AT_ONCE blocks per iteration. An iteration is two halves around the absmax: code_thread_compute (loads,
// decoding, the element math; the param stored; the thread's largest magnitudes) and code_thread_store (encoding;
// codes and the block's scale stored; in the NORMS pass the direction, from the states as stored: decoded again from
// their new codes). fused.cu runs the halves in one thread around a warp reduction and one barrier (block_max.cuh);
// the host shim runs every thread's first half, the blocks' maxima, then every thread's second half. The APPLY pass
// (which writes no state) is the first half alone.
constexpr int CODE_THREADS = CODE_BLOCK / QUAD;
constexpr int CODE_BLOCKS_AT_ONCE = BLOCK / CODE_THREADS;
static_assert(CODE_BLOCK % QUAD == 0 && BLOCK % CODE_THREADS == 0, "a thread block holds whole code blocks");

// Whether Rule's state slot k is stored in 8 bits where its tensor is, and on the signed map.
template <typename Rule>
FASTOPT_HOST_DEVICE constexpr bool slot_coded(int k) {
    return ((Rule::CODES >> k) & CODES_8BIT) != 0;
}
template <typename Rule>
FASTOPT_HOST_DEVICE constexpr bool slot_signed(int k) {
    return ((Rule::CODES >> k) & SIGNED_CODES) != 0;
}

// The spacing of a thread's quad under formats F: adjacent elements (one access per stream) where the formats are
// fixed; CODE_THREADS apart under RUNTIME, loaded one by one, so that each access of a warp reads adjacent elements.
template <typename F>
FASTOPT_HOST_DEVICE constexpr int quad_stride() {
    return F::param == RUNTIME ? CODE_THREADS : 1;
}

// The block (of the chunk) that thread ``thread`` holds in the iteration starting at block ``first_block``, and the
// chunk element its quad starts at.
FASTOPT_HOST_DEVICE int thread_code_block(int first_block, int thread) {
    return first_block + thread / CODE_THREADS;
}
template <typename F>
FASTOPT_HOST_DEVICE int thread_quad(int first_block, int thread) {
    const int lane = thread % CODE_THREADS;
    return thread_code_block(first_block, thread) * CODE_BLOCK + (quad_stride<F>() == 1 ? QUAD * lane : lane);
}

// What a thread holds of one iteration from its first half to its second.
struct CodeThread {
    float param[QUAD];                // NORMS: the params, whose direction waits for the states as stored
    float state[STATE_SLOTS][QUAD];   // the states' new values (NORMS: a state that is not 8-bit, as stored)
    uint32 absmax_bits[STATE_SLOTS];  // per 8-bit state, the largest magnitude bits of the thread's new values
};

// The first half of one thread's iteration of the pass PASS over a chunk with 8-bit states, its streams stored as F
// (``aligned``: streams_quad_aligned): its quad loaded (codes as they are), decoded and updated by the rule; the param
// stored (UPDATE, APPLY) or kept (NORMS); the new values of the states kept (8-bit) or stored (the others); the largest
// magnitude bits of each 8-bit state's new values into ``held``. Absent placeholders as in chunk_loop. Elements of a
// quad past the chunk are computed on zeros, and neither stored nor counted.
template <typename Rule, int PASS, typename F>
FASTOPT_HOST_DEVICE void code_thread_compute(const ChunkStreams<float>& s, const CodeStreams& codes, int length,
                                             const float* c, ChunkFlags flags, bool aligned, int first_block,
                                             int thread, CodeThread& held) {
    constexpr int STRIDE = quad_stride<F>();
    const bool has_lr_scale = PASS != NORMS && flags.has_lr_scale;
    const bool live[STATE_SLOTS] = {slot_live<Rule, 0>(flags.live), slot_live<Rule, 1>(flags.live),
                                    slot_live<Rule, 2>(flags.live)};
    const int block = thread_code_block(first_block, thread);
    const int j = thread_quad<F>(first_block, thread);
    FASTOPT_UNROLL
    for (int k = 0; k < STATE_SLOTS; ++k) {
        held.absmax_bits[k] = 0;
    }
    if (j >= length) {
        return;
    }
    const bool whole = aligned && j + QUAD <= length;
    const typename Quad<F::param>::type p = load_quad<F::param>(s.param, s.param_format, j, STRIDE, length, whole);
    typename Quad<F::grad>::type g = {};
    if (PASS != APPLY) g = load_quad<F::grad>(s.grad, s.grad_format, j, STRIDE, length, whole);
    Words4 scale = {};
    if (has_lr_scale) scale = load_quad<NATIVE>(s.lr_scale, NATIVE, j, STRIDE, length, whole);
    float old_scale[STATE_SLOTS];  // what the codes were encoded with: one broadcast load per warp
    uint32 code_words[STATE_SLOTS];
    typename Quad<F::state>::type state_quads[STATE_SLOTS];
    FASTOPT_UNROLL
    for (int k = 0; k < STATE_SLOTS; ++k) {
        old_scale[k] = 0.0f;
        code_words[k] = 0;
        state_quads[k] = {};
        if (live[k] && slot_coded<Rule>(k)) {
            old_scale[k] = codes.scales[k][block];
            code_words[k] = load_codes(state_stream(s, k), j, STRIDE, length, whole);
        } else if (live[k]) {
            state_quads[k] = load_quad<F::state>(state_stream(s, k), s.state_format, j, STRIDE, length, whole);
        }
    }
    const float grad_unscale = c[COEFFICIENT_GRAD_UNSCALE];
    const float grad_clip = c[COEFFICIENT_GRAD_CLIP];
    FASTOPT_UNROLL
    for (int i = 0; i < QUAD; ++i) {
        float param = quad_element<F::param>(p, i, s.param_format);
        float grad = param;
        if constexpr (PASS != APPLY) {
            grad = unscaled_grad(quad_element<F::grad>(g, i, s.grad_format), grad_unscale, grad_clip, flags.maximize);
        }
        const float lr_scale = has_lr_scale ? quad_element<NATIVE>(scale, i, NATIVE) : grad;
        float state[STATE_SLOTS];
        FASTOPT_UNROLL
        for (int k = 0; k < STATE_SLOTS; ++k) {
            state[k] = !live[k]              ? grad
                       : slot_coded<Rule>(k) ? decode((code_words[k] >> (8 * i)) & 0xFF, old_scale[k],
                                                      slot_signed<Rule>(k))
                                             : quad_element<F::state>(state_quads[k], i, s.state_format);
        }
        if constexpr (PASS == UPDATE) {
            Rule::element(param, grad, state[0], state[1], state[2], lr_scale, has_lr_scale, live[0], live[1],
                          live[2], c);
        } else if constexpr (PASS == NORMS) {
            Rule::moments(param, grad, state[0], state[1], state[2], live[0], live[1], live[2], c);
        } else {
            const float update = Rule::direction(param, state[0], state[1], state[2], live[0], live[1], live[2], c);
            param = Rule::apply(param, update, lr_scale, has_lr_scale, c);
        }
        held.param[i] = param;
        FASTOPT_UNROLL
        for (int k = 0; k < STATE_SLOTS; ++k) {
            held.state[k][i] = state[k];
            if (PASS != APPLY && live[k] && slot_coded<Rule>(k) && j + i * STRIDE < length) {
                const uint32 bits = magnitude_bits(state[k]);
                held.absmax_bits[k] = bits > held.absmax_bits[k] ? bits : held.absmax_bits[k];
            }
        }
    }
    if constexpr (PASS != NORMS) {
        store_param_quad<F>(s, j, STRIDE, length, whole, held.param);
    }
    if constexpr (PASS != APPLY) {
        FASTOPT_UNROLL
        for (int k = 0; k < STATE_SLOTS; ++k) {
            if (live[k] && !slot_coded<Rule>(k)) {
                store_quad<F::state>(state_stream(s, k), s.state_format, j, STRIDE, length, whole, held.state[k],
                                     s.rounding);
                if constexpr (PASS == NORMS) {
                    FASTOPT_UNROLL
                    for (int i = 0; i < QUAD; ++i) {
                        held.state[k][i] = as_stored<float, F::state>(held.state[k][i], s.state_format);
                    }
                }
            }
        }
    }
}

// The second half of one thread's iteration (UPDATE and NORMS), given ``absmax_bits``, the largest magnitude bits of
// each 8-bit state's new values over the thread's whole block: each 8-bit state's new values encoded against the
// block's new scale and stored, and the scale by the block's first thread. NORMS adds the squares of the params and
// of the rule's direction from the states as stored to ``sums``.
template <typename Rule, int PASS, typename F>
FASTOPT_HOST_DEVICE void code_thread_store(const ChunkStreams<float>& s, const CodeStreams& codes, int length,
                                           const float* c, ChunkFlags flags, bool aligned, int first_block,
                                           int thread, CodeThread& held, const uint32* absmax_bits, NormSums& sums) {
    constexpr int STRIDE = quad_stride<F>();
    const bool live[STATE_SLOTS] = {slot_live<Rule, 0>(flags.live), slot_live<Rule, 1>(flags.live),
                                    slot_live<Rule, 2>(flags.live)};
    const int block = thread_code_block(first_block, thread);
    const int j = thread_quad<F>(first_block, thread);
    if (j >= length) {
        return;
    }
    const bool whole = aligned && j + QUAD <= length;
    FASTOPT_UNROLL
    for (int k = 0; k < STATE_SLOTS; ++k) {
        if (live[k] && slot_coded<Rule>(k)) {
            const float scale = block_scale(absmax_bits[k]);
            const float reciprocal = is_coded_block(absmax_bits[k]) ? scale_reciprocal(scale) : 0.0f;
            if (thread % CODE_THREADS == 0) {
                codes.scales[k][block] = scale;
            }
            // The block's random bits, where its codes round stochastically (the thread's quad lies in one block).
            const uint32 block_bits =
                codes.stochastic[k]
                    ? counter_hash_keyed(s.rounding.key,
                                         stochastic_code_key(k, s.rounding.first_element + int64(block) * CODE_BLOCK))
                    : 0;
            uint32 word = 0;
            FASTOPT_UNROLL
            for (int i = 0; i < QUAD; ++i) {
                const uint32 code =
                    codes.stochastic[k]
                        ? encode_in_block_stochastic(held.state[k][i], reciprocal, absmax_bits[k], slot_signed<Rule>(k),
                                                     code_noise(block_bits, j + i * STRIDE - block * CODE_BLOCK))
                        : encode_in_block(held.state[k][i], reciprocal, absmax_bits[k], slot_signed<Rule>(k));
                word |= code << (8 * i);
                if constexpr (PASS == NORMS) {
                    held.state[k][i] = decode(code, scale, slot_signed<Rule>(k));
                }
            }
            store_codes(state_stream(s, k), j, STRIDE, length, whole, word);
        }
    }
    if constexpr (PASS == NORMS) {
        FASTOPT_UNROLL
        for (int i = 0; i < QUAD; ++i) {
            if (j + i * STRIDE < length) {
                const float update = Rule::direction(held.param[i], held.state[0][i], held.state[1][i],
                                                     held.state[2][i], live[0], live[1], live[2], c);
                sums.param += double(held.param[i]) * double(held.param[i]);
                sums.update += double(update) * double(update);
            }
        }
    }
}

// The formats of the loops of a kernel built for 8-bit states (fused.cu): the plain ones, or (ANY_MIXED) RUNTIME.
template <bool ANY_MIXED>
struct CodeLoopFormats {
    typedef PlainFormats type;
};
template <>
struct CodeLoopFormats<true> {
    typedef RuntimeFormats type;
};

// One thread's share of one chunk of the blend p = lerp(p, s, weight) toward the state in address slot ``slot``
// (Numba: blend_toward_state): through the MASTER copy where there is one (its rounding written to the param),
// rounded to nearest otherwise (never stochastically), in any storage format (the RUNTIME formats, element by
// element: the blend is schedule-free's train()/eval(), not a step).
template <typename T>
FASTOPT_HOST_DEVICE void blend_chunk(const int64* address_row, const int64* format_row, int64 start, int length,
                                     int slot, T weight, int thread) {
    ChunkStreams<T> s = chunk_streams<T, true>(address_row, format_row, start, Rounding{});
    s.param_format = s.param_format == BFLOAT16_STOCHASTIC ? BFLOAT16 : s.param_format;
    s.rounded_format = s.rounded_format == BFLOAT16_STOCHASTIC ? BFLOAT16 : s.rounded_format;
    const void* target = stored_pointer<T>(address_row[slot], s.state_format, start);
    const T one = T(1);
    for (int i = thread; i < length; i += BLOCK) {
        const T param = widen<T, RUNTIME>(load_bits<T, RUNTIME>(s.param, s.param_format, i), s.param_format);
        const T state = widen<T, RUNTIME>(load_bits<T, RUNTIME>(target, s.state_format, i), s.state_format);
        store_param<T, RuntimeFormats>(s, i, lerp(param, state, weight, one));
    }
}

}  // namespace fastopt
