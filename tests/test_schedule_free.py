"""Schedule-free AdamW and SGD against the ``schedulefree`` package (core and fastopt.torch, many steps with warmup,
weight decay, param groups and train/eval switches), their train/eval semantics, checkpoints across the two, and
their bad input. The float64 reference runs in the config table (tests/test_optimizers.py, test_mixed_precision.py)."""
import copy

import numpy as np
import pytest

import fastopt as fo
from conftest import assert_close

torch = pytest.importorskip("torch")
schedulefree = pytest.importorskip("schedulefree")
ft = pytest.importorskip("fastopt.torch")

STEPS = 30
CASES = [
    ("AdamWScheduleFree", dict(lr=0.01, warmup_steps=5, weight_decay=0.1)),
    ("AdamWScheduleFree", dict(lr=0.003, betas=(0.8, 0.99), eps=1e-6, r=1.0, weight_lr_power=1.0)),
    ("SGDScheduleFree", dict(lr=0.3, momentum=0.9, warmup_steps=4, weight_decay=0.01)),
    ("SGDScheduleFree", dict(lr=0.1, momentum=0.5, r=0.5)),  # eval's weight 1 - 1/0.5 = -1: lerp's other form
]
CASE_IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kwargs.items())}" for name, kwargs in CASES]
# After step t: a switch to the average and back, twice over in places (a second call does nothing).
SWITCHES = {7: ("eval", "train"), 15: ("eval", "eval", "train"), 22: ("eval", "train", "train")}
RTOL = 4 * np.finfo(np.float32).eps * STEPS


def groups_of(params, lr):
    """Two groups, the second with its own lr and no weight decay."""
    return [{"params": params[:2]}, {"params": params[2:], "lr": 2 * lr, "weight_decay": 0.0}]


@pytest.mark.parametrize("name,kwargs", CASES, ids=CASE_IDS)
def test_core_matches_the_package(name, kwargs, rng):
    shapes = [(7, 3), (1,), (13,), (2 * 65536 + 7,)]
    start = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    ours = [p.copy() for p in start]
    theirs = [torch.tensor(p) for p in start]
    optimizer = getattr(fo, name)(groups_of(ours, kwargs["lr"]), **kwargs)
    anchor = getattr(schedulefree, name)(groups_of(theirs, kwargs["lr"]), **kwargs)
    anchor.train()
    for t in range(STEPS):
        grads = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
        for param, grad in zip(theirs, grads):
            param.grad = torch.tensor(grad)
        optimizer.step(grads)
        anchor.step()
        for switch in SWITCHES.get(t, ()):
            getattr(optimizer, switch)()
            getattr(anchor, switch)()
        assert optimizer.train_mode == anchor.param_groups[0]["train_mode"]
    saved = optimizer.state_dict()["state"]
    for index, (param, expected) in enumerate(zip(ours, theirs)):
        assert_close(param, expected.numpy(), RTOL, f"param {index}")
        for buffer, value in anchor.state[expected].items():
            assert_close(optimizer.state[index][buffer], value.numpy(), RTOL, f"param {index} {buffer}")
        group = anchor.param_groups[0 if index < 2 else 1]
        # The running values are float64 on both sides, by the same operations: equal.
        assert (saved[index]["step"], saved[index]["weight_sum"], saved[index]["lr_max"]) == \
            (group["k"], group["weight_sum"], group["lr_max"])


def _model():
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _train(model, optimizer, data, steps):
    x, y = data
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def _largest_difference(a, b):
    with torch.no_grad():
        return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("name,kwargs", CASES, ids=CASE_IDS)
