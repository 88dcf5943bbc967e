"""The CUDA backend: fused CUDA kernels over CuPy arrays, one launch per math dtype per step.

The kernels are compiled at run time with NVRTC (through CuPy) and loaded as CuPy ``RawModule``s, cached per device
in the process and on disk per hash of every CUDA source, headers included (a ``-D`` option carries the headers'
hash), of the options and of the architecture (see :func:`load_module` for why not ``RawModule(code=...)``:
denormals). ``kernels/cuda/fused.cu`` (the step) is compiled once per rule (:func:`rule_options`: the rule's struct
and header, ``kernels/cuda/rules/<KERNEL>.cuh``), ``kernels/cuda/grad_control.cu`` and ``kernels/cuda/blend.cu`` (the
blend of schedule-free's ``train()``/``eval()``) once each. The constants the kernels
share with the CPU (schedule kind codes, table slots, group-table columns, every rule's columns, storage formats and
grad-control entries) are passed as ``-D`` options generated from ``fastopt.kernels.cpu.schedule_codes``, ``layout``
and ``fastopt.rules.RULES``: one source of truth for both backends.

Design (see ``kernels/cuda/fused.cu`` for the device side):

- **Many tensors, one launch.** The tensors of one math dtype (float32 for float32, bfloat16 and float16 params;
  float64) form a bucket with a device address table (param, grad, lr_scale, state and master addresses per
  tensor), a format table (how each tensor's param, grad and states are stored) and a chunk table (tensor, start,
  length); one block runs one chunk.
- **Mixed precision in registers.** CuPy has no bfloat16: bfloat16 arrays are ``uint16`` arrays of the bits
  (:meth:`CupyArrays.storage_name`). A chunk of a tensor with a 16-bit or float32-under-double stream widens it
  exactly after the load and rounds it at the store, element by element in registers (``kernels/cuda/storage.cuh``);
  a tensor stored in its math dtype runs the plain loop. The result is the CPU kernels' function, bit for bit
  (stochastic rounding included: the same counter-based hash, keyed alike). A bucket stored entirely in its math
  dtype launches kernels built without the mixed loop (``step_<type>``; else ``step_<type>_mixed``), so that
  float32 training keeps the registers and occupancy it had.
- **8-bit states** (``state_dtype="8bit"``, :mod:`fastopt.quantization`): a state's uint8 codes are in its state slot
  and its float32 block scales in its SCALES slot, and tensor_format's STATE_CODES says which states are 8-bit. A
  bucket with any launches ``<pass>_float_8bit`` (``_8bit_mixed`` for other storage formats): each chunk of an 8-bit
  tensor is updated block by block (256 elements; the codes decoded in registers, the rule's float32 math, the
  block's new absmax across its threads, the new codes and scale written once), bit for bit the CPU kernels' bytes.
  Chunks are multiples of the block (MIN_CHUNK is), so no block straddles two. Which states a rule keeps in 8 bits is
  compiled into its kernels (:func:`rule_codes`).
- **Step counts on the device.** Each bucket holds ``counters`` (the optimizer step, a ticket, the skipped steps),
  the tensors' step counts and their running scalars (a rule's ``SCALARS``: schedule-free's weight sum) in device
  memory; the kernel evaluates the schedule and bias corrections from them and its last block advances them. The host counts steps too (``Optimizer.step_count``) and re-uploads the device
  counter only when the two disagree (a loaded state dict, a step count set by hand), so a steady-state step makes
  no host-device synchronisation and no host-to-device copy.
- **Grad control on the device.** With a loss scale, clipping or a guard, :meth:`CudaBackend.grad_control` reads
  the grads once (``grad_stats``, per chunk) and a one-block kernel (``finish_grad_control``) adds the partial sums in
  a fixed order and writes the step's grad factors and skip flag to a fixed device buffer that the step kernels read:
  a step with non-finite grads is skipped on the device, without a host synchronisation (it is counted in the
  device's skipped-steps counter, and the device's step count does not advance). Only a guard reads the non-finite
  count on the host (a synchronisation, so a step with a guard cannot be captured in a graph).
- **Two passes for per-tensor norms.** A rule with per-tensor norms (LAMB: :func:`rule_passes`) steps in two
  launches per math dtype, ``norms_*`` (moments, and per-chunk sums of squares in ``chunk_norms``) then ``apply_*``
  (each tensor's chunk sums added in order, the trust ratio, the params): no host work between them, so both are
  captured in a graph like one launch.
- **Uploads only on change.** The engine is handed the optimizer's frozen ``Layout`` (its buffers) and ``GroupTable``
  (the groups' rows and packed schedules) with every call; only a new one (by identity) is compared, table by table,
  with what was last uploaded, and the grads' addresses and formats every step. A change is copied from pinned memory
  with ``cudaMemcpyAsync`` on the current stream (no synchronisation; the pinned buffer is kept until an event says
  the copy is done). Passing the same grad buffers every step (as CUDA-graph users must anyway) uploads nothing.
- **Streams and graphs.** Every launch and copy goes to CuPy's current stream, so ``with
  cupy.cuda.ExternalStream(ptr):`` (or ``Stream.from_external``) runs the step on a foreign stream. A step can be
  captured with ``Stream.begin_capture`` once one eager step has uploaded the tables: each replay advances the
  device step counts and so the schedule. A step that would need an upload while its stream is capturing raises
  instead of recording a copy from host memory that the replays would repeat. After replays (or steps the device
  skipped) the device holds the true step count (``device_step_count()``); the host's ``step_count`` counts the
  eager ``step`` calls until it asks the device (``state_dict``, ``current_lr``). Every buffer a captured step
  reads or writes is a fixed allocation (tables, counters, the grad control and its partial sums), so a captured
  step with a loss scale or clipping replays with the grads of the replay.

Importing this module does not import CuPy; :func:`gpu_available` never raises.
"""
import functools
import hashlib
import importlib
import json
import os
import tempfile
from collections import deque
from pathlib import Path

import numpy as np

from .. import dtypes, kernels, quantization
from ..kernels.cpu import layout as kernel_layout
from ..kernels.cpu import schedule_codes
from . import CLIP_EPSILON, _describe, is_gpu_array
from .layout import chunk_table, fill_tensor_tables, set_grads

