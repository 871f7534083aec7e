"""smaq_rs.torch.optim: packed state, exactness where it matters, state_dict round trips."""

import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import smaq_rs
import smaq_rs.torch as st
from smaq_rs.torch import Stored


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 4))


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(64, 32, generator=g), torch.randint(0, 4, (64,), generator=g))
            for _ in range(n)]


def run(model, opt, data):
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


PAIRS = [
    (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, foreach=False),
     lambda p, **k: st.SGD(p, lr=0.05, momentum=0.9, **k)),
    (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3,
                               foreach=False),
     lambda p, **k: st.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3, **k)),
    (lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=1e-3, foreach=False),
     lambda p, **k: st.Adam(p, lr=1e-3, weight_decay=1e-3, **k)),
    (lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=False),
     lambda p, **k: st.AdamW(p, lr=1e-3, **k)),
]


@pytest.mark.parametrize("i", range(len(PAIRS)))
def test_dense_state_is_exactly_torch(i):
    ref_f, ours_f = PAIRS[i]
    a, b = mlp(), mlp()
    data = batches(5)
    run(a, ref_f(a.parameters()), data)
    run(b, ours_f(b.parameters(), compress_state=False), data)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=0, atol=0)


@pytest.mark.parametrize("decoupled", [False, True])
def test_dense_state_updated_together_is_exactly_torch(decoupled):
    # Dense state takes the multi-tensor update after the first step: maximize and weight
    # decay through it, and a parameter whose gradient goes missing for a step (its step count
    # then lags the others').
    ref_cls, ours_cls = ((torch.optim.AdamW, st.AdamW) if decoupled
                         else (torch.optim.Adam, st.Adam))
    a, b = mlp(), mlp()
    ra = ref_cls(a.parameters(), lr=1e-3, weight_decay=1e-2, maximize=True, foreach=False)
    rb = ours_cls(b.parameters(), lr=1e-3, weight_decay=1e-2, maximize=True,
                  compress_state=False)
    for k, (x, y) in enumerate(batches(6)):
        for model, opt in ((a, ra), (b, rb)):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            if k == 2:
                next(model.parameters()).grad = None
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=0, atol=0)
    steps = [int(s["step"]) for s in rb.state.values()]
    assert sorted(steps) == [5] + [6] * (len(steps) - 1)


@pytest.mark.parametrize("i", range(len(PAIRS)))
def test_packed_state_tracks_torch(i):
    ref_f, ours_f = PAIRS[i]
    a, b = mlp(), mlp()
    data = batches(20)
    la = run(a, ref_f(a.parameters()), data)
    opt = ours_f(b.parameters(), min_numel=1024)
    lb = run(b, opt, data)
    packed = [v for s in opt.state.values() for v in s.values() if isinstance(v, Stored)]
    assert len(packed) >= 2  # the two large weights' state is packed
    a0 = [p.detach().clone() for p in mlp().parameters()]
    for pa, pb, p0 in zip(a.parameters(), b.parameters(), a0):
        # The packed run moves the weights like the fp32 one: after 20 steps the difference is
        # within 35% of the distance moved (re-quantizing every step).
        assert (pb - pa).norm() <= 0.35 * (pa - p0).norm() + 1e-6
    assert abs(lb[-1] - la[-1]) < 0.05 * la[0]


def test_only_packed_state_between_steps_and_bytes_are_real():
    model = mlp()
    opt = st.AdamW(model.parameters(), min_numel=1024)
    run(model, opt, batches(2))
    for p, s in opt.state.items():
        big = p.numel() >= 1024
        for name in ("exp_avg", "exp_avg_sq"):
            assert isinstance(s[name], Stored) == big
            if big:
                # exp_avg_sq in the log domain: relative precision for 1/sqrt(v)
                assert s[name].packed.params["log"] == (name == "exp_avg_sq")
    dense, held = opt.state_nbytes()
    assert dense == sum(2 * p.numel() * 4 + 4 for p in model.parameters())
    packed_bytes = sum(v.nbytes for s in opt.state.values() for v in s.values()
                       if isinstance(v, Stored))
    dense_bytes = sum(v.numel() * v.element_size() for s in opt.state.values()
                      for v in s.values() if isinstance(v, torch.Tensor))
    assert held == packed_bytes + dense_bytes
    assert dense > 3 * held


