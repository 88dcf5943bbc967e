"""RMSprop's step scalars and element math (CUDA twin: kernels/cuda/rules/rmsprop.cuh)."""
import numpy as np

from ....rules.rmsprop import RMSprop
from ..element_math import lerp
from ..jit import jit

H_ALPHA, H_EPS, H_WEIGHT_DECAY, H_MOMENTUM = RMSprop.column_indices()
RATE, ALPHA, ALPHA_COMPLEMENT, EPS, WEIGHT_DECAY, MOMENTUM, ONE, USE_WEIGHT_DECAY = range(8)


@jit
def coefficients(hyper, lr, step, scalars, row):
    row[RATE] = -lr
    row[ALPHA] = hyper[H_ALPHA]
    row[ALPHA_COMPLEMENT] = 1.0 - hyper[H_ALPHA]
    row[EPS] = hyper[H_EPS]
    row[WEIGHT_DECAY] = hyper[H_WEIGHT_DECAY]
    row[MOMENTUM] = hyper[H_MOMENTUM]
    row[ONE] = 1.0
    row[USE_WEIGHT_DECAY] = hyper[H_WEIGHT_DECAY] != 0


@jit
def element(param, grad, square_avg, momentum_buffer, grad_avg, lr_scale, has_lr_scale, live0, use_momentum,
            centered, c):
    """d = g + wd p;  s = alpha s + (1 - alpha) d^2;  a = lerp(a, d, 1 - alpha) (centered);
    avg = sqrt(s - a^2) or sqrt(s), plus eps;  b = mu b + d / avg and p = p - lr s b, or p = p - lr s d / avg."""
    rate = c[RATE] * lr_scale if has_lr_scale else c[RATE]
    one = c[ONE]
    if c[USE_WEIGHT_DECAY] != 0:
        grad = grad + c[WEIGHT_DECAY] * param
    square_avg = square_avg * c[ALPHA] + c[ALPHA_COMPLEMENT] * grad * grad
    if centered:
        grad_avg = lerp(grad_avg, grad, c[ALPHA_COMPLEMENT], one)
        avg = np.sqrt(square_avg + (-one * grad_avg) * grad_avg)
    else:
        avg = np.sqrt(square_avg)
    avg = avg + c[EPS]
    if use_momentum:
        momentum_buffer = momentum_buffer * c[MOMENTUM] + grad / avg
        param = param + rate * momentum_buffer
    else:
        param = param + rate * grad / avg
    return param, square_avg, momentum_buffer, grad_avg
