"""fastopt.torch against torch's own optimizer tests: the inputs of torch's ``optim_db`` (``optim_inputs_func``,
``optim_error_inputs_func``) for every optimizer both have, through a harness of our own that ports the checks of
torch's ``test/test_optim.py``: the for-loop implementation as the oracle (params and state, several steps),
``test_errors``, the state_dict hooks, older checkpoints, deepcopy, weights_only save/load, and checkpoints loaded
across implementations. What fastopt refuses by design (capturable, differentiable, complex and sparse) is asserted
to be refused with its documented error."""
import copy
import io

import numpy as np
import pytest

from conftest import assert_close, tolerance

torch = pytest.importorskip("torch")
from torch.testing._internal.common_optimizers import OptimizerErrorEnum, optim_db  # noqa: E402 (needs torch)

import fastopt.torch as ft  # noqa: E402

INFOS = {info.name: info for info in optim_db if info.name in ft.__all__}
assert sorted(INFOS) == ["Adagrad", "Adam", "AdamW", "RMSprop", "SGD"]
STEPS = 4
SHAPES = [(0,), (1,), (13,), (4, 3)]
FLAGS = ("foreach", "fused", "capturable", "differentiable")


def configs(device="cpu"):
    """(name, desc, kwargs) of every optim_inputs_func config; on "cuda", those that need CUDA (capturable)."""
    rows = []
    for name, info in INFOS.items():
        cpu = {case.desc for case in info.optim_inputs_func("cpu")}
        for case in info.optim_inputs_func(device):
            if (device == "cpu") == (case.desc in cpu):
                rows.append((name, case.desc, case.kwargs))
    return rows


CONFIGS = configs()
CONFIG_IDS = [f"{name}-{desc}" for name, desc, _ in CONFIGS]
CAPTURABLE = configs("cuda")  # torch runs these on CUDA only; fastopt refuses capturable=True on every device


def fresh(kwargs):
    """Each optimizer its own copy (a tensor lr or betas is the optimizer's to hold)."""
    return copy.deepcopy(kwargs)


def make_params(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=dtype)) for shape in SHAPES]


def grads_for(params, step, seed=1):
    """Per step, a grad per param; the last param has none at step 1 (torch's step skips it, its state too)."""
    generator = torch.Generator().manual_seed(seed + step)
    return [None if (step == 1 and index == len(params) - 1) else
            torch.randn(param.shape, generator=generator, dtype=param.dtype) for index, param in enumerate(params)]


def run(optimizer, params, first, steps):
    for step in range(first, first + steps):
        for param, grad in zip(params, grads_for(params, step)):
            param.grad = grad
        optimizer.step()


def torch_class(name):
    return getattr(torch.optim, name)


def assert_same_run(ours, our_params, theirs, their_params, dtype, steps, what):
    """Params and every state tensor of torch's within atol + rtol |ref|, rtol a multiple of the dtype's eps; the
    same state names and the same ``step`` values."""
    rtol = 2 * tolerance(np.float32 if dtype == torch.float32 else np.float64, steps)  # two roundings: ours, torch's
    for index, (mine, reference) in enumerate(zip(our_params, their_params)):
        assert_close(mine.detach().numpy(), reference.detach().numpy(), rtol, f"{what}: param {index}")
        state, expected = ours.state[mine], theirs.state[reference]
        assert sorted(state) == sorted(expected), f"{what}: param {index} state names"
        for key, value in expected.items():
            if key == "step":
                assert float(state[key]) == float(value), f"{what}: param {index} step"
            else:
                assert_close(state[key].numpy(), value.numpy(), rtol, f"{what}: param {index} state {key}")


def assert_equal_nested(actual, expected, what="state dict"):
    assert type(actual) is type(expected) or (isinstance(actual, dict) and isinstance(expected, dict)), what
    if isinstance(expected, dict):
        assert sorted(map(str, actual)) == sorted(map(str, expected)), what
        for key in expected:
            assert_equal_nested(actual[key], expected[key], f"{what}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), what
        for index, (a, b) in enumerate(zip(actual, expected)):
            assert_equal_nested(a, b, f"{what}[{index}]")
    elif torch.is_tensor(expected):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), what
    else:
        assert actual == expected, what


