"""QML: quantized training layers whose eight data paths each take a quantizer.

A :class:`Quantizer` maps a tensor to a quantized form and a context (``quantize``) and back
(``dequantize``); calling it does both, which is what a layer applies to a data path. Provided:

- :class:`Identity`: nothing changes.
- :class:`FloatingPointQuantizer` ``(m)``: ``frexp``, keep ``m`` mantissa bits by floor, same
  exponent (QML's mantissa truncation).
- :class:`IntQuantizer` ``(bits)``: per row of dim 0, min-max onto ``0..2^bits-1``, round.
- :class:`TiledQuantizer` ``(dims, q)``: ``q`` applied to each tile of the leading dimensions.
- :class:`CodecQuantizer` ``(codec, packed=True, **params)``: any smaq_rs codec. ``packed=True``
  returns the real packed bytes (a uint8 tensor) and keeps the :class:`~smaq_rs.PackedTensor` in
  the context; ``packed=False`` simulates (compress and decompress at once).

:class:`QLinear` / :class:`QConv2d` are drop-in subclasses of ``nn.Linear`` / ``nn.Conv2d``
whose forward and backward run through one autograd function::

    forward   y  = qy( qx(x) @ qw(w)^T + qb(b) )
    backward  dy_q = qdy(dy);  dx = qdx(dy_q @ w_q)
              dw = qdw( aw(per-group dy_q^T @ x_q) );  db = qdb( ab(per-group sum dy_q) )

(the conv layer the same with ``torch.nn.grad.conv2d_input`` / ``conv2d_weight``). ``aw``/``ab``
are accumulators: :class:`SumAccumulator` (the plain sum, the default) and
:class:`HsumAccumulator`, which emulates data-parallel training on one machine. How the
per-worker gradients are obtained: the batch (dim 0) is cut into consecutive micro-batches of
``samples_per_worker`` samples, one per simulated worker, and each worker's weight and bias
gradient is computed from its own micro-batch inside the same backward pass (one matmul or
``conv2d_weight`` per worker); a custom accumulator asking for ``group_size = 1`` receives true
per-sample gradients. The quantizers and accumulators of a layer are given by a
:class:`PrefixBundle`; :func:`quantize_model` swaps the layers of a model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Type

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import _bridge

__all__ = [
    "Accumulator",
    "CodecContext",
    "CodecQuantizer",
    "FloatingPointQuantizer",
    "HsumAccumulator",
    "Identity",
    "IntQuantizer",
    "PATHS",
    "PrefixBundle",
    "QConv2d",
    "QLinear",
    "QuantizeReport",
    "Quantizer",
    "SumAccumulator",
    "TiledQuantizer",
    "quantize_model",
]

#: The eight quantized data paths of a layer, in the order forward input, its gradient, output,
#: its gradient, weight, its gradient, bias, its gradient.
PATHS: Tuple[str, ...] = ("qx", "qdx", "qy", "qdy", "qw", "qdw", "qb", "qdb")
#: The two accumulators (weight and bias gradients).
ACCUMULATORS: Tuple[str, ...] = ("aw", "ab")


# ================================================================================================
# Quantizers
# ================================================================================================
class Quantizer:
    """Base of every quantizer.

    ``quantize(t)`` returns the quantized representation and a context; ``dequantize(t, ctx)``
    returns a tensor of ``t``'s original shape and dtype from them. ``q(t)`` is
    ``dequantize(*quantize(t))``: the value a layer's data path carries on.
    """

    def quantize(self, t: Tensor) -> Tuple[Tensor, Any]:
        """The quantized form of ``t`` and a context for :meth:`dequantize`."""
        raise NotImplementedError

    def dequantize(self, t: Tensor, ctx: Any) -> Tensor:
        """The tensor ``t`` (from :meth:`quantize`) stands for."""
        raise NotImplementedError

    def __call__(self, t: Tensor) -> Tensor:
        q, ctx = self.quantize(t)
        return self.dequantize(q, ctx)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Identity(Quantizer):
    """Leaves the tensor as it is (a data path without quantization)."""

    def quantize(self, t: Tensor) -> Tuple[Tensor, Any]:
        return t, None

    def dequantize(self, t: Tensor, ctx: Any) -> Tensor:
        return t


def _check_float(t: Any, who: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{who} expects a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{who} expects a floating-point tensor, got dtype {t.dtype}")


class FloatingPointQuantizer(Quantizer):
    """Mantissa truncation: ``frexp`` splits ``x = f * 2^e`` (``|f|`` in [0.5, 1)); the
    significand ``2|f|`` in [1, 2) keeps ``m`` fractional bits by floor (towards zero in
    magnitude), the exponent is unchanged. ``m = 0`` leaves powers of two. Zeros, infinities and
    NaN pass unchanged. The result is exact (no context needed)."""

    def __init__(self, m: int) -> None:
        if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= 52:
            raise ValueError(f"m (mantissa bits kept) must be an int in 0..52, got {m!r}")
        self.m = m

    _BITS = {torch.float32: (torch.int32, 23), torch.float64: (torch.int64, 52),
             torch.float16: (torch.int16, 10), torch.bfloat16: (torch.int16, 7)}

    def quantize(self, t: Tensor) -> Tuple[Tensor, Any]:
        _check_float(t, "FloatingPointQuantizer")
        ibits = self._BITS.get(t.dtype)
        if ibits is not None:
            itype, mbits = ibits
            if self.m >= mbits:
                return t, None
            # normal numbers in sign-magnitude: clearing the low mantissa bits is the floor of
            # the significand, the exponent untouched; subnormals (where frexp renormalizes)
            # take the frexp path below
            mask = ~((1 << (mbits - self.m)) - 1)
            out = (t.view(itype) & mask).view(t.dtype)
            finite = torch.isfinite(t)
            out = torch.where(finite, out, t)
            sub = (t.abs() < torch.finfo(t.dtype).tiny) & (t != 0)
            if bool(sub.any()):
                out = torch.where(sub, self._frexp_path(t), out)
            return out, None
        return self._frexp_path(t), None

    def _frexp_path(self, t: Tensor) -> Tensor:
        mant, exp = torch.frexp(t)
        scale = float(2 ** (self.m + 1))  # 2|f| * 2^m = |f| * 2^(m+1)
        q = torch.floor(mant.abs() * scale) / scale * mant.sign()
        out = torch.ldexp(q, exp.to(t.dtype)).to(t.dtype)
        return torch.where(torch.isfinite(t) & (t != 0), out, t)  # keeps -0.0

    def dequantize(self, t: Tensor, ctx: Any) -> Tensor:
        return t

    def __repr__(self) -> str:
        return f"FloatingPointQuantizer(m={self.m})"


class IntQuantizer(Quantizer):
    """Per row of dim 0 (the whole tensor for a 0-d one): ``q = round((x - min) / (max - min) *
    (2^bits - 1))``, codes held as floats; ``dequantize`` maps them back with the row's
    ``(min, max)``. A row whose values are all equal gets code 0 and decodes exactly. Rows
    holding NaN or Inf are refused (no finite range). As in QML, a 1-D tensor (a bias) has rows
    of one value and comes back unchanged; ``TiledQuantizer([n], q)`` on it, or a
    :class:`CodecQuantizer`, quantizes it in groups."""

    def __init__(self, bits: int) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 24:
            raise ValueError(f"bits must be an int in 1..24, got {bits!r}")
        self.bits = bits
        self.levels = (1 << bits) - 1

    def quantize(self, t: Tensor) -> Tuple[Tensor, Any]:
        _check_float(t, "IntQuantizer")
        if t.numel() == 0:
            return t, None
        rows = t.reshape(t.shape[0], -1) if t.dim() > 0 else t.reshape(1, 1)
        lo = rows.amin(dim=1, keepdim=True)
        hi = rows.amax(dim=1, keepdim=True)
        if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise ValueError("IntQuantizer: a row holds NaN or Inf; min-max needs finite values")
        span = hi - lo
        safe = torch.where(span > 0, span, torch.ones_like(span))
        codes = torch.round((rows - lo) / safe * self.levels)
        codes = torch.where(span > 0, codes, torch.zeros_like(codes))
        return codes.reshape(t.shape), (lo, hi)

    def dequantize(self, t: Tensor, ctx: Any) -> Tensor:
        if ctx is None:
            return t
        lo, hi = ctx
        rows = t.reshape(t.shape[0], -1) if t.dim() > 0 else t.reshape(1, 1)
        return (rows / self.levels * (hi - lo) + lo).reshape(t.shape)

    def __repr__(self) -> str:
        return f"IntQuantizer(bits={self.bits})"


class TiledQuantizer(Quantizer):
    """Applies ``q`` to each tile of the tensor: ``dims = (d0, d1, ...)`` cut the leading
    ``len(dims)`` dimensions into tiles of ``d0 x d1 x ...`` (each must divide its dimension);
    a tile keeps every trailing dimension. Tiles are laid out as the rows of a
    ``(n_tiles, tile_numel)`` matrix for ``q``, so a per-row quantizer (:class:`IntQuantizer`)
    gets one range per tile. ``TiledQuantizer([64], q)`` on a flattened tensor is blockwise
    quantization."""

    def __init__(self, dims: Sequence[int], q: Quantizer) -> None:
        dims = tuple(dims)
        if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                               for d in dims):
            raise ValueError(f"dims must be a non-empty list of positive ints, got {dims!r}")
        if not isinstance(q, Quantizer):
            raise TypeError(f"q must be a Quantizer, got {type(q).__name__}")
        self.dims = dims
        self.q = q

    def _layout(self, shape: Tuple[int, ...]) -> Tuple[List[int], List[int]]:
        k = len(self.dims)
        if len(shape) < k:
            raise ValueError(f"TiledQuantizer with tiles {self.dims} needs a tensor of at least "
                             f"{k} dimensions, got shape {tuple(shape)}")
        split: List[int] = []
        for i, (n, d) in enumerate(zip(shape, self.dims)):
            if n % d:
                raise ValueError(f"TiledQuantizer: dimension {i} of shape {tuple(shape)} is {n}, "
                                 f"not a multiple of the tile size {d}")
            split += [n // d, d]
        split += list(shape[k:])
        # (n0, d0, n1, d1, ..., rest) -> (n0, n1, ..., d0, d1, ..., rest)
        perm = [2 * i for i in range(k)] + [2 * i + 1 for i in range(k)] \
            + list(range(2 * k, len(split)))
        return split, perm

    def quantize(self, t: Tensor) -> Tuple[Tensor, Any]:
        _check_float(t, "TiledQuantizer")
        split, perm = self._layout(tuple(t.shape))
        k = len(self.dims)
        n_tiles = math.prod(split[0:2 * k:2])
        tiles = t.reshape(split).permute(perm).reshape(n_tiles, -1)
        q, ctx = self.q.quantize(tiles)
        return q, (tuple(t.shape), ctx)

    def dequantize(self, t: Tensor, ctx: Any) -> Tensor:
        shape, inner = ctx
        tiles = self.q.dequantize(t, inner)
        split, perm = self._layout(shape)
        permuted = [split[p] for p in perm]
        inverse = [0] * len(perm)
        for i, p in enumerate(perm):
            inverse[p] = i
        return tiles.reshape(permuted).permute(inverse).reshape(shape)

    def __repr__(self) -> str:
        return f"TiledQuantizer(dims={list(self.dims)}, q={self.q!r})"


@dataclasses.dataclass
class CodecContext:
    """What :class:`CodecQuantizer` keeps: the packed tensor (None when simulating), its true
    byte length, and the original shape, dtype and device."""

    packed: Optional[_bridge.PackedTensor]
    nbytes: int
    shape: Tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


_CODEC_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class CodecQuantizer(Quantizer):
    """Any smaq_rs codec as a quantizer: ``CodecQuantizer("int", bits=4, granularity="row")``.

    ``packed=True``: ``quantize`` returns the real packed bytes as a uint8 tensor and a
    :class:`CodecContext` holding the :class:`~smaq_rs.PackedTensor` (``ctx.nbytes`` is their
    length); ``dequantize`` decodes them. ``packed=False`` simulates: ``quantize`` returns the
    decoded values at once (the context still reports the packed size that was measured).

    For ``granularity="row"`` or ``"tile"`` without ``row_size`` the row is dim 0's slice
    (``row_size = numel / shape[0]``), as QML's per-row quantizers. Codecs work on the CPU: a
    tensor elsewhere is copied there and the result brought back. Unknown codec or parameters
    raise :class:`~smaq_rs.CodecError` here, not at the first use.
    """

    def __init__(self, codec: str, packed: bool = True, **params: Any) -> None:
        if not isinstance(codec, str):
            raise TypeError(f"codec must be a codec name (str), got {type(codec).__name__}")
        names = [c["name"] for c in _bridge.registry()]
        if codec not in names:
            raise _bridge.CodecError(f"unknown codec {codec!r}; registered: {', '.join(names)}")
        self.codec = codec
        self.packed = bool(packed)
        self.params = dict(params)
        # validate the parameters once, on a tiny tensor
        probe = dict(self.params)
        if probe.get("granularity") in ("row", "tile") and not probe.get("row_size"):
            probe["row_size"] = 1
        _bridge.compress(torch.zeros(8), codec, **probe)

    def _params_for(self, shape: Tuple[int, ...]) -> Dict[str, Any]:
        p = dict(self.params)
        if p.get("granularity") in ("row", "tile") and not p.get("row_size"):
            p["row_size"] = max(1, math.prod(shape[1:]))
        return p

    def quantize(self, t: Tensor) -> Tuple[Tensor, Any]:
        if not isinstance(t, Tensor):
            raise TypeError(f"CodecQuantizer expects a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _CODEC_DTYPES:
            raise _bridge.DtypeError(f"CodecQuantizer({self.codec!r}) takes float32, float16, "
                                     f"bfloat16 or float64 tensors, got {t.dtype}")
        src = t.detach()
        if src.device.type != "cpu":
            src = src.cpu()
        src = src.contiguous()
        p = _bridge.compress(src, self.codec, **self._params_for(tuple(t.shape)))
        ctx = CodecContext(p if self.packed else None, p.nbytes, tuple(t.shape), t.dtype,
                           t.device)
        if self.packed:
            raw = torch.frombuffer(bytearray(p.to_bytes()), dtype=torch.uint8)
            return raw, ctx
        return self._decoded(p, ctx), ctx

    @staticmethod
    def _decoded(p: _bridge.PackedTensor, ctx: CodecContext) -> Tensor:
        y = _bridge.decompress(p)
        if not isinstance(y, Tensor):
            y = torch.from_numpy(y)
        return y.reshape(ctx.shape).to(device=ctx.device, dtype=ctx.dtype)

    def dequantize(self, t: Tensor, ctx: Any) -> Tensor:
        if not isinstance(ctx, CodecContext):
            raise TypeError("CodecQuantizer.dequantize needs the CodecContext from quantize")
        if ctx.packed is None:
            return t
        return self._decoded(ctx.packed, ctx)

    def __call__(self, t: Tensor) -> Tensor:
        if t.numel() == 0:
            return t
        q, ctx = self.quantize(t)
        return self.dequantize(q, ctx)

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"CodecQuantizer({self.codec!r}, packed={self.packed}{extra})"


# ================================================================================================
# Accumulators
# ================================================================================================
class Accumulator:
    """Sums parameter gradients over the batch.

    ``accumulate(t)`` takes a tensor of shape ``(G, *)`` whose row ``i`` is the gradient of
    ``group_size(N)`` consecutive samples (the last group may hold fewer) and returns their
    accumulated sum, of shape ``*``. ``group_size(N)`` says how many consecutive samples of a
    batch of ``N`` the layer may add up before handing them over: ``1`` asks for per-sample
    gradients, ``N`` for the plain batch gradient.
    """

    def group_size(self, n: int) -> int:
        """Consecutive samples the layer may pre-sum (default: 1, per-sample gradients)."""
        return 1

    def accumulate(self, t: Tensor) -> Tensor:
        """The accumulated gradient of the groups in ``t`` (shape ``t.shape[1:]``)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SumAccumulator(Accumulator):
    """The plain sum (the layer computes the batch gradient in one product)."""

    def group_size(self, n: int) -> int:
        return max(n, 1)

    def accumulate(self, t: Tensor) -> Tensor:
        return t.sum(dim=0)


