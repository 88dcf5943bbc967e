"""One optimizer step on the CPU: fastopt beside torch.optim and a memory-bandwidth ceiling, float32.

Every test is one (optimizer, size, threads) group; its variants (rows) are timed interleaved. The bytes of a row are the least traffic one fused pass
needs (every param, grad and state buffer read once, every updated one written once; plus the lr_scale read
where one is used), the same for every implementation of the update, so GB/s reads against the ``ceiling`` row:
a prange kernel with the optimizer's read/write pattern and trivial math. See bench/README.md.

    python -m pytest bench/bench_cpu.py --benchmark-json=bench/cpu.json     # all 70 groups, ~8 minutes
    python -m pytest bench/bench_cpu.py -k "16M and 2t"                      # quick: 16M, 2 threads
    python -m pytest bench/bench_cpu.py -k "Adam-16M"                        # group ids: Adam-16M-2t
"""
import gc
import importlib
import time

import numba
import numpy as np
import pytest
import torch

import fastopt as fo
from fastopt.benchmark import (CASES, ceiling_read2_write1, ceiling_read3_write2, ceiling_read4_write3,
                               gpt2_small_shapes, staggered as staggered_buffer)

FLOAT32_BYTES = 4
SIZES = {"1M": 1 << 20, "16M": 1 << 24, "32M": 1 << 25, "64M": 1 << 26, "GPT2": None}  # GPT2: the list below


GPT2_SHAPES = gpt2_small_shapes()
GPT2_PARAMS = sum(int(np.prod(shape)) for shape in GPT2_SHAPES)
assert len(GPT2_SHAPES) == 148 and GPT2_PARAMS == 124_439_808


OPTIMIZERS = CASES  # name -> class name (fastopt's and torch's), kwargs, state buffers, torch has fused CPU


TORCH_FLAGS = {"torch_forloop": dict(foreach=False), "torch_foreach": dict(foreach=True),
               "torch_fused": dict(fused=True)}


def variants(optimizer, size):
    """The rows of one optimizer/size/threads group, ceiling first (it is the yardstick of the others)."""
    spec = OPTIMIZERS[optimizer]
    rows = ["ceiling", "fastopt"]
    if size == "GPT2":
        rows.append("fastopt_flat")
    if optimizer in ("Adam", "AdamW") and size in ("16M", "GPT2"):
        rows.append("fastopt_lr_scale")
    if size == "1M":
        rows.append("reference")
    if spec.anchor != "torch.optim":  # torch has no such optimizer: the package that defines it
        return rows + [spec.anchor]
    rows += ["torch_forloop", "torch_foreach"] + (["torch_fused"] if spec.torch_fused else [])
    return rows


def cases():
    """Size outermost, so the params and grads of one size are built once; ids like ``Adam-16M-2t``."""
    for size in SIZES:
        for optimizer in OPTIMIZERS:
            for threads in (1, 2):
                yield pytest.param(optimizer, size, threads, id=f"{optimizer}-{size}-{threads}t")


# ---------------------------------------------------------------- buffers
def staggered(shape, ordinal):
    """An uninitialised float32 array of ``shape``, 64-byte aligned and staggered within its page (see
    fastopt.benchmark.staggered)."""
    return staggered_buffer(int(np.prod(shape)), ordinal).reshape(shape)


def random_arrays(shapes, rng, first_ordinal):
    arrays = []
    for index, shape in enumerate(shapes):
        array = staggered(shape, first_ordinal + index)
        array[...] = rng.standard_normal(shape, dtype=np.float32)
        arrays.append(array)
    return arrays


_ARRAYS = {}  # the params and grads of the current size only: (size, layout) -> (params, grads)


def params_and_grads(size, layout):
    """Params and grads shared by all rows of a size (each row's optimizer allocates its own state).
    ``layout`` is "list" (GPT2: its 148 tensors) or "flat" (one array); the other sizes are one array."""
    if any(key[0] != size for key in _ARRAYS):
        _ARRAYS.clear()
        gc.collect()
    key = (size, layout if size == "GPT2" else "flat")
    if key not in _ARRAYS:
        shapes = GPT2_SHAPES if key == ("GPT2", "list") else [(SIZES[size] or GPT2_PARAMS,)]
        rng = np.random.default_rng(0)
        _ARRAYS[key] = (random_arrays(shapes, rng, 0), random_arrays(shapes, rng, 1))
    return _ARRAYS[key]


