"""fastopt's optimizers as ``torch.optim.Optimizer`` subclasses: torch's signature and ``defaults`` keys, and the rule.

Each class is torch's signature (its keywords and defaults, exactly those of ``torch.optim``'s class of the same
name, or of the package that defines the optimizer) over a fastopt rule (:mod:`fastopt.rules`), which follows that
implementation operation by operation: the results agree with it to float rounding. Beyond torch's keywords each
class takes the core's mixed-precision options (``master_weights``, ``state_dtype``, ``rounding``, ``seed``,
``max_grad_norm``).
"""
import numpy as np
import torch

from .. import rules as core, schedules
from .adapter import TorchOptimizer, _plain

__all__ = ["SGD", "RMSprop", "Adam", "AdamW", "Adagrad", "Lion", "AdamWScheduleFree", "SGDScheduleFree", "LAMB"]


class SGD(TorchOptimizer):
    """``torch.optim.SGD`` run by :class:`fastopt.SGD`. ``state[p]`` holds ``momentum_buffer`` from the param's
    first step with momentum on, as torch's does (no ``step``)."""

    CORE = core.SGD
    STEP_IN_STATE = False
    ARGUMENT_CHECKS = (("lr", "Invalid learning rate"), ("momentum", "Invalid momentum value"),
                       ("weight_decay", "Invalid weight_decay value"))
    OLDER_CHECKPOINT_DEFAULTS = dict(nesterov=False, maximize=False, foreach=None, differentiable=False, fused=False)

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, **options):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, maximize=maximize, foreach=foreach,
                                      differentiable=differentiable, fused=fused), options)

    @classmethod
    def _check_arguments(cls, defaults):
        super()._check_arguments(defaults)
        if defaults["nesterov"] and (defaults["momentum"] <= 0 or defaults["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")


class RMSprop(TorchOptimizer):
    """``torch.optim.RMSprop`` run by :class:`fastopt.RMSprop`; ``state[p]`` holds ``step``, ``square_avg`` and,
    as the group asks, ``momentum_buffer`` and ``grad_avg``."""

    CORE = core.RMSprop
    ARGUMENT_CHECKS = (("lr", "Invalid learning rate"), ("eps", "Invalid epsilon value"),
                       ("momentum", "Invalid momentum value"), ("weight_decay", "Invalid weight_decay value"),
                       ("alpha", "Invalid alpha value"))
    OLDER_CHECKPOINT_DEFAULTS = dict(momentum=0, centered=False, foreach=None, maximize=False, differentiable=False,
                                     capturable=False)

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False,
                 capturable=False, foreach=None, maximize=False, differentiable=False, **options):
        super().__init__(params, dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
                                      weight_decay=weight_decay, capturable=capturable, foreach=foreach,
                                      maximize=maximize, differentiable=differentiable), options)


class Adam(TorchOptimizer):
    """``torch.optim.Adam`` run by :class:`fastopt.Adam` (by :class:`fastopt.AdamW` where
    ``decoupled_weight_decay=True``, which must then hold in every group); ``state[p]`` holds ``step``,
    ``exp_avg``, ``exp_avg_sq`` and, with AMSGrad, ``max_exp_avg_sq``."""

    CORE = core.Adam
    ARGUMENT_CHECKS = (("lr", "Invalid learning rate"), ("eps", "Invalid epsilon value"), ("betas", None),
                       ("weight_decay", "Invalid weight_decay value"))
    OLDER_CHECKPOINT_DEFAULTS = dict(amsgrad=False, maximize=False, foreach=None, capturable=False,
                                     differentiable=False, decoupled_weight_decay=False, fused=None)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, **options):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                                      maximize=maximize, foreach=foreach, capturable=capturable,
                                      differentiable=differentiable, fused=fused,
                                      decoupled_weight_decay=decoupled_weight_decay), options)

    @classmethod
    def _check_arguments(cls, defaults):
        """torch's Adam's checks: its tensor ``lr`` and ``betas`` rules besides the ranges (a tensor where torch
        refuses one with ``foreach=True`` is refused too, so that what runs with fastopt runs with torch)."""
        foreach_without_capture = defaults["foreach"] and not defaults["capturable"]
        if isinstance(defaults["lr"], torch.Tensor) and foreach_without_capture:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        super()._check_arguments(defaults)
        betas = defaults["betas"]
        if not (all(isinstance(beta, float) for beta in betas) or all(torch.is_tensor(beta) for beta in betas)):
            raise ValueError("betas must be either both floats or both Tensors")
        for index, beta in enumerate(betas):
            if torch.is_tensor(beta):
                if foreach_without_capture:
                    raise ValueError(f"betas[{index}] as a Tensor is not supported for capturable=False and "
                                     "foreach=True")
                if beta.numel() != 1:
                    raise ValueError(f"Tensor betas[{index}] must be 1-element")

    def _core_class(self):
        decoupled = {bool(group["decoupled_weight_decay"]) for group in self.param_groups}
        if len(decoupled) > 1:
            raise ValueError(f"{type(self).__name__}: decoupled_weight_decay differs between param groups; "
                             "fastopt needs one value for the whole optimizer")
        return core.AdamW if decoupled == {True} else core.Adam


