"""Every CUDA source compiles for sm_80 and sm_90 with the options the backend uses, with no register spills.

Runs without a GPU: the compiler is NVRTC from the ``nvidia-cuda-nvrtc-cu12`` wheel (or the CUDA 13 wheel
``nvidia-cuda-nvrtc``, or a system libnvrtc), loaded with ctypes, with ``--ptxas-options=-v`` so that ptxas reports
registers and spills per kernel; the machine's ``nvcc -Xptxas -v`` is the fallback. Without either the tests skip,
unless ``REQUIRE_CUDA_COMPILER=1``, which makes them fail. Each unit (fused.cu once per rule of fastopt.rules.RULES,
with the kernels of the rule's passes; grad_control.cu and blend.cu once) is compiled once per architecture per
session. ptxas differs between CUDA releases (nvcc 13.0
spilled where NVRTC 12.9 did not), so where an ``nvcc`` is installed the units are built with it too, and must not
spill either.

The step kernels report a 40-byte stack frame: the local array of double ``cos``'s argument reduction for huge
arguments (Payne-Hanek), not spills; spills are reported separately and must be zero. (That reduction is a call:
what a kernel keeps live across it is saved on the stack and reported as spills, which is why fused.cu's first
thread evaluates the schedule alone, before a barrier, and reads the tables again after it.)
"""
import concurrent.futures
import ctypes
import ctypes.util
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from fastopt.backends import cuda
from fastopt.rules import RULES

ARCHITECTURES = ("80", "90")
GRAD_CONTROL_KERNELS = [f"grad_stats_{ctype}" for ctype in ("float", "double")] + ["finish_grad_control"]
BLEND_KERNELS = [f"blend_{ctype}" for ctype in ("float", "double")]


def step_kernels(kernel):
    """fused.cu's kernels for the rule ``kernel``: each pass of its step (``step``, or ``norms`` and ``apply``) per
    math dtype, plain and mixed, and the float ones for 8-bit states, plain and mixed."""
    return [f"{kernel_pass}_{ctype}{variant}" for kernel_pass in cuda.rule_passes(kernel)
            for ctype, variants in (("float", ("", "_mixed", "_8bit", "_8bit_mixed")), ("double", ("", "_mixed")))
            for variant in variants]


# The compiled units: (id, source, extra options, kernels): the step once per rule, the grad control and the blend once.
UNITS = [(f"{cuda.SOURCE}[{kernel}]", cuda.SOURCE, cuda.rule_options(kernel), step_kernels(kernel)) for kernel in RULES]
UNITS.append((cuda.GRAD_CONTROL_SOURCE, cuda.GRAD_CONTROL_SOURCE, (), GRAD_CONTROL_KERNELS))
UNITS.append((cuda.BLEND_SOURCE, cuda.BLEND_SOURCE, (), BLEND_KERNELS))
UNIT_IDS = [unit[0] for unit in UNITS]
HEADERS = sorted(path.relative_to(cuda.SOURCE_DIR).as_posix() for path in cuda.SOURCE_DIR.rglob("*.cuh"))


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
        source_path = Path(tempfile.mkdtemp(dir=directory)) / name  # compiles run in parallel
        source_path.write_text(source)
        command = [self.path, "-cubin", f"-arch=sm_{architecture}", "-Xptxas", "-v", *options, str(source_path),
                   "-o", str(source_path.with_suffix(f".sm_{architecture}.cubin"))]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        return result.returncode == 0, result.stdout + result.stderr


def missing_compiler(reason):
    if os.environ.get("REQUIRE_CUDA_COMPILER") == "1":
        pytest.fail(f"REQUIRE_CUDA_COMPILER=1 but {reason}")
    pytest.skip(reason)


def nvcc_path():
    return shutil.which("nvcc") or next((str(path) for path in (Path("/usr/local/cuda/bin/nvcc"),) if path.exists()),
                                        None)


