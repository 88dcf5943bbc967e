"""Schedules: the host reference against torch's schedulers, the Numba evaluator against the host
reference, the packed form, bad arguments and value semantics.

One table of cases drives both parity tests. Tolerances are in float64 eps:
- torch vs host: ``|torch - host| <= 4 eps (peak + (t + 1) |torch|)``. torch's recursive schedulers
  round once per step, so their relative error grows with ``t``; ``peak`` (the largest value of the
  case) covers one rounding of the largest term in a closed form, which is what remains when a
  cosine nearly cancels (``1 + cos(x)`` near ``x = pi``).
- kernel vs host: ``4 eps |host|``: the same formulas in the same order, so they differ only where
  NumPy rounds ``pow`` differently from libm (by an ulp; both use libm's ``cos``).
"""
import dataclasses
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest

from fastopt import schedules as S
from fastopt.kernels.cpu.schedule_math import schedule_value, schedule_values

EPS = np.finfo(np.float64).eps
STEPS = 300


def torch_lrs(lr: float, make_scheduler, steps: int) -> np.ndarray:
    """The lr each of ``steps`` optimizer steps uses under the scheduler ``make_scheduler(L, opt)``,
    ``L`` being ``torch.optim.lr_scheduler``: read before the step, scheduler stepped after it."""
    torch = pytest.importorskip("torch")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = make_scheduler(torch.optim.lr_scheduler, optimizer)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return np.array(lrs, dtype=np.float64)


def warmup_ramp(steps: int, warmup_steps: int, start_factor: float) -> np.ndarray:
    t = np.arange(steps)
    return np.where(t < warmup_steps, start_factor + (1.0 - start_factor) * t / warmup_steps, 1.0)


@dataclass(frozen=True)
class Case:
    name: str
    schedule: S.Schedule
    # torch's lrs over a number of steps; None where torch has no equivalent.
    torch_reference: Callable[[int], np.ndarray] | None
    steps: int = STEPS

    def __str__(self):
        return self.name


def torch_case(name, schedule, make_scheduler, lr=0.1, steps=STEPS):
    """``schedule`` against torch's ``make_scheduler(L, optimizer)`` on an optimizer with ``lr``."""
    return Case(name, schedule, lambda n: torch_lrs(lr, make_scheduler, n), steps)


def warmup_case(name, child, make_child, warmup_steps, start_factor, lr=0.1):
    """warmup(child) against torch's child times the ramp, computed directly."""
    def reference(n):
        return torch_lrs(lr, make_child, n) * warmup_ramp(n, warmup_steps, start_factor)

    return Case(name, S.warmup(child, warmup_steps, start_factor), reference)


def one_cycle(L, optimizer, **arguments):
    return L.OneCycleLR(optimizer, cycle_momentum=False, **arguments)


def cyclic_lr(L, optimizer, *arguments, **keywords):
    return L.CyclicLR(optimizer, *arguments, cycle_momentum=False, **keywords)


