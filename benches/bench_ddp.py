"""Compressed gradient communication in DDP on gloo ranks: bytes sent, step time, loss.

    python benches/bench_ddp.py [--world 2] [--steps 150] [--layers 2] [--width 128]

A small GPT-2 (``transformers``' GPT2LMHeadModel: vocabulary 256, byte-level text of the Python
standard library's ``*.py`` files, context 64) is trained from the same initial weights with
AdamW by ``--world`` ranks spawned on this machine (gloo, CPU), once per communication scheme:

- ``allreduce``: torch's ``allreduce_hook`` (fp32 ring all_reduce, what DDP does by default);
- ``fp16``: torch's ``fp16_compress_hook``;
- ``powersgd r4``: torch's ``powerSGD_hook``, matrix approximation rank 4, error feedback;
- ours: ``smaq_rs.torch.distributed.compress_hook`` with int8 (blockwise absmax, 256), fp8
  (``s2fp8``: e5m2 with a per-tensor shift and squeeze) and SmaQ 6/8, each with and without
  error feedback.

Every compressed scheme starts after the same ``--warmup`` plain all_reduce steps. Bytes per
step are what each rank sends in the steps after the warm-up: for torch's hooks counted from the
tensors handed to ``dist.all_reduce`` (ring rule, 2(W-1)/W of the input); for ours the hook's own
count (packed lengths handed to all_to_all / all_gather, rules (W-1)/W and W-1, plus its small
control exchanges). Step time is rank 0's median after the warm-up (a shared CPU: noisy).
Validation loss is on held-out text after ``--steps`` steps.

Then the final state (model and AdamW state) is saved with torch.distributed.checkpoint three
ways, and the directory sizes are printed: plain ``FileSystemWriter``, ``FileSystemWriter`` with
DCP's ``ZStandard`` stream extension, and ``smaq_rs.torch.distributed.Writer`` (lossless; and
the default lossy SmaQ policy for reference). Nothing asserts: the figures are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import smaq_rs
from smaq_rs.bench import cpu_name
from smaq_rs.train.data import stdlib_text

CTX = 64
BATCH = 16


def load_text(limit: int = 3_000_000) -> torch.Tensor:
    """The first ``limit`` bytes of the standard library's sources, as int64 token ids."""
    return torch.from_numpy(stdlib_text()[:limit].astype("int64"))


