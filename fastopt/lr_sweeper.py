"""A grid search over learning rates in one run: K copies of a model, each at its own rate, trained side by side.

    result = fo.lr_sweep(lambda: MLP(seed=0), step_fn, lrs=np.geomspace(1e-4, 1, 16), steps=300, optimizer="adamw")
    print(result.best_lr, result.diverged)
    result.plot("lr-sweep.png")

Each copy is one param group of one optimizer, so a training step updates all K copies in one fused launch. The
forward and backward passes are batched too where the model allows: torch models through ``torch.func.vmap`` over
the copies' stacked weights, NumPy models through a ``step_fn`` written for stacked weights (``vectorized=True``).
A copy's trajectory is the one it would have alone, bit for bit: the copies share no arithmetic.

(The module is ``lr_sweeper``, as ``lr_finder`` holds ``lr_find``: ``fastopt.lr_sweep`` is the function.)
"""
import copy
import math
import numbers
import os
import sys
from dataclasses import dataclass

import numpy as np

from . import rules, schedules
from .guard import Guard
from .optimizer import Optimizer

__all__ = ["lr_sweep", "LRSweepResult", "mlp_losses_and_grads", "sweep_demo_mlp", "plot_lr_sweep"]

OPTIMIZERS = {cls.__name__.lower(): cls for cls in rules.OPTIMIZERS}


@dataclass
class LRSweepResult:
    """What a sweep saw, one entry per copy in the order of ``lrs``.

    - ``lrs``: the rates (numbers or schedules) as given; ``peak_lrs``: each as a number (a schedule's largest value
      over the sweep's steps).
    - ``losses[k, t]``: the loss ``step_fn`` returned for copy ``k`` at step ``t``; NaN after the copy diverged.
    - ``final_losses[k]``: copy ``k``'s mean loss over the last tenth of the steps (at least one step: one batch's
      loss is noisy); inf for a copy that diverged.
    - ``diverged_step[k]``: the step at which copy ``k`` diverged (that step's update was not applied), -1 if it
      ran every step; ``stop_reasons[k]`` says why, or is None.
    - ``models[k]``: copy ``k`` with its final weights (a diverged copy's as they were before it diverged).
    - ``best_index``, ``best_lr``: the copy that ran every step with the lowest final loss, and its rate; None when
      every copy diverged.
    """

    lrs: list
    peak_lrs: np.ndarray
    losses: np.ndarray
    final_losses: np.ndarray
    diverged_step: np.ndarray
    stop_reasons: list
    models: list
    best_index: int | None
    best_lr: object

    @property
    def diverged(self):
        """The rates whose copies diverged, in the order of ``lrs``."""
        return [lr for lr, step in zip(self.lrs, self.diverged_step) if step >= 0]

    def plot(self, path, suggestion=None):
        """Write final loss against lr beside every copy's loss curve to ``path`` as a PNG; ``suggestion`` (a rate,
        such as :func:`fastopt.lr_find`'s) is drawn as a dashed line."""
        return plot_lr_sweep(self, path, suggestion=suggestion)


# ---------------------------------------------------------------- checks
def _check_rates(lrs):
    if isinstance(lrs, (str, bytes, numbers.Number, schedules.Schedule)) or not hasattr(lrs, "__iter__"):
        raise TypeError(f"lr_sweep: lrs must be a list of learning rates, got {lrs!r}")
    lrs = list(lrs)
    if not lrs:
        raise ValueError("lr_sweep: lrs is empty; give at least one learning rate")
    for index, lr in enumerate(lrs):
        if isinstance(lr, schedules.Schedule):
            continue
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr_sweep: lrs[{index}] is {lr!r}; every rate must be a finite number > 0 or a "
                             "fastopt schedule")
    return [lr if isinstance(lr, schedules.Schedule) else float(lr) for lr in lrs]


def _check_arguments(steps, diverge_factor, max_bytes):
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"lr_sweep: steps must be an int >= 1, got {steps!r}")
    if diverge_factor is not None and (isinstance(diverge_factor, bool) or not isinstance(diverge_factor, numbers.Real)
                                       or not (math.isfinite(diverge_factor) and diverge_factor > 0)):
        raise ValueError(f"lr_sweep: diverge_factor must be a finite number > 0 or None, got {diverge_factor!r}")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, numbers.Integral)
                                  or max_bytes < 1):
        raise ValueError(f"lr_sweep: max_bytes must be an int >= 1 or None, got {max_bytes!r}")


