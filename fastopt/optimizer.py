"""The optimizer base class: param groups, validation, state and the step.

The class holds what torch.optim's ``Optimizer`` holds (``param_groups``, per-parameter ``state``) and leaves
the arithmetic to an engine from :mod:`fastopt.backends` (fused Numba kernels, fused CUDA kernels, or the
float64 reference). Every check runs before any engine work, so a step that raises leaves params and state
untouched.
"""
import contextlib
import math
import numbers
import threading
import types

import numpy as np

from . import backends, dtypes, interrupts, quantization, schedules
from .backends.layout import MASTER, SCALES_SUFFIX, GroupTable, Layout, MemorySpans
from .guard import Guard
from .kernels.cpu import layout as kernel_layout
from .state import OptimizerState, ParamState

STATE_DTYPES = ("float32", "bfloat16", "8bit")
ROUNDINGS = ("nearest", "stochastic")


class _ParamValue:
    """``initial_state``'s answer for a buffer that starts as a copy of its param (schedule-free's ``z``)."""

    def __repr__(self):
        return "PARAM_VALUE"


PARAM_VALUE = _ParamValue()


def _is_array(value):
    return isinstance(value, np.ndarray) or hasattr(value, "__cuda_array_interface__")


class Optimizer:
    """Base of the fastopt optimizers.

    Subclasses are the update rules (:mod:`fastopt.rules`). Each sets ``KERNEL`` (the name of its element math in
    ``kernels/cpu/rules`` and ``kernels/cuda/rules``), ``DEFAULTS`` (torch's hyperparameters and defaults),
    ``STATE_SLOTS`` (torch's state names, in the kernels' slot order; at most three) and ``OPTIONAL_STATES`` (those
    some groups do not use), ``COLUMNS`` (the group-table columns its kernels read; ``group_row`` fills them from a
    group, by default as floats of the group's values of the same names) and ``REFERENCE`` (the float64 reference
    of one tensor's step, taking the group's hyperparameters as keywords), and may override
    ``validate_hyperparameters``, ``state_names(group)`` (the buffers a group uses; by default those not optional),
    ``counts_step(group)`` (whether a step advances the params' step counts) and ``initial_state(name, group)`` (the
    value a new state buffer starts at, 0 by default, or :data:`PARAM_VALUE`: a copy of the param). A rule that keeps
    running per-param values besides its buffers (schedule-free's weight sum) names them in ``SCALARS`` (at most
    ``TENSOR_SCALARS``); the kernels advance them, and the state dict holds them beside ``step``.

    Keyword options of every optimizer:

    - ``backend``: "auto" (CuPy arrays: "cuda", else "cpu"), "cpu", "cuda" or "reference" (float64 NumPy).
    - ``guard``: a :class:`~fastopt.Guard` that skips non-finite steps and backs the rate off.
    - Mixed precision. Params may be float64, float32, bfloat16 or float16; the math runs in float32 (float64 for
      float64 params), grads may be the param's dtype or float32.

      - ``master_weights``: 16-bit params keep a float32 copy (state ``"master_param"``) that the update reads
        and writes; the stored param is its rounding to nearest, always ``round(master)`` exactly.
      - ``state_dtype``: "float32" (the default: the states have the math dtype), "bfloat16" (states of params
        of at most float32 stored in bfloat16, rounded to nearest after each update) or "8bit" (moments of params of
        at most float32 with at least ``min_8bit_size`` elements, 4096 by default, stored as uint8 codes, the state
        ``name``, and a float32 absmax per block of 256 elements, the state ``name + "_absmax"``, in the format of
        :mod:`fastopt.quantization`: decoded, updated in float32 and encoded again inside the one fused pass; the
        others stay float32. :meth:`float32_state_dict` exports them as torch's float32 states).
      - ``rounding``: how 16-bit params without a master copy are rounded: "nearest" (even) or "stochastic"
        (bfloat16 only; unbiased, keyed by (``seed``, step, element) so that runs are reproducible).
      - ``state_rounding``: how 8-bit states are encoded: "nearest" (the default), "stochastic" (every 8-bit state)
        or a tuple of the state names to round stochastically, e.g. ``("exp_avg_sq",)``: to one of the two codes
        around the value, unbiased (``quantization.encode_float_codes``), keyed by (``seed``, step, state slot,
        element). Rounding to nearest drops the per-step changes of a slow running average that are below half a
        code spacing (1/32 to 1/16 of the value), so AdamW's second moment drifts; stochastic rounding keeps them
        in expectation, at the cost of noise (``bench/RESULTS_8BIT.md``: on the LM, ``("exp_avg_sq",)`` matched
        float32's loss; rounding ``exp_avg`` too added noise).
      - ``max_grad_norm``: clip the grads by their global L2 norm inside the step (see :meth:`step`).

    ``grad_reduction`` (an attribute, None by default): for params that are shards of larger tensors held by other
    processes (``fastopt.torch`` over FSDP2's DTensors). A callable taking this process's grad statistics
    ``(sum_of_squares, nonfinite)`` and returning the totals over every process (an all-reduce); the step decides
    clipping and the non-finite skip from the totals, so that every process decides the same. It is called in every
    step that has grad control (``grad_scale``, ``max_grad_norm`` or a guard), on every process together. The
    statistics are read on the host: the CPU engine only. Copies and pickles drop it.

    ``whole_sizes`` (an attribute, empty by default): param index -> the element count of the whole tensor that param
    is a shard of (``fastopt.torch`` over FSDP2's DTensors or a ``ShardedOptimizer``'s pieces). ``min_8bit_size`` is
    judged on it, so that every shard of a tensor stores its states alike, as one process would. Set it before the
    first step; copies and pickles keep it.
    """

    KERNEL: str = None
    DEFAULTS: dict = {}
    STATE_SLOTS: tuple = ()
    OPTIONAL_STATES: tuple = ()
    COLUMNS: tuple = ()
    SCALARS: tuple = ()
    REFERENCE = None
    ELEMENTWISE = True  # each element's update reads only that element (a slice of a tensor steps as the tensor)
    grad_reduction = None  # see the class docstring
    whole_sizes = types.MappingProxyType({})  # see the class docstring

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if len(cls.STATE_SLOTS) > kernel_layout.STATE_SLOTS or not set(cls.OPTIONAL_STATES) <= set(cls.STATE_SLOTS):
            raise TypeError(f"{cls.__name__}: a rule has at most {kernel_layout.STATE_SLOTS} STATE_SLOTS (the kernels' "
                            "address table), and its OPTIONAL_STATES are among them")
        if len(cls.SCALARS) > kernel_layout.TENSOR_SCALARS:
            raise TypeError(f"{cls.__name__}: a rule keeps at most {kernel_layout.TENSOR_SCALARS} SCALARS")

    def __init__(self, params, defaults, *, backend="auto", guard=None, master_weights=False, state_dtype="float32",
                 rounding="nearest", seed=0, max_grad_norm=None, min_8bit_size=quantization.MIN_8BIT_SIZE,
                 state_rounding="nearest"):
        if guard is not None and not isinstance(guard, Guard):
            raise TypeError(f"guard must be a fastopt.Guard or None, got {type(guard).__name__}")
        self.check_flag(master_weights, "master_weights", type(self).__name__)
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"unknown state_dtype {state_dtype!r}; choose one of {STATE_DTYPES}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"unknown rounding {rounding!r}; choose one of {ROUNDINGS}")
        if rounding == "stochastic" and master_weights:
            raise ValueError("rounding='stochastic' is for params without master weights: with master_weights=True "
                             "the param is always the master rounded to nearest")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2 ** 63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
        if max_grad_norm is not None:
            max_grad_norm = self.check_number(max_grad_norm, "max_grad_norm", type(self).__name__, low=0.0,
                                              low_open=True)
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, numbers.Integral) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be a non-negative integer, got {min_8bit_size!r}")
        self.stochastic_states = self._check_state_rounding(state_rounding, state_dtype)
        self.guard = guard
        self.master_weights = bool(master_weights)
        self.state_dtype = state_dtype
        self.min_8bit_size = int(min_8bit_size)
        self.rounding = rounding
        self.seed = int(seed)
        self.max_grad_norm = max_grad_norm
        self.last_grad_norm = None
        self._skipped_steps = 0
        groups = self._parse_params(params)
        first = groups[0].get("params", ())
        self._engine = backends.select(backend, [first] if _is_array(first) else first)
        self.defaults = dict(defaults)
        self.validate_hyperparameters(self.defaults, "defaults")
        self.param_groups = []
        self._state = OptimizerState()  # per param, in group order: its torch-named state buffers (see state)
        # What the kernels address, held here rather than read from param_groups (which the user may edit): the
        # params, and each param's lr_scale array (or None). Holding them keeps them alive, so the ids of the
        # groups' entries, compared with these every step, cannot be those of freed arrays.
        self._params = []
        self._lr_scales = []
        self._group_counts = []  # the number of params in each group
        self.step_count = 0
        self._stepping = threading.Lock()  # held by the step in progress: one optimizer, one step at a time
        self._frozen_layout = None  # the Layout the engine was last handed; None: a buffer changed since
        self._group_table = None
        for group in groups:
            self._add_group(group)
        self._backend = self._engine(self._layout())
        self._group_snapshot = None
        self._missing_state = {}  # param index -> state buffers its group needs that it does not have yet

    @classmethod
    def _check_state_rounding(cls, state_rounding, state_dtype):
        """The states whose 8-bit codes are rounded stochastically (a frozenset of names) for ``state_rounding``."""
        if isinstance(state_rounding, str):
            if state_rounding not in ROUNDINGS:
                raise ValueError(f"unknown state_rounding {state_rounding!r}; choose one of {ROUNDINGS} or a tuple of "
                                 f"state names (of {cls.STATE_SLOTS})")
            names = frozenset(cls.STATE_SLOTS if state_rounding == "stochastic" else ())
        else:
            try:
                names = frozenset(state_rounding)
            except TypeError:
                raise TypeError(f"state_rounding must be 'nearest', 'stochastic' or a tuple of state names, got "
                                f"{state_rounding!r}") from None
            unknown = sorted(map(str, names - set(cls.STATE_SLOTS)))
            if unknown:
                raise ValueError(f"state_rounding names {unknown}, which {cls.__name__} does not keep (its states: "
                                 f"{cls.STATE_SLOTS})")
        names = frozenset(name for name in names if quantization.STATE_SIGNED.get(name) is not None)
        if names and state_dtype != "8bit":
            raise ValueError("state_rounding rounds the codes of 8-bit states stochastically: it needs "
                             f"state_dtype='8bit', got state_dtype={state_dtype!r}")
        return names

    # ---------------------------------------------------------------- groups
    @staticmethod
    def _parse_params(params):
        if _is_array(params):
            raise TypeError("params must be a list of arrays or of param-group dicts, got a single array")
        if isinstance(params, dict):
            raise TypeError("params must be a list of param-group dicts, got a single dict; wrap it in a list")
        params = list(params)
        if not params:
            raise ValueError("the optimizer got an empty parameter list")
        if all(isinstance(p, dict) for p in params):
            groups = [dict(group) for group in params]
            for group in groups:  # a generator would be used up by the first look at it
                if "params" in group and not _is_array(group["params"]):
                    group["params"] = list(group["params"])
            return groups
        if any(isinstance(p, dict) for p in params):
            raise TypeError("params mixes arrays and param-group dicts; use one or the other")
        return [{"params": params}]

    def add_param_group(self, group):
        """Add a param group (a dict with ``"params"`` and any hyperparameters), as torch's add_param_group."""
        if not isinstance(group, dict):
            raise TypeError(f"a param group must be a dict, got {type(group).__name__}")
        self._sync_step_count()
        steps, scalars = self._backend.tensor_steps(), self._backend.tensor_scalars()
        self._add_group(dict(group))
        self._skipped_steps = self.skipped_steps  # the old engine's count of device-skipped steps
        self._frozen_layout = None
        self._backend = self._engine(self._layout())
        added = len(self._params) - steps.size
        self._backend.set_tensor_steps(np.concatenate([steps, np.zeros(added, np.int64)]))
        self._backend.set_tensor_scalars(np.concatenate([scalars, np.zeros((added, scalars.shape[1]))]))
        self._group_snapshot = None

    def _add_group(self, group):
        where = f"param_groups[{len(self.param_groups)}]"
        if "params" not in group:
            raise ValueError(f"{where} has no 'params' entry")
        self._check_keys(group, where)
        params = group["params"]
        if _is_array(params):
            params = [params]
        params = list(params)
        for index, param in enumerate(params):
            self._check_array(param, f"{where}['params'][{index}]", param=True)
        lr_scale = group.get("lr_scale")
        if lr_scale is not None:
            lr_scale = self._check_lr_scale(lr_scale, params, where)
        self._check_disjoint(params, lr_scale, where)
        full = {"params": params}
        for key, default in self.defaults.items():
            full[key] = group.get(key, default)
        full["lr_scale"] = lr_scale
        self.validate_hyperparameters(full, where)
        self.param_groups.append(full)
        self._lr_scales += lr_scale or [None] * len(params)
        self._group_counts.append(len(params))
        for param in params:
            self._params.append(param)
            self.state.append(ParamState(self._replacement_check(len(self.state))))

    def _check_disjoint(self, params, lr_scale, where):
        """No param may appear twice or share memory with another (threads would update it twice per step), and no
        lr_scale may share memory with a param (a thread would read it while another writes it)."""
        if len({id(p) for p in self._params + params}) != len(self._params) + len(params):
            raise ValueError(f"{where} holds a param that appears more than once among the optimizer's params")
        spans = MemorySpans([(f"param {index}", param) for index, param in enumerate(self._params)] +
                            [(f"{where}['params'][{index}]", param) for index, param in enumerate(params)],
                            self._engine.address)
        scales = [(f"lr_scale of param {index}", scale) for index, scale in enumerate(self._lr_scales)
                  if scale is not None]
        spans.check_disjoint(scales + [(f"{where}['lr_scale'][{index}]", scale)
                                       for index, scale in enumerate(lr_scale or ())], self._engine.address)

    def _check_array(self, array, where, *, param=False, like=None, grad=False):
        """Type, device, dtype, layout (and for params, writability) of one array, against its param ``like``:
        a param is float64, float32, bfloat16 or float16; a grad has its param's dtype or float32; an lr_scale
        has the param's math dtype (float32 for a 16-bit param)."""
        self._engine.check_array(array, where, writable=param)
        storage = self._engine.storage_name(array.dtype)
        if param:
            if storage is None:
                raise TypeError(f"{where} has dtype {array.dtype}; supported: float32, float64, bfloat16 "
                                "(ml_dtypes.bfloat16; uint16 bits on CuPy), float16")
            if self.rounding == "stochastic" and storage == "float16" and not self.master_weights:
                raise ValueError(f"{where} is float16: rounding='stochastic' supports bfloat16 params (or use "
                                 "master_weights=True)")
            return
        if array.shape != like.shape:
            raise ValueError(f"{where} has shape {array.shape}, its param has shape {like.shape}")
        param_storage = self._engine.storage_name(like.dtype)
        if grad:
            if array.dtype != like.dtype and storage != "float32":
                raise TypeError(f"{where} has dtype {array.dtype}; a grad must have its param's dtype "
                                f"({like.dtype}) or float32: convert it with grad.astype(np.float32)")
            return
        math = dtypes.math_dtype(param_storage)
        if array.dtype != math:
            raise TypeError(f"{where} has dtype {array.dtype}; it must be {math}, the math dtype of its "
                            f"{param_storage} param")

    def param_storage(self, index):
        """The storage name of param ``index`` ('float64', 'float32', 'bfloat16' or 'float16')."""
        return self._engine.storage_name(self._params[index].dtype)

    def state_storage(self, index):
        """How param ``index``'s state buffers are stored, those not in 8 bits (:meth:`coded`): bfloat16 where
        ``state_dtype='bfloat16'`` (for params of at most float32), else the param's math dtype."""
        storage = self.param_storage(index)
        if self.state_dtype == "bfloat16" and storage != "float64":
            return "bfloat16"
        return dtypes.math_dtype(storage).name

    def coded(self, index, name):
        """None if param ``index``'s state ``name`` is not stored in 8 bits, else whether its code map is signed: with
        ``state_dtype='8bit'``, the moments (``quantization.STATE_SIGNED``) of params of at most float32 with at least
        ``min_8bit_size`` elements (in their whole tensor: ``whole_sizes``)."""
        signed = quantization.STATE_SIGNED.get(name)
        if (self.state_dtype != "8bit" or signed is None or self.param_storage(index) == "float64"
                or self.whole_sizes.get(index, self._params[index].size) < self.min_8bit_size):
            return None
        return signed

    def buffer_names(self, index, names):
        """The buffers that hold param ``index``'s states ``names``: each name, and after an 8-bit one its scales."""
        return tuple(buffer for name in names
                     for buffer in ((name,) if self.coded(index, name) is None else (name, name + SCALES_SUFFIX)))

    def has_master(self, index):
        """Whether param ``index`` keeps a float32 master copy: a 16-bit param with ``master_weights=True``."""
        return self.master_weights and self.param_storage(index) in dtypes.SIXTEEN_BIT

    def _check_lr_scale(self, lr_scale, params, where):
        if _is_array(lr_scale):
            lr_scale = [lr_scale]
        lr_scale = list(lr_scale)
        if len(lr_scale) != len(params):
            raise ValueError(f"{where}['lr_scale'] has {len(lr_scale)} arrays for {len(params)} params")
        for index, (scale, param) in enumerate(zip(lr_scale, params)):
            label = f"{where}['lr_scale'][{index}]"
            self._check_array(scale, label, like=param)
            if not self._engine.all_finite_nonnegative(scale):
                raise ValueError(f"{label} must be finite and >= 0")
        return lr_scale

    @property
    def state(self):
        """Each param's state buffers by torch's names, in group order (``state[i]["exp_avg"]``): a
        :class:`~fastopt.state.OptimizerState` of :class:`~fastopt.state.ParamState` mappings, which check a
        replaced buffer and refuse deletions."""
        return self._state

    @property
    def params(self):
        """Every param, in group order (the order ``step`` takes grads in)."""
        return list(self._params)

    def _layout(self):
        """The frozen :class:`~fastopt.backends.layout.Layout` of every buffer the kernels address, built anew after
        any of them changed."""
        if self._frozen_layout is None:
            self._frozen_layout = self._build_layout(self.state)
        return self._frozen_layout

    def _build_layout(self, states, lr_scales=None):
        """A Layout of the held params, the held lr_scales (or ``lr_scales``, one array or None per param) and the
        buffers of ``states`` (per param, a mapping of state name to array). ValueError if a buffer the kernels write
        shares memory with another they address."""
        tensor_group = [number for number, count in enumerate(self._group_counts) for _ in range(count)]
        return Layout(rule=type(self), params=self._params, tensor_group=tensor_group,
                      lr_scale=self._lr_scales if lr_scales is None else lr_scales,
                      states=[[state.get(name) for name in self.STATE_SLOTS] for state in states],
                      scales=[[state.get(name + SCALES_SUFFIX) if self.coded(index, name) is not None else None
                               for name in self.STATE_SLOTS] for index, state in enumerate(states)],
                      master=[state.get(MASTER) for state in states],
                      param_storage=[self.param_storage(index) for index in range(len(self._params))],
                      state_storage=[self.state_storage(index) for index in range(len(self._params))],
                      stochastic=self.rounding == "stochastic", seed=self.seed, address_of=self._engine.address,
                      stochastic_codes=self.stochastic_states)

    def _replacement_check(self, index):
        """The check ``state[index]`` runs on ``state[index][name] = array`` (see :class:`~fastopt.state.ParamState`):
        the array must fit the buffer it replaces and share memory with no other buffer of the optimizer. Once it
        has passed, the layout is rebuilt before the next step."""
        def check(name, array):
            where = f"state[{index}][{name!r}]"
            names = self.buffer_names(index, self.STATE_SLOTS)
            if name not in names and not (name == MASTER and self.has_master(index)):
                raise KeyError(f"{where}: {type(self).__name__} keeps no buffer {name!r} for this param (its buffers: "
                               f"{', '.join(names)})")
            self._engine.check_array(array, where, writable=True)
            shape, dtype = self._buffer_spec(index, name)
            if array.shape != shape:
                raise ValueError(f"{where} has shape {array.shape}; this buffer has shape {shape}")
            if np.dtype(array.dtype) != dtype:
                raise TypeError(f"{where} has dtype {array.dtype}; this buffer is stored as {dtype}")
            states = [dict(state) for state in self.state]
            states[index][name] = array
            self._build_layout(states)  # raises if the array shares memory with another buffer
            self._frozen_layout = None
        return check

    def adopt_buffer(self, index, name, array):
        """Make ``array`` param ``index``'s buffer ``name``, for ``fastopt.torch``, which moves buffers into memory it
        shows torch. ``array`` gets the checks of ``state[index][name] = array`` on itself (writable, shape, dtype);
        the check against the other buffers waits for the layout's rebuild before the next step, once for any
        number of adoptions (each replacement rebuilds it)."""
        where = f"adopted buffer {name!r} of param {index}"
        self._engine.check_array(array, where, writable=True)
        shape, dtype = self._buffer_spec(index, name)
        if name not in self.state[index] or array.shape != shape or np.dtype(array.dtype) != dtype:
            raise ValueError(f"{where}: {array.dtype} {array.shape}; the buffer is {dtype} {shape}")
        self.state[index].adopt(name, array)
        self._frozen_layout = None

    def _buffer_spec(self, index, name):
        """(shape, NumPy dtype as the engine holds it) of param ``index``'s buffer ``name``: a state in its storage
        (8-bit codes: uint8), the block scales of an 8-bit state, or the float32 master copy."""
        param = self._params[index]
        if name.endswith(SCALES_SUFFIX) and name not in self.STATE_SLOTS:
            return (quantization.block_count(param.size),), np.dtype(np.float32)
        if name == MASTER:
            storage = "float32"
        elif self.coded(index, name) is not None:
            return param.shape, np.dtype(np.uint8)
        else:
            storage = self.state_storage(index)
        return param.shape, np.dtype(self._engine.storage_dtype(storage))

    # ---------------------------------------------------------------- the rule
    @classmethod
    def column_indices(cls):
        """The group-table index of each of ``COLUMNS``, in order (the rule's columns follow the generic ones)."""
        return tuple(range(kernel_layout.GROUP_COLUMNS, kernel_layout.GROUP_COLUMNS + len(cls.COLUMNS)))

    @classmethod
    def slot_mask(cls, names):
        """The bit mask of the state slots named in ``names`` (bit k: slot STATE0 + k), as the kernels read it."""
        return sum(1 << slot for slot, name in enumerate(cls.STATE_SLOTS) if name in names)

    @classmethod
    def group_row(cls, group):
        """The kernels' values of ``COLUMNS`` for ``group``, as floats (booleans as 0.0 / 1.0); a ``betas`` pair is
        the columns ``beta1`` and ``beta2``."""
        values = dict(group)
        if "betas" in group:
            values["beta1"], values["beta2"] = group["betas"]
        return {name: float(values[name]) for name in cls.COLUMNS}

    @classmethod
    def state_names(cls, group):
        """The state buffers (torch's names) that ``group``'s hyperparameters use."""
        return tuple(name for name in cls.STATE_SLOTS if name not in cls.OPTIONAL_STATES)

    @classmethod
    def counts_step(cls, group):
        """Whether a step of ``group``'s params advances their step counts (what the kernels do too)."""
        return True

    @classmethod
    def initial_state(cls, name, group):
        """The value state buffer ``name`` of a param of ``group`` starts at."""
        return 0.0

    @classmethod
    def reference_step(cls, param, grad, state, group, lr, lr_scale, state_dtype=None):
        """The float64 reference update of one tensor (``REFERENCE`` with the group's hyperparameters).
        ``state_dtype``: the state's storage dtype, for a rule whose update reads its states back as stored (LAMB)."""
        cls.REFERENCE(param, grad, state, lr=lr, lr_scale=lr_scale,
                      **{key: group[key] for key in cls.DEFAULTS if key != "lr"})

    # ---------------------------------------------------------------- hyperparameter checks
    @staticmethod
    def check_number(value, name, where, *, low=None, high=None, low_open=False, high_open=False):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{where}: {name} must be a real number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{where}: {name} must be finite, got {value}")
        if low is not None and (value <= low if low_open else value < low):
            raise ValueError(f"{where}: invalid {name} {value}; need {name} {'>' if low_open else '>='} {low}")
        if high is not None and (value >= high if high_open else value > high):
            raise ValueError(f"{where}: invalid {name} {value}; need {name} {'<' if high_open else '<='} {high}")
        return value

    @staticmethod
    def check_flag(value, name, where):
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{where}: {name} must be a bool, got {value!r}")

    @classmethod
    def check_betas(cls, betas, where):
        """A pair (beta1, beta2), each in [0, 1)."""
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
        cls.check_number(betas[0], "beta1 (betas[0])", where, low=0.0, high=1.0, high_open=True)
        cls.check_number(betas[1], "beta2 (betas[1])", where, low=0.0, high=1.0, high_open=True)

    @classmethod
    def validate_hyperparameters(cls, group, where):
        """Check ``group``'s hyperparameters (torch's exception types: ValueError for a value out of range)."""
        if not isinstance(group["lr"], schedules.Schedule):
            cls.check_number(group["lr"], "lr", where, low=0.0)
        cls.check_flag(group["maximize"], "maximize", where)
        cls.check_number(group["weight_decay"], "weight_decay", where, low=0.0)

    # ---------------------------------------------------------------- schedules
    def current_lr(self):
        """Each group's learning rate for the next step: its schedule at ``step_count`` (a guard's back-off factor,
        ``guard.lr_factor``, multiplies it inside the kernel)."""
        self._sync_step_count()
        return [float(schedules.as_schedule(group["lr"])(self.step_count)) for group in self.param_groups]

    def _sync_step_count(self):
        """Take the engine's count where it keeps one of its own (on the GPU, CUDA-graph replays advance the device
        counter without passing through ``step``)."""
        sync = getattr(self._backend, "sync_step_count", None)
        if sync is not None:
            self.step_count = sync(self.step_count)

    # ---------------------------------------------------------------- the step
    def _snapshot(self):
        """What the engine's tables depend on, per group: its keys, its values (lists copied to tuples, so an
        in-place edit of ``betas`` shows), and which params and lr_scale arrays it holds (by id: while the optimizer
        holds its own arrays, no other array can have their ids)."""
        def frozen(value):
            return tuple(value) if isinstance(value, list) else value

        def ids(arrays):
            if arrays is None:
                return ()
            return (id(arrays),) if _is_array(arrays) or not isinstance(arrays, (list, tuple)) else \
                tuple(map(id, arrays))

        return [(tuple(group), tuple(frozen(group.get(key)) for key in self.DEFAULTS), ids(group.get("params")),
                 ids(group.get("lr_scale"))) for group in self.param_groups]

    def _sync_groups(self):
        """Re-validate groups whose hyperparameters changed since the last step (torch's schedulers write
        ``group["lr"]``), take in new lr_scale arrays, and note the state buffers the groups now need. Everything is
        checked before anything changes. Returns True if anything changed."""
        snapshot = self._snapshot()
        if snapshot == self._group_snapshot:
            return False
        if len(snapshot) != len(self._group_counts):
            raise ValueError(f"param_groups holds {len(snapshot)} groups, the optimizer was given "
                             f"{len(self._group_counts)}: add groups with add_param_group (groups cannot be removed)")
        lr_scales, new_scales = list(self._lr_scales), {}
        for index, (group, (_, _, param_ids, scale_ids)) in enumerate(zip(self.param_groups, snapshot)):
            where = f"param_groups[{index}]"
            first, count = sum(self._group_counts[:index]), self._group_counts[index]
            if param_ids != tuple(map(id, self._params[first:first + count])):
                raise ValueError(f"{where}['params'] no longer holds the arrays the optimizer was given (a param was "
                                 "replaced, added or removed): the kernels update the arrays they were given; build a "
                                 "new optimizer for other arrays, or add them with add_param_group")
            self._check_keys(group, where)
            missing = {"lr_scale", *self.DEFAULTS} - set(group)
            if missing:
                raise ValueError(f"{where} lacks {sorted(missing)}")
            self.validate_hyperparameters(group, where)
            held = self._lr_scales[first:first + count]
            if scale_ids != (() if all(scale is None for scale in held) else tuple(map(id, held))):
                # Checking values is a reduction (a device sync on the GPU): only for lr_scale arrays that are new.
                scales = group["lr_scale"]
                new_scales[index] = None if scales is None else self._check_lr_scale(scales, group["params"], where)
                lr_scales[first:first + count] = new_scales[index] or [None] * count
        if new_scales:
            self._build_layout(self.state, lr_scales)  # an lr_scale that shares memory with a written buffer: refused
            self._lr_scales = lr_scales
            for index, scales in new_scales.items():
                self.param_groups[index]["lr_scale"] = scales
            self._frozen_layout = None
        self._missing_state = {}
        position = 0
        for group in self.param_groups:
            for state in self.state[position:position + len(group["params"])]:
                names = self.buffer_names(position, self.state_names(group)) + \
                    ((MASTER,) if self.has_master(position) else ())
                missing = [name for name in names if name not in state]
                if missing:
                    self._missing_state[position] = missing
                position += 1
        self._group_snapshot = self._snapshot()  # lr_scale lists were copied
        self._group_table = GroupTable(type(self), self.param_groups)
        return True

    def _allocate_state(self, grads):
        """Create the state buffers of the params that get a grad this step and lack some: as in torch, a param
        that never gets a grad (a frozen layer) never gets state."""
        if not self._missing_state:
            return
        ordinal = sum(len(state) for state in self.state)
        for index in [index for index in self._missing_state if grads[index] is not None]:
            for name in self._missing_state.pop(index):
                if name not in self.state[index]:  # a buffer the user set before the first step is kept
                    self.state[index].adopt(name, self._new_buffer(index, name, ordinal))
                    ordinal += 1
            self._frozen_layout = None

    def initialize_state(self):
        """Create every param's state buffers now rather than with its first grad (torch's Adagrad makes its state
        at construction); their step counts stay 0."""
        self._sync_groups()
        self._allocate_state(self._params)

    def _new_buffer(self, index, name, ordinal):
        """A state buffer of param ``index``: zeros in its state storage (8-bit: zero codes and scales, zero blocks),
        a rule's initial value (encoded, in 8 bits), or for the master copy the param's value in float32."""
        param = self._params[index]
        scales_of = name[:-len(SCALES_SUFFIX)] if name.endswith(SCALES_SUFFIX) else None
        coded = self.coded(index, scales_of or name)
        if coded is not None:
            shape, dtype = self._buffer_spec(index, name)
            buffer = self._engine.allocate_buffer(shape, dtype, ordinal)
            initial = self.initial_state(scales_of or name, self._group_of(index))
            if initial is PARAM_VALUE:
                raise TypeError(f"{type(self).__name__}: state {name!r} starts as its param and cannot be 8-bit")
            if initial != 0:
                codes, scales = quantization.quantize(np.full(param.size, initial, dtype=np.float32), coded)
                self._engine.copy_from_numpy(buffer, scales if scales_of else codes.reshape(param.shape))
            return buffer
        if name == MASTER:
            master = self._engine.allocate_state(param, ordinal, "float32")
            self._engine.copy_widened(master, param)
            return master
        storage = self.state_storage(index)
        initial = self.initial_state(name, self._group_of(index))
        if initial is PARAM_VALUE:  # the param's value rounded to the state's storage (exact unless that is narrower)
            buffer = self._engine.allocate_state(param, ordinal, storage)
            self._engine.copy_from_numpy(buffer, self._engine.to_numpy(param).astype(dtypes.numpy_dtype(storage)))
            return buffer
        return self._engine.allocate_state(param, ordinal, storage, initial)

    def _group_of(self, index):
        """The param group that holds param ``index``."""
        for group in self.param_groups:
            if index < len(group["params"]):
                return group
            index -= len(group["params"])
        raise IndexError(index)

    def _check_grads(self, grads):
        if _is_array(grads):
            grads = [grads]
        grads = list(grads)
        if len(grads) != len(self._params):
            raise ValueError(f"step got {len(grads)} grads for {len(self._params)} params")
        for index, (grad, param) in enumerate(zip(grads, self._params)):
            if grad is None:
                continue
            self._check_array(grad, f"grads[{index}]", like=param, grad=True)
        for index, param in enumerate(self._params):
            self._engine.check_array(param, f"param {index}", writable=True)
        return grads

    def step(self, grads, grad_scale=None):
        """Apply one update to every param from ``grads`` (a list aligned with the params in group order;
        ``None`` skips a param, as torch skips params without ``.grad``). Params and state change in place.

        Gradient handling, fused into the update (one extra read of the grads computes their global L2 norm and
        finds NaN/inf; the update pass applies the rest):

        - ``grad_scale``: the loss scale the grads carry (``torch.amp.GradScaler``'s); they are multiplied by
          ``1 / grad_scale`` (rounded to float32, as GradScaler's inverse scale) before anything else.
        - ``max_grad_norm`` (constructor): the unscaled grads are multiplied by ``min(1, max_grad_norm / (norm +
          1e-6))``, as ``torch.nn.utils.clip_grad_norm_`` over all params.
        - With either, or with a :class:`~fastopt.Guard`: grads holding NaN/inf skip the whole step (params, state
          and step counts untouched) and count in ``skipped_steps``; ``last_grad_norm`` holds the norm.

        Every check runs before anything is written. The update and the advance of the step counts are one unit: a
        KeyboardInterrupt during the step is raised once both are done. One optimizer is stepped by one thread at a
        time: a step called while another runs raises RuntimeError.
        """
        with self._one_writer("step"):
            grads = self._check_grads(grads)
            device_scale = self._device_scale(grad_scale)
            unscale = 1.0 if device_scale is not None else self._unscale(grad_scale)
            self._check_grad_reduction(grad_scale, device_scale)
            self._sync_groups()
            self._backend.bind_grads(self._layout(), grads)
            with interrupts.deferred():
                self._apply(grads, grad_scale, device_scale, unscale)

    @contextlib.contextmanager
    def _one_writer(self, what):
        """Holds the optimizer for one writing call (``what``: its name); RuntimeError while another thread holds it."""
        if not self._stepping.acquire(blocking=False):
            raise RuntimeError(f"{type(self).__name__}.{what} was called while another step of the same optimizer runs "
                               "(from another thread): step an optimizer from one thread at a time")
        try:
            yield
        finally:
            self._stepping.release()

    def _blend_toward_state(self, name, weight_of_group):
        """``p = lerp(p, state[name], weight_of_group(group))`` for every param that has a buffer ``name`` (through
        its master copy, where it has one), in one fused pass: schedule-free's move between its two points. Written
        as a step is: groups checked first, SIGINT held over the write, one thread at a time."""
        with self._one_writer("train/eval"):
            self._sync_groups()
            weights = [float(weight_of_group(group)) for group in self.param_groups for _ in group["params"]]
            with interrupts.deferred():
                self._backend.blend(self._layout(), self.STATE_SLOTS.index(name), weights)

    def _apply(self, grads, grad_scale, device_scale, unscale):
        """The writing part of :meth:`step`, on checked input."""
        self._allocate_state(grads)
        if grad_scale is None and self.max_grad_norm is None and self.guard is None:
            control = None
        else:
            skip_nonfinite = self.guard is None or self.guard.skip_nonfinite
            if self.grad_reduction is not None:
                control = self._reduced_grad_control(grads, unscale, skip_nonfinite)
            else:
                scale = {} if device_scale is None else {"scale": device_scale}
                control = self._backend.grad_control(self._layout(), grads, unscale, self.max_grad_norm,
                                                     skip_nonfinite, **scale)
            self.last_grad_norm = control.norm
            if self.guard is not None and not self.guard.admit(control.nonfinite):
                control.skip()
            if control.skipped:
                self._skipped_steps += 1
                return
        lr_factor = 1.0 if self.guard is None else self.guard.lr_factor
        self._backend.step(self._layout(), self._group_table, grads, self.step_count, lr_factor, control)
        self.step_count += 1

    def _check_grad_reduction(self, grad_scale, device_scale):
        """A step that will call ``grad_reduction`` needs the engine's statistics on the host (checked before
        anything is written)."""
        if self.grad_reduction is None or (grad_scale is None and self.max_grad_norm is None and self.guard is None):
            return
        if not hasattr(self._backend, "grad_stats") or device_scale is not None:
            raise NotImplementedError(f"{type(self).__name__}: grad_reduction (sharded params with max_grad_norm, a "
                                      "loss scale or a guard) needs the grad statistics on the host: the CPU engine "
                                      f"only, not {self._engine.__name__}")

    def _reduced_grad_control(self, grads, unscale, skip_nonfinite):
        """The step's :class:`~fastopt.backends.GradControl` from the statistics of every process's grads: this
        one's (one read by the engine), combined by ``grad_reduction``."""
        sum_of_squares, nonfinite = self.grad_reduction(*self._backend.grad_stats(self._layout(), grads))
        return backends.GradControl(sum_of_squares, nonfinite, unscale, self.max_grad_norm, skip_nonfinite)

    def _device_scale(self, grad_scale):
        """A one-element float GPU array that the engine can invert on the device (no host sync), else None. Its
        value cannot be checked without a sync: a zero or non-finite scale gives non-finite grads, and the step is
        skipped."""
        if (getattr(self._backend, "takes_device_scale", False) and _is_array(grad_scale)
                and not isinstance(grad_scale, np.ndarray) and grad_scale.size == 1
                and grad_scale.dtype in (np.float32, np.float64)):
            return grad_scale
        return None

    def _unscale(self, grad_scale):
        """1 / ``grad_scale`` rounded to float32 (GradScaler's inverse scale); 1.0 without one."""
        if grad_scale is None:
            return 1.0
        if _is_array(grad_scale):
            if grad_scale.size != 1:
                raise ValueError(f"grad_scale must be a number or a one-element array, got shape {grad_scale.shape}")
            grad_scale = float(grad_scale.reshape(()).item())
        scale = self.check_number(grad_scale, "grad_scale", "step", low=0.0, low_open=True)
        return float(np.float32(1.0 / scale))

    @property
    def skipped_steps(self):
        """Steps skipped because their grads held NaN/inf (with ``grad_scale``, ``max_grad_norm`` or a guard).
        On the GPU the skip is decided on the device, without a host sync; reading this synchronises."""
        device_skips = getattr(self._backend, "device_skipped_steps", None)
        return self._skipped_steps + (device_skips() if device_skips is not None else 0)

    # ---------------------------------------------------------------- state dict
    def state_dict(self):
        """Plain NumPy/Python contents in torch's layout: ``state`` keyed by param index with torch's names and
        ``"step"``, ``param_groups`` with ``"params"`` as index lists, plus fastopt's ``step_count``.

        As in torch, a param has an entry once it has been updated (for SGD: once it took a momentum step); a
        param without one loads back as fresh (zero buffers, step 0)."""
        self._sync_step_count()
        steps, scalars = self._backend.tensor_steps(), self._backend.tensor_scalars()
        state = {}
        for index, buffers in enumerate(self.state):
            if steps[index]:
                state[index] = {name: self._engine.to_numpy(buffer) for name, buffer in buffers.items()}
                state[index]["step"] = int(steps[index])
                state[index].update((name, float(value)) for name, value in zip(self.SCALARS, scalars[index]))
        groups, position = [], 0
        for group in self.param_groups:
            saved = {key: group[key] for key in self.DEFAULTS}
            saved["params"] = list(range(position, position + len(group["params"])))
            position += len(group["params"])
            groups.append(saved)
        state_dict = {"state": state, "param_groups": groups, "step_count": self.step_count,
                      "skipped_steps": self.skipped_steps}
        if self.guard is not None:
            state_dict["guard"] = self.guard.state_dict()
        return state_dict

    def load_state_dict(self, state_dict):
        """Load a state dict from :meth:`state_dict` (or :func:`fastopt.load`) into this optimizer, whose params
        must match in number, shape and dtype group by group. Everything is converted and checked before anything
        is written, so a bad state dict leaves the optimizer as it was."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(groups)} param groups, the optimizer has {len(self.param_groups)}")
        values = []
        for index, (saved, group) in enumerate(zip(groups, self.param_groups)):
            where = f"state dict param group {index}"
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"{where}: {len(saved['params'])} params, the optimizer has {len(group['params'])}")
            self._check_keys(saved, where, allowed={"params"})
            values.append({key: value for key, value in saved.items() if key != "params"})
            self.validate_hyperparameters(dict(group, **values[-1]), where)
        saved_state = state_dict["state"]
        order = [index for group in groups for index in group["params"]]
        steps = np.zeros(len(self._params), dtype=np.int64)
        scalars = np.zeros((len(self._params), kernel_layout.TENSOR_SCALARS))
        buffers = []  # per param: {name: array in the buffer's storage dtype}
        for position, saved_index in enumerate(order):
            entry = saved_state.get(saved_index, saved_state.get(str(saved_index), {}))
            converted = {}
            for name, value in entry.items():
                where = f"state of param {position}"
                if name == "step":
                    steps[position] = self.count(value, f"{where}: step")
                    continue
                if name in self.SCALARS:
                    scalars[position, self.SCALARS.index(name)] = self.scalar(value, f"{where}: {name}")
                    continue
                if name.endswith(SCALES_SUFFIX) and name[:-len(SCALES_SUFFIX)] in self.STATE_SLOTS:
                    if name[:-len(SCALES_SUFFIX)] not in entry:
                        raise ValueError(f"{where} has {name!r} but no {name[:-len(SCALES_SUFFIX)]!r}: block scales "
                                         "without their codes")
                    continue  # read with its codes
                if name not in self.STATE_SLOTS and not (name == MASTER and self.has_master(position)):
                    raise ValueError(f"{where} has unknown buffer {name!r}")
                converted.update(self._loaded_buffers(position, name, value, entry.get(name + SCALES_SUFFIX), where))
            buffers.append(converted)
        # A param that has stepped needs every buffer its group's (loaded) hyperparameters use: a missing one would
        # restart from zeros under a step count that says otherwise (torch raises KeyError at the next step).
        position = 0
        for group, new_values in zip(self.param_groups, values):
            needed = self.state_names(dict(group, **new_values))
            for converted in buffers[position:position + len(group["params"])]:
                missing = [name for name in needed if name not in converted]
                if steps[position] and missing:
                    raise KeyError(f"state of param {position} has step {steps[position]} but no {missing[0]!r}, "
                                   "which its group's hyperparameters use: the state dict is incomplete")
                position += 1
        step_count = self.count(state_dict.get("step_count", 0), "state dict: step_count")
        skipped_steps = self.count(state_dict.get("skipped_steps", 0), "state dict: skipped_steps")
        if self.guard is not None and "guard" in state_dict:
            Guard().load_state_dict(state_dict["guard"])  # validates
        # Everything is checked and converted: write.
        for group, new_values in zip(self.param_groups, values):
            group.update(new_values)
        ordinal = sum(len(state) for state in self.state)
        for position, (state, converted) in enumerate(zip(self.state, buffers)):
            for name in [name for name in state if name not in converted]:
                state.discard(name)
            for name, value in converted.items():
                if name not in state:
                    state.adopt(name, self._new_buffer(position, name, ordinal))
                    ordinal += 1
                self._engine.copy_from_numpy(state[name], value)
        self.step_count = step_count
        self._skipped_steps = skipped_steps
        self._frozen_layout = None
        if self.guard is not None and "guard" in state_dict:
            self.guard.load_state_dict(state_dict["guard"])
        self._group_snapshot = None
        self._sync_groups()
        self._backend = self._engine(self._layout())
        self._backend.set_tensor_steps(steps)
        self._backend.set_tensor_scalars(scalars)

    def _loaded_buffers(self, index, name, value, scales, where):
        """{buffer name: NumPy array as the buffer stores it} for state ``name`` of param ``index`` from a state dict:
        ``value`` with its block ``scales`` where it was saved in 8 bits (uint8 codes), else as floats. Values are
        converted to how this optimizer stores the state (8-bit states quantized, 8-bit ones decoded where this
        optimizer keeps floats); ValueError/TypeError for a wrong shape, dtype or scale count."""
        param = self._params[index]
        value = np.asarray(value)
        if value.shape != param.shape:
            raise ValueError(f"{where}: {name!r} has shape {value.shape}, the param has shape {param.shape}")
        signed = quantization.STATE_SIGNED.get(name)
        if scales is not None:  # saved in 8 bits
            scales = np.asarray(scales)
            if value.dtype != np.uint8:
                raise TypeError(f"{where}: {name!r} has {name + SCALES_SUFFIX!r}, so it holds 8-bit codes, which must "
                                f"be uint8; got dtype {value.dtype}")
            if scales.dtype != np.float32:
                raise TypeError(f"{where}: {name + SCALES_SUFFIX!r} must be float32, got dtype {scales.dtype}")
            blocks = quantization.block_count(value.size)
            if scales.shape != (blocks,):
                raise ValueError(f"{where}: {name + SCALES_SUFFIX!r} has shape {scales.shape}; {value.size} codes in "
                                 f"blocks of {quantization.BLOCK} need {blocks} scales")
            if signed is None:
                raise ValueError(f"{where}: {name!r} is never stored in 8 bits")
            if self.coded(index, name) == signed:
                return {name: value.reshape(param.shape), name + SCALES_SUFFIX: scales}
            value = quantization.dequantize(value, scales, signed)
        elif dtypes.storage_name(value.dtype) is None:
            raise TypeError(f"{where}: {name!r} has dtype {value.dtype}; state is float64, float32, bfloat16 or "
                            f"float16 (or uint8 codes with their {name + SCALES_SUFFIX!r})")
        if name != MASTER and self.coded(index, name) is not None:
            codes, scales = quantization.quantize(value, self.coded(index, name))
            return {name: codes.reshape(param.shape), name + SCALES_SUFFIX: scales}
        storage = "float32" if name == MASTER else self.state_storage(index)
        return {name: value.astype(dtypes.numpy_dtype(storage))}

    def float32_state_dict(self):
        """:meth:`state_dict` with every 8-bit state decoded to float32 (its ``_absmax`` scales dropped): torch's
        state layout, which ``torch.optim`` optimizers load (through ``fastopt.torch``'s twin of this method), as
        does any fastopt optimizer (which encodes it again if it keeps 8-bit states)."""
        state_dict = self.state_dict()
        for entry in state_dict["state"].values():
            for name in self.STATE_SLOTS:
                scales = entry.pop(name + SCALES_SUFFIX, None)
                if scales is not None:
                    entry[name] = quantization.dequantize(entry[name], scales, quantization.STATE_SIGNED[name])
        return state_dict

    # ---------------------------------------------------------------- copies
    def __getstate__(self):
        """What a deep copy or pickle holds: copies of the params and buffers and the per-param step counts, never
        the engine, whose tables hold the original's addresses: :meth:`__setstate__` builds one over the copy's own
        arrays."""
        self._sync_step_count()
        state = dict(self.__dict__)
        for name in ("_backend", "_frozen_layout", "_group_table", "_group_snapshot", "_missing_state", "_stepping"):
            del state[name]
        state.pop("grad_reduction", None)  # a collective over this process's group: not the copy's
        state["_state"] = [dict(entry) for entry in self.state]
        state["_tensor_steps"] = self._backend.tensor_steps()
        state["_tensor_scalars"] = self._backend.tensor_scalars()
        state["_skipped_steps"] = self.skipped_steps
        return state

    def __setstate__(self, state):
        state = dict(state)
        buffers, steps = state.pop("_state"), state.pop("_tensor_steps")
        # A pickle from before running scalars existed has none: its rule keeps none.
        scalars = state.pop("_tensor_scalars", np.zeros((len(steps), kernel_layout.TENSOR_SCALARS)))
        self.__dict__.update(state)
        self._state = OptimizerState()
        for index, entry in enumerate(buffers):
            self.state.append(ParamState(self._replacement_check(index), entry))
        self._stepping = threading.Lock()
        self._frozen_layout = self._group_table = self._group_snapshot = None
        self._missing_state = {}
        self._backend = self._engine(self._layout())
        self._backend.set_tensor_steps(steps)
        self._backend.set_tensor_scalars(scalars)

    def step_counts(self):
        """Each param's step count (int64, in group order), as ``state_dict`` saves it, without copying buffers."""
        self._sync_step_count()
        return self._backend.tensor_steps()

    def running_scalars(self):
        """Each param's running values of the rule's ``SCALARS``, ``{name: float64 array in group order}``, as
        ``state_dict`` saves them, without copying buffers."""
        scalars = self._backend.tensor_scalars()
        return {name: scalars[:, column] for column, name in enumerate(self.SCALARS)}

    @staticmethod
    def count(value, what):
        """A step count from a state dict: a non-negative integer (a float or 0-d array holding one is fine)."""
        number = np.asarray(value)
        if number.shape != () or number.dtype.kind not in "fiu" or number != np.floor(number) or number < 0:
            raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
        return int(number)

    @staticmethod
    def scalar(value, what):
        """A rule's running scalar from a state dict (``SCALARS``): a finite real number (or 0-d array holding one)."""
        number = np.asarray(value)
        if number.shape != () or number.dtype.kind not in "fiu" or not np.isfinite(number):
            raise ValueError(f"{what} must be a finite real number, got {value!r}")
        return float(number)

    def _check_keys(self, group, where, *, allowed=("params", "lr_scale")):
        unknown = set(group) - set(self.DEFAULTS) - set(allowed)
        if unknown:
            raise ValueError(f"{where} has unknown hyperparameter(s) {sorted(unknown)} for {type(self).__name__}; "
                             f"known: {sorted(self.DEFAULTS)}")

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for index, group in enumerate(self.param_groups):
            lines.append(f"Parameter Group {index}")
            for key in sorted(self.DEFAULTS):
                lines.append(f"    {key}: {group[key]}")
        lines.append(")")
        return "\n".join(lines)
