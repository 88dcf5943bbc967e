"""The CUDA kernels' shared math, built for the host, against the float64 reference and the CPU kernels.

``kernels/cuda/*.cuh`` hold the element math, the schedule evaluator, and each tensor's coefficients and
per-element body as ``__host__ __device__`` functions. Here a small C++ shim includes them, compiled with
``g++ -O2 -ffp-contract=off`` (no -ffast-math: NaN/inf and the operation order must survive) into a shared library
loaded with ctypes; ``__host__ __device__`` is defined away outside nvcc/NVRTC. The kernels are compiled with
``--fmad=false``, so on the device the same functions round the same way; only the device's double ``cos`` and
``pow`` differ (within 2 ulp), which tests/test_cuda.py covers on a GPU.

Two checks per case:
- against the float64 reference, with the tolerances of tests/conftest.py (every optimizer option of CONFIGS in
  tests/test_optimizers.py, float32 and float64; every schedule of CASES in tests/test_schedules.py);
- against the CPU (Numba) kernels, bit for bit: the same operations in the same order, and the same libm.
"""
import ctypes
import shutil
import subprocess

import numpy as np
import pytest

import fastopt as fo
from conftest import assert_close, tolerance
from fastopt import schedules as S
from fastopt.backends import cuda
from fastopt.kernels.cpu.schedule_math import schedule_values
from test_optimizers import CONFIG_IDS, CONFIGS, STEPS, make_problem, run_reference
from test_schedules import CASES, EPS

SHIM = r"""
#include "step_math.cuh"

using namespace fastopt;

extern "C" double host_schedule_value(const double* words, int64 size, int64 base, int64 step) {
    return schedule_value(Program{words, size}, base, step);
}

// One tensor's step, as one block of the fused kernels runs one chunk (kernels/cuda/fused.cu), over all elements:
// the group's lr from its schedule at the optimizer step, the coefficients, then the per-element body.
// ``tensor_step`` is the tensor's step count before this step, as the kernel reads it from tensor_step.
template <typename T>
void sgd_update(T* param, const T* grad, const T* lr_scale, T* momentum_buffer, int64 size, const double* hyper,
                const double* words, int64 words_size, int64 base, int64 optimizer_step, double lr_factor,
                int64 tensor_step) {
    const double lr = group_learning_rate(Program{words, words_size}, base, optimizer_step, lr_factor);
    const SgdCoefficients<T> c = sgd_coefficients<T>(hyper, lr, tensor_step);
    const bool has_lr_scale = lr_scale != nullptr;
    for (int64 i = 0; i < size; ++i) {
        T p = param[i], g = grad[i], s = has_lr_scale ? lr_scale[i] : T(0);
        T b = sgd_reads_momentum_buffer(c) ? momentum_buffer[i] : T(0);
        sgd_chunk_element(p, g, s, b, c, has_lr_scale);
        param[i] = p;
        if (c.use_momentum) momentum_buffer[i] = b;
    }
}

template <typename T>
void rmsprop_update(T* param, const T* grad, const T* lr_scale, T* square_avg, T* momentum_buffer, T* grad_avg,
                    int64 size, const double* hyper, const double* words, int64 words_size, int64 base,
                    int64 optimizer_step, double lr_factor, int64 tensor_step) {
    const double lr = group_learning_rate(Program{words, words_size}, base, optimizer_step, lr_factor);
    const RmspropCoefficients<T> c = rmsprop_coefficients<T>(hyper, lr);
    const bool has_lr_scale = lr_scale != nullptr;
    for (int64 i = 0; i < size; ++i) {
        T p = param[i], g = grad[i], s = has_lr_scale ? lr_scale[i] : T(0), v = square_avg[i];
        T b = c.use_momentum ? momentum_buffer[i] : T(0), a = c.centered ? grad_avg[i] : T(0);
        rmsprop_chunk_element(p, g, s, v, b, a, c, has_lr_scale);
        param[i] = p;
        square_avg[i] = v;
        if (c.use_momentum) momentum_buffer[i] = b;
        if (c.centered) grad_avg[i] = a;
    }
}

template <typename T>
void adam_update(T* param, const T* grad, const T* lr_scale, T* exp_avg, T* exp_avg_sq, T* max_exp_avg_sq,
                 int64 size, const double* hyper, const double* words, int64 words_size, int64 base,
                 int64 optimizer_step, double lr_factor, int64 tensor_step) {
    const double lr = group_learning_rate(Program{words, words_size}, base, optimizer_step, lr_factor);
    const AdamCoefficients<T> c = adam_coefficients<T>(hyper, lr, tensor_step + 1);
    const bool has_lr_scale = lr_scale != nullptr;
    for (int64 i = 0; i < size; ++i) {
        T p = param[i], g = grad[i], s = has_lr_scale ? lr_scale[i] : T(0), m = exp_avg[i], v = exp_avg_sq[i];
        T v_max = c.amsgrad ? max_exp_avg_sq[i] : T(0);
        adam_chunk_element(p, g, s, m, v, v_max, c, has_lr_scale);
        param[i] = p;
        exp_avg[i] = m;
        exp_avg_sq[i] = v;
        if (c.amsgrad) max_exp_avg_sq[i] = v_max;
    }
}

#define TAIL int64 size, const double* hyper, const double* words, int64 words_size, int64 base, \
             int64 optimizer_step, double lr_factor, int64 tensor_step
#define TAIL_ARGUMENTS size, hyper, words, words_size, base, optimizer_step, lr_factor, tensor_step
#define INSTANTIATE(T)                                                                                          \
    extern "C" void sgd_update_##T(T* p, const T* g, const T* s, T* s0, T* s1, T* s2, TAIL) {                \
        sgd_update<T>(p, g, s, s0, TAIL_ARGUMENTS);                                                           \
    }                                                                                                         \
    extern "C" void rmsprop_update_##T(T* p, const T* g, const T* s, T* s0, T* s1, T* s2, TAIL) {            \
        rmsprop_update<T>(p, g, s, s0, s1, s2, TAIL_ARGUMENTS);                                               \
    }                                                                                                         \
    extern "C" void adam_update_##T(T* p, const T* g, const T* s, T* s0, T* s1, T* s2, TAIL) {               \
        adam_update<T>(p, g, s, s0, s1, s2, TAIL_ARGUMENTS);                                                  \
    }
INSTANTIATE(float)
INSTANTIATE(double)
"""

