"""fastopt.torch beside torch.optim: a small real model (an MLP on scikit-learn's digits) trained side by side,
params and state compared; schedulers, fastopt schedules, checkpoints both ways, GradScaler, closures,
zero_grad, add_param_group, bad input. GPU tests at the end (CUDA tensors through CuPy), skipped without one."""
import copy
import io
import os
import sys
import warnings

import numpy as np
import pytest

import fastopt as fo
from configs import ANCHORS
from conftest import assert_close, tolerance

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastopt.torch")
lr_scheduler = torch.optim.lr_scheduler

STEPS = 120
BATCH = 64


def anchor_class(name):
    """torch.optim's optimizer ``name``, or that of the package that defines it (configs.ANCHORS)."""
    module, class_name, _ = ANCHORS.get(name, ("torch.optim", name, True))
    return getattr(pytest.importorskip(module), class_name)


@pytest.fixture(scope="module")
def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    data = datasets.load_digits()
    return torch.tensor(data.data[:1024] / 16.0), torch.tensor(data.target[:1024])


class Net(torch.nn.Module):
    """An MLP with an auxiliary head that only some steps use: on the others its params get no grad."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(64, 32)
        self.head = torch.nn.Linear(32, 10)
        self.aux = torch.nn.Linear(64, 10)

    def forward(self, x, use_aux):
        out = self.head(torch.tanh(self.body(x)))
        return out + self.aux(x) if use_aux else out


def make_net(dtype, device="cpu"):
    torch.manual_seed(0)
    return Net().to(device=device, dtype=dtype)


def loss_at(net, data, t, sign=1.0):
    """The loss of minibatch ``t``; the aux head is used on every third step."""
    inputs, targets = data
    rows = slice((t * BATCH) % len(inputs), (t * BATCH) % len(inputs) + BATCH)
    x = inputs[rows].to(device=next(net.parameters()).device, dtype=next(net.parameters()).dtype)
    y = targets[rows].to(x.device)
    return sign * torch.nn.functional.cross_entropy(net(x, use_aux=t % 3 == 0), y)


def train(net, optimizer, data, steps, *, scheduler=None, first=0, sign=1.0):
    for t in range(first, first + steps):
        optimizer.zero_grad()
        loss_at(net, data, t, sign).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def assert_same(ours, theirs, net_ours, net_theirs, dtype, steps):
    """Params, state (every buffer and ``step``) and hyperparameters agree to float rounding (``theirs``, the
    torch.optim run, is the expected side). Beyond the keys of an anchor outside torch.optim, ours may hold torch's
    ``maximize`` and ``differentiable`` (which torch's Optimizer adds to the defaults on a load)."""
    rtol = tolerance(np.dtype(str(dtype).removeprefix("torch.")), steps)
    for (name, ours_param), theirs_param in zip(net_ours.named_parameters(), net_theirs.parameters()):
        assert ours_param.dtype == theirs_param.dtype
        assert_close(ours_param.detach().cpu().numpy(), theirs_param.detach().cpu().numpy(), rtol, name)
    ours_dict, theirs_dict = ours.state_dict(), theirs.state_dict()
    assert ours_dict["state"].keys() == theirs_dict["state"].keys()
    for index, entry in theirs_dict["state"].items():
        assert ours_dict["state"][index].keys() == entry.keys(), f"state of param {index}"
        for name, value in entry.items():
            mine = ours_dict["state"][index][name]
            assert mine.dtype == value.dtype and mine.device == value.device, f"param {index} {name}"
            if name == "step":
                assert mine.item() == value.item(), f"param {index} step"
            else:
                assert_close(mine.cpu().numpy(), value.cpu().numpy(), rtol, f"param {index} state {name}")
    extra = set() if type(theirs).__module__.startswith("torch.optim") else {"maximize", "differentiable"}
    assert ([{k: v for k, v in g.items() if k != "params" and k not in extra - g_theirs.keys()}
             for g, g_theirs in zip(ours_dict["param_groups"], theirs_dict["param_groups"])]
            == [{k: v for k, v in g.items() if k != "params"} for g in theirs_dict["param_groups"]])


# ---------------------------------------------------------------- training side by side
# (optimizer, keyword arguments, torch scheduler): every option, and schedulers that write lr, momentum or betas.
CONFIGS = [
    ("SGD", dict(lr=0.1), lambda o: lr_scheduler.StepLR(o, step_size=30, gamma=0.5)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
     lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=STEPS)),
    ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.2, maximize=True),
     lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=STEPS)),  # cycles momentum too
    ("RMSprop", dict(lr=1e-3), lambda o: lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=40)),
    ("RMSprop", dict(lr=1e-3, alpha=0.9, centered=True, momentum=0.5, weight_decay=1e-3),
     lambda o: lr_scheduler.ExponentialLR(o, gamma=0.99)),
    ("Adam", dict(lr=3e-3, amsgrad=True, weight_decay=1e-3),
     lambda o: lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=STEPS)),  # cycles betas[0] too
    ("Adam", dict(lr=3e-3, maximize=True, eps=1e-6), lambda o: lr_scheduler.MultiStepLR(o, [50, 90], gamma=0.3)),
    ("Adam", dict(lr=3e-3, decoupled_weight_decay=True, weight_decay=0.1),
     lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=25)),
    ("AdamW", dict(lr=3e-3), lambda o: lr_scheduler.LambdaLR(o, lambda t: 1 / (1 + 0.02 * t))),
    ("AdamW", dict(lr=3e-3, amsgrad=True, betas=(0.8, 0.99), weight_decay=0.1),
     lambda o: lr_scheduler.CyclicLR(o, base_lr=1e-3, max_lr=5e-3, step_size_up=20)),  # cycles betas[0] too
    ("Adagrad", dict(lr=0.05, lr_decay=1e-3, weight_decay=1e-3), lambda o: lr_scheduler.StepLR(o, 40, 0.5)),
    ("Adagrad", dict(lr=0.05, initial_accumulator_value=0.1, eps=1e-6, maximize=True),
     lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=STEPS)),
    ("Lion", dict(lr=3e-4, weight_decay=0.1),
     lambda o: lr_scheduler.OneCycleLR(o, max_lr=1e-3, total_steps=STEPS)),  # cycles betas[0] too
    ("Lion", dict(lr=1e-4, betas=(0.95, 0.98)), lambda o: lr_scheduler.ExponentialLR(o, gamma=0.99)),
]
CONFIG_IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kwargs.items())}" for name, kwargs, _ in CONFIGS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,kwargs,make_scheduler", CONFIGS, ids=CONFIG_IDS)
def test_training_matches_torch(name, kwargs, make_scheduler, dtype, digits):
    sign = -1.0 if kwargs.get("maximize") else 1.0
    runs = []
    for make in (getattr(ft, name), anchor_class(name)):
        net = make_net(dtype)
        optimizer = make(net.parameters(), **kwargs)
        train(net, optimizer, digits, STEPS, scheduler=make_scheduler(optimizer), sign=sign)
        runs.append((net, optimizer))
    (net_ours, ours), (net_theirs, theirs) = runs
    assert_same(ours, theirs, net_ours, net_theirs, dtype, STEPS)


