"""``python -m smaq_rs bench``: every codec on one tensor, beside torch's casts and bitsandbytes.

Per row: bits per value measured from ``PackedTensor.nbytes`` (header, statistics and checksum
included), relative RMSE (||y - x|| / ||x|| over finite values), max abs error, and encode /
decode throughput in GB/s of dense input (float32 bytes / best wall time of ``--repeat`` runs),
and encode CPU time per value (process user + system time, all threads: steadier than wall time
on a loaded machine). The speed ratios against the peers are timed again with ours and the peer alternating.
Peers run in the same process on the same tensor: torch's ``x.to(dtype)`` casts and, when
installed with a working CPU path, bitsandbytes' ``quantize_blockwise`` (8-bit, block 4096).
Each torch cast appears twice: ``x.to(dtype)`` and ``out.copy_(x)`` into a preallocated tensor
(the cast without allocating its result).

Tensor sources (``--source``): ``normal`` (default, standard normal), a file (``.npy``, ``.pt``
holding a tensor, or ``.safetensors``: the largest tensor), or a built-in sample from a small
MLP trained on scikit-learn's digits: ``weights`` (its parameters), ``relu`` (hidden ReLU
activations), ``adam`` (Adam's exp_avg_sq). Throughput on machines shared with other work is
noisy: compare ratios within one run.

``--source classes`` captures real training tensors by class (``smaq_rs.capture``: GPT-2 and
ResNet-18 weights, gradients, activations, attention probabilities, logits, LayerNorm inputs,
Adam and SGD state) and prints, per class, every codec's bits/value and error beside the SmaQ
research algorithm's (``smaq_rs.reference``: its error, and the bits it counted), without
timings. ``--save DIR`` writes the captured tensors as ``.npy`` files.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import _api

#: (label, codec, params) of the default table.
DEFAULT_CODECS: List[Tuple[str, str, Dict[str, Any]]] = [
    ("fp32", "fp32", {}),
    ("fp16", "fp16", {}),
    ("fp16 stochastic", "fp16", {"rounding": "stochastic", "seed": 1}),
    ("bf16", "bf16", {}),
    ("fp8 e4m3", "fp8", {"format": "e4m3"}),
    ("fp8 e5m2", "fp8", {"format": "e5m2"}),
    ("fp8 e4m3 stochastic", "fp8", {"format": "e4m3", "rounding": "stochastic", "seed": 1}),
    ("s2fp8", "s2fp8", {}),
    ("mantissa m=3", "mantissa", {"mantissa_bits": 3}),
    ("int8 absmax block 4096", "int", {"scheme": "absmax", "block_size": 4096}),
    ("int8 affine block 64", "int", {"block_size": 64}),
    ("int8 affine block 256 stoch", "int", {"rounding": "stochastic", "seed": 1}),
    ("int8 affine tensor dithered", "int", {"granularity": "tensor", "rounding": "dithered",
                                            "seed": 1}),
    ("int4 affine block 64", "int", {"bits": 4, "block_size": 64}),
    ("int4 absmax sawb tensor", "int", {"bits": 4, "scheme": "absmax", "clip": "sawb",
                                        "granularity": "tensor"}),
    ("luq 4", "luq", {"bits": 4, "seed": 1}),
    ("smaq", "smaq", {"seed": 1}),
    ("sign block 256", "sign", {}),
    ("nnw_bdi 8 bit", "nnw_bdi", {"seed": 1}),
]

#: NNW-BDI tries every configuration per block: it runs at tens of MB/s, so on large tensors the
#: bench measures it on a prefix of this many values (said in its row).
BDI_MAX = 1 << 20


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), printed with every benchmark: compare ratios of one
    run, never times across machines."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _metrics(x: np.ndarray, y: np.ndarray) -> Tuple[float, float]:
    x64 = x.astype(np.float64, copy=False).ravel()
    y64 = np.asarray(y, dtype=np.float64).ravel()
    ok = np.isfinite(x64)
    d = (y64 - x64)[ok]
    denom = np.sqrt(np.mean(x64[ok] ** 2)) if ok.any() else 0.0
    rmse = np.sqrt(np.mean(d**2)) if d.size else 0.0
    rel = rmse / denom if denom > 0 else float(rmse)
    mx = float(np.max(np.abs(d))) if d.size else 0.0
    return float(rel), mx


def _best(fn: Callable[[], Any], repeat: int) -> Tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        out = None  # free the previous result first: its memory is not counted twice
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def best_seconds(fn: Callable[[], Any], repeat: int = 3) -> float:
    """The shortest wall time of ``repeat`` calls of ``fn`` (each call's result freed before the
    next starts)."""
    return _best(fn, repeat)[0]


def _cpu_best(fn: Callable[[], Any], repeat: int) -> float:
    """Least process CPU time (all threads, user + system) of one call: unlike wall time, it
    hardly moves with other load on the machine. Thread pools that spin while waiting (torch's
    OpenMP) are charged for the spinning too."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        out = fn()
        best = min(best, time.process_time() - t0)
        del out
    return best


