"""Adagrad: the rule (kernels: kernels/cpu/rules/adagrad.py, kernels/cuda/rules/adagrad.cuh)."""
import numpy as np

from ..optimizer import Optimizer


def adagrad(param, grad, state, *, lr, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10,
            maximize=False, lr_scale=1.0):
    r"""The float64 reference of one tensor's step, as ``torch.optim.Adagrad``'s for-loop implementation.

    .. math::
        d = \pm g + \lambda p, \quad \sigma = \sigma + d^2 \;(\sigma_0 = \text{initial\_accumulator\_value}), \quad
        p = p - \frac{\eta s}{1 + (t - 1)\,\delta}\, \frac{d}{\sqrt{\sigma} + \epsilon}
    """
    step = state["step"] = state.get("step", 0) + 1
    d = -grad if maximize else grad.copy()
    if weight_decay != 0:
        d = d + weight_decay * param
    total = state["sum"] = state.get("sum", initial_accumulator_value) + d * d
    param -= lr * lr_scale / (1 + (step - 1) * lr_decay) * d / (np.sqrt(total) + eps)


class Adagrad(Optimizer):
    r"""Adagrad (Duchi et al. 2011) with learning-rate decay and weight decay; exactly ``torch.optim.Adagrad``.

    .. math::
        d_t = \pm g_t + \lambda p_{t-1}, \quad \sigma_t = \sigma_{t-1} + d_t^2, \quad
        p_t = p_{t-1} - \frac{\eta_t s}{1 + (t - 1)\,\delta}\, \frac{d_t}{\sqrt{\sigma_t} + \epsilon}

    :math:`\sigma_0` is ``initial_accumulator_value``, :math:`\delta` is ``lr_decay`` and :math:`t` counts this
    param's steps (from 1). The state is torch's ``sum`` (and ``step``).
    """

    KERNEL = "adagrad"
    DEFAULTS = dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10,
                    maximize=False)
    STATE_SLOTS = ("sum",)
    COLUMNS = ("lr_decay", "weight_decay", "eps")
    REFERENCE = staticmethod(adagrad)

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10,
                 *, maximize=False, backend="auto", guard=None, **options):
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value, eps=eps,
                                      maximize=maximize), backend=backend, guard=guard, **options)

    @classmethod
    def validate_hyperparameters(cls, group, where):
        super().validate_hyperparameters(group, where)
        cls.check_number(group["lr_decay"], "lr_decay", where, low=0.0)
        cls.check_number(group["initial_accumulator_value"], "initial_accumulator_value", where, low=0.0)
        cls.check_number(group["eps"], "eps", where, low=0.0)

    @classmethod
    def initial_state(cls, name, group):
        """``sum`` starts at the group's ``initial_accumulator_value``, as torch's."""
        return float(group["initial_accumulator_value"])
