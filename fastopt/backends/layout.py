"""What an engine is handed: a frozen :class:`Layout` of the buffers it addresses and a :class:`GroupTable` of the
groups' rows and schedules, and the host-side building of the tables the fused kernels read from them (CPU and
CUDA alike; the table layouts are described in ``fastopt.kernels.cpu.layout``).

The optimizer builds a new Layout whenever a buffer the kernels address changes (a state buffer created or
replaced, an ``lr_scale`` replaced, a checkpoint loaded) and a new GroupTable whenever a group's hyperparameters do;
an engine compares them by identity and rebuilds its tables only then. Engines read nothing else of the optimizer.

A Layout holds a reference to every buffer in it, so none is freed while a kernel may address it, and it checks the
memory they cover: the buffers a step writes (params, states, master copies) are disjoint, and no buffer the kernels
only read (an ``lr_scale``; a grad, per step: :meth:`Layout.check_reads`) overlaps one they write. Parallel chunks
then never touch a byte another chunk writes, and a step's result does not depend on thread timing.
"""
import numpy as np

from .. import dtypes, quantization, schedules
from ..kernels.cpu import layout as kernel_layout

MASTER = "master_param"  # the state name of a 16-bit param's float32 master copy
SCALES_SUFFIX = "_absmax"  # the state name of an 8-bit state's block scales: its own name and this


class Layout:
    """Every buffer of one optimizer the kernels address, per param in group order, frozen (tuples throughout).

    - ``rule``: the optimizer class (its ``KERNEL`` names the kernels' rule; the reference engine calls its
      ``reference_step``); ``state_slots``: its ``STATE_SLOTS``.
    - ``params``, ``tensor_group`` (each param's group), ``lr_scale`` (an array or None per param), ``states`` (per
      param, one array or None per state slot), ``master`` (the float32 master copy or None).
    - ``param_storage``, ``state_storage``: storage names ('float64', 'float32', 'bfloat16', 'float16'; the latter
      of the states not stored in 8 bits).
    - ``scales`` (per param, one array or None per state slot): where a state is stored in 8 bits
      (:mod:`fastopt.quantization`), its block scales; its ``states`` entry then holds its uint8 codes, in the signed
      or unsigned map as ``quantization.STATE_SIGNED`` says of its name.
    - ``stochastic``: bfloat16 params without a master are rounded stochastically, keyed by ``seed``.
    - ``stochastic_codes``: the names of the states whose 8-bit codes are rounded stochastically, keyed by ``seed``
      (:meth:`stochastic_code_key`).
    """

    __slots__ = ("rule", "state_slots", "params", "tensor_group", "lr_scale", "states", "master", "param_storage",
                 "state_storage", "scales", "stochastic", "seed", "stochastic_codes", "written")

    def __init__(self, *, rule, params, tensor_group, lr_scale, states, master, param_storage, state_storage,
                 stochastic, seed, address_of, scales=None, stochastic_codes=()):
        states = tuple(tuple(row) for row in states)
        values = dict(rule=rule, state_slots=tuple(rule.STATE_SLOTS), params=tuple(params),
                      tensor_group=tuple(tensor_group), lr_scale=tuple(lr_scale), states=states,
                      scales=tuple((None,) * len(row) for row in states) if scales is None else
                      tuple(tuple(row) for row in scales), master=tuple(master),
                      param_storage=tuple(param_storage), state_storage=tuple(state_storage),
                      stochastic=bool(stochastic), seed=int(seed), stochastic_codes=frozenset(stochastic_codes))
        for name, value in values.items():
            object.__setattr__(self, name, value)
        written = [(f"param {index}", param) for index, param in enumerate(self.params)]
        for index, (row, scales, master) in enumerate(zip(self.states, self.scales, self.master)):
            written += [(f"state {name!r} of param {index}", buffer)
                        for name, buffer in zip(self.state_slots, row) if buffer is not None]
            written += [(f"state {name + SCALES_SUFFIX!r} of param {index}", buffer)
                        for name, buffer in zip(self.state_slots, scales) if buffer is not None]
            written += [] if master is None else [(f"{MASTER!r} of param {index}", master)]
        object.__setattr__(self, "written", MemorySpans(written, address_of))
        scales = [(f"lr_scale of param {index}", scale) for index, scale in enumerate(self.lr_scale)
                  if scale is not None]
        self.check_reads(scales, address_of)

    def __setattr__(self, name, value):
        raise AttributeError("a Layout is frozen: the optimizer builds a new one when its buffers change")

    def check_reads(self, labelled, address_of):
        """ValueError if an array of ``labelled`` ((label, array) pairs, read by the kernels) overlaps a buffer they
        write."""
        self.written.check_disjoint(labelled, address_of)

    def indices_by_math_dtype(self):
        """{math dtype: the indices of the params whose update runs in it}, in order: one bucket, and one kernel call,
        per math dtype (float32 holds the float32, bfloat16 and float16 params)."""
        by_dtype = {}
        for index, storage in enumerate(self.param_storage):
            by_dtype.setdefault(dtypes.math_dtype(storage), []).append(index)
        return by_dtype

    def coded(self, index, slot):
        """None if state slot ``slot`` of param ``index`` is not stored in 8 bits (or the rule has no such slot), else
        whether its map is signed."""
        if slot >= len(self.state_slots) or self.scales[index][slot] is None:
            return None
        return quantization.STATE_SIGNED[self.state_slots[slot]]

    def rounds_codes_stochastically(self, index, slot):
        """Whether state slot ``slot`` of param ``index`` is stored in 8 bits with stochastically rounded codes."""
        return self.coded(index, slot) is not None and self.state_slots[slot] in self.stochastic_codes

    @staticmethod
    def stochastic_code_key(slot, position, elements):
        """The ``element`` of the random key of stochastically rounded codes (uint64): state slot ``slot``'s
        elements ``elements`` of the tensor at ``position`` in its kernel bucket. A param's stochastic rounding uses
        ``(position << 40) + element``; a state slot's adds ``(slot + 1) << 62``, so the streams never meet."""
        return (np.uint64(slot + 1) << np.uint64(62)) | ((np.uint64(position) << np.uint64(40))
                                                         + np.asarray(elements, dtype=np.uint64))

    def kernel_formats(self, index, math):
        """(param format, state format) codes of param ``index`` under the bucket's ``math`` dtype."""
        return (dtypes.kernel_format(self.param_storage[index], math, stochastic=self.stochastic),
                dtypes.kernel_format(self.state_storage[index], math))


