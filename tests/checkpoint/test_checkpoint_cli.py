"""The smaq-rs command line: compress / decompress / info on .pt and .safetensors files."""

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
st = pytest.importorskip("safetensors.torch")

import smaq_rs  # noqa: E402
from smaq_rs.cli import main  # noqa: E402


@pytest.fixture
def model_sd():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(128, 128), torch.nn.BatchNorm1d(128),
                            torch.nn.Linear(128, 32))
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_help_explains_itself():
    out = subprocess.run([sys.executable, "-m", "smaq_rs.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for word in ("compress", "decompress", "info", "safetensors"):
        assert word in out
    sub = subprocess.run([sys.executable, "-m", "smaq_rs.cli", "compress", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--lossless" in sub and "weights_only" in sub


def test_pt_lossless_round_trip_and_info(tmp_path, model_sd, capsys):
    pt, ck, out = tmp_path / "m.pt", tmp_path / "m.smaq", tmp_path / "back.pt"
    torch.save(model_sd, pt)
    assert main(["compress", str(pt), str(ck), "--lossless", "-q"]) == 0
    assert main(["decompress", str(ck), str(out), "-q"]) == 0
    back = torch.load(out, weights_only=True)
    assert back.keys() == model_sd.keys()
    assert all(torch.equal(back[k], v) for k, v in model_sd.items())
    capsys.readouterr()
    assert main(["info", str(ck), "--against", str(pt)]) == 0
    text = capsys.readouterr().out
    assert "error vs original" in text and "0.weight" in text
    rows = [line for line in text.splitlines() if line.startswith(("0.", "1.", "2."))]
    assert len(rows) == len(model_sd) and all(r.rstrip().endswith("exact") for r in rows)


def test_safetensors_lossy_round_trip(tmp_path, model_sd, capsys):
    sf, ck, out = tmp_path / "m.safetensors", tmp_path / "m.smaq", tmp_path / "b.safetensors"
    st.save_file(model_sd, sf)
    assert main(["compress", str(sf), str(ck), "--min-numel", "1024"]) == 0
    assert "->" in capsys.readouterr().out
    with smaq_rs.open(ck) as c:
        codecs = {e["name"]: e["codec"] for e in c.entries()}
    assert codecs["0.weight"] == "smaq" and codecs["1.running_var"] != "smaq"
    assert main(["decompress", str(ck), str(out), "-q"]) == 0
    back = st.load_file(out)
    w = model_sd["0.weight"]
    assert (back["0.weight"] - w).norm() / w.norm() < 0.1
    assert torch.equal(back["1.num_batches_tracked"], model_sd["1.num_batches_tracked"])
    assert main(["info", str(ck), "--against", str(sf)]) == 0
    assert "rel " in capsys.readouterr().out


def test_safetensors_metadata_survives_a_round_trip(tmp_path, model_sd):
    """The string map a .safetensors file carries (Hugging Face loaders read its "format") is kept
    in the checkpoint and written back; a file without one gets none."""
    sf, ck, out = tmp_path / "m.safetensors", tmp_path / "m.smaq", tmp_path / "b.safetensors"
    meta = {"format": "pt", "note": "trained 3 epochs"}
    st.save_file(model_sd, sf, metadata=meta)
    assert main(["compress", str(sf), str(ck), "--lossless", "-q"]) == 0
    assert main(["decompress", str(ck), str(out), "-q"]) == 0
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == meta
    st.save_file(model_sd, sf)
    assert main(["compress", str(sf), str(ck), "--lossless", "-q"]) == 0
    assert main(["decompress", str(ck), str(out), "-q"]) == 0
    with safe_open(str(out), framework="pt") as f:
        assert not f.metadata()


def test_sharded_safetensors_directory_round_trip(tmp_path, model_sd):
    """A Hugging Face sharded directory (shards + model.safetensors.index.json) compresses to one
    container and decompresses to the same files: shards, their metadata and the index."""
    import json

    src, ck, out = tmp_path / "hf", tmp_path / "m.smaq", tmp_path / "back"
    src.mkdir()
    names = list(model_sd)
    shards = {"model-00001-of-00002.safetensors": names[:3],
              "model-00002-of-00002.safetensors": names[3:]}
    weight_map = {}
    for shard, keys in shards.items():
        st.save_file({k: model_sd[k] for k in keys}, src / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
    index = {"metadata": {"total_size": 12345}, "weight_map": weight_map}
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["compress", str(src), str(ck), "--lossless", "-q"]) == 0
    assert main(["decompress", str(ck), str(out), "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    assert json.loads((out / "model.safetensors.index.json").read_text()) == index
    from safetensors import safe_open

    for shard, keys in shards.items():
        back = st.load_file(out / shard)
        assert sorted(back) == sorted(keys)
        assert all(torch.equal(back[k], model_sd[k]) for k in keys)
        with safe_open(str(out / shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
    (src / "model.safetensors.index.json").unlink()
    assert main(["compress", str(src), str(ck), "-q"]) == 1  # no index: an error, not a crash


def test_errors_are_reported_not_raised(tmp_path, capsys):
    bad = tmp_path / "bad.smaq"
    bad.write_bytes(b"\x00" * 100)
    assert main(["info", str(bad)]) == 1
    assert "not a smaq_rs checkpoint" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing.smaq")]) == 1
    assert main(["compress", str(tmp_path / "x.pt"), str(bad), "--param", "oops"]) == 1
