"""Adagrad's step scalars and element math (CUDA twin: kernels/cuda/rules/adagrad.cuh)."""
import numpy as np

from ....rules.adagrad import Adagrad
from ..jit import jit

H_LR_DECAY, H_WEIGHT_DECAY, H_EPS = Adagrad.column_indices()
RATE, WEIGHT_DECAY, EPS, USE_WEIGHT_DECAY = range(4)


@jit
def coefficients(hyper, lr, step, scalars, row):
    """``step`` is t, the tensor's step count including this step: the rate decays as lr / (1 + (t - 1) lr_decay)."""
    row[RATE] = -(lr / (1.0 + (step - 1) * hyper[H_LR_DECAY]))
    row[WEIGHT_DECAY] = hyper[H_WEIGHT_DECAY]
    row[EPS] = hyper[H_EPS]
    row[USE_WEIGHT_DECAY] = hyper[H_WEIGHT_DECAY] != 0


@jit
def element(param, grad, total, unused1, unused2, lr_scale, has_lr_scale, live0, live1, live2, c):
    """d = g + wd p;  sum = sum + d^2;  p = p - clr s d / (sqrt(sum) + eps), clr the decayed rate."""
    rate = c[RATE] * lr_scale if has_lr_scale else c[RATE]
    if c[USE_WEIGHT_DECAY] != 0:
        grad = grad + c[WEIGHT_DECAY] * param
    total = total + grad * grad
    return param + rate * grad / (np.sqrt(total) + c[EPS]), total, unused1, unused2
