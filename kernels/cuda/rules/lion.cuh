// Lion's step scalars and element math: the twin of fastopt/kernels/cpu/rules/lion.py (same names, same operations
// in the same order). The generic loop of step_math.cuh runs it; fused.cu is compiled once per rule.
#pragma once

#include "element_math.cuh"
#include "host_device.cuh"
#include "layout.cuh"

#if !defined(FASTOPT_LION_COLUMNS)
#error "compile with the -D options of fastopt.backends.cuda.compile_options() (the rules' columns)"
#endif

namespace fastopt {
namespace rules {

struct lion {
    // The group row's width and the rule's columns in it; the state slots it always uses and may use (bit k: slot k).
    static constexpr int COLUMNS = FASTOPT_LION_COLUMNS;
    static constexpr int H_BETA1 = FASTOPT_LION_BETA1, H_BETA2 = FASTOPT_LION_BETA2,
                         H_WEIGHT_DECAY = FASTOPT_LION_WEIGHT_DECAY;
    static constexpr int ALWAYS_LIVE = FASTOPT_LION_ALWAYS_LIVE, OPTIONAL_LIVE = FASTOPT_LION_OPTIONAL_LIVE;
    // Its states stored in 8 bits where its tensor's are, and those on the signed map (STATE_CODES' bits).
    static constexpr int CODES = FASTOPT_LION_CODES;

    enum { RATE, DECAY_FACTOR, RATE_WEIGHT_DECAY, BETA1, BETA1_COMPLEMENT, BETA2, BETA2_COMPLEMENT, ONE };
    static_assert(ONE < RULE_COEFFICIENTS, "the coefficient row holds the rule's scalars");

    template <typename T>
    static FASTOPT_HOST_DEVICE void coefficients(const double* hyper, double lr, int64 /*step*/,
                                                 const double* /*scalars*/, T* c) {
        c[RATE] = T(-lr);
        c[DECAY_FACTOR] = T(1.0 - lr * hyper[H_WEIGHT_DECAY]);
        c[RATE_WEIGHT_DECAY] = T(lr * hyper[H_WEIGHT_DECAY]);
        c[BETA1] = T(hyper[H_BETA1]);
        c[BETA1_COMPLEMENT] = T(1.0 - hyper[H_BETA1]);
        c[BETA2] = T(hyper[H_BETA2]);
        c[BETA2_COMPLEMENT] = T(1.0 - hyper[H_BETA2]);
        c[ONE] = T(1.0);
    }

    // torch.sign, except that NaN stays NaN: one, -one, or x itself for zero and NaN.
    template <typename T>
    static FASTOPT_HOST_DEVICE T sign(T x, T one) {
        return x > 0 ? one : x < 0 ? -one : x;
    }

    // p = (1 - lr s wd) p;  p = p - lr s sign(beta1 m + (1 - beta1) g);  m = beta2 m + (1 - beta2) g.
    template <typename T>
    static FASTOPT_HOST_DEVICE void element(T& param, T grad, T& exp_avg, T& /*unused1*/, T& /*unused2*/, T lr_scale,
                                            bool has_lr_scale, bool /*live0*/, bool /*live1*/, bool /*live2*/,
                                            const T* c) {
        const T one = c[ONE];
        T rate, decay_factor;
        element_rates(c[RATE], c[DECAY_FACTOR], c[RATE_WEIGHT_DECAY], one, lr_scale, has_lr_scale, rate, decay_factor);
        param = param * decay_factor;
        param = param + rate * sign(exp_avg * c[BETA1] + c[BETA1_COMPLEMENT] * grad, one);
        exp_avg = exp_avg * c[BETA2] + c[BETA2_COMPLEMENT] * grad;
    }
};

}  // namespace rules
}  // namespace fastopt
