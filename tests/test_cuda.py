"""The CUDA backend on CuPy arrays: parity with the float64 reference, the CPU kernels and torch.optim on CUDA;
mixed precision (bfloat16 as uint16 bits, float16, master copies, bfloat16 states, stochastic rounding), 8-bit states
(codes and scales) and the grad control (loss scale, clipping, non-finite steps skipped on the device) bit for bit
against the CPU kernels;
schedules evaluated on the device; CUDA graph capture and replay; uploads only on change; bad input.

Most tests take the ``cp`` fixture and run twice: on a GPU through CuPy (marked ``gpu``: skipped without one, or
failing when ``REQUIRE_GPU=1``; see ``require_gpu``, independent of conftest.py), and everywhere through a NumPy
stand-in for CuPy whose kernel launches are emulated with the host build of the kernels' math (see the ``cp``
fixture and the end of this file). Tests that need the real device (streams, graphs, device cos/pow, torch on
CUDA) take only the GPU. The tests at the top need neither.
"""
import ctypes
import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

import fastopt as fo
from conftest import KERNELS_8BIT, MIXED_PRECISION_KERNELS, PLAIN_KERNELS, SIZES, assert_close, tolerance
from fastopt import dtypes
from fastopt.backends import cuda
from fastopt.kernels.cpu import layout as kernel_layout
from fastopt.rules import RULES
import test_cuda_host_math
from configs import CONFIG_IDS, CONFIGS, STEPS, assert_matches_reference, lr_schedule, make_problem, run_reference
from test_schedules import CASES, EPS

shim = test_cuda_host_math.shim  # the host build of the kernels' math (a fixture), for the stand-in


# ---------------------------------------------------------------- without a GPU
def test_importing_the_backend_does_not_import_cupy():
    code = ("import sys, fastopt, fastopt.backends.cuda as c; c.compile_options(); "
            "assert 'cupy' not in sys.modules, 'cupy was imported'")
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=environment)


def test_gpu_available_never_raises():
    assert isinstance(cuda.gpu_available(), bool)
    # With CuPy unimportable.
    code = ("import sys; sys.modules['cupy'] = None; import fastopt.backends.cuda as c; "
            "assert c.gpu_available() is False")
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code], check=True, env=environment)


def test_chunk_table_covers_every_element_once():
    sizes = [0, 1, 13, 2 * 2048 + 7, 0, 2048]
    tensor, start, length = cuda.chunk_table(sizes, 2048)
    assert tensor.dtype == start.dtype == length.dtype == np.int64
    for position, size in enumerate(sizes):
        mine = tensor == position
        covered = np.zeros(size, dtype=int)
        for first, count in zip(start[mine], length[mine]):
            covered[first:first + count] += 1
        assert (covered == 1).all() and (length[mine] <= 2048).all()
    assert cuda.chunk_table([0, 0], 2048)[0].size == 0


def test_chunk_size_keeps_multiprocessors_busy():
    assert cuda.chunk_elements(1 << 28, 132) == cuda.MAX_CHUNK
    assert cuda.chunk_elements(1 << 20, 132) == cuda.MIN_CHUNK
    for total in (0, 1 << 20, 1 << 24, 124_439_808, 1 << 28):
        chunk = cuda.chunk_elements(total, 132)
        assert cuda.MIN_CHUNK <= chunk <= cuda.MAX_CHUNK and chunk & (chunk - 1) == 0
        assert chunk == cuda.MIN_CHUNK or total >= chunk * 132 * cuda.BLOCKS_PER_MULTIPROCESSOR
    assert cuda.MAX_CHUNK % (cuda.BLOCK * cuda.ILP) == 0 and cuda.MIN_CHUNK % (cuda.BLOCK * cuda.ILP) == 0


def test_host_arrays_are_refused_with_a_device_error():
    pytest.importorskip("cupy")
    with pytest.raises(TypeError, match=r"grads\[0\] is a NumPy array in host memory"):
        cuda.CupyArrays.check_array(np.zeros(3), "grads[0]", writable=False)
    with pytest.raises(TypeError, match="must be a cupy.ndarray"):
        cuda.CupyArrays.check_array([1.0], "grads[0]", writable=False)


# ---------------------------------------------------------------- CuPy, or a NumPy stand-in for it
def require_gpu():
    if cuda.gpu_available():
        return
    if os.environ.get("REQUIRE_GPU") == "1":
        pytest.fail("REQUIRE_GPU=1 but no CUDA GPU is usable through CuPy")
    pytest.skip("needs CuPy and a CUDA GPU")


@pytest.fixture
def gpu():
    """CuPy on a real GPU (tests that use it are marked ``gpu``)."""
    require_gpu()
    import cupy

    return cupy


@pytest.fixture(params=[pytest.param("gpu", marks=pytest.mark.gpu), "stand-in"])
def cp(request, monkeypatch):
    """CuPy on a GPU, or the NumPy stand-in below, which runs the backend's host code for real and each kernel
    launch as an emulation: every block's work done by the host build of the kernels' math (the shim of
    tests/test_cuda_host_math.py) at the chunk's addresses (a norms pass's per-thread sums added in block_sum's tree),
    then the last block's update of the step counts and running scalars; a blend launch's blocks likewise. The
    stand-in checks what the host hands the kernels (tables, argument types, grid, counters, the order of a two-pass
    step) without a GPU; what only the device can show (fused.cu's loads, stores and barriers, streams, graphs, device
    cos/pow) needs the GPU run."""
    if request.param == "gpu":
        return request.getfixturevalue("gpu")
    stand_in = CupyStandIn(request.getfixturevalue("shim"))
    monkeypatch.setattr(cuda, "_cupy", lambda: stand_in)
    monkeypatch.setattr(cuda, "load_module", stand_in.load_module)
    monkeypatch.setattr(cuda, "_FUNCTIONS", {})
    # Chunks far smaller than on a GPU, so that tensors of a few thousand elements span several.
    monkeypatch.setattr(cuda, "MIN_CHUNK", 1024)
    monkeypatch.setattr(cuda, "MAX_CHUNK", 4096)
    return stand_in


# Tests that run the CPU kernels beside the stand-in join the group of the test file that compiles those kernels
# (tests/conftest.py), so that each compiles once.
WITH_PLAIN_KERNELS = pytest.mark.xdist_group(PLAIN_KERNELS)
WITH_MIXED_PRECISION_KERNELS = pytest.mark.xdist_group(MIXED_PRECISION_KERNELS)
WITH_8BIT_KERNELS = pytest.mark.xdist_group(KERNELS_8BIT)

# For the tests that need the real thing (streams, graphs, torch on CUDA, device-only math).
GPU_ONLY = pytest.mark.parametrize("cp", ["gpu"], indirect=True)


def to_device(cp, arrays):
    return [cp.asarray(array) for array in arrays]


def host(cp, arrays):
    return [cp.asnumpy(array) for array in arrays]


# ---------------------------------------------------------------- parity
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_matches_reference(cp, cls, kwargs, dtype, rng):
    """tests/test_optimizers.py's problem on the GPU: two groups (a schedule; a float lr changed every step, with
    lr_scale), awkward sizes, grads in new buffers every step (the address table is re-uploaded)."""
    params0, params1, scales1, grads = make_problem(dtype, rng)
    schedule = lr_schedule(cls, fo.schedules.cosine(0.05, t_max=4, eta_min=0.001))
    lrs1 = [0.02, 0.02, 0.005, 0.04, 0.0, 0.01]
    expected_params, expected_states = run_reference(cls, kwargs, params0, params1, scales1, grads, schedule, lrs1)

    device0, device1 = to_device(cp, params0), to_device(cp, params1)
    groups = [{"params": device0, "lr": schedule}, {"params": device1, "lr": lrs1[0],
                                                     "lr_scale": to_device(cp, scales1)}]
    optimizer = cls(groups, backend="cuda", **kwargs)
    assert isinstance(optimizer._backend, cuda.CudaBackend)
    for t in range(STEPS):
        optimizer.param_groups[1]["lr"] = lrs1[t]
        optimizer.step(to_device(cp, grads[t]))
    assert optimizer.step_count == STEPS == optimizer._backend.device_step_count()

    assert_matches_reference(optimizer, host(cp, device0 + device1), expected_params, expected_states, dtype, STEPS)


# Rules whose step scalars raise to a power (Adam's and LAMB's bias corrections, schedule-free's weights and bias
# correction): the device's pow is within 2 ulp, glibc's (Numba's) within 0.52, so on a GPU their coefficients may
# differ from the CPU's in the last bit (the host build, with glibc's pow, is the CPU's bit for bit).
DEVICE_POW = ("adam", "schedule_free", "lamb")
ONE_PASS = [(cls, kwargs) for cls, kwargs in CONFIGS if cuda.rule_passes(cls.KERNEL) == ("step",)]
NORMS = [(cls, kwargs) for cls, kwargs in CONFIGS if cuda.rule_passes(cls.KERNEL) != ("step",)]


def config_ids(configs):
    return [CONFIG_IDS[CONFIGS.index(config)] for config in configs]


def run_with_float_lrs(cp, cls, kwargs, params0, params1, scales1, grads, backend):
    """tests/test_optimizers.py's problem with float learning rates (no cos), changed every step, on the CPU or the
    GPU: (the optimizer, its params)."""
    lrs = [0.02, 0.01, 0.005, 0.04, 0.0, 0.01]
    on_cpu = backend == "cpu"
    params = [p.copy() for p in params0 + params1] if on_cpu else to_device(cp, params0 + params1)
    groups = [{"params": params[:len(params0)]},
              {"params": params[len(params0):], "lr_scale": scales1 if on_cpu else to_device(cp, scales1)}]
    optimizer = cls(groups, lr=lrs[0], backend=backend, **kwargs)
    for t in range(STEPS):
        for group in optimizer.param_groups:
            group["lr"] = lrs[t]
        optimizer.step(grads[t] if on_cpu else to_device(cp, grads[t]))
    return optimizer, params


@WITH_PLAIN_KERNELS
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,kwargs", ONE_PASS, ids=config_ids(ONE_PASS))
def test_bitwise_equal_to_cpu_kernels(cp, cls, kwargs, dtype, rng):
    """With float learning rates no rule uses cos; the GPU (--fmad=false, IEEE division and square root) gives the CPU
    kernels' bits, step counts and running scalars (and schedule-free's eval() and train()), except for the rules
    whose step scalars call pow (DEVICE_POW), which are checked through the host build only."""
    if cls.KERNEL in DEVICE_POW and not isinstance(cp, CupyStandIn):
        pytest.skip("the device's pow may differ from glibc's in the last bit")
    params0, params1, scales1, grads = make_problem(dtype, rng)
    cpu, cpu_params = run_with_float_lrs(cp, cls, kwargs, params0, params1, scales1, grads, "cpu")
    gpu, gpu_params = run_with_float_lrs(cp, cls, kwargs, params0, params1, scales1, grads, "cuda")
    moves = ("eval", "train") if isinstance(cpu, fo.rules.schedule_free.ScheduleFree) else ()
    for move in (None,) + moves:  # then schedule-free's blends toward z and back
        if move:
            getattr(cpu, move)()
            getattr(gpu, move)()
        for index, (theirs, ours) in enumerate(zip(cpu_params, host(cp, gpu_params))):
            np.testing.assert_array_equal(ours, theirs, err_msg=f"param {index} ({move or 'step'})")
            for name, buffer in cpu.state[index].items():
                np.testing.assert_array_equal(cp.asnumpy(gpu.state[index][name]), buffer, err_msg=f"{index} {name}")
    np.testing.assert_array_equal(gpu._backend.tensor_steps(), cpu._backend.tensor_steps())
    np.testing.assert_array_equal(gpu._backend.tensor_scalars(), cpu._backend.tensor_scalars())


