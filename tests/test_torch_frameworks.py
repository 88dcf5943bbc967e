"""fastopt.torch inside other frameworks' training loops: timm's layer-wise lr decay (a number-valued ``lr_scale``
that timm's schedulers fold into ``lr``), ``torch.compile`` around the step, torch's thread count, and the fused
optimizers' AMP protocol (``grad_scale`` and ``found_inf`` set by GradScaler / FSDP's ShardedGradScaler).

The compile and thread tests run in fresh processes: both bugs showed only on a process's first step."""
import copy
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import assert_close, tolerance

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastopt.torch")

STEPS = 12


def timm_modules():
    """(timm.optim, timm.scheduler, timm.models), or a skip: timm imports torchvision (timm.layers, timm.data), and a
    torchvision wheel built for another torch (the CUDA one from PyPI beside torch's CPU build) fails to import."""
    try:
        import timm.models
        import timm.optim
        import timm.scheduler
    except ImportError:
        pytest.skip("timm is not installed")
    except Exception as error:  # torchvision's C ops missing: RuntimeError: operator torchvision::nms does not exist
        pytest.skip(f"timm cannot be imported here ({type(error).__name__}: {error})")
    return timm.optim, timm.scheduler, timm.models


# ---------------------------------------------------------------- timm's layer-wise lr decay
class TinyViT(torch.nn.Module):
    """Shaped like timm's ViTs (patch embedding, blocks, norm, head; MLP blocks), small enough for a test."""

    def __init__(self, depth=3, width=16):
        super().__init__()
        self.patch_embed = torch.nn.Linear(12, width)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, 2 * width),
                                                              torch.nn.GELU(), torch.nn.Linear(2 * width, width))
                                          for _ in range(depth))
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, 3)

    def forward(self, x):
        x = self.patch_embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


def layer_decay_groups(model, weight_decay, layer_decay):
    """What ``timm.optim.param_groups_layer_decay`` returns for ``model`` (timm 1.0): one group per (layer, decay or
    not), each ``{"lr_scale": layer_decay ** (last layer - layer), "weight_decay": ..., "params": [...]}``; the
    embedding is layer 0, block i layer i + 1, the rest the last layer; 1-D params take no weight decay."""
    last = len(model.blocks) + 1
    groups = {}
    for name, param in model.named_parameters():
        layer = 0 if name.startswith("patch_embed") else int(name.split(".")[1]) + 1 if name.startswith("blocks") \
            else last
        decay = 0.0 if param.ndim <= 1 else weight_decay
        group = groups.setdefault((layer, decay), {"lr_scale": layer_decay ** (last - layer), "weight_decay": decay,
                                                   "params": []})
        group["params"].append(param)
    return list(groups.values())


class CosineWithWarmup:
    """timm's ``CosineLRScheduler`` stepped per update (``t_in_epochs=False``): linear warm-up from
    ``warmup_lr_init``, then a cosine to ``lr_min``; ``update_groups`` is timm's ``Scheduler.update_groups``."""

    def __init__(self, optimizer, t_initial, lr_min, warmup_t, warmup_lr_init):
        self.optimizer, self.t_initial, self.lr_min = optimizer, t_initial, lr_min
        self.warmup_t, self.warmup_lr_init = warmup_t, warmup_lr_init
        self.base_values = [group.setdefault("initial_lr", group["lr"]) for group in optimizer.param_groups]
        self.update_groups(warmup_lr_init)

    def step_update(self, t):
        if t < self.warmup_t:
            values = [self.warmup_lr_init + t * (base - self.warmup_lr_init) / self.warmup_t
                      for base in self.base_values]
        else:
            t -= self.warmup_t
            values = [self.lr_min + 0.5 * (base - self.lr_min) * (1 + np.cos(np.pi * t / self.t_initial))
                      for base in self.base_values]
        self.update_groups(values)

    def update_groups(self, values):
        if not isinstance(values, (list, tuple)):
            values = [values] * len(self.optimizer.param_groups)
        for group, value in zip(self.optimizer.param_groups, values):
            group["lr"] = value * group["lr_scale"] if "lr_scale" in group else value


def train_with_layer_decay(make_model, make_groups, make_scheduler, steps):
    """fastopt.torch.AdamW and torch.optim.AdamW from the same groups and scheduler: (model, optimizer) of each."""
    runs = []
    for optimizer_class in (ft.AdamW, torch.optim.AdamW):
        torch.manual_seed(0)
        model = make_model()
        optimizer = optimizer_class(make_groups(model), lr=1e-2, betas=(0.9, 0.99))
        scheduler = make_scheduler(optimizer)
        data = torch.Generator().manual_seed(1)
        for t in range(steps):
            scheduler.step_update(t)
            x, y = torch.randn(8, 4, 12, generator=data), torch.randint(0, 3, (8,), generator=data)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        runs.append((model, optimizer))
    return runs


