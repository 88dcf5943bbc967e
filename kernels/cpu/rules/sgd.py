"""SGD's step scalars and element math (CUDA twin: kernels/cuda/rules/sgd.cuh)."""
from ....rules.sgd import SGD
from ..jit import jit

H_MOMENTUM, H_DAMPENING, H_WEIGHT_DECAY, H_NESTEROV = SGD.column_indices()
RATE, WEIGHT_DECAY, MOMENTUM, DAMPENING_COMPLEMENT, USE_WEIGHT_DECAY, FIRST_MOMENTUM_STEP, NESTEROV = range(7)


@jit
def coefficients(hyper, lr, step, scalars, row):
    """``step`` counts momentum steps including this one: at 1 the buffer starts as the gradient."""
    row[RATE] = -lr
    row[WEIGHT_DECAY] = hyper[H_WEIGHT_DECAY]
    row[MOMENTUM] = hyper[H_MOMENTUM]
    row[DAMPENING_COMPLEMENT] = 1.0 - hyper[H_DAMPENING]
    row[USE_WEIGHT_DECAY] = hyper[H_WEIGHT_DECAY] != 0
    row[FIRST_MOMENTUM_STEP] = step == 1
    row[NESTEROV] = hyper[H_NESTEROV]


@jit
def element(param, grad, momentum_buffer, unused1, unused2, lr_scale, has_lr_scale, use_momentum, live1, live2, c):
    """d = g + wd p;  b = d (first step) or mu b + (1 - dampening) d;  d = d + mu b (Nesterov) or b;  p = p - lr s d."""
    rate = c[RATE] * lr_scale if has_lr_scale else c[RATE]
    if c[USE_WEIGHT_DECAY] != 0:
        grad = grad + c[WEIGHT_DECAY] * param
    if use_momentum:
        if c[FIRST_MOMENTUM_STEP] != 0:
            momentum_buffer = grad
        else:
            momentum_buffer = momentum_buffer * c[MOMENTUM] + c[DAMPENING_COMPLEMENT] * grad
        if c[NESTEROV] != 0:
            grad = grad + c[MOMENTUM] * momentum_buffer
        else:
            grad = momentum_buffer
    return param + rate * grad, momentum_buffer, unused1, unused2