@WITH_PLAIN_KERNELS
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,kwargs", NORMS, ids=config_ids(NORMS))
def test_norms_rule_matches_cpu_kernels(cp, cls, kwargs, dtype, rng):
    """A rule with per-tensor norms (LAMB): the moments depend on the grads alone (no pow, no norm) and are the CPU
    kernels' bits, on a GPU too; the params move by a trust ratio formed from sums of squares added in another order
    than on the CPU (per thread, then a fixed tree, against Numba's vector lanes) and, on a GPU, from bias corrections
    by the device's pow, so they agree to rounding (bit for bit wherever the trust coefficient rounds alike in the math
    dtype: nearly always)."""
    params0, params1, scales1, grads = make_problem(dtype, rng)
    cpu, cpu_params = run_with_float_lrs(cp, cls, kwargs, params0, params1, scales1, grads, "cpu")
    gpu, gpu_params = run_with_float_lrs(cp, cls, kwargs, params0, params1, scales1, grads, "cuda")
    rtol = tolerance(dtype, STEPS)
    for index, (theirs, ours) in enumerate(zip(cpu_params, host(cp, gpu_params))):
        assert_close(ours, theirs, rtol, f"param {index}")
        for name, buffer in cpu.state[index].items():
            np.testing.assert_array_equal(cp.asnumpy(gpu.state[index][name]), buffer, err_msg=f"{index} {name}")
    np.testing.assert_array_equal(gpu._backend.tensor_steps(), cpu._backend.tensor_steps())


