"""The learning-rate range test: exact restore, suggestions on a problem with a known best rate, stopping rules."""
import numpy as np
import pytest

import fastopt as fo
from configs import lr_schedule
from conftest import SIZES
from fastopt.lr_finder import smooth_losses, sweep_rates

OPTIMIZERS = [
    (fo.SGD, dict(momentum=0.9, nesterov=True, weight_decay=1e-4)),
    (fo.RMSprop, dict(momentum=0.5, centered=True)),
    (fo.Adam, dict(amsgrad=True)),
    (fo.AdamW, dict()),
    (fo.Adagrad, dict(lr_decay=0.01, initial_accumulator_value=0.1)),
    (fo.Lion, dict(weight_decay=0.1)),
    (fo.AdamWScheduleFree, dict(warmup_steps=3, weight_decay=0.01)),
    (fo.SGDScheduleFree, dict(momentum=0.8)),
    (fo.LAMB, dict()),
]


def assert_same_bits(actual, expected, what):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    assert actual.tobytes() == expected.tobytes(), f"{what} differs"


def assert_same_state_dict(actual, expected):
    assert actual.keys() == expected.keys()
    assert actual["step_count"] == expected["step_count"]
    assert actual.get("guard") == expected.get("guard")
    assert actual["param_groups"] == expected["param_groups"]
    assert actual["state"].keys() == expected["state"].keys()
    for index, entry in expected["state"].items():
        assert actual["state"][index].keys() == entry.keys(), f"state {index}"
        for name, value in entry.items():
            if name == "step":
                assert actual["state"][index][name] == value
            else:
                assert_same_bits(actual["state"][index][name], value, f"state {index} {name}")


def twin_optimizers(cls, extra, rng, warm_steps):
    """Two identical optimizers over identical params: two groups (one with a schedule and an lr_scale), every
    awkward size, a guard; ``warm_steps`` steps taken, one of them skipped by the guard."""
    sizes = SIZES[:2], SIZES[2:]
    values = [[rng.standard_normal(size).astype(np.float32) for size in group] for group in sizes]
    scales = [rng.uniform(0.5, 1.5, size).astype(np.float32) for size in sizes[1]]
    grads = [[rng.standard_normal(size).astype(np.float32) for size in SIZES] for _ in range(warm_steps)]
    twins = []
    for _ in range(2):
        params = [[value.copy() for value in group] for group in values]
        groups = [{"params": params[0], "lr": 1e-3},
                  {"params": params[1], "lr": lr_schedule(cls, fo.schedules.cosine(1e-2, t_max=50)),
                   "lr_scale": [scale.copy() for scale in scales]}]
        optimizer = cls(groups, guard=fo.Guard(patience=1, backoff=0.5), **extra)
        for number, step_grads in enumerate(grads):
            if number == 1:
                bad = [g.copy() for g in step_grads]
                bad[-1][-1] = np.inf
                optimizer.step(bad)  # skipped: leaves the guard with a count and a back-off factor to restore
            optimizer.step(step_grads)
        twins.append((optimizer, params[0] + params[1]))
    return twins


def noisy_step_fn(params, rng):
    """Loss and grads of sum(p^2)/2 plus noise: the sweep diverges once lr passes about 2."""
    def step_fn():
        loss = 1.0 + sum(float(np.sum(p.astype(np.float64) ** 2)) for p in params) / 2
        return loss, [p + 0.1 * rng.standard_normal(p.shape).astype(p.dtype) for p in params]
    return step_fn


