"""Train a small CNN on scikit-learn's digits, plainly and with packed memory, side by side.

    python examples/train_digits.py [--epochs 12] [--seed 0] [--threads 1]

Run 1 ("plain"): torch.optim.Adam, activations kept by autograd as usual (counted, not packed).
Run 2 ("smaq"):  smaq_rs.torch.Adam (exp_avg / exp_avg_sq packed with SmaQ 6/8) and
                 compressed_activations (what autograd saves for backward packed with SmaQ 6/8,
                 nearest rounding).
Both start from the same weights and see the same batches. Prints test accuracy, median step
time and the MemoryMeter table of each run (bytes from real buffers). No download: the digits
ship with scikit-learn.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Dict

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import smaq_rs
import smaq_rs.torch as st


def load_digits_tensors(seed: int = 0):
    """(x_train, y_train, x_test, y_test): 8x8 images scaled to [0, 1], a fixed 75/25 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.75 * len(x))
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[te], y[te]


class DigitsCNN(nn.Module):
    """conv 1->16, conv 16->32, 2x2 max-pool, linear 512->128->10 (72k parameters)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def train(compressed: bool, epochs: int = 12, seed: int = 0, batch: int = 128, lr: float = 3e-3,
          data=None) -> Dict[str, Any]:
    """Trains one run; returns accuracy, step times and the meter."""
    x_tr, y_tr, x_te, y_te = data if data is not None else load_digits_tensors(seed)
    torch.manual_seed(seed)
    model = DigitsCNN()
    if compressed:
        opt = st.Adam(model.parameters(), lr=lr, min_numel=1024, seed=seed)
        acts = st.compressed_activations(codec="smaq", rounding="nearest", model=model)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        acts = st.compressed_activations(codec=None, model=model)  # counts only
    meter = st.MemoryMeter(model, opt, activations=acts)
    order = torch.Generator().manual_seed(seed + 1)
    times = []
    for _ in range(epochs):
        perm = torch.randperm(len(x_tr), generator=order)
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            t0 = time.perf_counter()
            with acts:
                loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            meter.step()
            opt.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    return {"accuracy": acc, "step_ms": 1e3 * statistics.median(times), "meter": meter,
            "steps": len(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for torch and for the codec (default 1: this model is tiny, "
                         "and spinning thread pools slow everything down on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    smaq_rs.set_num_threads(args.threads)
    data = load_digits_tensors(args.seed)
    runs = {}
    for name, comp in (("plain", False), ("smaq", True)):
        t0 = time.perf_counter()
        runs[name] = train(comp, epochs=args.epochs, seed=args.seed, data=data)
        runs[name]["wall_s"] = time.perf_counter() - t0
    print(f"digits CNN, {runs['plain']['steps']} steps of batch 128, seed {args.seed}")
    print(f"{'run':<8}{'test acc':>10}{'median step ms':>16}{'wall s':>9}")
    for name, r in runs.items():
        print(f"{name:<8}{100 * r['accuracy']:>9.2f}%{r['step_ms']:>16.2f}{r['wall_s']:>9.1f}")
    print(f"step time ratio smaq/plain: {runs['smaq']['step_ms'] / runs['plain']['step_ms']:.2f}x")
    # The last step of each run: same tensors, same batch size.
    recs = {n: r["meter"].records[-2] for n, r in runs.items()}
    print()
    print(st.format_table(recs))
    a = recs["smaq"]["activations"]
    o = recs["smaq"]["optimizer"]
    print(f"\nsaved activations held {a['ratio']:.2f}x smaller than dense, optimizer state "
          f"{o['ratio']:.2f}x smaller (real packed bytes)")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
