"""LAMB's step scalars and element math, in the two passes of a rule with per-tensor norms (CUDA twin:
kernels/cuda/rules/lamb.cuh)."""
import numpy as np

from ....rules.lamb import LAMB
from ..element_math import lerp
from ..jit import jit

H_BETA1, H_BETA2, H_EPS, H_WEIGHT_DECAY, H_BIAS_CORRECTION, H_MAX_TRUST_RATIO = LAMB.column_indices()
(BETA1_COMPLEMENT, BETA2, BETA2_COMPLEMENT, INVERSE_BIAS_CORRECTION1, INVERSE_BIAS_CORRECTION2_SQRT, EPS, WEIGHT_DECAY,
 ONE, TRUST_RATE) = range(9)
NORMS = True  # two passes, with each tensor's norms between them (kernels/cpu/fused.rule_step)


@jit
def coefficients(hyper, lr, step, scalars, row):
    """``step`` is t, the tensor's step count including this step. TRUST_RATE is filled between the passes. The bias
    corrections are inverted here, once: the direction is computed twice per element (one per pass), and its
    divisions and square root, not memory, bound the CPU step (three divisions each made it 1.4x slower)."""
    t = float(step)
    corrected = hyper[H_BIAS_CORRECTION] != 0
    row[BETA1_COMPLEMENT] = 1.0 - hyper[H_BETA1]
    row[BETA2] = hyper[H_BETA2]
    row[BETA2_COMPLEMENT] = 1.0 - hyper[H_BETA2]
    row[INVERSE_BIAS_CORRECTION1] = 1.0 / (1.0 - hyper[H_BETA1] ** t) if corrected else 1.0
    row[INVERSE_BIAS_CORRECTION2_SQRT] = 1.0 / np.sqrt(1.0 - hyper[H_BETA2] ** t) if corrected else 1.0
    row[EPS] = hyper[H_EPS]
    row[WEIGHT_DECAY] = hyper[H_WEIGHT_DECAY]
    row[ONE] = 1.0


@jit
def moments(param, grad, exp_avg, exp_avg_sq, unused, live0, live1, live2, c):
    """m = lerp(m, g, 1 - beta1) (torch's form of beta1 m + (1 - beta1) g);  v = beta2 v + (1 - beta2) g^2."""
    return (lerp(exp_avg, grad, c[BETA1_COMPLEMENT], c[ONE]), exp_avg_sq * c[BETA2] + c[BETA2_COMPLEMENT] * grad * grad,
            unused)


@jit
def direction(param, exp_avg, exp_avg_sq, unused, live0, live1, live2, c):
    """u = m (1 / (1 - beta1^t)) / (sqrt(v) (1 / sqrt(1 - beta2^t)) + eps) + wd p."""
    return (exp_avg * c[INVERSE_BIAS_CORRECTION1]) / (np.sqrt(exp_avg_sq) * c[INVERSE_BIAS_CORRECTION2_SQRT] + c[EPS]) \
        + c[WEIGHT_DECAY] * param


@jit
def norm_coefficients(hyper, lr, param_sum_of_squares, update_sum_of_squares, row):
    """TRUST_RATE = -lr * clamp(||p|| / ||u||, 0, max_trust_ratio), the ratio 1 where either norm is 0."""
    param_norm = np.sqrt(param_sum_of_squares)
    update_norm = np.sqrt(update_sum_of_squares)
    trust = 1.0
    if param_norm != 0 and update_norm != 0:
        trust = min(param_norm / update_norm, hyper[H_MAX_TRUST_RATIO])
    row[TRUST_RATE] = -(lr * trust)


@jit
def apply(param, update, lr_scale, has_lr_scale, c):
    """p = p - lr s trust u."""
    rate = c[TRUST_RATE] * lr_scale if has_lr_scale else c[TRUST_RATE]
    return param + rate * update
