// LAMB's step scalars and element math, in the two passes of a rule with per-tensor norms: the twin of
// fastopt/kernels/cpu/rules/lamb.py (same names, same operations in the same order). The generic loop of
// step_math.cuh runs ``moments`` and ``direction`` in the NORMS pass and ``direction`` and ``apply`` in the APPLY pass;
// fused.cu adds each tensor's norms up between them and calls ``norm_coefficients``.
#pragma once

#include "element_math.cuh"
#include "host_device.cuh"
#include "layout.cuh"

#if !defined(FASTOPT_LAMB_COLUMNS)
#error "compile with the -D options of fastopt.backends.cuda.compile_options() (the rules' columns)"
#endif

namespace fastopt {
namespace rules {

struct lamb {
    // The group row's width and the rule's columns in it; the state slots it always uses and may use (bit k: slot k).
    static constexpr int COLUMNS = FASTOPT_LAMB_COLUMNS;
    static constexpr int H_BETA1 = FASTOPT_LAMB_BETA1, H_BETA2 = FASTOPT_LAMB_BETA2, H_EPS = FASTOPT_LAMB_EPS,
                         H_WEIGHT_DECAY = FASTOPT_LAMB_WEIGHT_DECAY, H_BIAS_CORRECTION = FASTOPT_LAMB_BIAS_CORRECTION,
                         H_MAX_TRUST_RATIO = FASTOPT_LAMB_MAX_TRUST_RATIO;
    static constexpr int ALWAYS_LIVE = FASTOPT_LAMB_ALWAYS_LIVE, OPTIONAL_LIVE = FASTOPT_LAMB_OPTIONAL_LIVE;
    // Its states stored in 8 bits where its tensor's are, and those on the signed map (STATE_CODES' bits).
    static constexpr int CODES = FASTOPT_LAMB_CODES;
    static constexpr bool NORMS = true;  // two passes, with each tensor's norms between them (fused.cu)

    enum {
        BETA1_COMPLEMENT, BETA2, BETA2_COMPLEMENT, INVERSE_BIAS_CORRECTION1, INVERSE_BIAS_CORRECTION2_SQRT, EPS,
        WEIGHT_DECAY, ONE, TRUST_RATE
    };
    static_assert(TRUST_RATE < RULE_COEFFICIENTS, "the coefficient row holds the rule's scalars");

    // ``step`` is t, the tensor's step count including this step. TRUST_RATE is filled between the passes. The bias
    // corrections are inverted here, once (the direction is computed in both passes).
    template <typename T>
    static FASTOPT_HOST_DEVICE void coefficients(const double* hyper, double /*lr*/, int64 step,
                                                 const double* /*scalars*/, T* c) {
        const double t = double(step);
        const bool corrected = hyper[H_BIAS_CORRECTION] != 0;
        c[BETA1_COMPLEMENT] = T(1.0 - hyper[H_BETA1]);
        c[BETA2] = T(hyper[H_BETA2]);
        c[BETA2_COMPLEMENT] = T(1.0 - hyper[H_BETA2]);
        c[INVERSE_BIAS_CORRECTION1] = T(corrected ? 1.0 / (1.0 - pow(hyper[H_BETA1], t)) : 1.0);
        c[INVERSE_BIAS_CORRECTION2_SQRT] = T(corrected ? 1.0 / sqrt(1.0 - pow(hyper[H_BETA2], t)) : 1.0);
        c[EPS] = T(hyper[H_EPS]);
        c[WEIGHT_DECAY] = T(hyper[H_WEIGHT_DECAY]);
        c[ONE] = T(1.0);
    }

    // m = lerp(m, g, 1 - beta1) (torch's form of beta1 m + (1 - beta1) g);  v = beta2 v + (1 - beta2) g^2.
    template <typename T>
    static FASTOPT_HOST_DEVICE void moments(T /*param*/, T grad, T& exp_avg, T& exp_avg_sq, T& /*unused*/,
                                            bool /*live0*/, bool /*live1*/, bool /*live2*/, const T* c) {
        exp_avg = lerp(exp_avg, grad, c[BETA1_COMPLEMENT], c[ONE]);
        exp_avg_sq = exp_avg_sq * c[BETA2] + c[BETA2_COMPLEMENT] * grad * grad;
    }

    // u = m (1 / (1 - beta1^t)) / (sqrt(v) (1 / sqrt(1 - beta2^t)) + eps) + wd p.
    template <typename T>
    static FASTOPT_HOST_DEVICE T direction(T param, T exp_avg, T exp_avg_sq, T /*unused*/, bool /*live0*/,
                                           bool /*live1*/, bool /*live2*/, const T* c) {
        return (exp_avg * c[INVERSE_BIAS_CORRECTION1]) /
                   (square_root(exp_avg_sq) * c[INVERSE_BIAS_CORRECTION2_SQRT] + c[EPS]) +
               c[WEIGHT_DECAY] * param;
    }

    // TRUST_RATE = -lr * clamp(||p|| / ||u||, 0, max_trust_ratio), the ratio 1 where either norm is 0.
    template <typename T>
    static FASTOPT_HOST_DEVICE void norm_coefficients(const double* hyper, double lr, double param_sum_of_squares,
                                                      double update_sum_of_squares, T* c) {
        const double param_norm = sqrt(param_sum_of_squares);
        const double update_norm = sqrt(update_sum_of_squares);
        double trust = 1.0;
        if (param_norm != 0 && update_norm != 0) {
            const double ratio = param_norm / update_norm;
            trust = hyper[H_MAX_TRUST_RATIO] < ratio ? hyper[H_MAX_TRUST_RATIO] : ratio;  // Python's min
        }
        c[TRUST_RATE] = T(-(lr * trust));
    }

    // p = p - lr s trust u.
    template <typename T>
    static FASTOPT_HOST_DEVICE T apply(T param, T update, T lr_scale, bool has_lr_scale, const T* c) {
        const T rate = has_lr_scale ? c[TRUST_RATE] * lr_scale : c[TRUST_RATE];
        return param + rate * update;
    }
};

}  // namespace rules
}  // namespace fastopt