def assert_runs_agree(runs, steps):
    (model, ours), (reference, theirs) = runs
    rtol = tolerance(np.float32, steps)
    for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
        assert_close(param.detach().numpy(), expected.detach().numpy(), rtol, name)
    ours_state, theirs_state = ours.state_dict(), theirs.state_dict()
    for index, entry in theirs_state["state"].items():
        for key, value in entry.items():
            assert_close(ours_state["state"][index][key].numpy(), value.numpy(), rtol, f"param {index} {key}")
    assert [group["lr"] for group in ours.param_groups] == [group["lr"] for group in theirs.param_groups]
    assert [group.get("lr_scale") for group in ours_state["param_groups"]] == \
        [group.get("lr_scale") for group in theirs_state["param_groups"]]


def test_layer_decay_groups_under_a_timm_schedule_match_torch():
    """timm's layer-wise lr decay (timm's group layout and scheduler rule, without importing timm): a float
    ``lr_scale`` is timm's, which its scheduler has already folded into ``lr``; fastopt leaves it alone, as torch
    does (it would scale the rates twice otherwise), and the run matches torch.optim.AdamW."""
    runs = train_with_layer_decay(
        TinyViT, lambda model: layer_decay_groups(model, weight_decay=0.05, layer_decay=0.75),
        lambda optimizer: CosineWithWarmup(optimizer, t_initial=STEPS, lr_min=1e-4, warmup_t=3, warmup_lr_init=1e-4),
        STEPS)
    assert len({group["lr_scale"] for group in runs[0][1].param_groups}) == 5  # 5 layers, 5 different rates
    assert_runs_agree(runs, STEPS)
    # The groups' state dict (float lr_scale included) loads into either class.
    model, ours = runs[0]
    again = ft.AdamW(layer_decay_groups(model, weight_decay=0.05, layer_decay=0.75))
    again.load_state_dict(runs[1][1].state_dict())
    assert [group["lr_scale"] for group in again.param_groups] == [group["lr_scale"] for group in ours.param_groups]


def test_timm_vit_with_layer_decay_and_cosine_scheduler_match_torch():
    """The same with timm itself: a timm ViT, ``param_groups_layer_decay`` and ``CosineLRScheduler``."""
    timm_optim, timm_scheduler, timm_models = timm_modules()

    def make_model():
        return timm_models.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8,
                                        depth=2, embed_dim=24, num_heads=2, num_classes=3)

    def make_groups(model):
        return timm_optim.param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.75)

    def make_scheduler(optimizer):
        return timm_scheduler.CosineLRScheduler(optimizer, t_initial=STEPS, lr_min=1e-4, warmup_t=3,
                                                warmup_lr_init=1e-4, t_in_epochs=False)

    runs = []
    for optimizer_class in (ft.AdamW, torch.optim.AdamW):
        torch.manual_seed(0)
        model = make_model()
        optimizer = optimizer_class(make_groups(model), lr=1e-2)
        scheduler = make_scheduler(optimizer)
        data = torch.Generator().manual_seed(1)
        for t in range(STEPS):
            scheduler.step_update(t)
            x, y = torch.randn(4, 3, 16, 16, generator=data), torch.randint(0, 3, (4,), generator=data)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        runs.append((model, optimizer))
    assert_runs_agree(runs, STEPS)


# ---------------------------------------------------------------- torch.compile, threads: fresh processes
def run_fresh(code, timeout=120):
    """Run ``code`` in a new Python process (this test's path and environment); assert it exits 0."""
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=environment, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT), timeout


def wait_ok(started):
    process, timeout = started
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output
    return output


COMPILE_CASES = """
    import copy
    import torch
    import fastopt.torch as ft

    traced = []
    def recording_backend(graph_module, example_inputs):  # backend="eager", noting where each traced op came from
        traced.extend(node.meta.get("stack_trace") or "" for node in graph_module.graph.nodes)
        return graph_module.forward

    x = torch.randn(5, 6)

    def train_step(model, optimizer):
        optimizer.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        return loss

    for case in ("step", "function"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        reference_model = copy.deepcopy(model)
        optimizer = ft.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        reference = torch.optim.AdamW(reference_model.parameters(), lr=1e-2, weight_decay=0.1)
        compiled = torch.compile(train_step if case == "function" else optimizer.step, backend=recording_backend)
        for _ in range(3):
            if case == "step":  # torch.compile(opt.step): the process's first fastopt step
                model(x).pow(2).mean().backward()
                compiled()
                optimizer.zero_grad()
            else:  # a compiled train step that calls opt.step()
                compiled(model, optimizer)
            train_step(reference_model, reference)
        for param, expected in zip(model.parameters(), reference_model.parameters()):
            torch.testing.assert_close(param, expected)
        assert optimizer.state_dict()["state"][0]["step"].item() == 3
        inside = [trace for trace in traced if "fastopt" in trace or "numba" in trace]
        assert not inside, case + ": dynamo traced fastopt's step:\\n" + "\\n".join(inside[:5])
    print("ok", len(traced))
"""


