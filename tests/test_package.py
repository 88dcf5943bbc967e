"""Packaging promises: what `import fastopt` pulls in, that a second process loads kernels from the cache, and that
the checkout imports from its root in every install mode (none, editable, installed and shadowed)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = """
import json, sys
import numpy as np
import fastopt as fo
heavy = sorted(name for name in ("torch", "matplotlib", "cupy", "sklearn") if name in sys.modules)
from fastopt.kernels.cpu import fused, layout as tables
for size in (100, tables.SERIAL_BELOW):  # the single-threaded twin, then the parallel kernel
    fo.Adam([np.ones(size, np.float32)]).step([np.ones(size, np.float32)])
kernels = fused.step_kernels("adam", 0b011, 0b100)[::-1]  # Adam's state slots: always two, and AMSGrad's
print(json.dumps({"heavy": heavy, "hits": [sum(k.stats.cache_hits.values()) for k in kernels],
                  "misses": [sum(k.stats.cache_misses.values()) for k in kernels]}))
"""


def run_probe():
    output = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def test_import_is_light_and_second_process_uses_the_kernel_cache():
    run_probe()  # compiles (or loads) and fills the cache
    result = run_probe()
    assert result["heavy"] == [], f"import fastopt pulled in {result['heavy']}"
    assert result["hits"] == [1, 1] and result["misses"] == [0, 0], result


REPOSITORY = Path(__file__).resolve().parents[1]
# Imports fastopt as found from the working directory and says where each part came from. The setuptools finder of
# an editable install is taken out first where the mode under test has none.
IMPORT_PROBE = """
import sys
if {without_editable}:
    sys.meta_path[:] = [finder for finder in sys.meta_path if "__editable__" not in repr(finder)]
import fastopt, fastopt.kernels.cpu.fused as fused
print(fastopt.__file__)
print(fused.__file__)
"""


def import_from(directory, *, without_editable, path=()):
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(str(entry) for entry in path))
    result = subprocess.run([sys.executable, "-c", IMPORT_PROBE.format(without_editable=without_editable)],
                            cwd=directory, env=environment, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [Path(line) for line in result.stdout.split()]


@pytest.mark.parametrize("without_editable", [True, False], ids=["no install", "as installed here"])
def test_the_checkout_imports_from_its_root(without_editable):
    """From the repository root (or with PYTHONPATH=.), the checkout's fastopt and its kernels, which sit at the
    top of the repository, are the ones imported."""
    package, kernels = import_from(REPOSITORY, without_editable=without_editable, path=[REPOSITORY])
    assert package == REPOSITORY / "fastopt" / "__init__.py"
    assert kernels == REPOSITORY / "kernels" / "cpu" / "fused.py"


def test_a_checkout_shadowing_an_installed_copy_still_imports(tmp_path):
    """``pip install .`` then Python started in the repository root: the local fastopt/ shadows the installed one
    and must find its kernels; elsewhere the installed copy is imported whole."""
    installed = tmp_path / "site"
    # With setuptools at hand, pip builds without fetching it into an isolated environment.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *isolation,
                    "--target", str(installed), str(REPOSITORY)], check=True, capture_output=True)
    package, kernels = import_from(REPOSITORY, without_editable=True, path=[installed])
    assert (package, kernels) == (REPOSITORY / "fastopt" / "__init__.py", REPOSITORY / "kernels" / "cpu" / "fused.py")
    package, kernels = import_from(tmp_path, without_editable=True, path=[installed])
    assert package == installed / "fastopt" / "__init__.py"
    assert kernels == installed / "fastopt" / "kernels" / "cpu" / "fused.py"