@pytest.fixture(scope="module")
def compiler(tmp_path_factory):
    path = nvrtc_library()
    if path:
        nvrtc = Nvrtc(path)

        def compile_with_nvrtc(source, name, options, architecture):
            return nvrtc.compile(source, name, options, architecture)

        compile_with_nvrtc.name = nvrtc.name
        return compile_with_nvrtc
    nvcc = nvcc_path()
    if nvcc:
        directory = tmp_path_factory.mktemp("nvcc")

        def compile_with_nvcc(source, name, options, architecture):
            return Nvcc(nvcc).compile(source, name, options, architecture, directory)

        compile_with_nvcc.name = Nvcc(nvcc).name
        return compile_with_nvcc
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


def compile_units(compiler):
    """{(unit id or header, architecture): (succeeded, log)}: every unit, and every header on its own (it must include
    what it uses)."""
    options = list(cuda.compile_options())
    jobs = {}
    # One compile per core at a time (NVRTC's calls release the GIL, nvcc is a process of its own).
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for architecture in ARCHITECTURES:
            for unit, source, extra, _ in UNITS:
                jobs[unit, architecture] = pool.submit(compiler, (cuda.SOURCE_DIR / source).read_text(), source,
                                                       options + list(extra), architecture)
            for name in HEADERS:
                jobs[name, architecture] = pool.submit(compiler, f'#include "{name}"\n', f"only_{Path(name).name}.cu",
                                                       options, architecture)
    return {key: job.result() for key, job in jobs.items()}


@pytest.fixture(scope="module")
def compiled(compiler):
    return compile_units(compiler)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("name", UNIT_IDS + HEADERS)
def test_source_compiles(compiled, name, architecture):
    succeeded, log = compiled[name, architecture]
    assert succeeded, f"{name} for sm_{architecture}:\n{log}"
    assert "warning" not in log.lower(), f"{name} for sm_{architecture} compiles with warnings:\n{log}"


def assert_no_spills(compiled, compiler_name, architecture, capsys):
    """Every unit's kernels: no spills, at least two blocks per multiprocessor, and the float step kernels (plain and
    mixed, every pass) four, as the plain ones had before mixed precision (fused.cu: the mixed loop has kernels of its own so that
    it cannot cost the plain ones occupancy), the plain 8-bit ones too (the mixed 8-bit ones, their RUNTIME loops, two).
    ``SHOW_REGISTERS=1`` prints each kernel's registers and spills."""
    show = os.environ.get("SHOW_REGISTERS") == "1"
    if show:
        with capsys.disabled():
            print(f"\n{compiler_name}, sm_{architecture}: kernel, registers, spill stores/loads (bytes), stack frame")
    for unit, _, _, expected in UNITS:
        succeeded, log = compiled[unit, architecture]
        assert succeeded, log
        kernels = parse_ptxas(log)
        assert sorted(kernels) == sorted(expected), f"{unit}: ptxas reported {sorted(kernels)}"
        with capsys.disabled():
            for name in expected if show else ():
                resources = kernels[name]
                print(f"  {unit:22} {name:20} {resources.registers:4} regs  spills "
                      f"{resources.spill_stores}/{resources.spill_loads}  stack {resources.stack_frame}")
        for name, resources in kernels.items():
            assert resources.spill_stores == 0 and resources.spill_loads == 0, \
                f"{unit} {name} spills on sm_{architecture} ({compiler_name})"
            # At BLOCK threads per block, each multiprocessor (65536 registers) must hold at least two blocks.
            assert resources.registers * cuda.BLOCK * 2 <= 65536, f"{unit} {name} uses {resources.registers} registers"
            if unit.startswith(cuda.SOURCE) and "_float" in name and not name.endswith("_8bit_mixed"):
                assert resources.registers * cuda.BLOCK * 4 <= 65536, \
                    f"{unit} {name} uses {resources.registers} registers on sm_{architecture} ({compiler_name})"


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_kernel_is_built_without_spills(compiler, compiled, architecture, capsys):
    assert_no_spills(compiled, compiler.name, architecture, capsys)


