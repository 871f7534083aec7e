"""SmaQ's promises: error bounds, unbiased stochastic rounding, exact byte accounting, special values."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import smaq_rs
from helpers import smaq_bound
from smaq_rs.reference import smaq_research

FIXED_HEADER = 32  # magic .. element count (docs/FORMAT.md)
META_FIXED = 68  # SmaQ metadata before the chunk index
CHECKSUM = 8


def as64(a):
    return a.double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float64)


finite_floats = st.floats(-1e4, 1e4, allow_nan=False, width=32)


@st.composite
def tensors(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=40))
    kind = draw(st.sampled_from(["float32", "float16", "float64", "bfloat16"]))
    scale = draw(st.sampled_from([1e-3, 1.0, 50.0]))
    base = draw(hnp.arrays(np.float64, shape, elements=st.floats(-3, 3, allow_nan=False)))
    offset = draw(st.floats(-10, 10, allow_nan=False))
    x = base * scale + offset
    if kind == "bfloat16":
        return torch.from_numpy(x).to(torch.bfloat16)
    return x.astype(kind)


@given(x=tensors(), bm=st.integers(3, 8), extra=st.integers(0, 4), chunk=st.sampled_from([64, 1000, 65536]))
def test_nearest_rounding_error_bound(x, bm, extra, chunk):
    p = smaq_rs.compress(x, rounding="nearest", bits_main=bm, bits_outlier=bm + extra,
                         chunk_size=chunk, min_size=0)
    y = smaq_rs.decompress(p)
    x64, y64 = as64(x), as64(y)
    bound = smaq_bound(x64, y64, p.stats, p.params, p.dtype)
    err = np.abs(x64 - y64)
    assert np.all(err <= bound), (err - bound).max()


@given(x=hnp.arrays(np.float32, st.integers(8, 3000), elements=finite_floats),
       bm=st.integers(3, 16), bo_extra=st.integers(0, 12))
def test_every_width_round_trips_within_bound(x, bm, bo_extra):
    bo = min(bm + bo_extra, 16)
    p = smaq_rs.compress(x, rounding="nearest", bits_main=bm, bits_outlier=bo, stats="exact")
    y = smaq_rs.decompress(p)
    bound = smaq_bound(x.astype(np.float64), y.astype(np.float64), p.stats, p.params, "float32")
    assert np.all(np.abs(y.astype(np.float64) - x) <= bound)


def test_stochastic_rounding_is_unbiased():
    x = np.random.default_rng(1).standard_normal(4096).astype(np.float32)
    seeds = 300
    acc = np.zeros(x.size)
    for s in range(seeds):
        acc += smaq_rs.decompress(smaq_rs.compress(x, seed=s, stats="exact"))
    p = smaq_rs.compress(x, seed=0, stats="exact")
    inside = np.abs((x - p.stats["mean"]) / p.stats["std"]) <= 2.5
    bias = acc / seeds - x
    step = p.stats["std"] / 15  # main grid step
    # Each average has standard error <= step / (2 sqrt(seeds)); the mean over 4096 of them far less.
    assert abs(bias[inside].mean()) < 3 * step / (2 * np.sqrt(seeds * inside.sum()))
    assert np.abs(bias[inside]).max() < 5 * step / (2 * np.sqrt(seeds))
    # ...while one encode does have rounding error: the test above is not vacuous.
    one = smaq_rs.decompress(p) - x
    assert np.abs(one[inside]).mean() > 0.1 * step


def test_nearest_is_deterministic_and_seeds_reproduce():
    x = np.random.default_rng(2).standard_normal(100_000).astype(np.float32)
    a = smaq_rs.compress(x, seed=7)
    assert smaq_rs.compress(x, seed=7).to_bytes() == a.to_bytes()
    assert smaq_rs.compress(x, seed=8).to_bytes() != a.to_bytes()
    fresh = smaq_rs.compress(x)
    again = smaq_rs.compress(x, seed=fresh.params["seed"])
    assert again.to_bytes() == fresh.to_bytes()


@pytest.mark.parametrize("n,chunk", [(1000, 1 << 16), (100_003, 4096), (64, 64)])
def test_nbytes_is_the_exact_bit_accounting(n, chunk):
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    p = smaq_rs.compress(x, chunk_size=chunk)
    s = p.stats
    chunks = -(-n // chunk)
    assert s["n_chunks"] == chunks
    n_out = s["n_outliers"]
    payload_bits = (n - n_out) * 6 + n_out * 8
    # escape_bits and 3 reserved bytes, then the chunk index: outliers, exceptions, escapes,
    # escape bytes (u32 each) per chunk
    header = FIXED_HEADER + 8 * x.ndim + META_FIXED + 4 + 16 * chunks + CHECKSUM
    esc = s["escape_bytes"]
    assert (esc == 0) == (s["n_escapes"] == 0)
    if chunks == 1:
        # one chunk: primary stream ceil(6n/8) bytes, extra stream ceil(2 n_out / 8) bytes, then
        # the escape stream of the values beyond t_outlier
        assert p.nbytes == header + -(-6 * n // 8) + -(-2 * n_out // 8) + esc
    # in general each stream of each chunk rounds up to a whole byte, nothing else is added
    assert header + payload_bits / 8 + esc <= p.nbytes <= header + payload_bits / 8 + esc + 2 * chunks
    # clamping (an explicit choice) has the version-1 index and no escape stream
    c = smaq_rs.compress(x, chunk_size=chunk, outliers="clamp")
    assert c.stats["escape_bytes"] == 0
    assert c.stats["n_outliers"] == n_out
    assert c.nbytes == p.nbytes - esc - 8 * chunks - 4
    # and the outlier count is the real one
    z = np.abs((x.astype(np.float64) - s["mean"]) / s["std"])
    assert abs(int((z > 1.0).sum()) - n_out) <= max(2, n // 10_000)


def _rel(y, x):
    return ((y.double() - x.double()).pow(2).mean().sqrt() / x.double().pow(2).mean().sqrt()).item()


TAILED = {
    "normal": lambda g: torch.randn(1 << 20, generator=g),
    "student_t3": lambda g: torch.randn(1 << 20, generator=g)
    / (torch.randn(1 << 20, 3, generator=g).pow(2).mean(1).sqrt()),
    "relu_skewed": lambda g: torch.relu(torch.randn(1 << 20, generator=g) * 2 + 0.3) ** 1.5,
    "adam_v_like": lambda g: (torch.randn(1 << 20, generator=g) * torch.rand(1 << 20, generator=g))
    ** 2 * 1e-6,
    "lognormal": lambda g: torch.exp(torch.randn(1 << 20, generator=g) * 2),
}


@pytest.mark.parametrize("name", sorted(TAILED))
def test_default_error_matches_the_research_algorithm_at_close_to_its_bits(name):
    """Defaults (6/8, 1.0/2.5, stochastic) against the research algorithm (smaq_rs.reference,
    which never clamps): the same error up to rounding noise (lower where exact zeros are kept),
    in at most 1.1x the bits it counted. Clamping, by contrast, is many times worse on tails."""
    x = TAILED[name](torch.Generator().manual_seed(3))
    positive = name == "adam_v_like"
    ref = smaq_research(x, all_positive=positive, generator=torch.Generator().manual_seed(4))
    p = smaq_rs.compress(x, all_positive=positive)
    ours, theirs = _rel(smaq_rs.decompress(p), x), _rel(ref.values, x)
    assert ours <= 1.01 * theirs, (ours, theirs)
    assert ours > 0.005  # it is lossy
    assert p.nbytes * 8 <= 1.10 * ref.bits, (p.nbytes * 8 / ref.bits)
    assert p.stats["n_clamped"] == 0
    clamped = smaq_rs.compress(x, all_positive=positive, outliers="clamp")
    assert clamped.stats["n_clamped"] > 0
    assert _rel(smaq_rs.decompress(clamped), x) > 2 * theirs


def test_nan_and_inf_round_trip_and_do_not_poison_stats():
    x = np.random.default_rng(4).standard_normal(10_000).astype(np.float32)
    x[[1, 500, 9999]] = [np.nan, np.inf, -np.inf]
    p = smaq_rs.compress(x, stats="exact")
    y = smaq_rs.decompress(p)
    assert np.isnan(y[1]) and y[500] == np.inf and y[9999] == -np.inf
    assert np.isfinite(np.delete(y, [1, 500, 9999])).all()
    assert p.stats["n_nonfinite"] == 3 and p.stats["n_exceptions"] == 3
    assert 0.9 < p.stats["std"] < 1.1


def test_all_nan_and_empty_and_tiny():
    for x in [np.full(100, np.nan, np.float32), np.zeros((0,), np.float32),
              np.zeros((3, 0, 2), np.float32), np.array([1.5], np.float32),
              np.array(2.5, np.float32)]:
        p = smaq_rs.compress(x)
        y = smaq_rs.decompress(p)
        assert y.shape == x.shape and y.dtype == x.dtype
        np.testing.assert_array_equal(y, x)  # NaN == NaN here; tiny tensors are stored raw


def test_constant_and_zero_values_are_exact():
    c = np.full(10_000, 3.25, np.float32)
    np.testing.assert_array_equal(smaq_rs.decompress(smaq_rs.compress(c)), c)
    x = np.random.default_rng(5).standard_normal(10_000).astype(np.float32) + 4
    x[::7] = 0.0
    y = smaq_rs.decompress(smaq_rs.compress(x))
    assert (y[::7] == 0).all()
    assert (y[1::7] != 0).all()


def test_huge_magnitudes_stay_finite():
    x = np.random.default_rng(6).standard_normal(10_000).astype(np.float32) * 1e37
    x[0] = 3.4e38
    y = smaq_rs.decompress(smaq_rs.compress(x))
    assert np.isfinite(y).all()
    h = np.clip(np.random.default_rng(7).standard_normal(10_000) * 2e4, -65504, 65504)
    h = h.astype(np.float16)
    h[0] = 65504
    yh = smaq_rs.decompress(smaq_rs.compress(h))
    assert np.isfinite(yh).all()
    d = np.random.default_rng(8).standard_normal(1000) * 1e300
    assert np.isfinite(smaq_rs.decompress(smaq_rs.compress(d))).all()
    tiny = (np.random.default_rng(9).standard_normal(1000) * 1e-40).astype(np.float32)
    pt = smaq_rs.compress(tiny, rounding="nearest")
    yt = smaq_rs.decompress(pt)
    t64, y64 = tiny.astype(np.float64), yt.astype(np.float64)
    # subnormal outputs: add the float32 subnormal spacing to the bound
    assert np.all(np.abs(y64 - t64) <= smaq_bound(t64, y64, pt.stats, pt.params, "float32") + 1.5e-45)
    assert 0.9e-40 < pt.stats["std"] < 1.1e-40


def test_clamped_values_are_counted_and_exact_mode_keeps_them():
    x = np.random.default_rng(10).standard_normal(100_000).astype(np.float32)
    x[42] = 40.0
    p = smaq_rs.compress(x, stats="exact", outliers="clamp")
    beyond = int((np.abs((x - p.stats["mean"]) / p.stats["std"]) > 2.5).sum())
    assert abs(p.stats["n_clamped"] - beyond) <= 2
    top = p.stats["mean"] + 2.5 * p.stats["std"]
    assert smaq_rs.decompress(p)[42] == pytest.approx(top, rel=1e-3)
    e = smaq_rs.compress(x, stats="exact", outliers="exact")
    ye = smaq_rs.decompress(e)
    assert ye[42] == 40.0 and e.stats["n_clamped"] == 0
    assert abs(e.stats["n_exceptions"] - beyond) <= 2
    keep = np.abs((x - e.stats["mean"]) / e.stats["std"]) > 2.5 + 1e-4
    np.testing.assert_array_equal(ye[keep], x[keep])
    # each exception costs its index (4 bytes) and the raw value (4 bytes)
    assert e.nbytes - p.nbytes == pytest.approx(8 * e.stats["n_exceptions"], abs=16)


def test_all_positive_never_decodes_below_zero():
    v = np.random.default_rng(11).standard_normal(100_000).astype(np.float32) ** 2 * 1e-8
    y = smaq_rs.decompress(smaq_rs.compress(v, all_positive=True))
    assert (y >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_keep_their_error_bound(dtype):
    x = (torch.randn(50_000) * 3 + 1).to(dtype)
    p = smaq_rs.compress(x, rounding="nearest")
    y = smaq_rs.decompress(p)
    assert y.dtype == dtype
    x64, y64 = as64(x), as64(y)
    assert np.all(np.abs(x64 - y64) <= smaq_bound(x64, y64, p.stats, p.params, p.dtype))


def test_stats_options():
    x = np.random.default_rng(12).standard_normal(200_000).astype(np.float32) * 2 + 1
    exact = smaq_rs.compress(x, stats="exact").stats
    assert exact["mean"] == pytest.approx(float(x.mean()), abs=1e-4)
    assert exact["std"] == pytest.approx(float(x.std()), rel=1e-4)
    sampled = smaq_rs.compress(x, stats="sampled", k=4096, seed=1).stats
    assert sampled["std"] == pytest.approx(2.0, rel=0.05)
    rng = smaq_rs.compress(x, stats="exact", std="range").stats
    expect = (x.max() - x.min()) / np.sqrt(2 * np.log(x.size))
    assert rng["std"] == pytest.approx(float(expect), rel=1e-4)
    for r in ["truncate", "nearest", "stochastic"]:
        y = smaq_rs.decompress(smaq_rs.compress(x, rounding=r))
        assert np.abs(y - x).mean() < 0.1


@pytest.mark.parametrize("params", [{"escape_bits": 17}, {"escape_bits": -1}, {"outliers": "drop"},
                                    {"log": "yes"}, {"escape_bits": 2.5}])
def test_bad_tail_and_log_parameters_are_codec_errors(params):
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    with pytest.raises(smaq_rs.CodecError):
        smaq_rs.compress(x, **params)


def test_log_domain_round_trip_keeps_zeros_negatives_and_specials():
    v = (np.exp(np.random.default_rng(1).standard_normal(5000) * 3) * 1e-8).astype(np.float32)
    v[:5] = [0.0, 1.0, -2.0, np.nan, np.inf]
    p = smaq_rs.compress(v, log=True, rounding="nearest")
    y = smaq_rs.decompress(p)
    assert y[0] == 0.0 and y[2] == -2.0 and np.isnan(y[3]) and y[4] == np.inf
    rel = np.abs(y[5:] / v[5:] - 1)
    assert rel.max() < 0.25 and np.median(rel) < 0.05
    assert p.to_bytes()[4] == 2
