"""``optimizer.state``: the buffers the kernels write, shown to the user without handing over their ownership.

The kernels address state buffers through raw pointers taken when the optimizer last built its layout. A plain list
of dicts would let ordinary Python (``state[i]["exp_avg"] = new``, ``del state[i]["exp_avg"]``, ``state[i] = {}``)
free a buffer the kernels go on writing. Here every change goes through the optimizer, which checks it and rebuilds
its layout, or is refused.
"""
from collections.abc import MutableMapping, Sequence


class ParamState(MutableMapping):
    """The state buffers of one param, by torch's names: ``optimizer.state[i]``.

    - ``state["exp_avg"] = array`` replaces a buffer, as in torch: the optimizer checks ``array`` (the param's shape,
      the buffer's storage dtype, contiguous, writable, sharing memory with no other buffer it writes) and the
      kernels update it from the next step on. Changing values in place (``state["exp_avg"][...] = 0``) needs no
      check.
    - Deleting a buffer is refused: the step count says the buffer holds history, and a missing one would silently
      restart from zeros (torch raises KeyError at the next step). Use ``load_state_dict`` to reset state.
    - A copy or pickle of this mapping alone is a plain dict (of copies of the arrays, for a deep copy or pickle).
    """

    __slots__ = ("_buffers", "_check_replacement")

    def __init__(self, check_replacement, buffers=()):
        self._buffers = dict(buffers)
        self._check_replacement = check_replacement  # (name, array) -> None, raises if the array is unfit

    def __getitem__(self, name):
        return self._buffers[name]

    def __iter__(self):
        return iter(self._buffers)

    def __len__(self):
        return len(self._buffers)

    def __setitem__(self, name, array):
        self._check_replacement(name, array)
        self._buffers[name] = array

    def __delitem__(self, name):
        if name not in self._buffers:
            raise KeyError(name)
        raise TypeError(f"state buffer {name!r} cannot be deleted: the kernels would restart it from zeros while the "
                        "step count says it holds history; change its values in place, or load a state dict")

    def __repr__(self):
        return repr(self._buffers)

    def __reduce__(self):
        return dict, (dict(self._buffers),)

    def adopt(self, name, array):
        """Store ``array`` as buffer ``name`` without checks: for the optimizer, which made or checked it."""
        self._buffers[name] = array

    def discard(self, name):
        """Drop buffer ``name``: for the optimizer, loading a state dict that lacks it."""
        del self._buffers[name]


class OptimizerState(Sequence):
    """``optimizer.state``: one :class:`ParamState` per param, in group order. Its entries cannot be replaced
    (``state[i] = {}``): each belongs to its param for the optimizer's lifetime."""

    __slots__ = ("_entries",)

    def __init__(self):
        self._entries = []

    def __getitem__(self, index):
        return self._entries[index]

    def __len__(self):
        return len(self._entries)

    def __setitem__(self, index, value):
        raise TypeError("optimizer.state[i] cannot be replaced: it holds the buffers the kernels write. Replace one "
                        "buffer (state[i]['exp_avg'] = array), change values in place, or load a state dict")

    def __delitem__(self, index):
        raise TypeError("optimizer.state[i] cannot be deleted: it belongs to param i for the optimizer's lifetime")

    def __repr__(self):
        return repr(self._entries)

    def __reduce__(self):
        return list, ([dict(entry) for entry in self._entries],)

    def append(self, entry):
        """Add the state of a new param (for the optimizer)."""
        self._entries.append(entry)
