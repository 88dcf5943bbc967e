"""The bridge between ``torch.optim.Optimizer`` and a fastopt core optimizer.

torch's side is inherited unchanged: ``param_groups`` (the source of truth for hyperparameters, which torch's
schedulers write), ``state`` keyed by param, step hooks, ``zero_grad``, and the ``state_dict`` layout. The
arithmetic is one fastopt core optimizer over zero-copy views of the params: NumPy views for CPU tensors,
CuPy views through DLPack for CUDA tensors. The core's state buffers are shown to torch as tensors sharing
their memory, under torch's names, so ``optimizer.state[p]["exp_avg"]`` is the live buffer. For DTensor params
(FSDP2) the core steps the local shards and the buffers are shown as DTensors (8-bit block scales as one row per
rank, with an ``absmax_layout`` fingerprint): see :mod:`fastopt.torch.dtensor`.

Per step the adapter does work proportional to the number of tensors, never to their size: it checks that the
params are still the ones the views were made of, copies each group's hyperparameters into the core's group
(the core re-validates only what changed), makes a view of each ``.grad`` and advances torch's ``step``
counters, which all live in one array.
"""
import contextlib
import functools
import numbers
import sys
from collections import defaultdict

import numba
import numpy as np
import torch

from .. import dtypes, interrupts, quantization, schedules
from ..backends.layout import SCALES_SUFFIX
from ..backends import processes
from ..optimizer import Optimizer
from ..serialization import decode, encode
from . import dtensor

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Keyword options of the fastopt core that the torch classes take beyond torch's signature (mixed precision).
# The attribute by which a ShardedOptimizer marks its pieces (1-D slices of params) with their whole param's size.
_WHOLE_SIZE = "_fastopt_whole_size"


def mark_shard(tensor, size):
    """Mark ``tensor`` as a shard of a tensor of ``size`` elements, for :func:`whole_size`."""
    setattr(tensor, _WHOLE_SIZE, int(size))


def whole_size(param):
    """The element count of the whole tensor ``param`` is a shard of, on which ``min_8bit_size`` is judged: a
    DTensor's global size, a marked shard's (:func:`mark_shard`), else the param's own."""
    return getattr(param, _WHOLE_SIZE, param.numel())


def decoded_states(state_dict):
    """``state_dict`` (torch's format) with every 8-bit state decoded into a float32 tensor on its codes' device and
    its ``_absmax`` scales dropped; the entries are new dicts, the other values shared."""
    # New dicts: torch's state_dict shares the entries of self.state. What is not a param's entry (a hook's) as it is.
    return dict(state_dict, state={key: decoded_entry(entry) if isinstance(entry, dict) else entry
                                   for key, entry in state_dict["state"].items()})


def decoded_entry(entry):
    """One param's state entry (a new dict) with its 8-bit states decoded, as :func:`decoded_states`."""
    entry = dict(entry)
    for name in [name for name in entry if name + SCALES_SUFFIX in entry]:
        codes, scales = entry.pop(name), entry.pop(name + SCALES_SUFFIX)
        values = quantization.dequantize(codes.detach().cpu().numpy(), scales.detach().cpu().numpy(),
                                         quantization.STATE_SIGNED[name])
        entry[name] = torch.from_numpy(values).to(codes.device)
    return entry


CORE_OPTIONS = ("master_weights", "state_dtype", "rounding", "seed", "max_grad_norm", "min_8bit_size",
                "state_rounding")


def _plain(value):
    """A hyperparameter as the core takes it: one-element tensors (torch allows a tensor lr or betas) as floats."""
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, tuple) and any(isinstance(item, torch.Tensor) for item in value):
        return tuple(_plain(item) for item in value)
    return value


def _memory(tensor):
    """What a view of ``tensor`` depends on: its address, shape and strides (a DTensor's: its local tensor's)."""
    tensor = dtensor.local(tensor)
    return tensor.data_ptr(), tensor.shape, tensor.stride()


