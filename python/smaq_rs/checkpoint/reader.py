"""Reading checkpoints: :class:`Checkpoint` (lazy, by name), ``open`` and ``load``."""

from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

from .. import _core
from .._core import DtypeError, FormatError
from . import delta, document, sparse
from .document import NUMPY_OK, TORCH_BY_NAME
from .policy import itemsize

try:  # torch is optional: checkpoints load as NumPy arrays without it.
    import torch as _torch
except ImportError:  # pragma: no cover - exercised only where torch is absent
    _torch = None

PathLike = Union[str, "os.PathLike[str]"]


def _to_location(t, map_location):
    if map_location is None:
        return t
    if callable(map_location):
        return map_location(t, "cpu")
    if isinstance(map_location, dict):
        target = map_location.get("cpu", None)
        return t if target is None else t.to(target)
    return t.to(map_location)


class Checkpoint(Mapping):
    """A checkpoint opened for lazy access: the header is read at open; each ``ck[name]`` reads
    and verifies only that entry (pread). Use as a context manager or call ``close()``."""

    def __init__(self, path: PathLike, map_location: Any = None):
        self.path = os.fspath(path)
        self._r = _core.CheckpointReader(self.path)
        self._map = map_location
        self._entries = {e["name"]: e for e in self._r.entries()}
        self._doc = document.parse(self._r.json, self.path, self._entries)
        #: Tensors stored as a bitmask plus their non-zero elements, and their mask and zero-sign
        #: entries (container entries that are not tensors of the checkpoint).
        self._sparse: Dict[str, Dict[str, Any]] = self._doc.get("sparse", {})
        self._masks = {rec[k] for rec in self._sparse.values() for k in ("mask", "signs")
                       if k in rec}
        self._names = [n for n in self._entries if n not in self._masks]
        #: Tensors an incremental checkpoint takes from its base (see :func:`save`'s ``base``).
        self.from_base = list(self._doc.get("from_base", []))
        deltas = self._doc.get("deltas", [])
        #: Entries holding a difference from the base's tensor, and how it is coded (document
        #: version 2 and 3 files: plain differences).
        self._deltas: Dict[str, Dict[str, str]] = (
            dict(deltas) if isinstance(deltas, dict) else {n: delta.PLAIN for n in deltas})
        #: Entries holding a lossy residual from the base's decoded tensor.
        self._residuals = set(self._doc.get("residuals", []))
        self._base: Optional["Checkpoint"] = None

    # Mapping: the tensors of the file, and those taken from its base.
    def _stored(self, name: object) -> bool:
        """Whether ``name`` is a tensor stored in this file (not a sparse tensor's mask)."""
        return name in self._entries and name not in self._masks

    def __getitem__(self, name: str):
        return self._tensors([name])[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names + self.from_base)

    def __len__(self) -> int:
        return len(self._names) + len(self.from_base)

    def __contains__(self, name: object) -> bool:
        return self._stored(name) or name in self.from_base

    def base(self) -> "Checkpoint":
        """The base checkpoint of an incremental one, opened once and checked to be the file
        this one was saved against (FormatError if it changed since, OSError if it is gone)."""
        if self._base is None:
            rec = self._doc.get("base")
            if not rec:
                raise KeyError(f"{self.path} is not an incremental checkpoint")
            where = os.path.join(os.path.dirname(os.path.abspath(self.path)), rec["path"])
            base = Checkpoint(where, self._map)
            if base.identity() != rec["identity"]:
                raise FormatError(f"{self.path}: its base {where!r} has changed since this "
                                  "checkpoint was saved against it")
            self._base = base
        return self._base

    def raw_bytes(self, name: str) -> np.ndarray:
        """The dense bytes of tensor `name` (stored here or in the base), as uint8."""
        return self._dense_many([name])[name]

    def _dense_many(self, names: List[str]) -> Dict[str, np.ndarray]:
        """The dense bytes of tensors `names` (stored here or in the base): this file's entries
        are read in parallel, and the base values their differences need in one call to the
        base."""
        for n in names:
            if n not in self:
                raise KeyError(n)
        mine = [n for n in names if self._stored(n)]
        bufs = self._r.read_many(mine) if mine else []
        based = [n for n in mine if n in self._deltas or n in self._residuals]
        based += [n for n in names if not self._stored(n)]
        base = self.base()._dense_many(based) if based else {}
        out = {n: self._full(n, b, base.get(n)) for n, b in zip(mine, bufs)}
        out.update((n, base[n]) for n in names if not self._stored(n))
        return out

    def _tensors(self, names: List[str]) -> Dict[str, Any]:
        """Tensors `names` (stored here or in the base), decoded."""
        mine = [n for n in names if self._stored(n)]
        dense = self._dense_many(mine)
        out = {n: self._make(n, dense[n]) for n in mine}
        theirs = [n for n in names if not self._stored(n)]
        for n in theirs:
            if n not in self.from_base:
                raise KeyError(n)
        if theirs:
            out.update(self.base()._tensors(theirs))
        return out

    def exact(self, name: str) -> bool:
        """Whether tensor `name` reads back exactly as it was saved (stored raw, zstd or
        lossless here, or so in the base)."""
        if self._stored(name):
            exact = (self._entries[name]["codec"] in ("raw", "zstd", "lossless")
                     and name not in self._residuals)
            return exact and (name not in self._deltas or self.base().exact(name))
        return name in self.from_base and self.base().exact(name)

    def _full(self, name: str, buf: np.ndarray, base: Optional[np.ndarray] = None
              ) -> np.ndarray:
        """An entry's dense bytes from what it stores: itself, its non-zero elements, or its
        difference from the base's tensor (whose dense bytes `base` are, when already read)."""
        e = self._entries[name]
        raw = buf.view(np.uint8)[: e["dense_nbytes"]]
        rec = self._sparse.get(name)
        if rec is not None:
            numel = int(np.prod(rec["shape"], dtype=np.int64))
            size = itemsize(e["dtype"])
            mask = self._r.read(rec["mask"]).view(np.uint8)[: (numel + 7) // 8]
            signs = None
            if "signs" in rec:
                zeros = numel - rec["nnz"]
                signs = self._r.read(rec["signs"]).view(np.uint8)[: (zeros + 7) // 8]
            return sparse.expand(mask, raw, numel, size, signs)
        if name not in self._deltas and name not in self._residuals:
            return raw
        if base is None:
            base = self.base().raw_bytes(name)
        if name in self._residuals:
            return delta.from_float(delta.to_float(base, e["dtype"])
                                    + delta.to_float(raw, e["dtype"]), e["dtype"])
        return delta.decode(raw, base, e["dtype"], self._deltas[name])

    def identity(self) -> str:
        """SHA-256 over the JSON document and every entry's checksum: what an incremental
        checkpoint records of its base."""
        h = hashlib.sha256(self._r.json.encode())
        for name in sorted(self._entries):
            h.update(f"\0{name}\0{self._entries[name]['checksum']}".encode())
        return h.hexdigest()

    def tensor_records(self) -> Dict[str, List[Any]]:
        """Per tensor (stored here or in the base): [hash of its dense bytes, dtype, shape], as
        recorded at save time; empty for checkpoints written before the format had them. The
        document's own mapping: read it, do not change it."""
        recs = self._doc.get("tensors")
        return recs if isinstance(recs, dict) else {}

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._r = None  # the file is closed when the reader is dropped
        if self._base is not None:
            self._base.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.path!r}, entries={len(self._names)})"

    @property
    def metadata(self) -> Any:
        m = self._doc.get("metadata")
        return None if m is None else self._rebuild(m, {})

    @property
    def nbytes(self) -> int:
        return self._r.file_nbytes

    def entries(self) -> List[Dict[str, Any]]:
        """Per tensor stored in this file: name, dtype, shape, codec, nbytes (stored), dense_nbytes,
        ratio, offset, and ``sparse`` (stored as a bitmask plus its non-zero elements: shape and
        dense_nbytes are the tensor's, nbytes counts the mask too)."""
        out = []
        for name in self._names:
            e = dict(self._entries[name], shape=tuple(self._entries[name]["shape"]))
            rec = self._sparse.get(name)
            e["sparse"] = rec is not None
            if rec is not None:  # the tensor's shape and bytes, its mask's bytes included
                e["shape"] = tuple(rec["shape"])
                e["dense_nbytes"] = itemsize(e["dtype"]) * int(np.prod(e["shape"], dtype=np.int64))
                e["nbytes"] += sum(self._entries[rec[k]]["nbytes"] for k in ("mask", "signs")
                                   if k in rec)
            e["ratio"] = e["dense_nbytes"] / e["nbytes"] if e["nbytes"] else float("nan")
            out.append(e)
        return out

    def tensor_names(self, key: Optional[str] = None) -> Dict[str, str]:
        """For a saved dict (the whole object, or its item ``key``, e.g. ``"model"``): the entry
        name of each of its tensors, by the dict's key. A state dict saved with :func:`save`
        maps ``"0.weight"`` (or, under ``key``, its own key) to the entry holding it; nothing is
        read. Not a dict: FormatError."""
        node = self._doc["root"]
        where = "the saved object"
        if key is not None:
            items = node.get("__dict__") if isinstance(node, dict) else None
            found = [v for k, v in (items or []) if k == key]
            if not found:
                raise KeyError(f"{self.path}: the saved object has no item {key!r}")
            node, where = found[0], f"item {key!r}"
        items = node.get("__dict__") if isinstance(node, dict) else None
        if items is None:
            raise FormatError(f"{self.path}: {where} is not a dict of tensors")
        return {k: v["__tensor__"] for k, v in items
                if isinstance(v, dict) and "__tensor__" in v}

    def codec_info(self, name: str) -> Tuple[Optional[Dict], Optional[Dict]]:
        """(params, encoder statistics) of a packed entry; (None, None) for raw/zstd ones."""
        return self._r.codec_info(name)

    def _make(self, name: str, raw: np.ndarray):
        """The tensor of entry ``name`` from its dense bytes (:meth:`_full`)."""
        e = self._entries[name]
        dtype = e["dtype"]
        shape = tuple(self._sparse[name]["shape"] if name in self._sparse else e["shape"])
        if self._doc["kinds"].get(name) == "torch" and _torch is not None:
            t = _torch.from_numpy(raw).view(TORCH_BY_NAME[dtype]).reshape(shape)
            return _to_location(t, self._map)
        if dtype not in NUMPY_OK:
            raise DtypeError(f"entry {name!r} is {dtype}; load it with torch installed")
        return raw.view(np.dtype(dtype)).reshape(shape)

    def _rebuild(self, x: Any, tensors: Dict[str, Any]) -> Any:
        """The object of document value ``x``; entries not in ``tensors`` are read (and kept
        there, so a shared tensor comes back shared)."""

        def tensor(name):
            if name not in tensors:
                if name not in self._entries and name not in self.from_base:
                    raise FormatError(f"{self.path}: the document names a missing entry {name!r}")
                tensors[name] = self[name]
            return tensors[name]

        return document.rebuild(x, tensor, self.path)

    def load(self) -> Any:
        """The whole saved object, every entry decoded (in parallel)."""
        tensors = self._tensors(self._names + self.from_base)
        return self._rebuild(self._doc["root"], tensors)


def open(path: PathLike, map_location: Any = None) -> Checkpoint:  # noqa: A001 - mirrors the builtin, as torch.load does
    """Opens a checkpoint for lazy access by name (see :class:`Checkpoint`)."""
    return Checkpoint(path, map_location)


def load(path: PathLike, map_location: Any = None) -> Any:
    """Loads what :func:`save` saved: the same nesting, tensors of the same dtypes and shapes
    (bit-exact unless a lossy codec stored them), shared tensors shared again. ``map_location``:
    None (CPU), a device or device string, or a callable as in ``torch.load``."""
    with Checkpoint(path, map_location) as ck:
        return ck.load()
