"""Write bench/RESULTS_GPU.md from a bench/bench_gpu.py run's JSON (``--benchmark-json``) and, optionally, the JSON
of bench/tune_gpu.py (the launch-shape sweep and the graph-replay overhead), both from one device-machine session.

    python bench/report_gpu.py gpu.json [--tune tune.json] [--output bench/RESULTS_GPU.md]

Ratios are taken within one (optimizer, size) group of the one run: each row against the group's copy ceiling,
fastopt against torch's rows.
"""
import argparse
import json
from pathlib import Path

FULL_PRECISION = ("SGD", "SGD_momentum", "RMSprop", "Adam", "AdamW", "AdamWScheduleFree", "SGDScheduleFree", "LAMB")


def load_groups(run):
    groups = {}
    for benchmark in run["benchmarks"]:
        info = benchmark["extra_info"]
        groups.setdefault((info["optimizer"], info["size"]), {})[info["variant"]] = info
    return groups


def ratio(group, slower, faster):
    if slower in group and faster in group:
        return group[slower]["ms_per_step"] / group[faster]["ms_per_step"]
    return None


def target_rows(groups, tune):
    rows = []

    def add(name, value, goal, met):
        rows.append(f"| {name} | {value} | {goal} | {'yes' if met else '**no**'} |")

    for optimizer in FULL_PRECISION:
        group = groups.get((optimizer, "256M"), {})
        best = max((group[v].get("fraction_of_ceiling", 0) for v in ("fastopt", "fastopt_graph") if v in group),
                   default=None)
        if best is not None:
            add(f"{optimizer} 256M: fastopt / copy ceiling", f"{best:.3f}", ">= 0.9", best >= 0.9)
    for optimizer, torch_variant, goal in (("AdamW", "torch_fused", 1.0), ("Adam", "torch_fused", 1.0),
                                           ("RMSprop", "torch_foreach", 2.0)):
        group = groups.get((optimizer, "GPT2"), {})
        for variant in ("fastopt", "fastopt_graph"):
            value = ratio(group, torch_variant, variant)
            if value is not None:
                add(f"{optimizer} GPT-2: {torch_variant} time / {variant} time", f"{value:.2f}", f">= {goal}",
                    value >= goal)
    for size in ("256M", "GPT2"):
        for optimizer in ("AdamW_bf16", "AdamW_bf16_master", "AdamW_bf16_bf16states"):
            group = groups.get((optimizer, size), {})
            if "fastopt_graph" in group:
                value = group["fastopt_graph"]["fraction_of_ceiling"]
                add(f"{optimizer} {size}: fastopt_graph / copy ceiling (its own bytes)", f"{value:.3f}", ">= 0.9",
                    value >= 0.9)
        value = ratio(groups.get(("AdamW_bf16_bf16states", size), {}), "torch_fused", "fastopt")
        if value is not None:
            add(f"AdamW bf16 params + bf16 states {size}: torch_fused time / fastopt time (same 14 B)",
                f"{value:.2f}", ">= 1.0", value >= 1.0)
    if tune:
        for name, microseconds in tune["overhead_us"].items():
            add(f"captured step replay, {name}", f"{microseconds:.1f} us", "< 10 us", microseconds < 10)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json")
    parser.add_argument("--tune")
    parser.add_argument("--output", default=str(Path(__file__).with_name("RESULTS_GPU.md")))
    args = parser.parse_args()
    run = json.loads(Path(args.json).read_text())
    tune = json.loads(Path(args.tune).read_text()) if args.tune else None
    groups = load_groups(run)
    first = run["benchmarks"][0]["extra_info"]
    info = run["machine_info"].get("fastopt", {})
    versions = ", ".join(f"{name} {version}" for name, version in info.get("versions", {}).items())
    lines = [
        "# fastopt on the GPU: one optimizer step beside torch.optim and a device-to-device copy ceiling",
        "",
        f"- GPU: {first.get('gpu', 'unknown')}; host CPU: {info.get('cpu_model', 'unknown')}",
        f"- Date: {run['datetime']}",
        f"- Versions: {versions}",
        f"- Command: `{info.get('command', 'unknown')}`" + (" and `python bench/tune_gpu.py`" if tune else ""),
        *[f"- Session: {session['groups']} at {session['datetime']}: `{session['command']}`"
          for session in run.get("fastopt_sessions", ())],
        "",
        "Every figure is the median of event-timed rounds (bench/bench_gpu.py's docstring); *of ceiling* divides the "
        "row's GB/s (the least traffic of one fused pass, bytes per param below) by the GB/s of the group's "
        "`ceiling` row, a cudaMemcpyAsync moving as many bytes in the same run. Mixed-precision groups "
        "(`AdamW_bf16*`) count each row's own bytes per param: torch's fused AdamW on bf16 params keeps bf16 "
        "states and no master copy (14 B/param).",
        "",
        "## Targets",
        "",
        "| target | measured | goal | met |",
        "|---|--:|---|---|",
        *target_rows(groups, tune),
        "",
        "## All rows",
        "",
        "| optimizer | size | variant | B/param | ms/step | GB/s | of ceiling | torch fused time / this |",
        "|---|---|---|--:|--:|--:|--:|--:|",
    ]
    for (optimizer, size), group in groups.items():
        for variant, row in group.items():
            fraction = row.get("fraction_of_ceiling")
            speed_up = ratio(group, "torch_fused", variant) if variant.startswith("fastopt") else None
            per_param = row.get("bytes_per_param") or row["bytes_per_step"] / row["params"]
            lines.append(f"| {optimizer} | {size} | {variant} | {per_param:g} | {row['ms_per_step']:.4f} "
                         f"| {row['gb_per_s']:.0f} | {'' if fraction is None else f'{fraction:.3f}'} "
                         f"| {'' if speed_up is None else f'{speed_up:.2f}x'} |")
    if tune:
        lines += ["", "## Launch-shape sweep (bench/tune_gpu.py, CUDA-graph replays, AdamW/RMSprop float32)", "",
                  "| threads/block | ILP | blocks/SM | optimizer | size | ms/step | ceiling ms | of ceiling |",
                  "|--:|--:|--:|---|---|--:|--:|--:|"]
        for row in tune["rows"]:
            lines.append(f"| {row['block']} | {row['ilp']} | {row['blocks_per_sm']} | {row['optimizer']} "
                         f"| {row['size']} | {row['ms']:.4f} | {row['ceiling_ms']:.4f} | {row['fraction']:.3f} |")
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