def rounds(fns: Sequence[Callable[[], Any]], repeat: int, block: int = 3) -> List[float]:
    """Best wall time of each of ``fns`` over ``repeat`` rounds in which each runs ``block``
    times in turn, so that all see the same load on a shared machine. Blocks rather than strict
    alternation: a thread pool that spins after its call (torch's OpenMP, briefly Rayon's) slows
    whatever runs next, and that should only cost the first call of a block, which the best-of
    discards."""
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, f in enumerate(fns):
            for _ in range(block):
                t0 = time.perf_counter()
                out = f()
                best[i] = min(best[i], time.perf_counter() - t0)
                del out
    return best


def paired(fa: Callable[[], Any], fb: Callable[[], Any], repeat: int,
           block: int = 3) -> Tuple[float, float]:
    """Best wall times of ``fa`` and ``fb`` measured in alternating blocks (see ``rounds``)."""
    ta, tb = rounds([fa, fb], repeat, block)
    return ta, tb


#: The speed comparisons against the peers: (our row, peer row).
PAIRS: List[Tuple[str, str]] = [
    ("int8 absmax block 4096", "bitsandbytes quantize_blockwise 4096"),
    ("int8 absmax block 4096", "torch .to(float8_e4m3fn)"),
    ("int8 affine block 64", "bitsandbytes quantize_blockwise 4096"),
    ("int8 affine block 64", "torch .to(float8_e4m3fn)"),
    ("fp16", "torch .to(float16)"),
    ("bf16", "torch .to(bfloat16)"),
    ("fp8 e4m3", "torch .to(float8_e4m3fn)"),
    ("fp8 e5m2", "torch .to(float8_e5m2)"),
    ("fp16", "torch copy_ into float16"),
    ("bf16", "torch copy_ into bfloat16"),
    ("fp8 e4m3", "torch copy_ into float8_e4m3fn"),
    ("fp8 e5m2", "torch copy_ into float8_e5m2"),
]


def _sample_network(seed: int = 0):
    """A 64-512-512-10 MLP trained on the digits for a few epochs with Adam (torch)."""
    import torch
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    net = torch.nn.Sequential(
        torch.nn.Linear(64, 512), torch.nn.ReLU(),
        torch.nn.Linear(512, 512), torch.nn.ReLU(),
        torch.nn.Linear(512, 10),
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(15):
        for i in range(0, len(x), 128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[i:i + 128]), y[i:i + 128]).backward()
            opt.step()
    return net, opt, x