@pytest.mark.parametrize("warm_steps", [0, 3])
@pytest.mark.parametrize("cls, extra", OPTIMIZERS)
def test_restore_is_exact(cls, extra, warm_steps, rng):
    (optimizer, params), (twin, twin_params) = twin_optimizers(cls, extra, rng, warm_steps)
    before = optimizer.state_dict()
    lr_objects = [group["lr"] for group in optimizer.param_groups]
    buffers = [dict(state) for state in optimizer.state]
    norm = optimizer.last_grad_norm
    result = fo.lr_find(optimizer, noisy_step_fn(params, rng), start_lr=1e-4, end_lr=100.0, num_steps=40)
    assert 5 < len(result.lrs)  # the sweep ran and changed things

    for param, expected in zip(params, twin_params):
        assert_same_bits(param, expected, "param")
    assert_same_state_dict(optimizer.state_dict(), before)
    assert optimizer.step_count == twin.step_count
    assert all(group["lr"] is lr for group, lr in zip(optimizer.param_groups, lr_objects))
    assert vars(optimizer.guard) == vars(twin.guard)
    assert optimizer.last_grad_norm == norm or (np.isnan(norm) and np.isnan(optimizer.last_grad_norm))
    # The same buffer objects where there were buffers; where there were none (a fresh optimizer) only zeros,
    # which is what a fresh optimizer starts from.
    assert all(state[name] is buffer for state, old in zip(optimizer.state, buffers) for name, buffer in old.items())
    assert all(not np.any(buffer) for state, old in zip(optimizer.state, buffers)
               for name, buffer in state.items() if name not in old)
    # What counts: the next steps are bit-for-bit those of the untouched twin.
    for _ in range(2):
        grads = [rng.standard_normal(size).astype(np.float32) for size in SIZES]
        optimizer.step(grads)
        twin.step([g.copy() for g in grads])
    for param, expected in zip(params, twin_params):
        assert_same_bits(param, expected, "param after the next steps")
    assert_same_state_dict(optimizer.state_dict(), twin.state_dict())


def test_restore_when_step_fn_raises(rng):
    params = [rng.standard_normal(13)]
    saved = params[0].copy()
    optimizer = fo.Adam(params, lr=1e-3)
    calls = []

    def step_fn():
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("data loader broke")
        return 1.0, [np.ones(13)]

    with pytest.raises(RuntimeError, match="data loader"):
        fo.lr_find(optimizer, step_fn, num_steps=10)
    assert_same_bits(params[0], saved, "param")
    assert optimizer.step_count == 0 and optimizer.state_dict()["state"] == {}  # fresh again
    assert optimizer.param_groups[0]["lr"] == 1e-3


def quadratic(lipschitz, rng, dim=50, noise=0.01):
    """f(x) = sum(lambda_i x_i^2) / 2 with curvatures from L/10 to L, grads with a little noise: plain SGD
    converges fastest near lr = 1/L and diverges past 2/L."""
    curvature = np.logspace(np.log10(lipschitz / 10), np.log10(lipschitz), dim)
    x = [np.ones(dim)]

    def step_fn():
        return 0.5 * float(np.sum(curvature * x[0] ** 2)), [curvature * x[0] + noise * rng.standard_normal(dim)]

    return fo.SGD(x, lr=0.1), step_fn


@pytest.mark.parametrize("lipschitz", [1.0, 10.0, 100.0])
def test_suggestions_near_the_best_rate_of_a_quadratic(lipschitz, rng):
    optimizer, step_fn = quadratic(lipschitz, rng)
    result = fo.lr_find(optimizer, step_fn, start_lr=1e-5, end_lr=10.0, num_steps=100)
    best = 1.0 / lipschitz
    assert result.warning is None, result.warning  # a healthy sweep: long, falling, then diverging
    assert best / 4 <= result.suggestion <= best * 4, result.suggestion
    assert best / 4 <= result.suggestion_min10 <= best * 4, result.suggestion_min10
    # Diverged past the stability limit 2/L and stopped there.
    assert result.stopped_early and "smoothed loss passed" in result.stop_reason
    assert 2 * best < result.lrs[-1] < 100 * best


def test_linear_mode(rng):
    optimizer, step_fn = quadratic(10.0, rng)
    result = fo.lr_find(optimizer, step_fn, start_lr=1e-3, end_lr=1.0, num_steps=100, mode="linear")
    np.testing.assert_allclose(result.lrs, np.linspace(1e-3, 1.0, 100)[:len(result.lrs)])
    assert result.mode == "linear" and result.stopped_early and result.warning is None
    assert 0.1 / 4 <= result.suggestion <= 0.1 * 4 and 0.1 / 4 <= result.suggestion_min10 <= 0.1 * 4