UPDATE_ARGUMENTS = [ctypes.c_void_p] * 6 + [ctypes.c_longlong, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong,
                                            ctypes.c_longlong, ctypes.c_longlong, ctypes.c_double, ctypes.c_longlong]
KERNEL_NAMES = {"sgd_step": "sgd_update", "rmsprop_step": "rmsprop_update", "adam_step": "adam_update"}
CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


def build_host_library(tmp_path_factory, name, source, defines=()):
    """Compile a C++ shim over the CUDA headers for the host and load it; skips without a C++ compiler.

    -ffp-contract=off: no fused multiply-add (GCC contracts by default where the target has FMA), as the kernels'
    --fmad=false. Never -ffast-math/-Ofast: they drop NaN/inf semantics and turn on flush-to-zero process-wide."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler (g++) to build the host shim")
    directory = tmp_path_factory.mktemp(name)
    source_path, library = directory / "shim.cpp", directory / "shim.so"
    source_path.write_text(source)
    command = [compiler, "-O2", "-std=c++17", "-ffp-contract=off", "-fPIC", "-shared", "-Wall", "-Werror",
               f"-I{cuda.SOURCE_DIR}", *defines, str(source_path), "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return ctypes.CDLL(str(library))


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    defines = [f"-D{name}={value}" for name, value in cuda.compile_defines().items()]
    loaded = build_host_library(tmp_path_factory, "cuda_host_math", SHIM, defines)
    loaded.host_schedule_value.restype = ctypes.c_double
    loaded.host_schedule_value.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_longlong]
    for name in KERNEL_NAMES.values():
        for ctype in CTYPES.values():
            function = getattr(loaded, f"{name}_{ctype}")
            function.restype = None
            function.argtypes = UPDATE_ARGUMENTS
    return loaded


def host_schedule_values(shim, program, base, steps):
    program = np.ascontiguousarray(program, dtype=np.float64)
    return np.array([shim.host_schedule_value(program.ctypes.data, program.size, base, int(step)) for step in steps])


def pointer(array):
    return None if array is None else array.ctypes.data


# ---------------------------------------------------------------- optimizers
def run_shim(shim, cls, kwargs, params0, params1, scales1, grads, schedule, lrs1):
    """The steps of tests/test_optimizers.py's problem, each tensor updated by the shim as the fused kernel updates
    it: group 0 follows ``schedule``, group 1 has the float lr ``lrs1[t]`` (a constant schedule) and lr_scale."""
    params = [p.copy() for p in params0 + params1]
    dtype = params[0].dtype
    update = getattr(shim, f"{KERNEL_NAMES[cls.KERNEL]}_{CTYPES[dtype]}")
    states = [[np.zeros_like(param) for _ in cls.STATE_SLOTS] for param in params]
    scales = [None] * len(params0) + list(scales1)
    group = dict(cls.DEFAULTS, **kwargs)
    hyper = np.array([cls.group_row(group)[name] for name in cls.COLUMNS], dtype=np.float64)
    # SGD's tensor step counts momentum steps (kernels/cuda/step_math.cuh: sgd_counts_step); the others count all.
    counts_step = cls.KERNEL != "sgd_step" or group["momentum"] != 0
    tensor_steps = [0] * len(params)
    for t in range(STEPS):
        for index, (param, grad) in enumerate(zip(params, grads[t])):
            program = schedule.program() if index < len(params0) else S.constant(lrs1[t]).program()
            slots = states[index] + [None] * (3 - len(states[index]))  # SGD has one state slot, the others three
            update(pointer(param), pointer(grad), pointer(scales[index]), *(pointer(s) for s in slots), param.size,
                   pointer(hyper), pointer(program), program.size, 0, t, 1.0, tensor_steps[index])
            tensor_steps[index] += counts_step
    named = [dict(zip(cls.STATE_SLOTS, buffers)) for buffers in states]
    return params, named


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_element_math_matches_reference_and_cpu_kernels(shim, cls, kwargs, dtype, rng):
    params0, params1, scales1, grads = make_problem(dtype, rng)
    schedule = fo.schedules.cosine(0.05, t_max=4, eta_min=0.001)
    lrs1 = [0.02, 0.02, 0.005, 0.04, 0.0, 0.01]
    expected_params, expected_states = run_reference(cls, kwargs, params0, params1, scales1, grads, schedule, lrs1)
    got_params, got_states = run_shim(shim, cls, kwargs, params0, params1, scales1, grads, schedule, lrs1)

    rtol = tolerance(dtype, STEPS)
    for index, param in enumerate(got_params):
        assert_close(param, expected_params[index], rtol, f"param {index}")
        for name, value in expected_states[index].items():
            if name != "step":
                assert_close(got_states[index][name], value, rtol, f"param {index} state {name}")

    # The CPU kernels on the same problem: identical bits.
    cpu_params = [p.copy() for p in params0 + params1]
    groups = [{"params": cpu_params[:len(params0)], "lr": schedule},
              {"params": cpu_params[len(params0):], "lr": lrs1[0], "lr_scale": scales1}]
    optimizer = cls(groups, backend="cpu", **kwargs)
    for t in range(STEPS):
        optimizer.param_groups[1]["lr"] = lrs1[t]
        optimizer.step(grads[t])
    for index, (ours, theirs) in enumerate(zip(got_params, cpu_params)):
        np.testing.assert_array_equal(ours, theirs, err_msg=f"param {index}: host build of the CUDA math vs CPU")
        for name, buffer in optimizer.state[index].items():
            np.testing.assert_array_equal(got_states[index][name], buffer, err_msg=f"param {index} state {name}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lr_factor_scales_the_rate(shim, dtype):
    """The divergence guard's back-off multiplies the scheduled lr before the coefficients are formed."""
    param, grad = np.zeros(3, dtype), np.ones(3, dtype)
    hyper = np.array([fo.SGD.group_row(dict(fo.SGD.DEFAULTS))[name] for name in fo.SGD.COLUMNS])
    program = S.constant(0.5).program()
    getattr(shim, f"sgd_update_{CTYPES[np.dtype(dtype)]}")(
        pointer(param), pointer(grad), None, None, None, None, param.size, pointer(hyper), pointer(program),
        program.size, 0, 0, 0.25, 0)
    np.testing.assert_array_equal(param, -0.125)


