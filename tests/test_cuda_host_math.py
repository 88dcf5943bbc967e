"""The CUDA kernels' shared math, built for the host, against the float64 reference and the CPU kernels.

``kernels/cuda/*.cuh`` hold the schedule evaluator, the generic step (each tensor's coefficient row, the chunk loop)
and, in ``kernels/cuda/rules/``, each rule's step scalars and element math as ``__host__ __device__`` functions. Here
a small C++ shim includes them all (its rules generated from ``fastopt.rules.RULES``: a new rule needs no edit here),
compiled with
``g++ -O2 -ffp-contract=off`` (no -ffast-math: NaN/inf and the operation order must survive) into a shared library
loaded with ctypes; ``__host__ __device__`` is defined away outside nvcc/NVRTC. The kernels are compiled with
``--fmad=false``, so on the device the same functions round the same way; only the device's double ``cos`` and
``pow`` differ (within 2 ulp), which tests/test_cuda.py covers on a GPU.

The shim runs one block of each pass of a step kernel the way fused.cu does: the chunk's streams from its tensor's
address and format rows, then step_math.cuh's chunk loop for every thread index in turn, so the host build covers the
loop, its loads and stores in every storage format (storage.cuh), not only the element math; the 8-bit loop (each
iteration's first half for every thread, the code blocks' absmax, then every thread's second half) of the kernels for
8-bit states; and the last block's update of a tensor's step count and running scalars (advance_tensor), and the
blend. Only the kernels' own scaffolding (barriers, the skip check, the ticket, the block reductions, the warp
reductions of the 8-bit absmax) is device-only; tests/test_cuda.py's NumPy stand-in for CuPy emulates it around this
shim. codes.cuh's decode and encode are checked against fastopt.quantization byte for byte (the end of this file).

Two checks per case:
- against the float64 reference, with the tolerances of tests/conftest.py (every optimizer option of CONFIGS in
  tests/test_optimizers.py, every rule, float32 and float64; every schedule of CASES in tests/test_schedules.py);
- against the CPU (Numba) kernels, bit for bit: the same operations in the same order, and the same libm (pow
  included: schedule-free's running scalars and every bias correction); the storage conversions against the Numba
  kernels' widen_bits/narrow_bits, and the grad control against backends.GradControl.

A rule with per-tensor norms (LAMB) is bit for bit in its element math (moments, direction, apply) and its states;
its sums of squares are added in another order than Numba's (per thread, then a fixed tree, where Numba's vector
lanes re-associate), so they agree with the CPU's to double rounding only, and the params bit for bit once the
APPLY pass is given the CPU's sums.
"""
import ctypes
import math
import shutil
import subprocess

import numpy as np
import pytest

import fastopt as fo
from conftest import assert_close, tolerance
from fastopt import quantization
from fastopt import schedules as S
from fastopt.backends import cuda
from fastopt.backends import GradControl
from fastopt.backends.layout import GroupTable
from fastopt.kernels.cpu import conversions
from fastopt.kernels.cpu import layout as kernel_layout
from fastopt.optimizer import PARAM_VALUE
from fastopt.rules import RULES
from fastopt.kernels.cpu.schedule_math import schedule_values
from configs import CONFIG_IDS, CONFIGS, STEPS, lr_schedule, make_problem, run_reference
from test_schedules import CASES, EPS

