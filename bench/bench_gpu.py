"""One optimizer step on a CUDA GPU: fastopt beside torch.optim (foreach and fused) and a copy ceiling, float32.

Every row is one (optimizer, size, variant); ids are ``OPTIMIZER-SIZE-VARIANT``, e.g. ``Adam-16M-torch_fused``:

    python -m pytest bench/bench_gpu.py --benchmark-json=bench/gpu.json
    python -m pytest bench/bench_gpu.py -k "Adam-16M"              # one optimizer at one size
    python -m pytest bench/bench_gpu.py -k "GPT2 and not SGD"       # the GPT-2-small parameter list

Rows of one (optimizer, size) group, ceiling first:

- ``ceiling``: ``cudaMemcpyAsync`` device to device of half the row's bytes (so it reads and writes as many bytes
  as the optimizer does): the bandwidth yardstick.
- ``fastopt``: ``fo.<Optimizer>(cupy params).step(grads)``, eager: one launch per step on a CuPy stream, plus
  Python's time to issue it (which is what limits small sizes).
- ``fastopt_graph``: the same step captured once in a CUDA graph per buffer set and replayed (the schedule advances
  on the device): the kernel without the Python overhead.
- ``torch_foreach``, ``torch_fused``: ``torch.optim`` with ``foreach=True`` / ``fused=True`` on the same GPU (RMSprop
  has no fused version). Skipped when torch has no CUDA.

Sizes: ``1M``, ``16M``, ``256M`` params in one tensor, and ``GPT2``: the 148 tensors of GPT-2 small (124,439,808
params, bench_cpu.GPT2_SHAPES). Optimizers and hyperparameters as bench_cpu.py.

Timing is physics, not Python: each round records a CUDA event, issues STEPS steps, records another and waits for
it; ``ms_per_step`` is the median over rounds of the event time divided by the steps (device time, including any
gap where the GPU waited for the host to issue work). Every row is warmed up first (compilation, state allocation,
torch's lazy initialisation). pytest-benchmark's own table times whole rounds on the host clock (STEPS steps plus
one synchronisation); read ``extra_info``: ms_per_step, gb_per_s, fraction_of_ceiling.

No step may read from L2 what an earlier step left there: the H100's L2 (50 MB) holds a whole 1M-param Adam step.
Each row therefore cycles through ``copies`` independent sets of params, grads (and optimizers with their state),
enough that the memory touched between two uses of a set is at least L2_MULTIPLE times the L2 size.

Bytes per step: the least traffic one fused pass needs (bench/README.md's table: every param, grad and state
buffer read once, every updated one written once), the same for every variant, so GB/s reads against the ceiling.
"""
import gc
import math
import statistics
from dataclasses import dataclass

import numpy as np
import pytest

import fastopt as fo
from bench_cpu import GPT2_PARAMS, GPT2_SHAPES
from fastopt.backends import cuda

if not cuda.gpu_available():
    pytest.skip("needs CuPy and a CUDA GPU", allow_module_level=True)

import cupy  # noqa: E402 (only with a GPU)

try:
    import torch  # noqa: E402

    TORCH_CUDA = torch.cuda.is_available()
except ImportError:
    torch, TORCH_CUDA = None, False

FLOAT32_BYTES = 4
SIZES = {"1M": 1 << 20, "16M": 1 << 24, "256M": 1 << 28, "GPT2": None}
ROUNDS = 15
ROUND_BYTES = 64e9  # each round moves about this much (about 20 ms at 3 TB/s), and at most MAX_STEPS steps
MAX_STEPS = 200
L2_MULTIPLE = 3


@dataclass(frozen=True)
class OptimizerSpec:
    fastopt: type
    torch_name: str
    kwargs: dict
    states: int  # state buffers per param
    torch_fused: bool  # torch.optim has a fused CUDA implementation

    @property
    def bytes_per_param(self):  # reads: param, grad, states; writes: param, states
        return FLOAT32_BYTES * (3 + 2 * self.states)

    @property
    def buffers_per_param(self):  # distinct memory per param: param, grad, states
        return 2 + self.states


