"""Evaluate a packed schedule program at a step, inside Numba kernels.

The program layout is documented in ``schedule_codes``; the host reference is
``fastopt.schedules``. Each leaf repeats the host's formula in the same operation order, so the two
agree to a few ulps: they differ only where NumPy and libm round ``cos`` and ``pow`` differently.
Exponents are passed to ``math.pow`` as float64 on purpose: with an integer exponent Numba
multiplies by repeated squaring, which rounds up to ~2 log2(n) times (12 ulps seen at n = 300).

Composite nodes (WARMUP, SEQUENTIAL) only change the step and a multiplier and then move to one
child, so evaluation is a loop over nodes: no recursion (which Numba cannot cache) and no
allocation. A malformed program whose offsets form a cycle gives NaN instead of hanging.
"""
import math

import numpy as np

from .jit import jit
from .schedule_codes import (
    ANNEAL_COS,
    CONSTANT,
    COSINE,
    COSINE_RESTARTS,
    CYCLIC,
    CYCLIC_TRIANGULAR,
    CYCLIC_TRIANGULAR2,
    EXPONENTIAL,
    LINEAR,
    MULTISTEP,
    ONECYCLE,
    POLYNOMIAL,
    SEQUENTIAL,
    STEP_DECAY,
    WARMUP,
)


@jit
def restart_position(step, t_0, t_mult):
    """(T_cur, T_i) of SGDR: ``step``'s position in its period, periods being t_0, t_0 t_mult, ...

    Exact integer arithmetic, as a floating log misrounds at period boundaries. T_i is returned as
    float64 because the period holding ``step`` may be too long for int64.
    """
    if t_mult == 1:
        return step % t_0, np.float64(t_0)
    position = step
    period = t_0
    while position >= period:
        position -= period
        # Stop before forming a period longer than what is left: it could overflow int64.
        if position // t_mult < period:
            return position, np.float64(period) * t_mult
        period *= t_mult
    return position, np.float64(period)


@jit
def onecycle_value(program, node, step):
    """OneCycleLR with torch's phase boundaries; the final value holds from total_steps - 1 on."""
    initial_lr = program[node + 1]
    max_lr = program[node + 2]
    min_lr = program[node + 3]
    last_step = int(program[node + 4]) - 1
    phase_1_end = program[node + 5]
    phase_2_end = program[node + 6]
    three_phase = program[node + 7] != 0.0
    anneal = int(program[node + 8])

    t = min(step, last_step)
    if t <= phase_1_end:
        start_step, end_step, start_lr, end_lr = 0.0, phase_1_end, initial_lr, max_lr
    elif not three_phase:
        start_step, end_step, start_lr, end_lr = phase_1_end, np.float64(last_step), max_lr, min_lr
    elif t <= phase_2_end:
        start_step, end_step, start_lr, end_lr = phase_1_end, phase_2_end, max_lr, initial_lr
    else:
        start_step, end_step, start_lr, end_lr = phase_2_end, np.float64(last_step), initial_lr, min_lr
    pct = (t - start_step) / (end_step - start_step)
    if anneal == ANNEAL_COS:
        return end_lr + (start_lr - end_lr) / 2.0 * (math.cos(math.pi * pct) + 1.0)
    return (end_lr - start_lr) * pct + start_lr


@jit
def cyclic_value(program, node, step):
    """CyclicLR: a triangle between base_lr and max_lr, its height scaled per mode."""
    base_lr = program[node + 1]
    max_lr = program[node + 2]
    step_size_up = int(program[node + 3])
    step_size_down = int(program[node + 4])
    mode = int(program[node + 5])
    gamma = program[node + 6]

    cycle_length = step_size_up + step_size_down
    cycle = step // cycle_length
    position = step - cycle * cycle_length
    if position <= step_size_up:
        height = position / step_size_up
    else:
        height = (cycle_length - position) / step_size_down
    if mode == CYCLIC_TRIANGULAR:
        scale = 1.0
    elif mode == CYCLIC_TRIANGULAR2:
        scale = 1.0 / math.pow(2.0, np.float64(cycle))
    else:
        scale = math.pow(gamma, np.float64(step))
    return base_lr + (max_lr - base_lr) * height * scale


