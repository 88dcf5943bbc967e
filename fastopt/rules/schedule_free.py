"""Schedule-free AdamW and SGD: the rules (kernels: kernels/cpu/rules/schedule_free.py,
kernels/cuda/rules/schedule_free.cuh)."""
import numpy as np

from .. import schedules
from ..optimizer import PARAM_VALUE, Optimizer


def _schedule_free(param, grad, state, *, lr, beta1, beta2, eps, weight_decay, warmup_steps, r, weight_lr_power,
                   maximize, lr_scale):
    """One tensor's schedule-free step in float64; ``beta2`` None: SGD (no second moment)."""
    step = state["step"] = state.get("step", 0) + 1
    rate = lr * (step / warmup_steps) if step - 1 < warmup_steps else lr
    lr_max = state["lr_max"] = max(rate, state.get("lr_max", 0.0))
    weight = step ** r * lr_max ** weight_lr_power
    weight_sum = state["weight_sum"] = state.get("weight_sum", 0.0) + weight
    average_weight = weight / weight_sum if weight_sum != 0 else 0.0
    z = state["z"] if "z" in state else param.copy()
    direction = -grad if maximize else grad
    if beta2 is not None:
        v = state["exp_avg_sq"] = beta2 * state.get("exp_avg_sq", 0.0) + (1 - beta2) * direction * direction
        direction = direction / (np.sqrt(v / (1 - beta2 ** step)) + eps)
    direction = direction + weight_decay * param
    rate = rate * lr_scale
    param += average_weight * (z - param) + rate * (beta1 * (1 - average_weight) - 1) * direction
    state["z"] = z - rate * direction


def adamw_schedule_free(param, grad, state, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0,
                        r=0.0, weight_lr_power=2.0, maximize=False, lr_scale=1.0):
    r"""The float64 reference of one tensor's step, as the ``schedulefree`` package's ``AdamWScheduleFree``
    (``state`` holds ``z``, ``exp_avg_sq``, ``step``, ``lr_max`` and ``weight_sum``; a missing ``z`` starts as the
    param).

    .. math::
        \eta_t = \eta \min(1, t / T_w), \quad \eta_{\max} = \max(\eta_{\max}, \eta_t), \quad
        w_t = t^r \eta_{\max}^{\kappa}, \quad W = W + w_t, \quad c = w_t / W \\
        v = \beta_2 v + (1 - \beta_2) g^2, \quad d = \frac{g}{\sqrt{v / (1 - \beta_2^t)} + \epsilon} + \lambda y \\
        y = (1 - c)\, y + c\, z + \eta_t s\, (\beta_1 (1 - c) - 1)\, d, \qquad z = z - \eta_t s\, d
    """
    _schedule_free(param, grad, state, lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay,
                   warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power, maximize=maximize,
                   lr_scale=lr_scale)


def sgd_schedule_free(param, grad, state, *, lr, momentum=0.9, weight_decay=0.0, warmup_steps=0, r=0.0,
                      weight_lr_power=2.0, maximize=False, lr_scale=1.0):
    r"""The float64 reference of one tensor's step, as the ``schedulefree`` package's ``SGDScheduleFree``: as
    :func:`adamw_schedule_free` with :math:`d = g + \lambda y` and :math:`\beta_1` the momentum."""
    _schedule_free(param, grad, state, lr=lr, beta1=momentum, beta2=None, eps=0.0, weight_decay=weight_decay,
                   warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power, maximize=maximize,
                   lr_scale=lr_scale)


