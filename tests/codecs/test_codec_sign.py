"""The sign codec through the Python API: every dtype, empty tensors, special values, bad input."""

import numpy as np
import pytest

import smaq_rs


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_signs_block_means_and_specials(dtype):
    x = np.linspace(-3, 5, 64).astype(dtype)
    x[[1, 2, 3, 4]] = [np.nan, -np.inf, 0.0, -0.0]
    y = smaq_rs.decompress(smaq_rs.compress(x, "sign", block_size=16))
    assert y.dtype == x.dtype and np.isnan(y[1]) and y[2] == -np.inf
    assert np.signbit(y[4]) and not np.signbit(y[3])  # zeros keep their sign bit, not their value
    finite = np.isfinite(x)
    assert np.array_equal(np.signbit(y[finite]), np.signbit(x[finite]))
    for s in range(0, 64, 16):
        b = x[s:s + 16].astype(np.float64)
        m = np.abs(b[np.isfinite(b)]).mean()
        got = np.abs(y[s:s + 16][np.isfinite(x[s:s + 16])].astype(np.float64))
        assert np.allclose(got, m, rtol=1e-3)


def test_empty_and_bad_input():
    assert smaq_rs.decompress(smaq_rs.compress(np.zeros(0, np.float32), "sign")).size == 0
    with pytest.raises(smaq_rs.DtypeError):
        smaq_rs.compress(np.arange(10, dtype=np.int32), "sign")
    with pytest.raises(smaq_rs.CodecError):
        smaq_rs.compress(np.ones(64, np.float32), "sign", block_size=12)
    p = smaq_rs.compress(np.ones(4096, np.float32), "sign").to_bytes()
    bad = bytearray(p)
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(smaq_rs.FormatError):
        smaq_rs.PackedTensor.from_bytes(bytes(bad))
