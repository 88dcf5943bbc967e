"""Every CUDA source compiles for sm_80 and sm_90 with the options the backend uses, with no register spills.

Runs without a GPU: the compiler is NVRTC from the ``nvidia-cuda-nvrtc-cu12`` wheel (or the CUDA 13 wheel
``nvidia-cuda-nvrtc``, or a system libnvrtc), loaded with ctypes, with ``--ptxas-options=-v`` so that ptxas reports
registers and spills per kernel; the machine's ``nvcc -Xptxas -v`` is the fallback. Without either the tests skip,
unless ``REQUIRE_CUDA_COMPILER=1``, which makes them fail. Each source is compiled once per architecture per session.

The step kernels report a 40-byte stack frame: the local array of double ``cos``'s argument reduction for huge
arguments (Payne-Hanek), not spills; spills are reported separately and must be zero. (That reduction is a call:
what a kernel keeps live across it is saved on the stack and reported as spills, which is why fused.cu ends the
first thread's coefficient work at a barrier and reads the chunk's tables again after it.)
"""
import ctypes
import ctypes.util
import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from fastopt.backends import cuda

ARCHITECTURES = ("80", "90")
KERNELS = [f"{name}_{ctype}{variant}" for name in ("sgd_step", "rmsprop_step", "adam_step")
           for ctype in ("float", "double") for variant in ("", "_mixed")]
KERNELS += [f"grad_stats_{ctype}" for ctype in ("float", "double")] + ["finish_grad_control"]
SOURCES = sorted(path.name for path in cuda.SOURCE_DIR.glob("*.cu"))
HEADERS = sorted(path.name for path in cuda.SOURCE_DIR.glob("*.cuh"))


# ---------------------------------------------------------------- compilers
def nvrtc_library():
    """Path of libnvrtc: from the NVIDIA wheels (CUDA 12: nvidia/cuda_nvrtc/lib, CUDA 13: nvidia/cu13/lib), else
    the system's; None if there is none."""
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for path in sorted(Path(root).glob("*/lib/libnvrtc.so.*"), reverse=True):
            if "builtins" not in path.name and ".alt." not in path.name:
                return str(path)
    return ctypes.util.find_library("nvrtc")


class Nvrtc:
    def __init__(self, path):
        self.library = ctypes.CDLL(path)
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.library.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        self.name = f"NVRTC {major.value}.{minor.value} ({path})"

    def _log(self, program):
        size = ctypes.c_size_t()
        self.library.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        self.library.nvrtcGetProgramLog(program, log)
        return log.value.decode(errors="replace")

    def compile(self, source, name, options, architecture):
        """(succeeded, log) of compiling ``source`` to a cubin for sm_``architecture``."""
        program = ctypes.c_void_p()
        status = self.library.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), 0, None, None)
        assert status == 0, f"nvrtcCreateProgram failed with status {status}"
        try:
            arguments = [*options, f"--gpu-architecture=sm_{architecture}", "--ptxas-options=-v"]
            array = (ctypes.c_char_p * len(arguments))(*(argument.encode() for argument in arguments))
            status = self.library.nvrtcCompileProgram(program, len(arguments), array)
            return status == 0, self._log(program)
        finally:
            self.library.nvrtcDestroyProgram(ctypes.byref(program))


class Nvcc:
    def __init__(self, path):
        self.path = path
        self.name = f"nvcc ({path})"

    def compile(self, source, name, options, architecture, directory):
        source_path = Path(directory) / name
        source_path.write_text(source)
        command = [self.path, "-cubin", f"-arch=sm_{architecture}", "-Xptxas", "-v", *options, str(source_path),
                   "-o", str(source_path.with_suffix(f".sm_{architecture}.cubin"))]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        return result.returncode == 0, result.stdout + result.stderr


