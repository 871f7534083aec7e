"""The public API: what goes in, what comes out, and how bad input is refused."""

import pickle
import threading

import numpy as np
import pytest
import torch

import smaq_rs
from smaq_rs import (
    ChecksumError,
    CodecError,
    DtypeError,
    FormatError,
    LayoutError,
    PackedTensor,
    SmaqError,
)

RNG = np.random.default_rng(0)


def normal(n, dtype=np.float32):
    return np.random.default_rng(n).standard_normal(n).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_numpy_round_trip_keeps_kind_dtype_shape(dtype):
    x = normal(3 * 5 * 7, dtype).reshape(3, 5, 7)
    p = smaq_rs.compress(x)
    y = smaq_rs.decompress(p)
    assert isinstance(y, np.ndarray)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert p.shape == (3, 5, 7) and p.dtype == np.dtype(dtype).name and p.kind == "numpy"
    assert np.sqrt(np.mean((y.astype(np.float64) - x) ** 2)) < 0.1  # lossy, close


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_torch_round_trip_keeps_kind_dtype_shape(dtype):
    x = torch.randn(64, 33, generator=torch.Generator().manual_seed(0)).to(dtype)
    p = smaq_rs.compress(x, seed=1)
    y = smaq_rs.decompress(p)
    assert isinstance(y, torch.Tensor)
    assert y.dtype == dtype and y.shape == x.shape and p.kind == "torch"
    assert (y.double() - x.double()).pow(2).mean().sqrt() < 0.1


def test_torch_input_is_read_without_copy_and_not_modified():
    x = torch.randn(10_000)
    before = x.clone()
    x.requires_grad_(True)
    smaq_rs.compress(x)
    assert torch.equal(x.detach(), before)


def test_decompress_into_out():
    x = normal(1000)
    p = smaq_rs.compress(x, rounding="nearest")
    out = np.empty_like(x)
    assert smaq_rs.decompress(p, out=out) is out
    np.testing.assert_array_equal(out, smaq_rs.decompress(p))
    t = torch.empty(1000, dtype=torch.float32)
    assert smaq_rs.decompress(p, out=t) is t
    np.testing.assert_array_equal(t.numpy(), out)
    tb = torch.randn(64, dtype=torch.bfloat16)
    pb = smaq_rs.compress(tb)
    ob = torch.empty(64, dtype=torch.bfloat16)
    smaq_rs.decompress(pb, out=ob)
    assert torch.equal(ob, smaq_rs.decompress(pb))


@pytest.mark.parametrize(
    "out",
    [
        np.empty(999, np.float32),
        np.empty(1000, np.float64),
        np.empty((10, 100), np.float32),
        np.empty(2000, np.float32)[::2],
        torch.empty(1000, dtype=torch.float16),
        [0.0] * 1000,
    ],
    ids=["short", "dtype", "shape", "strided", "torch-dtype", "list"],
)
def test_bad_out_is_refused(out):
    p = smaq_rs.compress(normal(1000))
    with pytest.raises(LayoutError):
        smaq_rs.decompress(p, out=out)


def test_readonly_out_is_refused():
    p = smaq_rs.compress(normal(100))
    out = np.empty(100, np.float32)
    out.flags.writeable = False
    with pytest.raises(LayoutError):
        smaq_rs.decompress(p, out=out)


def test_non_contiguous_input_is_refused_with_a_hint():
    x = normal(200).reshape(10, 20)
    with pytest.raises(LayoutError, match="contiguous"):
        smaq_rs.compress(x.T)
    with pytest.raises(LayoutError, match="contiguous"):
        smaq_rs.compress(torch.from_numpy(x).t())
    smaq_rs.compress(np.ascontiguousarray(x.T))


@pytest.mark.parametrize(
    "x",
    [
        np.arange(10, dtype=np.int32),
        np.zeros(10, dtype=np.complex64),
        np.zeros(10, dtype=bool),
        np.zeros(10, dtype=">f4"),
        torch.arange(10),
        [1.0, 2.0],
        "text",
    ],
    ids=["int32", "complex", "bool", "big-endian", "torch-int", "list", "str"],
)
def test_wrong_dtype_is_refused(x):
    with pytest.raises(DtypeError):
        smaq_rs.compress(x)


def test_packed_tensor_reports_true_bytes():
    x = normal(100_000)
    p = smaq_rs.compress(x)
    b = p.to_bytes()
    assert p.nbytes == len(b)
    assert p.dense_nbytes == x.nbytes
    assert p.ratio == pytest.approx(x.nbytes / len(b))
    assert p.bits_per_value == pytest.approx(8 * len(b) / x.size)
    assert p.codec == "smaq" and p.numel == x.size
    assert set(p.stats) >= {"mean", "std", "n_outliers", "n_clamped", "n_nonfinite", "n_exceptions"}
    assert isinstance(p.params["seed"], int) and p.params["bits_main"] == 6
    assert "smaq" in repr(p)


def test_bytes_and_pickle_round_trip():
    x = normal(5000)
    p = smaq_rs.compress(x)
    q = PackedTensor.from_bytes(p.to_bytes())
    np.testing.assert_array_equal(smaq_rs.decompress(q), smaq_rs.decompress(p))
    np.testing.assert_array_equal(smaq_rs.decompress(p.to_bytes()), smaq_rs.decompress(p))
    np.testing.assert_array_equal(smaq_rs.decompress(bytearray(p.to_bytes())), smaq_rs.decompress(p))
    for view in [memoryview(p.to_bytes()), memoryview(p.to_bytes()).cast("b"),
                 np.frombuffer(p.to_bytes(), np.uint8)]:
        assert PackedTensor.from_bytes(view).to_bytes() == p.to_bytes()
    r = pickle.loads(pickle.dumps(p))
    assert r.to_bytes() == p.to_bytes() and r.kind == "numpy"
    tb = torch.randn(100, dtype=torch.bfloat16)
    rb = PackedTensor.from_bytes(smaq_rs.compress(tb).to_bytes())
    assert rb.kind == "torch" and smaq_rs.decompress(rb).dtype == torch.bfloat16


