"""Mixed precision on the CPU kernels: 16-bit params, grads and states, float32 master weights, stochastic rounding,
and the fused gradient handling (loss-scale unscaling, global-norm clipping, skipping non-finite steps).

The oracle is the reference backend (float64 math, each result rounded to float32 and then to its storage dtype,
stochastic rounding keyed as the kernels key it, computed by an independent NumPy hash). Kernel and oracle
round the same stored inputs, so they agree to the storage dtype's rounding: the tolerance is a small multiple
of its epsilon per step, and nearly every 16-bit value must be bit-identical (an element differs only where
the float32 and the float64 result fall on two sides of a rounding boundary).
"""
import numpy as np
import pytest

import fastopt as fo
from configs import anchor_optimizer, lr_schedule
from conftest import MIXED_PRECISION_KERNELS, assert_close, sign_flips
from fastopt import dtypes
from fastopt.backends.processes import ParallelKernel
from fastopt.kernels.cpu import fused, layout as tables

pytestmark = pytest.mark.xdist_group(MIXED_PRECISION_KERNELS)  # tests/conftest.py

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)

STEPS = 5
# Awkward sizes: empty, one, an odd prime, a strip and a bit, more than two chunks.
SIZES = (0, 1, 13, fused.STRIP + 3, 2 * tables.CHUNK + 7)

# (id, param dtype, grad dtype, options)
STORAGE = [
    ("bf16", BF16, BF16, {}),
    ("bf16-master", BF16, BF16, dict(master_weights=True)),
    ("bf16-master-f32grads", BF16, F32, dict(master_weights=True)),
    ("bf16-bf16states", BF16, BF16, dict(state_dtype="bfloat16")),
    ("bf16-stochastic", BF16, BF16, dict(rounding="stochastic", seed=7)),
    ("f16-master", F16, F16, dict(master_weights=True)),
    ("f16-f32grads", F16, F32, {}),
    ("f32-bf16states", F32, F32, dict(state_dtype="bfloat16")),
    ("f64-f32grads", F64, F32, {}),
]
OPTIMIZERS = [
    (fo.SGD, dict(momentum=0.9, nesterov=True, weight_decay=0.01)),
    (fo.RMSprop, dict(centered=True, momentum=0.5, weight_decay=0.1)),
    (fo.Adam, dict(amsgrad=True, weight_decay=0.01)),
    (fo.AdamW, {}),
    (fo.Adagrad, dict(lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1)),
    (fo.Lion, dict(weight_decay=0.1)),
    (fo.AdamWScheduleFree, dict(warmup_steps=2, weight_decay=0.01)),
    (fo.SGDScheduleFree, dict(momentum=0.8, weight_decay=0.01)),
    (fo.LAMB, dict(weight_decay=0.01)),
]


def storage_id(entry):
    return entry[0]


def optimizer_id(entry):
    cls, kwargs = entry
    return f"{cls.__name__}-{'-'.join(f'{k}={v}' for k, v in kwargs.items()) or 'default'}"


def make_problem(param_dtype, grad_dtype, rng):
    """Two groups: a schedule over tensors of every awkward size, and a float lr the loop changes with a per-element
    lr_scale (in the params' math dtype)."""
    math = dtypes.math_dtype(dtypes.storage_name(param_dtype))
    params0 = [rng.standard_normal(size).astype(param_dtype) for size in SIZES]
    # Over a chunk, and the whole problem below SERIAL_BELOW: the one-thread kernels, which tests/test_cuda.py's
    # stand-in compares with too (one compile for both files); the parallel ones are checked against them below.
    params1 = [rng.standard_normal((3, 5)).astype(param_dtype), rng.standard_normal(tables.CHUNK + 5).astype(param_dtype)]
    assert sum(p.size for p in params0 + params1) < tables.SERIAL_BELOW
    scales1 = [rng.uniform(0.0, 2.0, p.shape).astype(math) for p in params1]
    grads = [[rng.standard_normal(p.shape).astype(grad_dtype) for p in params0 + params1] for _ in range(STEPS)]
    return params0, params1, scales1, grads


