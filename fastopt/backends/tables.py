"""Host-side building of the tables the fused kernels read, shared by the CPU and CUDA engines.

The layouts are described in ``fastopt.kernels.cpu.tables``. Each engine keeps one set of tables per param
dtype (a "bucket"); the functions here fill them from the optimizer, given the engine's ``address_of(array)``.
"""
import numpy as np

from .. import schedules
from ..kernels.cpu import tables


def indices_by_dtype(params):
    """{dtype: the indices of the params of that dtype}, in order: one bucket, and one kernel call, per dtype."""
    by_dtype = {}
    for index, param in enumerate(params):
        by_dtype.setdefault(param.dtype, []).append(index)
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


def fill_tensor_tables(optimizer, indices, addresses, tensor_group, address_of):
    """Each tensor's group and the addresses of its param, lr_scale and state buffers (0 where absent)."""
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


def set_grad_addresses(addresses, indices, grads, address_of):
    """The GRAD column for this step: 0 skips the tensor (no grad); an empty grad has no address, so -1 marks
    it present (it has no chunks to read, but its step still counts)."""
    column = addresses[:, tables.GRAD]
    for position, index in enumerate(indices):
        grad = grads[index]
        column[position] = 0 if grad is None else (address_of(grad) or -1)
