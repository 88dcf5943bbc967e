"""Float64 NumPy reference of every optimizer: slow, obviously correct, the single source of truth of the tests.

Each optimizer's function lives with its rule (``fastopt.rules.<name>``) and is reachable here by its name
(``fastopt.reference.adam``, ``fastopt.reference.adamw``, ...: ``fastopt.rules.REFERENCES``); this module holds the
storage rounding and grad clipping that every rule's reference shares. Each function updates one tensor in place,
written as textbook math in torch's single-tensor (for-loop) order. ``lr`` is the group's learning rate at this
step (a schedule evaluated on the host); ``lr_scale`` is the per-element multiplier (1 where absent): the element's
rate is ``lr * lr_scale`` wherever the rate appears. ``state`` is a dict of float64 arrays keyed by torch's state names plus ``"step"`` (an int).
The schedules' reference is the host evaluation ``sched(t)`` in :mod:`fastopt.schedules`.
"""
import numpy as np


# ---------------------------------------------------------------- mixed precision
def counter_hash(seed, step, element):
    """The kernels' counter-based random 32 bits for (seed, step, element) (SplitMix64's finaliser over a mix of
    the three), written again in NumPy uint64 arithmetic, which wraps as C's does. ``element`` is an array."""
    element = np.asarray(element, dtype=np.uint64)
    with np.errstate(over="ignore"):
        state = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
                 ^ np.uint64(step) * np.uint64(0xC2B2AE3D27D4EB4F)
                 ^ element * np.uint64(0x165667B19E3779F9))
        state = (state ^ (state >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        state = (state ^ (state >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    state = state ^ (state >> np.uint64(31))
    return (state >> np.uint64(32)).astype(np.uint32)


CODE_NOISE_STRIDE = np.uint32(0x9E3779B9)  # 2^32 / golden ratio: a block's elements' counters, far apart


def mix32(x):
    """A 32-bit integer hash (lowbias32: two multiplications between xor-shifts), in uint32 arithmetic: the kernels'
    per-element mixing of a block's random bits for stochastically rounded codes."""
    x = np.asarray(x, dtype=np.uint32)
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x7FEB352D)
        x = x ^ (x >> np.uint32(15))
        x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def code_noise(seed, step, block_keys, block=256):
    """The random bits of stochastically rounded 8-bit codes, ``block`` per key: for the block whose first element has
    the key ``block_keys[b]`` (``Layout.stochastic_code_key``), ``counter_hash(seed, step, key)`` once, then for its
    element i ``mix32(that + i * CODE_NOISE_STRIDE)`` (one 64-bit hash per block, a cheap 32-bit one per element)."""
    bases = counter_hash(seed, step, np.asarray(block_keys, dtype=np.uint64).reshape(-1, 1))
    with np.errstate(over="ignore"):
        counters = bases + np.arange(block, dtype=np.uint32) * CODE_NOISE_STRIDE
    return mix32(counters).reshape(-1)


def round_to_storage(values, dtype, *, seed=None, step=0, elements=None):
    """float64 ``values`` rounded to the storage ``dtype`` as the kernels round their math results: to float32
    (nearest even) first, then to a 16-bit dtype, to nearest even, or with ``seed`` stochastically: up with
    probability equal to the distance from the lower neighbour (16 random bits from ``counter_hash(seed, step,
    elements)`` added below the kept half, then truncated; NaN and infinities round to nearest)."""
    dtype = np.dtype(dtype)
    if dtype == np.float64:
        return np.asarray(values, dtype=np.float64)
    single = np.asarray(values, dtype=np.float64).astype(np.float32)
    if dtype == np.float32:
        return single
    if seed is None:
        return single.astype(dtype)
    single = single.reshape(-1)  # NumPy arithmetic on 0-d arrays gives scalars, which cannot be assigned into
    bits = single.view(np.uint32).astype(np.uint64)
    noise = (counter_hash(seed, step, elements) >> np.uint32(16)).astype(np.uint64).reshape(bits.shape)
    rounded = ((bits + noise) >> np.uint64(16)).astype(np.uint16).view(dtype)
    special = ~np.isfinite(single)
    rounded[special] = single[special].astype(dtype)
    return rounded.reshape(np.shape(values))


def clip_factor(norm, max_norm):
    """``torch.nn.utils.clip_grad_norm_``'s factor for grads of global L2 ``norm``: min(1, max_norm / (norm + 1e-6))."""
    return min(1.0, max_norm / (norm + 1e-6))


def __getattr__(name):
    """The float64 reference function of a rule, by name (``adam``, ``adamw``, ...): it lives with its rule. Dunder
    names are not looked up there: ``from fastopt.reference import ...`` asks for ``__path__`` while the rules
    themselves import this module."""
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from .rules import REFERENCES

    if name in REFERENCES:
        return REFERENCES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def as_stored(values, name, state_dtype):
    """float64 ``values`` of state ``name`` as they read back once stored in ``state_dtype``: rounded to the dtype, or
    for "8bit" rounded to float32, encoded and decoded (:mod:`fastopt.quantization`, the state's map), in float64."""
    if isinstance(state_dtype, str) and state_dtype == "8bit":
        from . import quantization
        return quantization.round_trip(np.asarray(values, dtype=np.float64).astype(np.float32),
                                       quantization.STATE_SIGNED[name]).astype(np.float64)
    return round_to_storage(values, state_dtype).astype(np.float64)
