"""Checkpoint container: save/load/open round trips, policies, fixtures, corruption, atomicity."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import smaq_rs  # noqa: E402
from smaq_rs import checkpoint  # noqa: E402

from helpers import FIXTURES, import_fixture_generator  # noqa: E402

FIX = str(FIXTURES)
state = import_fixture_generator("make_fixtures_checkpoint").state


def bits_equal(a, b) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def all_dtypes():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 70, generator=g) * 0.02
    out = {
        "f32": w,
        "f16": w.half(),
        "bf16": w.bfloat16(),
        "f64": w.double(),
        "i64": torch.randint(-5, 5, (5000,), generator=g),
        "i32": torch.randint(-5, 5, (77,), generator=g, dtype=torch.int32),
        "i16": torch.arange(10, dtype=torch.int16),
        "i8": torch.arange(-3, 3, dtype=torch.int8),
        "u8": torch.arange(200, dtype=torch.uint8),
        "bool": torch.rand(999, generator=g) > 0.5,
        "c64": torch.randn(8, dtype=torch.complex64, generator=g),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "empty_i": torch.zeros(4, 0, dtype=torch.int64),
    }
    for name in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"):
        if hasattr(torch, name):
            dt = getattr(torch, name)
            src = w[:3, :5] if name.startswith("float8") else torch.arange(15)
            out[name] = src.to(dt)
    return out


@pytest.mark.parametrize("codec", [None, "lossless", "raw"])
def test_every_dtype_round_trips(tmp_path, codec):
    sd = all_dtypes()
    path = tmp_path / "m.smaq"
    smaq_rs.save(sd, path, codec=codec)
    back = smaq_rs.load(path)
    assert list(back) == list(sd)
    for k, v in sd.items():
        if codec is None and k in ("f32", "f64", "f16", "bf16"):  # lossy by default
            assert back[k].dtype == v.dtype and back[k].shape == v.shape
            err = (back[k].double() - v.double()).norm() / v.double().norm()
            assert err < 0.1, (k, err)  # SmaQ 6/8, nearest rounding
        else:
            assert bits_equal(back[k], v), k


def test_lossless_is_bit_exact_and_smaller(tmp_path):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(512, 512, generator=g) * 0.02
    w[0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, 1e-40])
    for dt, floor in ((torch.float32, 1.1), (torch.bfloat16, 1.3), (torch.float16, 1.05)):
        t = w.to(dt)
        p = tmp_path / f"{dt}.smaq"
        info = smaq_rs.save({"w": t}, p, codec="lossless")
        back = smaq_rs.load(p)["w"]
        assert bits_equal(back, t)
        ratio = t.numel() * t.element_size() / os.path.getsize(p)
        assert ratio > floor, (dt, ratio)
        assert info["nbytes"] == os.path.getsize(p)


def test_entries_no_smaller_packed_are_stored_raw(tmp_path):
    """A scalar or a few values under a packing codec would take more bytes than raw (header,
    metadata): they are stored raw, exactly; a large tensor stays packed."""
    sd = {"s": torch.tensor(1.5), "d": torch.randn(33, dtype=torch.float64),
          "w": torch.randn(256, 256)}
    for policy in (smaq_rs.Policy.lossless(), smaq_rs.Policy(exact_min_bytes=0)):
        path = tmp_path / "small.smaq"
        smaq_rs.save(sd, path, policy=policy)
        with smaq_rs.open(path) as ck:
            e = {x["name"]: x for x in ck.entries()}
            assert (e["s"]["codec"], e["s"]["nbytes"]) == ("raw", 4)
            assert (e["d"]["codec"], e["d"]["nbytes"]) == ("raw", 264)
            assert e["w"]["codec"] != "raw" and e["w"]["nbytes"] < 256 * 256 * 4
        back = smaq_rs.load(path)
        assert back["s"].item() == 1.5 and torch.equal(back["d"], sd["d"])


def test_durable_is_the_default_and_can_be_skipped(tmp_path):
    """save fsyncs by default and reports how long that took; durable=False skips it and writes
    the same file."""
    sd = {"w": torch.randn(512, 512), "step": 3}
    a, b = tmp_path / "a.smaq", tmp_path / "b.smaq"
    sa = smaq_rs.save(sd, a, codec="lossless")
    sb = smaq_rs.save(sd, b, codec="lossless", durable=False)
    assert sa["fsync_seconds"] > 0.0 and sb["fsync_seconds"] == 0.0
    assert a.read_bytes() == b.read_bytes()
    assert torch.equal(smaq_rs.load(b)["w"], sd["w"])


def test_default_policy_choices():
    pol = smaq_rs.Policy()
    assert pol.choose("layer.weight", "float32", (1024, 1024)) == (
        "smaq", {"bits_main": 6, "bits_outlier": 8, "rounding": "nearest"})
    assert pol.choose("layer.bias", "float32", (256,))[0] == "raw"  # small: exact
    assert pol.choose("bn1.running_var", "float32", (8192,))[0] == "lossless"  # norm buffer
    assert pol.choose("encoder.LayerNorm.weight", "float32", (8192,))[0] == "lossless"
    assert pol.choose("embed.ids", "int64", (100000,))[0] == "zstd"
    assert pol.choose("state.3.exp_avg_sq", "float32", (1 << 16,))[1]["all_positive"] is True
    rules = smaq_rs.Policy(rules=(("head.*", "exact", {}), ("*", "smaq", {"bits_main": 4})))
    assert rules.choose("head.weight", "float32", (1 << 16,))[0] == "lossless"
    assert rules.choose("x.weight", "float32", (1 << 16,)) == ("smaq", {"bits_main": 4})


def test_default_lossy_save_rounds_to_nearest(tmp_path):
    """The default policy codes with SmaQ's nearest rounding: at the same size its error is
    well under stochastic rounding's (about 0.7x), on weight-like and heavy-tailed tensors."""
    g = torch.Generator().manual_seed(4)
    sd = {"w": torch.randn(256, 512, generator=g) * 0.02,
          "t": torch.distributions.StudentT(3.0).sample((1 << 17,)) * 0.01}
    near, stoch = tmp_path / "n.smaq", tmp_path / "s.smaq"
    sn = smaq_rs.save(sd, near)
    ss = smaq_rs.save(sd, stoch, rounding="stochastic")
    with smaq_rs.open(near) as ck:
        assert ck.codec_info("w")[0]["rounding"] == "nearest"
    assert abs(sn["nbytes"] - ss["nbytes"]) <= 0.01 * ss["nbytes"]
    a, b = smaq_rs.load(near), smaq_rs.load(stoch)
    for k, v in sd.items():
        en = (a[k].double() - v.double()).norm() / v.double().norm()
        es = (b[k].double() - v.double()).norm() / v.double().norm()
        assert en < 0.8 * es, (k, en, es)


