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
FIXTURES, source = _gen.FIXTURES, _gen.source


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_decodes_to_expected(name):
    with open(os.path.join(HERE, f"{name}.smaq"), "rb") as f:
        data = f.read()
    want = np.load(os.path.join(HERE, f"{name}.expected.npy"))
    p = smaq_rs.PackedTensor.from_bytes(data)
    assert p.codec == FIXTURES[name][0]
    y = smaq_rs.decompress(p)
    np.testing.assert_array_equal(y, want)  # NaN == NaN for assert_array_equal
    assert p.nbytes == len(data)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_encoding_is_deterministic(name):
    """Today's encoder reproduces the fixture bytes (all fixture params are seeded)."""
    codec, params = FIXTURES[name]
    with open(os.path.join(HERE, f"{name}.smaq"), "rb") as f:
        assert smaq_rs.compress(source(), codec, **params).to_bytes() == f.read()


def test_every_codec_of_the_family_has_a_fixture():
    have = {FIXTURES[n][0] for n in FIXTURES}
    ours = {"fp32", "fp16", "bf16", "fp8", "s2fp8", "mantissa", "int", "luq", "nnw_bdi"}
    assert ours <= have
    assert len(glob.glob(os.path.join(HERE, "*.smaq"))) >= len(FIXTURES)