class HsumAccumulator(Accumulator):
    """Hierarchical sum emulating gradient sharing between workers on one machine.

    ``HsumAccumulator([(samples_per_worker, q1), (n_workers, q2)])``: the gradients of each
    worker's ``samples_per_worker`` consecutive samples are summed (the worker's local gradient)
    and quantized with ``q1``; those are summed and the global sum quantized with ``q2``. In
    general each level ``(k, q)`` sums groups of ``k`` consecutive items of the level below and
    applies ``q`` to each group sum; a last group may be incomplete (a worker with fewer samples).
    A batch larger than the product of the ``k`` is refused; the last level must leave one
    item (its ``k`` covers the rest). Quantizers are :class:`Quantizer` objects (``None`` is
    :class:`Identity`).
    """

    def __init__(self, levels: Sequence[Tuple[int, Optional[Quantizer]]]) -> None:
        levels = list(levels)
        if not levels:
            raise ValueError("HsumAccumulator needs at least one level (size, quantizer)")
        checked: List[Tuple[int, Quantizer]] = []
        for i, lv in enumerate(levels):
            if not (isinstance(lv, (tuple, list)) and len(lv) == 2):
                raise TypeError(f"level {i} must be a (size, quantizer) pair, got {lv!r}")
            k, q = lv
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise ValueError(f"level {i}: size must be a positive int, got {k!r}")
            q = Identity() if q is None else q
            if not isinstance(q, Quantizer):
                raise TypeError(f"level {i}: quantizer must be a Quantizer or None, got "
                                f"{type(q).__name__}")
            checked.append((k, q))
        self.levels = checked
        self.capacity = math.prod(k for k, _ in checked)

    def group_size(self, n: int) -> int:
        return self.levels[0][0]

    def accumulate(self, t: Tensor, group: Optional[int] = None) -> Tensor:
        """``t``: ``(G, *)`` sums of ``group`` consecutive samples (default: the first level's
        size, as the layers hand them over; pass ``group=1`` for per-sample gradients)."""
        group = self.levels[0][0] if group is None else group
        first = self.levels[0][0]
        if first % group:
            raise ValueError(f"rows hold sums of {group} samples, which does not divide the "
                             f"first level's {first}")
        items = t
        sizes = [first // group] + [k for k, _ in self.levels[1:]]
        for (k, q), size in zip(self.levels, sizes):
            items = torch.stack([q(c.sum(dim=0)) for c in torch.split(items, size, dim=0)])
        if items.shape[0] != 1:
            raise ValueError(f"HsumAccumulator: {t.shape[0]} groups of {group} samples exceed "
                             f"the {self.capacity} samples its levels cover "
                             f"({' x '.join(str(k) for k, _ in self.levels)})")
        return items[0]

    def __repr__(self) -> str:
        return f"HsumAccumulator({[(k, q) for k, q in self.levels]!r})"


# ================================================================================================
# Bundles
# ================================================================================================
class PrefixBundle:
    """The quantizers of a layer's eight data paths (``qx qdx qy qdy qw qdw qb qdb``) and its two
    gradient accumulators (``aw ab``).

    ``PrefixBundle(default=IntQuantizer(8), qdw=FloatingPointQuantizer(2), aw=HsumAccumulator(..))``.
    A path not named takes ``default`` when ``default`` is of its kind (a Quantizer for the
    paths, an Accumulator for ``aw``/``ab``); otherwise :class:`Identity` /
    :class:`SumAccumulator`. Keys may also be set as attributes (``bundle.qx = q``). Any other key
    is refused with a ValueError naming the valid ones; a value of the wrong kind with a
    TypeError.
    """

    KEYS: Tuple[str, ...] = PATHS + ACCUMULATORS

    def __init__(self, default: Any = None, **paths: Any) -> None:
        object.__setattr__(self, "_values", {})
        self.default = default
        for k, v in paths.items():
            setattr(self, k, v)

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "default":
            if value is not None and not isinstance(value, (Quantizer, Accumulator)):
                raise TypeError(f"default must be a Quantizer or an Accumulator, got "
                                f"{type(value).__name__}")
        elif key not in self.KEYS:
            raise ValueError(f"{key!r} is not a data path of a QML layer; valid keys: "
                             f"default, {', '.join(self.KEYS)}")
        elif value is not None:
            kind = Quantizer if key in PATHS else Accumulator
            if not isinstance(value, kind):
                raise TypeError(f"{key} takes a {kind.__name__}, got {type(value).__name__}")
        self._values[key] = value

    def __getattr__(self, key: str) -> Any:
        values = object.__getattribute__(self, "_values")
        if key == "default":
            return values.get("default")
        if key not in PrefixBundle.KEYS:
            raise AttributeError(key)
        return self.get(key)

    def get(self, key: str) -> Any:
        """The quantizer or accumulator used for ``key`` (the default or the neutral one when
        not set)."""
        if key not in self.KEYS:
            raise ValueError(f"{key!r} is not a data path of a QML layer; valid keys: "
                             f"{', '.join(self.KEYS)}")
        v = self._values.get(key)
        if v is not None:
            return v
        d = self._values.get("default")
        if key in PATHS:
            return d if isinstance(d, Quantizer) else Identity()
        return d if isinstance(d, Accumulator) else SumAccumulator()

    def resolved(self) -> Dict[str, Any]:
        """Every key with what it resolves to."""
        return {k: self.get(k) for k in self.KEYS}

    def merged(self, other: Optional["PrefixBundle"]) -> "PrefixBundle":
        """This bundle with ``other``'s explicit keys and default added (as QML's separate
        quantizer and accumulator bundles): ``other``'s default fills the kind this bundle's
        default does not."""
        if other is None:
            return self
        if not isinstance(other, PrefixBundle):
            raise TypeError(f"expected a PrefixBundle, got {type(other).__name__}")
        out = PrefixBundle()
        out._values.update({k: v for k, v in self._values.items() if k != "default"})
        out._values.update({k: v for k, v in other._values.items()
                            if k != "default" and v is not None})
        q_def = [d for d in (self.default, other.default) if isinstance(d, Quantizer)]
        a_def = [d for d in (self.default, other.default) if isinstance(d, Accumulator)]
        for k in self.KEYS:
            if out._values.get(k) is None:
                pool = q_def if k in PATHS else a_def
                if pool:
                    out._values[k] = pool[0]
        return out

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={v!r}" for k, v in self._values.items() if v is not None)
        return f"PrefixBundle({items})"


def _as_bundle(bundle: Any, accumulators: Any = None) -> PrefixBundle:
    if bundle is None:
        bundle = PrefixBundle()
    elif isinstance(bundle, (Quantizer, Accumulator)):
        bundle = PrefixBundle(default=bundle)
    elif isinstance(bundle, dict):
        bundle = PrefixBundle(**bundle)
    elif not isinstance(bundle, PrefixBundle):
        raise TypeError(f"bundle must be a PrefixBundle, a dict of paths, a Quantizer or None; "
                        f"got {type(bundle).__name__}")
    if accumulators is not None:
        bundle = bundle.merged(_as_bundle(accumulators))
    return bundle


# ================================================================================================
# The autograd functions
# ================================================================================================
def _groups(n: int, acc: Accumulator) -> int:
    g = int(acc.group_size(n))
    if g < 1:
        raise ValueError(f"{acc!r}.group_size returned {g}, expected >= 1")
    return g


def _accumulate(acc: Accumulator, parts: List[Tensor]) -> Tensor:
    return acc.accumulate(torch.stack(parts))


class _QLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Optional[Tensor], b_: Dict[str, Any]) -> Tensor:
        xq = b_["qx"](x)
        wq = b_["qw"](w)
        bq = b_["qb"](b) if b is not None else None
        y = b_["qy"](F.linear(xq, wq, bq))
        ctx.save_for_backward(xq, wq)
        ctx.bundle = b_
        ctx.has_bias = b is not None
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        xq, wq = ctx.saved_tensors
        b_ = ctx.bundle
        dyq = b_["qdy"](dy)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = b_["qdx"](dyq.matmul(wq))
        out_f, in_f = wq.shape
        n = xq.shape[0] if xq.dim() > 1 else 1
        if ctx.needs_input_grad[1]:
            g = _groups(n, b_["aw"])
            if g >= n or xq.dim() == 1:
                x2, d2 = xq.reshape(-1, in_f), dyq.reshape(-1, out_f)
                parts = [d2.t().mm(x2)]
            else:
                parts = [dc.reshape(-1, out_f).t().mm(xc.reshape(-1, in_f))
                         for xc, dc in zip(torch.split(xq, g), torch.split(dyq, g))]
            dw = b_["qdw"](_accumulate(b_["aw"], parts))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            g = _groups(n, b_["ab"])
            if g >= n or xq.dim() == 1:
                parts = [dyq.reshape(-1, out_f).sum(0)]
            else:
                parts = [dc.reshape(-1, out_f).sum(0) for dc in torch.split(dyq, g)]
            db = b_["qdb"](_accumulate(b_["ab"], parts))
        return dx, dw, db, None