def test_policy_for_codec():
    """Policy.for_codec (what smaq-rs compress uses): the named codec's policy, its parameters
    merged over the policy's own."""
    P = smaq_rs.Policy
    assert P.for_codec() == P() == P.for_codec("smaq")
    assert P.for_codec("lossless") == P.lossless() and P.for_codec("raw") == P.raw()
    assert P.for_codec("smaq", bits_main=4).params == {"bits_main": 4, "bits_outlier": 8,
                                                        "rounding": "nearest"}
    assert P.for_codec("lossless", level=3) == P(codec="lossless", params={"level": 3},
                                                 min_numel=0, exact=())
    assert P.for_codec("int", bits=4) == P(codec="int", params={"bits": 4})


def test_callable_policy_and_codec_params(tmp_path):
    sd = {"a": torch.randn(10000), "b": torch.randn(10000)}
    p = tmp_path / "m.smaq"
    smaq_rs.save(sd, p, policy=lambda name, dtype, shape: "lossless" if name == "a" else None)
    with smaq_rs.open(p) as ck:
        codecs = {e["name"]: e["codec"] for e in ck.entries()}
    assert codecs == {"a": "lossless", "b": "smaq"}
    smaq_rs.save(sd, p, bits_main=4, bits_outlier=6)
    with smaq_rs.open(p) as ck:
        params, stats = ck.codec_info("a")
    assert params["bits_main"] == 4 and "mean" in stats or params["bits_main"] == 4
    with pytest.raises(smaq_rs.CodecError):
        smaq_rs.save(sd, p, bits_main=99)
    with pytest.raises(smaq_rs.CodecError):
        smaq_rs.save(sd, p, codec="nope")