class AdamW(Adam):
    """``torch.optim.AdamW`` run by :class:`fastopt.AdamW` (default ``weight_decay=1e-2``)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None, **options):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, **options)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # as torch's AdamW: loading any state keeps the decay decoupled
            group["decoupled_weight_decay"] = True


class Adagrad(TorchOptimizer):
    """``torch.optim.Adagrad`` run by :class:`fastopt.Adagrad`; ``state[p]`` holds ``step`` and ``sum`` from the
    optimizer's construction on, as torch's does."""

    CORE = core.Adagrad
    EAGER_STATE = True
    ARGUMENT_CHECKS = (("lr", "Invalid learning rate"), ("lr_decay", "Invalid lr_decay value"),
                       ("weight_decay", "Invalid weight_decay value"),
                       ("initial_accumulator_value", "Invalid initial_accumulator_value value"),
                       ("eps", "Invalid epsilon value"))
    OLDER_CHECKPOINT_DEFAULTS = dict(foreach=None, maximize=False, differentiable=False, fused=None)

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10,
                 foreach=None, *, maximize=False, differentiable=False, fused=None, **options):
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value, foreach=foreach,
                                      maximize=maximize, differentiable=differentiable, fused=fused), options)


class Lion(TorchOptimizer):
    """The ``lion-pytorch`` package's ``Lion`` (its default, rate-scaled weight decay) run by :class:`fastopt.Lion`,
    plus torch's ``maximize``; ``state[p]`` holds ``exp_avg`` (no ``step``, as lion-pytorch's)."""

    CORE = core.Lion
    STEP_IN_STATE = False
    OLDER_CHECKPOINT_DEFAULTS = dict(maximize=False)  # fastopt's addition to lion-pytorch's keywords

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False, **options):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, maximize=maximize), options)


class _ScheduleFree(TorchOptimizer):
    """What the ``schedulefree`` package's ``AdamWScheduleFree`` and ``SGDScheduleFree`` share, run by fastopt's
    (:class:`fastopt.AdamWScheduleFree`): ``train()`` and ``eval()`` (one fused pass each), the package's group keys
    and ``state[p]`` (``z``, and ``exp_avg_sq`` for AdamW; no ``step``), so checkpoints load both ways.

    The package keeps ``k``, ``weight_sum`` and ``lr_max`` per group, on the host; fastopt keeps them per param and
    advances them in the kernel (a CUDA step reads nothing from the host). :meth:`state_dict` writes each group's
    values (those of its param with the most steps: every param's, when each gets a grad at every step, which is the
    package's assumption) into the saved groups with ``train_mode`` and ``scheduled_lr``, and a checkpoint's group
    values become its params'. A new optimizer starts in train mode (the package's starts in eval mode and needs
    ``train()`` first; calling it is harmless)."""

    STEP_IN_STATE = False
    OLDER_CHECKPOINT_DEFAULTS = dict(maximize=False)  # fastopt's addition to the package's keywords

    def _core_entry(self, entry, group):
        """A param with ``z`` has taken the group's ``k`` steps (the package's count), at its weight sum and lr_max."""
        if "z" in entry and "k" in group:
            entry = dict(entry, step=int(group["k"]), weight_sum=float(group["weight_sum"]),
                         lr_max=max(float(group["lr_max"]), 0.0))  # the package starts lr_max at -1
        return entry

    _loading = False  # load_state_dict in progress: the groups hold the checkpoint's values, not stale ones

    def _rebuild(self, step_count):
        if self._core is not None and not self._loading:
            self._refresh_group_values()  # the new core takes its params' counts from the groups
        super()._rebuild(step_count)
        self._core.train_mode = bool(self.param_groups[0].get("train_mode", True))

    def _refresh_group_values(self):
        """Write the package's per-group values into ``param_groups`` from the core's per-param ones: ``k``,
        ``weight_sum``, ``lr_max`` (of the group's param with the most steps), ``scheduled_lr`` and ``train_mode``."""
        steps, scalars = self._core.step_counts(), self._core.running_scalars()
        position = 0
        for group in self.param_groups:
            count = len(group["params"])
            group["train_mode"] = self._core.train_mode
            if count and steps[position:position + count].max() > 0:
                latest = position + int(np.argmax(steps[position:position + count]))
                group.update(k=int(steps[latest]), weight_sum=float(scalars["weight_sum"][latest]),
                             lr_max=float(scalars["lr_max"][latest]))
                lr, warmup = float(schedules.as_schedule(_plain(group["lr"]))(0)), group["warmup_steps"]
                group["scheduled_lr"] = lr * min(1.0, group["k"] / warmup) if warmup else lr
            position += count

    def load_state_dict(self, state_dict):
        self._loading = True
        try:
            super().load_state_dict(state_dict)
        finally:
            self._loading = False

    def __getstate__(self):
        if self._core is not None:
            self._refresh_group_values()
        return super().__getstate__()

    def train(self):
        """Move the params back to where gradients are taken (a no-op in train mode), as the package's ``train()``."""
        self._switch(train=True)

    def eval(self):
        """Move the params to the average to evaluate (a no-op in eval mode), as the package's ``eval()``."""
        self._switch(train=False)

    @torch.no_grad()
    def _switch(self, train):
        if self._params_changed():
            self._rebuild(self._step_count())
        self._sync_groups()
        with self._views.stream():
            if train:
                self._core.train()
            else:
                self._core.eval()
        for group in self.param_groups:
            group["train_mode"] = train

    def state_dict(self):
        """torch's ``state_dict``, with the package's group values brought up to date first."""
        self._refresh_group_values()
        return super().state_dict()


class AdamWScheduleFree(_ScheduleFree):
    """The ``schedulefree`` package's ``AdamWScheduleFree`` run by :class:`fastopt.AdamWScheduleFree`;
    ``state[p]`` holds ``z`` and ``exp_avg_sq``. See :class:`_ScheduleFree` for train/eval and checkpoints."""

    CORE = core.AdamWScheduleFree
    ARGUMENT_CHECKS = (("lr", "Invalid learning rate"), ("eps", "Invalid epsilon value"), ("betas", None),
                       ("weight_decay", "Invalid weight_decay value"))

    def __init__(self, params, lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, warmup_steps=0, r=0.0,
                 weight_lr_power=2.0, foreach=None, *, maximize=False, **options):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, r=r, k=0, warmup_steps=warmup_steps,
                                      train_mode=True, weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0,
                                      weight_lr_power=weight_lr_power, weight_decay=weight_decay, foreach=foreach,
                                      maximize=maximize), options)


