"""NNW-BDI on a small MLP trained on scikit-learn's digits (shipped with scikit-learn: no
download). Trains the network, compresses every weight and bias tensor with NNW-BDI, loads them
back and compares test accuracy and the measured packed size (the sum of ``.nbytes`` of the
packed tensors, headers and checksums included) with float32.

    python examples/digits_bdi.py
"""

from __future__ import annotations

import sys
from typing import Any, Dict

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

import smaq_rs

#: The NNW-BDI settings of the reported result: an 8-bit affine grid downscaled by 3 bits (a
#: 5-bit grid), immediates and up to one base with 1..5-bit deltas, no zero mask.
PARAMS: Dict[str, Any] = dict(
    bits=8, scale_init=3, num_bases=1, base_bits="8", max_delta_bits=5, zero_mask="off",
)


def train(hidden: int = 256, seed: int = 0):
    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.data / 16.0, d.target, test_size=0.3,
                                          random_state=seed, stratify=d.target)
    clf = MLPClassifier(hidden_layer_sizes=(hidden,), max_iter=300, random_state=seed)
    clf.fit(xtr, ytr)
    return clf, xte, yte


def run(hidden: int = 256, seed: int = 0, **params: Any) -> Dict[str, Any]:
    params = {**PARAMS, "seed": 1, **params}
    clf, xte, yte = train(hidden, seed)
    base_acc = float((clf.predict(xte) == yte).mean())
    tensors = [np.ascontiguousarray(a, dtype=np.float32) for a in clf.coefs_ + clf.intercepts_]
    packed = [smaq_rs.compress(t, "nnw_bdi", **params) for t in tensors]
    packed = [smaq_rs.PackedTensor.from_bytes(p.to_bytes()) for p in packed]  # real bytes
    back = [smaq_rs.decompress(p) for p in packed]
    k = len(clf.coefs_)
    clf.coefs_ = [b.astype(np.float64) for b in back[:k]]
    clf.intercepts_ = [b.astype(np.float64) for b in back[k:]]
    acc = float((clf.predict(xte) == yte).mean())
    dense = sum(t.nbytes for t in tensors)
    size = sum(p.nbytes for p in packed)
    return dict(params=sum(t.size for t in tensors), accuracy_fp32=base_acc,
                accuracy_bdi=acc, fp32_bytes=dense, bdi_bytes=size, ratio=dense / size,
                raw_blocks=sum(p.stats["n_raw_blocks"] for p in packed),
                blocks=sum(p.stats["n_blocks"] for p in packed))


def main() -> int:
    r = run()
    print(f"MLP 64-256-10 on digits: {r['params']} parameters")
    print(f"test accuracy: float32 {100 * r['accuracy_fp32']:.2f}%, "
          f"NNW-BDI {100 * r['accuracy_bdi']:.2f}% "
          f"(difference {100 * (r['accuracy_bdi'] - r['accuracy_fp32']):+.2f} points)")
    print(f"size: float32 {r['fp32_bytes']} bytes, NNW-BDI {r['bdi_bytes']} bytes "
          f"(measured .nbytes): {r['ratio']:.2f}x smaller, "
          f"{100 * (1 - 1 / r['ratio']):.1f}% saved; {r['raw_blocks']} of {r['blocks']} "
          "blocks stored raw")
    print(f"NNW-BDI parameters: {PARAMS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