@pytest.fixture(scope="module")
def compiled_by_nvcc(tmp_path_factory):
    nvcc = nvcc_path()
    if nvcc is None:
        pytest.skip("no nvcc on PATH (or in /usr/local/cuda/bin)")
    directory = tmp_path_factory.mktemp("nvcc")
    compiler = Nvcc(nvcc)
    release = [line for line in subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.splitlines()
               if "release" in line]
    compiler.name = f"{compiler.name}, {release[0].strip() if release else 'release unknown'}"
    results = compile_units(lambda source, name, options, architecture: compiler.compile(source, name, options,
                                                                                         architecture, directory))
    return compiler.name, results


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_kernel_is_built_without_spills_by_nvcc(compiled_by_nvcc, architecture, capsys):
    """The installed nvcc's ptxas (CUDA 13 here), whatever compiler the other tests found."""
    name, compiled = compiled_by_nvcc
    for unit in UNIT_IDS + HEADERS:
        succeeded, log = compiled[unit, architecture]
        assert succeeded, f"{unit} for sm_{architecture} ({name}):\n{log}"
    assert_no_spills(compiled, name, architecture, capsys)


def test_every_rule_has_a_cuda_rule():
    """A rule of fastopt.rules.RULES is its header kernels/cuda/rules/<KERNEL>.cuh and nothing else: no CUDA source
    names a rule but its own header."""
    headers = {path.stem for path in (cuda.SOURCE_DIR / "rules").glob("*.cuh")}
    assert headers == set(RULES)
    for path in cuda.SOURCE_DIR.glob("*.cu*"):
        text = path.read_text()
        for kernel in RULES:
            assert f"FASTOPT_{kernel.upper()}_" not in text and f"rules::{kernel}" not in text, \
                f"{path.name} names the rule {kernel}"


def test_sources_refuse_to_compile_without_the_generated_defines(compiler):
    """The shared constants come only from the Python modules: without the -D options a source does not build."""
    options = [f"-I{cuda.SOURCE_DIR}", "--std=c++17"]
    for source in (cuda.SOURCE, cuda.GRAD_CONTROL_SOURCE, cuda.BLEND_SOURCE):
        succeeded, log = compiler((cuda.SOURCE_DIR / source).read_text(), source, options, ARCHITECTURES[0])
        assert not succeeded and "compile with the -D options of fastopt.backends.cuda.compile_options()" in log
    # fused.cu without a rule.
    succeeded, log = compiler((cuda.SOURCE_DIR / cuda.SOURCE).read_text(), cuda.SOURCE, list(cuda.compile_options()),
                              ARCHITECTURES[0])
    assert not succeeded and "rule_options()" in log


def test_every_generated_define_is_used():
    """A constant added to schedule_codes.py or layout.py, or a rule's column, must be mirrored in the CUDA sources (a
    new schedule kind the CUDA evaluator does not know would give NaN on the GPU)."""
    text = "".join(path.read_text() for path in cuda.SOURCE_DIR.rglob("*.cu*"))
    unused = [name for name in cuda.compile_defines() if not re.search(rf"\b{name}\b", text)]
    assert not unused, f"defines no CUDA source reads: {unused}"


def test_source_hash_covers_headers(tmp_path, monkeypatch):
    """Editing any header changes the hash that goes into the compile options (CuPy's cache key)."""
    shutil.copytree(cuda.SOURCE_DIR, tmp_path / "cuda")
    monkeypatch.setattr(cuda, "SOURCE_DIR", tmp_path / "cuda")
    cuda.source_hash.cache_clear()
    try:
        for name in ("element_math.cuh", f"rules/{next(iter(RULES))}.cuh"):  # a rule's header counts too
            before = cuda.source_hash()
            header = tmp_path / "cuda" / name
            header.write_text(header.read_text() + "\n// edited\n")
            cuda.source_hash.cache_clear()
            assert cuda.source_hash() != before, name
            assert f"-DFASTOPT_SOURCE_HASH=0x{cuda.source_hash()}" in cuda.compile_options()
    finally:
        cuda.source_hash.cache_clear()
