"""fastopt: fused optimizer kernels with per-parameter rates and in-kernel learning-rate schedules.

    import numpy as np, fastopt as fo
    opt = fo.AdamW(params, lr=fo.schedules.onecycle(max_lr=3e-3, total_steps=10_000), weight_decay=0.01)
    opt.step(grads)   # one fused pass over every param, grad and state buffer, in place
"""
from . import reference, schedules
from .backends.cuda import gpu_available
from .guard import Guard
from .lr_finder import lr_find
from .optimizer import Optimizer
from .optimizers import SGD, Adam, AdamW, RMSprop
from .serialization import load, save

__version__ = "0.1.0"
__all__ = ["Guard", "SGD", "RMSprop", "Adam", "AdamW", "Optimizer", "schedules", "reference", "save", "load",
           "lr_find", "gpu_available"]