LARGEST_STEP = 0.06  # the largest lr * lr_scale of ``run``: its second group's lr 0.03, lr_scale up to 2


def run(cls, kwargs, options, problem, backend, *, grad_scale=None, steps=STEPS):
    params0, params1, scales1, grads = problem
    params0, params1 = [p.copy() for p in params0], [p.copy() for p in params1]
    schedule = lr_schedule(cls, fo.schedules.warmup(fo.schedules.cosine(0.05, t_max=STEPS, eta_min=0.005),
                                                   warmup_steps=2))
    optimizer = cls([{"params": params0, "lr": schedule},
                     {"params": params1, "lr": 0.03, "lr_scale": [s.copy() for s in scales1]}],
                    backend=backend, **kwargs, **options)
    for t in range(steps):
        optimizer.param_groups[1]["lr"] = 0.03 / (1 + t)
        scaled = [g if grad_scale is None else (g.astype(np.float64) * grad_scale).astype(g.dtype) for g in grads[t]]
        optimizer.step(scaled, grad_scale=grad_scale)
    return optimizer


def storage_rtol(optimizer, steps=STEPS):
    """4 eps per step of the coarsest storage the update reads back: the states', and the param's unless a master
    copy stands in for it (a param rounded one way or the other feeds the next step's weight decay, and so the
    states; a master copy keeps the param's rounding out of the update)."""
    index = len(optimizer.params) - 1
    names = [optimizer.state_storage(index)]
    if not optimizer.has_master(index):
        names.append(optimizer.param_storage(index))
    return 4 * max(dtypes.epsilon(name) for name in names) * steps


def param_rtol(optimizer, rtol):
    """A param is its update rounded once more to its storage (one ulp where kernel and oracle straddle a
    rounding boundary)."""
    return rtol + dtypes.epsilon(optimizer.param_storage(len(optimizer.params) - 1))


