"""Float codecs: fp32, fp16, bf16, fp8 (e4m3/e5m2), s2fp8, mantissa truncation."""

import numpy as np
import pytest
from hypothesis import given, settings

import smaq_rs
from helpers import assert_rejects_corruption, finite_arrays, roundtrip

torch = pytest.importorskip("torch")

RNG = np.random.default_rng(0)
X = np.concatenate([
    RNG.standard_normal(20_000).astype(np.float32) * 10.0,
    (RNG.standard_normal(2000) * 1e-6).astype(np.float32),
    np.array([0.0, -0.0, 1.0, 448.0, 500.0, 57344.0, 65504.0, 70000.0, 1e30], np.float32),
])


@pytest.mark.parametrize("codec,params,dtype", [
    ("fp16", {}, torch.float16),
    ("bf16", {}, torch.bfloat16),
    ("fp8", {"format": "e5m2", "overflow": "inf"}, torch.float8_e5m2),
])
def test_nearest_matches_torch_cast(codec, params, dtype):
    y, p = roundtrip(X, codec, **params)
    want = torch.from_numpy(X).to(dtype).float().numpy()
    np.testing.assert_array_equal(y, want)
    assert p._packed.payload_nbytes == X.size * (1 if codec == "fp8" else 2)


def test_e4m3_matches_torch_within_range_and_saturates():
    y, _ = roundtrip(X, "fp8", format="e4m3")
    inr = np.abs(X) <= 448
    want = torch.from_numpy(X).to(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(y[inr], want[inr])
    assert np.all(np.abs(y[~inr]) == 448)
    y, _ = roundtrip(X, "fp8", format="e4m3", overflow="inf")
    assert np.all(np.isnan(y[np.abs(X) > 464]))  # e4m3fn has no Inf: NaN, as torch does


def test_fp32_is_exact():
    y, p = roundtrip(X, "fp32")
    np.testing.assert_array_equal(y, X)


@settings(max_examples=40, deadline=None)
@given(finite_arrays())
def test_fp16_property(x):
    y, p = roundtrip(x, "fp16", overflow="saturate")
    # |x| <= 1e4 < 65504: relative error <= 2^-11 for normals, abs <= 2^-25 below them.
    assert np.all(np.abs(y - x) <= np.maximum(np.abs(x) * 2.0**-11, 2.0**-25))


@settings(max_examples=40, deadline=None)
@given(finite_arrays())
def test_stochastic_bf16_brackets(x):
    y, _ = roundtrip(x, "bf16", rounding="stochastic", seed=3)
    lo = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    # Stochastic rounding picks one of the two neighbours: within one bf16 ulp.
    ulp = np.maximum(np.abs(x) * 2.0**-7, 1e-38)
    assert np.all(np.abs(y - x) <= ulp)
    assert np.all(np.abs(y - lo) <= 2 * ulp)


def test_stochastic_is_unbiased_and_seeded():
    x = np.full(1 << 16, 1.0 + 1.0 / 3.0 * 2.0**-7, np.float32)
    y, p = roundtrip(x, "bf16", rounding="stochastic", seed=11)
    assert abs(float(y.astype(np.float64).mean()) - float(x[0])) < 2e-5
    assert p.params["seed"] == 11
    y2, _ = roundtrip(x, "bf16", rounding="stochastic", seed=11)
    np.testing.assert_array_equal(y, y2)


@pytest.mark.parametrize("m", [1, 3, 10, 22])
def test_mantissa_truncation_is_floor_and_packed(m):
    y, p = roundtrip(X, "mantissa", mantissa_bits=m)
    mask = np.uint32((0xFFFFFFFF << (23 - m)) & 0xFFFFFFFF)
    np.testing.assert_array_equal(y.view(np.uint32), X.view(np.uint32) & mask)
    assert p._packed.payload_nbytes == (X.size * (9 + m) + 7) // 8


def test_s2fp8_relative_error_and_stats():
    x = (np.exp2(RNG.uniform(-10, -4, 50_000)) * RNG.choice([-1, 1], 50_000)).astype(np.float32)
    y, p = roundtrip(x, "s2fp8")
    assert np.max(np.abs(y - x) / np.abs(x)) < 0.05
    assert p.stats["alpha"] > 0 and p._packed.payload_nbytes == x.size


@pytest.mark.parametrize("codec,params", [
    ("fp32", {}), ("fp16", {}), ("bf16", {}), ("fp8", {"format": "e5m2"}), ("s2fp8", {}),
    ("mantissa", {"mantissa_bits": 5}),
])
def test_specials_empty_constant(codec, params):
    x = np.array([np.nan, np.inf, -np.inf, 0.0, 1.5], np.float32)
    y, _ = roundtrip(x, codec, **params)
    assert np.isnan(y[0]) and y[1] == np.inf and y[2] == -np.inf and y[3] == 0
    y, _ = roundtrip(np.zeros(0, np.float32), codec, **params)
    assert y.size == 0
    c = np.full((3, 7), 0.75, np.float32)
    y, _ = roundtrip(c, codec, **params)
    np.testing.assert_array_equal(y, c)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_other_input_dtypes(dtype):
    x = X[:1000].astype(dtype)
    y, _ = roundtrip(x, "fp16")
    np.testing.assert_allclose(y, x.astype(np.float16).astype(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("codec,params", [("fp16", {}), ("fp8", {}), ("mantissa", {}),
                                          ("s2fp8", {})])
def test_corruption_is_a_typed_error(codec, params):
    assert_rejects_corruption(smaq_rs.compress(X[:3000], codec, **params))


def test_bad_params():
    with pytest.raises(smaq_rs.CodecError, match="e4m3"):
        smaq_rs.compress(X, "fp8", format="e3m4")
    with pytest.raises(smaq_rs.CodecError, match="1..=22"):
        smaq_rs.compress(X, "mantissa", mantissa_bits=23)
    with pytest.raises(smaq_rs.CodecError, match="rounding"):
        smaq_rs.compress(X, "fp16", rounding="up")