OPTIMIZERS = {
    "SGD": OptimizerSpec(fo.SGD, "SGD", dict(lr=1e-3), 0, True),
    "SGD_momentum": OptimizerSpec(fo.SGD, "SGD", dict(lr=1e-3, momentum=0.9), 1, True),
    "RMSprop": OptimizerSpec(fo.RMSprop, "RMSprop", dict(lr=1e-3), 1, False),
    "Adam": OptimizerSpec(fo.Adam, "Adam", dict(lr=1e-3), 2, True),
    "AdamW": OptimizerSpec(fo.AdamW, "AdamW", dict(lr=1e-3), 2, True),
}


def variants(optimizer):
    rows = ["ceiling", "fastopt", "fastopt_graph", "torch_foreach"]
    return rows + (["torch_fused"] if OPTIMIZERS[optimizer].torch_fused else [])


def cases():
    for size in SIZES:
        for optimizer in OPTIMIZERS:
            for variant in variants(optimizer):
                yield pytest.param(optimizer, size, variant, id=f"{optimizer}-{size}-{variant}")


def shapes_of(size):
    return GPT2_SHAPES if size == "GPT2" else [(SIZES[size],)]


def params_of(size):
    return SIZES[size] or GPT2_PARAMS


def l2_bytes():
    return cupy.cuda.Device().attributes["L2CacheSize"]


def copies_needed(distinct_bytes):
    """Buffer sets to cycle through so that at least L2_MULTIPLE x L2 bytes are touched between two uses of one."""
    if distinct_bytes >= L2_MULTIPLE * l2_bytes():
        return 1
    return 1 + math.ceil(L2_MULTIPLE * l2_bytes() / distinct_bytes)


