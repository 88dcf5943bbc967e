"""fastopt: fused optimizer kernels with per-parameter rates and in-kernel learning-rate schedules.

    import numpy as np, fastopt as fo
    opt = fo.AdamW(params, lr=fo.schedules.onecycle(max_lr=3e-3, total_steps=10_000), weight_decay=0.01)
    opt.step(grads)   # one fused pass over every param, grad and state buffer, in place
"""
from . import reference, rules, schedules
from .backends.cuda import gpu_available
from .guard import Guard
from .lr_finder import lr_find
from .optimizer import Optimizer
from .rules import *  # noqa: F401,F403 (one class per rule: rules.__all__)
from .serialization import load, save

__version__ = "0.1.0"
__all__ = rules.__all__ + ["Guard", "Optimizer", "schedules", "reference", "save", "load", "lr_find",
                           "gpu_available"]
