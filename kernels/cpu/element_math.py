"""Element-math helpers that the rules' element functions share (kernels/cpu/rules/), twins of the CUDA ones in
kernels/cuda/element_math.cuh: torch's formulas where they differ from the textbook's. Scalars in and out in the
math dtype; ``one`` is passed in, as a Python literal would promote float32 math to float64 in Numba.
"""

from .jit import jit


@jit
def lerp(start, end, weight, one):
    """torch.lerp's formula: the form used depends on whether |weight| is below one half (negative weights:
    schedule-free's eval())."""
    if abs(weight) < one - abs(weight):
        return start + weight * (end - start)
    return end - (end - start) * (one - weight)


@jit
def maximum(a, b):
    """torch.maximum: NaN when either input is NaN (a bare comparison would drop it)."""
    if a != a or b != b:
        return a + b
    return a if a > b else b


@jit
def element_rates(rate, decay_factor, rate_weight_decay, one, lr_scale, has_lr_scale):
    """An element's (rate, decoupled weight-decay factor): the tensor's ``rate`` and ``decay_factor`` (1 - lr wd),
    or with the element's ``lr_scale`` s, ``rate s`` and ``1 - (lr wd) s``."""
    if has_lr_scale:
        return rate * lr_scale, one - rate_weight_decay * lr_scale
    return rate, decay_factor
