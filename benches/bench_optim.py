"""AdamW on a ~21M-parameter MLP: bytes of state per parameter and median step time.

    python benches/bench_optim.py [--width 2048] [--layers 5] [--steps 5]

Measured in one run, same model and gradients: torch's fused AdamW (float32 state), torch's
foreach AdamW, smaq_rs.torch.AdamW (exp_avg / exp_avg_sq packed with SmaQ 6/8, dense below
4096 elements) with its fused Rust step and, for comparison, with the per-operation torch update
(``fused = False``, the path before it), and bitsandbytes' AdamW8bit / torchao's AdamW8bit where they are installed.
State bytes are summed from the real buffers each optimizer holds after the steps (tensors'
storage bytes; for smaq_rs the packed bytes). Times are medians of ``--steps`` steps after two
warm-up steps. Gradients are fixed random tensors (no forward/backward), so only the optimizer
step is timed. Nothing asserts: the figures are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch import nn

import smaq_rs
import smaq_rs.torch as st


def make_model(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*mods)


def set_grads(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) * 1e-3


def tensor_state_bytes(opt) -> int:
    """Bytes of every tensor in the optimizer's state (storage-deduplicated)."""
    seen, total = set(), 0

    def visit(v):
        nonlocal total
        if isinstance(v, torch.Tensor):
            try:
                s = v.untyped_storage()
                key = s.data_ptr()
                n = s.nbytes()
            except Exception:  # tensor subclasses (torchao): count their inner tensors
                inner = getattr(v, "__tensor_flatten__", None)
                if inner is not None:
                    names, _ = v.__tensor_flatten__()
                    for name in names:
                        visit(getattr(v, name))
                return
            if key not in seen:
                seen.add(key)
                total += n
        elif isinstance(v, dict):
            for x in v.values():
                visit(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                visit(x)

    for s in opt.state.values():
        visit(s)
    return total


def _unfused(make):
    """The per-operation torch update (the path before the fused Rust step), for comparison."""
    def f(p):
        opt = make(p)
        opt.fused = False
        return opt
    return f


def candidates():
    out = [
        ("torch AdamW fused fp32", lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True)),
        ("torch AdamW foreach fp32", lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True)),
        ("smaq_rs AdamW (SmaQ 6/8)", lambda p: st.AdamW(p, lr=1e-3)),
        ("  same, torch path (before)", _unfused(lambda p: st.AdamW(p, lr=1e-3))),
        ("smaq_rs AdamW (SmaQ 5/7)", lambda p: st.AdamW(
            p, lr=1e-3, codec_params={"bits_main": 5, "bits_outlier": 7})),
    ]
    try:
        import bitsandbytes as bnb  # noqa: F401

        out.append(("bitsandbytes AdamW8bit", lambda p: bnb.optim.AdamW8bit(p, lr=1e-3)))
    except Exception as e:  # not installed, or no CPU support in this build
        out.append(("bitsandbytes AdamW8bit", f"not available ({type(e).__name__})"))
    try:
        from torchao.optim import AdamW8bit

        out.append(("torchao AdamW8bit", lambda p: AdamW8bit(p, lr=1e-3)))
    except Exception as e:
        out.append(("torchao AdamW8bit", f"not available ({type(e).__name__})"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    model = make_model(args.width, args.layers)
    n = sum(p.numel() for p in model.parameters())
    print(f"load average {os.getloadavg()[0]:.2f} at start; torch {torch.__version__} ({torch.get_num_threads()} threads), smaq_rs "
          f"{smaq_rs.__version__} ({smaq_rs.get_num_threads()} threads)")
    print(f"MLP {args.layers} x Linear({args.width}, {args.width}): {n / 1e6:.2f}M parameters")
    rows = []
    for name, make in candidates():
        if isinstance(make, str):
            rows.append((name, None, None, make))
            continue
        m = make_model(args.width, args.layers)
        try:
            opt = make(m.parameters())
            times = []
            for i in range(args.steps + 2):
                set_grads(m, i)
                t0 = time.perf_counter()
                opt.step()
                if i >= 2:
                    times.append(time.perf_counter() - t0)
        except Exception as e:  # a peer that cannot run here is reported, not fatal
            rows.append((name, None, None, f"failed: {type(e).__name__}: {e}"[:80]))
            continue
        if isinstance(opt, st.optim._PackedStateOptimizer):
            _, held = opt.state_nbytes()
        else:
            held = tensor_state_bytes(opt)
        rows.append((name, held / n, statistics.median(times) * 1e3, ""))
        del opt, m

    base = next(r[2] for r in rows if r[2] is not None)
    print()
    print(f"{'optimizer':<28}{'state B/param':>14}{'median step ms':>16}{'vs fused':>10}")
    for name, bpp, ms, note in rows:
        if ms is None:
            print(f"{name:<28}{'-':>14}{'-':>16}{'-':>10}  {note}")
        else:
            print(f"{name:<28}{bpp:>14.3f}{ms:>16.1f}{ms / base:>9.1f}x")
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    print("\ngoal for smaq_rs: <= 1.6 bytes/param and a step within 3x of fused fp32 AdamW")


if __name__ == "__main__":
    main()
