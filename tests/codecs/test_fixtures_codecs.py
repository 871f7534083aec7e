"""Every committed fixture of the encoder family decodes to its committed values: a format change
can never pass silently."""

import glob
import os

import numpy as np
import pytest

import smaq_rs

from helpers import FIXTURES as FIXTURE_DIR
from helpers import import_fixture_generator

HERE = str(FIXTURE_DIR)
_gen = import_fixture_generator("make_fixtures_codecs")
FIXTURES, LEGACY, source_for = _gen.FIXTURES, _gen.LEGACY, _gen.source_for
CODEC = {**{n: c for n, (c, _) in FIXTURES.items()}, **LEGACY}


@pytest.mark.parametrize("name", sorted(CODEC))
def test_fixture_decodes_to_expected(name):
    with open(os.path.join(HERE, f"{name}.smaq"), "rb") as f:
        data = f.read()
    want = np.load(os.path.join(HERE, f"{name}.expected.npy"))
    p = smaq_rs.PackedTensor.from_bytes(data)
    assert p.codec == CODEC[name]
    y = smaq_rs.decompress(p)
    np.testing.assert_array_equal(y, want)  # NaN == NaN for assert_array_equal
    assert p.nbytes == len(data)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_encoding_is_deterministic(name):
    """Today's encoder reproduces the fixture bytes (all fixture params are seeded)."""
    codec, params = FIXTURES[name]
    with open(os.path.join(HERE, f"{name}.smaq"), "rb") as f:
        assert smaq_rs.compress(source_for(name), codec, **params).to_bytes() == f.read()


def test_legacy_fixtures_differ_from_what_is_written_now():
    """A legacy fixture holds a layout no longer written: today's encoder gives other bytes for
    the same values, and both decode to the same values."""
    for name, codec in LEGACY.items():
        with open(os.path.join(HERE, f"{name}.smaq"), "rb") as f:
            old = f.read()
        want = np.load(os.path.join(HERE, f"{name}.expected.npy"))
        new = smaq_rs.compress(want, codec).to_bytes()
        assert new != old, name
        np.testing.assert_array_equal(smaq_rs.decompress(smaq_rs.PackedTensor.from_bytes(new)),
                                      want)


def test_lossless_metadata_versions():
    """The legacy lossless fixture holds metadata version 2, today's encoder writes 3, smaller
    on a small tensor (no chunk count, varint lengths, one Huffman stream)."""
    meta_version = lambda b: b[32 + 8 * b[8]]  # noqa: E731 (first metadata byte)
    with open(os.path.join(HERE, "lossless_v2_basic.smaq"), "rb") as f:
        old = f.read()
    new = smaq_rs.compress(source_for("lossless_basic"), "lossless").to_bytes()
    assert (meta_version(old), meta_version(new)) == (2, 3)
    assert len(new) < len(old)


def test_every_codec_of_the_family_has_a_fixture():
    have = {FIXTURES[n][0] for n in FIXTURES}
    ours = {"fp32", "fp16", "bf16", "fp8", "s2fp8", "mantissa", "int", "luq", "nnw_bdi"}
    assert ours <= have
    assert len(glob.glob(os.path.join(HERE, "*.smaq"))) >= len(FIXTURES)
