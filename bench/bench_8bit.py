"""8-bit optimizer states (issue 16) on the CPU: what they cost in accuracy on real training, what they save in
memory, and what they do to the step time, beside bitsandbytes' and torchao's 8-bit AdamW.

    python bench/bench_8bit.py --task lm        # about 15 min of one core on the loaded 2-core machine
    python bench/bench_8bit.py --task lm --lr-factors 1.25,1.5 --arms "lr x"   # + float32 at 1.25x, 1.5x the rate
    python bench/bench_8bit.py --task digits    # about 1 min
    python bench/bench_8bit.py --task drift     # about 3 min: 8-bit states against float32 moments, same grads
    python bench/bench_8bit.py --task memory    # about 1 min: state bytes per param
    python bench/bench_8bit.py --task speed     # about 5 min and 10 GB of memory (2 threads; --runs 3)
    python bench/bench_8bit.py --task speed --threads 1 --no-gpt2
    python bench/bench_8bit.py --task speed --baseline-tree /tmp/before   # + an earlier checkout's 8-bit steps
    python bench/bench_8bit.py --task report    # only print the tables from --out (default bench/8bit.json)

Each task replaces its own section of ``--out`` (``--arms`` only those arms; an earlier speed section moves to
``history`` and the report summarises all of them).

**Accuracy** (``lm``, ``digits``): the same training run, seed for seed, with AdamW's states in float32 and in
8 bits. Arms: ``torch.optim.AdamW`` (the tuned baseline of ``bench/self_tuning.py``), ``fastopt.torch.AdamW`` with
``state_dtype="float32"`` and ``"8bit"`` (default ``min_8bit_size`` 4096; on digits also 0: every tensor 8-bit),
``bitsandbytes.optim.AdamW8bit`` (its CPU kernels; ``min_8bit_size`` 4096, and 0 on digits) and
``torchao.optim.AdamW8bit`` (torch.compile'd per param shape; quantizes tensors of >= 4096 elements that are a
multiple of its block of 256). Every arm: the same lr, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 and a warmup
(5% of the steps) + cosine-to-zero schedule (:class:`WarmupCosine`: ``self_tuning.warmup_cosine``'s factor, but it
writes a tensor lr in place, as torchao requires). The stochastic-rounding study adds ``fastopt.torch.AdamW`` with
``state_rounding=("exp_avg_sq",)`` and :class:`RoundTrippedAdamW`'s emulated arms (``EMULATED_ARMS``).

- ``lm``: ``bench/lm.py``'s byte-level transformer (137k params), batch 32, ``--lm-steps`` steps (default 1500: 3x
  self_tuning's 500, so that the comparison is of trained models, not of the first plateau), lr 1.78e-3
  (10^(-11/4), the rate self_tuning tuned for AdamW + warmup/cosine), seeds 0, 1, 2: final held-out loss in nats
  per byte. Target: 8-bit within 1% of float32.
- ``digits``: self_tuning's 64-128-10 MLP on fastopt.demo's digits split, 20 epochs at batch 64 (460 steps), lr
  0.1 (its tuned AdamW rate), seeds 0-4: test accuracy. Target: within 0.5 points of float32 (one test image is
  0.28 points). The 128x10 output layer (1280 elements) stays float32 at the default threshold.

Each 8-bit arm also reports the share of params whose states are stored in 8 bits and the state bytes per param,
counted from the tensors in ``optimizer.state`` (each array once); ``memory`` does the same after one step on the
accuracy models, 32M params and GPT-2 small. ``drift`` trains the LM with each 8-bit AdamW beside float32 moments
fed the same grads, and compares the decoded states and the Adam direction with them at 10%, 50% and 100% of the
steps.

**Speed** (``speed``; ``--threads`` Numba and torch threads, default 2): AdamW steps timed in interleaved rounds
(every variant once per round, the first variant rotating; each variant's median over ``--rounds``), the whole
measurement repeated ``--runs`` times in the process, each run's ratios reported apart:

- 32M float32 params in one tensor: fastopt with float32 states (28 B/param moved), with 8-bit states (16 B/param:
  param 4+4, grad 4, codes 1+1 per state, and 2 x 2 x 4/256 B of block scales), bfloat16 params and grads with
  8-bit states (10 B/param), ``torch.optim.AdamW(fused=True)``, ceilings for 28, 16 and 10 B/param (Numba prange
  loops with the same reads and writes and trivial math), ``bitsandbytes.optim.AdamW8bit`` and
  ``torchao.optim.AdamW8bit`` (one step a round: they take about 0.4 s).
- GPT-2 small's 148 tensors (124M params): the fastopt variants, torch's fused AdamW and the ceilings over one flat
  buffer of the same size (the 8-bit anchors are left out here: 2 s a step, and torchao compiles per shape).
- Per-element compute cost: one thread, the step on a tensor of 64K elements (in L2: 1.8 MB with float32 states,
  0.66 MB with 8-bit ones), less the step on 256 elements (the per-step host cost), over the 65280 elements between:
  ns per element of the kernel's loop with no DRAM traffic, beside the same ceilings.

``--baseline-tree DIR`` (a checkout of another commit, e.g. ``git clone --shared . /tmp/before`` and a checkout of
the commit there) adds that tree's fastopt, imported as a package of its own (``fastopt_baseline``, its own kernels and
kernel cache), as the variants ``baseline_8bit`` and ``baseline_bf16_8bit`` to all three measurements: a change to the
kernels timed before and after in the same rounds. Use a checkout for nothing else: Numba's cache entries name the
package they were compiled under, and entries written under another name fail to load.
"""
import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import numba
import numpy as np
import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))  # this tree's fastopt
sys.path.insert(0, BENCH)  # lm.py, self_tuning.py

import fastopt as fo  # noqa: E402
import fastopt.torch  # noqa: E402
from fastopt import benchmark, quantization  # noqa: E402
from fastopt.kernels.cpu.codes import decode, encode_block  # noqa: E402
from fastopt.kernels.cpu.jit import jit, parallel_jit, serial_twin  # noqa: E402
from self_tuning import finite_or_none, source_tree  # noqa: E402  (the run's commit; JSON without inf)
from fastopt.kernels.cpu.views import window  # noqa: E402

PAGE = 4096
CODE_BLOCK = 256
LM_LR = 10 ** (-11 / 4)  # self_tuning's tuned AdamW rate on the LM (warmup + cosine, batch 32)
DIGITS_LR = 0.1  # and on digits
WEIGHT_DECAY = 0.01
BASELINE = None  # --baseline-tree's fastopt (a module), or None


# ---------------------------------------------------------------------------------------------- the optimizers
def optional_import(name):
    try:
        return __import__(name, fromlist=["_"])
    except Exception as error:  # noqa: BLE001 (any failure: the arm is reported as not run, with why)
        return error


def arm_factories(lr, with_min_zero, lr_factors=()):
    """{label: (make_optimizer(params), implementation)}: AdamW with its states in float32 or 8 bits, same
    hyperparameters; plus fastopt float32 at ``lr_factors`` times the rate (is 8-bit's difference a step size?). A
    label whose package is missing maps to (None, why)."""
    import fastopt.torch

    common = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
    arms = {
        "torch AdamW float32": (lambda params: torch.optim.AdamW(params, **common), "torch.optim.AdamW"),
        "fastopt float32": (lambda params: fastopt.torch.AdamW(params, **common, state_dtype="float32"),
                            "fastopt.torch.AdamW(state_dtype='float32')"),
        "fastopt 8bit": (lambda params: fastopt.torch.AdamW(params, **common, state_dtype="8bit"),
                         "fastopt.torch.AdamW(state_dtype='8bit')"),
        "fastopt 8bit, state_rounding exp_avg_sq": (
            lambda params: fastopt.torch.AdamW(params, **common, state_dtype="8bit", state_rounding=("exp_avg_sq",)),
            "fastopt.torch.AdamW(state_dtype='8bit', state_rounding=('exp_avg_sq',))"),
    }
    for label, stochastic in EMULATED_ARMS.items():
        arms[label] = (lambda params, stochastic=stochastic: RoundTrippedAdamW(params, stochastic, **common),
                       f"RoundTrippedAdamW(stochastic={stochastic!r}): fastopt.torch.AdamW, float32 states "
                       "round-tripped through quantization.quantize after each step")
    for factor in lr_factors:
        arms[f"fastopt float32, lr x{factor:g}"] = (
            lambda params, factor=factor: fastopt.torch.AdamW(params, **dict(common, lr=lr * factor)),
            f"fastopt.torch.AdamW(state_dtype='float32'), lr {lr * factor:.3g}")
    if with_min_zero:
        arms["fastopt 8bit, min_8bit_size=0"] = (
            lambda params: fastopt.torch.AdamW(params, **common, state_dtype="8bit", min_8bit_size=0),
            "fastopt.torch.AdamW(state_dtype='8bit', min_8bit_size=0)")
    bnb = optional_import("bitsandbytes.optim")
    if isinstance(bnb, Exception):
        arms["bitsandbytes AdamW8bit"] = (None, f"not run: {bnb!r}")
    else:
        version = __import__("bitsandbytes").__version__
        arms["bitsandbytes AdamW8bit"] = (lambda params: bnb.AdamW8bit(params, **common),
                                          f"bitsandbytes.optim.AdamW8bit {version}")
        if with_min_zero:
            arms["bitsandbytes AdamW8bit, min_8bit_size=0"] = (
                lambda params: bnb.AdamW8bit(params, **common, min_8bit_size=0),
                f"bitsandbytes.optim.AdamW8bit {version}, min_8bit_size=0")
    torchao = optional_import("torchao.optim")
    if isinstance(torchao, Exception):
        arms["torchao AdamW8bit"] = (None, f"not run: {torchao!r}")
    else:
        version = __import__("torchao").__version__
        arms["torchao AdamW8bit"] = (lambda params: torchao.AdamW8bit(params, **common),
                                     f"torchao.optim.AdamW8bit {version}")
    return arms