@pytest.mark.gpu
@GPU_ONLY
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_matches_torch_on_cuda(cp, cls, kwargs, dtype, rng):
    """tests/test_torch_parity.py's check against torch.optim's single-tensor CUDA implementation."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA")
    shapes = [(0,), (1,), (13,), (40, 7), (SIZES[-1],)]
    steps = 12
    initial = [rng.standard_normal(shape).astype(dtype) for shape in shapes]
    grads = [[rng.standard_normal(shape).astype(dtype) for shape in shapes] for _ in range(steps)]
    lrs = 0.03 * (1 + np.sin(np.arange(steps)))

    params = to_device(cp, initial)
    ours = cls([{"params": params[:2]}, {"params": params[2:], "lr": 0.01}], lr=lrs[0], **kwargs)
    tensors = [torch.tensor(p, device="cuda") for p in initial]
    torch_cls = getattr(torch.optim, cls.__name__, None)
    if torch_cls is None:  # Lion, schedule-free, LAMB: against their anchors on the CPU (tests/test_torch_parity.py)
        pytest.skip(f"torch.optim has no {cls.__name__}")
    theirs = torch_cls([{"params": tensors[:2]}, {"params": tensors[2:], "lr": 0.01}], foreach=False,
                       **dict(kwargs, lr=lrs[0]))
    for t in range(steps):
        ours.param_groups[0]["lr"] = theirs.param_groups[0]["lr"] = float(lrs[t])
        ours.step(to_device(cp, grads[t]))
        for tensor, grad in zip(tensors, grads[t]):
            tensor.grad = torch.tensor(grad, device="cuda")
        theirs.step()

    rtol = tolerance(dtype, steps)
    our_state = ours.state_dict()["state"]
    for index, tensor in enumerate(tensors):
        assert_close(cp.asnumpy(params[index]), tensor.cpu().numpy(), rtol, f"param {index}")
        for name, value in theirs.state[tensor].items():
            if name == "step":
                assert our_state[index]["step"] == int(value)
            else:
                assert_close(our_state[index][name], value.cpu().numpy(), rtol, f"param {index} state {name}")


def test_mixed_dtypes_one_launch_each(cp, rng):
    """float32 and float64 params in one optimizer: two buckets, each computing in its own precision, each with its
    own copy of the device step counter."""
    p32 = rng.standard_normal(9).astype(np.float32)
    p64 = rng.standard_normal(9)
    g32, g64 = rng.standard_normal(9).astype(np.float32), rng.standard_normal(9)
    expected = [p32.astype(np.float64), p64.copy()]
    states = [{}, {}]
    params = to_device(cp, [p32, p64])
    optimizer = fo.Adam(params, lr=fo.schedules.exponential(0.1, 0.5), backend="cuda")
    assert len(optimizer._backend.buckets) == 2
    for t in range(3):
        optimizer.step(to_device(cp, [g32, g64]))
        for param, grad, state in zip(expected, [g32, g64], states):
            fo.reference.adam(param, grad.astype(np.float64), state, lr=0.1 * 0.5**t)
    assert_close(cp.asnumpy(params[0]), expected[0], tolerance(np.float32, 3), "float32 param")
    assert_close(cp.asnumpy(params[1]), expected[1], tolerance(np.float64, 3), "float64 param")


# ---------------------------------------------------------------- schedules on the device
EVALUATE = r"""
#include "schedule_math.cuh"
extern "C" __global__ void evaluate(const double* words, long long size, long long base, const long long* steps,
                                    long long count, double* values) {
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i < count) values[i] = fastopt::schedule_value(fastopt::Program{words, size}, base, steps[i]);
}
"""


@pytest.mark.gpu
@GPU_ONLY
@pytest.mark.parametrize("case", CASES, ids=str)
def test_schedule_value_on_device_matches_host(cp, case):
    """The device evaluator against the host reference. |device - host| <= 4 eps (|host| + peak): CUDA's double
    cos and pow are within 2 ulp (glibc's within 1), and where a cosine nearly cancels (1 + cos(x) near x = pi) an
    ulp of the largest term, not of the result, remains."""
    evaluate = cuda.load_module(cp, EVALUATE, "evaluate_schedule").get_function("evaluate")
    t = np.arange(case.steps, dtype=np.int64)
    expected = case.schedule(t)
    program = cp.asarray(case.schedule.program())
    values = cp.empty(t.size, dtype=np.float64)
    evaluate(((t.size + 255) // 256,), (256,), (program, np.int64(program.size), np.int64(0), cp.asarray(t),
                                                np.int64(t.size), values))
    got = cp.asnumpy(values)
    error = np.abs(got - expected)
    bound = 4 * EPS * (np.abs(expected) + np.max(np.abs(expected)))
    worst = int(np.argmax(error - bound))
    assert np.all(error <= bound), f"t={worst}: device {got[worst]!r} host {expected[worst]!r}"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_schedule_advances_with_the_device_step_count(cp, case):
    """Through the optimizer: plain SGD on a zero param with a unit grad moves it by -lr(t), so resetting the param
    before each step reads back the lr the kernel computed from its own step counter."""
    steps = min(case.steps, 60)
    param = cp.zeros(1, dtype=np.float64)
    grad = cp.ones(1, dtype=np.float64)
    optimizer = fo.SGD([param], lr=case.schedule, backend="cuda")
    got = []
    for _ in range(steps):
        param.fill(0)
        optimizer.step([grad])
        got.append(-float(param[0]))
    expected = case.schedule(np.arange(steps))
    bound = 4 * EPS * (np.abs(expected) + np.max(np.abs(expected)))
    assert np.all(np.abs(np.array(got) - expected) <= bound)


@pytest.mark.parametrize("cls,kwargs", [(fo.SGD, dict(momentum=0.9)), (fo.AdamW, {})], ids=["SGD", "AdamW"])
def test_schedule_in_kernel_matches_torch_scheduler(cp, cls, kwargs, rng):
    """tests/test_torch_parity.py's schedule pairs: the device-evaluated schedule against torch's scheduler."""
    torch = pytest.importorskip("torch")
    from test_torch_parity import SCHEDULER_PAIRS

    for name, ours, theirs in SCHEDULER_PAIRS:
        initial = rng.standard_normal(31).astype(np.float32)
        grads = [rng.standard_normal(31).astype(np.float32) for _ in range(STEPS * 2)]
        param = cp.asarray(initial)
        optimizer = cls([param], lr=ours(), backend="cuda", **kwargs)
        tensor = torch.tensor(initial)
        torch_opt = getattr(torch.optim, cls.__name__)([tensor], foreach=False, **dict(kwargs, lr=0.1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scheduler = theirs(torch_opt)
            for grad in grads[:12]:
                optimizer.step([cp.asarray(grad)])
                tensor.grad = torch.tensor(grad)
                torch_opt.step()
                scheduler.step()
        assert_close(cp.asnumpy(param), tensor.numpy(), tolerance(np.float32, 12), name)


# ---------------------------------------------------------------- graphs, streams and uploads
def reference_run(cls, kwargs, initial, grads, schedule):
    params = [p.astype(np.float64) for p in initial]
    states = [{} for _ in params]
    group = dict(cls.DEFAULTS, **kwargs)
    for t, step_grads in enumerate(grads):
        for param, grad, state in zip(params, step_grads, states):
            cls.reference_step(param, grad.astype(np.float64), state, group, schedule(t), 1.0)
    return params


@pytest.mark.gpu
@pytest.mark.parametrize("cls,kwargs", [(fo.SGD, dict(momentum=0.9, nesterov=True)), (fo.RMSprop, dict(centered=True)),
                                        (fo.AdamW, dict(amsgrad=True)), (fo.AdamWScheduleFree, dict(warmup_steps=4)),
                                        (fo.LAMB, {})],
                         ids=["SGD", "RMSprop", "AdamW", "AdamWScheduleFree", "LAMB"])
def test_cuda_graph_replays_advance_the_schedule(gpu, cls, kwargs, rng):
    """One eager step, one captured step, replays with new grad values in the same buffers: every replay is one
    optimizer step with the schedule at its own step count (schedule-free: its warmup and running scalars; LAMB: both
    of its launches). Eager steps after the replays continue from the device's count."""
    cp = gpu
    shapes = [0, 1, 13, 5000]
    replays, after = 6, 2
    total = 2 + replays + after
    schedule = lr_schedule(cls, fo.schedules.warmup(fo.schedules.cosine(0.1, t_max=7, eta_min=0.01), warmup_steps=3))
    initial = [rng.standard_normal(n).astype(np.float32) for n in shapes]
    grads = [[rng.standard_normal(n).astype(np.float32) for n in shapes] for _ in range(total)]
    expected = reference_run(cls, kwargs, initial, grads, schedule)

    params = to_device(cp, initial)
    grad_buffers = [cp.empty(n, dtype=np.float32) for n in shapes]
    optimizer = cls(params, lr=schedule, **kwargs)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        def load(t):
            for buffer, values in zip(grad_buffers, grads[t]):
                buffer.set(values, stream=stream)

        load(0)
        optimizer.step(grad_buffers)  # eager: uploads the tables
        load(1)
        stream.begin_capture()
        try:
            optimizer.step(grad_buffers)  # recorded, not run
        finally:
            graph = stream.end_capture()
        graph.launch(stream)
        for t in range(2, 2 + replays):
            load(t)
            graph.launch(stream)
        for t in range(2 + replays, total):
            load(t)
            optimizer.step(grad_buffers)
        stream.synchronize()
    assert optimizer._backend.device_step_count() == total
    assert optimizer.step_count == 2 + after  # the host counts the eager step calls only...
    steps = optimizer.state_dict()["state"]
    assert optimizer.step_count == total  # ...until it asks the device (state_dict, current_lr)
    rtol = tolerance(np.float32, total)
    for index, param in enumerate(host(cp, params)):
        assert_close(param, expected[index], rtol, f"param {index}")
        if cls is not fo.SGD:
            assert steps[index]["step"] == total


@pytest.mark.gpu
@GPU_ONLY
def test_capture_refuses_a_step_that_must_upload(cp, rng):
    params = [cp.asarray(rng.standard_normal(5).astype(np.float32))]
    optimizer = fo.Adam(params, lr=0.1)
    optimizer.step([cp.ones(5, dtype=np.float32)])
    before = cp.asnumpy(params[0])
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        new_grads = [cp.ones(5, dtype=np.float32)]  # a new buffer: its address must be uploaded
        stream.begin_capture()
        try:
            with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
                optimizer.step(new_grads)
        finally:
            stream.end_capture()
    np.testing.assert_array_equal(cp.asnumpy(params[0]), before)


def test_steady_state_steps_upload_nothing(cp, monkeypatch):
    """Same grad buffers and hyperparameters: no host-to-device copy. A changed float lr: one."""
    param = cp.zeros(5)
    grads = [cp.ones(5)]
    optimizer = fo.SGD([param], lr=0.5, backend="cuda")
    uploads = []
    flush = optimizer._backend._flush
    monkeypatch.setattr(optimizer._backend, "_flush",
                        lambda pending: (uploads.append(len([p for p in pending if p[1].size])), flush(pending)))
    optimizer.step(grads)
    assert uploads[-1] > 0
    for _ in range(3):
        optimizer.step(grads)
        assert uploads[-1] == 0
    optimizer.param_groups[0]["lr"] = 0.25
    optimizer.step(grads)
    assert uploads[-1] == 1  # the packed schedules only
    np.testing.assert_array_equal(cp.asnumpy(param), -4 * 0.5 - 0.25)


def test_denormals_are_kept(cp):
    """float32 subnormals are computed, not flushed to zero, as on the CPU and in torch (CuPy's own compile path would
    add -ftz=true: fastopt.backends.cuda.load_module)."""
    tiny = np.float32(1e-39)  # below float32's smallest normal, 1.18e-38
    param = cp.zeros(3, dtype=np.float32)
    optimizer = fo.SGD([param], lr=1.0, backend="cuda")
    optimizer.step([cp.asarray(np.full(3, tiny))])
    np.testing.assert_array_equal(cp.asnumpy(param), -tiny)


def test_changing_group_lr_takes_effect(cp):
    param = cp.zeros(5)
    optimizer = fo.SGD([param], lr=0.5, backend="cuda")
    optimizer.step([cp.ones(5)])
    np.testing.assert_array_equal(cp.asnumpy(param), -0.5)
    optimizer.param_groups[0]["lr"] = 0.25
    optimizer.step([cp.ones(5)])
    np.testing.assert_array_equal(cp.asnumpy(param), -0.75)
    optimizer.param_groups[0]["lr"] = fo.schedules.constant(1.0)
    optimizer.step([cp.ones(5)])
    np.testing.assert_array_equal(cp.asnumpy(param), -1.75)


@pytest.mark.gpu
@GPU_ONLY
def test_step_runs_on_the_current_stream(cp):
    """A step inside ``with stream:`` is ordered on that stream: work queued before it is seen, and waiting on the
    stream is enough to see its result."""
    stream = cp.cuda.Stream(non_blocking=True)
    param = cp.zeros(1 << 20, dtype=np.float32)
    grad = cp.zeros(1 << 20, dtype=np.float32)
    optimizer = fo.SGD([param], lr=1.0)
    with stream:
        grad.fill(2.0)  # queued on the stream, before the step
        optimizer.step([grad])
    stream.synchronize()
    assert float(param[-1]) == -2.0


@pytest.mark.parametrize("cls", [fo.Adam, fo.AdamWScheduleFree, fo.LAMB])
def test_skipped_and_empty_tensors(cp, cls):
    """A None grad skips its tensor, step count and running scalars included; an empty tensor's step still counts
    (its scalars advance); a bucket of empty tensors only still launches (its last block advances the counts)."""
    params = [cp.ones(7, dtype=np.float32), cp.ones(7, dtype=np.float32), cp.zeros(0, dtype=np.float32)]
    optimizer = cls(params, lr=0.1, backend="cuda")
    optimizer.step([None, cp.ones(7, dtype=np.float32), cp.zeros(0, dtype=np.float32)])
    np.testing.assert_array_equal(cp.asnumpy(params[0]), 1.0)
    assert (cp.asnumpy(params[1]) < 1.0).all()
    assert list(optimizer._backend.tensor_steps()) == [0, 1, 1]
    if cls.SCALARS:  # schedule-free's weight sum and largest rate: advanced for the two tensors that stepped
        scalars = optimizer._backend.tensor_scalars()
        assert not scalars[0].any() and (scalars[1:, :len(cls.SCALARS)] > 0).all()
    empty = [cp.zeros(0), cp.zeros((3, 0))]
    only_empty = cls(empty, lr=0.1, backend="cuda")
    only_empty.step([cp.zeros(0), cp.zeros((3, 0))])
    assert list(only_empty._backend.tensor_steps()) == [1, 1]
    assert only_empty._backend.device_step_count() == 1


@pytest.mark.parametrize("cls,kwargs", [(fo.Adam, dict(amsgrad=True)), (fo.AdamWScheduleFree, dict(warmup_steps=2)),
                                        (fo.LAMB, {})], ids=["Adam", "AdamWScheduleFree", "LAMB"])
def test_state_dict_round_trip_continues_the_run(cp, cls, kwargs, rng):
    """A run saved halfway and loaded into a new optimizer continues bit for bit: states, step counts and running
    scalars (set_tensor_scalars)."""
    shapes = [3, 4097]
    schedule = lr_schedule(cls, fo.schedules.step_decay(0.1, step_size=2, gamma=0.5))
    initial = [rng.standard_normal(n).astype(np.float32) for n in shapes]
    grads = [[rng.standard_normal(n).astype(np.float32) for n in shapes] for _ in range(6)]
    straight = to_device(cp, initial)
    optimizer = cls(straight, lr=schedule, backend="cuda", **kwargs)
    for step_grads in grads:
        optimizer.step(to_device(cp, step_grads))

    resumed = to_device(cp, initial)
    first = cls(resumed, lr=schedule, backend="cuda", **kwargs)
    for step_grads in grads[:3]:
        first.step(to_device(cp, step_grads))
    saved = first.state_dict()
    second = cls(resumed, lr=schedule, backend="cuda", **kwargs)
    second.load_state_dict(saved)
    for step_grads in grads[3:]:
        second.step(to_device(cp, step_grads))
    for ours, theirs in zip(host(cp, resumed), host(cp, straight)):
        np.testing.assert_array_equal(ours, theirs)
    assert second._backend.device_step_count() == 6


def test_guard_skips_nonfinite_steps(cp, rng):
    params = [cp.asarray(rng.standard_normal(4099).astype(np.float32)), cp.zeros(3)]
    grads = [rng.standard_normal(4099).astype(np.float32), rng.standard_normal(3)]
    optimizer = fo.Adam(params, lr=0.1, guard=fo.Guard(patience=2, backoff=0.5), backend="cuda")
    before = host(cp, params)
    bad = [grads[0].copy(), grads[1]]
    bad[0][17] = np.nan
    optimizer.step(to_device(cp, bad))
    for param, saved in zip(host(cp, params), before):
        np.testing.assert_array_equal(param, saved)
    assert optimizer._backend.device_step_count() == 0 and optimizer.guard.skipped_steps == 1
    # The guard decided on the host (it read the count): no kernel ran, and the skip is the host's to count.
    assert optimizer.skipped_steps == 1 and optimizer._backend.device_skipped_steps() == 0
    optimizer.step(to_device(cp, grads))
    expected_norm = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    assert float(optimizer.last_grad_norm) == pytest.approx(expected_norm, rel=1e-12)
    assert optimizer._backend.device_step_count() == 1


def test_add_param_group(cp):
    a, b = cp.zeros(3), cp.zeros(4)
    optimizer = fo.Adam([a], lr=0.1, backend="cuda")
    optimizer.step([cp.ones(3)])
    optimizer.add_param_group({"params": [b], "lr": 0.2})
    optimizer.step([cp.ones(3), cp.ones(4)])
    state = optimizer.state_dict()["state"]
    assert state[0]["step"] == 2 and state[1]["step"] == 1
    np.testing.assert_allclose(cp.asnumpy(b), -0.2)


# ---------------------------------------------------------------- mixed precision and grad control
# (id, param storage, grad storage, options), as tests/test_mixed_precision.py's table.
MIXED_STORAGE = [
    ("bf16", "bfloat16", "bfloat16", {}),
    ("bf16-master", "bfloat16", "bfloat16", dict(master_weights=True)),
    ("bf16-f32grads", "bfloat16", "float32", {}),
    ("bf16-master-f32grads", "bfloat16", "float32", dict(master_weights=True)),
    ("bf16-bf16states", "bfloat16", "bfloat16", dict(state_dtype="bfloat16")),
    ("bf16-stochastic", "bfloat16", "bfloat16", dict(rounding="stochastic", seed=7)),
    ("bf16-bf16states-stochastic", "bfloat16", "bfloat16", dict(state_dtype="bfloat16", rounding="stochastic", seed=9)),
    ("f16-master", "float16", "float16", dict(master_weights=True)),
    ("f16-f32grads", "float16", "float32", {}),
    ("f32-bf16states", "float32", "float32", dict(state_dtype="bfloat16")),
    ("f64-f32grads", "float64", "float32", {}),
]
# Adam's betas are powers of two: pow(beta, t) is then exact on the device as in glibc, so its coefficients, like
# SGD's and RMSprop's, are the CPU's bit for bit on a GPU too (with other betas the device's pow may differ by an ulp).
MIXED_OPTIMIZERS = [
    (fo.SGD, dict(momentum=0.9, nesterov=True, weight_decay=0.01)),
    (fo.RMSprop, dict(momentum=0.5, weight_decay=0.1)),
    (fo.RMSprop, dict(centered=True)),
    (fo.AdamW, dict(betas=(0.5, 0.25), amsgrad=True)),
    (fo.Adam, dict(betas=(0.5, 0.25), weight_decay=0.01)),
    (fo.Adagrad, dict(lr_decay=0.1, weight_decay=0.01, initial_accumulator_value=0.5)),
    (fo.Lion, dict(weight_decay=0.1)),
    # Schedule-free with every pow exact (the betas powers of two, t^0 and lr_max^0): its running scalars and step
    # scalars are the CPU's on a GPU too; its eval() and train() (the blend) are checked after the steps.
    (fo.AdamWScheduleFree, dict(betas=(0.5, 0.25), weight_lr_power=0.0, warmup_steps=2, weight_decay=0.01)),
    (fo.SGDScheduleFree, dict(momentum=0.5, weight_lr_power=0.0, weight_decay=0.01)),
]
MIXED_SIZES = (0, 1, 13, 5000)  # 5000: several chunks, on the GPU and in the stand-in
MIXED_STEPS = 4
MIXED_LRS = [0.02, 0.01, 0.005, 0.04]


def storage_id(entry):
    return entry[0]


def optimizer_id(entry):
    cls, kwargs = entry
    return f"{cls.__name__}-{'-'.join(f'{k}={v}' for k, v in kwargs.items()) or 'default'}"


def storage_dtype(name):
    """The NumPy dtype of storage ``name`` (bfloat16: ml_dtypes.bfloat16; skips the test without ml_dtypes)."""
    if name == "bfloat16":
        pytest.importorskip("ml_dtypes")
    return dtypes.numpy_dtype(name)


def to_device_storage(cp, array):
    """A host array on the device; a bfloat16 one as its uint16 bits (CuPy has no bfloat16)."""
    return cp.asarray(array.view(np.uint16) if array.dtype == dtypes.BFLOAT16 else array)


def assert_same_bits(ours, theirs, what):
    """``ours`` (a host copy of a device buffer: bfloat16 as uint16) has the bits of ``theirs``, except that two NaNs
    need only both be NaN (the device's default NaN is not x86's)."""
    theirs = np.asarray(theirs)
    ours = np.asarray(ours).view(theirs.dtype)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} != {theirs.shape}"
    width = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[theirs.dtype.itemsize]
    same = ours.view(width) == theirs.view(width)
    both_nan = np.isnan(ours.astype(np.float64)) & np.isnan(theirs.astype(np.float64))
    bad = np.flatnonzero(~(same | both_nan))
    assert bad.size == 0, (f"{what}: {bad.size} of {theirs.size} elements differ, first {bad[0]}: "
                           f"{ours.flat[bad[0]]!r} against {theirs.flat[bad[0]]!r}")


