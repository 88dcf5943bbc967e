"""State dicts, save/load without pickle, and bit-exact resumption."""
import numpy as np
import pytest

import fastopt as fo
from configs import lr_schedule
from test_optimizers import CONFIG_IDS, CONFIGS


def training_run(cls, kwargs, steps, rng_seed=7):
    rng = np.random.default_rng(rng_seed)
    params = [rng.standard_normal(shape).astype(np.float32) for shape in [(0,), (1,), (13,), (70_001,)]]
    scale = [rng.uniform(0, 2, p.shape).astype(np.float32) for p in params[2:]]
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in params] for _ in range(steps)]
    groups = [{"params": params[:2], "lr": lr_schedule(cls, fo.schedules.onecycle(0.05, total_steps=steps))},
              {"params": params[2:], "lr": 0.01, "lr_scale": scale}]
    return params, groups, grads


@pytest.mark.parametrize("cls,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_resume_from_file_is_bit_exact(cls, kwargs, tmp_path):
    """100 steps equal 50 steps + save + load into a fresh optimizer + 50 steps, bit for bit."""
    params, groups, grads = training_run(cls, kwargs, 100)
    straight = cls(groups, **kwargs)
    for t in range(100):
        straight.step(grads[t])

    resumed_params, groups, _ = training_run(cls, kwargs, 100)
    first = cls(groups, **kwargs)
    for t in range(50):
        first.step(grads[t])
    path = tmp_path / "state.npz"
    fo.save(path, first)
    fresh_groups = [dict(group) for group in groups]
    fresh_groups[0]["lr"] = 0.5  # the file's schedule must replace this
    second = cls(fresh_groups, **kwargs)
    fo.load(path, second)
    assert second.step_count == 50
    for t in range(50, 100):
        second.step(grads[t])

    for ours, theirs in zip(resumed_params, params):
        np.testing.assert_array_equal(ours, theirs)
    expected, actual = straight.state_dict()["state"], second.state_dict()["state"]
    assert expected.keys() == actual.keys()
    for index in expected:
        assert expected[index].keys() == actual[index].keys()
        for name in expected[index]:
            np.testing.assert_array_equal(actual[index][name], expected[index][name])


def test_saved_file_needs_no_pickle(tmp_path):
    params = [np.ones(3, np.float32)]
    optimizer = fo.AdamW([{"params": params, "lr": fo.schedules.warmup(
        fo.schedules.sequential([fo.schedules.constant(0.1), fo.schedules.cosine(0.1, t_max=5)], [3]), 2)}])
    optimizer.step([np.ones(3, np.float32)])
    fo.save(tmp_path / "s.npz", optimizer)
    with np.load(tmp_path / "s.npz", allow_pickle=False) as archive:
        assert sorted(archive.files) == ["meta", "state/0/exp_avg", "state/0/exp_avg_sq"]
    other = fo.AdamW([np.ones(3, np.float32)])
    fo.load(tmp_path / "s.npz", other)
    assert other.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert other.param_groups[0]["betas"] == (0.9, 0.999)


def test_state_dict_layout_follows_torch():
    params = [np.ones(3), np.ones(2)]
    optimizer = fo.Adam([{"params": params[:1]}, {"params": params[1:], "lr": 0.5}], amsgrad=True)
    optimizer.step([np.ones(3), None])
    state = optimizer.state_dict()
    assert state["param_groups"][0]["params"] == [0] and state["param_groups"][1]["params"] == [1]
    assert state["param_groups"][1]["lr"] == 0.5
    assert set(state["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert state["state"][0]["step"] == 1 and 1 not in state["state"]  # never updated: no entry, as in torch


def test_fresh_state_round_trips():
    """A state dict taken before any step loads back as a fresh optimizer, bit for bit in later steps."""
    params, twin = [np.ones(5)], [np.ones(5)]
    optimizer, reference = fo.SGD(params, lr=0.1, momentum=0.9), fo.SGD(twin, lr=0.1, momentum=0.9)
    fresh = optimizer.state_dict()
    assert fresh["state"] == {}
    optimizer.step([np.full(5, 3.0)])
    optimizer.load_state_dict(fresh)
    params[0][...] = 1.0
    for grad in (np.full(5, 2.0), np.full(5, -1.0)):
        optimizer.step([grad])
        reference.step([grad])
    np.testing.assert_array_equal(params[0], twin[0])


@pytest.mark.parametrize("mutate,message", [
    (lambda s: s["param_groups"].pop(), "param groups"),
    (lambda s: s["param_groups"][0]["params"].append(9), "params"),
    (lambda s: s["state"][0].update(exp_avg=np.ones(4)), "shape"),
    (lambda s: s["state"][0].update(velocity=np.ones(3)), "unknown buffer"),
    (lambda s: s["param_groups"][0].update(lr=-1.0), "invalid lr"),
    (lambda s: s["param_groups"][0].update(momentum=0.9), "unknown hyperparameter"),
    (lambda s: s["state"][0].update(step=-1), "step must be a non-negative integer"),
    (lambda s: s["state"][0].update(step=1.5), "step must be a non-negative integer"),
    (lambda s: s.update(step_count=-3), "step_count must be a non-negative integer"),
    (lambda s: s["state"][0].update(exp_avg=np.array(["a", "b", "c"])), "state is float64"),
    # A bad entry after a good group change: nothing of the group change may be applied.
    (lambda s: (s["param_groups"][0].update(lr=0.5), s["state"][0].update(step=-1)), "non-negative integer"),
])
def test_bad_state_dict_leaves_optimizer_untouched(mutate, message):
    params = [np.ones(3)]
    optimizer = fo.Adam(params)
    optimizer.step([np.ones(3)])
    state = optimizer.state_dict()
    bad = optimizer.state_dict()
    mutate(bad)
    with pytest.raises((ValueError, TypeError), match=message):
        optimizer.load_state_dict(bad)
    after = optimizer.state_dict()
    assert after["param_groups"] == state["param_groups"]
    for name, value in state["state"][0].items():
        np.testing.assert_array_equal(after["state"][0][name], value)


def test_load_rejects_other_optimizer(tmp_path):
    sgd = fo.SGD([np.ones(3)], momentum=0.9)
    sgd.step([np.ones(3)])
    fo.save(tmp_path / "sgd.npz", sgd)
    with pytest.raises(ValueError, match="state of a SGD"):
        fo.load(tmp_path / "sgd.npz", fo.Adam([np.ones(3)]))


def test_params_without_grads_get_no_state():
    """Like torch: a frozen param (never a grad) costs no state memory; its buffers appear with its first grad."""
    frozen, trained = np.ones(1000), np.ones(3)
    optimizer = fo.Adam([frozen, trained], lr=0.1)
    for _ in range(2):
        optimizer.step([None, np.ones(3)])
    assert optimizer.state[0] == {} and set(optimizer.state[1]) == {"exp_avg", "exp_avg_sq"}
    optimizer.step([np.ones(1000), np.ones(3)])
    assert set(optimizer.state[0]) == {"exp_avg", "exp_avg_sq"}
    assert optimizer.state_dict()["state"][0]["step"] == 1
    np.testing.assert_allclose(frozen, 0.9)  # Adam's first step moves every element by lr


def test_adopt_buffer_checks_the_array_and_the_next_step_writes_it():
    """Optimizer.adopt_buffer (fastopt.torch moves 8-bit scales into rows it shows torch): a buffer of the wrong shape
    or dtype, or one the param does not keep, is refused and the state kept; an adopted one is the buffer the next
    step updates, and one that shares memory with another buffer is refused by that step."""
    rng = np.random.default_rng(3)
    param = rng.standard_normal(600).astype(np.float32)
    optimizer = fo.AdamW([param], lr=0.01, state_dtype="8bit", min_8bit_size=0)
    optimizer.step(rng.standard_normal(600).astype(np.float32))
    kept = optimizer.state[0]["exp_avg_absmax"]
    for bad, name in [(np.zeros(2, np.float32), "exp_avg_absmax"), (np.zeros(3, np.float64), "exp_avg_absmax"),
                      (np.zeros(3, np.float32), "momentum_buffer")]:
        with pytest.raises(ValueError, match="adopted buffer"):
            optimizer.adopt_buffer(0, name, bad)
        assert optimizer.state[0]["exp_avg_absmax"] is kept
    row = np.zeros(8, np.float32)
    row[:3] = kept
    optimizer.adopt_buffer(0, "exp_avg_absmax", row[:3])
    optimizer.step(rng.standard_normal(600).astype(np.float32))
    assert optimizer.state[0]["exp_avg_absmax"].base is row and np.all(row[:3] > 0) and np.all(row[3:] == 0)
    assert not np.array_equal(row[:3], kept)  # the step wrote the adopted row, not the old buffer
    optimizer.adopt_buffer(0, "exp_avg_sq_absmax", row[:3])  # the same memory as exp_avg's scales
    with pytest.raises(ValueError, match="share"):
        optimizer.step(rng.standard_normal(600).astype(np.float32))
