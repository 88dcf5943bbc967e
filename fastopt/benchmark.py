"""``fastopt bench``: one optimizer step on the CPU, fastopt beside torch.optim and a memory-bandwidth ceiling.

An optimizer step does almost no arithmetic per byte, so its speed limit is memory bandwidth. Each row's bytes
are the least traffic one fused pass needs in float32 (every param, grad and state buffer read once, every
updated one written once: 4 B per buffer read or written, so Adam moves 28 B/param, SGD with momentum 20, plain SGD
12), the same count for every implementation, so GB/s reads directly against the ``ceiling`` row: a parallel Numba kernel with the
optimizer's read/write pattern and trivial math, measured in the same run. Host bandwidth drifts by tens of
percent over minutes, so the variants of one (optimizer, size) are timed in interleaved rounds and each row
reports its median; compare ratios within one run, not GB/s across runs.

The pytest-benchmark suite in the repository's ``bench/`` covers more variants and sizes; this module is the
installed, self-contained version behind the command line.
"""
import importlib
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import numba
import numpy as np

from . import rules
from .kernels.cpu.jit import parallel_jit

FLOAT32_BYTES = 4
PAGE = 4096


@dataclass(frozen=True)
class OptimizerCase:
    class_name: str  # the same in fastopt and in torch.optim (or the anchor's module)
    kwargs: dict
    states: int  # state buffers per param
    torch_fused: bool  # torch.optim has a fused CPU implementation
    anchor: str = "torch.optim"  # the module of the implementation fastopt is measured against; None: none exists
    two_passes: bool = False  # a rule with per-tensor norms (LAMB): a pass over the moments, then one over the param

    @property
    def bytes_per_param(self):
        if self.two_passes:  # reads: param, grad, states; writes: states; then reads: param, states; writes: param
            return FLOAT32_BYTES * ((2 + 2 * self.states) + (2 + self.states))
        return FLOAT32_BYTES * (3 + 2 * self.states)  # reads: param, grad, states; writes: param, states


CASES = {
    "SGD": OptimizerCase("SGD", dict(lr=1e-3), 0, True),
    "SGD_momentum": OptimizerCase("SGD", dict(lr=1e-3, momentum=0.9), 1, True),
    "RMSprop": OptimizerCase("RMSprop", dict(lr=1e-3), 1, False),
    "Adam": OptimizerCase("Adam", dict(lr=1e-3), 2, True),
    "AdamW": OptimizerCase("AdamW", dict(lr=1e-3), 2, True),
    "Adagrad": OptimizerCase("Adagrad", dict(lr=1e-3), 1, True),
    "Lion": OptimizerCase("Lion", dict(lr=1e-4), 1, False, anchor="lion_pytorch"),  # torch.optim has no Lion
    "AdamWScheduleFree": OptimizerCase("AdamWScheduleFree", dict(lr=1e-3), 2, False, anchor="schedulefree"),
    "SGDScheduleFree": OptimizerCase("SGDScheduleFree", dict(lr=1e-3), 1, False, anchor="schedulefree"),
    "LAMB": OptimizerCase("LAMB", dict(lr=1e-3), 2, False, anchor=None, two_passes=True),  # apex's: CUDA only
}
QUICK = dict(sizes=(4 << 20,), repeats=5, sample_seconds=0.02)
FULL = dict(sizes=(1 << 20, 16 << 20), repeats=9, sample_seconds=0.05)


def gpt2_small_shapes():
    """The 148 parameter tensors of GPT-2 small (124,439,808 params), in the model's order: the standard list of
    many tensors of mixed sizes that multi-tensor optimizers are measured on."""
    width, vocabulary, context = 768, 50257, 1024
    layer = [(width,), (width,), (width, 3 * width), (3 * width,), (width, width), (width,),  # ln_1, attn
             (width,), (width,), (width, 4 * width), (4 * width,), (4 * width, width), (width,)]  # ln_2, mlp
    return [(vocabulary, width), (context, width)] + 12 * layer + [(width,), (width,)]


# ---------------------------------------------------------------- the ceiling kernels
@parallel_jit
def ceiling_read2_write1(param, grad, rate):
    """Plain SGD's traffic, 12 B/param: read param, grad; write param."""
    for i in numba.prange(param.size):
        param[i] = param[i] + rate * grad[i]