def mixed_problem(param_name, grad_name, rng, steps=MIXED_STEPS):
    """Params of every awkward size in group 0 and two with lr_scale (in the math dtype) in group 1, and grads."""
    shapes = [(size,) for size in MIXED_SIZES] + [(3, 5), (4099,)]
    math = dtypes.math_dtype(param_name)
    params = [rng.standard_normal(shape).astype(storage_dtype(param_name)) for shape in shapes]
    scales = [rng.uniform(0.0, 2.0, shape).astype(math) for shape in shapes[len(MIXED_SIZES):]]
    grads = [[rng.standard_normal(shape).astype(storage_dtype(grad_name)) for shape in shapes] for _ in range(steps)]
    return params, scales, grads


def mixed_optimizer(cls, kwargs, options, params, scales, backend):
    groups = [{"params": params[:len(MIXED_SIZES)]}, {"params": params[len(MIXED_SIZES):], "lr_scale": scales}]
    return cls(groups, lr=MIXED_LRS[0], backend=backend, **kwargs, **options)


def run_mixed_twins(cp, cls, kwargs, storage, rng):
    """A CPU and a GPU optimizer of ``cls`` over the same mixed-precision problem, stepped MIXED_STEPS times with the
    same grads and rates: (cpu, cpu params, gpu, gpu params, the grads)."""
    _, param_name, grad_name, options = storage
    params, scales, grads = mixed_problem(param_name, grad_name, rng)
    cpu_params = [p.copy() for p in params]
    cpu = mixed_optimizer(cls, kwargs, options, cpu_params, [s.copy() for s in scales], "cpu")
    gpu_params = [to_device_storage(cp, p) for p in params]
    gpu = mixed_optimizer(cls, kwargs, options, gpu_params, to_device(cp, scales), "cuda")
    for t in range(MIXED_STEPS):
        for optimizer in (cpu, gpu):
            for group in optimizer.param_groups:
                group["lr"] = MIXED_LRS[t]
        cpu.step(grads[t])
        gpu.step([to_device_storage(cp, grad) for grad in grads[t]])
    return cpu, cpu_params, gpu, gpu_params, grads


def assert_runs_bitwise_equal(cp, gpu, gpu_params, cpu, cpu_params):
    """Params, every state buffer (the master copies too) and the step counts of a GPU and a CPU optimizer."""
    for index, (ours, theirs) in enumerate(zip(gpu_params, cpu_params)):
        assert_same_bits(cp.asnumpy(ours), theirs, f"param {index}")
        assert set(gpu.state[index]) == set(cpu.state[index])
        for name, buffer in cpu.state[index].items():
            assert_same_bits(cp.asnumpy(gpu.state[index][name]), buffer, f"param {index} {name}")
    np.testing.assert_array_equal(gpu._backend.tensor_steps(), cpu._backend.tensor_steps())


@WITH_MIXED_PRECISION_KERNELS
@pytest.mark.parametrize("storage", MIXED_STORAGE, ids=storage_id)
@pytest.mark.parametrize("config", MIXED_OPTIMIZERS, ids=optimizer_id)
def test_mixed_precision_bitwise_equal_to_cpu_kernels(cp, config, storage, rng):
    """16-bit params, grads and states, float32 master copies, stochastic rounding and float32 grads of float64
    params: the GPU's stored bits are the CPU kernels' (the same function, converted in registers instead of
    strips; stochastic rounding keyed alike)."""
    cls, kwargs = config
    cpu, cpu_params, gpu, gpu_params, grads = run_mixed_twins(cp, cls, kwargs, storage, rng)
    assert_runs_bitwise_equal(cp, gpu, gpu_params, cpu, cpu_params)
    assert gpu._backend.device_step_count() == MIXED_STEPS
    if isinstance(cpu, fo.rules.schedule_free.ScheduleFree):
        # The blend toward z, by a negative weight (eval: 1 - 1/beta) and back (train: 1 - beta), then a step.
        for move in ("eval", "train"):
            getattr(cpu, move)()
            getattr(gpu, move)()
            assert_runs_bitwise_equal(cp, gpu, gpu_params, cpu, cpu_params)
        cpu.step(grads[0])
        gpu.step([to_device_storage(cp, grad) for grad in grads[0]])
        assert_runs_bitwise_equal(cp, gpu, gpu_params, cpu, cpu_params)


@WITH_MIXED_PRECISION_KERNELS
@pytest.mark.parametrize("storage", MIXED_STORAGE, ids=storage_id)
def test_norms_rule_mixed_precision_matches_cpu_kernels(cp, storage, rng):
    """LAMB over every storage: the moments (they depend on the grads alone) are the CPU kernels' bits, the params and
    master copies agree to the rounding of the trust ratio's sums (test_norms_rule_matches_cpu_kernels) and of their
    storage."""
    cpu, cpu_params, gpu, gpu_params, _ = run_mixed_twins(cp, fo.LAMB, {}, storage, rng)
    rtol = 4 * dtypes.epsilon(storage[1]) * MIXED_STEPS
    for index, (ours, theirs) in enumerate(zip(gpu_params, cpu_params)):
        ours = cp.asnumpy(ours).view(theirs.dtype)
        assert_close(ours.astype(np.float64), theirs.astype(np.float64), rtol, f"param {index}")
        assert set(gpu.state[index]) == set(cpu.state[index])
        for name, buffer in cpu.state[index].items():
            mine = cp.asnumpy(gpu.state[index][name])
            if name == "master_param":
                assert_close(mine, buffer, tolerance(np.float32, MIXED_STEPS), f"param {index} {name}")
            else:
                assert_same_bits(mine, buffer, f"param {index} {name}")
    np.testing.assert_array_equal(gpu._backend.tensor_steps(), cpu._backend.tensor_steps())


@pytest.mark.parametrize("storage", [MIXED_STORAGE[i] for i in (0, 1, 3, 4, 6, 7, 9, 10)], ids=storage_id)
@pytest.mark.parametrize("config", [MIXED_OPTIMIZERS[0], MIXED_OPTIMIZERS[3]], ids=optimizer_id)
def test_grad_scale_and_clipping_bitwise_equal_to_cpu_kernels(cp, config, storage, rng, monkeypatch):
    """grad_scale and max_grad_norm applied on the device: the same unscale and skip as the host's GradControl, the
    same norm to rounding (the partial sums are added in another order), and, given the GPU's clip factor, the CPU
    kernels' bits."""
    cls, kwargs = config
    _, param_name, grad_name, options = storage
    options = dict(options, max_grad_norm=20.0)  # the grads' norm is about 95: every step clips
    params, scales, grads = mixed_problem(param_name, grad_name, rng)
    scale = 384.0  # not a power of two: 1 / scale rounds, so the order of the grad factors shows
    scaled = [[(g.astype(np.float64) * scale).astype(g.dtype) for g in step_grads] for step_grads in grads]
    cpu_params = [p.copy() for p in params]
    cpu = mixed_optimizer(cls, kwargs, options, cpu_params, [s.copy() for s in scales], "cpu")
    gpu_params = [to_device_storage(cp, p) for p in params]
    gpu = mixed_optimizer(cls, kwargs, options, gpu_params, to_device(cp, scales), "cuda")
    host_control = cpu._backend.grad_control

    def with_the_gpus_clip_factor(layout, step_grads, unscale, max_norm, skip_nonfinite=True):
        control = host_control(layout, step_grads, unscale, max_norm, skip_nonfinite)
        device = cp.asnumpy(gpu._backend.control_values)
        assert device[kernel_layout.GRAD_UNSCALE] == control.values[kernel_layout.GRAD_UNSCALE] == np.float32(1 / scale)
        assert device[kernel_layout.SKIP] == control.values[kernel_layout.SKIP] == 0
        assert device[kernel_layout.GRAD_CLIP] == pytest.approx(control.values[kernel_layout.GRAD_CLIP], rel=1e-12)
        assert device[kernel_layout.GRAD_CLIP] < 1
        assert float(gpu.last_grad_norm) == pytest.approx(control.norm, rel=1e-12)
        control.values[:] = device
        return control

    monkeypatch.setattr(cpu._backend, "grad_control", with_the_gpus_clip_factor)
    for t in range(MIXED_STEPS):
        gpu.step([to_device_storage(cp, grad) for grad in scaled[t]], grad_scale=scale)
        cpu.step(scaled[t], grad_scale=scale)
    assert_runs_bitwise_equal(cp, gpu, gpu_params, cpu, cpu_params)


@pytest.mark.parametrize("cls", [fo.AdamW, fo.AdamWScheduleFree, fo.LAMB])
@pytest.mark.parametrize("storage", MIXED_STORAGE, ids=storage_id)
def test_nonfinite_grads_skip_the_step_on_the_device(cp, storage, cls, rng):
    """With grad_scale and max_grad_norm (no guard) a NaN/inf grad is found and the step skipped on the device, with
    no host synchronisation: params, states, master copies, every step count and running scalar stay as they were
    (both launches of LAMB's step skip), the skip is counted once, the host's counts follow the device's once it asks,
    and the next step continues as if the bad one had never come."""
    _, param_name, grad_name, options = storage
    start = [rng.standard_normal(n).astype(storage_dtype(param_name)) for n in (5, 2000)]
    grads = [[rng.standard_normal(p.shape).astype(storage_dtype(grad_name)) for p in start] for _ in range(2)]
    bad = [g.copy() for g in grads[0]]
    bad[1][1234] = np.inf
    schedule = lr_schedule(cls, fo.schedules.exponential(0.01, 0.5))
    clean_params = [to_device_storage(cp, p) for p in start]
    skipping_params = [to_device_storage(cp, p) for p in start]
    clean = cls(clean_params, lr=schedule, max_grad_norm=100.0, backend="cuda", **options)
    skipping = cls(skipping_params, lr=schedule, max_grad_norm=100.0, backend="cuda", **options)
    for optimizer in (clean, skipping):
        optimizer.step([to_device_storage(cp, g) for g in grads[0]], grad_scale=2.0)
    before = [{name: cp.asnumpy(buffer) for name, buffer in state.items()} for state in skipping.state]
    params_before = host(cp, skipping_params)
    scalars_before = skipping._backend.tensor_scalars()
    skipping.step([to_device_storage(cp, g) for g in bad], grad_scale=2.0)
    assert not bool(cp.isfinite(skipping.last_grad_norm))
    for param, previous in zip(host(cp, skipping_params), params_before):
        np.testing.assert_array_equal(param.view(np.uint8), previous.view(np.uint8))
    for state, previous in zip(skipping.state, before):
        for name, buffer in state.items():
            np.testing.assert_array_equal(cp.asnumpy(buffer).view(np.uint8), previous[name].view(np.uint8), name)
    backend = skipping._backend
    assert list(backend.tensor_steps()) == [1, 1]
    np.testing.assert_array_equal(backend.tensor_scalars(), scalars_before)
    assert backend.device_step_count() == 1 and backend.device_skipped_steps() == 1
    assert skipping.skipped_steps == 1
    assert skipping.current_lr() == [schedule(1)] and skipping.step_count == 1
    assert skipping.state_dict()["step_count"] == 1
    for optimizer in (clean, skipping):
        optimizer.step([to_device_storage(cp, g) for g in grads[1]], grad_scale=2.0)
    for ours, theirs in zip(host(cp, skipping_params), host(cp, clean_params)):
        np.testing.assert_array_equal(ours.view(np.uint8), theirs.view(np.uint8))
    saved = skipping.state_dict()
    assert saved["state"][1]["step"] == 2 and saved["step_count"] == 2 and saved["skipped_steps"] == 1


