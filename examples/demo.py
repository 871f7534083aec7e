"""smaq_rs in one minute: compress a tensor and a trained model's weights into real packed bytes.

    make demo        (or: python examples/demo.py)

Every size printed is the length of bytes actually held (`PackedTensor.nbytes`, a file's size on
disk), never a bit count computed on the side.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import smaq_rs


def rel_rmse(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2)) / (np.std(b) or 1.0))


def one_tensor() -> None:
    print("== One tensor: 16M float32 values from N(0, 1) ==")
    x = np.random.default_rng(0).standard_normal(16 << 20, dtype=np.float32)
    t = time.perf_counter()
    p = smaq_rs.compress(x)  # SmaQ 6/8 bits, stochastic rounding
    t_enc = time.perf_counter() - t
    t = time.perf_counter()
    y = smaq_rs.decompress(p)
    t_dec = time.perf_counter() - t
    s = p.stats
    print(f"dense {x.nbytes:,} B -> packed {p.nbytes:,} B ({p.bits_per_value:.3f} bits/value, "
          f"{p.ratio:.2f}x smaller)")
    print(f"relative RMSE {rel_rmse(y, x):.4f}; outliers {s['n_outliers'] / x.size:.1%}; "
          f"beyond 2.5 sigma, kept on the grid in the escape stream: {s['n_escapes']:,} "
          f"({s['escape_bytes']:,} B), clamped: {s['n_clamped']:,}")
    print(f"encode {x.nbytes / t_enc / 1e9:.2f} GB/s, decode {x.nbytes / t_dec / 1e9:.2f} GB/s "
          f"(one run; `make bench` measures properly)")


def train_digits_mlp() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X / 16.0, y, test_size=0.25, random_state=0)
    Xtr, Xte = (torch.tensor(a, dtype=torch.float32) for a in (Xtr, Xte))
    ytr, yte = torch.tensor(ytr), torch.tensor(yte)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(30):
        for i in range(0, len(Xtr), 64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(Xtr[i:i + 64]), ytr[i:i + 64]).backward()
            opt.step()
    return model, Xte, yte


def accuracy(model, X, y) -> float:
    with torch.no_grad():
        return (model(X).argmax(1) == y).float().mean().item() * 100


def model_weights() -> None:
    print("\n== A small MLP trained on scikit-learn's digits, weights compressed with SmaQ ==")
    model, Xte, yte = train_digits_mlp()
    base = accuracy(model, Xte, yte)
    dense = packed_total = 0
    print(f"{'tensor':10} {'shape':>12} {'dense B':>9} {'packed B':>9} {'ratio':>6} {'rel.RMSE':>9}")
    packed = {}
    for name, w in model.state_dict().items():
        p = smaq_rs.compress(w, rounding="nearest")
        packed[name] = p
        dense += p.dense_nbytes
        packed_total += p.nbytes
        back = smaq_rs.decompress(p)
        print(f"{name:10} {str(tuple(w.shape)):>12} {p.dense_nbytes:9,} {p.nbytes:9,} "
              f"{p.ratio:6.2f} {rel_rmse(back, w):9.4f}")
    print(f"{'total':10} {'':>12} {dense:9,} {packed_total:9,} {dense / packed_total:6.2f}")
    model.load_state_dict({k: smaq_rs.decompress(p) for k, p in packed.items()})
    print(f"test accuracy: float32 {base:.2f}% -> SmaQ weights {accuracy(model, Xte, yte):.2f}%")


def checkpoint_on_disk() -> None:
    print("\n== A checkpoint on disk: torch.save vs smaq_rs.save (lossy and lossless) ==")
    torch.manual_seed(1)
    sd = {f"layer{i}.weight": torch.randn(512, 512) * 0.02 for i in range(8)}
    sd.update({f"layer{i}.bias": torch.zeros(512) for i in range(8)})
    with tempfile.TemporaryDirectory() as d:
        sizes = {}
        for label, save in [
            ("torch.save", lambda p: torch.save(sd, p)),
            ("smaq_rs.save (SmaQ 6/8)", lambda p: smaq_rs.save(sd, p)),
            ("smaq_rs.save (lossless)", lambda p: smaq_rs.save(sd, p, policy=smaq_rs.Policy.lossless())),
        ]:
            path = os.path.join(d, label.split()[0] + str(len(sizes)))
            save(path)
            sizes[label] = os.path.getsize(path)
            if label.startswith("smaq_rs"):
                back = smaq_rs.load(path)
                err = max(rel_rmse(back[k], v) for k, v in sd.items() if v.std() > 0)
                exact = all(torch.equal(back[k], v) for k, v in sd.items())
            else:
                err, exact = 0.0, True
            print(f"{label:26} {sizes[label]:>11,} B  {sizes['torch.save'] / sizes[label]:5.2f}x  "
                  f"{'bit-exact' if exact else f'max rel. RMSE {err:.4f}'}")


if __name__ == "__main__":
    one_tensor()
    model_weights()
    checkpoint_on_disk()
