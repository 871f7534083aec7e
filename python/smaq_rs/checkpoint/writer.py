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

#: Codec parameters that do not fit a residual (signed, any magnitude): dropped from its entry.
_NOT_FOR_RESIDUALS = ("all_positive", "log")

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
    residual: bool = True,
    **params: Any,
) -> Dict[str, Any]:
    """Saves a state dict, an optimizer state dict or any nesting of dicts/lists of tensors.

    ``codec``: "smaq" (default: lossy SmaQ 6/8, nearest rounding, for large float tensors, exact for the rest),
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
    The summary's ``from_base`` lists the tensors taken from the base.

    A changed tensor stored exactly (``lossless``, ``zstd``; not ``raw``, which does not
    compress) whose base value is exact too is stored as a code of its bit patterns against the
    base's (the integer difference or the XOR, whichever is estimated smaller, its bytes split
    into planes), or whole when that is estimated smaller; bit-exact either way. The summary's
    ``deltas`` maps each tensor so stored to how (``{"op": "sub" | "xor", ...}``).

    ``residual`` (default True): a changed float tensor that the policy codes lossily (the
    default SmaQ policy, ``int``, ``fp8``...) is stored as the residual ``tensor - base``,
    where ``base`` is the tensor as the base checkpoint returns it (decoded), coded with the same
    codec and parameters (less ``all_positive`` and ``log``, which a residual does not fit);
    loading returns ``base + decoded residual``. The coding error then scales with the change
    since the base rather than with the tensor, and does not build up along a chain: each
    residual is taken against what the previous checkpoint returns, so it also carries that
    checkpoint's error. A tensor whose residual is not smaller than the tensor (standard
    deviation; e.g. re-initialised) is stored whole. The summary's ``residuals`` lists them.
    ``residual=False`` stores every changed lossy tensor whole.
    """
    choose = resolve_policy(codec, policy, params)
    tensors, text = document.flatten(obj, metadata)
    path = os.fspath(path)
    tensors, doc, from_base, base_ck = _against_base(tensors, text, path, base)
    deltas: Dict[str, Dict[str, str]] = {}
    residuals: List[str] = []
    specs = []
    stored: List[document.Tensor] = []  # what the container holds, masks included
    split: Dict[str, Dict[str, Any]] = {}  # the document's "sparse" records
    names = {t.name for t in tensors} | set(from_base)
    for t in tensors:
        c, p = choose(t.name, t.dtype, t.shape)
        rec = None
        if base_ck is not None and c in EXACT_CODECS:
            rec = _delta_against(base_ck, doc, t, c)
        if rec is not None:
            deltas[t.name] = rec
            if c == "lossless":
                p = {**(p or {}), **delta.LOSSLESS_PARAMS}
        elif c in sparse.CODECS and t.dtype in FLOATS and (parts := sparse.split(
                t.raw, itemsize(t.dtype), getattr(choose, "sparse_min", None))) is not None:
            mask, values, nnz, signs = parts
            srec: Dict[str, Any] = {"shape": list(t.shape), "nnz": nnz}
            for key, bits in (("mask", mask), ("signs", signs)):
                if bits is not None:
                    srec[key] = _side_name(t.name, key, names)
                    names.add(srec[key])
                    stored.append(document.Tensor(srec[key], "uint8", (bits.size,), bits,
                                                  "numpy"))
                    specs.append((srec[key], "uint8", [bits.size], "zstd", None))
            split[t.name] = srec
            t = document.Tensor(t.name, t.dtype, (nnz,), values, t.kind)
        elif (base_ck is not None and residual and c not in EXACT_CODECS and t.dtype in FLOATS
              and _residual_against(base_ck, doc, t)):
            residuals.append(t.name)
            p = {k: v for k, v in (p or {}).items() if k not in _NOT_FOR_RESIDUALS}
        stored.append(t)
        if c in EXACT_CODECS or t.dtype in FLOATS:
            specs.append((t.name, t.dtype, list(t.shape), c, p or None))
        else:  # a float codec chosen for an integer or bool tensor: stored exactly
            specs.append((t.name, t.dtype, list(t.shape), "zstd", None))
    if base_ck is not None:
        base_ck.close()
    if deltas:
        doc["deltas"] = deltas
    if residuals:
        doc["residuals"] = residuals
    if split:
        doc["sparse"] = split
        doc["version"] = document.DOC_VERSION_SPARSE
    if deltas or residuals:
        doc["version"] = document.DOC_VERSION_CODED
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
        "residuals": residuals,
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


def _tensor_hashes(tensors: List[document.Tensor]) -> List[str]:
    """Each tensor's content hash (XXH3 of its bytes, in hex), the tensors hashed in parallel."""
    raws = [np.ascontiguousarray(t.raw).reshape(-1).view(np.uint8) for t in tensors]
    return [f"{h:016x}" for h in _core.checksums(raws)]


def _against_base(tensors: List[document.Tensor], text: str, path: str,
                  base: Optional[PathLike]) -> Tuple[List[document.Tensor], Dict[str, Any],
                                                     List[str], Any]:
    """Records every tensor's hash, dtype and shape in the document; with a base, leaves out
    the tensors the base holds unchanged and records where they are. Returns the tensors left,
    the document, the names taken from the base and the open base (None without one)."""
    doc = json.loads(text)
    doc["tensors"] = {t.name: [h, t.dtype, list(t.shape)]
                      for t, h in zip(tensors, _tensor_hashes(tensors))}
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


def _base_match(b: Any, doc: Dict[str, Any], t: document.Tensor) -> bool:
    """Whether the base holds a tensor of `t`'s name, dtype and shape."""
    rec = b.tensor_records().get(t.name)
    return rec is not None and rec[1:] == doc["tensors"][t.name][1:]


def _delta_against(b: Any, doc: Dict[str, Any], t: document.Tensor, codec: str
                   ) -> Optional[Dict[str, str]]:
    """Replaces `t`'s bytes by their code against the base's tensor of the same name, dtype and
    shape when the base holds it exactly and the code is estimated smaller than the tensor
    (stored with `codec`); the delta record, or None (`t` unchanged)."""
    if (not _base_match(b, doc, t) or not delta.supports(t.dtype, itemsize(t.dtype))
            or not b.exact(t.name)):
        return None
    new = np.ascontiguousarray(t.raw).reshape(-1)
    base = b.raw_bytes(t.name)
    rec = delta.choose(new, base, t.dtype, codec)
    if rec is not None:
        t.raw = delta.encode(new, base, t.dtype, rec)
    return rec


def _residual_against(b: Any, doc: Dict[str, Any], t: document.Tensor) -> bool:
    """Replaces float tensor `t`'s bytes by its residual from the base's decoded tensor of the
    same name, dtype and shape when that residual is finite and has a smaller standard
    deviation than the tensor; whether it did."""
    if not _base_match(b, doc, t) or t.raw.nbytes == 0:
        return False
    new = delta.to_float(np.ascontiguousarray(t.raw).reshape(-1), t.dtype)
    r = new - delta.to_float(b.raw_bytes(t.name), t.dtype)
    if not np.isfinite(r).all() or not float(np.std(r)) < float(np.std(new)):
        return False
    t.raw = delta.from_float(r, t.dtype)
    return True
