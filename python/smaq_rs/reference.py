"""The SmaQ research algorithm in plain torch, as the research code computes it.

This is what smaq_rs is measured against: the error of the published algorithm at the same
nominal parameters, and the size it *computed* (bits counted, never stored). It keeps the
research code's choices, including the ones smaq_rs does differently:

- statistics over the whole tensor in the tensor's precision, the Bessel-corrected (unbiased)
  standard deviation, or, with ``samples=k``, mean and population std of ``k`` random elements;
  the range estimate ``(max - min) / sqrt(2 ln n)`` with ``range_std=True``; a zero std becomes 1;
  the std is clamped into [1e-38, 1e38] for the division only;
- no clamping: a value beyond ``t_outlier`` keeps a code larger than ``bits_outlier`` bits can
  hold, so the tail keeps the outlier grid's accuracy while its size is counted as
  ``bits_outlier``;
- signed rounding of ``(z -/+ t_main) * r``: stochastic (round up with probability equal to the
  fraction) or truncation toward zero;
- no special case for exact zeros or NaN/Inf (NaN poisons the statistics, as it did there);
- ``all_positive`` clamps the decoded values at zero.

Nothing here stores bytes: :func:`smaq_research` returns the decoded tensor and the bit count
the research code would have logged for it.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

__all__ = ["Research", "smaq_research", "smaq_roundtrip", "research_bits"]


class Research(NamedTuple):
    """The research algorithm's output for one tensor."""

    #: The decoded tensor (same shape and dtype as the input).
    values: torch.Tensor
    #: Bits the research code counted: ``n_main * bits_main + n_outlier * bits_outlier``, or 32
    #: per element for tensors below ``min_size`` (left uncompressed).
    bits: int


def smaq_research(
    x: torch.Tensor,
    bits_main: int = 6,
    bits_outlier: int = 8,
    t_main: float = 1.0,
    t_outlier: float = 2.5,
    rounding: str = "stochastic",
    samples: Optional[int] = None,
    range_std: bool = False,
    all_positive: bool = False,
    min_size: int = 8,
    generator: Optional[torch.Generator] = None,
) -> Research:
    """Quantize and dequantize ``x`` with the research algorithm; see the module doc.

    ``rounding`` is ``"stochastic"`` (the research default) or ``"truncate"`` (its
    ``--no_stochastic_rounding``). ``samples=None`` uses the exact statistics (its default);
    an integer samples that many elements (its ``--use_sample_stats`` with ``--num_samples``).
    """
    if rounding not in ("stochastic", "truncate"):
        raise ValueError(f"rounding must be 'stochastic' or 'truncate', got {rounding!r}")
    if not 3 <= bits_main <= bits_outlier:
        raise ValueError(f"need 3 <= bits_main <= bits_outlier, got {bits_main}, {bits_outlier}")
    if not 0 < t_main < t_outlier:
        raise ValueError(f"need 0 < t_main < t_outlier, got {t_main}, {t_outlier}")
    n = x.numel()
    if n < min_size:
        return Research(x.clone(), 32 * n)
    data = x.float()
    flat = data.reshape(-1)
    if samples is not None:
        k = min(n, samples)
        idx = (torch.rand(k, generator=generator) * n).long()
        pick = flat[idx]
        mean, std = pick.mean(), _spread(pick, range_std, unbiased=False)
    else:
        mean, std = flat.mean(), _spread(flat, range_std, unbiased=True)
    if std == 0:
        std = torch.ones_like(std)
    r_out = (2 ** (bits_outlier - 2) - 1) / (t_outlier - t_main)
    r_main = (2 ** (bits_main - 2) - 1) / t_main
    z = (data - mean) / std.clamp(1e-38, 1e38)
    high = z > t_main
    low = z < -t_main
    outlier = high | low
    shift = torch.where(high, -t_main, 0.0) + torch.where(low, t_main, 0.0)
    scale = torch.where(outlier, r_out, r_main)
    q = (z + shift) * scale
    if rounding == "stochastic":
        u = torch.rand(q.shape, generator=generator)
        q = torch.floor(q) + (q - torch.floor(q) > u).float()
    else:
        q = torch.trunc(q)
    y = (q / scale - shift) * std + mean
    if all_positive:
        y = y.clamp_min(0.0)
    n_out = int(outlier.sum())
    return Research(y.to(x.dtype), n_out * bits_outlier + (n - n_out) * bits_main)


def _spread(v: torch.Tensor, range_std: bool, unbiased: bool) -> torch.Tensor:
    if range_std:
        return (v.max() - v.min()) / math.sqrt(2.0 * math.log(v.numel()))
    return v.std(unbiased=unbiased)


def smaq_roundtrip(x: torch.Tensor, **kwargs) -> torch.Tensor:
    """The decoded tensor of :func:`smaq_research` (same keyword arguments)."""
    return smaq_research(x, **kwargs).values


def research_bits(x: torch.Tensor, **kwargs) -> int:
    """The bits the research code counted for ``x`` (same keyword arguments as
    :func:`smaq_research`)."""
    return smaq_research(x, **kwargs).bits
