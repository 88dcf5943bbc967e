// Each tensor's step scalars, the per-element body and the chunk loops of the fused kernels: what
// fastopt/kernels/cpu/fused.py does around the element math, written once for the CUDA kernels and the host test
// shim.
//
// The ``*_coefficients`` functions repeat the coefficient loops of the Numba ``*_step`` kernels: scalars are
// computed in double from the group's row of the hyperparameter table, the group's learning rate, the tensor's step
// count and the step's grad_control, and each is rounded once into the math dtype T, as torch passes Python floats
// (and as the CPU kernel's coefficient rows). The flags are the ones the Numba kernel passes to its ``*_chunk`` loop.
// The ``*_chunk_element`` functions are the body of those loops for one element: grad factors and sign, lr_scale,
// absent state.
//
// The ``*_chunk`` functions are one block's loop over its chunk, for the thread ``thread`` of BLOCK: each thread
// handles ILP elements BLOCK apart per iteration, loading all of them (every stream it needs) before computing and
// storing any, so a thread has ILP independent loads in flight; loads are coalesced across the block. Absent
// streams (lr_scale, unused state) are never read. The kernels call them with threadIdx.x, the host shim with every
// thread index in turn, so the host build runs the device's loop. MIXED (a tensor with a stream stored in another
// format than T) converts in registers: 16-bit and float32 streams are widened exactly after the load and rounded
// at the store (storage.cuh); without it the loop is the plain all-T one.
#pragma once

#include "element_math.cuh"
#include "host_device.cuh"
#include "schedule_math.cuh"
#include "storage.cuh"
#include "tables.cuh"

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

// This step's grad control from the global sum of squares of the (scaled) grads and their count of non-finite
// values: what backends.GradControl computes on the host. ``max_norm`` < 0: no clipping; ``skip_nonfinite`` false:
// NaN/inf grads do not skip the step. Writes grad_control (GRAD_CONTROLS values) and statistics (STATISTICS values:
// the norm of the unscaled grads and the count).
FASTOPT_HOST_DEVICE void set_grad_control(double sum_of_squares, int64 nonfinite, double unscale, double max_norm,
                                          bool skip_nonfinite, double* grad_control, double* statistics) {
    const double norm = sqrt(sum_of_squares) * unscale;
    double clip = 1.0;
    if (max_norm >= 0.0 && isfinite(norm)) {
        const double factor = max_norm / (norm + CLIP_EPSILON);
        clip = factor < 1.0 ? factor : 1.0;  // Python's min(1.0, factor)
    }
    grad_control[GRAD_UNSCALE] = unscale;
    grad_control[GRAD_CLIP] = clip;
    grad_control[SKIP] = skip_nonfinite && nonfinite > 0 ? 1.0 : 0.0;
    statistics[STATISTIC_NORM] = norm;
    statistics[STATISTIC_NONFINITE] = double(nonfinite);
}

// ---------------------------------------------------------------- SGD
template <typename T>
struct SgdCoefficients {
    T rate;  // -lr
    T weight_decay;
    T momentum;
    T dampening_complement;  // 1 - dampening
    T grad_unscale, grad_clip;
    bool maximize, use_weight_decay, use_momentum, first_momentum_step, nesterov;
};

// ``tensor_step`` counts the tensor's momentum steps taken so far: at 0 the buffer starts as the gradient.
template <typename T>
FASTOPT_HOST_DEVICE SgdCoefficients<T> sgd_coefficients(const double* hyper, double lr, int64 tensor_step,
                                                        const double* grad_control) {
    SgdCoefficients<T> c;
    c.rate = T(-lr);
    c.weight_decay = T(hyper[SGD_H_WEIGHT_DECAY]);
    c.momentum = T(hyper[SGD_H_MOMENTUM]);
    c.dampening_complement = T(1.0 - hyper[SGD_H_DAMPENING]);
    c.grad_unscale = T(grad_control[GRAD_UNSCALE]);
    c.grad_clip = T(grad_control[GRAD_CLIP]);
    c.maximize = hyper[SGD_H_MAXIMIZE] != 0;
    c.use_weight_decay = hyper[SGD_H_WEIGHT_DECAY] != 0;
    c.use_momentum = hyper[SGD_H_MOMENTUM] != 0;
    c.first_momentum_step = tensor_step == 0;
    c.nesterov = hyper[SGD_H_NESTEROV] != 0;
    return c;
}

