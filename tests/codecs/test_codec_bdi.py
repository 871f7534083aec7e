"""NNW-BDI: error bounds, sizes, specials, corruption, and the digits MLP result."""

import sys

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import smaq_rs
from helpers import EXAMPLES, assert_rejects_corruption, finite_arrays, roundtrip

RNG = np.random.default_rng(2)
W = (RNG.standard_normal(20_000) * 0.05).astype(np.float32)


@settings(max_examples=30, deadline=None)
@given(finite_arrays(max_size=700), st.sampled_from([4, 8, 12]), st.sampled_from([0, 2]))
# Subnormals only: the grid step underflowed float32 and the encode failed (found by hypothesis).
@example(np.array([1e-45], dtype=np.float32), 4, 0)
@example(np.array([1e-45, -3e-45, 0.0], dtype=np.float32), 12, 2)
def test_property_error_bound(x, bits, scale_delta):
    y, p = roundtrip(x, "nnw_bdi", bits=bits, scale_delta=scale_delta, seed=1)
    if x.size == 0:
        return
    scale = p.stats["scale"]
    bound = scale * (0.5 + (2**scale_delta if scale_delta else 0))
    assert np.all(np.abs(y.astype(np.float64) - x) <= bound * (1 + 1e-5) + 1e-30)
    assert np.all(y[x == 0] == 0)


def test_size_counts_selectors_and_beats_raw():
    y, p = roundtrip(W, "nnw_bdi", bits=8, scale_init=2, seed=1)
    assert p.bits_per_value < 6.0 + 0.5  # a 6-bit grid: BDI never exceeds raw by more than
    # the per-block config id, and the header is included in nbytes
    scale = p.stats["scale"]
    assert np.abs(y - W).max() <= scale / 2 * 1.0001
    raw = smaq_rs.compress(W, "nnw_bdi", bits=8, scale_init=2, configs="0:0:0:1", seed=1)
    assert raw.stats["n_raw_blocks"] > 0


def test_bases_help_on_clustered_values():
    x = np.tile(np.array([100.0, -80.0, 20.0], np.float32), 3000)
    x += (np.arange(x.size) % 5).astype(np.float32) * 0.5
    y, p = roundtrip(x, "nnw_bdi", bits=12, num_bases=3, seed=1)
    assert p.stats["n_raw_blocks"] == 0
    assert p.bits_per_value < 11


def test_specials_and_constant():
    x = W[:1000].copy()
    x[[1, 2, 3]] = [np.nan, np.inf, -np.inf]
    y, p = roundtrip(x, "nnw_bdi", seed=1)
    assert np.isnan(y[1]) and y[2] == np.inf and y[3] == -np.inf
    assert p.stats["n_exceptions"] == 3
    y, _ = roundtrip(np.zeros(0, np.float32), "nnw_bdi")
    assert y.size == 0
    y, _ = roundtrip(np.zeros(100, np.float32), "nnw_bdi")
    assert np.all(y == 0)


def test_params_are_validated():
    with pytest.raises(smaq_rs.CodecError, match="mask:num_bases"):
        smaq_rs.compress(W, "nnw_bdi", configs="1:2:3")
    with pytest.raises(smaq_rs.CodecError, match="scale_init"):
        smaq_rs.compress(W, "nnw_bdi", bits=4, scale_init=3)
    with pytest.raises(smaq_rs.CodecError, match="zero_mask"):
        smaq_rs.compress(W, "nnw_bdi", zero_mask="maybe")


def test_corruption_is_a_typed_error():
    assert_rejects_corruption(smaq_rs.compress(W[:5000], "nnw_bdi", seed=1))


def test_digits_mlp_accuracy_and_size():
    sys.path.insert(0, str(EXAMPLES))
    from digits_bdi import run

    r = run()
    assert r["accuracy_bdi"] >= r["accuracy_fp32"] - 0.005, r
    assert r["ratio"] >= 6.0, r
