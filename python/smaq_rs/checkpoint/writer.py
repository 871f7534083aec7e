"""``save``: flattens an object, chooses a codec per tensor and writes the container atomically
(temporary file in the same directory, fsync, rename; the Rust writer does the I/O)."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np

from .. import _core
from . import document
from .policy import EXACT_CODECS, FLOATS, resolve_policy

PathLike = Union[str, "os.PathLike[str]"]

#: Tensors are handed to the writer in batches of about this many bytes (one progress call each).
_BATCH_BYTES = 256 << 20


def save(
    obj: Any,
    path: PathLike,
    codec: Optional[str] = None,
    policy: Any = None,
    *,
    metadata: Optional[Dict[str, Any]] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    durable: bool = True,
    **params: Any,
) -> Dict[str, Any]:
    """Saves a state dict, an optimizer state dict or any nesting of dicts/lists of tensors.

    ``codec``: "smaq" (default: lossy SmaQ 6/8 for large float tensors, exact for the rest),
    "lossless" (every tensor bit-exact), "raw", or any registered codec (its ``params`` as keyword
    arguments). ``policy``: a :class:`Policy`, or a callable ``(name, dtype, shape)`` returning
    a codec name, ``(codec, params)``, or None for the default choice. ``metadata``: JSON-able
    user data, returned by ``open(path).metadata``. ``progress(done_bytes, total_bytes)`` is
    called after each batch. ``durable``: fsync the file and its directory before returning (the
    default); False skips both for users who do not need the checkpoint to survive a power loss
    (the file still replaces the target atomically). Returns a summary: file bytes, dense bytes,
    per-entry sizes, and ``fsync_seconds``, the time the fsyncs took.
    """
    choose = resolve_policy(codec, policy, params)
    tensors, text = document.flatten(obj, metadata)
    specs = []
    for t in tensors:
        c, p = choose(t.name, t.dtype, t.shape)
        if c in EXACT_CODECS or t.dtype in FLOATS:
            specs.append((t.name, t.dtype, list(t.shape), c, p or None))
        else:  # a float codec chosen for an integer or bool tensor: stored exactly
            specs.append((t.name, t.dtype, list(t.shape), "zstd", None))
    path = os.fspath(path)
    writer = _core.CheckpointWriter(path, specs, text)
    total = sum(t.raw.nbytes for t in tensors)
    done = 0
    sizes: List[int] = []
    try:
        batch: List[np.ndarray] = []
        batch_bytes = 0
        for t in tensors:
            batch.append(t.raw)
            batch_bytes += t.raw.nbytes
            if batch_bytes >= _BATCH_BYTES:
                sizes += writer.write(batch)
                done += batch_bytes
                batch, batch_bytes = [], 0
                if progress is not None:
                    progress(done, total)
        if batch:
            sizes += writer.write(batch)
            done += batch_bytes
        fsync_seconds = writer.finish(durable)
        if progress is not None:
            progress(done, total)
    except BaseException:
        writer.abort()
        raise
    return {
        "path": path,
        "nbytes": os.path.getsize(path),
        "dense_nbytes": total,
        "fsync_seconds": fsync_seconds,
        "entries": {t.name: (s, t.raw.nbytes, spec[3])
                    for t, s, spec in zip(tensors, sizes, specs)},
    }