class MemorySpans:
    """The bytes covered by arrays that must not share memory: their [start, end) ranges, sorted by start, with a label
    each. Empty arrays cover nothing. Raises ValueError naming two of the arrays that overlap."""

    def __init__(self, labelled, address_of):
        spans = sorted((address_of(array), array.nbytes, label) for label, array in labelled if array.size)
        self.starts = np.array([start for start, _, _ in spans], dtype=np.int64)
        self.ends = self.starts + np.array([size for _, size, _ in spans], dtype=np.int64)
        self.labels = [label for _, _, label in spans]
        # Sorted by start, ranges are pairwise disjoint exactly when each ends before the next begins.
        clash = np.flatnonzero(self.starts[1:] < self.ends[:-1])
        if clash.size:
            first, second = self.labels[clash[0]], self.labels[clash[0] + 1]
            raise ValueError(f"{second} shares memory with {first}: each buffer an optimizer writes must have memory "
                             "of its own (pass a copy)")

    def first_overlap(self, starts, ends):
        """(position, label): the first range [starts[k], ends[k]) that overlaps one of these, and that one's label;
        None if none does (an empty range overlaps nothing)."""
        if not self.labels:
            return None
        following = np.searchsorted(self.ends, starts, side="right")  # the first span ending after each start
        candidate = np.minimum(following, len(self.labels) - 1)
        hits = np.flatnonzero((following < len(self.labels)) & (self.starts[candidate] < ends) & (starts < ends))
        if not hits.size:
            return None
        return int(hits[0]), self.labels[candidate[hits[0]]]

    def check_disjoint(self, labelled, address_of):
        """ValueError if an array of ``labelled`` ((label, array) pairs) overlaps one of these."""
        labelled = [(label, array) for label, array in labelled if array.size]
        starts = np.array([address_of(array) for _, array in labelled], dtype=np.int64)
        ends = starts + np.array([array.nbytes for _, array in labelled], dtype=np.int64)
        overlap = self.first_overlap(starts, ends)
        if overlap is not None:
            raise read_overlap_error(labelled[overlap[0]][0], overlap[1])


def read_overlap_error(label, written):
    return ValueError(f"{label} shares memory with {written}, which the step writes (the result would depend on "
                      "thread timing): pass an array in memory of its own")


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
    """Each tensor's group, the addresses of its param, lr_scale, state, scales and master buffers (0 where absent),
    the storage formats of its param and states under the bucket's ``math`` dtype and which states are 8-bit."""
    for position, index in enumerate(indices):
        tensor_group[position] = layout.tensor_group[index]
        addresses[position, kernel_layout.PARAM] = address_of(layout.params[index])
        scale = layout.lr_scale[index]
        addresses[position, kernel_layout.LR_SCALE] = 0 if scale is None else address_of(scale)
        codes = 0
        for slot, (buffer, scales) in enumerate(zip(layout.states[index], layout.scales[index])):
            addresses[position, kernel_layout.STATE0 + slot] = 0 if buffer is None else address_of(buffer)
            addresses[position, kernel_layout.SCALES0 + slot] = 0 if scales is None else address_of(scales)
            signed = layout.coded(index, slot)
            if signed is not None:
                codes |= (kernel_layout.CODES_8BIT | (kernel_layout.SIGNED_CODES if signed else 0)) << slot
            if layout.rounds_codes_stochastically(index, slot):
                codes |= kernel_layout.STOCHASTIC_CODES << slot
        tensor_format[position, kernel_layout.STATE_CODES] = codes
        master = layout.master[index]
        # An empty master has no address; -1 marks it present, as for grads (it has no chunks to read).
        addresses[position, kernel_layout.MASTER] = 0 if master is None else (address_of(master) or -1)
        tensor_format[position, kernel_layout.PARAM_FORMAT], tensor_format[position, kernel_layout.STATE_FORMAT] = \
            layout.kernel_formats(index, math)


def set_grads(layout, addresses, grad_ends, tensor_format, indices, grads, math, address_of, storage_name):
    """The GRAD column and grad formats for this step, after checking that no grad overlaps a buffer the step writes
    (ValueError; ``grad_ends`` is scratch for the ends of the grads' memory). Address 0 skips the tensor (no grad);
    an empty grad has no address, so -1 marks it present (it has no chunks to read, but its step still counts)."""
    column = addresses[:, kernel_layout.GRAD]
    formats = tensor_format[:, kernel_layout.GRAD_FORMAT]
    for position, index in enumerate(indices):
        grad = grads[index]
        if grad is None:
            column[position] = grad_ends[position] = 0
        else:
            start = address_of(grad) if grad.size else -1
            column[position], grad_ends[position] = start, start + grad.nbytes
            formats[position] = dtypes.kernel_format(storage_name(grad.dtype), math)
    overlap = layout.written.first_overlap(column, grad_ends)
    if overlap is not None:
        column[:] = 0  # no half-set grads left for a later call
        raise read_overlap_error(f"grads[{indices[overlap[0]]}]", overlap[1])
