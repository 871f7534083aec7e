"""``save``: flattens an object, chooses a codec per tensor and writes the container atomically
(temporary file in the same directory, fsync, rename; the Rust writer does the I/O)."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

import numpy as np

from .. import _core
from .._core import SmaqError
from . import delta, document, sparse
from .policy import EXACT_CODECS, FLOATS, itemsize, resolve_policy

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
    base: Optional[PathLike] = None,
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

    ``base``: an earlier checkpoint (written by this version) to save incrementally against:
    every tensor whose name, dtype, shape and bytes (an XXH3 hash of them) are the base's is not
    stored again but taken from the base when this checkpoint is read (a frozen backbone,
    embeddings that did not move). The base's path is recorded relative to this file, with an
    identity that reading checks: keep the base beside it, unchanged. A chain of bases works.
    A changed tensor stored exactly (``lossless``, ``raw`` or ``zstd``) whose base value is
    exact too is stored as the difference of its bit patterns from the base's (listed in the
    summary's ``deltas``; it takes fewer bytes where few bits changed).
    The summary's ``from_base`` lists the tensors taken from the base.
    """
    choose = resolve_policy(codec, policy, params)
    tensors, text = document.flatten(obj, metadata)
    path = os.fspath(path)
    tensors, doc, from_base, base_ck = _against_base(tensors, text, path, base)
    deltas: List[str] = []
    specs = []
    stored: List[document.Tensor] = []  # what the container holds, masks included
    split: Dict[str, Dict[str, Any]] = {}  # the document's "sparse" records
    names = {t.name for t in tensors} | set(from_base)
    for t in tensors:
        c, p = choose(t.name, t.dtype, t.shape)
        if base_ck is not None and c in EXACT_CODECS and _delta_against(base_ck, doc, t):
            deltas.append(t.name)
        elif c in sparse.CODECS and t.dtype in FLOATS:
            parts = sparse.split(t.raw, itemsize(t.dtype), getattr(choose, "sparse_min", None))
            if parts is not None:
                mask, values, nnz, signs = parts
                rec: Dict[str, Any] = {"shape": list(t.shape), "nnz": nnz}
                for key, bits in (("mask", mask), ("signs", signs)):
                    if bits is not None:
                        rec[key] = _side_name(t.name, key, names)
                        names.add(rec[key])
                        stored.append(document.Tensor(rec[key], "uint8", (bits.size,), bits,
                                                      "numpy"))
                        specs.append((rec[key], "uint8", [bits.size], "zstd", None))
                split[t.name] = rec
                t = document.Tensor(t.name, t.dtype, (nnz,), values, t.kind)
        stored.append(t)
        if c in EXACT_CODECS or t.dtype in FLOATS:
            specs.append((t.name, t.dtype, list(t.shape), c, p or None))
        else:  # a float codec chosen for an integer or bool tensor: stored exactly
            specs.append((t.name, t.dtype, list(t.shape), "zstd", None))
    if base_ck is not None:
        base_ck.close()
    if deltas:
        doc["deltas"] = deltas
    if split:
        doc["sparse"] = split
        doc["version"] = document.DOC_VERSION_SPARSE
    text = json.dumps(doc, allow_nan=False, separators=(",", ":"))
    writer = _core.CheckpointWriter(path, specs, text)
    total = sum(t.raw.nbytes for t in stored)
    done = 0
    sizes: List[int] = []
    try:
        batch: List[np.ndarray] = []
        batch_bytes = 0
        for t in stored:
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
        "dense_nbytes": sum(t.raw.nbytes for t in tensors),
        "fsync_seconds": fsync_seconds,
        "from_base": from_base,
        "deltas": deltas,
        "entries": _entry_sizes(stored, sizes, specs, split,
                                {t.name: t.raw.nbytes for t in tensors}),
    }


def _side_name(name: str, what: str, taken: Set[str]) -> str:
    """A container entry name for the ``what`` ("mask" or "signs") of sparse tensor ``name``
    that no other entry uses."""
    m = f"{name}.__sparse_{what}__"
    k = 1
    while m in taken:
        m, k = f"{name}.__sparse_{what}_{k}__", k + 1
    return m


def _entry_sizes(stored: List[document.Tensor], sizes: List[int], specs: List[Tuple],
                 split: Dict[str, Dict[str, Any]], dense: Dict[str, int]
                 ) -> Dict[str, Tuple[int, int, str]]:
    """Per tensor: (stored bytes, dense bytes, codec); a sparse tensor's stored bytes are its
    values', its mask's and its zero signs'."""
    out = {t.name: [s, spec[3]] for t, s, spec in zip(stored, sizes, specs)}
    for name, rec in split.items():
        out[name][0] += sum(out.pop(rec[k])[0] for k in ("mask", "signs") if k in rec)
    return {name: (s, dense[name], codec) for name, (s, codec) in out.items()}


def _tensor_hash(t: document.Tensor) -> str:
    return f"{_core.checksum(np.ascontiguousarray(t.raw).reshape(-1).view(np.uint8)):016x}"


def _against_base(tensors: List[document.Tensor], text: str, path: str,
                  base: Optional[PathLike]) -> Tuple[List[document.Tensor], Dict[str, Any],
                                                     List[str], Any]:
    """Records every tensor's hash, dtype and shape in the document; with a base, leaves out
    the tensors the base holds unchanged and records where they are. Returns the tensors left,
    the document, the names taken from the base and the open base (None without one)."""
    doc = json.loads(text)
    doc["tensors"] = {t.name: [_tensor_hash(t), t.dtype, list(t.shape)] for t in tensors}
    if base is None:
        return tensors, doc, [], None
    from .reader import Checkpoint

    base = os.fspath(base)
    if os.path.abspath(base) == os.path.abspath(path):
        raise SmaqError(f"save: the base {base!r} is the file being written")
    b = Checkpoint(base)
    known = b.tensor_records()
    from_base = [n for n, rec in doc["tensors"].items() if known.get(n) == rec]
    doc["version"] = document.DOC_VERSION_BASE
    doc["base"] = {"path": os.path.relpath(os.path.abspath(base),
                                           os.path.dirname(os.path.abspath(path))),
                   "identity": b.identity()}
    doc["from_base"] = from_base
    skip = set(from_base)
    return [t for t in tensors if t.name not in skip], doc, from_base, b


def _delta_against(b: Any, doc: Dict[str, Any], t: document.Tensor) -> bool:
    """Replaces `t`'s bytes by their difference from the base's tensor of the same name, dtype
    and shape when the base holds it exactly; whether it did."""
    rec = b.tensor_records().get(t.name)
    size = t.raw.nbytes // max(1, int(np.prod(t.shape, dtype=np.int64)))
    if (rec is None or rec[1:] != doc["tensors"][t.name][1:] or not delta.supports(size)
            or not b.exact(t.name)):
        return False
    t.raw = delta.encode(np.ascontiguousarray(t.raw).reshape(-1), b.raw_bytes(t.name), size)
    return True