# The stretch question of issue 16: does stochastic rounding of the codes remove the second moment's drift? Asked of
# an emulation before any kernel: "nearest" must reproduce the "fastopt 8bit" arm's losses exactly (the emulation's
# check), the others differ from it only in how codes round.
EMULATED_ARMS = {"emulated 8bit, nearest": (), "emulated 8bit, stochastic codes": ("exp_avg", "exp_avg_sq"),
                 "emulated 8bit, stochastic exp_avg_sq": ("exp_avg_sq",)}


class RoundTrippedAdamW(fastopt.torch.AdamW):
    """fastopt.torch.AdamW with float32 states, each moment of a param of at least ``min_8bit_size`` elements
    replaced after every step by its 8-bit round trip (``quantization.quantize`` then ``dequantize``): the values
    ``state_dtype="8bit"`` stores, the next step's decoded states. The states named in ``stochastic`` are coded with
    stochastic rounding (``quantize(noise=)``, noise from a generator seeded by ``seed``)."""

    round_trips = True  # for decoded_states: the states are decoded 8-bit values

    def __init__(self, params, stochastic=(), seed=0, min_8bit_size=quantization.MIN_8BIT_SIZE, **options):
        super().__init__(params, **options)
        self.stochastic, self.min_8bit_size = tuple(stochastic), min_8bit_size
        self.noise = np.random.default_rng(seed)

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state.get(param)
                if not state or param.numel() < self.min_8bit_size:
                    continue
                for name in ("exp_avg", "exp_avg_sq"):
                    values, signed = state[name].numpy(), quantization.STATE_SIGNED[name]
                    noise = (self.noise.integers(0, 2 ** 32, values.size, dtype=np.uint32)
                             if name in self.stochastic else None)
                    codes, scales = quantization.quantize(values, signed, noise=noise)
                    values[...] = quantization.dequantize(codes, scales, signed).reshape(values.shape)
        return loss


class WarmupCosine:
    """Linear warmup to the peak rate over ``warmup_steps``, then cosine to zero at ``total_steps``; ``step()`` after
    every optimizer step. The factor of ``self_tuning.warmup_cosine`` (a LambdaLR), applied the way torchao needs:
    a tensor lr is filled in place (torchao refuses a float), a float one replaced."""

    def __init__(self, optimizer, total_steps, warmup_steps):
        self.optimizer, self.total, self.warmup, self.count = optimizer, total_steps, warmup_steps, 0
        self.peaks = [float(group["lr"]) for group in optimizer.param_groups]
        self.apply()

    def factor(self, step):
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    def apply(self):
        for group, peak in zip(self.optimizer.param_groups, self.peaks):
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(peak * self.factor(self.count))
            else:
                group["lr"] = peak * self.factor(self.count)

    def step(self):
        self.count += 1
        self.apply()


def storages(value):
    """(data address, bytes, bytes allocated) of every array a state value holds: a tensor, a NumPy array, or a
    torchao 8-bit state (a tensor subclass whose codes, scale and qmap are tensors of their own). A NumPy array's
    allocation is its base buffer where it has one (fastopt pads and aligns its state buffers); a tensor's is its
    own bytes."""
    if hasattr(value, "codes") and hasattr(value, "scale"):
        return [item for name in ("codes", "scale", "qmap") if hasattr(value, name)
                for item in storages(getattr(value, name))]
    if torch.is_tensor(value):
        nbytes = value.numel() * value.element_size()
        return [(value.data_ptr(), nbytes, nbytes)]
    if isinstance(value, np.ndarray):
        base = value if value.base is None else value.base
        return [(value.ctypes.data, value.nbytes, getattr(base, "nbytes", value.nbytes))]
    return []


def is_8bit(value):
    return (hasattr(value, "codes") and hasattr(value, "scale")) or getattr(value, "dtype", None) in (
        torch.uint8, torch.int8, np.uint8, np.int8)


def state_memory(state_by_param, sizes):
    """{share_8bit, bytes_per_param, allocated_bytes_per_param, state_bytes, params}: the share of params (by count)
    with an 8-bit state; the bytes of every state array (each once) over the params, and the bytes allocated for
    them (alignment padding included). ``state_by_param``: [state dict] parallel to ``sizes``."""
    seen, total, allocated, coded = set(), 0, 0, 0
    for state, size in zip(state_by_param, sizes):
        if any(is_8bit(value) for value in state.values()):
            coded += size
        for value in state.values():
            for address, nbytes, allocation in storages(value):
                if (address, nbytes) not in seen:
                    seen.add((address, nbytes))
                    total += nbytes
                    allocated += allocation
    params = sum(sizes)
    return dict(share_8bit=coded / params, bytes_per_param=total / params, allocated_bytes_per_param=allocated / params,
                state_bytes=total, params=params)


def torch_state_memory(optimizer):
    params = [param for group in optimizer.param_groups for param in group["params"]]
    return state_memory([optimizer.state[param] for param in params], [param.numel() for param in params])


# ---------------------------------------------------------------------------------------------- accuracy tasks
def accuracy_task(name, arms, seeds, train, log):
    """Every arm on every seed: {label: {implementation, tree, date, runs: [{seed, loss, accuracy, seconds,
    memory}]}}."""
    results = {}
    for label, (make, implementation) in arms.items():
        results[label] = dict(implementation=implementation, tree=source_tree(),
                              date=datetime.datetime.now().isoformat(timespec="seconds"), runs=[])
        if make is None:
            log(f"  {name:6} {label:38} {implementation}")
            continue
        for seed in seeds:
            built = []

            def make_and_keep(params, make=make):
                built.append(make(params))
                return built[-1]

            start = time.perf_counter()
            try:
                result = train(make_and_keep, seed)
            except Exception as error:  # noqa: BLE001 (an anchor that fails on the CPU: recorded, not fatal)
                results[label]["implementation"] += f"; FAILED: {error!r}"[:600]
                log(f"  {name:6} {label:38} seed {seed}: FAILED {error!r}"[:300])
                break
            run = dict(seed=seed, seconds=time.perf_counter() - start, memory=torch_state_memory(built[0]), **result)
            results[label]["runs"].append(run)
            accuracy = f"  accuracy {run['accuracy']:.4f}" if run.get("accuracy") is not None else ""
            log(f"  {name:6} {label:38} seed {seed}  loss {run['loss']:.4f}{accuracy}  8-bit share "
                f"{run['memory']['share_8bit']:.3f}, {run['memory']['bytes_per_param']:.3f} B/param  "
                f"({run['seconds']:.1f} s)")
    return results


def selected(arms, only):
    """The arms whose label contains one of the comma-separated ``only`` (all of them when ``only`` is None)."""
    if not only:
        return arms
    return {label: arm for label, arm in arms.items() if any(part in label for part in only.split(","))}


def lm_accuracy(steps, seeds, log, only=None, lr_factors=()):
    import lm

    config = lm.LMConfig()
    warmup = max(1, round(0.05 * steps))

    def train(make_optimizer, seed):
        result = lm.train_lm(make_optimizer, steps=steps, batch_size=32, seed=seed, config=config,
                             lr_schedule=lambda optimizer: WarmupCosine(optimizer, steps, warmup))
        return dict(loss=result["final_heldout_loss"], accuracy=None, diverged=result["diverged"],
                    curve=[(point["step"], point["heldout_loss"]) for point in result["curve"]])

    corpus = lm.load_corpus()
    arms = accuracy_task("lm", selected(arm_factories(LM_LR, with_min_zero=False, lr_factors=lr_factors), only), seeds,
                         train, log)
    return dict(settings=dict(model=vars(config), steps=steps, batch_size=32, lr=LM_LR, warmup_steps=warmup,
                              weight_decay=WEIGHT_DECAY, corpus_sha256=corpus.sha256, seeds=list(seeds)),
                arms=arms, metric="held-out loss (nats/byte)")


