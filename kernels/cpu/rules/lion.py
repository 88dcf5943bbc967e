"""Lion's step scalars and element math (CUDA twin: kernels/cuda/rules/lion.cuh)."""
from ....rules.lion import Lion
from ..element_math import element_rates
from ..jit import jit

H_BETA1, H_BETA2, H_WEIGHT_DECAY = Lion.column_indices()
RATE, DECAY_FACTOR, RATE_WEIGHT_DECAY, BETA1, BETA1_COMPLEMENT, BETA2, BETA2_COMPLEMENT, ONE = range(8)


@jit
def coefficients(hyper, lr, step, scalars, row):
    row[RATE] = -lr
    row[DECAY_FACTOR] = 1.0 - lr * hyper[H_WEIGHT_DECAY]
    row[RATE_WEIGHT_DECAY] = lr * hyper[H_WEIGHT_DECAY]
    row[BETA1] = hyper[H_BETA1]
    row[BETA1_COMPLEMENT] = 1.0 - hyper[H_BETA1]
    row[BETA2] = hyper[H_BETA2]
    row[BETA2_COMPLEMENT] = 1.0 - hyper[H_BETA2]
    row[ONE] = 1.0


@jit
def sign(x, one):
    """torch.sign, except that NaN stays NaN: one, -one, or x itself for zero and NaN."""
    return one if x > 0 else (-one if x < 0 else x)


@jit
def element(param, grad, exp_avg, unused1, unused2, lr_scale, has_lr_scale, live0, live1, live2, c):
    """p = (1 - lr s wd) p;  p = p - lr s sign(beta1 m + (1 - beta1) g);  m = beta2 m + (1 - beta2) g."""
    one = c[ONE]
    rate, decay_factor = element_rates(c[RATE], c[DECAY_FACTOR], c[RATE_WEIGHT_DECAY], one, lr_scale, has_lr_scale)
    param = param * decay_factor
    param = param + rate * sign(exp_avg * c[BETA1] + c[BETA1_COMPLEMENT] * grad, one)
    exp_avg = exp_avg * c[BETA2] + c[BETA2_COMPLEMENT] * grad
    return param, exp_avg, unused1, unused2