def ceiling_step(spec, size):
    (param,), (grad,) = params_and_grads(size, "flat")
    states = [staggered(param.shape, 2 + index) for index in range(spec.states)]
    for state in states:
        state[...] = 0
    kernel = (ceiling_read2_write1, ceiling_read3_write2, ceiling_read4_write3)[spec.states]
    scalars = () if spec.states == 0 else (np.float32(0.5),)
    arguments = (param, grad, *states, *scalars, np.float32(-1e-6))
    return lambda: kernel(*arguments)


# ---------------------------------------------------------------- the rows
def fastopt_step(spec, size, variant):
    params, grads = params_and_grads(size, "flat" if variant == "fastopt_flat" else "list")
    backend = "reference" if variant == "reference" else "cpu"
    groups = params
    if variant == "fastopt_lr_scale":
        rng = np.random.default_rng(1)
        scales = [staggered(param.shape, 2 + index) for index, param in enumerate(params)]
        for scale in scales:
            scale[...] = rng.uniform(0.5, 1.5, scale.shape).astype(np.float32)
        groups = [{"params": params, "lr_scale": scales}]
    optimizer = getattr(fo, spec.class_name)(groups, **spec.kwargs, backend=backend)
    return lambda: optimizer.step(grads)


def torch_step(spec, size, variant):
    params, grads = params_and_grads(size, "list")
    tensors = []
    for param, grad in zip(params, grads):
        tensor = torch.from_numpy(param).requires_grad_()
        tensor.grad = torch.from_numpy(grad)
        tensors.append(tensor)
    anchor = importlib.import_module(spec.anchor)
    optimizer = getattr(anchor, spec.class_name)(tensors, **spec.kwargs, **TORCH_FLAGS.get(variant, {}))
    return optimizer.step


def row_bytes(spec, size, variant):
    per_param = spec.bytes_per_param + (FLOAT32_BYTES if variant == "fastopt_lr_scale" else 0)
    return per_param * (SIZES[size] or GPT2_PARAMS)


ROUNDS = 7


def make_step(spec, size, variant):
    if variant == "ceiling":
        return ceiling_step(spec, size)
    if variant.startswith("torch") or variant == spec.anchor:
        return torch_step(spec, size, variant)
    return fastopt_step(spec, size, variant)


def time_interleaved(benchmark, group, steps):
    """{variant: [seconds per round]} for ``steps`` ({variant: a step}), timed interleaved: each of ROUNDS rounds runs
    every variant once, in an order that rotates from round to round, so slow drifts of the host's bandwidth fall
    on all variants alike. Every step runs twice first (compiles or loads the cache, allocates state, faults pages
    in); the steps (and the optimizers and state they hold) are dropped at the end."""
    names = list(steps)
    times = {name: [] for name in names}
    for step in steps.values():
        step()
        step()
    rounds = iter(range(1 << 30))

    def one_round():
        shift = next(rounds) % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)

    try:
        benchmark.group = group
        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    finally:
        steps.clear()  # the optimizers and their state go now, not when pytest lets go of the frame
        gc.collect()
    return times


@pytest.mark.parametrize("optimizer, size, threads", list(cases()))
def test_step(benchmark, optimizer, size, threads):
    """All variants of one (optimizer, size, threads) group, timed interleaved: each round runs every variant once,
    in an order that rotates from round to round, so slow drifts of the host's bandwidth fall on all variants
    alike and their ratios hold. The benchmark's own figure is the whole round; each variant's median step is in
    ``extra_info["variants"]``."""
    spec = OPTIMIZERS[optimizer]
    numba.set_num_threads(threads)
    torch.set_num_threads(threads)
    names = variants(optimizer, size)
    times = time_interleaved(benchmark, f"{optimizer} {size} {threads} thread{'s' if threads > 1 else ''}",
                             {name: make_step(spec, size, name) for name in names})
    ceiling = row_bytes(spec, size, "ceiling") / float(np.median(times["ceiling"]))
    results = {}
    for name in names:
        median = float(np.median(times[name]))
        moved = row_bytes(spec, size, name)
        results[name] = dict(ms_per_step=median * 1e3, bytes_per_step=moved, gb_per_s=moved / median / 1e9,
                             fraction_of_ceiling=moved / median / ceiling)
    benchmark.extra_info.update(optimizer=optimizer, size=size, params=SIZES[size] or GPT2_PARAMS, threads=threads,
                                rounds=ROUNDS, variants=results)
