"""Per-element update math of each optimizer, and the loop that applies it over one chunk.

The ``*_element`` functions are the single place where each update rule is written for the CPU; they take
and return scalars in the param dtype and follow torch's single-tensor (for-loop) implementations operation
for operation, so results agree with ``torch.optim`` to float rounding. The CUDA ``*_element`` functions in
``kernels/cuda`` mirror them name for name.

The ``*_chunk`` loops read one chunk of every stream, apply the element function and write back. Their flags
are loop-invariant, so LLVM unswitches the branches and vectorises each variant. No literal constants appear
in the math: a Python number would promote float32 math to float64 in Numba; every scalar arrives already
rounded to the param dtype.
"""
import numpy as np

from .jit import jit


@jit
def lerp(start, end, weight, one):
    """torch.lerp's formula: the form used depends on whether the weight is below one half."""
    if weight < one - weight:
        return start + weight * (end - start)
    return end - (end - start) * (one - weight)


@jit
def maximum(a, b):
    """torch.maximum: NaN when either input is NaN (a bare comparison would drop it)."""
    if a != a or b != b:
        return a + b
    return a if a > b else b


@jit
def sgd_element(param, grad, momentum_buffer, rate, weight_decay, momentum, dampening_complement,
                use_weight_decay, use_momentum, first_momentum_step, nesterov):
    """d = g + wd p;  b = d (first step) or mu b + (1 - dampening) d;  d = d + mu b (Nesterov) or b;  p = p + rate d.

    ``rate`` is -lr times the element's lr_scale.
    """
    if use_weight_decay:
        grad = grad + weight_decay * param
    if use_momentum:
        if first_momentum_step:
            momentum_buffer = grad
        else:
            momentum_buffer = momentum_buffer * momentum + dampening_complement * grad
        if nesterov:
            grad = grad + momentum * momentum_buffer
        else:
            grad = momentum_buffer
    return param + rate * grad, momentum_buffer


@jit
def rmsprop_element(param, grad, square_avg, momentum_buffer, grad_avg, rate, alpha, alpha_complement, eps,
                    weight_decay, momentum, one, use_weight_decay, use_momentum, centered):
    """d = g + wd p;  s = alpha s + (1 - alpha) d^2;  a = lerp(a, d, 1 - alpha) (centered);
    avg = sqrt(s - a^2) or sqrt(s), plus eps;  b = mu b + d / avg and p = p + rate b, or p = p + rate d / avg.

    ``rate`` is -lr times the element's lr_scale.
    """
    if use_weight_decay:
        grad = grad + weight_decay * param
    square_avg = square_avg * alpha + alpha_complement * grad * grad
    if centered:
        grad_avg = lerp(grad_avg, grad, alpha_complement, one)
        avg = np.sqrt(square_avg + (-one * grad_avg) * grad_avg)
    else:
        avg = np.sqrt(square_avg)
    avg = avg + eps
    if use_momentum:
        momentum_buffer = momentum_buffer * momentum + grad / avg
        param = param + rate * momentum_buffer
    else:
        param = param + rate * grad / avg
    return param, square_avg, momentum_buffer, grad_avg


@jit
def adam_element(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step_rate, decay_factor, beta1_complement,
                 beta2, beta2_complement, bias_correction2_sqrt, eps, weight_decay, one,
                 use_weight_decay, decoupled_weight_decay, amsgrad):
    """Adam, or AdamW with decoupled decay:
    p = decay_factor p (AdamW) or d = g + wd p (Adam);  m = lerp(m, d, 1 - beta1);  v = beta2 v + (1 - beta2) d^2;
    vmax = max(vmax, v) (AMSGrad);  p = p + step_rate m / (sqrt(v or vmax) / sqrt(1 - beta2^t) + eps).

    ``step_rate`` is -lr lr_scale / (1 - beta1^t); ``decay_factor`` is 1 - lr lr_scale wd.
    """
    if use_weight_decay:
        if decoupled_weight_decay:
            param = param * decay_factor
        else:
            grad = grad + weight_decay * param
    exp_avg = lerp(exp_avg, grad, beta1_complement, one)
    exp_avg_sq = exp_avg_sq * beta2 + beta2_complement * grad * grad
    if amsgrad:
        max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq)
        denom = np.sqrt(max_exp_avg_sq) / bias_correction2_sqrt + eps
    else:
        denom = np.sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
    return param + step_rate * exp_avg / denom, exp_avg, exp_avg_sq, max_exp_avg_sq
