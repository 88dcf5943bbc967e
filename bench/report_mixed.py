"""Write bench/RESULTS_MIXED.md from the JSON of a bench/bench_mixed.py run (``--benchmark-json=...``).

    python bench/report_mixed.py bench/mixed.json [--output bench/RESULTS_MIXED.md]

Every ratio is computed within one group of one run (its rows were timed interleaved).
"""
import argparse
import json
from pathlib import Path

from report import header_lines

# (target, configuration, value of a group, threshold): all are ">=".
TARGETS = [
    ("bf16 params + f32 master + f32 states: fastopt / its ceiling", "bf16_master",
     lambda g: g["fastopt"]["fraction_of_ceiling"], 0.9),
    ("bf16 params + bf16 states: fp32 step time / this step time", "bf16_bf16states",
     lambda g: g["fastopt_fp32"]["ms_per_step"] / g["fastopt"]["ms_per_step"], 1.6),
    ("norm + finiteness pass / read ceiling", "grad_norm", lambda g: g["fastopt"]["fraction_of_ceiling"], 0.9),
    ("bf16 params + bf16 states: torch fused time / fastopt time", "bf16_bf16states",
     lambda g: g["torch_fused"]["ms_per_step"] / g["fastopt"]["ms_per_step"], 1.0),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json")
    parser.add_argument("--output", default=str(Path(__file__).with_name("RESULTS_MIXED.md")))
    args = parser.parse_args()
    run = json.loads(Path(args.json).read_text())
    groups = [benchmark["extra_info"] for benchmark in run["benchmarks"]]
    lines = header_lines(run, "fastopt mixed precision on the CPU: AdamW by storage configuration")
    lines += ["", "## Targets", "", "| target | size | threads | value | goal | met |", "|---|---|--:|--:|---|---|"]
    for name, config, value_of, threshold in TARGETS:
        for group in groups:
            if group["optimizer"] == config:
                value = value_of(group["variants"])
                lines.append(f"| {name} | {group['size']} | {group['threads']} | {value:.2f} | >= {threshold} "
                             f"| {'yes' if value >= threshold else '**no**'} |")
    lines += ["", "## All rows", "",
              "| configuration | B/param | size | threads | variant | ms/step | GB/s | of ceiling |",
              "|---|--:|---|--:|---|--:|--:|--:|"]
    for group in groups:
        for variant, row in group["variants"].items():
            fraction = "" if row["fraction_of_ceiling"] is None else f"{row['fraction_of_ceiling']:.2f}"
            per_param = row["bytes_per_step"] // group["params"]
            lines.append(f"| {group['optimizer']} | {per_param} | {group['size']} | {group['threads']} | {variant} "
                         f"| {row['ms_per_step']:.3f} | {row['gb_per_s']:.1f} | {fraction} |")
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
