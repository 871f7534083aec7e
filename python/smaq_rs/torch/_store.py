"""Packed storage of one torch tensor, shared by the activation hooks and the optimizers.

A :class:`Stored` holds a tensor as real bytes: the codec's packed record of its values, and,
where zeros matter, a 1-bit map of which elements are non-zero (``np.packbits``) with only the
non-zero values packed. Zeros then decode to exactly 0 whatever the codec does with them, and a
ReLU output (half zeros) costs about 1 + 6.63/2 bits per value instead of 6.63. Every size it
reports is the length of a real buffer.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from .. import _bridge
from .._bridge import DtypeError, PackedTensor

#: Float dtypes the codecs accept.
CODEC_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

#: With a codec that keeps exact zeros, the zero map is used only when at least this fraction of
#: the elements are zero (1 bit per element pays for itself from about 1/6.63 = 15% zeros).
SPARSE_FRACTION = 0.15


def _freeze(params: Dict[str, Any]) -> Tuple[Tuple[str, Any], ...]:
    return tuple(sorted(params.items()))


@functools.lru_cache(maxsize=None)
def _keeps_zeros(codec: str, frozen: Tuple[Tuple[str, Any], ...]) -> bool:
    return _bridge.registry_keeps_zeros(codec, dict(frozen))


def codec_keeps_zeros(codec: str, params: Dict[str, Any]) -> bool:
    """Whether ``codec`` with ``params`` decodes an exact 0 to exactly 0: the core registry's
    answer, asked once per codec and parameters (the seed aside) and cached."""
    return _keeps_zeros(codec, _freeze({k: v for k, v in params.items() if k != "seed"}))


class Stored:
    """One tensor held as packed bytes (see the module doc)."""

    __slots__ = ("packed", "mask", "zidx", "range", "stats", "shape", "dtype", "numel",
                 "__weakref__")

    def __init__(self, packed: Optional[PackedTensor], mask: Optional[np.ndarray],
                 shape: Tuple[int, ...], dtype: torch.dtype,
                 zidx: Optional[np.ndarray] = None, range: Optional[np.ndarray] = None,
                 stats: Optional[np.ndarray] = None):
        self.packed = packed
        self.mask = mask
        self.zidx = zidx
        # [min, max] of the packed values (float64): decoded values are clamped into it, so a
        # small positive value of a non-negative tensor (a ReLU output) never decodes <= 0.
        self.range = range
        # [mean, std, settled] (float64) of the packed values in the codec's domain, exact,
        # where the fused Adam step gathered them; settled (1.0 or 0.0): they moved within the
        # one pass's tolerance since the step before. Once settled, the next step codes its new
        # state with them and checks them afterwards (one pass over the state instead of two).
        # None: not known.
        self.stats = stats
        self.shape = tuple(shape)
        self.dtype = dtype
        n = 1
        for s in self.shape:
            n *= s
        self.numel = n

    @property
    def nbytes(self) -> int:
        """Bytes actually held: packed record plus zero map or zero index list."""
        return ((self.packed.nbytes if self.packed is not None else 0)
                + (self.mask.nbytes if self.mask is not None else 0)
                + (self.zidx.nbytes if self.zidx is not None else 0)
                + (self.range.nbytes if self.range is not None else 0)
                + (self.stats.nbytes if self.stats is not None else 0))

    @property
    def dense_nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    # -- serialization (torch.save(..., weights_only=True) compatible) -------------------------
    def to_state(self) -> Dict[str, torch.Tensor]:
        d: Dict[str, torch.Tensor] = {}
        if self.packed is not None:
            raw = np.frombuffer(self.packed.to_bytes(), dtype=np.uint8).copy()
            d["smaq_packed"] = torch.from_numpy(raw)
        if self.mask is not None:
            d["smaq_mask"] = torch.from_numpy(self.mask.copy())
        if self.zidx is not None:
            d["smaq_zidx"] = torch.from_numpy(self.zidx.copy())
        if self.range is not None:
            d["smaq_range"] = torch.from_numpy(self.range.copy())
        if self.stats is not None:
            d["smaq_stats"] = torch.from_numpy(self.stats.copy())
        return d

    @classmethod
    def from_state(cls, d: Dict[str, torch.Tensor], shape, dtype) -> "Stored":
        packed = None
        if "smaq_packed" in d:
            raw = d["smaq_packed"].detach().cpu().contiguous().numpy()
            packed = PackedTensor.from_bytes(raw.tobytes(), kind="torch")
        mask = d["smaq_mask"].detach().cpu().numpy().copy() if "smaq_mask" in d else None
        zidx = d["smaq_zidx"].detach().cpu().numpy().copy() if "smaq_zidx" in d else None
        rng = d["smaq_range"].detach().cpu().numpy().astype(np.float64) \
            if "smaq_range" in d else None
        if rng is not None and rng.shape != (2,):
            raise DtypeError(f"value range must hold 2 numbers, not {rng.shape}")
        stats = d["smaq_stats"].detach().cpu().numpy().astype(np.float64) \
            if "smaq_stats" in d else None
        if stats is not None and stats.shape != (3,):
            raise DtypeError(f"statistics must hold 3 numbers (mean, std, settled), not "
                             f"{stats.shape}")
        s = cls(packed, mask, shape, dtype, zidx, rng, stats)
        if packed is not None and mask is None and packed.numel != s.numel:
            raise DtypeError(f"packed state holds {packed.numel} values, the parameter "
                             f"has {s.numel}")
        if mask is not None and mask.size != (s.numel + 7) // 8:
            raise DtypeError(f"zero map holds {mask.size} bytes, the parameter needs "
                             f"{(s.numel + 7) // 8}")
        if zidx is not None and zidx.size and (zidx.min() < 0 or zidx.max() >= s.numel):
            raise DtypeError("zero index list points outside the parameter")
        return s

    def __repr__(self) -> str:
        return (f"Stored(shape={self.shape}, dtype={self.dtype}, nbytes={self.nbytes}, "
                f"dense_nbytes={self.dense_nbytes}, zero_map={self.mask is not None})")


def is_stored_state(v: Any) -> bool:
    return isinstance(v, dict) and ("smaq_packed" in v or "smaq_mask" in v)


def encode(t: torch.Tensor, codec: str, params: Dict[str, Any], zeros: str = "auto") -> Stored:
    """Packs a float tensor (any device; read, never modified).

    zeros: "auto" uses the zero map where needed for exactness (codec loses zeros and the tensor
    has some) or where it saves bytes (>= SPARSE_FRACTION zeros); "never" relies on the codec.
    The counting, the map and the packing are one Rust call (src/zmap.rs).
    """
    if t.dtype not in CODEC_DTYPES:
        raise DtypeError(f"cannot pack a tensor of dtype {t.dtype}")
    if zeros not in ("auto", "never"):
        raise ValueError(f"zeros must be 'auto' or 'never', not {zeros!r}")
    src = t.detach()
    if src.device.type != "cpu":
        src = src.cpu()
    if not src.is_contiguous():
        src = src.contiguous()
    arr, name = _bridge.torch_as_numpy(src, "tensor")
    if zeros == "auto":
        keeps, fraction = codec_keeps_zeros(codec, params), SPARSE_FRACTION
    else:
        keeps, fraction = True, float("inf")
    core, mask, zidx, rng = _bridge.store_encode(arr, codec, params, keeps, fraction, name)
    if zidx is not None:
        zidx = zidx.astype(np.int32 if src.numel() < 2**31 else np.int64)
    return Stored(None if core is None else _bridge.pack(core), mask, src.shape,
                  src.dtype, zidx, None if rng is None else np.array(rng, dtype=np.float64))


def decode(s: Stored, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Decodes into a new CPU tensor, or into ``out`` (CPU, contiguous, right dtype/shape)."""
    if out is None:
        out = torch.empty(s.shape, dtype=s.dtype)
    elif out.dtype != s.dtype or tuple(out.shape) != s.shape:
        raise DtypeError(f"out is {out.dtype} {tuple(out.shape)}, the stored tensor is "
                         f"{s.dtype} {s.shape}")
    view, name = _bridge.torch_as_numpy(out, "out")
    zidx = None if s.zidx is None else np.ascontiguousarray(s.zidx, dtype=np.int64)
    rng = None if s.range is None else (float(s.range[0]), float(s.range[1]))
    _bridge.store_decode(_bridge.core_of(s.packed), s.mask, zidx, rng, view, name)
    return out


def roundtrip(t: torch.Tensor, codec: str, params: Dict[str, Any]) -> torch.Tensor:
    """compress then decompress (simulation as in the paper); same device, dtype and shape."""
    if t.dtype not in CODEC_DTYPES or t.numel() == 0:
        return t
    y = decode(encode(t, codec, params))
    return y.to(t.device) if t.device.type != "cpu" else y