def _conv_bias_grad(x: Tensor, w: Tensor, dy: Tensor, conf: Tuple[Any, Any, Any, int]) -> Tensor:
    """The bias gradient as torch's convolution backward computes it (same summation order)."""
    stride, padding, dilation, groups = conf
    return torch.ops.aten.convolution_backward(
        dy, x, w, [w.shape[0]], list(stride), list(padding), list(dilation), False, [0, 0],
        groups, [False, False, True])[2]


class _QConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Optional[Tensor], b_: Dict[str, Any],
                conf: Tuple[Any, Any, Any, int]) -> Tensor:
        stride, padding, dilation, groups = conf
        xq = b_["qx"](x)
        wq = b_["qw"](w)
        bq = b_["qb"](b) if b is not None else None
        y = b_["qy"](F.conv2d(xq, wq, bq, stride, padding, dilation, groups))
        ctx.save_for_backward(xq, wq)
        ctx.bundle, ctx.conf, ctx.has_bias = b_, conf, b is not None
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        xq, wq = ctx.saved_tensors
        b_ = ctx.bundle
        stride, padding, dilation, groups = ctx.conf
        dyq = b_["qdy"](dy)
        dx = dw = db = None
        batched = xq.dim() == 4
        n = xq.shape[0] if batched else 1
        if ctx.needs_input_grad[0]:
            dx = b_["qdx"](torch.nn.grad.conv2d_input(
                xq.shape, wq, dyq, stride, padding, dilation, groups))
        if ctx.needs_input_grad[1]:
            g = _groups(n, b_["aw"])
            if g >= n or not batched:
                pairs = [(xq, dyq)]
            else:
                pairs = list(zip(torch.split(xq, g), torch.split(dyq, g)))
            parts = [torch.nn.grad.conv2d_weight(xc, wq.shape, dc, stride, padding, dilation,
                                                 groups) for xc, dc in pairs]
            dw = b_["qdw"](_accumulate(b_["aw"], parts))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            g = _groups(n, b_["ab"])
            if g >= n or not batched:
                pairs = [(xq, dyq)]
            else:
                pairs = list(zip(torch.split(xq, g), torch.split(dyq, g)))
            parts = [_conv_bias_grad(xc, wq, dc, ctx.conf) for xc, dc in pairs]
            db = b_["qdb"](_accumulate(b_["ab"], parts))
        return dx, dw, db, None, None


