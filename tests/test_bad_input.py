"""Bad input gets a clear error naming the problem, and leaves params and state untouched."""
import numpy as np
import pytest

import fastopt as fo


def make(cls=fo.Adam, **kwargs):
    params = [np.ones((2, 3), np.float32), np.ones(5, np.float32)]
    optimizer = cls(params, lr=0.1, **kwargs)
    optimizer.step([np.ones((2, 3), np.float32), np.ones(5, np.float32)])
    return params, optimizer


def snapshot(params, optimizer):
    state = optimizer.state_dict()
    return [p.copy() for p in params], state


def assert_untouched(params, optimizer, before):
    saved_params, saved_state = before
    for param, saved in zip(params, saved_params):
        np.testing.assert_array_equal(param, saved)
    state = optimizer.state_dict()
    assert state["step_count"] == saved_state["step_count"]
    for index, entry in saved_state["state"].items():
        for name, value in entry.items():
            np.testing.assert_array_equal(state["state"][index][name], value)


GOOD = [np.ones((2, 3), np.float32), np.ones(5, np.float32)]
BAD_GRADS = [
    ([GOOD[0]], ValueError, "1 grads for 2 params"),
    ([GOOD[0], np.ones(4, np.float32)], ValueError, r"grads\[1\] has shape \(4,\)"),
    ([GOOD[0], np.ones(5, np.float64)], TypeError, r"grads\[1\] has dtype float64"),
    ([GOOD[0], np.ones(10, np.float32)[::2]], ValueError, r"grads\[1\] is not C-contiguous"),
    ([GOOD[0], [1.0] * 5], TypeError, r"grads\[1\] must be a numpy.ndarray"),
    ([np.ones((3, 2), np.float32), GOOD[1]], ValueError, r"grads\[0\] has shape \(3, 2\)"),
]


@pytest.mark.parametrize("grads,error,message", BAD_GRADS)
@pytest.mark.parametrize("cls", [fo.SGD, fo.RMSprop, fo.Adam, fo.AdamW])
def test_bad_grads(cls, grads, error, message):
    params, optimizer = make(cls)
    before = snapshot(params, optimizer)
    with pytest.raises(error, match=message):
        optimizer.step(grads)
    assert_untouched(params, optimizer, before)


def test_gpu_array_grad_is_a_device_error():
    class FakeCupyArray:
        __cuda_array_interface__ = {}
        shape = (5,)

    params, optimizer = make()
    before = snapshot(params, optimizer)
    with pytest.raises(TypeError, match="GPU array"):
        optimizer.step([GOOD[0], FakeCupyArray()])
    assert_untouched(params, optimizer, before)


@pytest.mark.parametrize("change,error,message", [
    (dict(lr=-0.1), ValueError, "invalid lr"),
    (dict(lr=float("nan")), ValueError, "lr must be finite"),
    (dict(betas=(1.0, 0.9)), ValueError, "beta1"),
    (dict(betas=(0.9, -0.1)), ValueError, "beta2"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(weight_decay=-1.0), ValueError, "weight_decay"),
    (dict(amsgrad="yes"), TypeError, "amsgrad must be a bool"),
    (dict(momentum=0.9), ValueError, r"unknown hyperparameter\(s\) \['momentum'\]"),
])
def test_bad_group_change_between_steps(change, error, message):
    """A group edited into an invalid state fails at the next step, before anything is written."""
    params, optimizer = make()
    before = snapshot(params, optimizer)
    optimizer.param_groups[0].update(change)
    with pytest.raises(error, match=message):
        optimizer.step(GOOD)
    assert_untouched(params, optimizer, before)


