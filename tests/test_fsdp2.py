"""fastopt.torch over FSDP2 (``fully_shard``) and DTensor params, on 2 gloo ranks of this machine: parity with
torch.optim.AdamW on the same sharded model (with ``max_grad_norm`` against ``clip_grad_norm_``, shards of odd size
and empty shards), the state as DTensors sharing the core's buffers, the non-finite skip decided on the global grads,
a ``Replicate()`` param counted once in the norm, ``lr_scale`` given at full size, DCP checkpoints (sharded, saved
and loaded into a fresh model and optimizer; gathered to full tensors, loaded into one process's fastopt.torch and
torch.optim optimizers); 8-bit states (parity with one process and with the float32 step of the decoded states,
bit for bit; DCP resume; scales of other shards refused; the float32 export).

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


# ---------------------------------------------------------------- 8-bit states
LR, WEIGHT_DECAY = 0.01, 0.1


def make_model_8bit(shard=True):
    """8-bit AdamW states judged on whole tensors: the first weight (128 x 64, 4096 elements per rank) is cut on a
    block boundary, so each rank's blocks are the whole tensor's; the second (37 x 128 = 4736 elements) is cut into
    19 and 18 rows (2432 and 2304 elements, each below min_8bit_size, yet 8-bit on both ranks), mid-block (2432 =
    9.5 blocks): rank 0's last block and all of rank 1's differ from one process's. The biases stay float32."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 37))
    if shard:
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
    return model


def backward_8bit(model, step, rank):
    generator = torch.Generator().manual_seed(1_000 * step + rank)
    (model(torch.randn(8, 64, generator=generator)).pow(2).sum() * 10.0).backward()


def train_8bit(ctx, model, optimizer, steps, *, first=0):
    for step in range(first, first + steps):
        optimizer.zero_grad()
        backward_8bit(model, step, ctx.rank)
        optimizer.step()


def flat_region(param):
    """(first element, element count) of this rank's shard of a Shard(0) DTensor param in the flat full tensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    row = int(np.prod(param.shape[1:], dtype=np.int64))
    return offset[0] * row, int(np.prod(shape, dtype=np.int64))


def shard_of(full, param):
    """This rank's part of ``full`` (a plain tensor or array shaped like DTensor ``param``), flat."""
    start, count = flat_region(param)
    return torch.as_tensor(full).reshape(-1)[start:start + count]


def coinciding(param):
    """A mask over this rank's shard of ``param``: the elements of its 256-blocks that are blocks of the whole
    tensor too (the block starts on a multiple of 256 of the full tensor, and is as long as the whole tensor's)."""
    from fastopt.quantization import BLOCK

    start, count = flat_region(param)
    mask = torch.zeros(count, dtype=torch.bool)
    for first in range(0, count, BLOCK):
        length = min(BLOCK, count - first)
        whole_length = min(BLOCK, param.numel() - start - first)  # of the whole tensor's block that starts there
        mask[first:first + length] = (start + first) % BLOCK == 0 and length == whole_length
    return mask


def scale_row(state, name, param):
    """This rank's block scales of state ``name``: its row's first block_count(local numel) entries; and whether the
    rest of the row (padding) is zero."""
    from fastopt.quantization import block_count

    row = local(state[name + "_absmax"]).reshape(-1)
    blocks = block_count(local(param).numel())
    return row[:blocks], bool(torch.all(row[blocks:] == 0))


def full_entries(state_dict):
    """A state dict's DTensors gathered (full_tensor, collective) and its other tensors copied."""
    gathered = {key: {name: value.full_tensor() if type(value).__name__ == "DTensor" else
                      value.clone() if torch.is_tensor(value) else value for name, value in entry.items()}
                for key, entry in state_dict["state"].items()}
    return dict(state_dict, state=gathered)


