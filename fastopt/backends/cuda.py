"""The CUDA backend: fused CUDA kernels over CuPy arrays, one launch per param dtype per step.

The kernels (``kernels/cuda/fused.cu``) are compiled at run time with NVRTC (through CuPy) and loaded as a CuPy
``RawModule``, cached per device in the process and on disk per hash of every CUDA source, headers included (a
``-D`` option carries the headers' hash), of the options and of the architecture (see :func:`load_module` for why
not ``RawModule(code=...)``: denormals). The constants the kernels share with the CPU (schedule kind codes, table
slots and group-table columns) are passed as ``-D`` options generated from ``fastopt.kernels.cpu.schedule_codes``
and ``tables``: one source of truth for both backends.

Design (see ``kernels/cuda/fused.cu`` for the device side):

- **Many tensors, one launch.** The tensors of one dtype form a bucket with a device address table (param, grad,
  lr_scale and state addresses per tensor) and a chunk table (tensor, start, length); one block runs one chunk.
- **Step counts on the device.** Each bucket holds ``counters`` (the optimizer step and a ticket) and the tensors'
  step counts in device memory; the kernel evaluates the schedule and bias corrections from them and its last
  block advances them. The host counts steps too (``Optimizer.step_count``) and re-uploads the device counter
  only when the two disagree (a loaded state dict, a step count set by hand), so a steady-state step makes no
  host-device synchronisation and no host-to-device copy.
- **Uploads only on change.** The grads' addresses, the group table and the packed schedules are compared with
  what was last uploaded; a change is copied from pinned memory with ``cudaMemcpyAsync`` on the current stream
  (no synchronisation; the pinned buffer is kept until an event says the copy is done). Passing the same grad
  buffers every step (as CUDA-graph users must anyway) uploads nothing.
- **Streams and graphs.** Every launch and copy goes to CuPy's current stream, so ``with
  cupy.cuda.ExternalStream(ptr):`` (or ``Stream.from_external``) runs the step on a foreign stream. A step can be
  captured with ``Stream.begin_capture`` once one eager step has uploaded the tables: each replay advances the
  device step counts and so the schedule. A step that would need an upload while its stream is capturing raises
  instead of recording a copy from host memory that the replays would repeat. After replays the device holds the
  true step count (``device_step_count()``); the host's ``step_count`` counts only the eager ``step`` calls.

Importing this module does not import CuPy; :func:`gpu_available` never raises.
"""
import functools
import hashlib
import json
import os
import tempfile
from collections import deque
from pathlib import Path

import numpy as np

from .. import kernels
from ..kernels.cpu import schedule_codes, tables
from . import _describe, is_gpu_array
from .tables import chunk_table, fill_tensor_tables, group_tables, indices_by_dtype, set_grad_addresses

SOURCE_DIR = (Path(kernels.__file__).parent / "cuda").resolve()
SOURCE = "fused.cu"

BLOCK = 256  # threads per block, every kernel
ILP = 4  # elements each thread loads before it computes and stores
# Elements per chunk (one block each): a power of two from MIN_CHUNK to MAX_CHUNK, the largest that still gives
# each multiprocessor BLOCKS_PER_MULTIPROCESSOR blocks. Small buckets get small chunks so every multiprocessor
# streams; large ones get large chunks so each block's set-up (its schedule and coefficients) is amortised.
MIN_CHUNK = 1 << 11
MAX_CHUNK = 1 << 16
BLOCKS_PER_MULTIPROCESSOR = 8

# Device counters of one bucket (tables.cuh): the optimizer's step count and the last-block ticket.
OPTIMIZER_STEP, TICKET = 0, 1
COUNTERS = 2

KERNEL_DTYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}