def test_always_zero_gradient_stays_put_and_zero_state_is_exact():
    torch.manual_seed(0)
    emb = nn.Embedding(1000, 16)
    w0 = emb.weight.detach().clone()
    opt = st.Adam(emb.parameters(), lr=1e-2, min_numel=1024)
    for _ in range(30):
        opt.zero_grad()
        emb(torch.randint(0, 500, (256,))).square().sum().backward()  # rows 500.. never used
        opt.step()
    s = opt.state[emb.weight]
    assert isinstance(s["exp_avg"], Stored)
    m = st._store.decode(s["exp_avg"])
    v = st._store.decode(s["exp_avg_sq"])
    assert torch.equal(m[500:], torch.zeros_like(m[500:]))
    assert torch.equal(v[500:], torch.zeros_like(v[500:]))
    assert torch.equal(emb.weight[500:], w0[500:])
    assert torch.isfinite(emb.weight).all()
    assert (v >= 0).all()


def _save_load(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("make", [
    lambda p: st.AdamW(p, lr=1e-3, min_numel=1024, seed=7),
    lambda p: st.SGD(p, lr=0.05, momentum=0.9, min_numel=1024, seed=7),
])
def test_resume_from_state_dict_is_exact(make):
    data = batches(12)
    a = mlp()
    opt_a = make(a.parameters())
    run(a, opt_a, data)  # uninterrupted

    b = mlp()
    opt_b = make(b.parameters())
    run(b, opt_b, data[:5])
    ckpt = _save_load({"model": b.state_dict(), "opt": opt_b.state_dict()})
    c = mlp(seed=123)
    opt_c = make(c.parameters())
    c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    assert any(isinstance(v, Stored) for s in opt_c.state.values() for v in s.values())
    run(c, opt_c, data[5:])
    for pa, pc in zip(a.parameters(), c.parameters()):
        assert torch.equal(pa, pc)


def test_state_dict_bytes_match_and_bad_bytes_raise():
    model = mlp()
    opt = st.Adam(model.parameters(), min_numel=1024)
    run(model, opt, batches(2))
    sd = _save_load(opt.state_dict())
    for k, s in sd["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            if isinstance(s[name], dict):
                assert s[name]["smaq_packed"].dtype == torch.uint8
    bad = copy.deepcopy(sd)
    k = next(k for k, s in bad["state"].items() if isinstance(s["exp_avg"], dict))
    bad["state"][k]["exp_avg"]["smaq_packed"][40] ^= 0xFF
    opt2 = st.Adam(model.parameters(), min_numel=1024)
    with pytest.raises(smaq_rs.SmaqError):
        opt2.load_state_dict(bad)


def test_per_group_opt_outs_for_weight_and_grad_quantization():
    data = batches(3)
    a, b = mlp(), mlp()
    run(a, st.SGD(a.parameters(), lr=0.05), data)
    groups = [
        {"params": [b[0].weight, b[2].weight, b[4].weight], "quantize_weights": True,
         "quantize_grads": True},
        {"params": [b[0].bias, b[2].bias, b[4].bias]},  # opted out (default False)
    ]
    run(b, st.SGD(groups, lr=0.05), data)
    assert not torch.equal(a[2].weight, b[2].weight)
    assert (a[2].weight - b[2].weight).norm() < 0.1 * a[2].weight.norm()
    # the opted-out group is not quantized: bias values are not on a 6-bit grid of their own
    c = mlp()
    run(c, st.SGD([{"params": [c[0].weight, c[2].weight, c[4].weight]},
                   {"params": [c[0].bias, c[2].bias, c[4].bias], "quantize_weights": True}],
                  lr=0.05), data[:1])
    d = mlp()
    run(d, st.SGD(d.parameters(), lr=0.05), data[:1])
    assert torch.equal(c[2].weight, d[2].weight) and not torch.equal(c[2].bias, d[2].bias)


def test_bad_arguments_raise():
    p = [nn.Parameter(torch.randn(10))]
    with pytest.raises(ValueError):
        st.Adam(p, amsgrad=True)
    with pytest.raises(ValueError):
        st.SGD(p, lr=0.1, nesterov=True)
    with pytest.raises(smaq_rs.CodecError):
        st.Adam(p, codec="nope")
    with pytest.raises(smaq_rs.SmaqError):
        st.AdamW(p, codec_params={"bits_main": 1})


# -- the fused Rust step (src/optim.rs) against the per-operation torch path ------------------
FUSED = [
    lambda p: st.AdamW(p, lr=1e-3),
    lambda p: st.Adam(p, lr=1e-3, weight_decay=1e-2, maximize=True),
    lambda p: st.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    lambda p: st.SGD(p, lr=0.05, momentum=0.9, dampening=0.1, maximize=True),
]


def _state_bytes(opt, p):
    return {k: v.to_state() for k, v in opt.state[p].items() if isinstance(v, Stored)}


@pytest.mark.parametrize("i", range(len(FUSED)))
@pytest.mark.parametrize("zeros", [0.0, 0.05, 0.5])
def test_fused_step_matches_torch_path(i, zeros):
    # From the same state and gradient, one step of each path: the packed state is the same
    # bytes, and the parameter equal up to 2 float32 ulps of itself plus ~10 ulps of the update
    # (torch's addcdiv and our loop round the last operations of Adam's update differently in
    # ~0.1% of the elements; measured: at most 2 ulps of p). SGD is bit for bit. The fused
    # Adam step is given no kept statistics, so it codes with the exact ones in two passes, as
    # the torch path does (the one pass: test_one_pass_step_*).
    g0 = torch.Generator().manual_seed(i)
    p0 = torch.randn(64, 257, generator=g0)
    pa, pb = nn.Parameter(p0.clone()), nn.Parameter(p0.clone())
    fused, plain = FUSED[i]([pa]), FUSED[i]([pb])
    plain.fused = False
    calls = []
    bridge = smaq_rs._bridge  # the torch layer's only way to the core's fused steps
    real = (bridge.adam_step, bridge.sgd_step)
    for step in range(4):
        g = torch.randn(p0.shape, generator=g0) * 1e-3
        g[torch.rand(p0.shape[0], generator=g0) < zeros] = 0  # whole rows: dead units
        plain.load_state_dict(copy.deepcopy(fused.state_dict()))
        pb.data.copy_(pa.data)
        pa.grad, pb.grad = g.clone(), g.clone()
        for v in fused.state[pa].values():
            if isinstance(v, Stored):
                v.stats = None
        try:
            bridge.adam_step = lambda *a, **k: calls.append(1) or real[0](*a, **k)
            bridge.sgd_step = lambda *a, **k: calls.append(1) or real[1](*a, **k)
            fused.step()
        finally:
            bridge.adam_step, bridge.sgd_step = real
        plain.step()
        sa, sb = _state_bytes(fused, pa), _state_bytes(plain, pb)
        assert sa.keys() == sb.keys() and sa
        for k in sa:
            assert sa[k].keys() - {"smaq_stats"} == sb[k].keys()
            for n in sb[k]:
                assert torch.equal(sa[k][n], sb[k][n]), (step, k, n)
        torch.testing.assert_close(pa, pb, rtol=2 * torch.finfo(torch.float32).eps, atol=1e-9)
        if isinstance(fused, st.SGD):
            assert torch.equal(pa, pb)
    assert len(calls) == 4  # the fused path ran every step


def test_fused_zero_gradient_parameter_stays_put():
    p = nn.Parameter(torch.randn(8192))
    p0 = p.detach().clone()
    opt = st.Adam([p], lr=1e-2)
    for _ in range(5):
        p.grad = torch.zeros_like(p)
        opt.step()
    assert torch.equal(p, p0)
    m = _store_decode(opt.state[p]["exp_avg"])
    assert torch.count_nonzero(m) == 0


def _store_decode(s):
    from smaq_rs.torch import _store

    return _store.decode(s)


def test_fused_step_rejects_bad_input():
    core = smaq_rs._core
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True,
              maximize=False, guard=True, decoded=False, step=1, codec="smaq",
              params=({}, {"all_positive": True}), keeps_zeros=(True, True),
              sparse_fraction=0.15)
    f = lambda n, dt="float32": np.zeros(n, dtype=dt)  # noqa: E731
    with pytest.raises(smaq_rs.DtypeError, match="float32"):
        core.adam_step(f(100, "float64"), f(100), f(100), f(100), (None, None), **kw)
    with pytest.raises(smaq_rs.LayoutError, match="grad has 99"):
        core.adam_step(f(100), f(99), f(100), f(100), (None, None), **kw)
    with pytest.raises(smaq_rs.LayoutError, match="contiguous"):
        core.adam_step(np.zeros((10, 20), np.float32)[:, ::2], f(100), f(100), f(100),
                       (None, None), **kw)
    with pytest.raises(smaq_rs.LayoutError, match="both"):
        core.adam_step(f(100), f(100), f(100), f(100), (None, (None, None, None, None)), **kw)
    with pytest.raises(smaq_rs.LayoutError, match="momentum"):
        core.sgd_step(f(100), f(100), f(100), None, lr=0.1, momentum=0.0, dampening=0.0,
                      weight_decay=0.0, nesterov=False, maximize=False, codec="smaq",
                      params={}, keeps_zeros=True, sparse_fraction=0.15)
    packed = smaq_rs._core.encode(np.ones(50, np.float32), "smaq", {})
    with pytest.raises(smaq_rs.LayoutError, match="holds 50"):
        core.adam_step(f(100), f(100), f(100), f(100),
                       ((packed, None, None, None), (packed, None, None, None)), **kw)


def test_fused_adam_keeps_no_whole_parameter_scratch():
    """The fused Adam step works piece by piece on packed (and fresh) SmaQ state: no dense
    buffer the size of a parameter is kept between steps (the per-operation path keeps two)."""
    p = nn.Parameter(torch.randn(300, 1000))
    opt = st.AdamW([p], lr=1e-3)
    ref = nn.Parameter(p.detach().clone())
    slow = st.AdamW([ref], lr=1e-3)
    slow.fused = False
    g0 = torch.Generator().manual_seed(5)
    for _ in range(3):
        g = torch.randn(p.shape, generator=g0) * 1e-3
        p.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        slow.step()
    assert opt._scratch == {}
    assert sum(b.numel() for b in slow._scratch.values()) >= 2 * p.numel()
    torch.testing.assert_close(p, ref, rtol=4 * torch.finfo(torch.float32).eps, atol=1e-9)


# -- the one-pass fused Adam step: the new state coded with the statistics kept from the step
# before, checked afterwards (src/optim.rs, adam_step_pieces) --------------------------------
def _scaled_grads(shape, steps, seed=1):
    """Gradients whose scale varies per element over orders of magnitude, as a network's do:
    the spread of ln(exp_avg_sq) is then set by the scales and settles within a few steps."""
    g0 = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.rand(shape, generator=g0) * 6 - 3) * 1e-3
    return [torch.randn(shape, generator=g0) * scale for _ in range(steps)]


