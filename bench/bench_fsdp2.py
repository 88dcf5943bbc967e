"""The optimizer step over FSDP2's many small DTensors: fastopt.torch.AdamW beside torch.optim.AdamW(fused=True), on
2 gloo ranks of this machine (CPU, one thread each).

The model is GPT-2 small's parameter list (148 tensors) with each dimension divided by ``--divisor`` (64 by default:
(50257, 768) becomes (786, 12); 32,256 params in all), one module per transformer layer, ``fully_shard`` on each and
on the root, as an FSDP2 training script shards it: every param is a DTensor whose local shard is a few hundred
bytes, so the step's cost is the host's work per tensor, which is what this measures. The grads are DTensors of
random values, set once (a step does not consume them).

| variant | one timed step |
|---|---|
| ``fastopt`` | ``fastopt.torch.AdamW(params).step()``: one fused kernel over the local shards |
| ``torch_fused`` | ``torch.optim.AdamW(params, fused=True).step()``: torch's fused CPU kernel, dispatched through DTensor |
| ``torch_foreach`` | ``torch.optim.AdamW(params, foreach=True).step()`` |
| ``fastopt_clip`` | ``fastopt.torch.AdamW(params, max_grad_norm=1.0).step()``: also one all-reduce of the local sum of squares |
| ``torch_fused_clip`` | ``torch.nn.utils.clip_grad_norm_(params, 1.0)`` then the ``torch_fused`` step |

Each variant has its own copy of the model. The variants take turns (each round runs each once, in a rotating order,
after a barrier), a variant's time in a round is the mean of ``--steps`` steps on the slower rank, and each reports
the median over the rounds: only ratios within one run hold.

    python bench/bench_fsdp2.py                                    # the table
    python bench/bench_fsdp2.py --output bench/RESULTS_FSDP2.md --repeat 3
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torch.distributed as dist

from bench_distributed import free_port, join_gloo, machine

WORLD_SIZE = 2
VARIANTS = ("fastopt", "torch_fused", "torch_foreach", "fastopt_clip", "torch_fused_clip")
BASELINES = {"fastopt": "torch_fused", "fastopt_clip": "torch_fused_clip"}
MAX_NORM = 1.0


def shrunk_shapes(divisor):
    from fastopt.benchmark import gpt2_small_shapes

    return [tuple(max(1, -(-size // divisor)) for size in shape) for shape in gpt2_small_shapes()]


def make_model(shapes, seed=0):
    """GPT-2's tensors as FSDP2 would see them: embeddings and final norm on the root, one module per layer."""
    from torch.distributed.fsdp import fully_shard

    generator = torch.Generator().manual_seed(seed)

    def module(layer_shapes):
        holder = torch.nn.Module()
        holder.weights = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(shape, generator=generator))
                                                for shape in layer_shapes)
        return holder

    root = module(shapes[:2] + shapes[-2:])
    root.layers = torch.nn.ModuleList(module(shapes[2 + 12 * number:14 + 12 * number]) for number in range(12))
    for layer in root.layers:
        fully_shard(layer)
    fully_shard(root)
    return root


def set_grads(model, seed):
    from torch.distributed.tensor import DTensor

    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        local = torch.randn(param.to_local().shape, generator=generator)
        param.grad = DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                        shape=param.shape, stride=param.stride())


def make_step(name, model):
    import fastopt.torch as ft

    params = list(model.parameters())
    if name == "fastopt":
        return ft.AdamW(params, lr=1e-3, weight_decay=0.1).step
    if name == "fastopt_clip":
        return ft.AdamW(params, lr=1e-3, weight_decay=0.1, max_grad_norm=MAX_NORM).step
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, fused=name != "torch_foreach",
                                  foreach=True if name == "torch_foreach" else None)
    if name != "torch_fused_clip":
        return optimizer.step

    def step():
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        optimizer.step()
    return step