# ---------------------------------------------------------------- compiling
def compile_defines():
    """The ``-D`` macros every CUDA source needs: the schedule kind codes (``FASTOPT_SCHEDULE_<NAME>``), the
    address slots (``FASTOPT_SLOT_<NAME>``), each group-table column's index (``FASTOPT_<OPTIMIZER>_<COLUMN>``) and
    width (``FASTOPT_<OPTIMIZER>_COLUMNS``), the counters, the block size, ILP and the largest chunk."""
    defines = {f"FASTOPT_SCHEDULE_{name}": value for name, value in vars(schedule_codes).items()
               if name.isupper() and isinstance(value, int)}
    for slot in ("PARAM", "GRAD", "LR_SCALE", "STATE0", "STATE1", "STATE2"):
        defines[f"FASTOPT_SLOT_{slot}"] = getattr(tables, slot)
    defines["FASTOPT_SLOTS"] = tables.SLOTS
    for optimizer, columns in (("SGD", tables.SGD_COLUMNS), ("RMSPROP", tables.RMSPROP_COLUMNS),
                               ("ADAM", tables.ADAM_COLUMNS)):
        defines.update({f"FASTOPT_{optimizer}_{column.upper()}": index for index, column in enumerate(columns)})
        defines[f"FASTOPT_{optimizer}_COLUMNS"] = len(columns)
    defines.update(FASTOPT_COUNTER_OPTIMIZER_STEP=OPTIMIZER_STEP, FASTOPT_COUNTER_TICKET=TICKET,
                   FASTOPT_COUNTERS=COUNTERS, FASTOPT_BLOCK=BLOCK, FASTOPT_ILP=ILP, FASTOPT_MAX_CHUNK=MAX_CHUNK)
    return defines


