"""Pruning: masks of each pattern checked group by group against the pattern's definition,
schedules against their formulas, masks through real optimizer steps, configs and errors."""

import json
import math

import pytest

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from smaq_rs.torch.prune import (  # noqa: E402
    PatternError,
    Pruner,
    compute_mask,
    parse_pattern,
    sparsity_at,
)


def scores(shape, seed):
    # Distinct positive scores (no ties), so "the N largest" is one set.
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(math.prod(shape), generator=g).float().add(1).reshape(shape)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
@pytest.mark.parametrize("shape", [(6, 16), (5, 8), (4, 2, 2, 4), (3, 8, 3, 3)])
def test_n_m_keeps_exactly_the_n_largest_of_every_group(pattern, shape):
    n, m = parse_pattern(pattern)[1:]
    red = math.prod(shape[1:])
    if red % m:
        pytest.skip("does not divide")
    s = scores(shape, 1)
    mask = compute_mask(s, 1 - n / m, pattern)
    groups = s.reshape(shape[0], red // m, m)
    kept = mask.reshape(shape[0], red // m, m)
    assert bool((kept.sum(-1) == n).all())
    top = torch.zeros_like(kept)
    top.scatter_(-1, groups.topk(n, dim=-1).indices, True)
    assert torch.equal(kept, top)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 12), groups=st.integers(1, 10), frac=st.floats(0, 1),
       pattern=st.sampled_from(["2:4", "4:8", "1:4"]), seed=st.integers(0, 1000))
def test_n_m_below_its_ceiling_prunes_whole_groups_of_the_lowest_cost(rows, groups, frac, pattern,
                                                                      seed):
    n, m = parse_pattern(pattern)[1:]
    top = 1 - n / m
    s = scores((rows, groups * m), seed)
    mask = compute_mask(s, frac * top, pattern).reshape(rows, groups, m)
    per = mask.sum(-1)
    # Every group is either untouched (M kept) or exactly N:M.
    assert bool(((per == m) | (per == n)).all())
    # The fraction (sparsity / ceiling) of the groups is pruned.
    assert int((per == n).sum()) == round(frac * top / top * rows * groups)
    # The pruned groups are those whose M - N smallest scores sum lowest.
    g = s.reshape(rows, groups, m)
    cost = g.sort(-1).values[..., : m - n].sum(-1)
    pruned = per == n
    if bool(pruned.any()) and bool((~pruned).any()):
        assert float(cost[pruned].max()) <= float(cost[~pruned].min())


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 20), cols=st.integers(1, 20), sparsity=st.floats(0, 1),
       seed=st.integers(0, 1000))
@example(rows=13, cols=5, sparsity=0.9, seed=0)
def test_unstructured_prunes_exactly_the_lowest(rows, cols, sparsity, seed):
    s = scores((rows, cols), seed)
    mask = compute_mask(s, sparsity)
    # The documented count, sparsity times the element count (13 * 5 at 0.9 is 58.5, where
    # (0.9 * 13) * 5 rounds the other way).
    k = round(sparsity * (rows * cols))
    assert int((~mask).sum()) == k
    if 0 < k < rows * cols:
        assert float(s[~mask].max()) < float(s[mask].min())


