"""fastopt.torch over FSDP2 (``fully_shard``) and DTensor params, on 2 gloo ranks of this machine: parity with
torch.optim.AdamW on the same sharded model (with ``max_grad_norm`` against ``clip_grad_norm_``, shards of odd size
and empty shards), the state as DTensors sharing the core's buffers, the non-finite skip decided on the global grads,
a ``Replicate()`` param counted once in the norm, ``lr_scale`` given at full size, DCP checkpoints (sharded, saved
and loaded into a fresh model and optimizer; gathered to full tensors, loaded into one process's fastopt.torch and
torch.optim optimizers).

One ``torch.multiprocessing.spawn`` runs every scenario on both ranks (test_distributed's harness: a scenario records
what disagrees instead of raising, so that the ranks stay in step, and each test reads its scenario's records)."""
import os

import numpy as np
import pytest

from conftest import tolerance
from test_distributed import run_scenarios

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

WORLD = 2
STEPS = 4
RTOL = tolerance(np.float32, STEPS)
MAX_NORM = 0.5  # below the grads' norm: every step clips


# ---------------------------------------------------------------- what runs on the ranks
def make_model(shard=True):
    """Odd sizes: the first layer's weight splits 4 + 3 rows, the last layer's weight and bias 1 + 0 (rank 1's
    shards are empty)."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 1))
    if shard:
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
    return model


def batch(step, rank):
    generator = torch.Generator().manual_seed(1_000 * step + rank)
    return torch.randn(8, 5, generator=generator)


def backward(model, step, rank, scale=1.0):
    (model(batch(step, rank)).pow(2).sum() * scale).backward()


def train(ctx, model, optimizer, steps, *, first=0, clip=None):
    """``steps`` steps on this rank's batches; ``clip``: torch's clip_grad_norm_ first (for torch.optim); returns
    the norms it reported."""
    norms = []
    for step in range(first, first + steps):
        optimizer.zero_grad()
        backward(model, step, ctx.rank, scale=10.0)
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip).full_tensor()))
        optimizer.step()
    return norms


def local(tensor):
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def compare_params(ctx, label, model, reference, rtol=RTOL):
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        ctx.close(local(ours), local(theirs), rtol, f"{label}: {name}")


def same_params(ctx, label, model, reference):
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        ctx.check(torch.equal(local(ours), local(theirs)), f"{label}: {name} differs")


def scenario_parity_and_clipping(ctx):
    """fastopt.torch.AdamW(max_grad_norm) against clip_grad_norm_ + torch.optim.AdamW on the same FSDP2 model: params
    and state; the state is DTensors like the params, sharing the core's buffers; the core is not rebuilt."""
    import fastopt.torch as ft

    model, reference = make_model(), make_model()
    optimizer = ft.AdamW(model.parameters(), lr=0.01, weight_decay=0.1, max_grad_norm=MAX_NORM)
    torch_optimizer = torch.optim.AdamW(reference.parameters(), lr=0.01, weight_decay=0.1)
    core = optimizer.core
    train(ctx, model, optimizer, STEPS)
    norms = train(ctx, reference, torch_optimizer, STEPS, clip=MAX_NORM)
    ctx.check(optimizer.core is core, "the core was rebuilt during training (the params' memory looked changed)")
    ctx.check(norms[-1] > MAX_NORM, f"the grads' norm {norms[-1]} does not clip")
    ctx.close(optimizer.core.last_grad_norm, norms[-1], 1e-6, "last_grad_norm (the global norm)")
    compare_params(ctx, "params", model, reference)
    for index, (param, theirs) in enumerate(zip(model.parameters(), reference.parameters())):
        state, expected = optimizer.state[param], torch_optimizer.state[theirs]
        ctx.check(state.keys() == expected.keys(), f"param {index}: state {sorted(state)} != {sorted(expected)}")
        ctx.check(float(state["step"]) == float(expected["step"]) == STEPS, f"param {index}: step")
        for name in ("exp_avg", "exp_avg_sq"):
            value = state[name]
            ctx.check(type(value).__name__ == "DTensor" and value.placements == param.placements
                      and value.shape == param.shape and value.stride() == param.stride(),
                      f"param {index} {name}: {type(value).__name__} {getattr(value, 'placements', None)}")
            ctx.close(local(value), local(expected[name]), RTOL, f"param {index} {name}")
        buffer = optimizer.core.state[index]["exp_avg"]
        if buffer.size:
            ctx.check(local(state["exp_avg"]).data_ptr() == buffer.ctypes.data,
                      f"param {index}: state['exp_avg'] is not the core's buffer")


