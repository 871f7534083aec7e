"""Incremental checkpoints: save(..., base=previous) stores only the tensors that changed."""

import os

import pytest

torch = pytest.importorskip("torch")

import smaq_rs  # noqa: E402


def model_state(seed: int = 0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Embedding(2000, 128), torch.nn.Linear(128, 128),
                            torch.nn.LayerNorm(128), torch.nn.Linear(128, 2000))
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_unchanged_tensors_come_from_the_base(tmp_path):
    sd = model_state()
    base, inc = tmp_path / "step0.smaq", tmp_path / "step1.smaq"
    smaq_rs.save({"model": sd, "step": 0}, base, codec="lossless")
    sd2 = dict(sd)
    sd2["3.weight"] = sd["3.weight"] + 1e-3  # only the head moved
    summary = smaq_rs.save({"model": sd2, "step": 1}, inc, codec="lossless", base=base)
    assert sorted(summary["from_base"]) == sorted(f"model.{k}" for k in sd if k != "3.weight")
    assert os.path.getsize(inc) < os.path.getsize(base) / 2
    back = smaq_rs.load(inc)
    assert back["step"] == 1
    assert all(torch.equal(back["model"][k], v) for k, v in sd2.items())
    with smaq_rs.open(inc) as ck:
        assert "model.0.weight" in ck and len(ck) == len(sd2)
        assert torch.equal(ck["model.0.weight"], sd["0.weight"])
        assert ck.from_base and "model.3.weight" not in ck.from_base
    # A lossy base: unchanged tensors are matched by their bytes before coding, and come back
    # as the base decodes them.
    lossy = tmp_path / "lossy.smaq"
    smaq_rs.save(sd, lossy)
    smaq_rs.save(sd2, tmp_path / "lossy1.smaq", base=lossy)
    a, b = smaq_rs.load(lossy), smaq_rs.load(tmp_path / "lossy1.smaq")
    assert torch.equal(a["0.weight"], b["0.weight"])


def test_a_chain_of_bases_and_moving_the_files_together(tmp_path):
    sd = model_state()
    paths = [tmp_path / f"c{i}.smaq" for i in range(3)]
    smaq_rs.save(sd, paths[0], codec="lossless")
    sd1 = dict(sd, **{"1.bias": sd["1.bias"] + 1})
    smaq_rs.save(sd1, paths[1], codec="lossless", base=paths[0])
    sd2 = dict(sd1, **{"2.weight": sd1["2.weight"] * 2})
    s = smaq_rs.save(sd2, paths[2], codec="lossless", base=paths[1])
    assert "0.weight" in s["from_base"] and "1.bias" in s["from_base"]
    moved = tmp_path / "moved"
    moved.mkdir()
    for p in paths:
        p.rename(moved / p.name)
    back = smaq_rs.load(moved / "c2.smaq")
    assert all(torch.equal(back[k], v) for k, v in sd2.items())


def test_a_changed_or_missing_base_is_an_error_not_a_wrong_value(tmp_path):
    sd = model_state()
    base, inc = tmp_path / "b.smaq", tmp_path / "i.smaq"
    smaq_rs.save(sd, base, codec="lossless")
    s = smaq_rs.save(dict(sd, **{"1.weight": sd["1.weight"] * 1.001, "extra": torch.ones(7)}),
                     inc, codec="lossless", base=base)
    assert "1.weight" in s["deltas"]
    smaq_rs.save(model_state(seed=1), base, codec="lossless")  # the base is rewritten
    with pytest.raises(smaq_rs.FormatError, match="has changed"):
        smaq_rs.load(inc)
    with smaq_rs.open(inc) as ck:
        assert torch.equal(ck["extra"], torch.ones(7))  # stored whole in the file: readable
        with pytest.raises(smaq_rs.FormatError, match="b.smaq' has changed"):
            ck["1.weight"]  # stored as a difference from the base
    base.unlink()
    with pytest.raises(OSError):
        smaq_rs.load(inc)
    with pytest.raises(smaq_rs.SmaqError, match="being written"):
        smaq_rs.save(sd, inc, base=inc)


def test_changed_tensors_are_stored_as_differences_from_the_base(tmp_path):
    """After a few small optimizer steps every weight changed: each is stored as the difference
    of its bit patterns from the base's, smaller than a full lossless copy, and read back bit for
    bit, also through a chain and for bfloat16."""
    for dtype in (torch.float32, torch.bfloat16):
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model_state().items()}
        gen = torch.Generator().manual_seed(1)
        step = {k: (v + 1e-3 * v.abs() * torch.randn(v.shape, generator=gen).to(dtype)
                    if v.is_floating_point() else v) for k, v in sd.items()}
        paths = [tmp_path / f"d{i}.smaq" for i in range(3)]
        smaq_rs.save(sd, paths[0], codec="lossless")
        full = smaq_rs.save(step, tmp_path / "full.smaq", codec="lossless")
        s = smaq_rs.save(step, paths[1], codec="lossless", base=paths[0])
        assert "0.weight" in s["deltas"] and "0.weight" not in s["from_base"]
        assert s["nbytes"] < 0.9 * full["nbytes"], (s["nbytes"], full["nbytes"])
        step2 = dict(step, **{"1.weight": step["1.weight"] * 1.01})
        s2 = smaq_rs.save(step2, paths[2], codec="lossless", base=paths[1])
        assert "0.weight" in s2["from_base"] and list(s2["deltas"]) == ["1.weight"]
        for p, want in ((paths[1], step), (paths[2], step2)):
            back = smaq_rs.load(p)
            assert all(torch.equal(back[k], v) for k, v in want.items()), (dtype, p.name)
        with smaq_rs.open(paths[2]) as ck:
            assert torch.equal(ck["1.weight"], step2["1.weight"])


def test_no_difference_against_a_lossy_base(tmp_path):
    sd = model_state()
    base, inc = tmp_path / "b.smaq", tmp_path / "i.smaq"
    smaq_rs.save(sd, base)  # SmaQ for the large weights: their base values are not exact
    step = {k: v + 1e-3 if v.is_floating_point() else v for k, v in sd.items()}
    s = smaq_rs.save(step, inc, codec="lossless", base=base)
    assert "0.weight" not in s["deltas"]
    back = smaq_rs.load(inc)
    assert all(torch.equal(back[k], v) for k, v in step.items())