def steps_per_round(bytes_per_step, copies):
    steps = min(MAX_STEPS, max(1, math.ceil(ROUND_BYTES / bytes_per_step)))
    return max(copies, steps // copies * copies)  # a whole number of passes over the sets


# ---------------------------------------------------------------- rows
class Row:
    """``run(steps)`` issues ``steps`` steps (cycling over the buffer sets) between two events on ``stream`` and
    returns the event time in ms; ``check()`` asserts the steps did something; ``close()`` frees the memory."""

    def __init__(self, step, copies, stream, check, keep):
        self.step, self.copies, self.stream, self.check, self.keep = step, copies, stream, check, keep
        self.next = 0
        # Buffers were filled on other streams (CuPy's and torch's defaults); the non-blocking stream would not wait.
        cupy.cuda.Device().synchronize()

    def run(self, steps):
        if isinstance(self.stream, cupy.cuda.Stream):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            with self.stream:
                start.record(self.stream)
                self._issue(steps)
                end.record(self.stream)
            end.synchronize()
            return cupy.cuda.get_elapsed_time(start, end)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self._issue(steps)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    def _issue(self, steps):
        for _ in range(steps):
            self.step(self.next % self.copies)
            self.next += 1

    def close(self):
        self.keep.clear()
        self.step = self.check = None  # their closures hold the buffers too
        gc.collect()
        cupy.get_default_memory_pool().free_all_blocks()
        if TORCH_CUDA:
            torch.cuda.empty_cache()


def random_cupy(shapes, rng):
    return [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]


def ceiling_row(spec, size, stream):
    half = params_of(size) * spec.bytes_per_param // 2
    copies = copies_needed(2 * half)
    sources = [cupy.ones(half, dtype=np.uint8) for _ in range(copies)]
    targets = [cupy.zeros(half, dtype=np.uint8) for _ in range(copies)]

    def step(index):
        targets[index].data.copy_from_device_async(sources[index].data, half, stream)

    def check():
        assert int(targets[0][-1]) == 1

    return Row(step, copies, stream, check, [sources, targets])


def fastopt_row(spec, size, stream, graph):
    rng = cupy.random.default_rng(0)
    shapes = shapes_of(size)
    copies = copies_needed(params_of(size) * spec.buffers_per_param * FLOAT32_BYTES)
    sets = []
    with stream:
        for _ in range(copies):
            params, grads = random_cupy(shapes, rng), random_cupy(shapes, rng)
            optimizer = spec.fastopt(params, **spec.kwargs)
            optimizer.step(grads)  # compiles (first row only), allocates state, uploads the tables
            sets.append((params, grads, optimizer))
        if graph:
            graphs = []
            for params, grads, optimizer in sets:
                stream.begin_capture()
                try:
                    optimizer.step(grads)
                finally:
                    graphs.append(stream.end_capture())
        stream.synchronize()
    first = sets[0][0][-1][:8].copy()

    if graph:
        def step(index):
            graphs[index].launch(stream)
    else:
        def step(index):
            params, grads, optimizer = sets[index]
            optimizer.step(grads)

    def check():
        last = sets[0][0][-1][:8]
        assert bool(cupy.all(cupy.isfinite(last))) and not bool(cupy.all(last == first)), "the steps did nothing"

    return Row(step, copies, stream, check, [sets] + ([graphs] if graph else []))


def torch_row(spec, size, variant):
    if not TORCH_CUDA:
        pytest.skip("torch has no CUDA")
    generator = torch.Generator(device="cuda").manual_seed(0)
    shapes = shapes_of(size)
    copies = copies_needed(params_of(size) * spec.buffers_per_param * FLOAT32_BYTES)
    flags = dict(foreach=True) if variant == "torch_foreach" else dict(fused=True)
    sets = []
    for _ in range(copies):
        params = [torch.randn(shape, device="cuda", generator=generator).requires_grad_() for shape in shapes]
        for param in params:
            param.grad = torch.randn(param.shape, device="cuda", generator=generator)
        optimizer = getattr(torch.optim, spec.torch_name)(params, **spec.kwargs, **flags)
        optimizer.step()  # allocates state
        sets.append((params, optimizer))
    torch.cuda.synchronize()
    first = sets[0][0][-1].detach().flatten()[:8].clone()

    def step(index):
        sets[index][1].step()

    def check():
        last = sets[0][0][-1].detach().flatten()[:8]
        assert bool(torch.isfinite(last).all()) and not bool((last == first).all()), "the steps did nothing"

    return Row(step, copies, None, check, [sets])


def gpu_name():
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    return name.decode() if isinstance(name, bytes) else name


_CEILING_GBPS = {}  # (optimizer, size) -> GB/s of the ceiling row in this session
_STREAM = None


def fastopt_stream():
    """One non-blocking stream for the CuPy rows (graph capture is not allowed on the legacy default stream)."""
    global _STREAM
    if _STREAM is None:
        _STREAM = cupy.cuda.Stream(non_blocking=True)
    return _STREAM


@pytest.mark.parametrize("optimizer, size, variant", list(cases()))
def test_step(benchmark, optimizer, size, variant):
    spec = OPTIMIZERS[optimizer]
    stream = fastopt_stream()
    if variant == "ceiling":
        row = ceiling_row(spec, size, stream)
    elif variant.startswith("fastopt"):
        row = fastopt_row(spec, size, stream, graph=variant == "fastopt_graph")
    else:
        row = torch_row(spec, size, variant)
    moved = spec.bytes_per_param * params_of(size)
    steps = steps_per_round(moved, row.copies)
    timings = []
    try:
        row.run(steps)  # warm-up round
        benchmark.group = f"{optimizer} {size}"
        benchmark.pedantic(lambda: timings.append(row.run(steps) / steps), rounds=ROUNDS, warmup_rounds=1)
        row.check()
    finally:
        row.close()
    median_ms = statistics.median(timings[1:] if len(timings) > ROUNDS else timings)  # without pedantic's warm-up
    gbps = moved / (median_ms * 1e-3) / 1e9
    key = (optimizer, size)
    if variant == "ceiling":
        _CEILING_GBPS[key] = gbps
    benchmark.extra_info.update(
        optimizer=optimizer, variant=variant, size=size, params=params_of(size), tensors=len(shapes_of(size)),
        gpu=gpu_name(),
        copies=row.copies, steps_per_round=steps, bytes_per_step=moved, ms_per_step=median_ms, gb_per_s=gbps,
        params_per_s=params_of(size) / (median_ms * 1e-3))
    if key in _CEILING_GBPS:
        benchmark.extra_info["fraction_of_ceiling"] = gbps / _CEILING_GBPS[key]