@pytest.mark.parametrize("cls,kwargs,error,message", [
    (fo.Adam, dict(lr=-1.0), ValueError, "invalid lr"),
    (fo.Adam, dict(betas=(0.9,)), TypeError, "betas must be a pair"),
    (fo.Adam, dict(eps=-1e-8), ValueError, "eps"),
    (fo.AdamW, dict(weight_decay=float("inf")), ValueError, "weight_decay must be finite"),
    (fo.SGD, dict(nesterov=True), ValueError, "Nesterov momentum requires a momentum > 0"),
    (fo.SGD, dict(momentum=0.9, dampening=0.1, nesterov=True), ValueError, "zero dampening"),
    (fo.SGD, dict(momentum=-0.5), ValueError, "momentum"),
    (fo.RMSprop, dict(alpha=1.5), ValueError, "alpha"),
    (fo.RMSprop, dict(eps=0.0), ValueError, "eps"),
    (fo.RMSprop, dict(centered=1), TypeError, "centered must be a bool"),
    (fo.Adam, dict(backend="gpu"), ValueError, "unknown backend"),
    (fo.Adagrad, dict(lr=-0.1), ValueError, "invalid lr"),
    (fo.Adagrad, dict(lr_decay=-0.1), ValueError, "invalid lr_decay"),
    (fo.Adagrad, dict(weight_decay=-0.1), ValueError, "invalid weight_decay"),
    (fo.Adagrad, dict(initial_accumulator_value=-1.0), ValueError, "invalid initial_accumulator_value"),
    (fo.Adagrad, dict(eps=-1e-10), ValueError, "invalid eps"),
    (fo.Lion, dict(lr=-1e-4), ValueError, "invalid lr"),
    (fo.Lion, dict(betas=(1.0, 0.99)), ValueError, "beta1"),
    (fo.Lion, dict(betas=(0.9, -0.5)), ValueError, "beta2"),
    (fo.Lion, dict(weight_decay=-0.1), ValueError, "invalid weight_decay"),
])
def test_bad_hyperparameters(cls, kwargs, error, message):
    with pytest.raises(error, match=message):
        cls([np.ones(3, np.float32)], **kwargs)


@pytest.mark.parametrize("cls,change,message", [
    (fo.Adagrad, dict(lr_decay=-1.0), "invalid lr_decay"),
    (fo.Adagrad, dict(eps=float("inf")), "eps must be finite"),
    (fo.Lion, dict(betas=(0.9, 1.0)), "beta2"),
    (fo.Lion, dict(weight_decay=-1e-3), "invalid weight_decay"),
])
def test_bad_group_change_of_the_new_rules(cls, change, message):
    """Adagrad and Lion check their hyperparameters before anything is written, as the others do."""
    params, optimizer = make(cls)
    before = snapshot(params, optimizer)
    optimizer.param_groups[0].update(change)
    with pytest.raises(ValueError, match=message):
        optimizer.step(GOOD)
    assert_untouched(params, optimizer, before)


def test_unknown_keyword_is_an_error():
    with pytest.raises(TypeError, match="momentum"):
        fo.Adam([np.ones(3)], momentum=0.9)


@pytest.mark.parametrize("params,error,message", [
    (np.ones(3, np.float32), TypeError, "got a single array"),
    ([], ValueError, "empty parameter list"),
    ([np.ones(3, np.int32)], TypeError, "dtype int32"),
    ([np.ones(6, np.float32)[::2]], ValueError, "not C-contiguous"),
    ([np.ones((3, 4), np.float32).T], ValueError, "not C-contiguous"),
    ([[1.0, 2.0]], TypeError, "must be a numpy.ndarray"),
    ([{"params": [np.ones(3)], "lr": 0.1, "betas2": 0.9}], ValueError, r"unknown hyperparameter\(s\) \['betas2'\]"),
    ([{"lr": 0.1}], ValueError, "no 'params'"),
    ([np.ones(3), {"params": [np.ones(2)]}], TypeError, "mixes arrays and param-group dicts"),
])
def test_bad_params(params, error, message):
    with pytest.raises(error, match=message):
        fo.Adam(params)


def test_read_only_param():
    param = np.ones(3)
    param.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fo.SGD([param])