def run_rank(rank, port, divisor, rounds, steps, variants, output):
    join_gloo(rank, port)
    shapes = shrunk_shapes(divisor)
    stepping = {}
    for name in variants:
        model = make_model(shapes)
        set_grads(model, seed=1 + rank)
        stepping[name] = make_step(name, model)
        stepping[name]()  # warm-up: compiled kernels, state allocated
    times = {name: [] for name in variants}
    for number in range(rounds):
        shift = number % len(variants)
        for name in variants[shift:] + variants[:shift]:
            dist.barrier()
            start = time.perf_counter()
            for _ in range(steps):
                stepping[name]()
            elapsed = torch.tensor([(time.perf_counter() - start) / steps], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times[name].append(elapsed.item())
    if rank == 0:
        with open(output, "w") as file:
            json.dump({"times": times, "params": int(sum(np.prod(shape) for shape in shapes)),
                       "tensors": len(shapes)}, file)
    dist.destroy_process_group()


def measure(divisor, rounds, steps, variants):
    with tempfile.TemporaryDirectory() as directory:
        output = os.path.join(directory, "result.json")
        torch.multiprocessing.spawn(run_rank, args=(free_port(), divisor, rounds, steps, variants, output),
                                    nprocs=WORLD_SIZE)
        with open(output) as file:
            return json.load(file)


def table(result):
    """Markdown rows: median ms per step, spread, and fastopt's ratio to its torch counterpart."""
    medians = {name: statistics.median(values) * 1e3 for name, values in result["times"].items()}
    lines = ["| variant | ms/step (median) | min - max | us per tensor | fastopt / torch |", "|---|--:|--:|--:|--:|"]
    for name, median in medians.items():
        values = result["times"][name]
        baseline = medians.get(BASELINES.get(name))
        ratio = f"{median / baseline:.3f}" if baseline else "-"
        lines.append(f"| {name} | {median:.3f} | {min(values) * 1e3:.3f} - {max(values) * 1e3:.3f} | "
                     f"{median * 1e3 / result['tensors']:.1f} | {ratio} |")
    return lines, medians


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--divisor", type=int, default=64, help="each dimension of GPT-2's tensors divided by this")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20, help="steps per variant per round")
    parser.add_argument("--repeat", type=int, default=1, help="whole runs (fresh processes), to show the spread")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--output", help="write the results as Markdown here")
    args = parser.parse_args(argv)
    variants = [name for name in args.variants.split(",") if name]
    runs = []
    for _ in range(args.repeat):
        result = measure(args.divisor, args.rounds, args.steps, variants)
        lines, medians = table(result)
        print("\n".join(lines), flush=True)
        runs.append((result, lines, medians))
    import fastopt

    header = [
        "# The optimizer step over FSDP2 DTensors: fastopt.torch.AdamW beside torch.optim.AdamW(fused=True), "
        "2 gloo ranks (CPU)", "",
        f"- Command: `{shlex.join(['python', 'bench/bench_fsdp2.py', *sys.argv[1:]])}`",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        f"- Machine: {machine()}; 2 ranks of 1 thread each (torch and Numba)",
        f"- Versions: python {platform.python_version()}, torch {torch.__version__}, fastopt {fastopt.__version__}",
        f"- Params: GPT-2 small's {runs[0][0]['tensors']} tensors, each dimension / {args.divisor}: "
        f"{runs[0][0]['params']:,} float32 params, `fully_shard` per layer and on the root (Shard(0) on 2 ranks); "
        f"{args.rounds} rounds of {args.steps} steps per variant per run", "",
        "Host time of `optimizer.step()` (with clipping: `clip_grad_norm_` + step) on the slower rank; the "
        "variants took turns, so compare ratios within a run. The tensors are a few hundred bytes per rank: the "
        "time is the host's work per tensor, not memory traffic (the local shards total "
        f"{runs[0][0]['params'] * 16 / WORLD_SIZE / 1e3:.0f} kB of param, grad and two states per rank). The "
        "variants are described in the docstring of bench/bench_fsdp2.py.", ""]
    summary = []
    for name, baseline in BASELINES.items():
        ratios = [medians[name] / medians[baseline] for _, _, medians in runs
                  if name in medians and baseline in medians]
        if ratios:
            summary.append(f"- {name} / {baseline} step time over the runs: {', '.join(f'{r:.3f}' for r in ratios)} "
                           f"(median {statistics.median(ratios):.3f}).")
    body = []
    for number, (result, lines, medians) in enumerate(runs, 1):
        body += [f"## Run {number}", ""] + lines + [""]
    report = "\n".join(header + summary + [""] + body) + "\n"
    if args.output:
        with open(args.output, "w") as file:
            file.write(report)
    print("\n" + report)


def test_quick():
    """A small run: every variant steps on the FSDP2 model."""
    result = measure(64, 2, 2, list(VARIANTS))
    assert set(result["times"]) == set(VARIANTS)


if __name__ == "__main__":
    main()