@contextlib.contextmanager
def _torch_threads():
    """Numba's kernels on as many threads as torch uses (at most ``NUMBA_NUM_THREADS``), and torch's thread count as
    it was afterwards: Numba's OpenMP layer sets the process's OpenMP thread count, which torch reads, on its first
    parallel launch (``torch.set_num_threads(1)`` came back as 2). Each setter runs only where the count differs.
    Numba's threads are not started for this (a step of small params runs its one-thread kernel): until a parallel
    launch has started them they run at Numba's default, which only a lower torch count changes."""
    threads = torch.get_num_threads()
    wanted = min(threads, numba.config.NUMBA_NUM_THREADS)
    if wanted != numba.config.NUMBA_NUM_THREADS or processes.threading_layer() is not None:
        if numba.get_num_threads() != wanted:
            numba.set_num_threads(wanted)
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _outside_compile(step):
    """``step`` run eagerly under ``torch.compile``: compiled code graph-breaks around it (dynamo traced into
    Numba's dispatcher and NumPy code otherwise, and failed on a process's first step). ``torch.compiler.disable``
    imports dynamo (2 s), so the wrapper is made on the first step after something else imported it: without
    dynamo loaded nothing is compiling."""
    disabled = None

    @functools.wraps(step)
    def run(self, *args, **kwargs):
        nonlocal disabled
        if "torch._dynamo" not in sys.modules:
            return step(self, *args, **kwargs)
        if disabled is None:
            disabled = torch.compiler.disable(step)
        return disabled(self, *args, **kwargs)

    return run