def test_a_guard_that_lets_nonfinite_grads_through(cp):
    """Guard(skip_nonfinite=False): the device does not skip, and NaN propagates as in torch."""
    param = cp.ones(4, dtype=np.float32)
    optimizer = fo.SGD([param], lr=0.1, guard=fo.Guard(skip_nonfinite=False), backend="cuda")
    optimizer.step([cp.asarray(np.array([1, np.nan, 1, 1], np.float32))])
    values = cp.asnumpy(param)
    assert np.isnan(values[1]) and np.isfinite(values[[0, 2, 3]]).all()
    assert optimizer.skipped_steps == 0 and optimizer._backend.device_step_count() == 1


def test_grad_norm_reads_every_grad_format(cp, rng):
    """The global norm over grads stored as bfloat16, float16, float32 (also under float64 math) and float64, in two
    buckets, unscaled."""
    pairs = [("bfloat16", "bfloat16", 300), ("bfloat16", "float32", 200), ("float16", "float16", 100),
             ("float32", "float32", 0), ("float32", "float32", 4500), ("float64", "float32", 50),
             ("float64", "float64", 70)]
    params = [to_device_storage(cp, np.zeros(n, storage_dtype(p))) for p, _, n in pairs]
    grads = [rng.standard_normal(n).astype(storage_dtype(g)) for _, g, n in pairs]
    optimizer = fo.SGD(params, lr=0.0, max_grad_norm=1e9, backend="cuda")
    assert len(optimizer._backend.buckets) == 2
    optimizer.step([to_device_storage(cp, (g.astype(np.float64) * 4).astype(g.dtype)) for g in grads], grad_scale=4.0)
    expected = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    assert float(optimizer.last_grad_norm) == pytest.approx(expected, rel=1e-12)


def test_device_loss_scale_matches_the_host_one(cp, rng):
    """A loss scale held in a one-element device array (float32, as GradScaler's, or float64) is inverted on the
    device exactly as the host inverts a number: the same grad control and norm."""
    params = [to_device_storage(cp, rng.standard_normal(n).astype(np.float32)) for n in (7, 3000)]
    grads = [to_device_storage(cp, rng.standard_normal(n).astype(np.float32) * 512) for n in (7, 3000)]
    optimizer = fo.AdamW(params, max_grad_norm=3.0, backend="cuda")
    optimizer.step(grads, grad_scale=384.0)
    backend = optimizer._backend
    expected = backend.grad_control(backend.layout, grads, float(np.float32(1 / 384.0)), 3.0)
    expected_values, expected_norm = cp.asnumpy(expected.values).copy(), float(expected.norm)
    for dtype in (np.float32, np.float64):
        control = backend.grad_control(backend.layout, grads, 1.0, 3.0, scale=cp.asarray(np.array([384.0], dtype)))
        np.testing.assert_array_equal(cp.asnumpy(control.values), expected_values)
        assert float(control.norm) == expected_norm and control.nonfinite == 0 and not control.skipped
    with pytest.raises(TypeError, match="one-element float32 or float64"):
        backend.grad_control(backend.layout, grads, 1.0, 3.0, scale=cp.asarray(np.array([384.0, 1.0])))


def test_bfloat16_buffers_are_uint16_bits_on_the_device(cp, rng):
    """CuPy has no bfloat16: the engine stores bfloat16 as uint16 bits, widens master copies exactly on the device,
    and hands state buffers to and from NumPy as ml_dtypes.bfloat16 (8-bit codes and scales as they are)."""
    engine = cuda.CupyArrays
    assert [engine.storage_name(np.dtype(name)) for name in ("uint16", "float16", "float32", "float64", "int32")] == [
        "bfloat16", "float16", "float32", "float64", None]
    for name in ("bfloat16", "float16"):
        values = rng.standard_normal((3, 50)).astype(storage_dtype(name))
        param = to_device_storage(cp, values)
        state = engine.allocate_state(param, 0, name)
        assert state.shape == param.shape and state.dtype == param.dtype and not cp.asnumpy(state).any()
        master = engine.allocate_state(param, 1, "float32")
        engine.copy_widened(master, param)
        assert_same_bits(cp.asnumpy(master), values.astype(np.float32), f"{name} master")
        engine.copy_from_numpy(state, values)
        exported = engine.to_numpy(state)
        assert exported.dtype == values.dtype
        assert_same_bits(exported, values, f"{name} state")
    assert engine.storage_dtype("bfloat16") == np.uint16 and engine.storage_dtype("float16") == np.float16
    # 8-bit states' codes and scales: plain uint8 and float32 buffers, to and from NumPy as they are.
    for dtype, values in ((np.uint8, rng.integers(0, 256, (3, 50))), (np.float32, rng.standard_normal(7))):
        buffer = engine.allocate_buffer(values.shape, dtype, 3)
        assert isinstance(buffer, cp.ndarray) and buffer.dtype == dtype and not cp.asnumpy(buffer).any()
        engine.copy_from_numpy(buffer, values.astype(dtype))
        exported = engine.to_numpy(buffer)
        assert exported.dtype == dtype and np.array_equal(exported, values.astype(dtype))


def test_plain_buckets_launch_the_plain_kernels(cp, rng):
    """A bucket stored entirely in its math dtype launches the kernel built without the mixed loop (and its
    registers); a bucket with a bfloat16 param, or a float32 grad of a float64 param, the mixed one."""
    if not isinstance(cp, CupyStandIn):
        pytest.skip("the stand-in records the kernels launched")
    params = [cp.zeros(5, dtype=np.float32), to_device_storage(cp, np.zeros(5, storage_dtype("bfloat16"))),
              cp.zeros(5, dtype=np.float64)]
    optimizer = fo.Adam(params, backend="cuda")
    assert len(optimizer._backend.buckets) == 2
    optimizer.step([cp.ones(5, dtype=np.float32), cp.ones(5, dtype=np.uint16), cp.ones(5, dtype=np.float64)])
    assert cp.stream.kernels[-2:] == ["step_float_mixed", "step_double"]
    optimizer.step([cp.ones(5, dtype=np.float32), cp.ones(5, dtype=np.uint16), cp.ones(5, dtype=np.float32)])
    assert cp.stream.kernels[-2:] == ["step_float_mixed", "step_double_mixed"]
    plain = fo.Adam([cp.zeros(5, dtype=np.float32)], backend="cuda")
    plain.step([cp.ones(5, dtype=np.float32)])
    assert cp.stream.kernels[-1] == "step_float"
    two_passes = fo.LAMB(params, backend="cuda")  # a rule with per-tensor norms: two launches per bucket
    two_passes.step([cp.ones(5, dtype=np.float32), cp.ones(5, dtype=np.uint16), cp.ones(5, dtype=np.float64)])
    assert cp.stream.kernels[-4:] == ["norms_float_mixed", "apply_float_mixed", "norms_double", "apply_double"]


@pytest.mark.parametrize("options", [dict(state_dtype="bfloat16"), dict(state_dtype="bfloat16", master_weights=True)],
                         ids=["bf16states", "bf16states-master"])
def test_state_dict_round_trip_with_bfloat16_states(cp, options, rng):
    """A GPU state dict holds bfloat16 states as ml_dtypes.bfloat16 (and master copies as float32), as the CPU's;
    loaded into a GPU or a CPU optimizer, the run continues bit for bit."""
    start = [rng.standard_normal(n).astype(storage_dtype("bfloat16")) for n in (3, 1500)]
    grads = [[rng.standard_normal(p.shape).astype(storage_dtype("bfloat16")) for p in start] for _ in range(4)]
    kwargs = dict(lr=0.01, betas=(0.5, 0.25), backend="cuda", **options)
    straight = [to_device_storage(cp, p) for p in start]
    first = fo.AdamW(straight, **kwargs)
    for step_grads in grads:
        first.step([to_device_storage(cp, g) for g in step_grads])

    resumed = [to_device_storage(cp, p) for p in start]
    second = fo.AdamW(resumed, **kwargs)
    for step_grads in grads[:2]:
        second.step([to_device_storage(cp, g) for g in step_grads])
    saved = second.state_dict()
    assert saved["state"][1]["exp_avg"].dtype == dtypes.BFLOAT16
    if options.get("master_weights"):
        assert saved["state"][1]["master_param"].dtype == np.float32
    on_the_cpu = [cp.asnumpy(p).view(dtypes.BFLOAT16) for p in resumed]
    third = fo.AdamW(on_the_cpu, **dict(kwargs, backend="cpu"))
    third.load_state_dict(saved)
    fourth = fo.AdamW(resumed, **kwargs)
    fourth.load_state_dict(saved)
    for step_grads in grads[2:]:
        fourth.step([to_device_storage(cp, g) for g in step_grads])
        third.step(step_grads)
    for ours, cpu, expected in zip(host(cp, resumed), on_the_cpu, host(cp, straight)):
        assert_same_bits(ours, expected.view(dtypes.BFLOAT16), "GPU resumed")
        assert_same_bits(cpu, expected.view(dtypes.BFLOAT16), "CPU resumed")
    assert fourth._backend.device_step_count() == 4 and fourth.state_dict()["state"][1]["step"] == 4


@pytest.mark.gpu
@pytest.mark.parametrize("states", [dict(state_dtype="bfloat16"), dict(state_dtype="8bit", min_8bit_size=0)],
                         ids=["bf16states", "8bit"])
def test_cuda_graph_replays_mixed_precision_with_grad_control(gpu, states, rng):
    """bfloat16 params with float32 masters and bfloat16 or 8-bit states, a loss scale and clipping, captured in a CUDA
    graph: each replay reads the grads of the replay, decides its clip factor and skip on the device (one replay has
    an inf grad), and gives the bits of the same steps taken eagerly."""
    cp = gpu
    shapes = [1, 13, 5000]
    steps, bad_step = 7, 4
    start = [rng.standard_normal(n).astype(storage_dtype("bfloat16")) for n in shapes]
    grads = [[(rng.standard_normal(n) * 1024).astype(storage_dtype("bfloat16")) for n in shapes] for _ in range(steps)]
    grads[bad_step][2][77] = np.inf
    kwargs = dict(lr=fo.schedules.cosine(0.01, t_max=steps), master_weights=True, max_grad_norm=5.0, **states)

    eager_params = [to_device_storage(cp, p) for p in start]
    eager = fo.AdamW(eager_params, **kwargs)
    for step_grads in grads:
        eager.step([to_device_storage(cp, g) for g in step_grads], grad_scale=1024.0)

    params = [to_device_storage(cp, p) for p in start]
    buffers = [cp.empty(n, dtype=np.uint16) for n in shapes]
    optimizer = fo.AdamW(params, **kwargs)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        def load(t):
            for buffer, values in zip(buffers, grads[t]):
                buffer.set(values.view(np.uint16), stream=stream)

        load(0)
        optimizer.step(buffers, grad_scale=1024.0)  # eager: allocates the state, uploads the tables
        load(1)
        stream.begin_capture()
        try:
            optimizer.step(buffers, grad_scale=1024.0)  # recorded, not run: no synchronisation inside
        finally:
            graph = stream.end_capture()
        for t in range(1, steps):
            load(t)
            graph.launch(stream)
        stream.synchronize()
    backend = optimizer._backend
    assert backend.device_step_count() == eager._backend.device_step_count() == steps - 1
    assert backend.device_skipped_steps() == eager._backend.device_skipped_steps() == 1
    for index, (ours, theirs) in enumerate(zip(host(cp, params), host(cp, eager_params))):
        np.testing.assert_array_equal(ours, theirs, err_msg=f"param {index}")
        for name, buffer in eager.state[index].items():
            np.testing.assert_array_equal(cp.asnumpy(optimizer.state[index][name]), cp.asnumpy(buffer),
                                          err_msg=f"param {index} {name}")
    assert optimizer.state_dict()["step_count"] == steps - 1 and optimizer.skipped_steps == 1


