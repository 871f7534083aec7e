"""AdamW on a ~21M-parameter MLP: bytes of state per parameter and median step time.

    python benches/bench_optim.py [--width 2048] [--layers 5] [--steps 5]

Measured in one run, same model and gradients: torch's fused AdamW (float32 state), torch's
foreach AdamW, smaq_rs.torch.AdamW (exp_avg / exp_avg_sq packed with SmaQ 6/8, dense below
4096 elements) with its fused Rust step and, for comparison, with the per-operation torch update
(``fused = False``, the path before it) and with exp_avg packed unscaled (``scale_exp_avg=False``:
what the scaling costs), and bitsandbytes' AdamW8bit / torchao's AdamW8bit where they are
installed.
State bytes are summed from the real buffers each optimizer holds after the steps (tensors'
storage bytes; for smaq_rs the packed bytes). Times are medians of ``--steps`` steps after
``--warmup`` untimed steps (2), in ``--rounds`` (3) rounds in which the optimizers take turns,
each on its own copy of the model, so that a slow spell of a shared machine falls on all of
them. Gradients are random tensors drawn afresh each step (no forward/backward), so only the
optimizer step is timed: N(0, 1e-6) everywhere, or with
``--grads scaled`` a per-element scale (as a network's gradients have) times fresh noise. The
fused smaq_rs step codes the new state with the statistics its step before kept, where they still
fit (one pass over the state), else twice; the paths its timed steps took are printed. Nothing
asserts: the figures are printed.

    python benches/bench_optim.py --gpt2 60

times the fused step on a real model instead (GPT-2 from `transformers`, trained on the standard
library's sources), with the statistics each step keeps for the next and with them dropped.

    python benches/bench_optim.py --rss

measures instead how much the process grows (resident memory, as the kernel counts it) while
each optimizer builds its state and steps, per parameter, on a model whose largest layer holds
half its parameters (Linear(2048, 4096), Linear(4096, 1024), Linear(1024, 4096): 16.8M). Each
optimizer runs in a fresh subprocess; the baseline is taken after the model and its gradients
exist. "after" is the resident size after the steps, "peak" the high-water mark during them
(which includes one parameter's old and new packed state side by side, and allocator slack).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
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


_SCALES: dict = {}


def set_scaled_grads(model: nn.Module, seed: int) -> None:
    """Fresh noise each step, times a per-element scale drawn once over e^-3..e^3 (1e-3 at the
    centre): the spread of each element's exp_avg_sq is then set by its scale, as in a network,
    and the state's statistics settle after a few steps."""
    g = torch.Generator().manual_seed(seed)
    for i, p in enumerate(model.parameters()):
        key = (i, tuple(p.shape))
        if key not in _SCALES:
            g0 = torch.Generator().manual_seed(1000 + i)
            _SCALES[key] = torch.exp(torch.rand(p.shape, generator=g0) * 6 - 3) * 1e-3
        p.grad = torch.randn(p.shape, generator=g) * _SCALES[key]


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
        ("  same, exp_avg unscaled", lambda p: st.AdamW(p, lr=1e-3, scale_exp_avg=False)),
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


def rss_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2048, 4096), nn.Linear(4096, 1024), nn.Linear(1024, 4096))


