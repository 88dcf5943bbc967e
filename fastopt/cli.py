"""The ``fastopt`` command (also ``python -m fastopt``).

    fastopt bench --quick                     # fastopt vs torch.optim vs the bandwidth ceiling; table, JSON, PNG
    fastopt demo --optimizer adamw --schedule onecycle   # train an MLP on scikit-learn's digits
    fastopt lr-find -o lr-find.png            # learning-rate range test on the same MLP
    fastopt precompile                        # compile the CPU kernels into Numba's cache before a first step
    fastopt schedule onecycle --args max_lr=0.01 total_steps=1000 --steps 1000 -o onecycle.png

Each subcommand imports what it needs (Numba, torch, matplotlib, scikit-learn) only when it runs.
"""
import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys

# Schedules the command line can build from plain numbers and lists; warmup and sequential take schedules.
SCHEDULE_NAMES = ("constant", "step_decay", "multistep", "exponential", "linear", "polynomial", "cosine",
                  "cosine_restarts", "onecycle", "cyclic")
COMPOSITE_SCHEDULES = ("warmup", "sequential")
# fastopt.benchmark.CASES, spelled out because importing the benchmark imports Numba (a test checks they agree).
BENCH_OPTIMIZERS = ("SGD", "SGD_momentum", "RMSprop", "Adam", "AdamW", "Adagrad", "Lion", "AdamWScheduleFree",
                    "SGDScheduleFree", "LAMB")
# fastopt.kernel_cache.PARAM_DTYPES, spelled out for the same reason (a test checks they agree).
PARAM_DTYPES = ("float32", "float64", "bfloat16", "float16")


# ---------------------------------------------------------------- argument types
# Each reads one option's text when argparse parses the command line, so a mistake exits with status 2 and a
# message naming the option ("argument --epochs: must be >= 1, got 0") before any work starts.
def int_at_least(minimum):
    """An argparse type: an integer >= ``minimum``."""
    def read(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return read


positive_int = int_at_least(1)


def positive_float(text):
    """An argparse type: a finite number > 0, such as a learning rate."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def thread_count(text):
    """An argparse type for --threads: 1 up to Numba's thread count (Numba is imported only when it is given)."""
    value = positive_int(text)
    import numba

    if value > numba.config.NUMBA_NUM_THREADS:
        raise argparse.ArgumentTypeError(f"must be at most {numba.config.NUMBA_NUM_THREADS} (Numba's thread "
                                         f"count, NUMBA_NUM_THREADS), got {value}")
    return value


def name_key(text):
    """Names match in any case and with - for _: adamw, AdamW and ADAMW are one optimizer."""
    return text.casefold().replace("-", "_")


def one_of(names, what):
    """An argparse type: one of ``names`` in any case, returned as ``names`` spell it."""
    spelled = {name_key(name): name for name in names}

    def read(text):
        try:
            return spelled[name_key(text)]
        except KeyError:
            raise argparse.ArgumentTypeError(f"unknown {what} {text!r}; choose from {', '.join(names)}") from None

    return read


def output_path(text):
    """An argparse type for a file the command writes: a file name in an existing, writable folder, checked before
    the work starts (a benchmark's results file is written only after the whole run)."""
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.basename(text) or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"expected a file name, got the folder {text!r}")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(text) and not os.access(text, os.W_OK)):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: permission denied")
    return text


def parameter_count(text):
    """An argparse type for bench --sizes: 65536, 64K or 4M."""
    from .benchmark import parse_size  # imports Numba, which bench needs anyway

    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _error(message):
    print(f"fastopt: error: {message}", file=sys.stderr)
    return 2


def _save_plot(draw, path, what):
    """Call ``draw(path)``; without matplotlib say so instead of failing the whole command."""
    try:
        draw(path)
    except ImportError:
        print(f"matplotlib is not installed: no {what} plot written (pip install matplotlib)", file=sys.stderr)
        return False
    print(f"wrote {path}")
    return True


@contextlib.contextmanager
def _compile_messages():
    """Print the library's INFO lines on stderr while a command runs: a kernel compiling instead of loading from
    Numba's cache is otherwise seconds of silence, or a progress bar that looks frozen. On a terminal a line starts
    with a carriage return and is padded to the bar's width, so it replaces a bar drawn in place (the bar's next
    update draws it again below)."""
    logger = logging.getLogger("fastopt")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("\r%(message)-80s" if sys.stderr.isatty() else "%(message)s"))
    previous_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous_level)


