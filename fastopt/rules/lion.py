"""Lion: the rule (kernels: kernels/cpu/rules/lion.py, kernels/cuda/rules/lion.cuh)."""
import numpy as np

from ..optimizer import Optimizer


def lion(param, grad, state, *, lr, betas=(0.9, 0.99), weight_decay=0.0, maximize=False, lr_scale=1.0):
    r"""The float64 reference of one tensor's step, as the ``lion-pytorch`` package's ``Lion``.

    .. math::
        p = (1 - \eta s \lambda)\, p, \quad p = p - \eta s\, \mathrm{sign}(\beta_1 m + (1 - \beta_1) g), \quad
        m = \beta_2 m + (1 - \beta_2) g
    """
    beta1, beta2 = betas
    g = -grad if maximize else grad
    m = state.get("exp_avg", 0.0)
    param *= 1 - lr * lr_scale * weight_decay
    param -= lr * lr_scale * np.sign(beta1 * m + (1 - beta1) * g)
    state["exp_avg"] = beta2 * m + (1 - beta2) * g
    state["step"] = state.get("step", 0) + 1


class Lion(Optimizer):
    r"""Lion, EvoLved Sign Momentum (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), with the
    update of the ``lion-pytorch`` package (its default weight decay, scaled by the rate):

    .. math::
        p_t = (1 - \eta_t s \lambda)\, p_{t-1} - \eta_t s\, \mathrm{sign}(\beta_1 m_{t-1} + (1 - \beta_1) g_t), \quad
        m_t = \beta_2 m_{t-1} + (1 - \beta_2) g_t

    with :math:`\mathrm{sign}(0) = 0`, as torch's. Every element moves by exactly the rate, so Lion wants a rate
    3-10x smaller than AdamW's and a decay 3-10x larger. The state is ``exp_avg``.

    One deliberate difference: the sign of NaN is NaN here (torch's ``sign`` gives 0, which would leave a param whose
    grad was NaN silently frozen while the NaN stays in ``exp_avg``); as elsewhere in fastopt, NaN grads propagate
    unless ``grad_scale``, ``max_grad_norm`` or a guard skips the step.
    """

    KERNEL = "lion"
    DEFAULTS = dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False)
    STATE_SLOTS = ("exp_avg",)
    COLUMNS = ("beta1", "beta2", "weight_decay")
    REFERENCE = staticmethod(lion)

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False, backend="auto",
                 guard=None, **options):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize),
                         backend=backend, guard=guard, **options)

    @classmethod
    def validate_hyperparameters(cls, group, where):
        super().validate_hyperparameters(group, where)
        cls.check_betas(group["betas"], where)