class _HostViews:
    """CPU tensors: NumPy arrays sharing the tensor's memory; the core runs its Numba kernels on them."""

    device = torch.device("cpu")

    @staticmethod
    def view(tensor):
        # .numpy() refuses tensors that require grad; detach() costs a tensor object, so only where needed.
        tensor = tensor.detach() if tensor.requires_grad else tensor
        if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16: the same bits as ml_dtypes.bfloat16
            return tensor.view(torch.int16).numpy().view(dtypes.numpy_dtype("bfloat16"))
        return tensor.numpy()

    @staticmethod
    def expose(buffer):
        if dtypes.storage_name(buffer.dtype) == "bfloat16":
            return torch.from_numpy(buffer.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(buffer)

    @classmethod
    def to_host(cls, tensor):
        return cls.view(tensor.detach().cpu())

    @staticmethod
    def scale(tensor):
        """GradScaler's scale (a one-element tensor) as the core's ``grad_scale``."""
        return float(tensor)

    @staticmethod
    def on_device():
        """Where the core's kernels run: on Numba's threads, as many as torch's (see _torch_threads)."""
        return _torch_threads()

    stream = on_device


class _CudaViews:
    """CUDA tensors: CuPy arrays sharing the tensor's memory (DLPack); the core picks its CUDA engine for them
    and its kernels run on torch's current stream, ordered with torch's own work without a synchronisation."""

    def __init__(self, device):
        import cupy  # here only: fastopt.torch on CPU tensors never needs CuPy

        self.cupy = cupy
        self.device = device
        self._stream = (None, None)  # (torch stream handle, CuPy ExternalStream) of the last step

    def view(self, tensor):
        tensor = tensor.detach() if tensor.requires_grad else tensor
        if tensor.dtype == torch.bfloat16:  # CuPy has no bfloat16: the engine reads uint16 arrays as its bits
            return self.cupy.from_dlpack(tensor.view(torch.int16)).view(self.cupy.uint16)
        return self.cupy.from_dlpack(tensor)

    def expose(self, buffer):
        if buffer.dtype == self.cupy.uint16:
            return torch.from_dlpack(buffer.view(self.cupy.int16)).view(torch.bfloat16)
        return torch.from_dlpack(buffer)

    @staticmethod
    def to_host(tensor):
        return _HostViews.to_host(tensor)

    def scale(self, tensor):
        """GradScaler's scale as a device array: the CUDA engine inverts it on the device, without a sync."""
        return self.view(tensor.detach().reshape(1).float())

    def on_device(self):
        """CuPy's current device set to the params' (the core's CUDA engine works on the current device)."""
        return self.cupy.cuda.Device(self.device.index)

    def stream(self):
        """The params' device, and torch's current stream on it as CuPy's current stream."""
        handle = torch.cuda.current_stream(self.device).cuda_stream
        if self._stream[0] != handle:
            self._stream = (handle, self.cupy.cuda.ExternalStream(handle, device_id=self.device.index))
        stack = contextlib.ExitStack()
        stack.enter_context(self.on_device())
        stack.enter_context(self._stream[1])
        return stack


class TorchOptimizer(torch.optim.Optimizer):
    """Base of the ``fastopt.torch`` optimizers: a ``torch.optim.Optimizer`` whose step is a fastopt kernel.

    Subclasses give torch's signature and ``defaults``, and set ``CORE`` (the fastopt optimizer class),
    ``STEP_IN_STATE`` (whether torch keeps a ``step`` tensor per param: Adam and RMSprop do, SGD does not) and
    ``EAGER_STATE`` (whether torch makes every param's state at construction: Adagrad does).

    Behaviour beyond torch's:

    - ``lr`` may be a :mod:`fastopt.schedules` schedule, evaluated inside the kernel at the optimizer's step
      count (the number of ``step()`` calls that ran). A schedule and a torch lr scheduler on the same group do
      not combine: the first step raises. ``param_groups[i]["lr"]`` then holds the schedule; :meth:`current_lr`
      gives the rates as floats.
    - A param group may hold ``"lr_scale"``: a list of tensors like its params (finite, >= 0); element ``j`` of a
      param learns at ``lr * lr_scale[j]``.
    - Params may be float32, float64, bfloat16 or float16 (grads: the param's dtype or float32), contiguous, all on
      one device (the CPU or one CUDA device). The core's mixed-precision options are keywords of every class:
      ``master_weights``, ``state_dtype``, ``rounding``, ``seed``, ``max_grad_norm``, ``min_8bit_size`` and
      ``state_rounding`` (see
      :class:`fastopt.Optimizer`); ``state[p]`` then shows ``master_param`` and the states in their storage dtype
      (8-bit states: uint8 codes, and their block scales as ``<name>_absmax``). Their ``state_dict`` keeps that
      form (a quarter of float32's size); :meth:`float32_state_dict` exports float32 states that ``torch.optim``
      loads, and a ``torch.optim`` checkpoint loads into an 8-bit optimizer encoded.
    - ``torch.amp.GradScaler`` hands its scale to the step (``_step_supports_amp_scaling``): the kernel unscales
      the grads, checks them for NaN/inf in the same read as the ``max_grad_norm`` clip, and skips the step if any
      (the scaler's own check decides its scale update, as with torch's fused optimizers). The scaler's
      ``found_inf`` (all ranks' finding under FSDP's ShardedGradScaler) skips the step whatever the local grads,
      as in torch's fused optimizers: params, state and ``step`` unchanged.
    - A number-valued ``lr_scale`` (timm's layer-wise lr decay, which its schedulers fold into ``lr``) is left
      alone, as torch does. ``step`` runs eagerly under ``torch.compile`` (a graph break), and on CPU tensors its
      Numba threads follow ``torch.get_num_threads()``, which the step leaves as it found it.
    - ``state[p]`` holds views of fastopt's buffers: change them in place (``.copy_()``, ``.zero_()``), not by
      assigning other tensors (use :meth:`load_state_dict` for that).
    """

    CORE: type = None
    STEP_IN_STATE = True
    EAGER_STATE = False  # every param's state exists from construction on (torch's Adagrad), not from its first step
    _step_supports_amp_scaling = True  # GradScaler sets grad_scale / found_inf and calls step (see step)
    _core = None  # also the marker for "build before the next step" (after unpickling, say)
    _layout_changed = False
    _saved_step_count = 0
    _core_options = {}  # replaced per instance in __init__ (and restored by __setstate__)
    # torch's constructor checks, in its order (see _check_arguments), and the group keys its __setstate__ fills in
    # with their historical defaults where a checkpoint of an older version lacks them.
    ARGUMENT_CHECKS = ()
    OLDER_CHECKPOINT_DEFAULTS = {}

    def __init__(self, params, defaults, options=None):
        unknown = set(options or ()) - set(CORE_OPTIONS)
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword argument(s) {sorted(unknown)}")
        self._check_arguments(defaults)  # before params, as torch: params=None with a bad lr is the lr's error
        self._check_flags(defaults, f"{type(self).__name__}")
        self._core_options = dict(options or {})
        super().__init__(params, defaults)  # calls add_param_group per group
        if defaults.get("fused") and defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")  # torch's check and message
        self._rebuild(step_count=0)

    # ---------------------------------------------------------------- checks of torch-side input
    @classmethod
    def _check_arguments(cls, defaults):
        """torch's constructor checks, in its order, with its exception types and messages: ``ARGUMENT_CHECKS``
        lists the class's ``(keyword, message)`` pairs of values that must be >= 0 (``"betas"``: each in [0, 1)).
        The core checks everything (finiteness, types) again when it is built."""
        lr = defaults["lr"]
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        for key, message in cls.ARGUMENT_CHECKS:
            value = defaults[key]
            if key == "betas":
                if not isinstance(value, (tuple, list)) or len(value) != 2:  # torch: IndexError, or ignores a third
                    raise TypeError(f"betas must be a pair (beta1, beta2), got {value!r}")
                for index in (0, 1):
                    if not 0.0 <= value[index] < 1.0:
                        raise ValueError(f"Invalid beta parameter at index {index}: {value[index]}")
            elif not isinstance(value, schedules.Schedule) and not 0.0 <= value:
                raise ValueError(f"{message}: {value}")

    @staticmethod
    def _check_flags(group, where):
        if group.get("differentiable"):
            raise ValueError(f"{where}: differentiable=True is not supported: fastopt updates params in place in "
                             "a fused kernel outside autograd; use torch.optim for a differentiable step")
        if group.get("capturable"):
            raise ValueError(f"{where}: capturable=True is not supported: the adapter keeps torch's per-param "
                             "'step' values on the host, so its step cannot be captured in a CUDA graph (the core "
                             "fastopt optimizer over CuPy arrays can be)")

    @staticmethod
    def _check_tensor(tensor, where, device):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{where} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{where} has dtype {tensor.dtype}; fastopt.torch supports torch.float32, float64, "
                            "bfloat16 and float16")
        if tensor.layout != torch.strided:
            raise TypeError(f"{where} has layout {tensor.layout}; fastopt.torch supports dense (strided) tensors")
        if tensor.device.type not in ("cpu", "cuda"):
            raise TypeError(f"{where} is on {tensor.device}; fastopt.torch runs on CPU and CUDA tensors")
        if tensor.device != device:
            raise ValueError(f"{where} is on {tensor.device}, the optimizer's first param on {device}; one "
                             "fastopt.torch optimizer works on one device (make one optimizer per device)")
        if not tensor.is_contiguous():
            raise ValueError(f"{where} is not contiguous (stride {tensor.stride()}); fastopt updates params in "
                             "place through a zero-copy view, so they must be contiguous (channels_last is not "
                             "supported: use model.to(memory_format=torch.contiguous_format))")

    def add_param_group(self, param_group):
        """torch's ``add_param_group``; after construction the new group is checked at once by building the core
        anew (on error the group is not added). A param listed twice in the group is kept once, after torch's
        warning (torch would update it twice per step; fastopt's kernels update each param once)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        count, first = len(group["params"]), {}
        for index, param in enumerate(group["params"]):
            first.setdefault(id(param), index)
        if len(first) != count:
            for key in ("params", "param_names", "lr_scale"):  # the lists aligned with the params
                if isinstance(group.get(key), (list, tuple)) and len(group[key]) == count:
                    group[key] = [group[key][index] for index in first.values()]
        if self._core is None:  # in __init__: the core is built once, over all groups, at its end
            return
        try:
            self._rebuild(self._core.step_count)
        except Exception:
            self.param_groups.pop()
            raise

    # ---------------------------------------------------------------- the core optimizer
    def _core_class(self):
        return self.CORE

    def _core_group(self, group, views, where):
        core_group = {"params": [views.view(param) for param in group["params"]]}
        for key in self.CORE.DEFAULTS:
            core_group[key] = _plain(group[key])
        core_group["lr_scale"] = self._lr_scale_views(group, views, where)
        return core_group

    def _lr_scale_views(self, group, views, where):
        scales = group.get("lr_scale")
        # A number is another library's key, not fastopt's per-element lr_scale: timm's layer-wise lr decay puts a
        # float there and its schedulers set lr = value * lr_scale. Left alone, as torch leaves keys it does not use.
        if scales is None or isinstance(scales, numbers.Number):
            return None
        if isinstance(scales, torch.Tensor):
            scales = [scales]
        result = []
        for index, scale in enumerate(scales):
            # A DTensor param's: its shard of a full-size tensor (or a DTensor's local tensor).
            scale = dtensor.local_part(scale, group["params"][index] if index < len(group["params"]) else None)
            self._check_tensor(scale, f"{where}['lr_scale'][{index}]", views.device)
            result.append(views.view(scale))
        return result

    def _rebuild(self, step_count):
        """A new core optimizer over the current params, holding the state now in ``self.state`` (torch tensors:
        views of the previous core's buffers, or what ``load_state_dict`` put there). Used at construction, by
        ``add_param_group`` and ``load_state_dict``, and when a param's storage changed. Nothing is replaced
        until the new core is complete, so an error leaves the optimizer as it was."""
        params = [param for group in self.param_groups for param in group["params"]]
        if not params:
            raise ValueError("the optimizer got an empty parameter list")
        device = params[0].device
        for index, group in enumerate(self.param_groups):
            self._check_flags(group, f"param_groups[{index}]")
            for number, param in enumerate(group["params"]):
                self._check_tensor(param, f"param_groups[{index}]['params'][{number}]", device)
        views = _CudaViews(device) if device.type == "cuda" else _HostViews()
        views = dtensor.views_for(params, views)  # DTensor params (FSDP2): views of their local shards
        core_class = self._core_class()
        with views.on_device():
            core = core_class([self._core_group(group, views, f"param_groups[{index}]")
                               for index, group in enumerate(self.param_groups)], **self._core_options)
        core.grad_reduction = getattr(views, "grad_reduction", None)  # DTensors: clip and skip on global grads
        # Shards (DTensors, a ShardedOptimizer's pieces) store their states as their whole tensors do.
        core.whole_sizes = {index: whole_size(param) for index, (param, array) in enumerate(zip(params, core.params))
                            if whole_size(param) != array.size}
        if core.grad_reduction is not None and not core.ELEMENTWISE:
            raise NotImplementedError(f"{type(self).__name__} over sharded DTensor params: its update needs the norms of "
                                      "whole tensors, and each rank holds shards of them")
        entries, counts = {}, np.zeros(len(params), dtype=np.int64)
        groups_of_params = [group for group in self.param_groups for _ in group["params"]]
        for index, (param, group) in enumerate(zip(params, groups_of_params)):
            saved = self.state.get(param)
            if not saved:
                continue
            # A DTensor param's 8-bit scales: this rank's row, checked to belong to its shards (refused otherwise).
            saved = dtensor.saved_entry(param, saved, f"state of param {index}")
            entry = {name: views.to_host(value) for name, value in saved.items()
                     if name != "step" and value is not None}
            # An optimizer that keeps no step (torch's SGD) has buffers from the first step that counts on (for
            # SGD, the first momentum step): the core's per-param count must say so.
            entry["step"] = int(float(saved["step"])) if "step" in saved else int(bool(entry))
            entry = self._core_entry(entry, group)
            counts[index] = entry["step"]
            entries[index] = entry
        if entries or step_count:
            position, groups = 0, []
            for group in core.param_groups:
                groups.append({key: group[key] for key in core.DEFAULTS})
                groups[-1]["params"] = list(range(position, position + len(group["params"])))
                position += len(group["params"])
            with views.on_device():
                core.load_state_dict({"state": entries, "param_groups": groups, "step_count": step_count})

        self._core, self._views, self._params = core, views, params
        self._memory = [_memory(param) for param in params]
        self._group_sizes = [len(group["params"]) for group in self.param_groups]
        self._lr_scales = [group.get("lr_scale") for group in self.param_groups]
        # torch's `step` of every param, in one array: a step advances them all in one operation.
        scalar = np.float64 if torch.get_default_dtype() == torch.float64 else np.float32
        self._steps = counts.astype(scalar)
        self._step_tensors = torch.from_numpy(self._steps)
        self._counted = self._counted_mask()
        self._exposed = np.zeros(len(params), dtype=bool)
        # What is not a param's (torch keeps entries under other keys, as its state_dict hooks may add) stays.
        others = {key: value for key, value in self.state.items() if not isinstance(key, torch.Tensor)}
        self.state = defaultdict(dict, others)
        if self.EAGER_STATE:
            with views.on_device():
                core.initialize_state()
            entries = range(len(params))
        for index in entries:
            self._expose(index)

    def _core_entry(self, entry, group):
        """The core's state-dict entry of a param (its buffers as host arrays, and ``step``) from what torch holds
        in ``state[p]``, and in its ``group``: where the package a class follows keeps per-group values that the core
        keeps per param (schedule-free's ``k``), a subclass takes them from the group here."""
        return entry

    def _counted_mask(self):
        """The params whose step count a step with a grad advances (the rule's ``counts_step``: all, except in SGD
        groups without momentum, for which torch keeps no state); None: all."""
        counts = [self._core.counts_step(group) for group in self._core.param_groups]
        if all(counts):
            return None
        return np.concatenate([np.full(len(group["params"]), count)
                               for group, count in zip(self._core.param_groups, counts)])

    def _expose(self, index):
        """Show param ``index``'s core buffers (and ``step``) to torch in ``self.state``, as torch would hold
        them after its first step of that param."""
        entry = {"step": self._step_tensors[index]} if self.STEP_IN_STATE else {}
        for name, buffer in self._core.state[index].items():
            entry[name] = self._views.expose(buffer)
        param = self._params[index]
        if dtensor.is_dtensor(param):  # its buffers as DTensors like it; 8-bit block scales as one row per rank
            entry = self._views.state_entry(param, entry, self._core, index)
        self.state[param] = entry
        self._exposed[index] = True

    # ---------------------------------------------------------------- the step
    def _params_changed(self):
        """Whether the param list or any param's memory changed since the views were made (``p.data = ...``,
        ``model.to(...)`` after the optimizer, edits of ``group["params"]``): the views would update memory
        that is no longer the param's, or in another order (``p.data = p.data.t()`` keeps the address)."""
        if self._core is None or len(self.param_groups) != len(self._group_sizes):
            return True
        position = 0
        for group, size in zip(self.param_groups, self._group_sizes):
            params = group["params"]
            if len(params) != size:
                return True
            for param in params:
                if param is not self._params[position] or _memory(param) != self._memory[position]:
                    return True
                position += 1
        return self._core_class() is not type(self._core)

    def _sync_groups(self):
        """Copy torch's group hyperparameters into the core's groups. A changed value other than ``lr`` may change
        which state buffers the core keeps: ``_layout_changed`` says so until a step has gone through."""
        layout_changed = False
        for index, (group, core_group) in enumerate(zip(self.param_groups, self._core.param_groups)):
            where = f"param_groups[{index}]"
            self._check_flags(group, where)
            for key in self.CORE.DEFAULTS:
                value = _plain(group[key])
                if value is not core_group[key] and value != core_group[key]:
                    core_group[key] = value
                    layout_changed |= key != "lr"
            if isinstance(core_group["lr"], schedules.Schedule) and "initial_lr" in group:
                raise TypeError(f"{where}: its lr is a fastopt schedule and a torch lr scheduler drives it too "
                                "('initial_lr' is set); use one or the other")
            scales = group.get("lr_scale")
            # A new list object means new views (the core re-checks them); to change lr_scale, assign a new list
            # (editing the list in place is not seen, as documented in the README).
            if scales is not self._lr_scales[index]:
                core_group["lr_scale"] = self._lr_scale_views(group, self._views, where)
                self._lr_scales[index] = scales
        if layout_changed:
            self._counted = self._counted_mask()
            self._layout_changed = True

    def _grads(self):
        """A view of each param's ``.grad`` (None where there is none), aligned with the core's params."""
        grads = []
        for index, param in enumerate(self._params):
            grad = param.grad
            if grad is not None:
                if grad.layout != torch.strided:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients (param {index})")
                if not grad.is_contiguous():
                    grad = grad.contiguous()  # a private copy is fine: the grad is only read
                grad = self._views.view(grad)
            grads.append(grad)
        return grads

    @_outside_compile
    def step(self, closure=None):
        """One fused update of every param that has a ``.grad`` (params without one are skipped, their state and
        step included). ``closure``, if given, re-evaluates the model with grad enabled and its result is
        returned, as in torch. Invalid hyperparameters raise before anything is written. Under ``torch.compile``
        the step runs eagerly (compiled code graph-breaks around it)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._params_changed():
            self._rebuild(self._step_count())
        self._sync_groups()
        # Set by torch.amp.GradScaler.step (and FSDP's ShardedGradScaler): the loss scale still in the grads (None
        # once unscale_ ran) and the scaler's NaN/inf finding, which may come from other ranks' grads. As in torch's
        # fused optimizers, a nonzero found_inf skips the step: params, state and step counts stay as they are.
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if found_inf is not None and float(found_inf.sum()) != 0:
            return loss
        checked = grad_scale is not None or self._core.max_grad_norm is not None or self._core.guard is not None
        skipped = self._core.skipped_steps if checked else None
        with self._views.stream():  # first: CUDA grads exported on torch's stream need no cross-stream wait
            grads = self._grads()
            with interrupts.deferred():  # the core's update and torch's step counts advance together
                self._core.step(grads, grad_scale=None if grad_scale is None else self._views.scale(grad_scale))
                self._advance(grads, skipped)
        return loss

    def _advance(self, grads, skipped):
        """After the core's step: advance torch's ``step`` of the params it updated (none if it skipped the step) and
        show the buffers of params that have them now."""
        if skipped is not None and self._core.skipped_steps != skipped:
            return
        stepped = np.fromiter((grad is not None for grad in grads), dtype=bool, count=len(grads))
        if self._counted is not None:
            stepped &= self._counted
        self._steps[stepped] += 1  # torch's `step` tensors are views of this array
        for index in np.flatnonzero(stepped & ~self._exposed):
            self._expose(index)
        if self._layout_changed:  # the core may have added buffers (amsgrad, centered or momentum switched on)
            for index in np.flatnonzero(self._exposed):
                self._expose(index)
            self._layout_changed = False

    # ---------------------------------------------------------------- rates
    def _step_count(self):
        """Steps taken (the core's count, which on the GPU is the device's: a step the device skipped does not
        count; before the core is rebuilt after unpickling, the count saved with it)."""
        if self._core is None:
            return self._saved_step_count
        self._core._sync_step_count()
        return self._core.step_count

    def current_lr(self):
        """The learning rate of each group for the next step, as floats (a schedule evaluated at the step count)."""
        return [float(schedules.as_schedule(_plain(group["lr"]))(self._step_count())) for group in self.param_groups]

    @property
    def core(self):
        """The fastopt core optimizer doing the work (its ``step_count`` counts the steps taken)."""
        return self._core

    # ---------------------------------------------------------------- state dicts
    def state_dict(self):
        """torch's ``state_dict``: ``state`` by param index with torch's names (the tensors are the live buffers,
        as torch's are) and ``param_groups``. A group whose lr is a fastopt schedule is saved with ``lr`` = its
        current value and the schedule as plain data under ``"fastopt_schedule"``, so the checkpoint loads with
        ``torch.load(weights_only=True)`` and, into ``torch.optim``, continues at a constant lr."""
        state_dict = super().state_dict()
        for key, entry in state_dict["state"].items():
            if isinstance(entry, dict) and dtensor.LAYOUT_KEY in entry:  # a new dict: a DCP load writes the checkpoint's layout into it, not here
                state_dict["state"][key] = dict(entry)
        step_count = self._step_count()
        # The core's step count (schedules and stochastic rounding are keyed by it); torch's loaders ignore it.
        state_dict["fastopt_step_count"] = step_count
        for group in state_dict["param_groups"]:  # packed copies: safe to edit
            lr = _plain(group["lr"])
            if isinstance(lr, schedules.Schedule):
                group["lr"] = float(lr(step_count))
                group["fastopt_schedule"] = {"schedule": encode(lr), "step_count": step_count}
        return state_dict

    def float32_state_dict(self):
        """:meth:`state_dict` with every 8-bit state decoded into a float32 tensor on its param's device and its
        ``_absmax`` scales dropped: the checkpoint of the ``torch.optim`` class of the same name, which loads it. A
        DTensor param's states are decoded on each rank from its own shard and row of scales, into DTensors like the
        param (its ``absmax_layout`` dropped): ``full_tensor()`` of each gathers them for one process, and
        ``torch.distributed.checkpoint`` reshards them to any mesh."""
        return decoded_states(dtensor.decoded_states(self.state_dict()))

    def load_state_dict(self, state_dict):
        """torch's ``load_state_dict`` (from this class or from the ``torch.optim`` class of the same name): the
        checkpoint's hyperparameters replace the groups' (keys it lacks take torch's historical defaults, as torch's
        ``__setstate__`` fills them in), its state is copied into fastopt's buffers. Kept from this optimizer:
        ``capturable`` and ``differentiable`` (fastopt runs neither) and a group's ``lr_scale`` where the checkpoint
        has none. A checkpoint that does not fit (state shapes, unknown buffers, invalid hyperparameters, a DTensor
        param's 8-bit block scales from other shards) raises and leaves the optimizer as it was. Post-hooks run once
        fastopt's state is built: what they add stays."""
        previous = self.state, self.param_groups
        step_count = self._step_count()
        post_hooks = self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_post_hooks = type(post_hooks)()  # run below, after the rebuild
        try:
            super().load_state_dict(state_dict)  # torch's checks; self.state and param_groups now the checkpoint's
        finally:
            self._optimizer_load_state_dict_post_hooks = post_hooks
        try:
            self._restore_state_dtypes(state_dict)
            step_count = Optimizer.count(state_dict.get("fastopt_step_count", step_count),
                                         "state dict: fastopt_step_count")
            for group, old in zip(self.param_groups, previous[1]):
                encoded = group.pop("fastopt_schedule", None)
                if encoded is not None:
                    group["lr"] = decode(encoded["schedule"])
                    step_count = Optimizer.count(encoded["step_count"], "fastopt_schedule: step_count")
                for flag in ("capturable", "differentiable"):
                    if flag in old:
                        group[flag] = old[flag]
                if group.get("lr_scale") is None and old.get("lr_scale") is not None:
                    group["lr_scale"] = old["lr_scale"]
            self._rebuild(step_count)
        except Exception:
            self.state, self.param_groups = previous
            raise
        for hook in post_hooks.values():
            hook(self)

    def _restore_state_dtypes(self, state_dict):
        """torch's load casts every floating state tensor to its param's dtype: the float32 states and master copy
        of a 16-bit param would come back rounded to it. Take the checkpoint's values in their own dtypes (the core
        converts each to its buffer's storage)."""
        saved_ids = [index for group in state_dict["param_groups"] for index in group["params"]]
        params = [param for group in self.param_groups for param in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            for name, value in state_dict["state"].get(saved_id, {}).items():
                loaded = self.state[param].get(name)
                if name != "step" and torch.is_tensor(value) and torch.is_tensor(loaded) \
                        and value.dtype != loaded.dtype:
                    self.state[param][name] = value.to(param.device)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # checkpoints of older versions lack newer keys: torch's defaults, as torch
            for key, default in self.OLDER_CHECKPOINT_DEFAULTS.items():
                group.setdefault(key, default)

    def __getstate__(self):
        state = super().__getstate__()
        state["_saved_step_count"] = self._step_count()
        state["_core_options"] = self._core_options
        return state
