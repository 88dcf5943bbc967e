"""The step time of schedule-free AdamW/SGD and LAMB on the CPU, in one interleaved run per comparison, as ratios.

1. At 32M float32 params (one tensor), ``--threads`` Numba and torch threads: fastopt's ``AdamWScheduleFree`` and
   ``SGDScheduleFree`` beside the ``schedulefree`` package's (its foreach path, the default: about nine passes)
   and beside a ceiling kernel with the same reads and writes (28 and 20 B/param).
2. On GPT-2 small's 148 tensors (124M params): fastopt's ``LAMB`` (two passes, 40 B/param) beside
   ``torch.optim.AdamW(fused=True)`` (28 B/param), fastopt's AdamW, and a two-pass ceiling with LAMB's traffic.
   LAMB's second pass recomputes the update direction from the moments rather than reading a stored one: both
   move 40 B/param (store: 28 + 12; recompute: 24 + 16), and storing needs one more buffer; the ceiling ratio says
   what the recomputation costs.

Each variant's time is the median of ``--rounds`` rounds, the variants taking turns within each round (drifts in
bandwidth hit them alike). Writes JSON (``--out``) and a Markdown table (``--markdown``).

    python bench/bench_schedule_free_lamb.py --out bench/schedule_free_lamb.json \
        --markdown bench/RESULTS_SCHEDULE_FREE_LAMB.md
"""
import argparse
import datetime
import json
import os
import platform
import statistics

import numba
import numpy as np
import torch

import fastopt as fo
from fastopt import benchmark

FLOAT32_BYTES = 4


def interleaved(steps, rounds, sample_seconds):
    """{variant: median seconds per step}, {variant: round times}: warmed up, then ``rounds`` rounds in turn."""
    counts = {}
    for name, step in steps.items():
        step(), step()
        counts[name] = max(1, min(50, round(sample_seconds / max(benchmark._time_steps(step, 1), 1e-7))))
    samples = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            samples[name].append(benchmark._time_steps(step, counts[name]))
    return {name: statistics.median(values) for name, values in samples.items()}, samples


def torch_view(array):
    tensor = torch.from_numpy(array).requires_grad_()
    return tensor


def schedule_free_group(name, size, rounds, sample_seconds):
    """fastopt, the package and the ceiling on one tensor of ``size`` float32 params."""
    import schedulefree

    case = benchmark.CASES[name]
    rng = np.random.default_rng(0)
    arrays = {}
    for variant in ("fastopt", "package", "ceiling"):
        param, grad = benchmark.staggered(size, 0), benchmark.staggered(size, 1)
        param[...] = rng.standard_normal(size, dtype=np.float32)
        grad[...] = rng.standard_normal(size, dtype=np.float32)
        arrays[variant] = (param, grad)
    optimizer = getattr(fo, name)([arrays["fastopt"][0]], lr=1e-3)
    tensor = torch_view(arrays["package"][0])
    tensor.grad = torch.from_numpy(arrays["package"][1])
    package = getattr(schedulefree, name)([tensor], lr=1e-3)
    package.train()
    steps = {"fastopt": lambda: optimizer.step([arrays["fastopt"][1]]),
             "package": package.step,
             "ceiling": benchmark.ceiling_step(case, *arrays["ceiling"])}
    medians, samples = interleaved(steps, rounds, sample_seconds)
    return dict(group=f"{name} {size >> 20}M", bytes_per_param=case.bytes_per_param, params=size,
                ms={k: v * 1e3 for k, v in medians.items()},
                samples_ms={k: [v * 1e3 for v in values] for k, values in samples.items()},
                fastopt_speedup_over_package=medians["package"] / medians["fastopt"],
                fraction_of_ceiling=medians["ceiling"] / medians["fastopt"])


