"""The parallel CPU kernels in processes and threads (fastopt/backends/processes.py): a fork child of a process that
ran them, and parallel launches from several threads, on each of Numba's threading layers present.

A regression in these kills the process (SIGTERM from Numba in a fork child, abort under workqueue), so each scenario
runs in a fresh interpreter: it fails its test instead of killing the pytest worker.
"""
import os
import subprocess
import sys
import textwrap
import threading

import numba
import numpy as np
import pytest

import fastopt as fo
from fastopt.backends import processes
from fastopt.kernels.cpu.layout import SERIAL_BELOW

LAYERS = ("omp", "tbb", "workqueue")
SIZE = 300_000  # elements of each param: enough for the parallel kernels
assert SIZE >= SERIAL_BELOW
WARNING = "its steps run on one thread"

# What every scenario steps: a param large enough for the parallel kernels, with the grad statistics read as well
# (max_grad_norm; the clip factor stays 1, so the update does not depend on the order of the norm's sum).
STEPPED = f"""
import numpy as np
import fastopt as fo

def stepped(steps=2, shift=0.0):
    param = np.linspace(-1, 1, {SIZE}, dtype=np.float32) + np.float32(shift)
    optimizer = fo.Adam([param], lr=1e-3, max_grad_norm=1e6)
    for _ in range(steps):
        optimizer.step([np.cos(param)])
    return param
"""


def run_python(code, layer):
    """``code`` (after STEPPED) run in a fresh interpreter on Numba's threading layer ``layer``, two threads; skips
    where that layer cannot be loaded."""
    environment = dict(os.environ, NUMBA_NUM_THREADS="2", NUMBA_THREADING_LAYER=layer)
    result = subprocess.run([sys.executable, "-c", STEPPED + textwrap.dedent(code)], env=environment,
                            capture_output=True, text=True, timeout=300)  # cold Numba caches: ~20 s of compiling
    if "No threading layer could be loaded" in result.stderr:
        pytest.skip(f"Numba's {layer} threading layer is not available here")
    return result


def fork_kills(layer):
    """Whether Numba kills a fork child's parallel launch after the parent's: GNU OpenMP (the omp layer on Linux)."""
    if layer != "omp":
        return False
    from numba.np.ufunc import omppool
    return omppool.openmp_vendor == "GNU"


FORK_CHILD = """
    import multiprocessing
    import sys

    {before_fork}
    process = multiprocessing.get_context("fork").Process(target=lambda: np.save({path!r}, stepped()))
    process.start()
    process.join()
    if process.exitcode != 0:
        sys.exit(f"the fork child's exit code: {{process.exitcode}}")
    assert np.array_equal(np.load({path!r}), stepped()), "the fork child's step differs from its parent's"
"""


@pytest.mark.parametrize("layer", LAYERS)
def test_fork_child_of_a_parallel_step(layer, tmp_path):
    """A fork child of a process that ran parallel steps steps as its parent does: serially, with one warning, where
    the fork loses the parent's thread pool (GNU OpenMP), in parallel elsewhere."""
    result = run_python(FORK_CHILD.format(before_fork="stepped()", path=str(tmp_path / "child.npy")), layer)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(WARNING) == fork_kills(layer), result.stderr


def test_fork_child_before_any_parallel_step(tmp_path):
    """A fork child of a process that has not started Numba's GNU OpenMP pool starts its own: parallel, no warning."""
    result = run_python(FORK_CHILD.format(before_fork="", path=str(tmp_path / "child.npy")), "omp")
    assert result.returncode == 0, result.stderr
    assert WARNING not in result.stderr, result.stderr


@pytest.mark.parametrize("layer", LAYERS)
def test_two_threads_step_their_own_optimizers(layer):
    """Two threads stepping two optimizers at once get what stepping them one after the other gives, on every layer
    (under workqueue, which is not thread-safe, fastopt launches one kernel at a time)."""
    result = run_python("""
        import threading

        shifts = (0.0, 0.5)
        expected = [stepped(20, shift) for shift in shifts]
        concurrent = [None, None]

        def step(position):
            concurrent[position] = stepped(20, shifts[position])

        threads = [threading.Thread(target=step, args=(position,)) for position in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert all(np.array_equal(a, b) for a, b in zip(concurrent, expected))
    """, layer)
    assert result.returncode == 0, result.stderr


def test_thread_safe_layers_launch_without_the_lock():
    """Under omp or tbb a parallel launch does not take the lock that serialises launches under workqueue."""
    param = np.linspace(-1, 1, SIZE, dtype=np.float32)
    optimizer = fo.Adam([param], lr=1e-3)
    grad = np.cos(param)
    optimizer.step([grad])  # Numba picks its threading layer on the first parallel launch
    if numba.threading_layer() == "workqueue":
        pytest.skip("this process runs Numba's workqueue layer, which needs the lock")
    with processes._launch_lock:
        thread = threading.Thread(target=optimizer.step, args=([grad],))
        thread.start()
        thread.join(timeout=60)
        assert not thread.is_alive(), "a parallel launch waited for the workqueue lock"