SHIM = r"""
#include "codes.cuh"
#include "grad_control.cuh"
#include "step_math.cuh"
@RULE_HEADERS@
using namespace fastopt;

extern "C" double host_schedule_value(const double* words, int64 size, int64 base, int64 step) {
    return schedule_value(Program{words, size}, base, step);
}

// One block's work on one chunk in the pass PASS, as fused.cu's kernels do it: the block's first thread's coefficient
// row (and in the APPLY pass the tensor's trust coefficient from its chunks' sums, [first_chunk, end_chunk) of
// ``chunk_norms``, added as the block adds them: each thread's share, then block_sum's tree) and the flags, the
// chunk's streams from the tensor's address and format rows, then step_math.cuh's run_chunk for every thread index in
// turn (each element is its own; the order does not matter). The group's lr comes from its schedule at the optimizer
// step; ``hyper`` is the group's row of the group table; ``tensor_step`` and ``scalars`` are the tensor's step count
// and running scalars before this step, as the kernel reads them; ``tensor`` its position in its bucket (the stochastic
// rounding's key). The NORMS pass writes each thread's sums of squares (param, direction) into ``thread_sums``
// [BLOCK][NORM_SUMS], which the kernel adds up in block_sum's tree.
#define CHUNK_PARAMETERS                                                                                        \
    const int64 *address_row, const int64 *format_row, int64 start, int64 length, const double *hyper,         \
        const double *words, int64 words_size, int64 base, int64 optimizer_step, double lr_factor,             \
        int64 tensor_step, const double *scalars, const double *grad_control, int64 seed, int64 tensor,       \
        const double *chunk_norms, int64 first_chunk, int64 end_chunk, double *thread_sums
#define CHUNK_ARGUMENTS                                                                                         \
    address_row, format_row, start, length, hyper, words, words_size, base, optimizer_step, lr_factor,         \
        tensor_step, scalars, grad_control, seed, tensor, chunk_norms, first_chunk, end_chunk, thread_sums

// A tensor's sums of squares from its chunks' sums [first_chunk, end_chunk) of ``chunk_norms``, as an APPLY block
// adds them: each thread's share (step_math.cuh), then block_sum's tree.
NormSums tensor_norm_sums(const double* chunk_norms, int64 first_chunk, int64 end_chunk) {
    NormSums shares[BLOCK];
    for (int thread = 0; thread < BLOCK; ++thread) {
        shares[thread] = thread_norm_sums(chunk_norms, first_chunk, end_chunk, thread);
    }
    for (int half = BLOCK / 2; half > 0; half /= 2) {
        for (int thread = 0; thread < half; ++thread) {
            shares[thread].param += shares[thread + half].param;
            shares[thread].update += shares[thread + half].update;
        }
    }
    return shares[0];
}
extern "C" void host_tensor_norm_sums(const double* chunk_norms, int64 first_chunk, int64 end_chunk, double* sums) {
    const NormSums total = tensor_norm_sums(chunk_norms, first_chunk, end_chunk);
    sums[NORM_PARAM] = total.param;
    sums[NORM_UPDATE] = total.update;
}

// The 8-bit loop over one chunk for every thread of a block (fused.cu's code_chunk_loop): per iteration every
// thread's first half, each code block's absmax over its threads (block_max.cuh's reduction, here a plain max: exact,
// in any order), every thread's second half.
template <typename Rule, int PASS, typename F>
void code_block_loop(const ChunkStreams<float>& s, const CodeStreams& codes, int length, const float* c,
                     ChunkFlags flags, NormSums* sums) {
    static CodeThread held[BLOCK];  // the shim runs one block at a time
    const bool aligned = streams_quad_aligned<F>(s, Rule::CODES);
    const int blocks = (length + CODE_BLOCK - 1) / CODE_BLOCK;
    for (int first_block = 0; first_block < blocks; first_block += CODE_BLOCKS_AT_ONCE) {
        for (int thread = 0; thread < BLOCK; ++thread) {
            code_thread_compute<Rule, PASS, F>(s, codes, length, c, flags, aligned, first_block, thread,
                                               held[thread]);
        }
        if constexpr (PASS != APPLY) {
            uint32 absmax_bits[CODE_BLOCKS_AT_ONCE][STATE_SLOTS] = {};
            for (int thread = 0; thread < BLOCK; ++thread) {
                for (int k = 0; k < STATE_SLOTS; ++k) {
                    uint32& largest = absmax_bits[thread / CODE_THREADS][k];
                    largest = held[thread].absmax_bits[k] > largest ? held[thread].absmax_bits[k] : largest;
                }
            }
            for (int thread = 0; thread < BLOCK; ++thread) {
                code_thread_store<Rule, PASS, F>(s, codes, length, c, flags, aligned, first_block, thread,
                                                 held[thread], absmax_bits[thread / CODE_THREADS], sums[thread]);
            }
        }
    }
}

// One block of a step kernel on one chunk: <pass>_<T>[_mixed] (CODES false: run_chunk, which picks the plain or a mixed
// loop from the chunk's formats, as both kernels do for the buckets they are launched on) or <pass>_float_8bit[_mixed]
// (CODES: the 8-bit loop for a tensor with 8-bit states, else chunk_loop, both for the plain formats or, ANY_MIXED,
// RUNTIME), as fused.cu's step_pass.
template <typename Rule, int PASS, typename T, bool CODES = false, bool ANY_MIXED = true>
void rule_block(CHUNK_PARAMETERS) {
    const double lr = group_learning_rate(Program{words, words_size}, base, optimizer_step, lr_factor);
    T c[COEFFICIENTS];
    tensor_coefficients<Rule>(hyper, lr, tensor_step, scalars, grad_control, c);
    if constexpr (PASS == APPLY) {
        const NormSums sums = tensor_norm_sums(chunk_norms, first_chunk, end_chunk);
        Rule::norm_coefficients(hyper, lr, sums.param, sums.update, c);
    }
    const ChunkFlags flags = chunk_flags(address_row, hyper);
    const Rounding rounding = chunk_rounding(seed, optimizer_step, tensor, start);
    const bool mixed = ANY_MIXED && is_mixed(format_row);
    const ChunkStreams<T> s = mixed ? chunk_streams<T, true>(address_row, format_row, start, rounding)
                                    : chunk_streams<T, false>(address_row, format_row, start, rounding);
    NormSums sums[BLOCK] = {};
    if constexpr (CODES) {
        typedef typename CodeLoopFormats<ANY_MIXED>::type F;
        if (has_codes(format_row)) {
            ChunkStreams<float> coded_streams = s;
            const CodeStreams codes = code_streams(coded_streams, address_row, format_row, start);
            code_block_loop<Rule, PASS, F>(coded_streams, codes, int(length), c, flags, sums);
        } else {
            for (int thread = 0; thread < BLOCK; ++thread) {
                chunk_loop<Rule, PASS, float, F, 1>(s, int(length), c, flags, thread, sums[thread]);
            }
        }
    } else {
        for (int thread = 0; thread < BLOCK; ++thread) {
            run_chunk<Rule, PASS, true>(s, mixed, int(length), c, flags, thread, sums[thread]);
        }
    }
    for (int thread = 0; thread < BLOCK; ++thread) {
        thread_sums[thread * NORM_SUMS + NORM_PARAM] = sums[thread].param;
        thread_sums[thread * NORM_SUMS + NORM_UPDATE] = sums[thread].update;
    }
}

// The last block's update of one tensor that had a grad (fused.cu's advance_step_counts): its running scalars with its
// group's lr, and its step count.
template <typename Rule>
void advance_block(const double* hyper, const double* words, int64 words_size, int64 base, int64 optimizer_step,
                   double lr_factor, int64* tensor_step, double* scalars) {
    const double lr = KeepsScalars<Rule>::value
                          ? group_learning_rate(Program{words, words_size}, base, optimizer_step, lr_factor)
                          : 0.0;
    advance_tensor<Rule>(hyper, lr, tensor_step, scalars);
}

// <kernel>_advance_tensor for every rule; <kernel>_<pass>_block_float, _double, _float_8bit and _float_8bit_mixed for
// each pass of its step.
#define INSTANTIATE(RULE)                                                                                       \
    extern "C" void RULE##_advance_tensor(const double* hyper, const double* words, int64 words_size, int64 base, \
                                          int64 optimizer_step, double lr_factor, int64* tensor_step,          \
                                          double* scalars) {                                                    \
        advance_block<rules::RULE>(hyper, words, words_size, base, optimizer_step, lr_factor, tensor_step, scalars); \
    }
#define INSTANTIATE_PASS(RULE, NAME, PASS)                                                                      \
    extern "C" void RULE##_##NAME##_block_float(CHUNK_PARAMETERS) {                                           \
        rule_block<rules::RULE, PASS, float>(CHUNK_ARGUMENTS);                                                  \
    }                                                                                                           \
    extern "C" void RULE##_##NAME##_block_double(CHUNK_PARAMETERS) {                                          \
        rule_block<rules::RULE, PASS, double>(CHUNK_ARGUMENTS);                                                 \
    }                                                                                                           \
    extern "C" void RULE##_##NAME##_block_float_8bit(CHUNK_PARAMETERS) {                                      \
        rule_block<rules::RULE, PASS, float, true, false>(CHUNK_ARGUMENTS);                                     \
    }                                                                                                           \
    extern "C" void RULE##_##NAME##_block_float_8bit_mixed(CHUNK_PARAMETERS) {                                \
        rule_block<rules::RULE, PASS, float, true, true>(CHUNK_ARGUMENTS);                                      \
    }
@RULE_INSTANCES@
// blend.cu's block on one chunk (the tensor's address and format rows): step_math.cuh's blend_chunk for every thread.
template <typename T>
void blend_block(const int64* address_row, const int64* format_row, int64 start, int64 length, int64 slot, T weight) {
    for (int thread = 0; thread < BLOCK; ++thread) {
        blend_chunk<T>(address_row, format_row, start, int(length), int(slot), weight, thread);
    }
}
extern "C" void host_blend_block_float(const int64* address_row, const int64* format_row, int64 start, int64 length,
                                       int64 slot, float weight) {
    blend_block<float>(address_row, format_row, start, length, slot, weight);
}
extern "C" void host_blend_block_double(const int64* address_row, const int64* format_row, int64 start, int64 length,
                                        int64 slot, double weight) {
    blend_block<double>(address_row, format_row, start, length, slot, weight);
}

// finish_grad_control's arithmetic once the partial sums are added.
extern "C" void host_set_grad_control(double sum_of_squares, int64 nonfinite, double unscale, double max_norm,
                                      int64 skip_nonfinite, double* grad_control, double* statistics) {
    set_grad_control(sum_of_squares, nonfinite, unscale, max_norm, skip_nonfinite != 0, grad_control, statistics);
}

// storage.cuh's loads and stores over whole arrays under float math: ``out[i]`` = the stream's element ``i`` widened;
// ``stream[i]`` = ``values[i]`` stored in ``format`` (the stochastic key of element ``i`` of the chunk that starts at
// ``start`` of tensor ``tensor``).
extern "C" void host_widen_float(const void* stream, int64 format, int64 size, float* out) {
    for (int i = 0; i < int(size); ++i) out[i] = widen<float, RUNTIME>(load_bits<float, RUNTIME>(stream, int(format), i), int(format));
}
extern "C" void host_store_float(const float* values, int64 format, int64 size, void* stream, int64 seed, int64 step,
                                 int64 tensor, int64 start) {
    const Rounding rounding = chunk_rounding(seed, step, tensor, start);
    for (int i = 0; i < int(size); ++i) store_value<float, RUNTIME>(stream, int(format), i, values[i], rounding);
}
// codes.cuh over whole arrays: a tensor's codes and scales block by block (fastopt.quantization.quantize), its values
// (dequantize), and encode alone.
extern "C" void host_quantize(const float* values, int64 size, int64 is_signed, unsigned char* codes, float* scales) {
    for (int64 begin = 0; begin < size; begin += CODE_BLOCK) {
        const int64 end = begin + CODE_BLOCK < size ? begin + CODE_BLOCK : size;
        uint32 absmax_bits = 0;
        for (int64 i = begin; i < end; ++i) {
            const uint32 bits = magnitude_bits(values[i]);
            absmax_bits = bits > absmax_bits ? bits : absmax_bits;
        }
        const float scale = block_scale(absmax_bits);
        const float reciprocal = scale_reciprocal(scale);
        for (int64 i = begin; i < end; ++i) {
            codes[i] = (unsigned char)encode_in_block(values[i], reciprocal, absmax_bits, is_signed != 0);
        }
        scales[begin / CODE_BLOCK] = scale;
    }
}
extern "C" void host_dequantize(const unsigned char* codes, const float* scales, int64 size, int64 is_signed,
                                float* out) {
    for (int64 i = 0; i < size; ++i) out[i] = decode(codes[i], scales[i / CODE_BLOCK], is_signed != 0);
}
extern "C" void host_encode(const float* x, int64 size, int64 is_signed, unsigned char* codes) {
    for (int64 i = 0; i < size; ++i) codes[i] = (unsigned char)encode(x[i], is_signed != 0);
}
extern "C" void host_encode_stochastic(const float* x, int64 size, int64 is_signed, const uint32* noise,
                                       unsigned char* codes) {
    for (int64 i = 0; i < size; ++i) codes[i] = (unsigned char)encode_stochastic(x[i], is_signed != 0, noise[i]);
}
extern "C" void host_stochastic_noise(int64 seed, int64 step, int64 slot, int64 first_element, int64 size,
                                      uint32* noise) {
    const uint64 key = counter_key(seed, step);
    for (int64 i = 0; i < size; ++i) {
        const int64 block_start = i - i % CODE_BLOCK;
        const uint32 bits = counter_hash_keyed(key, stochastic_code_key(int(slot), first_element + block_start));
        noise[i] = code_noise(bits, int(i - block_start));
    }
}
extern "C" void host_widen_double(const void* stream, int64 format, int64 size, double* out) {
    for (int i = 0; i < int(size); ++i) {
        out[i] = widen<double, RUNTIME>(load_bits<double, RUNTIME>(stream, int(format), i), int(format));
    }
}
"""