def _is_torch_model(model):
    torch = sys.modules.get("torch")  # a torch model means torch is imported already; never import it here
    return torch is not None and isinstance(model, torch.nn.Module)


def _params_of(model):
    """The list of arrays a NumPy model trains: ``model.params``, or the model itself if it is a list of arrays."""
    params = model.params if hasattr(model, "params") else model
    if not isinstance(params, list) or not params or not all(
            isinstance(param, np.ndarray) or hasattr(param, "__cuda_array_interface__") for param in params):
        raise TypeError("lr_sweep: make_model() must return a torch.nn.Module, a non-empty list of arrays, or an "
                        f"object whose .params is one; got {type(model).__name__}")
    return params


def _optimizer_class(optimizer, torch_model):
    """A name (any case) of a fastopt rule, or a class: a fastopt.Optimizer for NumPy models, a fastopt.torch one for
    torch models (their updates are elementwise, which the flat rows of :class:`_TorchCopies` rely on)."""
    if isinstance(optimizer, str):
        rule = OPTIMIZERS.get(optimizer.lower())
        if rule is None:
            raise ValueError(f"lr_sweep: unknown optimizer {optimizer!r}; choose from {', '.join(sorted(OPTIMIZERS))}")
        if not torch_model:
            return rule
        from . import torch as fastopt_torch

        return getattr(fastopt_torch, rule.__name__)
    if torch_model:
        from .torch import TorchOptimizer as base
    else:
        base = Optimizer
    if not (isinstance(optimizer, type) and issubclass(optimizer, base)):
        kind = "a fastopt.torch optimizer class" if torch_model else "a fastopt.Optimizer class"
        raise TypeError(f"lr_sweep: optimizer must be a name or {kind} for this model, got {optimizer!r}")
    return optimizer


def _state_buffers(optimizer_class, options):
    """How many param-sized state buffers the optimizer keeps per param."""
    rule = getattr(optimizer_class, "CORE", optimizer_class)  # fastopt.torch's classes name their rule
    return len(rule.state_names({**rule.DEFAULTS, **{key: options[key] for key in rule.DEFAULTS if key in options}}))


