"""The reference backend: each tensor updated by the float64 NumPy reference, for debugging.

Params and state stay in their own dtype between steps; each step computes in float64 and rounds once.
"""
import numpy as np

from .. import schedules
from . import HostArrays


class ReferenceBackend(HostArrays):
    def __init__(self, optimizer):
        self.optimizer = optimizer
        self.steps = np.zeros(len(optimizer._params), dtype=np.int64)

    @staticmethod
    def grad_stats(grads):
        present = [grad.astype(np.float64) for grad in grads if grad is not None]
        return (sum(float(np.sum(grad * grad)) for grad in present),
                sum(int(np.count_nonzero(~np.isfinite(grad))) for grad in present))

    def step(self, grads, step_count, groups_changed, lr_factor=1.0):
        optimizer = self.optimizer
        index = 0
        for group in optimizer.param_groups:
            lr = float(schedules.as_schedule(group["lr"])(step_count)) * lr_factor
            scales = group["lr_scale"] or [None] * len(group["params"])
            for param, scale in zip(group["params"], scales):
                grad = grads[index]
                if grad is not None:
                    self._step_tensor(index, param, grad, scale, group, lr)
                index += 1

    def _step_tensor(self, index, param, grad, scale, group, lr):
        optimizer = self.optimizer
        buffers = optimizer.state[index]
        # A tensor that has not stepped starts from no state, which the reference reads as zeros (and SGD's
        # momentum buffer as torch's None: it starts as the gradient).
        steps = int(self.steps[index])
        state = {name: buffer.astype(np.float64) for name, buffer in buffers.items()} if steps else {}
        state["step"] = steps
        work = param.astype(np.float64)
        optimizer.reference_step(work, grad.astype(np.float64), state, group, lr,
                                 1.0 if scale is None else scale.astype(np.float64))
        param[...] = work
        for name, buffer in buffers.items():
            if name in state:
                buffer[...] = state[name]
        if optimizer.counts_step(group):
            self.steps[index] += 1

    def tensor_steps(self):
        return self.steps.copy()

    def set_tensor_steps(self, steps):
        self.steps[:] = steps