# The step_math.cuh Pass of each pass name of fastopt.backends.cuda.rule_passes.
PASSES = {"step": "UPDATE", "norms": "NORMS", "apply": "APPLY"}


def shim_source():
    """SHIM with every rule of fastopt.rules.RULES included and instantiated, each pass of its step."""
    instances = "".join(f"INSTANTIATE({kernel})\n" + "".join(f"INSTANTIATE_PASS({kernel}, {name}, {PASSES[name]})\n"
                                                              for name in cuda.rule_passes(kernel))
                        for kernel in RULES)
    return (SHIM.replace("@RULE_HEADERS@", "".join(f'#include "rules/{kernel}.cuh"\n' for kernel in RULES))
            .replace("@RULE_INSTANCES@", instances))


BLOCK_ARGUMENTS = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_double,
                   ctypes.c_longlong, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong,
                   ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_void_p]
ADVANCE_ARGUMENTS = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_longlong,
                     ctypes.c_double, ctypes.c_void_p, ctypes.c_void_p]
CTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
PLAIN_CONTROL = np.array([1.0, 1.0, 0.0])  # grad_control without loss scale, clipping or skip


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


# Per session: tests/test_cuda.py's tests run in more than one group (tests/conftest.py), a worker may come back to it.
@pytest.fixture(scope="session")
def shim(tmp_path_factory):
    defines = [f"-D{name}={value}" for name, value in cuda.compile_defines().items()]
    loaded = build_host_library(tmp_path_factory, "cuda_host_math", shim_source(), defines)
    loaded.host_schedule_value.restype = ctypes.c_double
    loaded.host_schedule_value.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_longlong]
    for kernel in RULES:
        for ctype in list(CTYPES.values()) + ["float_8bit", "float_8bit_mixed"]:
            for name in cuda.rule_passes(kernel):
                function = getattr(loaded, f"{kernel}_{name}_block_{ctype}")
                function.restype = None
                function.argtypes = BLOCK_ARGUMENTS
        getattr(loaded, f"{kernel}_advance_tensor").restype = None
        getattr(loaded, f"{kernel}_advance_tensor").argtypes = ADVANCE_ARGUMENTS
    for ctype, weight in (("float", ctypes.c_float), ("double", ctypes.c_double)):
        getattr(loaded, f"host_blend_block_{ctype}").restype = None
        getattr(loaded, f"host_blend_block_{ctype}").argtypes = [ctypes.c_void_p, ctypes.c_void_p] + \
            [ctypes.c_longlong] * 3 + [weight]
    loaded.host_tensor_norm_sums.restype = None
    loaded.host_tensor_norm_sums.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_void_p]
    loaded.host_set_grad_control.restype = None
    loaded.host_set_grad_control.argtypes = [ctypes.c_double, ctypes.c_longlong, ctypes.c_double, ctypes.c_double,
                                             ctypes.c_longlong, ctypes.c_void_p, ctypes.c_void_p]
    for name in ("host_widen_float", "host_widen_double"):
        getattr(loaded, name).restype = None
        getattr(loaded, name).argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_void_p]
    for name in ("host_quantize", "host_dequantize", "host_encode"):
        getattr(loaded, name).restype = None
    loaded.host_quantize.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_void_p,
                                     ctypes.c_void_p]
    loaded.host_dequantize.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong,
                                       ctypes.c_void_p]
    loaded.host_encode.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_void_p]
    loaded.host_encode_stochastic.restype = loaded.host_stochastic_noise.restype = None
    loaded.host_encode_stochastic.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_void_p,
                                              ctypes.c_void_p]
    loaded.host_stochastic_noise.argtypes = [ctypes.c_longlong] * 5 + [ctypes.c_void_p]
    loaded.host_store_float.restype = None
    loaded.host_store_float.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_void_p] + \
        [ctypes.c_longlong] * 4
    return loaded


