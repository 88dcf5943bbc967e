"""ShardedOptimizer (fastopt.torch.distributed) on 2 and 3 gloo ranks of this machine, against one process stepping
fastopt.torch, torch.optim or the fastopt core on the averaged grads: params and state compared, with param groups,
schedules and changing rates, lr_scale, tensors across shard boundaries, odd and zero sizes, a frozen param and a
param some ranks have no grad for; checkpoints (sharded, bit for bit; consolidated, into every kind of optimizer),
the guard, clipping, mixed precision, add_param_group, bad input, mismatched ranks and a rank that never arrives.

One ``torch.multiprocessing.spawn`` per world size runs every scenario on every rank (``SCENARIOS``); a scenario
records what disagrees instead of raising, so that the ranks stay in step, and each test reads its scenario's
records."""
import datetime
import importlib
import json
import os
import socket
import time
import traceback

import numpy as np
import pytest

import fastopt as fo
from configs import anchor_optimizer
from conftest import assert_close, tolerance

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WORLD_SIZES = (2, 3)
GROUP_TIMEOUT = 60  # s: the process group of the scenarios; the timeout scenario uses a group of its own
SHORT_TIMEOUT = 5  # s: that group's

# (shape, dtype, which ranks get a grad): sizes that put tensors across shard boundaries (the float32 space is 626
# elements, float64 35), odd sizes, a zero-size tensor, a frozen one, and an "aux" one whose grad comes and goes:
# on every rank at steps 1, 5, ...; on rank 0 only at even steps (the others add zeros); on none at steps 3, 7, ...
# (skipped, its state and step too).
PARAMS = [((37, 11), torch.float32, "all"), ((1,), torch.float32, "all"), ((13,), torch.float32, "all"),
          ((64,), torch.float32, "all"), ((5, 7), torch.float32, "aux"), ((97,), torch.float32, "all"),
          ((0, 3), torch.float32, "all"), ((3, 3), torch.float32, "frozen"), ((29,), torch.float64, "all"),
          ((2, 3), torch.float64, "all")]


# ---------------------------------------------------------------- what runs on the ranks
class Ranks:
    """A scenario's view of its rank, and the record of what disagreed."""

    def __init__(self, rank, world, directory):
        self.rank, self.world, self.directory, self.errors = rank, world, directory, []

    def check(self, condition, message):
        if not condition:
            self.errors.append(f"rank {self.rank}: {message}")

    def close(self, actual, expected, rtol, what):
        try:
            assert_close(torch.as_tensor(actual).detach().numpy(), torch.as_tensor(expected).detach().numpy(), rtol,
                         what)
        except AssertionError as exc:
            self.errors.append(f"rank {self.rank}: {exc}")

    def raises(self, error, match, call, what):
        """``call()`` must raise ``error`` with ``match`` in its message."""
        try:
            call()
        except error as exc:
            self.check(match in str(exc), f"{what}: {type(exc).__name__} without {match!r}: {exc}")
            return exc
        except Exception as exc:  # noqa: BLE001 (recorded, not raised: the ranks must stay in step)
            self.errors.append(f"rank {self.rank}: {what}: {type(exc).__name__} instead of {error.__name__}: {exc}")
            return exc
        self.errors.append(f"rank {self.rank}: {what}: no {error.__name__}")
        return None


def make_params(kinds=PARAMS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = []
    for shape, dtype, kind in kinds:
        param = torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype))
        param.requires_grad_(kind != "frozen")
        params.append(param)
    return params


def grad(step, rank, index, kinds=PARAMS):
    """Rank ``rank``'s grad of param ``index`` at ``step`` (None where it has none)."""
    shape, dtype, kind = kinds[index]
    if kind == "frozen" or (kind == "aux" and (step % 4 == 3 or (step % 2 == 0 and rank != 0))):
        return None
    generator = torch.Generator().manual_seed(100_000 * step + 1_000 * rank + index)
    return torch.randn(shape, generator=generator, dtype=dtype)


def averaged_grad(step, world, index, kinds=PARAMS):
    """The grad one process steps with: the ranks' grads (zeros where a rank has none) summed in rank order, / W."""
    grads = [grad(step, rank, index, kinds) for rank in range(world)]
    if all(g is None for g in grads):
        return None
    total = None
    for g in grads:
        g = torch.zeros(kinds[index][0], dtype=kinds[index][1]) if g is None else g
        total = g.clone() if total is None else total + g
    return total / world


def set_grads(params, grads, accumulate):
    """Give the params these grads: fresh tensors (as after zero_grad(set_to_none=True)), or added into the
    existing ones after zeroing them (backward accumulating into the flat grad buffer's views)."""
    for param, g in zip(params, grads):
        if g is None:
            param.grad = None
        elif accumulate and param.grad is not None:
            param.grad.add_(g)
        else:
            param.grad = g.clone()


def train(ctx, optimizer, params, steps, *, first=0, averaged=False, on_step=None, kinds=PARAMS):
    """``steps`` steps: a sharded optimizer gets this rank's grads, a single-process one (``averaged``) the
    averaged grads. Even steps use fresh grads, odd steps accumulate into zeroed ones."""
    for step in range(first, first + steps):
        accumulate = step % 2 == 1
        optimizer.zero_grad(set_to_none=not accumulate)
        grads = [averaged_grad(step, ctx.world, index, kinds) if averaged else grad(step, ctx.rank, index, kinds)
                 for index in range(len(params))]
        set_grads(params, grads, accumulate)
        optimizer.step()
        if on_step is not None:
            on_step(optimizer, step)


def lower_lr(optimizer, step):
    optimizer.param_groups[1]["lr"] *= 0.8  # a rate that changes between steps


def fastopt_groups(params):
    import fastopt as fo

    generator = torch.Generator().manual_seed(5)
    scales = [torch.rand(p.shape, generator=generator, dtype=p.dtype) * 2 for p in params[3:6]]
    return [{"params": params[0:3], "lr": fo.schedules.warmup(fo.schedules.cosine(0.01, t_max=8), warmup_steps=2)},
            {"params": params[3:6], "lr": 0.02, "betas": (0.8, 0.99), "weight_decay": 0.1, "lr_scale": scales},
            {"params": params[6:], "lr": 0.005, "amsgrad": True}]


