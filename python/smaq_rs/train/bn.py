"""BN-aware SmaQ: a feature map that feeds a BatchNorm is normalised per channel by the BN's
statistics before it is coded, and denormalised after decoding.

SmaQ codes each value by its z-score against one mean and standard deviation per tensor. A
convolution's output has a different mean and spread in every channel, so one per-tensor
standard deviation is wide for the quiet channels: their values fall on few levels. The
BatchNorm that reads the map knows each channel's mean and variance (its running statistics,
or the batch's own). Coding ``z = (x - mean_c) / sqrt(var_c + eps)`` instead gives every channel
the same scale; ``x' = z' * sqrt(var_c + eps) + mean_c`` restores it. The packed bytes are the
same (one SmaQ record of the normalised map; the statistics are the BN's own and are held
anyway).

- :func:`bn_roundtrip`: one tensor, given the statistics (per channel, or scalar:
  ``per_channel=False`` uses the mean of the channel means and of the channel variances);
- :class:`BNAwareFeatureMaps`: forward pre-hooks on every BatchNorm of a model that replace its
  input by the coded-decoded value (simulation, as the SmaQ research did; the gradient passes
  straight through) and record bytes and error.
"""

from __future__ import annotations

import hashlib
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from ..torch import _store

__all__ = ["BNAwareFeatureMaps", "bn_roundtrip", "channel_stats"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def channel_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (dim 1) mean and biased variance of ``x``, as BatchNorm computes them."""
    if x.dim() < 2:
        raise ValueError(f"a feature map needs a channel dimension (dim >= 2), got {x.dim()}-d")
    dims = [d for d in range(x.dim()) if d != 1]
    return x.mean(dim=dims), x.var(dim=dims, unbiased=False)


def bn_roundtrip(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float = 1e-5,
                 per_channel: bool = True, codec: str = "smaq", **params: Any
                 ) -> Tuple[torch.Tensor, int]:
    """Codes ``x`` (N, C, ...) normalised by ``mean``/``var`` (C,) and decodes it back:
    (the decoded feature map, the packed bytes)."""
    if x.dim() < 2 or mean.shape != (x.shape[1],) or var.shape != (x.shape[1],):
        raise ValueError(f"statistics of shape ({x.shape[1] if x.dim() > 1 else '?'},) "
                         f"expected for a feature map of shape {tuple(x.shape)}; got mean "
                         f"{tuple(mean.shape)}, var {tuple(var.shape)}")
    shape = [1, -1] + [1] * (x.dim() - 2)
    m, v = mean.detach().to(x.dtype), var.detach().to(x.dtype)
    if not per_channel:
        m, v = m.mean().expand_as(m), v.mean().expand_as(v)
    std = (v + eps).sqrt().reshape(shape)
    m = m.reshape(shape)
    z = ((x.detach() - m) / std).contiguous()
    s = _store.encode(z, codec, params)
    back = _store.decode(s).to(x.device)
    return back * std + m, s.nbytes


class BNAwareFeatureMaps:
    """Forward pre-hooks coding the input of every BatchNorm of ``model`` with BN-aware SmaQ.

    ``stats``: "running" (the BN's running mean/var buffers as they are at that step; a BN
    without running statistics falls back to the batch's) or "batch" (the batch's per-channel
    statistics, what BN normalises with in training). ``seed``, with ``step`` (set by the
    driver) and the layer index, seeds stochastic rounding. :meth:`pop_stats` returns and
    clears the bytes (dense, packed) and the relative squared error summed since the last call.
    """

    def __init__(self, model: nn.Module, params: Dict[str, Any], stats: str = "running",
                 seed: int = 0, per_channel: bool = True):
        if stats not in ("running", "batch"):
            raise ValueError(f"stats must be 'running' or 'batch', got {stats!r}")
        self.params = {k: v for k, v in params.items() if k != "seed"}
        self.stats, self.seed, self.per_channel = stats, int(seed), per_channel
        self.step = 0
        self._acc = [0, 0, 0.0, 0.0]
        self.handles: List[Any] = []
        for i, m in enumerate(mod for mod in model.modules() if isinstance(mod, _BN)):
            self.handles.append(m.register_forward_pre_hook(self._hook(i)))

    def _hook(self, index: int):
        def pre(bn: nn.Module, inputs):
            x = inputs[0]
            if not torch.is_grad_enabled() or x.dtype not in _store.CODEC_DTYPES:
                return None  # evaluation: nothing is kept for backward
            if self.stats == "running" and bn.running_mean is not None:
                mean, var = bn.running_mean, bn.running_var
            else:
                mean, var = channel_stats(x.detach())
            seed = int.from_bytes(hashlib.blake2b(
                f"{self.seed}:{self.step}:bn:{index}".encode(), digest_size=8).digest(),
                "little") >> 1
            y, nbytes = bn_roundtrip(x, mean, var, bn.eps, self.per_channel,
                                     **{**self.params, "seed": seed})
            xd = x.detach()
            self._acc[0] += x.numel() * x.element_size()
            self._acc[1] += nbytes
            self._acc[2] += float((y - xd).square().sum())
            self._acc[3] += float(xd.square().sum())
            return (x + (y - xd),) + tuple(inputs[1:])  # straight-through gradient
        return pre

    def pop_stats(self) -> Dict[str, Any]:
        """{dense, packed, rel_mse} since the last call."""
        d, p, e, s = self._acc
        self._acc = [0, 0, 0.0, 0.0]
        return {"dense": d, "packed": p, "rel_mse": (e / s) if s else 0.0}

    def remove(self) -> None:
        """Removes the hooks."""
        for h in self.handles:
            h.remove()
        self.handles = []