def assert_storage_close(actual, expected, rtol, what, flips=None):
    """Kernel against oracle for one buffer: within ``rtol`` (``flips``: conftest.sign_flips), and for 16-bit storage
    bit-identical in at least 99% of the elements."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert_close(actual.astype(np.float64), expected.astype(np.float64), rtol, what, flips=flips)
    if actual.dtype.itemsize == 2 and actual.size >= 100:
        same = np.mean(actual.view(np.uint16) == expected.view(np.uint16))
        assert same >= 0.99, f"{what}: only {same:.3%} of the elements are bit-identical to the oracle's"


@pytest.mark.parametrize("storage", STORAGE, ids=storage_id)
@pytest.mark.parametrize("config", OPTIMIZERS, ids=optimizer_id)
def test_kernel_matches_reference(config, storage, rng):
    cls, kwargs = config
    _, param_dtype, grad_dtype, options = storage
    problem = make_problem(param_dtype, grad_dtype, rng)
    ours = run(cls, kwargs, options, problem, "cpu")
    oracle = run(cls, kwargs, options, problem, "reference")
    assert ours.step_count == oracle.step_count == STEPS
    rtol = storage_rtol(ours)
    for index, (param, expected) in enumerate(zip(ours.params, oracle.params)):
        assert param.dtype == param_dtype
        assert_storage_close(param, expected, param_rtol(ours, rtol), f"param {index}",
                             sign_flips(cls, param.size, LARGEST_STEP))
        assert set(ours.state[index]) == set(oracle.state[index])
        for name, buffer in ours.state[index].items():  # a master copy is the param: it may flip as the param
            assert_storage_close(buffer, oracle.state[index][name], rtol, f"param {index} {name}",
                                 sign_flips(cls, buffer.size, LARGEST_STEP) if name == "master_param" else None)
        master = ours.state[index].get("master_param")
        if master is not None:
            assert master.dtype == F32
            assert np.array_equal(param.view(np.uint16), master.astype(param_dtype).view(np.uint16)), \
                f"param {index} is not round(master)"


@pytest.mark.parametrize("storage", [STORAGE[2], STORAGE[4]], ids=storage_id)
def test_parallel_kernels_equal_the_one_thread_kernels(storage, rng, monkeypatch):
    """The parallel twin of a mixed-precision kernel (master copies, float32 grads of bfloat16 params; stochastic
    rounding, keyed by element) stores the bits of the one-thread kernel that test_kernel_matches_reference checks."""
    _, param_dtype, grad_dtype, options = storage
    problem = make_problem(param_dtype, grad_dtype, rng)
    one_thread = run(fo.Adam, dict(amsgrad=True, weight_decay=0.01), options, problem, "cpu")
    monkeypatch.setattr(tables, "SERIAL_BELOW", 0)
    parallel = run(fo.Adam, dict(amsgrad=True, weight_decay=0.01), options, problem, "cpu")
    assert not any(isinstance(bucket.kernel, ParallelKernel) for bucket in one_thread._backend.buckets)
    assert all(isinstance(bucket.kernel, ParallelKernel) for bucket in parallel._backend.buckets)
    for index, (ours, theirs) in enumerate(zip(parallel.params, one_thread.params)):
        np.testing.assert_array_equal(ours.view(np.uint16), theirs.view(np.uint16), f"param {index}")
        for name, buffer in one_thread.state[index].items():
            np.testing.assert_array_equal(parallel.state[index][name], buffer, f"param {index} {name}")


@pytest.mark.parametrize("storage", STORAGE, ids=storage_id)
def test_state_buffers_have_the_storage_dtypes(storage, rng):
    _, param_dtype, grad_dtype, options = storage
    params = [rng.standard_normal(7).astype(param_dtype)]
    optimizer = fo.Adam(params, **options)
    optimizer.step([rng.standard_normal(7).astype(grad_dtype)])
    state = optimizer.state[0]
    math = dtypes.math_dtype(dtypes.storage_name(param_dtype))
    expected = BF16 if options.get("state_dtype") == "bfloat16" and math == F32 else math
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == expected
    assert ("master_param" in state) == (options.get("master_weights", False) and param_dtype.itemsize == 2)


def test_master_weights_do_not_apply_to_float32_params(rng):
    """A model mixing float32 (norms) and bfloat16 (matmul weights) params: only the 16-bit ones get a master."""
    params = [rng.standard_normal(5).astype(F32), rng.standard_normal(5).astype(BF16)]
    optimizer = fo.AdamW(params, master_weights=True)
    optimizer.step([rng.standard_normal(5).astype(F32), rng.standard_normal(5).astype(BF16)])
    assert "master_param" not in optimizer.state[0] and "master_param" in optimizer.state[1]


def test_master_weights_accumulate_updates_below_half_an_ulp():
    """An update of a tenth of a bfloat16 ulp: rounding to nearest never moves the param; a master copy adds
    the updates up, and the param follows it."""
    ulp = 2.0 ** -7  # of bfloat16 values in [1, 2)
    lr = 0.1 * ulp
    plain, mastered = (np.ones(64, dtype=BF16) for _ in range(2))
    nearest = fo.SGD([plain], lr=lr)
    master = fo.SGD([mastered], lr=lr, master_weights=True)
    for _ in range(30):
        nearest.step([np.full(64, -1.0, dtype=BF16)])  # ascend
        master.step([np.full(64, -1.0, dtype=BF16)])
    assert np.all(plain.astype(np.float64) == 1.0)
    np.testing.assert_allclose(master.state[0]["master_param"], 1 + 30 * lr, rtol=30 * np.finfo(F32).eps)
    assert np.all(mastered.astype(np.float64) == (1 + 30 * lr))  # 1 + 3 ulp: exact in bfloat16


def test_stochastic_rounding_is_unbiased_over_an_optimisation():
    """SGD steps of a fifth of an ulp, stochastically rounded: every param moves, and their mean follows the exact
    trajectory within five standard errors (each rounding adds variance of at most ulp^2 / 4)."""
    ulp, size, steps = 2.0 ** -7, 4096, 50
    lr = 0.2 * ulp
    params = np.ones(size, dtype=BF16)
    optimizer = fo.SGD([params], lr=lr, rounding="stochastic", seed=3)
    for _ in range(steps):
        optimizer.step([np.full(size, -1.0, dtype=BF16)])
    values = params.astype(np.float64)
    exact = 1 + steps * lr
    standard_error = np.sqrt(steps) * ulp / 2 / np.sqrt(size)
    assert abs(values.mean() - exact) < 5 * standard_error
    assert np.all(values > 1.0)


def test_stochastic_rounding_is_reproducible_and_keyed_by_the_seed(rng):
    start = rng.standard_normal(5000).astype(BF16)
    grads = [rng.standard_normal(5000).astype(BF16) for _ in range(3)]

    def final(seed):
        params = start.copy()
        optimizer = fo.Adam([params], lr=1e-3, rounding="stochastic", seed=seed)
        for grad in grads:
            optimizer.step([grad])
        return params.view(np.uint16)

    assert np.array_equal(final(11), final(11))
    assert not np.array_equal(final(11), final(12))


# ---------------------------------------------------------------- gradient handling
# As OPTIMIZERS, but RMSprop without weight decay: clipped grads are small next to wd p, d = g + wd p cancels
# where they are alike, and RMSprop's d / sqrt(v) then magnifies float32 rounding beyond any fixed multiple of eps
# (in torch's float32 RMSprop as in fastopt's; measured here: 2e-5 against a bound of 1e-5 at wd=0.1).
GRAD_HANDLING_OPTIMIZERS = [OPTIMIZERS[0], (fo.RMSprop, dict(centered=True, momentum=0.5)), *OPTIMIZERS[2:]]


@pytest.mark.parametrize("storage", [STORAGE[0], STORAGE[1], STORAGE[3], STORAGE[7]], ids=storage_id)
@pytest.mark.parametrize("config", GRAD_HANDLING_OPTIMIZERS, ids=optimizer_id)
def test_unscale_and_clip_match_reference(config, storage, rng):
    """grad_scale and max_grad_norm inside the kernel against the oracle, which unscales and clips in float64
    (with the factors rounded to the math dtype, as the kernels and torch round them)."""
    cls, kwargs = config
    _, param_dtype, grad_dtype, options = storage
    problem = make_problem(param_dtype, grad_dtype, rng)
    options = dict(options, max_grad_norm=200.0)  # half the grads' norm (about 400): every step clips
    ours = run(cls, kwargs, options, problem, "cpu", grad_scale=256.0)
    oracle = run(cls, kwargs, options, problem, "reference", grad_scale=256.0)
    assert ours.last_grad_norm == pytest.approx(oracle.last_grad_norm, rel=1e-12)
    rtol = storage_rtol(ours)
    for index, (param, expected) in enumerate(zip(ours.params, oracle.params)):
        assert_storage_close(param, expected, param_rtol(ours, rtol), f"param {index}",
                             sign_flips(cls, param.size, LARGEST_STEP))
        for name, buffer in ours.state[index].items():  # a master copy is the param: it may flip as the param
            assert_storage_close(buffer, oracle.state[index][name], rtol, f"param {index} {name}",
                                 sign_flips(cls, buffer.size, LARGEST_STEP) if name == "master_param" else None)


def test_last_grad_norm_is_the_unscaled_global_norm(rng):
    grads = [rng.standard_normal(n).astype(F32) for n in (0, 3, 1000)]
    params = [np.zeros(g.shape, F32) for g in grads]
    optimizer = fo.Adam(params, max_grad_norm=1e9)
    optimizer.step([g * 8 for g in grads], grad_scale=8.0)
    expected = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    assert optimizer.last_grad_norm == pytest.approx(expected, rel=4 * float(np.finfo(F32).eps))


@pytest.mark.parametrize("storage", STORAGE, ids=storage_id)
def test_nonfinite_grads_skip_the_step(storage, rng):
    """A NaN or inf anywhere skips the whole step: params, states (the master copy too) and step counts stay as
    they were, the skip is counted, and the next step continues as if the bad one had never come."""
    _, param_dtype, grad_dtype, options = storage
    start = [rng.standard_normal(n).astype(param_dtype) for n in (5, 2000)]
    grads = [[rng.standard_normal(p.shape).astype(grad_dtype) for p in start] for _ in range(2)]
    bad = [g.copy() for g in grads[0]]
    bad[1][1234] = np.inf
    clean_params, skipped_params = [p.copy() for p in start], [p.copy() for p in start]
    clean = fo.AdamW(clean_params, max_grad_norm=100.0, **options)
    skipping = fo.AdamW(skipped_params, max_grad_norm=100.0, **options)
    clean.step(grads[0], grad_scale=2.0)
    skipping.step(grads[0], grad_scale=2.0)
    before = [{name: buffer.copy() for name, buffer in state.items()} for state in skipping.state]
    params_before = [p.copy() for p in skipped_params]
    skipping.step(bad, grad_scale=2.0)
    assert skipping.skipped_steps == 1 and skipping.step_count == 1
    assert not np.isfinite(skipping.last_grad_norm)
    for param, previous in zip(skipped_params, params_before):
        assert np.array_equal(param.view(np.uint8), previous.view(np.uint8))
    for state, previous in zip(skipping.state, before):
        for name, buffer in state.items():
            assert np.array_equal(buffer.view(np.uint8), previous[name].view(np.uint8)), name
    clean.step(grads[1], grad_scale=2.0)
    skipping.step(grads[1], grad_scale=2.0)
    for ours, theirs in zip(skipped_params, clean_params):
        assert np.array_equal(ours.view(np.uint8), theirs.view(np.uint8))
    assert skipping.state_dict()["state"][1]["step"] == 2


def test_nan_without_gradient_handling_propagates_as_in_torch(rng):
    """Without grad_scale, max_grad_norm or a guard no check runs (it costs a read of the grads): NaN grads give
    NaN params, as torch's optimizers do."""
    params = [np.ones(4, F32)]
    optimizer = fo.SGD(params, lr=0.1)
    optimizer.step([np.array([1, np.nan, 1, 1], F32)])
    assert np.isnan(params[0][1]) and optimizer.skipped_steps == 0


