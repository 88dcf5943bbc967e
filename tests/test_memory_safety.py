"""The kernels write only memory the optimizer owns, whatever ordinary Python does around them, and a step is one
unit that an interrupt cannot cut in half.

Each test names the case of the memory-safety issue it covers. Where the failure mode of a regression is a crash
(a kernel writing freed memory), the scenario runs in a subprocess, so that a regression fails the test instead of
killing the test run. Bad input raises and leaves params and every state buffer byte-identical; the hypothesis fuzz
test at the end checks that over random sequences of bad input, then steps on beside a twin that never saw them.
"""
import copy
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import fastopt as fo
from fastopt import dtypes

BFLOAT16 = dtypes.numpy_dtype("bfloat16")


def problem(seed=0, sizes=(13, 1, 2 * 4096 + 7)):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(size).astype(np.float32) for size in sizes]
    grads = [[rng.standard_normal(size).astype(np.float32) for size in sizes] for _ in range(4)]
    return params, grads


def contents(optimizer):
    """Every byte the optimizer's steps depend on: params, state buffers, per-param and optimizer step counts."""
    state = [{name: buffer.tobytes() for name, buffer in entry.items()} for entry in optimizer.state]
    return ([param.tobytes() for param in optimizer.params], state, optimizer.step_count,
            optimizer._backend.tensor_steps().tolist())


def assert_same(optimizer, twin):
    for index, (ours, theirs) in enumerate(zip(optimizer.params, twin.params)):
        np.testing.assert_array_equal(ours, theirs, err_msg=f"param {index}")
    for index, (ours, theirs) in enumerate(zip(optimizer.state, twin.state)):
        assert set(ours) == set(theirs), f"state {index}"
        for name in ours:
            np.testing.assert_array_equal(ours[name], theirs[name], err_msg=f"state {index} {name}")
    assert optimizer.step_count == twin.step_count
    np.testing.assert_array_equal(optimizer._backend.tensor_steps(), twin._backend.tensor_steps())