def load_source(source: str, n: int, seed: int = 0) -> Tuple[np.ndarray, str]:
    """The tensor to benchmark (float32, C-contiguous) and a description of it."""
    if source == "normal":
        x = np.random.default_rng(seed).standard_normal(n, dtype=np.float32)
        return x, f"standard normal, {n} values"
    if source in ("weights", "relu", "adam"):
        import torch

        net, opt, data = _sample_network(seed)
        with torch.no_grad():
            if source == "weights":
                t = torch.cat([p.detach().ravel() for p in net.parameters()])
                what = "weights of a 64-512-512-10 MLP trained on digits"
            elif source == "relu":
                t = torch.relu(net[0](data)).ravel()
                what = "ReLU activations (layer 1) of that MLP on the digits"
            else:
                t = torch.cat([opt.state[p]["exp_avg_sq"].ravel() for p in net.parameters()])
                what = "Adam exp_avg_sq of that MLP"
        return np.ascontiguousarray(t.numpy(), dtype=np.float32), f"{what}, {t.numel()} values"
    if os.path.exists(source):
        if source.endswith(".npy"):
            arr = np.load(source)
        elif source.endswith(".safetensors"):
            from safetensors.numpy import load_file

            tensors = load_file(source)
            arr = max(tensors.values(), key=lambda a: a.size)
        else:
            import torch

            obj = torch.load(source, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                obj = max((v for v in obj.values() if isinstance(v, torch.Tensor)),
                          key=lambda v: v.numel())
            arr = obj.float().numpy()
        arr = np.ascontiguousarray(arr, dtype=np.float32).ravel()
        return arr, f"{source}, {arr.size} values"
    raise SystemExit(f"unknown source {source!r}: normal, weights, relu, adam or a file path")


def _torch_peers(x: np.ndarray, repeat: int) -> List[Dict[str, Any]]:
    try:
        import torch
    except ImportError:
        return []
    t = torch.from_numpy(x)
    rows = []
    casts = [
        ("float16", torch.float16, 16),
        ("bfloat16", torch.bfloat16, 16),
        ("float8_e4m3fn", getattr(torch, "float8_e4m3fn", None), 8),
        ("float8_e5m2", getattr(torch, "float8_e5m2", None), 8),
    ]
    # Each cast twice: ``x.to(dtype)``, which allocates its result (fresh pages, unless the
    # allocator hands back the previous result's), and ``out.copy_(x)`` into a tensor allocated
    # once, the cast at its fastest (no allocation, output pages already mapped).
    for (name, dt, bits), into in [(c, into) for into in (False, True) for c in casts]:
        if dt is None:
            continue
        label = f"torch copy_ into {name}" if into else f"torch .to({name})"
        out = torch.empty(t.shape, dtype=dt) if into else None

        def enc(dt=dt, out=out):
            return t.to(dt) if out is None else out.copy_(t)

        te, y = _best(enc, repeat)
        cpu = _cpu_best(enc, repeat)
        td, back = _best(lambda: y.to(torch.float32), repeat)
        rel, mx = _metrics(x, back.numpy())
        rows.append(dict(codec=label, bits=float(bits), rel=rel, max=mx,
                         enc=x.nbytes / te / 1e9, dec=x.nbytes / td / 1e9, peer=True,
                         cpu=cpu / x.size * 1e9, fn=enc))
    return rows


def _bnb_peer(x: np.ndarray, repeat: int) -> Tuple[List[Dict[str, Any]], str]:
    try:
        import bitsandbytes.functional as F  # type: ignore
        import torch
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return [], f"bitsandbytes not available ({type(e).__name__})"
    t = torch.from_numpy(x)
    def enc():
        return F.quantize_blockwise(t, blocksize=4096)

    try:
        te, (q, state) = _best(enc, repeat)
        cpu = _cpu_best(enc, repeat)
        td, back = _best(lambda: F.dequantize_blockwise(q, state), repeat)
    except Exception as e:  # noqa: BLE001
        return [], f"bitsandbytes has no working CPU quantize_blockwise here ({e})"
    rel, mx = _metrics(x, back.float().numpy())
    nbytes = q.numel() * q.element_size() + state.absmax.numel() * state.absmax.element_size()
    version = getattr(sys.modules.get("bitsandbytes"), "__version__", "?")
    return [dict(codec="bitsandbytes quantize_blockwise 4096", bits=8.0 * nbytes / x.size,
                 rel=rel, max=mx, enc=x.nbytes / te / 1e9, dec=x.nbytes / td / 1e9,
                 peer=True, cpu=cpu / x.size * 1e9, fn=enc)], \
        f"bitsandbytes {version}: quantize_blockwise on a CPU tensor, blocksize 4096"


def run(x: np.ndarray, codecs: Sequence[Tuple[str, str, Dict[str, Any]]] = DEFAULT_CODECS,
        repeat: int = 3, peers: bool = True) -> Tuple[List[Dict[str, Any]], List[str]]:
    """Measures every codec (and the peers) on ``x``; returns rows and notes."""
    rows: List[Dict[str, Any]] = []
    notes: List[str] = []
    for label, codec, params in codecs:
        xi = x
        if codec == "nnw_bdi" and x.size > BDI_MAX:
            xi = x[:BDI_MAX]
            label += f" (first {BDI_MAX} values)"
        rep = 1 if codec == "nnw_bdi" else repeat
        def enc(xi=xi, codec=codec, params=params):
            return _api.compress(xi, codec, **params)

        te, p = _best(enc, rep)
        cpu = _cpu_best(enc, rep)
        out = np.empty_like(xi)
        td, _ = _best(lambda: _api.decompress(p, out=out), rep)
        rel, mx = _metrics(xi, out)
        rows.append(dict(codec=label, bits=p.bits_per_value, rel=rel, max=mx,
                         enc=xi.nbytes / te / 1e9, dec=xi.nbytes / td / 1e9, peer=False,
                         cpu=cpu / xi.size * 1e9, fn=enc))
    if peers:
        rows += _torch_peers(x, repeat)
        bnb, note = _bnb_peer(x, repeat)
        rows += bnb
        if note:
            notes.append(note)
    return rows, notes


def format_table(rows: List[Dict[str, Any]]) -> str:
    head = ("| codec | bits/value | rel. RMSE | max abs err | encode GB/s | decode GB/s "
            "| encode CPU ns/value |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['codec']} | {r['bits']:.3f} | {r['rel']:.2e} | {r['max']:.3g} | "
            f"{r['enc']:.3g} | {r['dec']:.3g} | {r['cpu']:.3g} |"
        )
    return "\n".join(lines)


def ratios(rows: List[Dict[str, Any]], repeat: int = 7) -> List[str]:
    """The speed comparisons against the peers: encode speed ours / peer's, each pair timed in alternating
    blocks (``paired``) so both see the same load; then the ratio of CPU time per value
    (peer / ours) from the table."""
    by = {r["codec"]: r for r in rows}
    out = []
    for a, b in PAIRS:
        if a in by and b in by:
            ta, tb = paired(by[a]["fn"], by[b]["fn"], repeat)
            out.append(f"{a} encode / {b} encode: {tb / ta:.2f}x wall (alternating blocks, best "
                       f"of {3 * repeat}), {by[b]['cpu'] / by[a]['cpu']:.2f}x CPU time")
    return out


def class_rows(x: np.ndarray, positive: bool,
               codecs: Sequence[Tuple[str, str, Dict[str, Any]]] = DEFAULT_CODECS,
               seed: int = 0) -> List[Dict[str, Any]]:
    """Bits/value and error of every codec on one tensor class, SmaQ with the class's
    ``all_positive``, plus the SmaQ research algorithm (its counted bits) and, for the SmaQ
    rows, their error and bits relative to it."""
    import torch

    from .reference import smaq_research

    res = smaq_research(torch.from_numpy(x), all_positive=positive,
                        generator=torch.Generator().manual_seed(seed))
    r_rel, r_max = _metrics(x, res.values.numpy())
    r_bits = res.bits / x.size
    smaq = [("smaq clamp (explicit)", "smaq", {"seed": 1, "outliers": "clamp"}),
            ("smaq escape_bits=0 (research grid)", "smaq", {"seed": 1, "escape_bits": 0})]
    rows = [dict(codec="SmaQ research algorithm (bits counted)", bits=r_bits, rel=r_rel,
                 max=r_max, vs_err=1.0, vs_bits=1.0)]
    for label, codec, params in list(codecs) + smaq:
        if codec == "nnw_bdi":
            continue  # tens of MB/s: the timing table covers it
        params = dict(params)
        if codec == "smaq" and positive:
            params["all_positive"] = True
        p = _api.compress(x, codec, **params)
        y = _api.decompress(p)
        rel, mx = _metrics(x, y)
        row = dict(codec=label, bits=p.bits_per_value, rel=rel, max=mx)
        if codec == "smaq":
            row.update(vs_err=rel / r_rel if r_rel else float("nan"), vs_bits=row["bits"] / r_bits)
        rows.append(row)
    return rows


def format_class_table(rows: List[Dict[str, Any]]) -> str:
    lines = ["| codec | bits/value | rel. RMSE | max abs err | error / research | bits / research |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ve = f"{r['vs_err']:.3f}" if "vs_err" in r else ""
        vb = f"{r['vs_bits']:.3f}" if "vs_bits" in r else ""
        lines.append(f"| {r['codec']} | {r['bits']:.3f} | {r['rel']:.2e} | {r['max']:.3g} | "
                     f"{ve} | {vb} |")
    return "\n".join(lines)


def classes_main(codecs, save: Optional[str], steps: int) -> int:
    from .capture import capture

    print(f"capturing real training tensors ({steps} steps of GPT-2 and ResNet-18)...",
          flush=True)
    classes = capture(steps=steps)
    summary = []
    for name, (x, positive) in classes.items():
        if save:
            os.makedirs(save, exist_ok=True)
            fname = "".join(c if c.isalnum() else "_" for c in name).strip("_") + ".npy"
            np.save(os.path.join(save, fname), x)
        rows = class_rows(x, positive, codecs)
        print(f"\n### {name}: {x.size} values{', all_positive' if positive else ''}\n")
        print(format_class_table(rows))
        d = next(r for r in rows if r["codec"] == "smaq")
        summary.append((name, d["vs_err"], d["vs_bits"], d["bits"], rows[0]["bits"]))
    print("\n### default SmaQ against the research algorithm, per class\n")
    print("| class | error / research | bits/value (ours) | bits counted (research) | ratio |")
    print("|---|---:|---:|---:|---:|")
    for name, ve, vb, ours, theirs in summary:
        print(f"| {name} | {ve:.3f} | {ours:.3f} | {theirs:.3f} | {vb:.3f} |")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m smaq_rs bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default="normal",
                    help="normal (default), weights, relu, adam, classes (real training "
                         "tensors by class), or a .npy/.pt/.safetensors file")
    ap.add_argument("-n", type=int, default=1 << 24, help="values for --source normal")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs; the best is reported")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads for smaq_rs and torch (0: smaq_rs default, torch the same)")
    ap.add_argument("--codecs", default="",
                    help="comma-separated codec names to keep (default: all of the table)")
    ap.add_argument("--no-peers", action="store_true", help="skip torch and bitsandbytes")
    ap.add_argument("--save", default=None, help="with --source classes: write them as .npy here")
    ap.add_argument("--steps", type=int, default=20,
                    help="with --source classes: training steps before capturing")
    a = ap.parse_args(argv)
    if a.threads:
        _api.set_num_threads(a.threads)
    threads = _api.get_num_threads()
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass
    sel = DEFAULT_CODECS
    if a.codecs:
        keep = set(a.codecs.split(","))
        sel = [c for c in DEFAULT_CODECS if c[1] in keep or c[0] in keep]
    if a.source == "classes":
        return classes_main(sel, a.save, a.steps)
    x, what = load_source(a.source, a.n)
    print(f"source: {what}; {threads} threads; best of {a.repeat}")
    rows, notes = run(x, sel, a.repeat, peers=not a.no_peers)
    print(format_table(rows))
    for line in ratios(rows, max(a.repeat, 7)) + notes:
        print(line)
    if hasattr(os, "getloadavg"):
        print("load average: %.2f %.2f %.2f" % os.getloadavg())
    return 0