@parallel_jit
def ceiling_read3_write2(param, grad, state, decay, rate):
    """SGD momentum's and RMSprop's traffic, 20 B/param: read param, grad, state; write param, state."""
    for i in numba.prange(param.size):
        s = state[i] * decay + grad[i]
        state[i] = s
        param[i] = param[i] + rate * s


@parallel_jit
def ceiling_read4_write3(param, grad, state1, state2, decay, rate):
    """Adam's traffic, 28 B/param: read param, grad, two states; write param, two states."""
    for i in numba.prange(param.size):
        g = grad[i]
        m = state1[i] * decay + g
        v = state2[i] * decay + g * g
        state1[i] = m
        state2[i] = v
        param[i] = param[i] + rate * m * v


@parallel_jit
def ceiling_two_passes(param, grad, state1, state2, decay, rate):
    """LAMB's traffic, 40 B/param: read param, grad, two states, write the states; then read param and the states,
    write param."""
    for i in numba.prange(param.size):
        g = grad[i]
        state1[i] = state1[i] * decay + g + param[i]
        state2[i] = state2[i] * decay + g * g
    for i in numba.prange(param.size):
        param[i] = param[i] + rate * state1[i] * state2[i]


@parallel_jit
def ceiling_two_passes_storing(param, grad, state1, state2, direction, decay, rate):
    """LAMB's other possible traffic, also 40 B/param: read param, grad, two states, write the states and the update
    direction into a buffer of its own; then read param and the direction, write param (the direction's buffer is
    written without being read first, so its cache lines are fetched for ownership: the 40 B move more)."""
    for i in numba.prange(param.size):
        g = grad[i]
        s1 = state1[i] * decay + g
        s2 = state2[i] * decay + g * g
        state1[i] = s1
        state2[i] = s2
        direction[i] = s1 * s2 + param[i]
    for i in numba.prange(param.size):
        param[i] = param[i] + rate * direction[i]