# ---------------------------------------------------------------- bench
def bench(arguments):
    # Read here rather than as an argparse type, so an unknown name returns 2 like the benchmark's own refusals.
    read_optimizer = one_of(BENCH_OPTIMIZERS, "optimizer")
    try:
        optimizers = [read_optimizer(name) for name in arguments.optimizers] if arguments.optimizers else None
    except argparse.ArgumentTypeError as error:
        return _error(f"--optimizers: {error}")
    from . import benchmark

    try:
        result = benchmark.run(optimizer_names=optimizers, sizes=arguments.sizes, threads=arguments.threads,
                               repeats=arguments.repeats, quick=arguments.quick, use_torch=not arguments.no_torch,
                               progress=not arguments.no_progress)
    except ValueError as error:
        return _error(error)
    warning = benchmark.busy_warning(result)
    if warning:
        print(warning, file=sys.stderr)
    machine, settings = result["machine"], result["settings"]
    print(f"{machine['processor']}, {settings['threads']} thread(s) of {machine['cpus']}; numpy {machine['numpy']}, "
          f"numba {machine['numba']}, torch {machine['torch'] or 'not used'}; float32, median of "
          f"{settings['repeats']} interleaved rounds")
    print(benchmark.format_table(result))
    print("GB/s: the bytes one fused pass must move (4 B for each param, grad and state read, each param and state\n"
          "written). of ceiling: against a kernel with the same traffic and trivial math.")
    if any(row["fastopt_speedup"] is not None for row in result["rows"]):
        print("fastopt speed-up: a torch row's time over fastopt's.")
    print("Compare ratios within a run, not GB/s across runs: host bandwidth drifts.")
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
        result = demo_module.train(arguments.optimizer.lower(), arguments.schedule, lr=arguments.lr,
                                   epochs=arguments.epochs,
                                   batch_size=arguments.batch_size, hidden=arguments.hidden, seed=arguments.seed,
                                   threads=arguments.threads)
    except (ImportError, ValueError) as error:
        return _error(error)
    print(f"test accuracy {result['test_accuracy']:.3f} after {result['steps']} steps of {arguments.optimizer} "
          f"with a {result['schedule']} schedule")
    total, steps, first = result["total_seconds"], result["step_seconds"], result["first_step_seconds"]
    print(f"time: {total:.2f} s in all")
    per_step = steps / max(result["steps"] - 1, 1)
    print(f"  optimizer.step  {steps * 1e3:7.1f} ms  ({steps / total:.0%}; {per_step * 1e6:.0f} us per step)")
    print(f"  first step      {first * 1e3:7.1f} ms  (loads the kernel from Numba's cache, or compiles it)")
    print(f"  model           {(total - steps - first) * 1e3:7.1f} ms  (forward, backward, evaluation)")
    return 0


def lr_find(arguments):
    from . import demo as demo_module

    if arguments.end_lr <= arguments.start_lr:
        return _error(f"--end-lr ({arguments.end_lr:g}) must be greater than --start-lr ({arguments.start_lr:g})")
    try:
        result = demo_module.range_test(arguments.optimizer.lower(), start_lr=arguments.start_lr,
                                        end_lr=arguments.end_lr,
                                        num_steps=arguments.num_steps, mode=arguments.mode,
                                        batch_size=arguments.batch_size, seed=arguments.seed,
                                        threads=arguments.threads)
    except (ImportError, ValueError) as error:
        return _error(error)
    print(f"range test of {arguments.optimizer} on the digits MLP: {len(result.lrs)} steps from "
          f"{arguments.start_lr:g} ({result.stop_reason})")

    def show(value):
        return "none" if value is None else f"{value:.3g}"

    print(f"suggested lr (steepest descent): {show(result.suggestion)}")
    print(f"suggested lr (minimum / 10):     {show(result.suggestion_min10)}")
    if result.warning:
        print(f"warning: {result.warning}", file=sys.stderr)
    _save_plot(lambda path: result.plot(path, model="the digits MLP"), arguments.output, "range-test")
    return 0


