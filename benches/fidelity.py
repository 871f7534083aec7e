"""Does compressed training track plain training on real models? Loss, accuracy, memory, time.

    python benches/fidelity.py                       # GPT-2 then ResNet-18, the defaults below
    python benches/fidelity.py --model gpt2 --steps 300 --png fidelity.png

Models (definitions from ``transformers`` and ``torchvision``, randomly initialised; nothing is
downloaded):

- ``gpt2``: ``GPT2LMHeadModel``, 4 layers, 256 wide, 4 heads, tied input/output embeddings,
  vocabulary 256, trained byte-level on the text of Python's standard library
  (``sysconfig.get_paths()["stdlib"]/*.py``); the validation loss is measured on a fixed
  held-back tail of that text (the last 5%), at every ``--eval-every`` steps. AdamW, lr 1e-3.
- ``resnet18``: torchvision's ResNet-18 adapted to small inputs (3x3 stem, no max-pool), on
  scikit-learn's digits upsampled to 32x32; test accuracy on a fixed 25% split. AdamW, lr 1e-3.

Configurations, each from the same seed and the same batches: ``plain``; ``activations``
(``smaq_rs.torch.compressed_activations()`` with its defaults: saved tensors held as packed
bytes); ``optimizer`` (``smaq_rs.torch.AdamW``: packed exp_avg / exp_avg_sq); ``both``;
``paper5`` (the research code's five data structures: both of the above, plus weights and
gradients through the packed optimizer's ``quantize_weights`` / ``quantize_grads``, and gradient
maps through ``wrap_model(..., forward=False)``, a simulation as in the paper).

Printed per configuration: the loss (or accuracy) at each checkpoint and its largest relative
gap to plain, the peak saved-activation bytes dense vs held, the optimizer state in bytes per
parameter (real packed buffers), and the step time as a ratio to plain measured in this run.
``--png`` writes the curves. The CPU model is printed: compare ratios within one run.

    python benches/fidelity.py --timing 8

times GPT-2 steps instead: plain and with compressed activations, alternating, on the same batch
(so both see the same load), and prints the median of each and their ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import smaq_rs
import smaq_rs.torch as st
from smaq_rs.bench import cpu_name
from smaq_rs.train.data import digits_split, resnet18_small, stdlib_text

CONFIGS = ("plain", "activations", "optimizer", "both", "paper5")


def make_optimizer(config: str, params,
                   opt_seed: Optional[int] = None) -> torch.optim.Optimizer:
    """The configuration's optimizer; ``opt_seed``: the packed optimizer's rounding seed (None:
    its default)."""
    seeded = {} if opt_seed is None else {"seed": opt_seed}
    if config in ("optimizer", "both"):
        return st.AdamW(params, lr=1e-3, **seeded)
    if config == "paper5":
        return st.AdamW(params, lr=1e-3, quantize_weights=True, quantize_grads=True, **seeded)
    return torch.optim.AdamW(params, lr=1e-3)


def activations_ctx(config: str, model: nn.Module):
    if config in ("activations", "both", "paper5"):
        return st.compressed_activations(model=model)
    return None


class Run:
    """One configuration's record."""

    def __init__(self, config: str):
        self.config = config
        self.points: List[Tuple[int, float]] = []
        self.step_time = 0.0
        self.steps = 0
        self.peak_dense = 0
        self.peak_held = 0
        self.state_bytes = 0
        self.n_params = 0
        # How the packed AdamW's fused steps ran (one pass, two passes, redone), per parameter.
        self.paths: Dict[str, int] = {}


