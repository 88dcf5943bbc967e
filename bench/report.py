"""Write bench/RESULTS_CPU.md from the JSON of a bench/bench_cpu.py run (``--benchmark-json=...``).

    python bench/report.py bench/cpu.json [--output bench/RESULTS_CPU.md]

Every ratio is computed within the one run: the host's memory bandwidth drifts between runs.
"""
import argparse
import json
from dataclasses import dataclass
from pathlib import Path

LARGE = ("16M", "32M", "64M", "GPT2")  # the sizes the targets speak of (>= 16M params; 1M fits in the caches)
# The rows of the implementations fastopt is measured against: torch.optim's, and lion-pytorch's Lion.
ANCHOR_VARIANTS = ("torch_forloop", "torch_foreach", "torch_fused", "lion_pytorch")


@dataclass
class Row:
    optimizer: str
    size: str
    threads: int
    variant: str
    seconds: float  # median of the rounds
    bytes_per_step: int
    fraction_of_ceiling: float | None = None

    @property
    def gb_per_s(self):
        return self.bytes_per_step / self.seconds / 1e9


def load_rows(path):
    """The rows in run order, and each (optimizer, size, threads) group as {variant: row}. A group's variants were
    timed interleaved (bench_cpu.test_step), so ratios within a group compare like with like."""
    run = json.loads(Path(path).read_text())
    rows, groups = [], {}
    for benchmark in run["benchmarks"]:
        info = benchmark["extra_info"]
        group = groups.setdefault((info["optimizer"], info["size"], info["threads"]), {})
        for variant, result in info["variants"].items():
            row = Row(info["optimizer"], info["size"], info["threads"], variant, result["ms_per_step"] / 1e3,
                      result["bytes_per_step"], result["fraction_of_ceiling"])
            rows.append(row)
            group[variant] = row
    return run, rows, groups


def time_ratio(group, slower, faster):
    """How many times longer a step of ``slower`` takes than one of ``faster``; None if either is missing."""
    if slower in group and faster in group:
        return group[slower].seconds / group[faster].seconds
    return None


# (target, optimizers, sizes, value of a group, comparison, threshold)
TARGETS = [
    ("fastopt / ceiling (GB/s)", ("SGD", "SGD_momentum", "RMSprop", "Adam", "AdamW", "Adagrad", "Lion"), LARGE,
     lambda group: group["fastopt"].fraction_of_ceiling if "fastopt" in group else None, ">=", 0.9),
    ("speed-up over torch fused", ("Adagrad",), ("32M",),
     lambda group: time_ratio(group, "torch_fused", "fastopt"), ">=", 1.0),
    ("speed-up over lion-pytorch", ("Lion",), LARGE,
     lambda group: time_ratio(group, "lion_pytorch", "fastopt"), ">=", 3.0),
    ("speed-up over torch fused", ("Adam", "AdamW"), LARGE,
     lambda group: time_ratio(group, "torch_fused", "fastopt"), ">=", 1.0),
    ("speed-up over torch foreach", ("RMSprop",), LARGE,
     lambda group: time_ratio(group, "torch_foreach", "fastopt"), ">=", 3.0),
    ("speed-up over torch for-loop", ("Adam", "AdamW"), LARGE,
     lambda group: time_ratio(group, "torch_forloop", "fastopt"), ">=", 3.0),
    ("GPT-2 list time / one flat array", ("SGD", "SGD_momentum", "RMSprop", "Adam", "AdamW"), ("GPT2",),
     lambda group: time_ratio(group, "fastopt", "fastopt_flat"), "<=", 1.1),
    ("with lr_scale time / without", ("Adam", "AdamW"), ("16M", "GPT2"),
     lambda group: time_ratio(group, "fastopt_lr_scale", "fastopt"), "<=", 1.2),
]


def target_lines(groups):
    lines = ["| target | optimizer | size | threads | value | goal | met |", "|---|---|---|--:|--:|---|---|"]
    for name, optimizers, sizes, value_of, comparison, threshold in TARGETS:
        for (optimizer, size, threads), group in groups.items():
            if optimizer not in optimizers or size not in sizes:
                continue
            value = value_of(group)
            if value is None:
                continue
            met = value >= threshold if comparison == ">=" else value <= threshold
            lines.append(f"| {name} | {optimizer} | {size} | {threads} | {value:.2f} | {comparison} {threshold} "
                         f"| {'yes' if met else '**no**'} |")
    return lines if len(lines) > 2 else ["(no rows of this run bear on a target)"]


def format_or_blank(value, pattern):
    return "" if value is None else pattern.format(value)


def result_lines(rows, groups):
    lines = []
    for optimizer in dict.fromkeys(row.optimizer for row in rows):
        lines += ["", f"### {optimizer}", "",
                  "| size | threads | variant | ms/step | GB/s | of ceiling | fastopt speed-up |",
                  "|---|--:|---|--:|--:|--:|--:|"]
        for row in rows:
            if row.optimizer != optimizer:
                continue
            group = groups[(row.optimizer, row.size, row.threads)]
            speed_up = None
            if row.variant in ANCHOR_VARIANTS or row.variant == "reference":
                speed_up = time_ratio(group, row.variant, "fastopt")
            lines.append(f"| {row.size} | {row.threads} | {row.variant} | {row.seconds * 1e3:.3f} "
                         f"| {row.gb_per_s:.1f} | {format_or_blank(row.fraction_of_ceiling, '{:.2f}')} "
                         f"| {format_or_blank(speed_up, '{:.2f}x')} |")
    return lines


def header_lines(run, title):
    """The title, machine, date, versions and exact command of a run (bench/conftest.py records them)."""
    info = run["machine_info"].get("fastopt", {})
    versions = ", ".join(f"{name} {version}" for name, version in info.get("versions", {}).items())
    cpu = info.get("cpu_model") or run["machine_info"]["cpu"].get("brand_raw", "unknown")
    return [
        f"# {title}",
        "",
        f"- Machine: {cpu}, {info.get('cpu_count', run['machine_info']['cpu'].get('count'))} cores; "
        f"Numba threading layer: {info.get('numba_threading_layer', 'unknown')}",
        f"- Date: {run['datetime']}",
        f"- Versions: {versions}",
        f"- Command: `{info.get('command', 'unknown')}`",
        "",
    ]


EXPLANATION = (
    "The variants of one optimizer, size and thread count were timed interleaved (each round runs every variant "
    "once, in a rotating order); times are medians over the rounds. GB/s counts the least traffic of one fused pass "
    "(bytes per param: SGD 12, SGD momentum, RMSprop, Adagrad and Lion 20, Adam/AdamW 28, plus 4 with lr_scale); "
    "*of ceiling* "
    "divides by the GB/s of the `ceiling` row (a Numba prange kernel with the optimizer's read/write pattern and "
    "trivial math) of the same optimizer, size and threads; *fastopt speed-up* is the row's time over fastopt's. "
    "All ratios come from this one run. GPT2 is GPT-2 small's 148 tensors (124,439,808 params); `fastopt_flat` is "
    "the same count in one array.")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="the --benchmark-json file of a bench/bench_cpu.py run")
    parser.add_argument("--output", default=str(Path(__file__).with_name("RESULTS_CPU.md")))
    arguments = parser.parse_args()
    run, rows, groups = load_rows(arguments.json)
    lines = header_lines(run, "fastopt CPU benchmarks: one optimizer step, float32") + [EXPLANATION]
    lines += ["", "## Targets", ""] + target_lines(groups)
    lines += ["", "## Results"] + result_lines(rows, groups)
    Path(arguments.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {arguments.output} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
