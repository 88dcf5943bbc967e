"""A kernel that compiles instead of loading from Numba's cache says so in one INFO line (fastopt/kernel_cache.py), and
``fastopt precompile`` fills the cache so that later steps say nothing.

The cold compiles happen once, in subprocesses over an empty NUMBA_CACHE_DIR of their own, on SGD with float64 params
(the smallest kernel); the tests read what those processes printed.
"""
import logging
import os
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import pytest

import fastopt
from fastopt import cli, kernel_cache
from fastopt.kernels.cpu.layout import SERIAL_BELOW

REPOSITORY = Path(__file__).resolve().parents[1]
# SGD steps on float64 params of each size in argv[1] (comma-separated), plain or also with max_grad_norm (argv[2]),
# by two optimizers of two steps each; the fastopt logger's INFO lines go to stderr.
STEPS = """
import logging, sys
import numpy as np
import fastopt
logging.basicConfig(level=logging.INFO, format="%(message)s")
for size in map(int, sys.argv[1].split(",")):
    for max_grad_norm in {"plain": [None], "both": [None, 1.0]}[sys.argv[2]]:
        for _ in range(2):
            param = np.zeros(size)
            optimizer = fastopt.SGD([param], lr=0.1, max_grad_norm=max_grad_norm)
            optimizer.step([np.ones(size)])
            optimizer.step([np.ones(size)])
"""


def compile_lines(text):
    return [line for line in text.splitlines() if line.startswith("compiling ")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The processes, in order, over one new cache: ``cold`` (small plain steps), ``precompile`` (the command), then
    ``warm`` (small and parallel-sized steps, plain and clipped)."""
    cache = tmp_path_factory.mktemp("numba-cache")
    environment = dict(os.environ, NUMBA_CACHE_DIR=str(cache))

    def run(*arguments):
        return subprocess.run([sys.executable, *arguments], cwd=REPOSITORY, env=environment, capture_output=True,
                              text=True, timeout=600)

    return dict(cache=str(cache), cold=run("-c", STEPS, "1", "plain"),
                precompile=run("-m", "fastopt", "precompile", "--optimizers", "sgd", "--dtypes", "FLOAT64"),
                warm=run("-c", STEPS, f"1,{SERIAL_BELOW}", "both"))


def test_a_cold_step_logs_its_compile_once(runs):
    cold = runs["cold"]
    assert cold.returncode == 0, cold.stderr
    [line] = compile_lines(cold.stderr)
    assert line.startswith("compiling the one-thread SGD step kernel for float64 (first run only; cached in "
                           f"{runs['cache']}{os.sep}"), line


def test_precompile_shows_progress_and_compiles_only_what_the_cache_lacks(runs):
    result = runs["precompile"]
    assert result.returncode == 0, result.stderr
    assert "1/1 SGD float64" in result.stderr
    # The one-thread kernel is in the cache since the cold run: loaded, so not logged.
    assert sorted(line.split(" (")[0] for line in compile_lines(result.stderr)) == [
        "compiling the parallel SGD step kernel for float64", "compiling the parallel grad-control kernel for float64"]
    assert runs["cache"] in result.stdout


def test_steps_after_precompile_log_nothing(runs):
    warm = runs["warm"]
    assert warm.returncode == 0, warm.stderr
    assert compile_lines(warm.stderr) == []


def test_a_second_step_logs_nothing(caplog):
    caplog.set_level(logging.INFO, logger="fastopt")
    param = np.zeros(3)
    optimizer = fastopt.SGD([param], lr=0.1)
    optimizer.step([np.ones(3)])  # compiles, loads or finds the kernel in memory
    caplog.clear()
    optimizer.step([np.ones(3)])
    fastopt.SGD([np.zeros(5)], lr=0.1).step([np.ones(5)])
    assert caplog.records == []


def test_each_new_compile_of_a_named_kernel_is_logged_once(caplog):
    caplog.set_level(logging.INFO, logger="fastopt")

    @numba.njit  # not cached: every first call with new types compiles
    def probe(scratch):
        return scratch[0]

    kernel_cache.name_kernels([probe], "probe", kind="kernel")
    for dtype in (np.float64, np.float64, np.float32, np.float64):
        probe(np.zeros(1, dtype))
    assert [record.getMessage().split(" (")[0] for record in caplog.records] == [
        "compiling the one-thread probe kernel for float64", "compiling the one-thread probe kernel for float32"]


def test_the_command_line_shows_the_library_lines_while_it_runs(capsys):
    logger = logging.getLogger("fastopt")
    handlers, level = list(logger.handlers), logger.level
    with cli._compile_messages():
        logger.info("compiling the one-thread SGD step kernel for float64")
    assert "compiling the one-thread SGD step kernel for float64" in capsys.readouterr().err
    assert (logger.handlers, logger.level) == (handlers, level)


def test_the_command_line_knows_the_precompiled_dtypes():
    assert cli.PARAM_DTYPES == kernel_cache.PARAM_DTYPES