def scenario_nonfinite_skip(ctx):
    """A NaN in rank 1's grads (one of its shards) skips the step on both ranks: params, state and step unchanged."""
    import fastopt.torch as ft

    model = make_model()
    optimizer = ft.AdamW(model.parameters(), lr=0.01, max_grad_norm=1.0)
    train(ctx, model, optimizer, 2)
    before = [local(param).clone() for param in model.parameters()]
    optimizer.zero_grad()
    backward(model, 2, ctx.rank)
    if ctx.rank == 1:
        local(model[0].weight.grad)[0, 0] = float("nan")
    optimizer.step()
    ctx.check(optimizer.core.skipped_steps == 1, f"skipped_steps {optimizer.core.skipped_steps}, expected 1")
    for index, (param, old) in enumerate(zip(model.parameters(), before)):
        ctx.check(torch.equal(local(param), old), f"param {index} changed in a skipped step")
        ctx.check(float(optimizer.state[param]["step"]) == 2, f"param {index}: step advanced in a skipped step")


def scenario_replicate_and_lr_scale(ctx):
    """DTensor params built by hand: a Shard(0) param with lr_scale given at full size and a Replicate() param.
    Against one plain fastopt.torch.AdamW on every rank fed the full grads: the same params (the clip factor of the
    global norm: the replicated grad counts once)."""
    import fastopt.torch as ft
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    generator = torch.Generator().manual_seed(3)
    values = [torch.randn(9, 4, generator=generator), torch.randn(5, generator=generator)]
    scales = [torch.rand(9, 4, generator=generator) * 2, torch.rand(5, generator=generator)]
    params = [torch.nn.Parameter(distribute_tensor(values[0], mesh, [Shard(0)])),
              torch.nn.Parameter(distribute_tensor(values[1], mesh, [Replicate()]))]
    plain = [torch.nn.Parameter(value.clone()) for value in values]
    optimizer = ft.AdamW([{"params": params, "lr_scale": scales}], lr=0.05, max_grad_norm=1.0)
    reference = ft.AdamW([{"params": plain, "lr_scale": scales}], lr=0.05, max_grad_norm=1.0)
    ctx.check(local(optimizer.core.param_groups[0]["lr_scale"][0]).shape == local(params[0]).shape,
              "lr_scale not sliced to the local shard")
    for step in range(3):
        grads = [torch.randn(value.shape, generator=torch.Generator().manual_seed(step * 7 + index)) * 3
                 for index, value in enumerate(values)]
        for param, full, placement in zip(params, grads, (Shard(0), Replicate())):
            param.grad = distribute_tensor(full, mesh, [placement])
        for param, full in zip(plain, grads):
            param.grad = full.clone()
        optimizer.step()
        reference.step()
    ctx.close(optimizer.core.last_grad_norm, reference.core.last_grad_norm, 1e-6, "the global norm")
    for index, (param, expected) in enumerate(zip(params, plain)):
        ctx.close(param.full_tensor(), expected, RTOL, f"param {index}")
        ctx.check(optimizer.state[param]["exp_avg"].placements == param.placements, f"param {index} placements")
    ctx.check(isinstance(params[1], DTensor), "not a DTensor")