class ScheduleFree(Optimizer):
    r"""What schedule-free AdamW and SGD share (Defazio et al. 2024, "The Road Less Scheduled").

    The params hold :math:`y`, the point where gradients are taken, between the fast iterate :math:`z` (state ``z``)
    and their weighted average :math:`x`, which is the point to evaluate: :math:`y = (1 - \beta) z + \beta x`. There
    is no decay schedule and no stopping time to choose; only a linear warmup, through ``warmup_steps`` (an ``lr``
    schedule is refused). The average weights each step by :math:`t^r \eta_{\max}^{\kappa}` (``r``,
    ``weight_lr_power``), where :math:`\eta_{\max}` is the largest warmed-up rate so far.

    :meth:`eval` moves the params to :math:`x` (evaluate, checkpoint) and :meth:`train` back to :math:`y`, each one
    fused pass; a second call of either does nothing, and :meth:`step` in eval mode raises RuntimeError, as in the
    ``schedulefree`` package. Unlike the package's, a new optimizer starts in train mode (the package starts in eval
    mode and requires ``train()`` before the first step; calling it here is harmless).

    The running values the package keeps per group on the host (``k``, ``lr_max``, ``weight_sum``) are kept per param
    here (``step``, ``lr_max``, ``weight_sum``: a param without a grad does not step, as in every fastopt optimizer)
    and advanced by the kernel with the step counts, so a CUDA step needs nothing from the host and can be captured
    in a graph. They are equal to the package's whenever every param gets a grad at every step.
    """

    SCALARS = ("weight_sum", "lr_max")

    def __init__(self, params, defaults, **options):
        super().__init__(params, defaults, **options)
        self.train_mode = True

    @classmethod
    def validate_hyperparameters(cls, group, where):
        super().validate_hyperparameters(group, where)
        if isinstance(group["lr"], schedules.Schedule) and not isinstance(group["lr"], schedules.Constant):
            raise ValueError(f"{where}: {cls.__name__} takes no lr schedule ({type(group['lr']).__name__}): its average "
                             "of iterates stands in for the decay; warm up with warmup_steps")
        warmup = group["warmup_steps"]
        if isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)) or warmup < 0:
            raise ValueError(f"{where}: invalid warmup_steps {warmup!r}; need an integer >= 0")
        cls.check_number(group["r"], "r", where)
        cls.check_number(group["weight_lr_power"], "weight_lr_power", where, low=0.0)

    @classmethod
    def initial_state(cls, name, group):
        """``z`` starts as the param (the package's clone); ``exp_avg_sq`` at 0."""
        return PARAM_VALUE if name == "z" else 0.0

    @classmethod
    def averaging_momentum(cls, group):
        """The group's :math:`\\beta` of :math:`y = (1 - \\beta) z + \\beta x`."""
        raise NotImplementedError

    def eval(self):
        """Move the params to the average :math:`x` (``p = lerp(p, z, 1 - 1/beta)``), once: a no-op in eval mode."""
        if self.train_mode:
            self._blend_toward_state("z", lambda group: 1.0 - 1.0 / self.averaging_momentum(group))
            self.train_mode = False

    def train(self):
        """Move the params back to :math:`y` (``p = lerp(p, z, 1 - beta)``), once: a no-op in train mode."""
        if not self.train_mode:
            self._blend_toward_state("z", lambda group: 1.0 - self.averaging_momentum(group))
            self.train_mode = True

    def step(self, grads, grad_scale=None):
        if not self.train_mode:
            raise RuntimeError(f"{type(self).__name__}.step was called in eval mode: call .train() before training "
                               "steps and .eval() before evaluating (as with the schedulefree package)")
        super().step(grads, grad_scale)

    def state_dict(self):
        """As :meth:`Optimizer.state_dict`, plus ``train_mode`` (whether the params hold :math:`y` or :math:`x`)."""
        return dict(super().state_dict(), train_mode=self.train_mode)

    def load_state_dict(self, state_dict):
        """As :meth:`Optimizer.load_state_dict`; the params are not moved: a checkpoint saved in eval mode loads in
        eval mode (load the params it was saved with)."""
        train_mode = state_dict.get("train_mode", True)
        self.check_flag(train_mode, "train_mode", "state dict")
        super().load_state_dict(state_dict)
        self.train_mode = bool(train_mode)


