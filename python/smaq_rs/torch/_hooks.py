"""Real compressed activations: saved-tensor hooks that keep what autograd saves as packed bytes."""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import Any, Dict, Iterable, Optional, Tuple

import numpy as np
import torch

from . import _store


def _is_compiling() -> bool:
    try:
        return bool(torch.compiler.is_compiling())
    except Exception:  # pragma: no cover - very old torch
        return False


class _Bits:
    """A bool tensor as 1 bit per element."""

    __slots__ = ("bits", "shape", "device", "__weakref__")

    def __init__(self, t: torch.Tensor):
        src = t.detach()
        self.device = src.device
        self.shape = tuple(src.shape)
        self.bits = np.packbits(src.cpu().contiguous().reshape(-1).numpy(), bitorder="little")

    @property
    def nbytes(self) -> int:
        return self.bits.nbytes

    def unpack(self) -> torch.Tensor:
        n = 1
        for s in self.shape:
            n *= s
        b = np.unpackbits(self.bits, count=n, bitorder="little").view(np.bool_)
        return torch.from_numpy(b).reshape(self.shape).to(self.device)


class _Narrow:
    """An integer tensor stored losslessly in the narrowest integer type that holds its values
    (max-pool indices: int64 -> uint8/int16)."""

    __slots__ = ("arr", "dtype", "device", "__weakref__")

    def __init__(self, arr: np.ndarray, dtype: torch.dtype, device):
        self.arr, self.dtype, self.device = arr, dtype, device

    @staticmethod
    def make(t: torch.Tensor):
        src = t.detach().cpu().contiguous()
        lo, hi = int(src.min()), int(src.max())
        for nt in (np.uint8, np.int8, np.int16, np.int32):
            info = np.iinfo(nt)
            if info.min <= lo and hi <= info.max and np.dtype(nt).itemsize < t.element_size():
                return _Narrow(src.numpy().astype(nt), t.dtype, t.device)
        return None

    @property
    def nbytes(self) -> int:
        return self.arr.nbytes

    def unpack(self) -> torch.Tensor:
        return torch.from_numpy(self.arr).to(device=self.device, dtype=self.dtype)


class _Handle:
    """What the autograd graph holds instead of a saved tensor."""

    __slots__ = ("store", "perm", "device", "dense", "held", "owner", "__weakref__")

    def __init__(self, store, perm, device, dense: int, owner: "compressed_activations"):
        self.store = store
        self.perm = perm
        self.device = device
        self.dense = dense
        self.held = store.nbytes
        self.owner = owner
        owner._add(dense, self.held)

    def unpack(self) -> torch.Tensor:
        if isinstance(self.store, _Passthrough):
            return self.store.t
        if isinstance(self.store, (_Bits, _Narrow)):
            return self.store.unpack()
        t = _store.decode(self.store)
        if self.perm is not None:
            inv = [0] * len(self.perm)
            for i, d in enumerate(self.perm):
                inv[d] = i
            t = t.permute(inv)
        if self.device.type != "cpu":
            t = t.to(self.device)
        return t

    def __del__(self):
        owner = self.owner
        if owner is not None:
            owner._add(-self.dense, -self.held)