def _stepped(steps):
    """A 300x1000 parameter and its AdamW after `steps` steps of `_scaled_grads`, and the
    gradients (one more than the steps taken)."""
    p = nn.Parameter(torch.randn(300, 1000))
    opt = st.AdamW([p], lr=1e-3, seed=3)
    grads = _scaled_grads(p.shape, steps + 1)
    for g in grads[:steps]:
        p.grad = g.clone()
        opt.step()
    return p, opt, grads


def _twin_without_statistics(p, opt):
    """A copy of `p` and of its AdamW `opt` whose slots kept no statistics (two passes next)."""
    twin = nn.Parameter(p.detach().clone())
    opt2 = st.AdamW([twin], lr=1e-3, seed=3)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for v in opt2.state[twin].values():
        if isinstance(v, Stored):
            v.stats = None
    return twin, opt2


def test_one_pass_step_moves_the_parameter_like_the_two_pass_step():
    # Two passes until the kept statistics settle (the first step has none; exp_avg, scaled
    # to the update's direction, has a spread that shrinks for some 25 steps of noise-like
    # gradients), then one.
    p, opt, grads = _stepped(30)
    assert opt.fused_paths["two-pass"] >= 2
    assert opt.fused_paths["one-pass"] >= 3
    assert sum(k.startswith("redone") for k in opt.fused_paths) == 0
    # The next step both ways from the same state: kept statistics (one pass), none (two).
    twin, opt2 = _twin_without_statistics(p, opt)
    p.grad, twin.grad = grads[30].clone(), grads[30].clone()
    before = opt.fused_paths["one-pass"]
    opt.step()
    opt2.step()
    assert opt.fused_paths["one-pass"] == before + 1
    assert opt2.fused_paths == {"two-pass": 1}
    assert torch.equal(p, twin)  # the update reads the exact float32 state either way
    for name in ("exp_avg", "exp_avg_sq"):
        a, b = opt.state[p][name], opt2.state[twin][name]
        np.testing.assert_array_equal(a.stats[:2], b.stats[:2])  # both: the exact statistics
        x, y = _store_decode(a), _store_decode(b)
        if name == "exp_avg":
            # two codes of one tensor (6 bits over +-1 std; the outliers have a grid of their
            # own): a few grid steps
            assert (x - y).abs().max() <= 0.2 * a.stats[1]
            assert (x - y).norm() <= 0.02 * y.norm()
        else:
            # log domain: relative, within a few steps of the ln grid (6 bits over +-1 std)
            # (a grid step of ln v is 2 std / 64; the outliers' grid is coarser)
            r = ((x - y).abs() / y.abs())[y != 0]
            assert r.max() <= math.expm1(8 * a.stats[1] / 64)
            assert r.median() <= math.expm1(2 * a.stats[1] / 64)


