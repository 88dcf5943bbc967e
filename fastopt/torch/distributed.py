"""Optimizer state sharded over the ranks of a ``torch.distributed`` process group (ZeRO stage 1), each rank's
shard stepped by one fused fastopt kernel.

    optimizer = ShardedOptimizer(model.parameters(), fastopt.torch.AdamW, lr=3e-4, weight_decay=0.1)

:class:`ShardedOptimizer` has the shape of ``torch.distributed.optim.ZeroRedundancyOptimizer``: every rank
constructs it over the same params and steps it together, and each keeps the optimizer state of ``1 / world_size``
of the elements. A step computes what the inner optimizer computes in one process on the grads averaged over the
ranks: the update is elementwise, so stepping the slices of a tensor is stepping the tensor.
"""
import contextlib
import math
import numbers
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .. import quantization, schedules
from ..backends import GradControl
from ..backends.layout import SCALES_SUFFIX
from ..guard import Guard
from ..serialization import encode
from .adapter import TorchOptimizer, _plain, decoded_entry, decoded_states, mark_shard
from .optimizers import AdamW

# torch 2.13 names the single-tensor collectives *_single and keeps the older names as deprecated aliases.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# Group keys that are not hyperparameters of the inner optimizer: params and lr_scale are sliced per piece, and
# torch keeps the names of named params.
_PER_PARAM_KEYS = ("params", "lr_scale", "param_names")
_FORMAT = "fastopt-sharded-1"
# The entries of a sharded_state_dict() that are the ShardedOptimizer's; the others are its inner optimizer's.
_SHARDED_KEYS = ("format", "rank", "layout", "param_groups", "skipped_steps", "applied_steps", "guard")


@dataclass
class _Space:
    """The params of one dtype (of one construction or ``add_param_group``) end to end in ``param_buffer``; rank r
    owns elements ``[r * shard, (r + 1) * shard)``. ``grad_buffer`` holds the rank's own grads in the same layout,
    ``reduced`` the averaged grads of its shard."""

    params: list  # indices into the optimizer's param list
    offsets: list
    shard: int
    param_buffer: torch.Tensor
    grad_buffer: torch.Tensor = None
    reduced: torch.Tensor = None


@dataclass
class _Piece:
    """One param of the inner optimizer: elements ``[start, stop)`` of param ``index`` (``position`` in its group),
    the part of it in this rank's shard, as a 1-D view of its space's buffer. ``index`` None marks a zero-size
    stand-in for a group that has no piece here (the inner optimizer still sees every group)."""

    index: int
    position: int
    start: int
    stop: int
    tensor: torch.Tensor
    reduced_grad: torch.Tensor = None  # the piece's slice of space.reduced


@dataclass
class _Layout:
    """What a construction or add_param_group lays out, before the ranks agree to adopt it."""

    params: list
    names: list
    slots: list  # per param: (space, offset)
    spaces: list
    groups: list  # per group: (inner group dict, its pieces)