class SGDScheduleFree(_ScheduleFree):
    """The ``schedulefree`` package's ``SGDScheduleFree`` run by :class:`fastopt.SGDScheduleFree`; ``state[p]``
    holds ``z``. See :class:`_ScheduleFree` for train/eval and checkpoints."""

    CORE = core.SGDScheduleFree
    ARGUMENT_CHECKS = (("lr", "Invalid learning rate"), ("weight_decay", "Invalid weight_decay value"))

    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0, warmup_steps=0, r=0.0, weight_lr_power=2,
                 foreach=None, *, maximize=False, **options):
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"Momentum must be between 0 and 1 exclusive: {momentum}")  # the package's check
        super().__init__(params, dict(lr=lr, momentum=momentum, r=r, k=0, warmup_steps=warmup_steps,
                                      train_mode=True, weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0,
                                      weight_lr_power=weight_lr_power, weight_decay=weight_decay, foreach=foreach,
                                      maximize=maximize), options)


class LAMB(TorchOptimizer):
    """LAMB run by :class:`fastopt.LAMB` (no torch.optim class exists; this is the rule as documented there: the
    paper's, with the trust ratio clamped to ``max_trust_ratio``); ``state[p]`` holds ``step``, ``exp_avg`` and
    ``exp_avg_sq``, named as torch's Adam names them."""

    CORE = core.LAMB
    ARGUMENT_CHECKS = (("lr", "Invalid learning rate"), ("eps", "Invalid epsilon value"), ("betas", None),
                       ("weight_decay", "Invalid weight_decay value"))

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, *, bias_correction=True,
                 max_trust_ratio=10.0, maximize=False, **options):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      bias_correction=bias_correction, max_trust_ratio=max_trust_ratio,
                                      maximize=maximize), options)