def compare(ctx, label, sharded, params, reference, reference_params, steps, to=0, exact=False):
    """Params on every rank, and the consolidated state on rank ``to``, against the single-process run."""
    rtol = tolerance(np.float32, steps)
    for index, (ours, theirs) in enumerate(zip(params, reference_params)):
        if exact:
            ctx.check(torch.equal(ours, theirs), f"{label}: param {index} differs")
        else:
            ctx.close(ours, theirs, rtol, f"{label}: param {index}")
    sharded.consolidate_state_dict(to=to)
    if ctx.rank != to:
        return None
    ours, theirs = sharded.state_dict(), reference.state_dict()
    ctx.check(ours["state"].keys() == theirs["state"].keys(),
              f"{label}: state of params {sorted(ours['state'])}, reference {sorted(theirs['state'])}")
    for index, entry in theirs["state"].items():
        mine = ours["state"].get(index, {})
        ctx.check(mine.keys() == entry.keys(), f"{label}: param {index} state {list(mine)} != {list(entry)}")
        for name, value in entry.items():
            if name not in mine:
                continue
            if exact or name == "step":
                ctx.check(same_tensor(mine[name], value), f"{label}: param {index} {name} differs")
            else:
                ctx.close(mine[name], value, rtol, f"{label}: param {index} state {name}")
    for number, (mine, group) in enumerate(zip(ours["param_groups"], theirs["param_groups"])):
        for key, value in group.items():
            if key not in ("lr_scale", "params"):
                ctx.check(mine.get(key) == value, f"{label}: group {number} {key}: {mine.get(key)!r} != {value!r}")
    return ours


def same_tensor(first, second):
    """Equal values of the same dtype (torch.equal alone compares uint8 codes equal to floats of their values)."""
    first, second = torch.as_tensor(first), torch.as_tensor(second)
    return first.dtype == second.dtype and torch.equal(first, second)


def scenario_fastopt_parity(ctx, exchange="p2p"):
    """AdamW with a schedule, a changing rate, per-group betas/decay/amsgrad and lr_scale, two dtypes: equal to
    fastopt.torch.AdamW on the averaged grads. Each rank holds state for its shard only."""
    import fastopt.torch as ft
    from fastopt.torch.distributed import ShardedOptimizer

    params, reference_params = make_params(), make_params()
    sharded = ShardedOptimizer(fastopt_groups(params), ft.AdamW, exchange=exchange)
    reference = ft.AdamW(fastopt_groups(reference_params))
    train(ctx, sharded, params, 6, on_step=lower_lr)
    train(ctx, reference, reference_params, 6, averaged=True, on_step=lower_lr)
    compare(ctx, exchange, sharded, params, reference, reference_params, 6, exact=exchange == "p2p")
    # Balance: the stateful elements of the ranks differ by less than one alignment unit per rank.
    held = sum(piece.stop - piece.start for piece in sharded._pieces
               if piece.index is not None and sharded.optim.state.get(piece.tensor))
    everyone = [None] * ctx.world
    dist.all_gather_object(everyone, held)
    ctx.check(max(everyone) - min(everyone) <= 2 * ctx.world * sharded.ALIGNMENT, f"unbalanced shards {everyone}")
    ctx.check(not sharded.state, "the outer optimizer holds state")


def scenario_timm_layer_decay(ctx):
    """A number-valued lr_scale (timm's layer-wise decay, folded into lr by its schedulers) is left alone, as torch
    and fastopt.torch leave it: the same steps as the single-process optimizer over the same groups."""
    import fastopt.torch as ft
    from fastopt.torch.distributed import ShardedOptimizer

    def groups(params):
        return [{"params": params[0:3], "lr": 0.01 * 0.5, "lr_scale": 0.5},
                {"params": params[3:], "lr": 0.01, "lr_scale": 1.0}]

    params, reference_params = make_params(), make_params()
    sharded = ShardedOptimizer(groups(params), ft.AdamW)
    reference = ft.AdamW(groups(reference_params))
    train(ctx, sharded, params, 3)
    train(ctx, reference, reference_params, 3, averaged=True)
    compare(ctx, "timm", sharded, params, reference, reference_params, 3, exact=True)


def scenario_collective_exchange(ctx):
    """The same with gloo's reduce_scatter and all_gather instead of isend/irecv and broadcasts."""
    scenario_fastopt_parity(ctx, exchange="collective")


