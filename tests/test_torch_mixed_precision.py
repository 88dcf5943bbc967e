"""fastopt.torch with bfloat16/float16 params: the adapter hands the core the same bits (its results equal the core
optimizer's on the same grads, bit for bit), works with torch.amp.GradScaler, and keeps float32 states and
master copies float32 through torch's state_dict/load_state_dict (which would cast them to the param dtype)."""
import io

import numpy as np
import pytest

import fastopt as fo
import fastopt.torch as ft
from test_torch_adapter import requires_gpu

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")

NUMPY_OF = {torch.bfloat16: np.dtype(ml_dtypes.bfloat16), torch.float16: np.dtype(np.float16),
            torch.float32: np.dtype(np.float32)}
CONFIGS = [
    (torch.bfloat16, dict(master_weights=True)),
    (torch.bfloat16, dict(state_dtype="bfloat16")),
    (torch.bfloat16, dict(rounding="stochastic", seed=5)),
    (torch.float16, dict(master_weights=True, max_grad_norm=1.0)),
]
IDS = ["bf16-master", "bf16-states", "bf16-stochastic", "f16-master-clip"]


def to_numpy(tensor):
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(NUMPY_OF[torch.bfloat16])
    return tensor.numpy()


def same_bits(a, b):
    return np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


@pytest.mark.parametrize("dtype,options", CONFIGS, ids=IDS)
def test_adapter_equals_the_core_bit_for_bit(dtype, options):
    generator = torch.Generator().manual_seed(0)
    shapes = [(13,), (40, 7), (1,)]
    params = [torch.randn(shape, generator=generator).to(dtype).requires_grad_() for shape in shapes]
    core_params = [to_numpy(p).copy() for p in params]
    ours = ft.AdamW(params, lr=0.01, **options)
    core = fo.AdamW(core_params, lr=0.01, **options)
    for _ in range(4):
        grads = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
        for param, grad in zip(params, grads):
            param.grad = grad
        ours.step()
        core.step([to_numpy(grad) for grad in grads])
    for index, (param, expected) in enumerate(zip(params, core_params)):
        assert param.dtype == dtype
        assert same_bits(to_numpy(param), expected), f"param {index}"
        for name, buffer in core.state[index].items():
            assert same_bits(to_numpy(ours.state[param][name]), buffer), f"param {index} {name}"
        assert float(ours.state[param]["step"]) == 4


def test_grad_scaler_unscales_and_skips_in_the_step():
    """A float16 model under GradScaler: the scaler hands its scale to the step, which unscales inside the kernel
    and skips the step whose grads overflowed; the scaler halves its scale after it, as with torch's fused Adam.
    The results equal the core optimizer's given the same scaled grads and scales."""
    generator = torch.Generator().manual_seed(1)
    model = torch.nn.Linear(16, 4).to(torch.float16)
    start = [to_numpy(p).copy() for p in model.parameters()]
    optimizer = ft.Adam(model.parameters(), lr=1e-3, master_weights=True)
    core = fo.Adam(start, lr=1e-3, master_weights=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=1000)
    for step in range(5):
        inputs = torch.randn(8, 16, generator=generator).to(torch.float16)
        loss = model(inputs).float().pow(2).mean() * (1e6 if step == 2 else 1.0)  # overflows float16 at step 2
        optimizer.zero_grad()
        scale = scaler.get_scale()
        scaler.scale(loss).backward()
        core.step([to_numpy(p.grad) for p in model.parameters()], grad_scale=scale)
        scaler.step(optimizer)
        scaler.update()
    # The scaler's found_inf skips the step before the kernel (as torch's fused optimizers do): the core's count
    # of steps its own NaN/inf check skipped stays 0.
    assert core.skipped_steps == 1 and optimizer.core.skipped_steps == 0
    assert scaler.get_scale() == 2.0 ** 11
    for index, (param, expected) in enumerate(zip(model.parameters(), start)):
        assert same_bits(to_numpy(param), expected), f"param {index}"
        assert float(optimizer.state[param]["step"]) == 4


