"""``fastopt.lr_sweep`` against the sequential runs it replaces: K copies of the demo MLP in one sweep, versus K runs
of the same steps one after the other, each copy's trajectory checked bit for bit against its run alone.

    python bench/lr_sweep.py                              # 16 rates, 200 steps, 5 interleaved rounds, 1 thread
    python bench/lr_sweep.py --copies 16 --steps 200 --rounds 7 --threads 2 --json bench/lr_sweep.json
    python bench/lr_sweep.py --breakdown --rounds 9      # where one numpy step's time goes, part by part

Pairs, each timed in the same round (variants in an order that rotates from round to round; a pair's ratio is
taken within a round, and the median over rounds is reported, because this host's speed drifts within seconds):

- ``numpy stacked`` (``lr_sweep(..., vectorized=True)``: one stacked forward and backward,
  :func:`fastopt.lr_sweeper.mlp_losses_and_grads`, and one fused optimizer step for all copies) and ``numpy per
  copy`` (``step_fn`` called per copy, one fused optimizer step), each against ``numpy sequential``: K plain demo
  loops (``MLP.loss_and_grads``, then ``AdamW.step``) on the same batches.
- ``torch vmap`` (``lr_sweep`` of a torch MLP of the same shape: ``torch.func.vmap`` forward and backward,
  ``fastopt.torch.AdamW``) against ``torch sequential``: K plain torch loops (forward, ``backward``,
  ``fastopt.torch.AdamW.step``).

The rates (log-spaced, 1e-4 to 3e-2 by default) are ones at which no copy diverges, so that both sides do the same
work; the script checks that. Physics: the model's matmul FLOPs per step (2.6 MFLOP per copy at batch 64) and the
optimizer's bytes per step (AdamW: 28 B per param) are reported beside the times.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this tree's fastopt

import numpy as np  # noqa: E402

import fastopt as fo  # noqa: E402
from fastopt import demo, lr_sweeper  # noqa: E402


def model_flops(batch_size, hidden, inputs=64, classes=10):
    """Multiply-adds x 2 of one copy's forward (two matmuls) and backward (three: the input's grad is not needed)."""
    forward = inputs * hidden + hidden * classes
    backward = classes * hidden + inputs * hidden + hidden * classes
    return 2 * batch_size * (forward + backward)


def numpy_sequential(lrs, steps, data, batches, hidden, seed):
    """K plain demo loops, one after the other: what the sweep replaces."""
    losses = np.empty((len(lrs), steps))
    params = []
    for number, lr in enumerate(lrs):
        model = demo.MLP(hidden=hidden, seed=seed)
        optimizer = demo.make_optimizer("adamw", model.params, float(lr))
        for step in range(steps):
            loss, grads = model.loss_and_grads(data.x_train[batches[step]], data.y_train[batches[step]])
            optimizer.step(grads)
            losses[number, step] = loss
        params.append(model.params)
    return losses, params


def torch_pair(data, batches, hidden, seed):
    """(make_model, step_fn) of a torch MLP shaped like the demo's, on the same batches."""
    import torch

    inputs, targets = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    batch_indices = torch.from_numpy(batches)

    def make_model():
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))

    def step_fn(model, step):
        batch = batch_indices[step]
        return torch.nn.functional.cross_entropy(model(inputs[batch]), targets[batch])

    return make_model, step_fn


def torch_sequential(lrs, steps, make_model, step_fn):
    from fastopt.torch import AdamW

    losses = np.empty((len(lrs), steps))
    params = []
    for number, lr in enumerate(lrs):
        model = make_model()
        optimizer = AdamW(model.parameters(), lr=float(lr))
        for step in range(steps):
            optimizer.zero_grad()
            loss = step_fn(model, step)
            loss.backward()
            optimizer.step()
            losses[number, step] = loss.item()
        params.append([param.detach().clone() for param in model.parameters()])
    return losses, params