# ---------------------------------------------------------------- torch semantics
torch = pytest.importorskip("torch")


@pytest.mark.parametrize("config", OPTIMIZERS, ids=optimizer_id)
def test_grad_scaler_and_clip_grad_norm_match_torch(config, rng):
    """fastopt with grad_scale= and max_grad_norm= against torch.amp.GradScaler + clip_grad_norm_ + torch.optim on
    the same scaled grads, including a step with an inf grad that both skip (torch's scaler then halves the
    scale, and the next steps pass the new scale)."""
    cls, kwargs = config
    shapes = [(7, 3), (1,), (500,)]
    start = [rng.standard_normal(shape).astype(F32) for shape in shapes]
    steps = 5
    grads = [[rng.standard_normal(shape).astype(F32) for shape in shapes] for _ in range(steps)]
    grads[2][2][17] = np.inf
    max_norm = 2.0

    ours = [p.copy() for p in start]
    optimizer = cls(ours, lr=0.01, max_grad_norm=max_norm, **kwargs)
    theirs = [torch.tensor(p, requires_grad=True) for p in start]
    reference, _ = anchor_optimizer(cls, theirs, dict(kwargs, lr=0.01))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1000)
    scaler.scale(torch.ones(()))  # creates the scale
    for t in range(steps):
        scale = scaler.get_scale()
        scaled = [g * np.float32(scale) for g in grads[t]]
        optimizer.step(scaled, grad_scale=scale)
        for param, grad in zip(theirs, scaled):
            param.grad = torch.tensor(grad)
        scaler.unscale_(reference)
        norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
        scaler.step(reference)
        scaler.update()
        if t != 2:
            assert optimizer.last_grad_norm == pytest.approx(float(norm), rel=1e-5)
    assert optimizer.skipped_steps == 1 and scaler.get_scale() == 2.0 ** 9
    rtol = 4 * np.finfo(F32).eps * steps
    for index, (param, expected) in enumerate(zip(ours, theirs)):
        assert_close(param, expected.detach().numpy(), rtol, f"param {index}")