@pytest.mark.parametrize("pattern", ["4x1", "1x4", "2x2"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_blocks_are_pruned_whole_by_their_summed_score(pattern, sparsity):
    bn, bm = parse_pattern(pattern)[1:]
    shape = (8, 4, 2, 2)  # reduced dimension 16
    s = scores(shape, 3)
    mask = compute_mask(s, sparsity, pattern).reshape(8 // bn, bn, 16 // bm, bm)
    per_block = mask.sum(dim=(1, 3))
    assert bool(((per_block == 0) | (per_block == bn * bm)).all())  # whole blocks
    pruned = per_block == 0
    assert int(pruned.sum()) == round(sparsity * pruned.numel())
    sums = s.reshape(8 // bn, bn, 16 // bm, bm).sum(dim=(1, 3))
    if bool(pruned.any()) and bool((~pruned).any()):
        assert float(sums[pruned].max()) <= float(sums[~pruned].min())


def test_patterns_that_do_not_fit_are_refused_by_name():
    with pytest.raises(PatternError, match=r"'4:8'.*does not divide the reduced dimension 12"):
        compute_mask(torch.ones(3, 12), 0.5, "4:8", "fc")
    with pytest.raises(PatternError, match=r"'4:8' on layer1.*divide.*36"):
        compute_mask(torch.ones(8, 4, 3, 3), 0.5, "4:8", "layer1")
    model = torch.nn.Sequential(torch.nn.Linear(10, 4))
    with pytest.raises(PatternError, match=r"'2:4' on 0: M = 4 does not divide .* 10"):
        Pruner(model, pattern="2:4", target_sparsity=0.5)
    with pytest.raises(PatternError, match=r"'4x1' on 0"):
        Pruner(torch.nn.Sequential(torch.nn.Linear(8, 6)), pattern="4x1", target_sparsity=0.5)
    with pytest.raises(PatternError, match="reaches at most 0.500"):
        Pruner(torch.nn.Sequential(torch.nn.Linear(8, 4)), pattern="2:4", target_sparsity=0.9)
    for bad in ("3:3", "0:4", "2-4", "0x2", "dense"):
        with pytest.raises(PatternError, match=repr(bad)):
            parse_pattern(bad)
    with pytest.raises(ValueError, match="unknown pruning option"):
        Pruner(model, {"target": 0.5})
    with pytest.raises(ValueError, match="schedule"):
        Pruner(model, schedule="linear")


@pytest.mark.parametrize("schedule", ["cubic", "exp"])
def test_schedule_follows_its_formula(schedule):
    start, end, target = 10, 110, 0.9
    for t in range(0, 130, 5):
        got = sparsity_at(t, start, end, target, schedule)
        if t <= start:
            want = 0.0
        elif t >= end:
            want = target
        else:
            f = (t - start) / (end - start)
            want = target * (1 - (1 - f) ** 3) if schedule == "cubic" else 1 - (1 - target) ** f
        assert got == pytest.approx(want, abs=1e-12)
    # Known points: half way, cubic is 7/8 of the target; exp is 1 - sqrt(1 - target).
    half = sparsity_at(60, start, end, target, schedule)
    assert half == pytest.approx(0.875 * 0.9 if schedule == "cubic" else 1 - math.sqrt(0.1))
    values = [sparsity_at(t, start, end, target, schedule) for t in range(0, 130)]
    assert values == sorted(values)


def _train(pruner, model, opt, steps, one_call=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    history = []
    if not one_call:
        pruner.on_train_begin()
    for _ in range(steps):
        x = torch.randn(16, 32, generator=g)
        if not one_call:
            pruner.on_step_begin()
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        if not one_call:
            pruner.on_before_optimizer_step()
        opt.step()
        if one_call:
            pruner.step()
        else:
            pruner.on_after_optimizer_step()
        history.append({t.name: t.mask.clone() for t in pruner.targets})
        for t in pruner.targets:  # pruned weights stay zero through every optimizer step
            assert bool((t.module.weight[~t.mask] == 0).all())
    return history


def model_32():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("method", ["magnitude", "snip_momentum"])
def test_masks_follow_the_schedule_and_survive_optimizer_steps(opt_name, method):
    model = model_32()
    if opt_name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    cfg = {"target_sparsity": 0.8, "method": method, "start_step": 2, "end_step": 12,
           "frequency": 3}
    pruner = Pruner(model, cfg)
    history = _train(pruner, model, opt, 16)
    n = {t.name: t.mask.numel() for t in pruner.targets}
    for step, masks in enumerate(history):
        # At a step t the masks are those of the last update at or before t.
        due = [u for u in (2, 5, 8, 11, 12) if u <= step]
        want = sparsity_at(due[-1], 2, 12, 0.8) if due else 0.0
        for name, mask in masks.items():
            assert int((~mask).sum()) == round(want * n[name]), (step, name)
        if step > 0:  # pruned stays pruned
            for name in masks:
                assert not bool((~history[step - 1][name] & masks[name]).any())
    final = pruner.on_train_end()
    for name, s in final.items():
        assert s == pytest.approx(round(0.8 * n[name]) / n[name])


def test_one_call_step_reaches_the_same_sparsity():
    model = model_32()
    pruner = Pruner(model, target_sparsity=0.5, pattern="2:4", end_step=6, frequency=2)
    _train(pruner, model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), 9,
           one_call=True)
    for t in pruner.targets:
        w = t.module.weight.reshape(t.module.weight.shape[0], -1, 4)
        assert bool(((w != 0).sum(-1) <= 2).all())
        assert bool((t.mask.reshape(w.shape).sum(-1) == 2).all())


def test_snip_momentum_scores_weight_times_gradient_average():
    lin = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[4.0, 3.0, 2.0, 1.0]]))
    model = torch.nn.Sequential(lin)
    pruner = Pruner(model, method="snip_momentum", target_sparsity=0.5, start_step=2,
                    end_step=2, momentum=0.5)
    grads = [torch.tensor([[0.0, 1.0, 1.0, 8.0]]), torch.tensor([[0.0, 1.0, 3.0, 8.0]])]
    pruner.on_train_begin()
    m = torch.zeros(1, 4)
    for g in grads:
        pruner.on_step_begin()
        lin.weight.grad = g.clone()
        pruner.on_before_optimizer_step()
        m = 0.5 * m + 0.5 * g
        pruner.on_after_optimizer_step()  # no optimizer: the weights stay
    torch.testing.assert_close(pruner.targets[0].momentum, m)
    # |w * m| = [0, 2.25, 3.5, 6]: the two lowest are weights 0 and 1 (magnitude would prune 2, 3).
    pruner.on_step_begin()
    assert pruner.targets[0].mask.tolist() == [[False, False, True, True]]
    assert lin.weight.tolist() == [[0.0, 0.0, 2.0, 1.0]]


def test_overrides_are_plain_data_per_module_pattern():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = torch.nn.Linear(16, 32)
            self.conv = torch.nn.Conv2d(4, 8, 3)
            self.head = torch.nn.Linear(32, 4)

    net = Net()
    cfg = {
        "target_sparsity": 0.75, "pattern": "unstructured", "end_step": 0, "excluded": ["head"],
        "overrides": [{"modules": ["conv"], "pattern": "2:4", "target_sparsity": 0.5},
                      {"modules": ["enc"], "pattern": "2x2"}],
    }
    cfg = json.loads(json.dumps(cfg))  # a JSON round trip: plain data
    pruner = Pruner(net, cfg)
    assert [t.name for t in pruner.targets] == ["enc", "conv"]
    pruner.on_train_begin()
    conv = net.conv.weight.reshape(8, -1, 4)
    assert bool(((conv != 0).sum(-1) == 2).all())
    enc = net.enc.weight.reshape(16, 2, 8, 2)
    per_block = (enc != 0).sum(dim=(1, 3))
    assert bool(((per_block == 0) | (per_block == 4)).all())
    assert int((per_block == 0).sum()) == round(0.75 * 16 * 8)
    assert bool((net.head.weight != 0).all())
