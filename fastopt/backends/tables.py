"""Host-side building of the tables the fused kernels read, shared by the CPU and CUDA engines.

The layouts are described in ``fastopt.kernels.cpu.tables``. Each engine keeps one set of tables per param
dtype (a "bucket"); the functions here fill them from the optimizer, given the engine's ``address_of(array)``.
"""
import numpy as np

from .. import dtypes, schedules
from ..kernels.cpu import tables


def indices_by_math_dtype(optimizer):
    """{math dtype: the indices of the params whose update runs in it}, in order: one bucket, and one kernel call,
    per math dtype (float32 holds the float32, bfloat16 and float16 params)."""
    by_dtype = {}
    for index in range(len(optimizer._params)):
        by_dtype.setdefault(dtypes.math_dtype(optimizer.param_storage(index)), []).append(index)
    return by_dtype


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


def group_tables(optimizer):
    """(group_hyper, schedule_program, schedule_base): each group's hyperparameter row (float64, the optimizer's
    ``COLUMNS``) and its lr schedule packed into one program with the start of each group's part."""
    rows = [optimizer.group_row(group) for group in optimizer.param_groups]
    group_hyper = np.array([[row[name] for name in optimizer.COLUMNS] for row in rows], dtype=np.float64)
    programs = [schedules.as_schedule(group["lr"]).program() for group in optimizer.param_groups]
    schedule_base = np.cumsum([0] + [program.size for program in programs[:-1]]).astype(np.int64)
    return group_hyper, np.concatenate(programs), schedule_base


def fill_tensor_tables(optimizer, indices, addresses, tensor_group, tensor_format, math, address_of):
    """Each tensor's group, the addresses of its param, lr_scale, state and master buffers (0 where absent) and
    the storage formats of its param and states under the bucket's ``math`` dtype."""
    group_of, lr_scale_of = [], []
    for number, group in enumerate(optimizer.param_groups):
        group_of += [number] * len(group["params"])
        lr_scale_of += list(group["lr_scale"] or [None] * len(group["params"]))
    for position, index in enumerate(indices):
        tensor_group[position] = group_of[index]
        addresses[position, tables.PARAM] = address_of(optimizer._params[index])
        scale = lr_scale_of[index]
        addresses[position, tables.LR_SCALE] = 0 if scale is None else address_of(scale)
        state = optimizer.state[index]
        for slot, name in enumerate(optimizer.STATE_SLOTS):
            buffer = state.get(name)
            addresses[position, tables.STATE0 + slot] = 0 if buffer is None else address_of(buffer)
        master = state.get("master_param")
        # An empty master has no address; -1 marks it present, as for grads (it has no chunks to read).
        addresses[position, tables.MASTER] = 0 if master is None else (address_of(master) or -1)
        tensor_format[position, tables.PARAM_FORMAT] = dtypes.kernel_format(
            optimizer.param_storage(index), math, stochastic=optimizer.rounding == "stochastic")
        tensor_format[position, tables.STATE_FORMAT] = dtypes.kernel_format(optimizer.state_storage(index), math)


def set_grads(addresses, tensor_format, indices, grads, math, address_of, storage_name):
    """The GRAD column and grad formats for this step: address 0 skips the tensor (no grad); an empty grad has
    no address, so -1 marks it present (it has no chunks to read, but its step still counts). Returns whether a
    grad format changed (the formats change only when the grads' dtypes do)."""
    column = addresses[:, tables.GRAD]
    formats = tensor_format[:, tables.GRAD_FORMAT]
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
