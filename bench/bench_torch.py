"""fastopt.torch (the drop-in torch.optim adapter) beside torch.optim and beside the fastopt core called directly,
on GPT-2 small's parameter list (148 tensors, 124,439,808 params), float32, CPU and (where there is one) CUDA.

Groups (ids ``OPTIMIZER-DEVICE-THREADSt``, for example ``Adam-cpu-2t``), their variants timed interleaved:

| variant | what one timed step runs |
|---|---|
| ``fastopt_core`` | ``fo.Adam(arrays).step(grads)`` on NumPy (CuPy) views of the same tensors: no torch in the loop |
| ``fastopt_torch`` | ``fastopt.torch.Adam(params).step()``, the grads in ``p.grad`` |
| ``torch_forloop``, ``_foreach``, ``_fused`` | ``torch.optim.Adam(params, foreach=False / True, or fused=True)`` |

``gb_per_s`` counts the least traffic of one fused pass (Adam 28 B/param: read param, grad, two moments; write
param, two moments), the same for every variant. On CUDA each timed call ends with ``torch.cuda.synchronize()``.
``test_adapter_overhead`` records what the adapter adds to the core's step (``overhead``: 0.03 = 3 %), see there.

    python -m pytest bench/bench_torch.py -k "cpu-2t" --benchmark-json=bench/torch.json
    python -m pytest bench/bench_torch.py -k overhead
"""
import gc
import statistics
import time
from dataclasses import dataclass

import numba
import numpy as np
import pytest
import torch

import fastopt as fo
from fastopt.benchmark import gpt2_small_shapes
import fastopt.torch as ft

FLOAT32_BYTES = 4


GPT2_SHAPES = gpt2_small_shapes()
GPT2_PARAMS = sum(int(np.prod(shape)) for shape in GPT2_SHAPES)
assert len(GPT2_SHAPES) == 148 and GPT2_PARAMS == 124_439_808


@dataclass(frozen=True)
class OptimizerSpec:
    name: str  # the class name in fastopt, fastopt.torch and torch.optim
    kwargs: dict
    states: int  # state buffers per param

    @property
    def bytes_per_param(self):
        return FLOAT32_BYTES * (3 + 2 * self.states)


OPTIMIZERS = {"Adam": OptimizerSpec("Adam", dict(lr=1e-3), 2), "AdamW": OptimizerSpec("AdamW", dict(lr=1e-3), 2),
              "SGD_momentum": OptimizerSpec("SGD", dict(lr=1e-3, momentum=0.9), 1)}
VARIANTS = ("fastopt_core", "fastopt_torch", "torch_forloop", "torch_foreach", "torch_fused")
TORCH_FLAGS = {"torch_forloop": dict(foreach=False), "torch_foreach": dict(foreach=True),
               "torch_fused": dict(fused=True)}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def cases():
    for device in DEVICES:
        for optimizer in OPTIMIZERS:
            for threads in ((1, 2) if device == "cpu" else (2,)):
                yield pytest.param(optimizer, device, threads, id=f"{optimizer}-{device}-{threads}t")


ROUNDS = 7


# ---------------------------------------------------------------- params and grads, shared by the rows of a device
_TENSORS = {}


def params_and_grads(device):
    """GPT-2's params as leaf tensors with their ``.grad`` set (random values), built once per device."""
    if device not in _TENSORS:
        _TENSORS.clear()
        gc.collect()
        generator = torch.Generator().manual_seed(0)
        params = []
        for shape in GPT2_SHAPES:
            param = torch.nn.Parameter(torch.randn(shape, generator=generator).to(device))
            param.grad = torch.randn(shape, generator=generator).to(device) * 1e-3
            params.append(param)
        _TENSORS[device] = params
    return _TENSORS[device]


def array_views(tensors):
    """Zero-copy NumPy (CPU) or CuPy (CUDA) views, as a user of the core would hold their arrays."""
    if tensors[0].is_cuda:
        import cupy

        return [cupy.from_dlpack(tensor.detach()) for tensor in tensors]
    return [tensor.detach().numpy() for tensor in tensors]


def make_step(spec, device, variant):
    params = params_and_grads(device)
    if variant == "fastopt_core":
        optimizer = getattr(fo, spec.name)(array_views(params), **spec.kwargs)
        grads = array_views([param.grad for param in params])
        step = lambda: optimizer.step(grads)  # noqa: E731
    elif variant == "fastopt_torch":
        step = getattr(ft, spec.name)(params, **spec.kwargs).step
    else:
        step = getattr(torch.optim, spec.name)(params, **spec.kwargs, **TORCH_FLAGS[variant]).step
    if device == "cuda":
        def synchronized():
            step()
            torch.cuda.synchronize()
        return synchronized
    return step