// Whether this tensor's step count advances with a step (SGD counts momentum steps only).
FASTOPT_HOST_DEVICE bool sgd_counts_step(const double* hyper) { return hyper[SGD_H_MOMENTUM] != 0; }

// The momentum buffer is read only when a previous momentum step wrote it.
template <typename T>
FASTOPT_HOST_DEVICE bool sgd_reads_momentum_buffer(const SgdCoefficients<T>& c) {
    return c.use_momentum && !c.first_momentum_step;
}

template <typename T>
FASTOPT_HOST_DEVICE void sgd_chunk_element(T& param, T grad, T lr_scale, T& momentum_buffer,
                                           const SgdCoefficients<T>& c, bool has_lr_scale) {
    const T g = unscaled_grad(grad, c.grad_unscale, c.grad_clip, c.maximize);
    const T element_rate = has_lr_scale ? c.rate * lr_scale : c.rate;
    T buffer = sgd_reads_momentum_buffer(c) ? momentum_buffer : g;
    sgd_element(param, g, buffer, element_rate, c.weight_decay, c.momentum, c.dampening_complement,
                c.use_weight_decay, c.use_momentum, c.first_momentum_step, c.nesterov);
    if (c.use_momentum) {
        momentum_buffer = buffer;
    }
}

template <typename T, typename F, int WIDTH>
FASTOPT_HOST_DEVICE void sgd_chunk(const ChunkStreams<T>& s, int length, const SgdCoefficients<T>& c,
                                   bool has_lr_scale, int thread) {
    const bool reads_buffer = sgd_reads_momentum_buffer(c);
    constexpr int LOOP_ILP = loop_ilp<F, WIDTH>();
    const int accesses = length / WIDTH;
    for (int first = thread; first < accesses; first += LOOP_ILP * BLOCK) {
        typename Access<T, F::param, WIDTH>::type p[LOOP_ILP];
        typename Access<T, F::grad, WIDTH>::type g[LOOP_ILP];
        typename Access<T, F::state, WIDTH>::type b[LOOP_ILP];
        typename Access<T, NATIVE, WIDTH>::type scale[LOOP_ILP];
        FASTOPT_UNROLL
        for (int k = 0; k < LOOP_ILP; ++k) {
            const int j = first + k * BLOCK;
            p[k] = 0;
            g[k] = 0;
            b[k] = 0;
            scale[k] = 0;
            if (j < accesses) {
                p[k] = load_access<T, F::param, WIDTH>(s.param, s.param_format, j);
                g[k] = load_access<T, F::grad, WIDTH>(s.grad, s.grad_format, j);
                if (has_lr_scale) scale[k] = load_access<T, NATIVE, WIDTH>(s.lr_scale, NATIVE, j);
                if (reads_buffer) b[k] = load_access<T, F::state, WIDTH>(s.state0, s.state_format, j);
            }
        }
        FASTOPT_UNROLL
        for (int k = 0; k < LOOP_ILP; ++k) {
            const int j = first + k * BLOCK;
            if (j < accesses) {
                T param[WIDTH], buffer[WIDTH];
                FASTOPT_UNROLL
                for (int h = 0; h < WIDTH; ++h) {
                    param[h] = access_element<T, F::param, WIDTH>(p[k], s.param_format, h);
                    buffer[h] = access_element<T, F::state, WIDTH>(b[k], s.state_format, h);
                    sgd_chunk_element(param[h], access_element<T, F::grad, WIDTH>(g[k], s.grad_format, h),
                                      access_element<T, NATIVE, WIDTH>(scale[k], NATIVE, h), buffer[h], c,
                                      has_lr_scale);
                }
                store_param_access<T, F, WIDTH>(s, j, param);
                if (c.use_momentum) store_access<T, F::state, WIDTH>(s.state0, s.state_format, j, buffer, s.rounding);
            }
        }
    }
}