def rss_child(index: int, steps: int) -> None:
    """Runs in a fresh process: prints the RSS growth of one optimizer (see the module doc)."""
    name, make = candidates()[index]
    if isinstance(make, str):
        print(f"{name}\t-\t-\t-\t{make}")  # name, -, -, -, note
        return
    # One step on a tiny model first: torch's optimizer machinery loads modules (torch._dynamo)
    # on first use, a fixed ~130 MiB that is not per parameter.
    tiny = nn.Linear(64, 64)
    set_grads(tiny, 0)
    try:
        make(tiny.parameters()).step()
    except Exception:
        pass
    m = rss_model()
    n = sum(p.numel() for p in m.parameters())
    set_grads(m, 0)
    gc.collect()
    smaq_rs.empty_cache()  # also hands the allocator's free memory back: a clean baseline
    base = st._meter.current_rss()
    st.reset_peak_rss()
    try:
        opt = make(m.parameters())
        for _ in range(steps):  # the same gradients: no allocation but the optimizer's
            opt.step()
    except Exception as e:
        print(f"{name}\t-\t-\t-\tfailed: {type(e).__name__}: {e}"[:120])
        return
    gc.collect()
    after, peak = st._meter.current_rss(), st.peak_rss()
    cached = smaq_rs.cached_bytes()
    smaq_rs.empty_cache()
    trimmed = st._meter.current_rss()
    if isinstance(opt, st.optim._PackedStateOptimizer):
        held = opt.state_nbytes()[1]
    else:
        held = tensor_state_bytes(opt)
    print(f"{name}\t{held / n:.3f}\t{(after - base) / n:.3f}\t{cached / n:.3f}\t"
          f"{(trimmed - base) / n:.3f}\t{(peak - base) / n:.3f}")


def rss_main(steps: int) -> None:
    n = sum(p.numel() for p in rss_model().parameters())
    print(f"model: Linear(2048, 4096), Linear(4096, 1024), Linear(1024, 4096): {n / 1e6:.2f}M "
          f"parameters, the largest layer {8392704 / n:.0%} of them; {steps} steps")
    print("bytes per parameter: the state's packed buffers; the process's growth after the steps,")
    print("of which smaq_rs's buffer cache (freed buffers kept for the next step's encode); the")
    print("growth after smaq_rs.empty_cache(); the peak growth during the steps")
    print(f"{'optimizer':<28}{'state':>8}{'RSS after':>11}{'cache':>8}{'emptied':>9}{'peak':>8}")
    for i in range(len(candidates())):
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(i), "--steps",
                              str(steps)], capture_output=True, text=True)
        line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else \
            f"child {i}\t-\t-\t-\t-\t-\tfailed: {out.stderr.strip().splitlines()[-1:]}"
        f = (line.split("\t") + [""] * 7)[:7]
        if f[2] == "-":
            print(f"{f[0]:<28}{'-':>8}{'-':>11}{'-':>8}{'-':>9}{'-':>8}  {f[4]}")
            continue
        print(f"{f[0]:<28}{f[1]:>8}{f[2]:>11}{f[3]:>8}{f[4]:>9}{f[5]:>8}")


