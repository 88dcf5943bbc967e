"""fastopt against torch.optim (+ torch.optim.lr_scheduler): every optimizer option, and every schedule."""
import warnings

import numpy as np
import pytest

import fastopt as fo
from conftest import assert_close, tolerance
from configs import CONFIG_IDS, CONFIGS, anchor_optimizer

torch = pytest.importorskip("torch")

STEPS = 12
SHAPES = [(0,), (1,), (13,), (40, 7)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_optimizer_matches_torch(cls, kwargs, dtype, rng):
    """Two groups with their own lr (one changed between steps, as torch's schedulers do), params and state."""
    initial = [rng.standard_normal(shape).astype(dtype) for shape in SHAPES]
    grads = [[rng.standard_normal(shape).astype(dtype) for shape in SHAPES] for _ in range(STEPS)]
    lrs = 0.03 * (1 + np.sin(np.arange(STEPS)))

    params = [p.copy() for p in initial]
    ours = cls([{"params": params[:2]}, {"params": params[2:], "lr": 0.01}], lr=lrs[0], **kwargs)
    tensors = [torch.tensor(p) for p in initial]
    theirs, negate = anchor_optimizer(cls, [{"params": tensors[:2]}, {"params": tensors[2:], "lr": 0.01}],
                                      dict(kwargs, lr=lrs[0]))
    for t in range(STEPS):
        ours.param_groups[0]["lr"] = theirs.param_groups[0]["lr"] = float(lrs[t])
        ours.step(grads[t])
        for tensor, grad in zip(tensors, grads[t]):
            tensor.grad = torch.tensor(-grad if negate else grad)
        theirs.step()

    rtol = tolerance(dtype, STEPS)
    our_state = ours.state_dict()["state"]
    for index, tensor in enumerate(tensors):
        assert_close(params[index], tensor.numpy(), rtol, f"param {index}")
        for name, value in theirs.state[tensor].items():
            if name == "step":
                assert our_state[index]["step"] == int(value)
            elif value.numel() == 0 and index not in our_state:
                continue  # torch's Adagrad makes every param's state up front, fastopt at the first step
            else:
                assert_close(our_state[index][name], value.numpy(), rtol, f"param {index} state {name}")


# Each fastopt schedule beside the torch scheduler it equals, stepped once per optimizer step.
SCHEDULER_PAIRS = [
    ("step_decay", lambda: fo.schedules.step_decay(0.1, step_size=3, gamma=0.5),
     lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5)),
    ("multistep", lambda: fo.schedules.multistep(0.1, milestones=[2, 5, 9], gamma=0.3),
     lambda o: torch.optim.lr_scheduler.MultiStepLR(o, milestones=[2, 5, 9], gamma=0.3)),
    ("exponential", lambda: fo.schedules.exponential(0.1, gamma=0.9),
     lambda o: torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)),
    ("linear", lambda: fo.schedules.linear(0.1, start_factor=0.25, end_factor=0.8, total_iters=7),
     lambda o: torch.optim.lr_scheduler.LinearLR(o, start_factor=0.25, end_factor=0.8, total_iters=7)),
    ("polynomial", lambda: fo.schedules.polynomial(0.1, total_iters=9, power=2.0),
     lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=9, power=2.0)),
    ("cosine", lambda: fo.schedules.cosine(0.1, t_max=8, eta_min=0.01),
     lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=8, eta_min=0.01)),
    ("cosine_restarts", lambda: fo.schedules.cosine_restarts(0.1, t_0=3, t_mult=2, eta_min=0.001),
     lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2, eta_min=0.001)),
    ("onecycle", lambda: fo.schedules.onecycle(0.1, total_steps=STEPS + 1),
     lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=STEPS + 1, cycle_momentum=False)),
    ("onecycle_three_phase_linear",
     lambda: fo.schedules.onecycle(0.1, total_steps=STEPS + 1, three_phase=True, anneal_strategy="linear"),
     lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=STEPS + 1, three_phase=True,
                                                   anneal_strategy="linear", cycle_momentum=False)),
    ("cyclic_triangular2", lambda: fo.schedules.cyclic(0.01, 0.1, step_size_up=2, step_size_down=3,
                                                       mode="triangular2"),
     lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.01, 0.1, step_size_up=2, step_size_down=3,
                                                 mode="triangular2", cycle_momentum=False)),
    ("cyclic_exp_range", lambda: fo.schedules.cyclic(0.01, 0.1, step_size_up=3, mode="exp_range", gamma=0.9),
     lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.01, 0.1, step_size_up=3, mode="exp_range", gamma=0.9,
                                                 cycle_momentum=False)),
    ("sequential", lambda: fo.schedules.sequential([fo.schedules.linear(0.1, start_factor=0.1, total_iters=4),
                                                    fo.schedules.cosine(0.1, t_max=6)], milestones=[4]),
     lambda o: torch.optim.lr_scheduler.SequentialLR(
         o, [torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=4),
             torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=6)], milestones=[4])),
    ("warmup", lambda: fo.schedules.warmup(fo.schedules.exponential(0.1, gamma=0.95), warmup_steps=5,
                                           start_factor=0.2),
     lambda o: torch.optim.lr_scheduler.ChainedScheduler(
         [torch.optim.lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=5),
          torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.95)])),
]


@pytest.mark.parametrize("cls,kwargs", [(fo.SGD, dict(momentum=0.9)), (fo.AdamW, {}), (fo.Adagrad, dict(lr_decay=0.05)),
                                        (fo.Lion, dict(weight_decay=0.1))], ids=["SGD", "AdamW", "Adagrad", "Lion"])
@pytest.mark.parametrize("name,ours,theirs", SCHEDULER_PAIRS, ids=[pair[0] for pair in SCHEDULER_PAIRS])
def test_schedule_in_kernel_matches_torch_scheduler(name, ours, theirs, cls, kwargs, rng):
    """The schedule evaluated inside the kernel gives the params torch reaches with its scheduler."""
    initial = rng.standard_normal(31).astype(np.float32)
    grads = [rng.standard_normal(31).astype(np.float32) for _ in range(STEPS)]
    param = initial.copy()
    optimizer = cls([param], lr=ours(), **kwargs)
    tensor = torch.tensor(initial)
    torch_opt, _ = anchor_optimizer(cls, [tensor], dict(kwargs, lr=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = theirs(torch_opt)
        for t in range(STEPS):
            assert optimizer.current_lr()[0] == pytest.approx(torch_opt.param_groups[0]["lr"], rel=1e-12)
            optimizer.step([grads[t]])
            tensor.grad = torch.tensor(grads[t])
            torch_opt.step()
            scheduler.step()
    assert_close(param, tensor.numpy(), tolerance(np.float32, STEPS), name)