def digits_accuracy(seeds, log, only=None):
    import self_tuning

    task = self_tuning.digits_task(quick=False)
    batch = task.batch_size
    steps = task.steps(batch)
    warmup = max(1, round(0.05 * steps))

    def train(make_optimizer, seed):
        result = task.train(make_optimizer, lambda optimizer: WarmupCosine(optimizer, steps, warmup), batch, steps,
                            seed)
        return dict(loss=result["loss"], accuracy=result["accuracy"], diverged=result["diverged"])

    arms = accuracy_task("digits", selected(arm_factories(DIGITS_LR, with_min_zero=True), only), seeds, train,
                         log)
    return dict(settings=dict(task.settings, batch_size=batch, steps=steps, lr=DIGITS_LR, warmup_steps=warmup,
                              weight_decay=WEIGHT_DECAY, seeds=list(seeds)),
                arms=arms, metric="test accuracy")


# ---------------------------------------------------------------------------------------------- state drift
class ShadowMoments:
    """Float32 AdamW moments fed the grads the 8-bit optimizer sees (``update()`` after each backward, before the
    step): what its states would hold without rounding, along the same trajectory."""

    def __init__(self, params, betas=(0.9, 0.999)):
        self.params, self.betas = list(params), betas
        self.exp_avg = [torch.zeros_like(param) for param in self.params]
        self.exp_avg_sq = [torch.zeros_like(param) for param in self.params]

    def update(self):
        beta1, beta2 = self.betas
        for param, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            m.lerp_(param.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)


def decoded_states(optimizer, param):
    """(first moment, second moment, stored in 8 bits) of ``param`` in ``optimizer``'s state, as float32 NumPy arrays
    decoded where 8-bit: fastopt.torch (``exp_avg`` codes + ``exp_avg_absmax``), bitsandbytes (``state1``/``state2``
    codes, ``qmap1``/``qmap2``, ``absmax1``/``absmax2``, blocks of 256) or torchao (``OptimState8bit``)."""
    from fastopt import quantization

    state = optimizer.state[param]
    if "state1" in state:  # bitsandbytes
        out = []
        for k in (1, 2):
            codes = state[f"state{k}"]
            if codes.dtype == torch.uint8:
                scales = state[f"absmax{k}"].repeat_interleave(CODE_BLOCK)[:codes.numel()]
                out.append((state[f"qmap{k}"][codes.reshape(-1).long()] * scales).numpy())
            else:
                out.append(codes.reshape(-1).numpy().copy())
        return out[0], out[1], state["state1"].dtype == torch.uint8
    out, coded = [], False
    for name in ("exp_avg", "exp_avg_sq"):
        value = state[name]
        if hasattr(value, "dequantize") and hasattr(value, "codes"):  # torchao
            out.append(value.dequantize().reshape(-1).numpy())
            coded = True
        elif value.dtype == torch.uint8:  # fastopt
            out.append(quantization.dequantize(value.numpy().reshape(-1), state[name + "_absmax"].numpy(),
                                               quantization.STATE_SIGNED[name]))
            coded = True
        else:
            out.append(value.reshape(-1).numpy().copy())
            coded = coded or (getattr(optimizer, "round_trips", False) and param.numel() >= optimizer.min_8bit_size)
    return out[0], out[1], coded


def drift_statistics(optimizer, shadow, eps=1e-8):
    """Over the 8-bit tensors' elements: the share of positive float32 second moments decoded as 0, the decoded second
    moment over the float32 one where neither is 0 (quantiles, geometric mean), the first moment's
    relative error, and the Adam direction m / (sqrt(v) + eps) of the decoded states against the shadow's (norm of the
    difference over the norm; ratio of norms)."""
    ratios, m_errors, directions, shadow_directions = [], [], [], []
    decoded_zero = shadow_positive = 0
    for param, m_shadow, v_shadow in zip(shadow.params, shadow.exp_avg, shadow.exp_avg_sq):
        m, v, coded = decoded_states(optimizer, param)
        if not coded:
            continue
        m_shadow, v_shadow = m_shadow.numpy().reshape(-1), v_shadow.numpy().reshape(-1)
        live = v_shadow > 0
        decoded_zero += int(np.count_nonzero(live & (v == 0)))
        shadow_positive += int(np.count_nonzero(live))
        live &= v > 0
        ratios.append(v[live] / v_shadow[live])
        nonzero = m_shadow != 0
        m_errors.append(np.abs(m[nonzero] - m_shadow[nonzero]) / np.abs(m_shadow[nonzero]))
        directions.append(m / (np.sqrt(v) + eps))
        shadow_directions.append(m_shadow / (np.sqrt(v_shadow) + eps))
    ratios, m_errors = np.concatenate(ratios), np.concatenate(m_errors)
    direction, shadow_direction = np.concatenate(directions), np.concatenate(shadow_directions)
    return dict(v_ratio_quantiles={str(q): float(np.quantile(ratios, q)) for q in (0.01, 0.1, 0.5, 0.9, 0.99)},
                v_ratio_mean=float(ratios.mean()), v_ratio_geometric_mean=float(np.exp(np.log(ratios).mean())),
                v_decoded_zero_share=decoded_zero / shadow_positive,
                m_relative_error_median=float(np.median(m_errors)),
                direction_error=float(np.linalg.norm(direction - shadow_direction) / np.linalg.norm(shadow_direction)),
                direction_norm_ratio=float(np.linalg.norm(direction) / np.linalg.norm(shadow_direction)))


def state_drift(steps, seed, checkpoints, log):
    """LM runs (the accuracy task's settings) with each 8-bit AdamW, their decoded states compared at ``checkpoints``
    with float32 moments fed the same grads: {label: [points]}."""
    import lm

    config, warmup = lm.LMConfig(), max(1, round(0.05 * steps))
    corpus = lm.load_corpus()
    offsets = torch.arange(config.context + 1)
    arms = {label: arm for label, arm in arm_factories(LM_LR, with_min_zero=False).items()
            if "8bit" in label and arm[0] is not None}
    result = dict(steps=steps, seed=seed, arms={})
    for label, (make, implementation) in arms.items():
        torch.manual_seed(seed)
        model = lm.CharTransformer(config)
        generator = torch.Generator().manual_seed(seed)
        optimizer = make(model.parameters())
        schedule = WarmupCosine(optimizer, steps, warmup)
        shadow = ShadowMoments(model.parameters())
        points = []
        for step in range(1, steps + 1):
            starts = torch.randint(0, len(corpus.train) - config.context - 1, (32, 1), generator=generator)
            loss = lm.next_byte_loss(model, corpus.train[starts + offsets].long())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                shadow.update()
            optimizer.step()
            schedule.step()
            if step in checkpoints:
                points.append(dict(step=step, **drift_statistics(optimizer, shadow)))
                log(f"  drift {label}, step {step}: v ratio quantiles "
                    f"{ {q: round(x, 3) for q, x in points[-1]['v_ratio_quantiles'].items()} }, decoded 0: "
                    f"{points[-1]['v_decoded_zero_share']:.4f}, direction error {points[-1]['direction_error']:.3f}, "
                    f"norm ratio {points[-1]['direction_norm_ratio']:.3f}")
        result["arms"][label] = dict(implementation=implementation, points=points)
    return result


# ---------------------------------------------------------------------------------------------- state memory
def memory_table(log):
    """State bytes per param after one step, per optimizer, on the accuracy models and the speed sizes: {model:
    {label: state_memory}}. The layout of the states does not depend on training, so one step with random grads
    shows it."""
    import lm
    import self_tuning

    rng = np.random.default_rng(3)
    result = {}

    def torch_model(name, model, arms):
        result[name] = {}
        for label, (make, implementation) in arms.items():
            if make is None:
                continue
            for param in model.parameters():
                param.grad = torch.from_numpy(rng.standard_normal(tuple(param.shape), dtype=np.float32) * 1e-2)
            optimizer = make(list(model.parameters()))
            optimizer.step()
            result[name][label] = torch_state_memory(optimizer)
            log(f"  memory {name:11} {label:40} {result[name][label]['bytes_per_param']:.3f} B/param, 8-bit share "
                f"{result[name][label]['share_8bit']:.3f}")

    torch_model("LM", lm.CharTransformer(lm.LMConfig()), arm_factories(LM_LR, with_min_zero=False))
    torch_model("digits MLP", self_tuning.DigitsMLP(), arm_factories(DIGITS_LR, with_min_zero=True))
    for name, shapes in (("32M tensor", [(32 << 20,)]), ("GPT-2 small", benchmark.gpt2_small_shapes())):
        sizes = [int(np.prod(shape)) for shape in shapes]
        result[name] = {}
        for label, dtype, options in (("fastopt float32", np.float32, {}),
                                      ("fastopt 8bit", np.float32, dict(state_dtype="8bit")),
                                      ("fastopt bf16 params, 8bit", bf16_dtype(), dict(state_dtype="8bit"))):
            params = [np.zeros(shape, dtype) for shape in shapes]
            optimizer = fo.AdamW(params, lr=1e-3, **options)
            optimizer.step([np.full(shape, 1e-2, dtype) for shape in shapes])
            result[name][label] = state_memory([optimizer.state[index] for index in range(len(params))], sizes)
            log(f"  memory {name:11} {label:40} {result[name][label]['bytes_per_param']:.3f} B/param "
                f"({result[name][label]['allocated_bytes_per_param']:.3f} allocated)")
            del optimizer, params
        tensors = [torch.zeros(shape, requires_grad=True) for shape in shapes]
        for tensor in tensors:
            tensor.grad = torch.full_like(tensor, 1e-2)
        common = dict(lr=1e-3, weight_decay=WEIGHT_DECAY)
        makers = {"torch AdamW fused float32": lambda params: torch.optim.AdamW(params, **common, fused=True)}
        bnb = optional_import("bitsandbytes.optim")
        if not isinstance(bnb, Exception):
            makers["bitsandbytes AdamW8bit"] = lambda params: bnb.AdamW8bit(params, **common)
        torchao = optional_import("torchao.optim")
        if not isinstance(torchao, Exception) and len(shapes) == 1:  # torchao compiles per shape: one tensor only
            makers["torchao AdamW8bit"] = lambda params: torchao.AdamW8bit(params, **common)
        for label, make in makers.items():
            optimizer = make(tensors)
            optimizer.step()
            result[name][label] = torch_state_memory(optimizer)
            log(f"  memory {name:11} {label:40} {result[name][label]['bytes_per_param']:.3f} B/param")
            del optimizer
    return result