def train_gpt2(config: str, steps: int, eval_every: int, batch: int, seq: int,
               seed: int = 0, opt_seed: Optional[int] = None) -> Run:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    text = stdlib_text()
    split = int(len(text) * 0.95)
    train, val = text[:split], text[split:]
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=256, n_positions=seq,
                     tie_word_embeddings=True)
    model = GPT2LMHeadModel(cfg)
    model.train()
    opt = make_optimizer(config, model.parameters(), opt_seed)
    if config == "paper5":
        st.wrap_model(model, layer_types=("linear",), forward=False)
    rng = np.random.default_rng(1 + seed)
    vrng = np.random.default_rng(2)  # the same validation set for every seed
    vstarts = vrng.integers(0, len(val) - seq - 1, size=16)
    vbatch = torch.from_numpy(np.stack([val[s:s + seq] for s in vstarts]).astype(np.int64))
    run = Run(config)
    run.n_params = sum(p.numel() for p in model.parameters())

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            out = model(vbatch, labels=vbatch)
        model.train()
        return float(out.loss)

    run.points.append((0, evaluate()))
    for step in range(1, steps + 1):
        starts = rng.integers(0, len(train) - seq - 1, size=batch)
        ids = torch.from_numpy(np.stack([train[s:s + seq] for s in starts]).astype(np.int64))
        timed_step(run, config, model, opt, lambda: model(ids, labels=ids).loss)
        if step % eval_every == 0:
            run.points.append((step, evaluate()))
    run.state_bytes = st.state_nbytes(opt)[1]
    run.paths = dict(getattr(opt, "fused_paths", {}))
    return run


def timed_step(run: Run, config: str, model: nn.Module, opt, loss_fn: Callable[[], torch.Tensor]):
    """One training step of ``config``, timed, its saved-activation peaks recorded."""
    t0 = time.perf_counter()
    ctx = activations_ctx(config, model)
    with ctx if ctx is not None else contextlib.nullcontext():
        loss = loss_fn()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    run.step_time += time.perf_counter() - t0
    run.steps += 1
    if ctx is not None:
        run.peak_dense = max(run.peak_dense, ctx.peak_dense_bytes)
        run.peak_held = max(run.peak_held, ctx.peak_held_bytes)


def train_resnet18(config: str, epochs: int, batch: int, opt_seed: Optional[int] = None) -> Run:
    xtr, ytr, xte, yte = digits_split()
    torch.manual_seed(0)
    model = resnet18_small()
    opt = make_optimizer(config, model.parameters(), opt_seed)
    if config == "paper5":
        st.wrap_model(model, layer_types=("conv", "linear"), forward=False)
    run = Run(config)
    run.n_params = sum(p.numel() for p in model.parameters())

    def accuracy() -> float:
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(xte[i:i + 256]).argmax(1) for i in range(0, len(yte), 256)])
        model.train()
        return float((pred == yte).float().mean()) * 100

    g = torch.Generator().manual_seed(1)
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(ytr) - batch + 1, batch):
            idx = perm[i:i + batch]
            timed_step(run, config, model, opt,
                       lambda: F.cross_entropy(model(xtr[idx]), ytr[idx]))
        run.points.append((epoch, accuracy()))
    run.state_bytes = st.state_nbytes(opt)[1]
    run.paths = dict(getattr(opt, "fused_paths", {}))
    return run


def step_timing(rounds: int, batch: int, seq: int) -> None:
    """Median GPT-2 step time, plain and with compressed activations, alternating."""
    import statistics

    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=256,
                                       n_positions=seq, tie_word_embeddings=True))
    text = stdlib_text()
    ids = torch.from_numpy(np.stack([text[i * seq:(i + 1) * seq] for i in range(batch)])
                           .astype(np.int64))
    times: Dict[str, List[float]] = {"plain": [], "activations": []}
    for r in range(rounds + 1):
        for config in times:
            t0 = time.perf_counter()
            ctx = activations_ctx(config, model)
            with ctx if ctx is not None else contextlib.nullcontext():
                loss = model(ids, labels=ids).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            if r:  # the first round warms up
                times[config].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    # torch's OpenMP workers spin for a while after each operator (libgomp's default); on its
    # "openmp" backend smaq_rs runs its loops on those workers, on "rayon" it competes with them
    # (OMP_WAIT_POLICY=PASSIVE puts them to sleep at once).
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, smaq_rs threads: "
          f"{smaq_rs.get_num_threads()} on {smaq_rs.thread_backend()}")
    print(f"GPT-2 (4x256) step (forward + backward), batch {batch}x{seq}, {rounds} alternating "
          f"rounds: plain {med['plain'] * 1e3:.0f} ms, compressed activations "
          f"{med['activations'] * 1e3:.0f} ms: {med['activations'] / med['plain']:.2f}x")