# ---------------------------------------------------------------- buffers and steps
def staggered(size, ordinal):
    """An uninitialised float32 array that starts 128 + 256 * ordinal bytes (mod 4 KiB) into a page: 64-byte
    aligned (NumPy's large arrays start 16 bytes past a cache line, and vector loads across lines cost up to 20%)
    and staggered (equal-size buffers that all start at the same page offset alias in the cache and lose
    bandwidth). fastopt shifts its state buffers by multiples of 256 bytes, so they never share these offsets."""
    base = np.empty(size + PAGE // FLOAT32_BYTES, dtype=np.float32)
    start = (128 + 256 * (ordinal % 16) - base.ctypes.data) % PAGE // FLOAT32_BYTES
    return base[start:start + size]


def ceiling_step(case, param, grad):
    states = [staggered(param.size, 2 + index) for index in range(case.states)]
    for state in states:
        state.fill(0)
    kernel = ceiling_two_passes if case.two_passes else \
        (ceiling_read2_write1, ceiling_read3_write2, ceiling_read4_write3)[case.states]
    # float32 scalars: a Python float would turn the whole kernel into float64 arithmetic.
    arguments = (param, grad, *states, *((np.float32(0.5),) if case.states else ()), np.float32(-1e-6))
    return lambda: kernel(*arguments)


def fastopt_step(case, param, grad):
    optimizer = getattr(rules, case.class_name)([param], **case.kwargs)
    return lambda: optimizer.step([grad])


def torch_step(case, param, grad, torch, **flags):
    """The step of the case's anchor implementation (torch.optim's, or another package's), None if that package is
    not installed."""
    if case.anchor is None:
        return None
    try:
        anchor = importlib.import_module(case.anchor)
    except ImportError:
        return None
    tensor = torch.from_numpy(param).requires_grad_()  # shares memory with param: no copy
    tensor.grad = torch.from_numpy(grad)
    optimizer = getattr(anchor, case.class_name)([tensor], **case.kwargs, **flags)
    if hasattr(optimizer, "train"):
        optimizer.train()  # the schedulefree package's optimizers start in eval mode and refuse to step there
    return optimizer.step


def parse_size(text):
    """``"4M"`` -> 4 * 2**20, ``"64K"`` -> 65536, ``"1000"`` -> 1000."""
    text = str(text).strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    number = text[:-1] if scale > 1 else text
    try:
        size = int(float(number) * scale)
    except ValueError:
        raise ValueError(f"cannot read the size {text!r}; use a number of params such as 65536, 64K or 4M") from None
    if size < 1:
        raise ValueError(f"size must be at least 1 param, got {text!r}")
    return size


def size_label(size):
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size % scale == 0:
            return f"{size // scale}{unit}"
    return str(size)


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal, one line per update otherwise)."""

    def __init__(self, total, stream=None, enabled=True):
        self.total, self.done, self.enabled = max(total, 1), 0, enabled
        self.stream = stream or sys.stderr
        self.terminal = getattr(self.stream, "isatty", lambda: False)()

    def update(self, label, advance=1):
        self.done += advance
        if not self.enabled:
            return
        filled = round(30 * self.done / self.total)
        line = f"[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {label}"
        self.stream.write(f"\r{line:<80}" if self.terminal else line + "\n")
        self.stream.flush()

    def close(self):
        if self.enabled and self.terminal:
            self.stream.write("\n")
            self.stream.flush()


def _time_steps(step, count):
    start = time.perf_counter()
    for _ in range(count):
        step()
    return (time.perf_counter() - start) / count


def run(optimizer_names=None, sizes=None, threads=None, repeats=None, sample_seconds=None, quick=False,
        use_torch=True, progress=True):
    """Measure every (optimizer, size) group and return ``{"machine": ..., "settings": ..., "rows": [...]}``.

    A group's variants are ``ceiling``, ``fastopt`` and, with torch installed, ``torch`` (torch.optim's CPU
    default, the for-loop implementation) and ``torch-fused`` (``fused=True``, where torch has one). Each is
    warmed up by two steps (the first compiles or loads Numba's cache and allocates state), then timed in
    ``repeats`` interleaved rounds of about ``sample_seconds`` each. ``threads`` (default: Numba's default) is
    set for both Numba and torch for the run and restored afterwards. Rows hold ms_per_step (the median),
    gb_per_s, fraction_of_ceiling, on torch rows ``fastopt_speedup`` (their time over fastopt's), and
    ``rounds_disagree`` (see :func:`rounds_disagree`).
    """
    defaults = QUICK if quick else FULL
    optimizer_names = list(optimizer_names or CASES)
    for name in optimizer_names:
        if name not in CASES:
            raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(CASES)}")
    sizes = [parse_size(size) for size in (sizes or defaults["sizes"])]
    repeats = repeats or defaults["repeats"]
    sample_seconds = sample_seconds or defaults["sample_seconds"]
    torch = None
    if use_torch:
        try:
            import torch
        except ImportError:
            torch = None
    previous_threads = numba.get_num_threads(), torch.get_num_threads() if torch else None
    threads = threads or numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(threads)
    if torch:
        torch.set_num_threads(threads)
    load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # before we add to it
    groups = [(name, size) for size in sizes for name in optimizer_names]
    bar = Progress(len(groups) * (repeats + 1), enabled=progress)
    rows = []
    try:
        for name, size in groups:
            rows += _measure_group(name, size, threads, repeats, sample_seconds, torch, bar)
    finally:
        bar.close()
        numba.set_num_threads(previous_threads[0])
        if torch:
            torch.set_num_threads(previous_threads[1])
    machine = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                   cpus=numba.config.NUMBA_NUM_THREADS, python=platform.python_version(), numpy=np.__version__,
                   numba=numba.__version__, torch=torch.__version__ if torch else None, load_average=load_average)
    settings = dict(threads=threads, repeats=repeats, sample_seconds=sample_seconds, dtype="float32", quick=quick)
    return {"machine": machine, "settings": settings, "rows": rows}


def _measure_group(name, size, threads, repeats, sample_seconds, torch, bar):
    case = CASES[name]
    label = f"{name} {size_label(size)}"
    rng = np.random.default_rng(0)
    param, grad = staggered(size, 0), staggered(size, 1)
    param[...] = rng.standard_normal(size, dtype=np.float32)
    grad[...] = rng.standard_normal(size, dtype=np.float32)
    steps = {"ceiling": ceiling_step(case, param, grad), "fastopt": fastopt_step(case, param, grad)}
    if torch:
        steps["torch"] = torch_step(case, param, grad, torch)
        if case.torch_fused:
            steps["torch-fused"] = torch_step(case, param, grad, torch, fused=True)
    steps = {variant: step for variant, step in steps.items() if step is not None}
    counts = {}
    for variant, step in steps.items():
        step(), step()  # compile or load, allocate state
        counts[variant] = max(1, min(100, math.ceil(sample_seconds / max(_time_steps(step, 1), 1e-7))))
    bar.update(f"{label}: warmed up")
    samples = {variant: [] for variant in steps}
    for round_number in range(repeats):
        for variant, step in steps.items():  # interleaved: drifts in bandwidth hit every variant alike
            samples[variant].append(_time_steps(step, counts[variant]))
        bar.update(f"{label}: round {round_number + 1}/{repeats}")
    return group_rows(name, size, threads, samples)


def group_rows(name, size, threads, samples):
    """The rows of one (optimizer, size) group from ``samples``: each variant's round times in seconds, the
    ``ceiling`` and ``fastopt`` variants among them."""
    bytes_per_step = CASES[name].bytes_per_param * size
    seconds = {variant: statistics.median(values) for variant, values in samples.items()}
    rows = []
    for variant, median in seconds.items():
        gb_per_s = bytes_per_step / median / 1e9
        rows.append(dict(optimizer=name, size=size_label(size), params=size, backend=variant, threads=threads,
                         bytes_per_step=bytes_per_step, ms_per_step=median * 1e3, gb_per_s=gb_per_s,
                         fraction_of_ceiling=seconds["ceiling"] / median,
                         fastopt_speedup=median / seconds["fastopt"] if variant.startswith("torch") else None,
                         samples_ms=[value * 1e3 for value in samples[variant]],
                         rounds_disagree=rounds_disagree(samples[variant])))
    return rows


# The rounds of one variant time the same work: a slowest round more than 1.5x the fastest means something else
# had the cores or the memory for part of the run, and the median, and every ratio taken from it, may be off.
ROUNDS_DISAGREE = 1.5
ROUNDS_DISAGREE_NOTE = f"! rounds disagree by more than {ROUNDS_DISAGREE:g}x: the machine was busy; rerun"


def rounds_disagree(round_times):
    """Whether a row's slowest round took more than ``ROUNDS_DISAGREE`` times its fastest."""
    return max(round_times) > ROUNDS_DISAGREE * min(round_times)


def busy_warning(result):
    """A warning when other processes were keeping the cores busy as the run began, else None. A parallel step
    waits for its slowest thread, and a thread that has lost its core waits a whole scheduler time slice (about
    8 ms here): every variant then takes about the same few ms and the table measures the scheduler."""
    load, cpus, threads = result["machine"]["load_average"], result["machine"]["cpus"], result["settings"]["threads"]
    if load is None or load <= max(cpus - threads, 0) + 0.5:
        return None
    return (f"warning: the load average was {load:.1f} on {cpus} cores when the run began; with {threads} "
            "thread(s) the timings may show waits for a core rather than memory bandwidth. Run on an idle machine "
            "or with fewer --threads.")


def format_table(result):
    """The rows as a fixed-width text table: a "!" before each row whose rounds disagree, with a footnote, and the
    speed-up column only when there are torch rows."""
    rows = result["rows"]
    with_speedup = any(row["fastopt_speedup"] is not None for row in rows)
    header = (f"  {'optimizer':<13} {'size':>5} {'backend':<12} {'ms/step':>9} {'GB/s':>7} {'of ceiling':>10}"
              + (f" {'fastopt speed-up':>16}" if with_speedup else ""))
    lines = [header, "-" * len(header)]
    for row in rows:
        line = (f"{'!' if row['rounds_disagree'] else ' '} {row['optimizer']:<13} {row['size']:>5} "
                f"{row['backend']:<12} {row['ms_per_step']:>9.3f} {row['gb_per_s']:>7.1f} "
                f"{row['fraction_of_ceiling']:>10.2f}")
        if with_speedup:
            speedup = f"{row['fastopt_speedup']:.2f}x" if row["fastopt_speedup"] is not None else ""
            line += f" {speedup:>16}"
        lines.append(line)
    if any(row["rounds_disagree"] for row in rows):
        lines.append(ROUNDS_DISAGREE_NOTE)
    return "\n".join(lines)
