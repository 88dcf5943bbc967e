// SGD's step scalars and element math: the twin of fastopt/kernels/cpu/rules/sgd.py (same names, same operations
// in the same order). The generic loop of step_math.cuh runs it; fused.cu is compiled once per rule.
#pragma once

#include "host_device.cuh"
#include "layout.cuh"

#if !defined(FASTOPT_SGD_COLUMNS)
#error "compile with the -D options of fastopt.backends.cuda.compile_options() (the rules' columns)"
#endif

namespace fastopt {
namespace rules {

struct sgd {
    // The group row's width and the rule's columns in it; the state slots it always uses and may use (bit k: slot k).
    static constexpr int COLUMNS = FASTOPT_SGD_COLUMNS;
    static constexpr int H_MOMENTUM = FASTOPT_SGD_MOMENTUM, H_DAMPENING = FASTOPT_SGD_DAMPENING,
                         H_WEIGHT_DECAY = FASTOPT_SGD_WEIGHT_DECAY, H_NESTEROV = FASTOPT_SGD_NESTEROV;
    static constexpr int ALWAYS_LIVE = FASTOPT_SGD_ALWAYS_LIVE, OPTIONAL_LIVE = FASTOPT_SGD_OPTIONAL_LIVE;
    // Its states stored in 8 bits where its tensor's are, and those on the signed map (STATE_CODES' bits).
    static constexpr int CODES = FASTOPT_SGD_CODES;

    enum { RATE, WEIGHT_DECAY, MOMENTUM, DAMPENING_COMPLEMENT, USE_WEIGHT_DECAY, FIRST_MOMENTUM_STEP, NESTEROV };
    static_assert(NESTEROV < RULE_COEFFICIENTS, "the coefficient row holds the rule's scalars");

    // ``step`` counts momentum steps including this one: at 1 the buffer starts as the gradient.
    template <typename T>
    static FASTOPT_HOST_DEVICE void coefficients(const double* hyper, double lr, int64 step,
                                                 const double* /*scalars*/, T* c) {
        c[RATE] = T(-lr);
        c[WEIGHT_DECAY] = T(hyper[H_WEIGHT_DECAY]);
        c[MOMENTUM] = T(hyper[H_MOMENTUM]);
        c[DAMPENING_COMPLEMENT] = T(1.0 - hyper[H_DAMPENING]);
        c[USE_WEIGHT_DECAY] = T(hyper[H_WEIGHT_DECAY] != 0);
        c[FIRST_MOMENTUM_STEP] = T(step == 1);
        c[NESTEROV] = T(hyper[H_NESTEROV]);
    }

    // d = g + wd p;  b = d (first step) or mu b + (1 - dampening) d;  d = d + mu b (Nesterov) or b;  p = p - lr s d.
    template <typename T>
    static FASTOPT_HOST_DEVICE void element(T& param, T grad, T& momentum_buffer, T& /*unused1*/, T& /*unused2*/,
                                            T lr_scale, bool has_lr_scale, bool use_momentum, bool /*live1*/,
                                            bool /*live2*/, const T* c) {
        const T rate = has_lr_scale ? c[RATE] * lr_scale : c[RATE];
        if (c[USE_WEIGHT_DECAY] != 0) {
            grad = grad + c[WEIGHT_DECAY] * param;
        }
        if (use_momentum) {
            if (c[FIRST_MOMENTUM_STEP] != 0) {
                momentum_buffer = grad;
            } else {
                momentum_buffer = momentum_buffer * c[MOMENTUM] + c[DAMPENING_COMPLEMENT] * grad;
            }
            if (c[NESTEROV] != 0) {
                grad = grad + c[MOMENTUM] * momentum_buffer;
            } else {
                grad = momentum_buffer;
            }
        }
        param = param + rate * grad;
    }
};

}  // namespace rules
}  // namespace fastopt