def host_schedule_values(shim, program, base, steps):
    program = np.ascontiguousarray(program, dtype=np.float64)
    return np.array([shim.host_schedule_value(program.ctypes.data, program.size, base, int(step)) for step in steps])


def pointer(array):
    return None if array is None else array.ctypes.data


def address_row(param, grad, lr_scale=None, states=(), master=None):
    """A tensor's row of the address table (kernels/cpu/layout.py's slots; 0: absent) from host arrays."""
    row = np.zeros(kernel_layout.SLOTS, dtype=np.int64)
    row[kernel_layout.PARAM], row[kernel_layout.GRAD] = param.ctypes.data, grad.ctypes.data
    row[kernel_layout.LR_SCALE] = 0 if lr_scale is None else lr_scale.ctypes.data
    for slot, state in enumerate(states):
        row[kernel_layout.STATE0 + slot] = 0 if state is None else state.ctypes.data
    row[kernel_layout.MASTER] = 0 if master is None else master.ctypes.data
    return row


def group_row(cls, **kwargs):
    """The group table's row (generic columns, then the rule's) of one group of ``cls`` with ``kwargs``, as the host
    builds it."""
    return GroupTable(cls, [dict(cls.DEFAULTS, **kwargs)]).group_hyper[0]


def run_block(shim, kernel, dtype, row, size, hyper, program, *, kernel_pass="step", formats=(0, 0, 0), start=0,
              base=0, optimizer_step=0, lr_factor=1.0, tensor_step=0, scalars=None, control=PLAIN_CONTROL, seed=0,
              tensor=0, chunk_norms=None):
    """One block of the pass ``kernel_pass`` (cuda.rule_passes) of the step of the rule ``kernel`` (a ``KERNEL``
    name, e.g. "adam") on elements [start, start + size) of the tensor whose address row is ``row`` and whose group's
    row is ``hyper``, through the shim; the tensor's step count and running scalars (None: zeros) are those before the
    step. The APPLY pass reads the tensor's sums of squares ``chunk_norms`` (NORM_SUMS values: the tensor is one chunk
    here). Returns the per-thread sums of squares of a NORMS pass ([BLOCK, NORM_SUMS])."""
    formats = np.asarray(formats, dtype=np.int64)
    control = np.ascontiguousarray(control, dtype=np.float64)
    program = np.ascontiguousarray(program, dtype=np.float64)
    hyper = np.ascontiguousarray(hyper, dtype=np.float64)
    scalars = np.zeros(kernel_layout.TENSOR_SCALARS) if scalars is None else np.ascontiguousarray(scalars, np.float64)
    chunk_norms = np.zeros(kernel_layout.NORM_SUMS) if chunk_norms is None else np.ascontiguousarray(chunk_norms,
                                                                                                    np.float64)
    thread_sums = np.zeros((cuda.BLOCK, kernel_layout.NORM_SUMS))
    getattr(shim, f"{kernel}_{kernel_pass}_block_{CTYPES[np.dtype(dtype)]}")(
        pointer(row), pointer(formats), start, size, pointer(hyper), pointer(program), program.size, base,
        optimizer_step, lr_factor, tensor_step, pointer(scalars), pointer(control), seed, tensor, pointer(chunk_norms),
        0, 1, pointer(thread_sums))  # the tensor's one chunk
    return thread_sums