def run_isolated(code, timeout=120):
    """Run ``code`` in a fresh interpreter (a crash there fails the test, not the run); return its stdout."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=timeout, env=dict(os.environ, NUMBA_NUM_THREADS="2"))
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


COPYABLE = [
    (fo.Adam, dict(lr=0.01)),
    (fo.AdamW, dict(lr=fo.schedules.cosine(0.01, 10), amsgrad=True, max_grad_norm=1.0)),
    (fo.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, guard=fo.Guard())),
    (fo.RMSprop, dict(lr=0.01, centered=True)),
]


# ---------------------------------------------------------------- case 1: copies and pickles
@pytest.mark.parametrize("duplicate", [copy.deepcopy, lambda optimizer: pickle.loads(pickle.dumps(optimizer))],
                         ids=["deepcopy", "pickle"])
@pytest.mark.parametrize("cls,kwargs", COPYABLE, ids=[cls.__name__ for cls, _ in COPYABLE])
def test_a_copy_steps_its_own_arrays_and_continues_as_the_original(duplicate, cls, kwargs):
    params, grads = problem()
    scales = [np.full(param.shape, 0.5, np.float32) for param in params]
    optimizer = cls([{"params": params[:2], "lr_scale": scales[:2]}, {"params": params[2:]}], **kwargs)
    optimizer.step(grads[0])
    copied = duplicate(optimizer)
    before = contents(optimizer)
    for grad in grads[1:]:
        copied.step(grad)
    assert contents(optimizer) == before, "stepping the copy changed the original"
    assert all(ours is not theirs for ours, theirs in zip(copied.params, optimizer.params))
    for grad in grads[1:]:
        optimizer.step(grad)
    assert_same(copied, optimizer)


def test_a_copy_outlives_its_original():
    run_isolated("""
        import copy, gc
        import numpy as np, fastopt as fo
        params = [np.ones(300_000, np.float32), np.ones(7, np.float32)]
        optimizer = fo.Adam(params, lr=0.1)
        grads = [np.ones(300_000, np.float32), np.ones(7, np.float32)]
        optimizer.step(grads)
        copied = copy.deepcopy(optimizer)
        del optimizer, params
        gc.collect()
        clutter = [np.full(300_000, 7.0, np.float32) for _ in range(8)]  # reuses the freed memory
        for _ in range(3):
            copied.step(grads)
        assert all((array == 7.0).all() for array in clutter)
        assert np.allclose(copied.params[0], 1.0 - 0.4, atol=1e-6)
    """)


def _step_in_child(optimizer, grads, results):
    optimizer.step(grads)
    results.put([param.copy() for param in optimizer.params])


def test_an_optimizer_passed_to_a_spawned_process_steps_there():
    params, grads = problem()
    optimizer = fo.Adam(params, lr=0.01)
    optimizer.step(grads[0])
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    child = context.Process(target=_step_in_child, args=(optimizer, grads[1], results))
    child.start()
    stepped = results.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0
    optimizer.step(grads[1])
    for ours, theirs in zip(optimizer.params, stepped):
        np.testing.assert_array_equal(ours, theirs)


# ---------------------------------------------------------------- case 2: state buffers replaced or deleted
def stepped_adam(seed=0, **kwargs):
    params, grads = problem(seed)
    optimizer = fo.Adam(params, lr=0.01, **kwargs)
    optimizer.step(grads[0])
    return optimizer, grads


def test_a_replaced_state_buffer_is_the_one_the_kernels_update():
    optimizer, grads = stepped_adam()
    twin, _ = stepped_adam()
    old = optimizer.state[2]["exp_avg"]
    new = old * 0.5
    optimizer.state[2]["exp_avg"] = new
    twin.state[2]["exp_avg"][...] = new
    frozen_old = old.copy()
    optimizer.step(grads[1])
    twin.step(grads[1])
    assert optimizer.state[2]["exp_avg"] is new
    np.testing.assert_array_equal(old, frozen_old)  # the old buffer is no longer written
    assert_same(optimizer, twin)


def _bad_replacements(optimizer):
    param = optimizer.params[2]
    other = optimizer.state[2]["exp_avg_sq"]
    return [
        ("exp_avg", np.zeros(5, np.float32), ValueError, "has shape"),
        ("exp_avg", np.zeros(param.shape, np.float64), TypeError, "stored as float32"),
        ("exp_avg", np.zeros(2 * param.size, np.float32)[::2], ValueError, "not C-contiguous"),
        ("exp_avg", np.frombuffer(bytes(param.nbytes), np.float32), ValueError, "read-only"),
        ("exp_avg", [0.0] * param.size, TypeError, "numpy.ndarray"),
        ("exp_avg", param, ValueError, "shares memory"),
        ("exp_avg", other, ValueError, "shares memory"),
        ("exp_avg", optimizer.params[0].view(), ValueError, "has shape"),
        ("momentum_buffer", np.zeros(param.shape, np.float32), KeyError, "keeps no buffer"),
    ]


@pytest.mark.parametrize("case", range(9))
def test_an_unfit_state_buffer_is_refused(case):
    optimizer, grads = stepped_adam()
    twin, _ = stepped_adam()
    name, array, error, message = _bad_replacements(optimizer)[case]
    before = contents(optimizer)
    with pytest.raises(error, match=message):
        optimizer.state[2][name] = array
    assert contents(optimizer) == before
    optimizer.step(grads[1])
    twin.step(grads[1])
    assert_same(optimizer, twin)


@pytest.mark.parametrize("edit", [
    lambda state: state[0].__delitem__("exp_avg"),
    lambda state: state[0].pop("exp_avg"),
    lambda state: state[0].clear(),
    lambda state: state[0].popitem(),
    lambda state: state.__setitem__(0, {}),
    lambda state: state.__delitem__(0),
], ids=["del", "pop", "clear", "popitem", "replace entry", "del entry"])
def test_deleting_state_is_refused(edit):
    optimizer, grads = stepped_adam()
    twin, _ = stepped_adam()
    before = contents(optimizer)
    with pytest.raises(TypeError, match="cannot be"):
        edit(optimizer.state)
    assert contents(optimizer) == before
    optimizer.step(grads[1])
    twin.step(grads[1])
    assert_same(optimizer, twin)


def test_a_replaced_buffer_freed_by_the_user_is_never_written():
    run_isolated("""
        import gc
        import numpy as np, fastopt as fo
        param = np.ones(300_000, np.float32)
        optimizer = fo.Adam([param], lr=0.1)
        grad = np.ones(300_000, np.float32)
        optimizer.step([grad])
        optimizer.state[0]["exp_avg"] = np.zeros(300_000, np.float32)
        optimizer.state[0]["exp_avg_sq"] = np.zeros(300_000, np.float32)
        gc.collect()
        clutter = [np.full(300_000, 7.0, np.float32) for _ in range(8)]
        for _ in range(3):
            optimizer.step([grad])
        assert all((array == 7.0).all() for array in clutter)
        print(float(optimizer.state[0]["exp_avg"][0]))
    """)


# ---------------------------------------------------------------- case 3: lr_scale replaced
def test_an_lr_scale_replaced_in_the_group_list_is_taken_in_and_checked():
    params, grads = problem(sizes=(13,))
    values = np.full(13, 2.0, np.float32)
    optimizer = fo.SGD([{"params": params, "lr_scale": [values.view()]}], lr=0.1)
    optimizer.step(grads[0])
    twin = fo.SGD([{"params": [params[0].copy()], "lr_scale": [np.full(13, 3.0, np.float32)]}], lr=0.1)
    scales = optimizer.param_groups[0]["lr_scale"]
    scales[0] = None  # frees the old view: CPython may give the next new object its id
    scales[0] = values.view()
    values[...] = -1.0
    before = contents(optimizer)
    with pytest.raises(ValueError, match="finite and >= 0"):
        optimizer.step(grads[1])
    assert contents(optimizer) == before
    values[...] = 3.0
    optimizer.step(grads[1])
    twin.step(grads[1])
    np.testing.assert_array_equal(optimizer.params[0], twin.params[0])


def test_an_lr_scale_that_shares_memory_with_a_param_is_refused():
    params, grads = problem(sizes=(13, 13))
    params = [np.abs(param) for param in params]  # valid scales but for the memory they share
    optimizer = fo.SGD(params, lr=0.1)
    optimizer.step(grads[0])
    before = contents(optimizer)
    optimizer.param_groups[0]["lr_scale"] = [np.ones(13, np.float32), params[0]]
    with pytest.raises(ValueError, match="shares memory"):
        optimizer.step(grads[1])
    assert contents(optimizer) == before
    with pytest.raises(ValueError, match="shares memory"):
        fresh = [np.ones(13, np.float32), np.ones(13, np.float32)]
        fo.SGD([{"params": fresh, "lr_scale": [fresh[1].copy(), fresh[0]]}])


def test_a_freed_lr_scale_is_never_read():
    run_isolated("""
        import gc
        import numpy as np, fastopt as fo
        param = np.zeros(300_000, np.float32)
        optimizer = fo.SGD([{"params": [param], "lr_scale": [np.ones(300_000, np.float32)]}], lr=1.0)
        grad = np.ones(300_000, np.float32)
        optimizer.step([grad])
        optimizer.param_groups[0]["lr_scale"][0] = None
        gc.collect()
        clutter = [np.full(300_000, np.nan, np.float32) for _ in range(8)]
        optimizer.param_groups[0]["lr_scale"][0] = np.full(300_000, 2.0, np.float32)
        optimizer.step([grad])
        assert (param == -3.0).all(), param[:4]
    """)


# ---------------------------------------------------------------- case 4: params replaced in a group
@pytest.mark.parametrize("edit", [
    lambda groups, params: groups[0]["params"].__setitem__(1, params[1].copy()),
    lambda groups, params: groups[0]["params"].append(np.zeros(3, np.float32)),
    lambda groups, params: groups[0]["params"].pop(),
    lambda groups, params: groups[0].__setitem__("params", [param.copy() for param in params]),
    lambda groups, params: groups.append({"params": [np.zeros(3, np.float32)], "lr": 0.1}),
    lambda groups, params: groups.pop(),
], ids=["replace", "append", "remove", "new list", "add group", "remove group"])
def test_a_param_replaced_in_its_group_is_refused(edit):
    optimizer, grads = stepped_adam()
    twin, _ = stepped_adam()
    saved = [dict(group, params=list(group["params"])) for group in optimizer.param_groups]
    edit(optimizer.param_groups, optimizer.params)
    before = contents(optimizer)
    with pytest.raises(ValueError, match="param"):
        optimizer.step(grads[1])
    assert contents(optimizer) == before
    optimizer.param_groups[:] = saved  # restored: the optimizer steps on as if nothing happened
    optimizer.step(grads[1])
    twin.step(grads[1])
    assert_same(optimizer, twin)


# ---------------------------------------------------------------- case 5: torch params re-pointed
def test_a_torch_param_transposed_in_place_is_refused():
    torch = pytest.importorskip("torch")
    import fastopt.torch as fot

    weight = torch.nn.Parameter(torch.arange(4.0).reshape(2, 2))
    optimizer = fot.SGD([weight], lr=1.0)
    weight.grad = torch.ones(2, 2)
    optimizer.step()
    weight.data = weight.data.t()  # same storage, other order
    weight.grad = torch.ones(2, 2)
    before = weight.detach().clone()
    with pytest.raises(ValueError, match="not contiguous"):
        optimizer.step()
    assert torch.equal(weight.detach(), before)


# ---------------------------------------------------------------- case 6: grads that overlap written memory
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("overlap", ["shifted param", "own param", "other param", "state"])
def test_a_grad_sharing_memory_with_a_written_buffer_is_refused(backend, overlap):
    memory = np.zeros(2 * 9000 + 1, np.float32)
    params = [memory[:9000], memory[9001:]]
    grads = [np.ones(9000, np.float32), np.ones(9000, np.float32)]
    optimizer = fo.Adam(params, lr=0.1, backend=backend)
    optimizer.step(grads)
    bad = {"shifted param": memory[1:9001], "own param": params[0], "other param": params[1],
           "state": optimizer.state[0]["exp_avg"]}[overlap]
    before = contents(optimizer)
    with pytest.raises(ValueError, match=r"grads\[0\] shares memory"):
        optimizer.step([bad, grads[1]])
    assert contents(optimizer) == before
    optimizer.step(grads)  # and steps on


def test_grads_may_share_memory_with_each_other_and_with_lr_scale():
    params, grads = problem(sizes=(13, 13))
    scale = np.ones(13, np.float32)
    optimizer = fo.SGD([{"params": params, "lr_scale": [scale, scale]}], lr=0.1)
    optimizer.step([grads[0][0], grads[0][0]])  # read-only memory may be read by many
    optimizer.step([scale, scale])


# ---------------------------------------------------------------- case 7: an interrupt during a step
@pytest.mark.parametrize("when", ["before the kernels", "after the kernels"])
@pytest.mark.parametrize("control", [{}, {"max_grad_norm": 1.0}], ids=["plain", "clipped"])
def test_an_interrupt_during_a_step_is_raised_once_the_step_is_whole(monkeypatch, when, control):
    optimizer, grads = stepped_adam(**control)
    twin, _ = stepped_adam(**control)
    engine = type(optimizer._backend)
    real_step = engine.step

    def interrupted_step(self, *args, **kwargs):
        if when == "before the kernels":
            os.kill(os.getpid(), signal.SIGINT)
        real_step(self, *args, **kwargs)
        if when == "after the kernels":
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(engine, "step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        optimizer.step(grads[1])
    monkeypatch.setattr(engine, "step", real_step)
    twin.step(grads[1])
    assert_same(optimizer, twin)
    optimizer.step(grads[2])
    twin.step(grads[2])
    assert_same(optimizer, twin)


def stepped_torch_adam():
    """A ``fastopt.torch.Adam`` (lr 0.1) over one param of 5 ones, after one step with grads of ones."""
    torch = pytest.importorskip("torch")
    import fastopt.torch as fot

    weight = torch.nn.Parameter(torch.ones(5))
    optimizer = fot.Adam([weight], lr=0.1)
    weight.grad = torch.ones(5)
    optimizer.step()
    return weight, optimizer


def test_an_interrupt_during_a_torch_step_leaves_torch_steps_in_line(monkeypatch):
    weight, optimizer = stepped_torch_adam()
    core_engine = type(optimizer.core._backend)
    real_step = core_engine.step

    def interrupted_step(self, *args, **kwargs):
        real_step(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(core_engine, "step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        optimizer.step()
    assert optimizer.core.step_count == 2
    assert float(optimizer.state[weight]["step"]) == 2.0


def test_interrupts_elsewhere_are_not_held():
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):  # the handler runs between bytecodes
            pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---------------------------------------------------------------- one optimizer, two threads
def test_stepping_one_optimizer_from_two_threads_at_once_is_refused(monkeypatch):
    optimizer, grads = stepped_adam()
    engine = type(optimizer._backend)
    real_step, inside, release = engine.step, threading.Event(), threading.Event()

    def slow_step(self, *args, **kwargs):
        inside.set()
        release.wait(timeout=30)
        real_step(self, *args, **kwargs)

    monkeypatch.setattr(engine, "step", slow_step)
    worker = threading.Thread(target=optimizer.step, args=(grads[1],))
    worker.start()
    assert inside.wait(timeout=30)
    try:
        with pytest.raises(RuntimeError, match="from one thread at a time"):
            optimizer.step(grads[2])
    finally:
        release.set()
        worker.join(timeout=30)
    assert optimizer.step_count == 2


# ---------------------------------------------------------------- case 9: incomplete checkpoints
def test_a_checkpoint_missing_a_buffer_of_a_stepped_param_is_refused():
    optimizer, grads = stepped_adam()
    saved = optimizer.state_dict()
    del saved["state"][1]["exp_avg_sq"]
    fresh, _ = stepped_adam(seed=1)
    before = contents(fresh)
    with pytest.raises(KeyError, match="exp_avg_sq"):
        fresh.load_state_dict(saved)
    assert contents(fresh) == before


def test_a_checkpoint_missing_a_buffer_its_loaded_options_use_is_refused():
    optimizer, _ = stepped_adam()
    saved = optimizer.state_dict()
    saved["param_groups"][0]["amsgrad"] = True  # the checkpoint says amsgrad, but has no max_exp_avg_sq
    fresh, _ = stepped_adam()
    with pytest.raises(KeyError, match="max_exp_avg_sq"):
        fresh.load_state_dict(saved)


def test_a_torch_checkpoint_missing_a_buffer_is_refused():
    torch = pytest.importorskip("torch")
    import fastopt.torch as fot

    weight = torch.nn.Parameter(torch.ones(5))
    reference = torch.optim.Adam([weight], lr=0.1)
    weight.grad = torch.ones(5)
    reference.step()
    saved = reference.state_dict()
    del saved["state"][0]["exp_avg_sq"]
    optimizer = fot.Adam([torch.nn.Parameter(torch.ones(5))], lr=0.5)
    with pytest.raises(KeyError, match="exp_avg_sq"):
        optimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["lr"] == 0.5


# ---------------------------------------------------------------- case 10: a bad fastopt_step_count
@pytest.mark.parametrize("count", [-1, 1.5, "x", float("nan")])
def test_a_bad_torch_step_count_leaves_the_optimizer_as_it_was(count):
    torch = pytest.importorskip("torch")
    weight, optimizer = stepped_torch_adam()
    saved = optimizer.state_dict()
    saved["param_groups"][0]["lr"] = 0.5
    saved["fastopt_step_count"] = count
    live = optimizer.state[weight]["exp_avg"]
    with pytest.raises(ValueError, match="fastopt_step_count"):
        optimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["lr"] == 0.1
    assert optimizer.state[weight]["exp_avg"] is live
    optimizer.step()
    assert torch.equal(live, optimizer.state[weight]["exp_avg"])
    assert live.data_ptr() == optimizer.core.state[0]["exp_avg"].ctypes.data


# ---------------------------------------------------------------- case 12: a grad norm that overflows
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_an_overflowing_grad_norm_clips_to_zero_as_torch_does(backend):
    torch = pytest.importorskip("torch")
    grad = np.full(4, 1e200)
    param = np.ones(4)
    optimizer = fo.SGD([param], lr=0.1, momentum=0.9, weight_decay=0.1, max_grad_norm=1.0, backend=backend)
    optimizer.step([grad])
    weight = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    reference = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=0.1)
    weight.grad = torch.from_numpy(grad.copy())
    torch.nn.utils.clip_grad_norm_([weight], 1.0)
    reference.step()
    np.testing.assert_array_equal(param, weight.detach().numpy())
    assert optimizer.last_grad_norm == np.inf and optimizer.skipped_steps == 0


# ---------------------------------------------------------------- case 15: 0-d bfloat16 with stochastic rounding
def test_the_reference_rounds_a_0d_bfloat16_param_stochastically_as_the_kernels():
    results = []
    for backend in ("reference", "cpu"):
        param = np.array(1.5, dtype=BFLOAT16)
        optimizer = fo.SGD([param], lr=0.1, rounding="stochastic", seed=3, backend=backend)
        for step in range(8):
            optimizer.step([np.array(0.37 + step / 100, dtype=np.float32)])
        results.append(param.view(np.uint16).item())
    assert results[0] == results[1]


# ---------------------------------------------------------------- the fuzz test
def _bad_grads(shift):
    def apply(optimizer, grads):
        param = optimizer.params[2]
        choices = [
            grads[:2],
            [grads[0], grads[1], np.ones(param.size + 1, np.float32)],
            [grads[0], grads[1], grads[2].astype(np.float64)],
            [grads[0], grads[1], np.ones(2 * param.size, np.float32)[::2]],
            [grads[0], grads[1], param],
            [grads[0], grads[1], optimizer.state[2]["exp_avg"]],
            [grads[0], grads[1], list(grads[2])],
        ]
        optimizer.step(choices[shift % len(choices)])
    return apply


def _bad_group_value(key, value):
    def apply(optimizer, grads):
        group = optimizer.param_groups[0]
        saved = group[key]
        group[key] = value
        try:
            optimizer.step(grads)
        finally:
            group[key] = saved
    return apply


def _bad_state(kind):
    def apply(optimizer, grads):
        param = optimizer.params[2]
        array = {"shape": np.zeros(3, np.float32), "dtype": np.zeros(param.shape),
                 "param": param, "other": optimizer.state[2]["exp_avg_sq"]}[kind]
        optimizer.state[2]["exp_avg"] = array
    return apply


def _bad_checkpoint(kind):
    def apply(optimizer, grads):
        saved = optimizer.state_dict()
        if kind == "missing":
            del saved["state"][2]["exp_avg"]
        elif kind == "shape":
            saved["state"][2]["exp_avg"] = np.zeros(3, np.float32)
        elif kind == "step":
            saved["state"][0]["step"] = -2
        else:
            saved["param_groups"][0]["betas"] = (0.9, 1.5)
        optimizer.load_state_dict(saved)
    return apply


def _bad_scale(value):
    def apply(optimizer, grads):
        optimizer.step(grads, grad_scale=value)
    return apply


def _bad_lr_scale(kind):
    def apply(optimizer, grads):
        group = optimizer.param_groups[1]
        param = group["params"][0]
        bad = {"negative": -np.ones(param.shape, np.float32), "nan": np.full(param.shape, np.nan, np.float32),
               "shape": np.ones(param.size + 1, np.float32), "param": param}[kind]
        group["lr_scale"] = [bad]
        try:
            optimizer.step(grads)
        finally:
            group["lr_scale"] = None
    return apply


BAD_INPUT = st.one_of(
    st.integers(0, 6).map(_bad_grads),
    st.tuples(st.sampled_from(["lr", "weight_decay", "eps"]),
              st.sampled_from([-1.0, float("nan"), float("inf"), "0.1", None])).map(lambda kv: _bad_group_value(*kv)),
    st.sampled_from([(0.9, 1.0), (-0.1, 0.9), (0.9,), "betas"]).map(lambda value: _bad_group_value("betas", value)),
    st.sampled_from([True, 1]).map(lambda value: _bad_group_value("nesterov", value)),
    st.sampled_from(["shape", "dtype", "param", "other"]).map(_bad_state),
    st.sampled_from(["missing", "shape", "step", "betas"]).map(_bad_checkpoint),
    st.sampled_from([0.0, -1.0, float("nan"), np.ones(2)]).map(_bad_scale),
    st.sampled_from(["negative", "nan", "shape", "param"]).map(_bad_lr_scale),
)


def fuzz_optimizer():
    rng = np.random.default_rng(7)
    params = [rng.standard_normal(size).astype(np.float32) for size in (5, 1, 4099)]
    return fo.Adam([{"params": params[:2]}, {"params": params[2:], "lr": 0.02}], lr=0.01, weight_decay=0.1)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad=st.lists(BAD_INPUT, min_size=1, max_size=3), steps_first=st.integers(0, 2))
def test_bad_input_never_changes_anything(bad, steps_first):
    optimizer, twin = fuzz_optimizer(), fuzz_optimizer()
    rng = np.random.default_rng(steps_first)
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in optimizer.params] for _ in range(3)]
    for grad in grads[:steps_first]:
        optimizer.step(grad)
        twin.step(grad)
    for apply in bad:
        before = contents(optimizer)
        with pytest.raises((ValueError, TypeError, KeyError)):
            apply(optimizer, grads[2])
        assert contents(optimizer) == before
    optimizer.step(grads[2])
    twin.step(grads[2])
    assert_same(optimizer, twin)
