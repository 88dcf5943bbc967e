"""8-bit optimizer states (``state_dtype="8bit"``, fastopt.quantization's format) in the fused CPU kernels.

The oracle, per step and bit for bit: an 8-bit step is the float32 step of the decoded states, its new states encoded
(``fastopt.quantization.quantize``, the NumPy arithmetic of the format). The float32 step is the kernel already tested
against torch and the float64 reference, so each 8-bit step is checked against a float32 twin optimizer loaded from the
decoded states. Against the float64 reference engine (which decodes, steps in float64 and encodes) the codes agree
except where float32 and float64 rounding put a value on either side of a midpoint between two codes.
"""
import os

import numpy as np
import pytest

import fastopt as fo
from conftest import KERNELS_8BIT, assert_close, tolerance
from fastopt import quantization
from fastopt.kernels.cpu.layout import CHUNK, SERIAL_BELOW

pytestmark = pytest.mark.xdist_group(KERNELS_8BIT)  # tests/conftest.py

# One configuration per rule, each using every state slot its kernel can have in 8 bits.
RULES_8BIT = [
    (fo.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    (fo.RMSprop, dict(lr=0.01, centered=True, momentum=0.5)),
    (fo.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.1)),
    (fo.AdamW, dict(lr=0.01)),
    (fo.Adagrad, dict(lr=0.05, initial_accumulator_value=0.5)),
    (fo.Lion, dict(lr=0.003, weight_decay=0.1)),
    (fo.LAMB, dict(lr=0.01)),
    (fo.AdamWScheduleFree, dict(lr=0.01, warmup_steps=2)),
]
RULE_IDS = [cls.__name__ for cls, _ in RULES_8BIT]
# Awkward sizes: empty, one element, odd primes below and across a block and a chunk, all stored in 8 bits.
SIZES_8BIT = (0, 1, 257, CHUNK + 2 * 256 + 13)
STEPS = 4


def lr_changing(cls, lr):
    """A rate that changes every step (schedule-free refuses a decay: a warmup ramp is its change)."""
    if issubclass(cls, fo.rules.schedule_free.ScheduleFree):
        return lr
    return fo.schedules.Cosine(lr, 10, eta_min=lr / 10)


def make_params(sizes, rng, dtype=np.float32):
    return [rng.standard_normal(size).astype(np.float32).astype(dtype) for size in sizes]


def make_grads(params, rng, step):
    scale = 10.0 ** (step % 3 - 1)  # moments meet grads of other sizes: blocks' absmax moves both ways
    return [(rng.standard_normal(p.size) * scale).astype(np.float32).astype(p.dtype) for p in params]


def coded_names(optimizer, index):
    return [name for name in optimizer.STATE_SLOTS if optimizer.coded(index, name) is not None
            and name in optimizer.state[index]]


def float32_twin(optimizer, params, cls, kwargs):
    """A float32-state optimizer over copies of ``params`` holding ``optimizer``'s states decoded."""
    copies = [p.copy() for p in params]
    twin = cls(copies, **dict(kwargs, lr=lr_changing(cls, kwargs["lr"])))
    twin.load_state_dict(optimizer.float32_state_dict())
    return twin, copies


@pytest.mark.parametrize("cls, kwargs", RULES_8BIT, ids=RULE_IDS)
def test_step_is_the_float32_step_of_the_decoded_states(cls, kwargs, rng):
    """Every rule, every step, bit for bit: params as the float32 step from the decoded states moves them, codes and
    scales as ``quantization.quantize`` encodes that step's new states (LAMB: see below)."""
    params = make_params(SIZES_8BIT, rng)
    optimizer = cls(params, **dict(kwargs, lr=lr_changing(cls, kwargs["lr"])), state_dtype="8bit", min_8bit_size=0)
    for step in range(STEPS):
        grads = make_grads(params, rng, step)
        twin, copies = float32_twin(optimizer, params, cls, kwargs)
        optimizer.step(grads)
        twin.step(grads)
        for index, param in enumerate(params):
            names = coded_names(optimizer, index)
            assert param.size == 0 or names, f"param {index} has no 8-bit state"
            for name in names:
                codes, scales = quantization.quantize(twin.state[index][name], quantization.STATE_SIGNED[name])
                np.testing.assert_array_equal(optimizer.state[index][name].reshape(-1), codes,
                                              err_msg=f"step {step} param {index} {name} codes")
                np.testing.assert_array_equal(optimizer.state[index][name + "_absmax"], scales,
                                              err_msg=f"step {step} param {index} {name} scales")
            if cls is fo.LAMB:
                # LAMB's direction is formed from its moments as stored, here decoded from the new codes: the
                # reference engine does the same (test_step_matches_the_float64_reference).
                continue
            np.testing.assert_array_equal(param, copies[index], err_msg=f"step {step} param {index}")


