"""Incremental checkpoints on real training: bytes, error and speed of ``save(..., base=...)``.

    python benches/bench_incremental.py [--warmup 30] [--steps 10] [--batch 8]

A GPT-2 (``transformers.GPT2LMHeadModel``: 4 layers, 256 wide, 4 heads, byte vocabulary 256,
tied embeddings; built by ``smaq_rs.train.data.build_model``) learns next bytes of Python's
standard library (``build_dataset("stdlib-text")``, windows of 64) with AdamW: ``--warmup``
steps at lr 1e-3 give the base, saved once lossless and once with the default SmaQ 6/8 policy.
Then, each from the base (model and optimizer restored):

(a) fine-tuning with the embeddings and the first two blocks frozen, ``--steps`` steps at lr
    1e-4: the incremental lossless checkpoint vs the lossless checkpoint of the trainable tensors
    alone (what an ideal incremental file would hold);
(b) everything trainable, ``--steps`` steps at lr 1e-4 and at 1e-3: incremental lossless vs a
    full lossless checkpoint, with save and load speeds (dense GB/s, best of 3);
(c) the lr 1e-4 weights saved lossily: lossy residuals against the SmaQ base vs full lossy
    copies, file bytes and the relative RMSE (sqrt of sum of squared errors over sum of
    squares, over every float tensor) of the reloaded weights vs the true ones;
(d) a chain: the base plus 4 checkpoints, ``--steps`` steps at lr 1e-4 apart, each against the
    previous: total bytes vs independent full checkpoints, load time of the last, and (lossy)
    the error at each link.

Sizes are the files' real byte lengths; every lossless file is read back and compared bit for
bit. Nothing asserts a goal: the figures are printed.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Tuple

import torch

import smaq_rs
from smaq_rs.bench import best_seconds, cpu_name
from smaq_rs.train.data import build_dataset, build_model

SD = Dict[str, torch.Tensor]


class Trainer:
    """The model, its AdamW optimizer and the data; ``state()`` / ``restore()`` for branching."""

    def __init__(self, batch: int):
        torch.manual_seed(0)
        self.data = build_dataset("stdlib-text", seq=64)
        self.model = build_model("gpt2", self.data, layers=4, width=256, heads=4)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.gen = torch.Generator().manual_seed(0)
        self.batch = batch

    def steps(self, n: int, lr: float) -> float:
        for g in self.opt.param_groups:
            g["lr"] = lr
        loss = torch.zeros(())
        for _ in range(n):
            x, y = self.data.batch(torch.randint(0, self.data.n_train, (self.batch,),
                                                 generator=self.gen))
            logits = self.model(x)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256),
                                                     y[:, 1:].reshape(-1))
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
        return loss.item()

    def weights(self) -> SD:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def snapshot(self) -> Tuple[SD, Dict[str, Any]]:
        return self.weights(), copy.deepcopy(self.opt.state_dict())

    def restore(self, snap: Tuple[SD, Dict[str, Any]]) -> None:
        self.model.load_state_dict(snap[0])
        self.opt.load_state_dict(copy.deepcopy(snap[1]))
        for p in self.model.parameters():
            p.requires_grad_(True)


def rel_rmse(back: SD, true: SD) -> float:
    num = den = 0.0
    for k, v in true.items():
        if v.is_floating_point():
            num += (back[k].double() - v.double()).pow(2).sum().item()
            den += v.double().pow(2).sum().item()
    return (num / den) ** 0.5


def same(back: SD, true: SD) -> bool:
    return all(torch.equal(back[k], v) for k, v in true.items())


def dense_bytes(sd: SD) -> int:
    return sum(v.numel() * v.element_size() for v in sd.values())


def main(argv: List[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--warmup", type=int, default=30, help="steps at lr 1e-3 before the base")
    ap.add_argument("--steps", type=int, default=10, help="steps after the base (and per link)")
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    print(f"# {cpu_name()}; torch {torch.__version__}")
    print(f"# command: python benches/bench_incremental.py {' '.join(argv)}".rstrip())
    tr = Trainer(a.batch)
    t0 = time.perf_counter()
    loss = tr.steps(a.warmup, 1e-3)
    base_snap = tr.snapshot()
    base = base_snap[0]
    n_params = sum(v.numel() for v in base.values())
    print(f"# GPT-2 4x256, {n_params / 1e6:.2f}M values ({dense_bytes(base) / 1e6:.1f} MB "
          f"float32); base after {a.warmup} AdamW steps (loss {loss:.2f}, "
          f"{time.perf_counter() - t0:.0f} s)")
    lossless, lossy = smaq_rs.Policy.lossless(), smaq_rs.Policy()
    with tempfile.TemporaryDirectory() as tmp:
        p = lambda name: os.path.join(tmp, name)  # noqa: E731
        smaq_rs.save(base, p("base.smaq"), policy=lossless)
        smaq_rs.save(base, p("base_lossy.smaq"), policy=lossy)

        # (a) fine-tuning with frozen embeddings and first half of the blocks
        tr.restore(base_snap)
        frozen = ("inner.transformer.wte", "inner.transformer.wpe", "inner.transformer.h.0.",
                  "inner.transformer.h.1.")
        for name, prm in tr.model.named_parameters():
            prm.requires_grad_(not name.startswith(frozen))
        trainable = {n for n, prm in tr.model.named_parameters() if prm.requires_grad}
        tr.steps(a.steps, 1e-4)
        ft = tr.weights()
        s = smaq_rs.save(ft, p("ft.smaq"), policy=lossless, base=p("base.smaq"))
        part = smaq_rs.save({k: v for k, v in ft.items() if k in trainable}, p("part.smaq"),
                            policy=lossless)
        full = smaq_rs.save(ft, p("ft_full.smaq"), policy=lossless)
        assert same(smaq_rs.load(p("ft.smaq")), ft)
        print(f"\n## (a) fine-tuning, embeddings and blocks 0-1 frozen, {a.steps} steps at lr 1e-4"
              f" ({len(s['from_base'])} tensors from the base)\n")
        print("| checkpoint | bytes | vs trainable part |")
        print("|---|---:|---:|")
        for label, b in (("full lossless", full["nbytes"]),
                         ("lossless of the trainable tensors alone", part["nbytes"]),
                         ("incremental lossless (delta)", s["nbytes"])):
            print(f"| {label} | {b / 1e6:.3f} MB | {b / part['nbytes'] - 1:+.1%} |")

        # (b) everything trainable
        print(f"\n## (b) everything trainable, {a.steps} AdamW steps after the base\n")
        print("| lr | full lossless | incremental lossless | smaller by | codes | save GB/s "
              "full / delta | load GB/s full / delta |")
        print("|---|---:|---:|---:|---|---:|---:|")
        after: Dict[float, SD] = {}
        for lr in (1e-4, 1e-3):
            tr.restore(base_snap)
            tr.steps(a.steps, lr)
            after[lr] = w = tr.weights()
            f = smaq_rs.save(w, p("full.smaq"), policy=lossless)
            s = smaq_rs.save(w, p("inc.smaq"), policy=lossless, base=p("base.smaq"))
            assert same(smaq_rs.load(p("inc.smaq")), w) and same(smaq_rs.load(p("full.smaq")), w)
            ops: Dict[str, int] = {}
            for rec in s["deltas"].values():
                ops[rec["op"]] = ops.get(rec["op"], 0) + 1
            whole = len(w) - len(s["deltas"]) - len(s["from_base"])
            codes = ", ".join(f"{n} {o}" for o, n in sorted(ops.items())) + f", {whole} whole"
            gb = dense_bytes(w) / 1e9
            ts = [best_seconds(lambda: smaq_rs.save(w, p("full.smaq"), policy=lossless, durable=False)),
                  best_seconds(lambda: smaq_rs.save(w, p("inc.smaq"), policy=lossless,
                                            base=p("base.smaq"), durable=False))]
            tl = [best_seconds(lambda: smaq_rs.load(p("full.smaq"))),
                  best_seconds(lambda: smaq_rs.load(p("inc.smaq")))]
            print(f"| {lr:g} | {f['nbytes'] / 1e6:.3f} MB | {s['nbytes'] / 1e6:.3f} MB | "
                  f"{f['nbytes'] / s['nbytes']:.3f}x | {codes} | {gb / ts[0]:.2f} / "
                  f"{gb / ts[1]:.2f} | {gb / tl[0]:.2f} / {gb / tl[1]:.2f} |")

        # (c) lossy residuals
        w = after[1e-4]
        print(f"\n## (c) lossy, the lr 1e-4 weights ({a.steps} steps after the SmaQ 6/8 base)\n")
        print("| storage | bytes | relative RMSE vs the true weights |")
        print("|---|---:|---:|")
        variants = [("SmaQ 6/8 (default)", lossy),
                    ("SmaQ 4/6", smaq_rs.Policy.for_codec("smaq", bits_main=4, bits_outlier=6)),
                    ("int8 blockwise (256)", smaq_rs.Policy(codec="int", params={"bits": 8})),
                    ("int4 blockwise (256)", smaq_rs.Policy(codec="int", params={"bits": 4}))]
        for label, pol in variants:
            pb = p("vbase.smaq")
            if pol is lossy:
                pb = p("base_lossy.smaq")
            else:
                smaq_rs.save(base, pb, policy=pol)
            f = smaq_rs.save(w, p("lfull.smaq"), policy=pol)
            r = smaq_rs.save(w, p("lres.smaq"), policy=pol, base=pb)
            print(f"| full copy, {label} | {f['nbytes'] / 1e6:.3f} MB | "
                  f"{rel_rmse(smaq_rs.load(p('lfull.smaq')), w):.2e} |")
            print(f"| residual vs its base, {label} | {r['nbytes'] / 1e6:.3f} MB | "
                  f"{rel_rmse(smaq_rs.load(p('lres.smaq')), w):.2e} |")

        # (d) chains
        tr.restore(base_snap)
        links = [base]
        for _ in range(4):
            tr.steps(a.steps, 1e-4)
            links.append(tr.weights())
        print(f"\n## (d) a chain of 5: the base, then 4 checkpoints {a.steps} steps at lr 1e-4 "
              "apart, each against the previous\n")
        print("| policy | chain total | independent full total | ratio | load last: chain / "
              "full | relative RMSE per link (chain; full copies) |")
        print("|---|---:|---:|---:|---:|---|")
        for label, pol in (("lossless", lossless), ("SmaQ 6/8", lossy)):
            chain = indep = 0
            errs: List[str] = []
            for k, sd in enumerate(links):
                c = smaq_rs.save(sd, p(f"c{k}.smaq"), policy=pol,
                                 base=p(f"c{k - 1}.smaq") if k else None)
                f = smaq_rs.save(sd, p(f"f{k}.smaq"), policy=pol)
                chain += c["nbytes"]
                indep += f["nbytes"]
                back = smaq_rs.load(p(f"c{k}.smaq"))
                if pol is lossless:
                    assert same(back, sd)
                else:
                    errs.append(f"{rel_rmse(back, sd):.1e} ({rel_rmse(smaq_rs.load(p(f'f{k}.smaq')), sd):.1e})")
            tc = best_seconds(lambda: smaq_rs.load(p("c4.smaq")))
            tf = best_seconds(lambda: smaq_rs.load(p("f4.smaq")))
            print(f"| {label} | {chain / 1e6:.2f} MB | {indep / 1e6:.2f} MB | "
                  f"{indep / chain:.2f}x | {tc * 1e3:.0f} ms / {tf * 1e3:.0f} ms | "
                  f"{'; '.join(errs) if errs else 'bit-exact'} |")


if __name__ == "__main__":
    main(sys.argv[1:])
