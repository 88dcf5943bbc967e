"""Write bench/RESULTS_TORCH.md from the JSON of a bench/bench_torch.py run (``--benchmark-json=...``).

    python bench/report_torch.py bench/torch.json [--output bench/RESULTS_TORCH.md]
"""
import argparse
import json
from pathlib import Path

from report import header_lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", help="the --benchmark-json file of a bench/bench_torch.py run")
    parser.add_argument("--output", default=str(Path(__file__).with_name("RESULTS_TORCH.md")))
    arguments = parser.parse_args()
    run = json.loads(Path(arguments.json).read_text())
    lines = header_lines(run, "fastopt.torch beside torch.optim and the fastopt core: GPT-2 small, float32")
    lines += ["The variants of one optimizer, device and thread count were timed interleaved (each round runs "
              "every variant once, in a rotating order); times are medians. GB/s counts the least traffic of one "
              "fused pass (Adam 28 B/param, SGD momentum 20).", "",
              "| optimizer | device | threads | variant | ms/step | GB/s | time / fastopt.torch |",
              "|---|---|--:|---|--:|--:|--:|"]
    overheads = []
    for benchmark in run["benchmarks"]:
        info = benchmark["extra_info"]
        if "variants" not in info:
            overheads.append(info)
            continue
        adapter = info["variants"]["fastopt_torch"]["ms_per_step"]
        for variant, result in info["variants"].items():
            lines.append(f"| {info['optimizer']} | {info['device']} | {info['threads']} | {variant} "
                         f"| {result['ms_per_step']:.1f} | {result['gb_per_s']:.1f} "
                         f"| {result['ms_per_step'] / adapter:.2f} |")
    for info in overheads:
        lines += ["", f"Adapter overhead ({info['device']}, Adam, 2 threads): the adapter's host work is "
                  f"{info['adapter_host_us']:.0f} us per step = {100 * info['overhead']:.2f} % of the core's "
                  f"{info['core_ms']:.1f} ms step (target < 5 %); on the real list, interleaved, fastopt.torch took "
                  f"{info['fastopt_torch_ms']:.1f} ms against the core's {info['core_ms']:.1f} ms "
                  f"({100 * info['overhead_gpt2']:+.1f} %, within the host's bandwidth noise)."]
    Path(arguments.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {arguments.output}")


if __name__ == "__main__":
    main()
