"""What schedule-free AdamW and SGD and LAMB buy, each with its learning rate tuned, on two small real tasks.

    python bench/self_tuning.py              # full run (6.2 min of one core; 9.6 min wall at load average 4)
                                             # writes bench/self_tuning.json, RESULTS_SELF_TUNING.md, self_tuning.png
    python bench/self_tuning.py --quick      # smoke run (seconds): prints the report, writes only paths given
    python bench/self_tuning.py --report     # only rewrite the report and the plot from bench/self_tuning.json
    python bench/self_tuning.py --stand-ins --out /tmp/stand_ins.json --markdown /tmp/stand_ins.md --plot /tmp/s.png
                                             # the same runs on the stand-ins below: a cross-check of fastopt's

Tasks: ``lm``, the byte-level transformer of ``bench/lm.py`` (held-out nats per byte), and ``digits``, a torch MLP
64-128-10 shaped and initialised like ``fastopt.demo.MLP``, on ``fastopt.demo.load_digits_split`` (test loss and
test accuracy). Each task trains a list of arms (optimizer, schedule, batch size):

- **No schedule against a tuned schedule.** ``AdamWScheduleFree`` at a constant rate (its own warmup over 5% of
  the steps) against ``AdamW`` with a warmup (5%) + cosine-to-zero schedule; on digits also ``SGDScheduleFree``
  against SGD (Nesterov momentum 0.9) with the same schedule. (The SGD pair is left out of the LM, where the CPU
  time goes: transformers are rarely trained with SGD.)
- **Large batch.** ``LAMB`` against ``AdamW``, both with warmup + cosine, at 4x (LM) or 8x (digits) the normal
  batch for the **same number of examples** (so 4x or 8x fewer steps): the setting LAMB was made for.
- **Tuning and LR sensitivity.** Rates are powers 10^(q/4). Each arm first runs a grid of 5 rates a half-decade
  apart (100x), extended while the best is at an edge; then the 10x window around the grid's best (5 rates a
  quarter-decade apart, 3 of them already run). The tuned rate is the best of all rates run; it is rerun on more
  seeds (``best_seeds``) to show the seed-to-seed spread. Sensitivity is max / min final loss over the window
  (1.0: the rate does not matter within 10x; "diverged" if a rate in it diverged). Grid and window: one seed on
  the LM (where the time goes; its spread at the tuned rate, 0.02-0.03 nats over 3 seeds, says how far to trust
  a single one), three on digits; tuned rate: 3 seeds on the LM, 5 on digits.
- **Threads.** One torch thread by default: the matmuls are too small to gain from a second, and on a busy
  machine a second thread waits for its partner (a step took 25x longer under load 6).

Weight decay 0.01 for AdamW, AdamWScheduleFree and LAMB, none for the SGD pair. The baselines are ``torch.optim``'s.
The new optimizers come from ``fastopt.torch`` where it has them, and otherwise (or with ``--stand-ins``) from
**stand-ins**: the ``schedulefree`` package's classes of the same names and :class:`ReferenceLAMB` below. The JSON and the report name
the implementation of every arm, and the report is headed "stand-in run" when any arm ran a stand-in.
"""
import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))  # this tree's fastopt
sys.path.insert(0, BENCH)  # lm.py

import lm  # noqa: E402

WINDOW = (-2, -1, 0, 1, 2)  # quarter-decade offsets of the 10x sensitivity window around the grid's best


