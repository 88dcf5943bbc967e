// Per-element update math of each optimizer: the CUDA twin of fastopt/kernels/cpu/element_math.py.
//
// Same names, same argument order, same operation order as the Numba functions, which follow torch's
// single-tensor (for-loop) implementations operation for operation. Where the Numba function returns a tuple
// (param, state...), these take the param and the state as references and update them in place; every other
// argument is a scalar already rounded to the param dtype T (no literal constants appear in the math, so a
// float kernel never computes in double). The kernels are compiled with --fmad=false: no multiply-add is
// contracted, so each operation rounds exactly as in the Numba kernels (which LLVM does not contract either),
// and the host build of these functions that tests/test_cuda_host_math.py checks is bit-for-bit the device code.
#pragma once

#include "host_device.cuh"

namespace fastopt {

// torch.lerp's formula: the form used depends on whether the weight is below one half.
template <typename T>
FASTOPT_HOST_DEVICE T lerp(T start, T end, T weight, T one) {
    if (weight < one - weight) {
        return start + weight * (end - start);
    }
    return end - (end - start) * (one - weight);
}

// torch.maximum: NaN when either input is NaN (a bare comparison would drop it).
template <typename T>
FASTOPT_HOST_DEVICE T maximum(T a, T b) {
    if (a != a || b != b) {
        return a + b;
    }
    return a > b ? a : b;
}

// d = g + wd p;  b = d (first step) or mu b + (1 - dampening) d;  d = d + mu b (Nesterov) or b;  p = p + rate d.
//
// ``rate`` is -lr times the element's lr_scale.
template <typename T>
FASTOPT_HOST_DEVICE void sgd_element(T& param, T grad, T& momentum_buffer, T rate, T weight_decay, T momentum,
                                     T dampening_complement, bool use_weight_decay, bool use_momentum,
                                     bool first_momentum_step, bool nesterov) {
    if (use_weight_decay) {
        grad = grad + weight_decay * param;
    }
    if (use_momentum) {
        if (first_momentum_step) {
            momentum_buffer = grad;
        } else {
            momentum_buffer = momentum_buffer * momentum + dampening_complement * grad;
        }
        if (nesterov) {
            grad = grad + momentum * momentum_buffer;
        } else {
            grad = momentum_buffer;
        }
    }
    param = param + rate * grad;
}

// d = g + wd p;  s = alpha s + (1 - alpha) d^2;  a = lerp(a, d, 1 - alpha) (centered);
// avg = sqrt(s - a^2) or sqrt(s), plus eps;  b = mu b + d / avg and p = p + rate b, or p = p + rate d / avg.
//
// ``rate`` is -lr times the element's lr_scale.
template <typename T>
FASTOPT_HOST_DEVICE void rmsprop_element(T& param, T grad, T& square_avg, T& momentum_buffer, T& grad_avg, T rate,
                                         T alpha, T alpha_complement, T eps, T weight_decay, T momentum, T one,
                                         bool use_weight_decay, bool use_momentum, bool centered) {
    if (use_weight_decay) {
        grad = grad + weight_decay * param;
    }
    square_avg = square_avg * alpha + alpha_complement * grad * grad;
    T avg;
    if (centered) {
        grad_avg = lerp(grad_avg, grad, alpha_complement, one);
        avg = square_root(square_avg + (-one * grad_avg) * grad_avg);
    } else {
        avg = square_root(square_avg);
    }
    avg = avg + eps;
    if (use_momentum) {
        momentum_buffer = momentum_buffer * momentum + grad / avg;
        param = param + rate * momentum_buffer;
    } else {
        param = param + rate * grad / avg;
    }
}

// Adam, or AdamW with decoupled decay:
// p = decay_factor p (AdamW) or d = g + wd p (Adam);  m = lerp(m, d, 1 - beta1);  v = beta2 v + (1 - beta2) d^2;
// vmax = max(vmax, v) (AMSGrad);  p = p + step_rate m / (sqrt(v or vmax) / sqrt(1 - beta2^t) + eps).
//
// ``step_rate`` is -lr lr_scale / (1 - beta1^t); ``decay_factor`` is 1 - lr lr_scale wd.
template <typename T>
FASTOPT_HOST_DEVICE void adam_element(T& param, T grad, T& exp_avg, T& exp_avg_sq, T& max_exp_avg_sq, T step_rate,
                                      T decay_factor, T beta1_complement, T beta2, T beta2_complement,
                                      T bias_correction2_sqrt, T eps, T weight_decay, T one, bool use_weight_decay,
                                      bool decoupled_weight_decay, bool amsgrad) {
    if (use_weight_decay) {
        if (decoupled_weight_decay) {
            param = param * decay_factor;
        } else {
            grad = grad + weight_decay * param;
        }
    }
    exp_avg = lerp(exp_avg, grad, beta1_complement, one);
    exp_avg_sq = exp_avg_sq * beta2 + beta2_complement * grad * grad;
    T denom;
    if (amsgrad) {
        max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq);
        denom = square_root(max_exp_avg_sq) / bias_correction2_sqrt + eps;
    } else {
        denom = square_root(exp_avg_sq) / bias_correction2_sqrt + eps;
    }
    param = param + step_rate * exp_avg / denom;
}

}  // namespace fastopt