def block_tree_sum(values):
    """The sum over a block of per-thread values (axis 0: BLOCK rows) in block_sum.cuh's fixed tree: at each level,
    thread t adds the value of thread t + half."""
    values = np.asarray(values, dtype=np.float64)
    half = values.shape[0] // 2
    while half:
        values = values[:half] + values[half:2 * half]
        half //= 2
    return values[0]


def block_strided_sum(values):
    """What a block adds up over ``values`` (axis 0): thread t adds values t, t + BLOCK, ... in turn, then block_sum's
    tree adds the threads' shares."""
    shares = np.zeros((cuda.BLOCK,) + np.shape(values)[1:])
    for index, value in enumerate(values):
        shares[index % cuda.BLOCK] += value
    return block_tree_sum(shares)


def advance_tensor(shim, kernel, hyper, program, optimizer_step, tensor_steps, scalars, index, lr_factor=1.0, base=0):
    """The last block's update of tensor ``index`` (fused.cu: advance_step_counts), in place: its step count in
    ``tensor_steps`` (int64) and its running scalars, row ``index`` of ``scalars`` (float64)."""
    program = np.ascontiguousarray(program, dtype=np.float64)
    hyper = np.ascontiguousarray(hyper, dtype=np.float64)
    assert tensor_steps.dtype == np.int64 and scalars.dtype == np.float64 and scalars.flags.c_contiguous
    getattr(shim, f"{kernel}_advance_tensor")(pointer(hyper), pointer(program), program.size, base, optimizer_step,
                                              lr_factor, tensor_steps.ctypes.data + 8 * index,
                                              scalars[index].ctypes.data)


# ---------------------------------------------------------------- optimizers
def initial_states(cls, group, param):
    """The state buffers of ``param`` as the engines start them (None: a slot the group does not use)."""
    used = cls.state_names(group)
    states = []
    for name in cls.STATE_SLOTS:
        initial = cls.initial_state(name, group)
        states.append(None if name not in used else param.copy() if initial is PARAM_VALUE else
                      np.full_like(param, initial))
    return states


def run_shim(shim, cls, kwargs, params0, params1, scales1, grads, schedule, lrs1, norm_sums=None):
    """The steps of tests/test_optimizers.py's problem, each tensor updated by the shim as the fused kernel updates
    it (each tensor one chunk): group 0 follows ``schedule``, group 1 has the float lr ``lrs1[t]`` (a constant
    schedule) and lr_scale. A rule with per-tensor norms takes its NORMS pass, then its APPLY pass with the sums the
    NORMS pass found, or ``norm_sums[t][index]`` where given. Returns the params, the states by name, the running
    scalars and the NORMS pass's sums of squares [step, tensor, NORM_SUMS] (zeros for a one-pass rule)."""
    params = [p.copy() for p in params0 + params1]
    dtype = params[0].dtype
    group = dict(cls.DEFAULTS, **kwargs)
    states = [initial_states(cls, group, param) for param in params]  # absent slots: address 0, as in the engines
    scales = [None] * len(params0) + list(scales1)
    hyper = group_row(cls, **kwargs)
    passes = cuda.rule_passes(cls.KERNEL)
    tensor_steps = np.zeros(len(params), dtype=np.int64)
    scalars = np.zeros((len(params), kernel_layout.TENSOR_SCALARS))
    sums = np.zeros((STEPS, len(params), kernel_layout.NORM_SUMS))
    for t in range(STEPS):
        for index, (param, grad) in enumerate(zip(params, grads[t])):
            program = schedule.program() if index < len(params0) else S.constant(lrs1[t]).program()
            row = address_row(param, grad, scales[index], states[index])
            before = dict(optimizer_step=t, tensor_step=int(tensor_steps[index]), scalars=scalars[index].copy())
            if passes == ("step",):
                run_block(shim, cls.KERNEL, dtype, row, param.size, hyper, program, **before)
            else:
                sums[t, index] = block_tree_sum(run_block(shim, cls.KERNEL, dtype, row, param.size, hyper, program,
                                                          kernel_pass="norms", **before))
                run_block(shim, cls.KERNEL, dtype, row, param.size, hyper, program, kernel_pass="apply",
                          chunk_norms=sums[t, index] if norm_sums is None else norm_sums[t][index], **before)
            advance_tensor(shim, cls.KERNEL, hyper, program, t, tensor_steps, scalars, index)
    named = [{name: buffer for name, buffer in zip(cls.STATE_SLOTS, buffers) if buffer is not None}
             for buffers in states]
    return params, named, scalars, sums