class compressed_activations(torch.autograd.graph.saved_tensors_hooks):
    """Stores the tensors autograd saves for backward as packed bytes, decoded when needed.

    >>> with smaq_rs.torch.compressed_activations():
    ...     loss = model(x).square().mean()
    >>> loss.backward()

    Rules (PyTorch's own constraints, and what saves memory):

    - parameters (leaf tensors that require grad), views of them, and any tensor sharing storage
      with ``model``'s parameters or buffers pass through untouched: they stay in memory anyway;
    - tensors with fewer than ``min_numel`` elements pass through;
    - integer tensors (max-pool indices) are kept exactly, in the narrowest integer type that
      holds their values when ``narrow_ints`` (int64 indices of a 2x2 pool fit in uint8);
    - bool tensors (dropout masks) are stored as 1 bit per element when ``bool_bits``;
    - float16 / bfloat16 / float32 / float64 tensors are packed with ``codec`` and ``params``
      (SmaQ with nearest rounding unless ``rounding`` is given); zeros always come back as
      exactly 0 (see ``_store``), so ReLU masks stay right;
    - a tensor saved several times (same storage, offset, shape, strides and version, object
      still alive) is packed once; unpack may run any number of times (``retain_graph``);
      the tensor given to pack is never modified; unpacked tensors have the original strides
      for dense permuted layouts (channels_last) and are contiguous otherwise;
    - ``codec=None`` stores nothing compressed but counts the saved bytes (for a baseline).

    Counters (bytes, real buffers): ``dense_bytes`` and ``held_bytes`` of what is saved now
    (pass-through activations count in both), ``peak_dense_bytes`` / ``peak_held_bytes`` since
    the last :meth:`reset_peak`, ``n_packed`` / ``n_passthrough`` tensors.

    Under ``torch.compile`` saved tensors live inside the compiled graph and these hooks cannot
    reach them: a warning says so. Double backward (``create_graph=True``) works with the decoded
    (approximate) values.
    """

    def __init__(self, codec: Optional[str] = "smaq", min_numel: int = 4096,
                 model: Optional[torch.nn.Module] = None, bool_bits: bool = True,
                 narrow_ints: bool = True, **params: Any):
        if min_numel < 0:
            raise ValueError("min_numel must be >= 0")
        self.codec = codec
        self.params: Dict[str, Any] = dict(params)
        if codec == "smaq":
            # A saved tensor is decoded for one backward, not re-coded step after step as
            # optimizer state is: nearest rounding's error, half of stochastic rounding's in
            # variance, is what counts, and runs repeat bit for bit.
            self.params.setdefault("rounding", "nearest")
        self.min_numel = int(min_numel)
        self.bool_bits = bool_bits
        self.narrow_ints = narrow_ints
        self._lock = threading.RLock()  # __del__ of a handle may run inside _add (GC)
        self._exclude: set = set()
        if model is not None:
            self.exclude(model.parameters())
            self.exclude(model.buffers())
        self._cache: Dict[Tuple, Tuple[weakref.ref, weakref.ref]] = {}
        self.dense_bytes = 0
        self.held_bytes = 0
        self.peak_dense_bytes = 0
        self.peak_held_bytes = 0
        self.n_packed = 0
        self.n_passthrough = 0
        self._warned_compile = False
        if codec is not None:
            # Fail at construction, not inside backward, on a bad codec or parameter.
            _store.roundtrip(torch.arange(1.0, 65.0), codec, self.params)
        super().__init__(self._pack, self._unpack)

    # -- configuration ------------------------------------------------------------------------
    def exclude(self, tensors: Iterable[torch.Tensor]) -> None:
        """Never pack tensors sharing storage with these (e.g. a model's buffers)."""
        for t in tensors:
            self._exclude.add(t.untyped_storage().data_ptr())

    def reset_peak(self) -> None:
        with self._lock:
            self.peak_dense_bytes = self.dense_bytes
            self.peak_held_bytes = self.held_bytes

    def __enter__(self):
        if _is_compiling():
            self._warn_compile()
        return super().__enter__()

    # -- bookkeeping --------------------------------------------------------------------------
    def _add(self, dense: int, held: int) -> None:
        with self._lock:
            self.dense_bytes += dense
            self.held_bytes += held
            if self.dense_bytes > self.peak_dense_bytes:
                self.peak_dense_bytes = self.dense_bytes
            if self.held_bytes > self.peak_held_bytes:
                self.peak_held_bytes = self.held_bytes

    def _warn_compile(self) -> None:
        if not self._warned_compile:
            self._warned_compile = True
            warnings.warn(
                "smaq_rs.torch.compressed_activations cannot compress the tensors saved inside "
                "a torch.compile'd region (they live in the compiled graph); run the model "
                "eagerly to save memory", RuntimeWarning, stacklevel=3)

    def _is_weight(self, t: torch.Tensor) -> bool:
        if t.is_leaf and t.requires_grad:
            return True
        base = t._base
        if base is not None and base.is_leaf and base.requires_grad:
            return True
        return bool(self._exclude) and t.untyped_storage().data_ptr() in self._exclude

    # -- the hooks ----------------------------------------------------------------------------
    def _pack(self, t: torch.Tensor):
        if _is_compiling():
            self._warn_compile()
            return t
        if t.layout != torch.strided or self._is_weight(t):
            return t
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               tuple(t.stride()), t.dtype, t._version, str(t.device))
        hit = self._cache.get(key)
        if hit is not None:
            tref, href = hit
            h = href()
            if h is not None and tref() is t:
                return h
        dense = t.numel() * t.element_size()
        narrow = None
        if (self.narrow_ints and self.codec is not None and t.numel() >= self.min_numel
                and t.dtype in (torch.int64, torch.int32, torch.int16)):
            narrow = _Narrow.make(t)
        if narrow is not None:
            self.n_packed += 1
            h = _Handle(narrow, None, t.device, dense, self)
        elif self.codec is None or t.numel() < self.min_numel or (
                t.dtype not in _store.CODEC_DTYPES
                and not (self.bool_bits and t.dtype == torch.bool)):
            self.n_passthrough += 1
            h = _Handle(_Passthrough(t), None, t.device, dense, self)
        elif t.dtype == torch.bool:
            self.n_packed += 1
            h = _Handle(_Bits(t), None, t.device, dense, self)
        else:
            src, perm = t, None
            if not t.is_contiguous():
                order = sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))
                p = t.permute(order)
                if p.is_contiguous():
                    src, perm = p, order
            self.n_packed += 1
            h = _Handle(_store.encode(src, self.codec, self.params), perm, t.device, dense, self)
        if len(self._cache) > 4096:
            self._cache = {k: v for k, v in self._cache.items()
                           if v[0]() is not None and v[1]() is not None}
        self._cache[key] = (weakref.ref(t), weakref.ref(h))
        return h

    def _unpack(self, h):
        if isinstance(h, _Handle):
            return h.unpack()
        return h


class _Passthrough:
    """A saved tensor kept as it is (counted in both dense and held bytes)."""

    __slots__ = ("t",)

    def __init__(self, t: torch.Tensor):
        self.t = t

    @property
    def nbytes(self) -> int:
        t = self.t
        return t.numel() * t.element_size()