class ReferenceLAMB(torch.optim.Optimizer):
    """Stand-in for ``fastopt.torch.LAMB`` (same signature), per param tensor at step t:

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
        m_hat = m / (1 - b1^t);  v_hat = v / (1 - b2^t)           (m and v themselves without bias_correction)
        u = m_hat / (sqrt(v_hat) + eps) + weight_decay p
        trust = clamp(||p|| / ||u||, 0, max_trust_ratio), 1 where either norm is 0
        p = p - lr trust u
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01, *, bias_correction=True,
                 max_trust_ratio=10.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      bias_correction=bias_correction, max_trust_ratio=max_trust_ratio))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(param.grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(param.grad, param.grad, value=1 - beta2)
                m_hat, v_hat = exp_avg, exp_avg_sq
                if group["bias_correction"]:
                    m_hat, v_hat = m_hat / (1 - beta1 ** state["step"]), v_hat / (1 - beta2 ** state["step"])
                update = m_hat / (v_hat.sqrt() + group["eps"]) + group["weight_decay"] * param
                param_norm, update_norm = param.norm(), update.norm()
                trust = torch.where((param_norm > 0) & (update_norm > 0),
                                    (param_norm / update_norm).clamp(0, group["max_trust_ratio"]), 1.0)
                param.sub_(group["lr"] * trust * update)


def resolve_optimizer(name, stand_in=False):
    """(class, implementation) for an optimizer name: the baselines from ``torch.optim``; the new ones from
    ``fastopt.torch`` when it has them and ``stand_in`` is false, else the stand-in."""
    if name in ("AdamW", "SGD"):
        return getattr(torch.optim, name), f"torch.optim.{name}"
    import fastopt.torch

    if hasattr(fastopt.torch, name) and not stand_in:
        return getattr(fastopt.torch, name), f"fastopt.torch.{name}"
    if name == "LAMB":
        return ReferenceLAMB, "STAND-IN: ReferenceLAMB (plain torch, bench/self_tuning.py)"
    import schedulefree

    return getattr(schedulefree, name), f"STAND-IN: schedulefree.{name} {importlib.metadata.version('schedulefree')}"


def warmup_cosine(total_steps, warmup_steps):
    """``lr_schedule`` for ``train_lm``: linear warmup to the peak rate, then cosine to zero at ``total_steps``."""
    def factor(step):  # LambdaLR's step counts optimizer steps taken; the rate of the next step is peak * factor
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))))
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass(frozen=True)
class Arm:
    label: str
    optimizer: str  # a name for resolve_optimizer
    grid_start: int  # q of the grid's lowest rate, 10^(q/4)
    options: dict = field(default_factory=dict)
    schedule: bool = False  # warmup + cosine; schedule-free arms get warmup_steps instead
    large_batch: bool = False


@dataclass(frozen=True)
class Task:
    name: str
    loss_name: str
    batch_size: int
    large_batch_size: int
    steps: Callable  # batch size -> steps (the same number of examples at either batch size)
    train: Callable  # (make_optimizer, lr_schedule, batch_size, steps, seed) -> {loss, accuracy, curve, diverged}
    arms: tuple
    grid_seeds: tuple
    best_seeds: tuple
    settings: dict


def make_optimizer_factory(optimizer_class, arm, lr, steps):
    options = dict(arm.options)
    if arm.optimizer.endswith("ScheduleFree"):
        options["warmup_steps"] = max(1, round(0.05 * steps))
    return lambda params: optimizer_class(params, lr=lr, **options)


# --- the tasks ---------------------------------------------------------------------------------------------------

def lm_task(quick):
    config = lm.LMConfig(heldout_windows=32) if quick else lm.LMConfig()
    batch_size, steps = (8, 8) if quick else (32, 500)
    factor = 4

    def train(make_optimizer, lr_schedule, batch, run_steps, seed):
        result = lm.train_lm(make_optimizer, steps=run_steps, batch_size=batch, seed=seed, lr_schedule=lr_schedule,
                             config=config)
        curve = [dict(examples=point["examples"], loss=point["heldout_loss"]) for point in result["curve"]]
        return dict(loss=result["final_heldout_loss"], accuracy=None, curve=curve, diverged=result["diverged"])

    adam = dict(weight_decay=0.01)
    arms = (Arm("AdamW, warmup+cosine", "AdamW", -14, adam, schedule=True),
            Arm("AdamWScheduleFree", "AdamWScheduleFree", -12, adam),
            Arm(f"AdamW, warmup+cosine, {factor}x batch", "AdamW", -14, adam, schedule=True, large_batch=True),
            Arm(f"LAMB, warmup+cosine, {factor}x batch", "LAMB", -12, adam, schedule=True, large_batch=True))
    corpus = lm.load_corpus()
    return Task("lm", "held-out loss (nats/byte)", batch_size, factor * batch_size,
                lambda batch: steps * batch_size // batch, train, arms, grid_seeds=(0,),
                best_seeds=(0,) if quick else (0, 1, 2),
                settings=dict(model=vars(config), steps=steps, corpus_sha256=corpus.sha256, stdlib=corpus.stdlib,
                              train_bytes=len(corpus.train), heldout_bytes=len(corpus.heldout),
                              train_modules=lm.TRAIN_MODULES, heldout_modules=lm.HELDOUT_MODULES))


class DigitsMLP(nn.Module):
    """``fastopt.demo.MLP`` in torch: relu(x W1 + b1) W2 + b2, He-normal W1, normal(0, 1/hidden) W2, zero biases."""

    def __init__(self, inputs=64, hidden=128, classes=10):
        super().__init__()
        self.hidden, self.out = nn.Linear(inputs, hidden), nn.Linear(hidden, classes)
        with torch.no_grad():
            nn.init.normal_(self.hidden.weight, std=math.sqrt(2.0 / inputs))
            nn.init.normal_(self.out.weight, std=math.sqrt(1.0 / hidden))
            nn.init.zeros_(self.hidden.bias)
            nn.init.zeros_(self.out.bias)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x)))


def digits_task(quick):
    from fastopt.demo import load_digits_split

    data = load_digits_split(seed=0)
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    epochs, factor = (1 if quick else 20), 8

    def train(make_optimizer, lr_schedule, batch, _steps, seed):  # whole epochs: the steps follow from the batch
        torch.manual_seed(seed)
        model = DigitsMLP()
        generator = torch.Generator().manual_seed(seed)
        optimizer = make_optimizer(model.parameters())
        scheduler = lr_schedule(optimizer) if lr_schedule else None
        schedule_free = lm.is_schedule_free(optimizer)
        curve, examples = [], 0
        for _ in range(epochs):
            if schedule_free:
                optimizer.train()
            for indices in torch.randperm(len(y_train), generator=generator).split(batch):
                loss = F.cross_entropy(model(x_train[indices]), y_train[indices])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if scheduler:
                    scheduler.step()
                examples += len(indices)
            if schedule_free:
                optimizer.eval()
            with torch.no_grad():
                logits = model(x_test)
            curve.append(dict(examples=examples, loss=F.cross_entropy(logits, y_test).item(),
                              accuracy=(logits.argmax(1) == y_test).float().mean().item()))
        diverged = not math.isfinite(curve[-1]["loss"])
        return dict(loss=math.inf if diverged else curve[-1]["loss"], accuracy=curve[-1]["accuracy"], curve=curve,
                    diverged=diverged)

    adam = dict(weight_decay=0.01)
    arms = (Arm("AdamW, warmup+cosine", "AdamW", -14, adam, schedule=True),
            Arm("AdamWScheduleFree", "AdamWScheduleFree", -12, adam),
            Arm("SGD Nesterov, warmup+cosine", "SGD", -8, dict(momentum=0.9, nesterov=True), schedule=True),
            Arm("SGDScheduleFree", "SGDScheduleFree", -4, dict(momentum=0.9)),
            Arm(f"AdamW, warmup+cosine, {factor}x batch", "AdamW", -12, adam, schedule=True, large_batch=True),
            Arm(f"LAMB, warmup+cosine, {factor}x batch", "LAMB", -10, adam, schedule=True, large_batch=True))
    return Task("digits", "test loss", 64, factor * 64, lambda batch: epochs * -(-len(y_train) // batch), train,
                arms, grid_seeds=(0,) if quick else (0, 1, 2), best_seeds=(0,) if quick else (0, 1, 2, 3, 4),
                settings=dict(model="64-128-10 ReLU MLP", epochs=epochs, train_examples=len(y_train),
                              test_examples=len(y_test)))


# --- tuning ------------------------------------------------------------------------------------------------------

def run_arm(task, arm, stand_in, log):
    """Grid, window and best-rate reruns of one arm: every (rate, seed) run once, in the order needed."""
    optimizer_class, implementation = resolve_optimizer(arm.optimizer, stand_in)
    batch = task.large_batch_size if arm.large_batch else task.batch_size
    steps = task.steps(batch)
    schedule = warmup_cosine(steps, max(1, round(0.05 * steps))) if arm.schedule else None
    runs = {}  # (q, seed) -> result

    def mean_loss(q, seeds=task.grid_seeds):
        for seed in seeds:
            if (q, seed) not in runs:
                lr = 10 ** (q / 4)
                start = time.perf_counter()
                result = task.train(make_optimizer_factory(optimizer_class, arm, lr, steps), schedule, batch, steps,
                                    seed)
                runs[q, seed] = dict(lr=lr, q=q, seed=seed, seconds=time.perf_counter() - start, **result)
                log(f"  {task.name:6} {arm.label:34} lr {lr:9.3g} seed {seed}  {task.loss_name} "
                    f"{result['loss']:.4f}  ({runs[q, seed]['seconds']:.1f} s)")
        return statistics.fmean(runs[q, seed]["loss"] for seed in seeds)

    grid = [arm.grid_start + 2 * k for k in range(5)]
    for _ in range(3):  # extend the grid (at most 3 times) while its best is at an edge
        best = min(grid, key=mean_loss)
        if best == grid[0]:
            grid.insert(0, grid[0] - 2)
        elif best == grid[-1]:
            grid.append(grid[-1] + 2)
        else:
            break
    best = min(grid, key=mean_loss)
    window = [best + offset for offset in WINDOW]
    window_losses = [mean_loss(q) for q in window]
    tuned = min(sorted({q for q, _ in runs}), key=mean_loss)
    mean_loss(tuned, task.best_seeds)
    for run in runs.values():  # curves are kept for the tuned rate only (the plot's), to keep the JSON small
        if run["q"] != tuned:
            del run["curve"]
    return dict(label=arm.label, optimizer=arm.optimizer, implementation=implementation,
                options=arm.options, schedule="warmup+cosine" if arm.schedule else "none", batch_size=batch,
                steps=steps, grid=[10 ** (q / 4) for q in grid], window=[10 ** (q / 4) for q in window],
                best_lr=10 ** (tuned / 4), best_losses=[runs[tuned, seed]["loss"] for seed in task.best_seeds],
                best_accuracies=[runs[tuned, seed]["accuracy"] for seed in task.best_seeds],
                sensitivity=max(window_losses) / min(window_losses),
                runs=sorted(runs.values(), key=lambda run: (run["q"], run["seed"])))


def machine():
    return dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), python=platform.python_version(), torch=torch.__version__,
                numpy=np.__version__, date=datetime.datetime.now().isoformat(timespec="seconds"),
                load_average=os.getloadavg()[0], tree=source_tree())


def source_tree():
    """The commit the run's fastopt came from, and whether its sources had uncommitted changes (None outside git)."""
    def git(*command):
        return subprocess.run(["git", *command], cwd=BENCH, capture_output=True, text=True, check=True).stdout.strip()
    try:
        changed = git("status", "--porcelain", "--", "../fastopt", "../kernels")
        return git("rev-parse", "--short", "HEAD") + (" + uncommitted changes to fastopt" if changed else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def run(quick, threads, stand_in, command, log):
    torch.set_num_threads(threads)
    start, cpu_start, machine_at_start = time.perf_counter(), time.process_time(), machine()
    tasks = {}
    for task in (lm_task(quick), digits_task(quick)):
        task_start = time.perf_counter()
        arms = [run_arm(task, arm, stand_in, log) for arm in task.arms]
        tasks[task.name] = dict(loss_name=task.loss_name, grid_seeds=task.grid_seeds, best_seeds=task.best_seeds,
                                settings=task.settings, arms=arms, seconds=time.perf_counter() - task_start)
    implementations = {arm["optimizer"]: arm["implementation"] for task in tasks.values() for arm in task["arms"]}
    return dict(command=command, machine=dict(machine_at_start, load_average_end=os.getloadavg()[0]), quick=quick,
                threads=threads, implementations=implementations,
                stand_ins=sorted(name for name, where in implementations.items() if where.startswith("STAND-IN")),
                tasks=tasks, seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu_start)


def finite_or_none(value):
    """JSON has no inf: a diverged run's loss is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    return value


# --- the report --------------------------------------------------------------------------------------------------

def loss_text(loss):
    return "diverged" if loss is None else f"{loss:.3f}"


def spread_text(values):
    if any(value is None for value in values):
        return "diverged on a seed"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def markdown(results):
    lines = []
    if results["stand_ins"]:
        lines += ["# Self-tuning optimizers: STAND-IN RUN, not fastopt's results", "",
                  f"**{', '.join(results['stand_ins'])} ran stand-ins** (see Implementations), not fastopt's "
                  "classes: these numbers check the harness and show what the algorithms do, not what fastopt does. "
                  "`python bench/self_tuning.py` (without `--stand-ins`) runs fastopt's where `fastopt.torch` has "
                  "them.", ""]
    else:
        lines += ["# Self-tuning optimizers: schedule-free AdamW and SGD, and LAMB, in fastopt.torch", ""]
    m = results["machine"]
    lines += [f"- Machine: {m['processor']}, {m['cpus']} CPUs, {m['platform']}, Python {m['python']}, torch "
              f"{m['torch']}, {results['threads']} torch threads; load average {m['load_average']:.1f} at the start, "
              f"{m['load_average_end']:.1f} at the end.",
              f"- Date: {m['date']}, tree {m['tree']}. Whole run: {results['seconds'] / 60:.1f} min, "
              f"{results['cpu_seconds'] / 60:.1f} min of CPU"
              f"{' (--quick: a smoke run, numbers meaningless)' if results['quick'] else ''}.",
              f"- Command: `{results['command']}`; method and settings: the script's docstring.", "",
              "## Implementations", "", "| optimizer | ran |", "|---|---|"]
    lines += [f"| {name} | {where} |" for name, where in sorted(results["implementations"].items())]
    lines += comparisons(results)
    for name, task in results["tasks"].items():
        lines += ["", f"## {name}: {task['loss_name']}", "", settings_text(name, task), "",
                  f"Tuned: the best rate of all run; its loss is mean ± std over seeds {list(task['best_seeds'])}. "
                  f"Sensitivity: max / min of the {task['loss_name']} (seeds {list(task['grid_seeds'])}) over the 10x "
                  "window around the grid's best.", ""]
        accuracy = name == "digits"
        lines += ["| arm | batch | steps | tuned lr | " + task["loss_name"] + (" | test accuracy" if accuracy else "")
                  + " | sensitivity (10x) | wall s per run |", "|---|--:|--:|--:|--:|" + ("--:|" if accuracy else "")
                  + "--:|--:|"]
        for arm in task["arms"]:
            seconds = statistics.fmean(run["seconds"] for run in arm["runs"])
            lines.append(f"| {arm['label']} | {arm['batch_size']} | {arm['steps']} | {arm['best_lr']:.3g} | "
                         f"{spread_text(arm['best_losses'])} | "
                         + (f"{spread_text(arm['best_accuracies'])} | " if accuracy else "")
                         + f"{sensitivity_text(arm['sensitivity'])} | {seconds:.2f} |")
        lines += ["", f"{task['loss_name']} at every rate run (seeds {list(task['grid_seeds'])}; "
                  "**bold**: the tuned rate; W: in the 10x window):", ""]
        lines += ["| arm | lr: loss |", "|---|---|"]
        for arm in task["arms"]:
            cells = []
            for lr, loss in rate_losses(arm, task["grid_seeds"]):
                window = " W" if any(math.isclose(lr, other) for other in arm["window"]) else ""
                text = f"{lr:.3g}: {loss_text(loss)}{window}"
                cells.append(f"**{text}**" if math.isclose(lr, arm["best_lr"]) else text)
            lines.append(f"| {arm['label']} | {', '.join(cells)} |")
    return "\n".join(lines) + "\n"


BASELINES = {"AdamWScheduleFree": "AdamW", "SGDScheduleFree": "SGD", "LAMB": "AdamW"}  # compared at the same batch


def comparisons(results):
    """The new optimizers against their baselines, each at its tuned rate: the table that says what they buy."""
    lines = ["", "## What they buy", "",
             "Each new optimizer against its baseline at the same batch size, both at their tuned rates. Loss "
             "difference < 0: the new one is better; ± one standard error of the difference (seed-to-seed spread). "
             "Sensitivity: max / min loss over a 10x window of rates (1: the rate does not matter), new vs baseline.",
             "",
             "| task | optimizer | against | loss difference | accuracy difference | sensitivity |",
             "|---|---|---|--:|--:|--:|"]
    for name, task in results["tasks"].items():
        for arm in task["arms"]:
            baseline = next((other for other in task["arms"] if other["optimizer"] == BASELINES.get(arm["optimizer"])
                             and other["batch_size"] == arm["batch_size"]), None)
            if baseline is None:
                continue
            lines.append(f"| {name} | {arm['label']} | {baseline['label']} | "
                         f"{difference_text(arm['best_losses'], baseline['best_losses'])} | "
                         f"{difference_text(arm['best_accuracies'], baseline['best_accuracies'])} | "
                         f"{sensitivity_text(arm['sensitivity'])} vs {sensitivity_text(baseline['sensitivity'])} |")
    return lines


def difference_text(values, baseline_values):
    """mean(values) - mean(baseline_values) ± its standard error; None values: no such metric (the LM's accuracy)
    or a diverged run (a loss)."""
    if all(value is None for value in values + baseline_values):
        return "n/a"
    if None in values or None in baseline_values:
        return "diverged on a seed"
    difference = statistics.fmean(values) - statistics.fmean(baseline_values)
    if min(len(values), len(baseline_values)) < 2:
        return f"{difference:+.3f}"
    error = math.sqrt(statistics.variance(values) / len(values) + statistics.variance(baseline_values)
                      / len(baseline_values))
    return f"{difference:+.3f} ± {error:.3f}"


def sensitivity_text(sensitivity):
    return "diverged" if sensitivity is None else f"{sensitivity:.2f}"


def settings_text(name, task):
    settings = task["settings"]
    if name == "lm":
        model = settings["model"]
        return (f"`bench/lm.py`: {model['layers']} layers, d_model {model['d_model']}, {model['heads']} heads, context "
                f"{model['context']}, byte vocabulary; {settings['steps']} steps at the normal batch; trained on "
                f"{settings['train_bytes']:,} bytes of {len(settings['train_modules'])} stdlib modules, held out: "
                f"{settings['heldout_bytes']:,} bytes of {', '.join(settings['heldout_modules'])} "
                f"({settings['model']['heldout_windows']} windows; corpus SHA-256 {settings['corpus_sha256'][:12]}). "
                f"An untrained model scores log(256) = 5.545. Task time {task['seconds']:.0f} s.")
    return (f"{settings['model']} on fastopt.demo's digits split ({settings['train_examples']} train, "
            f"{settings['test_examples']} test images), {settings['epochs']} epochs at either batch size. "
            f"Task time {task['seconds']:.0f} s.")


def rate_losses(arm, seeds):
    """(lr, mean loss over ``seeds``, None if one diverged) for every rate the arm ran, ascending."""
    by_rate = {}
    for run in arm["runs"]:
        if run["seed"] in seeds:
            by_rate.setdefault(run["lr"], []).append(run["loss"])
    return [(lr, None if None in losses else statistics.fmean(losses)) for lr, losses in sorted(by_rate.items())]


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    tasks = results["tasks"]
    figure, axes = plt.subplots(len(tasks), 2, figsize=(12, 4.5 * len(tasks)), squeeze=False)
    for row, (name, task) in enumerate(tasks.items()):
        curves, rates = axes[row]
        for arm in task["arms"]:
            run = next(run for run in arm["runs"] if "curve" in run and run["seed"] == task["best_seeds"][0])
            points = [point for point in run["curve"] if point["loss"] is not None]
            line, = curves.plot([p["examples"] for p in points], [p["loss"] for p in points],
                                label=f"{arm['label']} (lr {arm['best_lr']:.3g})")
            losses = rate_losses(arm, task["grid_seeds"])
            rates.plot([lr for lr, loss in losses if loss is not None],
                       [loss for lr, loss in losses if loss is not None], "o-", color=line.get_color(),
                       label=arm["label"])
        curves.set(xlabel="training examples", ylabel=task["loss_name"], yscale="log",
                   title=f"{name}: at the tuned rate, seed {task['best_seeds'][0]}")
        rates.set(xlabel="learning rate", ylabel=f"final {task['loss_name']}", xscale="log", yscale="log",
                  title=f"{name}: final loss against the rate (diverged rates left out)")
        for axis in (curves, rates):
            low, high = axis.get_ylim()
            if high < 10 * low:  # less than a decade: a log scale would label one or two ticks
                axis.set_yscale("linear")
            else:
                axis.yaxis.set_major_locator(LogLocator(subs=(1, 2, 3, 5)))
                axis.yaxis.set_major_formatter(FormatStrFormatter("%g"))
                axis.yaxis.set_minor_formatter(NullFormatter())
            axis.legend(fontsize=8)
    if results["stand_ins"]:
        figure.suptitle(f"STAND-IN RUN ({', '.join(results['stand_ins'])}: not fastopt)", color="red")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of seconds: tiny steps, one seed; writes "
                        "only the paths given explicitly and prints the report")
    parser.add_argument("--report", action="store_true", help="only rewrite the report and plot from --out")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s: the models' "
                        "matmuls are too small to gain from two, and a second thread waits on a busy machine)")
    parser.add_argument("--stand-ins", action="store_true", help="run the stand-ins even where fastopt.torch has the "
                        "optimizer (a cross-check of fastopt's classes on the same runs)")
    parser.add_argument("--out", help="results JSON (default: bench/self_tuning.json)")
    parser.add_argument("--markdown", help="the report (default: bench/RESULTS_SELF_TUNING.md)")
    parser.add_argument("--plot", help="the plot (default: bench/self_tuning.png)")
    arguments = parser.parse_args()
    if not arguments.quick:
        arguments.out = arguments.out or os.path.join(BENCH, "self_tuning.json")
        arguments.markdown = arguments.markdown or os.path.join(BENCH, "RESULTS_SELF_TUNING.md")
        arguments.plot = arguments.plot or os.path.join(BENCH, "self_tuning.png")

    if arguments.report:
        with open(arguments.out) as file:
            results = json.load(file)
    else:
        command = shlex.join(["python", "bench/self_tuning.py", *sys.argv[1:]])
        results = finite_or_none(run(arguments.quick, arguments.threads, arguments.stand_ins, command,
                                     lambda line: print(line, file=sys.stderr)))
        if arguments.out:
            with open(arguments.out, "w") as file:
                json.dump(results, file, indent=1, allow_nan=False)
    report = markdown(results)
    if arguments.markdown:
        with open(arguments.markdown, "w") as file:
            file.write(report)
    else:
        print(report)
    if arguments.plot:
        plot(results, arguments.plot)


if __name__ == "__main__":
    main()
