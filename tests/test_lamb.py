"""LAMB beyond the config table's reference checks (tests/test_optimizers.py, test_mixed_precision.py): its trust
ratio's edge cases, results independent of the thread count, lr_scale outside the norms, fastopt.torch, and bad
input."""
import numba
import numpy as np
import pytest

import fastopt as fo
from conftest import assert_close
from fastopt.kernels.cpu import layout


def _run(params, grads, **kwargs):
    optimizer = fo.LAMB(params, **kwargs)
    for step_grads in grads:
        optimizer.step(step_grads)
    return optimizer


@pytest.fixture
def problem(rng):
    shapes = [(3 * layout.CHUNK + 11,), (257, 3), (1,)]
    params = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
    grads = [[rng.standard_normal(shape).astype(np.float32) for shape in shapes] for _ in range(4)]
    return params, grads


@pytest.mark.parametrize("threads", [1, 2])
def test_results_do_not_depend_on_threads_or_the_serial_kernel(problem, threads, monkeypatch):
    """The norms add per-chunk sums in chunk order: the parallel kernel on any number of threads and the serial
    twin give the same bits."""
    params, grads = problem
    monkeypatch.setattr(layout, "SERIAL_BELOW", 1 << 62)
    serial = [p.copy() for p in params]
    _run(serial, grads, lr=0.01)
    monkeypatch.setattr(layout, "SERIAL_BELOW", 0)
    parallel = [p.copy() for p in params]
    previous = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        _run(parallel, grads, lr=0.01)
    finally:
        numba.set_num_threads(previous)
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)


def test_zero_param_takes_a_trust_ratio_of_one(rng):
    """||p|| = 0 (a zero-initialised bias) gives the ratio 1, as the rule says: the step is lr * u."""
    param = np.zeros(5, dtype=np.float32)
    grad = rng.standard_normal(5).astype(np.float32)
    _run([param], [[grad]], lr=0.1, weight_decay=0.0)
    # First step, bias corrected: u = g / (|g| + eps).
    assert_close(param, -0.1 * grad / (np.abs(grad) + 1e-6), 4 * np.finfo(np.float32).eps, "param")


def test_trust_ratio_is_clamped(rng):
    param = np.full(4, 100.0, dtype=np.float32)
    grad = rng.standard_normal(4).astype(np.float32)
    _run([param], [[grad]], lr=0.01, weight_decay=0.0, max_trust_ratio=2.0)
    # ||p|| / ||u|| = 200 / ~2: clamped to 2.
    update = grad / (np.abs(grad) + 1e-6)
    assert_close(param, 100.0 - 0.01 * 2.0 * update, 4 * np.finfo(np.float32).eps, "param")


def test_lr_scale_scales_the_step_not_the_norms(rng):
    """The same trust ratio with and without lr_scale: an element with scale s moves s times as far."""
    start = rng.standard_normal(40).astype(np.float32)
    grad = rng.standard_normal(40).astype(np.float32)
    scale = rng.uniform(0.0, 2.0, 40).astype(np.float32)
    plain, scaled = start.copy(), start.copy()
    _run([plain], [[grad]], lr=0.01)
    _run([{"params": [scaled], "lr_scale": [scale]}], [[grad]], lr=0.01)
    expected = start.astype(np.float64) + (plain.astype(np.float64) - start) * scale
    assert_close(scaled, expected, 4 * np.finfo(np.float32).eps, "param")


def test_empty_and_gradless_params(rng):
    params = [np.zeros(0, dtype=np.float32), rng.standard_normal(3).astype(np.float32)]
    before = params[1].copy()
    optimizer = _run(params, [[np.zeros(0, dtype=np.float32), None]], lr=0.01)
    np.testing.assert_array_equal(params[1], before)
    assert optimizer.state_dict()["state"][0]["step"] == 1


BAD = [(dict(lr=-1e-3), "lr"), (dict(eps=-1e-6), "eps"), (dict(weight_decay=-0.01), "weight_decay"),
       (dict(betas=(1.0, 0.999)), "beta1"), (dict(betas=(0.9, 1.5)), "beta2"), (dict(max_trust_ratio=0.0),
                                                                                "max_trust_ratio"),
       (dict(max_trust_ratio=-1.0), "max_trust_ratio")]


@pytest.mark.parametrize("kwargs,word", BAD, ids=[word for _, word in BAD])
def test_bad_hyperparameters_raise_value_error(kwargs, word):
    with pytest.raises(ValueError, match=word):
        fo.LAMB([np.zeros(3, dtype=np.float32)], **kwargs)


def test_torch_adapter_matches_the_core(rng):
    torch = pytest.importorskip("torch")
    ft = pytest.importorskip("fastopt.torch")
    start = [rng.standard_normal(shape).astype(np.float32) for shape in [(6, 5), (5,)]]
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in start] for _ in range(5)]
    core_params = [p.copy() for p in start]
    _run(core_params, grads, lr=0.02, weight_decay=0.1)
    tensors = [torch.tensor(p, requires_grad=True) for p in start]
    optimizer = ft.LAMB(tensors, lr=0.02, weight_decay=0.1)
    for step_grads in grads:
        for tensor, grad in zip(tensors, step_grads):
            tensor.grad = torch.tensor(grad)
        optimizer.step()
    for tensor, expected in zip(tensors, core_params):
        np.testing.assert_array_equal(tensor.detach().numpy(), expected)
    assert set(optimizer.state[tensors[0]]) == {"step", "exp_avg", "exp_avg_sq"}
    with pytest.raises(ValueError, match="Invalid beta parameter"):
        ft.LAMB(tensors, betas=(0.9, 1.0))