def cpu_norm_sums(optimizer):
    """Each param's sums of squares (param, direction) in the CPU kernels' last NORMS pass: the per-chunk sums of its
    bucket's workspace added in chunk order, as kernels/cpu/fused.rule_step adds them."""
    sums = np.zeros((sum(len(group["params"]) for group in optimizer.param_groups), kernel_layout.NORM_SUMS))
    for bucket in optimizer._backend.buckets:
        for chunk, position in enumerate(bucket.chunk_tensor):
            sums[bucket.indices[position]] += bucket.chunk_norms[chunk]
    return sums


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cls,kwargs", CONFIGS, ids=CONFIG_IDS)
def test_element_math_matches_reference_and_cpu_kernels(shim, cls, kwargs, dtype, rng):
    params0, params1, scales1, grads = make_problem(dtype, rng)
    schedule = lr_schedule(cls, fo.schedules.cosine(0.05, t_max=4, eta_min=0.001))
    lrs1 = [0.02, 0.02, 0.005, 0.04, 0.0, 0.01]
    expected_params, expected_states = run_reference(cls, kwargs, params0, params1, scales1, grads, schedule, lrs1)
    got_params, got_states, got_scalars, got_sums = run_shim(shim, cls, kwargs, params0, params1, scales1, grads,
                                                             schedule, lrs1)

    rtol = tolerance(dtype, STEPS)
    for index, param in enumerate(got_params):
        assert_close(param, expected_params[index], rtol, f"param {index}")
        for name, value in expected_states[index].items():
            if name in got_states[index]:
                assert_close(got_states[index][name], value, rtol, f"param {index} state {name}")
            elif name in cls.SCALARS:
                assert_close(got_scalars[index, cls.SCALARS.index(name)], value, rtol, f"param {index} {name}")

    # The CPU kernels on the same problem: identical bits (a rule with per-tensor norms: its sums to rounding).
    cpu_params = [p.copy() for p in params0 + params1]
    groups = [{"params": cpu_params[:len(params0)], "lr": schedule},
              {"params": cpu_params[len(params0):], "lr": lrs1[0], "lr_scale": scales1}]
    optimizer = cls(groups, backend="cpu", **kwargs)
    cpu_sums = []
    for t in range(STEPS):
        optimizer.param_groups[1]["lr"] = lrs1[t]
        optimizer.step(grads[t])
        cpu_sums.append(cpu_norm_sums(optimizer))
    if cuda.rule_passes(cls.KERNEL) != ("step",):
        # The APPLY pass given the CPU's sums: the params stay the CPU's bit for bit, so the NORMS pass's sums differ
        # from the CPU's by the order of the additions only: two sums of n nonnegative terms, each within (n - 1) eps
        # of the exact sum.
        got_params, got_states, got_scalars, got_sums = run_shim(shim, cls, kwargs, params0, params1, scales1, grads,
                                                                 schedule, lrs1, norm_sums=cpu_sums)
        sizes = np.array([param.size for param in cpu_params])
        bound = 2 * np.maximum(sizes - 1, 0)[:, None] * np.finfo(np.float64).eps * np.array(cpu_sums)
        assert np.all(np.abs(got_sums - np.array(cpu_sums)) <= bound), "sums of squares: shim vs CPU"
    for index, (ours, theirs) in enumerate(zip(got_params, cpu_params)):
        np.testing.assert_array_equal(ours, theirs, err_msg=f"param {index}: host build of the CUDA math vs CPU")
        assert set(got_states[index]) == set(optimizer.state[index]), f"param {index}: state buffers"
        for name, buffer in optimizer.state[index].items():
            np.testing.assert_array_equal(got_states[index][name], buffer, err_msg=f"param {index} state {name}")
    np.testing.assert_array_equal(got_scalars, optimizer._backend.tensor_scalars(), err_msg="running scalars")


@pytest.mark.parametrize("first,end", [(0, 0), (0, 1), (3, 200), (0, 1000), (7, 777)])
def test_apply_pass_adds_a_tensors_chunk_sums_in_a_fixed_order(shim, first, end, rng):
    """The APPLY pass's totals of a tensor's chunk sums (more chunks than threads too): each thread's stride, then the
    tree, the same bits in every block; within double rounding of the exact sums."""
    chunk_norms = np.ascontiguousarray(rng.uniform(0.0, 1e3, (1000, kernel_layout.NORM_SUMS)) ** 3)
    got = np.zeros(kernel_layout.NORM_SUMS)
    shim.host_tensor_norm_sums(pointer(chunk_norms), first, end, pointer(got))
    np.testing.assert_array_equal(got, block_strided_sum(chunk_norms[first:end]))
    exact = [math.fsum(column) for column in chunk_norms[first:end].T]
    assert np.all(np.abs(got - exact) <= max(end - first - 1, 0) * np.finfo(np.float64).eps * np.array(exact))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lr_factor_scales_the_rate(shim, dtype):
    """The divergence guard's back-off multiplies the scheduled lr before the coefficients are formed."""
    param, grad = np.zeros(3, dtype), np.ones(3, dtype)
    run_block(shim, "sgd", dtype, address_row(param, grad), param.size, group_row(fo.SGD), S.constant(0.5).program(),
              lr_factor=0.25)
    np.testing.assert_array_equal(param, -0.125)


def test_nan_and_inf_propagate_like_torch(shim):
    """No fast math in the element math: a NaN or inf gradient gives a NaN param, as on the CPU."""
    param = np.zeros(4, np.float32)
    grad = np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)
    states = [np.zeros(4, np.float32) for _ in range(3)]
    run_block(shim, "adam", np.float32, address_row(param, grad, None, states), 4, group_row(fo.Adam),
              S.constant(0.1).program())
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


