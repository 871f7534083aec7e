"""S2FP8 encode and decode throughput beside fp8 e5m2 (the same 8-bit codes without the
per-tensor shift and squeeze), measured in the same run on the same tensors.

    PYTHONPATH=python python benches/bench_s2fp8.py [--sizes 4 16] [--repeat 7] [--threads 2]

Tensors: float32 standard normal of each size (millions of values), and a gradient-like tensor
(standard normal rows, each scaled by a log-normal factor: rows whose magnitudes differ by
orders of magnitude, as the gradients of a layer's weights do). Throughput is float32 input bytes
per best wall time; the two codecs run in alternating blocks (``smaq_rs.bench.rounds``) so both
see the same load on a shared machine. Also printed: the s2fp8 payload's alpha and beta, and a
digest of its bytes, so that two builds' outputs can be compared.
"""

from __future__ import annotations

import argparse
import hashlib
from typing import Dict, List, Tuple

import numpy as np

import smaq_rs
from smaq_rs.bench import cpu_name, rounds


def tensors(sizes: List[int]) -> Dict[str, np.ndarray]:
    """The benchmark's tensors, by name (fixed generator seeds: every run sees the same values)."""
    rng = np.random.default_rng(0)
    out: Dict[str, np.ndarray] = {}
    for m in sizes:
        out[f"normal {m}M"] = rng.standard_normal(m << 20, dtype=np.float32)
    m = sizes[-1]
    cols = 4096
    rows = (m << 20) // cols
    g = rng.standard_normal((rows, cols), dtype=np.float32)
    g *= rng.lognormal(-8.0, 2.0, size=(rows, 1)).astype(np.float32)
    out[f"gradient-like {m}M"] = g.reshape(-1)
    return out


def measure(x: np.ndarray, codec: str, params: Dict[str, object],
            repeat: int) -> Tuple[float, float]:
    """Best encode and decode wall times (seconds) of ``codec`` on ``x``."""
    p = smaq_rs.compress(x, codec, **params)
    out = np.empty_like(x)
    enc, dec = rounds([lambda: smaq_rs.compress(x, codec, **params),
                       lambda: smaq_rs.decompress(p, out=out)], repeat)
    return enc, dec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 16],
                    help="normal tensor sizes in millions (2^20) of values")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0, help="0: the package's default")
    a = ap.parse_args()
    if a.threads:
        smaq_rs.set_num_threads(a.threads)
    print(f"CPU: {cpu_name()}; threads: {smaq_rs.get_num_threads()}; "
          f"smaq_rs from {smaq_rs.__file__}")
    print(f"{'tensor':<20} {'codec':<9} {'encode GB/s':>11} {'decode GB/s':>11}  s2fp8 payload")
    for name, x in tensors(a.sizes).items():
        gb = x.nbytes / 1e9
        for label, codec, params in [("fp8 e5m2", "fp8", {"format": "e5m2"}),
                                     ("s2fp8", "s2fp8", {})]:
            enc, dec = measure(x, codec, params, a.repeat)
            extra = ""
            if codec == "s2fp8":
                p = smaq_rs.compress(x, codec)
                digest = hashlib.sha256(p.to_bytes()).hexdigest()[:16]
                extra = (f"alpha={p.stats['alpha']:.9g} beta={p.stats['beta']:.9g} "
                         f"sha256={digest}")
            print(f"{name:<20} {label:<9} {gb / enc:>11.2f} {gb / dec:>11.2f}  {extra}",
                  flush=True)


if __name__ == "__main__":
    main()
