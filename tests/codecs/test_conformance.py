"""Every codec of the registry (``smaq_rs.list_codecs()``) keeps the same promises:

- a round trip stays within the codec's documented error bound (docs/CODECS.md); lossless
  codecs give back every bit;
- its config round trips as plain data, and the config recovered from a packed tensor encodes
  the same bytes again;
- damaged packed bytes raise a typed smaq_rs error, never a crash or a silently wrong value;
- its committed fixtures (tests/fixtures/*.smaq, found by the codec each file names) decode bit
  for bit to their expected values. A registered codec without a committed fixture fails here:
  write one with tests/fixtures/make_fixtures_codecs.py.

A codec added to the registry is picked up without editing this file, except for its error
bound, which must be added to BOUNDS (the test fails until it is).
"""

from __future__ import annotations

import json
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest

import smaq_rs
import smaq_rs.configs as C
from helpers import FIXTURES, assert_rejects_corruption, smaq_bound

REGISTRY = [c["name"] for c in smaq_rs.list_codecs()]
DEFAULTS = {c["name"]: c["defaults"] for c in smaq_rs.list_codecs()}


def sample() -> np.ndarray:
    """Finite float32 values of several magnitudes, with exact zeros and a few large values."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((48, 64)) * np.exp2(rng.integers(-3, 3, (48, 1)))
    x[::7, 3] = 0.0
    x[5, 5], x[40, 1] = 9.0, -12.5
    return x.astype(np.float32)


# -- documented bounds (docs/CODECS.md) --------------------------------------------------------
Bound = Callable[[np.ndarray, np.ndarray, smaq_rs.PackedTensor], Optional[np.ndarray]]


def _ulp(x64: np.ndarray, mbits: int, emin: int) -> np.ndarray:
    """The spacing of a float format with ``mbits`` mantissa bits around each |x| (subnormal
    spacing below 2^emin)."""
    a = np.abs(x64)
    e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    return np.exp2(np.maximum(e, emin) - mbits)


def _float(mbits: int, emin: int) -> Bound:
    """Half an ulp of the target format with nearest rounding, one ulp with stochastic or
    truncating rounding (float section of docs/CODECS.md)."""

    def bound(x64, y64, p):
        ulps = 0.5 if p.params.get("rounding", "nearest") == "nearest" else 1.0
        return ulps * _ulp(x64, mbits, emin)

    return bound


def _fp8(x64, y64, p):
    mbits, emin = {"e4m3": (3, -6), "e5m2": (2, -14)}[p.params["format"]]
    return _float(mbits, emin)(x64, y64, p)


def _mantissa(x64, y64, p):
    return _float(p.params["mantissa_bits"], -126)(x64, y64, p)


def _s2fp8(x64, y64, p):
    """y = 2^(alpha log2|x| + beta) kept in e5m2 (relative error <= 2^-3 with nearest), so |x|
    comes back within a factor 2^(log2(1 + 2^-3) / alpha) (for y in e5m2's normal range)."""
    factor = np.exp2(np.log2(1 + 2.0**-3) / p.stats["alpha"])
    return np.abs(x64) * (factor - 1) * 1.0001


def _int(x64, y64, p):
    """Affine or absmax grid per group; nearest rounding: half a step (docs/CODECS.md)."""
    prm = p.params
    assert prm["granularity"] == "block" and prm["rounding"] == "nearest", prm
    levels = 2 ** prm["bits"] - 1
    flat = x64.reshape(-1)
    out = np.empty_like(flat)
    for s in range(0, flat.size, prm["block_size"]):
        g = flat[s:s + prm["block_size"]]
        if prm["scheme"] == "affine":
            step = (g.max() - g.min()) / levels
        else:
            step = np.abs(g).max() / (2 ** (prm["bits"] - 1) - 1)
        out[s:s + g.size] = step / 2
    return out.reshape(x64.shape) * (1 + 1e-5) + 1e-30


def _luq(x64, y64, p):
    """Levels alpha 2^(j - L), L = 2^(bits-1) - 1, alpha = max|x|: a value between two levels
    rounds stochastically to one of them (error below the lower one); one below the smallest
    level becomes 0 or that level."""
    a = np.abs(x64)
    alpha = a.max()
    smallest = alpha * 2.0 ** (1 - (2 ** (p.params["bits"] - 1) - 1))
    lower = alpha * np.exp2(np.floor(np.log2(np.maximum(a, smallest) / alpha)))
    return np.where(a >= smallest, lower, smallest) * (1 + 1e-6)


def _nnw_bdi(x64, y64, p):
    """scale / 2 without delta downscaling, scale (1/2 + 2^scale_delta) with it."""
    sd = p.params["scale_delta"]
    return np.full_like(x64, p.stats["scale"] * (0.5 + (2.0**sd if sd else 0)) * (1 + 1e-5))


def _smaq(x64, y64, p):
    """Nearest: half a grid step of the value's code (helpers.smaq_bound); stochastic and
    truncating rounding: one step."""
    half = smaq_bound(x64, y64, p.stats, p.params, "float32")
    return half if p.params["rounding"] == "nearest" else 2 * half


def _sign(x64, y64, p):
    """Each value comes back as its sign times its block's mean |x|: the error is the distance
    of |x| from that mean (a wrong sign would add 2 min(|x|, mean))."""
    flat = np.abs(x64.reshape(-1))
    bs = p.params["block_size"]
    mean = np.repeat([flat[s:s + bs].mean() for s in range(0, flat.size, bs)], bs)[:flat.size]
    return (np.abs(flat - mean) + mean * 1e-6).reshape(x64.shape)


def _exact(x64, y64, p):
    return None


#: codec -> (parameters of the round trip, bound). None as bound: bit for bit.
BOUNDS: Dict[str, Tuple[Dict, Bound]] = {
    "smaq": ({"seed": 1}, _smaq),
    "fp32": ({}, _exact),
    "fp16": ({}, _float(10, -14)),
    "bf16": ({}, _float(7, -126)),
    "fp8": ({}, _fp8),
    "s2fp8": ({}, _s2fp8),
    "mantissa": ({}, _mantissa),
    "int": ({}, _int),
    "luq": ({"seed": 3}, _luq),
    "nnw_bdi": ({"seed": 9}, _nnw_bdi),
    "lossless": ({}, _exact),
    "sign": ({"block_size": 64}, _sign),
}


def _params(codec: str) -> Dict:
    if codec not in BOUNDS:
        pytest.fail(f"codec {codec!r} is registered but has no documented error bound in "
                    "tests/codecs/test_conformance.py (BOUNDS); add the one docs/CODECS.md states")
    return BOUNDS[codec][0]


def _s2fp8_sample() -> np.ndarray:
    """S2FP8 maps log2|x| onto e5m2's range around its mean; values far below the mean leave the
    normal range (underflow), so its sample spans 2^-2..2^2 with one value at 2^4."""
    rng = np.random.default_rng(8)
    x = np.exp2(rng.uniform(-2, 2, 3072)) * rng.choice([-1.0, 1.0], 3072)
    x[17] = 16.0
    return x.astype(np.float32).reshape(48, 64)


def _sample_for(codec: str) -> np.ndarray:
    return _s2fp8_sample() if codec == "s2fp8" else sample()


# -- round trip ----------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", REGISTRY)
def test_round_trip_within_documented_bound(codec):
    params = _params(codec)
    x = _sample_for(codec)
    p = smaq_rs.compress(x, codec, **params)
    back = smaq_rs.PackedTensor.from_bytes(p.to_bytes())
    y = smaq_rs.decompress(back)
    assert p.codec == codec and back.codec == codec
    assert y.dtype == x.dtype and y.shape == x.shape and p.nbytes == len(p.to_bytes())
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    bound = BOUNDS[codec][1](x64, y64, back)
    if bound is None:
        assert y.tobytes() == x.tobytes()
        specials = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-40, 3.4e38], np.float32)
        z = smaq_rs.decompress(smaq_rs.compress(specials, codec, **params))
        assert z.tobytes() == specials.tobytes()
        return
    err = np.abs(y64 - x64)
    worst = int(np.argmax(err - bound))
    assert np.all(err <= bound), (codec, x64.flat[worst], y64.flat[worst], bound.flat[worst])