def test_torch_adapter_matches_and_checkpoints_load_both_ways(name, kwargs):
    """fastopt.torch against the package through training, eval for a checkpoint mid-run, and the checkpoint of
    each loaded into the other (saved in eval mode, as the package's documentation asks), trained on to the end."""
    data = (torch.randn(64, 5, generator=torch.Generator().manual_seed(0)),
            torch.randn(64, 3, generator=torch.Generator().manual_seed(1)))
    ours, theirs = _model(), _model()
    ours_opt = getattr(ft, name)(ours.parameters(), **kwargs)
    theirs_opt = getattr(schedulefree, name)(theirs.parameters(), **kwargs)
    ours_opt.train()
    theirs_opt.train()
    _train(ours, ours_opt, data, 12)
    _train(theirs, theirs_opt, data, 12)
    ours_opt.eval()
    theirs_opt.eval()
    ours_saved, theirs_saved = copy.deepcopy(ours_opt.state_dict()), copy.deepcopy(theirs_opt.state_dict())
    for key in ("k", "weight_sum", "lr_max", "train_mode", "scheduled_lr"):
        assert ours_saved["param_groups"][0][key] == theirs_saved["param_groups"][0][key], key
    assert set(ours_saved["state"][0]) == set(theirs_saved["state"][0])

    crossed_to_theirs, crossed_to_ours = _model(), _model()
    crossed_to_theirs.load_state_dict(ours.state_dict())
    crossed_to_ours.load_state_dict(theirs.state_dict())
    to_theirs = getattr(schedulefree, name)(crossed_to_theirs.parameters(), **kwargs)
    to_theirs.load_state_dict(ours_saved)
    to_ours = getattr(ft, name)(crossed_to_ours.parameters(), **kwargs)
    to_ours.load_state_dict(theirs_saved)
    assert to_ours.core.train_mode is False
    runs = [(ours, ours_opt), (theirs, theirs_opt), (crossed_to_theirs, to_theirs), (crossed_to_ours, to_ours)]
    for model, optimizer in runs:
        optimizer.train()
        _train(model, optimizer, data, 10)
        optimizer.eval()
    tolerance = 1e-5  # float32 params of size ~1 after 22 steps: a few hundred roundings of ~6e-8
    for model, _ in runs[:1] + runs[2:]:
        assert _largest_difference(model, theirs) < tolerance


def test_eval_twice_and_train_twice_do_nothing_more(rng):
    params = [rng.standard_normal(9).astype(np.float32)]
    optimizer = fo.AdamWScheduleFree(params, lr=0.1)
    for _ in range(2):  # after the first step y = z (its average weight is 1): the second separates them
        optimizer.step([rng.standard_normal(9).astype(np.float32)])
    trained = params[0].copy()
    optimizer.eval()
    evaluated = params[0].copy()
    assert not np.array_equal(trained, evaluated)
    optimizer.eval()
    np.testing.assert_array_equal(params[0], evaluated)
    optimizer.train()
    optimizer.train()
    assert_close(params[0], trained, 4 * np.finfo(np.float32).eps, "param back at y")


def test_step_in_eval_mode_raises_and_writes_nothing(rng):
    params = [rng.standard_normal(9).astype(np.float32)]
    optimizer = fo.SGDScheduleFree(params, lr=0.1)
    optimizer.step([rng.standard_normal(9).astype(np.float32)])
    optimizer.eval()
    before, z = params[0].copy(), optimizer.state[0]["z"].copy()
    with pytest.raises(RuntimeError, match="eval mode.*train"):
        optimizer.step([rng.standard_normal(9).astype(np.float32)])
    np.testing.assert_array_equal(params[0], before)
    np.testing.assert_array_equal(optimizer.state[0]["z"], z)
    assert optimizer.state_dict()["state"][0]["step"] == 1


def test_eval_moves_to_the_average_and_a_fresh_param_is_left_alone(rng):
    """x = y + (1 - 1/beta)(z - y) rearranged from y = (1 - beta) z + beta x; a param that never stepped has no z
    and stays (the package's ``if 'z' in state``)."""
    params = [rng.standard_normal(6).astype(np.float32), rng.standard_normal(4).astype(np.float32)]
    optimizer = fo.AdamWScheduleFree(params, lr=0.05, betas=(0.8, 0.999))
    optimizer.step([rng.standard_normal(6).astype(np.float32), None])
    y, z, fresh = params[0].astype(np.float64), optimizer.state[0]["z"].astype(np.float64), params[1].copy()
    optimizer.eval()
    assert_close(params[0], y + (1 - 1 / 0.8) * (z - y), 8 * np.finfo(np.float32).eps, "x")
    np.testing.assert_array_equal(params[1], fresh)


def test_z_starts_as_the_param_in_its_storage():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    param = np.array([1.0, -2.5, 3.140625], dtype=ml_dtypes.bfloat16)
    optimizer = fo.SGDScheduleFree([param], lr=0.0, master_weights=True)
    optimizer.step([np.zeros(3, dtype=ml_dtypes.bfloat16)])
    assert optimizer.state[0]["z"].dtype == np.float32
    np.testing.assert_array_equal(optimizer.state[0]["z"], param.astype(np.float32))