// ---------------------------------------------------------------- RMSprop
template <typename T>
struct RmspropCoefficients {
    T rate;  // -lr
    T alpha;
    T alpha_complement;  // 1 - alpha
    T eps;
    T weight_decay;
    T momentum;
    T one;
    T grad_unscale, grad_clip;
    bool maximize, use_weight_decay, use_momentum, centered;
};

template <typename T>
FASTOPT_HOST_DEVICE RmspropCoefficients<T> rmsprop_coefficients(const double* hyper, double lr,
                                                                const double* grad_control) {
    RmspropCoefficients<T> c;
    c.rate = T(-lr);
    c.alpha = T(hyper[RMS_H_ALPHA]);
    c.alpha_complement = T(1.0 - hyper[RMS_H_ALPHA]);
    c.eps = T(hyper[RMS_H_EPS]);
    c.weight_decay = T(hyper[RMS_H_WEIGHT_DECAY]);
    c.momentum = T(hyper[RMS_H_MOMENTUM]);
    c.one = T(1.0);
    c.grad_unscale = T(grad_control[GRAD_UNSCALE]);
    c.grad_clip = T(grad_control[GRAD_CLIP]);
    c.maximize = hyper[RMS_H_MAXIMIZE] != 0;
    c.use_weight_decay = hyper[RMS_H_WEIGHT_DECAY] != 0;
    c.use_momentum = hyper[RMS_H_MOMENTUM] > 0;
    c.centered = hyper[RMS_H_CENTERED] != 0;
    return c;
}

template <typename T>
FASTOPT_HOST_DEVICE void rmsprop_chunk_element(T& param, T grad, T lr_scale, T& square_avg, T& momentum_buffer,
                                               T& grad_avg, const RmspropCoefficients<T>& c, bool has_lr_scale) {
    const T g = unscaled_grad(grad, c.grad_unscale, c.grad_clip, c.maximize);
    const T element_rate = has_lr_scale ? c.rate * lr_scale : c.rate;
    T buffer = c.use_momentum ? momentum_buffer : g;
    T average = c.centered ? grad_avg : g;
    rmsprop_element(param, g, square_avg, buffer, average, element_rate, c.alpha, c.alpha_complement, c.eps,
                    c.weight_decay, c.momentum, c.one, c.use_weight_decay, c.use_momentum, c.centered);
    if (c.use_momentum) {
        momentum_buffer = buffer;
    }
    if (c.centered) {
        grad_avg = average;
    }
}