def test_mixed_dtypes_and_shapes_in_one_optimizer(digits):
    """float64 and float32 params (and an empty one) in one optimizer: one kernel call per dtype."""
    runs = []
    for module in (ft, torch.optim):
        net = make_net(torch.float32)
        net.aux.to(torch.float64)
        empty = torch.nn.Parameter(torch.zeros(0, 3))
        optimizer = module.Adam([*net.parameters(), empty], lr=3e-3)
        inputs, targets = digits
        for t in range(40):
            optimizer.zero_grad()
            x, y = inputs[t * 16:(t + 1) * 16], targets[t * 16:(t + 1) * 16]
            loss = (torch.nn.functional.cross_entropy(net(x.float(), use_aux=False), y)
                    + torch.nn.functional.cross_entropy(net.aux(x), y).float() + empty.sum())
            loss.backward()
            optimizer.step()
        runs.append((net, optimizer))
    (net_ours, ours), (net_theirs, theirs) = runs
    assert_same(ours, theirs, net_ours, net_theirs, torch.float32, 40)


# ---------------------------------------------------------------- fastopt schedules as lr
@pytest.mark.parametrize("name,kwargs", [("SGD", dict(momentum=0.9)), ("AdamW", {})])
def test_fastopt_schedule_matches_torch_scheduler(name, kwargs, digits):
    """A schedule evaluated in the kernel gives what torch reaches with the equivalent scheduler."""
    net_ours, net_theirs = make_net(torch.float32), make_net(torch.float32)
    schedule = fo.schedules.sequential([fo.schedules.linear(0.01, start_factor=0.1, total_iters=10),
                                        fo.schedules.cosine(0.01, t_max=STEPS - 10)], milestones=[10])
    ours = getattr(ft, name)(net_ours.parameters(), lr=schedule, **kwargs)
    theirs = getattr(torch.optim, name)(net_theirs.parameters(), lr=0.01, **kwargs)
    scheduler = lr_scheduler.SequentialLR(theirs, [lr_scheduler.LinearLR(theirs, start_factor=0.1, total_iters=10),
                                                   lr_scheduler.CosineAnnealingLR(theirs, T_max=STEPS - 10)], [10])
    for t in range(STEPS):
        assert ours.current_lr()[0] == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-12)
        for net, optimizer in ((net_ours, ours), (net_theirs, theirs)):
            optimizer.zero_grad()
            loss_at(net, digits, t).backward()
            optimizer.step()
        scheduler.step()
    rtol = tolerance(np.float32, STEPS)
    for (label, ours_param), theirs_param in zip(net_ours.named_parameters(), net_theirs.parameters()):
        assert_close(ours_param.detach().numpy(), theirs_param.detach().numpy(), rtol, label)
    assert ours.param_groups[0]["lr"] is schedule


