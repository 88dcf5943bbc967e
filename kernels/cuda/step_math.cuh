// Each tensor's step scalars and the per-element body of the fused loops: what fastopt/kernels/cpu/fused.py
// does around the element math, written once for the CUDA kernels and the host test shim.
//
// The ``*_coefficients`` functions repeat the coefficient loops of the Numba ``*_step`` kernels: scalars are
// computed in double from the group's row of the hyperparameter table, the group's learning rate and the
// tensor's step count, and each is rounded once into the param dtype T, as torch passes Python floats (and as
// the CPU kernel's coefficient rows). The flags are the ones the Numba kernel passes to its ``*_chunk`` loop.
// The ``*_chunk_element`` functions are the body of those loops for one element: sign, lr_scale, absent state.
#pragma once

#include "element_math.cuh"
#include "host_device.cuh"
#include "schedule_math.cuh"
#include "tables.cuh"

namespace fastopt {

// The group's schedule at the optimizer step, times ``lr_factor`` (the divergence guard's back-off; 1.0 leaves
// the rate exactly as scheduled). Numba: group_learning_rates.
FASTOPT_HOST_DEVICE double group_learning_rate(Program program, int64 base, int64 optimizer_step, double lr_factor) {
    return schedule_value(program, base, optimizer_step) * lr_factor;
}

// ---------------------------------------------------------------- SGD
template <typename T>
struct SgdCoefficients {
    T rate;  // -lr
    T weight_decay;
    T momentum;
    T dampening_complement;  // 1 - dampening
    bool maximize, use_weight_decay, use_momentum, first_momentum_step, nesterov;
};

// ``tensor_step`` counts the tensor's momentum steps taken so far: at 0 the buffer starts as the gradient.
template <typename T>
FASTOPT_HOST_DEVICE SgdCoefficients<T> sgd_coefficients(const double* hyper, double lr, int64 tensor_step) {
    SgdCoefficients<T> c;
    c.rate = T(-lr);
    c.weight_decay = T(hyper[SGD_H_WEIGHT_DECAY]);
    c.momentum = T(hyper[SGD_H_MOMENTUM]);
    c.dampening_complement = T(1.0 - hyper[SGD_H_DAMPENING]);
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
    const T g = c.maximize ? -grad : grad;
    const T element_rate = has_lr_scale ? c.rate * lr_scale : c.rate;
    T buffer = sgd_reads_momentum_buffer(c) ? momentum_buffer : g;
    sgd_element(param, g, buffer, element_rate, c.weight_decay, c.momentum, c.dampening_complement,
                c.use_weight_decay, c.use_momentum, c.first_momentum_step, c.nesterov);
    if (c.use_momentum) {
        momentum_buffer = buffer;
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
    bool maximize, use_weight_decay, use_momentum, centered;
};

template <typename T>
FASTOPT_HOST_DEVICE RmspropCoefficients<T> rmsprop_coefficients(const double* hyper, double lr) {
    RmspropCoefficients<T> c;
    c.rate = T(-lr);
    c.alpha = T(hyper[RMS_H_ALPHA]);
    c.alpha_complement = T(1.0 - hyper[RMS_H_ALPHA]);
    c.eps = T(hyper[RMS_H_EPS]);
    c.weight_decay = T(hyper[RMS_H_WEIGHT_DECAY]);
    c.momentum = T(hyper[RMS_H_MOMENTUM]);
    c.one = T(1.0);
    c.maximize = hyper[RMS_H_MAXIMIZE] != 0;
    c.use_weight_decay = hyper[RMS_H_WEIGHT_DECAY] != 0;
    c.use_momentum = hyper[RMS_H_MOMENTUM] > 0;
    c.centered = hyper[RMS_H_CENTERED] != 0;
    return c;
}

template <typename T>
FASTOPT_HOST_DEVICE void rmsprop_chunk_element(T& param, T grad, T lr_scale, T& square_avg, T& momentum_buffer,
                                               T& grad_avg, const RmspropCoefficients<T>& c, bool has_lr_scale) {
    const T g = c.maximize ? -grad : grad;
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
    bool maximize, use_weight_decay, decoupled_weight_decay, amsgrad;
};

// ``step`` is t, the tensor's step count including this step (1 on its first step).
template <typename T>
FASTOPT_HOST_DEVICE AdamCoefficients<T> adam_coefficients(const double* hyper, double lr, int64 step) {
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
    c.maximize = hyper[ADAM_H_MAXIMIZE] != 0;
    c.use_weight_decay = hyper[ADAM_H_WEIGHT_DECAY] != 0;
    c.decoupled_weight_decay = hyper[ADAM_H_DECOUPLED] != 0;
    c.amsgrad = hyper[ADAM_H_AMSGRAD] != 0;
    return c;
}

template <typename T>
FASTOPT_HOST_DEVICE void adam_chunk_element(T& param, T grad, T lr_scale, T& exp_avg, T& exp_avg_sq,
                                            T& max_exp_avg_sq, const AdamCoefficients<T>& c, bool has_lr_scale) {
    const T g = c.maximize ? -grad : grad;
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

}  // namespace fastopt