CASES = [
    torch_case("constant", S.constant(0.1), lambda L, o: L.LambdaLR(o, lambda t: 1.0)),
    torch_case("step_decay", S.step_decay(0.1, step_size=30, gamma=0.5),
               lambda L, o: L.StepLR(o, step_size=30, gamma=0.5)),
    torch_case("step_decay_default_gamma", S.step_decay(0.3, step_size=7),
               lambda L, o: L.StepLR(o, step_size=7), lr=0.3),
    torch_case("multistep_repeated_milestone", S.multistep(0.1, [50, 120, 120, 200], gamma=0.3),
               lambda L, o: L.MultiStepLR(o, milestones=[50, 120, 120, 200], gamma=0.3)),
    torch_case("exponential", S.exponential(0.1, gamma=0.99),
               lambda L, o: L.ExponentialLR(o, gamma=0.99)),
    torch_case("exponential_growing", S.exponential(0.01, gamma=1.01),
               lambda L, o: L.ExponentialLR(o, gamma=1.01), lr=0.01),
    torch_case("linear_default", S.linear(0.1), lambda L, o: L.LinearLR(o)),
    torch_case("linear_decay", S.linear(0.1, start_factor=0.9, end_factor=0.05, total_iters=100),
               lambda L, o: L.LinearLR(o, start_factor=0.9, end_factor=0.05, total_iters=100)),
    torch_case("polynomial_default", S.polynomial(0.1), lambda L, o: L.PolynomialLR(o)),
    torch_case("polynomial_square", S.polynomial(0.1, total_iters=200, power=2.0),
               lambda L, o: L.PolynomialLR(o, total_iters=200, power=2.0)),
    torch_case("polynomial_sqrt", S.polynomial(0.1, total_iters=150, power=0.5),
               lambda L, o: L.PolynomialLR(o, total_iters=150, power=0.5)),
    torch_case("cosine_past_t_max", S.cosine(0.1, t_max=100),
               lambda L, o: L.CosineAnnealingLR(o, T_max=100)),
    torch_case("cosine_eta_min", S.cosine(0.1, t_max=70, eta_min=0.01),
               lambda L, o: L.CosineAnnealingLR(o, T_max=70, eta_min=0.01)),
    torch_case("cosine_restarts_t_mult_1", S.cosine_restarts(0.1, t_0=30),
               lambda L, o: L.CosineAnnealingWarmRestarts(o, T_0=30)),
    torch_case("cosine_restarts_t_mult_2", S.cosine_restarts(0.1, t_0=10, t_mult=2, eta_min=0.001),
               lambda L, o: L.CosineAnnealingWarmRestarts(o, T_0=10, T_mult=2, eta_min=0.001)),
    torch_case("cosine_restarts_t_mult_3", S.cosine_restarts(0.1, t_0=3, t_mult=3),
               lambda L, o: L.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=3)),
    torch_case("onecycle_cos", S.onecycle(0.1, total_steps=300),
               lambda L, o: one_cycle(L, o, max_lr=0.1, total_steps=300)),
    torch_case("onecycle_linear",
               S.onecycle(0.1, total_steps=250, pct_start=0.25, anneal_strategy="linear"),
               lambda L, o: one_cycle(L, o, max_lr=0.1, total_steps=250, pct_start=0.25,
                                      anneal_strategy="linear"),
               steps=250),
    torch_case("onecycle_three_phase_cos",
               S.onecycle(0.1, total_steps=277, pct_start=0.35, div_factor=10.0,
                          final_div_factor=100.0, three_phase=True),
               lambda L, o: one_cycle(L, o, max_lr=0.1, total_steps=277, pct_start=0.35,
                                      div_factor=10.0, final_div_factor=100.0, three_phase=True),
               steps=277),
    torch_case("onecycle_three_phase_linear",
               S.onecycle(0.1, total_steps=300, anneal_strategy="linear", three_phase=True),
               lambda L, o: one_cycle(L, o, max_lr=0.1, total_steps=300, anneal_strategy="linear",
                                      three_phase=True)),
    # pct_start * total_steps < 1: the first phase ends before step 0, so step 0 is in phase 2.
    torch_case("onecycle_short", S.onecycle(0.1, total_steps=3),
               lambda L, o: one_cycle(L, o, max_lr=0.1, total_steps=3), steps=3),
    torch_case("cyclic_triangular", S.cyclic(0.01, 0.1, step_size_up=20),
               lambda L, o: cyclic_lr(L, o, 0.01, 0.1, step_size_up=20)),
    torch_case("cyclic_triangular2",
               S.cyclic(0.01, 0.1, step_size_up=15, step_size_down=25, mode="triangular2"),
               lambda L, o: cyclic_lr(L, o, 0.01, 0.1, step_size_up=15, step_size_down=25,
                                      mode="triangular2")),
    torch_case("cyclic_exp_range", S.cyclic(0.01, 0.1, step_size_up=20, mode="exp_range", gamma=0.99),
               lambda L, o: cyclic_lr(L, o, 0.01, 0.1, step_size_up=20, mode="exp_range", gamma=0.99)),
    torch_case("sequential_2",
               S.sequential([S.linear(0.1, 0.1, 1.0, 10), S.cosine(0.1, t_max=90)], [10]),
               lambda L, o: L.SequentialLR(
                   o, [L.LinearLR(o, 0.1, 1.0, 10), L.CosineAnnealingLR(o, 90)], [10])),
    torch_case("sequential_3",
               S.sequential([S.linear(0.1, 0.5, 1.0, 20), S.step_decay(0.1, 40, 0.5),
                             S.cosine_restarts(0.1, 25, 2)], [20, 100]),
               lambda L, o: L.SequentialLR(
                   o, [L.LinearLR(o, 0.5, 1.0, 20), L.StepLR(o, 40, 0.5),
                       L.CosineAnnealingWarmRestarts(o, 25, 2)], [20, 100])),
    torch_case("warmup_exponential_chained", S.warmup(S.exponential(0.1, 0.99), 20, start_factor=0.1),
               lambda L, o: L.ChainedScheduler(
                   [L.LinearLR(o, 0.1, 1.0, 20), L.ExponentialLR(o, 0.99)])),
    warmup_case("warmup_cosine", S.cosine(0.1, t_max=200),
                lambda L, o: L.CosineAnnealingLR(o, 200), warmup_steps=25, start_factor=0.0),
    warmup_case("warmup_step_decay", S.step_decay(0.1, 50, 0.5),
                lambda L, o: L.StepLR(o, 50, 0.5), warmup_steps=7, start_factor=0.25),
    warmup_case("warmup_sequential",
                S.sequential([S.linear(0.1, 0.2, 1.0, 30), S.cosine(0.1, 100)], [40]),
                lambda L, o: L.SequentialLR(
                    o, [L.LinearLR(o, 0.2, 1.0, 30), L.CosineAnnealingLR(o, 100)], [40]),
                warmup_steps=50, start_factor=0.0),
    Case("sequential_of_warmups",
         S.sequential([S.warmup(S.cosine(0.1, 80), 10),
                       S.warmup(S.sequential([S.constant(0.02), S.exponential(0.05, 0.98)], [30]),
                                5, 0.5)],
                      [100]),
         None),
    Case("sequential_of_onecycle_cyclic_multistep",
         S.warmup(S.sequential([S.onecycle(0.1, 100, three_phase=True),
                                S.cyclic(0.001, 0.01, 10, mode="exp_range", gamma=0.995),
                                S.multistep(0.01, [20, 40])],
                               [120, 200]),
                  15, 0.2),
         None),
    Case("warmup_of_warmup", S.warmup(S.warmup(S.polynomial(0.2, 250, 1.5), 40, 0.3), 20), None),
]
TORCH_CASES = [case for case in CASES if case.torch_reference is not None]