def test_schedule_checkpoint_loads_without_pickle_and_resumes(digits):
    """A schedule is saved as plain data (weights_only loading works) and resumes at its step count; torch.optim
    loading the same checkpoint gets the schedule's current value as a float lr."""
    schedule = fo.schedules.onecycle(0.01, total_steps=60)
    net, straight_net = make_net(torch.float32), make_net(torch.float32)
    straight = ft.Adam(straight_net.parameters(), lr=schedule)
    train(straight_net, straight, digits, 60)

    first = ft.Adam(net.parameters(), lr=schedule)
    train(net, first, digits, 30)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    assert checkpoint["param_groups"][0]["lr"] == pytest.approx(schedule(30), rel=1e-12)
    second = ft.Adam(net.parameters(), lr=0.5)
    second.load_state_dict(checkpoint)
    assert second.param_groups[0]["lr"] == schedule and second.core.step_count == 30
    train(net, second, digits, 30, first=30)
    for ours, theirs in zip(net.parameters(), straight_net.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)

    plain = torch.optim.Adam(make_net(torch.float32).parameters())
    plain.load_state_dict(checkpoint)
    assert plain.param_groups[0]["lr"] == pytest.approx(schedule(30), rel=1e-12)


def test_schedule_with_torch_scheduler_is_an_error(digits):
    net = make_net(torch.float32)
    optimizer = ft.SGD(net.parameters(), lr=fo.schedules.cosine(0.1, t_max=10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lr_scheduler.StepLR(optimizer, step_size=3)  # writes 'initial_lr'; its first step() would fail in torch
    before = [p.detach().clone() for p in net.parameters()]
    loss_at(net, digits, 0).backward()
    with pytest.raises(TypeError, match="fastopt schedule and a torch lr scheduler"):
        optimizer.step()
    for param, saved in zip(net.parameters(), before):
        assert torch.equal(param, saved)


# ---------------------------------------------------------------- checkpoints both ways
CHECKPOINT_CONFIGS = [("SGD", dict(lr=0.05, momentum=0.9)), ("RMSprop", dict(lr=1e-3, centered=True, momentum=0.3)),
                      ("Adam", dict(lr=3e-3, amsgrad=True)), ("AdamW", dict(lr=3e-3)),
                      ("Adagrad", dict(lr=0.05, lr_decay=1e-3, initial_accumulator_value=0.1)),
                      ("Lion", dict(lr=3e-4, weight_decay=0.1))]


def checkpoint_round_trip(optimizer, net):
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("direction", ["fastopt_to_torch", "torch_to_fastopt"])
@pytest.mark.parametrize("name,kwargs", CHECKPOINT_CONFIGS, ids=[c[0] for c in CHECKPOINT_CONFIGS])
def test_checkpoint_cross_loading(name, kwargs, direction, digits):
    """Half the steps with one implementation, a checkpoint (torch.save / torch.load(weights_only=True)), the
    other half with the other: the same as all steps with torch. The aux head has no state at the checkpoint
    (it gets its first grad only after it): for SGD its momentum buffer must start as its grad afterwards."""
    def aux_late(t):
        return t % 3 == 0 and t >= 70

    def run(net, optimizer, scheduler, first, steps):
        for t in range(first, first + steps):
            optimizer.zero_grad()
            inputs, targets = digits
            rows = slice((t * BATCH) % len(inputs), (t * BATCH) % len(inputs) + BATCH)
            out = net(inputs[rows].float(), use_aux=aux_late(t))
            torch.nn.functional.cross_entropy(out, targets[rows]).backward()
            optimizer.step()
            scheduler.step()

    reference_net = make_net(torch.float32)
    reference = anchor_class(name)(reference_net.parameters(), **kwargs)
    run(reference_net, reference, lr_scheduler.StepLR(reference, 25, 0.5), 0, STEPS)

    first_class, second_class = (getattr(ft, name), anchor_class(name))[::1 if direction == "fastopt_to_torch" else -1]
    net = make_net(torch.float32)
    first = first_class(net.parameters(), **kwargs)
    scheduler = lr_scheduler.StepLR(first, 25, 0.5)
    run(net, first, scheduler, 0, STEPS // 2)
    checkpoint = checkpoint_round_trip(first, net)
    checkpoint["scheduler"] = scheduler.state_dict()
    # Body and head: aux has had no grad yet (torch's Adagrad makes every param's state at construction).
    assert len(checkpoint["optimizer"]["state"]) == (6 if name == "Adagrad" else 4)

    resumed_net = make_net(torch.float32)
    resumed_net.load_state_dict(checkpoint["model"])
    second = second_class(resumed_net.parameters(), **kwargs)
    scheduler = lr_scheduler.StepLR(second, 25, 0.5)
    scheduler.load_state_dict(checkpoint["scheduler"])
    second.load_state_dict(checkpoint["optimizer"])
    run(resumed_net, second, scheduler, STEPS // 2, STEPS - STEPS // 2)
    assert_same(second, reference, resumed_net, reference_net, torch.float32, STEPS)


def test_loaded_state_is_copied_not_shared(digits):
    net = make_net(torch.float32)
    optimizer = ft.Adam(net.parameters())
    train(net, optimizer, digits, 3)
    state_dict = copy.deepcopy(optimizer.state_dict())
    other = ft.Adam(make_net(torch.float32).parameters())
    other.load_state_dict(state_dict)
    state_dict["state"][0]["exp_avg"].fill_(7.0)
    assert not torch.equal(other.state_dict()["state"][0]["exp_avg"], state_dict["state"][0]["exp_avg"])


def test_state_tensors_are_the_live_buffers(digits):
    net = make_net(torch.float32)
    optimizer = ft.Adam(net.parameters())
    train(net, optimizer, digits, 2)
    state = optimizer.state[net.body.weight]
    assert state["step"].item() == 2 and state["step"].dtype == torch.float32 and state["step"].shape == ()
    exp_avg = state["exp_avg"]
    train(net, optimizer, digits, 1, first=2)
    assert optimizer.state[net.body.weight]["exp_avg"] is exp_avg and state["step"].item() == 3
    assert optimizer.state[net.aux.weight]["step"].item() == 1  # aux: steps 0 only (2 was not a multiple of 3)
    np.testing.assert_array_equal(exp_avg.numpy(), optimizer.core.state[0]["exp_avg"])


# ---------------------------------------------------------------- GradScaler, closure, zero_grad
@pytest.mark.parametrize("name,kwargs", [("Adam", dict(lr=3e-3)), ("SGD", dict(lr=0.05, momentum=0.9))])
def test_grad_scaler_skips_nonfinite_steps(name, kwargs, digits):
    """GradScaler unscales the grads in place before the step; a step with inf grads is skipped: params and
    state stay as they were, bit for bit, and the run agrees with torch.optim's."""
    bad_steps = {5, 6, 30}
    runs = []
    for module in (ft, torch.optim):
        net = make_net(torch.float32)
        optimizer = getattr(module, name)(net.parameters(), **kwargs)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=4)
        for t in range(40):
            optimizer.zero_grad()
            scaler.scale(loss_at(net, digits, t)).backward()
            if t in bad_steps:
                net.body.weight.grad[0, 0] = float("inf")
                before = ([p.detach().clone() for p in net.parameters()],
                          copy.deepcopy(optimizer.state_dict()["state"]))
            scaler.step(optimizer)
            scaler.update()
            if t in bad_steps:
                for param, saved in zip(net.parameters(), before[0]):
                    assert torch.equal(param, saved)
                state = optimizer.state_dict()["state"]
                for index, entry in before[1].items():
                    for key, value in entry.items():
                        assert torch.equal(state[index][key], value), (t, index, key)
        runs.append((net, optimizer))
    (net_ours, ours), (net_theirs, theirs) = runs
    assert_same(ours, theirs, net_ours, net_theirs, torch.float32, 40)


def test_closure(digits):
    runs = []
    for module in (ft, torch.optim):
        net = make_net(torch.float32)
        optimizer = module.RMSprop(net.parameters(), lr=1e-3)
        calls = []

        def closure(t):
            optimizer.zero_grad()
            loss = loss_at(net, digits, t)
            loss.backward()
            calls.append(t)
            return loss

        with torch.no_grad():  # the closure runs with grad enabled all the same, as in torch
            losses = [optimizer.step(lambda t=t: closure(t)) for t in range(10)]
        assert calls == list(range(10)) and all(isinstance(loss, torch.Tensor) for loss in losses)
        runs.append((net, optimizer, losses))
    assert [loss.item() for loss in runs[0][2]] == pytest.approx([loss.item() for loss in runs[1][2]], rel=1e-5)
    assert_same(runs[0][1], runs[1][1], runs[0][0], runs[1][0], torch.float32, 10)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none, digits):
    """Grads set to None skip the next step (params, state and step count); zeroed grads still step (Adam's
    moments keep moving the params), both as in torch."""
    runs = []
    for module in (ft, torch.optim):
        net = make_net(torch.float32)
        optimizer = module.Adam(net.parameters(), lr=1e-2)
        train(net, optimizer, digits, 3)
        optimizer.zero_grad(set_to_none=set_to_none)
        assert (net.body.weight.grad is None) == set_to_none
        optimizer.step()
        runs.append((net, optimizer))
    (net_ours, ours), (net_theirs, theirs) = runs
    assert ours.state[net_ours.body.weight]["step"].item() == (3 if set_to_none else 4)
    assert_same(ours, theirs, net_ours, net_theirs, torch.float32, 4)


# ---------------------------------------------------------------- param groups
def test_add_param_group_and_group_hyperparameters(digits):
    """The head joins later with its own lr and betas; a group's hyperparameters edited between steps."""
    runs = []
    for module in (ft, torch.optim):
        net = make_net(torch.float64)
        optimizer = module.Adam([{"params": net.body.parameters()}, {"params": net.aux.parameters(), "lr": 1e-2}],
                                lr=3e-3)
        train(net, optimizer, digits, 10)
        optimizer.add_param_group({"params": list(net.head.parameters()), "lr": 5e-3, "betas": (0.8, 0.9)})
        train(net, optimizer, digits, 10, first=10)
        optimizer.param_groups[0]["weight_decay"] = 0.1
        optimizer.param_groups[1].update(eps=1e-4, maximize=True)
        train(net, optimizer, digits, 10, first=20)
        runs.append((net, optimizer))
    (net_ours, ours), (net_theirs, theirs) = runs
    assert len(ours.param_groups) == 3
    assert_same(ours, theirs, net_ours, net_theirs, torch.float64, 30)


def test_lr_scale_is_the_core_kernel(digits):
    """A group's per-element lr_scale (tensors): the adapter gives bit for bit what fastopt's core gives on NumPy
    copies of the same params and grads."""
    net = make_net(torch.float32)
    generator = torch.Generator().manual_seed(1)
    scales = [torch.rand(p.shape, generator=generator) * 2 for p in net.head.parameters()]
    optimizer = ft.AdamW([{"params": net.body.parameters()},
                          {"params": net.head.parameters(), "lr_scale": scales}], lr=3e-3)
    copies = [p.detach().numpy().copy() for p in [*net.body.parameters(), *net.head.parameters()]]
    core = fo.AdamW([{"params": copies[:2]}, {"params": copies[2:], "lr_scale": [s.numpy() for s in scales]}],
                    lr=3e-3)
    for t in range(20):
        optimizer.zero_grad()
        loss_at(net, digits, t).backward()
        grads = [p.grad.numpy().copy() for p in [*net.body.parameters(), *net.head.parameters()]]
        optimizer.step()
        core.step(grads)
    for param, expected in zip([*net.body.parameters(), *net.head.parameters()], copies):
        np.testing.assert_array_equal(param.detach().numpy(), expected)
    # A torch.optim checkpoint has no lr_scale: the group keeps its own (foreach and fused are the checkpoint's).
    theirs = torch.optim.AdamW([{"params": net.body.parameters()}, {"params": net.head.parameters()}], fused=True)
    loss_at(net, digits, 0).backward()
    theirs.step()
    optimizer.load_state_dict(theirs.state_dict())
    assert optimizer.param_groups[1]["lr_scale"] is scales and optimizer.param_groups[1]["fused"] is True
    optimizer.step()


def test_replaced_param_storage_is_followed(digits):
    """``p.data = ...`` after construction: the adapter notices the new storage and updates it."""
    runs = []
    for module in (ft, torch.optim):
        net = make_net(torch.float32)
        optimizer = module.SGD(net.parameters(), lr=0.1, momentum=0.9)
        train(net, optimizer, digits, 5)
        net.body.weight.data = net.body.weight.data.clone()
        train(net, optimizer, digits, 5, first=5)
        runs.append((net, optimizer))
    (net_ours, ours), (net_theirs, theirs) = runs
    assert_same(ours, theirs, net_ours, net_theirs, torch.float32, 10)


def test_deepcopy_resumes(digits):
    net = make_net(torch.float32)
    optimizer = ft.AdamW(net.parameters(), lr=fo.schedules.cosine(0.01, t_max=20))
    train(net, optimizer, digits, 5)
    clone = copy.deepcopy({"net": net, "optimizer": optimizer})
    train(net, optimizer, digits, 5, first=5)
    train(clone["net"], clone["optimizer"], digits, 5, first=5)
    assert clone["optimizer"].core.step_count == 10
    for ours, theirs in zip(clone["net"].parameters(), net.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


# ---------------------------------------------------------------- bad input
def make_adam():
    params = [torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.ones(5))]
    optimizer = ft.Adam([{"params": params[:1]}, {"params": params[1:]}], lr=0.1)
    for param in params:
        param.grad = torch.ones_like(param)
    optimizer.step()
    return params, optimizer


def assert_untouched(params, optimizer, before):
    saved_params, saved_state = before
    for param, saved in zip(params, saved_params):
        assert torch.equal(param, saved)
    state = optimizer.state_dict()["state"]
    for index, entry in saved_state.items():
        for name, value in entry.items():
            assert torch.equal(state[index][name], value)


@pytest.mark.parametrize("change,error,message", [
    (dict(lr=-0.1), ValueError, "invalid lr"),
    (dict(lr=float("nan")), ValueError, "lr must be finite"),
    (dict(betas=(1.0, 0.9)), ValueError, "beta1"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(amsgrad="yes"), TypeError, "amsgrad must be a bool"),
    (dict(differentiable=True), ValueError, "differentiable=True is not supported"),
    (dict(decoupled_weight_decay=True), ValueError, "decoupled_weight_decay differs"),  # group 1 keeps False
])
def test_bad_group_change_leaves_params_and_state_untouched(change, error, message):
    params, optimizer = make_adam()
    before = ([p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict()["state"]))
    optimizer.param_groups[0].update(change)
    with pytest.raises(error, match=message):
        optimizer.step()
    assert_untouched(params, optimizer, before)


@pytest.mark.parametrize("make,error,message", [
    (lambda: ft.Adam([torch.nn.Parameter(torch.ones(3))], lr=-1.0), ValueError, "Invalid learning rate"),  # torch's
    (lambda: ft.SGD([torch.nn.Parameter(torch.ones(3))], nesterov=True), ValueError, "Nesterov"),
    (lambda: ft.RMSprop([torch.nn.Parameter(torch.ones(3))], alpha=1.5), ValueError, "alpha"),
    (lambda: ft.AdamW([torch.nn.Parameter(torch.ones(3))], betas=(0.9,)), TypeError, "betas must be a pair"),
    (lambda: ft.Adam([torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))]), TypeError, "torch.complex64"),
    (lambda: ft.Adam([torch.nn.Parameter(torch.ones(3, 4).t())]), ValueError, "not contiguous"),
    (lambda: ft.Adam([torch.nn.Parameter(torch.ones(3, device="meta"))]), TypeError, "CPU and CUDA"),
    (lambda: ft.Adam([torch.ones(3, requires_grad=True) * 2]), ValueError, "non-leaf"),
    (lambda: ft.Adam([]), ValueError, "empty parameter list"),
    (lambda: ft.Adam([torch.nn.Parameter(torch.ones(3))], differentiable=True), ValueError, "differentiable"),
    (lambda: ft.RMSprop([torch.nn.Parameter(torch.ones(3))], capturable=True), ValueError, "capturable"),
    (lambda: ft.SGD([torch.nn.Parameter(torch.ones(3))], foreach=True, fused=True), RuntimeError, "cannot be"),
    (lambda: ft.Adam([{"params": [torch.nn.Parameter(torch.ones(3))], "lr_scale": [-torch.ones(3)]}]),
     ValueError, "finite and >= 0"),
    (lambda: ft.Adam([{"params": [torch.nn.Parameter(torch.ones(3))], "lr_scale": [torch.ones(4)]}]),
     ValueError, r"shape \(4,\)"),
])
def test_bad_construction(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_implementation_flags_are_accepted():
    param = torch.nn.Parameter(torch.ones(3))
    for flags in (dict(foreach=True), dict(foreach=False), dict(fused=True), dict(fused=False)):
        for cls in (ft.SGD, ft.Adam, ft.AdamW):
            cls([param], **flags)
    ft.RMSprop([param], foreach=True, capturable=False, differentiable=False)


def test_bad_add_param_group_is_not_added(digits):
    net = make_net(torch.float32)
    optimizer = ft.SGD(net.body.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="more than one parameter group"):  # torch's check
        optimizer.add_param_group({"params": [net.body.weight]})
    with pytest.raises(ValueError, match="invalid lr"):  # the core's check
        optimizer.add_param_group({"params": net.head.parameters(), "lr": -1.0})
    with pytest.raises(TypeError, match="complex64"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))]})
    assert len(optimizer.param_groups) == 1
    train(net, optimizer, digits, 2)