def missing_compiler(reason):
    if os.environ.get("REQUIRE_CUDA_COMPILER") == "1":
        pytest.fail(f"REQUIRE_CUDA_COMPILER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def compiler(tmp_path_factory):
    path = nvrtc_library()
    if path:
        nvrtc = Nvrtc(path)
        return lambda source, name, options, architecture: nvrtc.compile(source, name, options, architecture)
    nvcc = shutil.which("nvcc")
    if nvcc:
        directory = tmp_path_factory.mktemp("nvcc")
        return lambda source, name, options, architecture: Nvcc(nvcc).compile(source, name, options, architecture,
                                                                              directory)
    missing_compiler("no CUDA compiler: pip install nvidia-cuda-nvrtc-cu12 (or put nvcc on PATH)")


# ---------------------------------------------------------------- ptxas's report
@dataclass(frozen=True)
class KernelResources:
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int


def parse_ptxas(log):
    """{kernel: KernelResources} from ptxas's -v report."""
    kernels = {}
    for block in re.split(r"(?=ptxas info\s*: Compiling entry function)", log):
        name = re.search(r"Compiling entry function '(\w+)'", block)
        used = re.search(r"Used (\d+) registers", block)
        frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", block)
        if name and used and frame:
            kernels[name.group(1)] = KernelResources(int(used.group(1)), int(frame.group(2)), int(frame.group(3)),
                                                     int(frame.group(1)))
    return kernels


@pytest.fixture(scope="module")
def compiled(compiler):
    """{(source, architecture): (succeeded, log)}, each compiled once."""
    options = list(cuda.compile_options())
    results = {}
    for architecture in ARCHITECTURES:
        for name in SOURCES:
            results[name, architecture] = compiler((cuda.SOURCE_DIR / name).read_text(), name, options, architecture)
        for name in HEADERS:
            # Each header on its own: it must include what it uses.
            results[name, architecture] = compiler(f'#include "{name}"\n', f"only_{name}.cu", options, architecture)
    return results


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("name", SOURCES + HEADERS)
def test_source_compiles(compiled, name, architecture):
    succeeded, log = compiled[name, architecture]
    assert succeeded, f"{name} for sm_{architecture}:\n{log}"
    assert "warning" not in log.lower(), f"{name} for sm_{architecture} compiles with warnings:\n{log}"


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_kernel_is_built_without_spills(compiled, architecture, capsys):
    succeeded, log = compiled[cuda.SOURCE, architecture]
    assert succeeded, log
    kernels = parse_ptxas(log)
    assert sorted(kernels) == sorted(KERNELS), f"ptxas reported {sorted(kernels)}"
    with capsys.disabled():
        print(f"\n{cuda.SOURCE} for sm_{architecture}: kernel, registers, spill stores/loads (bytes), stack frame")
        for name in KERNELS:
            resources = kernels[name]
            print(f"  {name:22} {resources.registers:4} regs  spills {resources.spill_stores}/{resources.spill_loads}"
                  f"  stack {resources.stack_frame}")
    for name, resources in kernels.items():
        assert resources.spill_stores == 0 and resources.spill_loads == 0, f"{name} spills on sm_{architecture}"
        # At BLOCK threads per block, each multiprocessor (65536 registers) must hold at least two blocks.
        assert resources.registers * cuda.BLOCK * 2 <= 65536, f"{name} uses {resources.registers} registers"
    # The float step kernels, plain and mixed, hold four blocks per multiprocessor, as the plain ones did before mixed
    # precision: the mixed loop has kernels of its own (fused.cu) so that it cannot cost the plain ones occupancy.
    for name in (name for name in KERNELS if "_step_float" in name):
        registers = kernels[name].registers
        assert registers * cuda.BLOCK * 4 <= 65536, f"{name} uses {registers} registers on sm_{architecture}"


def test_sources_refuse_to_compile_without_the_generated_defines(compiler):
    """The shared constants come only from the Python modules: without the -D options a source does not build."""
    options = [f"-I{cuda.SOURCE_DIR}", "--std=c++17"]
    succeeded, log = compiler((cuda.SOURCE_DIR / cuda.SOURCE).read_text(), cuda.SOURCE, options, ARCHITECTURES[0])
    assert not succeeded and "compile with the -D options of fastopt.backends.cuda.compile_options()" in log


def test_every_generated_define_is_used():
    """A constant added to schedule_codes.py or tables.py must be mirrored in the CUDA sources (a new schedule kind
    the CUDA evaluator does not know would give NaN on the GPU)."""
    text = "".join(path.read_text() for path in cuda.SOURCE_DIR.glob("*.cu*"))
    unused = [name for name in cuda.compile_defines() if not re.search(rf"\b{name}\b", text)]
    assert not unused, f"defines no CUDA source reads: {unused}"


def test_source_hash_covers_headers(tmp_path, monkeypatch):
    """Editing any header changes the hash that goes into the compile options (CuPy's cache key)."""
    for path in cuda.SOURCE_DIR.glob("*.cu*"):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    monkeypatch.setattr(cuda, "SOURCE_DIR", tmp_path)
    cuda.source_hash.cache_clear()
    try:
        before = cuda.source_hash()
        header = tmp_path / "element_math.cuh"
        header.write_text(header.read_text() + "\n// edited\n")
        cuda.source_hash.cache_clear()
        assert cuda.source_hash() != before
        assert f"-DFASTOPT_SOURCE_HASH=0x{cuda.source_hash()}" in cuda.compile_options()
    finally:
        cuda.source_hash.cache_clear()
