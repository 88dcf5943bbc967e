"""The ``fastopt`` command (also ``python -m fastopt``).

    fastopt bench --quick                     # fastopt vs torch.optim vs the bandwidth ceiling; table, JSON, PNG
    fastopt demo --optimizer adamw --schedule onecycle   # train an MLP on scikit-learn's digits
    fastopt lr-find -o lr-find.png            # learning-rate range test on the same MLP
    fastopt schedule onecycle --args max_lr=0.01 total_steps=1000 --steps 1000 -o onecycle.png

Each subcommand imports what it needs (Numba, torch, matplotlib, scikit-learn) only when it runs.
"""
import argparse
import dataclasses
import json
import sys

# Schedules the command line can build from plain numbers and lists; warmup and sequential take schedules.
SCHEDULE_NAMES = ("constant", "step_decay", "multistep", "exponential", "linear", "polynomial", "cosine",
                  "cosine_restarts", "onecycle", "cyclic")
COMPOSITE_SCHEDULES = ("warmup", "sequential")


def _error(message):
    print(f"fastopt: error: {message}", file=sys.stderr)
    return 2


def _save_plot(draw, path, what):
    """Call ``draw(path)``; without matplotlib say so instead of failing the whole command."""
    try:
        draw(path)
    except ImportError:
        print(f"matplotlib is not installed: no {what} plot written (pip install 'fastopt[plot]')", file=sys.stderr)
        return False
    print(f"wrote {path}")
    return True


# ---------------------------------------------------------------- bench
def bench(arguments):
    from . import benchmark

    try:
        result = benchmark.run(optimizer_names=arguments.optimizers, sizes=arguments.sizes, threads=arguments.threads,
                               repeats=arguments.repeats, quick=arguments.quick, use_torch=not arguments.no_torch,
                               progress=not arguments.no_progress)
    except ValueError as error:
        return _error(error)
    warning = benchmark.busy_warning(result)
    if warning:
        print(warning, file=sys.stderr)
    machine, settings = result["machine"], result["settings"]
    print(f"{machine['processor']}, {settings['threads']} thread(s) of {machine['cpus']}; numpy {machine['numpy']}, "
          f"numba {machine['numba']}, torch {machine['torch'] or 'not installed'}; float32, median of "
          f"{settings['repeats']} interleaved rounds")
    print(benchmark.format_table(result))
    print("GB/s: the bytes one fused pass must move (4 B for each param, grad and state read, each param and state\n"
          "written). of ceiling: against a kernel with the same traffic and trivial math. fastopt speed-up: a torch\n"
          "row's time over fastopt's. Compare ratios within a run, not GB/s across runs: host bandwidth drifts.")
    with open(arguments.json, "w") as file:
        json.dump(result, file, indent=1)
    print(f"wrote {arguments.json}")

    def draw(path):  # matplotlib is imported only here
        from .plotting import plot_bench

        threads = f"{settings['threads']} thread" + ("s" if settings["threads"] > 1 else "")
        plot_bench(result["rows"], path, title="one float32 optimizer step against the memory-bandwidth ceiling\n"
                   f"{threads}, median of {settings['repeats']} interleaved rounds")

    _save_plot(draw, arguments.plot, "benchmark")
    return 0


# ---------------------------------------------------------------- demo and lr-find
def demo(arguments):
    from . import demo as demo_module

    try:
        result = demo_module.train(arguments.optimizer, arguments.schedule, lr=arguments.lr, epochs=arguments.epochs,
                                   batch_size=arguments.batch_size, hidden=arguments.hidden, seed=arguments.seed,
                                   threads=arguments.threads)
    except (ImportError, ValueError) as error:
        return _error(error)
    print(f"test accuracy {result['test_accuracy']:.3f} after {result['steps']} steps of {arguments.optimizer} "
          f"with a {arguments.schedule} schedule")
    total, steps, first = result["total_seconds"], result["step_seconds"], result["first_step_seconds"]
    print(f"time: {total:.2f} s in all")
    per_step = steps / max(result["steps"] - 1, 1)
    print(f"  optimizer.step  {steps * 1e3:7.1f} ms  ({steps / total:.0%}; {per_step * 1e6:.0f} us per step)")
    print(f"  first step      {first * 1e3:7.1f} ms  (loads the kernel from Numba's cache, or compiles it)")
    print(f"  model           {(total - steps - first) * 1e3:7.1f} ms  (forward, backward, evaluation)")
    return 0