@pytest.mark.parametrize("mutate,error,message", [
    (lambda s: s["state"][0].update(exp_avg=torch.ones(4)), ValueError, "shape"),
    (lambda s: s["state"][1].update(velocity=torch.ones(5)), ValueError, "unknown buffer"),
    (lambda s: s["param_groups"][0].update(lr=-1.0), ValueError, "invalid lr"),
    (lambda s: s["param_groups"].pop(), ValueError, "different number of parameter groups"),  # torch's check
])
def test_bad_checkpoint_leaves_optimizer_untouched(mutate, error, message):
    params, optimizer = make_adam()
    before = ([p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict()))
    bad = copy.deepcopy(optimizer.state_dict())
    mutate(bad)
    with pytest.raises(error, match=message):
        optimizer.load_state_dict(bad)
    assert_untouched(params, optimizer, (before[0], before[1]["state"]))
    assert optimizer.state_dict()["param_groups"] == before[1]["param_groups"]
    optimizer.step()  # still works, on the same buffers
    assert optimizer.state[params[0]]["step"].item() == 2


def test_sparse_grad_is_an_error():
    params, optimizer = make_adam()
    before = ([p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict()["state"]))
    params[1].grad = torch.ones(5).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()
    assert_untouched(params, optimizer, before)