# ---------------------------------------------------------------- state dicts
@pytest.mark.parametrize("storage", STORAGE, ids=storage_id)
def test_state_dict_round_trip_continues_bit_exactly(storage, rng, tmp_path):
    _, param_dtype, grad_dtype, options = storage
    start = [rng.standard_normal(n).astype(param_dtype) for n in (3, 1500)]
    grads = [[rng.standard_normal(p.shape).astype(grad_dtype) for p in start] for _ in range(4)]
    straight = [p.copy() for p in start]
    first = fo.AdamW(straight, **options)
    for grad in grads:
        first.step(grad)

    resumed = [p.copy() for p in start]
    second = fo.AdamW(resumed, **options)
    for grad in grads[:2]:
        second.step(grad)
    saved = second.state_dict()
    fo.save(tmp_path / "state.npz", second)
    for loader in ("state_dict", "file"):
        params = [p.copy() for p in resumed]
        third = fo.AdamW(params, **options)
        if loader == "state_dict":
            third.load_state_dict(saved)
        else:
            fo.load(tmp_path / "state.npz", third)
        for name, buffer in third.state[1].items():
            assert buffer.dtype == second.state[1][name].dtype, name
        for grad in grads[2:]:
            third.step(grad)
        for ours, expected in zip(params, straight):
            assert np.array_equal(ours.view(np.uint8), expected.view(np.uint8)), loader