def gpt2_main(steps: int) -> None:
    """The fused step on a real model: GPT-2 (4 layers x 256, tied embeddings) trained byte-level
    on the standard library's sources, smaq_rs.AdamW; the median time of ``opt.step()`` over the
    second half of ``steps``, with the statistics each step keeps for the next (one pass where
    they settled) and with them dropped before every step (two passes), same batches."""
    import numpy as np
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from fidelity import stdlib_text
    from smaq_rs.torch._store import Stored

    hf_logging.set_verbosity_error()
    text = stdlib_text()
    print(f"GPT-2 4x256, batch 8x128, lr 1e-3, {steps} steps; opt.step() median over the last "
          f"{steps - steps // 2}")
    for mode in ("kept statistics", "two passes"):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=256,
                                           n_positions=256, tie_word_embeddings=True))
        opt = st.AdamW(model.parameters(), lr=1e-3)
        rng = np.random.default_rng(0)
        times = []
        for _ in range(steps):
            starts = rng.integers(0, len(text) - 129, size=8)
            ids = torch.from_numpy(np.stack([text[s:s + 128] for s in starts]).astype(np.int64))
            model(ids, labels=ids).loss.backward()
            if mode == "two passes":
                for state in opt.state.values():
                    for v in state.values():
                        if isinstance(v, Stored):
                            v.stats = None
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
            opt.zero_grad()
        paths = ", ".join(f"{k} {v}" for k, v in sorted(opt.fused_paths.items()))
        print(f"{mode:<16} {statistics.median(times[steps // 2:]) * 1e3:7.1f} ms   "
              f"(fused steps, all parameters: {paths})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of --steps timed steps per optimizer, taken in turns")
    ap.add_argument("--grads", choices=("normal", "scaled"), default="normal",
                    help="normal: N(0, 1e-6) everywhere; scaled: each element's scale drawn "
                         "once over e^-3..e^3 (as a network's gradients vary per weight)")
    ap.add_argument("--rss", action="store_true", help="measure process growth per parameter")
    ap.add_argument("--gpt2", type=int, default=0, metavar="STEPS",
                    help="time the fused step on GPT-2 training, with and without kept statistics")
    ap.add_argument("--rss-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child is not None:
        rss_child(args.rss_child, args.steps)
        return
    if args.rss:
        rss_main(args.steps)
        return
    if args.gpt2:
        gpt2_main(args.gpt2)
        return
    model = make_model(args.width, args.layers)
    n = sum(p.numel() for p in model.parameters())
    print(f"load average {os.getloadavg()[0]:.2f} at start; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), smaq_rs {smaq_rs.__version__} "
          f"({smaq_rs.get_num_threads()} threads on {smaq_rs.thread_backend()})")
    print(f"MLP {args.layers} x Linear({args.width}, {args.width}): {n / 1e6:.2f}M parameters; "
          f"{args.grads} gradients, {args.warmup} untimed steps, then {args.rounds} rounds of "
          f"{args.steps} timed steps, the optimizers taking turns")
    # Every optimizer gets its own copy of the model. They take turns in rounds of ``--steps``
    # timed steps each (the ``--warmup`` steps in the first round), so that a slow spell of the
    # machine falls on all of them alike rather than on whichever ran then; within a round an
    # optimizer steps as in a training loop, its own state and buffers warm.
    runs, rows = [], []
    for name, make in candidates():
        if isinstance(make, str):
            rows.append([name, None, None, make])
            continue
        m = make_model(args.width, args.layers)
        try:
            opt = make(m.parameters())
        except Exception as e:  # a peer that cannot run here is reported, not fatal
            rows.append([name, None, None, f"failed: {type(e).__name__}: {e}"[:80]])
            continue
        row = [name, None, None, ""]
        rows.append(row)
        runs.append((row, m, opt, [], [0]))
    for r in range(args.rounds):
        for row, m, opt, times, done in runs:
            if row[3].startswith("failed"):
                continue
            try:
                for _ in range(args.steps + (args.warmup if r == 0 else 0)):
                    i = done[0]
                    (set_grads if args.grads == "normal" else set_scaled_grads)(m, i)
                    if i == args.warmup and hasattr(opt, "fused_paths"):
                        opt.fused_paths.clear()
                    t0 = time.perf_counter()
                    opt.step()
                    if i >= args.warmup:
                        times.append(time.perf_counter() - t0)
                    done[0] += 1
            except Exception as e:
                row[3] = f"failed: {type(e).__name__}: {e}"[:80]
    for row, m, opt, times, _ in runs:
        if row[3].startswith("failed"):
            continue
        if isinstance(opt, st.optim._PackedStateOptimizer):
            _, held = opt.state_nbytes()
        else:
            held = tensor_state_bytes(opt)
        paths = getattr(opt, "fused_paths", None)
        row[1], row[2] = held / n, statistics.median(times) * 1e3
        row[3] = ("fused steps: " + ", ".join(f"{k} {v}" for k, v in sorted(paths.items()))
                  if paths else "")
    del runs

    base = next(r[2] for r in rows if r[2] is not None)
    print()
    print(f"{'optimizer':<28}{'state B/param':>14}{'median step ms':>16}{'vs fused':>10}")
    for name, bpp, ms, note in rows:
        if ms is None:
            print(f"{name:<28}{'-':>14}{'-':>16}{'-':>10}  {note}")
        else:
            print(f"{name:<28}{bpp:>14.3f}{ms:>16.1f}{ms / base:>9.1f}x  {note}".rstrip())
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    print("\ngoal for smaq_rs: <= 1.8 bytes/param and a step within 3x of fused fp32 AdamW")


if __name__ == "__main__":
    main()