# ================================================================================================
# Layers
# ================================================================================================
class _QMixin:
    bundle: PrefixBundle

    def _paths(self) -> Dict[str, Any]:
        return self.bundle.resolved()

    def extra_repr(self) -> str:  # type: ignore[override]
        return super().extra_repr() + f", bundle={self.bundle!r}"  # type: ignore[misc]


class QLinear(_QMixin, nn.Linear):
    """``nn.Linear`` whose eight data paths and two gradient accumulators come from a
    :class:`PrefixBundle` (see the module doc for where each applies). With the default bundle
    (all :class:`Identity`, :class:`SumAccumulator`) it computes what ``nn.Linear`` computes."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 bundle: Any = None, accumulators: Any = None, device: Any = None,
                 dtype: Any = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.bundle = _as_bundle(bundle, accumulators)

    @classmethod
    def from_float(cls, module: nn.Linear, bundle: Any = None,
                   accumulators: Any = None) -> "QLinear":
        """A QLinear sharing ``module``'s weight and bias Parameters (no copy)."""
        if not isinstance(module, nn.Linear):
            raise TypeError(f"QLinear.from_float takes an nn.Linear, got {type(module).__name__}")
        q = cls(module.in_features, module.out_features, module.bias is not None, bundle,
                accumulators, device="meta")
        q.weight = module.weight
        q.bias = module.bias
        q.train(module.training)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return _QLinearFn.apply(x, self.weight, self.bias, self._paths())