def stochastic_codes(optimizer, index, name, values, step_count):
    """``quantization.quantize`` of ``values`` (param ``index``'s state ``name``) with the random bits the kernels
    draw for its codes at optimizer step ``step_count``: ``reference.code_noise`` of the keys of its blocks
    (``Layout.stochastic_code_key``; every param here is float32: its position in the kernel bucket is its index)."""
    from fastopt import reference
    from fastopt.backends.layout import Layout

    slot = optimizer.STATE_SLOTS.index(name)
    keys = Layout.stochastic_code_key(slot, index, np.arange(0, np.size(values), quantization.BLOCK))
    noise = reference.code_noise(optimizer.seed, step_count, keys)[:np.size(values)]
    return quantization.quantize(values, quantization.STATE_SIGNED[name], noise=noise)


# Stochastic codes are the generic loop's (codes.encode_block), not a rule's: the rules that reach every path of it,
# each compiled once more (CI time: an 8-bit kernel is the slowest to compile): RMSprop's three states on both maps
# (the update pass), LAMB's norm pass (its direction from the codes as stored).
RULES_STOCHASTIC = [(cls, kwargs) for cls, kwargs in RULES_8BIT if cls in (fo.RMSprop, fo.LAMB)]
STOCHASTIC_CASES = [(cls, kwargs, "stochastic") for cls, kwargs in RULES_STOCHASTIC] + [
    (fo.RMSprop, dict(RULES_8BIT[1][1]), "second")]


@pytest.mark.parametrize("cls, kwargs, state_rounding", STOCHASTIC_CASES,
                         ids=[f"{cls.__name__}-{rounding}" for cls, _, rounding in STOCHASTIC_CASES])
def test_stochastic_codes_are_the_references_rounding_of_the_float32_step(cls, kwargs, state_rounding, rng):
    """``state_rounding``: the params still the float32 step of the decoded states, bit for bit; the codes of the
    states it names ``quantization.quantize`` of that step's states with the kernels' random bits (the reference's
    arithmetic, keyed by seed, step, state slot and element), the others rounded to nearest; the scales unchanged.
    "second": only the last 8-bit state the configuration uses (AdamW's exp_avg_sq)."""
    params = make_params(SIZES_8BIT, rng)
    used = cls.state_names(dict(cls.DEFAULTS, **kwargs))
    coded = [name for name in cls.STATE_SLOTS if quantization.STATE_SIGNED.get(name) is not None and name in used]
    stochastic = tuple(coded) if state_rounding == "stochastic" else tuple(coded[-1:])
    options = dict(kwargs, lr=lr_changing(cls, kwargs["lr"]), state_dtype="8bit", min_8bit_size=0, seed=11)
    optimizer = cls(params, **options, state_rounding=state_rounding if state_rounding == "stochastic" else stochastic)
    assert optimizer.stochastic_states & set(used) == set(stochastic)
    rounded_up = 0
    for step in range(STEPS):
        grads = make_grads(params, rng, step)
        twin, copies = float32_twin(optimizer, params, cls, kwargs)
        step_count = optimizer.step_count
        optimizer.step(grads)
        twin.step(grads)
        for index, param in enumerate(params):
            for name in coded_names(optimizer, index):
                values = twin.state[index][name]
                if name in stochastic:
                    codes, scales = stochastic_codes(optimizer, index, name, values, step_count)
                    nearest, _ = quantization.quantize(values, quantization.STATE_SIGNED[name])
                    rounded_up += np.count_nonzero(codes != nearest)
                else:
                    codes, scales = quantization.quantize(values, quantization.STATE_SIGNED[name])
                np.testing.assert_array_equal(optimizer.state[index][name].reshape(-1), codes,
                                              err_msg=f"step {step} param {index} {name} codes")
                np.testing.assert_array_equal(optimizer.state[index][name + "_absmax"], scales,
                                              err_msg=f"step {step} param {index} {name} scales")
            if cls is not fo.LAMB:  # LAMB: as in test_step_is_the_float32_step_of_the_decoded_states
                np.testing.assert_array_equal(param, copies[index], err_msg=f"step {step} param {index}")
    assert rounded_up > 100  # the noise moved codes away from the nearest


