"""The checkpoint's JSON document: flattening an object into tensors plus the document, the
document's schema, and rebuilding the object from it (docs/FORMAT.md, "Checkpoint container").

Schema (version 1; 2 for an incremental checkpoint; 3 when it holds sparse tensors; 4 when it
holds coded differences or lossy residuals)::

    {"format": "smaq_rs.checkpoint", "version": 1,
     "root": <value>, "kinds": {tensor name: "torch" | "numpy"}, "metadata": <value> | null,
     "tensors": {tensor name: [xxh3 of its dense bytes (hex), dtype, shape]}}

An incremental checkpoint (``save(..., base=...)``, version 2) adds
``"base": {"path": the base file, relative to this one's directory, "identity": hex}`` and
``"from_base": [tensor names]``: those tensors are the base's (unchanged since), not entries of
this file. ``identity`` is a SHA-256 over the base's JSON document and its entries' checksums,
so a base changed since is detected. ``"deltas": [entry names]`` lists the entries that store
the difference of a tensor's bit patterns from the base's (``delta.py``), not the tensor; in
version 4 it is ``{entry name: {"op": "sub" | "xor", "layout": "rot" | "planes" | "plain",
"order": "none" | "exponent"}}``, how each difference is coded. ``"residuals": [entry names]``
(version 4) lists the entries holding ``tensor - base's decoded tensor``, lossily coded.
``tensors`` (written since the format had it) is what a later checkpoint compares with to find
unchanged tensors. ``"sparse": {tensor name: {"mask": entry name, "shape": [...], "nnz": k,
"signs": entry name}}`` (version 3) lists the tensors stored as their ``k`` non-zero elements
(the tensor's entry, 1-D) plus a bitmask entry (uint8, one bit per element, little bit order)
and, when some zero is -0.0, a sign entry (one bit per zero, set for -0.0); see ``sparse.py``.

A <value> is JSON null/bool/int/str/float/list, or an object with exactly one tag:
``{"__tensor__": entry name}``, ``{"__dict__": [[key, value], ...]}`` (keys of any JSON scalar
type, order kept), ``{"__tuple__": [...]}``, ``{"__float__": "nan" | "inf" | "-inf"}``,
``{"__dtype__": torch dtype name}``.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Dict, List, Mapping, Tuple

import numpy as np

from .._core import DtypeError, FormatError, SmaqError

try:  # torch is optional: NumPy arrays can be saved without it.
    import torch as _torch
except ImportError:  # pragma: no cover - exercised only where torch is absent
    _torch = None

DOC_FORMAT = "smaq_rs.checkpoint"
DOC_VERSION = 1
#: The document version of an incremental checkpoint (tensors taken from a base file).
DOC_VERSION_BASE = 2
#: The document version of a checkpoint holding sparse tensors (``"sparse"``), incremental or
#: not: a reader that does not know it must refuse the file rather than return a tensor's
#: non-zero values as the tensor.
DOC_VERSION_SPARSE = 3
#: The document version of an incremental checkpoint whose differences from the base are coded
#: (``"deltas"`` a record per entry) or that holds lossy residuals (``"residuals"``); sparse
#: tensors may appear too. Readers of versions 2 and 3 refuse it rather than read a coded
#: difference as a plain one.
DOC_VERSION_CODED = 4


def _torch_dtypes() -> Dict[str, Any]:
    names = [
        "float32", "float16", "bfloat16", "float64", "bool", "uint8", "int8", "int16", "int32",
        "int64", "uint16", "uint32", "uint64", "complex64", "complex128", "float8_e4m3fn",
        "float8_e5m2",
    ]
    return {n: getattr(_torch, n) for n in names if hasattr(_torch, n)}


#: dtype name <-> torch dtype, for every dtype a checkpoint stores.
TORCH_BY_NAME = _torch_dtypes() if _torch is not None else {}
NAME_BY_TORCH = {v: k for k, v in TORCH_BY_NAME.items()}
#: dtype names NumPy can hold (the others need torch to load).
NUMPY_OK = {
    "float32", "float16", "float64", "bool", "uint8", "int8", "int16", "int32", "int64",
    "uint16", "uint32", "uint64", "complex64", "complex128",
}


# -- flattening ----------------------------------------------------------------------------------
class Tensor:
    """A tensor found while flattening: its entry name and raw little-endian bytes."""

    __slots__ = ("name", "dtype", "shape", "raw", "kind")

    def __init__(self, name, dtype, shape, raw, kind):
        self.name, self.dtype, self.shape, self.raw, self.kind = name, dtype, shape, raw, kind


def _torch_raw(t, where: str):
    if t.layout != _torch.strided:
        raise SmaqError(f"{where}: {t.layout} tensors cannot be saved; convert with .to_dense()")
    if t.device.type == "meta":
        raise SmaqError(f"{where}: a meta tensor has no data to save")
    name = NAME_BY_TORCH.get(t.dtype)
    if name is None:
        raise DtypeError(f"{where}: dtype {t.dtype} cannot be stored")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()  # a non-contiguous tensor is copied here
    raw = t.reshape(-1).view(_torch.uint8).numpy()
    return name, tuple(t.shape), raw


def _numpy_raw(a: np.ndarray, where: str):
    name = a.dtype.name
    if name not in NUMPY_OK or a.dtype.byteorder == ">":
        raise DtypeError(f"{where}: NumPy dtype {a.dtype} cannot be stored")
    a = np.ascontiguousarray(a)
    return name, tuple(a.shape), a.reshape(-1).view(np.uint8)


def _identity(x) -> Tuple:
    if _torch is not None and isinstance(x, _torch.Tensor):
        if x.layout != _torch.strided or x.device.type == "meta":
            return ("obj", id(x))
        return ("t", x.device.type, x.data_ptr(), x.dtype, tuple(x.shape), tuple(x.stride()))
    ai = x.__array_interface__
    return ("n", ai["data"][0], x.dtype.str, x.shape, x.strides)


class Flattener:
    """Walks a nested object: collects its tensors (shared ones once) and returns the
    document value that stands for it."""

    def __init__(self):
        self.tensors: List[Tensor] = []
        self.names: set = set()
        self.seen: Dict[Tuple, str] = {}
        self.keep: List[Any] = []  # keeps identities alive while flattening

    def _name(self, path: str) -> str:
        name = path or "tensor"
        n = 1
        while name in self.names:
            n += 1
            name = f"{path}#{n}"
        self.names.add(name)
        return name

    def tensor(self, x, path: str, kind: str) -> Dict[str, Any]:
        key = _identity(x)
        if key in self.seen:  # shared tensors are stored once and come back shared
            return {"__tensor__": self.seen[key]}
        where = path or "<root>"
        dtype, shape, raw = (_torch_raw if kind == "torch" else _numpy_raw)(x, where)
        name = self._name(path)
        self.seen[key] = name
        self.keep.append(x)
        self.tensors.append(Tensor(name, dtype, shape, raw, kind))
        return {"__tensor__": name}

    def walk(self, x: Any, path: str, depth: int = 0) -> Any:
        if depth > 200:
            raise SmaqError(f"{path}: nesting deeper than 200 levels")
        if _torch is not None and isinstance(x, _torch.Tensor):
            return self.tensor(x, path, "torch")
        if isinstance(x, np.ndarray):
            return self.tensor(x, path, "numpy")
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, (int, np.integer)):
            return int(x)
        if isinstance(x, (float, np.floating)):
            x = float(x)
            return x if math.isfinite(x) else {"__float__": repr(x)}
        if isinstance(x, np.bool_):
            return bool(x)
        if _torch is not None and isinstance(x, _torch.dtype):
            return {"__dtype__": str(x).replace("torch.", "")}
        sub = (lambda k: f"{path}.{k}") if path else str
        if isinstance(x, Mapping):
            items = []
            for k, v in x.items():
                if not (k is None or isinstance(k, (str, int, float, bool))):
                    raise SmaqError(f"{path or '<root>'}: dict key {k!r} is not a str/int/float")
                items.append([k, self.walk(v, sub(k), depth + 1)])
            return {"__dict__": items}
        if isinstance(x, list):
            return [self.walk(v, sub(i), depth + 1) for i, v in enumerate(x)]
        if isinstance(x, tuple):  # torch.Size included
            return {"__tuple__": [self.walk(v, sub(i), depth + 1) for i, v in enumerate(x)]}
        raise SmaqError(
            f"{path or '<root>'}: cannot save a {type(x).__name__} (checkpoints hold tensors, "
            "arrays, dicts, lists, tuples, str, int, float, bool and None; no pickle)"
        )


def flatten(obj: Any, metadata: Any = None) -> Tuple[List[Tensor], str]:
    """The tensors of ``obj`` (in the order found) and the JSON text of its document."""
    flat = Flattener()
    root = flat.walk(obj, "")
    doc = {
        "format": DOC_FORMAT,
        "version": DOC_VERSION,
        "root": root,
        "kinds": {t.name: t.kind for t in flat.tensors},
        "metadata": flat.walk(metadata, "metadata") if metadata is not None else None,
    }
    if doc["metadata"] is not None and len(doc["kinds"]) != len(flat.tensors):
        raise SmaqError("metadata must not contain tensors")
    return flat.tensors, json.dumps(doc, allow_nan=False, separators=(",", ":"))


# -- reading -------------------------------------------------------------------------------------
def parse(text: str, path: str, entries: Mapping[str, Any]) -> Dict[str, Any]:
    """The document of a checkpoint, checked against the schema and the container's entries."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise FormatError(f"{path}: the checkpoint's JSON document is invalid: {e}")
    if (
        not isinstance(doc, dict)
        or doc.get("format") != DOC_FORMAT
        or not isinstance(doc.get("kinds"), dict)
    ):
        raise FormatError(f"{path}: the JSON document is not a smaq_rs checkpoint's")
    version = doc.get("version")
    if version not in (DOC_VERSION, DOC_VERSION_BASE, DOC_VERSION_SPARSE, DOC_VERSION_CODED):
        raise FormatError(f"{path}: checkpoint document version {version!r} "
                          f"is not supported (this build reads {DOC_VERSION} to "
                          f"{DOC_VERSION_CODED})")
    from_base, deltas = doc.get("from_base", []), doc.get("deltas", [])
    residuals = doc.get("residuals", [])
    base = doc.get("base")
    if isinstance(deltas, dict):  # version 4: a delta record per entry
        from .delta import valid

        ok = version == DOC_VERSION_CODED and all(valid(r) for r in deltas.values())
    else:  # versions 2 and 3: a list of plain differences
        ok = isinstance(deltas, list)
    if (not ok or not isinstance(from_base, list) or not isinstance(residuals, list)
            or (residuals and version != DOC_VERSION_CODED)
            or not all(isinstance(n, str) for n in list(deltas) + residuals)
            or any(n not in entries for n in list(deltas) + residuals)
            or set(deltas) & set(residuals)
            or ((from_base or deltas or residuals) and not (
                isinstance(base, dict) and isinstance(base.get("path"), str)
                and isinstance(base.get("identity"), str)))):
        raise FormatError(f"{path}: malformed base reference in the JSON document")
    _check_sparse(doc.get("sparse", {}), entries, set(deltas) | set(residuals), path)
    from_base = set(from_base)
    for name, kind in doc["kinds"].items():
        if (name not in entries and name not in from_base) or kind not in ("torch", "numpy"):
            raise FormatError(f"{path}: the JSON document names an unknown entry "
                              f"{name!r} or kind {kind!r}")
    return doc


