"""Post-training quantization (QDQ) with weights stored as real packed bytes.

``quantize(model, mode="static", calib=loader, bits=8)`` returns a model whose Linear / Conv
layers hold their weight as the packed bytes of a smaq_rs codec (by default ``int``: symmetric
absmax, one scale per output channel, ``bits`` per value) in a uint8 buffer ``weight_packed``
that is part of ``state_dict`` (so ``torch.save`` / ``torch.load(weights_only=True)`` and
``smaq_rs.save`` keep exactly those bytes). The dense weight is no longer held.

How it runs: each quantized layer **decodes its weight on the fly at every forward** (no int8
kernels are used; the matmul / convolution is torch's float one), and fake-quantizes its input
activation (quantize -> dequantize, per tensor, affine, ``act_bits`` bits, a range that always
holds 0):

- ``mode="dynamic"``: the range is the input's own min / max at run time.
- ``mode="static"``: the range is fixed from calibration. Observers watch each layer's input
  while the calibration batches run through the model (weights already quantized, activations
  not yet): ``"minmax"`` (extremes), ``"ema"`` (moving average of per-batch extremes, 0.01),
  ``"percentile"`` (the ``percentile`` and ``100 - percentile`` quantiles of a sample of up to
  2^20 values) or ``"mse"`` (the scaling of the min-max range, among 64 candidates, that gives
  the smallest squared QDQ error on that sample). The ranges live in the ``act_range`` buffer.

Quantized layer types: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (any padding mode) and transformers'
``Conv1D`` (GPT-2; its weight is in x out and is packed transposed, one scale per output
feature). Everything else that holds parameters (embeddings, norms, subclasses whose forward
may read the weight elsewhere, layers whose weight is tied to another module) stays in float and
is listed, with the reason, by :func:`report`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import _bridge

__all__ = ["LayerReport", "OBSERVERS", "PTQConv", "PTQLinear", "format_report", "quantize",
           "report"]

#: Activation range observers of static mode.
OBSERVERS = ("minmax", "ema", "percentile", "mse")
_SAMPLE_CAP = 1 << 20
_PER_BATCH = 1 << 16


def _qdq(x: Tensor, lo: float, hi: float, bits: int) -> Tensor:
    """Per-tensor affine fake quantization onto 0..2^bits-1 of the range [lo, hi] widened to
    hold 0 (so 0 stays exact)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    levels = (1 << bits) - 1
    if not hi > lo or not math.isfinite(hi - lo):
        return x
    scale = (hi - lo) / levels
    zp = int(min(max(round(-lo / scale), 0), levels))
    return torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, levels)


# ================================================================================================
# Observers
# ================================================================================================
class _Observer:
    def __init__(self, kind: str, bits: int, percentile: float, gen: torch.Generator):
        self.kind, self.bits, self.percentile, self.gen = kind, bits, percentile, gen
        self.lo, self.hi = math.inf, -math.inf
        self.samples: List[Tensor] = []
        self.batches = 0

    def observe(self, x: Tensor) -> None:
        v = x.detach().float().reshape(-1)
        v = v[torch.isfinite(v)]
        if v.numel() == 0:
            return
        lo, hi = v.min().item(), v.max().item()
        if self.kind == "ema" and self.batches:
            self.lo += 0.01 * (lo - self.lo)
            self.hi += 0.01 * (hi - self.hi)
        else:
            self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        self.batches += 1
        if self.kind in ("percentile", "mse"):
            if v.numel() > _PER_BATCH:
                idx = torch.randint(0, v.numel(), (_PER_BATCH,), generator=self.gen)
                v = v[idx.to(v.device)]
            self.samples.append(v.cpu())
            total = sum(s.numel() for s in self.samples)
            if total > _SAMPLE_CAP:
                allv = torch.cat(self.samples)
                keep = torch.randperm(allv.numel(), generator=self.gen)[:_SAMPLE_CAP]
                self.samples = [allv[keep]]

    def range(self) -> Tuple[float, float]:
        if not self.batches:
            raise ValueError("an observer saw no finite activation during calibration")
        if self.kind in ("minmax", "ema"):
            return self.lo, self.hi
        s = torch.cat(self.samples)
        if self.kind == "percentile":
            p = self.percentile / 100.0
            qs = torch.quantile(s.double(), torch.tensor([1.0 - p, p], dtype=torch.float64))
            return float(qs[0]), float(qs[1])
        best, best_err = (self.lo, self.hi), math.inf
        for a in np.linspace(1.0 / 64, 1.0, 64):
            lo, hi = a * self.lo, a * self.hi
            err = (_qdq(s, lo, hi, self.bits) - s).pow(2).mean().item()
            if err < best_err:
                best, best_err = (lo, hi), err
        return best