# ---------------------------------------------------------------- 8-bit states
# The rules with states stored in 8 bits (fastopt.quantization.STATE_SIGNED): MIXED_OPTIMIZERS' configurations (their
# betas powers of two, so that the device's pow is exact) but SGDScheduleFree (its z is not a moment), plain AdamW and
# LAMB. Stepped over mixed_problem's tensors with min_8bit_size 2: those of 0 and 1 elements keep float32 states in the
# same bucket as the 8-bit ones (13, 15, 4099 and 5000 elements: short blocks, several chunks).
RULES_8BIT = [config for config in MIXED_OPTIMIZERS if config[0] is not fo.SGDScheduleFree] + [
    (fo.AdamW, dict(betas=(0.5, 0.25))), (fo.LAMB, {})]
FLOAT32_8BIT = ("f32-8bit", "float32", "float32", dict(state_dtype="8bit", min_8bit_size=2))


def coded_states(optimizer):
    """(param index, state name) of every state stored in 8 bits."""
    return [(index, name) for index in range(len(optimizer.state)) for name in optimizer.STATE_SLOTS
            if name in optimizer.state[index] and optimizer.coded(index, name) is not None]


@WITH_8BIT_KERNELS
@pytest.mark.parametrize("config", RULES_8BIT, ids=optimizer_id)
def test_8bit_states_bitwise_equal_to_cpu_kernels(cp, config, rng):
    """Every rule's 8-bit step (codes decoded in registers, the float32 math, each block's absmax across its threads,
    the codes and scale written once) against the CPU kernels after four steps at changing rates: params, codes,
    scales and the float32 states bit for bit (LAMB's params to the rounding of its trust ratio's sums); schedule-free
    then blends toward its float32 z and back."""
    cls, kwargs = config
    cpu, cpu_params, gpu, gpu_params, grads = run_mixed_twins(cp, cls, kwargs, FLOAT32_8BIT, rng)
    coded = coded_states(cpu)
    assert {index for index, _ in coded} == {2, 3, 4, 5} and coded == coded_states(gpu)
    for index, name in coded:
        assert gpu.state[index][name].dtype == np.uint8 and gpu.state[index][name + "_absmax"].dtype == np.float32
    if cls is fo.LAMB:
        for index, (ours, theirs) in enumerate(zip(gpu_params, cpu_params)):
            assert_close(cp.asnumpy(ours), theirs, tolerance(np.float32, MIXED_STEPS), f"param {index}")
            for name, buffer in cpu.state[index].items():
                assert_same_bits(cp.asnumpy(gpu.state[index][name]), buffer, f"param {index} {name}")
        return
    assert_runs_bitwise_equal(cp, gpu, gpu_params, cpu, cpu_params)
    if isinstance(cpu, fo.rules.schedule_free.ScheduleFree):
        for move in ("eval", "train"):
            getattr(cpu, move)()
            getattr(gpu, move)()
        cpu.step(grads[0])
        gpu.step(to_device(cp, grads[0]))
        assert_runs_bitwise_equal(cp, gpu, gpu_params, cpu, cpu_params)


@WITH_8BIT_KERNELS
@pytest.mark.parametrize("config", [RULES_8BIT[3]], ids=optimizer_id)
def test_stochastic_codes_bitwise_equal_to_cpu_kernels(cp, config, rng):
    """``state_rounding="stochastic"``: each block's codes rounded with the random bits of (seed, step, slot,
    element) (codes.cuh's encode_stochastic, keyed per tensor at run time) give the CPU kernels' params, codes and
    scales bit for bit: AMSGrad's three states, on both maps."""
    cls, kwargs = config
    storage = ("f32-8bit-sr", "float32", "float32", dict(FLOAT32_8BIT[3], state_rounding="stochastic", seed=9))
    cpu, cpu_params, gpu, gpu_params, _ = run_mixed_twins(cp, cls, kwargs, storage, np.random.default_rng(8))
    assert cpu.stochastic_states and coded_states(cpu) == coded_states(gpu)
    assert_runs_bitwise_equal(cp, gpu, gpu_params, cpu, cpu_params)
    # The same problem with codes rounded to nearest: other codes (the noise was drawn and used).
    nearest = run_mixed_twins(cp, cls, kwargs, FLOAT32_8BIT, np.random.default_rng(8))[0]
    assert any(not np.array_equal(cpu.state[index][name], nearest.state[index][name])
               for index, name in coded_states(cpu))


@WITH_8BIT_KERNELS
@pytest.mark.parametrize("storage", [MIXED_STORAGE[1], MIXED_STORAGE[5]], ids=storage_id)
def test_8bit_states_of_bfloat16_params_with_a_loss_scale(cp, storage, rng):
    """bfloat16 params (with float32 masters, or rounded stochastically) and 8-bit states of every size, 0 and 1
    included, under a loss scale unscaled on the device: the _8bit_mixed kernel gives the CPU kernels' bits."""
    _, param_name, grad_name, options = storage
    options = dict(options, state_dtype="8bit", min_8bit_size=0)
    params, scales, grads = mixed_problem(param_name, grad_name, rng)
    cpu_params = [p.copy() for p in params]
    cpu = mixed_optimizer(fo.AdamW, dict(betas=(0.5, 0.25)), options, cpu_params, [s.copy() for s in scales], "cpu")
    gpu_params = [to_device_storage(cp, p) for p in params]
    gpu = mixed_optimizer(fo.AdamW, dict(betas=(0.5, 0.25)), options, gpu_params, to_device(cp, scales), "cuda")
    for t in range(MIXED_STEPS):
        for optimizer in (cpu, gpu):
            for group in optimizer.param_groups:
                group["lr"] = MIXED_LRS[t]
        scaled = [(g.astype(np.float64) * 384.0).astype(g.dtype) for g in grads[t]]
        cpu.step(scaled, grad_scale=384.0)
        gpu.step([to_device_storage(cp, grad) for grad in scaled], grad_scale=384.0)
    assert len(coded_states(gpu)) == 2 * len(params)
    assert_runs_bitwise_equal(cp, gpu, gpu_params, cpu, cpu_params)


@WITH_8BIT_KERNELS
def test_8bit_steps_skipped_on_the_device_and_marked_blocks(cp, rng):
    """A step the device skips (an inf grad under a loss scale) leaves codes, scales and params as they were, and the
    run continues as if it had never come. A NaN let through (a guard that does not skip) marks its block: scale NaN,
    codes 0, and from the next step on the block's params NaN, bit for bit as on the CPU."""
    start = [rng.standard_normal(n).astype(np.float32) for n in (5, 2000)]
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in start] for _ in range(3)]
    bad = [g.copy() for g in grads[1]]
    bad[1][1234] = np.inf
    options = dict(lr=0.01, state_dtype="8bit", min_8bit_size=0, backend="cuda")
    clean_params, skipping_params = to_device(cp, start), to_device(cp, start)
    clean, skipping = fo.AdamW(clean_params, **options), fo.AdamW(skipping_params, **options)
    for optimizer in (clean, skipping):
        optimizer.step(to_device(cp, grads[0]), grad_scale=2.0)
    before = [{name: cp.asnumpy(buffer) for name, buffer in state.items()} for state in skipping.state]
    params_before = host(cp, skipping_params)
    skipping.step(to_device(cp, bad), grad_scale=2.0)
    assert skipping._backend.device_skipped_steps() == 1
    for param, previous in zip(host(cp, skipping_params), params_before):
        np.testing.assert_array_equal(param.view(np.uint32), previous.view(np.uint32))
    for state, previous in zip(skipping.state, before):
        for name, buffer in state.items():
            np.testing.assert_array_equal(cp.asnumpy(buffer).view(np.uint8), previous[name].view(np.uint8), name)
    for optimizer in (clean, skipping):
        optimizer.step(to_device(cp, grads[2]), grad_scale=2.0)
    assert_runs_bitwise_equal(cp, skipping, skipping_params, clean, clean_params)

    nan = [g.copy() for g in grads[1]]
    nan[1][300] = np.nan  # block 1 of the second param
    cpu_params = [p.copy() for p in start]
    cpu = fo.AdamW(cpu_params, **dict(options, backend="cpu"), guard=fo.Guard(skip_nonfinite=False))
    gpu_params = to_device(cp, start)
    gpu = fo.AdamW(gpu_params, **options, guard=fo.Guard(skip_nonfinite=False))
    for step_grads in (grads[0], nan, grads[2]):
        cpu.step(step_grads)
        gpu.step(to_device(cp, step_grads))
        assert_runs_bitwise_equal(cp, gpu, gpu_params, cpu, cpu_params)
    scales, codes = cp.asnumpy(gpu.state[1]["exp_avg_absmax"]), cp.asnumpy(gpu.state[1]["exp_avg"])
    assert np.isnan(scales).tolist() == [False, True] + [False] * 6 and not codes[256:512].any()
    assert np.isnan(cp.asnumpy(gpu_params[1])).tolist() == [256 <= i < 512 for i in range(2000)]


@WITH_8BIT_KERNELS
def test_8bit_states_of_misaligned_params(cp, rng):
    """Params and grads one float32 past a 16-byte boundary (views into larger buffers) cannot be read a quad at a
    time: the 8-bit loop reads and writes them element by element, the same bits."""
    sizes = (700, 2311)
    start = [rng.standard_normal(n + 1).astype(np.float32) for n in sizes]
    grads = [[rng.standard_normal(n + 1).astype(np.float32) for n in sizes] for _ in range(3)]
    cpu_params = [p[1:] for p in start]
    gpu_params = [cp.asarray(p)[1:] for p in start]
    assert all(p.data.ptr % 16 == 4 for p in gpu_params)
    cpu = fo.AdamW(cpu_params, lr=0.01, betas=(0.5, 0.25), state_dtype="8bit", min_8bit_size=0, backend="cpu")
    gpu = fo.AdamW(gpu_params, lr=0.01, betas=(0.5, 0.25), state_dtype="8bit", min_8bit_size=0, backend="cuda")
    for step_grads in grads:
        cpu.step([g[1:] for g in step_grads])
        gpu.step([cp.asarray(g)[1:] for g in step_grads])
    assert_runs_bitwise_equal(cp, gpu, gpu_params, cpu, cpu_params)


@WITH_8BIT_KERNELS
def test_8bit_state_dict_round_trip(cp, rng):
    """A GPU run with 8-bit states saved halfway (codes and scales as NumPy arrays) and loaded into a GPU and a CPU
    optimizer: both continue bit for bit."""
    start = [rng.standard_normal(n).astype(np.float32) for n in (3, 1500)]
    grads = [[rng.standard_normal(p.shape).astype(np.float32) for p in start] for _ in range(4)]
    kwargs = dict(lr=0.01, betas=(0.5, 0.25), state_dtype="8bit", min_8bit_size=4, backend="cuda")
    straight = to_device(cp, start)
    first = fo.AdamW(straight, **kwargs)
    for step_grads in grads:
        first.step(to_device(cp, step_grads))
    resumed = to_device(cp, start)
    second = fo.AdamW(resumed, **kwargs)
    for step_grads in grads[:2]:
        second.step(to_device(cp, step_grads))
    saved = second.state_dict()
    assert saved["state"][1]["exp_avg"].dtype == np.uint8 and saved["state"][0]["exp_avg"].dtype == np.float32
    on_the_cpu = host(cp, resumed)
    third = fo.AdamW(on_the_cpu, **dict(kwargs, backend="cpu"))
    third.load_state_dict(saved)
    fourth = fo.AdamW(resumed, **kwargs)
    fourth.load_state_dict(saved)
    for step_grads in grads[2:]:
        third.step(step_grads)
        fourth.step(to_device(cp, step_grads))
    assert_runs_bitwise_equal(cp, first, straight, third, on_the_cpu)
    assert_runs_bitwise_equal(cp, fourth, resumed, third, on_the_cpu)