def test_codec_errors_name_what_is_allowed():
    x = normal(100)
    with pytest.raises(CodecError, match="available: .*smaq"):
        smaq_rs.compress(x, codec="nope")
    with pytest.raises(CodecError, match="bits_main"):
        smaq_rs.compress(x, bits_mian=6)
    with pytest.raises(CodecError, match="3..=16"):
        smaq_rs.compress(x, bits_main=2)
    with pytest.raises(CodecError, match="at least bits_main"):
        smaq_rs.compress(x, bits_main=8, bits_outlier=6)
    with pytest.raises(CodecError, match="greater than t_main"):
        smaq_rs.compress(x, t_main=2.0, t_outlier=1.5)
    with pytest.raises(CodecError, match="one of"):
        smaq_rs.compress(x, rounding="up")
    with pytest.raises(CodecError):
        smaq_rs.compress(x, seed=-1)
    with pytest.raises(CodecError):
        smaq_rs.compress(x, t_main=float("nan"))
    with pytest.raises(CodecError, match="type"):
        smaq_rs.compress(x, bits_main=[6])


def test_codecs_lists_smaq_with_defaults():
    (smaq,) = [c for c in smaq_rs.list_codecs() if c["name"] == "smaq"]
    d = smaq["defaults"]
    assert (d["bits_main"], d["bits_outlier"], d["t_main"], d["t_outlier"]) == (6, 8, 1.0, 2.5)
    assert d["rounding"] == "stochastic" and d["min_size"] == 8


@pytest.mark.parametrize("exc", [SmaqError, FormatError, ChecksumError, CodecError, DtypeError,
                                 LayoutError])
def test_exceptions_are_importable_typed_and_picklable(exc):
    assert issubclass(exc, SmaqError) and issubclass(exc, ValueError)
    e = pickle.loads(pickle.dumps(exc("message")))
    assert type(e) is exc and str(e) == "message"
    assert issubclass(ChecksumError, FormatError)


def test_num_threads_knob():
    n = smaq_rs.get_num_threads()
    x = normal(300_000)
    a = smaq_rs.compress(x, seed=5, chunk_size=4096).to_bytes()
    try:
        smaq_rs.set_num_threads(1)
        assert smaq_rs.get_num_threads() == 1
        assert smaq_rs.compress(x, seed=5, chunk_size=4096).to_bytes() == a
    finally:
        smaq_rs.set_num_threads(0)
    assert smaq_rs.get_num_threads() == n
    with pytest.raises(ValueError):
        smaq_rs.set_num_threads(-1)


def test_gil_is_released_during_work():
    x = normal(8 << 20)
    started = threading.Event()

    def work():
        started.set()
        for _ in range(3):
            smaq_rs.decompress(smaq_rs.compress(x))

    t = threading.Thread(target=work)
    t.start()
    started.wait()
    spins = 0
    while t.is_alive():
        spins += 1
    t.join()
    # Holding the GIL for the whole call would leave this thread a handful of turns at most.
    assert spins > 1000


def test_works_in_forked_child():
    import multiprocessing as mp

    x = normal(100_000)
    smaq_rs.compress(x)  # start the pool in the parent
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        nbytes = pool.apply(_compress_size, (x,))
    assert nbytes == smaq_rs.compress(x, seed=1).nbytes


def _compress_size(x):
    return smaq_rs.compress(x, seed=1).nbytes


@pytest.mark.parametrize(
    "codec,params,numel",
    [
        ("smaq", {"seed": 3}, 12 << 20),
        ("smaq", {"seed": 3, "outliers": "exact", "rounding": "nearest"}, 12 << 20),
        ("fp16", {}, 5 << 20),
        ("fp32", {}, 3 << 20),
        ("fp8", {"rounding": "stochastic", "seed": 2}, 9 << 20),
        ("int", {"bits": 4, "block_size": 64, "seed": 1}, 17 << 20),
    ],
)
def test_recycled_buffers_give_the_same_bytes(codec, params, numel):
    """A freed large packed buffer is reused by the next encode of a similar size: stale bytes of
    the previous tensor must never show through."""
    smaq_rs.empty_cache()
    x = np.random.default_rng(11).standard_normal(numel, dtype=np.float32)
    x[::1001] = 0.0
    x[5] = np.nan
    fresh = smaq_rs.compress(x, codec, **params).to_bytes()
    smaq_rs.empty_cache()
    # Fill a buffer of the same size with other content, free it, then encode x into it.
    y = np.random.default_rng(12).standard_normal(numel, dtype=np.float32) * 1e3
    y[5] = np.nan
    other = smaq_rs.compress(y, codec, **params)
    del other
    kept = smaq_rs.cached_bytes()
    assert kept >= len(fresh)
    p = smaq_rs.compress(x, codec, **params)
    assert smaq_rs.cached_bytes() < kept, "the kept buffer was not reused"
    assert p.to_bytes() == fresh
    del p
    assert smaq_rs.empty_cache() > 0 and smaq_rs.cached_bytes() == 0
