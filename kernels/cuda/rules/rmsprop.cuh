// RMSprop's step scalars and element math: the twin of fastopt/kernels/cpu/rules/rmsprop.py (same names, same
// operations in the same order). The generic loop of step_math.cuh runs it; fused.cu is compiled once per rule.
#pragma once

#include "element_math.cuh"
#include "host_device.cuh"
#include "layout.cuh"

#if !defined(FASTOPT_RMSPROP_COLUMNS)
#error "compile with the -D options of fastopt.backends.cuda.compile_options() (the rules' columns)"
#endif

namespace fastopt {
namespace rules {

struct rmsprop {
    // The group row's width and the rule's columns in it; the state slots it always uses and may use (bit k: slot k).
    static constexpr int COLUMNS = FASTOPT_RMSPROP_COLUMNS;
    static constexpr int H_ALPHA = FASTOPT_RMSPROP_ALPHA, H_EPS = FASTOPT_RMSPROP_EPS,
                         H_WEIGHT_DECAY = FASTOPT_RMSPROP_WEIGHT_DECAY, H_MOMENTUM = FASTOPT_RMSPROP_MOMENTUM;
    static constexpr int ALWAYS_LIVE = FASTOPT_RMSPROP_ALWAYS_LIVE, OPTIONAL_LIVE = FASTOPT_RMSPROP_OPTIONAL_LIVE;
    // Its states stored in 8 bits where its tensor's are, and those on the signed map (STATE_CODES' bits).
    static constexpr int CODES = FASTOPT_RMSPROP_CODES;

    enum { RATE, ALPHA, ALPHA_COMPLEMENT, EPS, WEIGHT_DECAY, MOMENTUM, ONE, USE_WEIGHT_DECAY };
    static_assert(USE_WEIGHT_DECAY < RULE_COEFFICIENTS, "the coefficient row holds the rule's scalars");

    template <typename T>
    static FASTOPT_HOST_DEVICE void coefficients(const double* hyper, double lr, int64 /*step*/,
                                                 const double* /*scalars*/, T* c) {
        c[RATE] = T(-lr);
        c[ALPHA] = T(hyper[H_ALPHA]);
        c[ALPHA_COMPLEMENT] = T(1.0 - hyper[H_ALPHA]);
        c[EPS] = T(hyper[H_EPS]);
        c[WEIGHT_DECAY] = T(hyper[H_WEIGHT_DECAY]);
        c[MOMENTUM] = T(hyper[H_MOMENTUM]);
        c[ONE] = T(1.0);
        c[USE_WEIGHT_DECAY] = T(hyper[H_WEIGHT_DECAY] != 0);
    }

    // d = g + wd p;  s = alpha s + (1 - alpha) d^2;  a = lerp(a, d, 1 - alpha) (centered);
    // avg = sqrt(s - a^2) or sqrt(s), plus eps;  b = mu b + d / avg and p = p - lr s b, or p = p - lr s d / avg.
    template <typename T>
    static FASTOPT_HOST_DEVICE void element(T& param, T grad, T& square_avg, T& momentum_buffer, T& grad_avg,
                                            T lr_scale, bool has_lr_scale, bool /*live0*/, bool use_momentum,
                                            bool centered, const T* c) {
        const T rate = has_lr_scale ? c[RATE] * lr_scale : c[RATE];
        const T one = c[ONE];
        if (c[USE_WEIGHT_DECAY] != 0) {
            grad = grad + c[WEIGHT_DECAY] * param;
        }
        square_avg = square_avg * c[ALPHA] + c[ALPHA_COMPLEMENT] * grad * grad;
        T avg;
        if (centered) {
            grad_avg = lerp(grad_avg, grad, c[ALPHA_COMPLEMENT], one);
            avg = square_root(square_avg + (-one * grad_avg) * grad_avg);
        } else {
            avg = square_root(square_avg);
        }
        avg = avg + c[EPS];
        if (use_momentum) {
            momentum_buffer = momentum_buffer * c[MOMENTUM] + grad / avg;
            param = param + rate * momentum_buffer;
        } else {
            param = param + rate * grad / avg;
        }
    }
};

}  // namespace rules
}  // namespace fastopt