def test_exact_is_resolved_with_the_policys_own_exact_min_bytes(tmp_path):
    """A policy that answers "exact" (its codec, or an overridden choose) stores each tensor
    exactly with its own exact_min_bytes, not the default Policy's; a plain callable's "exact"
    uses the default threshold (4096 bytes)."""
    sd = {"w": torch.linspace(-1, 1, 64), "ids": torch.arange(64)}  # 256 and 512 bytes

    class AllExact(smaq_rs.Policy):
        def choose(self, name, dtype, shape):
            return "exact", {}

    p = tmp_path / "m.smaq"
    for pol in (smaq_rs.Policy(codec="exact", params={}, min_numel=0, exact_min_bytes=64),
                AllExact(exact_min_bytes=64)):
        summary = smaq_rs.save(sd, p, policy=pol)
        assert {k: v[2] for k, v in summary["entries"].items()} == {"w": "lossless",
                                                                    "ids": "zstd"}
        back = smaq_rs.load(p)
        assert bits_equal(back["w"], sd["w"]) and bits_equal(back["ids"], sd["ids"])
    summary = smaq_rs.save(sd, p, policy=lambda name, dtype, shape: "exact")
    assert {k: v[2] for k, v in summary["entries"].items()} == {"w": "raw", "ids": "raw"}


def test_shared_noncontiguous_nested_optimizer(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 64),
                                torch.nn.LayerNorm(64))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 64)).pow(2).mean().backward()
        opt.step()
    base = torch.randn(64, 64)
    obj = {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "tied_a": base,
        "tied_b": base,  # the same tensor twice
        "transposed": base.t(),  # non-contiguous view of it
        "strided": torch.arange(100.0)[::3],
        "np": np.arange(12, dtype=np.int32).reshape(3, 4),
        "misc": {"step": 3, "nan": float("nan"), "t": (1, "x", None), 7: [True, 2.5]},
    }
    path = tmp_path / "c.smaq"
    smaq_rs.save(obj, path, codec="lossless", metadata={"epoch": 3, "tags": ["a", "b"]})
    back = smaq_rs.load(path)
    assert back["tied_a"] is back["tied_b"]
    assert torch.equal(back["transposed"], base.t()) and torch.equal(back["tied_a"], base)
    assert torch.equal(back["strided"], torch.arange(100.0)[::3])
    assert isinstance(back["np"], np.ndarray) and (back["np"] == obj["np"]).all()
    assert back["misc"]["t"] == (1, "x", None) and back["misc"][7] == [True, 2.5]
    assert np.isnan(back["misc"]["nan"])
    assert back["optim"]["param_groups"] == opt.state_dict()["param_groups"]
    for k, st in opt.state_dict()["state"].items():
        for name, v in st.items():
            assert bits_equal(back["optim"]["state"][k][name], v)
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt2.load_state_dict(back["optim"])  # torch accepts it as is
    model.load_state_dict(back["model"])
    with smaq_rs.open(path) as ck:
        assert ck.metadata == {"epoch": 3, "tags": ["a", "b"]}
        assert "model.0.weight" in ck and len(ck) == len(list(ck))


