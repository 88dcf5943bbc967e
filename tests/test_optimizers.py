"""Every backend against the float64 reference: params and state, several steps, several groups with a schedule,
a float lr changed between steps, and a per-element lr_scale, at awkward sizes, in float32 and float64."""
import numpy as np
import pytest

import fastopt as fo
from conftest import SIZES, assert_close, tolerance
from fastopt.kernels.cpu import tables

# One table of configurations drives every parity test (torch's OptimizerInfo idea).
CONFIGS = [
    (fo.SGD, {}),
    (fo.SGD, dict(weight_decay=0.1)),
    (fo.SGD, dict(momentum=0.9)),
    (fo.SGD, dict(momentum=0.9, dampening=0.3, weight_decay=0.05)),
    (fo.SGD, dict(momentum=0.8, nesterov=True, weight_decay=0.01)),
    (fo.SGD, dict(momentum=0.9, maximize=True)),
    (fo.RMSprop, {}),
    (fo.RMSprop, dict(centered=True)),
    (fo.RMSprop, dict(momentum=0.9)),
    (fo.RMSprop, dict(centered=True, momentum=0.5, weight_decay=0.1)),
    (fo.RMSprop, dict(alpha=0.3, centered=True, maximize=True)),  # 1 - alpha > 1/2: lerp's other form
    (fo.Adam, {}),
    (fo.Adam, dict(weight_decay=0.1)),
    (fo.Adam, dict(amsgrad=True)),
    (fo.Adam, dict(betas=(0.3, 0.5), eps=1e-3, amsgrad=True, maximize=True, weight_decay=0.01)),
    (fo.AdamW, {}),
    (fo.AdamW, dict(amsgrad=True, weight_decay=0.5)),
    (fo.AdamW, dict(weight_decay=0.0)),
    (fo.AdamW, dict(maximize=True, betas=(0.5, 0.9))),
]
CONFIG_IDS = [f"{cls.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for cls, kw in CONFIGS]

STEPS = 6


def make_problem(dtype, rng):
    """Two groups: one with a schedule and tensors of every awkward size, one with a float lr that the loop
    changes and a per-element lr_scale on its tensors."""
    shapes0 = [(size,) for size in SIZES]
    shapes1 = [(3, 5), (SIZES[-1],)]
    params0 = [rng.standard_normal(shape).astype(dtype) for shape in shapes0]
    params1 = [rng.standard_normal(shape).astype(dtype) for shape in shapes1]
    scales1 = [rng.uniform(0.0, 2.0, shape).astype(dtype) for shape in shapes1]
    grads = [[rng.standard_normal(p.shape).astype(dtype) for p in params0 + params1] for _ in range(STEPS)]
    return params0, params1, scales1, grads


def run_reference(cls, kwargs, params0, params1, scales1, grads, schedule, lrs1):
    group_defaults = dict(cls.DEFAULTS, **kwargs)
    params = [p.astype(np.float64) for p in params0 + params1]
    states = [{} for _ in params]
    scales = [1.0] * len(params0) + [s.astype(np.float64) for s in scales1]
    for t in range(STEPS):
        for index, (param, grad) in enumerate(zip(params, grads[t])):
            lr = schedule(t) if index < len(params0) else lrs1[t]
            cls.reference_step(param, grad.astype(np.float64), states[index], group_defaults, lr, scales[index])
    return params, states


def assert_matches_reference(optimizer, params, expected_params, expected_states, dtype, steps):
    """Params (host arrays) and every state buffer of ``optimizer`` against the reference run, with the same
    buffers present, and the per-param step counts (SGD keeps none to compare: it counts momentum steps)."""
    rtol = tolerance(dtype, steps)
    saved = optimizer.state_dict()["state"]
    for index, param in enumerate(params):
        state = saved.get(index, {})  # plain SGD saves nothing
        assert param.dtype == dtype
        assert_close(param, expected_params[index], rtol, f"param {index}")
        for name, value in expected_states[index].items():
            if name == "step":
                if not isinstance(optimizer, fo.SGD):
                    assert state["step"] == value
                continue
            assert state[name].dtype == dtype
            assert_close(state[name], value, rtol, f"param {index} state {name}")
        assert set(state) - {"step"} == set(expected_states[index]) - {"step"}


@pytest.mark.parametrize("backend", ["cpu-parallel", "cpu-serial", "reference"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_matches_reference(cls, kwargs, dtype, backend, rng, monkeypatch):
    if backend.startswith("cpu"):
        # Small buckets step on the calling thread; move the threshold to test both kernels on the same problem.
        monkeypatch.setattr(tables, "SERIAL_BELOW", 1 << 62 if backend == "cpu-serial" else 0)
        backend = "cpu"
    params0, params1, scales1, grads = make_problem(dtype, rng)
    schedule = fo.schedules.cosine(0.05, t_max=4, eta_min=0.001)  # periodic past t_max: rises again
    lrs1 = [0.02, 0.02, 0.005, 0.04, 0.0, 0.01]
    expected_params, expected_states = run_reference(cls, kwargs, params0, params1, scales1, grads, schedule, lrs1)

    groups = [{"params": params0, "lr": schedule}, {"params": params1, "lr": lrs1[0], "lr_scale": scales1}]
    optimizer = cls(groups, backend=backend, **kwargs)
    if backend == "cpu":
        serial = tables.SERIAL_BELOW > 0
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