def lr_find(arguments):
    from . import demo as demo_module

    try:
        result = demo_module.range_test(arguments.optimizer, start_lr=arguments.start_lr, end_lr=arguments.end_lr,
                                        num_steps=arguments.num_steps, mode=arguments.mode,
                                        batch_size=arguments.batch_size, seed=arguments.seed,
                                        threads=arguments.threads)
    except (ImportError, ValueError) as error:
        return _error(error)
    print(f"range test of {arguments.optimizer} on the digits MLP: {len(result.lrs)} steps from "
          f"{arguments.start_lr:g} ({result.stop_reason})")

    def show(value):
        return "none (the loss never fell)" if value is None else f"{value:.3g}"

    print(f"suggested lr (steepest descent): {show(result.suggestion)}")
    print(f"suggested lr (minimum / 10):     {show(result.suggestion_min10)}")
    _save_plot(result.plot, arguments.output, "range-test")
    return 0


# ---------------------------------------------------------------- schedule
def parse_value(text):
    """A command-line value: int, float, true/false, none, a comma-separated list of those, or a string."""
    if "," in text:
        return [parse_value(item) for item in text.split(",") if item]
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def build_schedule(name, pairs):
    """``fastopt.schedules.<name>(**{k: v})`` from ``["k=v", ...]``; raises ValueError with a readable message."""
    from . import schedules

    name = name.replace("-", "_")
    if name in COMPOSITE_SCHEDULES:
        raise ValueError(f"'{name}' takes other schedules as arguments, which the command line cannot express; "
                         f"use the Python API: fastopt.schedules.{name}(...) and fastopt.schedules.plot(...)")
    if name not in SCHEDULE_NAMES:
        raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULE_NAMES)}")
    record = getattr(schedules, name)
    fields = {field.name: field for field in dataclasses.fields(record)}
    kwargs = {}
    for pair in pairs:
        key, separator, text = pair.partition("=")
        if not separator or key not in fields:
            raise ValueError(f"{name} takes key=value arguments with keys from {', '.join(fields)}; got {pair!r}")
        value = parse_value(text)
        if "tuple" in str(fields[key].type) and not isinstance(value, list):
            value = [value]  # milestones=30 is a list of one
        kwargs[key] = value
    try:
        return record(**kwargs)
    except TypeError as error:  # a missing argument
        required = [f for f, field in fields.items() if field.default is dataclasses.MISSING]
        raise ValueError(f"{name} needs {', '.join(required)}: {error}") from None


def schedule(arguments):
    import numpy as np

    from . import schedules

    try:
        built = build_schedule(arguments.name, arguments.args)
    except ValueError as error:
        return _error(error)
    if arguments.steps < 1:
        return _error("--steps must be at least 1")
    values = built(np.arange(arguments.steps))
    peak = int(np.argmax(values))
    print(f"{built}")
    print(f"steps 0..{arguments.steps - 1}: first {values[0]:.4g}, max {values[peak]:.4g} at step {peak}, "
          f"last {values[-1]:.4g}")
    _save_plot(lambda path: schedules.plot(built, arguments.steps, path), arguments.output, "schedule")
    return 0


