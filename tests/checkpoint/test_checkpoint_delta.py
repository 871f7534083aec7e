"""Coded differences and lossy residuals of incremental checkpoints (checkpoint/delta.py)."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import smaq_rs  # noqa: E402
from smaq_rs.checkpoint import delta  # noqa: E402

from helpers import FIXTURES, import_fixture_generator  # noqa: E402

INT_VIEW = {2: torch.int16, 4: torch.int32, 8: torch.int64, 1: torch.uint8}


def bits(t: "torch.Tensor") -> np.ndarray:
    """The bytes of a tensor (bfloat16 included), independent of the package's own code."""
    t = t.contiguous().reshape(-1)
    return t.view(INT_VIEW[t.element_size()]).numpy().view(np.uint8)


def pair(dtype, n=20000, seed=0):
    """A tensor and a slightly moved copy of it (specials included for floats)."""
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        a = torch.randn(n, generator=g, dtype=torch.float64) * 0.05
        b = a + 1e-3 * torch.randn(n, generator=g, dtype=torch.float64)
        a, b = a.to(dtype), b.to(dtype)
        a[:4] = torch.tensor([float("nan"), float("inf"), -0.0, 1.0]).to(dtype)
        b[:4] = torch.tensor([1.0, float("-inf"), 0.0, float("nan")]).to(dtype)
        return a, b
    info = torch.iinfo(dtype)
    a = torch.randint(info.min, info.max, (n,), generator=g, dtype=torch.int64).to(dtype)
    return a, a + torch.randint(-3, 4, (n,), generator=g, dtype=torch.int64).to(dtype)


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
          torch.int16, torch.uint8]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_code_round_trips_bit_for_bit(dtype):
    a, b = pair(dtype)
    name = str(dtype).replace("torch.", "")
    for op in delta.OPS:
        for layout in delta.LAYOUTS:
            for order in delta.ORDERS:
                rec = {"op": op, "layout": layout, "order": order}
                stored = delta.encode(bits(b), bits(a), name, rec)
                assert stored.size == bits(b).size
                assert np.array_equal(delta.decode(stored.copy(), bits(a), name, rec), bits(b)), rec


def test_the_smaller_code_is_chosen_and_recorded(tmp_path):
    """float32 weights moved a little: the integer difference; float64 copies of float32 values
    (29 zero low bits, which the difference's borrows and zigzag turn into ones): the XOR;
    a re-drawn tensor: stored whole. Each choice is checked against the real coded sizes."""
    a32, b32 = pair(torch.float32, 200000)
    a64, b64 = a32.double(), b32.double()
    fresh = torch.randn(200000, generator=torch.Generator().manual_seed(5))
    for a, b, want in ((a32, b32, "sub"), (a64, b64, "xor"), (a32, fresh, None)):
        name = str(a.dtype).replace("torch.", "")
        rec = delta.choose(bits(b), bits(a), name, "lossless")
        assert (rec and rec["op"]) == want
        sizes = {"whole": smaq_rs.compress(b, "lossless").nbytes}
        for op in delta.OPS:
            r = {"op": op, "layout": "rot", "order": "exponent"}
            coded = torch.from_numpy(delta.encode(bits(b), bits(a), name, r)).view(b.dtype)
            sizes[op] = smaq_rs.compress(coded, "lossless", **delta.LOSSLESS_PARAMS).nbytes
        assert sizes[want or "whole"] == min(sizes.values()), sizes
    # Through save: recorded per tensor, read back bit for bit.
    base, inc = tmp_path / "b.smaq", tmp_path / "i.smaq"
    smaq_rs.save({"f32": a32, "f64": a64, "new": a32}, base, codec="lossless")
    s = smaq_rs.save({"f32": b32, "f64": b64, "new": fresh}, inc, codec="lossless", base=base)
    assert {k: r["op"] for k, r in s["deltas"].items()} == {"f32": "sub", "f64": "xor"}
    back = smaq_rs.load(inc)
    assert all(np.array_equal(bits(back[k]), bits(v))
               for k, v in {"f32": b32, "f64": b64, "new": fresh}.items())


def test_a_chain_of_four_checkpoints_of_every_dtype(tmp_path):
    states = [{str(d).replace("torch.", ""): pair(d, 30000, seed=1)[0] for d in DTYPES}]
    for k in range(1, 4):  # each step moves every tensor a little, from the previous step
        states.append({n: pair(v.dtype, 30000, seed=k + 1)[1] - pair(v.dtype, 30000,
                                                                        seed=k + 1)[0] + v
                       for n, v in states[-1].items()})
    paths = [tmp_path / f"s{k}.smaq" for k in range(4)]
    for k, sd in enumerate(states):
        s = smaq_rs.save(sd, paths[k], codec="lossless", base=paths[k - 1] if k else None)
        if k:
            assert {"float32", "float16", "bfloat16", "float64", "int64"} <= set(s["deltas"])
            full = smaq_rs.save(sd, tmp_path / "full.smaq", codec="lossless")
            assert s["nbytes"] < full["nbytes"], (k, s["nbytes"], full["nbytes"])
    for k, sd in enumerate(states):
        back = smaq_rs.load(paths[k])
        for n, v in sd.items():
            assert np.array_equal(bits(back[n]), bits(v)), (k, n)
    with smaq_rs.open(paths[3]) as ck:  # one tensor at a time, through three bases
        assert np.array_equal(bits(ck["bfloat16"]), bits(states[3]["bfloat16"]))