# ---------------------------------------------------------------- the for-loop implementation as the oracle
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name,desc,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_matches_torch_forloop(name, desc, kwargs, dtype):
    """torch's test_forloop_goes_right_direction and the fast-path-equals-forloop comparison: params and state
    after every step, one param without a grad at one step, sizes 0, 1, 13 and 4x3."""
    ours_params, their_params = make_params(dtype), make_params(dtype)
    ours = getattr(ft, name)(ours_params, **fresh(kwargs))
    theirs = torch_class(name)(their_params, **fresh(kwargs), foreach=False)
    for step in range(STEPS):
        run(ours, ours_params, step, 1)
        run(theirs, their_params, step, 1)
        assert_same_run(ours, ours_params, theirs, their_params, dtype, step + 1, f"{name} {desc} step {step}")


# ---------------------------------------------------------------- errors (torch's test_errors)
@pytest.mark.parametrize("name", sorted(INFOS))
def test_errors(name):
    """Every optim_error_inputs_func case raises (or warns) as torch does: the same type and message pattern."""
    cls = getattr(ft, name)
    for case in INFOS[name].optim_error_inputs_func("cpu", torch.float32):
        given = case.optimizer_error_input
        assert case.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR, given.desc  # no step errors on the CPU
        if issubclass(case.error_type, Warning):
            with pytest.warns(case.error_type, match=case.error_regex):
                optimizer = cls(given.params, **given.kwargs)
            optimizer.step()  # goes on, as torch (fastopt keeps a repeated param once)
        else:
            with pytest.raises(case.error_type, match=case.error_regex):
                cls(given.params, **given.kwargs)


@pytest.mark.parametrize("name", sorted(INFOS))
def test_duplicate_param_is_kept_once(name):
    param = torch.nn.Parameter(torch.ones(3))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        optimizer = getattr(ft, name)([param, param])
    assert optimizer.param_groups[0]["params"] == [param]
    assert optimizer.state_dict()["param_groups"][0]["params"] == [0]


# ---------------------------------------------------------------- documented refusals (not skips)
@pytest.mark.parametrize("name,desc,kwargs", CAPTURABLE, ids=[f"{name}-{desc}" for name, desc, _ in CAPTURABLE])
def test_capturable_is_refused(name, desc, kwargs):
    with pytest.raises(ValueError, match="capturable=True is not supported"):
        getattr(ft, name)(make_params(torch.float32), **fresh(kwargs))


@pytest.mark.parametrize("name", sorted(INFOS))
def test_differentiable_complex_and_sparse_are_refused(name):
    cls = getattr(ft, name)
    with pytest.raises(ValueError, match="differentiable=True is not supported"):
        cls(make_params(torch.float32), differentiable=True)
    with pytest.raises(TypeError, match="complex64"):  # torch's supports_complex: fastopt does not
        cls([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])
    params = make_params(torch.float32)
    before = [param.detach().clone() for param in params]
    optimizer = cls(params)
    params[2].grad = torch.ones(13).to_sparse()  # torch's supports_sparse (SGD, Adagrad): fastopt does not
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()
    assert all(torch.equal(param, saved) for param, saved in zip(params, before))


# ---------------------------------------------------------------- state_dict hooks (torch's, as written there)
def state_dict_pre_hook(optimizer):
    optimizer.state["test"] = 1


def state_dict_post_hook(optimizer, state_dict):
    state_dict["ran_state_dict_pre_hook"] = state_dict["state"].pop("test", None) is not None
    return state_dict


def load_pre_hook1(optimizer, state_dict):
    state_dict["param_groups"][0]["lr"] = 0.002


def load_pre_hook2(optimizer, state_dict):
    state_dict = copy.deepcopy(state_dict)
    state_dict["param_groups"][0]["lr"] = 0.003
    return state_dict


def load_post_hook(optimizer):
    optimizer.state["ran_load_state_dict_pre_hook2"] = optimizer.param_groups[0]["lr"] == 0.003
    optimizer.state["ran_load_state_dict_post_hook"] = True


