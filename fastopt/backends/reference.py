"""The reference backend: each tensor updated by the float64 NumPy reference, the oracle of the tests.

Params and state stay in their storage dtypes between steps; each step widens them to float64, computes and
rounds each result once to float32 and then, for 16-bit storage, once more to it, as the kernels (which compute
in float32) do; 8-bit states are decoded before and encoded after (:mod:`fastopt.quantization`). With a master copy the update reads and writes the master and the param is its rounding.
Stochastic rounding uses the kernels' (seed, step, element) keys, computed by :func:`fastopt.reference.counter_hash`
(an independent NumPy implementation of the kernels' hash).
"""
import numpy as np

from .. import dtypes, quantization, reference, schedules
from ..kernels.cpu import layout as kernel_layout
from . import GradControl, HostArrays


class ReferenceBackend(HostArrays):
    def __init__(self, layout):
        self.steps = np.zeros(len(layout.params), dtype=np.int64)
        self.scalars = np.zeros((len(layout.params), kernel_layout.TENSOR_SCALARS))
        # Each param's position in its kernel bucket: the tensor part of the stochastic-rounding key.
        self.positions = np.zeros(len(layout.params), dtype=np.int64)
        for indices in layout.indices_by_math_dtype().values():
            self.positions[indices] = np.arange(len(indices))

    def bind_grads(self, layout, grads):
        """Check that no grad overlaps a buffer the step writes, as the kernels' engines do (ValueError)."""
        layout.check_reads([(f"grads[{index}]", grad) for index, grad in enumerate(grads) if grad is not None],
                           self.address)

    @staticmethod
    def grad_stats(layout, grads):
        """(sum of squares, number of non-finite values) over all grads, in float64 (the CPU engine's signature)."""
        present = [grad.astype(np.float64) for grad in grads if grad is not None]
        with np.errstate(over="ignore"):  # an overflowing norm is inf, as in the kernels (it clips to 0)
            return (sum(float(np.sum(grad * grad)) for grad in present),
                    sum(int(np.count_nonzero(~np.isfinite(grad))) for grad in present))

    def grad_control(self, layout, grads, unscale, max_norm, skip_nonfinite=True):
        sum_of_squares, nonfinite = self.grad_stats(layout, grads)
        return GradControl(sum_of_squares, nonfinite, unscale, max_norm, skip_nonfinite)

    def step(self, layout, groups, grads, step_count, lr_factor=1.0, control=None):
        self.step_count = step_count
        self.control = GradControl.plain() if control is None else control
        for index, grad in enumerate(grads):
            if grad is not None:
                group = groups.groups[layout.tensor_group[index]]
                lr = float(schedules.as_schedule(group["lr"])(step_count)) * lr_factor
                self._step_tensor(layout, index, grad, group, lr)

    def _step_tensor(self, layout, index, grad, group, lr):
        rule, param, master, scale = layout.rule, layout.params[index], layout.master[index], layout.lr_scale[index]
        names = rule.state_names(group)
        buffers = {name: buffer for name, buffer in zip(layout.state_slots, layout.states[index]) if name in names}
        # 8-bit states: {name: (scales, signed)}; their buffers hold codes.
        coded = {name: (layout.scales[index][slot], layout.coded(index, slot))
                 for slot, name in enumerate(layout.state_slots) if name in names and layout.coded(index, slot) is not None}
        # A tensor that has not stepped starts from its buffers as created: zeros, passed as no state (which the
        # reference reads as zeros, and SGD's momentum buffer as torch's None: it starts as the gradient), or a rule's
        # initial value (Adagrad's), passed as stored (rounded to the buffer's storage, or encoded).
        steps = int(self.steps[index])
        state = {name: self._values(buffer, coded.get(name)) for name, buffer in buffers.items()
                 if steps or rule.initial_state(name, group) != 0}
        state["step"] = steps
        state.update(zip(rule.SCALARS, self.scalars[index]))
        work = (param if master is None else master).astype(np.float64)
        # The kernels round the grad factors to the math dtype (torch's are float32 tensors for float32 grads).
        math = dtypes.math_dtype(layout.param_storage[index])
        unscale, clip = self.control.values[:2].astype(math)
        rule.reference_step(work, grad.astype(np.float64) * float(unscale) * float(clip), state, group, lr,
                            1.0 if scale is None else scale.astype(np.float64),
                            state_dtype="8bit" if coded else dtypes.numpy_dtype(layout.state_storage[index]))
        self._store_param(layout, index, work, layout.stochastic)
        for slot, (name, buffer) in enumerate(zip(layout.state_slots, layout.states[index])):
            if name not in buffers:
                continue
            if name in coded:
                scales, signed = coded[name]
                noise = None
                if layout.rounds_codes_stochastically(index, slot):
                    block_starts = np.arange(0, buffer.size, quantization.BLOCK)
                    keys = layout.stochastic_code_key(slot, self.positions[index], block_starts)
                    noise = reference.code_noise(layout.seed, self.step_count, keys)[:buffer.size]
                codes, scales[...] = quantization.quantize(reference.round_to_storage(state[name], np.float32), signed,
                                                           noise=noise)
                buffer[...] = codes.reshape(buffer.shape)
            elif name in state:
                buffer[...] = reference.round_to_storage(state[name], buffer.dtype)
        self.scalars[index, :len(rule.SCALARS)] = [state[name] for name in rule.SCALARS]
        if rule.counts_step(group):
            self.steps[index] += 1

    @staticmethod
    def _values(buffer, coded):
        """A state buffer's values in float64: decoded where it is 8-bit (``coded``: (its scales, signed))."""
        if coded is None:
            return buffer.astype(np.float64)
        scales, signed = coded
        return quantization.dequantize(buffer, scales, signed).astype(np.float64)

    def _store_param(self, layout, index, work, stochastic):
        """Param ``index`` (and its master) from its float64 update ``work``: the master rounded to float32 and the
        param as its rounding, or the param rounded to its storage, stochastically where ``stochastic`` (bfloat16
        params without a master)."""
        param, master = layout.params[index], layout.master[index]
        if master is not None:
            master[...] = reference.round_to_storage(work, master.dtype)
            param[...] = master.astype(param.dtype)
        elif stochastic and param.dtype.itemsize == 2:
            elements = (int(self.positions[index]) << 40) + np.arange(param.size)
            param[...] = reference.round_to_storage(work, param.dtype, seed=layout.seed, step=self.step_count,
                                                    elements=elements).reshape(param.shape)
        else:
            param[...] = reference.round_to_storage(work, param.dtype)

    def blend(self, layout, slot, weights):
        """``p = p + w (s - p)`` in float64 for each param with a buffer ``s`` in state slot ``slot`` (the kernels'
        blend_toward_state), rounded to nearest in the param's storage (through its master, where it has one)."""
        for index, (param, master) in enumerate(zip(layout.params, layout.master)):
            target = layout.states[index][slot]
            if target is not None:
                work = (param if master is None else master).astype(np.float64)
                work += weights[index] * (target.astype(np.float64) - work)
                self._store_param(layout, index, work, stochastic=False)

    def tensor_steps(self):
        return self.steps.copy()

    def set_tensor_steps(self, steps):
        self.steps[:] = steps

    def tensor_scalars(self):
        return self.scalars.copy()

    def set_tensor_scalars(self, scalars):
        self.scalars[:] = scalars
