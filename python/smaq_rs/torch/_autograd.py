"""Simulation mode, as in the SmaQ paper: compress and immediately decompress.

This changes the values exactly as storing them packed would, so it is the tool to study
accuracy; it saves NO memory (the decoded tensor is as large as the original). For real savings
use :class:`smaq_rs.torch.compressed_activations` and the optimizers of ``smaq_rs.torch.optim``.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Sequence, Tuple, Type, Union

import torch
from torch import nn

from . import _store

#: Layer groups that ``wrap_model(layer_types=...)`` accepts by name.
LAYER_GROUPS: Dict[str, Tuple[Type[nn.Module], ...]] = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
             nn.ConvTranspose3d),
    "linear": (nn.Linear, nn.Bilinear),
    "norm": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
             nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
    "pool": (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
             nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
             nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d),
    "activation": (nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ReLU6),
}


class Compressor(torch.autograd.Function):
    """y = decompress(compress(x)) in forward; the incoming gradient likewise in backward.

    ``Compressor.apply(x, codec, params, forward, backward, log)``: ``forward`` / ``backward``
    switch each direction; ``log`` (optional callable ``log(tag, dense_nbytes, packed_nbytes)``)
    receives the real sizes of each packed tensor under tags "feature_maps" / "gradient_maps".
    Simulation only: no memory is saved.
    """

    @staticmethod
    def forward(ctx, x, codec: str, params: Dict[str, Any], forward: bool = True,
                backward: bool = True, log=None):
        ctx.codec, ctx.params, ctx.backward, ctx.log = codec, params, backward, log
        if not forward or x.dtype not in _store.CODEC_DTYPES or x.numel() == 0:
            return x.view_as(x)
        return _sim(x, codec, params, log, "feature_maps")

    @staticmethod
    def backward(ctx, g):
        if ctx.backward and g is not None and g.dtype in _store.CODEC_DTYPES and g.numel():
            g = _sim(g, ctx.codec, ctx.params, ctx.log, "gradient_maps")
        return g, None, None, None, None, None


def _sim(x: torch.Tensor, codec: str, params: Dict[str, Any], log, tag: str) -> torch.Tensor:
    s = _store.encode(x, codec, params)
    if log is not None:
        log(tag, s.dense_nbytes, s.nbytes)
    y = _store.decode(s)
    return y.to(x.device) if x.device.type != "cpu" else y


def _resolve(layer_types: Union[str, Type[nn.Module], Sequence[Union[str, Type[nn.Module]]]]
             ) -> Tuple[Type[nn.Module], ...]:
    if isinstance(layer_types, (str, type)):
        layer_types = [layer_types]
    out: List[Type[nn.Module]] = []
    for lt in layer_types:
        if isinstance(lt, str):
            if lt not in LAYER_GROUPS:
                raise ValueError(f"unknown layer type {lt!r}; expected one of "
                                 f"{sorted(LAYER_GROUPS)} or nn.Module subclasses")
            out.extend(LAYER_GROUPS[lt])
        elif isinstance(lt, type) and issubclass(lt, nn.Module):
            out.append(lt)
        else:
            raise ValueError(f"layer_types entries must be names or nn.Module classes, "
                             f"not {lt!r}")
    return tuple(out)


def wrap_model(model: nn.Module, codec: str = "smaq",
               layer_types: Union[str, Type[nn.Module], Iterable[Any]] = ("conv", "linear"),
               forward: bool = True, backward: bool = True, meter=None,
               **params: Any) -> nn.Module:
    """Inserts :class:`Compressor` after every submodule of ``layer_types`` (forward hooks).

    Simulation mode as in the paper (values change as if stored packed, no memory is saved).
    ``layer_types``: names from ``LAYER_GROUPS`` ("conv", "linear", "norm", "pool",
    "activation") or module classes. ``meter``: a :class:`MemoryMeter` that logs the real packed
    sizes per tag. Returns ``model`` (modified in place); :func:`unwrap_model` removes the hooks.
    """
    types = _resolve(layer_types)
    _store.roundtrip(torch.arange(1.0, 65.0), codec, params)  # bad codec/params fail here
    log = meter.log if meter is not None else None
    unwrap_model(model)
    handles = []

    def hook(_module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            return Compressor.apply(output, codec, params, forward, backward, log)
        return output

    for m in model.modules():
        if isinstance(m, types):
            handles.append(m.register_forward_hook(hook))
    model._smaq_handles = handles
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    """Removes what :func:`wrap_model` inserted."""
    for h in getattr(model, "_smaq_handles", ()):
        h.remove()
    model._smaq_handles = []
    return model