# ---------------------------------------------------------------- the parser
def parser():
    from . import __version__

    top = argparse.ArgumentParser(prog="fastopt", description="fastopt: fused optimizer kernels. Benchmarks, a "
                                  "demo, a learning-rate range test and schedule plots.")
    top.add_argument("--version", action="version", version=f"fastopt {__version__}")
    commands = top.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    bench_parser = commands.add_parser("bench", help="time one optimizer step against torch.optim and the memory "
                                       "bandwidth ceiling", description="Time one float32 optimizer step: fastopt, "
                                       "torch.optim (default and fused) and a ceiling kernel with the same memory "
                                       "traffic. Prints a table, writes JSON and a PNG.")
    bench_parser.add_argument("--quick", action="store_true", help="one size (4M params), 5 rounds: well under a "
                              "minute")
    bench_parser.add_argument("--optimizers", nargs="+", metavar="NAME",
                              help="subset of SGD SGD_momentum RMSprop Adam AdamW (default: all)")
    bench_parser.add_argument("--sizes", nargs="+", metavar="N", help="params per tensor, e.g. 1M 16M 65536 "
                              "(default: 1M 16M; --quick: 4M)")
    bench_parser.add_argument("--threads", type=int, help="threads for Numba and torch (default: all cores)")
    bench_parser.add_argument("--repeats", type=int, help="interleaved timing rounds (default: 9; --quick: 5)")
    bench_parser.add_argument("--no-torch", action="store_true", help="leave torch.optim out")
    bench_parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    bench_parser.add_argument("--json", default="fastopt-bench.json", metavar="PATH",
                              help="results file (default: %(default)s)")
    bench_parser.add_argument("--plot", default="fastopt-bench.png", metavar="PATH",
                              help="GB/s against the ceiling as a PNG (default: %(default)s)")
    bench_parser.set_defaults(run=bench)

    from .demo import DEFAULT_LR, OPTIMIZERS, SCHEDULES  # the demo module imports no optional dependency at import

    demo_parser = commands.add_parser("demo", help="train a small MLP on scikit-learn's digits",
                                      description="Train a one-hidden-layer MLP (NumPy, hand-written backprop) on "
                                      "scikit-learn's bundled digits with a fastopt optimizer and schedule.")
    demo_parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw")
    demo_parser.add_argument("--schedule", choices=SCHEDULES, default="onecycle")
    demo_parser.add_argument("--lr", type=float, help="peak learning rate (default: " + ", ".join(
        f"{name} {lr:g}" for name, lr in DEFAULT_LR.items()) + ")")
    demo_parser.add_argument("--epochs", type=int, default=20)
    demo_parser.add_argument("--batch-size", type=int, default=64)
    demo_parser.add_argument("--hidden", type=int, default=128, help="hidden units")
    demo_parser.add_argument("--seed", type=int, default=0)
    demo_parser.add_argument("--threads", type=int, help="the optimizer's Numba threads (default: all cores)")
    demo_parser.set_defaults(run=demo)

    find_parser = commands.add_parser("lr-find", help="learning-rate range test on the demo MLP",
                                      description="Run fastopt.lr_find on the demo MLP (scikit-learn's digits) "
                                      "and print the suggested learning rates.")
    find_parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="adamw")
    find_parser.add_argument("--start-lr", type=float, default=1e-6)
    find_parser.add_argument("--end-lr", type=float, default=10.0)
    find_parser.add_argument("--num-steps", type=int, default=100)
    find_parser.add_argument("--mode", choices=("exp", "linear"), default="exp")
    find_parser.add_argument("--batch-size", type=int, default=64)
    find_parser.add_argument("--seed", type=int, default=0)
    find_parser.add_argument("--threads", type=int, help="the optimizer's Numba threads (default: all cores)")
    find_parser.add_argument("-o", "--output", default="fastopt-lr-find.png", help="PNG (default: %(default)s)")
    find_parser.set_defaults(run=lr_find)

    schedule_parser = commands.add_parser("schedule", help="plot a learning-rate schedule",
                                          description="Plot one of fastopt.schedules. warmup and sequential "
                                          "take other schedules: use the Python API for those.",
                                          epilog="example: fastopt schedule onecycle --args max_lr=0.01 "
                                          "total_steps=1000 --steps 1000 -o onecycle.png")
    schedule_parser.add_argument("name", help=f"one of: {', '.join(SCHEDULE_NAMES)}")
    schedule_parser.add_argument("--args", nargs="*", default=[], metavar="KEY=VALUE",
                                 help="the schedule's arguments; lists are comma-separated (milestones=30,60)")
    schedule_parser.add_argument("--steps", type=int, default=1000, help="plot steps 0..N-1 (default: %(default)s)")
    schedule_parser.add_argument("-o", "--output", default="fastopt-schedule.png",
                                 help="PNG (default: %(default)s)")
    schedule_parser.set_defaults(run=schedule)
    return top


def main(argv=None):
    """Run the ``fastopt`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    arguments = parser().parse_args(argv)
    return arguments.run(arguments)


if __name__ == "__main__":
    sys.exit(main())