def _explicit_padding(padding: Any, kernel: Tuple[int, int],
                      dilation: Tuple[int, int]) -> Tuple[int, int]:
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0)
        total = [d * (k - 1) for k, d in zip(kernel, dilation)]
        if any(t % 2 for t in total):
            raise ValueError(f"padding='same' with kernel {kernel} and dilation {dilation} pads "
                             "unevenly; QConv2d supports even total padding only")
        return (total[0] // 2, total[1] // 2)
    return tuple(padding)  # type: ignore[return-value]


class QConv2d(_QMixin, nn.Conv2d):
    """``nn.Conv2d`` (zero padding; any stride, padding, dilation, groups) with QML's eight
    data paths and two gradient accumulators from a :class:`PrefixBundle`; backward uses
    ``torch.nn.grad.conv2d_input`` / ``conv2d_weight``. Other padding modes are refused."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros", bundle: Any = None, accumulators: Any = None,
                 device: Any = None, dtype: Any = None) -> None:
        if padding_mode != "zeros":
            raise ValueError(f"QConv2d supports padding_mode='zeros' only, got {padding_mode!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device=device, dtype=dtype)
        self._pad = _explicit_padding(self.padding, self.kernel_size, self.dilation)
        self.bundle = _as_bundle(bundle, accumulators)

    @classmethod
    def from_float(cls, module: nn.Conv2d, bundle: Any = None,
                   accumulators: Any = None) -> "QConv2d":
        """A QConv2d sharing ``module``'s weight and bias Parameters (no copy)."""
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"QConv2d.from_float takes an nn.Conv2d, got {type(module).__name__}")
        q = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                module.padding, module.dilation, module.groups, module.bias is not None,
                module.padding_mode, bundle, accumulators, device="meta")
        q.weight = module.weight
        q.bias = module.bias
        q.train(module.training)
        return q

    def forward(self, x: Tensor) -> Tensor:
        conf = (self.stride, self._pad, self.dilation, self.groups)
        if x.dim() == 3:  # unbatched input, as nn.Conv2d takes it
            return _QConv2dFn.apply(x.unsqueeze(0), self.weight, self.bias, self._paths(),
                                    conf).squeeze(0)
        return _QConv2dFn.apply(x, self.weight, self.bias, self._paths(), conf)