def test_early_stop_on_divergence():
    params = [np.ones(4)]
    optimizer = fo.SGD(params, lr=0.1)
    result = fo.lr_find(optimizer, lambda: (float(np.sum(params[0] ** 2)) + 1e-3, [2 * params[0]]),
                        start_lr=1e-3, end_lr=100.0, num_steps=100, diverge_factor=4)
    assert result.stopped_early and len(result.lrs) < 100
    assert result.smoothed[-1] > 4 * result.smoothed.min()
    assert np.all(result.smoothed[:-1] <= 4 * np.minimum.accumulate(result.smoothed)[:-1])
    np.testing.assert_array_equal(result.lrs, sweep_rates(1e-3, 100.0, 100, "exp")[:len(result.lrs)])
    np.testing.assert_array_equal(params[0], 1.0)


def test_full_sweep_without_divergence():
    params = [np.ones(3)]
    optimizer = fo.SGD(params)
    result = fo.lr_find(optimizer, lambda: (5.0, [np.zeros(3)]), start_lr=1e-3, end_lr=1e-1, num_steps=20)
    assert not result.stopped_early and len(result.lrs) == 20 and result.stop_reason == "completed the sweep"
    assert result.suggestion is None and result.suggestion_min10 is None  # a flat loss suggests nothing
    assert result.warning.startswith("the loss never fell")
    rising = iter(np.linspace(1.0, 2.0, 20))
    result = fo.lr_find(optimizer, lambda: (next(rising), [np.zeros(3)]), start_lr=1e-3, end_lr=1e-1, num_steps=20)
    assert result.suggestion is None and result.suggestion_min10 is None
    np.testing.assert_allclose(result.lrs[[0, -1]], [1e-3, 1e-1])


def nan_grads_past(threshold, params, optimizer):
    """A model whose grads overflow to NaN once the rate passes ``threshold``; its loss stays finite."""
    def step_fn():
        grads = [p + 1.0 for p in params]
        if optimizer.param_groups[0]["lr"] > threshold:
            grads[0][0] = np.nan
        return 1.0 + float(np.sum(params[0] ** 2)), grads
    return step_fn


def test_guard_stops_a_sweep_with_nan_grads():
    params = [np.zeros(5)]
    guard = fo.Guard(patience=1, backoff=0.5)
    optimizer = fo.SGD(params, lr=1e-2, guard=guard)
    result = fo.lr_find(optimizer, nan_grads_past(1e-2, params, optimizer), start_lr=1e-4, end_lr=1.0,
                        num_steps=50)
    assert result.stopped_early and "guard skipped" in result.stop_reason
    assert np.all(result.lrs <= 1e-2) and len(result.lrs) > 10 and np.all(np.isfinite(result.losses))
    # The skip (and the back-off it triggered) is undone with everything else.
    assert vars(guard) == vars(fo.Guard(patience=1, backoff=0.5))
    np.testing.assert_array_equal(params[0], 0.0)


def test_guard_backoff_does_not_scale_the_sweep():
    params = [np.zeros(1)]
    guard = fo.Guard()
    guard.lr_factor = 0.25  # backed off earlier in training
    optimizer = fo.SGD(params, lr=1.0, guard=guard)
    seen = []

    def step_fn():
        seen.append(params[0][0])
        return 1.0, [np.ones(1)]

    result = fo.lr_find(optimizer, step_fn, start_lr=1e-3, end_lr=1e-2, num_steps=3)
    np.testing.assert_allclose(-np.diff(seen), result.lrs[:2])  # each step moved the param by the recorded lr
    assert guard.lr_factor == 0.25


def test_nan_loss_without_guard_stops_and_restores():
    params = [np.zeros(5)]
    optimizer = fo.Adam(params, lr=1e-3)
    result = fo.lr_find(optimizer, nan_grads_past(1e-2, params, optimizer), start_lr=1e-4, end_lr=1.0,
                        num_steps=50)
    # The NaN grad poisons the param, the next loss is NaN: the sweep stops without recording it.
    assert result.stopped_early and "loss was nan" in result.stop_reason
    assert np.all(np.isfinite(result.losses))
    np.testing.assert_array_equal(params[0], 0.0)
    assert optimizer.step_count == 0


