"""The training driver (smaq_rs.train): short runs of every model on each dataset it takes, the
run logs against independent references, bit-exact resume, and refused input."""

import csv
import json
import math
import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("torchvision")
pytest.importorskip("sklearn")

from smaq_rs import CodecError, SmaqError  # noqa: E402
from smaq_rs.cli import main as cli_main  # noqa: E402
from smaq_rs.train import TAGS, RunDirError, build_dataset, build_model, run  # noqa: E402

TINY = ["--image-size", "8", "--width", "16", "--layers", "1", "--heads", "2", "--seq", "16",
        "--batch-size", "4", "--min-numel", "256", "--val-examples", "32", "--quiet"]

PAIRS = [("resnet18", "digits"), ("resnet34", "digits"), ("cnn", "digits"), ("mlp", "digits"),
         ("gpt2", "stdlib-text"), ("gpt2", "source-lang"), ("bert", "source-lang"),
         ("mlp", "source-lang")]


def _records(d):
    with open(os.path.join(d, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _losses(d):
    return [r["loss"] for r in _records(d)]


@pytest.mark.parametrize("model,dataset", PAIRS)
def test_short_run_writes_its_logs(tmp_path, model, dataset):
    d = str(tmp_path / "run")
    run(["--model", model, "--dataset", dataset, "--compress", "smaq", "--steps", "3",
         "--run-dir", d] + TINY)
    recs = _records(d)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in recs)
    assert recs[-1]["val_loss"] is not None and 0 <= recs[-1]["val_acc"] <= 100
    # weights: dense bytes are the fresh model's parameters and buffers, counted independently
    data = build_dataset(dataset, 8, 16)
    torch.manual_seed(0)
    m = build_model(model, data, 1, 16, 2, 8)
    seen, expect = set(), 0
    for t in list(m.parameters()) + list(m.buffers()):
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            expect += t.untyped_storage().nbytes()
    for r in recs:
        tags = r["tags"]
        assert set(tags) == set(TAGS)
        assert tags["weights"]["dense"] == expect
        for t, e in tags.items():
            assert e["coded"] is True
            assert e["held"] == (e["packed"] if t in ("activations", "optimizer") else e["dense"])
            assert e["ratio"] == pytest.approx(e["dense"] / e["packed"])
        # SmaQ 6/8 really shrinks the large structures (real packed buffers, headers included)
        for t, e in tags.items():
            # tensors under --min-numel stay dense; wrap_model codes every gradient map, so a
            # tiny one may take more than dense (the record header)
            assert 0 < e["packed"] and (t == "gradient_maps" or e["packed"] <= e["dense"]), (t, e)
            if t in ("activations", "gradient_maps") and e["dense"] >= 1 << 16:
                assert e["packed"] < e["dense"] / 2, (t, e)
        assert r["rss_peak"] > 0 and r["step_time"] > 0
    with open(os.path.join(d, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(recs)
    for row, r in zip(rows, recs):
        assert float(row["loss"]) == r["loss"]
        for t in TAGS:
            assert int(row[f"{t}_packed"]) == r["tags"][t]["packed"]
    cfg = json.load(open(os.path.join(d, "config.json")))
    assert cfg["model"] == model and cfg["codec"] == "smaq"
    assert os.path.getsize(os.path.join(d, "checkpoint.smaq")) > 0


def test_fp16_sizes_and_codec_independent_dense_bytes(tmp_path):
    """fp16 packs 2 bytes per value (plus a record header); what is saved for backward does not
    depend on the codec: the fp32 baseline counts the same dense bytes at every step."""
    a, b = str(tmp_path / "fp32"), str(tmp_path / "fp16")
    common = ["--model", "cnn", "--dataset", "digits", "--steps", "2"] + TINY
    run(common + ["--compress", "fp32", "--run-dir", a])
    run(common + ["--compress", "fp16", "--run-dir", b])
    for ra, rb in zip(_records(a), _records(b)):
        for t in TAGS:
            assert ra["tags"][t]["dense"] == rb["tags"][t]["dense"], t
            assert ra["tags"][t]["packed"] == ra["tags"][t]["dense"]  # baseline: nothing coded
            assert ra["tags"][t]["coded"] is False
        for t in ("weights", "gradients"):
            e = rb["tags"][t]
            assert e["dense"] / 2 <= e["packed"] < e["dense"] / 2 + 256 * 8, (t, e)


def test_resume_continues_bit_exactly(tmp_path):
    """Same losses as the uninterrupted run: packed optimizer state, stochastic rounding seeds,
    data order and GPT-2's dropout RNG all come back from the checkpoint."""
    for model, dataset in (("cnn", "digits"), ("gpt2", "stdlib-text")):
        full, half = str(tmp_path / f"{model}-full"), str(tmp_path / f"{model}-half")
        common = ["--model", model, "--dataset", dataset, "--compress", "smaq"] + TINY
        run(common + ["--steps", "6", "--run-dir", full])
        run(common + ["--steps", "3", "--run-dir", half])
        assert len(_losses(half)) == 3
        run(["--resume", "--steps", "6", "--run-dir", half, "--quiet"])
        assert _losses(half) == _losses(full)
        with open(os.path.join(half, "metrics.csv")) as f:
            assert [float(r["loss"]) for r in csv.DictReader(f)] == _losses(full)
    # a different seed is a different run (the comparison above can fail)
    other = str(tmp_path / "seed1")
    run(["--model", "cnn", "--dataset", "digits", "--compress", "smaq", "--steps", "6",
         "--seed", "1", "--run-dir", other] + TINY)
    assert _losses(other) != _losses(str(tmp_path / "cnn-full"))


def test_report_draws_plots_and_table(tmp_path):
    from matplotlib.image import imread

    from smaq_rs.train.report import write_report

    dirs = []
    for codec in ("fp32", "smaq", "int8"):
        d = str(tmp_path / codec)
        run(["--model", "cnn", "--dataset", "digits", "--compress", codec, "--steps", "3",
             "--eval-every", "1", "--run-dir", d] + TINY)
        dirs.append(d)
    out = str(tmp_path / "rep")
    assert cli_main(["report"] + dirs + ["--out", out]) == 0
    paths = write_report(dirs, out)
    for k in ("curves", "memory"):
        img = imread(paths[k])
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
        assert img[..., :3].std() > 0.01  # something is drawn
    text = open(paths["table"]).read()
    rows = [line for line in text.splitlines() if line.startswith("| cnn/digits")]
    assert len(rows) == 3
    assert "smaq 6/8" in rows[1] and "int8" in rows[2]
    # each reduction is the logs' dense / packed summed over the steps
    recs = _records(dirs[1])
    cells = [c.strip() for c in rows[1].split("|")[1:-1]]
    for i, t in enumerate(TAGS):
        ratio = sum(r["tags"][t]["dense"] for r in recs) / sum(r["tags"][t]["packed"]
                                                               for r in recs)
        assert cells[4 + i].startswith(f"{ratio:.2f}x")
    assert cells[2] == f"{recs[-1]['val_acc']:.2f}% acc"
    assert "1.00x (not coded)" in rows[0]


def test_cli_train_entry_point_and_epochs(tmp_path, capsys):
    d = str(tmp_path / "r")
    assert cli_main(["train", "--model", "mlp", "--dataset", "digits", "--epochs", "0.02",
                     "--run-dir", d] + TINY) == 0
    n_train = build_dataset("digits", 8).n_train
    per_epoch = n_train // 4
    recs = _records(d)
    assert len(recs) == math.ceil(0.02 * per_epoch)
    assert recs[-1]["epoch"] == pytest.approx(len(recs) / per_epoch)
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--model", "nope"])
    assert e.value.code == 2
    # an error found after parsing: message, exit status 2, nothing trained
    assert cli_main(["train", "--compress", "fp8", "--bits-main", "6", "--run-dir",
                     str(tmp_path / "x")]) == 2
    assert "does not take --bits-main" in capsys.readouterr().err


def test_tensorboard_missing_is_refused_before_training(tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed")
    d = tmp_path / "r"
    with pytest.raises(ImportError, match="tensorboard"):
        run(["--tensorboard", "--run-dir", str(d)] + TINY)
    assert not (d / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value,allowed", [
    ("--model", "vgg", "resnet18, resnet34, gpt2, bert, mlp, cnn"),
    ("--dataset", "cifar10", "digits, stdlib-text, source-lang"),
    ("--compress", "zfp", "fp32, fp16, bf16, fp8, s2fp8, smaq, int8"),
])
def test_unknown_names_list_the_allowed_ones(tmp_path, capsys, flag, value, allowed):
    with pytest.raises(SystemExit):
        run([flag, value, "--run-dir", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert repr(value) in err and allowed in err


def test_refused_before_training(tmp_path):
    d = tmp_path / "r"
    with pytest.raises(ValueError, match=r"does not take --bits-main.*format"):
        run(["--compress", "fp8", "--bits-main", "6", "--run-dir", str(d)] + TINY)
    with pytest.raises(ValueError, match="takes no codec parameter"):
        run(["--compress", "fp32", "--bits", "8", "--run-dir", str(d)] + TINY)
    with pytest.raises(CodecError):
        run(["--compress", "smaq", "--bits-main", "40", "--run-dir", str(d)] + TINY)
    with pytest.raises(ValueError, match=r"'bert' does not take dataset 'digits'.*source-lang"):
        run(["--model", "bert", "--dataset", "digits", "--run-dir", str(d)] + TINY)
    with pytest.raises(ValueError, match="needs --compress smaq"):
        run(["--compress", "int8", "--bn-aware", "running", "--run-dir", str(d)] + TINY)
    with pytest.raises(ValueError, match="--steps or --epochs"):
        run(["--steps", "2", "--epochs", "1", "--run-dir", str(d)] + TINY)
    assert not d.exists()  # nothing was started
    with pytest.raises(RunDirError, match="no run to resume"):
        run(["--resume", "--run-dir", str(d)])


def test_existing_run_dir_is_not_overwritten(tmp_path):
    d = str(tmp_path / "r")
    common = ["--model", "mlp", "--dataset", "digits", "--steps", "2", "--run-dir", d] + TINY
    run(common)
    before = _records(d)
    with pytest.raises(RunDirError, match="--resume.*--overwrite"):
        run(common + ["--seed", "3"])
    assert _records(d) == before
    run(common + ["--seed", "3", "--overwrite"])
    assert _records(d) != before
    with pytest.raises(ValueError, match="exclude"):
        run(common + ["--resume", "--overwrite"])
    with pytest.raises(ValueError, match=r"cannot change --compress.*'fp32'"):
        run(["--resume", "--run-dir", d, "--compress", "smaq", "--steps", "4"])
    assert _records(d) != before and len(_records(d)) == 2


def test_bn_aware_run_logs_its_feature_maps(tmp_path):
    d = str(tmp_path / "bn")
    run(["--model", "cnn", "--dataset", "digits", "--compress", "smaq", "--bn-aware", "batch",
         "--steps", "2", "--run-dir", d] + TINY)
    for r in _records(d):
        e = r["bn_feature_maps"]
        assert 0 < e["packed"] < e["dense"] and 0 < e["rel_mse"] < 1e-2
