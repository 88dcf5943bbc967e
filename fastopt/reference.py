"""Float64 NumPy reference of every optimizer: slow, obviously correct, the single source of truth of the tests.

Each function updates one tensor in place, written as textbook math in torch's single-tensor (for-loop)
order. ``lr`` is the group's learning rate at this step (a schedule evaluated on the host); ``lr_scale`` is
the per-element multiplier (1 where absent): the element's rate is ``lr * lr_scale`` wherever the rate
appears. ``state`` is a dict of float64 arrays keyed by torch's state names plus ``"step"`` (an int).
The schedules' reference is the host evaluation ``sched(t)`` in :mod:`fastopt.schedules`.
"""
import numpy as np


def sgd(param, grad, state, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
        maximize=False, lr_scale=1.0):
    r"""SGD with momentum, dampening and Nesterov, as ``torch.optim.SGD``.

    .. math::
        d &= \pm g + \lambda p \\
        b &= d \text{ (first momentum step)}, \quad b = \mu b + (1 - \tau) d \text{ (later)} \\
        d &= d + \mu b \text{ (Nesterov)}, \quad d = b \text{ (otherwise)} \\
        p &= p - \eta s\, d
    """
    d = -grad if maximize else grad.copy()
    if weight_decay != 0:
        d = d + weight_decay * param
    if momentum != 0:
        if state.get("momentum_buffer") is None:
            state["momentum_buffer"] = d.copy()
        else:
            state["momentum_buffer"] = momentum * state["momentum_buffer"] + (1 - dampening) * d
        d = d + momentum * state["momentum_buffer"] if nesterov else state["momentum_buffer"]
    param -= lr * lr_scale * d
    state["step"] = state.get("step", 0) + 1


def rmsprop(param, grad, state, *, lr, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
            maximize=False, lr_scale=1.0):
    r"""RMSprop, as ``torch.optim.RMSprop`` (eps added outside the square root).

    .. math::
        d &= \pm g + \lambda p, \qquad v = \alpha v + (1 - \alpha) d^2 \\
        a &= \alpha a + (1 - \alpha) d, \quad \bar v = v - a^2 \text{ (centered)}, \quad \bar v = v \text{ (otherwise)} \\
        b &= \mu b + d / (\sqrt{\bar v} + \epsilon), \quad p = p - \eta s\, b \text{ (momentum)}, \quad
        p = p - \eta s\, d / (\sqrt{\bar v} + \epsilon) \text{ (otherwise)}
    """
    d = -grad if maximize else grad.copy()
    if weight_decay != 0:
        d = d + weight_decay * param
    v = state["square_avg"] = alpha * state.get("square_avg", 0.0) + (1 - alpha) * d * d
    if centered:
        a = state["grad_avg"] = alpha * state.get("grad_avg", 0.0) + (1 - alpha) * d
        v = v - a * a
    denom = np.sqrt(v) + eps
    if momentum > 0:
        state["momentum_buffer"] = momentum * state.get("momentum_buffer", 0.0) + d / denom
        param -= lr * lr_scale * state["momentum_buffer"]
    else:
        param -= lr * lr_scale * d / denom
    state["step"] = state.get("step", 0) + 1


def adam(param, grad, state, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
         maximize=False, decoupled_weight_decay=False, lr_scale=1.0):
    r"""Adam (L2 decay added to the gradient) or AdamW (decoupled decay), as ``torch.optim.Adam``/``AdamW``.

    .. math::
        p &= (1 - \eta s \lambda) p \text{ (AdamW)}, \qquad d = \pm g + \lambda p \text{ (Adam)} \\
        m &= \beta_1 m + (1 - \beta_1) d, \qquad v = \beta_2 v + (1 - \beta_2) d^2 \\
        \hat v &= \max(\hat v, v) \text{ (AMSGrad)}, \quad \hat v = v \text{ (otherwise)} \\
        p &= p - \frac{\eta s}{1 - \beta_1^t} \, \frac{m}{\sqrt{\hat v} / \sqrt{1 - \beta_2^t} + \epsilon}
    """
    beta1, beta2 = betas
    step = state["step"] = state.get("step", 0) + 1
    d = -grad if maximize else grad.copy()
    if weight_decay != 0:
        if decoupled_weight_decay:
            param *= 1 - lr * lr_scale * weight_decay
        else:
            d = d + weight_decay * param
    m = state["exp_avg"] = beta1 * state.get("exp_avg", 0.0) + (1 - beta1) * d
    v = state["exp_avg_sq"] = beta2 * state.get("exp_avg_sq", 0.0) + (1 - beta2) * d * d
    if amsgrad:
        v = state["max_exp_avg_sq"] = np.maximum(state.get("max_exp_avg_sq", 0.0), v)
    denom = np.sqrt(v) / np.sqrt(1 - beta2 ** step) + eps
    param -= lr * lr_scale / (1 - beta1 ** step) * m / denom


def adamw(param, grad, state, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
          maximize=False, lr_scale=1.0):
    """AdamW: :func:`adam` with decoupled weight decay."""
    adam(param, grad, state, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
         maximize=maximize, decoupled_weight_decay=True, lr_scale=lr_scale)


# ---------------------------------------------------------------- mixed precision
def counter_hash(seed, step, element):
    """The kernels' counter-based random 32 bits for (seed, step, element) (SplitMix64's finaliser over a mix of
    the three), written again in NumPy uint64 arithmetic, which wraps as C's does. ``element`` is an array."""
    element = np.asarray(element, dtype=np.uint64)
    with np.errstate(over="ignore"):
        state = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
                 ^ np.uint64(step) * np.uint64(0xC2B2AE3D27D4EB4F)
                 ^ element * np.uint64(0x165667B19E3779F9))
        state = (state ^ (state >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        state = (state ^ (state >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    state = state ^ (state >> np.uint64(31))
    return (state >> np.uint64(32)).astype(np.uint32)


def round_to_storage(values, dtype, *, seed=None, step=0, elements=None):
    """float64 ``values`` rounded to the storage ``dtype`` as the kernels round their math results: to float32
    (nearest even) first, then to a 16-bit dtype, to nearest even, or with ``seed`` stochastically: up with
    probability equal to the distance from the lower neighbour (16 random bits from ``counter_hash(seed, step,
    elements)`` added below the kept half, then truncated; NaN and infinities round to nearest)."""
    dtype = np.dtype(dtype)
    if dtype == np.float64:
        return np.asarray(values, dtype=np.float64)
    single = np.asarray(values, dtype=np.float64).astype(np.float32)
    if dtype == np.float32:
        return single
    if seed is None:
        return single.astype(dtype)
    bits = single.view(np.uint32).astype(np.uint64)
    noise = (counter_hash(seed, step, elements) >> np.uint32(16)).astype(np.uint64).reshape(bits.shape)
    rounded = ((bits + noise) >> np.uint64(16)).astype(np.uint16).view(dtype)
    special = ~np.isfinite(single)
    rounded[special] = single[special].astype(dtype)
    return rounded


def clip_factor(norm, max_norm):
    """``torch.nn.utils.clip_grad_norm_``'s factor for grads of global L2 ``norm``: min(1, max_norm / (norm + 1e-6))."""
    return min(1.0, max_norm / (norm + 1e-6))
