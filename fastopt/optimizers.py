"""SGD, RMSprop, Adam and AdamW with torch.optim's arguments, defaults and semantics.

Each class declares its hyperparameters and checks, the state buffers it keeps (torch's names, in the order
of the kernel's state slots), the row of the kernels' group table, and its float64 reference function.

Every optimizer also takes the keyword options of :class:`fastopt.Optimizer`: ``backend``, ``guard``, and for
mixed precision ``master_weights``, ``state_dtype``, ``rounding``, ``seed`` and ``max_grad_norm``.
"""
from . import reference
from .kernels.cpu import tables
from .optimizer import Optimizer


class SGD(Optimizer):
    r"""Stochastic gradient descent with optional momentum, dampening, Nesterov momentum and weight decay.

    Exactly ``torch.optim.SGD``:

    .. math::
        d_t = \pm g_t + \lambda p_{t-1}, \quad
        b_t = \begin{cases} d_t & \text{first momentum step} \\ \mu b_{t-1} + (1 - \tau) d_t \end{cases}, \quad
        p_t = p_{t-1} - \eta_t s \,(d_t + \mu b_t \text{ if Nesterov else } b_t)

    where :math:`s` is the element's ``lr_scale`` (1 without one) and :math:`\eta_t` the group's lr or schedule.
    """

    DEFAULTS = dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)
    STATE_SLOTS = tables.SGD_STATES
    COLUMNS = tables.SGD_COLUMNS
    KERNEL = "sgd_step"

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, *,
                 maximize=False, backend="auto", guard=None, **options):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize), backend=backend, guard=guard, **options)

    def validate_hyperparameters(self, group, where):
        super().validate_hyperparameters(group, where)
        self.check_number(group["momentum"], "momentum", where, low=0.0)
        self.check_number(group["dampening"], "dampening", where)
        self.check_flag(group["nesterov"], "nesterov", where)
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"{where}: Nesterov momentum requires a momentum > 0 and zero dampening")

    def state_names(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def counts_step(self, group):
        """SGD counts momentum steps: torch's SGD keeps no step, and fastopt needs to know the first momentum step
        (whose buffer starts as the gradient)."""
        return group["momentum"] != 0

    @staticmethod
    def group_row(group):
        return {name: float(group[name]) for name in tables.SGD_COLUMNS}

    @staticmethod
    def reference_step(param, grad, state, group, lr, lr_scale):
        reference.sgd(param, grad, state, lr=lr, momentum=group["momentum"], dampening=group["dampening"],
                      weight_decay=group["weight_decay"], nesterov=group["nesterov"], maximize=group["maximize"],
                      lr_scale=lr_scale)


class RMSprop(Optimizer):
    r"""RMSprop with optional centering, momentum and weight decay; exactly ``torch.optim.RMSprop``.

    .. math::
        d_t = \pm g_t + \lambda p_{t-1}, \quad v_t = \alpha v_{t-1} + (1 - \alpha) d_t^2, \quad
        a_t = \alpha a_{t-1} + (1 - \alpha) d_t \text{ (centered)} \\
        q_t = \sqrt{v_t - a_t^2 \text{ (centered) or } v_t} + \epsilon, \quad
        b_t = \mu b_{t-1} + d_t / q_t, \quad p_t = p_{t-1} - \eta_t s\, (b_t \text{ if } \mu > 0 \text{ else } d_t / q_t)

    Note that :math:`\epsilon` is added outside the square root, as in torch (TensorFlow adds it inside).
    """

    DEFAULTS = dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, maximize=False)
    STATE_SLOTS = tables.RMSPROP_STATES
    COLUMNS = tables.RMSPROP_COLUMNS
    KERNEL = "rmsprop_step"

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False, *,
                 maximize=False, backend="auto", guard=None, **options):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                                      centered=centered, maximize=maximize), backend=backend, guard=guard, **options)

    def validate_hyperparameters(self, group, where):
        super().validate_hyperparameters(group, where)
        self.check_number(group["alpha"], "alpha", where, low=0.0, high=1.0)
        self.check_number(group["eps"], "eps", where, low=0.0, low_open=True)
        self.check_number(group["momentum"], "momentum", where, low=0.0)
        self.check_flag(group["centered"], "centered", where)

    def state_names(self, group):
        return (("square_avg",) + (("momentum_buffer",) if group["momentum"] > 0 else ())
                + (("grad_avg",) if group["centered"] else ()))

    @staticmethod
    def group_row(group):
        return {name: float(group[name]) for name in tables.RMSPROP_COLUMNS}

    @staticmethod
    def reference_step(param, grad, state, group, lr, lr_scale):
        reference.rmsprop(param, grad, state, lr=lr, alpha=group["alpha"], eps=group["eps"],
                          weight_decay=group["weight_decay"], momentum=group["momentum"], centered=group["centered"],
                          maximize=group["maximize"], lr_scale=lr_scale)


