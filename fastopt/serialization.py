"""``fastopt.save`` / ``fastopt.load``: an optimizer's state dict in a ``.npz`` file, without pickle.

Arrays are stored as ``state/<param index>/<name>``; everything else (param groups with their schedules,
steps, the step count) as one JSON document in the entry ``meta``. A ``.npz`` cannot hold bfloat16
(``ml_dtypes.bfloat16`` arrays come back as raw void bytes): they are stored as their uint16 bits and named in
the meta's ``bfloat16`` list. Schedules are written as their record
type and fields, and rebuilt through :mod:`fastopt.schedules` on load.

A save never leaves a half-written file at its path: the archive goes to a temporary file beside it, which is
renamed over it only once it is complete and on disk.
"""
import contextlib
import dataclasses
import json
import os
import secrets

import numpy as np

from . import dtypes, schedules

_FORMAT = "fastopt-state-1"


def encode(value):
    """``value`` (a hyperparameter: number, bool, tuple, schedule...) as plain JSON-able data; :func:`decode`
    inverts it. Schedules become ``{"schedule": record type, "fields": {...}}``."""
    if isinstance(value, schedules.Schedule):
        fields = {field.name: encode(getattr(value, field.name)) for field in dataclasses.fields(value)}
        return {"schedule": type(value).__name__, "fields": fields}
    if isinstance(value, (list, tuple)):
        return {"tuple": [encode(item) for item in value]} if isinstance(value, tuple) else \
            [encode(item) for item in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    return value


def decode(value):
    """The value :func:`encode` turned into plain data."""
    if isinstance(value, dict) and "schedule" in value:
        record = getattr(schedules, value["schedule"], None)
        if not (isinstance(record, type) and issubclass(record, schedules.Schedule)):
            raise ValueError(f"unknown schedule type {value['schedule']!r} in the saved state")
        fields = {name: decode(item) for name, item in value["fields"].items()}
        return record(**fields)
    if isinstance(value, dict) and "tuple" in value:
        return tuple(decode(item) for item in value["tuple"])
    if isinstance(value, list):
        return [decode(item) for item in value]
    return value


def checkpoint_path(path):
    """The file that :func:`save` writes and :func:`load` reads for ``path`` (a ``str`` or ``os.PathLike``), as a
    ``str``: ``path`` itself when it ends with ``.npz``, else ``path + ".npz"`` (where earlier versions, through
    ``np.savez``, wrote it). Case-sensitive, as ``np.savez`` is: ``ckpt.NPZ`` becomes ``ckpt.NPZ.npz``."""
    path = os.fspath(path)
    return path if path.endswith(".npz") else path + ".npz"


# The entries of Optimizer.state_dict() that save() stores in their own way; others (a rule's plain values, such as
# schedule-free's train_mode) go into the file's metadata as they are.
_STATE_DICT_KEYS = ("state", "param_groups", "step_count", "skipped_steps", "guard")


def save(path, optimizer):
    """Write ``optimizer.state_dict()`` to :func:`checkpoint_path` of ``path`` (``ckpt`` and ``ckpt.npz`` both
    write ``ckpt.npz``) and return that path.

    Atomic: the archive is written to ``.<name>.tmp-<random>`` in the same directory, flushed to disk and renamed
    over the target, so a crash at any moment leaves either the previous file or the new one, whole. A stray
    ``.<name>.tmp-*`` file is what a killed save leaves behind: garbage, safe to delete. On an exception the
    temporary file is removed and the previous file is untouched. A target that is a symlink stays one: the file
    it points to is replaced."""
    target = checkpoint_path(path)
    state_dict = optimizer.state_dict()
    arrays, steps, scalars, bfloat16 = {}, {}, {}, []
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            key = f"state/{index}/{name}"
            if name == "step":
                steps[str(index)] = value
            elif isinstance(value, float):  # a rule's running scalar (schedule-free's weight_sum): exact in JSON
                scalars.setdefault(str(index), {})[name] = value
            elif dtypes.storage_name(value.dtype) == "bfloat16":
                arrays[key] = value.view(np.uint16)
                bfloat16.append(key)
            else:
                arrays[key] = value
    meta = {"format": _FORMAT, "optimizer": type(optimizer).__name__, "step_count": state_dict["step_count"],
            "skipped_steps": state_dict.get("skipped_steps", 0), "bfloat16": bfloat16,
            "steps": steps, "scalars": scalars, "guard": state_dict.get("guard"),
            "extra": {key: value for key, value in state_dict.items() if key not in _STATE_DICT_KEYS},
            "param_groups": [{key: encode(value) for key, value in group.items()}
                             for group in state_dict["param_groups"]]}
    entries = {"meta": np.array(json.dumps(meta)), **arrays}
    # realpath: a symlink is written through, as np.savez did, and the temporary file is made beside the real file,
    # on its file system, where the rename is atomic.
    _replace_atomically(os.path.realpath(target), lambda file: np.savez(file, **entries))
    return target


def _replace_atomically(path, write):
    """Call ``write(file)`` on a new temporary file beside ``path``, make it durable, and rename it onto ``path``.
    On an exception before the rename, the temporary file is removed and the exception propagates."""
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.tmp-{secrets.token_hex(8)}")
    file = open(temporary, "xb")  # "x": never truncates another file; mode from the umask, unlike mkstemp's 0600
    try:
        with file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the original error is the one to report
            os.remove(temporary)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory):
    """Put a rename in ``directory`` on disk: on POSIX it is part of the directory, not of the file."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory (and its rename needs no directory fsync)
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def load(path, optimizer):
    """Load a file written by :func:`save` into ``optimizer`` (same optimizer type and param layout), from
    :func:`checkpoint_path` of ``path``: ``ckpt`` and ``ckpt.npz`` both read ``ckpt.npz``. A missing file raises
    ``FileNotFoundError`` naming that path."""
    path = checkpoint_path(path)
    with np.load(path, allow_pickle=False) as archive:
        meta = json.loads(str(archive["meta"]))
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a fastopt state file (format {meta.get('format')!r})")
        if meta["optimizer"] != type(optimizer).__name__:
            raise ValueError(f"{path} holds the state of a {meta['optimizer']}, not of a {type(optimizer).__name__}")
        state = {int(index): {"step": step} for index, step in meta["steps"].items()}
        for index, values in meta.get("scalars", {}).items():
            state.setdefault(int(index), {}).update(values)
        bfloat16 = set(meta.get("bfloat16", ()))
        for key in archive.files:
            if key.startswith("state/"):
                _, index, name = key.split("/")
                value = archive[key]
                state.setdefault(int(index), {})[name] = \
                    value.view(dtypes.numpy_dtype("bfloat16")) if key in bfloat16 else value
    groups = [{key: decode(value) for key, value in group.items()} for group in meta["param_groups"]]
    loaded = {"state": state, "param_groups": groups, "step_count": meta["step_count"],
              "skipped_steps": meta.get("skipped_steps", 0)}
    if meta.get("guard") is not None:
        loaded["guard"] = meta["guard"]
    loaded.update(meta.get("extra", {}))
    optimizer.load_state_dict(loaded)
