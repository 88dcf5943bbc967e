"""SGD with momentum, dampening and Nesterov: the rule (kernels: kernels/cpu/rules/sgd.py, kernels/cuda/rules/sgd.cuh)."""
from ..optimizer import Optimizer


def sgd(param, grad, state, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
        maximize=False, lr_scale=1.0):
    r"""The float64 reference of one tensor's step, as ``torch.optim.SGD``'s for-loop implementation.

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


class SGD(Optimizer):
    r"""Stochastic gradient descent with optional momentum, dampening, Nesterov momentum and weight decay.

    Exactly ``torch.optim.SGD``:

    .. math::
        d_t = \pm g_t + \lambda p_{t-1}, \quad
        b_t = \begin{cases} d_t & \text{first momentum step} \\ \mu b_{t-1} + (1 - \tau) d_t \end{cases}, \quad
        p_t = p_{t-1} - \eta_t s \,(d_t + \mu b_t \text{ if Nesterov else } b_t)

    where :math:`s` is the element's ``lr_scale`` (1 without one) and :math:`\eta_t` the group's lr or schedule.
    """

    KERNEL = "sgd"
    DEFAULTS = dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
    STATE_SLOTS = ("momentum_buffer",)
    OPTIONAL_STATES = ("momentum_buffer",)
    COLUMNS = ("momentum", "dampening", "weight_decay", "nesterov")
    REFERENCE = staticmethod(sgd)

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, backend="auto", guard=None, **options):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize), backend=backend, guard=guard, **options)

    @classmethod
    def validate_hyperparameters(cls, group, where):
        super().validate_hyperparameters(group, where)
        cls.check_number(group["momentum"], "momentum", where, low=0.0)
        cls.check_number(group["dampening"], "dampening", where)
        cls.check_flag(group["nesterov"], "nesterov", where)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"{where}: Nesterov momentum requires a momentum > 0 and zero dampening")

    @classmethod
    def state_names(cls, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    @classmethod
    def counts_step(cls, group):
        """SGD counts momentum steps: torch's SGD keeps no step, and the kernels need to know the first momentum
        step (whose buffer starts as the gradient)."""
        return group["momentum"] != 0