def test_nan_and_inf_propagate_like_torch(shim):
    """No fast math in the element math: a NaN or inf gradient gives a NaN param, as on the CPU."""
    param = np.zeros(4, np.float32)
    grad = np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)
    states = [np.zeros(4, np.float32) for _ in range(3)]
    hyper = np.array([fo.Adam.group_row(dict(fo.Adam.DEFAULTS))[name] for name in fo.Adam.COLUMNS])
    program = S.constant(0.1).program()
    shim.adam_update_float(pointer(param), pointer(grad), None, *(pointer(s) for s in states), 4, pointer(hyper),
                           pointer(program), program.size, 0, 0, 1.0, 0)
    assert np.isnan(param[:3]).all() and np.isfinite(param[3])


# ---------------------------------------------------------------- schedules
@pytest.mark.parametrize("case", CASES, ids=str)
def test_schedule_value_matches_host_and_cpu_kernel(shim, case):
    t = np.arange(case.steps, dtype=np.int64)
    expected = case.schedule(t)
    got = host_schedule_values(shim, case.schedule.program(), 0, t)
    error = np.abs(got - expected)
    worst = int(np.argmax(error / np.maximum(np.abs(expected), np.finfo(np.float64).tiny)))
    assert np.all(error <= 4 * EPS * np.abs(expected)), f"t={worst}: shim {got[worst]!r} host {expected[worst]!r}"
    np.testing.assert_array_equal(got, schedule_values(case.schedule.program(), 0, t))


