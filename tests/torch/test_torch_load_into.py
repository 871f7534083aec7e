"""smaq_rs.torch.load_into: a checkpoint into a module by name, with load_state_dict's report."""

import pytest

torch = pytest.importorskip("torch")

import smaq_rs  # noqa: E402
import smaq_rs.torch as st  # noqa: E402


def make(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.BatchNorm1d(96),
                               torch.nn.Linear(96, 10))


def test_loads_every_parameter_and_buffer_exactly(tmp_path):
    src, dst = make(0), make(1)
    src[1].running_mean.add_(0.5)
    path = tmp_path / "m.smaq"
    smaq_rs.save(src.state_dict(), path, policy=smaq_rs.Policy.lossless())
    assert st.load_into(dst, path) == st.LoadResult([], [])
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k


def test_lossy_default_policy_and_a_nested_key(tmp_path):
    src, dst = make(0), make(1)
    path = tmp_path / "ck.smaq"
    smaq_rs.save({"model": src.state_dict(), "step": 7}, path,
                 policy=smaq_rs.Policy(min_numel=0, exact_min_bytes=0))
    st.load_into(dst, path, key="model")
    w, v = src[0].weight, dst[0].weight
    assert (w - v).norm() / w.norm() < 0.05 and not torch.equal(w, v)
    assert torch.equal(src[1].num_batches_tracked, dst[1].num_batches_tracked)
    with pytest.raises(KeyError):
        st.load_into(dst, path, key="optim")


def test_strict_reports_and_non_strict_returns_what_did_not_match(tmp_path):
    src = make(0)
    path = tmp_path / "m.smaq"
    sd = src.state_dict()
    sd["extra"] = torch.ones(3)
    del sd["2.bias"]
    smaq_rs.save(sd, path)
    dst = make(1)
    before = dst[0].weight.clone()
    with pytest.raises(RuntimeError, match=r"Missing key.*'2.bias'[\s\S]*Unexpected key.*'extra'"):
        st.load_into(dst, path)
    assert torch.equal(dst[0].weight, before)  # nothing copied
    r = st.load_into(dst, path, strict=False)
    assert r.missing_keys == ["2.bias"] and r.unexpected_keys == ["extra"]
    assert torch.equal(dst[2].weight, src[2].weight)


def test_shape_mismatch_raises_before_copying(tmp_path):
    path = tmp_path / "m.smaq"
    smaq_rs.save(make(0).state_dict(), path)
    other = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.BatchNorm1d(96),
                                torch.nn.Linear(96, 12))
    before = other[0].weight.clone()
    with pytest.raises(RuntimeError, match=r"size mismatch for 2.weight"):
        st.load_into(other, path, strict=False)
    assert torch.equal(other[0].weight, before)


def test_not_a_dict_is_a_format_error(tmp_path):
    path = tmp_path / "t.smaq"
    smaq_rs.save([torch.ones(4)], path)
    with pytest.raises(smaq_rs.FormatError):
        st.load_into(make(0), path)