template <typename T, typename F, int WIDTH>
FASTOPT_HOST_DEVICE void rmsprop_chunk(const ChunkStreams<T>& s, int length, const RmspropCoefficients<T>& c,
                                       bool has_lr_scale, int thread) {
    constexpr int LOOP_ILP = loop_ilp<F, WIDTH>();
    const int accesses = length / WIDTH;
    for (int first = thread; first < accesses; first += LOOP_ILP * BLOCK) {
        typename Access<T, F::param, WIDTH>::type p[LOOP_ILP];
        typename Access<T, F::grad, WIDTH>::type g[LOOP_ILP];
        typename Access<T, F::state, WIDTH>::type v[LOOP_ILP], b[LOOP_ILP], a[LOOP_ILP];
        typename Access<T, NATIVE, WIDTH>::type scale[LOOP_ILP];
        FASTOPT_UNROLL
        for (int k = 0; k < LOOP_ILP; ++k) {
            const int j = first + k * BLOCK;
            p[k] = 0;
            g[k] = 0;
            v[k] = b[k] = a[k] = 0;
            scale[k] = 0;
            if (j < accesses) {
                p[k] = load_access<T, F::param, WIDTH>(s.param, s.param_format, j);
                g[k] = load_access<T, F::grad, WIDTH>(s.grad, s.grad_format, j);
                if (has_lr_scale) scale[k] = load_access<T, NATIVE, WIDTH>(s.lr_scale, NATIVE, j);
                v[k] = load_access<T, F::state, WIDTH>(s.state0, s.state_format, j);
                if (c.use_momentum) b[k] = load_access<T, F::state, WIDTH>(s.state1, s.state_format, j);
                if (c.centered) a[k] = load_access<T, F::state, WIDTH>(s.state2, s.state_format, j);
            }
        }
        FASTOPT_UNROLL
        for (int k = 0; k < LOOP_ILP; ++k) {
            const int j = first + k * BLOCK;
            if (j < accesses) {
                T param[WIDTH], square_avg[WIDTH], buffer[WIDTH], average[WIDTH];
                FASTOPT_UNROLL
                for (int h = 0; h < WIDTH; ++h) {
                    param[h] = access_element<T, F::param, WIDTH>(p[k], s.param_format, h);
                    square_avg[h] = access_element<T, F::state, WIDTH>(v[k], s.state_format, h);
                    buffer[h] = access_element<T, F::state, WIDTH>(b[k], s.state_format, h);
                    average[h] = access_element<T, F::state, WIDTH>(a[k], s.state_format, h);
                    rmsprop_chunk_element(param[h], access_element<T, F::grad, WIDTH>(g[k], s.grad_format, h),
                                          access_element<T, NATIVE, WIDTH>(scale[k], NATIVE, h), square_avg[h],
                                          buffer[h], average[h], c, has_lr_scale);
                }
                store_param_access<T, F, WIDTH>(s, j, param);
                store_access<T, F::state, WIDTH>(s.state0, s.state_format, j, square_avg, s.rounding);
                if (c.use_momentum) store_access<T, F::state, WIDTH>(s.state1, s.state_format, j, buffer, s.rounding);
                if (c.centered) store_access<T, F::state, WIDTH>(s.state2, s.state_format, j, average, s.rounding);
            }
        }
    }
}

// ---------------------------------------------------------------- Adam and AdamW
template <typename T>
struct AdamCoefficients {
    T step_rate;              // -lr / (1 - beta1^t)
    T decay_factor;           // 1 - lr wd
    T rate_weight_decay;      // lr wd
    T beta1_complement;       // 1 - beta1
    T beta2;
    T beta2_complement;       // 1 - beta2
    T bias_correction2_sqrt;  // sqrt(1 - beta2^t)
    T eps;
    T weight_decay;
    T one;
    T grad_unscale, grad_clip;
    bool maximize, use_weight_decay, decoupled_weight_decay, amsgrad;
};

// ``step`` is t, the tensor's step count including this step (1 on its first step).
template <typename T>
FASTOPT_HOST_DEVICE AdamCoefficients<T> adam_coefficients(const double* hyper, double lr, int64 step,
                                                          const double* grad_control) {
    const double t = double(step);
    const double bias_correction1 = 1.0 - pow(hyper[ADAM_H_BETA1], t);
    const double bias_correction2 = 1.0 - pow(hyper[ADAM_H_BETA2], t);
    AdamCoefficients<T> c;
    c.step_rate = T(-(lr / bias_correction1));
    c.decay_factor = T(1.0 - lr * hyper[ADAM_H_WEIGHT_DECAY]);
    c.rate_weight_decay = T(lr * hyper[ADAM_H_WEIGHT_DECAY]);
    c.beta1_complement = T(1.0 - hyper[ADAM_H_BETA1]);
    c.beta2 = T(hyper[ADAM_H_BETA2]);
    c.beta2_complement = T(1.0 - hyper[ADAM_H_BETA2]);
    // Numba computes bias_correction2 ** 0.5 with glibc's pow (within 0.52 ulp); sqrt rounds correctly, where
    // the device's pow would be within 2 ulp only.
    c.bias_correction2_sqrt = T(sqrt(bias_correction2));
    c.eps = T(hyper[ADAM_H_EPS]);
    c.weight_decay = T(hyper[ADAM_H_WEIGHT_DECAY]);
    c.one = T(1.0);
    c.grad_unscale = T(grad_control[GRAD_UNSCALE]);
    c.grad_clip = T(grad_control[GRAD_CLIP]);
    c.maximize = hyper[ADAM_H_MAXIMIZE] != 0;
    c.use_weight_decay = hyper[ADAM_H_WEIGHT_DECAY] != 0;
    c.decoupled_weight_decay = hyper[ADAM_H_DECOUPLED] != 0;
    c.amsgrad = hyper[ADAM_H_AMSGRAD] != 0;
    return c;
}