def breakdown(copies, batch_size, hidden, threads, rounds, data):
    """Microseconds per step of all copies, by part: the numpy forward and backward, the optimizer step (also with
    one group per param of each copy, as without the flat rows), both interleaved as training runs them, and a whole
    100-step sweep per step. Interleaved rounds, medians."""
    import fastopt as fo

    lrs = np.geomspace(1e-4, 3e-2, copies)
    models = [demo.MLP(hidden=hidden) for _ in range(copies)]
    starts, row = lr_sweeper.flat_layout([param.shape for param in models[0].params])
    flat, flat_grads = np.zeros((copies, row), np.float32), np.zeros((copies, row), np.float32)

    def stacked_views(array):
        return [array[:, start:start + param.size].reshape(copies, *param.shape)
                for start, param in zip(starts, models[0].params)]

    stacked, stacked_grads = stacked_views(flat), stacked_views(flat_grads)
    for index, stack in enumerate(stacked):
        stack[...] = [model.params[index] for model in models]
    x, y = data.x_train[:batch_size], data.y_train[:batch_size]
    lr_sweeper.mlp_losses_and_grads(stacked, stacked_grads, x, y)
    for model in models:
        model.loss_and_grads(x, y)
    flat_step = fo.AdamW([{"params": [flat[number]], "lr": lr} for number, lr in enumerate(lrs)], guard=fo.Guard())
    per_param = [[np.ascontiguousarray(stack[number]) for stack in stacked] for number in range(copies)]
    per_param_step = fo.AdamW([{"params": params, "lr": lr} for params, lr in zip(per_param, lrs)], guard=fo.Guard())
    runs = [fo.AdamW(model.params, lr=lr) for model, lr in zip(models, lrs)]
    per_param_grads = [np.ascontiguousarray(stack[number]) for number in range(copies) for stack in stacked_grads]

    def interleaved():
        for model, optimizer in zip(models, runs):
            optimizer.step(model.loss_and_grads(x, y)[1])

    parts = {
        "forward and backward: runs": (lambda: [model.loss_and_grads(x, y) for model in models], 1),
        "forward and backward: sweep": (lambda: lr_sweeper.mlp_losses_and_grads(stacked, stacked_grads, x, y), 1),
        "optimizer step: runs": (lambda: [opt.step(model.grads) for model, opt in zip(models, runs)], 1),
        "optimizer step: sweep": (lambda: flat_step.step(list(flat_grads)), 1),
        "optimizer step: sweep, group per param": (lambda: per_param_step.step(per_param_grads), 1),
        "both interleaved: runs": (interleaved, 1),
        "both: lr_sweep, per step of 100": (lambda: lr_sweeper.sweep_demo_mlp("adamw", lrs, 100, batch_size=batch_size,
                                                                              hidden=hidden, data=data), 100),
    }
    micros = {name: [] for name in parts}
    with demo.thread_limits(threads):
        for number in range(rounds):
            names = list(parts)[number % len(parts):] + list(parts)[:number % len(parts)]
            for name in names:
                run, steps = parts[name]
                repeats = 1 if steps > 1 else 50
                start = time.perf_counter()
                for _ in range(repeats):
                    run()
                micros[name].append((time.perf_counter() - start) / repeats / steps * 1e6)
    for name, values in micros.items():
        print(f"{name:<42}{statistics.median(values):>8.0f} us  ({min(values):.0f}-{max(values):.0f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--copies", type=int, default=16, help="rates in the sweep (default: %(default)s)")
    parser.add_argument("--min-lr", type=float, default=1e-4, help="(default: %(default)s)")
    parser.add_argument("--max-lr", type=float, default=3e-2, help="(default: %(default)s)")
    parser.add_argument("--steps", type=int, default=200, help="steps per copy (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--hidden", type=int, default=128, help="(default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="Numba and torch threads; BLAS runs on one thread, "
                        "as in the demo (default: %(default)s)")
    parser.add_argument("--no-torch", action="store_true", help="leave the torch pair out")
    parser.add_argument("--json", metavar="PATH", help="write the timings here")
    parser.add_argument("--breakdown", action="store_true", help="instead: where the time of one numpy step goes")
    arguments = parser.parse_args()

    seed = 0
    lrs = np.geomspace(arguments.min_lr, arguments.max_lr, arguments.copies)
    data = demo.load_digits_split(seed=seed)
    if arguments.breakdown:
        return breakdown(arguments.copies, arguments.batch_size, arguments.hidden, arguments.threads,
                         arguments.rounds, data)
    batches = lr_sweeper.demo_batches(len(data.y_train), arguments.steps, arguments.batch_size, seed)

    def sweep(vectorized):
        return lr_sweeper.sweep_demo_mlp("adamw", lrs, arguments.steps, batch_size=arguments.batch_size,
                                         hidden=arguments.hidden, seed=seed, threads=arguments.threads,
                                         vectorized=vectorized, data=data)

    def sequential():
        with demo.thread_limits(arguments.threads):
            return numpy_sequential(lrs, arguments.steps, data, batches, arguments.hidden, seed)

    variants = {"numpy stacked": lambda: sweep(True), "numpy per copy": lambda: sweep(False),
                "numpy sequential": sequential}
    pairs = [("numpy stacked", "numpy sequential"), ("numpy per copy", "numpy sequential")]
    if not arguments.no_torch:
        import torch

        make_model, step_fn = torch_pair(data, batches, arguments.hidden, seed)

        def with_torch_threads(run):
            def timed():
                torch.set_num_threads(arguments.threads)  # Numba's OpenMP layer may have reset it
                with demo.thread_limits(arguments.threads):
                    return run()
            return timed

        variants["torch vmap"] = with_torch_threads(lambda: fo.lr_sweep(make_model, step_fn, lrs, arguments.steps))
        variants["torch sequential"] = with_torch_threads(lambda: torch_sequential(lrs, arguments.steps, make_model,
                                                                                   step_fn))
        pairs.append(("torch vmap", "torch sequential"))

    # Warm-up (loads or compiles the kernels) and the exactness check: every copy against its run alone.
    results = {name: run() for name, run in variants.items()}
    for sweep_name, alone_name in pairs:
        result, (alone_losses, alone_params) = results[sweep_name], results[alone_name]
        assert not result.diverged, f"{sweep_name}: rates {result.diverged} diverged; choose a smaller --max-lr"
        for number, model in enumerate(result.models):
            params = model.params if hasattr(model, "params") else [param.detach() for param in model.parameters()]
            assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(params, alone_params[number])), \
                f"{sweep_name}: copy {number}'s params differ from its run alone"
        same_losses = np.array_equal(result.losses, alone_losses)
        assert same_losses or sweep_name.startswith("torch"), f"{sweep_name}: losses differ from the runs alone"
        print(f"{sweep_name}: every copy's params bit for bit as its run alone; losses "
              f"{'bit for bit' if same_losses else f'within {np.max(np.abs(result.losses - alone_losses)):.1e}'}")

    names = list(variants)
    seconds = {name: [] for name in names}
    for number in range(arguments.rounds):
        order = names[number % len(names):] + names[:number % len(names)]
        for name in order:
            start = time.perf_counter()
            variants[name]()
            seconds[name].append(time.perf_counter() - start)
        print(f"round {number + 1}/{arguments.rounds}: " + ", ".join(f"{name} {seconds[name][-1]:.2f} s"
                                                                     for name in names), file=sys.stderr)

    copies, steps = arguments.copies, arguments.steps
    flops = model_flops(arguments.batch_size, arguments.hidden) * copies * steps
    param_count = sum(param.size for param in demo.MLP(hidden=arguments.hidden).params)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cpus; {arguments.threads} thread(s); "
          f"{copies} copies x {steps} steps of AdamW on the {param_count:,}-param demo MLP, batch "
          f"{arguments.batch_size}; median of {arguments.rounds} interleaved rounds")
    print(f"{'variant':<18}{'s':>8}{'ms per step':>13}{'model GFLOP/s':>15}")
    for name in names:
        median = statistics.median(seconds[name])
        print(f"{name:<18}{median:>8.3f}{median / steps * 1e3:>13.2f}{flops / median / 1e9:>15.1f}")
    print(f"(ms per step: all {copies} copies; the optimizer moves {28 * param_count * copies / 1e6:.1f} MB per step)")
    ratios = {}
    for sweep_name, alone_name in pairs:
        per_round = [alone / swept for alone, swept in zip(seconds[alone_name], seconds[sweep_name])]
        ratios[f"{sweep_name} vs {alone_name}"] = per_round
        print(f"{sweep_name} vs {alone_name}: {statistics.median(per_round):.2f}x faster (rounds: "
              f"{', '.join(f'{ratio:.2f}' for ratio in per_round)})")
    if arguments.json:
        with open(arguments.json, "w") as file:
            json.dump({"settings": vars(arguments), "seconds": seconds, "ratios": ratios}, file, indent=1)


if __name__ == "__main__":
    main()