def _check_sparse(sparse: Any, entries: Mapping[str, Any], based: set, path: str) -> None:
    """``"sparse": {tensor name: {"mask": entry, "shape": [ints], "nnz": int, "signs": entry
    (optional)}}`` (never a delta or residual entry): each tensor's entry holds its ``nnz``
    non-zero elements, its mask entry one bit per element, its signs entry one bit per zero
    (set for -0.0)."""
    ok = isinstance(sparse, dict)
    for name, rec in (sparse.items() if ok else ()):
        try:
            mask, shape, nnz = rec["mask"], rec["shape"], rec["nnz"]
            numel = math.prod(shape)
            signs = rec.get("signs")
            ok = (name in entries and mask in entries and name not in based
                  and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(nnz, int) and 0 <= nnz <= numel
                  and list(entries[name]["shape"]) == [nnz]
                  and entries[mask]["dtype"] == "uint8"
                  and list(entries[mask]["shape"]) == [(numel + 7) // 8]
                  and (signs is None or (signs in entries and signs != mask
                                         and entries[signs]["dtype"] == "uint8"
                                         and list(entries[signs]["shape"])
                                         == [(numel - nnz + 7) // 8])))
        except (KeyError, TypeError):
            ok = False
        if not ok:
            break
    if not ok:
        raise FormatError(f"{path}: malformed sparse tensor record in the JSON document")


def rebuild(x: Any, tensor: Callable[[str], Any], path: str) -> Any:
    """The object a document value stands for; ``tensor(name)`` gives an entry's tensor (or
    raises FormatError for a name the container lacks). Any malformation is a FormatError."""
    try:
        return _build(x, tensor, path, 0)
    except (KeyError, TypeError, ValueError, IndexError, RecursionError) as e:
        if isinstance(e, SmaqError):
            raise
        raise FormatError(f"{path}: malformed checkpoint document: {e!r}") from None


def _build(x: Any, tensor: Callable[[str], Any], path: str, depth: int) -> Any:
    if depth > 400:
        raise FormatError(f"{path}: checkpoint document nested too deeply")
    if isinstance(x, list):
        return [_build(v, tensor, path, depth + 1) for v in x]
    if not isinstance(x, dict):
        return x
    if len(x) != 1:
        raise FormatError(f"{path}: unexpected object {list(x)[:4]} in the document")
    (tag, v), = x.items()
    if tag == "__tensor__":
        return tensor(v)
    if tag == "__dict__":
        out = {}
        for k, val in v:
            k = _build(k, tensor, path, depth + 1)
            out[k] = _build(val, tensor, path, depth + 1)
        return out
    if tag == "__tuple__":
        return tuple(_build(i, tensor, path, depth + 1) for i in v)
    if tag == "__float__":
        if v not in ("nan", "inf", "-inf"):
            raise FormatError(f"{path}: bad special float {v!r}")
        return float(v)
    if tag == "__dtype__":
        if _torch is None or v not in TORCH_BY_NAME:
            return v
        return TORCH_BY_NAME[v]
    raise FormatError(f"{path}: unknown tag {tag!r} in the checkpoint document")