def test_one_pass_rejects_far_statistics_and_codes_like_the_two_pass_step():
    p, opt, grads = _stepped(3)
    twin, opt2 = _twin_without_statistics(p, opt)
    for v in opt.state[p].values():
        if isinstance(v, Stored):
            # a spread 3x the true one, marked settled: tried, and rejected
            v.stats = v.stats * np.array([1.0, 3.0, 0.0]) + np.array([0.0, 0.0, 1.0])
    opt.fused_paths.clear()
    p.grad, twin.grad = grads[3].clone(), grads[3].clone()
    opt.step()
    opt2.step()
    assert opt.fused_paths == {"redone-both": 1}
    assert torch.equal(p, twin)
    for name in ("exp_avg", "exp_avg_sq"):
        # coded again with the exact statistics and the same seed: the two-pass bytes
        assert opt.state[p][name].to_state().keys() == opt2.state[twin][name].to_state().keys()
        for k, v in opt.state[p][name].to_state().items():
            assert torch.equal(v, opt2.state[twin][name].to_state()[k]), (name, k)


def test_statistics_that_keep_moving_are_not_tried():
    # Gradients of one scale everywhere: the spread of ln(exp_avg_sq) shrinks by far more than
    # the one pass allows at every early step, so no step tries it (each try would be redone).
    p = nn.Parameter(torch.randn(300, 1000))
    opt = st.AdamW([p], lr=1e-3)
    g = torch.Generator().manual_seed(2)
    for _ in range(6):
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
        opt.step()
    assert opt.fused_paths == {"two-pass": 6}
    assert opt.state[p]["exp_avg_sq"].stats[2] == 0.0


