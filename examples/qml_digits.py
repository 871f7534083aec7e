"""QML's tables in form on scikit-learn's digits, then post-training quantization (PTQ).

    python examples/qml_digits.py [--epochs 6,12] [--workers 8] [--spw 16] [--gpt2-steps 200]
                                  [--threads 1] [--optim adam|sgd] [--skip-gpt2]

1. Quantization (QML "everything quantized"): the digits CNN of examples/train_digits.py with all
   eight data paths of its four layers (qx qdx qy qdy qw qdw qb qdb) quantized by one quantizer:
   none, FloatingPoint with 2 mantissa bits (8 exponent bits, as float32's), Int8/6/5/4/3/2
   (per-row min-max); then two smaq_rs codecs through CodecQuantizer, their packed bytes made
   and decoded on every path (int8 affine min-max per block of 256; bf16). Test accuracy after each
   epoch count of --epochs.
2. Aggregation (QML "reduced precision gradient sharing"): the same CNN with float32 arithmetic,
   the weight and bias gradients summed by HsumAccumulator([(spw, q), (workers, Identity)]):
   each of the simulated workers' gradient (its spw consecutive samples of the batch of
   workers x spw) is quantized with q before the sum.
3. PTQ of the trained fp32 CNN (smaq_rs.torch.ptq): int8 / int4 weights packed per output
   channel, static (min-max, percentile, MSE calibration on 4 training batches) and dynamic
   activations, against fp32 and torch.ao.quantization.quantize_dynamic (where it still runs).
   Bytes: the packed weights, and torch.save of the whole state_dict for every row.
4. Dynamic PTQ of a small GPT-2 byte model (transformers GPT2LMHeadModel, 4 layers, 128 wide)
   trained --gpt2-steps steps on the Python standard library's sources: validation loss.

Every figure is measured in this run; the CPU is printed. No download.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import warnings
from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_digits import DigitsCNN, load_digits_tensors  # noqa: E402

from smaq_rs.bench import cpu_name  # noqa: E402
from smaq_rs.train.data import stdlib_text  # noqa: E402
from smaq_rs.torch import ptq  # noqa: E402
from smaq_rs.torch.qml import (  # noqa: E402
    CodecQuantizer, FloatingPointQuantizer, HsumAccumulator, Identity, IntQuantizer, PrefixBundle, Quantizer,
    quantize_model,
)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def train_cnn(data, epochs: List[int], bundle: Optional[PrefixBundle], batch: int,
              seed: int = 0, optim: str = "adam") -> Tuple[nn.Module, List[float], float]:
    """Trains the digits CNN (QML layers when ``bundle``); accuracy after each of ``epochs``."""
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)
    model = DigitsCNN()
    if bundle is not None:
        quantize_model(model, bundle)
    if optim == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    order = torch.Generator().manual_seed(seed + 1)
    accs, t0 = [], time.perf_counter()
    for ep in range(1, max(epochs) + 1):
        perm = torch.randperm(len(x_tr), generator=order)
        for i in range(0, len(perm) - batch + 1, batch):  # full batches: every worker busy
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if ep in epochs:
            accs.append(accuracy(model, x_te, y_te))
    return model, accs, time.perf_counter() - t0


def schemes(bits: List[int]) -> List[Tuple[str, Optional[Quantizer]]]:
    return [("None", None), ("2 mantissa/8 exponent", FloatingPointQuantizer(2))] + \
        [(f"Int{b}", IntQuantizer(b)) for b in bits]


def table(title: str, head: List[str], rows: List[List[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [title, line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def state_dict_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def quantized_weight_bytes(model: nn.Module) -> int:
    return sum(r.stored_nbytes for r in ptq.report(model) if not r.reason)


def part_ptq(model: nn.Module, data) -> str:
    x_tr, y_tr, x_te, y_te = data
    model.eval()
    calib = [x_tr[i * 128:(i + 1) * 128] for i in range(4)]
    dense_w = sum(m.weight.numel() * 4 for m in model.modules()
                  if isinstance(m, (nn.Linear, nn.Conv2d)))
    rows = [["fp32", f"{100 * accuracy(model, x_te, y_te):.1f}", str(dense_w), "1.00",
             str(state_dict_bytes(model))]]
    variants = [("smaq int8 static minmax", dict(mode="static", calib=calib, bits=8)),
                ("smaq int8 static percentile", dict(mode="static", calib=calib, bits=8,
                                                     observer="percentile")),
                ("smaq int8 static mse", dict(mode="static", calib=calib, bits=8,
                                              observer="mse")),
                ("smaq int8 dynamic", dict(mode="dynamic", bits=8)),
                ("smaq int4 static mse", dict(mode="static", calib=calib, bits=4,
                                              observer="mse")),
                ("smaq int4 dynamic", dict(mode="dynamic", bits=4))]
    int8_static = None
    for name, kw in variants:
        q = ptq.quantize(model, **kw)
        wb = quantized_weight_bytes(q)
        rows.append([name, f"{100 * accuracy(q, x_te, y_te):.1f}", str(wb),
                     f"{dense_w / wb:.2f}", str(state_dict_bytes(q))])
        if name == "smaq int8 static minmax":
            int8_static = q
    try:
        from torch.ao.quantization import quantize_dynamic
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tq = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
            acc = accuracy(tq, x_te, y_te)
            rows.append(["torch quantize_dynamic (Linear only, qint8)", f"{100 * acc:.1f}",
                         "-", "-", str(state_dict_bytes(tq))])
    except Exception as e:  # absent or no quantized engine on this build
        rows.append([f"torch quantize_dynamic: unavailable ({type(e).__name__})", "-", "-", "-",
                     "-"])
    out = table("PTQ of the trained fp32 digits CNN (test accuracy %, weight bytes of the "
                "quantized layers, torch.save of the whole state_dict)",
                ["model", "acc %", "weight B", "ratio", "state_dict B"], rows)
    out += "\n\nper-layer report, int8 static minmax:\n" + ptq.format_report(ptq.report(int8_static))
    return out


# -- GPT-2 byte model ------------------------------------------------------------------------------
def part_gpt2(steps: int, seed: int = 0) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    data = torch.from_numpy(stdlib_text()[:3 << 20].astype("int64"))
    n_val = len(data) // 10
    train, val = data[:-n_val], data[-n_val:]
    seq, batch = 128, 16
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=256, n_positions=seq, n_embd=128, n_layer=4, n_head=4,
                     bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / max(steps, 1)))
    gen = torch.Generator().manual_seed(seed)

    def batch_of(src: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(src) - seq - 1, (batch,), generator=g)
        return torch.stack([src[s:s + seq] for s in starts])

    t0 = time.perf_counter()
    model.train()
    for _ in range(steps):
        ids = batch_of(train, gen)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    train_s = time.perf_counter() - t0
    vgen = torch.Generator().manual_seed(seed + 7)
    val_batches = [batch_of(val, vgen) for _ in range(16)]
    cgen = torch.Generator().manual_seed(seed + 9)
    calib = [{"input_ids": batch_of(train, cgen)} for _ in range(4)]

    def val_loss(m: nn.Module) -> float:
        m.eval()
        with torch.no_grad():
            return sum(m(input_ids=b, labels=b).loss.item() for b in val_batches) / len(val_batches)

    base = val_loss(model)
    rows = [["fp32", f"{base:.4f}", "-", "-"]]
    reports = {}
    for name, kw in [("smaq int8 dynamic", dict(mode="dynamic", bits=8)),
                     ("smaq int8 static mse", dict(mode="static", calib=calib, bits=8,
                                                   observer="mse")),
                     ("smaq int4 dynamic", dict(mode="dynamic", bits=4))]:
        q = ptq.quantize(model, **kw)
        v = val_loss(q)
        rep = [r for r in ptq.report(q) if not r.reason]
        st_b, de_b = sum(r.stored_nbytes for r in rep), sum(r.dense_nbytes for r in rep)
        rows.append([name, f"{v:.4f}", f"{100 * (v - base) / base:+.2f}%",
                     f"{st_b} / {de_b} ({de_b / st_b:.2f}x)"])
        reports[name] = q
    out = table(f"GPT-2 byte model ({sum(p.numel() for p in model.parameters())} parameters, "
                f"{steps} steps in {train_s:.0f} s): validation loss (nats/byte) on 16 x {batch}"
                f" x {seq} held-out bytes",
                ["model", "val loss", "vs fp32", "Conv1D weight bytes stored / dense"], rows)
    left = [r for r in ptq.report(reports["smaq int8 dynamic"]) if r.reason]
    out += "\nleft in float: " + "; ".join(f"{r.name} ({r.type}): {r.reason}" for r in left
                                           if r.type != "LayerNorm")
    out += f"; {sum(r.type == 'LayerNorm' for r in left)} LayerNorm (no PTQ layer for this type)"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", default="6,12", help="epoch counts reported (comma list)")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--spw", type=int, default=16, help="samples per simulated worker")
    ap.add_argument("--batch", type=int, default=128, help="batch of the quantization table")
    ap.add_argument("--gpt2-steps", type=int, default=200)
    ap.add_argument("--skip-gpt2", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--optim", choices=("adam", "sgd"), default="adam",
                    help="Adam lr 3e-3 or SGD lr 0.05 momentum 0.9 for the digits CNN")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    epochs = sorted(int(e) for e in args.epochs.split(","))
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, {args.threads} threads, "
          f"optimizer {args.optim}, load {os.getloadavg()[0]:.2f}")
    data = load_digits_tensors(0)
    t_all = time.perf_counter()

    rows = []
    fp32_model = None
    codec_rows: List[Tuple[str, Optional[Quantizer]]] = [
        ("smaq codec int8, blocks of 256 (packed)", CodecQuantizer("int", bits=8)),
        ("smaq codec bf16 (packed)", CodecQuantizer("bf16"))]
    for name, q in schemes([8, 6, 5, 4, 3, 2]) + codec_rows:
        bundle = None if q is None else PrefixBundle(default=q)
        model, accs, secs = train_cnn(data, epochs, bundle, args.batch, optim=args.optim)
        if q is None:
            fp32_model = model
        rows.append([name] + [f"{100 * a:.1f}" for a in accs] + [f"{secs:.1f}"])
    print(table("\nQuantization: every data path of every layer quantized (digits CNN, test "
                f"accuracy %, batch {args.batch})", ["Quantization"] + [f"{e} epochs"
                                                                         for e in epochs]
                + ["train s"], rows))

    rows = []
    batch = args.workers * args.spw
    for name, q in schemes([8, 6, 5, 4, 3, 2, 1]):
        if q is None:
            bundle = None
        else:
            acc = HsumAccumulator([(args.spw, q), (args.workers, Identity())])
            bundle = PrefixBundle(aw=acc, ab=acc)
        _, accs, secs = train_cnn(data, epochs, bundle, batch, optim=args.optim)
        rows.append([name] + [f"{100 * a:.1f}" for a in accs] + [f"{secs:.1f}"])
    print(table(f"\nAggregation: gradients shared in the encoding, {args.workers} workers x "
                f"{args.spw} samples (batch {batch}), float32 arithmetic (test accuracy %)",
                ["Quantization"] + [f"{e} epochs" for e in epochs] + ["train s"], rows))

    print("\n" + part_ptq(fp32_model, data))
    if not args.skip_gpt2:
        print("\n" + part_gpt2(args.gpt2_steps))
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