@WITH_8BIT_KERNELS
def test_8bit_buckets_launch_the_8bit_kernels(cp, rng):
    """A float bucket with 8-bit states launches <pass>_float_8bit, or _8bit_mixed with other storage formats (a
    float64 bucket keeps float64 states: no 8-bit kernel); a tensor whose 8-bit states are not the ones the kernels
    are compiled for is refused before anything runs."""
    if not isinstance(cp, CupyStandIn):
        pytest.skip("the stand-in records the kernels launched")
    params = [cp.zeros(300, dtype=np.float32), cp.zeros(300, dtype=np.float64)]
    optimizer = fo.Adam(params, state_dtype="8bit", min_8bit_size=0, backend="cuda")
    optimizer.step([cp.ones(300, dtype=np.float32), cp.ones(300, dtype=np.float64)])
    assert cp.stream.kernels[-2:] == ["step_float_8bit", "step_double"]
    bfloat16 = to_device_storage(cp, np.zeros(300, storage_dtype("bfloat16")))
    fo.Adam([bfloat16], state_dtype="8bit", min_8bit_size=0, backend="cuda").step([cp.ones(300, dtype=np.uint16)])
    assert cp.stream.kernels[-1] == "step_float_8bit_mixed"
    small = fo.Adam([cp.zeros(300, dtype=np.float32)], state_dtype="8bit", backend="cuda")  # below min_8bit_size
    small.step([cp.ones(300, dtype=np.float32)])
    assert cp.stream.kernels[-1] == "step_float"
    fo.LAMB(params[:1], state_dtype="8bit", min_8bit_size=0, backend="cuda").step([cp.ones(300, dtype=np.float32)])
    assert cp.stream.kernels[-2:] == ["norms_float_8bit", "apply_float_8bit"]
    layout, bucket = optimizer._backend.layout, optimizer._backend.buckets[0]
    assert bucket.tensor_format[0, kernel_layout.STATE_CODES] == cuda.rule_codes(fo.Adam) & 0b11011  # no max_exp_avg_sq
    bucket.tensor_format[0, kernel_layout.STATE_CODES] ^= kernel_layout.SIGNED_CODES  # exp_avg on the unsigned map
    with pytest.raises(ValueError, match=r"8-bit states 0x3 \(STATE_CODES\).* hold 0xb"):
        bucket.check_codes(layout)


@pytest.mark.parametrize("config", RULES_8BIT, ids=optimizer_id)
def test_rule_codes_are_the_tables(config):
    """The 8-bit states each rule's kernels are compiled for (rule_codes) are what the shared tables hold for a tensor
    stored in 8 bits with every state of the configuration."""
    from fastopt.backends.layout import fill_tensor_tables

    cls, kwargs = config
    optimizer = cls([np.zeros(300, np.float32)], lr=0.01, state_dtype="8bit", min_8bit_size=0, **kwargs)
    optimizer.step([np.ones(300, np.float32)])
    layout = optimizer._layout()
    addresses = np.zeros((1, kernel_layout.SLOTS), np.int64)
    tensor_format = np.zeros((1, kernel_layout.FORMAT_COLUMNS), np.int64)
    fill_tensor_tables(layout, [0], addresses, np.zeros(1, np.int64), tensor_format, np.dtype(np.float32),
                       lambda array: array.ctypes.data)
    present = sum(0b1001 << slot for slot, buffer in enumerate(layout.states[0]) if buffer is not None)
    assert tensor_format[0, kernel_layout.STATE_CODES] == cuda.rule_codes(cls) & present != 0


# ---------------------------------------------------------------- bad input leaves params untouched
def bad_grads_cases(cp):
    good = [cp.ones((2, 3), dtype=np.float32), cp.ones(5, dtype=np.float32)]
    return [
        ([good[0], np.ones(5, np.float32)], TypeError, r"grads\[1\] is a NumPy array in host memory"),
        ([good[0], cp.ones(10, dtype=np.float32)[::2]], ValueError, r"grads\[1\] is not C-contiguous"),
        ([good[0], cp.ones(5, dtype=np.float64)], TypeError, r"grads\[1\] has dtype float64"),
        ([good[0], cp.ones(4, dtype=np.float32)], ValueError, r"grads\[1\] has shape \(4,\)"),
        ([good[0]], ValueError, "1 grads for 2 params"),
    ]


@pytest.mark.parametrize("cls", [fo.SGD, fo.RMSprop, fo.Adam, fo.AdamW, fo.Adagrad, fo.Lion, fo.AdamWScheduleFree,
                                 fo.SGDScheduleFree, fo.LAMB])
def test_bad_grads_leave_params_untouched(cp, cls):
    params = [cp.ones((2, 3), dtype=np.float32), cp.ones(5, dtype=np.float32)]
    kwargs = dict(momentum=0.9) if cls is fo.SGD else {}
    optimizer = cls(params, lr=0.1, backend="cuda", **kwargs)
    optimizer.step([cp.ones((2, 3), dtype=np.float32), cp.ones(5, dtype=np.float32)])
    for grads, error, message in bad_grads_cases(cp):
        before, state = host(cp, params), optimizer.state_dict()
        with pytest.raises(error, match=message):
            optimizer.step(grads)
        for param, saved in zip(host(cp, params), before):
            np.testing.assert_array_equal(param, saved)
        assert optimizer._backend.device_step_count() == state["step_count"] == optimizer.step_count


def test_params_must_be_device_arrays_of_one_kind(cp):
    with pytest.raises(TypeError, match=r"is a NumPy array in host memory"):
        fo.Adam([cp.ones(3), np.ones(3)], backend="cuda")
    with pytest.raises(ValueError, match="not C-contiguous"):
        fo.Adam([cp.ones((4, 4))[:, 1]], backend="cuda")


@pytest.mark.gpu
@GPU_ONLY
def test_arrays_on_another_device_are_refused(cp):
    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    with cp.cuda.Device(1):
        other = cp.ones(5, dtype=np.float32)
    params = [cp.ones(5, dtype=np.float32)]
    optimizer = fo.Adam(params, lr=0.1)
    with pytest.raises(ValueError, match="is on GPU 1 but the current device is GPU 0"):
        optimizer.step([other])
    np.testing.assert_array_equal(cp.asnumpy(params[0]), 1.0)
    with pytest.raises(ValueError, match="must all be on one device"):
        fo.Adam([params[0], other])


def test_stand_in_refuses_uploads_while_capturing_and_follows_the_device_count(cp):
    """With the stand-in: a capture that needs no upload goes ahead, one that does is refused before anything is
    queued; steps taken on the device behind the host's back (graph replays) are continued from, not overwritten."""
    if not isinstance(cp, CupyStandIn):
        pytest.skip("the GPU run has test_cuda_graph_replays_advance_the_schedule")
    param, grads = cp.zeros(5), [cp.ones(5)]
    optimizer = fo.SGD([param], lr=fo.schedules.exponential(1.0, 0.5), backend="cuda")
    optimizer.step(grads)
    cp.stream.capturing = True
    optimizer.step(grads)
    launches = cp.stream.launches
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        optimizer.step([cp.ones(5)])
    assert cp.stream.launches == launches and optimizer.step_count == 2
    cp.stream.capturing = False
    optimizer._backend.buckets[0].device["counters"][cuda.OPTIMIZER_STEP] += 3  # three replays, counted only
    optimizer.step(grads)
    assert optimizer._backend.device_step_count() == 6
    # The stand-in ran the "captured" step (lr 0.5); the last step ran at device step 5.
    np.testing.assert_array_equal(cp.asnumpy(param), -(1 + 0.5 + 0.5**5))
    # What the host reports follows the device: the next lr, the saved count, and a count that survives a reload.
    assert optimizer.current_lr() == [0.5**6] and optimizer.step_count == 6
    state = optimizer.state_dict()
    assert state["step_count"] == 6
    optimizer.load_state_dict(state)
    optimizer.step(grads)
    np.testing.assert_array_equal(cp.asnumpy(param), -(1 + 0.5 + 0.5**5 + 0.5**6))


def test_stand_in_captured_grad_control_writes_fixed_buffers(cp):
    """While capturing, the grad control's norm and count go to the engine's fixed buffer (the replays will write
    it), and the step reads the fixed control buffer; eager steps get a norm array of their own."""
    if not isinstance(cp, CupyStandIn):
        pytest.skip("the stand-in's capture flag")
    param, grads = cp.zeros(5, dtype=np.float32), [cp.asarray(np.full(5, 2.0, np.float32))]
    optimizer = fo.SGD([param], lr=0.5, max_grad_norm=1.0, backend="cuda")
    optimizer.step(grads, grad_scale=2.0)
    backend = optimizer._backend
    eager_norm = optimizer.last_grad_norm
    cp.stream.capturing = True
    optimizer.step(grads, grad_scale=2.0)
    cp.stream.capturing = False
    assert cp.stream.kernels[-3:] == ["grad_stats_float", "finish_grad_control", "step_float"]
    assert backend.captured_statistics[cuda.STATISTIC_NORM] == float(eager_norm) == np.sqrt(5.0)
    clip = 1.0 / (np.sqrt(5.0) + 1e-6)
    np.testing.assert_array_equal(cp.asnumpy(backend.control_values), [np.float32(0.5), clip, 0.0])
    np.testing.assert_array_equal(cp.asnumpy(param), -np.float32(clip))  # two steps of -0.5 * 2 * 0.5 * clip


# ---------------------------------------------------------------- the NumPy stand-in for CuPy
class _Memory:
    """``ndarray.data`` of the stand-in: the address, and the asynchronous host-to-device copy (a memmove)."""

    def __init__(self, array):
        self.array = array

    @property
    def ptr(self):
        return self.array.ctypes.data if self.array.size else 0  # CuPy's empty arrays have address 0 too

    def copy_from_host_async(self, source, size, stream=None):
        assert isinstance(stream, _Stream) and size == self.array.nbytes and self.array.flags.c_contiguous
        ctypes.memmove(self.array.ctypes.data, source, size)
        stream.copies += 1


class StandInArray(np.ndarray):
    @property
    def data(self):
        return _Memory(self)

    @property
    def device(self):
        return SimpleNamespace(id=0)

    def set(self, values, stream=None):
        assert values.shape == self.shape and values.dtype == self.dtype
        self[...] = values


class _Stream:
    def __init__(self):
        self.capturing = False
        self.copies = 0
        self.launches = 0
        self.kernels = []  # the name of each kernel launched, in order

    def is_capturing(self):
        return self.capturing

    def record(self):
        return SimpleNamespace(done=True)

    def synchronize(self):
        pass


def _stored_values(address, storage_format, length, math):
    """``length`` stored values from ``address`` as float64 (the grad_stats emulation's read of a grad)."""
    dtype = {kernel_layout.NATIVE: math, kernel_layout.FLOAT32: np.float32, kernel_layout.FLOAT16: np.float16}.get(storage_format, np.uint16)
    itemsize = np.dtype(dtype).itemsize
    values = np.frombuffer((ctypes.c_char * (length * itemsize)).from_address(address), dtype=dtype)
    if dtype == np.uint16:  # bfloat16 bits
        values = (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float64)


def _block_sum(values, zero):
    """A block's sum of ``values`` in the kernels' order: each of BLOCK threads adds its stride sequentially, then a
    tree halves the partial sums (grad_control.cu: finish_grad_control; block_sum.cuh)."""
    partial = [zero] * cuda.BLOCK
    for index, value in enumerate(values):
        partial[index % cuda.BLOCK] += value
    half = cuda.BLOCK // 2
    while half:
        partial = [partial[t] + partial[t + half] for t in range(half)] + partial[half:]
        half //= 2
    return partial[0]


