"""The learning-rate range test: sweep the rate upwards for a few steps, watch the loss, put everything back.

    result = fo.lr_find(opt, step_fn)        # step_fn() -> (loss, grads) for a fresh batch
    print(result.suggestion, result.suggestion_min10)
    result.plot("lr-find.png")

It follows Smith, "Cyclical learning rates for training neural networks" (2017), and fastai's ``lr_find``:
the loss falls once the rate is large enough to make progress and blows up once it is too large; a good rate
sits where the loss falls fastest, or about a tenth of the rate at the loss minimum.
"""
import copy
import math
import numbers
from dataclasses import dataclass

import numpy as np

from .optimizer import Optimizer

__all__ = ["lr_find", "LRFinderResult"]


@dataclass
class LRFinderResult:
    """What a range test saw: one entry per step taken, in order.

    ``lrs`` are the rates applied (of the group with the largest rate, see :func:`lr_find`), ``losses`` the
    raw losses ``step_fn`` returned at them and ``smoothed`` their bias-corrected moving average.

    ``suggestion`` is the rate where the smoothed loss falls fastest: the most negative central difference
    ``(smoothed[i+1] - smoothed[i-1]) / (x[i+1] - x[i-1])``, with ``x = log10(lr)`` in ``"exp"`` mode and
    ``x = lr`` in ``"linear"`` mode (there the rates are evenly spaced in lr, so this is the step where the loss
    fell fastest, as in exp mode). Only rates with a recorded point on each side count, after the first
    ``0.5 / smooth`` points (where the average is still the mean of a few noisy losses) where possible and
    before the minimum of the smoothed loss; so the suggestion is never the first or the last rate tried, and
    None when no rate qualifies. ``suggestion_min10`` is the rate at that minimum divided by 10, raised to the
    first rate tried when it falls below it. Both lie within the rates tried, ``lrs[0]..lrs[-1]``, and both
    are None when the smoothed loss never falls below its first value.

    ``warning`` is None when the sweep can be trusted, else it says what is wrong, one clause per problem
    joined by "; ": the loss never fell (no suggestion); the sweep is too short to judge (the smoothed loss was
    lowest within the first ``0.5 / smooth + 5`` points, before the average settled and showed a descent); the
    loss never diverged (the sweep ended without blowing up, so the best rate may lie above ``lrs[-1]`` and the
    suggestions are lower bounds at best); or the minimum / 10 was raised to the first rate tried.
    ``stopped_early`` says whether the sweep stopped before ``num_steps`` (divergence, a non-finite loss, or
    a step the optimizer's guard skipped); ``stop_reason`` says why. ``optimizer`` is the optimizer's class
    name, for the plot's title.
    """

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    mode: str
    suggestion: float | None
    suggestion_min10: float | None
    stopped_early: bool
    stop_reason: str
    warning: str | None = None
    optimizer: str = ""

    def plot(self, path, model=None):
        """Write the loss-against-lr curve (raw and smoothed, suggestions marked) to ``path`` as a PNG; the title
        names the optimizer and ``model`` (a few words, such as ``"the digits MLP"``) when given."""
        from .plotting import plot_lr_find  # matplotlib only when asked for a picture

        return plot_lr_find(self, path, model=model)


def sweep_rates(start_lr, end_lr, num_steps, mode):
    """The ``num_steps`` rates from ``start_lr`` to ``end_lr``, evenly spaced in log lr (exp) or in lr (linear)."""
    if mode == "exp":
        return start_lr * (end_lr / start_lr) ** (np.arange(num_steps) / (num_steps - 1))
    return np.linspace(start_lr, end_lr, num_steps)


def smooth_losses(losses, smooth):
    """Exponential moving average with weight ``smooth`` on the newest loss, bias-corrected as Adam's moments
    are, so the first values are not pulled towards 0."""
    average, smoothed = 0.0, []
    for count, loss in enumerate(losses, start=1):
        average = (1.0 - smooth) * average + smooth * loss
        smoothed.append(average / (1.0 - (1.0 - smooth) ** count))
    return np.array(smoothed)


def settle_points(smooth):
    """How many points the moving average needs before its differences are more than noise: ``0.5 / smooth``."""
    return int(round(0.5 / smooth))


# Points past settle_points a descent needs before its steepest part can be told from noise.
MIN_DESCENT_POINTS = 5


def loss_fell(smoothed):
    """Whether the smoothed loss ever fell below its first value by more than rounding."""
    return len(smoothed) > 1 and smoothed.min() < smoothed[0] - 1e-9 * abs(smoothed[0])