# -- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", REGISTRY)
def test_config_round_trips_and_reencodes_the_same_bytes(codec):
    params = _params(codec)
    cfg = C.get_config(codec)
    assert type(cfg) is C.config_class(codec) and cfg.codec == codec
    assert cfg.params() == DEFAULTS[codec]
    d = json.loads(json.dumps(cfg.get_config()))
    assert d == {"id": codec, **DEFAULTS[codec]}
    assert C.from_config(d) == cfg
    x = _sample_for(codec)
    p = smaq_rs.compress(x, codec, **params)
    back = C.get_config(p)
    assert type(back) is type(cfg)
    assert C.from_config(json.loads(json.dumps(back.get_config()))) == back
    assert back.compress(x).to_bytes() == p.to_bytes()  # the seed used is part of the config


# -- corruption -----------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", REGISTRY)
def test_corrupted_bytes_are_a_typed_error(codec):
    p = smaq_rs.compress(_sample_for(codec), codec, **_params(codec))
    assert_rejects_corruption(p)
    with pytest.raises(smaq_rs.SmaqError):
        smaq_rs.decompress(b"")


# -- committed fixtures ---------------------------------------------------------------------------
def _packed_fixtures() -> Dict[str, List[str]]:
    """codec -> stems of the committed packed-tensor fixtures that name it (checkpoint
    containers, tests/fixtures/ckpt_*.smaq, are not packed tensors)."""
    out: Dict[str, List[str]] = {}
    for path in sorted(FIXTURES.glob("*.smaq")):
        data = path.read_bytes()
        if data.startswith(b"SMAQCKPT"):
            continue
        codec = smaq_rs.PackedTensor.from_bytes(data, kind="numpy").codec
        out.setdefault(codec, []).append(path.stem)
    return out


PACKED_FIXTURES = _packed_fixtures()


def test_every_fixture_names_a_registered_codec():
    assert PACKED_FIXTURES and set(PACKED_FIXTURES) <= set(REGISTRY)


@pytest.mark.parametrize("codec", REGISTRY)
def test_committed_fixtures_decode_bit_for_bit(codec):
    stems = PACKED_FIXTURES.get(codec)
    if not stems:
        pytest.fail(f"codec {codec!r} has no committed fixture in tests/fixtures; write one with "
                    "tests/fixtures/make_fixtures_codecs.py")
    for stem in stems:
        data = (FIXTURES / f"{stem}.smaq").read_bytes()
        want = np.load(FIXTURES / f"{stem}.expected.npy")
        p = smaq_rs.PackedTensor.from_bytes(data, kind="numpy")
        assert p.codec == codec and p.nbytes == len(data)
        y = smaq_rs.decompress(p)
        assert y.dtype == want.dtype and y.shape == want.shape, stem
        assert y.tobytes() == want.tobytes(), stem
