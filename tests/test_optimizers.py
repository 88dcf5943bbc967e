"""Every backend against the float64 reference: params and state, several steps, several groups with a schedule,
a float lr changed between steps, and a per-element lr_scale, at awkward sizes, in float32 and float64."""
import numpy as np
import pytest

import fastopt as fo
from configs import (CONFIG_IDS, CONFIGS, STEPS, assert_matches_reference, lr_schedule, make_problem,  # noqa: F401
                     run_reference)
from conftest import PLAIN_KERNELS, assert_close, tolerance
from fastopt.kernels.cpu import layout

pytestmark = pytest.mark.xdist_group(PLAIN_KERNELS)  # tests/conftest.py

@pytest.mark.parametrize("backend", ["cpu-parallel", "cpu-serial", "reference"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_matches_reference(cls, kwargs, dtype, backend, rng, monkeypatch):
    if backend.startswith("cpu"):
        # Small buckets step on the calling thread; move the threshold to test both kernels on the same problem.
        monkeypatch.setattr(layout, "SERIAL_BELOW", 1 << 62 if backend == "cpu-serial" else 0)
        backend = "cpu"
    params0, params1, scales1, grads = make_problem(dtype, rng)
    schedule = lr_schedule(cls, fo.schedules.cosine(0.05, t_max=4, eta_min=0.001))  # periodic past t_max: rises
    lrs1 = [0.02, 0.02, 0.005, 0.04, 0.0, 0.01]
    expected_params, expected_states = run_reference(cls, kwargs, params0, params1, scales1, grads, schedule, lrs1)

    groups = [{"params": params0, "lr": schedule}, {"params": params1, "lr": lrs1[0], "lr_scale": scales1}]
    optimizer = cls(groups, backend=backend, **kwargs)
    if backend == "cpu":
        serial = layout.SERIAL_BELOW > 0
        assert all(bucket.kernel.__name__.endswith("_serial") == serial for bucket in optimizer._backend.buckets)
    for t in range(STEPS):
        optimizer.param_groups[1]["lr"] = lrs1[t]
        optimizer.step(grads[t])
    assert optimizer.step_count == STEPS

    assert_matches_reference(optimizer, params0 + params1, expected_params, expected_states, dtype, STEPS)


@pytest.mark.parametrize("cls,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_skipped_grads_leave_tensor_alone(cls, kwargs, rng):
    """A None grad skips the param (step count included), as torch skips params without .grad."""
    params = [rng.standard_normal(7).astype(np.float32) for _ in range(2)]
    reference = [p.copy() for p in params]
    optimizer = cls(params, lr=0.01, **kwargs)
    grads = [rng.standard_normal(7).astype(np.float32) for _ in range(2)]
    optimizer.step([None, grads[1]])
    np.testing.assert_array_equal(params[0], reference[0])
    assert not np.array_equal(params[1], reference[1])
    steps = optimizer.state_dict()["state"]
    assert 0 not in steps


def test_one_pass_per_dtype_mixed_dtypes(rng):
    """float32 and float64 params in one optimizer: each dtype computes in its own precision."""
    p32 = rng.standard_normal(9).astype(np.float32)
    p64 = rng.standard_normal(9)
    g32, g64 = rng.standard_normal(9).astype(np.float32), rng.standard_normal(9)
    expected = [p32.astype(np.float64), p64.copy()]
    optimizer = fo.Adam([p32, p64], lr=0.1)
    optimizer.step([g32, g64])
    for param, grad in zip(expected, [g32, g64]):
        fo.reference.adam(param, grad.astype(np.float64), {}, lr=0.1)
    assert_close(p32, expected[0], tolerance(np.float32, 1), "float32 param")
    assert_close(p64, expected[1], tolerance(np.float64, 1), "float64 param")


def test_nan_and_inf_propagate_like_torch(rng):
    params = [np.zeros(4, np.float32)]
    optimizer = fo.Adam(params, lr=0.1)
    optimizer.step([np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)])
    assert np.isnan(params[0][0]) and np.isnan(params[0][1]) and np.isnan(params[0][2])
    assert np.isfinite(params[0][3])


def test_current_lr_and_step_count():
    schedule = fo.schedules.step_decay(0.1, step_size=2, gamma=0.5)
    params = [np.zeros(3, np.float32)]
    optimizer = fo.SGD([{"params": params, "lr": schedule}], momentum=0.9)
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.current_lr()[0])
        optimizer.step([np.ones(3, np.float32)])
    assert lrs == [0.1, 0.1, 0.05, 0.05, 0.025]
    assert optimizer.step_count == 5


def test_changing_group_lr_takes_effect(rng):
    param = np.zeros(5)
    optimizer = fo.SGD([param], lr=0.5)
    optimizer.step([np.ones(5)])
    np.testing.assert_array_equal(param, -0.5)
    optimizer.param_groups[0]["lr"] = 0.25
    optimizer.step([np.ones(5)])
    np.testing.assert_array_equal(param, -0.75)
    optimizer.param_groups[0]["lr"] = fo.schedules.constant(1.0)
    optimizer.step([np.ones(5)])
    np.testing.assert_array_equal(param, -1.75)


def test_add_param_group(rng):
    a, b = np.zeros(3), np.zeros(4)
    optimizer = fo.Adam([a], lr=0.1)
    optimizer.step([np.ones(3)])
    optimizer.add_param_group({"params": [b], "lr": 0.2})
    optimizer.step([np.ones(3), np.ones(4)])
    state = optimizer.state_dict()["state"]
    assert state[0]["step"] == 2 and state[1]["step"] == 1
    np.testing.assert_allclose(b, -0.2)