def peak(values: np.ndarray) -> float:
    return float(np.max(np.abs(values)))


@pytest.mark.parametrize("case", TORCH_CASES, ids=str)
def test_host_matches_torch(case):
    reference = case.torch_reference(case.steps)
    t = np.arange(case.steps)
    got = case.schedule(t)
    tolerance = 4 * EPS * (peak(reference) + (t + 1) * np.abs(reference))
    error = np.abs(got - reference)
    worst = int(np.argmax(error - tolerance))
    assert np.all(error <= tolerance), (
        f"t={worst}: host {got[worst]!r} torch {reference[worst]!r} "
        f"error {error[worst] / EPS / max(peak(reference), 1e-300):.1f} eps of peak"
    )


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernel_matches_host(case):
    t = np.arange(case.steps, dtype=np.int64)
    expected = case.schedule(t)
    got = schedule_values(case.schedule.program(), 0, t)
    assert got.dtype == np.float64
    error = np.abs(got - expected)
    worst = int(np.argmax(error / np.maximum(np.abs(expected), np.finfo(np.float64).tiny)))
    assert np.all(error <= 4 * EPS * np.abs(expected)), f"t={worst}: kernel {got[worst]!r} host {expected[worst]!r}"
    assert schedule_value(case.schedule.program(), 0, np.int64(case.steps - 1)) == got[-1]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_vectorised_equals_scalar(case):
    t = np.arange(case.steps)
    vectorised = case.schedule(t)
    scalars = [case.schedule(int(step)) for step in t]
    assert vectorised.dtype == np.float64 and vectorised.shape == t.shape
    assert all(type(value) is float for value in scalars)
    np.testing.assert_array_equal(vectorised, scalars)
    assert case.schedule(np.int32(case.steps - 1)) == scalars[-1]
    grid = t[: case.steps // 2 * 2].reshape(2, -1)
    np.testing.assert_array_equal(case.schedule(grid.astype(np.int32)), vectorised[grid])
    assert case.schedule(np.arange(0)).shape == (0,)


def test_programs_concatenate_with_base_offsets():
    programs = [case.schedule.program() for case in CASES]
    for program in programs:
        assert program.dtype == np.float64 and program.ndim == 1
    bases = np.cumsum([0] + [program.size for program in programs[:-1]])
    joined = np.concatenate(programs)
    t = np.arange(STEPS, dtype=np.int64)
    for case, program, base in zip(CASES, programs, bases):
        alone = schedule_values(program, 0, t)
        np.testing.assert_array_equal(schedule_values(joined, int(base), t), alone, err_msg=case.name)


def test_program_layout_of_a_composite():
    from fastopt.kernels.cpu import schedule_codes as codes

    program = S.warmup(S.cosine(0.1, t_max=100), warmup_steps=10).program()
    np.testing.assert_array_equal(program, [codes.WARMUP, 10, 0.0, 4, codes.COSINE, 0.1, 100, 0.0])


def test_kernel_returns_nan_for_a_malformed_program():
    assert math.isnan(schedule_value(np.array([99.0, 1.0]), 0, np.int64(0)))
    # A warmup whose child is itself: a cycle.
    assert math.isnan(schedule_value(np.array([11.0, 5.0, 0.0, 0.0]), 0, np.int64(9)))


def test_cosine_restarts_is_exact_at_period_boundaries_and_far_out():
    schedule = S.cosine_restarts(0.1, t_0=1, t_mult=3, eta_min=0.01)
    boundaries = np.array([(3**k - 1) // 2 for k in range(1, 33)], dtype=np.int64)  # 1, 4, 13, ...
    program = schedule.program()
    assert np.all(schedule(boundaries) == 0.1)
    assert np.all(schedule_values(program, 0, boundaries) == 0.1)
    # Steps near 2**62 with periods that do not fit in int64 once multiplied.
    huge = S.cosine_restarts(1.0, t_0=2**40, t_mult=2**20)
    steps = np.array([2**62, 2**62 + 12345, 2**40 - 1, 2**40, 2**60 + 2**40], dtype=np.int64)
    np.testing.assert_allclose(schedule_values(huge.program(), 0, steps), huge(steps), rtol=4 * EPS)


def test_onecycle_holds_its_final_value():
    schedule = S.onecycle(0.1, total_steps=100, three_phase=True)
    final = 0.1 / 25.0 / 1e4
    t = np.arange(99, 400)
    assert np.all(schedule(t) == final)
    assert np.all(schedule_values(schedule.program(), 0, t) == final)


def test_negative_or_non_integer_step_is_rejected():
    schedule = S.cosine(0.1, 10)
    with pytest.raises(ValueError, match="step t must be >= 0"):
        schedule(-1)
    with pytest.raises(ValueError, match="step t must be >= 0"):
        schedule(np.array([3, -2]))
    for bad in (1.0, np.array([1.5]), True):
        with pytest.raises(TypeError, match="step t must be an integer"):
            schedule(bad)


def _not_a_schedule():
    return "cosine"


BAD_ARGUMENTS = [
    ("lr", lambda: S.constant(-0.1)),
    ("lr", lambda: S.constant(float("nan"))),
    ("lr", lambda: S.constant(float("inf"))),
    ("lr", lambda: S.constant("0.1")),
    ("lr", lambda: S.constant(True)),
    ("step_size", lambda: S.step_decay(0.1, 0)),
    ("step_size", lambda: S.step_decay(0.1, 2.0)),
    ("gamma", lambda: S.step_decay(0.1, 10, gamma=0.0)),
    ("milestones", lambda: S.multistep(0.1, [])),
    ("milestones", lambda: S.multistep(0.1, [30, 20])),
    ("milestones", lambda: S.multistep(0.1, [0, 20])),
    ("milestones", lambda: S.multistep(0.1, 30)),
    ("gamma", lambda: S.multistep(0.1, [10], gamma=-0.5)),
    ("gamma", lambda: S.exponential(0.1, 0.0)),
    ("gamma", lambda: S.exponential(0.1, float("nan"))),
    ("start_factor", lambda: S.linear(0.1, start_factor=1.5)),
    ("end_factor", lambda: S.linear(0.1, end_factor=-0.1)),
    ("total_iters", lambda: S.linear(0.1, total_iters=0)),
    ("total_iters", lambda: S.polynomial(0.1, total_iters=0)),
    ("power", lambda: S.polynomial(0.1, power=-1.0)),
    ("t_max", lambda: S.cosine(0.1, 0)),
    ("t_max", lambda: S.cosine(0.1, -5)),
    ("eta_min", lambda: S.cosine(0.1, 10, eta_min=-1e-3)),
    ("t_0", lambda: S.cosine_restarts(0.1, 0)),
    ("t_mult", lambda: S.cosine_restarts(0.1, 10, t_mult=0)),
    ("t_mult", lambda: S.cosine_restarts(0.1, 10, t_mult=1.5)),
    ("total_steps", lambda: S.onecycle(0.1, 0)),
    ("max_lr", lambda: S.onecycle(-0.1, 100)),
    ("pct_start", lambda: S.onecycle(0.1, 100, pct_start=0.0)),
    ("pct_start", lambda: S.onecycle(0.1, 100, pct_start=1.0)),
    ("pct_start", lambda: S.onecycle(0.1, 10, pct_start=0.1)),
    ("anneal_strategy", lambda: S.onecycle(0.1, 100, anneal_strategy="cosine")),
    ("div_factor", lambda: S.onecycle(0.1, 100, div_factor=0.0)),
    ("final_div_factor", lambda: S.onecycle(0.1, 100, final_div_factor=-1.0)),
    ("three_phase", lambda: S.onecycle(0.1, 100, three_phase=1)),
    ("base_lr", lambda: S.cyclic(-0.01, 0.1)),
    ("max_lr", lambda: S.cyclic(0.01, float("inf"))),
    ("step_size_up", lambda: S.cyclic(0.01, 0.1, step_size_up=0)),
    ("step_size_down", lambda: S.cyclic(0.01, 0.1, step_size_down=0)),
    ("mode", lambda: S.cyclic(0.01, 0.1, mode="sawtooth")),
    ("gamma", lambda: S.cyclic(0.01, 0.1, mode="exp_range", gamma=0.0)),
    ("milestones", lambda: S.sequential([S.constant(0.1), S.constant(0.2)], [])),
    ("milestones", lambda: S.sequential([S.constant(0.1), S.constant(0.2), S.constant(0.3)], [20, 20])),
    ("milestones", lambda: S.sequential([S.constant(0.1), S.constant(0.2)], [0])),
    ("schedules", lambda: S.sequential([], [])),
    ("schedules", lambda: S.sequential(S.constant(0.1), [])),
    ("schedules[1]", lambda: S.sequential([S.constant(0.1), 0.2], [10])),
    ("schedule", lambda: S.warmup(_not_a_schedule(), 10)),
    ("warmup_steps", lambda: S.warmup(S.constant(0.1), 0)),
    ("start_factor", lambda: S.warmup(S.constant(0.1), 10, start_factor=2.0)),
]


@pytest.mark.parametrize("argument, make", BAD_ARGUMENTS,
                         ids=[f"{name}-{index}" for index, (name, _) in enumerate(BAD_ARGUMENTS)])
def test_bad_argument_raises_value_error_naming_it(argument, make):
    with pytest.raises(ValueError, match=rf"^{re.escape(argument)}(?!\w)"):
        make()


def test_records_are_immutable_hashable_and_equal_by_value():
    schedule = S.multistep(0.1, [10, 20], gamma=0.5)
    assert schedule.milestones == (10, 20)
    with pytest.raises(dataclasses.FrozenInstanceError):
        schedule.lr = 0.2
    same = S.multistep(0.1, (10, 20), 0.5)
    assert schedule == same and hash(schedule) == hash(same)
    assert schedule != S.multistep(0.1, [10, 21], 0.5)
    assert S.constant(1) == S.constant(1.0) and isinstance(S.constant(1).lr, float)
    assert S.cyclic(0.01, 0.1, 20) == S.cyclic(0.01, 0.1, 20, step_size_down=20)
    composite = S.warmup(S.sequential([S.linear(0.1), S.cosine(0.1, 50)], [20]), 10)
    assert composite.schedule.schedules == (S.linear(0.1), S.cosine(0.1, 50))
    assert len({case.schedule for case in CASES}) == len(CASES)
    assert hash(composite) == hash(S.warmup(S.sequential((S.linear(0.1), S.cosine(0.1, 50)), (20,)), 10))


def test_as_schedule():
    cosine = S.cosine(0.1, 10)
    assert S.as_schedule(cosine) is cosine
    assert S.as_schedule(0.1) == S.constant(0.1)
    assert S.as_schedule(1) == S.constant(1.0)
    assert S.as_schedule(np.float32(0.5)) == S.constant(0.5)
    for bad in (True, np.bool_(False), -0.1, float("nan")):
        with pytest.raises(ValueError, match="lr"):
            S.as_schedule(bad)
    for bad in ("0.1", None, [0.1]):
        with pytest.raises(TypeError, match="lr"):
            S.as_schedule(bad)


def test_public_names():
    for name in S.__all__:
        assert hasattr(S, name), name
    for name in ("constant", "step_decay", "multistep", "exponential", "linear", "polynomial", "cosine",
                 "cosine_restarts", "onecycle", "cyclic", "sequential", "warmup"):
        assert issubclass(getattr(S, name), S.Schedule) and getattr(S, name).__doc__


def test_importing_schedules_does_not_import_numba():
    code = "import sys, fastopt.schedules; assert 'numba' not in sys.modules, 'numba was imported'"
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=environment)
