"""The divergence guard: non-finite grads skip the step untouched, repeated skips back the rate off."""
import numpy as np
import pytest

import fastopt as fo
from conftest import SIZES, assert_close


def grads_like(params, value=1.0):
    return [np.full_like(p, value) for p in params]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("cls", fo.rules.OPTIMIZERS)
def test_nonfinite_step_is_skipped_untouched(cls, backend, rng):
    params = [rng.standard_normal(size).astype(np.float32) for size in SIZES]
    optimizer = cls(params, lr=0.01, guard=fo.Guard(), backend=backend, **(
        {"momentum": 0.9} if cls in (fo.SGD, fo.RMSprop) else {}))
    optimizer.step(grads_like(params))
    before = [p.copy() for p in params], optimizer.state_dict()
    bad = grads_like(params)
    bad[-1][bad[-1].size // 2] = np.nan  # in a later chunk than the first
    optimizer.step(bad)
    for param, saved in zip(params, before[0]):
        np.testing.assert_array_equal(param, saved)
    after = optimizer.state_dict()
    assert after["step_count"] == 1 and after["guard"]["skipped_steps"] == 1
    for index, entry in before[1]["state"].items():
        for name, value in entry.items():
            np.testing.assert_array_equal(after["state"][index][name], value)
    assert np.isnan(optimizer.last_grad_norm)


def test_backoff_after_patience_and_reset_on_success():
    params = [np.zeros(5)]
    guard = fo.Guard(backoff=0.5, patience=2)
    optimizer = fo.SGD(params, lr=1.0, guard=guard)
    inf = [np.array([1.0, np.inf, 0, 0, 0])]
    optimizer.step(inf)
    assert guard.lr_factor == 1.0 and guard.consecutive_skips == 1
    optimizer.step(grads_like(params))            # a good step resets the run of skips
    assert guard.consecutive_skips == 0
    np.testing.assert_array_equal(params[0], -1.0)
    optimizer.step(inf)
    optimizer.step(inf)                           # second skip in a row: back off
    assert guard.lr_factor == 0.5 and guard.skipped_steps == 3
    optimizer.step(grads_like(params))
    np.testing.assert_array_equal(params[0], -1.5)  # the rate is scaled inside the kernel
    assert optimizer.current_lr() == [1.0]        # the schedule itself is unchanged


def test_guard_norm_matches_numpy(rng):
    params = [rng.standard_normal(size).astype(np.float32) for size in SIZES]
    grads = [rng.standard_normal(size).astype(np.float32) for size in SIZES]
    optimizer = fo.Adam(params, guard=fo.Guard())
    optimizer.step(grads)
    expected = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads))
    # Summing n positive terms in float64 in any order errs by at most n eps relative (the sqrt halves it).
    elements = sum(g.size for g in grads)
    assert_close(optimizer.last_grad_norm, expected, elements * np.finfo(np.float64).eps, "grad norm")


def test_guard_state_saved_and_loaded(tmp_path):
    optimizer = fo.Adam([np.zeros(3)], guard=fo.Guard(patience=1, backoff=0.25))
    optimizer.step([np.array([np.nan, 0, 0])])
    fo.save(tmp_path / "g.npz", optimizer)
    other = fo.Adam([np.zeros(3)], guard=fo.Guard(patience=1, backoff=0.25))
    fo.load(tmp_path / "g.npz", other)
    assert other.guard.skipped_steps == 1 and other.guard.lr_factor == 0.25


def test_without_skip_nonfinite_nans_propagate():
    params = [np.zeros(2)]
    optimizer = fo.SGD(params, lr=0.1, guard=fo.Guard(skip_nonfinite=False))
    optimizer.step([np.array([np.nan, 1.0])])
    assert np.isnan(params[0][0]) and params[0][1] == -0.1


@pytest.mark.parametrize("kwargs,message", [
    (dict(backoff=0.0), "backoff"), (dict(backoff=1.5), "backoff"), (dict(patience=0), "patience"),
])
def test_bad_guard_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fo.Guard(**kwargs)
    with pytest.raises(TypeError, match="guard must be"):
        fo.SGD([np.zeros(2)], guard="yes")


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_group_change_survives_a_skipped_step(backend):
    """An lr written before a step the guard skips applies to the next step that runs (torch's schedulers write
    group["lr"] every step, and AMP produces inf grads now and then)."""
    params = [np.zeros(3)]
    optimizer = fo.SGD(params, lr=0.1, guard=fo.Guard(), backend=backend)
    optimizer.step(grads_like(params))
    optimizer.param_groups[0]["lr"] = 1.0
    optimizer.step([np.array([np.nan, 0.0, 0.0])])
    optimizer.step(grads_like(params))
    np.testing.assert_array_equal(params[0], -1.1)