def lamb_group(rounds, sample_seconds):
    """LAMB, AdamW (fastopt) and torch's fused AdamW on GPT-2 small's tensors, and LAMB's two-pass ceiling over one
    buffer of the same size."""
    shapes = benchmark.gpt2_small_shapes()
    total = sum(int(np.prod(shape)) for shape in shapes)
    rng = np.random.default_rng(0)

    def arrays(ordinal):
        params = [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]
        grads = [rng.standard_normal(shape, dtype=np.float32) for shape in shapes]
        return params, grads

    lamb_params, lamb_grads = arrays(0)
    lamb = fo.LAMB(lamb_params, lr=1e-3)
    adamw_params, adamw_grads = arrays(1)
    adamw = fo.AdamW(adamw_params, lr=1e-3)
    torch_params, torch_grads = arrays(2)
    tensors = [torch_view(p) for p in torch_params]
    for tensor, grad in zip(tensors, torch_grads):
        tensor.grad = torch.from_numpy(grad)
    fused = torch.optim.AdamW(tensors, lr=1e-3, fused=True)
    del torch_params
    ceiling_param, ceiling_grad = benchmark.staggered(total, 0), benchmark.staggered(total, 1)
    ceiling_param[...] = 0.5
    ceiling_grad[...] = 0.25
    # The other way to LAMB's second pass: store u in the first (read p, g, m, v; write m, v, u) and read it in the
    # second (read p, u; write p). The same 40 B/param as recomputing, and one more buffer.
    storing_buffers = [benchmark.staggered(total, ordinal) for ordinal in (2, 3, 4)]
    for buffer in storing_buffers:
        buffer.fill(0)

    def ceiling_storing_the_direction():
        benchmark.ceiling_two_passes_storing(ceiling_param, ceiling_grad, *storing_buffers, np.float32(0.5),
                                             np.float32(-1e-6))

    steps = {"fastopt_lamb": lambda: lamb.step(lamb_grads),
             "fastopt_adamw": lambda: adamw.step(adamw_grads),
             "torch_adamw_fused": fused.step,
             "ceiling_lamb_recomputing": benchmark.ceiling_step(benchmark.CASES["LAMB"], ceiling_param, ceiling_grad),
             "ceiling_lamb_storing": ceiling_storing_the_direction}
    medians, samples = interleaved(steps, rounds, sample_seconds)
    return dict(group="LAMB GPT-2 small", params=total, tensors=len(shapes),
                bytes_per_param=dict(lamb=40, adamw=28), ms={k: v * 1e3 for k, v in medians.items()},
                samples_ms={k: [v * 1e3 for v in values] for k, values in samples.items()},
                lamb_over_torch_fused_adamw=medians["fastopt_lamb"] / medians["torch_adamw_fused"],
                lamb_fraction_of_ceiling=medians["ceiling_lamb_recomputing"] / medians["fastopt_lamb"],
                storing_over_recomputing_ceiling=medians["ceiling_lamb_storing"] / medians["ceiling_lamb_recomputing"],
                lamb_gb_per_s=40 * total / medians["fastopt_lamb"] / 1e9)


def markdown(result):
    machine = result["machine"]
    lines = [f"# Schedule-free AdamW/SGD and LAMB: CPU step time ({machine['date']})", "",
             f"`{result['command']}`", "",
             f"{machine['platform']}, {machine['cpus']} cores, {result['threads']} thread(s), numba {machine['numba']}, "
             f"torch {machine['torch']}, schedulefree {machine['schedulefree']}; load average {machine['load']:.1f} "
             f"at the start. Medians of {result['rounds']} interleaved rounds.", "",
             "## Schedule-free: fastopt against the `schedulefree` package and the ceiling", "",
             "| group | B/param | fastopt ms | package ms | ceiling ms | fastopt speed-up | fraction of ceiling |",
             "|---|---|---|---|---|---|---|"]
    for row in result["schedule_free"]:
        ms = row["ms"]
        lines.append(f"| {row['group']} | {row['bytes_per_param']} | {ms['fastopt']:.2f} | {ms['package']:.2f} | "
                     f"{ms['ceiling']:.2f} | {row['fastopt_speedup_over_package']:.2f}x | "
                     f"{row['fraction_of_ceiling']:.2f} |")
    row = result["lamb"]
    ms = row["ms"]
    lines += ["", f"## LAMB on GPT-2 small ({row['tensors']} tensors, {row['params']:,} params)", "",
              "| variant | ms per step |", "|---|---|"]
    lines += [f"| {name} | {value:.1f} |" for name, value in ms.items()]
    lines += ["", f"- LAMB / torch AdamW(fused=True): **{row['lamb_over_torch_fused_adamw']:.2f}** (target <= 1.6; "
              "LAMB moves 40 B/param, AdamW 28)",
              f"- LAMB's fraction of a two-pass ceiling with its bytes: **{row['lamb_fraction_of_ceiling']:.2f}** "
              f"({row['lamb_gb_per_s']:.1f} GB/s counted at 40 B/param)",
              f"- Storing u instead of recomputing it, as ceilings (the same 40 B/param): "
              f"**{row['storing_over_recomputing_ceiling']:.2f}** of the recomputing pattern's time, plus one buffer "
              "of 4 B/param"]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=32 << 20, help="params of the schedule-free groups")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sample-seconds", type=float, default=0.3)
    parser.add_argument("--out", default="bench/schedule_free_lamb.json")
    parser.add_argument("--markdown")
    arguments = parser.parse_args()
    numba.set_num_threads(arguments.threads)
    torch.set_num_threads(arguments.threads)
    from importlib.metadata import version

    result = dict(command="python " + " ".join(os.sys.argv), threads=arguments.threads, rounds=arguments.rounds,
                  machine=dict(date=datetime.date.today().isoformat(), platform=platform.platform(),
                               cpus=os.cpu_count(), numba=numba.__version__, torch=torch.__version__,
                               schedulefree=version("schedulefree"),
                               load=os.getloadavg()[0]))
    result["schedule_free"] = [schedule_free_group(name, arguments.size, arguments.rounds, arguments.sample_seconds)
                               for name in ("AdamWScheduleFree", "SGDScheduleFree")]
    result["lamb"] = lamb_group(arguments.rounds, arguments.sample_seconds)
    with open(arguments.out, "w") as file:
        json.dump(result, file, indent=1)
    text = markdown(result)
    if arguments.markdown:
        with open(arguments.markdown, "w") as file:
            file.write(text)
    print(text)


if __name__ == "__main__":
    main()