def test_stochastic_codes_in_the_reference_engine_and_fastopt_torch(rng):
    """The reference engine draws the kernels' random bits: its codes equal the kernel's except where float32 and
    float64 put a value on either side of a threshold (one code apart, rare); fastopt.torch takes the option; a run
    is reproducible for a seed and differs for another."""
    import torch

    import fastopt.torch as ft

    params = make_params((5000, 300), rng)
    options = dict(RULES_8BIT[1][1], state_dtype="8bit", min_8bit_size=0, state_rounding=("square_avg",), seed=5)
    expected = [p.copy() for p in params]
    optimizer, reference = fo.RMSprop(params, **options), fo.RMSprop(expected, **options, backend="reference")
    grads = make_grads(params, rng, 0)
    optimizer.step(grads)
    reference.step(grads)
    for index in range(2):
        gap = np.abs(optimizer.state[index]["square_avg"].astype(int) - reference.state[index]["square_avg"])
        assert gap.max() <= 1 and np.count_nonzero(gap) <= max(2, gap.size // 1000)
    runs = []
    for seed in (5, 5, 6):
        weight = torch.nn.Parameter(torch.from_numpy(make_params((5000,), np.random.default_rng(0))[0]))
        torch_optimizer = ft.RMSprop([weight], **dict(options, seed=seed))
        for step in range(3):
            weight.grad = torch.from_numpy(make_grads([weight.detach().numpy()], np.random.default_rng(step), step)[0])
            torch_optimizer.step()
        runs.append(torch_optimizer.state[weight]["square_avg"].clone())
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_bad_state_rounding_is_refused(rng):
    params = make_params((10,), rng)
    with pytest.raises(ValueError, match="needs state_dtype='8bit'"):
        fo.AdamW(params, state_rounding="stochastic")
    with pytest.raises(ValueError, match="choose one of"):
        fo.AdamW(params, state_dtype="8bit", state_rounding="up")
    with pytest.raises(ValueError, match=r"\['exp_avg_sqq'\], which AdamW does not keep"):
        fo.AdamW(params, state_dtype="8bit", state_rounding=("exp_avg_sqq",))
    with pytest.raises(TypeError, match="state_rounding must be"):
        fo.AdamW(params, state_dtype="8bit", state_rounding=3)


def code_magnitude(codes, signed):
    codes = codes.astype(np.int64)
    return np.where(codes & 0x80, -(codes & 0x7F), codes & 0x7F) if signed else codes


@pytest.mark.parametrize("cls, kwargs", RULES_8BIT, ids=RULE_IDS)
def test_step_matches_the_float64_reference(cls, kwargs, rng):
    """Each step from the same state against the reference engine (decode, float64 step, encode): params within
    float32 rounding, scales within a few ulps, and codes equal except next to a midpoint between two codes, where the
    float32 and float64 results may round to either neighbour (at most one code apart, and rare)."""
    params = make_params(SIZES_8BIT, rng)
    options = dict(kwargs, lr=lr_changing(cls, kwargs["lr"]), state_dtype="8bit", min_8bit_size=0)
    optimizer = cls(params, **options)
    expected = [p.copy() for p in params]
    reference = cls(expected, **options, backend="reference")
    elements, differing = 0, 0
    for step in range(STEPS):
        grads = make_grads(params, rng, step)
        reference.load_state_dict(optimizer.state_dict())
        for target, source in zip(expected, params):
            target[...] = source
        optimizer.step(grads)
        reference.step(grads)
        for index, param in enumerate(params):
            # LAMB's trust ratio is formed from norms over codes that may differ in a few elements.
            assert_close(param, expected[index], tolerance(np.float32, 1) * (4 if cls is fo.LAMB else 1),
                         f"step {step} param {index}")
            for name in coded_names(optimizer, index):
                signed = quantization.STATE_SIGNED[name]
                actual, wanted = optimizer.state[index][name], reference.state[index][name]
                gap = np.abs(code_magnitude(actual, signed) - code_magnitude(wanted, signed))
                assert gap.max(initial=0) <= 1, f"step {step} param {index} {name}: codes {gap.max()} apart"
                elements += actual.size
                differing += np.count_nonzero(gap)
                assert_close(optimizer.state[index][name + "_absmax"], reference.state[index][name + "_absmax"],
                             tolerance(np.float32, 1), f"step {step} param {index} {name} scales")
    assert differing <= max(2, elements // 1000), f"{differing} of {elements} codes differ from the reference"


def test_parallel_kernel_and_bfloat16_params_with_master_weights(rng):
    """The parallel kernel (a step above SERIAL_BELOW elements) and 16-bit params with float32 masters, with a loss
    scale and clipping: still the float32 step of the decoded states, bit for bit."""
    import ml_dtypes

    sizes = (SERIAL_BELOW + 3 * CHUNK + 1001, 4096, 4095)  # the last below min_8bit_size: float32 states, same call
    params = make_params(sizes, rng, ml_dtypes.bfloat16)
    kwargs = dict(lr=0.01, weight_decay=0.1)
    options = dict(master_weights=True, max_grad_norm=1.0)
    optimizer = fo.AdamW(params, **kwargs, state_dtype="8bit", **options)
    assert optimizer.coded(2, "exp_avg") is None and optimizer.coded(1, "exp_avg") is True
    for step in range(3):
        grads = [g * np.float32(1024).astype(g.dtype) for g in make_grads(params, rng, step)]
        copies = [p.copy() for p in params]
        twin = fo.AdamW(copies, **kwargs, **options)
        twin.load_state_dict(optimizer.float32_state_dict())
        optimizer.step(grads, grad_scale=1024.0)
        twin.step(grads, grad_scale=1024.0)
        for index in range(len(params)):
            np.testing.assert_array_equal(params[index], copies[index])
            np.testing.assert_array_equal(optimizer.state[index]["master_param"], twin.state[index]["master_param"])
            for name in coded_names(optimizer, index):
                codes, scales = quantization.quantize(twin.state[index][name], quantization.STATE_SIGNED[name])
                np.testing.assert_array_equal(optimizer.state[index][name].reshape(-1), codes)
                np.testing.assert_array_equal(optimizer.state[index][name + "_absmax"], scales)
        np.testing.assert_array_equal(optimizer.state[2]["exp_avg"], twin.state[2]["exp_avg"])


def test_state_memory_is_about_two_bytes_per_param(rng):
    """Adam's two moments in 8 bits: 2 codes and 2/256 float32 scales per param, counted from ``state``."""
    params = make_params((300_000, 5000), rng)
    optimizer = fo.AdamW(params, state_dtype="8bit")
    optimizer.step([np.ones_like(p) for p in params])
    state_bytes = sum(buffer.nbytes for entry in optimizer.state for buffer in entry.values())
    assert state_bytes / sum(p.size for p in params) <= 2.1
    assert {buffer.dtype for entry in optimizer.state for buffer in entry.values()} == {np.dtype(np.uint8),
                                                                                      np.dtype(np.float32)}


def test_small_tensors_and_non_moments_stay_float32(rng):
    params = make_params((4095, 4096), rng)
    optimizer = fo.AdamWScheduleFree(params, state_dtype="8bit")
    optimizer.step(make_grads(params, rng, 0))
    assert optimizer.state[0]["exp_avg_sq"].dtype == np.float32
    assert optimizer.state[1]["exp_avg_sq"].dtype == np.uint8
    assert optimizer.state[1]["z"].dtype == np.float32  # the base iterate is not a moment
    float64 = fo.Adam([np.zeros(5000)], state_dtype="8bit")
    float64.step([np.ones(5000)])
    assert float64.state[0]["exp_avg"].dtype == np.float64


def test_skipped_step_leaves_codes_and_scales_untouched(rng):
    params = make_params((5000,), rng)
    optimizer = fo.AdamW(params, state_dtype="8bit", guard=fo.Guard())
    optimizer.step(make_grads(params, rng, 0))
    before = {name: buffer.copy() for name, buffer in optimizer.state[0].items()}
    param_before = params[0].copy()
    bad = make_grads(params, rng, 1)
    bad[0][7] = np.nan
    optimizer.step(bad)
    assert optimizer.skipped_steps == 1
    np.testing.assert_array_equal(params[0], param_before)
    for name, buffer in optimizer.state[0].items():
        np.testing.assert_array_equal(buffer, before[name], err_msg=name)


def test_nan_marks_its_block_and_the_params_it_reaches(rng):
    """Without a guard a NaN grad reaches the moments: its block is marked (scale NaN, codes 0) and every element of
    the block decodes to NaN, so the params of that block turn NaN, visibly; other blocks are untouched by it."""
    params = make_params((5000,), rng)
    optimizer = fo.AdamW(params, state_dtype="8bit")
    grads = make_grads(params, rng, 0)
    grads[0][300] = np.nan  # block 1
    optimizer.step(grads)
    scales = optimizer.state[0]["exp_avg_absmax"]
    assert np.isnan(scales[1]) and np.isfinite(np.delete(scales, 1)).all()
    assert not optimizer.state[0]["exp_avg"][256:512].any()
    optimizer.step(make_grads(params, rng, 1))
    assert np.isnan(params[0][256:512]).all() and np.isfinite(np.delete(params[0], np.s_[256:512])).all()


def test_checkpoint_is_compressed_and_resumes_bit_for_bit(rng, tmp_path):
    params = make_params((70_001, 100), rng)
    kwargs = dict(lr=fo.schedules.Cosine(0.01, 20))
    optimizer = fo.AdamW(params, **kwargs, state_dtype="8bit")
    for step in range(3):
        optimizer.step(make_grads(params, rng, step))
    state_dict = optimizer.state_dict()
    assert state_dict["state"][0]["exp_avg"].dtype == np.uint8
    path = fo.save(tmp_path / "adamw.npz", optimizer)
    copies = [p.copy() for p in params]
    resumed = fo.AdamW(copies, **kwargs, state_dtype="8bit")
    fo.load(path, resumed)
    float32_size = sum(8 * p.size for p in params)
    assert os.path.getsize(path) < 0.3 * float32_size
    from_dict = [p.copy() for p in params]
    fo.AdamW(from_dict, **kwargs, state_dtype="8bit").load_state_dict(state_dict)
    for step in range(3, 6):
        grads = make_grads(params, rng, step)
        optimizer.step(grads)
        resumed.step(grads)
        np.testing.assert_array_equal(copies[0], params[0])
        for name, buffer in optimizer.state[0].items():
            np.testing.assert_array_equal(resumed.state[0][name], buffer, err_msg=name)


def test_float32_checkpoints_convert_both_ways(rng):
    """A float32 state dict (from a float32 optimizer, as torch's) loads into an 8-bit optimizer encoded, and
    ``float32_state_dict`` decodes an 8-bit one into a float32 optimizer; 8-bit states load into float32 storage
    decoded."""
    params = make_params((5000,), rng)
    source = fo.AdamW([p.copy() for p in params])
    for step in range(2):
        source.step(make_grads(params, rng, step))
    eight = fo.AdamW([p.copy() for p in params], state_dtype="8bit")
    eight.load_state_dict(source.state_dict())
    for name in ("exp_avg", "exp_avg_sq"):
        codes, scales = quantization.quantize(source.state[0][name], quantization.STATE_SIGNED[name])
        np.testing.assert_array_equal(eight.state[0][name], codes)
        np.testing.assert_array_equal(eight.state[0][name + "_absmax"], scales)
    exported = eight.float32_state_dict()
    assert set(exported["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    from_export = fo.AdamW([p.copy() for p in params])
    from_export.load_state_dict(exported)
    plain = fo.AdamW([p.copy() for p in params])
    plain.load_state_dict(eight.state_dict())  # 8-bit states into float32 storage: decoded
    for name in ("exp_avg", "exp_avg_sq"):
        decoded = quantization.dequantize(eight.state[0][name], eight.state[0][name + "_absmax"],
                                          quantization.STATE_SIGNED[name])
        np.testing.assert_array_equal(plain.state[0][name], decoded)
        np.testing.assert_array_equal(exported["state"][0][name], decoded)
        np.testing.assert_array_equal(from_export.state[0][name], decoded)


def test_bad_8bit_input_is_refused_before_anything_is_written(rng):
    with pytest.raises(ValueError, match="'float32', 'bfloat16', '8bit'"):
        fo.AdamW(make_params((10,), rng), state_dtype="int8")
    with pytest.raises(ValueError, match="min_8bit_size"):
        fo.AdamW(make_params((10,), rng), state_dtype="8bit", min_8bit_size=-1)
    params = make_params((5000,), rng)
    optimizer = fo.AdamW(params, state_dtype="8bit")
    optimizer.step(make_grads(params, rng, 0))
    good = optimizer.state_dict()
    before = {name: buffer.copy() for name, buffer in optimizer.state[0].items()}

    def tampered(**changes):
        state_dict = optimizer.state_dict()
        state_dict["state"][0].update(changes)
        return state_dict

    with pytest.raises(ValueError, match="need 20 scales"):
        optimizer.load_state_dict(tampered(exp_avg_absmax=np.ones(19, np.float32)))
    with pytest.raises(TypeError, match="must be uint8"):
        optimizer.load_state_dict(tampered(exp_avg=good["state"][0]["exp_avg"].astype(np.int16)))
    with pytest.raises(TypeError, match="must be float32"):
        optimizer.load_state_dict(tampered(exp_avg_absmax=np.ones(20, np.float64)))
    state_dict = optimizer.state_dict()
    del state_dict["state"][0]["exp_avg"]
    with pytest.raises(ValueError, match="scales without their codes"):
        optimizer.load_state_dict(state_dict)
    with pytest.raises(TypeError, match="stored as uint8"):
        optimizer.state[0]["exp_avg"] = np.zeros(5000, np.float32)
    with pytest.raises(ValueError, match="shape"):
        optimizer.state[0]["exp_avg_absmax"] = np.zeros(19, np.float32)
    for name, buffer in optimizer.state[0].items():
        np.testing.assert_array_equal(buffer, before[name], err_msg=name)
    optimizer.state[0]["exp_avg_absmax"] = np.zeros(20, np.float32)  # a fitting buffer is taken: zero blocks
    optimizer.step(make_grads(params, rng, 1))


def test_pickled_copy_steps_its_own_buffers(rng):
    import copy
    import pickle

    params = make_params((5000,), rng)
    optimizer = fo.AdamW(params, state_dtype="8bit")
    optimizer.step(make_grads(params, rng, 0))
    for clone in (copy.deepcopy(optimizer), pickle.loads(pickle.dumps(optimizer))):
        before = {name: buffer.copy() for name, buffer in optimizer.state[0].items()}
        grads = make_grads(params, rng, 1)
        clone.step(grads)
        for name, buffer in optimizer.state[0].items():
            np.testing.assert_array_equal(buffer, before[name], err_msg=name)
        assert not np.array_equal(clone.state[0]["exp_avg_absmax"], before["exp_avg_absmax"])


# ---------------------------------------------------------------- fastopt.torch
def test_torch_drop_in_checkpoints_both_ways(rng, tmp_path):
    """fastopt.torch.AdamW with 8-bit states: the core's steps, its state in ``state[p]``; a torch.save/torch.load
    (weights_only) round trip resumes bit for bit; ``float32_state_dict`` loads into torch.optim.AdamW with the decoded
    values, and torch.optim.AdamW's checkpoint loads into the 8-bit optimizer encoded."""
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft

    weights = [torch.from_numpy(rng.standard_normal(size).astype(np.float32)) for size in (5000, 300)]
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    optimizer = ft.AdamW(params, lr=0.01, state_dtype="8bit")
    core_params = [w.numpy().copy() for w in weights]
    core = fo.AdamW(core_params, lr=0.01, state_dtype="8bit")
    for step in range(3):
        grads = make_grads(core_params, rng, step)
        for param, grad in zip(params, grads):
            param.grad = torch.from_numpy(grad.copy())
        optimizer.step()
        core.step(grads)
    np.testing.assert_array_equal(params[0].detach().numpy(), core_params[0])
    assert optimizer.state[params[0]]["exp_avg"].dtype == torch.uint8
    np.testing.assert_array_equal(optimizer.state[params[0]]["exp_avg_absmax"].numpy(),
                                  core.state[0]["exp_avg_absmax"])
    assert optimizer.state[params[1]]["exp_avg"].dtype == torch.float32  # below min_8bit_size

    path = tmp_path / "adamw8.pt"
    torch.save(optimizer.state_dict(), path)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = ft.AdamW(resumed_params, lr=0.01, state_dtype="8bit")
    resumed.load_state_dict(torch.load(path, weights_only=True))
    grads = make_grads(core_params, rng, 3)
    for model in ((params, optimizer), (resumed_params, resumed)):
        for param, grad in zip(model[0], grads):
            param.grad = torch.from_numpy(grad.copy())
        model[1].step()
    np.testing.assert_array_equal(resumed_params[0].detach().numpy(), params[0].detach().numpy())
    for name, value in optimizer.state[params[0]].items():
        np.testing.assert_array_equal(resumed.state[resumed_params[0]][name].numpy(), value.numpy(), err_msg=name)

    exported = optimizer.float32_state_dict()
    plain_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    plain = torch.optim.AdamW(plain_params, lr=0.01)
    plain.load_state_dict(exported)
    decoded = quantization.dequantize(optimizer.state[params[0]]["exp_avg"].numpy().reshape(-1),
                                      optimizer.state[params[0]]["exp_avg_absmax"].numpy(), True)
    np.testing.assert_array_equal(plain.state[plain_params[0]]["exp_avg"].numpy(), decoded)
    for param, grad in zip(plain_params, grads):
        param.grad = torch.from_numpy(grad.copy())
    plain.step()  # torch.optim takes the exported state and steps on

    encoded_params = [torch.nn.Parameter(p.detach().clone()) for p in plain_params]
    encoded = ft.AdamW(encoded_params, lr=0.01, state_dtype="8bit")
    encoded.load_state_dict(plain.state_dict())
    codes, scales = quantization.quantize(plain.state[plain_params[0]]["exp_avg_sq"].numpy(), False)
    np.testing.assert_array_equal(encoded.state[encoded_params[0]]["exp_avg_sq"].numpy(), codes)
    np.testing.assert_array_equal(encoded.state[encoded_params[0]]["exp_avg_sq_absmax"].numpy(), scales)


# ---------------------------------------------------------------- the kernels' codes against the format's NumPy arithmetic
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_kernel_codes_are_the_formats_bytes(signed, rng):
    """kernels/cpu/codes.py's encode_block and decode against fastopt.quantization on every map value, midpoint and
    their neighbours (ties), random magnitudes over the whole range, negatives (the unsigned map encodes them as 0),
    -0.0, subnormals, a subnormal absmax (zero block), NaN and infinity (marked blocks), and a short last block."""
    from fastopt.kernels.cpu import codes as kernel_codes
    from fastopt.kernels.cpu.jit import jit

    @jit
    def encode_blocks(values, codes, scales):
        for block in range(scales.shape[0]):
            start = block * 256
            end = min(start + 256, values.shape[0])
            scales[block] = kernel_codes.encode_block(values[start:end], codes[start:end])

    @jit
    def decode_all(codes, scales, out):
        for i in range(codes.shape[0]):
            out[i] = kernel_codes.decode(codes[i], scales[i // 256], kernel_codes.is_signed(codes))

    code_map = quantization.code_map_of(signed)
    values = np.unique(code_map.astype(np.float64))
    midpoints = ((values[:-1] + values[1:]) / 2).astype(np.float32)
    points = np.concatenate([code_map, midpoints])
    ladder = np.concatenate([points, np.nextafter(points, np.float32(-2)), np.nextafter(points, np.float32(2))])
    magnitudes = np.exp2(rng.uniform(-40, 0, 4096)).astype(np.float32)
    blocks = [ladder, magnitudes, -magnitudes, rng.standard_normal(1000).astype(np.float32) * 3,
              np.array([1e-45, -1e-45, 1e-39, 0.0, -0.0] * 40, np.float32),  # subnormal absmax: a zero block
              np.full(256, -0.0, np.float32)]
    values = np.concatenate([np.resize(block, 256 * -(-block.size // 256)) for block in blocks] +
                            [np.array([1.0, np.nan, 2.0], np.float32), np.full(256, np.inf, np.float32),
                             rng.standard_normal(77).astype(np.float32)])  # short last block
    values = values.astype(np.float32)
    codes = np.zeros(values.size, np.int8 if signed else np.uint8)
    scales = np.zeros(quantization.block_count(values.size), np.float32)
    encode_blocks(values, codes, scales)
    expected_codes, expected_scales = quantization.quantize(values, signed)
    np.testing.assert_array_equal(codes.view(np.uint8), expected_codes)
    np.testing.assert_array_equal(scales.view(np.uint32), expected_scales.view(np.uint32))  # NaN scales too
    every_code = np.tile(np.arange(256, dtype=np.uint8), 3).view(codes.dtype)
    some_scales = np.array([1.0, 3.0e-20, 7.5], np.float32)
    decoded = np.zeros(every_code.size, np.float32)
    decode_all(every_code, some_scales, decoded)
    np.testing.assert_array_equal(decoded.view(np.uint32),
                                  quantization.dequantize(every_code.view(np.uint8), some_scales, signed).view(np.uint32))