def scenario_torch_optim_parity(ctx):
    """fastopt.torch SGD, RMSprop, Adam, Adagrad, Lion (and torch.optim.AdamW as the inner class) sharded, with a
    torch lr scheduler, against torch.optim (lion-pytorch for Lion) on the averaged grads."""
    import fastopt.torch as ft
    from fastopt.torch.distributed import ShardedOptimizer

    configs = [(ft.SGD, "SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)),
               (ft.RMSprop, "RMSprop", dict(lr=1e-3, alpha=0.9, centered=True, momentum=0.5, weight_decay=1e-3)),
               (ft.Adam, "Adam", dict(lr=3e-3, amsgrad=True, weight_decay=1e-3)),
               (torch.optim.AdamW, "AdamW", dict(lr=3e-3, weight_decay=0.1)),
               (ft.Adagrad, "Adagrad", dict(lr=0.05, lr_decay=1e-2, initial_accumulator_value=0.1)),
               (ft.Lion, "Lion", dict(lr=3e-4, weight_decay=0.1))]
    for inner, name, kwargs in configs:
        runs = []
        for sharded in (True, False):
            params = make_params()
            groups = [{"params": params[:6]}, {"params": params[6:], "lr": kwargs["lr"] / 2}]
            optimizer = (ShardedOptimizer(groups, inner, **kwargs) if sharded
                         else anchor_optimizer(getattr(fo, name), groups, kwargs, for_loop=False)[0])
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
            train(ctx, optimizer, params, 5, averaged=not sharded, on_step=lambda *_: scheduler.step())
            runs.append((optimizer, params))
        compare(ctx, name, runs[0][0], runs[0][1], runs[1][0], runs[1][1], 5)


def scenario_schedule_free(ctx):
    """fastopt.torch's schedule-free AdamW and SGD sharded, with warmup and two groups, through eval()/train() switches,
    against the schedulefree package on the averaged grads (the params, at the evaluation point); LAMB, whose trust
    ratio needs the norms of whole tensors, is refused."""
    import fastopt.torch as ft
    from fastopt.torch.distributed import ShardedOptimizer

    configs = [(ft.AdamWScheduleFree, dict(lr=3e-3, warmup_steps=2, weight_decay=1e-3)),
               (ft.SGDScheduleFree, dict(lr=0.05, momentum=0.8, weight_decay=1e-3))]
    # Every param with a grad at every step, or none: the package counts steps per group, fastopt per param.
    kinds = [kind for kind in PARAMS if kind[2] != "aux"]
    for inner, kwargs in configs:
        runs = []
        for sharded in (True, False):
            params = make_params(kinds)
            groups = [{"params": params[:5]}, {"params": params[5:], "lr": kwargs["lr"] / 2}]
            optimizer = (ShardedOptimizer(groups, inner, **kwargs) if sharded
                         else anchor_optimizer(getattr(fo, inner.__name__), groups, kwargs)[0])
            train(ctx, optimizer, params, 3, averaged=not sharded, kinds=kinds)
            optimizer.eval()
            optimizer.train()
            train(ctx, optimizer, params, 3, first=3, averaged=not sharded, kinds=kinds)
            optimizer.eval()
            runs.append(params)
        for index, (ours, theirs) in enumerate(zip(*runs)):
            ctx.close(ours, theirs, tolerance(np.float32, 6), f"{inner.__name__}: param {index}")
    try:
        ShardedOptimizer(make_params(), ft.LAMB)
        ctx.check(False, "ShardedOptimizer took LAMB")
    except TypeError as error:
        ctx.check("norms of whole tensors" in str(error), f"LAMB refused with: {error}")


# 8-bit states of the tensors of at least MIN_8BIT (the float64 one excepted): in the float32 space they start on
# 256-element boundaries (0 and 768), and the cut of 2 ranks (1280) cuts the (29, 41) tensor into pieces of 512 and
# 677 elements: the first is below MIN_8BIT and 8-bit all the same. (2 ranks only: each rank compiles its 8-bit
# kernels, the most expensive ones, and 3 ranks cut no other way that matters here.)
MIN_8BIT = 600
PARAMS_8BIT = [((700,), torch.float32, "all"), ((13,), torch.float32, "all"), ((29, 41), torch.float32, "all"),
               ((5, 7), torch.float32, "aux"), ((37, 11), torch.float32, "all"), ((29,), torch.float64, "all"),
               ((3, 3), torch.float32, "frozen")]


def scenario_8bit_states(ctx):
    """state_dtype='8bit' with a schedule, a changing rate, lr_scale and AMSGrad: params, codes and block scales
    bit for bit those of fastopt.torch.AdamW in one process (the blocks never straddle a cut); the consolidated
    state dict resumes a fresh ShardedOptimizer bit for bit, loads decoded into a float32 one, exports to
    torch.optim; block scales of the wrong length are refused on every rank, the state untouched."""
    import fastopt.torch as ft
    from fastopt.torch.adapter import decoded_states
    from fastopt.torch.distributed import ShardedOptimizer

    kinds = PARAMS_8BIT

    def groups(params):
        generator = torch.Generator().manual_seed(5)
        scales = [torch.rand(p.shape, generator=generator, dtype=p.dtype) * 2 for p in params[2:5]]
        return [{"params": params[0:2], "lr": fo.schedules.warmup(fo.schedules.cosine(0.01, t_max=8), warmup_steps=2)},
                {"params": params[2:5], "lr": 0.02, "betas": (0.8, 0.99), "weight_decay": 0.1, "lr_scale": scales,
                 "amsgrad": True},
                {"params": params[5:], "lr": 0.005}]

    options = dict(state_dtype="8bit", min_8bit_size=MIN_8BIT)
    params, reference_params = make_params(kinds), make_params(kinds)
    sharded = ShardedOptimizer(groups(params), ft.AdamW, **options)
    reference = ft.AdamW(groups(reference_params), **options)
    train(ctx, sharded, params, 4, on_step=lower_lr, kinds=kinds)
    train(ctx, reference, reference_params, 4, averaged=True, on_step=lower_lr, kinds=kinds)
    # Every piece of a tensor of at least MIN_8BIT elements is 8-bit, however small; the others are float32.
    small = 0
    for piece in sharded._pieces:
        entry = sharded.optim.state.get(piece.tensor) if piece.index is not None else None
        if entry:
            whole = sharded._params[piece.index]
            coded = whole.numel() >= MIN_8BIT and whole.dtype != torch.float64
            ctx.check(("exp_avg_absmax" in entry) == coded and (entry["exp_avg"].dtype == torch.uint8) == coded,
                      f"param {piece.index}'s piece [{piece.start}, {piece.stop}): 8-bit {not coded}")
            small += coded and piece.stop - piece.start < MIN_8BIT
    everyone = [None] * ctx.world
    dist.all_gather_object(everyone, small)
    ctx.check(sum(everyone) > 0, "no 8-bit piece below MIN_8BIT: the layout changed")
    full = compare(ctx, "8bit", sharded, params, reference, reference_params, 4, exact=True)
    checkpoint = [full]
    dist.broadcast_object_list(checkpoint, src=0)
    checkpoint = checkpoint[0]
    ctx.check(checkpoint["state"][2]["exp_avg"].dtype == torch.uint8 and checkpoint["state"][2]["exp_avg_absmax"].shape
              == (5,) and checkpoint["state"][4]["exp_avg"].dtype == torch.float32, "the consolidated state's storage")
    if ctx.rank == 0:
        exported, expected = sharded.float32_state_dict(), reference.float32_state_dict()
        for index, entry in expected["state"].items():
            for name, value in entry.items():
                ctx.check(same_tensor(exported["state"][index][name], value),
                          f"float32_state_dict: param {index} {name} differs")
        single = make_params(kinds)
        torch.optim.AdamW(groups(single), lr=0.5).load_state_dict(exported)  # torch's own checks

    fresh = make_params(kinds, seed=3)
    with torch.no_grad():
        for param, theirs in zip(fresh, params):
            param.copy_(theirs)
    resumed = ShardedOptimizer(groups(fresh), ft.AdamW, lr=0.5, **options)
    bad = dict(checkpoint, state={index: dict(entry) for index, entry in checkpoint["state"].items()})
    bad["state"][2]["exp_avg_sq_absmax"] = bad["state"][2]["exp_avg_sq_absmax"][:-1]
    before = resumed.optim.state_dict()
    ctx.raises(ValueError, "'exp_avg_sq_absmax' of shape (4,)", lambda: resumed.load_state_dict(bad),
               "block scales of the wrong length")
    ctx.check(resumed.optim.state_dict()["state"] == before["state"], "refused scales changed the state")
    resumed.load_state_dict(checkpoint)
    train(ctx, resumed, fresh, 2, first=4, on_step=lower_lr, kinds=kinds)
    train(ctx, reference, reference_params, 2, first=4, averaged=True, on_step=lower_lr, kinds=kinds)
    compare(ctx, "8bit resumed", resumed, fresh, reference, reference_params, 6, exact=True)

    wide = ShardedOptimizer(groups(make_params(kinds)), ft.AdamW)  # float32 states: the codes decoded
    wide.load_state_dict(checkpoint)
    wide.consolidate_state_dict()
    if ctx.rank == 0:
        decoded = decoded_states(checkpoint)
        for index, entry in decoded["state"].items():
            for name, value in entry.items():
                ctx.check(same_tensor(wide.state_dict()["state"][index][name], value),
                          f"loaded into float32 states: param {index} {name} differs from the decoded codes")
    # Into fewer ranks (other cuts, one rank for 2): the codes and scales move to the new pieces unchanged.
    members = list(range(max(1, ctx.world - 1)))
    fewer = dist.new_group(ranks=members)
    if ctx.rank in members:
        resharded = ShardedOptimizer(groups(make_params(kinds)), ft.AdamW, process_group=fewer, **options)
        resharded.load_state_dict(checkpoint)
        resharded.consolidate_state_dict(to=0)
        if ctx.rank == 0:
            again = resharded.state_dict()
            ctx.check(all(same_tensor(value, again["state"][index][name]) for index, entry in
                          checkpoint["state"].items() for name, value in entry.items()),
                      f"the 8-bit state differs after loading into {len(members)} rank(s)")


def scenario_grads_averaged_and_clipping(ctx):
    """grads_averaged=True (the grads as DDP leaves them: the same on every rank) and max_grad_norm, against
    torch.nn.utils.clip_grad_norm_ and fastopt.torch.AdamW in one process; then clipping with the reduction."""
    import fastopt.torch as ft
    from fastopt.torch.distributed import ShardedOptimizer

    for averaged in (True, False):
        params, reference_params = make_params(), make_params()
        sharded = ShardedOptimizer(fastopt_groups(params), ft.AdamW, grads_averaged=averaged, max_grad_norm=0.5)
        reference = ft.AdamW(fastopt_groups(reference_params))
        for step in range(4):
            sharded.zero_grad()
            set_grads(params, [averaged_grad(step, ctx.world, i) if averaged else grad(step, ctx.rank, i)
                               for i in range(len(params))], False)
            before = [p.grad.clone() if p.grad is not None else None for p in params]
            sharded.step()
            reference.zero_grad()
            set_grads(reference_params, [averaged_grad(step, ctx.world, i) for i in range(len(params))], False)
            norm = torch.nn.utils.clip_grad_norm_([p for p in reference_params if p.grad is not None], 0.5)
            reference.step()
            ctx.check(abs(sharded.last_grad_norm - float(norm)) <= 1e-5 * float(norm),
                      f"grad norm {sharded.last_grad_norm} != {float(norm)}")
            for index, (param, saved) in enumerate(zip(params, before)):  # the caller's grads are not scaled
                ctx.check(saved is None or torch.equal(param.grad, saved), f"grad {index} changed by the step")
        compare(ctx, f"clipping (grads_averaged={averaged})", sharded, params, reference, reference_params, 4)


def scenario_guard(ctx):
    """NaN in one rank's grads skips the step on every rank (nothing changes); two in a row back the rate off;
    the run equals fastopt's core AdamW with the same guard on the averaged grads."""
    import fastopt as fo
    import fastopt.torch as ft
    from fastopt.torch.distributed import ShardedOptimizer

    kinds = PARAMS[:6]
    params = make_params(kinds)
    schedule = fo.schedules.cosine(0.01, t_max=10)
    sharded = ShardedOptimizer([{"params": params[:3], "lr": schedule}, {"params": params[3:], "lr": 0.02}],
                               ft.AdamW, guard=fo.Guard(patience=2))
    arrays = [p.detach().numpy().copy() for p in make_params(kinds)]
    core = fo.AdamW([{"params": arrays[:3], "lr": schedule}, {"params": arrays[3:], "lr": 0.02}],
                    guard=fo.Guard(patience=2))
    poisoned = {1: 1, 2: 0, 3: 0}  # step -> the rank whose grad of param 0 holds a NaN
    for step in range(7):
        grads = [grad(step, ctx.rank, i, kinds) for i in range(len(params))]
        if poisoned.get(step) == ctx.rank:
            grads[0][3, 4] = float("nan")
        sharded.zero_grad()
        set_grads(params, grads, False)
        before = [p.detach().clone() for p in params]
        sharded.step()
        averaged = [averaged_grad(step, ctx.world, i, kinds) for i in range(len(params))]
        if step in poisoned:
            averaged[0][3, 4] = float("nan")
            ctx.check(all(torch.equal(p, b) for p, b in zip(params, before)), f"step {step} changed params")
        core.step([None if g is None else g.numpy() for g in averaged])
        ctx.check(sharded.guard.state_dict() == core.guard.state_dict(),
                  f"step {step}: guard {sharded.guard.state_dict()} != {core.guard.state_dict()}")
        if step not in poisoned:
            ctx.check(abs(sharded.last_grad_norm - core.last_grad_norm) <= 1e-5 * core.last_grad_norm,
                      f"step {step}: grad norm {sharded.last_grad_norm} != {core.last_grad_norm}")
    ctx.check(sharded.guard.lr_factor == 0.5 and sharded.step_count == core.step_count == 4,
              f"lr_factor {sharded.guard.lr_factor}, step counts {sharded.step_count}, {core.step_count}")
    for index, (param, array) in enumerate(zip(params, arrays)):
        ctx.close(param, torch.from_numpy(array), tolerance(np.float32, 7), f"guard: param {index}")


def scenario_mixed_precision(ctx):
    """bfloat16 params with float32 master copies (sharded like every state buffer), float32 params with bfloat16
    states, an lr_scale on the bfloat16 group: bit for bit fastopt.torch.AdamW with the same options on the
    averaged grads (summed in bfloat16, as the reduction does); the consolidated state loads into it."""
    import fastopt.torch as ft
    from fastopt.torch import adapter
    from fastopt.torch.distributed import ShardedOptimizer

    if "master_weights" not in getattr(adapter, "CORE_OPTIONS", ()):
        return  # this fastopt.torch has no mixed-precision options (test_mixed_precision_options skips)
    kinds = [((37, 11), torch.bfloat16, "all"), ((13,), torch.bfloat16, "all"), ((5, 7), torch.bfloat16, "aux"),
             ((97,), torch.float32, "all"), ((1,), torch.float32, "all")]
    options = dict(master_weights=True, state_dtype="bfloat16")

    def groups(params):
        generator = torch.Generator().manual_seed(5)
        scales = [torch.rand(p.shape, generator=generator) * 2 for p in params[:3]]  # float32: the math dtype
        return [{"params": params[:3], "lr_scale": scales, "lr": 0.02}, {"params": params[3:]}]

    runs = []
    for sharded in (True, False):
        params = make_params(kinds)
        optimizer = (ShardedOptimizer(groups(params), ft.AdamW, lr=0.01, **options) if sharded
                     else ft.AdamW(groups(params), lr=0.01, **options))
        train(ctx, optimizer, params, 5, averaged=not sharded, kinds=kinds)
        runs.append((optimizer, params))
    compare(ctx, "mixed precision", *runs[0], *runs[1], 5, exact=True)
    ctx.check("master_weights" not in runs[0][0].param_groups[0], "a constructor option became a group key")
    runs[0][0].consolidate_state_dict(to=0)
    if ctx.rank == 0:
        checkpoint = runs[0][0].state_dict()
        ctx.check(checkpoint["state"][0]["master_param"].dtype == torch.float32
                  and checkpoint["state"][3]["exp_avg"].dtype == torch.bfloat16, "state dtypes")
        single = ft.AdamW(groups(make_params(kinds)), lr=0.01, **options)
        single.load_state_dict(checkpoint)
        for name, value in single.state_dict()["state"][0].items():
            ctx.check(torch.equal(value, checkpoint["state"][0][name]), f"{name} after loading")


def scenario_sharded_checkpoint(ctx):
    """Sharded save and load (each rank its own file) into a fresh optimizer and fresh params resumes bit for
    bit; a shard saved with another layout is refused on every rank."""
    import fastopt as fo
    import fastopt.torch as ft
    from fastopt.torch.distributed import ShardedOptimizer

    def build(params):
        return ShardedOptimizer(fastopt_groups(params), ft.AdamW, guard=fo.Guard())

    params = make_params()
    straight = build(params)
    train(ctx, straight, params, 4, on_step=lower_lr)
    path = os.path.join(ctx.directory, f"sharded-{ctx.world}-{ctx.rank}.pt")
    torch.save({"params": [p.detach().clone() for p in params], "optimizer": straight.sharded_state_dict()}, path)
    train(ctx, straight, params, 3, first=4, on_step=lower_lr)

    checkpoint = torch.load(path, weights_only=True)
    resumed_params = make_params(seed=1)
    with torch.no_grad():
        for param, saved in zip(resumed_params, checkpoint["params"]):
            param.copy_(saved)
    resumed = build(resumed_params)
    resumed.param_groups[0]["lr"] = 0.5  # the checkpoint's schedule replaces it
    resumed.load_sharded_state_dict(checkpoint["optimizer"])
    ctx.check(resumed.step_count == 4 and resumed.param_groups[1]["lr"] == pytest.approx(0.02 * 0.8 ** 4),
              f"after loading: step count {resumed.step_count}, lr {resumed.param_groups[1]['lr']}")
    train(ctx, resumed, resumed_params, 3, first=4, on_step=lower_lr)
    straight.consolidate_state_dict()
    expected = straight.state_dict() if ctx.rank == 0 else None
    compare(ctx, "sharded resume", resumed, resumed_params, _Fixed(expected), params, 7, exact=True)

    other = ShardedOptimizer(fastopt_groups(make_params()[:6] + make_params()[6:]), ft.AdamW)
    other.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    before = other.optim.state_dict()
    ctx.raises(ValueError, "different layout", lambda: other.load_sharded_state_dict(checkpoint["optimizer"]),
               "a shard of another layout")
    ctx.check(other.optim.state_dict()["state"] == before["state"], "a refused shard changed the state")


class _Fixed:
    """A stand-in reference whose state_dict() is a saved one."""

    def __init__(self, state_dict):
        self.saved = state_dict

    def state_dict(self):
        return self.saved


def scenario_consolidated_checkpoint(ctx):
    """consolidate_state_dict(to=1): on rank 1 a torch-format state dict that loads into fastopt.torch.AdamW,
    torch.optim.AdamW and a fresh ShardedOptimizer on every rank; all continue as the sharded run does."""
    import fastopt.torch as ft
    from fastopt.torch.distributed import ShardedOptimizer

    def groups(params):  # no schedule and no lr_scale: torch.optim continues exactly too
        return [{"params": params[:6], "lr": 0.01}, {"params": params[6:], "lr": 0.005, "amsgrad": True}]

    params = make_params()
    sharded = ShardedOptimizer(groups(params), ft.AdamW)
    train(ctx, sharded, params, 4)
    sharded.consolidate_state_dict(to=1)
    path = os.path.join(ctx.directory, f"consolidated-{ctx.world}.pt")
    if ctx.rank == 1:
        torch.save({"params": [p.detach().clone() for p in params], "optimizer": sharded.state_dict()}, path)
    else:
        ctx.raises(RuntimeError, "call consolidate_state_dict(", sharded.state_dict, "state_dict() on another rank")
    dist.barrier()
    checkpoint = torch.load(path, weights_only=True)
    train(ctx, sharded, params, 3, first=4)
    if ctx.rank == 1:
        ctx.raises(RuntimeError, "consolidate again", sharded.state_dict, "a stale consolidated state dict")

    fresh = make_params(seed=3)
    with torch.no_grad():
        for param, saved in zip(fresh, checkpoint["params"]):
            param.copy_(saved)
    resumed = ShardedOptimizer(groups(fresh), ft.AdamW, lr=0.5)
    resumed.load_state_dict(checkpoint["optimizer"])
    train(ctx, resumed, fresh, 3, first=4)
    sharded.consolidate_state_dict()
    compare(ctx, "consolidated into a ShardedOptimizer", resumed, fresh,
            _Fixed(sharded.state_dict() if ctx.rank == 0 else None), params, 7, exact=True)
    # Into fewer ranks (a group of world - 1, one rank for 2): the state moves to the new shards unchanged.
    members = list(range(max(1, ctx.world - 1)))
    fewer = dist.new_group(ranks=members)
    if ctx.rank in members:
        resharded = ShardedOptimizer(groups(make_params(seed=5)), ft.AdamW, process_group=fewer)
        resharded.load_state_dict(checkpoint["optimizer"])
        resharded.consolidate_state_dict(to=0)
        if ctx.rank == 0:
            again = resharded.state_dict()
            ctx.check(all(torch.equal(value, again["state"][index][name]) for index, entry in
                          checkpoint["optimizer"]["state"].items() for name, value in entry.items()),
                      f"the state differs after loading into {len(members)} rank(s)")
    for module in (ft, torch.optim):  # one process, on the averaged grads
        single = make_params(seed=4)
        with torch.no_grad():
            for param, saved in zip(single, checkpoint["params"]):
                param.copy_(saved)
        optimizer = module.AdamW(groups(single), lr=0.5)
        optimizer.load_state_dict(checkpoint["optimizer"])
        train(ctx, optimizer, single, 3, first=4, averaged=True)
        for index, (ours, theirs) in enumerate(zip(params, single)):
            ctx.close(ours, theirs, tolerance(np.float32, 7), f"{module.__name__}.AdamW from the consolidated "
                                                              f"checkpoint: param {index}")


def scenario_add_param_group(ctx):
    """A group added after two steps (float32 and float64 params) gets shards of its own; the run equals
    fastopt.torch.AdamW with the same add_param_group."""
    import fastopt.torch as ft
    from fastopt.torch.distributed import ShardedOptimizer

    runs = []
    for sharded in (True, False):
        params = make_params()
        first = [{"params": params[:6], "lr": 0.01}]
        optimizer = ShardedOptimizer(first, ft.AdamW) if sharded else ft.AdamW(first)
        for param in params[6:]:
            param.grad = None
        train(ctx, optimizer, params[:6], 2, averaged=not sharded)
        if sharded:  # the inner optimizer refuses the int32 tensor on rank 0 only (it is in rank 0's shard): all
            # ranks raise, none adds the group
            bad = [torch.nn.Parameter(torch.ones(40)), torch.ones(3, dtype=torch.int32)]
            pointer = bad[0].data_ptr()
            ctx.raises(TypeError, "add_param_group failed on rank 0", lambda: optimizer.add_param_group(
                {"params": bad}), "a group the inner optimizer refuses on one rank")
            ctx.check(len(optimizer.param_groups) == len(optimizer.optim.param_groups) == 1
                      and bad[0].data_ptr() == pointer, "a refused group was added")
        optimizer.add_param_group({"params": params[6:], "lr": 0.02, "betas": (0.5, 0.9)})
        train(ctx, optimizer, params, 3, first=2, averaged=not sharded)
        runs.append((optimizer, params))
    ctx.check(len(runs[0][0].param_groups) == 2 and runs[0][0].param_groups[1]["betas"] == (0.5, 0.9), "groups")
    compare(ctx, "add_param_group", runs[0][0], runs[0][1], runs[1][0], runs[1][1], 5)


def scenario_mismatched_ranks(ctx):
    """Param lists that differ between ranks, or a rank whose own checks fail: ValueError on every rank, naming
    the difference; the process group stays usable."""
    import fastopt.torch as ft
    from fastopt.torch.distributed import ShardedOptimizer

    params = make_params()
    if ctx.rank == 1:
        params[4] = torch.nn.Parameter(torch.zeros(5, 8))
    ctx.raises(ValueError, "param_groups[0]['params'][4] is float32 of shape (5, 7) on rank 0, float32 of shape "
               "(5, 8) on rank 1", lambda: ShardedOptimizer(params, ft.AdamW), "a shape that differs")
    params = make_params()
    groups = [{"params": params[:5]}, {"params": params[5:]}] if ctx.rank == ctx.world - 1 else [{"params": params}]
    ctx.raises(ValueError, "param groups", lambda: ShardedOptimizer(groups, ft.AdamW), "group counts that differ")
    params = make_params()
    if ctx.rank == 1:
        params[0] = torch.nn.Parameter(torch.zeros(11, 37).t())
    ctx.raises(ValueError, "failed on rank 1: param_groups[0]['params'][0] must be a dense contiguous tensor",
               lambda: ShardedOptimizer(params, ft.AdamW), "one rank's non-contiguous param")
    ctx.raises(ValueError, "failed on rank 0", lambda: ShardedOptimizer(make_params(), ft.AdamW, lr=-ctx.rank - 1.0),
               "an invalid lr")
    ctx.check(all(torch.equal(p, q) for p, q in zip(make_params()[1:], params[1:])), "params changed")
    dist.barrier()


def scenario_bad_input(ctx):
    """Bad input during training raises on every rank before params or state change; training goes on after."""
    import fastopt.torch as ft
    from fastopt.torch.distributed import ShardedOptimizer

    params = make_params()
    optimizer = ShardedOptimizer(fastopt_groups(params), ft.AdamW)
    train(ctx, optimizer, params, 2)

    def snapshot():
        return [p.detach().clone() for p in params], {key: {name: value.clone() for name, value in entry.items()}
                                                      for key, entry in optimizer.optim.state_dict()["state"].items()}

    def untouched(saved, what):
        ctx.check(all(torch.equal(p, q) for p, q in zip(params, saved[0])), f"{what}: params changed")
        state = optimizer.optim.state_dict()["state"]
        ctx.check(all(torch.equal(state[key][name], value) for key, entry in saved[1].items()
                      for name, value in entry.items()), f"{what}: state changed")

    def step_with(grads):
        set_grads(params, grads, False)
        optimizer.step()

    grads = [grad(2, ctx.rank, i) for i in range(len(params))]
    saved = snapshot()
    optimizer.param_groups[1]["lr"] = -1.0
    ctx.raises(ValueError, "invalid lr", lambda: step_with(grads), "a negative lr")
    untouched(saved, "a negative lr")
    optimizer.param_groups[1]["lr"] = 0.02
    optimizer.param_groups[1]["lr_scale"] = [-s for s in optimizer.param_groups[1]["lr_scale"]]
    ctx.raises(ValueError, "finite and >= 0", lambda: step_with(grads), "a negative lr_scale")
    untouched(saved, "a negative lr_scale")
    optimizer.param_groups[1]["lr_scale"] = [-s for s in optimizer.param_groups[1]["lr_scale"]]
    bad = list(grads)
    if ctx.rank == 1:  # torch's .grad setter refuses other shapes and dtypes; a sparse grad gets through
        bad[2] = torch.ones(13).to_sparse()
    ctx.raises(RuntimeError, "sparse gradients" if ctx.rank == 1 else "rank(s) [1]", lambda: step_with(bad),
               "one rank's sparse grad")
    untouched(saved, "one rank's sparse grad")
    optimizer.consolidate_state_dict(0)
    full = optimizer.state_dict() if ctx.rank == 0 else None
    everyone = [full]
    dist.broadcast_object_list(everyone, src=0)
    broken = everyone[0]
    broken["state"][3]["exp_avg"] = torch.zeros(65)
    ctx.raises(ValueError, "shape (65,)", lambda: optimizer.load_state_dict(broken), "a checkpoint of the wrong shape")
    untouched(saved, "a checkpoint of the wrong shape")
    step_with(grads)  # still works
    ctx.check(not all(torch.equal(p, q) for p, q in zip(params, saved[0])), "the step after the errors did nothing")
    original = params[5].data
    params[5].data = original.clone()
    ctx.raises(RuntimeError, "no longer has the storage", lambda: step_with(grads), "a param whose storage changed")
    params[5].data = original
    optimizer.step()


def same_bytes(first, second):
    return (first.dtype == second.dtype and first.shape == second.shape
            and torch.equal(first.reshape(-1).view(torch.uint8), second.reshape(-1).view(torch.uint8)))


# Group edits the inner fastopt.torch.AdamW refuses, each made on rank 1 alone: (what, group, edit, the error rank 1
# raises, words of its message). fastopt_groups: group 0 has a schedule, group 1 lr_scale.
ONE_RANK_EDITS = [
    ("a negative lr", 1, lambda group: group.update(lr=-1.0), ValueError, "invalid lr -1.0"),
    ("a negative one-element tensor lr", 1, lambda group: group.update(lr=torch.tensor(-1.0)), ValueError,
     "invalid lr -1.0"),
    ("beta2 = 1", 1, lambda group: group.update(betas=(0.9, 1.0)), ValueError, "invalid beta2"),
    ("a valid lr and a negative beta1", 1, lambda group: group.update(lr=0.5, betas=(-0.1, 0.99)), ValueError,
     "invalid beta1"),
    ("a negative weight_decay", 2, lambda group: group.update(weight_decay=-0.1), ValueError,
     "invalid weight_decay -0.1"),
    ("a string eps", 1, lambda group: group.update(eps="1e-8"), TypeError, "eps must be a real number"),
    ("an int amsgrad", 1, lambda group: group.update(amsgrad=1), TypeError, "amsgrad must be a bool"),
    ("no eps", 1, lambda group: group.pop("eps"), ValueError, "param_groups[1] has no ['eps']"),
    ("differentiable=True", 1, lambda group: group.update(differentiable=True), ValueError,
     "differentiable=True is not supported"),
    ("a schedule and a torch scheduler", 0, lambda group: group.update(initial_lr=0.01), TypeError,
     "a torch lr scheduler drives it too"),
    ("a valid lr and an lr_scale of the wrong shape", 1,
     lambda group: group.update(lr=0.5, lr_scale=[scale.reshape(-1) for scale in group["lr_scale"]]), ValueError,
     "['lr_scale'][1] must be a contiguous tensor of its param's shape (5, 7)"),
]


def scenario_one_rank_group_edits(ctx):
    """A group edit the inner optimizer refuses, made on rank 1 alone (ONE_RANK_EDITS): every rank raises (rank 1
    its own error, the others a RuntimeError naming rank 1) with the params, the state and the inner groups as
    they were, byte for byte; once rank 1 undoes the edit, the next step equals a twin's that never saw it. A key
    the inner optimizer does not know (a misspelt one) is ignored on that rank, as torch and fastopt.torch do."""
    import fastopt.torch as ft
    from fastopt.torch.distributed import ShardedOptimizer

    params, twin_params = make_params(), make_params()
    optimizer = ShardedOptimizer(fastopt_groups(params), ft.AdamW)
    twin = ShardedOptimizer(fastopt_groups(twin_params), ft.AdamW)
    train(ctx, optimizer, params, 2)
    train(ctx, twin, twin_params, 2)

    def state(sharded):
        return {key: {name: value.clone() for name, value in entry.items()}
                for key, entry in sharded.optim.state_dict()["state"].items()}

    def same_state(first, second):
        return first.keys() == second.keys() and all(
            first[key].keys() == second[key].keys() and all(same_bytes(value, second[key][name])
                                                             for name, value in first[key].items()) for key in first)

    def step(sharded, tensors, number):
        set_grads(tensors, [grad(number, ctx.rank, index) for index in range(len(tensors))], False)
        sharded.step()

    def same_as_twin(what):
        ctx.check(all(same_bytes(p, q) for p, q in zip(params, twin_params)), f"{what}: params differ from the twin's")
        ctx.check(same_state(state(optimizer), state(twin)), f"{what}: state differs from the twin's")

    for number, (what, group_number, edit, error, words) in enumerate(ONE_RANK_EDITS, 2):
        group = optimizer.param_groups[group_number]
        kept = dict(group)
        saved_params, saved_state = [p.detach().clone() for p in params], state(optimizer)
        saved_groups = [dict(inner) for inner in optimizer.optim.param_groups]
        if ctx.rank == 1:
            edit(group)
        ctx.raises(error if ctx.rank == 1 else RuntimeError, words if ctx.rank == 1 else "rank(s) [1]",
                   lambda: step(optimizer, params, number), what)
        ctx.check(all(same_bytes(p, q) for p, q in zip(params, saved_params)), f"{what}: params changed")
        ctx.check(same_state(state(optimizer), saved_state), f"{what}: state changed")
        ctx.check(all(inner.keys() == saved.keys() and all(inner[key] is saved[key] for key in inner)
                      for inner, saved in zip(optimizer.optim.param_groups, saved_groups)),
                  f"{what}: the inner param groups changed")
        group.clear()
        group.update(kept)
        step(optimizer, params, number)
        step(twin, twin_params, number)
        same_as_twin(f"the step after {what}")
    if ctx.rank == 1:
        optimizer.param_groups[1]["weight_decya"] = 0.5
    step(optimizer, params, len(ONE_RANK_EDITS) + 2)
    step(twin, twin_params, len(ONE_RANK_EDITS) + 2)
    same_as_twin("a misspelt key")


def scenario_timeout(ctx):
    """Rank 1 never calls step(): rank 0 gets a RuntimeError naming the step after the group's timeout (5 s)
    instead of waiting forever."""
    import fastopt.torch as ft
    from fastopt.torch.distributed import ShardedOptimizer

    group = dist.new_group(timeout=datetime.timedelta(seconds=SHORT_TIMEOUT))
    params = make_params()
    optimizer = ShardedOptimizer(params, ft.AdamW, process_group=group)
    if ctx.rank == 0:
        set_grads(params, [grad(0, 0, i) for i in range(len(params))], False)
        start = time.monotonic()
        ctx.raises(RuntimeError, "step() call 1", optimizer.step, "a step the other ranks never join")
        ctx.check(time.monotonic() - start < 4 * SHORT_TIMEOUT, f"took {time.monotonic() - start:.0f} s")
    else:
        time.sleep(SHORT_TIMEOUT + 2)  # a rank stuck elsewhere (one that died would close its connections at once)
    dist.barrier()


SCENARIOS = {name.removeprefix("scenario_"): function for name, function in globals().items()
             if name.startswith("scenario_")}
TWO_RANKS_ONLY = {"timeout", "8bit_states"}  # sleeps; compiles 8-bit kernels on every rank: one world size shows it


def _worker(rank, world, port, directory, module, names):
    scenarios = importlib.import_module(module).SCENARIOS
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import numba

    numba.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT))
    results = {}
    for name in names:
        ctx = Ranks(rank, world, directory)
        try:
            scenarios[name](ctx)
        except Exception:  # noqa: BLE001 (recorded for the test that reads this scenario)
            ctx.errors.append(f"rank {rank} raised:\n{traceback.format_exc()}")
        results[name] = ctx.errors
        with open(os.path.join(directory, f"rank{rank}.json"), "w") as file:  # after each: a hang leaves the rest
            json.dump(results, file)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_scenarios(module, world, directory, names):
    """Spawn ``world`` gloo ranks that run the scenarios ``names`` of the test module ``module`` (its ``SCENARIOS``)
    once each; every scenario's records (what went wrong, over the ranks), by name."""
    failure = None
    try:
        torch.multiprocessing.spawn(_worker, args=(world, _free_port(), directory, module, names), nprocs=world)
    except Exception as exc:  # noqa: BLE001 (a rank died: the scenarios it left unfinished fail below)
        failure = str(exc)
    records = {}
    for rank in range(world):
        path = os.path.join(directory, f"rank{rank}.json")
        done = json.load(open(path)) if os.path.exists(path) else {}
        for name in names:
            records.setdefault(name, []).extend(done.get(name, [f"rank {rank} never finished: {failure}"]))
    return records


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=[f"{world}ranks" for world in WORLD_SIZES])
def ranks(request, tmp_path_factory):
    """Spawn the ranks once per world size; every scenario's records, per rank."""
    world = request.param
    directory = str(tmp_path_factory.mktemp(f"ranks{world}"))
    names = [name for name in SCENARIOS if world == 2 or name not in TWO_RANKS_ONLY]
    return world, run_scenarios(__name__, world, directory, names)