# ---------------------------------------------------------------- storage formats and grad control
def test_widening_matches_the_cpu_kernels(shim):
    """storage.cuh's load and widen against the Numba kernels' widen_bits / widen_float: every 16-bit pattern in
    each 16-bit format, float32 values (NaN included) as they are and as float32 grads under double math."""
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    for storage_format in (kernel_layout.BFLOAT16, kernel_layout.BFLOAT16_STOCHASTIC, kernel_layout.FLOAT16):
        ours, theirs = np.empty(patterns.size, np.float32), np.empty(patterns.size, np.float32)
        shim.host_widen_float(pointer(patterns), storage_format, patterns.size, pointer(ours))
        conversions.widen_bits(patterns, storage_format, theirs)
        np.testing.assert_array_equal(ours.view(np.uint32), theirs.view(np.uint32), err_msg=str(storage_format))
    singles = np.random.default_rng(5).integers(0, 1 << 32, 1 << 16, dtype=np.uint64).astype(np.uint32).view(np.float32)
    ours = np.empty(singles.size, np.float32)
    shim.host_widen_float(pointer(singles), kernel_layout.NATIVE, singles.size, pointer(ours))
    np.testing.assert_array_equal(ours.view(np.uint32), singles.view(np.uint32))
    widened, theirs = np.empty(singles.size, np.float64), np.empty(singles.size, np.float64)
    shim.host_widen_double(pointer(singles), kernel_layout.FLOAT32, singles.size, pointer(widened))
    conversions.widen_float(singles, theirs)
    np.testing.assert_array_equal(widened.view(np.uint64), theirs.view(np.uint64))


@pytest.mark.parametrize("seed,step,tensor,start", [(0, 0, 0, 0), (7, 3, 2, 4096), (2 ** 40 + 1, 10 ** 6, 5, 123)])
def test_stores_match_the_cpu_kernels(shim, seed, step, tensor, start):
    """storage.cuh's stores against the Numba kernels' narrow_bits, keyed as store_strip keys a param's chunk: to
    nearest even (bfloat16, float16) and stochastically, over every rounding case of test_cuda_conversions."""
    from test_cuda_conversions import float32_cases
    from test_conversions import bfloat16_values

    values = float32_cases(bfloat16_values)
    for storage_format in (kernel_layout.BFLOAT16, kernel_layout.FLOAT16, kernel_layout.BFLOAT16_STOCHASTIC):
        ours, theirs = np.empty(values.size, np.uint16), np.empty(values.size, np.uint16)
        shim.host_store_float(pointer(values), storage_format, values.size, pointer(ours), seed, step, tensor, start)
        conversions.narrow_bits(values, storage_format, theirs, seed, step, (tensor << 40) + start)
        np.testing.assert_array_equal(ours, theirs, err_msg=str(storage_format))
    native = np.empty(values.size, np.float32)
    shim.host_store_float(pointer(values), kernel_layout.NATIVE, values.size, pointer(native), seed, step, tensor, start)
    np.testing.assert_array_equal(native.view(np.uint32), values.view(np.uint32))


@pytest.mark.parametrize("sum_of_squares,nonfinite,unscale,max_norm,skip_nonfinite", [
    (1234.5, 0, float(np.float32(1 / 256)), 2.0, True),
    (1234.5, 0, 1.0, 1e9, True),
    (0.0, 0, 1.0, 1.0, True),
    (3e5, 0, 0.5, None, True),
    (np.inf, 3, 1.0, 2.0, True),
    (np.inf, 0, 1.0, 2.0, True),  # float64 grads whose norm overflows: clipped to 0, as clip_grad_norm_ does
    (np.nan, 1, 0.25, 2.0, True),
    (np.nan, 1, 0.25, 2.0, False),
])
def test_grad_control_matches_the_host(shim, sum_of_squares, nonfinite, unscale, max_norm, skip_nonfinite):
    """finish_grad_control's arithmetic (step_math.cuh: set_grad_control) against backends.GradControl, bit for
    bit: the norm of the unscaled grads, the clip factor (1 without clipping or with a NaN norm, 0 with an infinite one), the skip."""
    expected = GradControl(sum_of_squares, nonfinite, unscale, max_norm, skip_nonfinite)
    control, statistics = np.full(kernel_layout.GRAD_CONTROLS, 123.0), np.full(cuda.STATISTICS, 123.0)
    shim.host_set_grad_control(sum_of_squares, nonfinite, unscale, -1.0 if max_norm is None else max_norm,
                               skip_nonfinite, pointer(control), pointer(statistics))
    np.testing.assert_array_equal(control, expected.values)
    np.testing.assert_array_equal(statistics[cuda.STATISTIC_NORM], expected.norm)
    assert statistics[cuda.STATISTIC_NONFINITE] == expected.nonfinite


# ---------------------------------------------------------------- 8-bit states: codes.cuh against fastopt.quantization
def host_quantize(shim, values, signed):
    values = np.ascontiguousarray(values, dtype=np.float32)
    codes = np.full(values.size, 0xAA, np.uint8)  # not zeros: a code never written would show
    scales = np.full(quantization.block_count(values.size), 123.0, np.float32)
    shim.host_quantize(pointer(values), values.size, signed, pointer(codes), pointer(scales))
    return codes, scales


def host_dequantize(shim, codes, scales, signed):
    codes, scales = np.ascontiguousarray(codes, np.uint8), np.ascontiguousarray(scales, np.float32)
    values = np.empty(codes.size, np.float32)
    shim.host_dequantize(pointer(codes), pointer(scales), codes.size, signed, pointer(values))
    return values


def awkward_blocks(size, signed, rng):
    """fastopt.quantization's awkward cases, one block each, in a tensor of ``size`` elements of heavy-tailed moments
    (test_quantization.states): every map value and midpoint (ties) with one ulp either side under an absmax of 1; a
    marked block for each of NaN, inf and -inf; a zero block with -0.0s; a block of subnormals (a zero block too);
    one whose absmax is the smallest normal; one of scale near 3e38 (its reciprocal is subnormal)."""
    from test_quantization import awkward_values, states

    block = quantization.BLOCK
    values = states(size, signed, seed=size)
    moments = states(block, signed, seed=size + 1)
    ties = rng.choice(awkward_values(quantization.code_map_of(signed), rng), block - 1, replace=False)
    zeros = np.where(np.arange(block) % 3 == 0, -0.0, 0.0)
    subnormal = np.float32(2.0 ** -127) * rng.uniform(-1, 1, block)
    contents = [moments, np.append(ties, 1.0), np.where(np.arange(block) == 17, np.nan, moments),
                np.where(np.arange(block) == 0, np.inf, moments), np.where(np.arange(block) == 255, -np.inf, moments),
                zeros, subnormal, np.append(subnormal[:-1], 2.0 ** -126), rng.uniform(-3e38, 3e38, block)]
    for index, content in enumerate(contents):
        part = values[index * block:(index + 1) * block]
        part[...] = np.asarray(content, np.float32)[:part.size]
    return values if signed else np.where(np.isnan(values), values, np.abs(values)).astype(np.float32)


