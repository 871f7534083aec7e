"""Shared helpers of the tests (not a test module): ``from helpers import ...`` in any test
directory (tests/ is on sys.path through tests/conftest.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import smaq_rs

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
FIXTURES = TESTS / "fixtures"
EXAMPLES = ROOT / "examples"


def import_fixture_generator(name: str):
    """A generator script of tests/fixtures (make_fixtures_codecs, make_fixtures_smaq,
    make_fixtures_checkpoint) as a module."""
    if str(FIXTURES) not in sys.path:
        sys.path.insert(0, str(FIXTURES))
    return __import__(name)


# -- float formats ---------------------------------------------------------------------------------
def mantissa_bits(dtype) -> int:
    name = str(dtype).replace("torch.", "")
    return {"float32": 23, "float16": 10, "bfloat16": 7, "float64": 52}[name]


# -- codec round trips and corruption --------------------------------------------------------------
def finite_arrays(max_size: int = 2000, lo: float = -1e4, hi: float = 1e4):
    return hnp.arrays(
        np.float32,
        st.integers(0, max_size),
        elements=st.floats(lo, hi, width=32, allow_nan=False, allow_infinity=False),
    )


def roundtrip(x: np.ndarray, codec: str, **params):
    p = smaq_rs.compress(x, codec, **params)
    back = smaq_rs.PackedTensor.from_bytes(p.to_bytes())
    y = smaq_rs.decompress(back)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert p.nbytes == len(p.to_bytes())
    return y, p


def corruptions(data: bytes):
    """Truncations and single-byte flips at several places of a packed buffer."""
    n = len(data)
    for cut in sorted({0, 3, 31, n // 2, n - 9, n - 1}):
        if 0 <= cut < n:
            yield data[:cut]
    for pos in sorted({4, 5, 6, 32, 40, n // 3, n // 2, n - 12, n - 1}):
        if 0 <= pos < n:
            b = bytearray(data)
            b[pos] ^= 0x5A
            yield bytes(b)


def assert_rejects_corruption(p) -> None:
    data = p.to_bytes()
    for bad in corruptions(data):
        try:
            smaq_rs.decompress(bad)
        except smaq_rs.SmaqError:
            continue
        raise AssertionError("corrupted bytes decoded without error")


# -- SmaQ ------------------------------------------------------------------------------------------
def smaq_bound(x64, y64, stats, params, out_dtype):
    """Per-element error bound of SmaQ with nearest rounding, from the recorded statistics.

    Main values: std / (2 r_main); outliers: std / (2 r_out), also beyond t_outlier (escaped, or
    exact); with ``outliers="clamp"`` values beyond t_outlier were clamped, so their bound grows
    with the distance. Plus half a unit in the last place of the output dtype (its subnormal
    step below the normal range).
    """
    bm, bo = params["bits_main"], params["bits_outlier"]
    t_main, t_out = params["t_main"], params["t_outlier"]
    r_main = (2 ** (bm - 2) - 1) / t_main
    r_out = (2 ** (bo - 2) - 1) / (t_out - t_main)
    mean, std = stats["mean"], stats["std"]
    a = np.abs((x64 - mean) / std)
    # The kernel computes z and the scaled magnitude in float32: a code of b bits carries up to
    # about 2^(b - 2) * 2^-21 grid steps of arithmetic error (negligible below ~12 bits).
    slack_main = 1 + 2.0 ** (bm - 2 - 21)
    slack_out = 1 + 2.0 ** (bo - 2 - 21)
    half_main = std / (2 * r_main) * slack_main
    half_out = std / (2 * r_out) * slack_out
    bound = np.where(a <= t_main, half_main, half_out)
    if params.get("outliers") == "clamp":
        bound = np.where(a > t_out, (a - t_out) * std + half_out, bound)
    else:
        # escaped values: the f64 residual path, a relative slack for very large z
        bound = np.where(a > t_out, half_out * (1 + 1e-6 * a), bound)
    # Half the output's spacing: relative for normal values, the subnormal step below them.
    mbits = mantissa_bits(out_dtype)
    emin = {23: -126, 10: -14, 7: -126, 52: -1022}[mbits]
    ulp = np.maximum(np.maximum(np.abs(y64), np.abs(x64)), 2.0**emin) * 2.0 ** -(mbits + 1)
    return bound * (1 + 1e-4) + ulp * 1.01 + 1e-30