def test_cpu_use_does_not_import_cupy():
    if "cupy" in sys.modules:
        pytest.skip("cupy was imported earlier in this session")
    make_adam()
    assert "cupy" not in sys.modules


# ---------------------------------------------------------------- CUDA tensors (CuPy through DLPack)
def _gpu_ready():
    if not torch.cuda.is_available():  # first: then a CPU-only run never imports CuPy
        return False
    from fastopt.backends import cuda  # imports CuPy only in gpu_available()

    return cuda.gpu_available()


requires_gpu = pytest.mark.skipif(not _gpu_ready() and os.environ.get("REQUIRE_GPU") != "1",
                                  reason="needs a CUDA GPU and CuPy")


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("name,kwargs", CHECKPOINT_CONFIGS, ids=[c[0] for c in CHECKPOINT_CONFIGS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_training_matches_torch(name, kwargs, dtype, digits):
    runs = []
    for module in (ft, torch.optim):
        net = make_net(dtype, "cuda")
        optimizer = getattr(module, name)(net.parameters(), **kwargs)
        train(net, optimizer, digits, 60, scheduler=lr_scheduler.StepLR(optimizer, 20, 0.5))
        runs.append((net, optimizer))
    (net_ours, ours), (net_theirs, theirs) = runs
    assert type(ours.core._backend).__name__ == "CudaBackend"
    assert all(value.is_cuda for entry in ours.state.values() for key, value in entry.items() if key != "step")
    assert_same(ours, theirs, net_ours, net_theirs, dtype, 60)
    # A CUDA checkpoint into torch.optim, and torch.optim's into fastopt.torch.
    checkpoint = checkpoint_round_trip(ours, net_ours)["optimizer"]
    getattr(torch.optim, name)(make_net(dtype, "cuda").parameters(), **kwargs).load_state_dict(checkpoint)
    again = getattr(ft, name)(make_net(dtype, "cuda").parameters(), **kwargs)
    again.load_state_dict(checkpoint_round_trip(theirs, net_theirs)["optimizer"])
    for index, entry in theirs.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(again.state_dict()["state"][index][key], value)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_cuda_step_runs_on_torch_current_stream(name, digits):
    """Training on a side stream: each step must run after the backward queued on that stream."""
    runs = []
    for module in (ft, torch.optim):
        net = make_net(torch.float32, "cuda")
        optimizer = getattr(module, name)(net.parameters(), lr=1e-2)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            train(net, optimizer, digits, 20)
        torch.cuda.current_stream().wait_stream(side)
        runs.append((net, optimizer))
    torch.cuda.synchronize()
    (net_ours, ours), (net_theirs, theirs) = runs
    assert_same(ours, theirs, net_ours, net_theirs, torch.float32, 20)