def test_groups_keep_their_ratios(rng):
    params = [np.zeros(3), np.zeros(3), np.zeros(3)]
    optimizer = fo.SGD([{"params": [params[0]], "lr": 1e-2}, {"params": [params[1]], "lr": 1e-3},
                        {"params": [params[2]], "lr": 0.0}])
    seen = []

    def step_fn():
        seen.append(optimizer.current_lr())
        return 1.0, [np.ones(3)] * 3

    result = fo.lr_find(optimizer, step_fn, start_lr=1e-4, end_lr=1e-1, num_steps=5)
    seen = np.array(seen)
    np.testing.assert_allclose(seen[:, 0], result.lrs)
    np.testing.assert_allclose(seen[:, 1], result.lrs / 10)
    np.testing.assert_array_equal(seen[:, 2], 0.0)
    assert optimizer.current_lr() == [1e-2, 1e-3, 0.0]


def test_smoothing_is_bias_corrected():
    np.testing.assert_allclose(smooth_losses([3.0] * 10, 0.05), 3.0)
    np.testing.assert_allclose(smooth_losses([1.0, 2.0], 0.5), [1.0, (0.25 + 1.0) / 0.75])


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="log"), "mode"), (dict(start_lr=0.0), "start_lr"), (dict(start_lr=1.0, end_lr=0.5), "end_lr"),
    (dict(num_steps=1), "num_steps"), (dict(smooth=0.0), "smooth"), (dict(diverge_factor=-1), "diverge_factor")])
def test_bad_arguments(kwargs, match):
    params = [np.zeros(2)]
    with pytest.raises(ValueError, match=match):
        fo.lr_find(fo.SGD(params), lambda: (1.0, [np.zeros(2)]), **kwargs)


# ---------------------------------------------------------------- sweeps that cannot back a suggestion
def test_three_steps_suggest_neither_end_and_warn(rng):
    optimizer, step_fn = quadratic(10.0, rng)
    result = fo.lr_find(optimizer, step_fn, num_steps=3)  # 1e-7, 3e-3, 10: it suggested 10
    assert result.suggestion == result.lrs[1] and result.lrs[0] <= result.suggestion_min10 <= result.lrs[-1]
    assert "too short to judge" in result.warning and "never diverged" in result.warning


def test_a_narrow_range_keeps_minimum_over_10_inside_it():
    wandering = iter(2.4 + 0.1 * np.cos(np.linspace(0, 2 * np.pi, 100)))  # a loss the tiny rates do not move
    result = fo.lr_find(fo.SGD([np.zeros(3)]), lambda: (next(wandering), [np.zeros(3)]), start_lr=1e-6,
                        end_lr=1e-5)
    assert 2e-6 < result.lrs[int(np.argmin(result.smoothed))] < 5e-6
    # It suggested 2.15e-07 for minimum / 10, below the rates tried, and said it had completed the sweep.
    assert result.suggestion_min10 == result.lrs[0] and "below the rates tried" in result.warning
    assert result.lrs[0] <= result.suggestion <= result.lrs[-1]
    assert not result.stopped_early and "never diverged" in result.warning


def test_linear_mode_over_the_exp_range_does_not_suggest_its_start(rng):
    optimizer, step_fn = quadratic(10.0, rng)  # best rate 0.1, diverges past 0.2: the second and third rates
    result = fo.lr_find(optimizer, step_fn, start_lr=1e-7, end_lr=10.0, mode="linear")
    assert result.suggestion != result.lrs[0]  # what it suggested before
    assert result.lrs[0] <= result.suggestion <= result.lrs[-1] and result.stopped_early
    assert "too short to judge" in result.warning and "never diverged" not in result.warning


def test_no_suggestion_without_a_rate_between_the_first_and_the_minimum():
    losses = iter([2.0, 1.0, 5.0])  # lowest at the second rate: no rate has points on both sides
    result = fo.lr_find(fo.SGD([np.zeros(3)]), lambda: (next(losses), [np.zeros(3)]), start_lr=1e-3, end_lr=1.0,
                        num_steps=3, mode="linear", smooth=1.0)
    assert result.suggestion is None and result.suggestion_min10 == result.lrs[1] / 10
    assert "too short to judge" in result.warning