@pytest.mark.parametrize("name", sorted(INFOS))
def test_state_dict_hooks(name):
    """torch's test_state_dict_{pre,post,pre_post}_hook and test_load_state_dict_{pre_hook_and_prepend,post_hook,
    pre_post_hook}, over every config; what a load post-hook adds survives the load and the next steps."""
    cls = getattr(ft, name)
    for _, desc, kwargs in [row for row in CONFIGS if row[0] == name]:
        optimizer = cls(make_params(torch.float32), **fresh(kwargs))
        optimizer.register_state_dict_pre_hook(state_dict_pre_hook)
        assert optimizer.state_dict()["state"]["test"] == 1, desc
        optimizer.register_state_dict_post_hook(state_dict_post_hook)
        state_dict = optimizer.state_dict()
        assert "test" not in state_dict["state"] and state_dict["ran_state_dict_pre_hook"], desc

        params = make_params(torch.float32)
        optimizer = cls(params, **fresh(kwargs))
        run(optimizer, params, 0, 2)
        optimizer.register_state_dict_post_hook(state_dict_post_hook)
        assert not optimizer.state_dict()["ran_state_dict_pre_hook"], desc
        state_dict = optimizer.state_dict()
        optimizer.register_load_state_dict_pre_hook(load_pre_hook1)
        optimizer.load_state_dict(state_dict)
        assert optimizer.param_groups[0]["lr"] == 0.002, desc
        optimizer.register_load_state_dict_pre_hook(load_pre_hook2, prepend=True)
        optimizer.load_state_dict(state_dict)
        assert optimizer.param_groups[0]["lr"] == 0.002, desc  # prepended: hook1 runs last

        optimizer = cls(params, **fresh(kwargs))
        optimizer.register_load_state_dict_post_hook(load_post_hook)
        optimizer.load_state_dict(optimizer.state_dict())
        assert not optimizer.state["ran_load_state_dict_pre_hook2"], desc
        assert optimizer.state["ran_load_state_dict_post_hook"], desc
        optimizer.register_load_state_dict_pre_hook(load_pre_hook2)
        optimizer.load_state_dict(state_dict)
        assert optimizer.state["ran_load_state_dict_pre_hook2"] and optimizer.state["ran_load_state_dict_post_hook"]
        run(optimizer, params, 2, 1)
        assert optimizer.state["ran_load_state_dict_post_hook"], desc  # still there after a step

        optimizer.register_load_state_dict_post_hook(zero_buffers)  # the hook sees the live buffers
        optimizer.load_state_dict(state_dict)
        for entry in [entry for key, entry in optimizer.state_dict()["state"].items() if isinstance(key, int)]:
            assert all(not value.any() for key, value in entry.items() if key != "step"), desc


def zero_buffers(optimizer):
    for key, entry in optimizer.state.items():
        if torch.is_tensor(key):
            for name, value in entry.items():
                if name != "step":
                    value.zero_()