def _available_bytes(param):
    """Free memory where ``param`` lives: the GPU's for CUDA tensors and CuPy arrays, else the host's."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(param, torch.Tensor) and param.is_cuda:
        return torch.cuda.mem_get_info(param.device)[0]
    if hasattr(param, "__cuda_array_interface__"):
        import cupy

        return cupy.cuda.runtime.memGetInfo()[0]
    try:
        with open("/proc/meminfo") as meminfo:  # MemAvailable counts the page cache the kernel can drop
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _check_memory(params, copies, optimizer_class, options, max_bytes):
    """Refuse, before the other copies are made, a sweep whose params, grads and optimizer state would not fit."""
    param_bytes = sum(param.numel() * param.element_size() if hasattr(param, "element_size") else param.nbytes
                      for param in params)
    buffers = 2 + _state_buffers(optimizer_class, options)  # the param, its grad, the optimizer's state
    needed = copies * buffers * param_bytes
    limit = _available_bytes(params[0]) if max_bytes is None else max_bytes
    if needed > limit:
        raise MemoryError(f"lr_sweep: {copies} copies need about {needed / 2**30:.3g} GiB ({buffers} x {param_bytes:,} "
                          f"bytes per copy: params, grads and {buffers - 2} state buffers of "
                          f"{optimizer_class.__name__}), more than the {limit / 2**30:.3g} GiB "
                          f"{'available' if max_bytes is None else 'allowed by max_bytes'}; sweep fewer rates at a "
                          "time")


# ---------------------------------------------------------------- the copies: NumPy (or CuPy) and torch
ALIGNMENT = 16  # elements: in a copy's flat row every param starts on a 64-byte cache line (float32)


def flat_layout(shapes):
    """(start offset of each param in a copy's flat row, the row's length): params in order, each aligned."""
    starts, end = [], 0
    for shape in shapes:
        starts.append(end)
        end += -(-math.prod(shape) // ALIGNMENT) * ALIGNMENT
    return starts, end


def _one_dtype(params, where):
    if len({(str(param.dtype), str(getattr(param, "device", "host"))) for param in params}) != 1:
        raise ValueError(f"lr_sweep: {where} keeps each copy's weights in one flat row, so every param of the model "
                         "must have one dtype and device")
    return params[0].dtype


def _steps_as_one_row(optimizer_class, options):
    """Whether one flat row of a copy's params steps as its separate params would under ``optimizer_class`` (a fastopt
    or fastopt.torch class) with ``options``: its rule updates each element from that element alone, and its states
    are not 8-bit (whose blocks and size threshold follow each tensor)."""
    return (getattr(optimizer_class, "CORE", optimizer_class).ELEMENTWISE
            and options.get("state_dtype") != "8bit")


class _ArrayCopies:
    """K array models as K param groups of one fastopt optimizer. Its :class:`fastopt.Guard` finds NaN/inf in any
    copy's grads in the step's own fused read; only a step it skips is looked at copy by copy.

    With ``vectorized``, copy k's params are views of row k of one (K, row) array, and its grads of one more: each
    copy is then a single tensor for the optimizer (whose host work is per tensor), and ``step_fn`` sees param j of
    every copy as one strided (K, *shape) view. The update is elementwise, so the flat row steps as the separate
    arrays would; a rule that is not (LAMB: per-tensor norms), or 8-bit states, get each param's view of the row as
    its own tensor."""

    def __init__(self, models, step_fn, lrs, optimizer_class, options, vectorized):
        self.models, self.step_fn, self.vectorized = models, step_fn, vectorized
        self.params = [_params_of(model) for model in models]
        groups = [{"params": params, "lr": lr} for params, lr in zip(self.params, lrs)]
        if vectorized:
            dtype = _one_dtype(self.params[0], "vectorized=True")
            shapes = [param.shape for param in self.params[0]]
            starts, row = flat_layout(shapes)
            self.flat, self.flat_grads = np.zeros((len(models), row), dtype), np.zeros((len(models), row), dtype)

            def stacked_views(flat):
                return [flat[:, start:start + math.prod(shape)].reshape(len(models), *shape)
                        for start, shape in zip(starts, shapes)]

            self.stacked, self.stacked_grads = stacked_views(self.flat), stacked_views(self.flat_grads)
            for number, params in enumerate(self.params):
                if [param.shape for param in params] != shapes:
                    raise ValueError(f"lr_sweep: copy {number}'s params have shapes {[p.shape for p in params]}, copy "
                                     f"0's {shapes}: make_model() must build the same model every time")
                for stack, param in zip(self.stacked, params):
                    stack[number] = param
                params[:] = [stack[number] for stack in self.stacked]  # the model's own list: it trains the views
            if _steps_as_one_row(optimizer_class, options):
                self.copy_grads = [[row] for row in self.flat_grads]
                groups = [{"params": [self.flat[number]], "lr": lr} for number, lr in enumerate(lrs)]
            else:
                self.copy_grads = [[stack[number] for stack in self.stacked_grads] for number in range(len(models))]
        # backoff=1: a skipped step is always followed by the step without the diverging copies, never repeated.
        self.optimizer = optimizer_class(groups, guard=Guard(backoff=1.0), **options)
        self.grads = None

    def compute(self, step, live):
        """Each copy's loss at ``step`` (NaN for copies not live); keeps the grads for :meth:`update`."""
        count = len(self.models)
        losses = np.full(count, np.nan)
        if self.vectorized:
            batch_losses = self.step_fn(self.stacked, self.stacked_grads, step)
            if isinstance(batch_losses, tuple):
                raise TypeError("lr_sweep: with vectorized=True, step_fn(params, grads, step) writes the grads into "
                                "grads and returns only the losses")
            batch_losses = np.asarray(batch_losses, dtype=np.float64)
            if batch_losses.shape != (count,):
                raise ValueError(f"lr_sweep: step_fn returned losses of shape {batch_losses.shape}; with "
                                 f"vectorized=True it returns one loss per copy, shape ({count},)")
            losses[live] = batch_losses[live]
            self.grads = [grads if live[number] else [None] * len(grads)
                          for number, grads in enumerate(self.copy_grads)]
            return losses
        self.grads = [[None] * len(params) for params in self.params]
        for number in np.flatnonzero(live):
            loss, grads = self.step_fn(self.models[number], step)
            grads = list(grads)
            if len(grads) != len(self.params[number]):
                raise ValueError(f"lr_sweep: step_fn returned {len(grads)} grads for copy {number}, whose model has "
                                 f"{len(self.params[number])} params")
            losses[number] = float(loss)
            self.grads[number] = grads
        return losses

    def update(self, live):
        """One fused step of the live copies; returns those whose grads held NaN/inf (left out of the step)."""
        grads = [copy_grads if live[number] else [None] * len(copy_grads)
                 for number, copy_grads in enumerate(self.grads)]
        skipped = self.optimizer.skipped_steps
        self.optimizer.step([grad for copy_grads in grads for grad in copy_grads])
        if self.optimizer.skipped_steps == skipped:
            return []
        diverging = [number for number, copy_grads in enumerate(grads)
                     if any(grad is not None and not bool(np.isfinite(grad).all()) for grad in copy_grads)]
        if diverging:  # the guard skipped the whole step: take it again without them
            for number in diverging:
                grads[number] = [None] * len(grads[number])
            self.optimizer.step([grad for copy_grads in grads for grad in copy_grads])
        return diverging

    def finish(self):
        if self.vectorized:  # each model gets weights of its own, not views that keep every copy's alive
            for params in self.params:
                params[:] = [param.copy() for param in params]
        return self.models