def make_model(layers: int, width: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=256, n_positions=CTX, n_embd=width, n_layer=layers,
                     n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(cfg)


def batch(data: torch.Tensor, gen: torch.Generator, n: int = BATCH) -> torch.Tensor:
    starts = torch.randint(0, data.numel() - CTX - 1, (n,), generator=gen)
    return torch.stack([data[s: s + CTX] for s in starts.tolist()])


SCHEMES = [
    ("allreduce", None), ("fp16", None), ("powersgd r4", None),
    ("int8 +EF", dict(codec="int", bits=8)), ("int8", dict(codec="int", bits=8,
                                                           error_feedback=False)),
    ("fp8 +EF", dict(codec="s2fp8")), ("fp8", dict(codec="s2fp8", error_feedback=False)),
    ("smaq +EF", dict(codec="smaq")), ("smaq", dict(codec="smaq", error_feedback=False)),
]


def worker(rank: int, world: int, store: str, args, out: str) -> None:
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    from smaq_rs.torch.distributed import CompressState, compress_hook

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    data = load_text()
    split = int(data.numel() * 0.9)
    train, val = data[:split], data[split:]
    vgen = torch.Generator().manual_seed(99)
    val_batches = [batch(val, vgen) for _ in range(8)]

    counted = [0]
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *a, **k):
        counted[0] += 2 * (world - 1) * tensor.numel() * tensor.element_size() // world
        return real_all_reduce(tensor, *a, **k)

    dist.all_reduce = counting_all_reduce
    results = []
    only = set(args.schemes.split(",")) if args.schemes else None
    for name, spec in SCHEMES:
        if only is not None and name not in only:
            continue
        model = make_model(args.layers, args.width)
        # One bucket for the whole model (after DDP's first-iteration rebuild) for every scheme:
        # PowerSGD issues its second all_reduce from a future callback, and with several
        # buckets on gloo those callbacks can reach the wire in a different order on each rank.
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=256)
        state = None
        if name == "allreduce":
            ddp.register_comm_hook(None, default_hooks.allreduce_hook)
        elif name == "fp16":
            ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
        elif name.startswith("powersgd"):
            ps = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=4,
                                             start_powerSGD_iter=max(args.warmup, 2))
            ddp.register_comm_hook(ps, powerSGD_hook.powerSGD_hook)
        else:
            state = CompressState(start_iter=args.warmup, **spec)
            ddp.register_comm_hook(state, compress_hook)
        opt = torch.optim.AdamW(ddp.parameters(), lr=args.lr)
        gen = torch.Generator().manual_seed(1000 + rank)
        sent, times = [], []
        for step in range(args.steps):
            x = batch(train, gen)
            t0 = time.perf_counter()
            before = counted[0]
            opt.zero_grad(set_to_none=True)
            loss = ddp(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            dt = time.perf_counter() - t0
            if step >= args.warmup:
                times.append(dt)
                sent.append(state.history[-1]["bytes"] if state is not None
                            else counted[0] - before)
        model.eval()
        with torch.no_grad():
            vl = statistics.fmean(model(input_ids=b, labels=b).loss.item() for b in val_batches)
        rec = {"name": name, "bytes": statistics.fmean(sent), "time": statistics.median(times),
               "val": vl}
        if state is not None:
            rec["schemes"] = sorted(set(state.schemes.values()))
        results.append(rec)
        if rank == 0:
            print(f"  {name}: done ({len(sent)} steps timed)", flush=True)
        if name == "allreduce" and rank == 0:
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()},
                       os.path.join(out, "state.pt"))
        dist.barrier()
    dist.all_reduce = real_all_reduce
    if rank == 0:
        torch.save(results, os.path.join(out, "results.pt"))
    dist.destroy_process_group()


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def dcp_sizes(state_path: str, tmp: str) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    from smaq_rs.torch.distributed import Writer

    warnings.filterwarnings("ignore", message=".*assuming the intent.*")
    sd = torch.load(state_path, weights_only=False)
    dense = sum(t.numel() * t.element_size() for part in (sd["model"],)
                for t in part.values())
    rows = []
    runs = [("DCP FileSystemWriter", lambda p: FileSystemWriter(p))]
    try:
        from torch.distributed.checkpoint._extension import ZStandard

        if ZStandard.is_available():
            runs.append(("DCP + ZStandard extension",
                         lambda p: FileSystemWriter(p, _extensions=[ZStandard()])))
    except ImportError:
        pass
    runs += [("smaq_rs Writer, lossless", lambda p: Writer(p)),
             ("smaq_rs Writer, SmaQ 6/8 policy", lambda p: Writer(p, policy=smaq_rs.Policy()))]
    for label, make in runs:
        path = os.path.join(tmp, label.replace(" ", "_").replace(",", ""))
        t0 = time.perf_counter()
        dcp.save(sd, storage_writer=make(path))
        rows.append((label, dir_bytes(path), time.perf_counter() - t0))
    # the lossless checkpoint reads back bit for bit
    from smaq_rs.torch.distributed import Reader

    back = torch.load(state_path, weights_only=False)
    for part in ("model",):
        for t in back[part].values():
            t.zero_()
    dcp.load(back, storage_reader=Reader(os.path.join(tmp, "smaq_rs_Writer_lossless")))
    exact = all(torch.equal(back["model"][k], v) for k, v in sd["model"].items())
    base = rows[0][1]
    print(f"\nDCP checkpoint of the trained model + AdamW state (model state dict "
          f"{dense / 1e6:.2f} MB); lossless read back bit-exact: {exact}")
    print(f"{'storage':34s} {'bytes':>11s} {'vs plain':>9s} {'save s':>7s}")
    for label, n, t in rows:
        print(f"{label:34s} {n:11d} {base / n:8.2f}x {t:7.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--schemes", default="", help="comma-separated subset of the scheme names")
    args = ap.parse_args()

    print(f"CPU: {cpu_name()}  (cores visible: {os.cpu_count()}, torch {torch.__version__})")
    model = make_model(args.layers, args.width)
    n = sum(p.numel() for p in model.parameters())
    print(f"GPT-2 {args.layers} layers x {args.width}, vocab 256, context {CTX}: {n} parameters; "
          f"{args.world} gloo ranks x batch {BATCH}; {args.steps} steps "
          f"({args.warmup} warm-up all_reduce steps)")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args.world, os.path.join(tmp, "store"), args, tmp),
                 nprocs=args.world, join=True)
        results = torch.load(os.path.join(tmp, "results.pt"), weights_only=False)
        ref = next((r for r in results if r["name"] == "allreduce"), None)
        fp16 = next((r for r in results if r["name"] == "fp16"), None)
        print(f"\n{'scheme':13s} {'bytes/step':>11s} {'vs fp32':>8s} {'vs fp16':>8s} "
              f"{'step ms':>8s} {'val loss':>9s} {'vs fp32':>8s}  exchange")
        for r in results:
            rb = f"{ref['bytes'] / r['bytes']:7.2f}x" if ref else "-"
            rf = f"{fp16['bytes'] / r['bytes']:7.2f}x" if fp16 else "-"
            dl = f"{100 * (r['val'] / ref['val'] - 1):+7.2f}%" if ref else "-"
            print(f"{r['name']:13s} {r['bytes']:11.0f} {rb:>8s} {rf:>8s} {1e3 * r['time']:8.1f} "
                  f"{r['val']:9.4f} {dl:>8s}  {','.join(r.get('schemes', []))}")
        if os.path.exists(os.path.join(tmp, "state.pt")):
            dcp_sizes(os.path.join(tmp, "state.pt"), tmp)


if __name__ == "__main__":
    main()
