"""Checkpoints of a pruned ResNet-18: file bytes with pruned tensors stored sparse or dense.

    python benches/bench_sparse_checkpoint.py

torchvision's ResNet-18 (random initialisation; its conv and fc weights pruned by magnitude to
each sparsity with ``smaq_rs.torch.prune.compute_mask``, unstructured, or 2:4 where 4 divides
the reduced dimension, which leaves the 3-channel stem dense) is saved with
``smaq_rs.save``: lossless and the default SmaQ 6/8 policy, each with sparse storage (the
default, ``Policy.sparse_min = 0.5``) and without (``sparse_min=None``), beside ``torch.save``.
The figures are the files' real sizes; lossless files are read back and compared bit for bit.
Nothing asserts: the figures are printed.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tempfile

import torch
import torchvision

import smaq_rs
from smaq_rs.bench import cpu_name
from smaq_rs.torch.prune import PatternError, compute_mask


def pruned_state(sparsity: float, pattern: str):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and sparsity > 0:
                try:
                    p.mul_(compute_mask(p.abs(), sparsity, pattern))
                except PatternError:  # 2:4 on the stem (3 x 7 x 7 inputs): left dense
                    pass
    return model.state_dict()


def main() -> None:
    print(f"# {cpu_name()}; torch {torch.__version__}; ResNet-18, 11.7M parameters")
    lossless, lossy = smaq_rs.Policy.lossless(), smaq_rs.Policy()
    dense = lambda p: dataclasses.replace(p, sparse_min=None)  # noqa: E731
    rows = [("torch.save", None), ("lossless, dense", dense(lossless)),
            ("lossless, sparse", lossless), ("SmaQ 6/8, dense", dense(lossy)),
            ("SmaQ 6/8, sparse", lossy)]
    cases = [(0.0, "unstructured"), (0.5, "2:4"), (0.9, "unstructured"), (0.98, "unstructured")]
    print("| storage | " + " | ".join(f"{s:.0%} {p}" for s, p in cases) + " |")
    print("|---|" + "---:|" * len(cases))
    sizes = {name: [] for name, _ in rows}
    with tempfile.TemporaryDirectory() as tmp:
        for s, pattern in cases:
            sd = pruned_state(s, pattern)
            for name, policy in rows:
                if policy is None:
                    buf = io.BytesIO()
                    torch.save(sd, buf)
                    sizes[name].append(buf.tell())
                    continue
                path = os.path.join(tmp, "c.smaq")
                smaq_rs.save(sd, path, policy=policy)
                sizes[name].append(os.path.getsize(path))
                if "lossless" in name:
                    back = smaq_rs.load(path)
                    assert all(torch.equal(back[k], v) for k, v in sd.items()), name
    for name, _ in rows:
        base = sizes["torch.save"]
        print(f"| {name} | " + " | ".join(f"{b / 1e6:.2f} MB ({t / b:.1f}x)"
                                         for b, t in zip(sizes[name], base)) + " |")


if __name__ == "__main__":
    main()
