"""BN-aware SmaQ against plain SmaQ on the feature maps a ResNet-18 feeds its BatchNorms.

    python benches/bench_bn_smaq.py [--steps 20] [--image-size 32] [--batch 32]

Trains torchvision's ResNet-18 (3x3 stem, no max-pool) on scikit-learn's digits for ``--steps``
AdamW steps (plain), then takes the input of every BatchNorm on one training batch (20 maps) and
codes each with SmaQ 6/8 four ways: plain (one mean/std per tensor), BN-aware with the BN's
running statistics, BN-aware with the batch's per-channel statistics, and BN-aware with scalar
statistics (the means of the per-channel ones). Printed per way: the relative squared error
||x' - x||^2 / ||x||^2 over all maps, the worst map's, the median over channels of the
per-channel relative error (quiet channels are where per-tensor scaling loses), and the packed
bytes (real buffers) as a ratio to float32. Rounding: nearest (deterministic) and stochastic.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Dict, List

import torch
from torch.nn import functional as F

from smaq_rs.torch import _store
from smaq_rs.train.bn import bn_roundtrip, channel_stats
from smaq_rs.train.data import digits_split, resnet18_small


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def capture(steps: int, size: int, batch: int) -> List[tuple]:
    """(feature map, bn module) for every BatchNorm of a briefly trained ResNet-18."""
    xtr, ytr, _, _ = digits_split(size)
    torch.manual_seed(0)
    model = resnet18_small()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(len(ytr), generator=g)
    for s in range(steps):
        idx = perm[(s * batch) % (len(ytr) - batch):][:batch]
        F.cross_entropy(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, i: seen.append((i[0].detach().clone(), m)))
             for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():  # training mode: the batch statistics are what BN uses
        model(xtr[perm[:batch]])
    for h in hooks:
        h.remove()
    return seen


def rel(y: torch.Tensor, x: torch.Tensor) -> float:
    return float((y - x).square().sum() / x.square().sum())


def per_channel_median(y: torch.Tensor, x: torch.Tensor) -> float:
    dims = [0, 2, 3]
    e = (y - x).square().sum(dim=dims) / (x - x.mean(dim=dims, keepdim=True)).square().sum(
        dim=dims).clamp_min(1e-30)
    return float(e.median())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--bits-main", type=int, default=6)
    ap.add_argument("--bits-outlier", type=int, default=8)
    a = ap.parse_args(argv)
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}")
    maps = capture(a.steps, a.image_size, a.batch)
    dense = sum(x.numel() * 4 for x, _ in maps)
    print(f"ResNet-18 after {a.steps} AdamW steps on digits {a.image_size}x{a.image_size}, "
          f"batch {a.batch}: {len(maps)} BatchNorm inputs, {dense / 2**20:.2f} MiB float32")
    for rounding in ("nearest", "stochastic"):
        p = dict(bits_main=a.bits_main, bits_outlier=a.bits_outlier, rounding=rounding, seed=7)
        rows: Dict[str, List] = {k: [] for k in
                                 ("plain SmaQ", "BN-aware (running)", "BN-aware (batch)",
                                  "BN-aware (scalar)")}
        for x, bn in maps:
            s = _store.encode(x, "smaq", p)
            rows["plain SmaQ"].append((_store.decode(s), s.nbytes, x))
            y, n = bn_roundtrip(x, bn.running_mean, bn.running_var, bn.eps, True, **p)
            rows["BN-aware (running)"].append((y, n, x))
            m, v = channel_stats(x)
            y, n = bn_roundtrip(x, m, v, bn.eps, True, **p)
            rows["BN-aware (batch)"].append((y, n, x))
            y, n = bn_roundtrip(x, m, v, bn.eps, False, **p)
            rows["BN-aware (scalar)"].append((y, n, x))
        print(f"\nSmaQ {a.bits_main}/{a.bits_outlier}, {rounding} rounding")
        print(f"{'coding':22s} {'rel sq err':>12s} {'worst map':>12s} {'median chan':>12s} "
              f"{'bytes':>10s} {'ratio':>7s}")
        for name, rs in rows.items():
            err = sum(float((y - x).square().sum()) for y, _, x in rs) / sum(
                float(x.square().sum()) for _, _, x in rs)
            worst = max(rel(y, x) for y, _, x in rs)
            med = statistics.median(per_channel_median(y, x) for y, _, x in rs)
            nb = sum(n for _, n, _ in rs)
            print(f"{name:22s} {err:12.3e} {worst:12.3e} {med:12.3e} {nb:10d} "
                  f"{dense / nb:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
