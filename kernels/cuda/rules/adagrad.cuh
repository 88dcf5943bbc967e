// Adagrad's step scalars and element math: the twin of fastopt/kernels/cpu/rules/adagrad.py (same names, same
// operations in the same order). The generic loop of step_math.cuh runs it; fused.cu is compiled once per rule.
#pragma once

#include "host_device.cuh"
#include "layout.cuh"

#if !defined(FASTOPT_ADAGRAD_COLUMNS)
#error "compile with the -D options of fastopt.backends.cuda.compile_options() (the rules' columns)"
#endif

namespace fastopt {
namespace rules {

struct adagrad {
    // The group row's width and the rule's columns in it; the state slots it always uses and may use (bit k: slot k).
    static constexpr int COLUMNS = FASTOPT_ADAGRAD_COLUMNS;
    static constexpr int H_LR_DECAY = FASTOPT_ADAGRAD_LR_DECAY, H_WEIGHT_DECAY = FASTOPT_ADAGRAD_WEIGHT_DECAY,
                         H_EPS = FASTOPT_ADAGRAD_EPS;
    static constexpr int ALWAYS_LIVE = FASTOPT_ADAGRAD_ALWAYS_LIVE, OPTIONAL_LIVE = FASTOPT_ADAGRAD_OPTIONAL_LIVE;
    // Its states stored in 8 bits where its tensor's are, and those on the signed map (STATE_CODES' bits).
    static constexpr int CODES = FASTOPT_ADAGRAD_CODES;

    enum { RATE, WEIGHT_DECAY, EPS, USE_WEIGHT_DECAY };
    static_assert(USE_WEIGHT_DECAY < RULE_COEFFICIENTS, "the coefficient row holds the rule's scalars");

    // ``step`` is t, the tensor's step count including this step: the rate decays as lr / (1 + (t - 1) lr_decay).
    template <typename T>
    static FASTOPT_HOST_DEVICE void coefficients(const double* hyper, double lr, int64 step,
                                                 const double* /*scalars*/, T* c) {
        c[RATE] = T(-(lr / (1.0 + double(step - 1) * hyper[H_LR_DECAY])));
        c[WEIGHT_DECAY] = T(hyper[H_WEIGHT_DECAY]);
        c[EPS] = T(hyper[H_EPS]);
        c[USE_WEIGHT_DECAY] = T(hyper[H_WEIGHT_DECAY] != 0);
    }

    // d = g + wd p;  sum = sum + d^2;  p = p - clr s d / (sqrt(sum) + eps), clr the decayed rate.
    template <typename T>
    static FASTOPT_HOST_DEVICE void element(T& param, T grad, T& total, T& /*unused1*/, T& /*unused2*/, T lr_scale,
                                            bool has_lr_scale, bool /*live0*/, bool /*live1*/, bool /*live2*/,
                                            const T* c) {
        const T rate = has_lr_scale ? c[RATE] * lr_scale : c[RATE];
        if (c[USE_WEIGHT_DECAY] != 0) {
            grad = grad + c[WEIGHT_DECAY] * param;
        }
        total = total + grad * grad;
        param = param + rate * grad / (square_root(total) + c[EPS]);
    }
};

}  // namespace rules
}  // namespace fastopt