def report(title: str, runs: Dict[str, Run], metric: str, relative: bool) -> None:
    plain = runs.get("plain")
    print(f"\n{title}")
    at = [p[0] for p in next(iter(runs.values())).points]
    print(f"{'config':12s} " + " ".join(f"{s:>7d}" for s in at)
          + "   worst gap  act dense/held  opt B/param  step x plain")
    for name, r in runs.items():
        vals = " ".join(f"{v:7.3f}" if metric == "loss" else f"{v:7.2f}" for _, v in r.points)
        gap = ""
        if plain is not None and name != "plain":
            if relative:
                g = max(abs(v - p) / p for (_, v), (_, p) in zip(r.points, plain.points))
                gap = f"{g * 100:8.2f}%"
            else:
                g = max(abs(v - p) for (_, v), (_, p) in zip(r.points, plain.points))
                gap = f"{g:7.2f} pt"
        act = (f"{r.peak_dense / r.peak_held:6.2f}x" if r.peak_held else "     -")
        act = f"{r.peak_dense / 2**20:6.1f}/{r.peak_held / 2**20:5.1f} MiB {act}" if r.peak_held \
            else f"{'-':>21s}"
        ratio = (r.step_time / r.steps) / (plain.step_time / plain.steps) if plain else float("nan")
        print(f"{name:12s} {vals}   {gap:>9s}  {act}  {r.state_bytes / r.n_params:8.2f}"
              f"  {ratio:8.2f}")


def plot(path: str, results: Dict[str, Dict[str, Run]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (model, runs) in zip(axes[0], results.items()):
        for name, r in runs.items():
            xs, ys = zip(*r.points)
            ax.plot(xs, ys, marker="o", ms=3, label=name)
        ax.set_title(model)
        ax.set_xlabel("step" if model == "gpt2" else "epoch")
        ax.set_ylabel("validation loss" if model == "gpt2" else "test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nwrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("gpt2", "resnet18", "all"), default="all")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--steps", type=int, default=300, help="GPT-2 training steps")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=3, help="ResNet-18 epochs")
    ap.add_argument("--png", default="fidelity.png")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0,
                    help="GPT-2 initialisation and batch order (another seed of plain training "
                         "measures the run-to-run spread the gaps compare with)")
    ap.add_argument("--opt-seed", type=int, default=None,
                    help="the packed optimizer's rounding seed (default: its own default); "
                         "another seed measures how much the gaps depend on the draws")
    ap.add_argument("--timing", type=int, default=0,
                    help="only time GPT-2 steps, plain against compressed activations, N rounds")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = [c for c in args.configs.split(",") if c]
    bad = set(configs) - set(CONFIGS)
    if bad:
        ap.error(f"unknown configs {sorted(bad)}")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    if args.timing:
        step_timing(args.timing, args.batch, args.seq)
        return 0
    results: Dict[str, Dict[str, Run]] = {}
    if args.model in ("gpt2", "all"):
        runs = {}
        for c in configs:
            runs[c] = train_gpt2(c, args.steps, args.eval_every, args.batch, args.seq,
                                 args.seed, args.opt_seed)
            paths = ", ".join(f"{k} {v}" for k, v in sorted(runs[c].paths.items()))
            print(f"  gpt2 {c}: done ({runs[c].step_time / runs[c].steps * 1e3:.0f} ms/step)"
                  + (f"; fused optimizer steps: {paths}" if paths else ""), flush=True)
        results["gpt2"] = runs
        report(f"GPT-2 (4x256, tied embeddings), stdlib text, batch {args.batch}x{args.seq}: "
               "validation loss", runs, "loss", relative=True)
    if args.model in ("resnet18", "all"):
        runs = {}
        for c in configs:
            runs[c] = train_resnet18(c, args.epochs, 64, args.opt_seed)
            paths = ", ".join(f"{k} {v}" for k, v in sorted(runs[c].paths.items()))
            print(f"  resnet18 {c}: done ({runs[c].step_time / runs[c].steps * 1e3:.0f} ms/step)"
                  + (f"; fused optimizer steps: {paths}" if paths else ""), flush=True)
        results["resnet18"] = runs
        report("ResNet-18 (3x3 stem), digits 32x32, batch 64: test accuracy (%) per epoch", runs,
               "accuracy", relative=False)
    if args.png:
        plot(args.png, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