def test_grad_scaler_after_explicit_unscale_and_clip():
    """unscale_ then clip_grad_norm_ (torch's recipe): the grads reach the step unscaled, and the scaler's found_inf
    alone decides the skip."""
    generator = torch.Generator().manual_seed(2)
    param = torch.randn(32, generator=generator).requires_grad_()
    optimizer = ft.SGD([param], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    for bad in (False, True):
        optimizer.zero_grad()
        loss = (param * torch.randn(32, generator=generator)).sum() * (float("inf") if bad else 1.0)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_([param], 1.0)
        before, grad = param.detach().clone(), param.grad.clone()
        scaler.step(optimizer)
        scaler.update()
        if bad:
            assert torch.equal(param.detach(), before)
        else:
            assert torch.allclose(param.detach(), before - 0.1 * grad, rtol=0, atol=1e-7)
    assert scaler.get_scale() == 128.0


@pytest.mark.parametrize("dtype,options", CONFIGS, ids=IDS)
def test_state_dict_keeps_float32_states_and_continues_bit_exactly(dtype, options):
    generator = torch.Generator().manual_seed(3)
    shapes = [(9,), (30, 3)]
    start = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
    grads = [[torch.randn(shape, generator=generator).to(dtype) for shape in shapes] for _ in range(4)]

    def run(params, optimizer, steps):
        for step_grads in steps:
            for param, grad in zip(params, step_grads):
                param.grad = grad.clone()
            optimizer.step()

    straight = [p.clone().requires_grad_() for p in start]
    run(straight, ft.AdamW(straight, **options), grads)

    first = [p.clone().requires_grad_() for p in start]
    optimizer = ft.AdamW(first, **options)
    run(first, optimizer, grads[:2])
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed = [p.detach().clone().requires_grad_() for p in first]
    other = ft.AdamW(resumed, **options)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    for param, original in zip(resumed, first):
        for name, value in optimizer.state[original].items():
            assert other.state[param][name].dtype == value.dtype, name
    run(resumed, other, grads[2:])
    for ours, expected in zip(resumed, straight):
        assert same_bits(to_numpy(ours), to_numpy(expected))


def test_unknown_keyword_is_refused():
    with pytest.raises(TypeError, match="master_weight"):
        ft.AdamW([torch.zeros(3, requires_grad=True)], master_weight=True)


# ---------------------------------------------------------------- on the GPU
def cupy_view(tensor):
    import cupy

    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        return cupy.from_dlpack(tensor.view(torch.int16)).view(cupy.uint16)
    return cupy.from_dlpack(tensor)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype,options", CONFIGS, ids=IDS)
def test_cuda_adapter_equals_the_cuda_core_bit_for_bit(dtype, options):
    """bfloat16 CUDA tensors reach the CUDA engine as uint16 views of their bits, and the loss scale stays on the
    device. The adapter's results equal the core optimizer's over CuPy arrays, bit for bit, an overflowing step
    skipped by both. float16 runs under torch.amp.GradScaler; torch's scaler has no bfloat16 grads on CUDA
    (``_amp_foreach_non_finite_check_and_unscale_cuda`` is not implemented for BFloat16), so bfloat16 steps get
    the scale as the scaler hands it over (``optimizer.grad_scale``, a device tensor)."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(13,), (40, 7), (1,)]
    params = [torch.randn(shape, generator=generator, device="cuda").to(dtype).requires_grad_() for shape in shapes]
    mirror = [p.detach().clone() for p in params]
    ours = ft.AdamW(params, lr=0.01, **options)
    core = fo.AdamW([cupy_view(p) for p in mirror], lr=0.01, **options)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 8, growth_interval=1000)
    scaler.scale(torch.ones((), device="cuda"))  # creates the scale
    for step in range(4):
        scale = scaler.get_scale()
        grads = [(torch.randn(shape, generator=generator, device="cuda") * scale).to(dtype) for shape in shapes]
        if step == 2:
            grads[1][3, 4] = float("inf")
        for param, grad in zip(params, grads):
            param.grad = grad.clone()
        core.step([cupy_view(grad) for grad in grads], grad_scale=scale)
        if dtype == torch.float16:
            scaler.step(ours)
            scaler.update()
        else:
            ours.grad_scale = torch.full((), scale, device="cuda")
            ours.step()
            del ours.grad_scale
    torch.cuda.synchronize()
    # float16: the scaler's found_inf skips the step before the kernel; bfloat16: the kernel's own check skips it.
    assert core.skipped_steps == 1 and ours.core.skipped_steps == (0 if dtype == torch.float16 else 1)
    for index, (param, expected) in enumerate(zip(params, mirror)):
        assert torch.equal(param.detach().view(torch.int16 if dtype == torch.bfloat16 else dtype),
                           expected.view(torch.int16 if dtype == torch.bfloat16 else dtype)), f"param {index}"
        assert float(ours.state[param]["step"]) == 3
