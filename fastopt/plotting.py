"""PNG pictures of schedules, range tests and benchmark results (needs matplotlib: ``pip install matplotlib``).

Figures are built with ``matplotlib.figure.Figure`` and written by the Agg canvas, never through pyplot: no
window opens, no global backend is switched, and nothing here changes a user's own matplotlib set-up.
Imported lazily by :func:`fastopt.schedules.plot`, :meth:`fastopt.lr_find` results and the ``fastopt`` command,
so ``import fastopt`` does not import matplotlib.
"""
import dataclasses
import textwrap

import numpy as np

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("fastopt's plots need matplotlib: pip install matplotlib") from error

__all__ = ["plot_schedules", "plot_lr_find", "plot_bench", "schedule_label"]


def _figure(width=7.0, height=4.2):
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path):
    figure.savefig(path, format="png")
    return str(path)


def schedule_label(schedule):
    """A short label: the record's name and the fields that differ from their defaults, nested ones included."""
    if not dataclasses.is_dataclass(schedule):
        return repr(schedule)
    parts = []
    for field in dataclasses.fields(schedule):
        value = getattr(schedule, field.name)
        if field.default is not dataclasses.MISSING and value == field.default:
            continue
        if dataclasses.is_dataclass(value):
            value = schedule_label(value)
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            value = "[" + ", ".join(schedule_label(item) for item in value) + "]"
        elif isinstance(value, float):
            value = f"{value:g}"
        parts.append(f"{field.name}={value}")
    return f"{type(schedule).__name__}({', '.join(parts)})"


def plot_schedules(schedules, steps, path, labels=None):
    """Draw one schedule or a list of them over ``steps`` (a step count ``N`` for steps ``0..N-1``, or an array
    of steps) to the PNG ``path``; returns ``path``. ``labels`` default to :func:`schedule_label`."""
    from .schedules import Schedule

    if isinstance(schedules, Schedule):
        schedules = [schedules]
    schedules = list(schedules)
    if not schedules or not all(isinstance(schedule, Schedule) for schedule in schedules):
        raise TypeError("plot needs a Schedule or a non-empty list of Schedules")
    if labels is None:
        labels = [schedule_label(schedule) for schedule in schedules]
    if len(labels) != len(schedules):
        raise ValueError(f"plot got {len(labels)} labels for {len(schedules)} schedules")
    t = np.arange(steps) if np.ndim(steps) == 0 else np.asarray(steps)
    if t.size == 0:
        raise ValueError("plot needs at least one step")
    figure = _figure()
    axes = figure.add_subplot()
    for schedule, label in zip(schedules, labels):
        axes.plot(t, schedule(t), label=label, linewidth=1.6)
    axes.set_xlabel("optimizer step t")
    axes.set_ylabel("learning rate")
    axes.grid(alpha=0.3)
    axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes.legend(fontsize="small")
    return _save(figure, path)


def plot_lr_find(result, path, model=None):
    """Loss against learning rate for a :class:`fastopt.lr_find.LRFinderResult`, with both suggestions marked;
    the title names the optimizer and ``model`` (a few words, or None to leave it out)."""
    figure = _figure()
    axes = figure.add_subplot()
    axes.plot(result.lrs, result.losses, color="0.75", linewidth=1, label="loss")
    axes.plot(result.lrs, result.smoothed, color="C0", linewidth=2, label="smoothed loss")
    marks = (("steepest descent", result.suggestion, "C1"), ("minimum / 10", result.suggestion_min10, "C2"))
    for name, lr, colour in marks:
        if lr is not None:
            axes.axvline(lr, color=colour, linestyle="--", label=f"{name}: {lr:.2g}")
    if result.mode == "exp":
        axes.set_xscale("log")
    if len(result.smoothed):
        # Keep the blow-up at the end from flattening the interesting part of the curve.
        low = float(min(np.min(result.smoothed), np.min(result.losses)))
        start = float(max(result.smoothed[0], result.losses[0]))
        top = max(start, low) + 0.5 * abs(start - low)
        if not result.stopped_early:  # no blow-up to hide: a rise after the minimum is part of the story
            top = max(top, float(np.max(result.smoothed)) + 0.1 * abs(start - low))
        axes.set_ylim(low - 0.1 * abs(start - low) - 1e-12, top + 1e-12)
    axes.set_xlabel("learning rate")
    axes.set_ylabel("loss")
    subject = " on ".join(name for name in (result.optimizer, model) if name)
    axes.set_title("learning-rate range test" + (f" of {subject}" if subject else ""))
    if result.warning:  # under the axes, where constrained layout makes room for it
        figure.supxlabel(textwrap.fill(f"warning: {result.warning}", 130), fontsize="x-small", color="C3",
                         ha="left", x=0.01)
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize="small")
    return _save(figure, path)


def plot_bench(rows, path, title="one optimizer step against the memory-bandwidth ceiling"):
    """Bars of GB/s per implementation, grouped by (optimizer, size), each group under a line at its measured
    ceiling, with the fraction of the ceiling written on each bar. ``rows`` are :mod:`fastopt.benchmark` rows;
    a row whose rounds disagree gets a "!" (and a hatched bar), explained in a footnote."""
    from .benchmark import ROUNDS_DISAGREE_NOTE

    groups = list(dict.fromkeys((row["optimizer"], row["size"]) for row in rows))
    variants = list(dict.fromkeys(row["backend"] for row in rows if row["backend"] != "ceiling"))
    width = 0.8 / max(len(variants), 1)
    figure = _figure(max(6.0, 1.3 * len(groups) + 2), 4.5)
    axes = figure.add_subplot()
    for number, variant in enumerate(variants):
        label = variant  # on the variant's first bar: the first group may lack it (no torch-fused RMSprop)
        for position, group in enumerate(groups):
            row = next((r for r in rows if (r["optimizer"], r["size"]) == group and r["backend"] == variant), None)
            if row is None:
                continue
            x = position - 0.4 + width * (number + 0.5)
            flag = "!" if row.get("rounds_disagree") else ""
            axes.bar(x, row["gb_per_s"], width, color=f"C{number}", hatch="//" if flag else None, label=label)
            label = None
            if row.get("fraction_of_ceiling") is not None:
                axes.text(x, row["gb_per_s"], f"{row['fraction_of_ceiling']:.2f}{flag}", ha="center", va="bottom",
                          fontsize="x-small")
    for position, group in enumerate(groups):
        ceiling = next((r for r in rows if (r["optimizer"], r["size"]) == group and r["backend"] == "ceiling"), None)
        if ceiling is not None:
            axes.hlines(ceiling["gb_per_s"], position - 0.45, position + 0.45, colors="black", linestyles="--",
                        label="ceiling (same traffic, trivial math)" if position == 0 else None)
            if ceiling.get("rounds_disagree"):
                axes.text(position + 0.45, ceiling["gb_per_s"], "!", ha="left", va="center", fontsize="small")
    if any(row.get("rounds_disagree") for row in rows):
        figure.supxlabel(ROUNDS_DISAGREE_NOTE, fontsize="small", color="C3")
    axes.set_xticks(range(len(groups)), [f"{optimizer}\n{size}" for optimizer, size in groups], fontsize="small")
    axes.set_ylabel("GB/s (bytes one fused pass must move)")
    figure.suptitle(title, fontsize="medium")  # over the whole figure: the legend sits beside the axes
    axes.grid(alpha=0.3, axis="y")
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(figure, path)