def suggestions(lrs, smoothed, mode, smooth):
    """(steepest-descent rate, minimum rate / 10) of a smoothed curve; see :class:`LRFinderResult`."""
    if not loss_fell(smoothed):
        return None, None
    lowest = int(np.argmin(smoothed))
    # Only the descent counts: past the minimum the curve rises, and the fall after a spike is not progress.
    # Its first settle_points are skipped where it is long enough: there the average is still the mean of a few
    # noisy losses. Central differences only: one-sided ones at the ends made the first or the last rate tried
    # the suggestion, though neither has points on both sides.
    first = max(1, min(settle_points(smooth), lowest - 1))
    x = np.log10(lrs) if mode == "exp" else lrs
    candidates = np.arange(first, lowest)
    steepest = None
    if candidates.size:
        slope = (smoothed[candidates + 1] - smoothed[candidates - 1]) / (x[candidates + 1] - x[candidates - 1])
        steepest = float(lrs[candidates[np.argmin(slope)]])
    return steepest, float(max(lrs[lowest] / 10.0, lrs[0]))


def sweep_warning(lrs, smoothed, smooth, diverged, diverge_factor):
    """What makes a sweep's suggestions untrustworthy, one clause per problem, or None; see
    :class:`LRFinderResult`."""
    if not loss_fell(smoothed):
        return ("the loss never fell: no suggestion. If it only rose, start lower; if it stayed flat, sweep "
                "higher rates or check that the model learns")
    problems = []
    lowest = int(np.argmin(smoothed))
    needed = settle_points(smooth) + MIN_DESCENT_POINTS
    if lowest < needed:
        problems.append(f"the sweep is too short to judge: the smoothed loss was lowest at rate {lowest + 1} of "
                        f"{len(lrs)} ({lrs[lowest]:.3g}), and a descent needs {needed} or more; use more steps, "
                        f"or a narrower range around {lrs[lowest]:.3g}")
    if not diverged:
        problems.append(f"the loss never diverged (the smoothed loss stayed under {diverge_factor:g} x its "
                        f"minimum up to {lrs[-1]:.3g}), so the sweep did not show where the rate gets too large: "
                        "the suggestions are lower bounds at best")
    if lrs[lowest] / 10.0 < lrs[0]:
        problems.append(f"minimum / 10 ({lrs[lowest] / 10.0:.3g}) is below the rates tried: raised to the "
                        f"first, {lrs[0]:.3g}; start lower")
    return "; ".join(problems) or None


