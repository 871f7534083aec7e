"""SmaQ written in plain torch, straight from SPEC.md: the simulated round trip of the research
code (compress, immediately decompress, no bytes kept).

It exists to check smaq_rs against: its error (tests) and its speed (``make bench``). It stores
nothing, so it has no size: the research code computed sizes from bit counts; smaq_rs measures the
bytes it really keeps.
"""

from __future__ import annotations

from typing import Optional

import torch


def smaq_roundtrip(
    x: torch.Tensor,
    bits_main: int = 6,
    bits_outlier: int = 8,
    t_main: float = 1.0,
    t_outlier: float = 2.5,
    rounding: str = "stochastic",
    k: Optional[int] = None,
    clamp: bool = True,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Quantize and dequantize ``x`` as SmaQ does, in float32 torch ops.

    ``k=None`` uses the exact mean and population std of the finite values; an integer samples
    ``k`` elements (the research default was 16). ``clamp=False`` reproduces the research code's
    gap: outliers beyond ``t_outlier`` keep codes larger than ``bits_outlier`` bits can hold.
    """
    xf = x.float()
    finite = torch.isfinite(xf)
    if k is None:
        vals = xf[finite]
    else:
        idx = torch.randint(0, xf.numel(), (k,), generator=generator)
        vals = xf.reshape(-1)[idx]
        vals = vals[torch.isfinite(vals)]
    if vals.numel() == 0:
        mean, std = 0.0, 1.0
    else:
        mean = vals.double().mean().item()
        std = vals.double().std(unbiased=False).item()
        if not std > 0:
            std = 1.0
    r_main = (2 ** (bits_main - 2) - 1) / t_main
    r_out = (2 ** (bits_outlier - 2) - 1) / (t_outlier - t_main)

    def rnd(v: torch.Tensor) -> torch.Tensor:
        if rounding == "stochastic":
            return torch.floor(v + torch.rand(v.shape, generator=generator))
        if rounding == "nearest":
            return torch.floor(v + 0.5)
        return torch.floor(v)

    z = (xf - mean) / std
    a = z.abs()
    main = a <= t_main
    z_main = rnd(a * r_main) / r_main
    d = a - t_main
    if clamp:
        d = d.clamp(max=t_outlier - t_main)
    z_out = rnd(d * r_out) / r_out + t_main
    zhat = torch.where(main, z_main, z_out) * torch.sign(z)
    out = zhat * std + mean
    return torch.where(finite, out, xf).to(x.dtype)
