"""Mixed precision on the CPU: AdamW with 16-bit params and states, and the gradient-norm pass, each beside a
bandwidth ceiling with its own byte count, the float32 step and torch's fused AdamW on bfloat16 params.

Every test is one (configuration, size, threads) group whose rows are timed interleaved (as bench_cpu.py):

    python -m pytest bench/bench_mixed.py --benchmark-json=bench/mixed.json
    python bench/report_mixed.py bench/mixed.json            # writes bench/RESULTS_MIXED.md
    python -m pytest bench/bench_mixed.py -k "16M and 2t"     # quick

Configurations (AdamW, lr 1e-3; bytes per param = the least traffic of one fused pass):

| configuration | param | grad | master | states | reads | writes | B/param |
|---|---|---|---|---|---|---|--:|
| ``fp32`` | f32 | f32 | - | f32 | p, g, m, v | p, m, v | 28 |
| ``bf16`` | bf16 | bf16 | - | f32 | p, g, m, v | p, m, v | 22 |
| ``bf16_master`` | bf16 | bf16 | f32 | f32 | g, master, m, v | p, master, m, v | 28 |
| ``bf16_bf16states`` | bf16 | bf16 | - | bf16 | p, g, m, v | p, m, v | 14 |
| ``grad_norm`` | - | f32 | - | - | g | - | 4 |

Rows of a group: ``ceiling`` (a prange kernel with the configuration's reads and writes and trivial integer or
float math), ``fastopt``, ``fastopt_fp32`` (the float32 step on the same number of params: the time ratio the
issue's 1.6x speaks of) and, for ``bf16_bf16states``, ``torch_fused`` (``torch.optim.AdamW(fused=True)`` on
bfloat16 params, whose states are bfloat16 too: the same 14 B). ``grad_norm`` times the fused global-norm and
finiteness pass (``max_grad_norm`` / ``grad_scale`` / the guard) against a read-only ceiling.
"""
import ml_dtypes
import numba
import numpy as np
import pytest
import torch

import fastopt as fo
from bench_cpu import GPT2_PARAMS, ROUNDS, staggered, time_interleaved
from fastopt.kernels.cpu.jit import parallel_jit

BF16 = np.dtype(ml_dtypes.bfloat16)
SIZES = {"16M": 1 << 24, "GPT2": GPT2_PARAMS}  # GPT2: its parameter count, in one array per buffer
CONFIGS = {
    # name: (param dtype, grad dtype, fastopt options, bytes per param)
    "fp32": (np.float32, np.float32, {}, 28),
    "bf16": (BF16, BF16, {}, 22),
    "bf16_master": (BF16, BF16, dict(master_weights=True), 28),
    "bf16_bf16states": (BF16, BF16, dict(state_dtype="bfloat16"), 14),
    "grad_norm": (np.float32, np.float32, dict(max_grad_norm=1.0), 4),
}
# ---------------------------------------------------------------- ceilings: the traffic, trivial math
@parallel_jit
def ceiling_same_type(param, grad, m, v):  # all float32, or all 16-bit bits: the same source, compiled per type
    for i in numba.prange(param.size):
        g = grad[i]
        m[i] = m[i] + g
        v[i] = v[i] + g
        param[i] = param[i] + g


@parallel_jit
def ceiling_bf16(param, grad, m, v):  # 16-bit param and grad (bits), float32 states
    for i in numba.prange(param.size):
        g = grad[i]
        m[i] = m[i] + np.float32(g)
        v[i] = v[i] + np.float32(g)
        param[i] = param[i] + g


@parallel_jit
def ceiling_bf16_master(param, grad, master, m, v):  # the param is only written
    for i in numba.prange(param.size):
        g = np.float32(grad[i])
        value = master[i] + g
        master[i] = value
        m[i] = m[i] + g
        v[i] = v[i] + g
        param[i] = np.uint16(grad[i] + np.uint16(1))


@parallel_jit
def ceiling_read(grad):
    positive = 0
    for i in numba.prange(grad.size):
        positive += grad[i] > 0
    return positive


