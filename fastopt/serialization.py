"""``fastopt.save`` / ``fastopt.load``: an optimizer's state dict in a ``.npz`` file, without pickle.

Arrays are stored as ``state/<param index>/<name>``; everything else (param groups with their schedules,
steps, the step count) as one JSON document in the entry ``meta``. A ``.npz`` cannot hold bfloat16
(``ml_dtypes.bfloat16`` arrays come back as raw void bytes): they are stored as their uint16 bits and named in
the meta's ``bfloat16`` list. Schedules are written as their record
type and fields, and rebuilt through :mod:`fastopt.schedules` on load.
"""
import dataclasses
import json

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


def save(path, optimizer):
    """Write ``optimizer.state_dict()`` to ``path`` (a ``.npz``)."""
    state_dict = optimizer.state_dict()
    arrays, steps, bfloat16 = {}, {}, []
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            key = f"state/{index}/{name}"
            if name == "step":
                steps[str(index)] = value
            elif dtypes.storage_name(value.dtype) == "bfloat16":
                arrays[key] = value.view(np.uint16)
                bfloat16.append(key)
            else:
                arrays[key] = value
    meta = {"format": _FORMAT, "optimizer": type(optimizer).__name__, "step_count": state_dict["step_count"],
            "skipped_steps": state_dict.get("skipped_steps", 0), "bfloat16": bfloat16,
            "steps": steps, "guard": state_dict.get("guard"),
            "param_groups": [{key: encode(value) for key, value in group.items()}
                             for group in state_dict["param_groups"]]}
    np.savez(path, meta=np.array(json.dumps(meta)), **arrays)


def load(path, optimizer):
    """Load a file written by :func:`save` into ``optimizer`` (same optimizer type and param layout)."""
    with np.load(path, allow_pickle=False) as archive:
        meta = json.loads(str(archive["meta"]))
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a fastopt state file (format {meta.get('format')!r})")
        if meta["optimizer"] != type(optimizer).__name__:
            raise ValueError(f"{path} holds the state of a {meta['optimizer']}, not of a {type(optimizer).__name__}")
        state = {int(index): {"step": step} for index, step in meta["steps"].items()}
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
    optimizer.load_state_dict(loaded)