@pytest.mark.parametrize("signed", [True, False])
def test_every_code_decodes_as_the_reference(shim, signed):
    """All 256 codes in blocks of scales 1, a random one, 2^-120 (subnormal products, not flushed), 3e38, 0 and NaN
    (a marked block): one float32 product of the map's value, bit for bit."""
    scales = np.array([1.0, 0.7123, 2.0 ** -120, 3e38, 0.0, np.nan], np.float32)
    codes = np.tile(np.arange(256, dtype=np.uint8), scales.size)
    expected = quantization.dequantize(codes, scales, signed)
    np.testing.assert_array_equal(host_dequantize(shim, codes, scales, signed).view(np.uint32),
                                  expected.view(np.uint32))
    subnormal = (expected[512:768] != 0) & (np.abs(expected[512:768]) < 2.0 ** -126)
    assert np.count_nonzero(subnormal) > 10 and np.isnan(expected[-256:]).all()


@pytest.mark.parametrize("signed", [True, False])
def test_encode_is_the_reference_closed_form(shim, signed):
    """Every map value and midpoint with its neighbours, random magnitudes, the extremes, and every 4099th float32 in
    [-1, 1]: encode's codes are encode_float_codes'."""
    from test_quantization import awkward_values

    sweep = np.arange(0, 0x3F800001, 4099, dtype=np.uint32).view(np.float32)
    x = np.concatenate([awkward_values(quantization.code_map_of(signed), np.random.default_rng(1)), sweep, -sweep,
                        [np.nextafter(np.float32(1), np.float32(2))]]).astype(np.float32)
    codes = np.empty(x.size, np.uint8)
    shim.host_encode(pointer(x), x.size, signed, pointer(codes))
    np.testing.assert_array_equal(codes, quantization.encode_float_codes(x, signed))


@pytest.mark.parametrize("signed", [True, False])
def test_stochastic_encode_is_the_reference(shim, signed):
    """encode_stochastic over test_encode_is_the_reference's values with random noise, noise 0 and all ones, and every
    value below the smallest code against its 2^20 thresholds' ends: encode_float_codes(noise=)'s codes."""
    from test_quantization import awkward_values

    rng = np.random.default_rng(2)
    sweep = np.arange(0, 0x3F800001, 4099, dtype=np.uint32).view(np.float32)
    x = np.concatenate([awkward_values(quantization.code_map_of(signed), rng), sweep, -sweep,
                        [np.nextafter(np.float32(1), np.float32(2))]]).astype(np.float32)
    for noise in (rng.integers(0, 2 ** 32, x.size, dtype=np.uint32), np.zeros(x.size, np.uint32),
                  np.full(x.size, 2 ** 32 - 1, np.uint32), rng.integers(0, 2 ** 12, x.size, dtype=np.uint32)):
        codes = np.empty(x.size, np.uint8)
        shim.host_encode_stochastic(pointer(x), x.size, signed, pointer(noise), pointer(codes))
        np.testing.assert_array_equal(codes, quantization.encode_float_codes(x, signed, noise=noise))


@pytest.mark.parametrize("seed,step,slot,first_element", [(0, 0, 0, 0), (7, 3, 2, (2 << 40) + 4096)])
def test_stochastic_code_noise_is_the_reference_key(shim, seed, step, slot, first_element):
    """The random bits of a state slot's codes: fastopt.reference.code_noise of its blocks' keys
    (Layout.stochastic_code_key)."""
    from fastopt import reference
    from fastopt.backends.layout import Layout

    noise = np.empty(1000, np.uint32)
    shim.host_stochastic_noise(seed, step, slot, first_element, noise.size, pointer(noise))
    starts = (first_element & ((1 << 40) - 1)) + np.arange(0, 1000, quantization.BLOCK)
    keys = Layout.stochastic_code_key(slot, first_element >> 40, starts)
    np.testing.assert_array_equal(noise, reference.code_noise(seed, step, keys)[:1000])


@pytest.mark.parametrize("size", [1, 255, 256, 257, 509, 2311, 4099])
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_is_the_reference(shim, size, signed, rng):
    """A tensor block by block as the kernels encode it (absmax bits, scale, reciprocal, encode_in_block), at awkward
    sizes with a short last block, through awkward_blocks' ties, marked, zero and subnormal blocks: the reference's
    codes and scales bit for bit, and its decoded values."""
    values = awkward_blocks(size, signed, rng)
    codes, scales = host_quantize(shim, values, signed)
    expected_codes, expected_scales = quantization.quantize(values, signed)
    np.testing.assert_array_equal(codes, expected_codes)
    np.testing.assert_array_equal(scales.view(np.uint32), expected_scales.view(np.uint32))
    np.testing.assert_array_equal(host_dequantize(shim, codes, scales, signed).view(np.uint32),
                                  quantization.dequantize(expected_codes, expected_scales, signed).view(np.uint32))
    if size > 8 * quantization.BLOCK:  # every kind of block is there
        assert scales[1] == 1 and np.isnan(scales[2:5]).all() and scales[5] == scales[6] == 0
        assert scales[7] == 2.0 ** -126 and scales[8] > 2.0 ** 126 and not np.any(codes[2 * 256:7 * 256])
