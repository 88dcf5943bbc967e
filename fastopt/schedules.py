"""Learning-rate schedules as closed-form functions of the step count.

A schedule is a small immutable record. ``sched(t)`` is its value at step ``t`` (``t = 0`` for the
optimizer's first step), computed on the host in float64 NumPy: this is the reference that every
kernel is tested against. ``t`` may be an int (giving a Python float) or an integer array (giving a
float64 array). Each schedule equals the named torch scheduler stepped once per optimizer step:
the lr that torch's optimizer uses at its step ``t`` is the lr after ``t`` ``scheduler.step()``
calls. Where torch updates the lr recursively (``lr *= ratio``) it gathers one rounding per step;
the closed forms here do not.

Packed form
-----------
Kernels cannot call Python, so ``sched.program()`` packs a schedule into a 1-D float64 array that
``fastopt.kernels.cpu.schedule_math.schedule_value(program, base, step)`` evaluates. A program is
a list of nodes: the root at offset 0, then its children, each node being its kind code followed by
its fields (integers are stored exactly; the layout of each kind is in
``fastopt.kernels.cpu.schedule_codes``). Composite nodes (``warmup``, ``sequential``) name their
children by offsets relative to the start of the program, so an optimizer can concatenate the
programs of its parameter groups and evaluate group ``g``'s with ``base`` = where it starts.
For example ``warmup(cosine(0.1, t_max=100), warmup_steps=10).program()`` is::

    [WARMUP, 10, 0.0, 4,   COSINE, 0.1, 100, 0.0]
     ^ root: warmup_steps, start_factor, child at 4   ^ offset 4: lr, t_max, eta_min

Importing this module does not import Numba.
"""
from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from .kernels.cpu import schedule_codes as codes

__all__ = [
    "Schedule",
    "as_schedule",
    "Constant",
    "constant",
    "StepDecay",
    "step_decay",
    "MultiStep",
    "multistep",
    "Exponential",
    "exponential",
    "Linear",
    "linear",
    "Polynomial",
    "polynomial",
    "Cosine",
    "cosine",
    "CosineRestarts",
    "cosine_restarts",
    "OneCycle",
    "onecycle",
    "Cyclic",
    "cyclic",
    "Sequential",
    "sequential",
    "Warmup",
    "warmup",
    "plot",
]

# Programs are float64, which holds every integer up to 2**53 exactly.
_LARGEST_STEP_COUNT = 2**53