# ---------------------------------------------------------------- older checkpoints: keys torch fills in
@pytest.mark.parametrize("name,desc,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_older_checkpoint_gets_torch_defaults(name, desc, kwargs):
    """Each group key of a checkpoint removed in turn (as from an older torch), and every not_og_supported flag
    at once with Python-number steps (torch's test_can_load_older_state_dict and test_load_nontensor_step): where
    torch fills the key in, fastopt holds the value torch holds, not its constructor's; then both step alike."""
    built = dict(fresh(kwargs), maximize=not kwargs.get("maximize", False))  # constructor values != defaults
    if not torch.is_tensor(built.get("lr")):
        built["foreach"] = True
    their_params, our_params = make_params(torch.float32), make_params(torch.float32)
    theirs = torch_class(name)(their_params, **fresh(kwargs))
    run(theirs, their_params, 0, 2)
    saved = theirs.state_dict()
    for key in saved["param_groups"][0]:
        if key == "params":
            continue
        older = copy.deepcopy(saved)
        del older["param_groups"][0][key]
        reloaded = torch_class(name)(make_params(torch.float32), **fresh(built))
        reloaded.load_state_dict(copy.deepcopy(older))
        if key not in reloaded.param_groups[0]:
            continue  # torch fills in only the keys added after the class was first released
        ours = getattr(ft, name)(make_params(torch.float32), **fresh(built))
        ours.load_state_dict(older)
        expected = reloaded.param_groups[0][key]
        if key in ("capturable", "differentiable"):
            assert expected is False  # the only value fastopt runs
        assert ours.param_groups[0][key] == expected, f"{name} {desc}: {key}"

    older = copy.deepcopy(saved)
    for group in older["param_groups"]:
        for flag in INFOS[name].not_og_supported_flags:
            group.pop(flag, None)
    for entry in older["state"].values():
        if "step" in entry:
            entry["step"] = entry["step"].item()
    ours = getattr(ft, name)(our_params, **fresh(built))
    with torch.no_grad():
        for mine, reference in zip(our_params, their_params):
            mine.copy_(reference)
    ours.load_state_dict(copy.deepcopy(older))
    theirs.load_state_dict(older)
    run(ours, our_params, 2, 2)
    run(theirs, their_params, 2, 2)
    assert_same_run(ours, our_params, theirs, their_params, torch.float32, STEPS, f"{name} {desc}")


# ---------------------------------------------------------------- deepcopy, weights_only, checkpoints across
@pytest.mark.parametrize("name", sorted(INFOS))
def test_deepcopy_and_weights_only_round_trip(name):
    """torch's test_deepcopy_copies_all_public_attrs and test_save_load_equality_with_weights_only, per config: the
    copy has the same public attributes and steps on its own params as the original does on its."""
    cls = getattr(ft, name)
    for _, desc, kwargs in [row for row in CONFIGS if row[0] == name]:
        params = make_params(torch.float32)
        optimizer = cls(params, **fresh(kwargs))
        run(optimizer, params, 0, 2)
        copied = copy.deepcopy(optimizer)
        public = {key for key in vars(optimizer) if not key.startswith("_")}
        assert public == {key for key in vars(copied) if not key.startswith("_")}, desc
        copied_params = [param for group in copied.param_groups for param in group["params"]]
        assert all(a is not b and torch.equal(a, b) for a, b in zip(params, copied_params)), desc
        run(optimizer, params, 2, 2)
        run(copied, copied_params, 2, 2)
        assert all(torch.equal(a, b) for a, b in zip(params, copied_params)), desc

        state_dict = optimizer.state_dict()
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        buffer.seek(0)
        assert_equal_nested(torch.load(buffer, weights_only=True), state_dict, f"{desc}: state dict")


@pytest.mark.parametrize("name,desc,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_checkpoint_cross_loads(name, desc, kwargs):
    """Two steps with one implementation, a checkpoint through torch.save / torch.load(weights_only=True), two
    with the other (fastopt -> torch, torch -> fastopt, fastopt -> fastopt as torch's test_state_dict_deterministic):
    the same as four steps with torch; fastopt's state dict after is torch's."""
    reference_params = make_params(torch.float32)
    reference = torch_class(name)(reference_params, **fresh(kwargs), foreach=False)
    run(reference, reference_params, 0, STEPS)
    for first_class, second_class in [(getattr(ft, name), torch_class(name)), (torch_class(name), getattr(ft, name)),
                                      (getattr(ft, name), getattr(ft, name))]:
        params = make_params(torch.float32)
        first = first_class(params, **fresh(kwargs))
        run(first, params, 0, 2)
        buffer = io.BytesIO()
        torch.save(first.state_dict(), buffer)
        buffer.seek(0)
        resumed = make_params(torch.float32)
        with torch.no_grad():
            for param, saved in zip(resumed, params):
                param.copy_(saved)
        second = second_class(resumed, **fresh(kwargs))
        second.load_state_dict(torch.load(buffer, weights_only=True))
        run(second, resumed, 2, STEPS - 2)
        what = f"{name} {desc}: {first_class.__module__} -> {second_class.__module__}"
        assert_same_run(second, resumed, reference, reference_params, torch.float32, STEPS, what)
        if isinstance(second, ft.TorchOptimizer):
            ours, theirs = second.state_dict(), reference.state_dict()
            assert ours["param_groups"][0].keys() - {"fastopt_schedule"} == theirs["param_groups"][0].keys()
            assert sorted(ours["state"]) == sorted(theirs["state"]), what
