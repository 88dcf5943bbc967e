"""The CUDA conversions (kernels/cuda/conversions.cuh), built for the host, against the Numba conversions
(fastopt/kernels/cpu/conversions.py) bit for bit and against ml_dtypes and NumPy.

As in tests/test_cuda_host_math.py, a small C++ shim includes the header and is compiled with ``g++ -O2
-ffp-contract=off`` (never -ffast-math) into a shared library loaded with ctypes. The header is integer arithmetic
on the bits; only its bit casts differ on the device (``__float_as_uint`` there, memcpy here), so the host build
checks the device's rounding. The device build itself is checked by tests/test_cuda_compile.py (the header on
its own) and here (a kernel that uses every function: no spills, no local memory).

NaN: the conversions make NaN quiet, as the hardware conversions Numba compiles to; NumPy's float16 keeps a
signalling NaN signalling. So NaN payloads are compared with Numba exactly and with NumPy/ml_dtypes only as
"both NaN, same sign".
"""
import ctypes
import types

import numpy as np
import pytest

from fastopt.backends import cuda
from fastopt.kernels.cpu import conversions
from test_conversions import ALL_PATTERNS, bfloat16_values, float16_values, rounding_cases, same_bits_or_both_nan
from test_cuda_host_math import build_host_library
import test_cuda_compile
from test_cuda_compile import ARCHITECTURES, parse_ptxas

ml_dtypes = pytest.importorskip("ml_dtypes")
compiler = test_cuda_compile.compiler  # the CUDA compiler (a fixture)

# The Numba module's array helpers, name for name, over the header's element functions.
SHIM = r"""
#include "conversions.cuh"

using namespace fastopt;

extern "C" void bfloat16_to_float32_array(const uint16* bits, float* out, int64 size) {
    for (int64 i = 0; i < size; ++i) out[i] = bfloat16_bits_to_float32(bits[i]);
}
extern "C" void float32_to_bfloat16_array(const float* values, uint16* out, int64 size) {
    for (int64 i = 0; i < size; ++i) out[i] = float32_to_bfloat16_bits(values[i]);
}
extern "C" void float16_to_float32_array(const uint16* bits, float* out, int64 size) {
    for (int64 i = 0; i < size; ++i) out[i] = float16_bits_to_float32(bits[i]);
}
extern "C" void float32_to_float16_array(const float* values, uint16* out, int64 size) {
    for (int64 i = 0; i < size; ++i) out[i] = float32_to_float16_bits(values[i]);
}
extern "C" void float32_to_bfloat16_stochastic_array(const float* values, int64 seed, int64 step, uint16* out,
                                                     int64 size) {
    for (int64 i = 0; i < size; ++i) out[i] = float32_to_bfloat16_stochastic(values[i], seed, step, i);
}
extern "C" uint32 host_counter_hash(int64 seed, int64 step, int64 element) {
    return counter_hash(seed, step, element);
}
"""

# A kernel that uses every function, so ptxas reports what they cost on the device.
KERNEL = r"""
#include "conversions.cuh"

using namespace fastopt;

extern "C" __global__ void conversions_round_trip(const float* values, const uint16* bits, uint16* bfloat16_out,
                                                  uint16* float16_out, uint16* stochastic_out, float* widened_out,
                                                  int64 seed, int64 step, int64 size) {
    const int64 i = int64(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i >= size) return;
    bfloat16_out[i] = float32_to_bfloat16_bits(values[i]);
    float16_out[i] = float32_to_float16_bits(values[i]);
    stochastic_out[i] = float32_to_bfloat16_stochastic(values[i], seed, step, i);
    widened_out[i] = bfloat16_bits_to_float32(bits[i]) + float16_bits_to_float32(bits[i]);
}
"""

ARRAY_FUNCTIONS = {
    "bfloat16_to_float32_array": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong],
    "float32_to_bfloat16_array": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong],
    "float16_to_float32_array": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong],
    "float32_to_float16_array": [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong],
    "float32_to_bfloat16_stochastic_array": [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_void_p,
                                             ctypes.c_longlong],
}


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    loaded = build_host_library(tmp_path_factory, "cuda_conversions", SHIM)
    loaded.host_counter_hash.restype = ctypes.c_uint32
    loaded.host_counter_hash.argtypes = [ctypes.c_longlong] * 3
    functions = {"counter_hash": loaded.host_counter_hash}
    for name, argtypes in ARRAY_FUNCTIONS.items():
        functions[name] = with_numba_signature(getattr(loaded, name), argtypes)
    return types.SimpleNamespace(**functions)


