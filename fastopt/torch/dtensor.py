"""DTensor params (FSDP2's ``fully_shard``, ``distribute_tensor``) in the ``fastopt.torch`` optimizers.

Each process steps its own shards: the core optimizer is made over NumPy (or CuPy) views of each param's local
tensor, so one fused launch updates every local shard (a rank's shard may be empty). What the adapter shows torch is
DTensors again: each state buffer shaped like its param is wrapped with the param's mesh and placements
(``DTensor.from_local(buffer, mesh, placements, shape=, stride=)``), sharing the buffer's memory, so ``state_dict()`` is
what ``torch.distributed.checkpoint`` expects, and what it loads is taken from the local shards.

8-bit states (``state_dtype="8bit"``): whether a param's moments are 8-bit is judged on its global size (the core's
``whole_sizes``), so every rank's shard of a big tensor is 8-bit, even a small or empty one. Each rank codes its local
shard in blocks of 256 starting at the shard's first element (in the local tensor's flat order), so the codes are
shaped like the param and become DTensors like it. The block scales (``name + "_absmax"``) are not: rank ``r`` has
``block_count(local numel)`` of them, which differs between ranks, and a DTensor's ``Shard`` layout splits evenly
(``torch.chunk``). They are shown as one row per rank: a DTensor of global shape ``mesh.shape + (B,)`` with placements
``(Shard(0), ..., Shard(mesh.ndim - 1))``, ``B`` the largest block count of any rank's shard, so rank ``r`` holds its
own row (local shape ``(1, ..., 1, B)``): its scales, then zeros up to ``B`` (padding, which the step never reads and
a load ignores). The row is the live buffer on every rank: where padding is needed, the adapter allocates the padded
row and hands the core its first ``block_count`` entries as the scales buffer (:meth:`DTensorViews.state_entry`).

Rows only mean something for the shards they were cut from, so the entry also holds ``LAYOUT_KEY``
(``"absmax_layout"``): an integer fingerprint of the param's global shape, mesh shape and placements
(:func:`layout_id`). A load compares it with the param's and refuses a state whose scales came from other cuts (another
world size, mesh or placements) with ValueError before anything is written; ``torch.distributed.checkpoint`` itself
refuses rows of another shape (another mesh size). It also refuses such a state for a param that is not a DTensor (a
gathered ``full_state_dict``): the float32 export (the adapter's ``float32_state_dict``, decoded on each rank into
DTensors like the params) is the way out to one process or to ``torch.optim``.

Gradient control needs the grads of the whole model: :class:`GlobalGradStats` is the core's ``grad_reduction``. It
all-reduces this rank's sum of squares and non-finite count (the core's one read of the local grads) over the mesh,
so that the ``max_grad_norm`` clip factor and the non-finite skip are the same on every rank. A param replicated over
some of the mesh's dimensions (``Replicate()``, or a plain tensor beside DTensors) holds the same values on several
ranks: its statistics count ``1 / copies`` from each.

Nothing here runs for plain tensors: :func:`views_for` returns the adapter's views unchanged when no param is a
DTensor, and :func:`is_dtensor` is False until ``torch.distributed.tensor`` has been imported (a DTensor cannot exist
before), so ``fastopt.torch`` never imports it itself.
"""
import functools
import hashlib
import itertools
import math
import sys

import numpy as np
import torch

from .. import quantization
from ..backends.layout import SCALES_SUFFIX

# The key of a DTensor param's state entry that holds the fingerprint of the shards its 8-bit block scales belong to.
LAYOUT_KEY = "absmax_layout"


def _dtensor_class():
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def is_dtensor(tensor):
    dtensor = _dtensor_class()
    return dtensor is not None and isinstance(tensor, dtensor)


def local(tensor):
    """A DTensor's local tensor (the shard this rank holds, the tensor itself: ``to_local()`` outside autograd,
    without the view that ``to_local()`` of a Parameter makes); any other tensor as it is."""
    kind = type(tensor)
    if kind is torch.Tensor or kind is torch.nn.Parameter:  # the common case, in a tenth of isinstance's time
        return tensor
    return tensor._local_tensor if is_dtensor(tensor) else tensor


