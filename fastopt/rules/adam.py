"""Adam and AdamW, with AMSGrad: the rule (kernels: kernels/cpu/rules/adam.py, kernels/cuda/rules/adam.cuh)."""
import numpy as np

from ..optimizer import Optimizer


def adam(param, grad, state, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
         maximize=False, decoupled_weight_decay=False, lr_scale=1.0):
    r"""The float64 reference of one tensor's step: Adam (L2 decay added to the gradient) or AdamW (decoupled
    decay), as ``torch.optim.Adam``/``AdamW``.

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


class Adam(Optimizer):
    r"""Adam with optional AMSGrad and L2 weight decay added to the gradient; exactly ``torch.optim.Adam``.

    .. math::
        d_t = \pm g_t + \lambda p_{t-1}, \quad m_t = \beta_1 m_{t-1} + (1 - \beta_1) d_t, \quad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) d_t^2, \quad \hat v_t = \max(\hat v_{t-1}, v_t) \text{ (AMSGrad)} \\
        p_t = p_{t-1} - \frac{\eta_t s}{1 - \beta_1^t}\, \frac{m_t}{\sqrt{\hat v_t \text{ or } v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

    :math:`t` counts this param's steps (from 1); :math:`\eta_t` is the group's lr or its schedule at the
    optimizer's step count.
    """

    KERNEL = "adam"
    DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False)
    STATE_SLOTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    OPTIONAL_STATES = ("max_exp_avg_sq",)
    COLUMNS = ("beta1", "beta2", "eps", "weight_decay", "decoupled_weight_decay")
    REFERENCE = staticmethod(adam)
    DECOUPLED_WEIGHT_DECAY = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 maximize=False, backend="auto", guard=None, **options):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                                      maximize=maximize), backend=backend, guard=guard, **options)

    @classmethod
    def validate_hyperparameters(cls, group, where):
        super().validate_hyperparameters(group, where)
        cls.check_betas(group["betas"], where)
        cls.check_number(group["eps"], "eps", where, low=0.0, low_open=True)
        cls.check_flag(group["amsgrad"], "amsgrad", where)

    @classmethod
    def state_names(cls, group):
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())

    @classmethod
    def group_row(cls, group):
        return super().group_row(dict(group, decoupled_weight_decay=cls.DECOUPLED_WEIGHT_DECAY))


class AdamW(Adam):
    r"""Adam with decoupled weight decay (Loshchilov and Hutter); exactly ``torch.optim.AdamW``.

    As :class:`Adam`, except that the decay multiplies the param before the moments are updated,
    :math:`p \leftarrow (1 - \eta_t s \lambda)\, p`, and the gradient is left alone. Default ``weight_decay=1e-2``.
    """

    DEFAULTS = dict(Adam.DEFAULTS, weight_decay=1e-2)
    REFERENCE = staticmethod(adamw)
    DECOUPLED_WEIGHT_DECAY = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, backend="auto", guard=None, **options):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, backend=backend, guard=guard, **options)