# ================================================================================================
# Swapping the layers of a model
# ================================================================================================
_SWAPS: Dict[Type[nn.Module], Type[nn.Module]] = {nn.Linear: QLinear, nn.Conv2d: QConv2d}


@dataclasses.dataclass
class QuantizeReport:
    """What :func:`quantize_model` did: the swapped layers' names and the modules with
    parameters it left alone, with the reason."""

    swapped: List[str]
    left: List[Tuple[str, str, str]]  # (name, type, reason)

    def __str__(self) -> str:
        lines = [f"swapped {len(self.swapped)} layer(s): {', '.join(self.swapped) or '-'}"]
        for name, typ, why in self.left:
            lines.append(f"left alone: {name} ({typ}): {why}")
        return "\n".join(lines)


def quantize_model(model: nn.Module, bundle: Any = None, accumulators: Any = None,
                   layer_types: Iterable[Type[nn.Module]] = (nn.Linear, nn.Conv2d),
                   ) -> QuantizeReport:
    """Replaces, in place, every module of exactly type ``nn.Linear`` / ``nn.Conv2d`` (those in
    ``layer_types``) by its QML layer built with ``from_float`` (the Parameters are shared, so an
    optimizer made before still holds them). Subclasses (their forward may differ, e.g. the
    projection ``nn.MultiheadAttention`` reads directly), convolutions with a padding mode
    other than zeros or an uneven 'same' padding, and every other module holding parameters are
    left alone and listed with the reason. Returns a :class:`QuantizeReport`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    types = tuple(layer_types)
    for t in types:
        if t not in _SWAPS:
            raise ValueError(f"cannot quantize layer type {getattr(t, '__name__', t)!r}; "
                             f"QML layers exist for: {', '.join(k.__name__ for k in _SWAPS)}")
    bundle = _as_bundle(bundle, accumulators)
    swapped: List[str] = []
    left: List[Tuple[str, str, str]] = []
    for name, mod in list(model.named_modules()):
        if isinstance(mod, (QLinear, QConv2d)):
            continue
        for child_name, child in list(mod.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) in types:
                try:
                    new = _SWAPS[type(child)].from_float(child, bundle)  # type: ignore[attr-defined]
                except ValueError as e:
                    left.append((full, type(child).__name__, str(e)))
                    continue
                setattr(mod, child_name, new)
                swapped.append(full)
            elif isinstance(child, (QLinear, QConv2d)):
                continue
            elif any(True for _ in child.parameters(recurse=False)):
                if isinstance(child, tuple(_SWAPS)):
                    why = (f"subclass of {[k.__name__ for k in _SWAPS if isinstance(child, k)][0]}"
                           " whose forward may differ" if any(isinstance(child, k) for k in types)
                           else "type not in layer_types")
                else:
                    why = "no QML layer for this type (only Linear and Conv2d)"
                left.append((full, type(child).__name__, why))
    if any(True for _ in model.parameters(recurse=False)):
        left.append(("", type(model).__name__, "the model itself holds parameters; "
                     "use QLinear.from_float / QConv2d.from_float on a single layer"))
    return QuantizeReport(swapped, left)