class Schedule(ABC):
    """A learning rate as a closed-form function of the step count ``t >= 0``."""

    __slots__ = ()

    def __call__(self, t):
        """The learning rate at step ``t``: a float for an integer, a float64 array for an array."""
        steps = np.asarray(t)
        if steps.dtype == np.bool_ or not np.issubdtype(steps.dtype, np.integer):
            raise TypeError(f"step t must be an integer or an array of integers, got {t!r}")
        if steps.size and steps.min() < 0:
            raise ValueError(f"step t must be >= 0, got {steps.min()}")
        if steps.size and steps.max() > np.iinfo(np.int64).max:
            raise ValueError(f"step t must fit in int64, got {steps.max()}")
        values = self._values(steps.astype(np.int64).ravel())
        if steps.ndim == 0:
            return float(values[0])
        return values.reshape(steps.shape)

    def program(self) -> np.ndarray:
        """The packed form (module docstring) with the root node at offset 0."""
        return np.array(self._pack(0), dtype=np.float64)

    @abstractmethod
    def _values(self, t: np.ndarray) -> np.ndarray:
        """Values at the steps ``t`` (1-D int64, each >= 0) as a float64 array."""

    @abstractmethod
    def _pack(self, offset: int) -> list[float]:
        """This schedule's nodes, for a program in which its root node sits at ``offset``."""


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def _number(name: str, value, *, minimum: float | None = None, above: float | None = None) -> float:
    """``value`` as a finite float, checked against ``minimum`` (inclusive) or ``above``."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if above is not None and number <= above:
        raise ValueError(f"{name} must be > {above}, got {value!r}")
    return number


def _step_count(name: str, value, *, minimum: int) -> int:
    """``value`` as an int in [minimum, 2**53]."""
    if _is_bool(value) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not minimum <= value <= _LARGEST_STEP_COUNT:
        raise ValueError(f"{name} must be an integer in [{minimum}, 2**53], got {value!r}")
    return int(value)


def _milestones(name: str, value, *, strictly_increasing: bool) -> tuple[int, ...]:
    """``value`` as a sorted tuple of step counts >= 1."""
    if isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be a sequence of integers, got {value!r}")
    try:
        items = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a sequence of integers, got {value!r}") from None
    milestones = tuple(_step_count(f"{name}[{i}]", item, minimum=1) for i, item in enumerate(items))
    for earlier, later in zip(milestones, milestones[1:]):
        if later < earlier or (strictly_increasing and later == earlier):
            order = "strictly increasing" if strictly_increasing else "sorted"
            raise ValueError(f"{name} must be {order}, got {value!r}")
    return milestones


def _schedule(name: str, value) -> Schedule:
    if not isinstance(value, Schedule):
        raise ValueError(f"{name} must be a Schedule, got {value!r}")
    return value


def _choice(name: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _set_fields(record, **fields) -> None:
    """Store validated fields on a frozen dataclass (which forbids plain assignment)."""
    for name, value in fields.items():
        object.__setattr__(record, name, value)


@dataclass(frozen=True)
class Constant(Schedule):
    """``lr`` at every step. torch: no scheduler (or ``ConstantLR(factor=1.0)``)."""

    lr: float

    def __post_init__(self):
        _set_fields(self, lr=_number("lr", self.lr, minimum=0.0))

    def _values(self, t):
        return np.full(t.shape, self.lr)

    def _pack(self, offset):
        return [codes.CONSTANT, self.lr]


@dataclass(frozen=True)
class StepDecay(Schedule):
    """``lr * gamma ** (t // step_size)``. torch: ``StepLR(step_size, gamma)``."""

    lr: float
    step_size: int
    gamma: float = 0.1

    def __post_init__(self):
        _set_fields(
            self,
            lr=_number("lr", self.lr, minimum=0.0),
            step_size=_step_count("step_size", self.step_size, minimum=1),
            gamma=_number("gamma", self.gamma, above=0.0),
        )

    def _values(self, t):
        return self.lr * self.gamma ** (t // self.step_size)

    def _pack(self, offset):
        return [codes.STEP_DECAY, self.lr, self.step_size, self.gamma]


@dataclass(frozen=True)
class MultiStep(Schedule):
    """``lr * gamma ** (number of milestones <= t)``. torch: ``MultiStepLR(milestones, gamma)``.

    ``milestones`` must be sorted; a repeated milestone decays twice there, as in torch.
    """

    lr: float
    milestones: tuple[int, ...]
    gamma: float = 0.1

    def __post_init__(self):
        milestones = _milestones("milestones", self.milestones, strictly_increasing=False)
        if not milestones:
            raise ValueError(f"milestones must not be empty, got {self.milestones!r}")
        _set_fields(
            self,
            lr=_number("lr", self.lr, minimum=0.0),
            milestones=milestones,
            gamma=_number("gamma", self.gamma, above=0.0),
        )

    def _values(self, t):
        passed = np.searchsorted(np.array(self.milestones), t, side="right")
        return self.lr * self.gamma ** passed

    def _pack(self, offset):
        return [codes.MULTISTEP, self.lr, self.gamma, len(self.milestones), *self.milestones]


@dataclass(frozen=True)
class Exponential(Schedule):
    """``lr * gamma ** t``. torch: ``ExponentialLR(gamma)`` (which multiplies by gamma each step)."""

    lr: float
    gamma: float

    def __post_init__(self):
        _set_fields(
            self,
            lr=_number("lr", self.lr, minimum=0.0),
            gamma=_number("gamma", self.gamma, above=0.0),
        )

    def _values(self, t):
        return self.lr * self.gamma**t

    def _pack(self, offset):
        return [codes.EXPONENTIAL, self.lr, self.gamma]


@dataclass(frozen=True)
class Linear(Schedule):
    """``lr * (start_factor + (end_factor - start_factor) * min(t, total_iters) / total_iters)``.

    torch: ``LinearLR(start_factor, end_factor, total_iters)``. Factors lie in [0, 1] as in torch,
    except that ``start_factor = 0`` is allowed (torch forbids it only because its recursive update
    divides by it).
    """

    lr: float
    start_factor: float = 1.0 / 3.0
    end_factor: float = 1.0
    total_iters: int = 5

    def __post_init__(self):
        start_factor = _number("start_factor", self.start_factor, minimum=0.0)
        end_factor = _number("end_factor", self.end_factor, minimum=0.0)
        if start_factor > 1.0:
            raise ValueError(f"start_factor must be <= 1, got {self.start_factor!r}")
        if end_factor > 1.0:
            raise ValueError(f"end_factor must be <= 1, got {self.end_factor!r}")
        _set_fields(
            self,
            lr=_number("lr", self.lr, minimum=0.0),
            start_factor=start_factor,
            end_factor=end_factor,
            total_iters=_step_count("total_iters", self.total_iters, minimum=1),
        )

    def _values(self, t):
        progress = np.minimum(t, self.total_iters)
        return self.lr * (
            self.start_factor + (self.end_factor - self.start_factor) * progress / self.total_iters
        )

    def _pack(self, offset):
        return [codes.LINEAR, self.lr, self.start_factor, self.end_factor, self.total_iters]


@dataclass(frozen=True)
class Polynomial(Schedule):
    """``lr * (1 - min(t, total_iters) / total_iters) ** power``. torch: ``PolynomialLR``."""

    lr: float
    total_iters: int = 5
    power: float = 1.0

    def __post_init__(self):
        _set_fields(
            self,
            lr=_number("lr", self.lr, minimum=0.0),
            total_iters=_step_count("total_iters", self.total_iters, minimum=1),
            power=_number("power", self.power, minimum=0.0),
        )

    def _values(self, t):
        return self.lr * (1.0 - np.minimum(t, self.total_iters) / self.total_iters) ** self.power

    def _pack(self, offset):
        return [codes.POLYNOMIAL, self.lr, self.total_iters, self.power]


@dataclass(frozen=True)
class Cosine(Schedule):
    """``eta_min + (lr - eta_min) * (1 + cos(pi t / t_max)) / 2``. torch: ``CosineAnnealingLR``.

    Past ``t_max`` the cosine keeps going (back up to ``lr`` at ``2 t_max``), as torch's recursion
    does.
    """

    lr: float
    t_max: int
    eta_min: float = 0.0

    def __post_init__(self):
        _set_fields(
            self,
            lr=_number("lr", self.lr, minimum=0.0),
            t_max=_step_count("t_max", self.t_max, minimum=1),
            eta_min=_number("eta_min", self.eta_min, minimum=0.0),
        )

    def _values(self, t):
        return self.eta_min + (self.lr - self.eta_min) * (1.0 + np.cos(np.pi * t / self.t_max)) / 2.0

    def _pack(self, offset):
        return [codes.COSINE, self.lr, self.t_max, self.eta_min]


@dataclass(frozen=True)
class CosineRestarts(Schedule):
    """``eta_min + (lr - eta_min) * (1 + cos(pi T_cur / T_i)) / 2`` with warm restarts (SGDR).

    The periods are ``T_i = t_0 * t_mult ** i``; ``T_cur`` is ``t`` minus the lengths of the periods
    already completed, found with integer arithmetic. torch: ``CosineAnnealingWarmRestarts``.
    """

    lr: float
    t_0: int
    t_mult: int = 1
    eta_min: float = 0.0

    def __post_init__(self):
        _set_fields(
            self,
            lr=_number("lr", self.lr, minimum=0.0),
            t_0=_step_count("t_0", self.t_0, minimum=1),
            t_mult=_step_count("t_mult", self.t_mult, minimum=1),
            eta_min=_number("eta_min", self.eta_min, minimum=0.0),
        )

    def _position(self, t: int) -> tuple[int, int]:
        """(T_cur, T_i) at step ``t``, in Python's unbounded ints."""
        if self.t_mult == 1:
            return t % self.t_0, self.t_0
        period = self.t_0
        while t >= period:
            t -= period
            period *= self.t_mult
        return t, period

    def _values(self, t):
        positions_and_periods = [self._position(int(step)) for step in t]
        position, period = np.array(positions_and_periods, dtype=np.float64).reshape(-1, 2).T
        return self.eta_min + (self.lr - self.eta_min) * (1.0 + np.cos(np.pi * position / period)) / 2.0

    def _pack(self, offset):
        return [codes.COSINE_RESTARTS, self.lr, self.t_0, self.t_mult, self.eta_min]


@dataclass(frozen=True)
class OneCycle(Schedule):
    """The 1cycle policy: anneal ``max_lr / div_factor`` up to ``max_lr``, then down to ``min_lr``.

    ``initial_lr = max_lr / div_factor`` and ``min_lr = initial_lr / final_div_factor``. With
    ``p = pct_start * total_steps`` the phases end at steps ``p - 1`` and ``total_steps - 1``;
    with ``three_phase`` at ``p - 1`` (up to max_lr), ``2 p - 2`` (back to initial_lr) and
    ``total_steps - 1`` (down to min_lr). Within a phase from step ``a`` to ``b``,
    ``pct = (t - a) / (b - a)`` and the value goes from ``start`` to ``end`` as
    ``end + (start - end) / 2 * (cos(pi pct) + 1)`` ("cos") or ``(end - start) pct + start``
    ("linear"). torch: ``OneCycleLR`` (these are its boundaries and formulas exactly).

    Deliberate difference: torch raises when stepped more than ``total_steps`` times (and its lr
    after exactly ``total_steps`` steps extrapolates the last phase past ``pct = 1``, back up the
    cosine); here the final value ``min_lr`` holds for every ``t >= total_steps - 1``. ``pct_start * total_steps == 1`` is
    rejected: the first phase would span zero steps and torch divides by zero at step 0.
    """

    max_lr: float
    total_steps: int
    pct_start: float = 0.3
    anneal_strategy: str = "cos"
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    three_phase: bool = False

    def __post_init__(self):
        total_steps = _step_count("total_steps", self.total_steps, minimum=1)
        pct_start = _number("pct_start", self.pct_start)
        if not 0.0 < pct_start < 1.0:
            raise ValueError(f"pct_start must be in (0, 1), got {self.pct_start!r}")
        if pct_start * total_steps == 1.0:
            raise ValueError(
                f"pct_start * total_steps must not be 1 (the first phase would span zero steps), "
                f"got pct_start={self.pct_start!r}, total_steps={self.total_steps!r}"
            )
        if not isinstance(self.three_phase, (bool, np.bool_)):
            raise ValueError(f"three_phase must be a bool, got {self.three_phase!r}")
        _set_fields(
            self,
            max_lr=_number("max_lr", self.max_lr, minimum=0.0),
            total_steps=total_steps,
            pct_start=pct_start,
            anneal_strategy=_choice("anneal_strategy", self.anneal_strategy, ("cos", "linear")),
            div_factor=_number("div_factor", self.div_factor, above=0.0),
            final_div_factor=_number("final_div_factor", self.final_div_factor, above=0.0),
            three_phase=bool(self.three_phase),
        )

    def _phases(self) -> list[tuple[float, float, float]]:
        """(end_step, start_lr, end_lr) of each phase, with torch's arithmetic."""
        initial_lr = self.max_lr / self.div_factor
        min_lr = initial_lr / self.final_div_factor
        phase_1_end = float(self.pct_start * self.total_steps) - 1
        last_step = float(self.total_steps - 1)
        if self.three_phase:
            phase_2_end = float(2 * self.pct_start * self.total_steps) - 2
            return [
                (phase_1_end, initial_lr, self.max_lr),
                (phase_2_end, self.max_lr, initial_lr),
                (last_step, initial_lr, min_lr),
            ]
        return [(phase_1_end, initial_lr, self.max_lr), (last_step, self.max_lr, min_lr)]

    def _anneal(self, start_lr: float, end_lr: float, pct: np.ndarray) -> np.ndarray:
        if self.anneal_strategy == "cos":
            return end_lr + (start_lr - end_lr) / 2.0 * (np.cos(np.pi * pct) + 1.0)
        return (end_lr - start_lr) * pct + start_lr

    def _values(self, t):
        t = np.minimum(t, self.total_steps - 1)
        phases = self._phases()
        values = np.empty(t.shape)
        unassigned = np.ones(t.shape, dtype=bool)
        start_step = 0.0
        for index, (end_step, start_lr, end_lr) in enumerate(phases):
            last_phase = index == len(phases) - 1
            in_phase = unassigned & ((t <= end_step) | last_phase)
            pct = (t[in_phase] - start_step) / (end_step - start_step)
            values[in_phase] = self._anneal(start_lr, end_lr, pct)
            unassigned &= ~in_phase
            start_step = end_step
        return values

    def _pack(self, offset):
        phases = self._phases()
        initial_lr, min_lr = phases[0][1], phases[-1][2]
        phase_2_end = phases[1][0]
        anneal = codes.ANNEAL_COS if self.anneal_strategy == "cos" else codes.ANNEAL_LINEAR
        return [
            codes.ONECYCLE, initial_lr, self.max_lr, min_lr, self.total_steps,
            phases[0][0], phase_2_end, float(self.three_phase), anneal,
        ]


_CYCLIC_MODES = {
    "triangular": codes.CYCLIC_TRIANGULAR,
    "triangular2": codes.CYCLIC_TRIANGULAR2,
    "exp_range": codes.CYCLIC_EXP_RANGE,
}


@dataclass(frozen=True)
class Cyclic(Schedule):
    """A triangle wave between ``base_lr`` and ``max_lr``. torch: ``CyclicLR`` (``scale_fn=None``).

    With ``L = step_size_up + step_size_down``, ``cycle = t // L`` and ``x = t - cycle L``, the
    height is ``x / step_size_up`` on the way up (``x <= step_size_up``) and
    ``(L - x) / step_size_down`` on the way down, and
    ``value = base_lr + (max_lr - base_lr) * height * scale`` with ``scale`` 1 ("triangular"),
    ``1 / 2 ** cycle`` ("triangular2") or ``gamma ** t`` ("exp_range"). ``step_size_down=None``
    means ``step_size_up``. Momentum is not cycled (torch's ``cycle_momentum=False``).
    """

    base_lr: float
    max_lr: float
    step_size_up: int = 2000
    step_size_down: int | None = None
    mode: str = "triangular"
    gamma: float = 1.0

    def __post_init__(self):
        step_size_up = _step_count("step_size_up", self.step_size_up, minimum=1)
        if self.step_size_down is None:
            step_size_down = step_size_up
        else:
            step_size_down = _step_count("step_size_down", self.step_size_down, minimum=1)
        _set_fields(
            self,
            base_lr=_number("base_lr", self.base_lr, minimum=0.0),
            max_lr=_number("max_lr", self.max_lr, minimum=0.0),
            step_size_up=step_size_up,
            step_size_down=step_size_down,
            mode=_choice("mode", self.mode, tuple(_CYCLIC_MODES)),
            gamma=_number("gamma", self.gamma, above=0.0),
        )

    def _values(self, t):
        cycle_length = self.step_size_up + self.step_size_down
        cycle, position = np.divmod(t, cycle_length)
        height = np.where(
            position <= self.step_size_up,
            position / self.step_size_up,
            (cycle_length - position) / self.step_size_down,
        )
        if self.mode == "triangular":
            scale = 1.0
        elif self.mode == "triangular2":
            scale = 1.0 / 2.0**cycle
        else:
            scale = self.gamma**t
        return self.base_lr + (self.max_lr - self.base_lr) * height * scale

    def _pack(self, offset):
        return [
            codes.CYCLIC, self.base_lr, self.max_lr, self.step_size_up, self.step_size_down,
            _CYCLIC_MODES[self.mode], self.gamma,
        ]


@dataclass(frozen=True)
class Sequential(Schedule):
    """``schedules[k](t - milestones[k-1])`` for ``milestones[k-1] <= t < milestones[k]``.

    Each schedule starts from its own ``t = 0`` at the milestone before it; ``len(milestones)``
    must be ``len(schedules) - 1`` and the milestones strictly increasing. torch: ``SequentialLR``.
    """

    schedules: tuple[Schedule, ...]
    milestones: tuple[int, ...]

    def __post_init__(self):
        if isinstance(self.schedules, Schedule) or not isinstance(self.schedules, (list, tuple)):
            raise ValueError(f"schedules must be a list or tuple of Schedules, got {self.schedules!r}")
        schedules = tuple(_schedule(f"schedules[{i}]", s) for i, s in enumerate(self.schedules))
        if not schedules:
            raise ValueError("schedules must not be empty, got ()")
        milestones = _milestones("milestones", self.milestones, strictly_increasing=True)
        if len(milestones) != len(schedules) - 1:
            raise ValueError(
                f"milestones must have len(schedules) - 1 = {len(schedules) - 1} entries, "
                f"got {len(milestones)}: {self.milestones!r}"
            )
        _set_fields(self, schedules=schedules, milestones=milestones)

    def _values(self, t):
        child = np.searchsorted(np.array(self.milestones, dtype=np.int64), t, side="right")
        starts = (0, *self.milestones)
        values = np.empty(t.shape)
        for index, schedule in enumerate(self.schedules):
            selected = child == index
            values[selected] = schedule._values(t[selected] - starts[index])
        return values

    def _pack(self, offset):
        count = len(self.schedules)
        node = [codes.SEQUENTIAL, count, *self.milestones]
        child_offsets, children = [], []
        child_offset = offset + len(node) + count
        for schedule in self.schedules:
            child_offsets.append(child_offset)
            child = schedule._pack(child_offset)
            children += child
            child_offset += len(child)
        return node + child_offsets + children


@dataclass(frozen=True)
class Warmup(Schedule):
    """``schedule(t) * (start_factor + (1 - start_factor) t / warmup_steps)`` for ``t < warmup_steps``,
    then ``schedule(t)``.

    A linear ramp from ``start_factor`` times the schedule up to the full schedule. torch:
    ``ChainedScheduler([LinearLR(start_factor, 1.0, warmup_steps), <schedule>])`` (torch needs
    ``start_factor > 0``).
    """

    schedule: Schedule
    warmup_steps: int
    start_factor: float = 0.0

    def __post_init__(self):
        start_factor = _number("start_factor", self.start_factor, minimum=0.0)
        if start_factor > 1.0:
            raise ValueError(f"start_factor must be <= 1, got {self.start_factor!r}")
        _set_fields(
            self,
            schedule=_schedule("schedule", self.schedule),
            warmup_steps=_step_count("warmup_steps", self.warmup_steps, minimum=1),
            start_factor=start_factor,
        )

    def _values(self, t):
        ramp = np.where(
            t < self.warmup_steps,
            self.start_factor + (1.0 - self.start_factor) * t / self.warmup_steps,
            1.0,
        )
        return self.schedule._values(t) * ramp

    def _pack(self, offset):
        child_offset = offset + 4
        node = [codes.WARMUP, self.warmup_steps, self.start_factor, child_offset]
        return node + self.schedule._pack(child_offset)


def as_schedule(lr) -> Schedule:
    """``lr`` itself if it is a Schedule, ``constant(lr)`` if it is a number."""
    if isinstance(lr, Schedule):
        return lr
    if _is_bool(lr):
        raise ValueError(f"lr must be a number or a Schedule, got the bool {lr!r}")
    if not isinstance(lr, numbers.Real):
        raise TypeError(f"lr must be a number or a Schedule, got {type(lr).__name__} {lr!r}")
    return Constant(lr)


def plot(sched_or_list, steps, path, labels=None):
    """Draw a schedule, or a list of them, over ``steps`` (``N`` for steps ``0..N-1``, or an array of steps) to
    the PNG ``path``; returns ``path``. Needs matplotlib, imported only here (see :mod:`fastopt.plotting`)."""
    from .plotting import plot_schedules

    return plot_schedules(sched_or_list, steps, path, labels=labels)


# The snake_case names follow torch's argument names; the records are the classes above.
constant = Constant
step_decay = StepDecay
multistep = MultiStep
exponential = Exponential
linear = Linear
polynomial = Polynomial
cosine = Cosine
cosine_restarts = CosineRestarts
onecycle = OneCycle
cyclic = Cyclic
sequential = Sequential
warmup = Warmup