def memory_markdown(memory):
    lines = ["## State memory (bytes per param, after one step)", "",
             "Bytes of every array in the optimizer's state (each once: codes, block scales, float32 states of small "
             "tensors, bitsandbytes' per-tensor code maps, step counters) over the params; in brackets, for "
             "fastopt's NumPy optimizer, the bytes allocated for them (alignment and staggering padding included). "
             "Target for Adam with 8-bit states: <= 2.1.", "",
             "| model | optimizer | state B/param | 8-bit share of params |", "|---|---|--:|--:|"]
    for model, rows in memory.items():
        for label, row in rows.items():
            allocated = row.get("allocated_bytes_per_param", row["bytes_per_param"])
            extra = f" ({allocated:.3f})" if abs(allocated - row["bytes_per_param"]) > 5e-4 else ""
            lines.append(f"| {model} | {label} | {row['bytes_per_param']:.3f}{extra} | {row['share_8bit']:.3f} |")
    return lines + [""]


# ---------------------------------------------------------------------------------------------- speed: ceilings
@parallel_jit
def ceiling_8bit_elements(param, grad, codes1, codes2):
    """The element traffic of an 8-bit AdamW step, trivial math: read param, grad and two code arrays, write param
    and the codes (float32 params: 14 B/param; bfloat16 params and grads as uint16 bits: 8 B/param). The same source
    compiles for either param type."""
    for i in numba.prange(param.size):
        g = grad[i]
        codes1[i] = codes1[i] + np.uint8(1)
        codes2[i] = codes2[i] + np.uint8(3)
        param[i] = param[i] + g


@parallel_jit
def ceiling_8bit_scales(scales1, scales2, decay):
    """The block scales' traffic: read and write two float32 arrays of one scale per 256 elements (2 x 2 x 4/256 B
    per param)."""
    for b in numba.prange(scales1.size):
        scales1[b] = scales1[b] * decay
        scales2[b] = scales2[b] * decay


def staggered(size, ordinal, dtype=np.float32):
    """An uninitialised array of ``dtype`` starting 128 + 256 * ordinal bytes (mod 4 KiB) into a page, as
    ``fastopt.benchmark.staggered`` for float32."""
    dtype = np.dtype(dtype)
    base = np.empty(size * dtype.itemsize + PAGE, dtype=np.uint8)
    start = (128 + 256 * (ordinal % 16) - base.ctypes.data) % PAGE
    return base[start:start + size * dtype.itemsize].view(dtype)