# ---------------------------------------------------------------- bad input
def bad_input_cases(rng):
    bf = rng.standard_normal(4).astype(BF16)
    return [
        (lambda: fo.Adam([np.zeros(4, np.uint16)]), TypeError, "ml_dtypes.bfloat16"),
        (lambda: fo.Adam([bf.copy()], state_dtype="float16"), ValueError, "state_dtype"),
        (lambda: fo.Adam([bf.copy()], rounding="up"), ValueError, "rounding"),
        (lambda: fo.Adam([np.zeros(4, F16)], rounding="stochastic"), ValueError, "stochastic"),
        (lambda: fo.Adam([bf.copy()], max_grad_norm=0.0), ValueError, "max_grad_norm"),
        (lambda: fo.Adam([bf.copy()], master_weights=1), TypeError, "master_weights"),
        (lambda: fo.Adam([{"params": [bf.copy()], "lr_scale": [np.ones(4, BF16)]}]), TypeError, "math dtype"),
        (lambda: fo.Adam([bf.copy()], seed=-1), ValueError, "seed"),
        (lambda: fo.Adam([bf.copy()], master_weights=True, rounding="stochastic"), ValueError, "master"),
    ]


@pytest.mark.parametrize("case", range(9))
def test_bad_options_are_refused(case, rng):
    make, error, message = bad_input_cases(rng)[case]
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("grad_dtype,grad_scale,error,message", [
    (F16, None, TypeError, "its param's dtype"),
    (F64, None, TypeError, "its param's dtype"),
    (BF16, 0.0, ValueError, "grad_scale"),
    (BF16, float("nan"), ValueError, "grad_scale"),
    (BF16, -2.0, ValueError, "grad_scale"),
    (BF16, np.ones(2), ValueError, "grad_scale"),
])
def test_bad_grads_and_scales_leave_everything_untouched(grad_dtype, grad_scale, error, message, rng):
    params = [rng.standard_normal(6).astype(BF16)]
    optimizer = fo.AdamW(params, master_weights=True)
    optimizer.step([rng.standard_normal(6).astype(BF16)])
    before = params[0].copy(), {name: buffer.copy() for name, buffer in optimizer.state[0].items()}
    with pytest.raises(error, match=message):
        optimizer.step([rng.standard_normal(6).astype(grad_dtype)], grad_scale=grad_scale)
    assert np.array_equal(params[0].view(np.uint16), before[0].view(np.uint16))
    for name, buffer in optimizer.state[0].items():
        assert np.array_equal(buffer, before[1][name])
    assert optimizer.step_count == 1 and optimizer.skipped_steps == 0