def test_l2_adam_never_takes_one_pass():
    p = nn.Parameter(torch.randn(300, 1000))
    opt = st.Adam([p], lr=1e-3, weight_decay=1e-2)
    for g in _scaled_grads(p.shape, 10):
        p.grad = g
        opt.step()
    assert opt.fused_paths == {"two-pass": 10}


def test_kept_statistics_survive_state_dict_and_are_optional():
    # Two weights of 2^17 values keep their statistics; the 16K-value ones and the biases,
    # below that, do not (their second pass costs little, the 24 bytes would show in their size).
    model = nn.Sequential(nn.Linear(32, 4096), nn.ReLU(), nn.Linear(4096, 32), nn.ReLU(),
                          nn.Linear(32, 512), nn.ReLU(), nn.Linear(512, 32), nn.ReLU(),
                          nn.Linear(32, 4))
    opt = st.AdamW(model.parameters(), lr=1e-3, min_numel=1024)
    run(model, opt, batches(3))
    sd = _save_load(opt.state_dict())
    kept = [s[n]["smaq_stats"] for s in sd["state"].values() for n in ("exp_avg", "exp_avg_sq")
            if isinstance(s[n], dict) and "smaq_stats" in s[n]]
    assert len(kept) == 4 and all(k.dtype == torch.float64 and k.shape == (3,) for k in kept)
    for p, s in opt.state.items():
        if isinstance(s["exp_avg"], Stored):
            assert (s["exp_avg"].stats is not None) == (p.numel() >= 1 << 17)
    opt2 = st.AdamW(model.parameters(), lr=1e-3, min_numel=1024)
    opt2.load_state_dict(sd)
    for p, s in opt.state.items():
        for n, v in s.items():
            if isinstance(v, Stored):
                np.testing.assert_array_equal(opt2.state[p][n].stats, v.stats)
    # A state dict without them (older, or edited) loads; its next step runs in two passes.
    for s in sd["state"].values():
        for n in ("exp_avg", "exp_avg_sq"):
            if isinstance(s[n], dict):
                s[n].pop("smaq_stats", None)
    opt3 = st.AdamW(model.parameters(), lr=1e-3, min_numel=1024)
    opt3.load_state_dict(sd)
    run(model, opt3, batches(1, seed=5))
    assert "one-pass" not in opt3.fused_paths
    assert opt3.fused_paths["two-pass"] >= len(kept) // 2


