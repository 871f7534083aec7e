"""``load_into``: a checkpoint's tensors into a module's parameters and buffers, by name, lazily."""

from __future__ import annotations

import os
from typing import List, NamedTuple, Optional, Union

import torch

from .. import _bridge


class LoadResult(NamedTuple):
    """What :func:`load_into` did not match (as ``Module.load_state_dict`` reports it)."""

    missing_keys: List[str]
    unexpected_keys: List[str]


def load_into(module: torch.nn.Module, path: Union[str, "os.PathLike[str]"], strict: bool = True,
              key: Optional[str] = None) -> LoadResult:
    """Copies the tensors of the checkpoint at ``path`` into ``module``'s parameters and
    buffers, matched by their ``state_dict`` names, one entry at a time (only one decoded tensor
    is held at once; the entries the module does not have are never read).

    ``key``: the checkpoint holds a dict of state dicts, e.g. ``{"model": ..., "optim": ...}``:
    load the one under ``key``. ``strict``: missing or unexpected names raise ``RuntimeError``
    (nothing is copied then); otherwise they are returned. A shape that differs always raises
    before anything is copied.

    >>> smaq_rs.save(model.state_dict(), "m.smaq")             # doctest: +SKIP
    >>> smaq_rs.torch.load_into(fresh_model, "m.smaq")         # doctest: +SKIP
    LoadResult(missing_keys=[], unexpected_keys=[])
    """
    with _bridge.open_checkpoint(path) as ck:
        names = ck.tensor_names(key)
        shapes = {e["name"]: tuple(e["shape"]) for e in ck.entries()}
        own = module.state_dict(keep_vars=True)
        missing = [k for k in own if k not in names]
        unexpected = [k for k in names if k not in own]
        errors = []
        if strict and missing:
            errors.append("Missing key(s) in the checkpoint: " + ", ".join(map(repr, missing)))
        if strict and unexpected:
            errors.append("Unexpected key(s) in the checkpoint: "
                          + ", ".join(map(repr, unexpected)))
        for k, t in own.items():
            if k in names and shapes[names[k]] != tuple(t.shape):
                errors.append(f"size mismatch for {k}: the checkpoint has shape "
                              f"{list(shapes[names[k]])}, the module {list(t.shape)}")
        if errors:
            raise RuntimeError(f"Error(s) loading {os.fspath(path)!r} into "
                               f"{type(module).__name__}:\n\t" + "\n\t".join(errors))
        with torch.no_grad():
            for k, t in own.items():
                if k in names:
                    t.copy_(ck[names[k]])
    return LoadResult(missing, unexpected)