# ---------------------------------------------------------------- the two kinds of optimizer
class _FastoptSweep:
    """Drives a :class:`fastopt.Optimizer`: ``step_fn() -> (loss, grads)``, then ``opt.step(grads)``."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        # .copy() and [...] = work alike on NumPy and CuPy arrays, so GPU params need no special case.
        self.params = [param.copy() for param in optimizer.params]
        self.state_dict = optimizer.state_dict()  # buffers copied to host; groups' values kept by reference
        self.last_grad_norm = optimizer.last_grad_norm
        self.base_lrs = optimizer.current_lr()
        guard = optimizer.guard
        self.skipped = guard.skipped_steps if guard is not None else 0
        if guard is not None:
            guard.lr_factor = 1.0  # the recorded rates are the rates applied; the saved factor comes back after

    def set_lr(self, lrs):
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr

    def step(self, step_fn):
        """One step; returns (loss, whether the guard skipped it)."""
        loss, grads = step_fn()
        self.optimizer.step(grads)
        guard = self.optimizer.guard
        skipped = guard is not None and guard.skipped_steps != self.skipped
        return loss, skipped

    def restore(self):
        optimizer = self.optimizer
        # Buffers, per-tensor step counts, step_count, the guard and every group's values (the same lr objects).
        optimizer.load_state_dict(self.state_dict)
        for param, saved in zip(optimizer.params, self.params):
            param[...] = saved
        optimizer.last_grad_norm = self.last_grad_norm


class _TorchSweep:
    """Drives a ``torch.optim.Optimizer`` (duck-typed): ``opt.zero_grad()``, ``step_fn() -> loss`` (forward and
    backward), then ``opt.step()``."""

    def __init__(self, optimizer):
        import torch

        self.torch = torch
        self.optimizer = optimizer
        self.params = [param for group in optimizer.param_groups for param in group["params"]]
        self.values = [param.detach().clone() for param in self.params]
        self.grads = [None if param.grad is None else param.grad.detach().clone() for param in self.params]
        self.state_dict = copy.deepcopy(optimizer.state_dict())
        # fastopt.torch's optimizers take fastopt schedules as lr and say what rate they give now.
        current_lr = getattr(optimizer, "current_lr", None)
        self.base_lrs = current_lr() if current_lr else [float(group["lr"]) for group in optimizer.param_groups]

    def set_lr(self, lrs):
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr

    def step(self, step_fn):
        self.optimizer.zero_grad()
        loss = step_fn()
        self.optimizer.step()
        return (loss.detach() if hasattr(loss, "detach") else loss), False

    def restore(self):
        self.optimizer.load_state_dict(self.state_dict)
        with self.torch.no_grad():
            for param, value, grad in zip(self.params, self.values, self.grads):
                param.copy_(value)
                param.grad = grad


def _check(start_lr, end_lr, num_steps, mode, smooth, diverge_factor):
    if mode not in ("exp", "linear"):
        raise ValueError(f"lr_find: mode must be 'exp' or 'linear', got {mode!r}")
    for name, value in (("start_lr", start_lr), ("end_lr", end_lr), ("diverge_factor", diverge_factor)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"lr_find: {name} must be a finite number > 0, got {value!r}")
    if end_lr <= start_lr:
        raise ValueError(f"lr_find: end_lr ({end_lr}) must be greater than start_lr ({start_lr})")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"lr_find: num_steps must be an int >= 2, got {num_steps!r}")
    if isinstance(smooth, bool) or not isinstance(smooth, numbers.Real) or not 0.0 < smooth <= 1.0:
        raise ValueError(f"lr_find: smooth must be in (0, 1], got {smooth!r}")


def lr_find(opt, step_fn, start_lr=1e-7, end_lr=10.0, num_steps=100, mode="exp", smooth=0.05, diverge_factor=4.0):
    """Run the learning-rate range test on ``opt`` and put params and optimizer back exactly as they were.

    The rate goes from ``start_lr`` to ``end_lr`` over ``num_steps`` steps, geometrically (``mode="exp"``) or
    linearly (``"linear"``). Each step calls ``step_fn`` once, which must use a new batch:

    - a :class:`fastopt.Optimizer`: ``step_fn()`` returns ``(loss, grads)`` for the current params, and the
      finder calls ``opt.step(grads)``;
    - a ``torch.optim.Optimizer`` (anything with torch's ``param_groups``, ``zero_grad``, ``step()``,
      ``state_dict`` and ``load_state_dict``, such as ``fastopt.torch``'s optimizers): the finder calls
      ``opt.zero_grad()``, then ``step_fn()``, which runs forward and backward and returns the loss, then
      ``opt.step()``.

    With several param groups the groups keep their ratios: the group with the largest current rate gets the
    swept rate and every other group the same multiple of it as now (a frozen group at lr 0 stays frozen), so
    ``lrs`` and the suggestions are rates for that largest group. The loss is smoothed by an exponential moving
    average (weight ``smooth`` on the newest loss, bias-corrected). The sweep stops early when the smoothed loss
    exceeds ``diverge_factor`` times its lowest value (the loss must be positive, as a training loss is), when a
    loss is not finite (that step is not recorded), or when the optimizer's :class:`fastopt.Guard` skips a step
    for non-finite grads. During the sweep a guard's back-off factor is held at 1, so the recorded rates are the
    rates applied.

    Afterwards, also when ``step_fn`` raises, params and the optimizer are restored exactly: param values,
    state buffers, per-param and global step counts, every group's hyperparameters (the same lr objects,
    schedules included), the guard's counters and factor (torch: the state dict, the params and their ``.grad``).
    For that the finder holds a copy of the params and of the optimizer's state (on the host for fastopt's
    buffers) during the sweep. ``step_fn``'s own state (a data iterator, a random generator) is not restored.

    Returns a :class:`LRFinderResult`; its ``warning`` says when the sweep was too short, or never showed the loss
    falling or blowing up, to back its suggestions.
    """
    _check(start_lr, end_lr, num_steps, mode, smooth, diverge_factor)
    sweep = _FastoptSweep(opt) if isinstance(opt, Optimizer) else _TorchSweep(opt)
    top = max(sweep.base_lrs)
    ratios = [lr / top if top > 0 else 1.0 for lr in sweep.base_lrs]
    lrs, losses, reason, diverged = [], [], "completed the sweep", True
    average, best = 0.0, math.inf
    try:
        for lr in sweep_rates(float(start_lr), float(end_lr), num_steps, mode):
            sweep.set_lr([float(lr) * ratio for ratio in ratios])
            loss, skipped = sweep.step(step_fn)
            loss = float(loss)
            if skipped:
                reason = f"the guard skipped a step with non-finite grads at lr {lr:.3g}"
                break
            if not math.isfinite(loss):
                reason = f"the loss was {loss} at lr {lr:.3g}"
                break
            lrs.append(float(lr))
            losses.append(loss)
            average = (1.0 - smooth) * average + smooth * loss  # as smooth_losses, one step at a time
            current = average / (1.0 - (1.0 - smooth) ** len(losses))
            best = min(best, current)
            if current > diverge_factor * best:
                reason = f"the smoothed loss passed {diverge_factor:g} x its minimum at lr {lr:.3g}"
                break
        else:  # no break: the loss never blew up
            diverged = False
    finally:
        sweep.restore()
    lrs, losses = np.array(lrs), np.array(losses)
    smoothed = smooth_losses(losses, smooth)
    suggestion, suggestion_min10 = suggestions(lrs, smoothed, mode, smooth)
    return LRFinderResult(lrs=lrs, losses=losses, smoothed=smoothed, mode=mode, suggestion=suggestion,
                          suggestion_min10=suggestion_min10, stopped_early=len(lrs) < num_steps, stop_reason=reason,
                          warning=sweep_warning(lrs, smoothed, smooth, diverged, diverge_factor),
                          optimizer=type(opt).__name__)
