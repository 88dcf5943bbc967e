"""Adam and AdamW's step scalars and element math (CUDA twin: kernels/cuda/rules/adam.cuh)."""
import numpy as np

from ....rules.adam import Adam
from ..element_math import element_rates, lerp, maximum
from ..jit import jit

H_BETA1, H_BETA2, H_EPS, H_WEIGHT_DECAY, H_DECOUPLED_WEIGHT_DECAY = Adam.column_indices()
(STEP_RATE, DECAY_FACTOR, RATE_WEIGHT_DECAY, BETA1_COMPLEMENT, BETA2, BETA2_COMPLEMENT, BIAS_CORRECTION2_SQRT, EPS,
 WEIGHT_DECAY, ONE, USE_WEIGHT_DECAY, DECOUPLED_WEIGHT_DECAY) = range(12)


@jit
def coefficients(hyper, lr, step, scalars, row):
    """``step`` is t, the tensor's step count including this step (1 on its first step)."""
    t = float(step)
    bias_correction1 = 1.0 - hyper[H_BETA1] ** t
    bias_correction2 = 1.0 - hyper[H_BETA2] ** t
    row[STEP_RATE] = -(lr / bias_correction1)
    row[DECAY_FACTOR] = 1.0 - lr * hyper[H_WEIGHT_DECAY]
    row[RATE_WEIGHT_DECAY] = lr * hyper[H_WEIGHT_DECAY]
    row[BETA1_COMPLEMENT] = 1.0 - hyper[H_BETA1]
    row[BETA2] = hyper[H_BETA2]
    row[BETA2_COMPLEMENT] = 1.0 - hyper[H_BETA2]
    row[BIAS_CORRECTION2_SQRT] = bias_correction2 ** 0.5
    row[EPS] = hyper[H_EPS]
    row[WEIGHT_DECAY] = hyper[H_WEIGHT_DECAY]
    row[ONE] = 1.0
    row[USE_WEIGHT_DECAY] = hyper[H_WEIGHT_DECAY] != 0
    row[DECOUPLED_WEIGHT_DECAY] = hyper[H_DECOUPLED_WEIGHT_DECAY]


@jit
def element(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, lr_scale, has_lr_scale, live0, live1, amsgrad, c):
    """p = (1 - lr s wd) p (AdamW) or d = g + wd p (Adam);  m = lerp(m, d, 1 - beta1);  v = beta2 v + (1 - beta2) d^2;
    vmax = max(vmax, v) (AMSGrad);  p = p - lr s / (1 - beta1^t) m / (sqrt(v or vmax) / sqrt(1 - beta2^t) + eps)."""
    one = c[ONE]
    step_rate, decay_factor = element_rates(c[STEP_RATE], c[DECAY_FACTOR], c[RATE_WEIGHT_DECAY], one, lr_scale,
                                            has_lr_scale)
    if c[USE_WEIGHT_DECAY] != 0:
        if c[DECOUPLED_WEIGHT_DECAY] != 0:
            param = param * decay_factor
        else:
            grad = grad + c[WEIGHT_DECAY] * param
    exp_avg = lerp(exp_avg, grad, c[BETA1_COMPLEMENT], one)
    exp_avg_sq = exp_avg_sq * c[BETA2] + c[BETA2_COMPLEMENT] * grad * grad
    if amsgrad:
        max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq)
        denom = np.sqrt(max_exp_avg_sq) / c[BIAS_CORRECTION2_SQRT] + c[EPS]
    else:
        denom = np.sqrt(exp_avg_sq) / c[BIAS_CORRECTION2_SQRT] + c[EPS]
    return param + step_rate * exp_avg / denom, exp_avg, exp_avg_sq, max_exp_avg_sq