template <typename T>
FASTOPT_HOST_DEVICE void adam_chunk_element(T& param, T grad, T lr_scale, T& exp_avg, T& exp_avg_sq,
                                            T& max_exp_avg_sq, const AdamCoefficients<T>& c, bool has_lr_scale) {
    const T g = unscaled_grad(grad, c.grad_unscale, c.grad_clip, c.maximize);
    T element_step_rate, element_decay_factor;
    if (has_lr_scale) {
        element_step_rate = c.step_rate * lr_scale;
        element_decay_factor = c.one - c.rate_weight_decay * lr_scale;
    } else {
        element_step_rate = c.step_rate;
        element_decay_factor = c.decay_factor;
    }
    T v_max = c.amsgrad ? max_exp_avg_sq : g;
    adam_element(param, g, exp_avg, exp_avg_sq, v_max, element_step_rate, element_decay_factor, c.beta1_complement,
                 c.beta2, c.beta2_complement, c.bias_correction2_sqrt, c.eps, c.weight_decay, c.one,
                 c.use_weight_decay, c.decoupled_weight_decay, c.amsgrad);
    if (c.amsgrad) {
        max_exp_avg_sq = v_max;
    }
}

template <typename T, typename F, int WIDTH>
FASTOPT_HOST_DEVICE void adam_chunk(const ChunkStreams<T>& s, int length, const AdamCoefficients<T>& c,
                                    bool has_lr_scale, int thread) {
    constexpr int LOOP_ILP = loop_ilp<F, WIDTH>();
    const int accesses = length / WIDTH;
    for (int first = thread; first < accesses; first += LOOP_ILP * BLOCK) {
        typename Access<T, F::param, WIDTH>::type p[LOOP_ILP];
        typename Access<T, F::grad, WIDTH>::type g[LOOP_ILP];
        typename Access<T, F::state, WIDTH>::type m[LOOP_ILP], v[LOOP_ILP], v_max[LOOP_ILP];
        typename Access<T, NATIVE, WIDTH>::type scale[LOOP_ILP];
        FASTOPT_UNROLL
        for (int k = 0; k < LOOP_ILP; ++k) {
            const int j = first + k * BLOCK;
            p[k] = 0;
            g[k] = 0;
            m[k] = v[k] = v_max[k] = 0;
            scale[k] = 0;
            if (j < accesses) {
                p[k] = load_access<T, F::param, WIDTH>(s.param, s.param_format, j);
                g[k] = load_access<T, F::grad, WIDTH>(s.grad, s.grad_format, j);
                if (has_lr_scale) scale[k] = load_access<T, NATIVE, WIDTH>(s.lr_scale, NATIVE, j);
                m[k] = load_access<T, F::state, WIDTH>(s.state0, s.state_format, j);
                v[k] = load_access<T, F::state, WIDTH>(s.state1, s.state_format, j);
                if (c.amsgrad) v_max[k] = load_access<T, F::state, WIDTH>(s.state2, s.state_format, j);
            }
        }
        FASTOPT_UNROLL
        for (int k = 0; k < LOOP_ILP; ++k) {
            const int j = first + k * BLOCK;
            if (j < accesses) {
                T param[WIDTH], exp_avg[WIDTH], exp_avg_sq[WIDTH], max_exp_avg_sq[WIDTH];
                FASTOPT_UNROLL
                for (int h = 0; h < WIDTH; ++h) {
                    param[h] = access_element<T, F::param, WIDTH>(p[k], s.param_format, h);
                    exp_avg[h] = access_element<T, F::state, WIDTH>(m[k], s.state_format, h);
                    exp_avg_sq[h] = access_element<T, F::state, WIDTH>(v[k], s.state_format, h);
                    max_exp_avg_sq[h] = access_element<T, F::state, WIDTH>(v_max[k], s.state_format, h);
                    adam_chunk_element(param[h], access_element<T, F::grad, WIDTH>(g[k], s.grad_format, h),
                                       access_element<T, NATIVE, WIDTH>(scale[k], NATIVE, h), exp_avg[h],
                                       exp_avg_sq[h], max_exp_avg_sq[h], c, has_lr_scale);
                }
                store_param_access<T, F, WIDTH>(s, j, param);
                store_access<T, F::state, WIDTH>(s.state0, s.state_format, j, exp_avg, s.rounding);
                store_access<T, F::state, WIDTH>(s.state1, s.state_format, j, exp_avg_sq, s.rounding);
                if (c.amsgrad) {
                    store_access<T, F::state, WIDTH>(s.state2, s.state_format, j, max_exp_avg_sq, s.rounding);
                }
            }
        }
    }
}

