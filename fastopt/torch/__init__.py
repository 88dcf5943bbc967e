"""Drop-in torch.optim optimizers backed by fastopt kernels (imports torch; `import fastopt` does not).

    from fastopt.torch import AdamW          # instead of: from torch.optim import AdamW
    optimizer = AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)

Each fastopt optimizer (``SGD``, ``RMSprop``, ``Adam``, ``AdamW``, ...: ``__all__``) is a ``torch.optim.Optimizer``
subclass with torch's signature and defaults (or those of the package that defines it): param groups,
``zero_grad``, ``step(closure)``, torch's lr schedulers, ``torch.amp.GradScaler`` and ``state_dict`` checkpoints
(interchangeable with ``torch.optim``'s) work as with torch. The step is one fused
fastopt kernel over zero-copy views of the params: Numba on CPU tensors, CUDA through CuPy on CUDA tensors
(float32, float64, bfloat16 and float16, contiguous, one device per optimizer). See
:class:`fastopt.torch.adapter.TorchOptimizer` for what goes beyond torch (fastopt schedules as ``lr``, per-element
``lr_scale``, mixed precision: master weights, bfloat16 states, stochastic rounding, fused clipping), and
:mod:`fastopt.torch.distributed` for the sharded optimizer.
"""
from . import optimizers
from .adapter import TorchOptimizer
from .optimizers import *  # noqa: F401,F403 (one class per rule: optimizers.__all__)

__all__ = optimizers.__all__ + ["TorchOptimizer"]
