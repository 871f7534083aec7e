"""examples/prune_resnet_digits.py in its --quick configuration (ResNet-18, digits at 8 x 8):
the pruned layers reach their targets (90% of every layer; exactly 2 non-zeros in every group of
4), the masks hold after the fine-tune (also in the layers swapped to sparse ones, which keep
training), the reported accuracies are recomputed here from the fixed test split, and the
printed table carries them. Then the example's optimizer hand-over at the swap, against a dense
masked AdamW run step for step."""

import importlib.util
import math
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("torchvision")

import smaq_rs  # noqa: E402
from helpers import EXAMPLES  # noqa: E402
from smaq_rs.torch.sparse import SparseConv2d, SparseLinear  # noqa: E402
from smaq_rs.train.data import digits_split  # noqa: E402

_spec = importlib.util.spec_from_file_location("prune_resnet_digits",
                                               EXAMPLES / "prune_resnet_digits.py")
ex = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ex  # its dataclass looks its module up while being defined
_spec.loader.exec_module(ex)

PRUNABLE = (torch.nn.Conv2d, torch.nn.Linear, SparseConv2d, SparseLinear)


@pytest.fixture(scope="module")
def run():
    # One thread for the whole module (the run and the checks that evaluate its models): on a
    # shared 2-core machine spinning thread pools make this many times slower.
    threads, codec_threads = torch.get_num_threads(), smaq_rs.get_num_threads()
    try:
        yield ex.main(["--quick", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
        smaq_rs.set_num_threads(codec_threads)


def _by_name(run):
    return {r.name: r for r in run["results"]}


def _layers(model):
    """Every Linear / Conv2d (dense or swapped to sparse) by name, the stem excepted."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, PRUNABLE) and name != "conv1" and not name.endswith(".linear"):
            out[name] = m
    return out


def test_three_variants_from_one_dense_checkpoint(run):
    assert [r.name for r in run["results"]] == ["dense", "90% unstructured", "2:4"]
    dense = _by_name(run)["dense"]
    assert dense.layer_sparsity == {} and dense.swap_report is None
    # The dense fine-tune prunes nothing: its weights have no more zeros than chance.
    for name, m in _layers(dense.model).items():
        assert float((m.weight == 0).float().mean()) < 0.01, name


def test_ninety_percent_unstructured_reaches_its_target(run):
    r = _by_name(run)["90% unstructured"]
    layers = _layers(r.model)
    assert set(r.layer_sparsity) == set(layers) and len(layers) == 20  # 19 convs + fc
    zeros = total = 0
    for name, m in layers.items():
        w = m.weight.detach()
        z = int((w == 0).sum())
        # round(0.9 * n) zeros, counted on the weights themselves.
        assert z == round(0.9 * w.numel()), name
        zeros, total = zeros + z, total + w.numel()
    assert math.isclose(r.sparsity, zeros / total)
    assert zeros / total >= 0.9 - 1e-4


def test_two_four_keeps_exactly_two_of_every_four(run):
    r = _by_name(run)["2:4"]
    layers = _layers(r.model)
    assert len(layers) == 20
    for name, m in layers.items():
        w = m.weight.detach()
        groups = w.reshape(w.shape[0], -1).reshape(w.shape[0], -1, 4)
        nnz = (groups != 0).sum(-1)
        assert torch.equal(nnz, torch.full_like(nnz, 2)), name
    assert r.sparsity == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("variant", ["90% unstructured", "2:4"])
def test_masks_hold_after_the_fine_tune_and_swapped_layers_kept_training(run, variant):
    r = _by_name(run)[variant]
    layers = _layers(r.model)
    assert set(r.masks) == set(layers)
    for name, m in layers.items():
        mask = r.masks[name]
        w = m.weight.detach()
        assert mask.shape == w.shape
        assert not bool(w[~mask].abs().sum()), f"{name}: pruned weights moved"
        assert float(mask.float().mean()) == pytest.approx(1 - r.target, abs=1e-3), name
    report = r.swap_report
    assert report is not None
    assert {e.name for e in report.entries} == set(layers) | {"conv1"}
    for e in report.entries:
        m = r.model.get_submodule(e.name)
        assert isinstance(m, (SparseConv2d, SparseLinear)) == e.swapped, e.name
        if e.swapped:
            assert e.sparse_ms < e.dense_ms
            assert m.values.numel() == int(r.masks[e.name].sum())
            # Trained after the swap: the stored values moved, the pattern did not.
            assert not torch.equal(m.weight, r.at_swap[e.name]), e.name
            assert torch.equal(m.weight != 0, r.at_swap[e.name] != 0), e.name
    assert set(r.at_swap) == set(report.swapped)


def test_accuracies_are_measured_on_the_fixed_test_split(run):
    x_tr, y_tr, x_te, y_te = digits_split(8)
    data = run["data"]
    assert torch.equal(data.x_val, x_te) and torch.equal(data.y_val, y_te)
    assert len(y_te) == 1797 // 4
    for r in run["results"]:
        r.model.eval()
        with torch.no_grad():
            acc = float((r.model(x_te).argmax(1) == y_te).float().mean())
        assert 0.0 <= r.accuracy <= 1.0
        assert r.accuracy == pytest.approx(acc, abs=0.5 / len(y_te)), r.name
    assert 0.0 <= run["dense_accuracy"] <= 1.0
    # Well above chance (10 classes) after the fine-tune from the dense checkpoint.
    assert _by_name(run)["dense"].accuracy > 0.5


def test_table_carries_the_measured_rows(run):
    dense = run["results"][0].accuracy
    table = ex._table(run["results"])
    for r in run["results"]:
        row = next(line for line in table.splitlines() if line.startswith(f"| {r.name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"{100 * r.accuracy:.2f}%"
        assert cells[2] == f"{100 * (r.accuracy - dense):+.2f}"
        assert r.rss_peak >= r.rss_start > 0
        assert r.seconds > r.swap_seconds + r.prune_seconds
        assert (r.prune_seconds > 0) == (r.name != "dense") and r.swap_seconds >= 0


def test_optimizer_hand_over_continues_masked_adamw():
    """After the swap, AdamW on the sparse layer's values with the carried state takes the
    same steps as AdamW on the dense masked weight would have."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(48, 32)
    with torch.no_grad():
        dense.weight.mul_(torch.rand(32, 48) > 0.8)
    mask = dense.weight.detach() != 0
    ref = torch.nn.Linear(48, 32)
    ref.load_state_dict(dense.state_dict())
    opt = torch.optim.AdamW(dense.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    xs = [torch.randn(16, 48) for _ in range(6)]

    def step(model, o, x):
        o.zero_grad()
        model(x).square().mean().backward()
        if isinstance(model, torch.nn.Linear):
            model.weight.grad.mul_(mask)
        o.step()

    for x in xs[:3]:
        step(dense, opt, x)
        step(ref, ref_opt, x)
    sparse = SparseLinear.from_dense(dense, min_sparsity=0.5)
    ex._carry_optimizer(opt, {"fc": (dense, sparse)})
    assert [p for g in opt.param_groups for p in g["params"]] == [sparse.values, sparse.bias]
    for x in xs[3:]:
        step(sparse, opt, x)
        step(ref, ref_opt, x)
    torch.testing.assert_close(sparse.weight, ref.weight.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse.bias.detach(), ref.bias.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["--prune-fraction", "1"], r"--prune-fraction must be in \(0, 1\).*found 1.0"),
    (["--finetune-epochs", "0"], r"must be > 0, found 5.0 and 0.0"),
    (["--threads", "0"], r"--threads must be >= 1, found 0"),
])
def test_bad_flags_are_refused_before_training(argv, message):
    with pytest.raises(ValueError, match=message):
        ex.main(argv)
