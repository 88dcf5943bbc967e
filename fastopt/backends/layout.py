"""What an engine is handed: a frozen :class:`Layout` of the buffers it addresses and a :class:`GroupTable` of the
groups' rows and schedules, and the host-side building of the tables the fused kernels read from them (CPU and
CUDA alike; the table layouts are described in ``fastopt.kernels.cpu.layout``).

The optimizer builds a new Layout whenever a buffer the kernels address changes (a state buffer created, an
``lr_scale`` replaced, a checkpoint loaded) and a new GroupTable whenever a group's hyperparameters do; an engine
compares them by identity and rebuilds its tables only then. Engines read nothing else of the optimizer.
"""
import numpy as np

from .. import dtypes, schedules
from ..kernels.cpu import layout as kernel_layout

MASTER = "master_param"  # the state name of a 16-bit param's float32 master copy


class Layout:
    """Every buffer of one optimizer the kernels address, per param in group order, frozen (tuples throughout).

    - ``rule``: the optimizer class (its ``KERNEL`` names the kernels' rule; the reference engine calls its
      ``reference_step``); ``state_slots``: its ``STATE_SLOTS``.
    - ``params``, ``tensor_group`` (each param's group), ``lr_scale`` (an array or None per param), ``states`` (per
      param, one array or None per state slot), ``master`` (the float32 master copy or None).
    - ``param_storage``, ``state_storage``: storage names ('float64', 'float32', 'bfloat16', 'float16').
    - ``stochastic``: bfloat16 params without a master are rounded stochastically, keyed by ``seed``.
    """

    __slots__ = ("rule", "state_slots", "params", "tensor_group", "lr_scale", "states", "master", "param_storage",
                 "state_storage", "stochastic", "seed")

    def __init__(self, *, rule, params, tensor_group, lr_scale, states, master, param_storage, state_storage,
                 stochastic, seed):
        values = dict(rule=rule, state_slots=tuple(rule.STATE_SLOTS), params=tuple(params),
                      tensor_group=tuple(tensor_group), lr_scale=tuple(lr_scale),
                      states=tuple(tuple(row) for row in states), master=tuple(master),
                      param_storage=tuple(param_storage), state_storage=tuple(state_storage),
                      stochastic=bool(stochastic), seed=int(seed))
        for name, value in values.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError("a Layout is frozen: the optimizer builds a new one when its buffers change")

    def indices_by_math_dtype(self):
        """{math dtype: the indices of the params whose update runs in it}, in order: one bucket, and one kernel call,
        per math dtype (float32 holds the float32, bfloat16 and float16 params)."""
        by_dtype = {}
        for index, storage in enumerate(self.param_storage):
            by_dtype.setdefault(dtypes.math_dtype(storage), []).append(index)
        return by_dtype

    def kernel_formats(self, index, math):
        """(param format, state format) codes of param ``index`` under the bucket's ``math`` dtype."""
        return (dtypes.kernel_format(self.param_storage[index], math, stochastic=self.stochastic),
                dtypes.kernel_format(self.state_storage[index], math))


class GroupTable:
    """The groups as the kernels read them: ``group_hyper`` (float64 [groups, columns]: kernel_layout's
    GROUP_COLUMNS, then the rule's ``COLUMNS``), each group's lr schedule packed into ``schedule_program`` with the
    start of each group's part in ``schedule_base``, and ``groups`` (the group dicts as they were, for the reference
    engine: each with its ``lr`` schedule)."""

    __slots__ = ("group_hyper", "schedule_program", "schedule_base", "groups")

    def __init__(self, rule, groups):
        width = kernel_layout.GROUP_COLUMNS + len(rule.COLUMNS)
        self.group_hyper = np.zeros((len(groups), width), dtype=np.float64)
        for number, group in enumerate(groups):
            row = rule.group_row(group)
            live = rule.slot_mask(rule.state_names(group))
            self.group_hyper[number, :kernel_layout.GROUP_COLUMNS] = (float(rule.counts_step(group)), float(live),
                                                                      float(group["maximize"]))
            self.group_hyper[number, kernel_layout.GROUP_COLUMNS:] = [row[name] for name in rule.COLUMNS]
        programs = [schedules.as_schedule(group["lr"]).program() for group in groups]
        self.schedule_base = np.cumsum([0] + [program.size for program in programs[:-1]]).astype(np.int64)
        self.schedule_program = np.concatenate(programs)
        self.groups = tuple(dict(group) for group in groups)


def chunk_table(sizes, chunk):
    """(chunk_tensor, chunk_start, chunk_length) as int64 arrays: each tensor of ``sizes`` cut into pieces of at
    most ``chunk`` elements, in order. An empty tensor has no chunks."""
    tensor, start, length = [], [], []
    for position, size in enumerate(sizes):
        for offset in range(0, size, chunk):
            tensor.append(position)
            start.append(offset)
            length.append(min(chunk, size - offset))
    return (np.asarray(tensor, dtype=np.int64), np.asarray(start, dtype=np.int64),
            np.asarray(length, dtype=np.int64))


def fill_tensor_tables(layout, indices, addresses, tensor_group, tensor_format, math, address_of):
    """Each tensor's group, the addresses of its param, lr_scale, state and master buffers (0 where absent) and
    the storage formats of its param and states under the bucket's ``math`` dtype."""
    for position, index in enumerate(indices):
        tensor_group[position] = layout.tensor_group[index]
        addresses[position, kernel_layout.PARAM] = address_of(layout.params[index])
        scale = layout.lr_scale[index]
        addresses[position, kernel_layout.LR_SCALE] = 0 if scale is None else address_of(scale)
        for slot, buffer in enumerate(layout.states[index]):
            addresses[position, kernel_layout.STATE0 + slot] = 0 if buffer is None else address_of(buffer)
        master = layout.master[index]
        # An empty master has no address; -1 marks it present, as for grads (it has no chunks to read).
        addresses[position, kernel_layout.MASTER] = 0 if master is None else (address_of(master) or -1)
        tensor_format[position, kernel_layout.PARAM_FORMAT], tensor_format[position, kernel_layout.STATE_FORMAT] = \
            layout.kernel_formats(index, math)


def set_grads(addresses, tensor_format, indices, grads, math, address_of, storage_name):
    """The GRAD column and grad formats for this step: address 0 skips the tensor (no grad); an empty grad has
    no address, so -1 marks it present (it has no chunks to read, but its step still counts). Returns whether a
    grad format changed (the formats change only when the grads' dtypes do)."""
    column = addresses[:, kernel_layout.GRAD]
    formats = tensor_format[:, kernel_layout.GRAD_FORMAT]
    changed = False
    for position, index in enumerate(indices):
        grad = grads[index]
        column[position] = 0 if grad is None else (address_of(grad) or -1)
        if grad is not None:
            grad_format = dtypes.kernel_format(storage_name(grad.dtype), math)
            if formats[position] != grad_format:
                formats[position] = grad_format
                changed = True
    return changed
