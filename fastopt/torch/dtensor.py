"""DTensor params (FSDP2's ``fully_shard``, ``distribute_tensor``) in the ``fastopt.torch`` optimizers.

Each process steps its own shards: the core optimizer is made over NumPy (or CuPy) views of each param's local
tensor, so one fused launch updates every local shard (a rank's shard may be empty). What the adapter shows torch is
DTensors again: each state buffer is wrapped with its param's mesh and placements
(``DTensor.from_local(buffer, mesh, placements, shape=, stride=)``), sharing the buffer's memory, so ``state_dict()`` is
what ``torch.distributed.checkpoint`` expects, and what it loads is taken from the local shards.

Gradient control needs the grads of the whole model: :class:`GlobalGradStats` is the core's ``grad_reduction``. It
all-reduces this rank's sum of squares and non-finite count (the core's one read of the local grads) over the mesh,
so that the ``max_grad_norm`` clip factor and the non-finite skip are the same on every rank. A param replicated over
some of the mesh's dimensions (``Replicate()``, or a plain tensor beside DTensors) holds the same values on several
ranks: its statistics count ``1 / copies`` from each.

Nothing here runs for plain tensors: :func:`views_for` returns the adapter's views unchanged when no param is a
DTensor, and :func:`is_dtensor` is False until ``torch.distributed.tensor`` has been imported (a DTensor cannot exist
before), so ``fastopt.torch`` never imports it itself.
"""
import sys

import numpy as np
import torch


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
    """Param ``param``'s state entry as torch shows it: for a DTensor param, each buffer (a tensor sharing the core's
    local buffer) as a DTensor with the param's mesh, placements, shape and stride; ``step`` stays a plain tensor, as
    in ``torch.optim``."""
    if not is_dtensor(param):
        return entry
    from torch.distributed.tensor import DTensor

    return {name: value if name == "step" else
            DTensor.from_local(value, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                               stride=param.stride())
            for name, value in entry.items()}


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

    def view(self, tensor):
        tensor = local(tensor)
        if not tensor.is_contiguous():
            raise ValueError(f"a DTensor's local tensor is not contiguous (shape {tuple(tensor.shape)}, stride "
                             f"{tensor.stride()}); fastopt updates local shards in place through zero-copy views")
        return self._views.view(tensor)

    def expose(self, buffer):
        return self._views.expose(buffer)

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