# -- exp_avg packed scaled to the update's direction ------------------------------------------
def _updates_error(make, fused=True, steps=20, n=1 << 16):
    """Relative RMS error of the parameter's total move under `make` against torch.optim.AdamW,
    on gradients whose scale varies per element over five orders of magnitude."""
    g0 = torch.Generator().manual_seed(5)
    scale = torch.exp(torch.randn(n, generator=g0) * 2.0) * 1e-3
    p0 = torch.randn(n, generator=g0)
    pa, pb = nn.Parameter(p0.clone()), nn.Parameter(p0.clone())
    ours, ref = make([pa]), torch.optim.AdamW([pb], lr=1e-3, foreach=False)
    ours.fused = fused
    for _ in range(steps):
        g = (torch.randn(n, generator=g0) + 0.5) * scale
        pa.grad, pb.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    da, db = (pa - p0).detach(), (pb - p0).detach()
    return float((da - db).norm() / db.norm())


@pytest.mark.parametrize("fused", [True, False])
def test_scaled_exp_avg_keeps_small_gradients_updates(fused):
    # Packed as is, exp_avg's small elements are rounded on the grid the large ones set and
    # their updates (divided by their own small sqrt(exp_avg_sq)) take that noise magnified;
    # scaled, each is coded relative to its own update. Measured: 0.026 scaled, 0.76 as is.
    scaled = _updates_error(lambda p: st.AdamW(p, lr=1e-3, seed=1), fused)
    as_is = _updates_error(lambda p: st.AdamW(p, lr=1e-3, seed=1, scale_exp_avg=False), fused)
    assert scaled < 0.05
    assert as_is > 10 * scaled


def test_state_saved_unscaled_loads_as_saved():
    # An optimizer state packed without scaling (as earlier versions stored it) is read as
    # such: the next step moves the parameter exactly as the unscaled optimizer's does, and
    # stores the new exp_avg scaled.
    g0 = torch.Generator().manual_seed(2)
    p0 = torch.randn(300, 257, generator=g0)
    pa, pb = nn.Parameter(p0.clone()), nn.Parameter(p0.clone())
    old = st.AdamW([pa], lr=1e-3, seed=4, scale_exp_avg=False)
    grads = [torch.randn(p0.shape, generator=g0) * 1e-3 for _ in range(3)]
    for g in grads[:2]:
        pa.grad = g.clone()
        old.step()
    assert "exp_avg_scaled" not in old.state[pa]
    new = st.AdamW([pb], lr=1e-3, seed=4)
    new.load_state_dict(copy.deepcopy(old.state_dict()))
    pb.data.copy_(pa.data)
    pa.grad, pb.grad = grads[2].clone(), grads[2].clone()
    old.step()
    new.step()
    assert torch.equal(pa, pb)
    assert new.state[pb]["exp_avg_scaled"] is True
    # and the scaled state survives a state_dict round trip, through torch.save
    buf = io.BytesIO()
    torch.save(new.state_dict(), buf)
    buf.seek(0)
    pc = nn.Parameter(pb.detach().clone())
    again = st.AdamW([pc], lr=1e-3, seed=4)
    again.load_state_dict(torch.load(buf, weights_only=True))
    assert again.state[pc]["exp_avg_scaled"] is True
    g = torch.randn(p0.shape, generator=g0) * 1e-3
    pb.grad, pc.grad = g.clone(), g.clone()
    new.step()
    again.step()
    assert torch.equal(pb, pc)
