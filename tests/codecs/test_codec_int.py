"""The int codec (int-N affine/absmax, tensor/row/tile/block, nearest/stochastic/dithered,
SAWB) and LUQ."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import smaq_rs
from helpers import assert_rejects_corruption, finite_arrays, roundtrip

RNG = np.random.default_rng(1)
X = RNG.standard_normal(50_001).astype(np.float32)


def group_steps(x, size, bits, absmax):
    """Per-value quantization step of contiguous groups of `size` values."""
    steps = np.empty_like(x, dtype=np.float64)
    for s in range(0, x.size, size):
        g = x[s:s + size].astype(np.float64)
        if absmax:
            st_ = 2 * np.abs(g).max() / (2 * (2 ** (bits - 1) - 1))
        else:
            st_ = (g.max() - g.min()) / (2**bits - 1)
        steps[s:s + size] = st_
    return steps


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
@pytest.mark.parametrize("scheme", ["affine", "absmax"])
@pytest.mark.parametrize("block", [64, 4096])
def test_block_nearest_error_bound_and_size(bits, scheme, block):
    y, p = roundtrip(X, "int", bits=bits, scheme=scheme, block_size=block)
    step = group_steps(X, block, bits, scheme == "absmax")
    assert np.all(np.abs(y.astype(np.float64) - X) <= step * 0.5 * (1 + 1e-4) + 1e-6)
    groups = -(-X.size // block)
    per_group = 4 if scheme == "absmax" else 8
    assert p._packed.payload_nbytes == groups * per_group + (X.size * bits + 7) // 8


def test_four_bit_codes_are_two_per_byte():
    _, p = roundtrip(X[:4096], "int", bits=4, block_size=4096)
    assert p._packed.payload_nbytes == 8 + 2048


def test_row_and_tile_granularity():
    w = RNG.standard_normal((48, 80)).astype(np.float32)
    w[:, :40] *= 100  # rows/tiles see different ranges
    y, p = roundtrip(w, "int", granularity="row", row_size=80)
    assert p.stats["n_groups"] == 48
    for r in range(48):
        step = (w[r].max() - w[r].min()) / 255
        assert np.all(np.abs(y[r] - w[r]) <= step / 2 * 1.0001 + 1e-6)
    y, p = roundtrip(w, "int", granularity="tile", row_size=80, tile_rows=16, tile_cols=40)
    assert p.stats["n_groups"] == 3 * 2
    for tr in range(3):
        for tc in range(2):
            t = w[16 * tr:16 * tr + 16, 40 * tc:40 * tc + 40]
            yt = y[16 * tr:16 * tr + 16, 40 * tc:40 * tc + 40]
            step = (t.max() - t.min()) / 255
            assert np.all(np.abs(yt - t) <= step / 2 * 1.0001 + 1e-5)
    with pytest.raises(smaq_rs.CodecError, match="row_size"):
        smaq_rs.compress(w, "int", granularity="row")
    with pytest.raises(smaq_rs.LayoutError, match="rows"):
        smaq_rs.compress(w, "int", granularity="row", row_size=7)


@settings(max_examples=40, deadline=None)
@given(finite_arrays(), st.sampled_from([2, 4, 8]), st.sampled_from(["nearest", "stochastic",
                                                                      "dithered"]))
def test_tensor_property(x, bits, rounding):
    y, _ = roundtrip(x, "int", bits=bits, granularity="tensor", rounding=rounding, seed=1)
    if x.size == 0:
        return
    step = (float(x.max()) - float(x.min())) / (2**bits - 1)
    k = 1.0 if rounding == "stochastic" else 0.5
    assert np.all(np.abs(y.astype(np.float64) - x) <= k * step * (1 + 1e-4) + 1e-3)


def test_stochastic_unbiased_dither_uniform():
    x = np.full(1 << 16, 0.3, np.float32)
    x[0], x[1] = 0.0, 1.0
    for r in ("stochastic", "dithered"):
        y, p = roundtrip(x, "int", bits=2, granularity="tensor", rounding=r, seed=4)
        assert abs(float(y[2:].astype(np.float64).mean()) - 0.3) < 3e-3, r
        assert p.params["seed"] == 4
    y, _ = roundtrip(x, "int", bits=2, granularity="tensor", rounding="dithered", seed=4)
    err = y[2:] - 0.3
    assert np.abs(err).max() <= (1 / 3) / 2 * 1.001  # +-step/2, step = 1/3
    assert np.std(err) == pytest.approx((1 / 3) / np.sqrt(12), rel=0.05)


def test_absmax_keeps_zero_and_sawb_clips():
    x = X.copy()
    x[10] = 0.0
    x[11] = 50.0
    y, _ = roundtrip(x, "int", bits=4, scheme="absmax")
    assert y[10] == 0.0
    y, _ = roundtrip(x, "int", bits=4, scheme="absmax", clip="sawb", granularity="tensor")
    assert y[11] < 5 and y[10] == 0.0
    with pytest.raises(smaq_rs.CodecError, match="sawb"):
        smaq_rs.compress(x, "int", bits=6, clip="sawb")


def test_nonfinite_empty_constant():
    x = np.linspace(-1, 1, 1000, dtype=np.float32)
    x[[3, 500, 999]] = [np.nan, np.inf, -np.inf]
    for g in ("tensor", "block"):
        y, p = roundtrip(x, "int", granularity=g)
        assert np.isnan(y[3]) and y[500] == np.inf and y[999] == -np.inf
        assert p.stats["n_exceptions"] == 3
        ok = np.isfinite(x)
        assert np.abs(y[ok] - x[ok]).max() <= (2 / 255) * 0.51
    y, _ = roundtrip(np.zeros(0, np.float32), "int")
    assert y.size == 0
    c = np.full(300, -2.5, np.float32)
    y, _ = roundtrip(c, "int", bits=3)
    np.testing.assert_array_equal(y, c)


def test_luq_levels_unbiased():
    x = np.full(1 << 16, 0.013, np.float32)
    x[0] = 1.0
    y, p = roundtrip(x, "luq", bits=4, seed=2)
    levels = {0.0} | {2.0 ** (j - 7) for j in range(1, 8)}
    assert set(np.unique(y).tolist()) <= levels
    assert abs(float(y[1:].astype(np.float64).mean()) - 0.013) < 3e-4
    assert p._packed.payload_nbytes == x.size // 2
    g = RNG.standard_normal(10_000).astype(np.float32)
    g[5] = np.nan
    y, _ = roundtrip(g, "luq", bits=3, seed=1)
    assert np.isnan(y[5])
    assert np.all(np.abs(y[np.isfinite(g)]) <= np.abs(g[np.isfinite(g)]).max())


@pytest.mark.parametrize("codec,params", [
    ("int", {}), ("int", {"bits": 4, "granularity": "tensor"}), ("luq", {}),
    ("int", {"granularity": "tile", "row_size": 60, "tile_rows": 7, "tile_cols": 16}),
])
def test_corruption_is_a_typed_error(codec, params):
    assert_rejects_corruption(smaq_rs.compress(X[:3000], codec, **params))


def test_float16_input():
    x = X[:5000].astype(np.float16)
    y, _ = roundtrip(x, "int", bits=8, block_size=64)
    assert y.dtype == np.float16
    assert np.abs(y.astype(np.float32) - x.astype(np.float32)).max() < 0.05