def scenario_8bit_parity(ctx):
    """fastopt.torch.AdamW(state_dtype="8bit") on the FSDP2 model, each step against (a) one process's 8-bit AdamW on
    the unsharded model fed the full grads: bit for bit in params, codes and scales wherever the blocks coincide (and
    everywhere at the first step, whose moments are the same float32 values: there the 8-bit states of the other
    blocks decode within the format's error of each other); (b) a float32 "shadow" AdamW loaded each step with the
    sharded run's float32_state_dict (gathered) and params: the sharded step is its step, bit for bit, with each
    rank's moments quantized in blocks from its shard's first element. The scales are one row per rank (padded with
    zeros), live: the core's buffer is the row's start."""
    from torch.distributed.tensor import Shard

    import fastopt.torch as ft
    from fastopt import quantization

    model, single, shadow = make_model_8bit(), make_model_8bit(shard=False), make_model_8bit(shard=False)
    options = dict(lr=LR, weight_decay=WEIGHT_DECAY)
    optimizer = ft.AdamW(model.parameters(), state_dtype="8bit", **options)
    single_optimizer = ft.AdamW(single.parameters(), state_dtype="8bit", **options)
    shadow_optimizer = ft.AdamW(shadow.parameters(), **options)
    params, singles, shadows = list(model.parameters()), list(single.parameters()), list(shadow.parameters())
    for step in range(STEPS):
        if step:
            shadow_optimizer.load_state_dict(full_entries(optimizer.float32_state_dict()))
        with torch.no_grad():
            for theirs, ours in zip(shadows, params):
                theirs.copy_(ours.full_tensor())
        optimizer.zero_grad()
        backward_8bit(model, step, ctx.rank)
        grads = [param.grad.full_tensor() for param in params]
        optimizer.step()
        for others in (singles, shadows):
            for param, grad in zip(others, grads):
                param.grad = grad.clone()
        single_optimizer.step()
        shadow_optimizer.step()
        for index, (param, one, theirs) in enumerate(zip(params, singles, shadows)):
            where = f"step {step + 1}, param {index}"
            state, one_state, shadow_state = (optimizer.state[param], single_optimizer.state[one],
                                              shadow_optimizer.state[theirs])
            ours = local(param).reshape(-1)
            ctx.check(torch.equal(ours, shard_of(theirs.detach(), param)), f"{where}: param differs from the shadow's")
            if param.numel() < quantization.MIN_8BIT_SIZE:  # stays float32, on every rank
                ctx.check("exp_avg_absmax" not in state and local(state["exp_avg"]).dtype == torch.float32,
                          f"{where}: a small tensor's state is not float32")
                ctx.check(torch.equal(ours, shard_of(one.detach(), param)),
                          f"{where}: param differs from one process's")
                for name in ("exp_avg", "exp_avg_sq"):
                    ctx.check(torch.equal(local(state[name]).reshape(-1), shard_of(one_state[name], param)),
                              f"{where}: {name} differs from one process's")
                continue
            mask = coinciding(param)
            ctx.check(torch.equal(ours[mask], shard_of(one.detach(), param)[mask]) and (step or torch.equal(
                ours, shard_of(one.detach(), param))), f"{where}: param differs from one process's")
            for name in ("exp_avg", "exp_avg_sq"):
                codes, (scales, padded_with_zeros) = local(state[name]), scale_row(state, name, param)
                signed = quantization.STATE_SIGNED[name]
                ctx.check(codes.dtype == torch.uint8 and codes.shape == local(param).shape and padded_with_zeros,
                          f"{where}: {name} codes {codes.dtype} {tuple(codes.shape)}, or nonzero padding")
                rows = state[name + "_absmax"]
                ctx.check(tuple(rows.shape) == (WORLD, quantization.block_count(19 * 128 if index == 2 else 4096))
                          and rows.placements == (Shard(0),), f"{where}: {name}_absmax {tuple(rows.shape)}")
                ctx.check(scales.numel() == 0 or scales.data_ptr()
                          == optimizer.core.state[index][name + "_absmax"].ctypes.data,
                          f"{where}: {name}_absmax's row is not the core's buffer")
                # (b) the shadow's float32 moment, quantized in this rank's blocks.
                expected_codes, expected_scales = quantization.quantize(shard_of(shadow_state[name], param).numpy(),
                                                                        signed)
                ctx.check(np.array_equal(codes.reshape(-1).numpy(), expected_codes)
                          and np.array_equal(scales.numpy(), expected_scales),
                          f"{where}: {name} is not the shadow's float32 step quantized in this shard's blocks")
                # (a) one process's 8-bit state, where the blocks coincide.
                one_codes = shard_of(one_state[name], param)
                start, count = flat_region(param)
                block = quantization.BLOCK
                aligned = [(first + start) // block for first in range(0, count, block) if mask[first]]
                ours_aligned = [first // block for first in range(0, count, block) if mask[first]]
                ctx.check(torch.equal(codes.reshape(-1)[mask], one_codes[mask])
                          and torch.equal(scales[ours_aligned], one_state[name + "_absmax"][aligned]),
                          f"{where}: {name} differs from one process's where the blocks coincide")
                if step == 0:  # the same float32 moments m, quantized in other blocks: each within m/16 of m
                    decoded = quantization.dequantize(codes.reshape(-1).numpy(), scales.numpy(), signed)
                    one_decoded = shard_of(quantization.dequantize(one_state[name].numpy(),
                                                                   one_state[name + "_absmax"].numpy(), signed), param)
                    one_decoded = one_decoded.numpy()
                    largest = np.maximum(np.abs(decoded), np.abs(one_decoded))
                    # Below the smallest code (2^-16 of a block's absmax) a value may decode as 0.
                    floor = 2.0 ** -15 * float(max(scales.max(), one_state[name + "_absmax"].max()))
                    ctx.check(np.all(np.abs(decoded - one_decoded) <= largest * 2 / 15 + floor),
                              f"{where}: {name} is not within the format's error of one process's")
            ctx.check(sorted(state) == sorted(["step", "exp_avg", "exp_avg_absmax", "exp_avg_sq", "exp_avg_sq_absmax",
                                               "absmax_layout"]), f"{where}: state keys {sorted(state)}")
    ctx.check(not coinciding(params[2]).all() and coinciding(params[0]).all(), "the model's cuts are not as meant")


def scenario_8bit_dcp_resume(ctx):
    """8-bit states through DCP (get_optimizer_state_dict with flatten_optimizer_state_dict=True, as torchtitan
    saves, dcp.save / dcp.load, set_optimizer_state_dict) into a fresh model and optimizer: the next steps are bit
    for bit those of the run that went on, params, codes and scale rows."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    import fastopt.torch as ft

    directory = os.path.join(ctx.directory, "dcp_8bit")
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    model = make_model_8bit()
    optimizer = ft.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, state_dtype="8bit",
                         max_grad_norm=MAX_NORM)
    train_8bit(ctx, model, optimizer, 2)
    saved = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer, options=options)}
    ctx.check(type(saved["optim"]["state.0.weight.exp_avg_absmax"]).__name__ == "DTensor"
              and isinstance(saved["optim"]["state.0.weight.absmax_layout"], int),
              "get_optimizer_state_dict: no scale rows or layout")
    dcp.save(saved, checkpoint_id=directory)
    train_8bit(ctx, model, optimizer, 2, first=2)

    fresh = make_model_8bit()
    fresh_optimizer = ft.AdamW(fresh.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, state_dtype="8bit",
                               max_grad_norm=MAX_NORM)
    loaded = {"model": get_model_state_dict(fresh),
              "optim": get_optimizer_state_dict(fresh, fresh_optimizer, options=options)}
    dcp.load(loaded, checkpoint_id=directory)
    set_model_state_dict(fresh, loaded["model"])
    set_optimizer_state_dict(fresh, fresh_optimizer, loaded["optim"], options=options)
    train_8bit(ctx, fresh, fresh_optimizer, 2, first=2)
    same_params(ctx, "resumed", fresh, model)
    for index, (param, theirs) in enumerate(zip(fresh.parameters(), model.parameters())):
        ours, expected = fresh_optimizer.state[param], optimizer.state[theirs]
        ctx.check(ours.keys() == expected.keys(), f"resumed: param {index} keys {sorted(ours)}")
        for name in expected:
            same = ours[name] == expected[name] if name == "absmax_layout" else \
                torch.equal(local(ours[name]), local(expected[name]))
            ctx.check(same, f"resumed: param {index} {name} differs")


def scenario_8bit_refused(ctx):
    """8-bit scale rows that belong to other shards are refused with ValueError, the optimizer left as it was:
    through DCP from a param cut along dim 0 into one cut along dim 1 (same world size and scale shape: only
    absmax_layout tells); directly from a 2-rank mesh into a 1-rank one; a gathered full_state_dict into one process's
    optimizer. The float32 export goes anywhere: gathered, into torch.optim.AdamW over the unsharded model."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    import fastopt.torch as ft
    from fastopt import quantization

    mesh = init_device_mesh("cpu", (WORLD,))
    value = torch.randn(64, 96, generator=torch.Generator().manual_seed(5))  # 3072 elements, 12 blocks per rank

    def stepped(mesh, placement, steps):
        param = torch.nn.Parameter(distribute_tensor(value, mesh, [placement]))
        optimizer = ft.AdamW([param], lr=LR, state_dtype="8bit")
        for step in range(steps):
            grad = torch.randn(value.shape, generator=torch.Generator().manual_seed(step))
            param.grad = distribute_tensor(grad, mesh, [placement])
            optimizer.step()
        return param, optimizer

    def snapshot(param, optimizer):
        return [local(param).clone()] + [local(value).clone() for name, value in optimizer.state[param].items()
                                         if torch.is_tensor(value)]

    def unchanged(param, optimizer, before, what):
        ctx.check(all(torch.equal(old, new) for old, new in zip(before, snapshot(param, optimizer))),
                  f"{what}: the refused load changed params or state")

    rows_param, rows_optimizer = stepped(mesh, Shard(0), 2)
    directory = os.path.join(ctx.directory, "dcp_8bit_rows")
    # Keyed by name, as get_optimizer_state_dict keys it (DCP loads non-tensor values under string keys only).
    dcp.save({"state": {"p": rows_optimizer.state_dict()["state"][0]}}, checkpoint_id=directory)
    columns_param, columns_optimizer = stepped(mesh, Shard(1), 1)
    ctx.check(rows_optimizer.state[rows_param]["exp_avg_absmax"].shape
              == columns_optimizer.state[columns_param]["exp_avg_absmax"].shape == (WORLD, 12), "scale rows' shapes")
    before = snapshot(columns_param, columns_optimizer)
    target = columns_optimizer.state_dict()
    loaded = {"state": {"p": {name: value.clone() if torch.is_tensor(value) else value
                              for name, value in target["state"][0].items()}}}
    dcp.load(loaded, checkpoint_id=directory)  # the codes reshard, the scale rows load: only absmax_layout tells
    target["state"] = {0: loaded["state"]["p"]}
    ctx.raises(ValueError, "absmax_layout", lambda: columns_optimizer.load_state_dict(target),
               "rows loaded into columns")
    unchanged(columns_param, columns_optimizer, before, "rows loaded into columns")

    submesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("ranks", "one"))["one"]
    whole_param, whole_optimizer = stepped(submesh, Shard(0), 1)
    before = snapshot(whole_param, whole_optimizer)
    ctx.raises(ValueError, "other shards", lambda: whole_optimizer.load_state_dict(rows_optimizer.state_dict()),
               "2-rank rows loaded on a 1-rank mesh")
    unchanged(whole_param, whole_optimizer, before, "2-rank rows loaded on a 1-rank mesh")

    # A gathered 8-bit state into one process's optimizer: refused; the float32 export loads into torch.optim.
    model = make_model_8bit()
    optimizer = ft.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, state_dtype="8bit")
    train_8bit(ctx, model, optimizer, 2)
    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True))
    names = [name for name, _ in make_model_8bit(shard=False).named_parameters()]
    by_index = {"state": {names.index(name): entry for name, entry in full["state"].items()},
                "param_groups": [dict(group, params=[names.index(name) for name in group["params"]])
                                 for group in full["param_groups"]]}
    single = make_model_8bit(shard=False)
    single_optimizer = ft.AdamW(single.parameters(), lr=LR, state_dtype="8bit")
    for param in single.parameters():
        param.grad = torch.ones_like(param)
    single_optimizer.step()
    before = snapshot(single[0].weight, single_optimizer)
    ctx.raises(ValueError, "float32_state_dict()", lambda: single_optimizer.load_state_dict(by_index),
               "a gathered 8-bit state into one process")
    unchanged(single[0].weight, single_optimizer, before, "a gathered 8-bit state into one process")

    exported = optimizer.float32_state_dict()
    for index, param in enumerate(model.parameters()):
        entry = exported["state"][index]
        ctx.check(sorted(entry) == ["exp_avg", "exp_avg_sq", "step"], f"export: param {index} keys {sorted(entry)}")
        for name in ("exp_avg", "exp_avg_sq"):
            value, state = entry[name], optimizer.state[param]
            ctx.check(type(value).__name__ == "DTensor" and value.placements == param.placements
                      and local(value).dtype == torch.float32, f"export: param {index} {name}")
            if name + "_absmax" in state:
                scales, _ = scale_row(state, name, param)
                expected = quantization.dequantize(local(state[name]).numpy(), scales.numpy(),
                                                   quantization.STATE_SIGNED[name])
                ctx.check(np.array_equal(local(value).numpy(), expected), f"export: param {index} {name} decoded")
    gathered = full_entries(exported)
    optimizer.zero_grad()
    backward_8bit(model, 2, ctx.rank)
    grads = [param.grad.full_tensor() for param in model.parameters()]
    single = make_model_8bit(shard=False)
    with torch.no_grad():
        for theirs, ours in zip(single.parameters(), model.parameters()):
            theirs.copy_(ours.full_tensor())
    optimizer.step()
    torch_optimizer = torch.optim.AdamW(single.parameters(), lr=0.5)
    torch_optimizer.load_state_dict(gathered)
    for param, grad in zip(single.parameters(), grads):
        param.grad = grad
    torch_optimizer.step()  # the float32 step of the decoded states: the 8-bit step's params, to float rounding
    for (name, ours), theirs in zip(model.named_parameters(), single.parameters()):
        ctx.close(ours.full_tensor(), theirs, RTOL, f"torch.optim from the float32 export: {name}")


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