class AdamWScheduleFree(ScheduleFree):
    r"""Schedule-free AdamW; the ``schedulefree`` package's ``AdamWScheduleFree``, fused (one pass per step reading
    p, g, z, v and writing p, z, v, where the package makes about nine passes).

    .. math::
        \eta_t = \eta \min(1, t / T_w), \quad w_t = t^r \eta_{\max}^{\kappa}, \quad c_t = w_t / \textstyle\sum_{i \le t} w_i \\
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \quad d_t = \frac{g_t}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}
            + \lambda y_{t-1} \\
        y_t = (1 - c_t)\, y_{t-1} + c_t z_{t-1} + \eta_t s\, (\beta_1 (1 - c_t) - 1)\, d_t, \qquad
        z_t = z_{t-1} - \eta_t s\, d_t

    The state is ``z`` and ``exp_avg_sq`` (and ``step``, ``lr_max``, ``weight_sum``); :meth:`eval` and :meth:`train`
    use :math:`\beta = \beta_1` (so ``beta1`` must be positive).
    """

    KERNEL = "schedule_free"
    DEFAULTS = dict(lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0, r=0.0,
                    weight_lr_power=2.0, maximize=False)
    # The kernel is SGDScheduleFree's too: the second moment is its optional slot, live in every AdamW group.
    STATE_SLOTS = ("z", "exp_avg_sq")
    OPTIONAL_STATES = ("exp_avg_sq",)
    COLUMNS = ("beta1", "beta2", "eps", "weight_decay", "warmup_steps", "r", "weight_lr_power")
    REFERENCE = staticmethod(adamw_schedule_free)

    def __init__(self, params, lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0, r=0.0,
                 weight_lr_power=2.0, *, maximize=False, backend="auto", guard=None, **options):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                                      maximize=maximize), backend=backend, guard=guard, **options)

    @classmethod
    def validate_hyperparameters(cls, group, where):
        super().validate_hyperparameters(group, where)
        cls.check_betas(group["betas"], where)
        cls.check_number(group["betas"][0], "beta1 (betas[0])", where, low=0.0, low_open=True)  # eval() divides by it
        cls.check_number(group["eps"], "eps", where, low=0.0)

    @classmethod
    def state_names(cls, group):
        return cls.STATE_SLOTS

    @classmethod
    def averaging_momentum(cls, group):
        return float(group["betas"][0])


class SGDScheduleFree(ScheduleFree):
    r"""Schedule-free SGD; the ``schedulefree`` package's ``SGDScheduleFree``, fused (one pass per step reading p, g,
    z and writing p, z). As :class:`AdamWScheduleFree` with :math:`d_t = g_t + \lambda y_{t-1}` and
    :math:`\beta_1` the ``momentum`` (in (0, 1)); the state is ``z``.
    """

    KERNEL = "schedule_free"
    DEFAULTS = dict(lr=1.0, momentum=0.9, weight_decay=0.0, warmup_steps=0, r=0.0, weight_lr_power=2.0,
                    maximize=False)
    STATE_SLOTS = ("z", "exp_avg_sq")
    OPTIONAL_STATES = ("exp_avg_sq",)
    COLUMNS = AdamWScheduleFree.COLUMNS
    REFERENCE = staticmethod(sgd_schedule_free)

    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0.0, warmup_steps=0, r=0.0, weight_lr_power=2.0, *,
                 maximize=False, backend="auto", guard=None, **options):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, warmup_steps=warmup_steps,
                                      r=r, weight_lr_power=weight_lr_power, maximize=maximize), backend=backend,
                         guard=guard, **options)

    @classmethod
    def validate_hyperparameters(cls, group, where):
        super().validate_hyperparameters(group, where)
        cls.check_number(group["momentum"], "momentum", where, low=0.0, high=1.0, low_open=True, high_open=True)

    @classmethod
    def group_row(cls, group):
        """The kernel's columns: ``momentum`` is beta1; no second moment (its slot is not live)."""
        return dict(beta1=float(group["momentum"]), beta2=0.0, eps=0.0, weight_decay=float(group["weight_decay"]),
                    warmup_steps=float(group["warmup_steps"]), r=float(group["r"]),
                    weight_lr_power=float(group["weight_lr_power"]))

    @classmethod
    def averaging_momentum(cls, group):
        return float(group["momentum"])
