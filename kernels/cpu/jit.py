"""The one place that sets Numba's compile options for fastopt.

- ``cache=True``: a second process loads the machine code from disk instead of recompiling.
- ``error_model="numpy"``: division by zero gives inf/NaN like NumPy and torch instead of raising,
  and lets LLVM vectorise loops that divide.
- ``fastmath`` stays off: it would drop the NaN/inf semantics torch has and re-associate the
  operation order we match.
"""
import numba

jit = numba.njit(cache=True, error_model="numpy", nogil=True)
parallel_jit = numba.njit(cache=True, error_model="numpy", nogil=True, parallel=True)
