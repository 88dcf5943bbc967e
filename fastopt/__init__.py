"""fastopt: fused optimizer kernels with per-parameter rates and in-kernel learning-rate schedules.

    import numpy as np, fastopt as fo
    opt = fo.AdamW(params, lr=fo.schedules.onecycle(max_lr=3e-3, total_steps=10_000), weight_decay=0.01)
    opt.step(grads)   # one fused pass over every param, grad and state buffer, in place
"""
import os as _os

# In a source checkout the kernels sit at the top of the repository (pyproject.toml installs them as fastopt.kernels).
# Run from the repository root without an install (PYTHONPATH=.), or with this directory shadowing an installed
# fastopt, Python finds this package but not its kernels: look for them beside the package too.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if (not _os.path.isdir(_os.path.join(__path__[0], "kernels"))
        and _os.path.isfile(_os.path.join(_checkout, "kernels", "__init__.py"))
        and _os.path.isfile(_os.path.join(_checkout, "pyproject.toml"))):
    __path__.append(_checkout)
from . import reference, rules, schedules
from .backends.cuda import gpu_available
from .guard import Guard
from .lr_finder import lr_find
from .lr_sweeper import lr_sweep
from .optimizer import Optimizer
from .rules import *  # noqa: F401,F403 (one class per rule: rules.__all__)
from .serialization import load, save

__version__ = "0.1.0"
__all__ = rules.__all__ + ["Guard", "Optimizer", "schedules", "reference", "save", "load", "lr_find", "lr_sweep",
                           "gpu_available"]
