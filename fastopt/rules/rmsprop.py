"""RMSprop, centered and with momentum: the rule (kernels: kernels/cpu/rules/rmsprop.py and
kernels/cuda/rules/rmsprop.cuh)."""
import numpy as np

from ..optimizer import Optimizer


def rmsprop(param, grad, state, *, lr, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
            maximize=False, lr_scale=1.0):
    r"""The float64 reference of one tensor's step, as ``torch.optim.RMSprop`` (eps added outside the square root).

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


class RMSprop(Optimizer):
    r"""RMSprop with optional centering, momentum and weight decay; exactly ``torch.optim.RMSprop``.

    .. math::
        d_t = \pm g_t + \lambda p_{t-1}, \quad v_t = \alpha v_{t-1} + (1 - \alpha) d_t^2, \quad
        a_t = \alpha a_{t-1} + (1 - \alpha) d_t \text{ (centered)} \\
        q_t = \sqrt{v_t - a_t^2 \text{ (centered) or } v_t} + \epsilon, \quad
        b_t = \mu b_{t-1} + d_t / q_t, \quad p_t = p_{t-1} - \eta_t s\, (b_t \text{ if } \mu > 0 \text{ else } d_t / q_t)

    Note that :math:`\epsilon` is added outside the square root, as in torch (TensorFlow adds it inside).
    """

    KERNEL = "rmsprop"
    DEFAULTS = dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False)
    STATE_SLOTS = ("square_avg", "momentum_buffer", "grad_avg")
    OPTIONAL_STATES = ("momentum_buffer", "grad_avg")
    COLUMNS = ("alpha", "eps", "weight_decay", "momentum")
    REFERENCE = staticmethod(rmsprop)

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, *,
                 maximize=False, backend="auto", guard=None, **options):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                                      centered=centered, maximize=maximize), backend=backend, guard=guard, **options)

    @classmethod
    def validate_hyperparameters(cls, group, where):
        super().validate_hyperparameters(group, where)
        cls.check_number(group["alpha"], "alpha", where, low=0.0, high=1.0)
        cls.check_number(group["eps"], "eps", where, low=0.0, low_open=True)
        cls.check_number(group["momentum"], "momentum", where, low=0.0)
        cls.check_flag(group["centered"], "centered", where)

    @classmethod
    def state_names(cls, group):
        return (("square_avg",) + (("momentum_buffer",) if group["momentum"] > 0 else ())
                + (("grad_avg",) if group["centered"] else ()))
