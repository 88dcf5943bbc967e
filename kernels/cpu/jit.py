"""The one place that sets Numba's compile options for fastopt.

- ``cache=True``: a second process loads the machine code from disk instead of recompiling.
- ``error_model="numpy"``: division by zero gives inf/NaN like NumPy and torch instead of raising,
  and lets LLVM vectorise loops that divide.
- ``fastmath`` stays off: it would drop the NaN/inf semantics torch has and re-associate the
  operation order we match.
"""
import types

import numba

jit = numba.njit(cache=True, error_model="numpy", nogil=True)
# Re-association only (NaN and inf keep their meaning): for reductions, which LLVM vectorises only when it may
# reorder the additions. The order is then fixed by the compiled code: the same total from run to run.
reduction_jit = numba.njit(cache=True, error_model="numpy", nogil=True, fastmath={"reassoc"})
parallel_jit = numba.njit(cache=True, error_model="numpy", nogil=True, parallel=True)


def serial_twin(dispatcher):
    """The function of a ``parallel_jit`` dispatcher compiled again without ``parallel``, where its ``prange`` runs
    as a plain loop on the calling thread: for steps too small to repay waking the thread pool (and waiting for
    a worker when another process holds a core). A renamed copy of the function, so each has its own cache file."""
    function = dispatcher.py_func
    twin = types.FunctionType(function.__code__, function.__globals__, function.__name__ + "_serial",
                              function.__defaults__, function.__closure__)
    twin.__qualname__ = function.__qualname__ + "_serial"
    twin.__doc__ = function.__doc__
    twin.__module__ = function.__module__
    return jit(twin)