def test_document_version_2_files_still_load():
    """Committed files written before the differences were coded (plain zigzag, version 2)."""
    want = import_fixture_generator("make_fixtures_checkpoint").chain_states()
    for k in range(3):
        path = os.path.join(FIXTURES, f"ckpt_doc2_chain{k}.smaq")
        back = smaq_rs.load(path)
        for n, v in want[k].items():
            assert (torch.equal(back[n], v) if isinstance(v, torch.Tensor) else back[n] == v), n
        with smaq_rs.open(path) as ck:
            assert ck._doc["version"] == (2 if k else 1)
            if k:
                assert isinstance(ck._doc["deltas"], list) and "w" in ck._doc["deltas"]


def weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(256, 256, generator=g) * 0.05,
            "b": (torch.randn(128, 256, generator=g) * 0.02).bfloat16(),
            "ln": torch.ones(256)}


def moved(sd, k):
    g = torch.Generator().manual_seed(100 + k)
    return {n: (v.float() + 1e-3 * torch.randn(v.shape, generator=g)).to(v.dtype)
            for n, v in sd.items()}


def rel_rmse(x, y):
    return ((x.double() - y.double()).pow(2).mean() / y.double().pow(2).mean()).sqrt().item()


def test_lossy_residual_error_is_relative_to_the_change(tmp_path):
    """SmaQ 6/8 codes a residual r with an error under one main step, std(r) / 15, per value
    (half that with the default nearest rounding); the float32 sum adds at most one rounding. At the same file size
    the reloaded weights are far closer than a full SmaQ copy's."""
    sd0, sd1 = weights(), moved(weights(), 1)
    base, inc, full = (tmp_path / n for n in ("b.smaq", "i.smaq", "f.smaq"))
    smaq_rs.save(sd0, base)
    s = smaq_rs.save(sd1, inc, base=base)
    f = smaq_rs.save(sd1, full)
    assert sorted(s["residuals"]) == ["a", "b"]
    assert s["nbytes"] <= 1.01 * f["nbytes"]
    base_dec, back, whole = smaq_rs.load(base), smaq_rs.load(inc), smaq_rs.load(full)
    r = sd1["a"].double() - base_dec["a"].double()
    bound = r.std().item() / 15 * 1.001 + 2 * torch.finfo(torch.float32).eps * sd1["a"].abs()
    assert ((back["a"].double() - sd1["a"].double()).abs() <= bound).all()
    for n in ("a", "b"):
        assert rel_rmse(back[n], sd1[n]) < rel_rmse(whole[n], sd1[n]) / 8, n
    assert torch.equal(back["ln"], sd1["ln"])  # an exact tensor stays exact
    s = smaq_rs.save(sd1, tmp_path / "nores.smaq", base=base, residual=False)
    assert s["residuals"] == []
    assert rel_rmse(smaq_rs.load(tmp_path / "nores.smaq")["a"], sd1["a"]) > rel_rmse(
        back["a"], sd1["a"]) * 8


def test_lossy_residual_errors_do_not_build_up_along_a_chain(tmp_path):
    states = [weights()]
    for k in range(1, 6):
        states.append(moved(states[-1], k))
    paths = [tmp_path / f"l{k}.smaq" for k in range(6)]
    errors = []
    for k, sd in enumerate(states):
        smaq_rs.save(sd, paths[k], base=paths[k - 1] if k else None)
        errors.append(rel_rmse(smaq_rs.load(paths[k])["a"], sd["a"]))
    # step 0 is a full SmaQ copy; after it each checkpoint's error is that of one residual
    assert max(errors[1:]) < errors[0] / 8, errors
    assert errors[5] < 2 * errors[1], errors


def test_a_redrawn_tensor_is_stored_whole_not_as_a_residual(tmp_path):
    sd0 = weights()
    sd1 = dict(moved(sd0, 1), a=torch.randn(256, 256) * 0.05)
    smaq_rs.save(sd0, tmp_path / "b.smaq")
    s = smaq_rs.save(sd1, tmp_path / "i.smaq", base=tmp_path / "b.smaq")
    assert s["residuals"] == ["b"]


def test_a_modified_base_is_a_typed_error_naming_it(tmp_path):
    sd0 = weights()
    for codec in ("lossless", None):
        base, inc = tmp_path / "base.smaq", tmp_path / "inc.smaq"
        smaq_rs.save(sd0, base, codec=codec)
        s = smaq_rs.save(moved(sd0, 1), inc, codec=codec, base=base)
        assert "a" in (s["deltas"] if codec else s["residuals"])
        smaq_rs.save(moved(sd0, 2), base, codec=codec)  # rewritten in place
        with pytest.raises(smaq_rs.FormatError, match=r"base.*base\.smaq' has changed"):
            smaq_rs.load(inc)
        with smaq_rs.open(inc) as ck, pytest.raises(smaq_rs.FormatError, match="base.smaq"):
            ck["a"]
