"""Numba's on-disk cache of the CPU kernels, made visible: one INFO line on the ``fastopt`` logger when a kernel has
to compile (seconds) instead of loading from the cache (milliseconds), and :func:`precompile` to fill the cache
before the first step.

    compiling the one-thread AdamW step kernel for float32 (first run only; cached in .../kernels/cpu/__pycache__)

A kernel compiles on its first call with new argument types in a process, unless the cache holds it. Numba keeps the
cache beside the sources of the kernels, in ``__pycache__`` of ``fastopt/kernels/cpu/`` (``kernels/cpu/`` in a
checkout), of its ``rules/`` and of ``fastopt/backends/``; when ``NUMBA_CACHE_DIR`` is set, in ``<folder>_<hash of
its path>`` folders under it instead; when a source folder is not writable, in such folders under the user's cache
directory (``$XDG_CACHE_HOME/numba``, by default ``~/.cache/numba``). The line names the folder it writes.

A compile is told from a cache load by Numba's ``"numba:compile"`` event (``numba.core.event``), which a dispatcher
triggers only after its cache missed: a kernel loaded from the cache or already in memory says nothing, and a step
does no work for this.
"""
import inspect
import logging

import numpy as np
from numba import types as numba_types
from numba.core import event

from . import dtypes
from .kernels.cpu.layout import SERIAL_BELOW

# The param dtypes precompile covers (fastopt/cli.py spells them out too: importing this module imports Numba).
PARAM_DTYPES = ("float32", "float64", "bfloat16", "float16")

_logger = logging.getLogger("fastopt")
# The kernels see 16-bit floats as their bits (Numba has none); see fastopt/backends/cpu.py.
_STORAGE_OF_BITS = {"uint16": "bfloat16", "int16": "float16"}
# dispatcher -> (what it is, e.g. "step kernel"; the names of the optimizers or features that call it)
_named_kernels = {}


def name_kernels(dispatchers, owner, kind="step kernel"):
    """Log a compile of any of ``dispatchers`` as "compiling the <parallel or one-thread> <owner> <kind> for
    <dtypes> ...". Owners sharing a kernel (Adam and AdamW share one) are named together: "Adam/AdamW"."""
    for dispatcher in dispatchers:
        owners = _named_kernels.setdefault(dispatcher, (kind, []))[1]
        if owner not in owners:
            owners.append(owner)


def _storage(argument_type):
    """How the elements of a kernel's array argument are stored: its dtype, or the 16-bit float it holds the bits
    of."""
    name = str(argument_type.dtype)
    return _STORAGE_OF_BITS.get(name, name)


def _describe_types(dispatcher, argument_types):
    """What a compile is for, from the types of the kernel's arguments named as in kernels/cpu/fused.py: the param
    dtype ('float32'), and what is stored otherwise ('bfloat16 params with float32 state'); the math dtype for
    kernels that take no param (grad_stats)."""
    types = dict(zip(inspect.signature(dispatcher.py_func).parameters, argument_types))
    if "param_like" not in types:
        return _storage(types["scratch"])
    param = _storage(types["param_like"])
    others = [f"{_storage(types[name])} {what}" for name, what in (("grad_like", "grads"), ("state_like", "state"))
              if name in types and _storage(types[name]) != param]
    if types["master_like"] != numba_types.none:
        others.append("float32 master weights")
    if types.get("seed", numba_types.none) != numba_types.none:
        others.append("stochastic rounding")
    return f"{param} params with {', '.join(others)}" if others else param


class _CompileLogger(event.Listener):
    """Logs the start of a named kernel's compile: the seconds that follow are not a hang."""

    def on_start(self, compile_event):
        dispatcher = compile_event.data["dispatcher"]
        if dispatcher in _named_kernels:
            kind, owners = _named_kernels[dispatcher]
            # Each kernel has a parallel and a one-thread variant (see kernels/cpu/jit.serial_twin), compiled apart.
            threads = "parallel" if dispatcher.targetoptions.get("parallel") else "one-thread"
            _logger.info("compiling the %s %s %s for %s (first run only; cached in %s)", threads, "/".join(owners),
                         kind, _describe_types(dispatcher, compile_event.data["args"]), dispatcher.stats.cache_path)

    def on_end(self, compile_event):
        pass


event.register("numba:compile", _CompileLogger())


def default_param_dtypes():
    """:data:`PARAM_DTYPES` less bfloat16 where ml_dtypes is missing: no bfloat16 array, so no step that needs its
    kernels, can exist there."""
    return [name for name in PARAM_DTYPES if name != "bfloat16" or dtypes.BFLOAT16 is not None]


def cache_directory():
    """Where Numba keeps the step kernels' machine code (the rules' element functions and a helper of
    fastopt/backends have their own directories beside it)."""
    from .kernels.cpu import fused

    return fused.grad_stats.stats.cache_path


def precompile(optimizers, param_dtypes=None, done=None):
    """Compile into Numba's cache (or load from it) the CPU kernels that steps of ``optimizers`` (classes, e.g.
    ``fastopt.AdamW``) on params of ``param_dtypes`` (default: :func:`default_param_dtypes`) need with default
    options, by real steps: for each pair one step on a single element (the one-thread kernel of steps under
    SERIAL_BELOW elements) and one on SERIAL_BELOW elements (the parallel kernel), both with ``max_grad_norm`` (the
    grad-control kernel, also used by ``grad_scale`` and guards). Other storage (master weights, bfloat16 state,
    stochastic rounding, grads of another dtype) compiles on its first step. ``done(label)`` is called after each
    pair, e.g. a progress bar's update. bfloat16 without ml_dtypes raises ImportError."""
    for optimizer in optimizers:
        for name in param_dtypes or default_param_dtypes():
            for size in (1, SERIAL_BELOW):
                param = np.zeros(size, dtypes.numpy_dtype(name))
                optimizer([param], backend="cpu", max_grad_norm=1.0).step([np.ones_like(param)])
            if done:
                done(f"{optimizer.__name__} {name}")