// ---------------------------------------------------------------- choosing a chunk's loop
// Each optimizer's chunk loop as a type, for run_chunk.
#define FASTOPT_CHUNK_LOOP(NAME, CHUNK)                                                                            \
    struct NAME {                                                                                                 \
        template <typename T, typename F, int WIDTH, typename Coefficients>                                       \
        FASTOPT_HOST_DEVICE static void run(const ChunkStreams<T>& s, int length, const Coefficients& c,          \
                                            bool has_lr_scale, int thread) {                                      \
            CHUNK<T, F, WIDTH>(s, length, c, has_lr_scale, thread);                                               \
        }                                                                                                         \
    };
FASTOPT_CHUNK_LOOP(SgdLoop, sgd_chunk)
FASTOPT_CHUNK_LOOP(RmspropLoop, rmsprop_chunk)
FASTOPT_CHUNK_LOOP(AdamLoop, adam_chunk)
#undef FASTOPT_CHUNK_LOOP

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

template <typename Loop, typename T, typename Coefficients>
FASTOPT_HOST_DEVICE bool run_fixed_formats(FormatList<>, const ChunkStreams<T>&, int, const Coefficients&, bool,
                                           int) {
    return false;
}

// Runs the loop of the first formats of the list that are the chunk's, if its streams allow pairs.
template <typename Loop, typename T, typename Coefficients, typename F, typename... Rest>
FASTOPT_HOST_DEVICE bool run_fixed_formats(FormatList<F, Rest...>, const ChunkStreams<T>& s, int length,
                                           const Coefficients& c, bool has_lr_scale, int thread) {
    if (!has_formats<F>(s)) {
        return run_fixed_formats<Loop>(FormatList<Rest...>(), s, length, c, has_lr_scale, thread);
    }
    if (length % 2 != 0 || !streams_pair_aligned<F>(s)) {
        return false;
    }
    Loop::template run<T, F, 2>(s, length, c, has_lr_scale, thread);
    return true;
}

// One thread's share of one chunk: the plain loop for a chunk stored in T throughout (``mixed`` false), else the
// loop compiled for the chunk's formats (FixedFormats), else the RUNTIME loop. The choice depends on the chunk only:
// uniform across a block, made once per block, never per element. ANY_MIXED false compiles the plain loop alone.
template <typename Loop, bool ANY_MIXED, typename T, typename Coefficients>
FASTOPT_HOST_DEVICE void run_chunk(const ChunkStreams<T>& s, bool mixed, int length, const Coefficients& c,
                                   bool has_lr_scale, int thread) {
    if constexpr (ANY_MIXED) {
        if (mixed) {
            if constexpr (sizeof(T) == 4) {
                if (run_fixed_formats<Loop>(FixedFormats(), s, length, c, has_lr_scale, thread)) {
                    return;
                }
            }
            Loop::template run<T, RuntimeFormats, 1>(s, length, c, has_lr_scale, thread);
            return;
        }
    }
    Loop::template run<T, PlainFormats, 1>(s, length, c, has_lr_scale, thread);
}

}  // namespace fastopt