def _local_region(param):
    """(shape, offset) of this rank's shard of DTensor ``param`` in the full tensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)


def local_part(tensor, param):
    """What of ``tensor`` (an ``lr_scale`` entry) goes with this rank's shard of ``param``: a DTensor's local tensor,
    or, for a DTensor param and a plain tensor of the param's full shape, this rank's slice of it (a view for
    ``Shard(0)``: edits in place reach the step; a copy for shards along other dimensions). Anything else as it is
    (the core checks shapes)."""
    if is_dtensor(tensor):
        return local(tensor)
    if not is_dtensor(param) or not isinstance(tensor, torch.Tensor) or tensor.shape != param.shape:
        return tensor
    shape, offset = _local_region(param)
    part = tensor[tuple(slice(start, start + size) for start, size in zip(offset, shape))]
    return part if part.is_contiguous() else part.contiguous()


def state_entry(param, entry):
    """Param ``param``'s state entry as torch shows it: for a DTensor param, each buffer shaped like the param (a
    tensor sharing the core's local buffer) as a DTensor with the param's mesh, placements, shape and stride; ``step``
    stays a plain tensor, as in ``torch.optim``. 8-bit block scales go through :meth:`DTensorViews.state_entry`."""
    if not is_dtensor(param):
        return entry
    from torch.distributed.tensor import DTensor

    return {name: value if name == "step" else
            DTensor.from_local(value, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                               stride=param.stride())
            for name, value in entry.items()}


def _placement_key(placement):
    """A placement as plain data for :func:`layout_id`: its kind and the fields that say where shards are cut (not
    its repr, which torch may reword)."""
    return (type(placement).__name__,) + tuple((name, getattr(placement, name)) for name in ("dim", "split_factor")
                                               if hasattr(placement, name))


@functools.lru_cache(maxsize=1024)
def _rows(shape, mesh_shape, placements):
    """(most blocks of any rank's shard, layout fingerprint) of a DTensor of global ``shape`` over a mesh of
    ``mesh_shape`` with ``placements``."""
    from torch.distributed.tensor import Replicate, Shard

    if all(type(placement) in (Shard, Replicate) for placement in placements):
        # torch.chunk's cut: the first chunk along a dimension is the largest (ceil), so coordinate (0, ..., 0) holds
        # the largest shard.
        largest = list(shape)
        for placement, size in zip(placements, mesh_shape):
            if type(placement) is Shard:
                largest[placement.dim] = -(-largest[placement.dim] // size)
        most = math.prod(largest)
    else:  # other shardings (_StridedShard): every coordinate's shard
        from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset

        most = max(math.prod(_compute_local_shape_and_global_offset(shape, mesh_shape, list(coordinate),
                                                                    placements)[0])
                   for coordinate in itertools.product(*map(range, mesh_shape)))
    key = repr((quantization.BLOCK, shape, mesh_shape, tuple(map(_placement_key, placements))))
    fingerprint = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=7).digest(), "little")
    return quantization.block_count(most), fingerprint


def _row_layout(param):
    """(global shape, placements, local shape) of DTensor ``param``'s block-scale rows (see the module docstring)."""
    from torch.distributed.tensor import Shard

    mesh = param.device_mesh
    blocks, _ = _rows(tuple(param.shape), tuple(mesh.shape), tuple(param.placements))
    return tuple(mesh.shape) + (blocks,), tuple(Shard(dim) for dim in range(mesh.ndim)), (1,) * mesh.ndim + (blocks,)


def layout_id(param):
    """The fingerprint of DTensor ``param``'s cut into shards (global shape, mesh shape, placements), under which its
    8-bit block scales are saved (``LAYOUT_KEY``): a non-negative integer below 2^56."""
    return _rows(tuple(param.shape), tuple(param.device_mesh.shape), tuple(param.placements))[1]


def _describe(param):
    return (f"shape {tuple(param.shape)} on a mesh of shape {tuple(param.device_mesh.shape)} with placements "
            f"{tuple(param.placements)}")


def saved_entry(param, saved, where):
    """What of ``saved`` (param ``param``'s state entry as torch holds it: ``optimizer.state[p]`` or a loaded
    checkpoint's) the core takes: the entry without ``LAYOUT_KEY``, each 8-bit state's block scales as this rank's
    ``block_count`` of them. ValueError (before anything is written) for scales that belong to other shards: a
    ``LAYOUT_KEY`` other than the param's, scales that are not rows of its layout, or ``LAYOUT_KEY`` for a param that
    is not a DTensor (a gathered ``full_state_dict`` of 8-bit states). Anything else is left to the core's checks."""
    scales = [name for name in saved if isinstance(name, str) and name.endswith(SCALES_SUFFIX)]
    layout = saved.get(LAYOUT_KEY)
    if not is_dtensor(param):
        if layout is not None:
            raise ValueError(f"{where} has {LAYOUT_KEY!r}: its 8-bit states come from the shards of a DTensor (FSDP2) "
                             "param, whose block scales are per shard (one row per rank), and this param is not a "
                             "DTensor. Load the sharded state into an optimizer over the same sharding, or export it "
                             "with float32_state_dict() (decoded; gather with full_tensor()), which loads anywhere")
        return saved
    if layout is None and not scales:
        return saved
    if layout is None:
        raise ValueError(f"{where} has 8-bit block scales ({', '.join(map(repr, scales))}) but no {LAYOUT_KEY!r}: "
                         "they are not the per-shard rows of this DTensor param's 8-bit states (a single process's "
                         "scales do not fit shards); load a float32 state (float32_state_dict()) instead")
    if layout != layout_id(param):
        raise ValueError(f"{where}: its 8-bit block scales were saved from other shards ({LAYOUT_KEY} {layout!r}; "
                         f"this param, of {_describe(param)}, has {layout_id(param)}): another world size, mesh or "
                         "placements. Blocks are cut per shard, so they do not carry over; load with the saving run's "
                         "mesh and placements, or save a float32 state (float32_state_dict()), which reshards")
    rows_shape, placements, _ = _row_layout(param)
    blocks = quantization.block_count(local(param).numel())
    entry = {name: value for name, value in saved.items() if name != LAYOUT_KEY}
    for name in scales:
        value = saved[name]
        if not is_dtensor(value) or tuple(value.shape) != rows_shape or tuple(value.placements) != placements:
            got = (f"a DTensor of shape {tuple(value.shape)} with placements {tuple(value.placements)}"
                   if is_dtensor(value) else f"a {type(value).__name__} of shape {tuple(getattr(value, 'shape', ()))}")
            raise ValueError(f"{where}: {name!r} is {got}; the block scales of a param of {_describe(param)} are a "
                             f"DTensor of shape {rows_shape} with placements {placements} (one row per rank)")
        entry[name] = local(value).reshape(-1)[:blocks]
    return entry


def decoded_states(state_dict):
    """``state_dict`` (torch's format) with the 8-bit states of DTensor params (the entries holding ``LAYOUT_KEY``)
    decoded on this rank, each from its shard of codes and its row of scales, into float32 DTensors like the codes;
    their scales and ``LAYOUT_KEY`` dropped (new dicts for those entries; the rest shared)."""
    from torch.distributed.tensor import DTensor

    state = dict(state_dict["state"])
    for key, entry in state.items():
        if not isinstance(entry, dict) or LAYOUT_KEY not in entry:
            continue
        entry = state[key] = {name: value for name, value in entry.items() if name != LAYOUT_KEY}
        for name in [name for name in entry if name + SCALES_SUFFIX in entry]:
            codes, scales = entry[name], entry.pop(name + SCALES_SUFFIX)
            shard = local(codes)
            row = local(scales).reshape(-1)[:quantization.block_count(shard.numel())]
            values = quantization.dequantize(shard.detach().cpu().numpy(), row.detach().cpu().numpy(),
                                             quantization.STATE_SIGNED[name])
            entry[name] = DTensor.from_local(torch.from_numpy(values).to(shard.device), codes.device_mesh,
                                             codes.placements, run_check=False, shape=codes.shape,
                                             stride=codes.stride())
    return dict(state_dict, state=state)


class GlobalGradStats:
    """The core's ``grad_reduction`` for DTensor params: this rank's (sum of squares, non-finite count) to the
    model's, in one all-reduce of two float64 numbers over the mesh's process group.

    Params must share one device mesh; a mesh of more than one dimension must span the default process group. Grads
    of params held whole by several ranks (``Replicate()`` placements, plain tensors) are read again (torch, on the
    local tensor) to count ``1 / copies`` of them from each rank; FSDP2's all-``Shard`` params need no such read."""

    def __init__(self, params):
        meshes = {param.device_mesh for param in params if is_dtensor(param)}
        if len(meshes) != 1:
            raise ValueError(f"the optimizer's DTensor params are on {len(meshes)} device meshes; fastopt.torch steps "
                             "the params of one mesh per optimizer (make one optimizer per mesh)")
        mesh = meshes.pop()
        if mesh.ndim == 1:
            self.group = mesh.get_group()
        elif mesh.size() == torch.distributed.get_world_size():
            self.group = None  # the default group: every rank of the mesh
        else:
            raise NotImplementedError(f"a {mesh.ndim}-dimensional device mesh of {mesh.size()} of the "
                                      f"{torch.distributed.get_world_size()} ranks: fastopt.torch reduces grad "
                                      "statistics over 1-dimensional meshes or meshes of every rank")
        self.device = local(params[0]).device
        self.replicated = []  # (param, 1 - 1 / copies) of params whose local values several ranks hold
        for param in params:
            if is_dtensor(param):
                copies = int(np.prod([mesh.size(dim) for dim, placement in enumerate(param.placements)
                                      if placement.is_replicate()], dtype=np.int64))
            else:
                copies = mesh.size()
            if copies > 1:
                self.replicated.append((param, 1.0 - 1.0 / copies))

    def __call__(self, sum_of_squares, nonfinite):
        for param, excess in self.replicated:
            if param.grad is None:
                continue
            grad = local(param.grad).detach().double()
            sum_of_squares -= excess * float(torch.sum(grad * grad))
            nonfinite -= excess * int(grad.numel() - torch.isfinite(grad).sum())
        totals = torch.tensor([sum_of_squares, nonfinite], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(totals, group=self.group)
        sum_of_squares, nonfinite = totals.tolist()
        return sum_of_squares, int(round(nonfinite))


class DTensorViews:
    """The adapter's views (host or CUDA) of DTensor params: views of their local tensors. The step's grads are
    DTensors too (FSDP2's reduce-scattered shards) and are viewed the same way."""

    def __init__(self, views, params):
        self._views = views
        self.device = views.device
        self.grad_reduction = GlobalGradStats(params)
        self._rows = {}  # (param index, scales name) -> (the core's buffer, the padded row it is the start of)

    def view(self, tensor):
        tensor = local(tensor)
        if not tensor.is_contiguous():
            raise ValueError(f"a DTensor's local tensor is not contiguous (shape {tuple(tensor.shape)}, stride "
                             f"{tensor.stride()}); fastopt updates local shards in place through zero-copy views")
        return self._views.view(tensor)

    def expose(self, buffer):
        return self._views.expose(buffer)

    def state_entry(self, param, entry, core, index):
        """:func:`state_entry` of param ``index`` of ``core``, and each 8-bit state's block scales (``entry[name]``,
        the core's buffer as a tensor) as this rank's row of a DTensor (module docstring). The row is the core's buffer
        where it needs no padding; else a padded row is allocated once, the buffer's values copied in, and its first
        ``block_count`` entries become the core's buffer (``core.adopt_buffer``: a user's replacement would rebuild
        the core's layout once per row), so that the row is live as every other state tensor is."""
        scales = [name for name in entry if name.endswith(SCALES_SUFFIX)]
        if not is_dtensor(param) or not scales:
            return state_entry(param, entry)
        from torch.distributed.tensor import DTensor

        rows_shape, placements, row_shape = _row_layout(param)
        rows_stride = tuple(math.prod(rows_shape[dim + 1:]) for dim in range(len(rows_shape)))
        shown = state_entry(param, {name: value for name, value in entry.items() if name not in scales})
        for name in scales:
            exposed, blocks = entry[name], entry[name].numel()
            known = self._rows.get((index, name))
            if blocks == row_shape[-1]:
                row = exposed.view(row_shape)
            elif known is not None and known[0] is core.state[index][name]:
                row = known[1]
            else:
                row = torch.zeros(row_shape, dtype=exposed.dtype, device=exposed.device)
                if blocks:  # an empty shard has no scales to share
                    start = row.view(-1)[:blocks]
                    start.copy_(exposed)
                    buffer = self._views.view(start)
                    core.adopt_buffer(index, name, buffer)
                    self._rows[(index, name)] = (buffer, row)
            shown[name] = DTensor.from_local(row, param.device_mesh, placements, run_check=False, shape=rows_shape,
                                             stride=rows_stride)
        shown = {name: shown[name] for name in entry}  # the core's order: each state, then its scales
        shown[LAYOUT_KEY] = layout_id(param)
        return shown

    def to_host(self, tensor):
        return self._views.to_host(local(tensor))

    def scale(self, tensor):
        return self._views.scale(tensor)

    def on_device(self):
        return self._views.on_device()

    def stream(self):
        return self._views.stream()


def views_for(params, views):
    """``views`` for an optimizer over ``params``: wrapped in :class:`DTensorViews` if any param is a DTensor."""
    if any(is_dtensor(param) for param in params):
        return DTensorViews(views, params)
    return views
