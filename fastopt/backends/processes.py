"""What Numba's threading layers allow a process that launches parallel kernels, and how fastopt keeps within it.

Numba runs ``parallel=True`` code on one of three threading layers (``numba.threading_layer()``, picked on the first
parallel launch); its documentation lists what each survives:

- ``tbb``: fork-safe and thread-safe.
- ``omp``: thread-safe; fork-safe except with GNU OpenMP (Linux): a fork child of a process whose OpenMP pool is
  started cannot use it, and Numba kills (SIGTERM) such a child on its first parallel launch.
- ``workqueue`` (the fallback without OpenMP or TBB): fork-safe, not thread-safe: two threads launching at once
  abort the process.

So a fork child of a process with a started GNU OpenMP pool launches the serial twins of the kernels and logs one
warning: one thread, the same updates (the grad norm's float64 sum of squares may differ in its last bit, as it does
between thread counts: the chunks' sums are added in another order). Under ``workqueue`` fastopt's parallel launches
take turns on one lock (other code's parallel launches cannot be made to wait on it).
"""
import logging
import os
import threading

import numba

_logger = logging.getLogger("fastopt")

# Serialises parallel launches while Numba's layer is workqueue, or not yet picked (the first launch picks it).
_launch_lock = threading.Lock()
_launches_need_lock = True
# This process is a fork child of one whose GNU OpenMP pool it cannot use; and whether it has said so yet.
_pool_lost_in_fork = False
_pool_loss_logged = False


def threading_layer():
    """Numba's threading layer, or None before a parallel launch has picked (and started) it."""
    try:
        return numba.threading_layer()
    except ValueError:
        return None


def _pool_unusable_after_fork():
    """Whether a fork child of this process would be killed on its first parallel launch: Numba's layer is started
    and is GNU OpenMP (a child of a process with no started layer starts its own)."""
    if threading_layer() != "omp":
        return False
    from numba.np.ufunc import omppool  # importable: it is the running layer
    return omppool.openmp_vendor == "GNU"


def _after_fork_in_child():
    global _launch_lock, _pool_lost_in_fork, _pool_loss_logged
    _launch_lock = threading.Lock()  # a thread of the parent may have held it at the fork
    _pool_lost_in_fork = _pool_unusable_after_fork()  # the parent's layer: this process inherited its state
    _pool_loss_logged = False


os.register_at_fork(after_in_child=_after_fork_in_child)


class ParallelKernel:
    """A ``parallel_jit`` kernel and its serial twin, called as the process allows: the twin in a fork child that
    cannot use its parent's thread pool (warning once), the parallel kernel otherwise, one launch at a time while
    the threading layer is not thread-safe. Called with the kernels' arguments; returns what they return."""

    def __init__(self, parallel, serial):
        self.parallel = parallel
        self.serial = serial
        self.__name__ = parallel.__name__  # named as the kernel it stands for

    def __call__(self, *args):
        global _launches_need_lock, _pool_loss_logged
        if _pool_lost_in_fork:
            if not _pool_loss_logged:
                _pool_loss_logged = True
                _logger.warning("fastopt: this process was forked from one that ran parallel kernels on GNU OpenMP, "
                                "which a fork child cannot use: its steps run on one thread. Start processes with "
                                "the 'spawn' or 'forkserver' method to keep them parallel.")
            return self.serial(*args)
        if not _launches_need_lock:
            return self.parallel(*args)
        with _launch_lock:
            result = self.parallel(*args)
            _launches_need_lock = threading_layer() in (None, "workqueue")
        return result