# ---------------------------------------------------------------- buffers
def buffer(size, dtype, ordinal, rng=None):
    """A staggered buffer (see fastopt.benchmark.staggered) of ``dtype``, random normal or zero."""
    raw = staggered(((size * np.dtype(dtype).itemsize + 3) // 4,), ordinal).view(np.uint8)
    array = raw[:size * np.dtype(dtype).itemsize].view(dtype)
    if rng is None:
        array[...] = 0
    else:
        array[...] = rng.standard_normal(size, dtype=np.float32).astype(dtype)
    return array


def ceiling_step(config, size):
    rng = np.random.default_rng(0)
    if config == "grad_norm":
        grad = buffer(size, np.float32, 1, rng)
        return lambda: ceiling_read(grad)
    if config == "fp32":
        arrays = [buffer(size, np.float32, k, rng) for k in range(4)]
        return lambda: ceiling_same_type(*arrays)
    bits = [buffer(size, np.uint16, k) for k in range(2)]
    if config == "bf16":
        states = [buffer(size, np.float32, 2 + k) for k in range(2)]
        return lambda: ceiling_bf16(*bits, *states)
    if config == "bf16_master":
        floats = [buffer(size, np.float32, 2 + k) for k in range(3)]
        return lambda: ceiling_bf16_master(*bits, *floats)
    states = [buffer(size, np.uint16, 2 + k) for k in range(2)]
    return lambda: ceiling_same_type(*bits, *states)


def fastopt_step(config, size):
    param_dtype, grad_dtype, options, _ = CONFIGS[config]
    rng = np.random.default_rng(0)
    param, grad = buffer(size, param_dtype, 0, rng), buffer(size, grad_dtype, 1, rng)
    optimizer = fo.AdamW([param], lr=1e-3, **options)
    if config == "grad_norm":
        backend, layout = optimizer._backend, optimizer._layout()
        return lambda: backend.grad_control(layout, [grad], 1.0, 1.0)
    return lambda: optimizer.step([grad])


def torch_fused_step(size):
    rng = np.random.default_rng(0)
    tensor = torch.from_numpy(rng.standard_normal(size, dtype=np.float32)).to(torch.bfloat16).requires_grad_()
    tensor.grad = torch.from_numpy(rng.standard_normal(size, dtype=np.float32)).to(torch.bfloat16)
    optimizer = torch.optim.AdamW([tensor], lr=1e-3, fused=True)
    return optimizer.step


def variants(config):
    rows = ["ceiling", "fastopt"]
    if config != "grad_norm":
        rows.append("fastopt_fp32")
    if config == "bf16_bf16states":
        rows.append("torch_fused")
    return rows


def make_step(config, size, variant):
    count = SIZES[size]
    if variant == "ceiling":
        return ceiling_step(config, count)
    if variant == "fastopt_fp32":
        return fastopt_step("fp32", count)
    if variant == "torch_fused":
        return torch_fused_step(count)
    return fastopt_step(config, count)


def row_bytes(config, size, variant):
    return (CONFIGS["fp32"][3] if variant == "fastopt_fp32" else CONFIGS[config][3]) * SIZES[size]


def cases():
    for size in SIZES:
        for config in CONFIGS:
            for threads in (1, 2):
                yield pytest.param(config, size, threads, id=f"{config}-{size}-{threads}t")


@pytest.mark.parametrize("config, size, threads", list(cases()))
def test_step(benchmark, config, size, threads):
    """All rows of one (configuration, size, threads) group, timed in interleaved rounds (see bench_cpu.test_step)."""
    numba.set_num_threads(threads)
    torch.set_num_threads(threads)
    names = variants(config)
    times = time_interleaved(benchmark, f"{config} {size} {threads} thread{'s' if threads > 1 else ''}",
                             {name: make_step(config, size, name) for name in names})
    ceiling = row_bytes(config, size, "ceiling") / float(np.median(times["ceiling"]))
    results = {}
    for name in names:
        median = float(np.median(times[name]))
        moved = row_bytes(config, size, name)
        results[name] = dict(ms_per_step=median * 1e3, bytes_per_step=moved, gb_per_s=moved / median / 1e9,
                             fraction_of_ceiling=moved / median / ceiling if name in ("ceiling", "fastopt") else None)
    benchmark.extra_info.update(optimizer=config, size=size, params=SIZES[size], threads=threads, rounds=ROUNDS,
                                bytes_per_param=CONFIGS[config][3], variants=results)