def test_torch_compile_graph_breaks_around_the_step():
    """``torch.compile(opt.step)`` (a fresh process's first fastopt step: the failure was there), then a compiled
    train step calling ``opt.step()``: the step runs eagerly, outside dynamo's graphs (none of their ops comes from
    fastopt or Numba), and the results equal torch.optim.AdamW's."""
    wait_ok(run_fresh(COMPILE_CASES, timeout=240))


THREADS_CASE = """
    import numba, torch
    import fastopt.torch as ft

    total = numba.config.NUMBA_NUM_THREADS
    torch.set_num_threads(1)
    model = torch.nn.Linear(512, 1024)  # 525k elements: the parallel kernel
    optimizer = ft.AdamW(model.parameters(), lr=1e-3)
    for threads in (1, 1, total, 1):
        torch.set_num_threads(threads)
        model(torch.randn(4, 512)).sum().backward()
        optimizer.step()
        assert torch.get_num_threads() == threads, (threads, torch.get_num_threads())
        assert numba.get_num_threads() == threads, (threads, numba.get_num_threads())
    torch.set_num_threads(total + 3)  # more than Numba has: Numba runs on all of its own
    optimizer.step()
    assert torch.get_num_threads() == total + 3 and numba.get_num_threads() == total
    print("ok", numba.threading_layer())
"""


def test_step_leaves_torchs_thread_count_and_uses_it():
    """Numba's OpenMP layer reset the process's OpenMP thread count on its first parallel launch, undoing
    ``torch.set_num_threads(1)``: the step keeps torch's count and runs Numba on as many threads."""
    wait_ok(run_fresh(THREADS_CASE))


# ---------------------------------------------------------------- AMP: grad_scale and found_inf
def forcing_found_inf(scaler, forced_steps):
    """``scaler`` reporting inf on ``forced_steps`` (its step calls, counted from 0) whatever the grads, as
    ShardedGradScaler does when another rank's grads overflowed (it all-reduces found_inf)."""
    calls, unscale = [0], scaler._unscale_grads_

    def unscale_grads(optimizer, inv_scale, found_inf, allow_fp16):
        per_device = unscale(optimizer, inv_scale, found_inf, allow_fp16)
        if calls[0] in forced_steps:
            for value in per_device.values():
                value.fill_(1.0)
        calls[0] += 1
        return per_device

    scaler._unscale_grads_ = unscale_grads
    return scaler


@pytest.mark.parametrize("explicit_unscale", [False, True], ids=["scale-in-step", "unscale_-first"])
def test_found_inf_skips_the_step_as_in_torchs_fused_adamw(explicit_unscale):
    """GradScaler hands a fused optimizer ``grad_scale`` and ``found_inf``; with found_inf = 1 and finite local
    grads, torch's fused AdamW skips the step (params, state and ``step`` unchanged) and so does fastopt's,
    whether the scale is still in the grads or ``unscale_`` ran; the other steps agree with torch's."""
    forced = {2, 4}
    runs = []
    for make in (ft.AdamW, lambda params, **kw: torch.optim.AdamW(params, fused=True, **kw)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        optimizer = make(model.parameters(), lr=1e-2, weight_decay=0.1)
        scaler = forcing_found_inf(torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2), forced)
        data = torch.Generator().manual_seed(1)
        for t in range(7):
            optimizer.zero_grad()
            scaler.scale(model(torch.randn(5, 6, generator=data)).pow(2).mean()).backward()
            if explicit_unscale:
                scaler.unscale_(optimizer)
            before = [param.detach().clone() for param in model.parameters()]
            state_before = copy.deepcopy(optimizer.state_dict()["state"])
            scaler.step(optimizer)
            scaler.update()
            if t in forced:
                assert all(torch.equal(param, saved) for param, saved in zip(model.parameters(), before)), t
                for index, entry in state_before.items():
                    for key, value in entry.items():
                        assert torch.equal(optimizer.state_dict()["state"][index][key], value), (t, index, key)
            else:
                assert not all(torch.equal(param, saved) for param, saved in zip(model.parameters(), before)), t
        runs.append((model, optimizer, scaler.get_scale()))
    (model, ours, our_scale), (reference, theirs, their_scale) = runs
    assert our_scale == their_scale
    assert ours.state_dict()["state"][0]["step"].item() == theirs.state_dict()["state"][0]["step"].item() == 5
    assert_runs_agree([(model, ours), (reference, theirs)], 7)