class Adam(Optimizer):
    r"""Adam with optional AMSGrad and L2 weight decay added to the gradient; exactly ``torch.optim.Adam``.

    .. math::
        d_t = \pm g_t + \lambda p_{t-1}, \quad m_t = \beta_1 m_{t-1} + (1 - \beta_1) d_t, \quad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) d_t^2, \quad \hat v_t = \max(\hat v_{t-1}, v_t) \text{ (AMSGrad)} \\
        p_t = p_{t-1} - \frac{\eta_t s}{1 - \beta_1^t}\, \frac{m_t}{\sqrt{\hat v_t \text{ or } v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

    :math:`t` counts this param's steps (from 1); :math:`\eta_t` is the group's lr or its schedule at the
    optimizer's step count.
    """

    DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False)
    STATE_SLOTS = tables.ADAM_STATES
    COLUMNS = tables.ADAM_COLUMNS
    KERNEL = "adam_step"
    DECOUPLED_WEIGHT_DECAY = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, *,
                 maximize=False, backend="auto", guard=None, **options):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                                      maximize=maximize), backend=backend, guard=guard, **options)

    def validate_hyperparameters(self, group, where):
        super().validate_hyperparameters(group, where)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
        self.check_number(betas[0], "beta1 (betas[0])", where, low=0.0, high=1.0, high_open=True)
        self.check_number(betas[1], "beta2 (betas[1])", where, low=0.0, high=1.0, high_open=True)
        self.check_number(group["eps"], "eps", where, low=0.0, low_open=True)
        self.check_flag(group["amsgrad"], "amsgrad", where)

    def state_names(self, group):
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())

    @classmethod
    def group_row(cls, group):
        return dict(beta1=float(group["betas"][0]), beta2=float(group["betas"][1]), eps=float(group["eps"]),
                    weight_decay=float(group["weight_decay"]), amsgrad=float(group["amsgrad"]),
                    maximize=float(group["maximize"]), decoupled_weight_decay=float(cls.DECOUPLED_WEIGHT_DECAY))

    @classmethod
    def reference_step(cls, param, grad, state, group, lr, lr_scale):
        reference.adam(param, grad, state, lr=lr, betas=tuple(group["betas"]), eps=group["eps"],
                       weight_decay=group["weight_decay"], amsgrad=group["amsgrad"], maximize=group["maximize"],
                       decoupled_weight_decay=cls.DECOUPLED_WEIGHT_DECAY, lr_scale=lr_scale)


class AdamW(Adam):
    r"""Adam with decoupled weight decay (Loshchilov and Hutter); exactly ``torch.optim.AdamW``.

    As :class:`Adam`, except that the decay multiplies the param before the moments are updated,
    :math:`p \leftarrow (1 - \eta_t s \lambda)\, p`, and the gradient is left alone. Default ``weight_decay=1e-2``.
    """

    DEFAULTS = dict(Adam.DEFAULTS, weight_decay=1e-2)
    DECOUPLED_WEIGHT_DECAY = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, backend="auto", guard=None, **options):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, backend=backend, guard=guard, **options)
