// Schedule-free AdamW and SGD's running scalars, step scalars and element math: the twin of
// fastopt/kernels/cpu/rules/schedule_free.py (same names, same operations in the same order). The generic loop of
// step_math.cuh runs it; fused.cu is compiled once per rule.
//
// Where the Numba code raises to a power (``**``: glibc's pow, within 0.52 ulp) the device calls CUDA's pow (within
// 2 ulp): the running weight sum and the step scalars may then differ from the CPU's in their last bits (the host
// build, with glibc's pow, is the CPU's bit for bit). There is no exact substitute, not even for the default exponent
// 2: glibc's pow(x, 2.0) is not x * x rounded (they differed for about 1 x in 1000, measured), so each ``**`` stays one
// pow call and both sides round the same expression. Exact on both: t^0, lr_max^0, powers of two raised to t.
#pragma once

#include "element_math.cuh"
#include "host_device.cuh"
#include "layout.cuh"

#if !defined(FASTOPT_SCHEDULE_FREE_COLUMNS)
#error "compile with the -D options of fastopt.backends.cuda.compile_options() (the rules' columns)"
#endif

namespace fastopt {
namespace rules {

struct schedule_free {
    // The group row's width and the rule's columns in it; the state slots it always uses and may use (bit k: slot k).
    static constexpr int COLUMNS = FASTOPT_SCHEDULE_FREE_COLUMNS;
    static constexpr int H_BETA1 = FASTOPT_SCHEDULE_FREE_BETA1, H_BETA2 = FASTOPT_SCHEDULE_FREE_BETA2,
                         H_EPS = FASTOPT_SCHEDULE_FREE_EPS, H_WEIGHT_DECAY = FASTOPT_SCHEDULE_FREE_WEIGHT_DECAY,
                         H_WARMUP_STEPS = FASTOPT_SCHEDULE_FREE_WARMUP_STEPS, H_R = FASTOPT_SCHEDULE_FREE_R,
                         H_WEIGHT_LR_POWER = FASTOPT_SCHEDULE_FREE_WEIGHT_LR_POWER;
    static constexpr int ALWAYS_LIVE = FASTOPT_SCHEDULE_FREE_ALWAYS_LIVE,
                         OPTIONAL_LIVE = FASTOPT_SCHEDULE_FREE_OPTIONAL_LIVE;
    // Its states stored in 8 bits where its tensor's are, and those on the signed map (STATE_CODES' bits).
    static constexpr int CODES = FASTOPT_SCHEDULE_FREE_CODES;

    enum { WEIGHT_SUM, LR_MAX };  // the tensor's running scalars (AdamWScheduleFree.SCALARS)
    static_assert(LR_MAX < TENSOR_SCALARS, "the tensor_scalars row holds the rule's running scalars");
    enum {
        AVERAGE_WEIGHT, Y_RATE, Z_RATE, BETA2, BETA2_COMPLEMENT, INVERSE_BIAS_CORRECTION2, EPS, WEIGHT_DECAY,
        USE_WEIGHT_DECAY, ONE
    };
    static_assert(ONE < RULE_COEFFICIENTS, "the coefficient row holds the rule's scalars");

    // The rate of step ``step`` (t, from 1): ``lr * t / warmup_steps`` during the warmup, then ``lr``.
    static FASTOPT_HOST_DEVICE double warmed_up_rate(const double* hyper, double lr, int64 step) {
        const double warmup = hyper[H_WARMUP_STEPS];
        if (double(step - 1) < warmup) {
            return lr * (double(step) / warmup);
        }
        return lr;
    }

    // The weight of step t in the average: t^r lr_max^weight_lr_power.
    static FASTOPT_HOST_DEVICE double average_weight(const double* hyper, int64 step, double lr_max) {
        return pow(double(step), hyper[H_R]) * pow(lr_max, hyper[H_WEIGHT_LR_POWER]);
    }

    // lr_max = max(lr_max, rate);  weight_sum += weight of this step (in double, as the package's Python floats).
    static FASTOPT_HOST_DEVICE void advance_scalars(const double* hyper, double lr, int64 step, double* scalars) {
        const double rate = warmed_up_rate(hyper, lr, step);
        const double lr_max = scalars[LR_MAX] > rate ? scalars[LR_MAX] : rate;  // Python's max(rate, lr_max)
        scalars[LR_MAX] = lr_max;
        scalars[WEIGHT_SUM] += average_weight(hyper, step, lr_max);
    }

    // From the scalars as advanced for this step: c = weight / weight_sum (0 while the sum is 0).
    template <typename T>
    static FASTOPT_HOST_DEVICE void coefficients(const double* hyper, double lr, int64 step, const double* scalars,
                                                 T* c) {
        const double rate = warmed_up_rate(hyper, lr, step);
        const double weight_sum = scalars[WEIGHT_SUM];
        const double average = weight_sum != 0 ? average_weight(hyper, step, scalars[LR_MAX]) / weight_sum : 0.0;
        c[AVERAGE_WEIGHT] = T(average);
        c[Y_RATE] = T(rate * (hyper[H_BETA1] * (1.0 - average) - 1.0));
        c[Z_RATE] = T(-rate);
        c[BETA2] = T(hyper[H_BETA2]);
        c[BETA2_COMPLEMENT] = T(1.0 - hyper[H_BETA2]);
        c[INVERSE_BIAS_CORRECTION2] = T(1.0 / (1.0 - pow(hyper[H_BETA2], double(step))));
        c[EPS] = T(hyper[H_EPS]);
        c[WEIGHT_DECAY] = T(hyper[H_WEIGHT_DECAY]);
        c[USE_WEIGHT_DECAY] = T(hyper[H_WEIGHT_DECAY] != 0);
        c[ONE] = T(1.0);
    }

    // v = beta2 v + (1 - beta2) g^2 and d = g / (sqrt(v (1 / (1 - beta2^t))) + eps) (AdamW; SGD: d = g);  d = d + wd y;
    // y = lerp(y, z, c) + lr s (beta1 (1 - c) - 1) d;  z = z - lr s d. The package's operations, in its order, except
    // that it divides v by 1 - beta2^t.
    template <typename T>
    static FASTOPT_HOST_DEVICE void element(T& param, T grad, T& z, T& exp_avg_sq, T& /*unused*/, T lr_scale,
                                            bool has_lr_scale, bool /*live0*/, bool adaptive, bool /*live2*/,
                                            const T* c) {
        if (adaptive) {
            exp_avg_sq = exp_avg_sq * c[BETA2] + c[BETA2_COMPLEMENT] * grad * grad;
            grad = grad / (square_root(exp_avg_sq * c[INVERSE_BIAS_CORRECTION2]) + c[EPS]);
        }
        if (c[USE_WEIGHT_DECAY] != 0) {
            grad = grad + c[WEIGHT_DECAY] * param;
        }
        const T y_rate = has_lr_scale ? c[Y_RATE] * lr_scale : c[Y_RATE];
        const T z_rate = has_lr_scale ? c[Z_RATE] * lr_scale : c[Z_RATE];
        param = lerp(param, z, c[AVERAGE_WEIGHT], c[ONE]) + y_rate * grad;
        z = z + z_rate * grad;
    }
};

}  // namespace rules
}  // namespace fastopt