def set_threads(threads):
    numba.set_num_threads(threads)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("optimizer, device, threads", list(cases()))
def test_step(benchmark, optimizer, device, threads):
    """Every variant of one (optimizer, device, threads) group, timed interleaved: each round runs each variant
    once, in an order that rotates from round to round, so the host's bandwidth drift falls on all alike. The
    benchmark's own figure is the whole round; each variant's median is in ``extra_info["variants"]``."""
    spec = OPTIMIZERS[optimizer]
    set_threads(threads)
    steps = [make_step(spec, device, variant) for variant in VARIANTS]
    rounds = iter(range(1 << 30))
    seconds = [[] for _ in VARIANTS]

    def one_round():
        shift = next(rounds) % len(steps)
        for index in list(range(shift, len(steps))) + list(range(shift)):
            start = time.perf_counter()
            steps[index]()
            seconds[index].append(time.perf_counter() - start)

    try:
        for step in steps:
            step()  # compiles (or loads the cache), allocates state, faults pages in
            step()
        benchmark.group = f"{optimizer} GPT2 {device} {threads} thread{'s' if threads > 1 else ''}"
        benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    finally:
        steps.clear()
        gc.collect()
    moved = spec.bytes_per_param * GPT2_PARAMS
    benchmark.extra_info.update(optimizer=optimizer, size="GPT2", params=GPT2_PARAMS, device=device, threads=threads,
                                bytes_per_step=moved, rounds=ROUNDS, variants={
                                    variant: dict(ms_per_step=statistics.median(times) * 1e3,
                                                  gb_per_s=moved / statistics.median(times) / 1e9)
                                    for variant, times in zip(VARIANTS, seconds)})


def interleaved_medians(steps, rounds):
    """Median seconds of each step function, timed one call each in turn per round (drift hits all alike)."""
    seconds = [[] for _ in steps]
    for _ in range(rounds):
        for step, times in zip(steps, seconds):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return [statistics.median(times) for times in seconds]


def tiny_tensors(device):
    """GPT-2's 148 tensors with 8 elements each: a step is host work only."""
    params = [torch.nn.Parameter(torch.randn(8, device=device)) for _ in GPT2_SHAPES]
    for param in params:
        param.grad = torch.randn(8, device=device)
    return params


@pytest.mark.parametrize("device", DEVICES)
def test_adapter_overhead(benchmark, device):
    """What fastopt.torch adds to a step of the fastopt core on the same tensors (Adam, 2 threads).

    ``overhead`` is the adapter's host time per step (measured on GPT-2's 148 tensors shrunk to 8 elements, where a
    step is host work only: params checked, hyperparameters copied, grad views made, step counters advanced) over
    the core's step time on the real list. ``overhead_gpt2`` compares the two on the real list directly, in
    interleaved rounds: the same quantity, but within the host's bandwidth noise (a few per cent here)."""
    spec = OPTIMIZERS["Adam"]
    set_threads(2)
    core_step = make_step(spec, device, "fastopt_core")
    torch_step = make_step(spec, device, "fastopt_torch")
    small = tiny_tensors(device)
    small_core = fo.Adam(array_views(small), lr=1e-3)
    small_grads = array_views([param.grad for param in small])
    small_adapter = ft.Adam(small, lr=1e-3)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    small_steps = [lambda: (small_core.step(small_grads), sync()), lambda: (small_adapter.step(), sync())]
    try:
        for step in (core_step, torch_step, core_step, torch_step):  # warm up both
            step()
        core_median, torch_median = interleaved_medians([core_step, torch_step], rounds=15)
        set_threads(1)  # host work is serial; one thread keeps the tiny kernels clear of thread-pool wake-ups
        interleaved_medians(small_steps, rounds=100)
        small_core_median, small_torch_median = interleaved_medians(small_steps, rounds=3000)
        set_threads(2)
        benchmark.group = f"Adam GPT2 {device} adapter overhead"
        benchmark(torch_step)
    finally:
        del core_step, torch_step
        gc.collect()
    host = small_torch_median - small_core_median
    benchmark.extra_info.update(device=device, core_ms=core_median * 1e3, fastopt_torch_ms=torch_median * 1e3,
                                overhead_gpt2=torch_median / core_median - 1, adapter_host_us=host * 1e6,
                                overhead=host / core_median)
    print(f"\nAdam GPT-2 {device}: core {core_median * 1e3:.2f} ms, fastopt.torch {torch_median * 1e3:.2f} ms "
          f"({100 * (torch_median / core_median - 1):+.1f} %); adapter host time {host * 1e6:.0f} us per step "
          f"(core {small_core_median * 1e6:.0f} us on 8-element tensors) = {100 * host / core_median:.2f} % of the "
          "core's step")
