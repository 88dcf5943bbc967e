// Adam and AdamW's step scalars and element math: the twin of fastopt/kernels/cpu/rules/adam.py (same names, same
// operations in the same order). The generic loop of step_math.cuh runs it; fused.cu is compiled once per rule.
#pragma once

#include "element_math.cuh"
#include "host_device.cuh"
#include "layout.cuh"

#if !defined(FASTOPT_ADAM_COLUMNS)
#error "compile with the -D options of fastopt.backends.cuda.compile_options() (the rules' columns)"
#endif

namespace fastopt {
namespace rules {

struct adam {
    // The group row's width and the rule's columns in it; the state slots it always uses and may use (bit k: slot k).
    static constexpr int COLUMNS = FASTOPT_ADAM_COLUMNS;
    static constexpr int H_BETA1 = FASTOPT_ADAM_BETA1, H_BETA2 = FASTOPT_ADAM_BETA2, H_EPS = FASTOPT_ADAM_EPS,
                         H_WEIGHT_DECAY = FASTOPT_ADAM_WEIGHT_DECAY,
                         H_DECOUPLED_WEIGHT_DECAY = FASTOPT_ADAM_DECOUPLED_WEIGHT_DECAY;
    static constexpr int ALWAYS_LIVE = FASTOPT_ADAM_ALWAYS_LIVE, OPTIONAL_LIVE = FASTOPT_ADAM_OPTIONAL_LIVE;
    // Its states stored in 8 bits where its tensor's are, and those on the signed map (STATE_CODES' bits).
    static constexpr int CODES = FASTOPT_ADAM_CODES;

    enum {
        STEP_RATE, DECAY_FACTOR, RATE_WEIGHT_DECAY, BETA1_COMPLEMENT, BETA2, BETA2_COMPLEMENT, BIAS_CORRECTION2_SQRT,
        EPS, WEIGHT_DECAY, ONE, USE_WEIGHT_DECAY, DECOUPLED_WEIGHT_DECAY
    };
    static_assert(DECOUPLED_WEIGHT_DECAY < RULE_COEFFICIENTS, "the coefficient row holds the rule's scalars");

    // ``step`` is t, the tensor's step count including this step (1 on its first step).
    template <typename T>
    static FASTOPT_HOST_DEVICE void coefficients(const double* hyper, double lr, int64 step,
                                                 const double* /*scalars*/, T* c) {
        const double t = double(step);
        const double bias_correction1 = 1.0 - pow(hyper[H_BETA1], t);
        const double bias_correction2 = 1.0 - pow(hyper[H_BETA2], t);
        c[STEP_RATE] = T(-(lr / bias_correction1));
        c[DECAY_FACTOR] = T(1.0 - lr * hyper[H_WEIGHT_DECAY]);
        c[RATE_WEIGHT_DECAY] = T(lr * hyper[H_WEIGHT_DECAY]);
        c[BETA1_COMPLEMENT] = T(1.0 - hyper[H_BETA1]);
        c[BETA2] = T(hyper[H_BETA2]);
        c[BETA2_COMPLEMENT] = T(1.0 - hyper[H_BETA2]);
        // Numba computes bias_correction2 ** 0.5 with glibc's pow (within 0.52 ulp); sqrt rounds correctly, where
        // the device's pow would be within 2 ulp only.
        c[BIAS_CORRECTION2_SQRT] = T(sqrt(bias_correction2));
        c[EPS] = T(hyper[H_EPS]);
        c[WEIGHT_DECAY] = T(hyper[H_WEIGHT_DECAY]);
        c[ONE] = T(1.0);
        c[USE_WEIGHT_DECAY] = T(hyper[H_WEIGHT_DECAY] != 0);
        c[DECOUPLED_WEIGHT_DECAY] = T(hyper[H_DECOUPLED_WEIGHT_DECAY]);
    }

    // p = (1 - lr s wd) p (AdamW) or d = g + wd p (Adam);  m = lerp(m, d, 1 - beta1);  v = beta2 v + (1 - beta2) d^2;
    // vmax = max(vmax, v) (AMSGrad);  p = p - lr s / (1 - beta1^t) m / (sqrt(v or vmax) / sqrt(1 - beta2^t) + eps).
    template <typename T>
    static FASTOPT_HOST_DEVICE void element(T& param, T grad, T& exp_avg, T& exp_avg_sq, T& max_exp_avg_sq,
                                            T lr_scale, bool has_lr_scale, bool /*live0*/, bool /*live1*/,
                                            bool amsgrad, const T* c) {
        const T one = c[ONE];
        T step_rate, decay_factor;
        element_rates(c[STEP_RATE], c[DECAY_FACTOR], c[RATE_WEIGHT_DECAY], one, lr_scale, has_lr_scale, step_rate, decay_factor);
        if (c[USE_WEIGHT_DECAY] != 0) {
            if (c[DECOUPLED_WEIGHT_DECAY] != 0) {
                param = param * decay_factor;
            } else {
                grad = grad + c[WEIGHT_DECAY] * param;
            }
        }
        exp_avg = lerp(exp_avg, grad, c[BETA1_COMPLEMENT], one);
        exp_avg_sq = exp_avg_sq * c[BETA2] + c[BETA2_COMPLEMENT] * grad * grad;
        T denom;
        if (amsgrad) {
            max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq);
            denom = square_root(max_exp_avg_sq) / c[BIAS_CORRECTION2_SQRT] + c[EPS];
        } else {
            denom = square_root(exp_avg_sq) / c[BIAS_CORRECTION2_SQRT] + c[EPS];
        }
        param = param + step_rate * exp_avg / denom;
    }
};

}  // namespace rules
}  // namespace fastopt