def test_programs_concatenate_with_base_offsets(shim):
    programs = [case.schedule.program() for case in CASES]
    bases = np.cumsum([0] + [program.size for program in programs[:-1]])
    joined = np.concatenate(programs)
    t = np.arange(0, 300, 7, dtype=np.int64)
    for case, program, base in zip(CASES, programs, bases):
        np.testing.assert_array_equal(host_schedule_values(shim, joined, int(base), t),
                                      host_schedule_values(shim, program, 0, t), err_msg=case.name)


def test_malformed_program_gives_nan(shim):
    assert np.isnan(host_schedule_values(shim, [99.0, 1.0], 0, [0])[0])
    # A warmup whose child is itself: a cycle.
    assert np.isnan(host_schedule_values(shim, [11.0, 5.0, 0.0, 0.0], 0, [9])[0])


def test_cosine_restarts_exact_at_boundaries_and_far_out(shim):
    schedule = S.cosine_restarts(0.1, t_0=1, t_mult=3, eta_min=0.01)
    boundaries = np.array([(3**k - 1) // 2 for k in range(1, 33)], dtype=np.int64)
    assert np.all(host_schedule_values(shim, schedule.program(), 0, boundaries) == 0.1)
    huge = S.cosine_restarts(1.0, t_0=2**40, t_mult=2**20)
    steps = np.array([2**62, 2**62 + 12345, 2**40 - 1, 2**40, 2**60 + 2**40], dtype=np.int64)
    np.testing.assert_allclose(host_schedule_values(shim, huge.program(), 0, steps), huge(steps), rtol=4 * EPS)


def test_onecycle_holds_its_final_value(shim):
    schedule = S.onecycle(0.1, total_steps=100, three_phase=True)
    t = np.arange(99, 400)
    assert np.all(host_schedule_values(shim, schedule.program(), 0, t) == 0.1 / 25.0 / 1e4)