SOURCE_DIR = (Path(kernels.__file__).parent / "cuda").resolve()
SOURCE = "fused.cu"  # the step kernels, compiled once per rule
GRAD_CONTROL_SOURCE = "grad_control.cu"  # the grad statistics and grad control, compiled once
BLEND_SOURCE = "blend.cu"  # the blend toward a state buffer (schedule-free's train()/eval()), compiled once

BLOCK = 256  # threads per block, every kernel
ILP = 4  # elements each thread loads before it computes and stores
# Elements per chunk (one block each): a power of two from MIN_CHUNK to MAX_CHUNK, the largest that still gives
# each multiprocessor BLOCKS_PER_MULTIPROCESSOR blocks. Small buckets get small chunks so every multiprocessor
# streams; large ones get large chunks so each block's set-up (its schedule and coefficients) is amortised. A multiple
# of CODE_BLOCK: an 8-bit state's block of 256 elements never straddles two chunks.
MIN_CHUNK = 1 << 11
MAX_CHUNK = 1 << 16
BLOCKS_PER_MULTIPROCESSOR = 16  # measured best for the GPT-2 list (bench/GPU_TUNING.md)

# Device counters of one bucket (layout.cuh): the optimizer's step count, the last-block ticket, and the launches
# that skipped the step (grad_control's SKIP set on the device).
OPTIMIZER_STEP, TICKET, SKIPPED_STEPS = 0, 1, 2
COUNTERS = 3

# What finish_grad_control writes beside the grad control: the norm of the unscaled grads, the non-finite count.
STATISTIC_NORM, STATISTIC_NONFINITE = 0, 1
STATISTICS = 2
# Where finish_grad_control takes the loss scale from: the host's 1 / scale, or a one-element device array.
SCALE_ON_HOST, SCALE_FLOAT32, SCALE_FLOAT64 = 0, 1, 2
SCALE_FORMATS = {np.dtype(np.float32): SCALE_FLOAT32, np.dtype(np.float64): SCALE_FLOAT64}

KERNEL_DTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
# The tensor_format columns of storage formats (a nonzero one needs a ``_mixed`` kernel); STATE_CODES needs ``_8bit``.
STORAGE_COLUMNS = [kernel_layout.PARAM_FORMAT, kernel_layout.GRAD_FORMAT, kernel_layout.STATE_FORMAT]