def with_numba_signature(function, argtypes):
    """The shim's ``name(values, *keys, out, size)`` called as the Numba helper: ``name(values, *keys, out)``."""
    function.restype, function.argtypes = None, argtypes

    def call(values, *keys_and_out):
        *keys, out = keys_and_out
        assert values.flags.c_contiguous and out.flags.c_contiguous and values.size == out.size
        function(values.ctypes.data, *keys, out.ctypes.data, values.size)

    return call


def convert(function, values, out_dtype, *keys):
    out = np.empty(values.size, out_dtype)
    function(values, *keys, out)
    return out


def float32_cases(widen):
    """rounding_cases (every 16-bit value, each tie and a float32 ulp either side), the extremes of
    tests/test_conversions.py, and random float32 bit patterns (every exponent, NaNs included, with arbitrary low
    bits: the sticky bits of the float16 subnormal shifts)."""
    extremes = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 3.4e38, -3.4e38, 1e-45, -1e-45,
                         65504.0, 65519.99, 65520.0, -65520.0], np.float32)
    random_bits = np.random.default_rng(7).integers(0, 1 << 32, 1 << 18, dtype=np.uint64).astype(np.uint32)
    signalling_nans = np.array([0x7F800001, 0xFF800001, 0x7FA00000, 0x7F802000, 0x7FBFFFFF], np.uint32)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.concatenate([rounding_cases(widen), extremes, random_bits.view(np.float32),
                               signalling_nans.view(np.float32)])


@pytest.mark.parametrize("name,numba_function,reference", [
    ("bfloat16_to_float32_array", conversions.bfloat16_to_float32_array, bfloat16_values),
    ("float16_to_float32_array", conversions.float16_to_float32_array, float16_values),
], ids=["bfloat16", "float16"])
def test_widening_every_pattern(shim, name, numba_function, reference):
    out = convert(getattr(shim, name), ALL_PATTERNS, np.float32).view(np.uint32)
    np.testing.assert_array_equal(out, convert(numba_function, ALL_PATTERNS, np.float32).view(np.uint32))
    same_bits_or_both_nan(out, reference(ALL_PATTERNS).view(np.uint32), lambda b: b.view(np.float32))


@pytest.mark.parametrize("name,numba_function,widen,reference", [
    ("float32_to_bfloat16_array", conversions.float32_to_bfloat16_array, bfloat16_values,
     lambda v: v.astype(ml_dtypes.bfloat16).view(np.uint16)),
    ("float32_to_float16_array", conversions.float32_to_float16_array, float16_values,
     lambda v: v.astype(np.float16).view(np.uint16)),
], ids=["bfloat16", "float16"])
def test_float32_to_16_bits_rounds_to_nearest_even(shim, name, numba_function, widen, reference):
    values = float32_cases(widen)
    out = convert(getattr(shim, name), values, np.uint16)
    np.testing.assert_array_equal(out, convert(numba_function, values, np.uint16))
    with np.errstate(over="ignore", invalid="ignore"):
        same_bits_or_both_nan(out, reference(values), widen)


@pytest.mark.parametrize("seed,step", [(0, 0), (12345, 7), (12345, 8), (2 ** 40 + 3, 10 ** 6), (-1, 2 ** 62)])
def test_stochastic_rounding_matches_numba(shim, seed, step):
    """Every element's bits, over more than 2^18 elements (each its own counter) of every kind of value."""
    values = float32_cases(bfloat16_values)
    out = convert(shim.float32_to_bfloat16_stochastic_array, values, np.uint16, seed, step)
    np.testing.assert_array_equal(out, convert(conversions.float32_to_bfloat16_stochastic_array, values, np.uint16,
                                               seed, step))


def test_counter_hash_matches_numba(shim):
    edges = [0, 1, -1, 2 ** 31, 2 ** 32 + 1, 2 ** 63 - 1, -(2 ** 63)]
    randoms = np.random.default_rng(3).integers(-(2 ** 63), 2 ** 63 - 1, (200, 3), dtype=np.int64).tolist()
    for seed, step, element in [(a, b, c) for a in edges for b in edges for c in edges[:3]] + randoms:
        assert shim.counter_hash(seed, step, element) == conversions.counter_hash(seed, step, element), \
            (seed, step, element)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_device_build_has_no_spills_or_local_memory(compiler, architecture, capsys):
    """Bit casts through memcpy would put the value in local memory; the device takes the intrinsics instead."""
    succeeded, log = compiler(KERNEL, "conversions_round_trip.cu", list(cuda.compile_options()), architecture)
    assert succeeded and "warning" not in log.lower(), log
    resources = parse_ptxas(log)["conversions_round_trip"]
    with capsys.disabled():
        print(f"\nconversions_round_trip for sm_{architecture}: {resources.registers} regs, spills "
              f"{resources.spill_stores}/{resources.spill_loads}, stack {resources.stack_frame}")
    assert resources.spill_stores == resources.spill_loads == resources.stack_frame == 0, resources