class ShardedOptimizer(torch.optim.Optimizer):
    r"""``optimizer_class`` (a ``fastopt.torch`` optimizer; a ``torch.optim`` one with elementwise state works too)
    with its state sharded over the ranks of ``process_group`` (default: the world), as
    ``torch.distributed.optim.ZeroRedundancyOptimizer``. Every rank constructs, steps, adds groups and checkpoints
    together, over the same param groups (shapes, dtypes, order): a mismatch raises at construction, on every rank.

    **Layout.** The params of each dtype lie end to end in one flat buffer and each param's ``.data`` becomes a
    view of it, so the gather writes straight into the params. The ``n`` elements are split into ``W`` (world size)
    contiguous shards of ``S = A * ceil(n / (A * W))`` elements (``A = alignment``: ``ALIGNMENT``, or 256 with
    8-bit states); the buffer is padded to ``W * S`` because the collectives need equal sizes, so only the last
    shards hold padding (fewer than ``W * A`` elements in all). A tensor may span shards. Rank r runs
    ``optimizer_class(local_groups, **defaults)`` over 1-D views of its pieces (tensor ∩ shard r), each in its
    tensor's group with the matching slice of the group's ``lr_scale``, so it holds state for ``S`` elements per
    dtype.

    **8-bit states** (``state_dtype="8bit"``) are stored as one process stores them: a tensor's states are 8-bit
    when the whole tensor has at least ``min_8bit_size`` elements, on every rank that holds a piece of it, and such
    a tensor starts on a 256-element boundary of its buffer (the padding between tensors is under 256 elements
    each), so that every shard cut falls between two of its blocks of 256: each rank codes whole blocks, the ones
    one process codes. The step, the consolidated state dict and a resumed run are bit for bit one process's.

    **Step.** With :math:`g^{(r)}_i` the grad of param i on rank r (zero where it has none):

    .. math::
        \hat g_i = \Big(\textstyle\sum_{r=0}^{W-1} g^{(r)}_i\Big) / W \ \text{(summed in rank order)}, \quad
        p_{\text{shard } r} \leftarrow \text{update}(p_{\text{shard } r}, \hat g_{\text{shard } r}), \quad
        p \leftarrow \text{concat}_r\, p_{\text{shard } r}

    A param that no rank has a grad for is skipped (state and step too), as in torch. ``grads_averaged=True``
    takes the grads as they are (averaged already, by DDP): no reduction, each rank reads its slice. The ranks'
    hyperparameters must agree (torch schedulers stepped alike); per-group values, fastopt schedules and
    ``lr_scale`` work as in the inner optimizer.

    **Collectives**, a few large flat ones per dtype, never one per tensor. ``exchange="p2p"`` (the default on
    gloo): the reduction sends each peer its part of the grads, ``BUCKET_BYTES`` at a time (isend/irecv, the next
    bucket in flight while one is summed), and the gather is one broadcast per shard from its owner into the param
    buffer; on gloo this is twice as fast as its ``reduce_scatter`` (bench/RESULTS_DISTRIBUTED.md).
    ``"collective"`` (the default on other backends, NCCL): one ``reduce_scatter`` and one ``all_gather`` per
    buffer. A collective that fails (a rank raised or stopped, and the others waited past the process group's
    timeout) raises a ``RuntimeError`` naming the step; the process group is unusable after it.

    **Guard and clipping**, decided on the averaged grads and so the same on every rank: ``guard=`` (a
    :class:`fastopt.Guard`) skips a step whose grads hold NaN/inf on any rank and backs the rate off;
    ``max_grad_norm=`` multiplies the grads by ``min(1, max_grad_norm / (norm + 1e-6))`` as
    ``torch.nn.utils.clip_grad_norm_`` over all params does (a step with NaN/inf grads is skipped). Each costs a
    read of the local shard and an all-reduce of two numbers; ``last_grad_norm`` holds the global L2 norm.

    **Checkpoints.** :meth:`sharded_state_dict` / :meth:`load_sharded_state_dict`: each rank saves and loads its
    own shard (same world size; resumes bit for bit). :meth:`consolidate_state_dict` then :meth:`state_dict` on
    the target rank: one torch-format state dict, as a non-sharded ``optimizer_class`` saves it, that loads into
    one, into ``torch.optim``, and into a ShardedOptimizer of any world size (:meth:`load_state_dict`). With
    8-bit states it holds codes and block scales, as one process's does; :meth:`float32_state_dict` decodes them
    for ``torch.optim``.

    **Grads.** ``p.grad`` keeps the rank's own grads. The reduction reads them from a flat grad buffer: a grad
    that is not its view there already (backward allocates new ones after ``zero_grad(set_to_none=True)``) is
    copied in and ``p.grad`` becomes the view; after ``zero_grad(set_to_none=False)`` backward accumulates straight
    into the buffer. ``torch.amp.GradScaler`` skips steps on each rank's own grads: use it with
    ``grads_averaged=True`` only (the ranks then see the same grads), or use ``guard=``.

    ``optim`` is this rank's inner optimizer (``optim.state`` its state, keyed by the pieces); ``state`` is empty.
    """

    ALIGNMENT = 16  # elements: shards of float32 params start on 64-byte boundaries
    BUCKET_BYTES = 16 << 20  # per peer and bucket in the p2p reduction; two buckets are in flight

    def __init__(self, params, optimizer_class=AdamW, process_group=None, *, grads_averaged=False, guard=None,
                 max_grad_norm=None, exchange="auto", **defaults):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ShardedOptimizer needs a process group: call torch.distributed.init_process_group "
                               "first (torchrun sets the environment it reads)")
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise TypeError(f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}")
        core = getattr(optimizer_class, "CORE", None)
        if core is not None and not core.ELEMENTWISE:
            raise TypeError(f"ShardedOptimizer cannot shard {optimizer_class.__name__}: its update needs the norms of "
                            "whole tensors, and the shards cut tensors between ranks")
        if guard is not None and not isinstance(guard, Guard):
            raise TypeError(f"guard must be a fastopt.Guard or None, got {type(guard).__name__}")
        if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
                                          or not 0 < max_grad_norm < math.inf):
            raise ValueError(f"max_grad_norm must be a finite number > 0 or None, got {max_grad_norm!r}")
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.process_group)
        self.world_size = dist.get_world_size(self.process_group)
        if exchange == "auto":
            exchange = "p2p" if dist.get_backend(self.process_group) == "gloo" else "collective"
        if exchange not in ("p2p", "collective"):
            raise ValueError(f"exchange must be 'auto', 'p2p' or 'collective', got {exchange!r}")
        self.optimizer_class, self.exchange = optimizer_class, exchange
        # 8-bit states are coded in blocks of BLOCK elements from each tensor's start: shard cuts fall between blocks.
        self._block = quantization.BLOCK if defaults.get("state_dtype") == "8bit" else 1
        self._min_8bit_size = defaults.get("min_8bit_size", quantization.MIN_8BIT_SIZE)
        self.alignment = math.lcm(self.ALIGNMENT, self._block)
        self.grads_averaged, self.guard, self.max_grad_norm = bool(grads_averaged), guard, max_grad_norm
        self.last_grad_norm, self.skipped_steps = None, 0
        self.optim = None  # also the marker for "in torch's __init__" in add_param_group
        self._params, self._names, self._slots, self._spaces, self._pieces = [], [], [], [], []
        self._lr_scales, self._grad_views, self._slot_zero, self._inboxes = [], [], [], {}
        self._applied_steps = 0  # steps taken, for an inner optimizer that does not count them
        self._step_calls = 0  # step() calls, skipped or failed ones too: names the step in errors
        self._version = 0  # advanced by every change of params or state: tells a stale consolidated copy
        self._consolidated = None  # (rank it is on, version, state dict)

        # Each rank does its local work (torch's checks, the layout, the inner optimizer), then one exchange
        # compares the ranks' param lists and errors: all raise or none does. Params move into the flat buffers
        # only after it.
        error, layout, signature = None, None, None
        try:
            # torch's parsing and checks (it calls add_param_group). No defaults: the groups take the inner
            # optimizer's hyperparameters after it is built, but not its constructor options (master_weights...).
            super().__init__(params, {})
            signature = self._signature(self.param_groups)
            layout = self._layout(self.param_groups, 0)
            self.optim = optimizer_class([inner for inner, _ in layout.groups], **defaults)
        except (TypeError, ValueError, RuntimeError, KeyError) as exc:
            error = exc
        self._agree("ShardedOptimizer construction", signature, error)
        self._adopt(layout)
        for group, inner in zip(self.param_groups, self.optim.param_groups):
            group.update({key: value for key, value in inner.items() if key not in _PER_PARAM_KEYS})
        self.defaults = dict(self.optim.defaults)  # what add_param_group fills a new group from

    # ---------------------------------------------------------------- agreement between the ranks
    @contextlib.contextmanager
    def _collective(self, what):
        """Turn a failed collective into an error that says what most likely happened."""
        try:
            yield
        except RuntimeError as exc:  # gloo's timeouts and lost peers; DistBackendError is a RuntimeError
            raise RuntimeError(
                f"ShardedOptimizer on rank {self.rank}: the {what} failed ({exc}). Another rank probably raised or "
                "stopped before reaching it (every rank must construct, step, add groups and checkpoint together), "
                "and this one waited past the process group's timeout or lost its peer. The process group cannot "
                "be trusted any more: restart every rank from a checkpoint.") from exc

    @staticmethod
    def _signature(groups):
        """What must match between the ranks: each group's params' shapes and dtypes."""
        return [[(tuple(param.shape), str(param.dtype).removeprefix("torch.")) for param in group["params"]]
                for group in groups]

    def _agree(self, what, signature, error, first_group=0):
        """Exchange this rank's ``signature`` and ``error`` (or None) with every rank; raise the same error on all
        of them if any failed or their signatures differ."""
        gathered = [None] * self.world_size
        message = None if error is None else (type(error).__name__, str(error))
        with self._collective(f"exchange of the ranks' checks in {what}"):
            dist.all_gather_object(gathered, (signature, message), group=self.process_group)
        failed = [(rank, message) for rank, (_, message) in enumerate(gathered) if message is not None]
        if failed:
            rank, (kind, text) = failed[0]
            others = f" (and on ranks {[rank for rank, _ in failed[1:]]})" if len(failed) > 1 else ""
            kind = {"TypeError": TypeError, "ValueError": ValueError, "KeyError": KeyError}.get(kind, RuntimeError)
            raise kind(f"{what} failed on rank {rank}{others}: {text}") from error
        reference = gathered[0][0]
        for rank, (signature, _) in enumerate(gathered[1:], 1):
            difference = _difference(reference, signature, rank, first_group)
            if difference:
                raise ValueError(f"{what}: the ranks' parameter lists differ: {difference}. Every rank must pass "
                                 "the same params (shapes, dtypes, groups, order)")

    # ---------------------------------------------------------------- layout
    def _check_groups(self, groups, first_group):
        """This rank's checks of new groups beyond torch's: params dense, contiguous and on one device;
        lr_scale tensors shaped like their params, finite and >= 0."""
        device = self._params[0].device if self._params else None
        for number, group in enumerate(groups, first_group):
            for position, param in enumerate(group["params"]):
                where = f"param_groups[{number}]['params'][{position}]"
                device = device or param.device
                if param.layout != torch.strided or not param.is_contiguous():
                    raise ValueError(f"{where} must be a dense contiguous tensor: the sharded layout makes it a "
                                     "view of a flat buffer")
                if param.device != device:
                    raise ValueError(f"{where} is on {param.device}, the first param on {device}: one "
                                     "ShardedOptimizer works on one device")
            if len({id(param) for param in group["params"]}) != len(group["params"]):
                raise ValueError(f"param_groups[{number}] holds a param more than once")
            self._check_lr_scale(group, f"param_groups[{number}]")

    def _check_lr_scale(self, group, where):
        scales = group.get("lr_scale")
        if scales is None or isinstance(scales, numbers.Number):  # a number is timm's key, not fastopt's: left alone
            return
        if isinstance(scales, torch.Tensor):
            scales = group["lr_scale"] = [scales]
        if not issubclass(self.optimizer_class, TorchOptimizer):
            raise ValueError(f"{where} has an lr_scale, which {self.optimizer_class.__name__} does not take (the "
                             "fastopt.torch optimizers do)")
        if len(scales) != len(group["params"]):
            raise ValueError(f"{where}['lr_scale'] has {len(scales)} tensors for {len(group['params'])} params")
        for position, (scale, param) in enumerate(zip(scales, group["params"])):
            label = f"{where}['lr_scale'][{position}]"
            if not isinstance(scale, torch.Tensor) or scale.shape != param.shape or not scale.is_contiguous():
                raise ValueError(f"{label} must be a contiguous tensor of its param's shape {tuple(param.shape)}")
            # The math dtype of the param (float32 for a 16-bit one), on its device.
            dtype = torch.float32 if param.dtype in (torch.bfloat16, torch.float16) else param.dtype
            if scale.dtype != dtype or scale.device != param.device:
                raise TypeError(f"{label} is {scale.dtype} on {scale.device}; it must be {dtype} on {param.device}")
            # Checked here on the whole tensor, not by the inner optimizer on each rank's slice, so that every rank
            # comes to the same verdict.
            if scale.numel() and not bool(torch.isfinite(scale).all() & (scale >= 0).all()):
                raise ValueError(f"{label} must be finite and >= 0")

    def _layout(self, groups, first_group):
        """Spaces (flat buffers) for the params of ``groups`` and this rank's pieces of them, as inner groups."""
        self._check_groups(groups, first_group)
        params = [param for group in groups for param in group["params"]]
        first, world, rank = len(self._params), self.world_size, self.rank
        by_dtype = {}
        for index, param in enumerate(params, first):
            by_dtype.setdefault(param.dtype, []).append(index)
        layout = _Layout(params=params, names=[], slots=[None] * len(params), spaces=[], groups=[])
        for number, group in enumerate(groups, first_group):
            layout.names += [f"param_groups[{number}]['params'][{j}]" for j in range(len(group["params"]))]
        pieces = {}  # param index -> its piece here
        for dtype, indices in by_dtype.items():
            offsets, numel = [], 0
            for index in indices:
                if self._coded(params[index - first]):
                    numel = self._block * -(-numel // self._block)
                offsets.append(numel)
                numel += params[index - first].numel()
            shard = self.alignment * -(-numel // (self.alignment * world))
            buffer = torch.zeros(world * shard, dtype=dtype, device=params[0].device)
            space = _Space(indices, offsets, shard, buffer)
            if not self.grads_averaged:
                space.grad_buffer = torch.zeros_like(buffer)
            if not self.grads_averaged or self.max_grad_norm is not None:
                space.reduced = torch.zeros(shard, dtype=dtype, device=buffer.device)
            layout.spaces.append(space)
            low, high = rank * shard, (rank + 1) * shard
            for index, offset in zip(indices, offsets):
                size = params[index - first].numel()
                layout.slots[index - first] = (space, offset)
                start, stop = max(offset, low), min(offset + size, high)
                # A zero-size tensor belongs to the rank whose shard holds its offset: it gets its (empty) state
                # and its step count there, as in one process.
                if size == 0 and rank == (min(offset // shard, world - 1) if shard else 0):
                    start = stop = offset
                elif start >= stop:
                    continue
                reduced = None if space.reduced is None else space.reduced[start - low:stop - low]
                piece = _Piece(index, None, start - offset, stop - offset, buffer[start:stop], reduced)
                mark_shard(piece.tensor, size)  # the inner optimizer judges min_8bit_size on the whole tensor
                pieces[index] = piece
        position = first
        for number, group in enumerate(groups, first_group):
            mine = []
            for index in range(position, position + len(group["params"])):
                if index in pieces:
                    pieces[index].position = index - position
                    mine.append(pieces[index])
            position += len(group["params"])
            if not mine:
                param = group["params"][0] if group["params"] else None
                dtype = param.dtype if param is not None else torch.get_default_dtype()
                device = param.device if param is not None else torch.device("cpu")
                mine = [_Piece(None, None, 0, 0, torch.zeros(0, dtype=dtype, device=device))]
            inner = {key: value for key, value in group.items() if key not in _PER_PARAM_KEYS}
            inner["params"] = [piece.tensor for piece in mine]
            if group.get("lr_scale") is not None:
                inner["lr_scale"] = _scale_slices(group["lr_scale"], mine)
            layout.groups.append((inner, mine))
        return layout

    def _coded(self, param):
        """Whether ``param``'s moments may be stored in 8 bits (the inner optimizer decides per state; a tensor
        that may is laid out on block boundaries either way)."""
        size = self._min_8bit_size
        return (self._block > 1 and param.dtype != torch.float64 and isinstance(size, numbers.Integral)
                and param.numel() >= size)

    def _adopt(self, layout):
        """Copy the new params into their flat buffers and make each param's ``.data`` a view of its buffer (once
        every check has passed on every rank)."""
        with torch.no_grad():
            for param, (space, offset) in zip(layout.params, layout.slots):
                view = space.param_buffer[offset:offset + param.numel()]
                view.copy_(param.detach().reshape(-1))
                param.data = view.view(param.shape)
        self._params += layout.params
        self._names += layout.names
        self._slots += layout.slots
        self._spaces += layout.spaces
        self._pieces += [piece for _, mine in layout.groups for piece in mine]
        self._lr_scales += [group.get("lr_scale") for group in self.param_groups[len(self._lr_scales):]]
        self._pointers = [param.data_ptr() for param in self._params]
        self._grad_views += [None if space.grad_buffer is None else
                             space.grad_buffer[offset:offset + param.numel()].view(param.shape)
                             for param, (space, offset) in zip(layout.params, layout.slots)]
        self._slot_zero += [True] * len(layout.params)  # whether a param's grad slot is known to hold zeros
        self._version += 1

    def add_param_group(self, param_group):
        """torch's ``add_param_group``, on every rank together: the new params get flat buffers and shards of
        their own (the existing layout and state stay where they are). On error nothing is added, on any rank."""
        if self.optim is None:  # inside torch's __init__
            return super().add_param_group(param_group)
        number, error, layout, signature, added, inner_added = len(self.param_groups), None, None, None, False, False
        try:
            super().add_param_group(param_group)
            added = True
            signature = self._signature(self.param_groups[-1:])
            layout = self._layout(self.param_groups[-1:], number)
            self.optim.add_param_group(layout.groups[0][0])
            inner_added = True
        except (TypeError, ValueError, RuntimeError, KeyError) as exc:
            error = exc
        try:
            self._agree("add_param_group", signature, error, number)
        except Exception:
            if inner_added:  # the adapter rebuilds its core at the next step when its group count changed
                self.optim.param_groups.pop()
            if added:
                self.param_groups.pop()
            raise
        self._adopt(layout)
        self.param_groups[-1].update({key: value for key, value in self.optim.param_groups[-1].items()
                                      if key not in _PER_PARAM_KEYS})

    # ---------------------------------------------------------------- the step
    @property
    def step_count(self):
        """Steps taken (a step the guard skipped does not count): the count fastopt schedules are evaluated at."""
        core = getattr(self.optim, "core", None)
        return core.step_count if core is not None else self._applied_steps

    def current_lr(self):
        """Each group's learning rate for the next step, as floats (a guard's ``lr_factor`` multiplies them)."""
        return [float(schedules.as_schedule(_plain(group["lr"]))(self.step_count)) for group in self.param_groups]

    def train(self):
        """A schedule-free inner optimizer's ``train()`` on every rank's shard, then the params gathered (call it on
        every rank together)."""
        self._switch_mode("train")

    def eval(self):
        """A schedule-free inner optimizer's ``eval()`` on every rank's shard, then the params gathered (call it on
        every rank together)."""
        self._switch_mode("eval")

    def _switch_mode(self, name):
        if not hasattr(self.optim, name):
            raise AttributeError(f"{type(self.optim).__name__} has no {name}() (the schedule-free optimizers have)")
        getattr(self.optim, name)()
        self._gather()

    def step(self, closure=None):
        """One step of every param that has a grad on some rank; ``closure`` (optional) re-evaluates the model with
        grad enabled and its loss is returned, as in torch. Call it on every rank together. Bad input (changed
        params, a grad of the wrong shape, an invalid hyperparameter on any rank) raises on every rank before
        params or state change."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_calls += 1
        where = f"step() call {self._step_calls}"
        error, grads, checked = None, [None] * len(self._params), None
        try:
            self._check_params()
            grads = self._local_grads()
            checked = self._checked_groups()
        except (TypeError, ValueError, RuntimeError, KeyError) as exc:
            error = exc
        counts = self._exchange_flags(grads, error, where)
        has_grad = [count > 0 for count in counts]
        self._sync_groups(checked)
        with torch.no_grad():
            if self.grads_averaged:
                for index, count in enumerate(counts):
                    if 0 < count < self.world_size:
                        raise ValueError(f"{self._names[index]} has a grad on {count} of {self.world_size} ranks: "
                                         "with grads_averaged=True every rank must hold the same grads (as DDP "
                                         "leaves them)")
                piece_grads = [None if piece.index is None or not has_grad[piece.index] else
                               grads[piece.index].reshape(-1)[piece.start:piece.stop] for piece in self._pieces]
            else:
                self._stage(grads)
                with self._collective(f"reduction of the grads in {where}"):
                    self._reduce()
                piece_grads = [None if piece.index is None or not has_grad[piece.index] else piece.reduced_grad
                               for piece in self._pieces]
            self._version += 1
            guard_state = None if self.guard is None else self.guard.state_dict()
            if self.guard is not None or self.max_grad_norm is not None:
                with self._collective(f"all-reduce of the grad norm in {where}"):
                    admitted = self._control(piece_grads)
                if not admitted:
                    return loss
            for piece, grad in zip(self._pieces, piece_grads):
                piece.tensor.grad = grad
            try:
                self.optim.step()
            except Exception:
                if guard_state is not None:
                    self.guard.load_state_dict(guard_state)
                raise
            self._applied_steps += 1
            if any(has_grad):
                with self._collective(f"gather of the updated params in {where}"):
                    self._gather()
        return loss

    def _check_params(self):
        """The params must still be the tensors (and storages) the layout was made of."""
        position = 0
        for number, group in enumerate(self.param_groups):
            for j, param in enumerate(group["params"]):
                if (position >= len(self._params) or param is not self._params[position]
                        or param.data_ptr() != self._pointers[position]):
                    raise RuntimeError(f"param_groups[{number}]['params'][{j}] is not the tensor, or no longer has the "
                                       "storage, it had when it joined the ShardedOptimizer: params are views of the "
                                       "optimizer's flat buffers, so `p.data = ...`, `model.to(...)` or editing "
                                       "group['params'] afterwards is not supported (add_param_group adds params)")
                position += 1
        if position != len(self._params):
            raise RuntimeError("params were removed from the ShardedOptimizer's param_groups; that is not supported")

    def _local_grads(self):
        grads = []
        for name, param in zip(self._names, self._params):
            grad = param.grad
            if grad is not None:
                if grad.layout != torch.strided:
                    raise RuntimeError(f"ShardedOptimizer does not support sparse gradients ({name})")
                if grad.shape != param.shape:
                    raise ValueError(f"the grad of {name} has shape {tuple(grad.shape)}, the param "
                                     f"{tuple(param.shape)}")
                if grad.dtype != param.dtype or grad.device != param.device:
                    raise TypeError(f"the grad of {name} is {grad.dtype} on {grad.device}, the param {param.dtype} "
                                    f"on {param.device}")
            grads.append(grad)
        return grads

    def _checked_groups(self):
        """What each inner group takes from its group at this step, checked as the inner optimizer's step would
        check it but not written yet (step writes it once every rank has passed its checks, so that a value one
        rank alone refuses raises on every rank): the hyperparameters, the rate times the guard's back-off factor,
        and the group's lr_scale (a new list is checked; the same list as at the last step is unchanged)."""
        factor = 1.0 if self.guard is None else self.guard.lr_factor
        checked = []
        for number, group in enumerate(self.param_groups):
            where = f"param_groups[{number}]"
            self._check_hyperparameters(group, where)
            values = {key: value for key, value in group.items() if key not in _PER_PARAM_KEYS}
            if factor != 1.0:  # a schedule is evaluated here: the inner optimizer's rate has no factor of its own
                lr = _plain(group["lr"])
                values["lr"] = (lr(self.step_count) if isinstance(lr, schedules.Schedule) else lr) * factor
            if group.get("lr_scale") is not self._lr_scales[number]:  # as for the adapter: in-place edits unseen
                self._check_lr_scale(group, where)
            checked.append((values, group.get("lr_scale")))
        return checked

    def _check_hyperparameters(self, group, where):
        """What the inner ``fastopt.torch`` optimizer's step refuses in a group: a missing or invalid
        hyperparameter (its fastopt rule's checks, on one-element tensors as floats), an implementation flag it
        cannot honour, a fastopt schedule also driven by a torch scheduler. Keys it does not know it ignores, as
        torch does (torch's schedulers add some). A ``torch.optim`` class checks its values at construction only."""
        if not issubclass(self.optimizer_class, TorchOptimizer):
            return
        rule = self.optimizer_class.CORE
        missing = [key for key in rule.DEFAULTS if key not in group]
        if missing:
            raise ValueError(f"{where} has no {missing}: {self.optimizer_class.__name__} needs each of "
                             f"{sorted(rule.DEFAULTS)}")
        self.optimizer_class._check_flags(group, where)
        values = {key: _plain(group[key]) for key in rule.DEFAULTS}
        rule.validate_hyperparameters(values, where)
        if isinstance(values["lr"], schedules.Schedule) and "initial_lr" in group:
            raise TypeError(f"{where}: its lr is a fastopt schedule and a torch lr scheduler drives it too "
                            "('initial_lr' is set); use one or the other")

    def _sync_groups(self, checked):
        """Copy the values :meth:`_checked_groups` returned into the inner groups, and slices of a new lr_scale."""
        for number, ((values, scales), inner) in enumerate(zip(checked, self.optim.param_groups)):
            inner.update(values)
            if scales is not self._lr_scales[number]:
                inner["lr_scale"] = None if scales is None else _scale_slices(scales, self._group_pieces(number))
                self._lr_scales[number] = scales

    def _group_pieces(self, number):
        first = sum(len(group["params"]) for group in self.optim.param_groups[:number])
        return self._pieces[first:first + len(self.optim.param_groups[number]["params"])]

    def _exchange_flags(self, grads, error, where):
        """All-reduce which params have a grad on how many ranks, and which ranks failed their checks: a failure
        anywhere raises everywhere, before anything has changed."""
        count = len(self._params)
        flags = torch.zeros(count + self.world_size, dtype=torch.int32, device=self._spaces[0].param_buffer.device)
        flags[:count] = torch.tensor([grad is not None for grad in grads], dtype=torch.int32)
        flags[count + self.rank] = error is not None
        with self._collective(f"exchange of the grad flags in {where}"):
            dist.all_reduce(flags, group=self.process_group)
        flags = flags.tolist()
        if error is not None:
            raise error
        failed = [rank for rank, flag in enumerate(flags[count:]) if flag]
        if failed:
            raise RuntimeError(f"ShardedOptimizer {where} failed its checks on rank(s) {failed} (their errors say "
                               "why); nothing changed on any rank")
        return flags[:count]

    def _stage(self, grads):
        """Put each param's grad into its slot of the flat grad buffer: grads that are views of it already stay
        (backward accumulated into them), others are copied in and ``p.grad`` becomes the view; the slots of params
        without a grad hold zeros (what this rank adds to the other ranks' grads)."""
        for index, grad in enumerate(grads):
            view = self._grad_views[index]
            if grad is None:
                if not self._slot_zero[index]:
                    view.zero_()
                    self._slot_zero[index] = True
                continue
            self._slot_zero[index] = False
            if grad is not view:
                view.copy_(grad)
                self._params[index].grad = view

    def _reduce(self):
        """space.reduced = (sum over the ranks of their grad buffers' shard r) / W, for this rank r."""
        world, rank, group = self.world_size, self.rank, self.process_group
        for space in self._spaces:
            if not space.shard:
                continue
            if self.exchange == "collective":
                _reduce_scatter(space.reduced, space.grad_buffer, group=group)
                space.reduced.div_(world)
                continue
            shard, grads = space.shard, space.grad_buffer
            length = min(shard, max(self.ALIGNMENT, self.BUCKET_BYTES // grads.element_size()))
            inbox = self._inbox(grads, length)
            starts = range(0, shard, length)

            def post(number):  # send each peer its part of bucket `number`, receive theirs of mine
                start, works = starts[number], []
                stop = min(start + length, shard)
                for peer in range(world):
                    if peer != rank:
                        works.append(dist.isend(grads[peer * shard + start:peer * shard + stop], group=group,
                                                group_dst=peer, tag=number))
                        works.append(dist.irecv(inbox[number % 2, peer - (peer > rank), :stop - start],
                                                group=group, group_src=peer, tag=number))
                return works

            pending = post(0)
            for number, start in enumerate(starts):
                following = post(number + 1) if number + 1 < len(starts) else []
                for work in pending:
                    work.wait()
                stop = min(start + length, shard)
                parts = [grads[rank * shard + start:rank * shard + stop] if peer == rank
                         else inbox[number % 2, peer - (peer > rank), :stop - start] for peer in range(world)]
                out = space.reduced[start:stop]
                # In rank order, so every rank (and a single process adding the ranks' grads) rounds alike.
                if world == 1:
                    out.copy_(parts[0])
                else:
                    torch.add(parts[0], parts[1], out=out)
                for part in parts[2:]:
                    out.add_(part)
                out.div_(world)
                pending = following

    def _inbox(self, like, length):
        """Receive buffers for two buckets from every peer, kept from step to step (allocating them anew would
        fault their pages in every step)."""
        key = (like.dtype, like.device)
        inbox = self._inboxes.get(key)
        if inbox is None or inbox.shape[2] < length:
            inbox = self._inboxes[key] = torch.empty((2, self.world_size - 1, length), dtype=like.dtype,
                                                     device=like.device)
        return inbox

    def _gather(self):
        """Every rank's updated shard into every rank's param buffers."""
        works = []
        for space in self._spaces:
            shard = space.shard
            if not shard:
                continue
            if self.exchange == "collective":
                own = space.param_buffer[self.rank * shard:(self.rank + 1) * shard]
                _all_gather(space.param_buffer, own, group=self.process_group)
                continue
            for owner in range(self.world_size):
                works.append(dist.broadcast(space.param_buffer[owner * shard:(owner + 1) * shard],
                                            group=self.process_group, group_src=owner, async_op=True))
        for work in works:
            work.wait()

    def _control(self, piece_grads):
        """The guard's verdict and the clipping, from the global norm of the averaged grads. Returns whether the
        step goes ahead (the same on every rank: they all see the all-reduced numbers)."""
        tensors = ([space.reduced for space in self._spaces] if not self.grads_averaged else
                   [grad for grad in piece_grads if grad is not None])
        sum_of_squares, nonfinite = 0.0, 0
        for tensor in tensors:
            if tensor.numel() == 0:
                continue
            norm = float(torch.linalg.vector_norm(tensor))  # in the grads' dtype: fast; float64 only if it overflows
            if not math.isfinite(norm):
                nonfinite += int(tensor.numel() - torch.isfinite(tensor).sum())
                if not nonfinite:
                    norm = float(torch.linalg.vector_norm(tensor, dtype=torch.float64))
            sum_of_squares += norm * norm
        totals = torch.tensor([sum_of_squares, nonfinite], dtype=torch.float64,
                              device=self._spaces[0].param_buffer.device)
        dist.all_reduce(totals, group=self.process_group)
        sum_of_squares, nonfinite = totals.tolist()
        # The core's decision from the global numbers: norm, clip factor, skip (the same on every rank).
        skip_nonfinite = self.guard is None or self.guard.skip_nonfinite
        control = GradControl(sum_of_squares, nonfinite, 1.0, self.max_grad_norm, skip_nonfinite)
        self.last_grad_norm = control.norm
        if self.guard is not None and not self.guard.admit(control.nonfinite):
            control.skip()
        if control.skipped:
            self.skipped_steps += 1
            return False
        scale = control.clip
        if scale < 1.0 and self.grads_averaged:  # into a copy: the grads are the caller's
            for number, (piece, grad) in enumerate(zip(self._pieces, piece_grads)):
                if grad is not None:
                    piece_grads[number] = torch.mul(grad, scale, out=piece.reduced_grad)
        elif scale < 1.0:
            for space in self._spaces:
                space.reduced.mul_(scale)
        return True

    # ---------------------------------------------------------------- checkpoints
    def _packed_groups(self):
        """The param groups as a non-sharded fastopt.torch optimizer saves them: param indices, and a fastopt
        schedule as its current value plus ``fastopt_schedule`` (plain data)."""
        packed, position, step_count = [], 0, self.step_count
        for group in self.param_groups:
            saved = {key: value for key, value in group.items() if key != "params"}
            lr = _plain(saved.get("lr"))
            if isinstance(lr, schedules.Schedule):
                saved["lr"] = float(lr(step_count))
                saved["fastopt_schedule"] = {"schedule": encode(lr), "step_count": step_count}
            saved["params"] = list(range(position, position + len(group["params"])))
            position += len(group["params"])
            packed.append(saved)
        return packed

    def consolidate_state_dict(self, to=0):
        """Gather every rank's shard of the state on rank ``to`` (every rank calls it), where :meth:`state_dict` then
        returns it in torch's format. Moves one flat tensor per dtype and state buffer (``gather``), not one per
        tensor. 8-bit states' block scales are gathered by block: each piece's scales are its tensor's blocks."""
        if isinstance(to, bool) or not isinstance(to, int) or not 0 <= to < self.world_size:
            raise ValueError(f"to must be a rank in [0, {self.world_size}), got {to!r}")
        # What each rank holds per param: step and other scalars by value, buffers and block scales by name and
        # dtype.
        mine = {}
        for piece in self._pieces:
            entry = self.optim.state.get(piece.tensor) if piece.index is not None else None
            if not entry or piece.index in mine:
                continue
            mine[piece.index] = {name: (kind, str(value.dtype)) if (kind := _sharded_kind(name, value, piece))
                                 else ("value", value) for name, value in entry.items()}
        everyone = [None] * self.world_size
        with self._collective("exchange of the state's layout in consolidate_state_dict"):
            dist.all_gather_object(everyone, mine, group=self.process_group)
        entries = {}
        for held in everyone:
            for index, entry in held.items():
                entries.setdefault(index, entry)
        state = {index: {} for index in sorted(entries)}
        with self._collective("gather of the state in consolidate_state_dict"), torch.no_grad():
            for space in self._spaces:
                names = []  # (name, kind, dtype) of this space's params' buffers, in the same order on every rank
                for index in space.params:
                    for name, (kind, detail) in entries.get(index, {}).items():
                        if kind != "value" and (name, kind, detail) not in names:
                            names.append((name, kind, detail))
                for name, kind, dtype in names:
                    unit = 1 if kind == "buffer" else self._block
                    full = self._gather_state(space, name, getattr(torch, dtype.removeprefix("torch.")), to, unit)
                    for index, offset in zip(space.params, space.offsets):
                        if full is not None and entries.get(index, {}).get(name) == (kind, dtype):
                            param = self._params[index]
                            start, length = offset // unit, quantization.block_count(param.numel(), unit)
                            state[index][name] = full[start:start + length].view(
                                param.shape if kind == "buffer" else (length,))
        state_dict = None
        if self.rank == to:  # the scalars (step), and every entry's names in the inner optimizer's order
            state = {index: {name: detail if kind == "value" else state[index][name]
                             for name, (kind, detail) in entries[index].items()} for index in state}
            state_dict = {"state": state, "param_groups": self._packed_groups(), "fastopt_step_count": self.step_count}
            if self.guard is not None:
                state_dict["guard"] = self.guard.state_dict()
        self._consolidated = (to, self._version, state_dict)

    def _gather_state(self, space, name, dtype, to, unit=1):
        """Buffer ``name`` of the params of ``space`` from every rank, flat, on rank ``to`` (None elsewhere); one
        entry per ``unit`` elements of the space (block scales: one per block)."""
        shard = space.shard // unit
        local = torch.zeros(shard, dtype=dtype, device=space.param_buffer.device)
        low = self.rank * shard
        for piece in self._pieces:
            if piece.index is None or self._slots[piece.index][0] is not space:
                continue
            buffer = self.optim.state.get(piece.tensor, {}).get(name)
            if buffer is not None:
                start = (self._slots[piece.index][1] + piece.start) // unit - low
                local[start:start + buffer.numel()] = buffer
        full = torch.empty(self.world_size * shard, dtype=dtype, device=local.device) if self.rank == to else None
        if shard:
            chunks = list(full.split(shard)) if full is not None else None
            dist.gather(local, gather_list=chunks, group=self.process_group, group_dst=to)
        return full

    def state_dict(self):
        """The state dict :meth:`consolidate_state_dict` gathered on this rank: torch's format (``state`` by param
        index with full-size buffers, ``param_groups``), as a non-sharded ``optimizer_class`` saves it. Raises on the
        other ranks, and if the state changed since it was consolidated."""
        if self._consolidated is None or self._consolidated[0] != self.rank:
            where = "" if self._consolidated is None else f" (the last one went to rank {self._consolidated[0]})"
            raise RuntimeError(f"ShardedOptimizer.state_dict() on rank {self.rank}: call consolidate_state_dict(to="
                               f"{self.rank}) on every rank first{where}; sharded_state_dict() gives each rank's "
                               "shard without moving it")
        if self._consolidated[1] != self._version:
            raise RuntimeError("ShardedOptimizer.state_dict(): the state changed since consolidate_state_dict(); "
                               "consolidate again")
        return self._consolidated[2]

    def float32_state_dict(self):
        """:meth:`state_dict` with every 8-bit state decoded into float32 and its block scales dropped (on the rank
        it was consolidated on): the checkpoint of the ``torch.optim`` class of the inner optimizer's name."""
        return decoded_states(self.state_dict())

    def load_state_dict(self, state_dict):
        """Load a full state dict (from :meth:`state_dict`, a non-sharded ``optimizer_class`` or the ``torch.optim``
        class of that name) on every rank: each takes the slices of its pieces. As for the adapter, the checkpoint's
        hyperparameters replace the groups'; a group keeps its ``lr_scale`` where the checkpoint has none. A
        checkpoint that does not fit raises on every rank and changes nothing."""
        error, previous, saved_scales = None, None, []
        try:
            if state_dict.get("format") == _FORMAT:
                raise ValueError("this is a sharded_state_dict(): load it with load_sharded_state_dict()")
            local, saved_scales = self._split(state_dict)
            if self.guard is not None and "guard" in state_dict:
                Guard().load_state_dict(state_dict["guard"])  # validates
            previous = self.optim.state_dict()  # the live buffers: loading replaces them, so this is a rollback
            self.optim.load_state_dict(local)
        except (TypeError, ValueError, RuntimeError, KeyError) as exc:
            error = exc
        self._finish_load("load_state_dict", error, previous, state_dict.get("guard"), saved_scales)

    def _split(self, state_dict):
        """The inner optimizer's part of a full state dict: each piece's slice of its param's buffers."""
        groups, saved_state = state_dict["param_groups"], state_dict["state"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the state dict has {len(groups)} param groups, the optimizer {len(self.param_groups)}")
        order, scales = [], []
        for number, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {number} of the state dict has {len(saved['params'])} params, the "
                                 f"optimizer's {len(group['params'])}")
            order += saved["params"]
            scale = saved.get("lr_scale")
            if scale is not None:
                scale = {"params": group["params"], "lr_scale": [s.detach().clone() for s in
                                                                  ([scale] if isinstance(scale, torch.Tensor) else scale)]}
                self._check_lr_scale(scale, f"param group {number} of the state dict")
                scale = scale["lr_scale"]
            scales.append(scale)
        entries = []
        for index, (saved_index, param) in enumerate(zip(order, self._params)):
            entry = saved_state.get(saved_index, saved_state.get(str(saved_index))) or {}
            for name, value in entry.items():
                if name.endswith(SCALES_SUFFIX):
                    self._check_scales(entry, name, value, param, self._names[index])
                elif name != "step" and isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                    raise ValueError(f"the state of {self._names[index]} has {name!r} of shape {tuple(value.shape)}, "
                                     f"the param has shape {tuple(param.shape)}")
            if not self._coded(param) and any(name.endswith(SCALES_SUFFIX) for name in entry):
                entry = decoded_entry(entry)  # kept in float32 here: its pieces need not start on block boundaries
            entries.append(entry)
        local_state, local_groups, position = {}, [], 0
        for number, (saved, inner) in enumerate(zip(groups, self.optim.param_groups)):
            pieces = self._group_pieces(number)
            for piece in pieces:
                entry = entries[piece.index] if piece.index is not None else None
                if entry:
                    local_state[position] = {name: _slice(name, value, piece, self._params[piece.index])
                                             for name, value in entry.items()}
                position += 1
            local = {key: value for key, value in saved.items() if key not in _PER_PARAM_KEYS}
            local["params"] = list(range(position - len(pieces), position))
            local_groups.append(local)
        # Other entries (fastopt_step_count: the count schedules and stochastic rounding are keyed by) as they are.
        extra = {key: value for key, value in state_dict.items() if key not in ("state", "param_groups", "guard")}
        return dict(extra, state=local_state, param_groups=local_groups), scales

    @staticmethod
    def _check_scales(entry, name, value, param, where):
        """An 8-bit state's block scales in a full state dict: beside their codes, one per block of the param."""
        blocks = quantization.block_count(param.numel())
        if name.removesuffix(SCALES_SUFFIX) not in entry:
            raise ValueError(f"the state of {where} has {name!r} without the codes "
                             f"{name.removesuffix(SCALES_SUFFIX)!r} they scale")
        if not isinstance(value, torch.Tensor) or value.shape != (blocks,):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"the state of {where} has {name!r} of shape {shape}; the block scales of a param of "
                             f"{param.numel()} elements are {blocks} (one per {quantization.BLOCK})")

    def _finish_load(self, what, error, previous, guard_state, saved_scales):
        """Agree with every rank on the load; undo it here if another rank failed; otherwise take the loaded
        hyperparameters into the groups."""
        try:
            self._agree(what, None, error)
        except Exception:
            if error is None and previous is not None:
                self.optim.load_state_dict(previous)
            raise
        for number, (group, inner) in enumerate(zip(self.param_groups, self.optim.param_groups)):
            kept = {key: group[key] for key in _PER_PARAM_KEYS if key in group}
            if number < len(saved_scales) and saved_scales[number] is not None:
                kept["lr_scale"] = saved_scales[number]
            group.clear()
            group.update({key: value for key, value in inner.items() if key not in _PER_PARAM_KEYS}, **kept)
        if self.guard is not None and guard_state is not None:
            self.guard.load_state_dict(guard_state)
        self._version += 1

    def _layout_signature(self):
        signature = {"world_size": self.world_size, "alignment": self.alignment,
                     "params": self._signature(self.param_groups),
                     "spaces": [(space.params, space.shard) for space in self._spaces]}
        if self._block > 1:  # where tensors start depends on min_8bit_size too
            signature["offsets"] = [space.offsets for space in self._spaces]
        return signature

    def sharded_state_dict(self):
        """This rank's shard of the state (no communication): save it per rank, e.g.
        ``torch.save(optimizer.sharded_state_dict(), f"opt-{rank}.pt")``, and load it with
        :meth:`load_sharded_state_dict` on the same number of ranks. Holds the live buffers, as torch's state
        dicts do. ``lr_scale`` tensors are not saved (the optimizer keeps its own)."""
        inner = self.optim.state_dict()
        groups = [{key: value for key, value in group.items() if key != "lr_scale"} for group in self._packed_groups()]
        state_dict = {key: value for key, value in inner.items() if key not in ("state", "param_groups")}
        state_dict.update(format=_FORMAT, rank=self.rank, layout=self._layout_signature(), state=inner["state"],
                          param_groups=groups, skipped_steps=self.skipped_steps, applied_steps=self._applied_steps)
        if self.guard is not None:
            state_dict["guard"] = self.guard.state_dict()
        return state_dict

    def load_sharded_state_dict(self, state_dict):
        """Load this rank's :meth:`sharded_state_dict` (every rank its own, together); the ranks must be as many,
        with the same params, as when it was saved. Resumes bit for bit. A shard that does not fit raises on every
        rank and changes nothing."""
        error, previous = None, None
        try:
            if not isinstance(state_dict, dict) or state_dict.get("format") != _FORMAT:
                raise ValueError("not a ShardedOptimizer.sharded_state_dict()")
            if state_dict["rank"] != self.rank:
                raise ValueError(f"this is the shard of rank {state_dict['rank']}, loaded on rank {self.rank}")
            if state_dict["layout"] != self._layout_signature():
                saved = state_dict["layout"]
                raise ValueError(f"the shard was saved with {saved['world_size']} ranks and params "
                                 f"{'equal to' if saved['params'] == self._signature(self.param_groups) else 'unlike'}"
                                 f" these ({self.world_size} ranks): a different layout. Load a consolidated "
                                 "state_dict() instead")
            if self.guard is not None and "guard" in state_dict:
                Guard().load_state_dict(state_dict["guard"])
            groups = [dict({key: value for key, value in saved.items() if key not in _PER_PARAM_KEYS},
                           params=inner["params"]) for saved, inner in
                      zip(state_dict["param_groups"], self.optim.state_dict()["param_groups"])]
            previous = self.optim.state_dict()
            inner = {key: value for key, value in state_dict.items() if key not in _SHARDED_KEYS}
            self.optim.load_state_dict(dict(inner, param_groups=groups))
        except (TypeError, ValueError, RuntimeError, KeyError) as exc:
            error = exc
        self._finish_load("load_sharded_state_dict", error, previous,
                          state_dict.get("guard") if isinstance(state_dict, dict) else None, [])
        self.skipped_steps = int(state_dict["skipped_steps"])
        self._applied_steps = int(state_dict["applied_steps"])


def _scale_slices(scales, pieces):
    """Each piece's slice of its param's lr_scale (zero-size for a stand-in); a number-valued lr_scale (timm's
    layer-wise decay, which the inner optimizer leaves alone, as torch does) as it is."""
    if isinstance(scales, numbers.Number):
        return scales
    return [torch.zeros(0, dtype=piece.tensor.dtype, device=piece.tensor.device) if piece.index is None
            else scales[piece.position].view(-1)[piece.start:piece.stop] for piece in pieces]


def _sharded_kind(name, value, piece):
    """How state ``value`` of a piece is cut with it: "buffer" (shaped like the piece, sliced with it), "blocks" (an
    8-bit state's block scales, one per block of the piece), or None (a per-param scalar)."""
    if name == "step" or not isinstance(value, torch.Tensor) or value.dim() != 1:
        return None
    size = piece.stop - piece.start
    if name.endswith(SCALES_SUFFIX):  # before the size test: a piece of one block has one element and one scale
        return "blocks" if value.numel() == quantization.block_count(size) else None
    return "buffer" if value.numel() == size else None


def _slice(name, value, piece, param):
    """A piece's part of state ``value`` of its param (buffers shaped like the param, 8-bit states' block scales by
    block: the piece starts on a block boundary; scalars as they are)."""
    if name.endswith(SCALES_SUFFIX):
        first = piece.start // quantization.BLOCK
        return value[first:first + quantization.block_count(piece.stop - piece.start)]
    if name != "step" and isinstance(value, torch.Tensor) and value.shape == param.shape:
        return value.reshape(-1)[piece.start:piece.stop]
    return value


def _difference(reference, signature, rank, first_group):
    """The first difference between rank 0's param list and ``rank``'s, in words; None if they are equal."""
    if signature == reference or signature is None or reference is None:
        return None
    if len(signature) != len(reference):
        return f"rank 0 has {len(reference)} param groups, rank {rank} has {len(signature)}"
    for number, (mine, theirs) in enumerate(zip(reference, signature), first_group):
        if len(mine) != len(theirs):
            return f"param_groups[{number}] has {len(mine)} params on rank 0, {len(theirs)} on rank {rank}"
        for position, (first, second) in enumerate(zip(mine, theirs)):
            if first != second:
                return (f"param_groups[{number}]['params'][{position}] is {first[1]} of shape {first[0]} on rank 0, "
                        f"{second[1]} of shape {second[0]} on rank {rank}")
    return None