class _TorchCopies:
    """K torch modules whose weights are views of one (K, row) tensor, copy k in row k: one ``vmap``-ed forward and
    backward computes every copy's loss and grads, and each row is one param group (a single tensor) of one
    fastopt.torch optimizer, whose update is elementwise."""

    def __init__(self, models, step_fn, lrs, optimizer_class, options):
        import torch
        from torch.func import functional_call, grad_and_value, vmap

        class StepCall(torch.nn.Module):
            """``step_fn(model, step)`` as a module's forward, so that functional_call swaps in one copy's weights."""

            def __init__(self, model):
                super().__init__()
                self.model = model

            def forward(self, step):
                return step_fn(self.model, step)

        self.torch, self.models = torch, models
        caller = StepCall(copy.deepcopy(models[0]).to("meta"))  # structure only: the weights come from the rows
        named = [dict(model.named_parameters()) for model in models]
        first = list(named[0].values())
        dtype = _one_dtype(first, "a torch model")
        shapes = [param.shape for param in first]
        starts, row = flat_layout(shapes)
        self.flat = torch.zeros((len(models), row), dtype=dtype, device=first[0].device)
        self.flat_grads = torch.zeros_like(self.flat)
        self.stacked, self.stacked_grads = {}, {}
        with torch.no_grad():
            for (name, param), start, shape in zip(named[0].items(), starts, shapes):
                size = math.prod(shape)
                self.stacked[f"model.{name}"] = self.flat[:, start:start + size].view(len(models), *shape)
                self.stacked_grads[f"model.{name}"] = self.flat_grads[:, start:start + size].view(len(models), *shape)
                for number, params in enumerate(named):
                    self.stacked[f"model.{name}"][number] = params[name]
                    params[name].data = self.stacked[f"model.{name}"][number]  # the model shows its row's weights
        self.buffers = {f"model.{name}": torch.stack([dict(model.named_buffers())[name] for model in models])
                        for name, _ in models[0].named_buffers()}
        # The optimizer's params: one row per copy, with its grad row; for a rule that is not elementwise (LAMB:
        # per-tensor norms) or 8-bit states, each param's part of the row, as in a run alone.
        if _steps_as_one_row(optimizer_class, options):
            self.copy_params = [[row] for row in self.flat]
            copy_grads = [[row] for row in self.flat_grads]
        else:
            self.copy_params = [[stack[number] for stack in self.stacked.values()] for number in range(len(models))]
            copy_grads = [[stack[number] for stack in self.stacked_grads.values()] for number in range(len(models))]
        for params, grads in zip(self.copy_params, copy_grads):
            for param, grad in zip(params, grads):
                param.grad = grad
        self.copy_grads = copy_grads

        def loss_of(params, buffers, step):
            return functional_call(caller, (params, buffers), (step,))

        self.losses_and_grads = vmap(grad_and_value(loss_of), in_dims=(0, 0, None))
        self.optimizer = optimizer_class([{"params": params, "lr": lr}
                                          for params, lr in zip(self.copy_params, lrs)], **options)
        self.finite = None

    def compute(self, step, live):
        torch = self.torch
        grads, losses = self.losses_and_grads(self.stacked, self.buffers, step)
        with torch.no_grad():
            for name, grad in grads.items():
                self.stacked_grads[name].copy_(grad)
            # One check of every copy's grads at once: their flat rows (the padding between params stays 0).
            self.finite = (torch.isfinite(losses) & torch.isfinite(self.flat_grads).all(1)).cpu().numpy()
        return np.where(live, losses.detach().double().cpu().numpy(), np.nan)

    def update(self, live):
        diverging = list(np.flatnonzero(live & ~self.finite))
        for number, (params, grads) in enumerate(zip(self.copy_params, self.copy_grads)):
            stays = not live[number] or not self.finite[number]  # torch's optimizers skip params without a grad
            for param, grad in zip(params, grads):
                param.grad = None if stays else grad
        self.optimizer.step()
        return diverging

    def finish(self):
        with self.torch.no_grad():
            for model in self.models:  # weights of its own, not views that keep every copy's alive
                for param in model.parameters():
                    param.data = param.data.clone()
        return self.models