def ceiling_8bit_step(size, param, grad):
    codes1, codes2 = staggered(size, 5, np.uint8), staggered(size, 6, np.uint8)
    codes1.fill(0)
    codes2.fill(0)
    blocks = -(-size // CODE_BLOCK)
    scales1, scales2 = staggered(blocks, 7), staggered(blocks, 8)
    scales1.fill(1)
    scales2.fill(1)

    def step():
        ceiling_8bit_elements(param, grad, codes1, codes2)
        ceiling_8bit_scales(scales1, scales2, np.float32(0.5))
    return step


# ---------------------------------------------------------------------------------------------- speed: yardsticks
# Not fastopt: loops that say where an 8-bit step's time goes. ``single_purpose_adamw_8bit`` is AdamW with 8-bit
# states written for this one case (fastopt's codec functions, its element arithmetic in its order, blocks of 256
# through two float32 strips), checked to give fastopt's bytes (``check_single_purpose``): the cost of the same work
# without the generic loop's machinery. The component loops time the parts alone, flat over 64K elements.
@jit
def adamw_8bit_block(param, grad, codes1, codes2, scale1, scale2, strip1, strip2, step_rate, decay, beta1_complement,
                     beta2, beta2_complement, bias_correction2_sqrt, eps):
    for i in range(param.shape[0]):
        g = grad[i]
        m = decode(codes1[i], scale1, True)
        v = decode(codes2[i], scale2, False)
        m = m + beta1_complement * (g - m)  # torch.lerp(m, g, 1 - beta1), weight < 0.5
        v = v * beta2 + beta2_complement * g * g
        param[i] = param[i] * decay + step_rate * m / (np.sqrt(v) / bias_correction2_sqrt + eps)
        strip1[i] = m
        strip2[i] = v


@parallel_jit
def single_purpose_adamw_8bit(param, grad, codes1, codes2, scales1, scales2, step_rate, decay, beta1_complement,
                              beta2, beta2_complement, bias_correction2_sqrt, eps):
    """codes1: int8 (signed map), codes2: uint8 (unsigned map); chunks of 64K elements over the threads."""
    size = param.shape[0]
    chunk = 1 << 16
    for k in numba.prange((size + chunk - 1) // chunk):
        strip1 = np.empty(CODE_BLOCK, np.float32)
        strip2 = np.empty(CODE_BLOCK, np.float32)
        stop = min(size, (k + 1) * chunk)
        for offset in range(k * chunk, stop, CODE_BLOCK):
            length = min(CODE_BLOCK, stop - offset)
            block = offset // CODE_BLOCK
            part1, part2 = window(codes1, offset, length), window(codes2, offset, length)
            window1, window2 = window(strip1, 0, length), window(strip2, 0, length)
            adamw_8bit_block(window(param, offset, length), window(grad, offset, length), part1, part2,
                             scales1[block], scales2[block], window1, window2, step_rate, decay, beta1_complement,
                             beta2, beta2_complement, bias_correction2_sqrt, eps)
            scales1[block] = encode_block(window1, part1)
            scales2[block] = encode_block(window2, part2)


class SinglePurposeAdamW8bit:
    """``step(grad)`` over a float32 ``param`` with zero-initialised 8-bit states; the step scalars as fastopt's AdamW
    computes them (float64 on the host, rounded to float32)."""

    def __init__(self, param, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY, kernel=None):
        self.param, self.lr, self.betas, self.eps, self.weight_decay = param, lr, betas, eps, weight_decay
        self.count = 0
        self.kernel = kernel or single_purpose_adamw_8bit
        blocks = -(-param.size // CODE_BLOCK)
        self.codes1, self.codes2 = np.zeros(param.size, np.int8), np.zeros(param.size, np.uint8)
        self.scales1, self.scales2 = np.zeros(blocks, np.float32), np.zeros(blocks, np.float32)

    def step(self, grad):
        self.count += 1
        t, (beta1, beta2), f32 = float(self.count), self.betas, np.float32
        self.kernel(self.param, grad, self.codes1, self.codes2, self.scales1, self.scales2,
                    f32(-(self.lr / (1 - beta1 ** t))), f32(1 - self.lr * self.weight_decay), f32(1 - beta1),
                    f32(beta2), f32(1 - beta2), f32((1 - beta2 ** t) ** 0.5), f32(self.eps))


def check_single_purpose(size=3 * 65536 + 777, steps=3):
    """Whether the single-purpose kernel gives fastopt's params, codes and scales, byte for byte, over a few steps
    (else its time would say nothing about fastopt's)."""
    rng = np.random.default_rng(2)
    param = rng.standard_normal(size, dtype=np.float32)
    twin = param.copy()
    optimizer = fo.AdamW([twin], lr=1e-3, weight_decay=WEIGHT_DECAY, state_dtype="8bit")
    mine = SinglePurposeAdamW8bit(param)
    for k in range(steps):
        grad = rng.standard_normal(size, dtype=np.float32) * np.float32(10.0 ** (k - 1))
        optimizer.step([grad])
        mine.step(grad)
    state = optimizer.state[0]
    pairs = ((param, twin), (mine.codes1, state["exp_avg"]), (mine.scales1, state["exp_avg_absmax"]),
             (mine.codes2, state["exp_avg_sq"]), (mine.scales2, state["exp_avg_sq_absmax"]))
    return all(np.asarray(a).tobytes() == np.asarray(b).tobytes() for a, b in pairs)


@jit
def adam_math_float32(param, grad, exp_avg, exp_avg_sq, step_rate, decay, beta1_complement, beta2, beta2_complement,
                      bias_correction2_sqrt, eps):
    """AdamW's element arithmetic alone over float32 arrays, flat (two divisions and a square root an element)."""
    for i in range(param.shape[0]):
        g = grad[i]
        m = exp_avg[i] + beta1_complement * (g - exp_avg[i])
        v = exp_avg_sq[i] * beta2 + beta2_complement * g * g
        param[i] = param[i] * decay + step_rate * m / (np.sqrt(v) / bias_correction2_sqrt + eps)
        exp_avg[i] = m
        exp_avg_sq[i] = v


@jit
def decode_two(codes1, codes2, out1, out2, scale):
    """Two states' codes decoded (fastopt's ``decode``), flat."""
    for i in range(codes1.shape[0]):
        out1[i] = decode(codes1[i], scale, True)
        out2[i] = decode(codes2[i], scale, False)


@jit
def encode_two(values1, values2, codes1, codes2, scales1, scales2):
    """Two states encoded block by block (fastopt's ``encode_block``: absmax, reciprocal, codes)."""
    for block in range(codes1.shape[0] // CODE_BLOCK):
        offset = block * CODE_BLOCK
        scales1[block] = encode_block(window(values1, offset, CODE_BLOCK), window(codes1, offset, CODE_BLOCK))
        scales2[block] = encode_block(window(values2, offset, CODE_BLOCK), window(codes2, offset, CODE_BLOCK))


# ---------------------------------------------------------------------------------------------- speed: variants
def bf16_dtype():
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16)


BYTES_PER_PARAM = {"fastopt_f32": 28, "fastopt_8bit": 16 + 16 / CODE_BLOCK, "fastopt_bf16_8bit": 10 + 16 / CODE_BLOCK,
                   "torch_fused": 28, "ceiling_f32": 28, "ceiling_8bit": 16 + 16 / CODE_BLOCK,
                   "ceiling_bf16_8bit": 10 + 16 / CODE_BLOCK, "bnb_8bit": 16 + 16 / CODE_BLOCK,
                   "torchao_8bit": 16 + 16 / CODE_BLOCK, "single_purpose_8bit": 16 + 16 / CODE_BLOCK,
                   "baseline_8bit": 16 + 16 / CODE_BLOCK, "baseline_bf16_8bit": 10 + 16 / CODE_BLOCK,
                   "fastopt_8bit_sr": 16 + 16 / CODE_BLOCK}
# The 8-bit step with exp_avg_sq's codes rounded stochastically (state_rounding=("exp_avg_sq",)): the same bytes.
STOCHASTIC_CODES = dict(state_dtype="8bit", state_rounding=("exp_avg_sq",))


def tree_commit(path):
    """``path`` and, where it is a git checkout, its commit (``--baseline-tree``'s record)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=path, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return f"{path} ({commit})" if commit else path


def import_tree(path, name="fastopt_baseline"):
    """The fastopt package of the checkout at ``path``, imported as ``name`` beside this tree's (its modules import
    each other relatively, and it finds its kernels beside it, as in a checkout)."""
    package = os.path.join(os.path.abspath(path), "fastopt")
    spec = importlib.util.spec_from_file_location(name, os.path.join(package, "__init__.py"),
                                                  submodule_search_locations=[package])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def random_fill(arrays, rng, scale=1.0):
    for array in arrays:
        array[...] = (rng.standard_normal(array.size, dtype=np.float32) * scale).astype(array.dtype)


def variants_one_tensor(size, anchors):
    """{variant: step} on one tensor of ``size`` params, and {variant: state memory}."""
    rng = np.random.default_rng(0)
    bf16 = bf16_dtype()
    steps, memory = {}, {}
    grad32 = staggered(size, 1)
    random_fill([grad32], rng, 1e-2)
    gradbf = staggered(size, 1, bf16)
    gradbf[...] = grad32.astype(bf16)

    def fastopt_variant(name, dtype, grad, ordinal, package=fo, **options):
        param = staggered(size, ordinal, dtype)
        random_fill([param], rng)
        optimizer = package.AdamW([param], lr=1e-3, weight_decay=WEIGHT_DECAY, **options)
        steps[name] = lambda: optimizer.step([grad])
        steps[name]()  # allocate the state before the next variant's buffers
        memory[name] = state_memory([optimizer.state[0]], [size])

    fastopt_variant("fastopt_f32", np.float32, grad32, 2)
    fastopt_variant("fastopt_8bit", np.float32, grad32, 3, state_dtype="8bit")
    fastopt_variant("fastopt_bf16_8bit", bf16, gradbf, 4, state_dtype="8bit")
    fastopt_variant("fastopt_8bit_sr", np.float32, grad32, 13, **STOCHASTIC_CODES)
    if BASELINE is not None:
        fastopt_variant("baseline_8bit", np.float32, grad32, 15, BASELINE, state_dtype="8bit")
        fastopt_variant("baseline_bf16_8bit", bf16, gradbf, 0, BASELINE, state_dtype="8bit")

    def torch_variant(name, ordinal, make):
        param = staggered(size, ordinal)
        random_fill([param], rng)
        tensor = torch.from_numpy(param).requires_grad_()
        tensor.grad = torch.from_numpy(grad32)
        optimizer = make([tensor])
        steps[name] = optimizer.step
        steps[name]()
        memory[name] = torch_state_memory(optimizer)

    common = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
    torch_variant("torch_fused", 9, lambda params: torch.optim.AdamW(params, **common, fused=True))
    param = staggered(size, 14)
    random_fill([param], rng)
    single = SinglePurposeAdamW8bit(param)
    steps["single_purpose_8bit"] = lambda: single.step(grad32)
    param = staggered(size, 10)
    random_fill([param], rng)
    steps["ceiling_f32"] = benchmark.ceiling_step(benchmark.CASES["AdamW"], param, grad32)
    param = staggered(size, 11)
    random_fill([param], rng)
    steps["ceiling_8bit"] = ceiling_8bit_step(size, param, grad32)
    param = staggered(size, 12, bf16).view(np.uint16)
    param[...] = 0x3F80
    steps["ceiling_bf16_8bit"] = ceiling_8bit_step(size, param, gradbf.view(np.uint16))
    failures = {}
    if anchors:
        for name, module, attribute in (("bnb_8bit", "bitsandbytes.optim", "AdamW8bit"),
                                        ("torchao_8bit", "torchao.optim", "AdamW8bit")):
            imported = optional_import(module)
            if isinstance(imported, Exception):
                failures[name] = repr(imported)
                continue
            try:
                torch_variant(name, 13, lambda params: getattr(imported, attribute)(params, **common))
            except Exception as error:  # noqa: BLE001
                failures[name] = repr(error)
                steps.pop(name, None)
    return steps, memory, failures


def variants_gpt2():
    """{variant: step} on GPT-2 small's 148 tensors (the grads shared: only read), ceilings over one flat buffer of
    the same size, and {variant: state memory}."""
    shapes = benchmark.gpt2_small_shapes()
    sizes = [int(np.prod(shape)) for shape in shapes]
    total = sum(sizes)
    rng = np.random.default_rng(0)
    bf16 = bf16_dtype()
    grads32 = [(rng.standard_normal(size, dtype=np.float32) * 1e-2).reshape(shape) for size, shape in
               zip(sizes, shapes)]
    gradsbf = [grad.astype(bf16) for grad in grads32]
    steps, memory = {}, {}

    def fastopt_variant(name, dtype, grads, package=fo, **options):
        params = [rng.standard_normal(size, dtype=np.float32).astype(dtype).reshape(shape) for size, shape in
                  zip(sizes, shapes)]
        optimizer = package.AdamW(params, lr=1e-3, weight_decay=WEIGHT_DECAY, **options)
        steps[name] = lambda: optimizer.step(grads)
        steps[name]()
        memory[name] = state_memory([optimizer.state[index] for index in range(len(params))], sizes)

    fastopt_variant("fastopt_f32", np.float32, grads32)
    fastopt_variant("fastopt_8bit", np.float32, grads32, state_dtype="8bit")
    fastopt_variant("fastopt_bf16_8bit", bf16, gradsbf, state_dtype="8bit")
    if BASELINE is not None:
        fastopt_variant("baseline_8bit", np.float32, grads32, BASELINE, state_dtype="8bit")
        fastopt_variant("baseline_bf16_8bit", bf16, gradsbf, BASELINE, state_dtype="8bit")
    tensors = [torch.from_numpy(rng.standard_normal(size, dtype=np.float32).reshape(shape)).requires_grad_()
               for size, shape in zip(sizes, shapes)]
    for tensor, grad in zip(tensors, grads32):
        tensor.grad = torch.from_numpy(grad)
    fused = torch.optim.AdamW(tensors, lr=1e-3, weight_decay=WEIGHT_DECAY, fused=True)
    steps["torch_fused"] = fused.step
    steps["torch_fused"]()
    memory["torch_fused"] = torch_state_memory(fused)
    flat_grad = staggered(total, 1)
    random_fill([flat_grad], rng, 1e-2)
    param = staggered(total, 10)
    random_fill([param], rng)
    steps["ceiling_f32"] = benchmark.ceiling_step(benchmark.CASES["AdamW"], param, flat_grad)
    param = staggered(total, 11)
    random_fill([param], rng)
    steps["ceiling_8bit"] = ceiling_8bit_step(total, param, flat_grad)
    flat_gradbf = staggered(total, 1, np.uint16)
    flat_gradbf.fill(0x3C00)
    param = staggered(total, 12, np.uint16)
    param.fill(0x3F80)
    steps["ceiling_bf16_8bit"] = ceiling_8bit_step(total, param, flat_gradbf)
    return steps, memory, dict(params=total, tensors=len(shapes))


def interleaved(steps, rounds, sample_seconds):
    """{variant: [seconds per step, one per round]}: warmed up, then ``rounds`` rounds, each variant once per round,
    the first variant rotating from round to round."""
    names = list(steps)
    counts = {}
    for name in names:
        steps[name]()
        counts[name] = max(1, min(50, round(sample_seconds / max(benchmark._time_steps(steps[name], 1), 1e-7))))
    samples = {name: [] for name in names}
    for round_number in range(rounds):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(benchmark._time_steps(steps[name], counts[name]))
    return samples


def speed_group(label, steps, params, rounds, sample_seconds, runs, log):
    group = dict(group=label, params=params, runs=[])
    for run_number in range(runs):
        samples = interleaved(steps, rounds, sample_seconds)
        ms = {name: statistics.median(values) * 1e3 for name, values in samples.items()}
        spread = {name: max(values) / min(values) for name, values in samples.items()}
        group["runs"].append(dict(ms=ms, round_spread=spread, load=os.getloadavg()[0],
                                  samples_ms={name: [v * 1e3 for v in values] for name, values in samples.items()}))
        log(f"  {label} run {run_number + 1}: " + ", ".join(f"{name} {value:.1f} ms" for name, value in ms.items()))
    return group


def thread_seconds(step, count):
    """CPU seconds of this thread per call over ``count`` calls: time the thread spent descheduled (the machine is
    shared) is not counted. Valid for work done on the calling thread: serial steps and loops only."""
    start = time.thread_time()
    for _ in range(count):
        step()
    return (time.thread_time() - start) / count


def serial_cost(sizes, rounds, log):
    """ns per element on a tensor in L2, one thread, in thread CPU time: (t(large) - t(small)) / (large - small) from
    each variant's fastest round at either size (the step's host cost cancels), every (variant, size) timed in
    interleaved rounds; also the median over rounds of each round's own difference."""
    small, large = sizes
    rng = np.random.default_rng(1)
    bf16 = bf16_dtype()
    f32 = np.float32
    scalars = (f32(-1e-3), f32(1 - 1e-5), f32(0.1), f32(0.999), f32(1e-3), f32(0.5), f32(1e-8))
    ceiling_f32 = serial_twin(benchmark.ceiling_read4_write3)
    ceiling_elements, ceiling_scales = serial_twin(ceiling_8bit_elements), serial_twin(ceiling_8bit_scales)
    single_purpose_serial = serial_twin(single_purpose_adamw_8bit)
    steps = {}
    for size in (small, large):
        grad32 = staggered(size, 1)
        random_fill([grad32], rng, 1e-2)
        gradbf = grad32.astype(bf16)
        packages = [("", fo)] + ([("baseline", BASELINE)] if BASELINE is not None else [])
        for name, dtype, grad, options, package in (
                [("fastopt_f32", np.float32, grad32, {}, fo)]
                + [(f"{prefix or 'fastopt'}_8bit", np.float32, grad32, dict(state_dtype="8bit"), package)
                   for prefix, package in packages]
                + [(f"{prefix or 'fastopt'}_bf16_8bit", bf16, gradbf, dict(state_dtype="8bit"), package)
                   for prefix, package in packages]
                + [("fastopt_8bit_sr", np.float32, grad32, STOCHASTIC_CODES, fo)]):
            param = staggered(size, 2, dtype)
            random_fill([param], rng)
            optimizer = package.AdamW([param], lr=1e-3, weight_decay=WEIGHT_DECAY, min_8bit_size=0, **options)
            steps[name, size] = (lambda optimizer, grad: lambda: optimizer.step([grad]))(optimizer, grad)
        param = staggered(size, 3)
        random_fill([param], rng)
        single = SinglePurposeAdamW8bit(param, kernel=single_purpose_serial)
        steps["single_purpose_8bit", size] = (lambda single, grad: lambda: single.step(grad))(single, grad32)
        arrays = [staggered(size, ordinal) for ordinal in (4, 5, 6, 7)]
        random_fill(arrays, rng)
        arrays[3] = np.abs(arrays[3])
        steps["ceiling_f32", size] = (lambda a: lambda: ceiling_f32(*a, f32(0.5), f32(-1e-6)))(arrays)
        steps["adam_math_f32", size] = (lambda a: lambda: adam_math_float32(*a, *scalars))(
            [array.copy() for array in arrays])
        codes = [staggered(size, 8, np.int8), staggered(size, 9, np.uint8)]
        for array in codes:
            array[...] = rng.integers(0, 256, size).astype(array.dtype)
        blocks = -(-size // CODE_BLOCK)
        scales = [np.ones(blocks, np.float32), np.ones(blocks, np.float32)]
        steps["ceiling_8bit", size] = (lambda a, c, sc: lambda: (ceiling_elements(a[0], a[1], c[0], c[1]),
                                                                  ceiling_scales(sc[0], sc[1], f32(0.5))))(
            arrays, codes, scales)
        values = [staggered(size, 10), staggered(size, 11)]
        steps["decode_2_states", size] = (lambda c, v: lambda: decode_two(c[0], c[1], v[0], v[1], f32(0.5)))(
            codes, values)
        decode_two(codes[0], codes[1], values[0], values[1], f32(0.5))
        steps["encode_2_states", size] = (lambda c, v, sc: lambda: encode_two(v[0], v[1], c[0], c[1], sc[0], sc[1]))(
            [array.copy() for array in codes], values, scales)
    names = list(dict.fromkeys(name for name, _ in steps))
    count = 200
    for step in steps.values():
        for _ in range(20):
            step()
    samples = {key: [] for key in steps}
    keys = list(steps)
    for round_number in range(rounds):
        shift = round_number % len(keys)
        for key in keys[shift:] + keys[:shift]:
            samples[key].append(thread_seconds(steps[key], count))
    result = {}
    for name in names:
        per_round = [(big - little) / (large - small) * 1e9
                     for big, little in zip(samples[name, large], samples[name, small])]
        result[name] = dict(ns_per_element=(min(samples[name, large]) - min(samples[name, small])) / (large - small)
                            * 1e9, ns_per_element_median=statistics.median(per_round),
                            us_small=min(samples[name, small]) * 1e6, us_large=min(samples[name, large]) * 1e6)
        log(f"  serial {name}: {result[name]['ns_per_element']:.3f} ns/element (median of rounds "
            f"{result[name]['ns_per_element_median']:.3f}); step {result[name]['us_large']:.1f} us at {large}, "
            f"{result[name]['us_small']:.1f} us at {small}")
    return dict(sizes=[small, large], rounds=rounds, steps_per_sample=count, variants=result)


def speed(threads, size, rounds, sample_seconds, runs, gpt2, log):
    numba.set_num_threads(threads)
    torch.set_num_threads(threads)
    result = dict(threads=threads, single_purpose_matches_fastopt=check_single_purpose())
    log(f"  single-purpose kernel gives fastopt's bytes: {result['single_purpose_matches_fastopt']}")
    steps, memory, failures = variants_one_tensor(size, anchors=True)
    torch.set_num_threads(threads)  # Numba's OpenMP layer may have reset it on its first parallel call
    result["one_tensor"] = speed_group(f"{size >> 20}M", steps, size, rounds, sample_seconds, runs, log)
    result["one_tensor"].update(memory=memory, anchor_failures=failures)
    del steps, memory
    if gpt2:
        steps, memory, shape = variants_gpt2()
        torch.set_num_threads(threads)
        result["gpt2"] = speed_group("GPT-2 small", steps, shape["params"], rounds, sample_seconds, runs, log)
        result["gpt2"].update(memory=memory, tensors=shape["tensors"])
        del steps, memory
    numba.set_num_threads(1)
    torch.set_num_threads(1)
    result["serial"] = serial_cost((256, 64 << 10), rounds=15, log=log)
    numba.set_num_threads(threads)
    torch.set_num_threads(threads)
    return result


# ---------------------------------------------------------------------------------------------- the report
def mean_text(values, digits=4):
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def accuracy_markdown(name, task):
    """Per arm: the metric per seed, its mean, the paired difference from fastopt float32 (same seed: same init and
    data order) and the state memory."""
    arms = task["arms"]
    metric = "accuracy" if name == "digits" else "loss"
    baseline = {run["seed"]: run for run in arms.get("fastopt float32", {}).get("runs", [])}
    seeds = task["settings"]["seeds"]
    with_loss = metric == "accuracy"  # digits: the test loss too, a finer measure than 359 images' accuracy
    lines = ["| arm | " + " | ".join(f"seed {seed}" for seed in seeds)
             + " | mean ± std | vs fastopt float32, paired (mean, worst seed) | "
             + ("test loss, mean ± std | " if with_loss else "")
             + "8-bit share of params | state B/param | s per run |",
             "|---|" + "--:|" * len(seeds) + "--:|--:|" + ("--:|" if with_loss else "") + "--:|--:|--:|"]
    for label, arm in arms.items():
        runs = {run["seed"]: run for run in arm["runs"]}
        if not runs:
            lines.append(f"| {label} | " + " | ".join("-" for _ in seeds) + f" | {arm['implementation']} | | | | |"
                         + (" |" if with_loss else ""))
            continue
        values = [runs[seed][metric] for seed in seeds if seed in runs]
        cells = [f"{runs[seed][metric]:.4f}" if seed in runs else "-" for seed in seeds]
        if metric == "accuracy":
            deltas = [(runs[seed]["accuracy"] - baseline[seed]["accuracy"]) * 100 for seed in seeds
                      if seed in runs and seed in baseline]
            delta = (f"{statistics.fmean(deltas):+.2f} points, worst {min(deltas, key=lambda d: (-abs(d), d)):+.2f}"
                     if deltas else "-")
        else:
            deltas = [(runs[seed]["loss"] / baseline[seed]["loss"] - 1) * 100 for seed in seeds
                      if seed in runs and seed in baseline]
            delta = f"{statistics.fmean(deltas):+.2f}%, worst {max(deltas, key=abs):+.2f}%" if deltas else "-"
        memory = arm["runs"][0]["memory"]
        seconds = statistics.fmean(run["seconds"] for run in arm["runs"])
        loss = f"{mean_text([run['loss'] for run in arm['runs']])} | " if with_loss else ""
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {mean_text(values)} | {delta} | {loss}"
                     f"{memory['share_8bit']:.3f} | {memory['bytes_per_param']:.3f} | {seconds:.1f} |")
    return lines


SPEED_ORDER = ("fastopt_f32", "fastopt_8bit", "fastopt_bf16_8bit", "fastopt_8bit_sr", "baseline_8bit",
               "baseline_bf16_8bit",
               "torch_fused", "ceiling_f32", "ceiling_8bit", "ceiling_bf16_8bit", "single_purpose_8bit", "bnb_8bit",
               "torchao_8bit")


def round_ratios(run, numerator, denominator):
    """(median over rounds of the round's time ratio, ratio of the fastest rounds)."""
    first, second = run["samples_ms"][numerator], run["samples_ms"][denominator]
    return (statistics.median(a / b for a, b in zip(first, second)), min(first) / min(second))


def ratio_text(run, numerator, denominator):
    paired, fastest = round_ratios(run, numerator, denominator)
    return f"{paired:.2f} ({fastest:.2f})"


def speed_markdown(group):
    runs = group["runs"]
    lines = [f"### {group['group']} ({group['params']:,} params"
             + (f", {group['tensors']} tensors" if "tensors" in group else ", one tensor") + ")", "",
             "ms per step, median (fastest) of the run's rounds, and GB/s at the median, counted at the variant's "
             "B/param:", "",
             "| variant | B/param | " + " | ".join(f"run {k + 1} ms | GB/s" for k in range(len(runs))) + " |",
             "|---|--:|" + "--:|--:|" * len(runs)]
    for name in SPEED_ORDER:
        if name not in runs[0]["ms"]:
            continue
        cells = []
        for run in runs:
            ms = run["ms"][name]
            cells += [f"{ms:.1f} ({min(run['samples_ms'][name]):.1f})",
                      f"{BYTES_PER_PARAM[name] * group['params'] / ms / 1e6:.1f}"]
        lines.append(f"| {name} | {BYTES_PER_PARAM[name]:.2f} | " + " | ".join(cells) + " |")
    ratios = [("fastopt 8-bit speed-up over fastopt float32 (target >= 1.5)", "fastopt_f32", "fastopt_8bit"),
              ("fastopt bf16 + 8-bit speed-up over fastopt float32 (target >= 2.0)", "fastopt_f32",
               "fastopt_bf16_8bit"),
              ("fastopt 8-bit speed-up over torch fused AdamW float32", "torch_fused", "fastopt_8bit"),
              ("fastopt 8-bit: fraction of its ceiling (16 B/param)", "ceiling_8bit", "fastopt_8bit"),
              ("fastopt bf16 + 8-bit: fraction of its ceiling (10 B/param)", "ceiling_bf16_8bit",
               "fastopt_bf16_8bit"),
              ("fastopt float32: fraction of its ceiling (28 B/param)", "ceiling_f32", "fastopt_f32"),
              ("ceiling 16 B / ceiling 28 B speed-up (what the bytes allow)", "ceiling_f32", "ceiling_8bit"),
              ("ceiling 10 B / ceiling 28 B speed-up", "ceiling_f32", "ceiling_bf16_8bit"),
              ("single-purpose 8-bit kernel speed-up over fastopt 8-bit (same bytes out)", "fastopt_8bit",
               "single_purpose_8bit"),
              ("fastopt 8-bit speed-up over the baseline tree's 8-bit (--baseline-tree)", "baseline_8bit",
               "fastopt_8bit"),
              ("fastopt bf16 + 8-bit speed-up over the baseline tree's", "baseline_bf16_8bit", "fastopt_bf16_8bit"),
              ("fastopt 8-bit speed-up over bitsandbytes AdamW8bit", "bnb_8bit", "fastopt_8bit"),
              ("fastopt 8-bit speed-up over torchao AdamW8bit", "torchao_8bit", "fastopt_8bit"),
              ("fastopt 8-bit, stochastic exp_avg_sq codes: speed relative to rounding to nearest", "fastopt_8bit",
               "fastopt_8bit_sr")]
    lines += ["", "Ratios, time of the first variant named / time of the second: per run, the median over rounds of "
              "each round's ratio (the two ran seconds apart), and in brackets the ratio of the two variants' fastest "
              "rounds (the least disturbed by the other jobs on the machine):", "",
              "| ratio | " + " | ".join(f"run {k + 1}" for k in range(len(runs))) + " |", "|---|" + "--:|" * len(runs)]
    for label, numerator, denominator in ratios:
        if numerator in runs[0]["ms"] and denominator in runs[0]["ms"]:
            lines.append(f"| {label} | " + " | ".join(ratio_text(run, numerator, denominator) for run in runs) + " |")
    spreads = [f"{name} {max(run['round_spread'][name] for run in runs):.2f}" for name in runs[0]["ms"]]
    lines += ["", "Largest slowest/fastest round ratio per variant over the runs: " + ", ".join(spreads) + "; "
              "load average after each run: " + ", ".join(f"{run['load']:.1f}" for run in runs) + "."]
    if group.get("anchor_failures"):
        lines += ["", "Anchors that did not run: " + "; ".join(f"{k}: {v}" for k, v in
                                                              group["anchor_failures"].items())]
    return lines


SUMMARY_RATIOS = (("8-bit / f32 speed-up (>= 1.5)", "fastopt_f32", "fastopt_8bit"),
                  ("bf16+8-bit / f32 speed-up (>= 2.0)", "fastopt_f32", "fastopt_bf16_8bit"),
                  ("8-bit / torch fused", "torch_fused", "fastopt_8bit"),
                  ("8-bit, of its ceiling", "ceiling_8bit", "fastopt_8bit"),
                  ("bf16+8-bit, of its ceiling", "ceiling_bf16_8bit", "fastopt_bf16_8bit"),
                  ("f32, of its ceiling", "ceiling_f32", "fastopt_f32"),
                  ("ceiling 16 B / 28 B", "ceiling_f32", "ceiling_8bit"),
                  ("ceiling 10 B / 28 B", "ceiling_f32", "ceiling_bf16_8bit"),
                  ("single-purpose / fastopt 8-bit", "fastopt_8bit", "single_purpose_8bit"),
                  ("8-bit / baseline tree's 8-bit", "baseline_8bit", "fastopt_8bit"),
                  ("bf16+8-bit / baseline tree's", "baseline_bf16_8bit", "fastopt_bf16_8bit"),
                  ("8-bit / bitsandbytes", "bnb_8bit", "fastopt_8bit"),
                  ("8-bit / torchao", "torchao_8bit", "fastopt_8bit"))


def summary_markdown(key, invocations):
    """Every run of every invocation of one speed section: the paired (median of per-round) ratios, and their
    median and range over all runs."""
    lines = []
    for group_key, title in (("one_tensor", None), ("gpt2", "GPT-2 small")):
        runs = [(invocation["date"], run) for invocation in invocations if group_key in invocation
                for run in invocation[group_key]["runs"]]
        if not runs:
            continue
        title = title or invocations[-1][group_key]["group"]
        threads = invocations[-1]["threads"]
        lines += [f"### Summary: {title}, {threads} thread(s), {len(runs)} runs in {len(invocations)} invocation(s) "
                  f"({', '.join(invocation['date'][11:16] for invocation in invocations)})", "",
                  "Each run's ratio is the median over its rounds of the round's time ratio (first / second variant)."
                  "", "", "| ratio | median over runs | min | max | runs |", "|---|--:|--:|--:|---|"]
        for label, numerator, denominator in SUMMARY_RATIOS:
            values = [round_ratios(run, numerator, denominator)[0] for _, run in runs
                      if numerator in run["ms"] and denominator in run["ms"]]
            if values:
                lines.append(f"| {label} | **{statistics.median(values):.2f}** | {min(values):.2f} | "
                             f"{max(values):.2f} | " + ", ".join(f"{value:.2f}" for value in values) + " |")
        lines.append("")
    return lines


def markdown(results):
    lines = []
    machine = results.get("machine", {})
    lines += [f"Machine: {machine.get('processor')}, {machine.get('cpus')} CPUs, {machine.get('platform')}; python "
              f"{machine.get('python')}, numpy {machine.get('numpy')}, numba {machine.get('numba')}, torch "
              f"{machine.get('torch')}, bitsandbytes {machine.get('bitsandbytes')}, torchao {machine.get('torchao')}. "
              f"Tree {machine.get('tree')}.", ""]
    for name in ("lm", "digits"):
        if name in results:
            task = results[name]
            lines += [f"## Accuracy: {name} ({task['metric']}; `{task['command']}`, {task['date']}, load average "
                      f"{task['load']:.1f} at the start)", "", "Settings: " + json.dumps(task["settings"]), ""]
            lines += accuracy_markdown(name, task) + [""]
            runs_of = {f"{arm.get('tree')}, {arm.get('date', '')[:16]}" for arm in task["arms"].values()}
            lines += ["Arms ran on: " + "; ".join(f"{label}: {arm.get('tree')} ({arm.get('date', '?')})"
                                                 for label, arm in task["arms"].items()) + "."
                      if len(runs_of) > 1 else f"Tree: {runs_of.pop()}.", ""]
            if task.get("reruns"):
                lines += ["Arms rerun by: " + "; ".join(f"`{command}`" for command in task["reruns"]), ""]
    if "memory" in results:
        lines += memory_markdown(results["memory"]["models"])
    if "drift" in results:
        drift = results["drift"]
        lines += [f"## State drift: the 8-bit states against float32 moments fed the same grads (`{drift['command']}`, "
                  f"{drift['date']})", "",
                  f"LM, seed {drift['seed']}, {drift['steps']} steps, each 8-bit AdamW on its own trajectory; over the "
                  "8-bit tensors' elements: the share of positive float32 second moments decoded as 0; v_8bit / "
                  "v_float32 where neither is 0 (quantiles, geometric mean); the first moment's median relative error; "
                  "the Adam direction u = m / (sqrt(v) + 1e-8) of the decoded states against the float32 moments'.", "",
                  "| optimizer | step | v decoded 0 | v ratio 1% | 10% | median | 90% | 99% | geometric mean | "
                  "m error, median | norm(du)/norm(u) | norm(u_8bit)/norm(u) |",
                  "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for label, arm in drift["arms"].items():
            for point in arm["points"]:
                q = point["v_ratio_quantiles"]
                lines.append(f"| {label} | {point['step']} | {point['v_decoded_zero_share']:.2%} | {q['0.01']:.3f} | "
                             f"{q['0.1']:.3f} | {q['0.5']:.3f} | {q['0.9']:.3f} | {q['0.99']:.3f} | "
                             f"{point['v_ratio_geometric_mean']:.3f} | {point['m_relative_error_median']:.3f} | "
                             f"{point['direction_error']:.3f} | {point['direction_norm_ratio']:.3f} |")
        lines.append("")
    for key in [key for key in results if key.startswith("speed")]:
        lines += summary_markdown(key, results.get("history", {}).get(key, []) + [results[key]])
    for key in [key for key in results if key.startswith("speed")]:
        speed_result = results[key]
        lines += [f"## Speed (`{speed_result['command']}`, {speed_result['date']}, {speed_result['threads']} threads)",
                  ""]
        if "baseline_tree" in speed_result:
            lines += [f"baseline_* variants: the fastopt of {speed_result['baseline_tree']}.", ""]
        for key in ("one_tensor", "gpt2"):
            if key in speed_result:
                lines += speed_markdown(speed_result[key]) + [""]
        serial = speed_result["serial"]
        lines += ["### Per-element cost in L2, one thread", "",
                  f"(t({serial['sizes'][1]}) - t({serial['sizes'][0]})) / {serial['sizes'][1] - serial['sizes'][0]} "
                  f"elements, thread CPU time, fastest of {serial['rounds']} interleaved rounds of "
                  f"{serial['steps_per_sample']} calls at either size:", "",
                  "| variant | ns/element | median of rounds | at 64K (us) | at 256 (us) |", "|---|--:|--:|--:|--:|"]
        for name, row in serial["variants"].items():
            lines.append(f"| {name} | {row['ns_per_element']:.3f} | {row['ns_per_element_median']:.3f} | "
                         f"{row['us_large']:.1f} | {row['us_small']:.1f} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- main
def machine():
    from importlib.metadata import PackageNotFoundError, version

    def package(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None
    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), python=platform.python_version(), numpy=np.__version__,
                numba=numba.__version__, torch=torch.__version__, bitsandbytes=package("bitsandbytes"),
                torchao=package("torchao"), tree=source_tree())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=("lm", "digits", "speed", "drift", "memory", "all", "report"),
                        default="all")
    parser.add_argument("--out", default=os.path.join(BENCH, "8bit.json"),
                        help="results JSON; each task run replaces its own section (default: %(default)s)")
    parser.add_argument("--lm-steps", type=int, default=1500)
    parser.add_argument("--lm-seeds", type=int, default=3)
    parser.add_argument("--digits-seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="speed: Numba and torch threads")
    parser.add_argument("--size", type=int, default=32 << 20, help="speed: params of the one-tensor group")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--runs", type=int, default=3, help="speed: whole interleaved measurements, reported apart")
    parser.add_argument("--sample-seconds", type=float, default=0.15)
    parser.add_argument("--no-gpt2", action="store_true")
    parser.add_argument("--baseline-tree", help="speed: also time the 8-bit steps of the fastopt in this checkout "
                        "(another commit's), in the same rounds")
    parser.add_argument("--lr-factors", help="lm: also fastopt float32 at these multiples of the rate, e.g. 1.25,1.5")
    parser.add_argument("--arms", help="lm/digits: only the arms whose label contains one of these comma-separated "
                        "strings (their results replace those arms' in --out), e.g. 'fastopt 8bit'")
    arguments = parser.parse_args()
    global BASELINE
    if arguments.baseline_tree:
        BASELINE = import_tree(arguments.baseline_tree)

    def log(line):
        print(line, file=sys.stderr, flush=True)

    results = {}
    if os.path.exists(arguments.out):
        with open(arguments.out) as file:
            results = json.load(file)
    if arguments.task != "report":
        command = shlex.join(["python", "bench/bench_8bit.py", *sys.argv[1:]])
        stamp = dict(command=command, date=datetime.datetime.now().isoformat(timespec="seconds"),
                     load=os.getloadavg()[0])
        if arguments.baseline_tree:
            stamp["baseline_tree"] = tree_commit(arguments.baseline_tree)
        results["machine"] = machine()
        if arguments.task in ("digits", "all", "lm", "drift", "memory"):
            numba.set_num_threads(1)  # the models' steps are serial (< 256K params); torch on one thread as
            torch.set_num_threads(1)  # self_tuning.py
        def store(name, section):
            if arguments.arms and name in results:  # a rerun of some arms: replace those, keep the others
                results[name]["arms"].update(section["arms"])
                results[name].setdefault("reruns", []).append(stamp["command"])
            else:
                results[name] = dict(section, **stamp)

        if arguments.task in ("digits", "all"):
            store("digits", digits_accuracy(range(arguments.digits_seeds), log, arguments.arms))
        if arguments.task in ("lm", "all"):
            factors = [float(factor) for factor in arguments.lr_factors.split(",")] if arguments.lr_factors else []
            store("lm", lm_accuracy(arguments.lm_steps, range(arguments.lm_seeds), log, arguments.arms, factors))
        if arguments.task in ("memory", "all"):
            results["memory"] = dict(models=memory_table(log), **stamp)
        if arguments.task in ("drift", "all"):
            checkpoints = sorted({arguments.lm_steps // 10, arguments.lm_steps // 2, arguments.lm_steps})
            results["drift"] = dict(state_drift(arguments.lm_steps, 0, checkpoints, log), **stamp)
        if arguments.task in ("speed", "all"):
            key = "speed" if arguments.threads == 2 else f"speed_{arguments.threads}threads"
            if key in results:  # earlier invocations stay, for the summary across them
                results.setdefault("history", {}).setdefault(key, []).append(results[key])
            results[key] = dict(speed(arguments.threads, arguments.size, arguments.rounds,
                                          arguments.sample_seconds, arguments.runs, not arguments.no_gpt2, log),
                                    **dict(stamp, date=datetime.datetime.now().isoformat(timespec="seconds")))
        with open(arguments.out, "w") as file:
            json.dump(finite_or_none(results), file, indent=1, allow_nan=False)
    print(markdown(results))


if __name__ == "__main__":
    main()
