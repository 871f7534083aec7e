"""The packed format on disk: committed fixtures decode bit for bit; damaged bytes raise typed errors."""

from pathlib import Path

import numpy as np
import pytest
import torch

import smaq_rs
from smaq_rs import ChecksumError, FormatError, PackedTensor, SmaqError

FIXTURES = sorted(Path(__file__).parent.joinpath("fixtures").glob("smaq_*.smaq"))


def bits(y):
    if isinstance(y, torch.Tensor):
        return y.view(torch.int16).numpy().view(np.uint16) if y.dtype == torch.bfloat16 else y.numpy()
    return y


def test_fixtures_exist():
    assert len(FIXTURES) >= 6


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