@jit
def leaf_value(program, node, step):
    """Value of the leaf node at ``node`` (absolute offset) at ``step``; NaN for an unknown kind."""
    kind = int(program[node])
    if kind == CONSTANT:
        return program[node + 1]
    if kind == STEP_DECAY:
        lr, step_size, gamma = program[node + 1], int(program[node + 2]), program[node + 3]
        return lr * math.pow(gamma, np.float64(step // step_size))
    if kind == MULTISTEP:
        lr, gamma, count = program[node + 1], program[node + 2], int(program[node + 3])
        passed = 0
        while passed < count and program[node + 4 + passed] <= step:
            passed += 1
        return lr * math.pow(gamma, np.float64(passed))
    if kind == EXPONENTIAL:
        return program[node + 1] * math.pow(program[node + 2], np.float64(step))
    if kind == LINEAR:
        lr, start_factor, end_factor = program[node + 1], program[node + 2], program[node + 3]
        total_iters = int(program[node + 4])
        return lr * (start_factor + (end_factor - start_factor) * min(step, total_iters) / total_iters)
    if kind == POLYNOMIAL:
        lr, total_iters, power = program[node + 1], int(program[node + 2]), program[node + 3]
        return lr * math.pow(1.0 - min(step, total_iters) / total_iters, power)
    if kind == COSINE:
        lr, t_max, eta_min = program[node + 1], int(program[node + 2]), program[node + 3]
        return eta_min + (lr - eta_min) * (1.0 + math.cos(math.pi * step / t_max)) / 2.0
    if kind == COSINE_RESTARTS:
        lr, t_0, t_mult, eta_min = (
            program[node + 1], int(program[node + 2]), int(program[node + 3]), program[node + 4]
        )
        position, period = restart_position(step, t_0, t_mult)
        return eta_min + (lr - eta_min) * (1.0 + math.cos(math.pi * position / period)) / 2.0
    if kind == ONECYCLE:
        return onecycle_value(program, node, step)
    if kind == CYCLIC:
        return cyclic_value(program, node, step)
    return np.nan


@jit
def schedule_value(program, base, step):
    """Value at ``step`` (int64, >= 0) of the schedule whose root node is at ``program[base]``.

    Child offsets in the program are relative to ``base``. WARMUP multiplies by its ramp
    ``start_factor + (1 - start_factor) step / warmup_steps`` while ``step < warmup_steps``;
    SEQUENTIAL picks the child whose milestone ``step`` has passed last and restarts its step at 0.
    """
    node = base
    multiplier = 1.0
    for _ in range(program.shape[0]):
        kind = int(program[node])
        if kind == WARMUP:
            warmup_steps, start_factor = int(program[node + 1]), program[node + 2]
            if step < warmup_steps:
                multiplier *= start_factor + (1.0 - start_factor) * step / warmup_steps
            node = base + int(program[node + 3])
        elif kind == SEQUENTIAL:
            count = int(program[node + 1])
            child = 0
            while child < count - 1 and program[node + 2 + child] <= step:
                child += 1
            if child > 0:
                step -= int(program[node + 2 + child - 1])
            node = base + int(program[node + 2 + count - 1 + child])
        else:
            return multiplier * leaf_value(program, node, step)
    return np.nan


@jit
def schedule_values(program, base, steps):
    """``schedule_value`` at each of ``steps`` (int64 array), as a new float64 array."""
    values = np.empty(steps.shape[0], dtype=np.float64)
    for i in range(steps.shape[0]):
        values[i] = schedule_value(program, base, steps[i])
    return values
