"""The update rules: one module per optimizer, each the whole of what fastopt knows about it on the Python side.

A rule is an :class:`fastopt.Optimizer` subclass that declares its hyperparameters (``DEFAULTS``, with checks in
``validate_hyperparameters``), its state (``STATE_SLOTS`` in torch's names, ``OPTIONAL_STATES`` and
``state_names(group)``), whether a step counts (``counts_step``), the row of the kernels' group table (``COLUMNS``,
``group_row``) and its float64 reference (``REFERENCE``). Its element math and step scalars are written once per
backend, under its ``KERNEL`` name: ``kernels/cpu/rules/<KERNEL>.py`` (Numba) and ``kernels/cuda/rules/<KERNEL>.cuh``.
Everything else (chunks, streams, storage formats, grad control, schedules) is the generic fused loop of each backend.
"""
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .lamb import LAMB
from .lion import Lion
from .rmsprop import RMSprop
from .schedule_free import AdamWScheduleFree, SGDScheduleFree
from .sgd import SGD

OPTIMIZERS = (SGD, RMSprop, Adam, AdamW, Adagrad, Lion, AdamWScheduleFree, SGDScheduleFree, LAMB)
# One class per kernel rule (AdamW shares Adam's): what the CUDA sources are compiled with.
RULES = {cls.KERNEL: cls for cls in reversed(OPTIMIZERS)}
# The float64 reference functions by name (``fastopt.reference.adam`` etc.).
REFERENCES = {cls.REFERENCE.__name__: cls.REFERENCE for cls in OPTIMIZERS}

__all__ = [cls.__name__ for cls in OPTIMIZERS]
