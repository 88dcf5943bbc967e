"""Schedule-free AdamW and SGD's running scalars, step scalars and element math (CUDA twin:
kernels/cuda/rules/schedule_free.cuh)."""
import numpy as np

from ....rules.schedule_free import AdamWScheduleFree
from ..element_math import lerp
from ..jit import jit

H_BETA1, H_BETA2, H_EPS, H_WEIGHT_DECAY, H_WARMUP_STEPS, H_R, H_WEIGHT_LR_POWER = AdamWScheduleFree.column_indices()
WEIGHT_SUM, LR_MAX = range(2)  # the tensor's running scalars (AdamWScheduleFree.SCALARS)
(AVERAGE_WEIGHT, Y_RATE, Z_RATE, BETA2, BETA2_COMPLEMENT, INVERSE_BIAS_CORRECTION2, EPS, WEIGHT_DECAY, USE_WEIGHT_DECAY,
 ONE) = range(10)


@jit
def warmed_up_rate(hyper, lr, step):
    """The rate of step ``step`` (t, from 1): ``lr * t / warmup_steps`` during the warmup, then ``lr``."""
    warmup = hyper[H_WARMUP_STEPS]
    if float(step - 1) < warmup:
        return lr * (float(step) / warmup)
    return lr


@jit
def average_weight(hyper, step, lr_max):
    """The weight of step t in the average: t^r lr_max^weight_lr_power."""
    return float(step) ** hyper[H_R] * lr_max ** hyper[H_WEIGHT_LR_POWER]


@jit
def advance_scalars(hyper, lr, step, scalars):
    """lr_max = max(lr_max, rate);  weight_sum += weight of this step (in float64, as the package's Python floats)."""
    lr_max = max(warmed_up_rate(hyper, lr, step), scalars[LR_MAX])
    scalars[LR_MAX] = lr_max
    scalars[WEIGHT_SUM] += average_weight(hyper, step, lr_max)


@jit
def coefficients(hyper, lr, step, scalars, row):
    """From the scalars as advanced for this step: c = weight / weight_sum (0 while the sum is 0)."""
    rate = warmed_up_rate(hyper, lr, step)
    weight_sum = scalars[WEIGHT_SUM]
    c = average_weight(hyper, step, scalars[LR_MAX]) / weight_sum if weight_sum != 0 else 0.0
    row[AVERAGE_WEIGHT] = c
    row[Y_RATE] = rate * (hyper[H_BETA1] * (1.0 - c) - 1.0)
    row[Z_RATE] = -rate
    row[BETA2] = hyper[H_BETA2]
    row[BETA2_COMPLEMENT] = 1.0 - hyper[H_BETA2]
    # Inverted once here: a division per element costs the step 15% at 32M params (the package divides).
    row[INVERSE_BIAS_CORRECTION2] = 1.0 / (1.0 - hyper[H_BETA2] ** float(step))
    row[EPS] = hyper[H_EPS]
    row[WEIGHT_DECAY] = hyper[H_WEIGHT_DECAY]
    row[USE_WEIGHT_DECAY] = hyper[H_WEIGHT_DECAY] != 0
    row[ONE] = 1.0


@jit
def element(param, grad, z, exp_avg_sq, unused, lr_scale, has_lr_scale, live0, adaptive, live2, c):
    """v = beta2 v + (1 - beta2) g^2 and d = g / (sqrt(v (1 / (1 - beta2^t))) + eps) (AdamW; SGD: d = g);  d = d + wd y;
    y = lerp(y, z, c) + lr s (beta1 (1 - c) - 1) d;  z = z - lr s d. The package's operations, in its order, except
    that it divides v by 1 - beta2^t."""
    if adaptive:
        exp_avg_sq = exp_avg_sq * c[BETA2] + c[BETA2_COMPLEMENT] * grad * grad
        grad = grad / (np.sqrt(exp_avg_sq * c[INVERSE_BIAS_CORRECTION2]) + c[EPS])
    if c[USE_WEIGHT_DECAY] != 0:
        grad = grad + c[WEIGHT_DECAY] * param
    y_rate = c[Y_RATE] * lr_scale if has_lr_scale else c[Y_RATE]
    z_rate = c[Z_RATE] * lr_scale if has_lr_scale else c[Z_RATE]
    param = lerp(param, z, c[AVERAGE_WEIGHT], c[ONE]) + y_rate * grad
    return param, z + z_rate * grad, exp_avg_sq, unused
