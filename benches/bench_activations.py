"""Compressed activations on a CNN whose saved activations dominate memory: time and memory.

    python benches/bench_activations.py [--batch 32] [--steps 6] [--size 32]

Step time: plain and compressed training steps alternate in this process (same model, same
batch); the medians and their ratio are printed. Memory: each mode runs in a fresh child process
(so one run's freed heap cannot hide the other's peak) and reports the process's peak resident
memory during the training steps (VmHWM, reset after a warm-up step) and the MemoryMeter's
dense vs held bytes of saved activations. Nothing here asserts: the figures are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

import smaq_rs
import smaq_rs.torch as st


def make_model(depth: int = 4) -> nn.Module:
    """Two stages of ``depth`` 3x3 conv+ReLU (32 then 64 channels), max-pool after each."""
    torch.manual_seed(0)
    layers = []
    c_in = 3
    for c in (32, 64):
        for _ in range(depth):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU()]
            c_in = c
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.Flatten(), nn.LazyLinear(10))


def make_batch(batch: int, size: int):
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 10, (batch,),
                                                                         generator=g)


def step(model, opt, acts, x, y) -> None:
    with acts:
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def make_acts(mode: str, model):
    if mode == "plain":
        return st.compressed_activations(codec=None, model=model)
    return st.compressed_activations(codec="smaq", rounding="nearest", model=model)


def child(mode: str, batch: int, size: int, steps: int) -> None:
    model = make_model()
    x, y = make_batch(batch, size)
    model(x[:1])  # materialize the lazy layer
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    acts = make_acts(mode, model)
    step(model, opt, acts, x, y)  # warm-up: allocator and kernels
    meter = st.MemoryMeter(model, opt, activations=acts)
    for _ in range(steps):
        with acts:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        meter.step()
        opt.zero_grad(set_to_none=True)
    rec = max(meter.records, key=lambda r: r["rss_peak"])
    print(json.dumps({"rss_peak": rec["rss_peak"], "activations": rec["activations"],
                      "weights": rec["weights"]["held"], "tracked": meter.track_rss}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--child", choices=["plain", "smaq"])
    ap.add_argument("--glibc-default", action="store_true",
                    help="run the children with glibc's default malloc settings (see below)")
    args = ap.parse_args()
    if args.child:
        child(args.child, args.batch, args.size, args.steps)
        return

    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), smaq_rs "
          f"{smaq_rs.__version__} ({smaq_rs.get_num_threads()} threads on "
          f"{smaq_rs.thread_backend()})")
    print(f"CNN 4x(conv32+ReLU)-pool-4x(conv64+ReLU)-pool-fc, batch {args.batch} of "
          f"{args.size}x{args.size}x3, "
          f"SGD; SmaQ 6/8 nearest for the compressed run")

    # -- step time, interleaved in this process ------------------------------------------------
    model = make_model()
    x, y = make_batch(args.batch, args.size)
    model(x[:1])
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    acts = {m: make_acts(m, model) for m in ("plain", "smaq")}
    times = {m: [] for m in acts}
    for m in acts:
        step(model, opt, acts[m], x, y)  # warm-up
    for _ in range(args.steps):
        for m in acts:
            t0 = time.perf_counter()
            step(model, opt, acts[m], x, y)
            times[m].append(time.perf_counter() - t0)
    med = {m: statistics.median(v) * 1e3 for m, v in times.items()}

    # -- memory, one child process per mode ----------------------------------------------------
    # glibc's dynamic mmap threshold moves large freed buffers onto the brk heap, where small
    # live packed buffers pin them, so RSS keeps pages that are free. Both children run with the
    # same fixed threshold (64 KiB: large buffers are mmap'd and returned on free) unless
    # --glibc-default; jemalloc/tcmalloc behave similarly to the fixed threshold.
    env = dict(os.environ)
    if not args.glibc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    mem = {}
    for m in ("plain", "smaq"):
        out = subprocess.run([sys.executable, __file__, "--child", m, "--batch", str(args.batch),
                              "--size", str(args.size), "--steps", str(min(args.steps, 4))],
                             check=True, capture_output=True, text=True, env=env).stdout
        mem[m] = json.loads(out.strip().splitlines()[-1])

    mib = 2.0 ** 20
    print()
    print(f"{'run':<8}{'median step ms':>16}{'saved act. dense MiB':>22}{'held MiB':>10}"
          f"{'ratio':>7}{'peak RSS MiB':>14}")
    for m in ("plain", "smaq"):
        a = mem[m]["activations"]
        print(f"{m:<8}{med[m]:>16.1f}{a['dense'] / mib:>22.1f}{a['held'] / mib:>10.1f}"
              f"{a['ratio']:>7.2f}{mem[m]['rss_peak'] / mib:>14.1f}")
    print(f"\nstep time smaq / plain: {med['smaq'] / med['plain']:.2f}x (goal <= 1.3x)")
    d = mem["plain"]["rss_peak"] - mem["smaq"]["rss_peak"]
    print(f"peak RSS smaq / plain: {mem['smaq']['rss_peak'] / mem['plain']['rss_peak']:.2f}x "
          f"({d / mib:.1f} MiB lower)")
    print("children's malloc: " + ("glibc default" if args.glibc_default
                                    else "MALLOC_MMAP_THRESHOLD_=65536 (both runs)"))
    if not mem["plain"]["tracked"]:
        print("note: /proc/self/clear_refs not writable: peak RSS covers the whole child process")


if __name__ == "__main__":
    main()