@functools.lru_cache(maxsize=None)
def source_hash():
    """SHA-256 (first 16 hex digits) of every ``.cu`` and ``.cuh`` file in ``kernels/cuda``, names included."""
    digest = hashlib.sha256()
    for path in sorted(SOURCE_DIR.glob("*.cu*")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
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
_FUNCTIONS = {}  # (device id, kernel name) -> the kernel of fused.cu


def load_module(cupy, source, name):
    """``source`` (CUDA C++ that may include the headers of kernels/cuda) compiled with :func:`compile_options` for
    the current device's architecture and loaded as a ``cupy.RawModule``; cached in this process per device and
    on disk per source, headers (their hash is in the options), options, architecture and CuPy/CUDA versions.

    Compiled with CuPy's NVRTC front end and loaded from the binary, not with ``RawModule(code=...)``: CuPy appends
    ``-ftz=true`` to every NVRTC compile it caches, and NVRTC honours the last ``--ftz``, so float32 kernels would
    flush denormals to zero, unlike the CPU kernels and torch's CUDA optimizers (checked on ``sm_90``: every
    ``add/mul/div/sqrt.f32`` became ``.ftz``)."""
    device = cupy.cuda.runtime.getDevice()
    architecture = cupy.cuda.Device(device).compute_capability  # "90" for sm_90
    options = compile_options()
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


def kernel(cupy, name):
    """The kernel ``name`` of fused.cu for the current device."""
    device = cupy.cuda.runtime.getDevice()
    function = _FUNCTIONS.get((device, name))
    if function is None:
        module = load_module(cupy, (SOURCE_DIR / SOURCE).read_text(), Path(SOURCE).stem)
        function = _FUNCTIONS[device, name] = module.get_function(name)
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
        raise ImportError("the cuda backend needs CuPy: pip install cupy-cuda12x (or fastopt[cupy])") from error
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
    def allocate_state(param, ordinal):
        """A zeroed buffer shaped like ``param`` on its device. (No staggering as on the host: device allocations
        are 512-byte aligned and GPU memory has no cache-set aliasing between equal-size buffers to avoid.)"""
        return _cupy().zeros_like(param)

    @staticmethod
    def to_numpy(buffer):
        return _cupy().asnumpy(buffer)

    @staticmethod
    def copy_from_numpy(buffer, values):
        buffer.set(np.ascontiguousarray(values, dtype=buffer.dtype).reshape(buffer.shape))

    @staticmethod
    def all_finite_nonnegative(array):
        cupy = _cupy()
        return bool(cupy.all(cupy.isfinite(array)) & ~cupy.any(array < 0))


class _DtypeBucket:
    """The tensors of one dtype: host copies of their tables, the device tables one launch reads, and the device
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
        self.addresses = np.zeros((count, tables.SLOTS), dtype=np.int64)
        self.tensor_group = np.zeros(count, dtype=np.int64)
        # What the device tables hold (None: not uploaded yet).
        self.uploaded_addresses = None
        self.uploaded_tensor_group = None
        self.device = {
            "addresses": cupy.zeros((count, tables.SLOTS), dtype=np.int64),
            "chunk_tensor": cupy.asarray(chunk_tensor),
            "chunk_start": cupy.asarray(chunk_start),
            "chunk_length": cupy.asarray(chunk_length),
            "tensor_group": cupy.zeros(count, dtype=np.int64),
            "tensor_step": cupy.zeros(count, dtype=np.int64),
            "counters": cupy.zeros(COUNTERS, dtype=np.int64),
            "chunk_sum_of_squares": cupy.zeros(self.grid, dtype=np.float64),
            "chunk_nonfinite": cupy.zeros(self.grid, dtype=np.int64),
        }


class CudaBackend(CupyArrays):
    def __init__(self, optimizer):
        cupy = _cupy()
        self.cupy = cupy
        self.optimizer = optimizer
        self.device_id = cupy.cuda.runtime.getDevice()
        multiprocessors = cupy.cuda.Device(self.device_id).attributes["MultiProcessorCount"]
        self.buckets = [_DtypeBucket(cupy, dtype, indices, optimizer._params, multiprocessors)
                        for dtype, indices in indices_by_dtype(optimizer._params).items()]
        # Per optimizer: the group table and the packed schedules, host copies as last uploaded and device arrays.
        self.group_hyper = None
        self.schedule_program = None
        self.schedule_base = None
        self.staged_group_tables = None
        self.layout_version = None
        self.device = {}
        # The optimizer step count the device counters hold once the queued work is done, as far as the host knows
        # (None: never uploaded). Graph replays advance the device without the host's knowledge; that is fine, as
        # the device is the source of truth while this value and the optimizer's step_count agree.
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
            raise RuntimeError("this fastopt step must copy tables to the GPU (the first step, new grad buffers, a "
                               "changed hyperparameter or learning rate, or a changed step count), which cannot be "
                               "captured in a CUDA graph: take one step before the capture, and capture steps "
                               "with the same grad buffers and hyperparameters (use a schedule for the lr)")
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

    def _refresh_tables(self, pending, groups_changed):
        """Bring the host tables up to date as the CPU engine does (group table and schedules when a group
        changed, addresses when the optimizer's buffers did); queue uploads of whatever differs from the device."""
        optimizer = self.optimizer
        if groups_changed or self.group_hyper is None:
            group_hyper, schedule_program, schedule_base = group_tables(optimizer)
            for name, values, previous in (("group_hyper", group_hyper, self.group_hyper),
                                           ("schedule_program", schedule_program, self.schedule_program),
                                           ("schedule_base", schedule_base, self.schedule_base)):
                if previous is None or previous.shape != values.shape or not np.array_equal(previous, values):
                    pending.append((self._device_array(name, values), values))
            # The host copies are replaced once the uploads are queued (_prepare): a refused upload must be
            # tried again at the next step.
            self.staged_group_tables = group_hyper, schedule_program, schedule_base
        if self.layout_version != optimizer._layout_version:
            for bucket in self.buckets:
                fill_tensor_tables(optimizer, bucket.indices, bucket.addresses, bucket.tensor_group, _address)
                if bucket.uploaded_tensor_group is None or not np.array_equal(bucket.uploaded_tensor_group,
                                                                              bucket.tensor_group):
                    pending.append((bucket.device["tensor_group"], bucket.tensor_group.copy()))
            self.layout_version = optimizer._layout_version

    def _prepare(self, grads, groups_changed, step_count=None):
        """Bring every device table up to date for a step with ``grads`` (uploads only what changed)."""
        pending = []
        self._refresh_tables(pending, groups_changed)
        for bucket in self.buckets:
            set_grad_addresses(bucket.addresses, bucket.indices, grads, _address)
            if bucket.uploaded_addresses is None or not np.array_equal(bucket.uploaded_addresses, bucket.addresses):
                pending.append((bucket.device["addresses"], bucket.addresses.copy()))
        if step_count is not None and step_count != self.expected_step_count:
            counters = np.zeros(COUNTERS, dtype=np.int64)
            counters[OPTIMIZER_STEP] = step_count
            pending += [(bucket.device["counters"], counters) for bucket in self.buckets]
        self._flush(pending)
        # Only now that every copy is queued do the host copies claim to match the device.
        if self.staged_group_tables is not None:
            self.group_hyper, self.schedule_program, self.schedule_base = self.staged_group_tables
            self.staged_group_tables = None
        for bucket in self.buckets:
            bucket.uploaded_addresses = bucket.addresses.copy()
            bucket.uploaded_tensor_group = bucket.tensor_group.copy()

    # ---------------------------------------------------------------- the engine interface
    def grad_stats(self, grads):
        """(sum of squares, number of non-finite values) over all grads: one launch per dtype, one read back (the
        divergence guard needs the answer on the host, so this synchronises)."""
        cupy = self.cupy
        self._prepare(grads, self.group_hyper is None)
        totals = []
        for bucket in self.buckets:
            if bucket.chunk_count == 0:
                continue
            device = bucket.device
            kernel(cupy, f"grad_stats_{bucket.ctype}")(
                (bucket.grid,), (BLOCK,),
                (device["addresses"], device["chunk_tensor"], device["chunk_start"], device["chunk_length"],
                 np.int64(bucket.chunk_count), device["chunk_sum_of_squares"], device["chunk_nonfinite"]))
            totals += [device["chunk_sum_of_squares"].sum(), device["chunk_nonfinite"].sum().astype(np.float64)]
        if not totals:
            return 0.0, 0
        totals = cupy.asnumpy(cupy.stack(totals)).reshape(-1, 2)
        # The count is exact in float64 below 2**53 values.
        return float(totals[:, 0].sum()), int(totals[:, 1].sum())

    def step(self, grads, step_count, groups_changed, lr_factor=1.0):
        """One launch per dtype on the current stream; no synchronisation, and no copy unless a table changed."""
        self._prepare(grads, groups_changed, step_count)
        for bucket in self.buckets:
            device = bucket.device
            kernel(self.cupy, f"{self.optimizer.KERNEL}_{bucket.ctype}")(
                (bucket.grid,), (BLOCK,),
                (device["addresses"], device["chunk_tensor"], device["chunk_start"], device["chunk_length"],
                 np.int64(bucket.chunk_count), device["tensor_group"], device["tensor_step"],
                 np.int64(bucket.indices.size), self.device["group_hyper"], self.device["schedule_program"],
                 np.int64(self.schedule_program.size), self.device["schedule_base"], device["counters"],
                 np.float64(lr_factor)))
        self.expected_step_count = step_count + 1

    def tensor_steps(self):
        """Each param's step count, read from the device (synchronises)."""
        steps = np.zeros(len(self.optimizer._params), dtype=np.int64)
        for bucket in self.buckets:
            steps[bucket.indices] = self.cupy.asnumpy(bucket.device["tensor_step"])
        return steps

    def set_tensor_steps(self, steps):
        """Upload each param's step count (after a load or an added group: a one-off, so it waits for the copy, which
        the next step may read from another stream)."""
        self._flush([(bucket.device["tensor_step"], np.ascontiguousarray(steps[bucket.indices], dtype=np.int64))
                     for bucket in self.buckets])
        self.cupy.cuda.get_current_stream().synchronize()

    def sync_step_count(self, host_step_count):
        """The optimizer step count to report: the device's, which graph replays advance behind the host's back
        (synchronises), unless an upload of the host's own count is still due (after a load)."""
        if self.expected_step_count != host_step_count:
            return host_step_count
        self.expected_step_count = self.device_step_count()
        return self.expected_step_count

    def device_step_count(self):
        """The optimizer step count held on the device (synchronises): ``step_count`` plus any graph replays."""
        if not self.buckets:
            return 0
        return int(self.cupy.asnumpy(self.buckets[0].device["counters"])[OPTIMIZER_STEP])