class _Kernel:
    """One launch of a kernel of fused.cu (compiled for the rule ``rule``) or of grad_control.cu or blend.cu (``rule``
    None), emulated in the kernel's order (see the ``cp`` fixture)."""

    def __init__(self, name, rule, shim, stream):
        self.name, self.rule, self.shim, self.stream = name, rule, shim, stream

    def __call__(self, grid, block, args):
        self.stream.launches += 1
        self.stream.kernels.append(self.name)
        assert block == (cuda.BLOCK,)
        for array in args:
            if isinstance(array, np.ndarray):
                assert isinstance(array, StandInArray) and array.flags.c_contiguous
            else:  # CuPy passes a Python int as long long and a float as double: the host passes NumPy scalars
                assert type(array) in (np.int64, np.float64)
        if self.name == "finish_grad_control":
            assert self.rule is None
            return self._finish_grad_control(grid, *args)
        mixed = self.name.endswith("_mixed")
        codes = self.name.removesuffix("_mixed").endswith("_8bit")
        kind, ctype = self.name.removesuffix("_mixed").removesuffix("_8bit").rsplit("_", 1)
        dtype = {"float": np.float32, "double": np.float64}[ctype]
        if kind == "grad_stats":
            assert self.rule is None
            return self._grad_stats(grid, dtype, *args)
        if kind == "blend":
            assert self.rule is None
            return self._blend(grid, dtype, ctype, *args)
        passes = cuda.rule_passes(self.rule)
        assert self.rule in RULES and kind in passes
        if kind == "apply":  # right after the norms pass of the same bucket
            assert self.stream.kernels[-2] == self.name.replace("apply", "norms")
        (addresses, tensor_format, chunk_tensor, chunk_start, chunk_length, chunk_count, tensor_group, tensor_step,
         tensor_scalars, tensor_count, group_hyper, schedule_program, schedule_size, schedule_base, counters,
         lr_factor, grad_control, chunk_norms, tensor_chunks, rounding_seed) = args
        assert type(lr_factor) is np.float64 and type(rounding_seed) is np.int64
        for array in (addresses, tensor_format, chunk_tensor, chunk_start, chunk_length, tensor_group, tensor_step,
                      schedule_base, counters, tensor_chunks):
            assert array.dtype == np.int64
        for array in (tensor_scalars, group_hyper, schedule_program, grad_control, chunk_norms):
            assert array.dtype == np.float64
        assert grid == (max(int(chunk_count), 1),) and chunk_tensor.size == chunk_count
        assert addresses.shape == (tensor_count, kernel_layout.SLOTS) and schedule_program.size == schedule_size
        assert tensor_format.shape == (tensor_count, kernel_layout.FORMAT_COLUMNS)
        assert tensor_scalars.shape == (tensor_count, kernel_layout.TENSOR_SCALARS)
        assert chunk_norms.shape == (grid[0], kernel_layout.NORM_SUMS)
        np.testing.assert_array_equal(tensor_chunks, np.searchsorted(chunk_tensor, np.arange(tensor_count + 1)))
        assert grad_control.shape == (kernel_layout.GRAD_CONTROLS,) and counters.shape == (cuda.COUNTERS,)
        assert group_hyper.shape[1] == kernel_layout.GROUP_COLUMNS + len(RULES[self.rule].COLUMNS)
        assert counters[cuda.TICKET] == 0
        # The plain kernel is built without the loop for other formats: the host must pick the mixed one; and only the
        # 8-bit kernels (float math) have the 8-bit loop.
        assert mixed or not tensor_format[:, cuda.STORAGE_COLUMNS].any(), \
            f"{self.name} launched on a bucket with other storage formats"
        assert codes or not tensor_format[:, kernel_layout.STATE_CODES].any(), \
            f"{self.name} launched on a bucket with 8-bit states"
        assert not codes or ctype == "float"
        ends_step = kind == passes[-1]  # the pass whose blocks take tickets and whose last block advances the counts
        if grad_control[kernel_layout.SKIP] != 0:  # every block returns; the step's last pass counts the skip
            if ends_step:
                counters[cuda.SKIPPED_STEPS] += 1
            return
        run_block = getattr(self.shim, f"{self.rule}_{kind}_block_{ctype}" + ("_8bit" if codes else "") +
                            ("_mixed" if codes and mixed else ""))
        thread_sums = np.zeros((cuda.BLOCK, kernel_layout.NORM_SUMS))
        # Every block: its chunk, with the counts and scalars as they were when the launch began; the norms pass
        # writes the chunk's sums in block_sum's tree.
        for chunk in range(chunk_count):
            tensor = int(chunk_tensor[chunk])
            if addresses[tensor, kernel_layout.GRAD] == 0:
                continue
            group = int(tensor_group[tensor])
            run_block(addresses[tensor].ctypes.data, tensor_format[tensor].ctypes.data, int(chunk_start[chunk]),
                      int(chunk_length[chunk]), group_hyper[group].ctypes.data, schedule_program.ctypes.data,
                      int(schedule_size), int(schedule_base[group]), int(counters[cuda.OPTIMIZER_STEP]),
                      float(lr_factor), int(tensor_step[tensor]), tensor_scalars[tensor].ctypes.data,
                      grad_control.ctypes.data, int(rounding_seed), tensor, chunk_norms.ctypes.data,
                      int(tensor_chunks[tensor]), int(tensor_chunks[tensor + 1]), thread_sums.ctypes.data)
            if kind == "norms":
                chunk_norms[chunk] = test_cuda_host_math.block_tree_sum(thread_sums)
        if not ends_step:
            return
        # The last block: each tensor with a grad (its running scalars, and its count where its group counts steps).
        for tensor in range(tensor_count):
            if addresses[tensor, kernel_layout.GRAD] != 0:
                group = int(tensor_group[tensor])
                test_cuda_host_math.advance_tensor(self.shim, self.rule, group_hyper[group],
                                                   schedule_program[:int(schedule_size)],
                                                   int(counters[cuda.OPTIMIZER_STEP]), tensor_step, tensor_scalars,
                                                   tensor, float(lr_factor), int(schedule_base[group]))
        counters[cuda.OPTIMIZER_STEP] += 1

    def _blend(self, grid, dtype, ctype, addresses, tensor_format, chunk_tensor, chunk_start, chunk_length,
               chunk_count, slot, tensor_weight):
        assert grid == (chunk_count,) and chunk_tensor.size == chunk_count and type(slot) is np.int64
        assert tensor_weight.dtype == dtype and tensor_weight.shape == (addresses.shape[0],)
        assert slot in (kernel_layout.STATE0, kernel_layout.STATE1, kernel_layout.STATE2)
        for chunk in range(chunk_count):
            tensor = int(chunk_tensor[chunk])
            if addresses[tensor, slot] != 0:
                getattr(self.shim, f"host_blend_block_{ctype}")(
                    addresses[tensor].ctypes.data, tensor_format[tensor].ctypes.data, int(chunk_start[chunk]),
                    int(chunk_length[chunk]), int(slot), tensor_weight[tensor])

    @staticmethod
    def _grad_stats(grid, dtype, addresses, tensor_format, chunk_tensor, chunk_start, chunk_length, chunk_count, sums,
                    counts):
        assert grid == (chunk_count,) and sums.dtype == np.float64 and counts.dtype == np.int64
        assert sums.size == counts.size == chunk_count
        for chunk in range(chunk_count):
            tensor = chunk_tensor[chunk]
            storage_format = int(tensor_format[tensor, kernel_layout.GRAD_FORMAT])
            itemsize = {kernel_layout.NATIVE: np.dtype(dtype).itemsize, kernel_layout.FLOAT32: 4}.get(storage_format, 2)
            address = int(addresses[tensor, kernel_layout.GRAD]) + int(chunk_start[chunk]) * itemsize
            values = _stored_values(address, storage_format, int(chunk_length[chunk]), dtype)
            sums[chunk] = np.sum(values * values)
            counts[chunk] = np.count_nonzero(~np.isfinite(values))

    def _finish_grad_control(self, grid, sums, counts, chunk_count, unscale, scale, scale_format, max_norm,
                             skip_nonfinite, grad_control, statistics):
        assert grid == (1,) and sums.dtype == np.float64 and counts.dtype == np.int64
        assert grad_control.shape == (kernel_layout.GRAD_CONTROLS,) and statistics.shape == (cuda.STATISTICS,)
        if scale_format == cuda.SCALE_FLOAT32:
            unscale = float(np.float32(1.0 / float(np.float32(scale.reshape(-1)[0]))))
        elif scale_format == cuda.SCALE_FLOAT64:
            unscale = float(np.float32(1.0 / float(scale.reshape(-1)[0])))
        else:
            assert scale_format == cuda.SCALE_ON_HOST
        total = _block_sum([float(value) for value in sums[:chunk_count]], 0.0)
        nonfinite = _block_sum([int(value) for value in counts[:chunk_count]], 0)
        self.shim.host_set_grad_control(total, nonfinite, float(unscale), float(max_norm), int(skip_nonfinite),
                                        grad_control.ctypes.data, statistics.ctypes.data)


class CupyStandIn:
    """The part of CuPy's API the backend uses, over NumPy arrays in host memory."""

    ndarray = StandInArray

    def __init__(self, shim):
        self.shim = shim
        self.stream = _Stream()
        self.cuda = SimpleNamespace(
            runtime=SimpleNamespace(getDevice=lambda: 0, getDeviceCount=lambda: 1),
            Device=lambda index: SimpleNamespace(attributes={"MultiProcessorCount": 2}),
            get_current_stream=lambda: self.stream,
            alloc_pinned_memory=bytearray)

    def load_module(self, cupy, source, name, options=()):  # stands in for fastopt.backends.cuda.load_module
        assert cupy is self
        if name in ("grad_control", "blend"):  # the units compiled once, for every rule
            assert source == (cuda.SOURCE_DIR / f"{name}.cu").read_text() and not options
            rule = None
        else:  # fused.cu, compiled for one rule
            assert '#include "step_math.cuh"' in source
            rule = name.removeprefix("fused-")
            assert tuple(options) == cuda.rule_options(rule)
        return SimpleNamespace(get_function=lambda kernel: _Kernel(kernel, rule, self.shim, self.stream))

    @staticmethod
    def asarray(array):
        return np.array(array).view(StandInArray)

    @staticmethod
    def asnumpy(array):
        return np.array(array)

    @staticmethod
    def zeros(shape, dtype=np.float64):
        return np.zeros(shape, dtype).view(StandInArray)

    @staticmethod
    def ones(shape, dtype=np.float64):
        return np.ones(shape, dtype).view(StandInArray)

    @staticmethod
    def empty(shape, dtype=np.float64):
        return np.full(shape, 123, dtype).view(StandInArray)  # not zeros: a table never uploaded would show

    @staticmethod
    def zeros_like(array):
        return np.zeros_like(np.asarray(array)).view(StandInArray)

    @staticmethod
    def stack(arrays):
        return np.stack([np.asarray(array) for array in arrays]).view(StandInArray)

    isfinite, all, any = staticmethod(np.isfinite), staticmethod(np.all), staticmethod(np.any)


def test_stand_in_change_refused_during_capture_applies_at_the_next_eager_step(cp):
    """An lr change that could not be uploaded while capturing is uploaded by the next eager step."""
    if not isinstance(cp, CupyStandIn):
        pytest.skip("the stand-in's capture flag simulates the refusal")
    param, grads = cp.zeros(4), [cp.ones(4)]
    optimizer = fo.SGD([param], lr=0.5, backend="cuda")
    optimizer.step(grads)
    optimizer.param_groups[0]["lr"] = 0.25
    cp.stream.capturing = True
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        optimizer.step(grads)
    cp.stream.capturing = False
    optimizer.step(grads)
    np.testing.assert_array_equal(cp.asnumpy(param), -0.75)