def check(ranks, name):
    world, records = ranks
    if name not in records:
        pytest.skip("runs on 2 ranks only")
    errors = records[name]
    assert not errors, "\n".join(errors)


def test_fastopt_parity(ranks):
    """Schedule, changing lr, groups, lr_scale, float32 + float64, boundaries, odd/zero sizes, frozen, partial
    grads: bit for bit fastopt.torch.AdamW on the averaged grads; shards balanced."""
    check(ranks, "fastopt_parity")


def test_timm_layer_decay(ranks):
    check(ranks, "timm_layer_decay")


def test_collective_exchange(ranks):
    check(ranks, "collective_exchange")


def test_torch_optim_parity(ranks):
    check(ranks, "torch_optim_parity")


def test_schedule_free(ranks):
    check(ranks, "schedule_free")


def test_8bit_states(ranks):
    check(ranks, "8bit_states")


def test_grads_averaged_and_clipping(ranks):
    check(ranks, "grads_averaged_and_clipping")


def test_guard(ranks):
    check(ranks, "guard")


def test_mixed_precision(ranks):
    from fastopt.torch import adapter

    if "master_weights" not in getattr(adapter, "CORE_OPTIONS", ()):
        pytest.skip("this fastopt.torch has no mixed-precision options")
    check(ranks, "mixed_precision")


def test_sharded_checkpoint(ranks):
    check(ranks, "sharded_checkpoint")


def test_consolidated_checkpoint(ranks):
    check(ranks, "consolidated_checkpoint")


def test_add_param_group(ranks):
    check(ranks, "add_param_group")


def test_mismatched_ranks(ranks):
    check(ranks, "mismatched_ranks")


def test_bad_input(ranks):
    check(ranks, "bad_input")


def test_one_rank_group_edits(ranks):
    """Negative lr, betas out of [0, 1), negative weight_decay, wrong types, a missing key, ... on rank 1 alone:
    every rank raises, nothing changes, and training goes on as if the edit had never been made."""
    check(ranks, "one_rank_group_edits")


def test_timeout(ranks):
    check(ranks, "timeout")


def test_without_process_group_is_an_error():
    from fastopt.torch.distributed import ShardedOptimizer

    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ShardedOptimizer([torch.nn.Parameter(torch.ones(3))])
