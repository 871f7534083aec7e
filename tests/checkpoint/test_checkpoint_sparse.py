"""Pruned tensors in checkpoints: a float tensor that is mostly +0.0 is stored as a bitmask plus
its other elements, and reads back as the same dense tensor."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import smaq_rs  # noqa: E402
from smaq_rs import FormatError, Policy, SmaqError  # noqa: E402
from smaq_rs.checkpoint import document  # noqa: E402

DENSE_LOSSLESS = Policy(codec="lossless", params={}, min_numel=0, exact=(), sparse_min=None)


def pruned(shape, sparsity, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w[torch.rand(shape, generator=g) < sparsity] = 0.0
    return w.to(dtype)


def bits(t):
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_lossless_sparse_is_bit_exact_and_smaller(tmp_path, dtype):
    w = pruned((512, 384), 0.9, dtype=dtype)
    flat = w.view(-1)
    # Values that are not +0.0 keep their bits: -0.0, NaN, infinities, a subnormal.
    flat[:5] = torch.tensor([-0.0, float("nan"), float("inf"), -float("inf"),
                             torch.finfo(dtype).tiny / 4], dtype=dtype)
    sd = {"w": w, "b": torch.randn(384).to(dtype)}
    sparse, dense = tmp_path / "s.smaq", tmp_path / "d.smaq"
    summary = smaq_rs.save(sd, sparse, codec="lossless")
    smaq_rs.save(sd, dense, policy=DENSE_LOSSLESS)
    back = smaq_rs.load(sparse)
    for k in sd:
        assert back[k].dtype == dtype and back[k].shape == sd[k].shape
        assert torch.equal(bits(back[k]), bits(sd[k])), k
    with smaq_rs.open(sparse) as ck:
        kinds = {e["name"]: e for e in ck.entries()}
        assert kinds["w"]["sparse"] and not kinds["b"]["sparse"]
        assert kinds["w"]["shape"] == (512, 384)
        assert kinds["w"]["dense_nbytes"] == w.numel() * w.element_size()
        assert summary["entries"]["w"][:2] == (kinds["w"]["nbytes"], kinds["w"]["dense_nbytes"])
        assert ck.exact("w")
    # 10% non-zeros plus one bit per element: well under the dense lossless coding.
    assert os.path.getsize(sparse) < 0.75 * os.path.getsize(dense)


def test_weights_pruned_by_a_mask_keep_their_negative_zeros(tmp_path):
    # weight * mask leaves -0.0 where the weight was negative: those are zeros too (stored
    # sparse), and their signs come back.
    g = torch.Generator().manual_seed(4)
    w = torch.randn(512, 256, generator=g) * (torch.rand(512, 256, generator=g) > 0.9)
    assert bool(torch.signbit(w[w == 0]).any())
    summary = smaq_rs.save({"w": w}, tmp_path / "w.smaq", codec="lossless")
    with smaq_rs.open(tmp_path / "w.smaq") as ck:
        assert list(ck) == ["w"] and ck.entries()[0]["sparse"]
        assert torch.equal(bits(ck["w"]), bits(w))
        assert summary["entries"]["w"][0] == ck.entries()[0]["nbytes"]
    smaq_rs.save({"w": w}, tmp_path / "d.smaq", policy=DENSE_LOSSLESS)
    assert os.path.getsize(tmp_path / "w.smaq") < 0.75 * os.path.getsize(tmp_path / "d.smaq")


def test_lossy_sparse_keeps_pruned_zeros_and_codes_the_rest(tmp_path):
    w = pruned((1024, 512), 0.95, seed=1)
    smaq_rs.save({"w": w}, tmp_path / "s.smaq")  # default policy: SmaQ 6/8
    smaq_rs.save({"w": w}, tmp_path / "d.smaq", policy=Policy(sparse_min=None))
    back = smaq_rs.load(tmp_path / "s.smaq")["w"]
    dense_back = smaq_rs.load(tmp_path / "d.smaq")["w"]
    zero = w == 0
    assert torch.equal(back[zero], w[zero])  # exact zeros where pruned
    assert bool((back[~zero] != 0).all())   # and nowhere else
    # The non-zeros are coded as SmaQ codes them on their own: the same error as compressing
    # the vector of non-zero values directly (the dense tensor, mostly zeros, puts them in
    # SmaQ's escape tail, finer and several times larger).
    nz = w[~zero]
    direct = torch.from_numpy(smaq_rs.decompress(smaq_rs.compress(nz.numpy())))
    rel = lambda b: float((b - nz).norm() / nz.norm())  # noqa: E731
    assert rel(back[~zero]) < 0.03
    assert rel(back[~zero]) <= 1.1 * rel(direct)
    assert torch.equal(dense_back[zero], w[zero])
    assert os.path.getsize(tmp_path / "s.smaq") < 0.5 * os.path.getsize(tmp_path / "d.smaq")


def test_threshold_and_small_tensors(tmp_path):
    sd = {"half": pruned((100, 100), 0.4), "tiny": torch.zeros(100)}
    smaq_rs.save(sd, tmp_path / "a.smaq", codec="lossless")
    smaq_rs.save(sd, tmp_path / "b.smaq",
                 policy=Policy(codec="lossless", params={}, min_numel=0, exact=(), sparse_min=0.3))
    with smaq_rs.open(tmp_path / "a.smaq") as a, smaq_rs.open(tmp_path / "b.smaq") as b:
        assert not any(e["sparse"] for e in a.entries())  # 40% zeros < 0.5; 100 elements
        assert {e["name"]: e["sparse"] for e in b.entries()} == {"half": True, "tiny": False}
        assert torch.equal(b["half"], sd["half"])
    with pytest.raises(SmaqError, match="sparse_min"):
        Policy(sparse_min=0.0)
    # raw means no coding at all: never split.
    smaq_rs.save(sd, tmp_path / "c.smaq", codec="raw")
    with smaq_rs.open(tmp_path / "c.smaq") as c:
        assert not any(e["sparse"] for e in c.entries())


def test_masks_are_not_tensors_of_the_checkpoint(tmp_path):
    w = pruned((128, 128), 0.9)
    # A tensor already named like a mask entry: the mask takes another name.
    sd = {"w": w, "w.__sparse_mask__": torch.arange(5000.0)}
    smaq_rs.save(sd, tmp_path / "m.smaq", codec="lossless")
    with smaq_rs.open(tmp_path / "m.smaq") as ck:
        assert sorted(ck) == sorted(sd) and len(ck) == 2
        assert torch.equal(ck["w.__sparse_mask__"], sd["w.__sparse_mask__"])
        assert torch.equal(ck["w"], w)
        assert "w.__sparse_mask_1__" not in ck
        with pytest.raises(KeyError):
            ck["w.__sparse_mask_1__"]
        assert [e["name"] for e in ck.entries()] == ["w", "w.__sparse_mask__"]


def test_incremental_checkpoints_with_sparse_tensors(tmp_path):
    w, v = pruned((256, 256), 0.9, seed=2), pruned((256, 256), 0.9, seed=3)
    base, inc = tmp_path / "0.smaq", tmp_path / "1.smaq"
    smaq_rs.save({"w": w, "v": v}, base, codec="lossless")
    v2 = v.clone()
    v2[v2 != 0] += 1e-4  # the same pattern, values moved
    summary = smaq_rs.save({"w": w, "v": v2}, inc, codec="lossless", base=base)
    assert summary["from_base"] == ["w"]
    back = smaq_rs.load(inc)
    assert torch.equal(back["w"], w) and torch.equal(back["v"], v2)
    # A third checkpoint against the second: chains read through both files.
    smaq_rs.save({"w": w, "v": v2}, tmp_path / "2.smaq", codec="lossless", base=inc)
    back = smaq_rs.load(tmp_path / "2.smaq")
    assert torch.equal(back["w"], w) and torch.equal(back["v"], v2)


def test_load_into_a_module(tmp_path):
    lin = torch.nn.Linear(256, 128)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(lin.weight.shape) > 0.9)
    smaq_rs.save(lin.state_dict(), tmp_path / "l.smaq", codec="lossless")
    other = torch.nn.Linear(256, 128)
    from smaq_rs.torch import load_into

    load_into(other, tmp_path / "l.smaq")
    assert torch.equal(other.weight, lin.weight) and torch.equal(other.bias, lin.bias)


def test_malformed_sparse_records_are_format_errors(tmp_path):
    smaq_rs.save({"w": pruned((128, 128), 0.9)}, tmp_path / "w.smaq", codec="lossless")
    with smaq_rs.open(tmp_path / "w.smaq") as ck:
        entries, doc = ck._entries, json.loads(ck._r.json)
    assert doc["version"] == document.DOC_VERSION_SPARSE
    document.parse(json.dumps(doc), "w.smaq", entries)  # as written: fine
    rec = doc["sparse"]["w"]
    for bad in ({**rec, "nnz": rec["nnz"] + 1}, {**rec, "shape": [128, 129]},
                {**rec, "mask": "nope"}, {k: v for k, v in rec.items() if k != "nnz"}, "x"):
        broken = dict(doc, sparse={"w": bad})
        with pytest.raises(FormatError, match="sparse"):
            document.parse(json.dumps(broken), "w.smaq", entries)


def test_split_and_expand_are_inverse():
    from smaq_rs.checkpoint import sparse

    rng = np.random.default_rng(0)
    for itemsize, dt in ((2, np.float16), (4, np.float32), (8, np.float64)):
        x = rng.standard_normal(10_001).astype(dt)
        x[rng.random(x.size) < 0.7] = 0
        raw = x.view(np.uint8)
        mask, values, nnz, signs = sparse.split(raw, itemsize, 0.5)
        assert nnz == np.count_nonzero(x) and values.size == nnz * itemsize
        assert mask.size == (x.size + 7) // 8 and signs is None
        assert np.array_equal(sparse.expand(mask, values, x.size, itemsize), raw)
        assert sparse.split(raw, itemsize, 0.8) is None  # 70% zeros < 80%
        # Pruning by multiplying with a mask leaves -0.0 where a weight was negative: zeros
        # too, their signs kept.
        y = rng.standard_normal(10_001).astype(dt) * (rng.random(10_001) > 0.7)
        assert np.signbit(y[y == 0]).any()
        mask, values, nnz, signs = sparse.split(y.view(np.uint8), itemsize, 0.5)
        assert nnz == np.count_nonzero(y) and signs.size == (y.size - nnz + 7) // 8
        back = sparse.expand(mask, values, y.size, itemsize, signs)
        assert np.array_equal(back, y.view(np.uint8))
