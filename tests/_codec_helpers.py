"""Shared helpers of the codec tests (tests/test_codec_*.py)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import smaq_rs


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