def scenario_dcp_resume(ctx):
    """dcp.save of get_optimizer_state_dict on both ranks, dcp.load + set_optimizer_state_dict into a fresh model
    and optimizer: the next steps are bit for bit those of the run that went on. The lr is a fastopt schedule: DCP
    fills in the keys the fresh optimizer's state dict has, so it is built with a schedule of the same kind (the
    checkpoint's numbers and step count replace its own)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    import fastopt as fo
    import fastopt.torch as ft

    directory = os.path.join(ctx.directory, "dcp")
    model = make_model()
    optimizer = ft.AdamW(model.parameters(), lr=fo.schedules.cosine(0.05, t_max=6), weight_decay=0.1,
                         max_grad_norm=MAX_NORM)
    train(ctx, model, optimizer, 3)
    saved = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    ctx.check(type(saved["optim"]["state"]["0.weight"]["exp_avg"]).__name__ == "DTensor",
              "get_optimizer_state_dict: exp_avg is not a DTensor")
    dcp.save(saved, checkpoint_id=directory)
    train(ctx, model, optimizer, 3, first=3)

    fresh = make_model()
    fresh_optimizer = ft.AdamW(fresh.parameters(), lr=fo.schedules.cosine(0.5, t_max=60), weight_decay=0.0,
                               max_grad_norm=MAX_NORM)
    loaded = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, fresh_optimizer)}
    dcp.load(loaded, checkpoint_id=directory)
    set_model_state_dict(fresh, loaded["model"])
    set_optimizer_state_dict(fresh, fresh_optimizer, loaded["optim"])
    ctx.check(fresh_optimizer.current_lr() == [0.025] and fresh_optimizer.core.step_count == 3,  # cosine at 3 of 6
              f"the checkpoint's schedule was not loaded: {fresh_optimizer.param_groups[0]['lr']}")
    train(ctx, fresh, fresh_optimizer, 3, first=3)
    same_params(ctx, "resumed", fresh, model)
    for index, (param, theirs) in enumerate(zip(fresh.parameters(), model.parameters())):
        for name in ("step", "exp_avg", "exp_avg_sq"):
            ctx.check(torch.equal(local(fresh_optimizer.state[param][name]), local(optimizer.state[theirs][name])),
                      f"resumed: param {index} {name} differs")


def scenario_full_state_dict(ctx):
    """get_optimizer_state_dict(full_state_dict=True) loads into one process's fastopt.torch.AdamW and into
    torch.optim.AdamW (over an unsharded copy of the model, keyed by param index): one more step with the full
    grads matches the sharded run's."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    import fastopt.torch as ft

    model = make_model()
    optimizer = ft.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    train(ctx, model, optimizer, 3)
    options = StateDictOptions(full_state_dict=True)
    model_state = {name: value.clone() for name, value in get_model_state_dict(model, options=options).items()}
    full = get_optimizer_state_dict(model, optimizer, options=options)
    names = [name for name, _ in make_model(shard=False).named_parameters()]
    # Copies, as a checkpoint on disk would be: `step` is the live counter, in torch.optim too.
    by_index = {"state": {names.index(name): {key: value.clone() for key, value in entry.items()}
                          for name, entry in full["state"].items()},
                "param_groups": [dict(group, params=[names.index(name) for name in group["params"]])
                                 for group in full["param_groups"]]}
    ctx.check(all(type(value).__name__ == "Tensor" for entry in full["state"].values() for value in entry.values()),
              "the full state dict holds DTensors")
    # One more step, sharded; its full grads (the average over the ranks, as FSDP2 reduces them) for the others.
    optimizer.zero_grad()
    backward(model, 3, ctx.rank, scale=10.0)
    full_grads = [param.grad.full_tensor() for param in model.parameters()]
    optimizer.step()
    for cls in (ft.AdamW, torch.optim.AdamW):
        single = make_model(shard=False)
        single.load_state_dict(model_state)
        single_optimizer = cls(single.parameters(), lr=0.5)
        single_optimizer.load_state_dict(by_index)
        for param, grad in zip(single.parameters(), full_grads):
            param.grad = grad.clone()
        single_optimizer.step()
        for (name, ours), theirs in zip(model.named_parameters(), single.parameters()):
            ctx.close(ours.full_tensor(), theirs, RTOL, f"{cls.__module__}.{cls.__name__}: {name}")


SCENARIOS = {name[len("scenario_"):]: function for name, function in globals().items()
             if name.startswith("scenario_")}


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """Spawn the ranks once; every scenario's records."""
    return run_scenarios(__name__, WORLD, str(tmp_path_factory.mktemp("fsdp2")), list(SCENARIOS))


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fsdp2(records, name):
    errors = records[name]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_grad_reduction_hook(backend):
    """The core's grad_reduction: the clip and the skip follow the totals it returns, not the local statistics."""
    import fastopt as fo

    param, grad = np.ones(13, dtype=np.float32), np.full(13, 0.5, dtype=np.float32)
    local_norm = float(np.linalg.norm(grad.astype(np.float64)))
    optimizer = fo.AdamW([param], lr=0.1, max_grad_norm=1.0, backend=backend)
    optimizer.grad_reduction = lambda sum_of_squares, nonfinite: (4 * sum_of_squares, nonfinite)
    optimizer.step([grad])
    assert optimizer.last_grad_norm == pytest.approx(2 * local_norm)
    optimizer.grad_reduction = lambda sum_of_squares, nonfinite: (sum_of_squares, nonfinite + 1)  # another rank's NaN
    before = param.copy()
    optimizer.step([grad])
    assert optimizer.skipped_steps == 1 and np.array_equal(param, before)
    assert "grad_reduction" not in optimizer.__getstate__()
