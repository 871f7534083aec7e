"""The packed format on disk: committed fixtures decode bit for bit; damaged bytes raise typed errors."""

import numpy as np
import pytest
import torch

import smaq_rs
from smaq_rs import ChecksumError, FormatError, PackedTensor, SmaqError
from helpers import FIXTURES as FIXTURE_DIR

FIXTURES = sorted(FIXTURE_DIR.glob("smaq_*.smaq"))


def bits(y):
    if isinstance(y, torch.Tensor):
        return y.view(torch.int16).numpy().view(np.uint16) if y.dtype == torch.bfloat16 else y.numpy()
    return y


def test_fixtures_exist():
    assert len(FIXTURES) >= 6


def test_fixtures_of_both_versions_are_read():
    """Version 1 (clamped or exact tails) and version 2 (escape stream) files both decode; the
    version byte follows the layout: clamping still writes version 1."""
    versions = {p.stem: p.read_bytes()[4] for p in FIXTURES}
    assert {1, 2} <= set(versions.values())
    for stem, v in versions.items():
        assert v == (2 if stem.startswith("smaq_v2_") else 1), stem
        p = PackedTensor.from_bytes((FIXTURES[0].parent / f"{stem}.smaq").read_bytes())
        assert (p.stats.get("n_escapes", 0) > 0) == (v == 2), stem
    x = np.random.default_rng(5).standard_normal(1000).astype(np.float32)
    assert smaq_rs.compress(x, outliers="clamp").to_bytes()[4] == 1
    assert smaq_rs.compress(x).to_bytes()[4] == 2
    assert smaq_rs.compress(x, codec="fp16").to_bytes()[4] == 1
    assert smaq_rs.FORMAT_VERSION == 2


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_fixture_decodes_bit_for_bit(path):
    p = PackedTensor.from_bytes(path.read_bytes())
    expected = np.load(path.with_name(path.stem + ".expected.npy"))
    y = bits(smaq_rs.decompress(p))
    assert y.shape == expected.shape and p.shape == expected.shape
    assert y.tobytes() == expected.tobytes()  # NaN payloads and signed zeros included
    assert p.to_bytes() == path.read_bytes()


def sample_bytes():
    x = np.random.default_rng(0).standard_normal(300).astype(np.float32)
    x[5] = np.nan
    return smaq_rs.compress(x, chunk_size=64, seed=1).to_bytes()


def test_every_single_byte_flip_is_caught():
    good = sample_bytes()
    for i in range(len(good)):
        bad = bytearray(good)
        bad[i] ^= 0x5A
        with pytest.raises((FormatError, ChecksumError)):
            PackedTensor.from_bytes(bytes(bad))


def test_every_truncation_and_extension_is_caught():
    good = sample_bytes()
    for n in range(len(good)):
        with pytest.raises(FormatError):
            PackedTensor.from_bytes(good[:n])
    with pytest.raises(FormatError, match="buffer has"):
        PackedTensor.from_bytes(good + b"\0")


@pytest.mark.parametrize("data", [b"", b"SMAQ", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, bytes(1000),
                                  np.random.default_rng(1).bytes(4096)])
def test_foreign_bytes_are_refused(data):
    with pytest.raises(FormatError):
        PackedTensor.from_bytes(data)


def test_random_corruption_never_crashes():
    good = sample_bytes()
    rng = np.random.default_rng(2)
    for _ in range(2000):
        bad = bytearray(good)
        for i in rng.integers(0, len(bad), rng.integers(1, 6)):
            bad[i] = rng.integers(0, 256)
        try:
            smaq_rs.decompress(PackedTensor.from_bytes(bytes(bad)))
        except SmaqError:
            pass


def test_version_and_magic_messages():
    good = bytearray(sample_bytes())
    bad = bytearray(good)
    bad[4] = 9
    with pytest.raises(FormatError, match="version 9"):
        PackedTensor.from_bytes(bytes(bad))
    with pytest.raises(FormatError, match="magic"):
        PackedTensor.from_bytes(b"XXXX" + bytes(good[4:]))
    with pytest.raises(FormatError, match="bytes-like"):
        PackedTensor.from_bytes(12)


def test_checksum_of_a_fresh_encoding_is_the_one_that_loads():
    """A fresh encoding computes its checksum when its bytes are first read out: ``to_bytes``
    gives the same bytes every time, and they load (checksum verified) and decode the same."""
    x = np.random.default_rng(3).standard_normal(200_000).astype(np.float32)
    for codec, params in [("fp16", {}), ("smaq", {"seed": 2}), ("int", {"bits": 4})]:
        p = smaq_rs.compress(x, codec=codec, **params)
        first = p.to_bytes()
        assert len(first) == p.nbytes and p.to_bytes() == first
        back = PackedTensor.from_bytes(first)
        assert back.to_bytes() == first
        assert smaq_rs.decompress(back).tobytes() == smaq_rs.decompress(p).tobytes()
        bad = bytearray(first)
        bad[-1] ^= 1
        with pytest.raises(ChecksumError):
            PackedTensor.from_bytes(bytes(bad))


_STREAM_SCRIPT = """
import hashlib, sys
import numpy as np, smaq_rs
x = np.random.default_rng(4).standard_normal(300_001).astype(np.float32)
x[::997] = np.nan
x[1::991] = np.inf
for codec, params in [("fp16", {}), ("bf16", {}), ("fp8", {"format": "e4m3"}),
                      ("fp8", {"format": "e5m2"}), ("fp8", {"format": "e4m3", "overflow": "saturate"})]:
    for lo in (0, 1, 3):  # different alignments of the same values
        b = smaq_rs.compress(np.ascontiguousarray(x[lo:]), codec=codec, **params).to_bytes()
        print(codec, params, lo, hashlib.sha256(b).hexdigest())
"""


def test_non_temporal_stores_write_the_same_bytes():
    """Large float encodings use non-temporal stores (``SMAQ_RS_STREAM=1`` forces them at any
    size, ``=0`` turns them off): the packed bytes are the same either way."""
    import os
    import subprocess
    import sys

    def run(mode):
        env = dict(os.environ, SMAQ_RS_STREAM=mode)
        out = subprocess.run([sys.executable, "-c", _STREAM_SCRIPT], env=env, check=True,
                             capture_output=True, text=True)
        return out.stdout.splitlines()

    streamed, plain = run("1"), run("0")
    assert len(streamed) == 15 and streamed == plain