def test_save_and_load_mid_run_resume_bit_for_bit(rng, tmp_path):
    shapes = [(5, 4), (70001,)]
    start = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    grads = [[rng.standard_normal(shape).astype(np.float32) for shape in shapes] for _ in range(8)]
    straight = [p.copy() for p in start]
    optimizer = fo.AdamWScheduleFree(straight, lr=0.01, warmup_steps=3, weight_decay=0.1)
    resumed = [p.copy() for p in start]
    first = fo.AdamWScheduleFree(resumed, lr=0.01, warmup_steps=3, weight_decay=0.1)
    for t in range(4):
        optimizer.step(grads[t])
        first.step(grads[t])
    optimizer.eval()
    first.eval()
    fo.save(tmp_path / "ckpt.npz", first)
    second = fo.AdamWScheduleFree(resumed, lr=0.01, warmup_steps=3, weight_decay=0.1)
    fo.load(tmp_path / "ckpt.npz", second)
    assert second.train_mode is False
    for run in (optimizer, second):
        run.train()
        for t in range(4, 8):
            run.step(grads[t])
    for a, b in zip(straight, resumed):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree"])
def test_a_decay_schedule_is_refused_with_the_reason(name):
    param = np.zeros(3, dtype=np.float32)
    with pytest.raises(ValueError, match="no lr schedule.*warmup_steps"):
        getattr(fo, name)([param], lr=fo.schedules.cosine(0.1, t_max=10))
    optimizer = getattr(fo, name)([param], lr=fo.schedules.constant(0.1))  # a constant is a rate, not a schedule
    optimizer.param_groups[0]["lr"] = fo.schedules.exponential(0.1, 0.9)
    with pytest.raises(ValueError, match="no lr schedule"):
        optimizer.step([np.ones(3, dtype=np.float32)])
    np.testing.assert_array_equal(param, 0.0)


BAD = [
    ("AdamWScheduleFree", dict(lr=-0.1), "lr"),
    ("AdamWScheduleFree", dict(eps=-1e-8), "eps"),
    ("AdamWScheduleFree", dict(weight_decay=-0.1), "weight_decay"),
    ("AdamWScheduleFree", dict(betas=(1.0, 0.999)), "beta1"),
    ("AdamWScheduleFree", dict(betas=(0.9, -0.1)), "beta2"),
    ("AdamWScheduleFree", dict(betas=(0.0, 0.999)), "beta1"),  # eval() divides by it
    ("AdamWScheduleFree", dict(warmup_steps=-1), "warmup_steps"),
    ("AdamWScheduleFree", dict(warmup_steps=2.5), "warmup_steps"),
    ("AdamWScheduleFree", dict(weight_lr_power=-1.0), "weight_lr_power"),
    ("SGDScheduleFree", dict(momentum=0.0), "momentum"),
    ("SGDScheduleFree", dict(momentum=1.0), "momentum"),
    ("SGDScheduleFree", dict(lr=-1.0), "lr"),
]


@pytest.mark.parametrize("name,kwargs,word", BAD, ids=[f"{n}-{k}" for n, k, _ in BAD])
def test_bad_hyperparameters_raise_value_error(name, kwargs, word):
    with pytest.raises(ValueError, match=word):
        getattr(fo, name)([np.zeros(3, dtype=np.float32)], **kwargs)


def test_bad_hyperparameter_set_between_steps_changes_nothing(rng):
    params = [rng.standard_normal(5).astype(np.float32)]
    optimizer = fo.AdamWScheduleFree(params, lr=0.01)
    optimizer.step([rng.standard_normal(5).astype(np.float32)])
    before = params[0].copy(), optimizer.state_dict()
    optimizer.param_groups[0]["weight_lr_power"] = -2.0
    with pytest.raises(ValueError, match="weight_lr_power"):
        optimizer.step([rng.standard_normal(5).astype(np.float32)])
    with pytest.raises(ValueError, match="weight_lr_power"):
        optimizer.eval()
    np.testing.assert_array_equal(params[0], before[0])
    assert optimizer.state_dict()["state"][0]["weight_sum"] == before[1]["state"][0]["weight_sum"]
    assert optimizer.train_mode


def test_torch_bad_momentum_is_the_package_error():
    with pytest.raises(ValueError, match="Momentum must be between 0 and 1 exclusive"):
        ft.SGDScheduleFree([torch.zeros(3, requires_grad=True)], momentum=1.0)