# ================================================================================================
# Quantized layers
# ================================================================================================
def _pack(w2d: Tensor, codec: str, params: Dict[str, Any]) -> Tuple[Tensor, Tensor]:
    """Packs a (out, in) weight; returns (uint8 bytes, decoded weight)."""
    p = _bridge.compress(w2d.detach().float().cpu().contiguous(), codec, **params)
    raw = torch.frombuffer(bytearray(p.to_bytes()), dtype=torch.uint8)
    dec = _bridge.decompress(p)
    if not isinstance(dec, Tensor):
        dec = torch.from_numpy(np.asarray(dec))
    return raw, dec.reshape(w2d.shape)


class _PTQBase(nn.Module):
    """Common part: the packed weight buffer, the float bias, the activation range."""

    weight_packed: Tensor
    act_range: Tensor

    def _setup(self, w2d: Tensor, bias: Optional[Tensor], codec: str, params: Dict[str, Any],
               mode: str, act_bits: int, bits: Optional[int]) -> None:
        raw, dec = _pack(w2d, codec, params)
        self.register_buffer("weight_packed", raw)
        self.register_buffer("act_range", torch.tensor([math.nan, math.nan]))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                           requires_grad=False)
        self.weight_dtype = w2d.dtype
        self.codec, self.codec_params, self.bits = codec, dict(params), bits
        self.mode, self.act_bits = mode, act_bits
        self.observer: Optional[_Observer] = None
        ref = w2d.detach().double().cpu()
        err = (dec.double() - ref)
        self.weight_error = {
            "rel_rms": float(err.norm() / ref.norm()) if ref.norm() > 0 else float(err.norm()),
            "max_abs": float(err.abs().max()) if err.numel() else 0.0,
        }
        self.dense_nbytes = w2d.numel() * w2d.element_size()

    @property
    def stored_nbytes(self) -> int:
        """True byte length of the packed weight."""
        return self.weight_packed.numel()

    def _weight2d(self, like: Tensor) -> Tensor:
        raw = self.weight_packed.detach().cpu().contiguous().numpy()
        dec = _bridge.decompress(memoryview(raw))
        if not isinstance(dec, Tensor):
            dec = torch.from_numpy(np.asarray(dec))
        return dec.to(device=like.device, dtype=like.dtype)

    def _act(self, x: Tensor) -> Tensor:
        if self.observer is not None:  # calibrating: watch, do not quantize
            self.observer.observe(x)
            return x
        if self.mode == "dynamic":
            v = x.detach()
            return _qdq(x, float(v.min()), float(v.max()), self.act_bits) if v.numel() else x
        lo, hi = float(self.act_range[0]), float(self.act_range[1])
        if math.isnan(lo):
            raise RuntimeError("static PTQ layer has no calibrated activation range "
                               "(load a state_dict holding act_range, or calibrate)")
        return _qdq(x, lo, hi, self.act_bits)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "weight_packed"
        if key in state_dict:
            v = state_dict[key]
            if not isinstance(v, Tensor) or v.dtype != torch.uint8 or v.dim() != 1:
                error_msgs.append(f"{key}: expected a 1-D uint8 tensor of packed bytes, got "
                                  f"{getattr(v, 'dtype', type(v).__name__)}")
            else:
                try:
                    p = _bridge.PackedTensor.from_bytes(bytes(v.cpu().numpy()))
                except _bridge.SmaqError as e:
                    error_msgs.append(f"{key}: not a valid packed weight: {e}")
                else:
                    if p.numel != self.weight_numel:
                        error_msgs.append(f"{key}: packed weight holds {p.numel} values, the "
                                          f"layer needs {self.weight_numel}")
                    else:
                        self.weight_packed = torch.empty_like(v, device=self.weight_packed.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class PTQLinear(_PTQBase):
    """A Linear (or transformers ``Conv1D``, ``transposed=True``) with a packed weight."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], codec: str, params: Dict[str, Any],
                 mode: str, act_bits: int, bits: Optional[int], transposed: bool = False):
        super().__init__()
        w2d = weight.t() if transposed else weight  # (out, in)
        self.out_features, self.in_features = w2d.shape
        self.weight_numel = w2d.numel()
        self.transposed = transposed
        self._setup(w2d.contiguous(), bias, codec, params, mode, act_bits, bits)

    def forward(self, x: Tensor) -> Tensor:
        x = self._act(x)
        w = self._weight2d(x).reshape(self.out_features, self.in_features)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"codec={self.codec}, bits={self.bits}, mode={self.mode}, "
                f"stored={self.stored_nbytes} B of {self.dense_nbytes} B")


class PTQConv(_PTQBase):
    """An ``nn.Conv1d/2d/3d`` with a packed weight (one scale per output channel)."""

    _FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

    def __init__(self, conv: nn.modules.conv._ConvNd, codec: str, params: Dict[str, Any],
                 mode: str, act_bits: int, bits: Optional[int]):
        super().__init__()
        self.nd = len(conv.kernel_size)
        self.weight_shape = tuple(conv.weight.shape)
        self.weight_numel = conv.weight.numel()
        self.stride, self.padding = conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.padding_mode = conv.padding_mode
        self._rpad = list(conv._reversed_padding_repeated_twice)
        w2d = conv.weight.reshape(conv.weight.shape[0], -1)
        self._setup(w2d.contiguous(), conv.bias, codec, params, mode, act_bits, bits)

    def forward(self, x: Tensor) -> Tensor:
        x = self._act(x)
        w = self._weight2d(x).reshape(self.weight_shape)
        b = None if self.bias is None else self.bias.to(x.dtype)
        fn = self._FN[self.nd]
        if self.padding_mode != "zeros":
            x = F.pad(x, self._rpad, mode=self.padding_mode)
            return fn(x, w, b, self.stride, 0, self.dilation, self.groups)
        return fn(x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"weight={self.weight_shape}, stride={self.stride}, padding={self.padding}, "
                f"codec={self.codec}, bits={self.bits}, mode={self.mode}, "
                f"stored={self.stored_nbytes} B of {self.dense_nbytes} B")


def _hf_conv1d() -> Optional[type]:
    mod = sys.modules.get("transformers.pytorch_utils")
    return getattr(mod, "Conv1D", None) if mod is not None else None


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


# ================================================================================================
# quantize / report
# ================================================================================================
def _run_batch(model: nn.Module, batch: Any) -> None:
    if isinstance(batch, Tensor):
        model(batch)
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        model(batch[0])
    elif isinstance(batch, dict):
        model(**batch)
    else:
        raise TypeError("a calibration batch must be a tensor, a tuple/list whose first item is "
                        f"the input tensor, or a dict of keyword inputs; got {type(batch).__name__}"
                        " (pass forward=callable(model, batch) for anything else)")


def quantize(model: nn.Module, mode: str = "dynamic", calib: Optional[Iterable[Any]] = None,
             weight_codec: str = "int", bits: int = 8, per: str = "channel",
             observer: str = "minmax", act_bits: int = 8, percentile: float = 99.99,
             weight_params: Optional[Dict[str, Any]] = None,
             forward: Optional[Callable[[nn.Module, Any], Any]] = None,
             inplace: bool = False) -> nn.Module:
    """Post-training quantization (see the module doc). Returns the quantized model (a deep
    copy unless ``inplace``), in eval mode.

    ``weight_codec="int"`` packs symmetric absmax ``bits``-bit codes, one scale per output
    channel (``per="channel"``) or per tensor (``per="tensor"``); another smaq_rs codec name
    packs with ``weight_params`` (``bits``/``per`` then do not apply). ``calib``: an iterable of
    batches (a tensor, a tuple/list whose first item is the input, or a dict of keyword inputs;
    or any batch with ``forward(model, batch)``), required by and only by ``mode="static"``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if mode not in ("dynamic", "static"):
        raise ValueError(f"mode must be 'dynamic' or 'static', got {mode!r}")
    if mode == "static" and calib is None:
        raise ValueError("mode='static' needs a calibration loader: quantize(model, "
                         "mode='static', calib=<iterable of batches>); or use mode='dynamic'")
    if mode == "dynamic" and calib is not None:
        raise ValueError("calib is used by mode='static' only; mode='dynamic' takes each "
                         "activation's own range at run time")
    if observer not in OBSERVERS:
        raise ValueError(f"observer must be one of {', '.join(OBSERVERS)}; got {observer!r}")
    if per not in ("channel", "tensor"):
        raise ValueError(f"per must be 'channel' or 'tensor', got {per!r}")
    if isinstance(act_bits, bool) or not isinstance(act_bits, int) or not 2 <= act_bits <= 16:
        raise ValueError(f"act_bits must be an int in 2..16, got {act_bits!r}")
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile!r}")
    names = [c["name"] for c in _bridge.registry()]
    if weight_codec not in names:
        raise _bridge.CodecError(f"unknown weight_codec {weight_codec!r}; registered: "
                                 f"{', '.join(names)}")
    if weight_codec == "int":
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
            raise ValueError(f"bits must be an int in 2..16 for weight_codec='int', got {bits!r}")
        base = {"bits": bits, "scheme": "absmax", **(weight_params or {})}
        wbits: Optional[int] = bits
    else:
        base, wbits = dict(weight_params or {}), None

    m = model if inplace else copy.deepcopy(model)
    m.eval()
    conv1d_hf = _hf_conv1d()
    # parameters held by more than one module (tied weights) stay in float
    owners: Dict[int, List[str]] = {}
    for name, mod in m.named_modules(remove_duplicate=False):
        for _, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append(name or "<model>")

    left: List[Tuple[str, str, str]] = []
    done: List[str] = []
    targets: List[Tuple[nn.Module, str, str, nn.Module]] = []
    for name, mod in m.named_modules():
        for child_name, child in mod.named_children():
            full = f"{name}.{child_name}" if name else child_name
            t = type(child)
            ok = t is nn.Linear or t in _CONVS or (conv1d_hf is not None and t is conv1d_hf)
            if ok:
                w = child.weight
                if len(set(owners.get(id(w), []))) > 1:
                    others = sorted(set(owners[id(w)]) - {full})
                    left.append((full, t.__name__, f"weight tied to {', '.join(others)} "
                                                   "(kept float)"))
                    continue
                if not w.is_floating_point():
                    left.append((full, t.__name__, f"weight dtype {w.dtype} is not float"))
                    continue
                targets.append((mod, child_name, full, child))
            elif any(True for _ in child.parameters(recurse=False)):
                if isinstance(child, (nn.Linear,) + _CONVS):
                    why = f"subclass {t.__name__} (its weight may be read outside forward)"
                elif isinstance(child, nn.modules.conv._ConvNd):
                    why = "transposed convolution not supported"
                else:
                    why = "no PTQ layer for this type"
                left.append((full, t.__name__, why))
    if any(True for _ in m.parameters(recurse=False)):
        left.append(("<model>", type(m).__name__, "parameters held by the model itself"))

    for parent, child_name, full, child in targets:
        if isinstance(child, _CONVS):
            w = child.weight
            params = dict(base)
            if weight_codec == "int":
                params.update(granularity="row" if per == "channel" else "tensor",
                              row_size=int(math.prod(w.shape[1:])) if per == "channel" else 0)
            new: nn.Module = PTQConv(child, weight_codec, params, mode, act_bits, wbits)
        else:
            transposed = not isinstance(child, nn.Linear)
            w2d = child.weight.t() if transposed else child.weight
            params = dict(base)
            if weight_codec == "int":
                params.update(granularity="row" if per == "channel" else "tensor",
                              row_size=int(w2d.shape[1]) if per == "channel" else 0)
            new = PTQLinear(child.weight, child.bias, weight_codec, params, mode, act_bits,
                            wbits, transposed=transposed)
        new.to(child.weight.device)
        setattr(parent, child_name, new)
        done.append(full)

    m.__dict__["_smaq_ptq_left"] = left
    if mode == "static":
        gen = torch.Generator().manual_seed(0)
        layers = [mod for mod in m.modules() if isinstance(mod, _PTQBase)]
        for layer in layers:
            layer.observer = _Observer(observer, act_bits, percentile, gen)
        seen = 0
        try:
            with torch.no_grad():
                for batch in calib:  # type: ignore[union-attr]
                    (forward or _run_batch)(m, batch)
                    seen += 1
            if seen == 0:
                raise ValueError("the calibration loader gave no batch")
            for layer in layers:
                if layer.observer.batches == 0:
                    raise ValueError(f"layer {_name_of(m, layer)} saw no input during "
                                     "calibration (is it used by forward?)")
                lo, hi = layer.observer.range()
                layer.act_range = torch.tensor([lo, hi], dtype=torch.float32,
                                               device=layer.act_range.device)
        finally:
            for layer in layers:
                layer.observer = None
    return m