# The dtype of a CuPy array of each storage (CuPy has no bfloat16: its bits, as uint16).
STORAGE_DTYPES = {"float64": np.dtype(np.float64), "float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                  "bfloat16": np.dtype(np.uint16)}


# ---------------------------------------------------------------- compiling
def compile_defines():
    """The ``-D`` macros every CUDA source needs: the schedule kind codes (``FASTOPT_SCHEDULE_<NAME>``), the
    address slots (``FASTOPT_SLOT_<NAME>``), the table layouts of ``fastopt.kernels.cpu.layout`` (``FASTOPT_<NAME>``),
    for every rule of ``fastopt.rules.RULES`` the group-table index of each of its columns
    (``FASTOPT_<KERNEL>_<COLUMN>``), its group row's width (``FASTOPT_<KERNEL>_COLUMNS``) and the state slots it always
    uses and may use (``FASTOPT_<KERNEL>_ALWAYS_LIVE``, ``_OPTIONAL_LIVE``: bit k for slot k), the grad-control
    entries, the counters, the block size, ILP and the largest chunk. Every rule is defined in every compile, so one
    translation unit (the test shim) can include them all."""
    from ..rules import RULES  # here, not at the top: fastopt.rules imports the optimizer, which imports the engines

    defines = {f"FASTOPT_SCHEDULE_{name}": value for name, value in vars(schedule_codes).items()
               if name.isupper() and isinstance(value, int)}
    for slot in ("PARAM", "GRAD", "LR_SCALE", "STATE0", "STATE1", "STATE2", "MASTER", "SCALES0", "SCALES1", "SCALES2"):
        defines[f"FASTOPT_SLOT_{slot}"] = getattr(kernel_layout, slot)
    defines["FASTOPT_SLOTS"] = kernel_layout.SLOTS
    for name in ("NATIVE", "FLOAT32", "BFLOAT16", "FLOAT16", "BFLOAT16_STOCHASTIC"):
        defines[f"FASTOPT_FORMAT_{name}"] = getattr(kernel_layout, name)
    for name in ("PARAM_FORMAT", "GRAD_FORMAT", "STATE_FORMAT", "STATE_CODES", "FORMAT_COLUMNS", "CODES_8BIT",
                 "SIGNED_CODES", "STOCHASTIC_CODES", "CODE_BLOCK", "GRAD_UNSCALE", "GRAD_CLIP", "SKIP",
                 "GRAD_CONTROLS", "COUNTS_STEP", "LIVE_STATES", "MAXIMIZE", "GROUP_COLUMNS", "STATE_SLOTS",
                 "RULE_COEFFICIENTS", "COEFFICIENTS", "COEFFICIENT_GRAD_UNSCALE", "COEFFICIENT_GRAD_CLIP",
                 "TENSOR_SCALARS", "NORM_PARAM", "NORM_UPDATE", "NORM_SUMS"):
        defines[f"FASTOPT_{name}"] = getattr(kernel_layout, name)
    defines["FASTOPT_CODE_MANTISSA_BITS"] = quantization.MANTISSA_BITS
    for kernel, rule in RULES.items():
        prefix = f"FASTOPT_{kernel.upper()}"
        defines.update({f"{prefix}_{column.upper()}": index
                        for column, index in zip(rule.COLUMNS, rule.column_indices())})
        defines[f"{prefix}_COLUMNS"] = kernel_layout.GROUP_COLUMNS + len(rule.COLUMNS)
        defines[f"{prefix}_ALWAYS_LIVE"] = rule.slot_mask(set(rule.STATE_SLOTS) - set(rule.OPTIONAL_STATES))
        defines[f"{prefix}_OPTIONAL_LIVE"] = rule.slot_mask(rule.OPTIONAL_STATES)
        defines[f"{prefix}_CODES"] = rule_codes(rule)
    defines.update(FASTOPT_STATISTIC_NORM=STATISTIC_NORM, FASTOPT_STATISTIC_NONFINITE=STATISTIC_NONFINITE,
                   FASTOPT_STATISTICS=STATISTICS, FASTOPT_CLIP_EPSILON=repr(float(CLIP_EPSILON)),
                   FASTOPT_SCALE_ON_HOST=SCALE_ON_HOST, FASTOPT_SCALE_FLOAT32=SCALE_FLOAT32,
                   FASTOPT_SCALE_FLOAT64=SCALE_FLOAT64)
    defines.update(FASTOPT_COUNTER_OPTIMIZER_STEP=OPTIMIZER_STEP, FASTOPT_COUNTER_TICKET=TICKET,
                   FASTOPT_COUNTER_SKIPPED_STEPS=SKIPPED_STEPS, FASTOPT_COUNTERS=COUNTERS, FASTOPT_BLOCK=BLOCK,
                   FASTOPT_ILP=ILP, FASTOPT_MAX_CHUNK=MAX_CHUNK)
    return defines


def rule_codes(rule):
    """The STATE_CODES bits of a tensor of the rule ``rule`` (an optimizer class) whose states are stored in 8 bits,
    every state slot present: ``CODES_8BIT << k`` for each slot k that ``fastopt.quantization.STATE_SIGNED`` stores in
    8 bits, ``SIGNED_CODES << k`` for those on the signed map. The kernels are compiled with it (the 8-bit loop holds
    a state's codes or its floats as it says, and no element branches on it); a tensor's own STATE_CODES must be 0 or
    this, less the slots it lacks (``_DtypeBucket.check_codes``)."""
    codes = 0
    for slot, name in enumerate(rule.STATE_SLOTS):
        signed = quantization.STATE_SIGNED.get(name)
        if signed is not None:
            codes |= (kernel_layout.CODES_8BIT | (kernel_layout.SIGNED_CODES if signed else 0)) << slot
    return codes


@functools.lru_cache(maxsize=None)
def rule_has_norms(kernel):
    """Whether the step of the rule ``kernel`` is two passes with per-tensor norms between them (LAMB): the ``NORMS``
    constant of its Numba module, ``kernels/cpu/rules/<kernel>.py`` (absent: False), as the CPU backend reads it;
    fused.cu refuses to compile where its CUDA twin says otherwise."""
    module = importlib.import_module(f"{kernels.__name__}.cpu.rules.{kernel}")
    return bool(getattr(module, "NORMS", False))


def rule_passes(kernel):
    """The kernels of one step of the rule ``kernel``, launched in this order (``<pass>_<type>[_mixed]`` of fused.cu):
    ``("step",)``, or for a rule with per-tensor norms ``("norms", "apply")``."""
    return ("norms", "apply") if rule_has_norms(kernel) else ("step",)


def rule_options(kernel):
    """The options that make fused.cu the step of the rule ``kernel`` (a ``KERNEL`` name, e.g. "adam"): its struct
    ``fastopt::rules::<kernel>``, its header ``rules/<kernel>.cuh``, which fused.cu includes by name, and whether its
    step takes the two passes of per-tensor norms."""
    return (f"-DFASTOPT_RULE=fastopt::rules::{kernel}", f'-DFASTOPT_RULE_HEADER="rules/{kernel}.cuh"',
            f"-DFASTOPT_RULE_NORMS={int(rule_has_norms(kernel))}")


@functools.lru_cache(maxsize=None)
def source_hash():
    """SHA-256 (first 16 hex digits) of every ``.cu`` and ``.cuh`` file under ``kernels/cuda`` (the rules' headers
    included), with their paths."""
    digest = hashlib.sha256()
    for path in sorted(SOURCE_DIR.rglob("*.cu*")):
        digest.update(path.relative_to(SOURCE_DIR).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def compile_options():
    """NVRTC options for the CUDA sources (the architecture is added by the caller).

    ``--fmad=false``: no multiply-add contraction, so every operation rounds as in the Numba kernels and in the
    host build that tests/test_cuda_host_math.py checks (the kernels are memory-bound: contraction buys nothing).
    Division and square root stay IEEE (``--prec-div``, ``--prec-sqrt``) and denormals are kept (``--ftz=false``):
    the NVRTC defaults, spelled out (and why :func:`load_module` does not let CuPy add ``-ftz=true``). ``-I`` must
    be absolute for NVRTC. ``FASTOPT_SOURCE_HASH`` changes with any header, so a cache keyed on the source and the
    options (ours, or CuPy's) notices an edited header."""
    return ("--std=c++17", f"-I{SOURCE_DIR}", "--fmad=false", "--prec-div=true", "--prec-sqrt=true", "--ftz=false",
            *(f"-D{name}={value}" for name, value in compile_defines().items()),
            f"-DFASTOPT_SOURCE_HASH=0x{source_hash()}")


def cache_directory():
    """Where compiled kernels are kept between processes: ``$FASTOPT_CUDA_CACHE`` if set, else
    ``$XDG_CACHE_HOME/fastopt/cuda`` (``~/.cache/fastopt/cuda``)."""
    if os.environ.get("FASTOPT_CUDA_CACHE"):
        return Path(os.environ["FASTOPT_CUDA_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastopt" / "cuda"


_MODULES = {}  # (device id, cache key) -> cupy.RawModule
_FUNCTIONS = {}  # (device id, rule or source, kernel name) -> the kernel of fused.cu for the rule, or of a source


def load_module(cupy, source, name, options=()):
    """``source`` (CUDA C++ that may include the headers of kernels/cuda) compiled with :func:`compile_options` and
    ``options`` for the current device's architecture and loaded as a ``cupy.RawModule``; cached in this process per device and
    on disk per source, headers (their hash is in the options), options, architecture and CuPy/CUDA versions.

    Compiled with CuPy's NVRTC front end and loaded from the binary, not with ``RawModule(code=...)``: CuPy appends
    ``-ftz=true`` to every NVRTC compile it caches, and NVRTC honours the last ``--ftz``, so float32 kernels would
    flush denormals to zero, unlike the CPU kernels and torch's CUDA optimizers (checked on ``sm_90``: every
    ``add/mul/div/sqrt.f32`` became ``.ftz``)."""
    device = cupy.cuda.runtime.getDevice()
    architecture = cupy.cuda.Device(device).compute_capability  # "90" for sm_90
    options = (*compile_options(), *options)
    identity = json.dumps([source, options, architecture, cupy.__version__, cupy.cuda.runtime.runtimeGetVersion()])
    key = hashlib.sha256(identity.encode()).hexdigest()[:24]
    module = _MODULES.get((device, key))
    if module is not None:
        return module
    directory = cache_directory()
    cached = sorted(directory.glob(f"{name}-{key}.*")) if directory.is_dir() else []
    if cached:
        path = cached[0]
    else:
        from cupy.cuda import compiler

        result = compiler.compile_using_nvrtc(source, options, arch=architecture, filename=f"{name}.cu")
        binary = result[0] if isinstance(result, tuple) else result  # (binary, name mapping) since CuPy 10
        binary = binary.encode() if isinstance(binary, str) else bytes(binary)
        # NVRTC gives a cubin when it knows the architecture, else PTX for the driver to compile.
        suffix = "cubin" if binary.startswith(b"\x7fELF") else "ptx"
        path = directory / f"{name}-{key}.{suffix}"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=directory, delete=False) as partial:
                partial.write(binary)
            os.replace(partial.name, path)  # atomic: a concurrent process sees all of the file or none
        except OSError:  # an unwritable cache: compile again next process
            path = Path(tempfile.mkdtemp(prefix="fastopt-cuda-")) / path.name
            path.write_bytes(binary)
    module = _MODULES[device, key] = cupy.RawModule(path=str(path))
    return module


def kernel(cupy, name, rule=None, source=GRAD_CONTROL_SOURCE):
    """The kernel ``name`` for the current device: of fused.cu compiled for the rule ``rule`` (a ``KERNEL`` name), or
    with ``rule`` None of ``source``, a unit compiled once for every rule (grad_control.cu, blend.cu)."""
    device = cupy.cuda.runtime.getDevice()
    key = (device, rule or source, name)
    function = _FUNCTIONS.get(key)
    if function is None:
        if rule is None:
            module = load_module(cupy, (SOURCE_DIR / source).read_text(), Path(source).stem)
        else:
            module = load_module(cupy, (SOURCE_DIR / SOURCE).read_text(), f"{Path(SOURCE).stem}-{rule}",
                                 rule_options(rule))
        function = _FUNCTIONS[key] = module.get_function(name)
    return function


def gpu_available():
    """True when CuPy imports and sees a CUDA device. Never raises (no CuPy, no driver, no GPU: False)."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # ImportError, CUDARuntimeError (no driver or device), a broken CUDA install...
        return False


def _cupy():
    try:
        import cupy
    except ImportError as error:
        raise ImportError("the cuda backend needs CuPy: pip install cupy-cuda12x") from error
    return cupy


# ---------------------------------------------------------------- tables
def chunk_elements(total, multiprocessors):
    """Elements per chunk for a bucket of ``total`` elements (see MIN_CHUNK)."""
    chunk = MAX_CHUNK
    while chunk > MIN_CHUNK and total < chunk * multiprocessors * BLOCKS_PER_MULTIPROCESSOR:
        chunk //= 2
    return chunk


def _address(array):
    return array.data.ptr if array.size else 0


class CupyArrays:
    """Array handling for CuPy arrays on the current GPU (the GPU twin of ``HostArrays``)."""

    @staticmethod
    @functools.lru_cache(maxsize=None)  # called per tensor per step
    def storage_name(dtype):
        """How this engine stores values of ``dtype``: 'float64', 'float32', 'float16', or 'bfloat16' for ``uint16``
        (CuPy has no bfloat16 dtype: a bfloat16 array is a uint16 array of its bits, as a torch bfloat16 tensor
        viewed as ``torch.uint16`` reaches CuPy through DLPack); None otherwise."""
        dtype = np.dtype(dtype)
        for name, stored in STORAGE_DTYPES.items():
            if dtype == stored:
                return name
        return None

    @staticmethod
    def check_array(array, where, *, writable):
        """A contiguous ``cupy.ndarray`` on the current device (CuPy arrays have no read-only flag: ``writable``
        needs no check)."""
        cupy = _cupy()
        if not isinstance(array, cupy.ndarray):
            if isinstance(array, np.ndarray):
                raise TypeError(f"{where} is a NumPy array in host memory but this optimizer works on CuPy arrays "
                                "on the GPU; params, grads and lr_scale must be on one device (cupy.asarray(...) "
                                "copies an array to the GPU)")
            if is_gpu_array(array):
                raise TypeError(f"{where} is a GPU array of type {_describe(array)}, not a cupy.ndarray; "
                                "cupy.asarray(...) wraps it without a copy")
            raise TypeError(f"{where} must be a cupy.ndarray, got {_describe(array)}")
        device = cupy.cuda.runtime.getDevice()
        if array.device.id != device:
            raise ValueError(f"{where} is on GPU {array.device.id} but the current device is GPU {device}; params, "
                             "grads and lr_scale must all be on one device, and the optimizer steps on the current "
                             f"one (use `with cupy.cuda.Device({array.device.id}):`)")
        if not array.flags.c_contiguous:
            raise ValueError(f"{where} is not C-contiguous (strides {array.strides}); pass "
                             "cupy.ascontiguousarray(...) (and for a param keep that array: updates are in place)")

    @staticmethod
    def address(array):
        return array.data.ptr

    @staticmethod
    def storage_dtype(storage):
        """The dtype of this engine's buffers stored as ``storage`` (a storage name; bfloat16: uint16 bits)."""
        return np.dtype(STORAGE_DTYPES[storage])

    @staticmethod
    def allocate_buffer(shape, dtype, ordinal):
        """A zeroed buffer of ``shape`` and ``dtype`` on the current device (8-bit codes, block scales)."""
        return _cupy().zeros(shape, dtype=dtype)

    @staticmethod
    def allocate_state(param, ordinal, storage, value=0.0):
        """A buffer shaped like ``param`` on its device, stored as ``storage`` (a storage name; bfloat16 as uint16
        bits), holding ``value`` rounded to the storage (a rule's initial state: Adagrad's accumulator). Pass the value
        here rather than ``fill`` the buffer: a bfloat16 buffer's ``fill(0.5)`` would store the integer 0. (No
        staggering as on the host: device allocations are 512-byte aligned and GPU memory has no cache-set aliasing
        between equal-size buffers to avoid.)"""
        buffer = _cupy().zeros(param.shape, dtype=STORAGE_DTYPES[storage])
        if value != 0:
            buffer.fill(np.array(value, dtype=dtypes.numpy_dtype(storage)).view(STORAGE_DTYPES[storage])[()])
        return buffer

    @staticmethod
    def copy_widened(target, source):
        """``target[...] = source`` for the float32 master copy of a 16-bit param, on the device, exactly: a bfloat16's
        bits are the upper half of its float32's."""
        if source.dtype == STORAGE_DTYPES["bfloat16"]:
            target[...] = (source.astype(np.uint32) << 16).view(np.float32)
        else:
            target[...] = source.astype(np.float32)

    @staticmethod
    def to_numpy(buffer):
        """A NumPy copy of ``buffer``; bfloat16 (uint16 bits) as ``ml_dtypes.bfloat16``, as the CPU engine keeps it."""
        values = _cupy().asnumpy(buffer)
        if buffer.dtype == STORAGE_DTYPES["bfloat16"]:
            return values.view(dtypes.numpy_dtype("bfloat16"))
        return values

    @staticmethod
    def copy_from_numpy(buffer, values):
        """``buffer[...] = values`` from host values already in the buffer's storage dtype (``ml_dtypes.bfloat16``
        for a bfloat16 buffer: its bits are copied)."""
        values = np.asarray(values)
        if buffer.dtype == STORAGE_DTYPES["bfloat16"]:
            if values.dtype != buffer.dtype:
                values = values.astype(dtypes.numpy_dtype("bfloat16")).view(np.uint16)
        else:
            values = values.astype(buffer.dtype, copy=False)
        buffer.set(np.ascontiguousarray(values).reshape(buffer.shape))

    @staticmethod
    def all_finite_nonnegative(array):
        cupy = _cupy()
        return bool(cupy.all(cupy.isfinite(array)) & ~cupy.any(array < 0))


class DeviceGradControl:
    """One step's gradient handling decided on the device (the twin of ``backends.GradControl``): ``values`` is the
    device ``grad_control`` the step kernels read (1 / loss scale, clip factor, skip flag), ``norm`` a device scalar
    (0-d array) holding the global L2 norm of the unscaled grads, ``nonfinite`` the number of NaN/inf grad values
    (reading it synchronises). A skip the device decides (non-finite grads) is not ``skipped``: the step kernels skip
    and count it (``CudaBackend.device_skipped_steps``); ``skip()`` decides one on the host (the guard's), and then no
    kernel runs."""

    def __init__(self, values, statistics):
        self.values = values
        self.statistics = statistics
        self.norm = statistics[STATISTIC_NORM]
        self._skipped = False

    @property
    def nonfinite(self):
        return int(_cupy().asnumpy(self.statistics)[STATISTIC_NONFINITE])

    def skip(self):
        self._skipped = True

    @property
    def skipped(self):
        return self._skipped


class _DtypeBucket:
    """The tensors of one math dtype: host copies of their tables, the device tables one launch reads, and the device
    step counts."""

    def __init__(self, cupy, dtype, indices, params, multiprocessors):
        self.dtype = dtype
        self.ctype = KERNEL_DTYPES[dtype]
        self.indices = np.asarray(indices, dtype=np.int64)
        self.params = [params[i] for i in indices]
        count = len(indices)
        sizes = [param.size for param in self.params]
        self.chunk = chunk_elements(sum(sizes), multiprocessors)
        chunk_tensor, chunk_start, chunk_length = chunk_table(sizes, self.chunk)
        self.chunk_count = chunk_tensor.size
        # A launch with no chunks (all tensors empty) still needs one block: the last block advances the counts.
        self.grid = max(self.chunk_count, 1)
        self.addresses = np.zeros((count, kernel_layout.SLOTS), dtype=np.int64)
        self.tensor_format = np.zeros((count, kernel_layout.FORMAT_COLUMNS), dtype=np.int64)
        self.tensor_group = np.zeros(count, dtype=np.int64)
        self.grad_ends = np.zeros(count, dtype=np.int64)  # where each grad's memory ends (set_grads' overlap check)
        # What the device tables hold (None: not uploaded yet).
        self.uploaded_addresses = None
        self.uploaded_tensor_format = None
        self.uploaded_tensor_group = None
        self.device = {
            "addresses": cupy.zeros((count, kernel_layout.SLOTS), dtype=np.int64),
            "tensor_format": cupy.zeros((count, kernel_layout.FORMAT_COLUMNS), dtype=np.int64),
            "chunk_tensor": cupy.asarray(chunk_tensor),
            "chunk_start": cupy.asarray(chunk_start),
            "chunk_length": cupy.asarray(chunk_length),
            "tensor_group": cupy.zeros(count, dtype=np.int64),
            "tensor_step": cupy.zeros(count, dtype=np.int64),
            "tensor_scalars": cupy.zeros((count, kernel_layout.TENSOR_SCALARS), dtype=np.float64),
            # The per-chunk sums of squares of a rule with per-tensor norms (written by its NORMS pass); any other
            # rule's kernels take the pointer and never touch it.
            "chunk_norms": cupy.zeros((self.grid, kernel_layout.NORM_SUMS), dtype=np.float64),
            # Tensor t's chunks are [tensor_chunks[t], tensor_chunks[t + 1]) of the chunk table (in tensor order).
            "tensor_chunks": cupy.asarray(np.searchsorted(chunk_tensor, np.arange(count + 1)).astype(np.int64)),
            "tensor_weight": cupy.zeros(count, dtype=dtype),  # the blend's weights, in the math dtype
            "counters": cupy.zeros(COUNTERS, dtype=np.int64),
            # "chunk_sum_of_squares", "chunk_nonfinite": this bucket's part of the engine's per-chunk grad
            # statistics (set by CudaBackend; finish_grad_control reads them all).
        }

    def kernel_name(self, kernel_pass="step"):
        """The kernel of the pass ``kernel_pass`` (:func:`rule_passes`) for this bucket's formats as uploaded (fused.cu):
        ``_8bit`` where a tensor has states stored in 8 bits, the plain one unless a tensor is stored in another format
        than the math dtype, else ``_mixed`` (``_8bit_mixed`` with both)."""
        formats = self.uploaded_tensor_format
        if formats is None:
            return f"{kernel_pass}_{self.ctype}"
        mixed = bool(formats[:, STORAGE_COLUMNS].any())
        codes = bool(formats[:, kernel_layout.STATE_CODES].any())
        return f"{kernel_pass}_{self.ctype}" + ("_8bit" if codes else "") + ("_mixed" if mixed else "")

    def check_codes(self, layout):
        """ValueError unless each tensor's 8-bit states (STATE_CODES, as filled from ``layout``) are none, or those
        fused.cu is compiled for (:func:`rule_codes`, less the state slots the tensor lacks) under float math. Which
        of them round stochastically (STOCHASTIC_CODES) is read per tensor, at run time."""
        expected = rule_codes(layout.rule)
        stochastic = sum(kernel_layout.STOCHASTIC_CODES << slot for slot in range(kernel_layout.STATE_SLOTS))
        for position, index in enumerate(self.indices):
            codes = int(self.tensor_format[position, kernel_layout.STATE_CODES]) & ~stochastic
            present = sum((kernel_layout.CODES_8BIT | kernel_layout.SIGNED_CODES) << slot
                          for slot, buffer in enumerate(layout.states[index]) if buffer is not None)
            if codes and (self.ctype != "float" or codes != expected & present):
                raise ValueError(f"param {index} has 8-bit states {codes:#x} (STATE_CODES) under {self.dtype} math; "
                                 f"the CUDA kernels of {layout.rule.__name__} hold {expected & present:#x}, under "
                                 "float32 math only (fastopt.quantization.STATE_SIGNED)")


class CudaBackend(CupyArrays):
    """The engine of one optimizer on the current GPU, built for a ``Layout`` (its params, their groups and storage);
    ``step`` and ``grad_control`` are handed the current ``Layout`` (and ``GroupTable``) every call."""

    # grad_control takes the loss scale as a device array too (``scale=``), inverted on the device without a sync.
    takes_device_scale = True

    def __init__(self, layout):
        cupy = _cupy()
        self.cupy = cupy
        self.rule = layout.rule.KERNEL  # the rule fused.cu is compiled for
        self.passes = rule_passes(self.rule)  # the launches of one step, per math dtype
        self.tensor_count = len(layout.params)
        self.device_id = cupy.cuda.runtime.getDevice()
        multiprocessors = cupy.cuda.Device(self.device_id).attributes["MultiProcessorCount"]
        self.buckets = [_DtypeBucket(cupy, dtype, indices, layout.params, multiprocessors)
                        for dtype, indices in layout.indices_by_math_dtype().items()]
        # Per-chunk grad statistics of every bucket, one after the other: finish_grad_control adds them in order.
        self.chunk_count = sum(bucket.chunk_count for bucket in self.buckets)
        self.partial_sums = cupy.zeros(max(self.chunk_count, 1), dtype=np.float64)
        self.partial_nonfinite = cupy.zeros(max(self.chunk_count, 1), dtype=np.int64)
        offset = 0
        for bucket in self.buckets:
            bucket.device["chunk_sum_of_squares"] = self.partial_sums[offset:offset + bucket.chunk_count]
            bucket.device["chunk_nonfinite"] = self.partial_nonfinite[offset:offset + bucket.chunk_count]
            offset += bucket.chunk_count
        # The grad controls the step kernels read, fixed allocations (a captured step replays reading them): a plain
        # one (1, 1, no skip) for steps without gradient handling, and the one finish_grad_control writes; and the
        # norm and non-finite count it writes while a step is captured (eager steps get their own, see grad_control).
        plain = np.zeros(kernel_layout.GRAD_CONTROLS)
        plain[[kernel_layout.GRAD_UNSCALE, kernel_layout.GRAD_CLIP]] = 1.0
        self.plain_control = cupy.asarray(plain)
        self.control_values = cupy.asarray(plain)
        self.captured_statistics = cupy.zeros(STATISTICS, dtype=np.float64)
        # The Layout and GroupTable whose tables the device holds (None: none yet), and the device arrays of the group
        # table and the packed schedules.
        self.layout = None
        self.groups = None
        self.device = {}
        # The optimizer step count the device counters hold once the queued work is done, as far as the host knows
        # (None: never uploaded). Graph replays and device-skipped steps change the device's count without the host's
        # knowledge; that is fine, as the device is the source of truth while this value and the optimizer's
        # step_count agree.
        self.expected_step_count = None
        # (event, pinned buffers) of copies in flight: a buffer is released only once its copy has run.
        self.staging = deque()
        # The tables were zeroed and copied on the current stream; steps may run on another one (a non-blocking
        # stream does not wait for the others). A one-off wait here, never in a step, makes them ready for any.
        cupy.cuda.get_current_stream().synchronize()

    # ---------------------------------------------------------------- uploads
    def _flush(self, pending):
        """Copy each (device array, host array) of ``pending`` on the current stream, from pinned memory, without
        synchronising. Refused while the stream is being captured into a CUDA graph."""
        pending = [(target, values) for target, values in pending if values.size]
        if not pending:
            return
        cupy = self.cupy
        stream = cupy.cuda.get_current_stream()
        if stream.is_capturing():
            raise RuntimeError("this fastopt step must copy tables to the GPU (the first step, new grad buffers or "
                               "grad dtypes, a changed hyperparameter or learning rate, or a changed step count), "
                               "which cannot be captured in a CUDA graph: take one step before the capture, and "
                               "capture steps with the same grad buffers and hyperparameters (use a schedule for the "
                               "lr)")
        while self.staging and self.staging[0][0].done:
            self.staging.popleft()
        buffers = []
        for target, values in pending:
            # cupyx.empty_pinned, spelled out: page-locked, so the copy is asynchronous.
            staging = np.ndarray(values.shape, dtype=values.dtype,
                                 buffer=cupy.cuda.alloc_pinned_memory(values.nbytes))
            staging[...] = values
            target.data.copy_from_host_async(staging.ctypes.data, staging.nbytes, stream)
            buffers.append(staging)
        self.staging.append((stream.record(), buffers))

    def _device_array(self, name, values):
        """The device array ``name`` resized to ``values``'s shape if needed (its contents then uploaded anew)."""
        array = self.device.get(name)
        if array is None or array.shape != values.shape:
            array = self.device[name] = self.cupy.empty(values.shape, dtype=values.dtype)
        return array

    def _prepare(self, layout, groups, step_count=None):
        """Queue uploads of whatever the device lacks for a step with the grads ``bind_grads`` took under ``layout``
        and ``groups`` (None: no group table needed, as for the grad statistics). A Layout or GroupTable other than
        the one the device holds (by identity) is compared table by table with what was uploaded, and only what differs
        is copied; the grads' addresses are compared every step, their formats too (they change only when the grads'
        dtypes do). The device
        is known to hold ``layout`` and ``groups`` only once every copy is queued: a refused upload is tried again at
        the next step."""
        pending = []
        if groups is not None and groups is not self.groups:
            for name in ("group_hyper", "schedule_program", "schedule_base"):
                values = getattr(groups, name)
                previous = None if self.groups is None else getattr(self.groups, name)
                # A device array resized for an upload that was then refused holds nothing: its shape is not the
                # uploaded one's.
                array = self.device.get(name)
                if (array is None or array.shape != values.shape or previous is None
                        or not np.array_equal(previous, values)):
                    pending.append((self._device_array(name, values), values))
        for bucket in self.buckets:
            if layout is not self.layout:
                fill_tensor_tables(layout, bucket.indices, bucket.addresses, bucket.tensor_group, bucket.tensor_format,
                                   bucket.dtype, _address)
                bucket.check_codes(layout)
                if bucket.uploaded_tensor_group is None or not np.array_equal(bucket.uploaded_tensor_group,
                                                                              bucket.tensor_group):
                    pending.append((bucket.device["tensor_group"], bucket.tensor_group.copy()))
            if bucket.uploaded_addresses is None or not np.array_equal(bucket.uploaded_addresses, bucket.addresses):
                pending.append((bucket.device["addresses"], bucket.addresses.copy()))
            if (bucket.uploaded_tensor_format is None
                    or not np.array_equal(bucket.uploaded_tensor_format, bucket.tensor_format)):
                pending.append((bucket.device["tensor_format"], bucket.tensor_format.copy()))
        if step_count is not None and step_count != self.expected_step_count:
            # The step count only: the skipped-steps counter keeps counting, and the ticket is 0 between launches.
            count = np.array([step_count], dtype=np.int64)
            pending += [(bucket.device["counters"][OPTIMIZER_STEP:OPTIMIZER_STEP + 1], count)
                        for bucket in self.buckets]
        self._flush(pending)
        # Only now that every copy is queued do the host copies claim to match the device.
        self.layout = layout
        if groups is not None:
            self.groups = groups
        for bucket in self.buckets:
            bucket.uploaded_addresses = bucket.addresses.copy()
            bucket.uploaded_tensor_format = bucket.tensor_format.copy()
            bucket.uploaded_tensor_group = bucket.tensor_group.copy()

    # ---------------------------------------------------------------- the engine interface
    def bind_grads(self, layout, grads):
        """Take this step's grads (their addresses and formats) into the host tables that ``grad_control`` and
        ``step`` upload where they changed, after checking that none overlaps a buffer the step writes (ValueError:
        nothing is written)."""
        for bucket in self.buckets:
            set_grads(layout, bucket.addresses, bucket.grad_ends, bucket.tensor_format, bucket.indices, grads,
                      bucket.dtype, _address, self.storage_name)

    def grad_control(self, layout, grads, unscale, max_norm, skip_nonfinite=True, *, scale=None):
        """This step's :class:`DeviceGradControl`, decided on the device without a host synchronisation: one read of
        the grads (``grad_stats``: per-chunk sums of squares and non-finite counts, any storage format), then one
        block (``finish_grad_control``) that adds them up in a fixed order and writes the grad factors and the skip
        flag the step kernels read (backends.GradControl's arithmetic).

        ``unscale`` is 1 / the loss scale as a host float; or pass ``scale``, a one-element float32 or float64 CuPy
        array holding the loss scale itself (GradScaler's), which the device inverts and rounds to float32 as the
        host would (``unscale`` is then ignored), so that nothing synchronises and a captured step replays with the
        scale of the replay. ``max_norm``: the clipping threshold, None for none. ``skip_nonfinite`` False: NaN/inf
        grads do not skip the step (a guard that lets them through)."""
        cupy = self.cupy
        self._prepare(layout, None)
        scale_format = SCALE_ON_HOST
        scale_array = self.control_values  # any device pointer: not read
        if scale is not None:
            if not isinstance(scale, cupy.ndarray) or scale.size != 1 or scale.dtype not in SCALE_FORMATS:
                raise TypeError("a device loss scale must be a one-element float32 or float64 cupy.ndarray, got "
                                f"{_describe(scale)} of dtype {getattr(scale, 'dtype', None)}")
            self.check_array(scale, "grad_scale", writable=False)
            scale_format, scale_array = SCALE_FORMATS[scale.dtype], scale
        # The norm and count of an eager step in arrays of their own (a caller may keep last_grad_norm); a captured
        # step writes the fixed ones, as its replays will.
        capturing = cupy.cuda.get_current_stream().is_capturing()
        statistics = self.captured_statistics if capturing else cupy.empty(STATISTICS, dtype=np.float64)
        for bucket in self.buckets:
            if bucket.chunk_count == 0:
                continue
            device = bucket.device
            kernel(cupy, f"grad_stats_{bucket.ctype}")(
                (bucket.chunk_count,), (BLOCK,),
                (device["addresses"], device["tensor_format"], device["chunk_tensor"], device["chunk_start"],
                 device["chunk_length"], np.int64(bucket.chunk_count), device["chunk_sum_of_squares"],
                 device["chunk_nonfinite"]))
        kernel(cupy, "finish_grad_control")(
            (1,), (BLOCK,),
            (self.partial_sums, self.partial_nonfinite, np.int64(self.chunk_count), np.float64(unscale), scale_array,
             np.int64(scale_format), np.float64(-1.0 if max_norm is None else max_norm), np.int64(skip_nonfinite),
             self.control_values, statistics))
        return DeviceGradControl(self.control_values, statistics)

    def step(self, layout, groups, grads, step_count, lr_factor=1.0, control=None):
        """One launch per math dtype on the current stream (two for a rule with per-tensor norms: :func:`rule_passes`);
        no synchronisation, and no copy unless a table changed. ``control``: this step's :class:`DeviceGradControl`
        (None: the grads as they are); a step it skips on the device writes nothing and leaves the device's step
        counts and running scalars where they were. A skip decided on the host launches nothing."""
        if control is not None and control.skipped:
            return
        self._prepare(layout, groups, step_count)
        values = self.plain_control if control is None else control.values
        for bucket in self.buckets:
            device = bucket.device
            arguments = (device["addresses"], device["tensor_format"], device["chunk_tensor"], device["chunk_start"],
                         device["chunk_length"], np.int64(bucket.chunk_count), device["tensor_group"],
                         device["tensor_step"], device["tensor_scalars"], np.int64(bucket.indices.size),
                         self.device["group_hyper"], self.device["schedule_program"],
                         np.int64(groups.schedule_program.size), self.device["schedule_base"], device["counters"],
                         np.float64(lr_factor), values, device["chunk_norms"], device["tensor_chunks"],
                         np.int64(layout.seed))
            for kernel_pass in self.passes:
                kernel(self.cupy, bucket.kernel_name(kernel_pass), self.rule)((bucket.grid,), (BLOCK,), arguments)
        self.expected_step_count = step_count + 1

    def blend(self, layout, slot, weights):
        """``p = lerp(p, state, weights[i])`` for each param ``i`` that has a buffer in state slot ``slot``
        (kernels/cuda/blend.cu; Numba: blend_toward_state), through its master copy where it has one, rounded to
        nearest: one launch per math dtype on the current stream. ``weights``: per param, in float64, rounded to the
        math dtype; uploaded with each call (a blend is schedule-free's train()/eval(), not a step: it is not
        captured in graphs)."""
        self._prepare(layout, None)
        for bucket in self.buckets:
            if np.any(bucket.tensor_format[:, kernel_layout.STATE_CODES] >> slot & kernel_layout.CODES_8BIT):
                raise NotImplementedError(f"the blend toward state slot {slot} of an 8-bit state: blend.cu reads the "
                                          "state as floats (schedule-free's z is never 8-bit)")
        weights = np.asarray(weights, dtype=np.float64)
        self._flush([(bucket.device["tensor_weight"], weights[bucket.indices].astype(bucket.dtype))
                     for bucket in self.buckets])
        for bucket in self.buckets:
            if bucket.chunk_count == 0:
                continue
            device = bucket.device
            kernel(self.cupy, f"blend_{bucket.ctype}", source=BLEND_SOURCE)(
                (bucket.chunk_count,), (BLOCK,),
                (device["addresses"], device["tensor_format"], device["chunk_tensor"], device["chunk_start"],
                 device["chunk_length"], np.int64(bucket.chunk_count), np.int64(kernel_layout.STATE0 + slot),
                 device["tensor_weight"]))

    def tensor_steps(self):
        """Each param's step count, read from the device (synchronises)."""
        steps = np.zeros(self.tensor_count, dtype=np.int64)
        for bucket in self.buckets:
            steps[bucket.indices] = self.cupy.asnumpy(bucket.device["tensor_step"])
        return steps

    def set_tensor_steps(self, steps):
        """Upload each param's step count (after a load or an added group: a one-off, so it waits for the copy, which
        the next step may read from another stream)."""
        self._flush([(bucket.device["tensor_step"], np.ascontiguousarray(steps[bucket.indices], dtype=np.int64))
                     for bucket in self.buckets])
        self.cupy.cuda.get_current_stream().synchronize()

    def tensor_scalars(self):
        """Each param's running scalars (a rule's ``SCALARS``, then zeros), read from the device (synchronises)."""
        scalars = np.zeros((self.tensor_count, kernel_layout.TENSOR_SCALARS))
        for bucket in self.buckets:
            scalars[bucket.indices] = self.cupy.asnumpy(bucket.device["tensor_scalars"])
        return scalars

    def set_tensor_scalars(self, scalars):
        """Upload each param's running scalars (after a load or an added group, as set_tensor_steps)."""
        self._flush([(bucket.device["tensor_scalars"], np.ascontiguousarray(scalars[bucket.indices], dtype=np.float64))
                     for bucket in self.buckets])
        self.cupy.cuda.get_current_stream().synchronize()

    def sync_step_count(self, host_step_count):
        """The optimizer step count to report: the device's, which graph replays advance and device-skipped steps
        leave behind the host's back (synchronises), unless an upload of the host's own count is still due (after a
        load, or a count set by hand)."""
        if self.expected_step_count != host_step_count:
            return host_step_count
        self.expected_step_count = self.device_step_count()
        return self.expected_step_count

    def device_step_count(self):
        """The optimizer step count held on the device (synchronises): ``step_count`` plus any graph replays, less any
        step skipped on the device."""
        if not self.buckets:
            return 0
        return int(self.cupy.asnumpy(self.buckets[0].device["counters"])[OPTIMIZER_STEP])

    def device_skipped_steps(self):
        """Steps the device skipped for non-finite grads (synchronises); ``Optimizer.skipped_steps`` adds them to the
        host's count. Every bucket's launch counts the same steps: the first bucket's count is read."""
        if not self.buckets:
            return 0
        return int(self.cupy.asnumpy(self.buckets[0].device["counters"])[SKIPPED_STEPS])
