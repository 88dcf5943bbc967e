"""The one table of optimizer configurations that every parity test reads (torch's OptimizerInfo idea): the CPU
kernels, the reference backend, the CUDA kernels and their host build, and the torch adapter. A new rule is added
here as rows, and its public anchor (torch.optim's class, or another package's) in ANCHORS."""

import numpy as np
import pytest

import fastopt as fo
from conftest import SIZES, assert_close, sign_flips, tolerance

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
    (fo.Adagrad, {}),
    (fo.Adagrad, dict(lr_decay=0.1, weight_decay=0.1)),
    (fo.Adagrad, dict(initial_accumulator_value=0.5, eps=1e-6, maximize=True)),
    (fo.Lion, {}),
    (fo.Lion, dict(weight_decay=0.1, betas=(0.95, 0.98))),
    (fo.Lion, dict(betas=(0.3, 0.5), weight_decay=0.5, maximize=True)),
    (fo.AdamWScheduleFree, {}),
    (fo.AdamWScheduleFree, dict(warmup_steps=3, weight_decay=0.1, r=0.5)),
    (fo.AdamWScheduleFree, dict(betas=(0.5, 0.9), eps=1e-3, weight_lr_power=0.0, maximize=True)),
    (fo.SGDScheduleFree, {}),
    (fo.SGDScheduleFree, dict(momentum=0.5, weight_decay=0.05, warmup_steps=2)),
    (fo.LAMB, {}),
    (fo.LAMB, dict(bias_correction=False, weight_decay=0.0)),
    (fo.LAMB, dict(betas=(0.3, 0.5), eps=1e-3, max_trust_ratio=0.5, maximize=True)),
]
CONFIG_IDS = [f"{cls.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}"
              for cls, kw in CONFIGS]

STEPS = 6


def lr_schedule(cls, schedule):
    """The problem's ``schedule`` for ``cls``: a schedule-free rule refuses decay schedules, and gets a constant at
    the schedule's first value instead (its group of float rates still changes between steps)."""
    if issubclass(cls, fo.rules.schedule_free.ScheduleFree):
        return fo.schedules.constant(float(schedule(0)))
    return schedule
LARGEST_STEP = 0.08  # the largest lr * lr_scale of the problem: lrs1 up to 0.04 with lr_scale up to 2


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
        assert_close(param, expected_params[index], rtol, f"param {index}",
                     flips=sign_flips(type(optimizer), param.size, LARGEST_STEP))
        for name, value in expected_states[index].items():
            if name == "step":
                if not isinstance(optimizer, fo.SGD):
                    assert state["step"] == value
                continue
            if name in type(optimizer).SCALARS:  # running values computed in float64 on every backend
                assert_close(state[name], value, tolerance(np.float64, steps), f"param {index} {name}")
                continue
            assert state[name].dtype == dtype
            assert_close(state[name], value, rtol, f"param {index} state {name}")
        assert set(state) - {"step"} == set(expected_states[index]) - {"step"}


# Where each optimizer is defined publicly: (module, class name, whether it takes ``maximize``). torch.optim has no Lion;
# the lion-pytorch package's is the one the rule follows.
ANCHORS = {"Lion": ("lion_pytorch", "Lion", False),
           "AdamWScheduleFree": ("schedulefree", "AdamWScheduleFree", False),
           "SGDScheduleFree": ("schedulefree", "SGDScheduleFree", False),
           "LAMB": (None, None, False)}  # apex's and DeepSpeed's differ from the paper's and are CUDA-only


def anchor_optimizer(cls, groups, kwargs, *, for_loop=True):
    """The public implementation of ``cls`` over torch tensors ``groups`` (torch.optim's for-loop one where torch
    has it, unless ``for_loop`` is False: its default), and whether the caller must negate the grads itself to get
    ``maximize``."""
    module, name, takes_maximize = ANCHORS.get(cls.__name__, ("torch.optim", cls.__name__, True))
    if module is None:
        pytest.skip(f"no public package defines {cls.__name__} as fastopt does (its float64 reference is the oracle)")
    anchor = getattr(pytest.importorskip(module), name)
    kwargs = dict(kwargs)
    negate = not takes_maximize and kwargs.pop("maximize", False)
    if module == "torch.optim" and for_loop:
        kwargs["foreach"] = False
    optimizer = anchor(groups, **kwargs)
    if hasattr(optimizer, "train"):
        optimizer.train()  # the schedulefree package's optimizers start in eval mode
    return optimizer, negate