# ---------------------------------------------------------------- the sweep
def lr_sweep(make_model, step_fn, lrs, steps, optimizer="adamw", *, vectorized=False, diverge_factor=4.0,
             max_bytes=None, **options):
    """Train one copy of ``make_model()`` per rate in ``lrs`` for ``steps`` steps, side by side in one process, and
    return an :class:`LRSweepResult` (each copy's loss curve, the best rate, the rates that diverged).

    - ``make_model()`` is called once per rate and must return the same initial weights every time (seed it): a
      ``torch.nn.Module``, a list of arrays, or an object whose ``.params`` is one (as :class:`fastopt.demo.MLP`).
    - ``step_fn(model, step)`` must use the batch numbered ``step`` (the same batch for every copy, as a run of that
      copy alone would see it). NumPy: returns ``(loss, grads)``, one grad per param. torch: runs the forward pass
      and returns the loss, a 0-d tensor; the sweep differentiates it, for all copies at once with
      ``torch.func.vmap`` over the copies' stacked weights (so the model must be vmap-able: no in-place updates of
      buffers, as BatchNorm's in training, no random ops such as dropout; buffers are read only). Its params must
      share one dtype and device: copy ``k``'s weights are row ``k`` of one (K, row) tensor, one param group each.
    - ``vectorized=True`` (NumPy): ``step_fn(params, grads, step)`` is called once per step for all K copies, with
      ``params[j]`` of shape ``(K, *shape_j)`` (copy ``k``'s param ``j`` is ``params[j][k]``); it writes every
      copy's grads into ``grads`` (arrays shaped like ``params``) and returns the losses, shape ``(K,)``. It must
      compute each copy as it would alone (copy ``k`` reads only ``params[j][k]``) and keep computing diverged
      copies (their results are ignored). The arrays are strided views: copy ``k``'s params are one flat row of a
      (K, row) array, so that the optimizer steps each copy as a single tensor. The params must share one dtype.
    - ``lrs``: numbers > 0 or :mod:`fastopt.schedules` schedules, one per copy (a schedule runs on the optimizer's
      step count, as in a run alone).
    - ``optimizer``: a name (``"adamw"``, ``"sgd"``, ...: any case) or a class: a :class:`fastopt.Optimizer` for
      NumPy models, a :mod:`fastopt.torch` optimizer for torch models (a name gives ``fastopt.torch``'s).
      ``options`` are its keywords (``weight_decay=...``, ``momentum=...``), the same for every copy; not ``lr``
      (that is ``lrs``), ``guard`` (the sweep brings its own) or ``max_grad_norm`` (it clips by the norm over all
      copies together, which would couple them).

    Each copy is one param group of one optimizer: every training step is one optimizer step for all copies, one
    fused launch with fastopt's optimizers. A copy **diverges** at the first step whose loss is not finite, whose
    loss exceeds ``diverge_factor`` times its first loss (for a positive first loss; ``None`` turns this rule off)
    or whose grads hold NaN/inf (NumPy: found by a :class:`fastopt.Guard` in the optimizer's own read of the grads;
    a step it skips is taken again without the diverging copies). From that step on the copy gets no grads (no
    update, no state, no step count) and ``step_fn`` is no longer called for it (except in batched modes, which
    compute it and ignore it), and the others go on undisturbed. The copies share no arithmetic, so each copy's
    params are bit for bit those of a run of it alone with the same optimizer, batches and steps (tested; torch:
    vmap's ``nll_loss`` sums the batch in another order, so a cross-entropy loss value may differ in its last bit
    while the params do not).

    Memory: before the second copy is made, the params, grads and optimizer state of K copies are estimated from
    the first copy and the sweep is refused with ``MemoryError`` if they exceed ``max_bytes`` (None: the free
    memory of the params' device). Activations and a model's own buffers are not counted.
    """
    lrs = _check_rates(lrs)
    _check_arguments(steps, diverge_factor, max_bytes)
    for name, why in (("lr", "the rates come from lrs"), ("guard", "the sweep gives the optimizer a Guard of its own"),
                      ("max_grad_norm", "it would clip by the norm over all copies together")):
        if name in options:
            raise ValueError(f"lr_sweep: {why}; leave {name} out of the optimizer's options")
    first = make_model()
    torch_model = _is_torch_model(first)
    if torch_model and vectorized:
        raise ValueError("lr_sweep: vectorized=True is for NumPy models; torch models are always batched with vmap")
    optimizer_class = _optimizer_class(optimizer, torch_model)
    params = list(first.parameters()) if torch_model else _params_of(first)
    _check_memory(params, len(lrs), optimizer_class, options, max_bytes)
    models = [first] + [make_model() for _ in lrs[1:]]
    if torch_model:
        copies = _TorchCopies(models, step_fn, lrs, optimizer_class, options)
    else:
        copies = _ArrayCopies(models, step_fn, lrs, optimizer_class, options, vectorized)

    count = len(lrs)
    losses = np.full((count, steps), np.nan)
    diverged_step = np.full(count, -1, dtype=np.int64)
    stop_reasons = [None] * count
    live = np.ones(count, dtype=bool)
    threshold = np.full(count, np.inf)

    def stop(number, step, reason):
        live[number], diverged_step[number], stop_reasons[number] = False, step, reason

    for step in range(steps):
        step_losses = copies.compute(step, live)
        losses[live, step] = step_losses[live]
        if step == 0 and diverge_factor is not None:
            threshold = np.where(step_losses > 0, diverge_factor * step_losses, np.inf)
        for number in np.flatnonzero(live & ~np.isfinite(step_losses)):
            stop(number, step, f"the loss was {step_losses[number]} at step {step}")
        for number in np.flatnonzero(live & (step_losses > threshold)):
            stop(number, step, f"the loss passed {diverge_factor:g} x its first loss at step {step} "
                               f"({step_losses[number]:.4g} > {threshold[number]:.4g})")
        for number in copies.update(live):
            stop(number, step, f"the grads held NaN/inf at step {step}")
        if not live.any():
            break
    models = copies.finish()

    tail = max(1, steps // 10)
    final_losses = np.array([np.inf if diverged_step[number] >= 0 else float(np.mean(losses[number, -tail:]))
                             for number in range(count)])
    best_index = int(np.argmin(final_losses)) if np.isfinite(final_losses).any() else None
    peak_lrs = np.array([lr if isinstance(lr, float) else float(np.max(lr(np.arange(steps)))) for lr in lrs])
    return LRSweepResult(lrs=lrs, peak_lrs=peak_lrs, losses=losses, final_losses=final_losses,
                         diverged_step=diverged_step, stop_reasons=stop_reasons, models=models, best_index=best_index,
                         best_lr=None if best_index is None else lrs[best_index])


# ---------------------------------------------------------------- the demo MLP, K copies at once
def _row_sums(rows):
    """The sums NumPy's ``add.reduce`` gives along a contiguous axis of length n (its pairwise sum: eight running
    sums for n >= 8, combined pairwise, then the remainder one by one), computed instead across the n rows of
    ``rows`` (n, m), whose m columns are the axes summed: m-long vector adds rather than m reductions of n. Bit for
    bit the same (tested); n > 128 (NumPy splits the axis recursively) falls back to NumPy's own reduction."""
    n = rows.shape[0]
    if n > 128:
        return np.ascontiguousarray(rows.T).sum(axis=1)
    if n < 8:
        total = rows[0].copy()
        for row in rows[1:]:
            total += row
        return total
    partial = rows[:8].copy()
    for start in range(8, n - n % 8, 8):
        partial += rows[start:start + 8]
    total = (partial[0] + partial[1]) + (partial[2] + partial[3])
    total += (partial[4] + partial[5]) + (partial[6] + partial[7])
    for row in rows[n - n % 8:]:
        total += row
    return total


def mlp_losses_and_grads(params, grads, x, y):
    """:meth:`fastopt.demo.MLP.loss_and_grads` for K copies at once: ``params[j]`` holds the copies' param ``j``
    stacked on a first axis, and their grads are written to ``grads`` (arrays of the same shapes). Returns
    ``(losses, grads)``, ``losses`` of shape (K,).

    The MLP's operations in its order, each over all K copies (NumPy's stacked matmul is one BLAS call per copy),
    so each copy's loss and grads are the MLP's bit for bit (tested). The softmax runs on the logits transposed to
    (classes, K * batch): a row's max and sum over its few classes become vector operations across the class rows
    (a max is exact in any order, and :func:`_row_sums` adds in NumPy's order), instead of K * batch tiny
    reductions (3x faster for the demo's 10 classes)."""
    w1, b1, w2, b2 = params
    count, batch = w1.shape[0], len(y)
    hidden = x @ w1  # (K, batch, hidden); in place from here on: the same operations, fewer temporaries
    hidden += b1[:, None, :]
    np.maximum(hidden, 0.0, out=hidden)
    logits = hidden @ w2
    logits += b2[:, None, :]
    log_probs = np.ascontiguousarray(logits.reshape(count * batch, -1).T)  # (classes, K * batch)
    log_probs -= log_probs.max(axis=0)
    log_probs -= np.log(_row_sums(np.exp(log_probs)))
    # Copy k's sample i (column k * batch + i) has its label's log-probability in row y[i].
    labelled = (y * (count * batch) + np.arange(count * batch).reshape(count, batch)).ravel()
    losses = -log_probs.ravel()[labelled].reshape(count, batch).mean(axis=1)  # the MLP's mean over a contiguous row
    d_logits = np.exp(log_probs, out=log_probs)
    d_logits.ravel()[labelled] -= 1.0
    d_logits /= batch
    d_logits = np.ascontiguousarray(d_logits.T).reshape(count, batch, -1)
    d_hidden = d_logits @ w2.transpose(0, 2, 1)
    d_hidden *= (hidden > 0).astype(d_hidden.dtype)  # the MLP's bool mask as 1.0 and 0.0, without a mixed-type loop
    grad_w1, grad_b1, grad_w2, grad_b2 = grads
    np.matmul(x.T, d_hidden, out=grad_w1)
    grad_b1[...] = d_hidden.sum(axis=1)
    np.matmul(hidden.transpose(0, 2, 1), d_logits, out=grad_w2)
    grad_b2[...] = d_logits.sum(axis=1)
    return losses, grads


def demo_batches(train_size, steps, batch_size, seed):
    """The batch of every step (one row of indices per step): each copy, and a run of it alone, sees the same."""
    return np.random.default_rng(seed + 1).integers(0, train_size, (steps, batch_size))


def sweep_demo_mlp(optimizer_name="adamw", lrs=None, steps=300, schedule_name="constant", batch_size=64, hidden=128,
                   seed=0, threads=None, vectorized=True, data=None):
    """:func:`lr_sweep` of the demo MLP (:mod:`fastopt.demo`) on scikit-learn's digits, a random training batch per
    step; with ``vectorized`` the K copies run as one stacked forward and backward (:func:`mlp_losses_and_grads`).
    ``lrs`` default to 16 rates from 1e-5 to 1, log-spaced; each copy's rate follows ``schedule_name`` (a demo
    schedule, peaking at the rate). SGD uses Nesterov momentum 0.9, as in the demo. ``data`` (a
    :class:`fastopt.demo.Digits`) saves loading it again."""
    from . import demo

    data = demo.load_digits_split(seed=seed) if data is None else data
    lrs = np.geomspace(1e-5, 1.0, 16) if lrs is None else lrs
    if schedule_name != "constant":
        lrs = [demo.make_schedule(schedule_name, float(lr), steps) for lr in lrs]
    batches = demo_batches(len(data.y_train), steps, batch_size, seed)
    options = {"momentum": 0.9, "nesterov": True} if optimizer_name.lower() == "sgd" else {}

    def stacked_step(params, grads, step):
        return mlp_losses_and_grads(params, grads, data.x_train[batches[step]], data.y_train[batches[step]])[0]

    def copy_step(model, step):
        return model.loss_and_grads(data.x_train[batches[step]], data.y_train[batches[step]])

    with demo.thread_limits(threads):
        return lr_sweep(lambda: demo.MLP(hidden=hidden, seed=seed), stacked_step if vectorized else copy_step, lrs,
                        steps, optimizer_name, vectorized=vectorized, **options)


# ---------------------------------------------------------------- the picture
def plot_lr_sweep(result, path, suggestion=None):
    """Final loss against lr (diverged rates marked, the best one starred) beside each copy's loss curve (a moving
    average, coloured by lr), to the PNG ``path``; returns ``path``. matplotlib is imported here only, and used as
    :mod:`fastopt.plotting` uses it: a Figure on the Agg canvas, never pyplot."""
    try:
        from matplotlib import cm, colors
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("fastopt's plots need matplotlib: pip install matplotlib") from error
    from .lr_finder import smooth_losses

    figure = Figure(figsize=(11.0, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    final_axes, curve_axes = figure.subplots(1, 2)
    lrs, finals = result.peak_lrs, result.final_losses
    finished = result.diverged_step < 0
    final_axes.plot(lrs[finished], finals[finished], "o-", color="C0", label="final loss (mean of the last tenth)")
    if (~finished).any():
        top = finals[finished].max() if finished.any() else 1.0
        final_axes.plot(lrs[~finished], np.full((~finished).sum(), top), "x", color="C3", markersize=9,
                        label="diverged")
    if result.best_index is not None:
        final_axes.plot(lrs[result.best_index], finals[result.best_index], "*", color="C1", markersize=15,
                        label=f"best lr {lrs[result.best_index]:.3g}")
    if suggestion is not None:
        final_axes.axvline(suggestion, color="0.4", linestyle="--", label=f"lr-find suggestion {suggestion:.3g}")
    final_axes.set_xscale("log")
    if finished.any() and (finals[finished] > 0).all():
        final_axes.set_yscale("log")
    final_axes.set_xlabel("learning rate (peak)")
    final_axes.set_ylabel("final training loss")
    final_axes.set_title(f"{len(lrs)} copies, {result.losses.shape[1]} steps each, in one run")
    final_axes.legend(fontsize="small")

    norm = colors.LogNorm(vmin=lrs.min(), vmax=lrs.max() if lrs.max() > lrs.min() else lrs.min() * 10)
    palette = cm.ScalarMappable(norm=norm, cmap="viridis")
    positive = True
    for number, curve in enumerate(result.losses):
        recorded = curve[np.isfinite(curve)]
        if not recorded.size:
            continue
        positive &= bool((recorded > 0).all())
        curve_axes.plot(np.arange(recorded.size), smooth_losses(recorded, 0.05),
                        color=palette.to_rgba(lrs[number]), linestyle="-" if finished[number] else ":")
    if positive:
        curve_axes.set_yscale("log")
    first_losses = result.losses[:, 0][np.isfinite(result.losses[:, 0])]
    if first_losses.size and (first_losses > 0).all():
        curve_axes.set_ylim(top=2 * first_losses.max())  # a diverged curve's spike would flatten the others
    curve_axes.set_xlabel("step")
    curve_axes.set_ylabel("training loss (moving average)")
    curve_axes.set_title("loss curves (dotted: diverged)")
    figure.colorbar(palette, ax=curve_axes, label="learning rate")
    figure.savefig(path, format="png")
    return str(path)