def test_lossy_default_on_optimizer_state(tmp_path):
    p = torch.nn.Parameter(torch.randn(256, 256))
    opt = torch.optim.Adam([p])
    p.grad = torch.randn(256, 256)
    opt.step()
    path = tmp_path / "o.smaq"
    smaq_rs.save(opt.state_dict(), path)
    back = smaq_rs.load(path)
    sq = back["state"][0]["exp_avg_sq"]
    assert (sq >= 0).all()
    with smaq_rs.open(path) as ck:
        assert ck.codec_info("state.0.exp_avg_sq")[0]["all_positive"] is True


def test_digits_model_lossy_within_one_point(tmp_path):
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    tr, te = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[tr]), y[tr]).backward()
        opt.step()

    def acc(m):
        with torch.no_grad():
            return (m(x[te]).argmax(1) == y[te]).float().mean().item() * 100

    base = acc(model)
    assert base > 90
    path = tmp_path / "digits.smaq"
    smaq_rs.save(model.state_dict(), path, policy=smaq_rs.Policy(min_numel=1024))
    with smaq_rs.open(path) as ck:
        lossy = [e["name"] for e in ck.entries() if e["codec"] == "smaq"]
    assert lossy == ["0.weight", "2.weight", "4.weight"]
    model.load_state_dict(smaq_rs.load(path))
    assert abs(acc(model) - base) <= 1.0, (acc(model), base)
    raw_bytes = sum(v.numel() * 4 for v in model.state_dict().values())
    assert os.path.getsize(path) < raw_bytes / 3


def test_committed_fixtures_decode():
    s = state()
    back = smaq_rs.load(os.path.join(FIX, "ckpt_v1_lossless.smaq"))
    for k, v in s["model"].items():
        assert bits_equal(back["model"][k], v), k
    for k, v in s["optim"]["state"][0].items():
        assert bits_equal(back["optim"]["state"][0][k], v), k
    assert back["optim"]["param_groups"] == s["optim"]["param_groups"]
    assert (back["epoch"], back["note"], back["inf"]) == (5, "fixture", float("inf"))
    with smaq_rs.open(os.path.join(FIX, "ckpt_v1_lossless.smaq")) as ck:
        assert ck.metadata == {"made_by": "ckpt_make.py"}
    lossy = smaq_rs.load(os.path.join(FIX, "ckpt_v1_smaq.smaq"))
    expected = np.load(os.path.join(FIX, "ckpt_v1_smaq_expected.npy"))
    assert np.array_equal(lossy["model"]["fc.weight"].numpy(), expected)  # decode is deterministic
    w = s["model"]["fc.weight"]
    assert (lossy["model"]["fc.weight"] - w).norm() / w.norm() < 0.1
    small = smaq_rs.load(os.path.join(FIX, "ckpt_v1_small.smaq"))
    assert bits_equal(small["ids"], s["model"]["ids"][:40])
    assert small["opt"] == {"step": 3, "betas": (0.9, 0.999)}


def _load_all(path):
    with checkpoint.open(path) as ck:
        for e in ck.entries():
            ck.codec_info(e["name"])
        return ck.load()


def test_every_byte_mutation_is_a_typed_error(tmp_path):
    good = open(os.path.join(FIX, "ckpt_v1_small.smaq"), "rb").read()
    p = tmp_path / "bad.smaq"
    accepted = 0
    for i in range(len(good)):
        for flip in (0x01, 0x80):
            b = bytearray(good)
            b[i] ^= flip
            p.write_bytes(bytes(b))
            try:
                _load_all(p)
                accepted += 1
            except smaq_rs.SmaqError:
                pass
    # Every byte is covered by a check or a checksum: no corruption goes unnoticed.
    assert accepted == 0
    for n in list(range(0, 64)) + list(range(64, len(good), 7)):
        p.write_bytes(good[:n])
        with pytest.raises(smaq_rs.FormatError):
            _load_all(p)


