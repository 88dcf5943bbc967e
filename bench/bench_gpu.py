"""One optimizer step on a CUDA GPU: fastopt beside torch.optim (foreach and fused) and a copy ceiling, float32, and
AdamW in three mixed-precision configurations (bfloat16 params).

Lion, AdamWScheduleFree, SGDScheduleFree and LAMB have no torch.optim class: their groups have the ceiling and the
fastopt rows only (their public anchors, lion-pytorch and the schedulefree package, are for-loop or foreach code,
compared on the CPU by bench_cpu.py).

Every row is one (optimizer, size, variant); ids are ``OPTIMIZER-SIZE-VARIANT``, e.g. ``Adam-16M-torch_fused``:

    python -m pytest bench/bench_gpu.py --benchmark-json=bench/gpu.json
    python -m pytest bench/bench_gpu.py -k "Adam-16M"              # one optimizer at one size
    python -m pytest bench/bench_gpu.py -k "GPT2 and not SGD"       # the GPT-2-small parameter list
    python -m pytest bench/bench_gpu.py -k "bf16"                   # the mixed-precision AdamW rows

Rows of one (optimizer, size) group, ceiling first:

- ``ceiling``: ``cudaMemcpyAsync`` device to device of half the row's bytes (so it reads and writes as many bytes
  as the optimizer does): the bandwidth yardstick.
- ``fastopt``: ``fo.<Optimizer>(cupy params).step(grads)``, eager: one launch per step on a CuPy stream, plus
  Python's time to issue it (which is what limits small sizes).
- ``fastopt_graph``: the same step captured once in a CUDA graph per buffer set and replayed (the schedule advances
  on the device): the kernel without the Python overhead.
- ``torch_foreach``, ``torch_fused``: ``torch.optim`` with ``foreach=True`` / ``fused=True`` on the same GPU (RMSprop
  has no fused version). Skipped when torch has no CUDA.

Mixed precision: AdamW on bfloat16 params and grads (bfloat16 bits in uint16 CuPy arrays), in three optimizers of its
own, each with the rows ceiling, fastopt, fastopt_graph and torch_fused:

- ``AdamW_bf16_master``: a float32 master copy per param and float32 states (``master_weights=True``);
- ``AdamW_bf16_bf16states``: bfloat16 states, no master (``state_dtype="bfloat16"``): torch's fused AdamW's layout;
- ``AdamW_bf16``: float32 states, no master (the param rounded to nearest after every step).

``torch_fused`` there is ``torch.optim.AdamW(fused=True)`` on bfloat16 params: torch keeps the states in the params'
dtype and no master copy, so it moves its own bytes (14 per param), not the group's; each row records the bytes
it moves (``bytes_per_param``) and its GB/s counts those, while ``ms_per_step`` compares the rows' time.

8-bit states (``state_dtype="8bit"``: uint8 codes and a float32 absmax per 256 elements, fastopt.quantization): AdamW
on float32 params (``AdamW_8bit``) and on bfloat16 params without a master (``AdamW_bf16_8bit``, fastopt's
``_8bit_mixed`` kernel), each with the rows ceiling, fastopt, fastopt_graph and ``bitsandbytes``:
``bnb.optim.AdamW8bit`` on torch tensors of the same dtype (its blockwise 8-bit states: the same bytes per param),
skipped where bitsandbytes does not import. Tensors below 4096 elements keep float32 states in both (GPT-2's
LayerNorm and bias vectors). Compare with the float32 ``AdamW`` group of the same size.

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
buffer read once, every updated one written once; with a master copy the master is read instead of the param and
both are written), the same for every variant of a group except where noted, so GB/s reads against the ceiling.
Per param (reads + writes):

| group | fastopt rows | torch rows |
|---|---|---|
| SGD (float32) | 8 + 4 = 12 | 12 |
| SGD_momentum, RMSprop, Adagrad, Lion, SGDScheduleFree (float32) | 12 + 8 = 20 | 20 |
| Adam, AdamW, AdamWScheduleFree (float32) | 16 + 12 = 28 | 28 |
| LAMB (float32): two passes, the second re-reads the param and the states | 16 + 8, then 12 + 4 = 40 | |
| AdamW_bf16_master: bf16 param and grad, f32 master and states | 14 + 14 = 28 | 14 (torch_fused) |
| AdamW_bf16_bf16states: bf16 param, grad and states | 8 + 6 = 14 | 14 |
| AdamW_bf16: bf16 param and grad, f32 states | 12 + 10 = 22 | 14 (torch_fused) |
| AdamW_8bit: f32 param and grad, 8-bit states (codes, and 4 bytes of scale per 256) | 10 + 6 = 16 (and 1/16) | 16 (bitsandbytes) |
| AdamW_bf16_8bit: bf16 param and grad, 8-bit states | 6 + 4 = 10 (and 1/16) | 10 (bitsandbytes) |
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

try:
    import bitsandbytes  # noqa: E402
except Exception:  # not installed, or a build without kernels for this GPU
    bitsandbytes = None

FLOAT32_BYTES = 4
# Bytes per element of each storage; an 8-bit state is one byte of code and a float32 absmax per 256 elements.
STORAGE_BYTES = {"float32": 4, "bfloat16": 2, "8bit": 1 + FLOAT32_BYTES / 256}
SIZES = {"1M": 1 << 20, "16M": 1 << 24, "256M": 1 << 28, "GPT2": None}
ROUNDS = 15
ROUND_BYTES = 64e9  # each round moves about this much (about 20 ms at 3 TB/s), and at most MAX_STEPS steps
MAX_STEPS = 200
L2_MULTIPLE = 3


@dataclass(frozen=True)
class OptimizerSpec:
    fastopt: type
    torch_name: str  # None: torch.optim has no such optimizer
    kwargs: dict
    states: int  # state buffers per param
    torch_fused: bool  # torch.optim has a fused CUDA implementation
    storage: str = "float32"  # the params' and grads' dtype
    state_storage: str = "float32"  # fastopt's states (torch keeps its states in the params' dtype)
    master: bool = False  # fastopt keeps a float32 master copy per param
    two_passes: bool = False  # a rule with per-tensor norms (LAMB): a second pass re-reads the param and the states
    bitsandbytes: str = None  # the bitsandbytes optimizer of the 8-bit groups (bnb.optim.<name>)

    @property
    def options(self):  # fastopt's mixed-precision options
        options = dict(state_dtype=self.state_storage) if self.state_storage != "float32" else {}
        return dict(options, master_weights=True) if self.master else options

    @property
    def bytes_per_param(self):
        """fastopt's traffic: reads param (or its master), grad, states; writes param (and master), states; with two
        passes the second reads the param (or its master) and the states again."""
        param, state = STORAGE_BYTES[self.storage], STORAGE_BYTES[self.state_storage]
        master = FLOAT32_BYTES if self.master else 0
        again = (master or param) + self.states * state if self.two_passes else 0
        return (master or param) + param + self.states * state + param + master + self.states * state + again

    @property
    def torch_bytes_per_param(self):
        """torch.optim's traffic: states in the params' dtype, no master copy."""
        return STORAGE_BYTES[self.storage] * (3 + 2 * self.states)

    @property
    def distinct_bytes_per_param(self):  # memory per param: param, grad, states, master
        param = STORAGE_BYTES[self.storage]
        return 2 * param + self.states * STORAGE_BYTES[self.state_storage] + (FLOAT32_BYTES if self.master else 0)

    @property
    def mixed(self):
        return self.storage != "float32"


OPTIMIZERS = {
    "SGD": OptimizerSpec(fo.SGD, "SGD", dict(lr=1e-3), 0, True),
    "SGD_momentum": OptimizerSpec(fo.SGD, "SGD", dict(lr=1e-3, momentum=0.9), 1, True),
    "RMSprop": OptimizerSpec(fo.RMSprop, "RMSprop", dict(lr=1e-3), 1, False),
    "Adam": OptimizerSpec(fo.Adam, "Adam", dict(lr=1e-3), 2, True),
    "AdamW": OptimizerSpec(fo.AdamW, "AdamW", dict(lr=1e-3), 2, True),
    "Adagrad": OptimizerSpec(fo.Adagrad, "Adagrad", dict(lr=1e-3), 1, False),  # torch's fused Adagrad: CPU only
    "Lion": OptimizerSpec(fo.Lion, None, dict(lr=1e-4), 1, False),
    "AdamWScheduleFree": OptimizerSpec(fo.AdamWScheduleFree, None, dict(lr=1e-3), 2, False),
    "SGDScheduleFree": OptimizerSpec(fo.SGDScheduleFree, None, dict(lr=1e-3), 1, False),
    "LAMB": OptimizerSpec(fo.LAMB, None, dict(lr=1e-3), 2, False, two_passes=True),
    "AdamW_bf16_master": OptimizerSpec(fo.AdamW, "AdamW", dict(lr=1e-3), 2, True, "bfloat16", "float32", True),
    "AdamW_bf16_bf16states": OptimizerSpec(fo.AdamW, "AdamW", dict(lr=1e-3), 2, True, "bfloat16", "bfloat16"),
    "AdamW_bf16": OptimizerSpec(fo.AdamW, "AdamW", dict(lr=1e-3), 2, True, "bfloat16", "float32"),
    "AdamW_8bit": OptimizerSpec(fo.AdamW, None, dict(lr=1e-3), 2, False, "float32", "8bit", bitsandbytes="AdamW8bit"),
    "AdamW_bf16_8bit": OptimizerSpec(fo.AdamW, None, dict(lr=1e-3), 2, False, "bfloat16", "8bit",
                                     bitsandbytes="AdamW8bit"),
}


def variants(optimizer):
    spec = OPTIMIZERS[optimizer]
    torch_foreach = not spec.mixed and spec.torch_name is not None
    rows = ["ceiling", "fastopt", "fastopt_graph"] + (["torch_foreach"] if torch_foreach else [])
    return rows + (["torch_fused"] if spec.torch_fused else []) + (["bitsandbytes"] if spec.bitsandbytes else [])


def row_bytes_per_param(spec, variant):
    """The bytes per param the row moves in one step (the module docstring's table; bitsandbytes' 8-bit states
    move fastopt's bytes)."""
    return spec.torch_bytes_per_param if variant.startswith("torch") else spec.bytes_per_param


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


def random_cupy(shapes, rng, storage="float32"):
    """Standard normal arrays; bfloat16 as the uint16 bits CuPy holds them in (float32 values truncated)."""
    arrays = [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]
    if storage == "bfloat16":
        arrays = [(array.view(np.uint32) >> 16).astype(np.uint16) for array in arrays]
    return arrays


def ceiling_row(spec, size, stream):
    half = int(params_of(size) * spec.bytes_per_param // 2)  # the group's fastopt traffic
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
    copies = copies_needed(params_of(size) * spec.distinct_bytes_per_param)
    sets = []
    with stream:
        for _ in range(copies):
            params, grads = random_cupy(shapes, rng, spec.storage), random_cupy(shapes, rng, spec.storage)
            optimizer = spec.fastopt(params, **spec.kwargs, **spec.options)
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
    first = sets[0][0][-1][:4096].copy()

    if graph:
        def step(index):
            graphs[index].launch(stream)
    else:
        def step(index):
            params, grads, optimizer = sets[index]
            optimizer.step(grads)

    def check():
        last = sets[0][0][-1][:4096]
        # bfloat16 bits (4096 elements: a bfloat16 param near 1 does not move with an update of 1e-3 rounded to
        # nearest; smaller ones do)
        values = (last.astype(np.uint32) << 16).view(np.float32) if spec.mixed else last
        assert bool(cupy.all(cupy.isfinite(values))) and not bool(cupy.all(last == first)), "the steps did nothing"

    return Row(step, copies, stream, check, [sets] + ([graphs] if graph else []))


def torch_row(spec, size, variant):
    """torch.optim's ``spec.torch_name`` (foreach or fused), or for ``variant`` "bitsandbytes" bnb.optim's
    ``spec.bitsandbytes``, on torch tensors of the group's dtype."""
    if not TORCH_CUDA:
        pytest.skip("torch has no CUDA")
    if variant == "bitsandbytes" and bitsandbytes is None:
        pytest.skip("bitsandbytes does not import")
    generator = torch.Generator(device="cuda").manual_seed(0)
    shapes = shapes_of(size)
    dtype = torch.bfloat16 if spec.storage == "bfloat16" else torch.float32
    state_bytes = STORAGE_BYTES[spec.state_storage if variant == "bitsandbytes" else spec.storage]
    copies = copies_needed(params_of(size) * (2 * STORAGE_BYTES[spec.storage] + spec.states * state_bytes))
    sets = []
    for _ in range(copies):
        params = [torch.randn(shape, device="cuda", generator=generator, dtype=dtype).requires_grad_()
                  for shape in shapes]
        for param in params:
            param.grad = torch.randn(param.shape, device="cuda", generator=generator, dtype=dtype)
        if variant == "bitsandbytes":
            optimizer = getattr(bitsandbytes.optim, spec.bitsandbytes)(params, **spec.kwargs)
        else:
            flags = dict(foreach=True) if variant == "torch_foreach" else dict(fused=True)
            optimizer = getattr(torch.optim, spec.torch_name)(params, **spec.kwargs, **flags)
        optimizer.step()  # allocates state
        sets.append((params, optimizer))
    torch.cuda.synchronize()
    first = sets[0][0][-1].detach().flatten()[:4096].clone()

    def step(index):
        sets[index][1].step()

    def check():
        last = sets[0][0][-1].detach().flatten()[:4096]
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
    bytes_per_param = row_bytes_per_param(spec, variant)
    moved = bytes_per_param * params_of(size)
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
        gpu=gpu_name(), storage=spec.storage, state_storage=spec.state_storage, master=spec.master,
        bytes_per_param=bytes_per_param,
        copies=row.copies, steps_per_round=steps, bytes_per_step=moved, ms_per_step=median_ms, gb_per_s=gbps,
        params_per_s=params_of(size) / (median_ms * 1e-3))
    if key in _CEILING_GBPS:
        benchmark.extra_info["fraction_of_ceiling"] = gbps / _CEILING_GBPS[key]