@pytest.mark.parametrize("mode", ["exp", "linear"])
@pytest.mark.parametrize("start_lr, end_lr, num_steps", [
    (1e-7, 10.0, 2), (1e-7, 10.0, 3), (1e-7, 10.0, 12), (1e-7, 10.0, 100), (1e-6, 1e-5, 100), (1e-6, 1.1e-6, 40),
    (1e-3, 1.0, 30), (0.05, 0.15, 50), (1.0, 100.0, 20), (1e-4, 1e3, 200)])
def test_suggestions_lie_within_the_rates_tried(start_lr, end_lr, num_steps, mode, rng):
    optimizer, step_fn = quadratic(10.0, rng)
    result = fo.lr_find(optimizer, step_fn, start_lr=start_lr, end_lr=end_lr, num_steps=num_steps, mode=mode)
    for suggestion in (result.suggestion, result.suggestion_min10):
        assert suggestion is None or result.lrs.min() <= suggestion <= result.lrs.max(), suggestion
    assert result.warning is not None or None not in (result.suggestion, result.suggestion_min10)


def test_the_command_prints_the_warning(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from fastopt import cli

    assert cli.main(["lr-find", "--num-steps", "3", "--threads", "1", "-o", str(tmp_path / "lr.png")]) == 0
    captured = capsys.readouterr()
    assert "warning: the sweep is too short to judge" in captured.err
    assert "steepest descent): 0.00316" in captured.out  # the middle rate of 1e-6, 3.16e-3, 10


def test_plots_of_warned_sweeps(tmp_path, rng):
    assert_png = pytest.importorskip("test_plotting").assert_png
    optimizer, step_fn = quadratic(10.0, rng)
    for mode in ("exp", "linear"):
        result = fo.lr_find(optimizer, step_fn, start_lr=1e-7, end_lr=10.0, num_steps=10, mode=mode)
        assert "too short" in result.warning and result.optimizer == "SGD"
        path = tmp_path / f"{mode}.png"
        assert result.plot(path, model="a quadratic") == str(path)
        assert_png(path)


# ---------------------------------------------------------------- torch.optim, by duck typing
@pytest.mark.parametrize("name, kwargs", [("SGD", dict(lr=0.1, momentum=0.9)), ("Adam", dict(lr=1e-3))])
def test_torch_optimizer_restore_and_suggestion(name, kwargs):
    torch = pytest.importorskip("torch")
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=generator)
    y = x @ torch.randn(8, 1, generator=generator)

    def make():
        model = torch.nn.Linear(8, 1)
        with torch.no_grad():
            model.weight.fill_(0.1)
            model.bias.fill_(0.0)
        optimizer = getattr(torch.optim, name)(
            [{"params": [model.weight]}, {"params": [model.bias], "lr": kwargs["lr"] / 10}], **kwargs)
        return model, optimizer

    def step_fn_for(model):
        def step_fn():
            batch = torch.randint(0, 256, (32,), generator=generator)
            loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
            loss.backward()
            return loss
        return step_fn

    def fixed_step(model, optimizer, batch):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x[batch]), y[batch]).backward()
        optimizer.step()

    (model, optimizer), (twin_model, twin) = make(), make()
    for m, o in ((model, optimizer), (twin_model, twin)):  # some state (and .grad) to restore
        fixed_step(m, o, torch.arange(32))
    before = optimizer.state_dict()
    before = {"state": {k: {n: v.clone() for n, v in s.items()} for k, s in before["state"].items()},
              "param_groups": [dict(g) for g in before["param_groups"]]}
    result = fo.lr_find(optimizer, step_fn_for(model), start_lr=1e-5, end_lr=10.0, num_steps=60)
    assert len(result.lrs) > 10 and result.suggestion is not None

    after = optimizer.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for index, state in before["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][index][key], value), (index, key)
    for param, twin_param in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(param, twin_param) and torch.equal(param.grad, twin_param.grad)
    for m, o in ((model, optimizer), (twin_model, twin)):
        fixed_step(m, o, torch.arange(32, 64))
    for param, twin_param in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(param, twin_param)