def test_checksum_error_names_the_entry_and_open_is_lazy(tmp_path):
    src = os.path.join(FIX, "ckpt_v1_lossless.smaq")
    b = bytearray(open(src, "rb").read())
    with smaq_rs.open(src) as ck:
        e = next(e for e in ck.entries() if e["name"] == "model.ids")
    b[e["offset"] + 3] ^= 0xFF
    p = tmp_path / "c.smaq"
    p.write_bytes(bytes(b))
    with smaq_rs.open(p) as ck:
        assert ck["model.fc.weight"].shape == (64, 64)  # other entries read fine
        with pytest.raises(smaq_rs.ChecksumError, match="model.ids"):
            ck["model.ids"]
    with pytest.raises(smaq_rs.ChecksumError, match="model.ids"):
        smaq_rs.load(p)


def test_bad_inputs_are_typed_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        smaq_rs.load(tmp_path / "missing.smaq")
    with pytest.raises(smaq_rs.SmaqError, match="cannot save a set"):
        smaq_rs.save({"x": {1, 2}}, tmp_path / "a.smaq")
    with pytest.raises(smaq_rs.SmaqError):
        smaq_rs.save({"x": torch.zeros(3).to_sparse()}, tmp_path / "a.smaq")
    with pytest.raises(smaq_rs.SmaqError):
        smaq_rs.save({"x": object()}, tmp_path / "a.smaq")
    assert not list(tmp_path.iterdir())  # nothing half-written
    (tmp_path / "text.smaq").write_text("not a checkpoint at all")
    with pytest.raises(smaq_rs.FormatError, match="not a smaq_rs checkpoint"):
        smaq_rs.load(tmp_path / "text.smaq")


_WRITER = r"""
import sys, torch, smaq_rs
sd = {f"w{i}": torch.randn(1 << 22) for i in range(24)}   # 400 MB: many batches
print("start", flush=True)
smaq_rs.save(sd, sys.argv[1], codec="lossless")
print("done", flush=True)
"""


def test_killing_the_writer_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ck.smaq"
    old = {"w": torch.arange(1000.0)}
    smaq_rs.save(old, path)
    before = path.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"start"
        deadline = time.time() + 120
        tmp = []
        while time.time() < deadline:  # wait until the temporary file has real data in it
            tmp = [p for p in tmp_path.iterdir() if p.name.startswith(".ck.smaq.smaq-tmp")]
            if tmp and tmp[0].stat().st_size > (64 << 20):
                break
            time.sleep(0.02)
        assert tmp, "the writer never created its temporary file"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == before  # untouched
    assert torch.equal(smaq_rs.load(path)["w"], old["w"])
    # The killed writer's temporary file is left; the next save of that path removes it
    # (its process is gone), and leaves a live writer's file (this process's pid) alone.
    assert [p.name for p in tmp_path.iterdir() if ".smaq-tmp." in p.name] == [tmp[0].name]
    live = tmp_path / f".ck.smaq.smaq-tmp.{os.getpid()}.1"
    live.write_bytes(b"in progress")
    smaq_rs.save(old, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ck.smaq", live.name])


def test_abort_on_exception_removes_temporary(tmp_path, monkeypatch):
    path = tmp_path / "ck.smaq"
    monkeypatch.setattr(checkpoint.writer, "_BATCH_BYTES", 1)  # a progress call after every tensor

    def boom(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        smaq_rs.save({"w": torch.zeros(10), "v": torch.ones(3)}, path, progress=boom)
    assert list(tmp_path.iterdir()) == []


def test_map_location(tmp_path):
    p = tmp_path / "m.smaq"
    smaq_rs.save({"w": torch.ones(3)}, p)
    assert smaq_rs.load(p, map_location="cpu")["w"].device.type == "cpu"
    assert smaq_rs.load(p, map_location=torch.device("cpu"))["w"].dtype == torch.float32
