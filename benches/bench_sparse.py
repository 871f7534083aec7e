"""Forward + backward of a sparse Linear(768, 3072) against the dense torch layer, 2 threads each.

    python benches/bench_sparse.py [--batches 2048 256] [--sparsities 0.8 0.9 0.95 0.98] [--reps 7]
                                   [--conv-batch 8]

For each batch and sparsity, in one run: torch's nn.Linear holding the pruned weight (dense
matmuls, zeros included) and smaq_rs.torch.sparse.SparseLinear built from it (CSR, the Rust
kernels). One timed step is the forward, then the backward with the input gradient, the weight
gradient (at the non-zeros for the sparse layer, everywhere for the dense one) and the bias
gradient. Dense and sparse steps alternate; times are medians of ``--reps`` steps after a warm-up
step; forward and backward are also timed apart. Then a ResNet-18 3x3 convolution, nn.Conv2d
against SparseConv2d, the same way. torch.set_num_threads(2) and
smaq_rs.set_num_threads(2). The CPU and the load average (the machine may be shared) are
printed. Nothing asserts: the figures are printed.

SparseProp (``pip install sparseprop``, which ``make bench`` installs: it builds a C++ extension
from source) is timed beside them on the Linear when it imports: its ``SparseLinear.from_dense``
of the same pruned layer, with ``OMP_NUM_THREADS`` set to the same thread count, and its output
and gradients checked against the dense layer's (largest difference printed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def _threads_flag(argv: list) -> str:
    """The ``--threads`` value, read before torch and SparseProp start their OpenMP runtimes."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return "2"


os.environ["OMP_NUM_THREADS"] = _threads_flag(sys.argv[1:])

import torch  # noqa: E402
from torch import nn  # noqa: E402

import smaq_rs  # noqa: E402
from smaq_rs.bench import cpu_name  # noqa: E402
from smaq_rs.torch.sparse import SparseLinear  # noqa: E402

try:  # a peer in the bench environment, not a dependency
    from sparseprop.modules.linear import SparseLinear as SparsePropLinear
except ImportError:  # pragma: no cover - depends on the environment
    SparsePropLinear = None


def pruned_linear(inp: int, out: int, sparsity: float, seed: int) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(inp, out)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(out, inp, generator=g) >= sparsity)
    return lin


def step(module: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> tuple:
    """(forward seconds, backward seconds) of one training step's layer work."""
    for p in module.parameters():
        p.grad = None
    x.grad = None
    t0 = time.perf_counter()
    y = module(x)
    t1 = time.perf_counter()
    y.backward(gy)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="*", default=[2048, 256])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95, 0.98])
    ap.add_argument("--inp", type=int, default=768)
    ap.add_argument("--out", type=int, default=3072)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--conv-batch", type=int, default=8,
                    help="batch of the 3x3 convolution part (0: skip it)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    smaq_rs.set_num_threads(args.threads)
    print(f"{cpu_name()}, {os.cpu_count()} CPUs; {args.threads} threads (torch and smaq_rs); "
          f"load average {open('/proc/loadavg').read().split()[:3]}")
    peer = SparsePropLinear is not None
    print(f"torch {torch.__version__}; Linear({args.inp}, {args.out}); forward + backward "
          f"(dX, dW, db); median of {args.reps}; SparseProp: "
          + (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}" if peer else "not installed"))
    print(f"{'batch':>5} {'sparsity':>8} {'dense ms':>9} {'sparse ms':>9} {'speed-up':>8}   "
          f"{'dense fwd/bwd':>14} {'sparse fwd/bwd':>15}"
          + (f" {'SparseProp ms':>13} {'ours vs SP':>10} {'SP max err':>10}" if peer else ""))
    for batch in args.batches:
        for s in args.sparsities:
            dense = pruned_linear(args.inp, args.out, s, 0)
            sparse = SparseLinear.from_dense(dense, min_sparsity=0.0)
            g = torch.Generator().manual_seed(1)
            x = torch.randn(batch, args.inp, generator=g).requires_grad_(True)
            gy = torch.randn(batch, args.out, generator=g)
            mods = [dense, sparse]
            if peer:
                sp = SparsePropLinear.from_dense(dense)
                mods.append(sp)
                err = peer_error(dense, sp, x, gy)
            times: list = [[] for _ in mods]
            for i in range(args.reps + 1):
                for m, t in zip(mods, times):
                    a = step(m, x, gy)
                    if i:
                        t.append(a)

            def med(v: list, k: int) -> float:
                return statistics.median(t[k] for t in v) * 1e3

            td, ts = times[0], times[1]
            dt = statistics.median(sum(t) for t in td) * 1e3
            st = statistics.median(sum(t) for t in ts) * 1e3
            line = (f"{batch:>5} {s:>8.2f} {dt:>9.1f} {st:>9.1f} {dt / st:>7.2f}x   "
                    f"{med(td, 0):>6.1f} /{med(td, 1):>6.1f} {med(ts, 0):>7.1f} /"
                    f"{med(ts, 1):>6.1f}")
            if peer:
                pt = statistics.median(sum(t) for t in times[2]) * 1e3
                line += f" {pt:>13.1f} {pt / st:>9.2f}x {err:>10.1e}"
            print(line)
    if args.conv_batch:
        conv_part(args)
    print(f"load average after: {open('/proc/loadavg').read().split()[:3]}")


def peer_error(dense: nn.Linear, peer: nn.Module, x: torch.Tensor, gy: torch.Tensor) -> float:
    """Largest absolute difference of the peer layer's output and input gradient from the
    dense layer's (same pruned weight, same input)."""
    outs = []
    for m in (dense, peer):
        x.grad = None
        y = m(x)
        y.backward(gy)
        outs.append((y.detach(), x.grad.clone()))
    x.grad = None
    return max(float((a - b).abs().max()) for a, b in zip(outs[0], outs[1]))


def conv_part(args: argparse.Namespace) -> None:
    """A ResNet-18 3x3 convolution (64 -> 64 channels, padding 1) on 32 x 32 inputs, the size of
    ResNet-18 adapted to small images, dense nn.Conv2d against SparseConv2d (unfold + kernels)."""
    from smaq_rs.torch.sparse import SparseConv2d

    b = args.conv_batch
    print(f"Conv2d(64, 64, 3, padding=1) on ({b}, 64, 32, 32): forward + backward")
    print(f"{'batch':>5} {'sparsity':>8} {'dense ms':>9} {'sparse ms':>9} {'speed-up':>8}")
    for s in args.sparsities:
        g = torch.Generator().manual_seed(0)
        dense = nn.Conv2d(64, 64, 3, padding=1)
        with torch.no_grad():
            dense.weight.mul_(torch.rand(dense.weight.shape, generator=g) >= s)
        sparse = SparseConv2d.from_dense(dense, min_sparsity=0.0)
        x = torch.randn(b, 64, 32, 32, generator=g).requires_grad_(True)
        gy = torch.randn(b, 64, 32, 32, generator=g)
        td, ts = [], []
        for i in range(args.reps + 1):
            a = sum(step(dense, x, gy))
            c = sum(step(sparse, x, gy))
            if i:
                td.append(a)
                ts.append(c)
        dt, st = statistics.median(td) * 1e3, statistics.median(ts) * 1e3
        print(f"{b:>5} {s:>8.2f} {dt:>9.1f} {st:>9.1f} {dt / st:>7.2f}x")


if __name__ == "__main__":
    main()