def test_param_made_read_only_after_construction():
    params, optimizer = make()
    before = snapshot(params, optimizer)
    params[1].flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        optimizer.step(GOOD)
    params[1].flags.writeable = True
    assert_untouched(params, optimizer, before)


def test_duplicate_and_aliased_params():
    param = np.ones(4)
    with pytest.raises(ValueError, match="more than once"):
        fo.SGD([param, param])
    with pytest.raises(ValueError, match="shares memory"):
        fo.SGD([param, param.reshape(2, 2)])
    with pytest.raises(ValueError, match="shares memory"):
        fo.SGD([param[:3], param[2:]])  # overlapping views that start at different addresses
    with pytest.raises(ValueError, match="more than once"):
        fo.SGD([np.zeros(0), np.zeros(0)] * 2)
    fo.SGD([param[:2], param[2:]])  # adjacent, not overlapping


@pytest.mark.parametrize("lr_scale,error,message", [
    ([np.ones(3)], ValueError, "1 arrays for 2 params"),
    ([np.ones(3), np.ones(5)], ValueError, r"lr_scale'\]\[1\] has shape \(5,\)"),
    ([np.ones(3), np.ones(4, np.float32)], TypeError, "dtype float32"),
    ([np.ones(3), -np.ones(4)], ValueError, "finite and >= 0"),
    ([np.ones(3), np.full(4, np.nan)], ValueError, "finite and >= 0"),
    ([np.ones(3), np.ones(8)[::2]], ValueError, "not C-contiguous"),
])
def test_bad_lr_scale(lr_scale, error, message):
    with pytest.raises(error, match=message):
        fo.Adam([{"params": [np.ones(3), np.ones(4)], "lr_scale": lr_scale}])


def test_bad_schedule_lr():
    with pytest.raises(TypeError):
        fo.SGD([np.ones(3)], lr="0.1")


def test_generator_of_params_in_a_group_keeps_every_param():
    a, b = np.zeros(2), np.zeros(3)
    optimizer = fo.SGD([{"params": (p for p in [a, b]), "lr": 1.0}])
    optimizer.step([np.ones(2), np.ones(3)])
    np.testing.assert_array_equal(a, -1.0)
    np.testing.assert_array_equal(b, -1.0)


def test_single_array_lr_scale_set_between_steps():
    param = np.zeros(3)
    optimizer = fo.SGD([param], lr=1.0)
    optimizer.step([np.ones(3)])
    optimizer.param_groups[0]["lr_scale"] = np.array([0.0, 1.0, 2.0])
    optimizer.step([np.ones(3)])
    np.testing.assert_array_equal(param, [-1.0, -2.0, -3.0])


def test_betas_edited_in_place_take_effect():
    """torch reads the group every step; an in-place edit of a betas list must count as a change."""
    edited, replaced = np.zeros(3), np.zeros(3)
    grads = [np.array([1.0, -2.0, 3.0]), np.array([0.5, 0.5, -1.0])]
    first = fo.Adam([{"params": [edited], "betas": [0.9, 0.999]}], lr=0.1)
    second = fo.Adam([{"params": [replaced], "betas": (0.9, 0.999)}], lr=0.1)
    first.step([grads[0]])
    second.step([grads[0]])
    first.param_groups[0]["betas"][0] = 0.5
    second.param_groups[0]["betas"] = (0.5, 0.999)
    first.step([grads[1]])
    second.step([grads[1]])
    np.testing.assert_array_equal(edited, replaced)


def test_a_rule_with_more_state_slots_than_the_kernels_address_is_refused():
    with pytest.raises(TypeError, match="at most 3 STATE_SLOTS"):
        type("FourStates", (fo.Optimizer,), {"STATE_SLOTS": ("a", "b", "c", "d")})
    with pytest.raises(TypeError, match="OPTIONAL_STATES are among them"):
        type("StrayOptional", (fo.Optimizer,), {"STATE_SLOTS": ("a",), "OPTIONAL_STATES": ("b",)})