# ---------------------------------------------------------------- lr-sweep
def lr_sweep(arguments):
    import time

    import numpy as np

    from . import demo as demo_module
    from .lr_sweeper import sweep_demo_mlp

    if arguments.max_lr < arguments.min_lr:
        return _error(f"--max-lr ({arguments.max_lr:g}) must be at least --min-lr ({arguments.min_lr:g})")
    name = arguments.optimizer.lower()
    settings = dict(batch_size=arguments.batch_size, hidden=arguments.hidden, seed=arguments.seed,
                    threads=arguments.threads)
    try:
        data = demo_module.load_digits_split(seed=arguments.seed)
        start = time.perf_counter()
        result = sweep_demo_mlp(name, np.geomspace(arguments.min_lr, arguments.max_lr, arguments.count),
                                arguments.steps, schedule_name=arguments.schedule, data=data, **settings)
        seconds = time.perf_counter() - start
        found = demo_module.range_test(name, **settings)  # what lr-find would say, for comparison
    except (ImportError, ValueError, MemoryError) as error:
        return _error(error)
    print(f"lr sweep of {arguments.optimizer} ({arguments.schedule} schedule) on the digits MLP: {arguments.count} "
          f"rates from {arguments.min_lr:g} to {arguments.max_lr:g}, {arguments.steps} steps each, side by side in "
          f"one run ({seconds:.2f} s)")
    print(f"{'lr':>10}  {'final loss':>10}  {'test acc':>8}")
    accuracies = {}
    for number, (lr, model) in enumerate(zip(result.peak_lrs, result.models)):
        if result.diverged_step[number] >= 0:
            print(f"{lr:10.3g}  diverged at step {result.diverged_step[number]}")
            continue
        accuracies[number] = model.evaluate(data.x_test, data.y_test)[1]
        print(f"{lr:10.3g}  {result.final_losses[number]:10.4f}  {accuracies[number]:8.3f}")
    best = result.best_index
    if best is None:
        print("best lr: none (every rate diverged)")
    else:
        print(f"best lr: {result.peak_lrs[best]:.3g} (final training loss {result.final_losses[best]:.4f}, "
              f"test accuracy {accuracies[best]:.3f})")
    diverged = [f"{lr:.3g}" for lr, step in zip(result.peak_lrs, result.diverged_step) if step >= 0]
    if diverged:
        print(f"diverged: {', '.join(diverged)}")

    def show(value):
        return "none" if value is None else f"{value:.3g}"

    print(f"lr-find suggested: {show(found.suggestion)} (steepest descent), {show(found.suggestion_min10)} "
          "(minimum / 10)")
    _save_plot(lambda path: result.plot(path, suggestion=found.suggestion), arguments.output, "lr-sweep")
    return 0


# ---------------------------------------------------------------- precompile
def precompile(arguments):
    import time

    from . import kernel_cache, rules
    from .benchmark import Progress

    param_dtypes = arguments.dtypes or kernel_cache.default_param_dtypes()
    bar = Progress(len(arguments.optimizers) * len(param_dtypes))
    start = time.perf_counter()
    try:
        kernel_cache.precompile([getattr(rules, name) for name in arguments.optimizers], param_dtypes,
                                done=bar.update)
    except ImportError as error:  # bfloat16 without ml_dtypes
        return _error(error)
    finally:
        bar.close()
    print(f"Numba's cache holds the CPU kernels of {', '.join(arguments.optimizers)} for {', '.join(param_dtypes)} "
          f"params ({time.perf_counter() - start:.0f} s): {kernel_cache.cache_directory()}")
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

    name = name_key(name)
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
    values = built(np.arange(arguments.steps))
    peak = int(np.argmax(values))
    print(f"{built}")
    print(f"steps 0..{arguments.steps - 1}: first {values[0]:.4g}, max {values[peak]:.4g} at step {peak}, "
          f"last {values[-1]:.4g}")
    _save_plot(lambda path: schedules.plot(built, arguments.steps, path), arguments.output, "schedule")
    return 0


# ---------------------------------------------------------------- the parser
def add_training_options(command, optimizer_names, *, hidden):
    """The options of the commands that train the demo MLP (demo, lr-find, lr-sweep): the optimizer, the batch size,
    the hidden width (where the command takes one), the seed and the threads."""
    command.add_argument("--optimizer", type=one_of(optimizer_names, "optimizer"), default="AdamW", metavar="NAME",
                         help=f"one of {', '.join(optimizer_names)} (default: %(default)s)")
    command.add_argument("--batch-size", type=positive_int, default=64, help="examples per step (default: %(default)s)")
    if hidden:
        command.add_argument("--hidden", type=positive_int, default=128, help="hidden units (default: %(default)s)")
    command.add_argument("--seed", type=int_at_least(0), default=0,
                         help="seeds the data split, the initial weights and the batches (default: %(default)s)")
    command.add_argument("--threads", type=thread_count, help="the optimizer's Numba threads (default: all cores)")


