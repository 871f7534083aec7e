"""Checkpoints on disk: ``save``, ``load`` and ``open`` for state dicts and optimizer states.

The file is a smaq_rs checkpoint container (docs/FORMAT.md, "Checkpoint container"): a bounded,
checksummed header naming every tensor, 8-byte-aligned payloads, and a JSON document holding
everything that is not a tensor (nested dicts/lists, step counters, param_groups, user metadata).
Nothing is pickled. Writes go to a temporary file in the same directory, are fsynced and renamed
over the target, so a crash never damages an existing checkpoint.

>>> import torch, smaq_rs
>>> sd = torch.nn.Linear(256, 256).state_dict()
>>> smaq_rs.save(sd, "/tmp/m.smaq")                      # lossy SmaQ 6/8 for large float tensors
>>> back = smaq_rs.load("/tmp/m.smaq")
>>> with smaq_rs.open("/tmp/m.smaq") as ck:              # lazy: reads only what is asked for
...     w = ck["weight"]
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np

from . import _core
from ._core import FormatError, SmaqError

try:  # torch is optional: NumPy arrays can be saved without it.
    import torch as _torch
except ImportError:  # pragma: no cover - exercised only where torch is absent
    _torch = None

__all__ = ["Policy", "Checkpoint", "save", "load", "open"]

PathLike = Union[str, "os.PathLike[str]"]
CodecSpec = Union[None, str, Tuple[str, Dict[str, Any]]]

_DOC_FORMAT = "smaq_rs.checkpoint"
_DOC_VERSION = 1
_FLOATS = ("float32", "float16", "bfloat16", "float64")
_BATCH_BYTES = 256 << 20


def _torch_dtypes() -> Dict[str, Any]:
    names = [
        "float32", "float16", "bfloat16", "float64", "bool", "uint8", "int8", "int16", "int32",
        "int64", "uint16", "uint32", "uint64", "complex64", "complex128", "float8_e4m3fn",
        "float8_e5m2",
    ]
    return {n: getattr(_torch, n) for n in names if hasattr(_torch, n)}


_TORCH_BY_NAME = _torch_dtypes() if _torch is not None else {}
_NAME_BY_TORCH = {v: k for k, v in _TORCH_BY_NAME.items()}
_NUMPY_OK = {
    "float32", "float16", "float64", "bool", "uint8", "int8", "int16", "int32", "int64",
    "uint16", "uint32", "uint64", "complex64", "complex128",
}


# -- policy ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Policy:
    """Chooses how each tensor is stored.

    Large floating tensors (``numel >= min_numel``) get ``codec`` with ``params``; everything else
    is stored exactly: floats with the ``lossless`` codec (raw when under ``exact_min_bytes``),
    integers and bools as zstd of the raw bytes (raw when under ``exact_min_bytes``). Names that
    match one of ``exact`` (fnmatch patterns, lower-cased) are stored exactly whatever their size:
    by default norm layers' weights and buffers. ``rules`` are (pattern, codec, params) tried first,
    in order; codec may be "exact". Names matching ``positive`` get ``all_positive=True`` under
    SmaQ (Adam's exp_avg_sq).
    """

    codec: str = "smaq"
    params: Dict[str, Any] = field(default_factory=lambda: {"bits_main": 6, "bits_outlier": 8})
    min_numel: int = 4096
    exact: Tuple[str, ...] = (
        "*norm*", "*bn*", "*.ln_*", "*ln_f*", "*running_mean", "*running_var",
        "*num_batches_tracked",
    )
    positive: Tuple[str, ...] = ("*exp_avg_sq", "*exp_avg_sq.*", "*max_exp_avg_sq*")
    rules: Tuple[Tuple[str, str, Dict[str, Any]], ...] = ()
    exact_min_bytes: int = 4096

    @classmethod
    def lossless(cls) -> "Policy":
        """Every float tensor lossless (bit-exact), integers zstd."""
        return cls(codec="lossless", params={}, min_numel=0, exact=())

    @classmethod
    def raw(cls) -> "Policy":
        """No compression at all (still checksummed, still no pickle)."""
        return cls(codec="raw", params={}, min_numel=0, exact=(), exact_min_bytes=1 << 62)

    def _exact(self, dtype: str, nbytes: int) -> Tuple[str, Dict[str, Any]]:
        if nbytes < self.exact_min_bytes:
            return "raw", {}
        if dtype in _FLOATS:
            return "lossless", {}
        return "zstd", {}

    def choose(self, name: str, dtype: str, shape: Tuple[int, ...]) -> Tuple[str, Dict[str, Any]]:
        numel = math.prod(shape)
        nbytes = numel * _itemsize(dtype)
        low = name.lower()
        for pattern, codec, params in self.rules:
            if fnmatch.fnmatchcase(low, pattern.lower()):
                if codec == "exact":
                    return self._exact(dtype, nbytes)
                if codec in ("raw", "zstd") or dtype in _FLOATS:
                    return codec, dict(params)
        if (
            self.codec == "raw"
            or dtype not in _FLOATS
            or numel < self.min_numel
            or any(fnmatch.fnmatchcase(low, p) for p in self.exact)
        ):
            if self.codec == "raw":
                return "raw", {}
            return self._exact(dtype, nbytes)
        params = dict(self.params)
        if self.codec == "smaq" and any(fnmatch.fnmatchcase(low, p) for p in self.positive):
            params.setdefault("all_positive", True)
        return self.codec, params


def _itemsize(dtype: str) -> int:
    if dtype in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        return 1 if dtype.startswith("float8") else 2
    return np.dtype(dtype).itemsize


def _resolve_policy(codec: Optional[str], policy: Any, params: Dict[str, Any]) -> Callable:
    if policy is None:
        if codec in (None, "smaq"):
            base = Policy()
            policy = replace(base, params={**base.params, **params}) if params else base
        elif codec == "lossless":
            policy = Policy.lossless()
        elif codec == "raw":
            policy = Policy.raw()
        else:
            policy = Policy(codec=codec, params=dict(params))
    elif codec is not None or params:
        raise SmaqError("pass either policy= or codec=/codec parameters, not both")
    if isinstance(policy, Policy):
        return policy.choose
    if callable(policy):
        fallback = Policy()

        def choose(name: str, dtype: str, shape: Tuple[int, ...]):
            spec = policy(name, dtype, shape)
            if spec is None:
                return fallback.choose(name, dtype, shape)
            if isinstance(spec, str):
                return spec, {}
            return spec[0], dict(spec[1])

        return choose
    raise SmaqError(f"policy must be a smaq_rs.Policy or a callable, got {type(policy).__name__}")


# -- flattening ----------------------------------------------------------------------------------
class _Tensor:
    """A tensor found while flattening: its entry name and raw little-endian bytes."""

    __slots__ = ("name", "dtype", "shape", "raw", "kind")

    def __init__(self, name, dtype, shape, raw, kind):
        self.name, self.dtype, self.shape, self.raw, self.kind = name, dtype, shape, raw, kind


def _torch_raw(t, where: str):
    if t.layout != _torch.strided:
        raise SmaqError(f"{where}: {t.layout} tensors cannot be saved; convert with .to_dense()")
    if t.device.type == "meta":
        raise SmaqError(f"{where}: a meta tensor has no data to save")
    name = _NAME_BY_TORCH.get(t.dtype)
    if name is None:
        raise _core.DtypeError(f"{where}: dtype {t.dtype} cannot be stored")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.resolve_conj().resolve_neg().contiguous()  # a non-contiguous tensor is copied here
    raw = t.reshape(-1).view(_torch.uint8).numpy()
    return name, tuple(t.shape), raw


def _numpy_raw(a: np.ndarray, where: str):
    name = a.dtype.name
    if name not in _NUMPY_OK or a.dtype.byteorder == ">":
        raise _core.DtypeError(f"{where}: NumPy dtype {a.dtype} cannot be stored")
    a = np.ascontiguousarray(a)
    return name, tuple(a.shape), a.reshape(-1).view(np.uint8)


def _identity(x) -> Tuple:
    if _torch is not None and isinstance(x, _torch.Tensor):
        if x.layout != _torch.strided or x.device.type == "meta":
            return ("obj", id(x))
        return ("t", x.device.type, x.data_ptr(), x.dtype, tuple(x.shape), tuple(x.stride()))
    ai = x.__array_interface__
    return ("n", ai["data"][0], x.dtype.str, x.shape, x.strides)


class _Flattener:
    def __init__(self):
        self.tensors: List[_Tensor] = []
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
        self.tensors.append(_Tensor(name, dtype, shape, raw, kind))
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


# -- save ----------------------------------------------------------------------------------------
def save(
    obj: Any,
    path: PathLike,
    codec: Optional[str] = None,
    policy: Any = None,
    *,
    metadata: Optional[Dict[str, Any]] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    **params: Any,
) -> Dict[str, Any]:
    """Saves a state dict, an optimizer state dict or any nesting of dicts/lists of tensors.

    ``codec``: "smaq" (default: lossy SmaQ 6/8 for large float tensors, exact for the rest),
    "lossless" (every tensor bit-exact), "raw", or any registered codec (its ``params`` as keyword
    arguments). ``policy``: a :class:`Policy`, or a callable ``(name, dtype, shape)`` returning
    a codec name, ``(codec, params)``, or None for the default choice. ``metadata``: JSON-able
    user data, returned by ``open(path).metadata``. ``progress(done_bytes, total_bytes)`` is
    called after each batch. Returns a summary: file bytes, dense bytes and per-entry sizes.
    """
    choose = _resolve_policy(codec, policy, params)
    flat = _Flattener()
    root = flat.walk(obj, "")
    doc = {
        "format": _DOC_FORMAT,
        "version": _DOC_VERSION,
        "root": root,
        "kinds": {t.name: t.kind for t in flat.tensors},
        "metadata": flat.walk(metadata, "metadata") if metadata is not None else None,
    }
    if doc["metadata"] is not None and len(doc["kinds"]) != len(flat.tensors):
        raise SmaqError("metadata must not contain tensors")
    text = json.dumps(doc, allow_nan=False, separators=(",", ":"))
    specs = []
    for t in flat.tensors:
        c, p = choose(t.name, t.dtype, t.shape)
        if c in ("raw", "zstd", "lossless", "exact") or t.dtype in _FLOATS:
            if c == "exact":
                c, p = Policy()._exact(t.dtype, t.raw.nbytes)
            specs.append((t.name, t.dtype, list(t.shape), c, p or None))
        else:
            specs.append((t.name, t.dtype, list(t.shape), "zstd", None))
    path = os.fspath(path)
    writer = _core.CheckpointWriter(path, specs, text)
    total = sum(t.raw.nbytes for t in flat.tensors)
    done = 0
    sizes: List[int] = []
    try:
        batch: List[np.ndarray] = []
        batch_bytes = 0
        for t in flat.tensors:
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
        writer.finish()
        if progress is not None:
            progress(done, total)
    except BaseException:
        writer.abort()
        raise
    return {
        "path": path,
        "nbytes": os.path.getsize(path),
        "dense_nbytes": total,
        "entries": {t.name: (s, t.raw.nbytes, spec[3]) for t, s, spec in zip(flat.tensors, sizes,
                                                                               specs)},
    }


# -- load / open ---------------------------------------------------------------------------------
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
        try:
            doc = json.loads(self._r.json)
        except (ValueError, RecursionError) as e:
            raise FormatError(f"{self.path}: the checkpoint's JSON document is invalid: {e}")
        if (
            not isinstance(doc, dict)
            or doc.get("format") != _DOC_FORMAT
            or not isinstance(doc.get("kinds"), dict)
        ):
            raise FormatError(f"{self.path}: the JSON document is not a smaq_rs checkpoint's")
        if doc.get("version") != _DOC_VERSION:
            raise FormatError(f"{self.path}: checkpoint document version {doc.get('version')!r} "
                              f"is not supported (this build reads {_DOC_VERSION})")
        self._doc = doc
        self._entries = {e["name"]: e for e in self._r.entries()}
        for name, kind in doc["kinds"].items():
            if name not in self._entries or kind not in ("torch", "numpy"):
                raise FormatError(f"{self.path}: the JSON document names an unknown entry "
                                  f"{name!r} or kind {kind!r}")
            if kind == "torch" and _torch is None:
                kind = "numpy"

    # Mapping
    def __getitem__(self, name: str):
        if name not in self._entries:
            raise KeyError(name)
        return self._make(name, self._r.read(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._r = None  # the file is closed when the reader is dropped

    def __repr__(self) -> str:
        return f"Checkpoint({self.path!r}, entries={len(self._entries)})"

    @property
    def metadata(self) -> Any:
        m = self._doc.get("metadata")
        return None if m is None else self._rebuild(m, {})

    @property
    def nbytes(self) -> int:
        return self._r.file_nbytes

    def entries(self) -> List[Dict[str, Any]]:
        """Per entry: name, dtype, shape, codec, nbytes (stored), dense_nbytes, ratio, offset."""
        out = []
        for e in self._entries.values():
            e = dict(e, shape=tuple(e["shape"]))
            e["ratio"] = e["dense_nbytes"] / e["nbytes"] if e["nbytes"] else float("nan")
            out.append(e)
        return out

    def codec_info(self, name: str) -> Tuple[Optional[Dict], Optional[Dict]]:
        """(params, encoder statistics) of a packed entry; (None, None) for raw/zstd ones."""
        return self._r.codec_info(name)

    def _make(self, name: str, buf: np.ndarray):
        e = self._entries[name]
        dtype, shape = e["dtype"], tuple(e["shape"])
        raw = buf.view(np.uint8)[: e["dense_nbytes"]]
        if self._doc["kinds"].get(name) == "torch" and _torch is not None:
            t = _torch.from_numpy(raw).view(_TORCH_BY_NAME[dtype]).reshape(shape)
            return _to_location(t, self._map)
        if dtype not in _NUMPY_OK:
            raise _core.DtypeError(f"entry {name!r} is {dtype}; load it with torch installed")
        return raw.view(np.dtype(dtype)).reshape(shape)

    def _rebuild(self, x: Any, tensors: Dict[str, Any]) -> Any:
        try:
            return self._build(x, tensors, 0)
        except (KeyError, TypeError, ValueError, IndexError, RecursionError) as e:
            if isinstance(e, SmaqError):
                raise
            raise FormatError(f"{self.path}: malformed checkpoint document: {e!r}") from None

    def _build(self, x: Any, tensors: Dict[str, Any], depth: int) -> Any:
        if depth > 400:
            raise FormatError(f"{self.path}: checkpoint document nested too deeply")
        if isinstance(x, list):
            return [self._build(v, tensors, depth + 1) for v in x]
        if not isinstance(x, dict):
            return x
        if len(x) != 1:
            raise FormatError(f"{self.path}: unexpected object {list(x)[:4]} in the document")
        (tag, v), = x.items()
        if tag == "__tensor__":
            if v not in tensors:
                if v not in self._entries:
                    raise FormatError(f"{self.path}: the document names a missing entry {v!r}")
                tensors[v] = self[v]
            return tensors[v]
        if tag == "__dict__":
            out = {}
            for k, val in v:
                k = self._build(k, tensors, depth + 1)
                out[k] = self._build(val, tensors, depth + 1)
            return out
        if tag == "__tuple__":
            return tuple(self._build(i, tensors, depth + 1) for i in v)
        if tag == "__float__":
            if v not in ("nan", "inf", "-inf"):
                raise FormatError(f"{self.path}: bad special float {v!r}")
            return float(v)
        if tag == "__dtype__":
            if _torch is None or v not in _TORCH_BY_NAME:
                return v
            return _TORCH_BY_NAME[v]
        raise FormatError(f"{self.path}: unknown tag {tag!r} in the checkpoint document")

    def load(self) -> Any:
        """The whole saved object, every entry decoded (in parallel)."""
        names = list(self._entries)
        bufs = self._r.read_many(names)
        tensors = {n: self._make(n, b) for n, b in zip(names, bufs)}
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