def _name_of(model: nn.Module, target: nn.Module) -> str:
    for n, mod in model.named_modules():
        if mod is target:
            return n
    return "?"


@dataclasses.dataclass
class LayerReport:
    """One row of :func:`report`: a quantized layer (``bits`` None for a non-int codec) or one
    left in float (``reason`` set; ``stored_nbytes`` = its float parameter bytes)."""

    name: str
    type: str
    bits: Optional[int]
    codec: str
    stored_nbytes: int
    dense_nbytes: int
    rel_rms_error: Optional[float]
    max_abs_error: Optional[float]
    act_range: Optional[Tuple[float, float]]
    reason: str = ""

    @property
    def ratio(self) -> float:
        return self.dense_nbytes / self.stored_nbytes if self.stored_nbytes else float("nan")


def report(model: nn.Module) -> List[LayerReport]:
    """Per layer: bits, codec, stored (packed) weight bytes vs dense bytes, weight error
    (relative RMS and max abs, when known: measured at quantization, not kept in the
    state_dict), the static activation range; then the layers left in float and why."""
    rows: List[LayerReport] = []
    for name, mod in model.named_modules():
        if isinstance(mod, _PTQBase):
            err = getattr(mod, "weight_error", None)
            rng = None
            if mod.mode == "static" and not math.isnan(float(mod.act_range[0])):
                rng = (float(mod.act_range[0]), float(mod.act_range[1]))
            rows.append(LayerReport(
                name, type(mod).__name__ + (" (Conv1D)" if getattr(mod, "transposed", False)
                                            else ""),
                mod.bits, mod.codec, mod.stored_nbytes, mod.dense_nbytes,
                None if err is None else err["rel_rms"], None if err is None else err["max_abs"],
                rng))
    mods = dict(model.named_modules())
    for name, typ, why in model.__dict__.get("_smaq_ptq_left", []):
        mod = mods.get(name, model if name == "<model>" else None)
        nb = sum(p.numel() * p.element_size() for p in mod.parameters(recurse=False)) \
            if mod is not None else 0
        rows.append(LayerReport(name, typ, None, "float", nb, nb, None, None, None, why))
    return rows


def format_report(rows: List[LayerReport]) -> str:
    """A plain-text table of :func:`report`'s rows with totals."""
    head = f"{'layer':<28} {'type':<18} {'bits':>4} {'stored B':>10} {'dense B':>10} " \
           f"{'ratio':>6} {'rel rms err':>11}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        err = "-" if r.rel_rms_error is None else f"{r.rel_rms_error:.2e}"
        note = r.reason or ("" if r.act_range is None
                            else f"act [{r.act_range[0]:.3g}, {r.act_range[1]:.3g}]")
        lines.append(f"{r.name:<28} {r.type:<18} {r.bits if r.bits else '-':>4} "
                     f"{r.stored_nbytes:>10} {r.dense_nbytes:>10} {r.ratio:>6.2f} {err:>11}  "
                     f"{note}")
    q = [r for r in rows if not r.reason]
    if q:
        st, de = sum(r.stored_nbytes for r in q), sum(r.dense_nbytes for r in q)
        lines.append(f"quantized weights: {st} B stored, {de} B dense ({de / st:.2f}x)")
    return "\n".join(lines)
