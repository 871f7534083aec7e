"""Prune a ResNet-18 on scikit-learn's digits: 90% unstructured and 2:4, against a dense fine-tune.

    python examples/prune_resnet_digits.py [--epochs 5] [--finetune-epochs 6] [--image-size 16]
                                           [--threads 1] [--seed 0] [--quick]

1. Dense training: torchvision's ResNet-18 adapted to small images (3x3 stride-1 stem, no
   max-pool; ``smaq_rs.train.build_model("resnet18", ...)``) on the digits upsampled to
   ``--image-size`` (``smaq_rs.train.build_dataset("digits", ...)``: its fixed 75/25 train/test
   split), AdamW, ``--epochs`` epochs.
2. From that same dense checkpoint, three fine-tunes of the same length (``--finetune-epochs``),
   the same optimizer settings and the same batch order:

   - ``dense``: plain fine-tuning (the baseline);
   - ``90% unstructured``: :class:`smaq_rs.torch.prune.Pruner`, magnitude scores, cubic schedule
     from 0 to 90% over the first ``--prune-fraction`` of the fine-tune steps;
   - ``2:4``: the same schedule up to 2:4 (50%; at the end every group of 4 consecutive weights
     along the reduced dimension holds exactly 2 non-zeros).

   Every Conv2d and the Linear classifier are pruned, except the stem convolution (3 input
   channels x 3 x 3 = 27 reduced weights: 4 does not divide it, so 2:4 cannot apply; it is left
   dense in both pruned variants). Once the schedule has reached its target,
   :func:`smaq_rs.torch.sparse.swap_modules_with_sparse` times each pruned layer dense and sparse
   on the model's own input shapes and replaces those measured faster (its report is printed);
   the rest of the fine-tune trains whatever it swapped (the optimizer state of a swapped layer is
   carried over to its non-zeros) while the pruner keeps the masks of the layers left dense.

The table: test accuracy, its difference to the dense fine-tune in points, the measured sparsity
of the pruned layers (zeros / weights over all of them, and the lowest layer), the fine-tune's
wall time (with, given apart, the time in the pruner's callbacks: mask updates and
applications, and the time of the swap's timing probe), and the process's resident memory
during the fine-tune: its peak (the kernel's high-water mark, VmHWM, reset at the start of the
fine-tune with ``smaq_rs.torch.reset_peak_rss``) and its growth over the resident memory at
that start. The
three fine-tunes run in one process one after the other, so the peak includes the interpreter
and libraries, the data, the dense checkpoint, the models of the earlier fine-tunes (kept for
:func:`main`'s result) and whatever the allocator kept from them; the growth is what the
fine-tune itself added. Every figure is measured in this run; the CPU and the load average are
printed (the machine may be shared). No download.

``--quick`` replaces the sizes by :data:`QUICK` (the tests' configuration); the other flags apply
as given.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn import functional as F

import smaq_rs
from smaq_rs.bench import cpu_name
from smaq_rs.torch import peak_rss, reset_peak_rss
from smaq_rs.torch.prune import Pruner
from smaq_rs.torch.sparse import SparseConv2d, SwapReport, swap_modules_with_sparse
from smaq_rs.train import build_dataset, build_model
from smaq_rs.train.data import Dataset

__all__ = ["QUICK", "VARIANTS", "VariantResult", "build_parser", "evaluate", "main"]

#: The pruned variants: name -> Pruner settings (the schedule's steps are added per run).
VARIANTS: Dict[str, Dict[str, Any]] = {
    "90% unstructured": {"target_sparsity": 0.9, "pattern": "unstructured"},
    "2:4": {"target_sparsity": 0.5, "pattern": "2:4"},
}
#: Modules no variant prunes: the stem convolution (27 reduced weights, not a multiple of 4).
EXCLUDED = ["conv1"]
#: ``--quick``: a configuration for tests (tiny images, short runs, one timing repeat).
QUICK: Dict[str, Any] = {"image_size": 8, "epochs": 1, "finetune_epochs": 0.5, "batch_size": 64,
                         "swap_repeats": 1}


@dataclasses.dataclass
class VariantResult:
    """One fine-tune: what was measured, and the model and masks it ended with (``masks``: the
    pruner's keep-masks once the schedule reached its target; ``at_swap``: the weights of the
    layers swapped to sparse ones, as they were at the swap)."""

    name: str
    accuracy: float
    seconds: float
    swap_seconds: float
    prune_seconds: float
    rss_start: int
    rss_peak: int
    model: nn.Module
    masks: Dict[str, torch.Tensor]
    layer_sparsity: Dict[str, float]
    swap_report: Optional[SwapReport]
    at_swap: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    pattern: Optional[str] = None
    target: float = 0.0
    prune_end_step: int = 0

    @property
    def sparsity(self) -> float:
        """Zeros over weights, all pruned layers together (0 for the dense variant)."""
        return _overall_sparsity(self.model, list(self.layer_sparsity))


def build_parser() -> argparse.ArgumentParser:
    """The example's command-line flags."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=float, default=5.0, help="dense training epochs")
    ap.add_argument("--finetune-epochs", type=float, default=6.0,
                    help="epochs of each of the three fine-tunes")
    ap.add_argument("--prune-fraction", type=float, default=0.5,
                    help="the schedule reaches its target after this fraction of the fine-tune")
    ap.add_argument("--prune-frequency", type=int, default=0,
                    help="steps between mask updates (0: a quarter of an epoch)")
    ap.add_argument("--image-size", type=int, default=16, help="digits upsampled to this")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (training)")
    ap.add_argument("--finetune-lr", type=float, default=5e-4, help="AdamW learning rate "
                    "(fine-tunes)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and smaq_rs threads (default 1: on a 2-core machine shared with "
                         "other jobs two threads wait on each other; 2 is faster on a quiet one)")
    ap.add_argument("--seed", type=int, default=0, help="model initialisation and batch order")
    ap.add_argument("--swap-repeats", type=int, default=3,
                    help="timed runs per layer in swap_modules_with_sparse")
    ap.add_argument("--quick", action="store_true",
                    help="the small configuration of the tests: " + ", ".join(
                        f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    return ap


def _check_args(a: argparse.Namespace) -> None:
    if not (a.epochs > 0 and a.finetune_epochs > 0):
        raise ValueError(f"--epochs and --finetune-epochs must be > 0, found {a.epochs} and "
                         f"{a.finetune_epochs}")
    if not 0.0 < a.prune_fraction < 1.0:
        raise ValueError(f"--prune-fraction must be in (0, 1) (the swapped model needs steps "
                         f"after it), found {a.prune_fraction}")
    for k in ("batch_size", "threads", "swap_repeats"):
        if getattr(a, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be >= 1, found {getattr(a, k)}")
    if a.prune_frequency < 0:
        raise ValueError(f"--prune-frequency must be >= 0, found {a.prune_frequency}")


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Fraction of ``x`` classified as ``y`` (eval mode; the model's mode is restored)."""
    was = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    model.train(was)
    return correct / len(y)


def _batches(data: Dataset, batch: int, steps: int, seed: int) -> List[torch.Tensor]:
    """Index batches of ``steps`` steps: a fresh permutation of the training set per epoch,
    drawn from ``seed`` (so every fine-tune sees the same batches)."""
    n = data.n_train
    g = torch.Generator().manual_seed(seed)
    out: List[torch.Tensor] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=g)
        out += [perm[i:i + batch] for i in range(0, n - batch + 1, batch)]
    return out[:steps]


def _steps(data: Dataset, batch: int, epochs: float) -> int:
    return max(1, round(epochs * (data.n_train // batch)))


def _step(model: nn.Module, opt: torch.optim.Optimizer, data: Dataset,
          idx: torch.Tensor) -> float:
    x, y = data.batch(idx)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    return float(loss.detach())


def _weight(module: nn.Module) -> torch.Tensor:
    """The dense weight of a torch or smaq_rs sparse layer."""
    return module.weight.detach()


def _overall_sparsity(model: nn.Module, names: Sequence[str]) -> float:
    zeros = total = 0
    for name in names:
        w = _weight(model.get_submodule(name))
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / total if total else 0.0


def _layer_sparsity(model: nn.Module, names: Sequence[str]) -> Dict[str, float]:
    out = {}
    for name in names:
        w = _weight(model.get_submodule(name))
        out[name] = float((w == 0).float().mean())
    return out


def _carry_optimizer(opt: torch.optim.Optimizer,
                     swapped: Dict[str, Tuple[nn.Module, nn.Module]]) -> None:
    """Points ``opt`` at the parameters of the swapped sparse layers in place of the dense ones
    they replace, with their state: a weight's per-element state (AdamW's moments) gathered at
    its non-zeros, in CSR order (row-major, as the sparse layer stores its values), a bias's
    state as it was."""
    moved: Dict[nn.Parameter, nn.Parameter] = {}
    for dense, sparse in swapped.values():
        lin = sparse.linear if isinstance(sparse, SparseConv2d) else sparse
        w = dense.weight
        moved[w] = lin.values
        keep = (w.detach() != 0).reshape(-1)
        if w in opt.state:
            opt.state[lin.values] = {
                k: (v.reshape(-1)[keep].clone() if torch.is_tensor(v) and v.shape == w.shape
                    else v)
                for k, v in opt.state.pop(w).items()}
        if dense.bias is not None and lin.bias is not None:
            moved[dense.bias] = lin.bias
            if dense.bias in opt.state:
                opt.state[lin.bias] = opt.state.pop(dense.bias)
    for group in opt.param_groups:
        group["params"] = [moved.get(p, p) for p in group["params"]]


def _train_dense(data: Dataset, a: argparse.Namespace) -> nn.Module:
    torch.manual_seed(a.seed)
    model = build_model("resnet18", data)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr)
    steps = _steps(data, a.batch_size, a.epochs)
    for i, idx in enumerate(_batches(data, a.batch_size, steps, a.seed)):
        loss = _step(model, opt, data, idx)
        opt.step()
        if (i + 1) % max(1, steps // 5) == 0 or i + 1 == steps:
            print(f"  dense training step {i + 1}/{steps} loss {loss:.4f}", flush=True)
    return model


def _fine_tune(name: str, state: Dict[str, torch.Tensor], data: Dataset,
               a: argparse.Namespace) -> VariantResult:
    """One fine-tune from the dense checkpoint ``state``; ``name`` is "dense" or a key of
    :data:`VARIANTS`."""
    gc.collect()
    reset_peak_rss()
    rss_start = peak_rss()  # right after the reset, the high-water mark is the current RSS
    t0 = time.perf_counter()
    model = build_model("resnet18", data)
    model.load_state_dict(state)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=a.finetune_lr)
    steps = _steps(data, a.batch_size, a.finetune_epochs)
    spe = data.n_train // a.batch_size
    pruner: Optional[Pruner] = None
    cfg = VARIANTS.get(name)
    end = 0
    if cfg is not None:
        end = max(1, min(steps - 1, round(a.prune_fraction * steps)))
        freq = a.prune_frequency or max(1, spe // 4)
        pruner = Pruner(model, dict(cfg, method="magnitude", schedule="cubic", start_step=0,
                                    end_step=end, frequency=freq, excluded=EXCLUDED))
        pruner.on_train_begin()
    pruned = [t.name for t in pruner.targets] if pruner else []
    masks: Dict[str, torch.Tensor] = {}
    report: Optional[SwapReport] = None
    at_swap: Dict[str, torch.Tensor] = {}
    swap_s = prune_s = 0.0
    for i, idx in enumerate(_batches(data, a.batch_size, steps, a.seed + 1)):
        if pruner is not None:
            tp = time.perf_counter()
            pruner.on_step_begin()
            prune_s += time.perf_counter() - tp
        loss = _step(model, opt, data, idx)
        if pruner is not None:
            tp = time.perf_counter()
            pruner.on_before_optimizer_step()
            prune_s += time.perf_counter() - tp
        opt.step()
        if pruner is not None:
            tp = time.perf_counter()
            pruner.on_after_optimizer_step()
            prune_s += time.perf_counter() - tp
            if report is None and pruner.step_count > end:
                # The schedule is at its target: swap what measures faster, keep training it.
                masks = {k: v.clone() for k, v in pruner.masks().items()}
                print(f"  {name}: target reached at step {pruner.step_count}; "
                      f"swap_modules_with_sparse:", flush=True)
                before = dict(model.named_modules())
                ts = time.perf_counter()
                report = swap_modules_with_sparse(
                    model, (a.batch_size, 3, a.image_size, a.image_size),
                    min_sparsity=cfg["target_sparsity"] - 0.01, verbose=True,
                    repeats=a.swap_repeats)
                swap_s = time.perf_counter() - ts
                swapped = {n: (before[n], model.get_submodule(n)) for n in report.swapped}
                at_swap = {n: _weight(before[n]).clone() for n in swapped}
                pruner.targets = [t for t in pruner.targets if t.name not in swapped]
                _carry_optimizer(opt, swapped)
                print(f"  {name}: swapped {len(swapped)} of {len(pruned)} pruned layers "
                      f"({', '.join(swapped) or 'none'})", flush=True)
        if (i + 1) % max(1, steps // 4) == 0 or i + 1 == steps:
            print(f"  {name}: fine-tune step {i + 1}/{steps} loss {loss:.4f}", flush=True)
    if pruner is not None:
        pruner.on_train_end()
    seconds = time.perf_counter() - t0
    rss_peak = peak_rss()
    acc = evaluate(model, data.x_val, data.y_val)
    return VariantResult(
        name=name, accuracy=acc, seconds=seconds, swap_seconds=swap_s, prune_seconds=prune_s,
        rss_start=rss_start,
        rss_peak=rss_peak, model=model, masks=masks,
        layer_sparsity=_layer_sparsity(model, pruned), swap_report=report, at_swap=at_swap,
        pattern=None if cfg is None else cfg["pattern"],
        target=0.0 if cfg is None else cfg["target_sparsity"], prune_end_step=end)


def _table(results: List[VariantResult]) -> str:
    dense = results[0].accuracy
    lines = ["| variant | test accuracy | vs dense (points) | sparsity of pruned layers (lowest) "
             "| fine-tune s (pruner; swap probe) | RSS peak MB (growth) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        sp = (f"{r.sparsity:.4f} ({min(r.layer_sparsity.values()):.4f})"
              if r.layer_sparsity else "-")
        lines.append(
            f"| {r.name} | {100 * r.accuracy:.2f}% | {100 * (r.accuracy - dense):+.2f} | {sp} | "
            f"{r.seconds:.1f} ({r.prune_seconds:.1f}; {r.swap_seconds:.1f}) | "
            f"{r.rss_peak / 2**20:.0f} "
            f"(+{(r.rss_peak - r.rss_start) / 2**20:.0f}) |")
    return "\n".join(lines)


def _load() -> str:
    """The 1, 5 and 15 minute load averages (the machine may be shared)."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Runs the example with command-line ``argv``; prints the table and returns
    ``{"dense_accuracy", "results": [VariantResult...], "data", "args"}``."""
    a = build_parser().parse_args(list(argv) if argv is not None else None)
    if a.quick:
        for k, v in QUICK.items():
            setattr(a, k, v)
    _check_args(a)
    torch.set_num_threads(a.threads)
    smaq_rs.set_num_threads(a.threads)
    data = build_dataset("digits", image_size=a.image_size)
    print(f"# {cpu_name()}; torch {torch.__version__}; {a.threads} threads; digits "
          f"{a.image_size}x{a.image_size}: {data.n_train} train / {len(data.y_val)} test; "
          f"load {_load()}", flush=True)
    t0 = time.perf_counter()
    dense_model = _train_dense(data, a)
    dense_acc = evaluate(dense_model, data.x_val, data.y_val)
    print(f"dense training: {time.perf_counter() - t0:.1f} s, test accuracy "
          f"{100 * dense_acc:.2f}%", flush=True)
    state = copy.deepcopy(dense_model.state_dict())
    del dense_model
    results = [_fine_tune(name, state, data, a) for name in ["dense", *VARIANTS]]
    cmd = " ".join(["python", "examples/prune_resnet_digits.py", *(argv if argv is not None
                                                                     else sys.argv[1:])])
    print(f"\n$ {cmd}\n# {cpu_name()}, {a.threads} threads, load {_load()}; dense checkpoint "
          f"{100 * dense_acc:.2f}%; fine-tunes of {_steps(data, a.batch_size, a.finetune_epochs)}"
          f" steps (batch {a.batch_size}), pruning schedule over the first "
          f"{results[1].prune_end_step}")
    print(_table(results))
    return {"dense_accuracy": dense_acc, "results": results, "data": data, "args": a}


if __name__ == "__main__":
    main()