def parser():
    from . import __version__

    top = argparse.ArgumentParser(prog="fastopt", description="fastopt: fused optimizer kernels. Benchmarks, a "
                                  "demo, a learning-rate range test and schedule plots. Optimizer and schedule "
                                  "names may be typed in any case.")
    top.add_argument("--version", action="version", version=f"fastopt {__version__}")
    commands = top.add_subparsers(dest="command", metavar="COMMAND")  # none given: main prints this help

    bench_parser = commands.add_parser("bench", help="time one optimizer step against torch.optim and the memory "
                                       "bandwidth ceiling", description="Time one float32 optimizer step: fastopt, "
                                       "torch.optim (default and fused) and a ceiling kernel with the same memory "
                                       "traffic. Prints a table, writes JSON and a PNG.")
    bench_parser.add_argument("--quick", action="store_true", help="one size (4M params), 5 rounds: well under a "
                              "minute")
    bench_parser.add_argument("--optimizers", nargs="+", metavar="NAME",
                              help=f"some of {', '.join(BENCH_OPTIMIZERS)} (default: all)")
    bench_parser.add_argument("--sizes", nargs="+", metavar="N", type=parameter_count, help="params per tensor, "
                              "e.g. 1M 16M 65536 (default: 1M 16M; --quick: 4M)")
    bench_parser.add_argument("--threads", type=thread_count, help="threads for Numba and torch (default: all cores)")
    bench_parser.add_argument("--repeats", type=positive_int, help="interleaved timing rounds (default: 9; --quick: 5)")
    bench_parser.add_argument("--no-torch", action="store_true", help="leave torch.optim out")
    bench_parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    bench_parser.add_argument("--json", default="fastopt-bench.json", metavar="PATH", type=output_path,
                              help="results file (default: %(default)s)")
    bench_parser.add_argument("--plot", default="fastopt-bench.png", metavar="PATH", type=output_path,
                              help="GB/s against the ceiling as a PNG (default: %(default)s)")
    bench_parser.set_defaults(run=bench)

    from .demo import DEFAULT_LR, OPTIMIZERS, SCHEDULES  # the demo module imports no optional dependency at import

    demo_parser = commands.add_parser("demo", help="train a small MLP on scikit-learn's digits",
                                      description="Train a one-hidden-layer MLP (NumPy, hand-written backprop) on "
                                      "scikit-learn's bundled digits with a fastopt optimizer and schedule.")
    optimizer_names = [cls.__name__ for cls in OPTIMIZERS.values()]  # spelled as fastopt's classes: AdamW
    add_training_options(demo_parser, optimizer_names, hidden=True)
    demo_parser.add_argument("--schedule", type=one_of(SCHEDULES, "schedule"), metavar="NAME",
                             help=f"one of {', '.join(SCHEDULES)} (default: onecycle; for the schedule-free optimizers, "
                             "which refuse decay schedules, constant after a warmup over 5%% of the steps)")
    demo_parser.add_argument("--lr", type=positive_float, help="peak learning rate (default: " + ", ".join(
        f"{OPTIMIZERS[name].__name__} {lr:g}" for name, lr in DEFAULT_LR.items()) + ")")
    demo_parser.add_argument("--epochs", type=positive_int, default=20,
                             help="passes over the training set (default: %(default)s)")
    demo_parser.set_defaults(run=demo)

    find_parser = commands.add_parser("lr-find", help="learning-rate range test on the demo MLP",
                                      description="Run fastopt.lr_find on the demo MLP (scikit-learn's digits) "
                                      "and print the suggested learning rates.")
    add_training_options(find_parser, optimizer_names, hidden=False)
    find_parser.add_argument("--start-lr", type=positive_float, default=1e-6,
                             help="first learning rate (default: %(default)s)")
    find_parser.add_argument("--end-lr", type=positive_float, default=10.0,
                             help="last learning rate, if the loss has not diverged before (default: %(default)s)")
    find_parser.add_argument("--num-steps", type=int_at_least(2), default=100,
                             help="steps from --start-lr to --end-lr (default: %(default)s)")
    find_parser.add_argument("--mode", type=one_of(("exp", "linear"), "mode"), default="exp", metavar="MODE",
                             help="exp: geometric steps, linear: even steps (default: %(default)s)")
    find_parser.add_argument("-o", "--output", default="fastopt-lr-find.png", type=output_path,
                             help="PNG (default: %(default)s)")
    find_parser.set_defaults(run=lr_find)

    sweep_parser = commands.add_parser("lr-sweep", help="train the demo MLP at many learning rates at once",
                                       description="Run fastopt.lr_sweep on the demo MLP (scikit-learn's digits): "
                                       "one copy per rate, log-spaced, trained side by side in one run (one fused "
                                       "optimizer step for all copies per training step). Prints each rate's final "
                                       "loss, the best rate and lr-find's suggestion, and plots them.")
    add_training_options(sweep_parser, optimizer_names, hidden=True)
    sweep_parser.add_argument("--min-lr", type=positive_float, default=1e-5,
                              help="smallest learning rate (default: %(default)s)")
    sweep_parser.add_argument("--max-lr", type=positive_float, default=1.0,
                              help="largest learning rate (default: %(default)s)")
    sweep_parser.add_argument("--count", type=positive_int, default=16,
                              help="rates from --min-lr to --max-lr, log-spaced: copies of the model "
                              "(default: %(default)s)")
    sweep_parser.add_argument("--steps", type=positive_int, default=300,
                              help="training steps of every copy (default: %(default)s)")
    sweep_parser.add_argument("--schedule", type=one_of(SCHEDULES, "schedule"), default="constant", metavar="NAME",
                              help=f"each copy's schedule, peaking at its rate: one of {', '.join(SCHEDULES)} "
                              "(default: %(default)s)")
    sweep_parser.add_argument("-o", "--output", default="fastopt-lr-sweep.png", type=output_path,
                              help="PNG (default: %(default)s)")
    sweep_parser.set_defaults(run=lr_sweep)

    precompile_parser = commands.add_parser("precompile", help="compile the CPU kernels into Numba's cache before "
                                            "a first step", description="Fill Numba's on-disk cache with the CPU "
                                            "kernels that steps of these optimizers on params of these dtypes need "
                                            "(default options, with or without max_grad_norm), by small real steps "
                                            "(one-thread and parallel): a first step then loads its kernel in "
                                            "milliseconds instead "
                                            "of compiling it for seconds. Kernels already cached are only loaded.")
    precompile_parser.add_argument("--optimizers", nargs="+", type=one_of(optimizer_names, "optimizer"),
                                   default=optimizer_names, metavar="NAME",
                                   help=f"some of {', '.join(optimizer_names)} (default: all)")
    precompile_parser.add_argument("--dtypes", nargs="+", type=one_of(PARAM_DTYPES, "dtype"), metavar="DTYPE",
                                   help=f"param dtypes, some of {', '.join(PARAM_DTYPES)} (default: all; bfloat16 "
                                   "where ml_dtypes is installed)")
    precompile_parser.set_defaults(run=precompile)

    schedule_parser = commands.add_parser("schedule", help="plot a learning-rate schedule",
                                          description="Plot one of fastopt.schedules. warmup and sequential "
                                          "take other schedules: use the Python API for those.",
                                          epilog="example: fastopt schedule onecycle --args max_lr=0.01 "
                                          "total_steps=1000 --steps 1000 -o onecycle.png")
    schedule_parser.add_argument("name", help=f"one of: {', '.join(SCHEDULE_NAMES)}")
    schedule_parser.add_argument("--args", nargs="*", default=[], metavar="KEY=VALUE",
                                 help="the schedule's arguments; lists are comma-separated (milestones=30,60) "
                                 "(default: none)")
    schedule_parser.add_argument("--steps", type=positive_int, default=1000,
                                 help="plot steps 0..N-1 (default: %(default)s)")
    schedule_parser.add_argument("-o", "--output", default="fastopt-schedule.png", type=output_path,
                                 help="PNG (default: %(default)s)")
    schedule_parser.set_defaults(run=schedule)
    return top


def main(argv=None):
    """Run the ``fastopt`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit status. A mistake
    argparse or an argument type catches raises SystemExit(2) as argparse does; one a command finds returns 2."""
    top = parser()
    arguments = top.parse_args(argv)
    if arguments.command is None:  # a bare `fastopt`: the help says more than "arguments are required"
        top.print_help(sys.stderr)
        return 2
    with _compile_messages():
        return arguments.run(arguments)


if __name__ == "__main__":
    sys.exit(main())
