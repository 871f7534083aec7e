"""SparseLinear against torch's dense nn.Linear holding the same (masked) weights: outputs and the
gradients of the input, of the weights at the non-zeros and of the bias, within the float32
rounding of sums taken in different orders; bad input as typed errors; the swap report."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import smaq_rs  # noqa: E402
from smaq_rs import _bridge  # noqa: E402
from smaq_rs.torch.sparse import (  # noqa: E402
    SparseConv2d,
    SparseLinear,
    SparsityError,
    sparsity_of,
    swap_modules_with_sparse,
)

EPS = 2.0 ** -24


def masked_linear(inp, out, sparsity, seed, empty_rows=False, bias=True):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(inp, out, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.rand(out, inp, generator=g) * 2 - 1)
        keep = torch.rand(out, inp, generator=g) >= sparsity
        if empty_rows and out > 1:
            keep[::2] = False
        lin.weight.mul_(keep)
        if bias:
            lin.bias.copy_(torch.rand(out, generator=g) * 2 - 1)
    return lin


def assert_sum_close(got, want, absref, terms, what):
    """|got - want| within two float32 summations of ``terms`` terms each: 2 n eps sum|terms|."""
    bound = 2 * max(terms, 1) * EPS * absref + 1e-30
    err = (got.double() - want.double()).abs()
    assert bool((err <= bound).all()), f"{what}: max excess {float((err - bound).max())}"


def check_layer(lin, lead, seed):
    g = torch.Generator().manual_seed(seed + 1)
    sp = SparseLinear.from_dense(lin, min_sparsity=0.0)
    assert torch.equal(sp.weight, lin.weight.detach())
    x = torch.rand(*lead, lin.in_features, generator=g) * 2 - 1
    gy = torch.rand(*lead, lin.out_features, generator=g) * 2 - 1
    xs = x.clone().requires_grad_(True)
    xd = x.clone().requires_grad_(True)
    ys = sp(xs)
    yd = lin(xd)
    assert ys.shape == yd.shape
    ys.backward(gy)
    yd.backward(gy)
    w = lin.weight.detach()
    n = int(np.prod(lead)) if lead else 1
    x2, gy2 = x.reshape(n, lin.in_features), gy.reshape(n, lin.out_features)
    yref = x2.abs() @ w.abs().t() + (lin.bias.detach().abs() if lin.bias is not None else 0)
    assert_sum_close(ys.detach().reshape(n, lin.out_features), yd.detach().reshape(n, lin.out_features), yref,
                     lin.in_features + 1, "output")
    assert_sum_close(xs.grad.reshape(n, lin.in_features), xd.grad.reshape(n, lin.in_features), gy2.abs() @ w.abs(),
                     lin.out_features, "input gradient")
    mask = w != 0
    dwref = (gy2.abs().t() @ x2.abs())[mask]
    assert sp.values.grad.shape == (int(mask.sum()),)
    assert_sum_close(sp.values.grad, lin.weight.grad[mask], dwref, n, "weight gradient")
    if lin.bias is not None:
        assert_sum_close(sp.bias.grad, lin.bias.grad, gy2.abs().sum(0), n, "bias gradient")


@settings(max_examples=80, deadline=None)
@given(
    inp=st.integers(1, 70),
    out=st.integers(1, 40),
    lead=st.sampled_from([(1,), (0,), (5,), (17,), (130,), (3, 7), (2, 0, 3)]),
    sparsity=st.sampled_from([0.0, 0.5, 0.9, 0.98, 1.0]),
    empty_rows=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_matches_dense_linear(inp, out, lead, sparsity, empty_rows, bias, seed):
    check_layer(masked_linear(inp, out, sparsity, seed, empty_rows, bias), lead, seed)


def test_bert_sized_layer_at_90_percent():
    # 768 -> 3072 with a batch that is not a multiple of any vector width.
    check_layer(masked_linear(768, 3072, 0.9, 7), (67,), 7)


def test_wide_input_uses_four_byte_indices():
    lin = masked_linear(70_000, 3, 0.999, 3)
    sp = SparseLinear.from_dense(lin, min_sparsity=0.0)
    assert sp.pattern.index_width == 4
    assert SparseLinear.from_dense(masked_linear(100, 3, 0.9, 3), min_sparsity=0).pattern.index_width == 2
    check_layer(lin, (5,), 3)


def test_training_keeps_the_pattern_and_follows_masked_dense_sgd():
    lin = masked_linear(40, 24, 0.8, 11)
    mask = lin.weight.detach() != 0
    sp = SparseLinear.from_dense(lin)
    opt_s = torch.optim.SGD(sp.parameters(), lr=0.05, momentum=0.9)
    opt_d = torch.optim.SGD(lin.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(16, 40, generator=g)
        for m, opt in ((sp, opt_s), (lin, opt_d)):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            if m is lin:
                lin.weight.grad.mul_(mask)  # what the sparse layer trains: the non-zeros only
            opt.step()
    assert torch.equal(sp.weight != 0, mask & (sp.weight != 0))
    torch.testing.assert_close(sp.weight, lin.weight.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sp.bias, lin.bias, rtol=1e-4, atol=1e-5)


def test_state_dict_round_trip_brings_the_pattern():
    def diagonal(shift):
        lin = torch.nn.Linear(30, 20)
        with torch.no_grad():
            lin.weight.zero_()
            lin.weight[torch.arange(20), torch.arange(20) + shift] = torch.arange(1.0, 21.0)
        return SparseLinear.from_dense(lin)

    a, c = diagonal(0), diagonal(1)  # the same number of non-zeros at other positions
    c.load_state_dict(a.state_dict())
    x = torch.randn(7, 30)
    assert torch.equal(c.weight, a.weight)
    torch.testing.assert_close(c(x), a(x))


def test_one_layer_called_from_threads_at_once_gives_each_call_its_result():
    # The layer's scratch buffers are shared between calls: calls from several threads must
    # not see each other's data (they take turns).
    import threading

    lin = masked_linear(300, 200, 0.9, seed=5)
    sp = SparseLinear.from_dense(lin, min_sparsity=0.0)
    inputs = [torch.randn(600, 300, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    want = [sp(x).detach() for x in inputs]
    got = [None] * len(inputs)

    def run(i):
        for _ in range(5):
            got[i] = sp(inputs[i]).detach()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w, g in zip(want, got):
        assert torch.equal(w, g)


def test_dense_layer_refused_with_its_sparsity():
    lin = masked_linear(20, 10, 0.3, 1)
    s = sparsity_of(lin.weight)
    with pytest.raises(SparsityError, match=f"{s:.1%}".replace(".", r"\.")) as e:
        SparseLinear.from_dense(lin, min_sparsity=0.8)
    assert isinstance(e.value, smaq_rs.SmaqError) and "80.0%" in str(e.value)
    with pytest.raises(smaq_rs.SmaqError, match="quantize"):
        SparseLinear.from_dense(masked_linear(20, 10, 0.9, 1), quantize="int8")
    with pytest.raises(TypeError, match="nn.Linear"):
        SparseLinear.from_dense(torch.nn.Conv2d(3, 3, 3))


def test_bad_inputs_are_typed_errors():
    sp = SparseLinear.from_dense(masked_linear(8, 4, 0.9, 2), min_sparsity=0)
    with pytest.raises(smaq_rs.LayoutError, match="in_features = 8.*found shape \\(3, 7\\)"):
        sp(torch.randn(3, 7))
    with pytest.raises(smaq_rs.DtypeError, match="float32, found torch.float64"):
        sp(torch.randn(3, 8, dtype=torch.float64))
    p = sp.pattern
    v = sp.values.detach().numpy()
    x = np.zeros((8, 5), np.float32)
    with pytest.raises(smaq_rs.LayoutError, match="8 rows"):
        _bridge.sparse_linear_forward(p, v, np.zeros((7, 5), np.float32), None,
                                      np.zeros((4, 5), np.float32))
    with pytest.raises(smaq_rs.LayoutError, match="output"):
        _bridge.sparse_linear_forward(p, v, x, None, np.zeros((4, 4), np.float32))
    with pytest.raises(smaq_rs.LayoutError, match="values have"):
        _bridge.sparse_linear_forward(p, v[:-1], x, None, np.zeros((4, 5), np.float32))
    with pytest.raises(smaq_rs.LayoutError, match="bias has 3"):
        _bridge.sparse_linear_forward(p, v, x, np.zeros(3, np.float32), np.zeros((4, 5), np.float32))
    with pytest.raises(smaq_rs.LayoutError, match="row stride 5 is smaller than the batch 6"):
        _bridge.sparse_linear_forward(p, v, x, None, np.zeros((4, 5), np.float32), batch=6)
    with pytest.raises(smaq_rs.DtypeError, match="float32"):
        _bridge.sparse_linear_forward(p, v.astype(np.float64), x, None, np.zeros((4, 5), np.float32))
    with pytest.raises(smaq_rs.LayoutError, match="weight gradient has 1"):
        _bridge.sparse_linear_backward(p, v, x, np.zeros((4, 5), np.float32),
                                       dw=np.zeros(1, np.float32))
    with pytest.raises(smaq_rs.LayoutError, match="batch|columns"):
        _bridge.sparse_linear_backward(p, v, x, np.zeros((4, 6), np.float32))
    # Malformed patterns never reach a kernel.
    with pytest.raises(smaq_rs.LayoutError, match="column index 9; expected 0 <= index < 8"):
        _bridge.CsrPattern(2, 8, np.array([0, 1, 2]), np.array([0, 9]))
    with pytest.raises(smaq_rs.LayoutError, match="strictly increasing"):
        _bridge.CsrPattern(1, 8, np.array([0, 2]), np.array([3, 1]))
    with pytest.raises(smaq_rs.DtypeError, match="int64"):
        _bridge.CsrPattern(1, 8, np.array([0, 1], np.int32), np.array([3]))


def test_levels_give_the_same_bits():
    lin = masked_linear(50, 30, 0.7, 5)
    sp = SparseLinear.from_dense(lin, min_sparsity=0)
    p, v = sp.pattern, sp.values.detach().numpy()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 37)).astype(np.float32)
    dy = rng.standard_normal((30, 37)).astype(np.float32)
    outs = []
    for level in ("portable", "avx2", "avx512"):
        y, dx, dw = np.empty((30, 37), np.float32), np.empty((50, 37), np.float32), np.empty(p.nnz, np.float32)
        _bridge.sparse_linear_forward(p, v, x, None, y, level=level)
        _bridge.sparse_linear_backward(p, v, x, dy, dx_t=dx, dw=dw, level=level)
        outs.append((y, dx, dw))
    for o in outs[1:]:
        for a, b in zip(outs[0], o):
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_swap_report_says_what_and_why(capsys):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = torch.nn.Sequential(
                torch.nn.Linear(32, 256), torch.nn.ReLU(), masked_linear(256, 512, 0.95, 4),
                torch.nn.ReLU(), masked_linear(512, 10, 0.5, 5),
            )
            self.unused = masked_linear(4, 4, 0.9, 6)

        def forward(self, x):
            return self.seq(x)

    torch.manual_seed(0)
    model = Net()
    x = torch.randn(64, 32)
    before = model(x).detach()
    report = swap_modules_with_sparse(model, (64, 32), min_sparsity=0.8, repeats=2)
    printed = capsys.readouterr().out
    by = {e.name: e for e in report.entries}
    assert set(by) == {"seq.0", "seq.2", "seq.4", "unused"}
    assert not by["seq.0"].swapped and "below the minimum 0.800" in by["seq.0"].reason
    assert not by["seq.4"].swapped and "sparsity 0.5" in by["seq.4"].reason
    assert not by["unused"].swapped and "not called" in by["unused"].reason
    e = by["seq.2"]
    assert e.input_shape == (64, 256) and math.isclose(e.sparsity, 0.95, abs_tol=0.01)
    assert e.dense_ms > 0 and e.sparse_ms > 0
    assert e.swapped == (e.sparse_ms < e.dense_ms)
    assert isinstance(model.seq[2], SparseLinear) == e.swapped
    assert report.swapped == (["seq.2"] if e.swapped else [])
    for name in by:
        assert name in printed
    torch.testing.assert_close(model(x).detach(), before, rtol=1e-4, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(
    cin=st.integers(1, 5), cout=st.integers(1, 6), k=st.sampled_from([1, 2, 3]),
    stride=st.integers(1, 2), padding=st.integers(0, 2), dilation=st.integers(1, 2),
    n=st.integers(1, 3), hw=st.integers(5, 9), sparsity=st.sampled_from([0.0, 0.6, 0.9, 1.0]),
    bias=st.booleans(), seed=st.integers(0, 2**31),
)
def test_conv_matches_dense_conv2d(cin, cout, k, stride, padding, dilation, n, hw, sparsity,
                                   bias, seed):
    g = torch.Generator().manual_seed(seed)
    conv = torch.nn.Conv2d(cin, cout, k, stride, padding, dilation, bias=bias)
    with torch.no_grad():
        conv.weight.copy_((torch.rand(conv.weight.shape, generator=g) * 2 - 1)
                          * (torch.rand(conv.weight.shape, generator=g) >= sparsity))
        if bias:
            conv.bias.copy_(torch.rand(cout, generator=g) * 2 - 1)
    sp = SparseConv2d.from_dense(conv, min_sparsity=0.0)
    assert torch.equal(sp.weight, conv.weight.detach())
    x = torch.rand(n, cin, hw, hw, generator=g) * 2 - 1
    xs, xd = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ys, yd = sp(xs), conv(xd)
    assert ys.shape == yd.shape
    gy = torch.rand(yd.shape, generator=g) * 2 - 1
    ys.backward(gy)
    yd.backward(gy)
    w = conv.weight.detach()
    kk = cin * k * k
    geo = dict(stride=stride, padding=padding, dilation=dilation)
    yref = torch.nn.functional.conv2d(x.abs(), w.abs(), **geo)
    if bias:
        yref = yref + conv.bias.detach().abs()[:, None, None]
    assert_sum_close(ys.detach(), yd.detach(), yref, kk + 1, "conv output")
    dxref = torch.nn.grad.conv2d_input(x.shape, w.abs(), gy.abs(), **geo)
    assert_sum_close(xs.grad, xd.grad, dxref, cout * k * k, "conv input gradient")
    mask = w != 0
    dwref = torch.nn.grad.conv2d_weight(x.abs(), w.shape, gy.abs(), **geo)[mask]
    positions = yd.shape[0] * yd.shape[2] * yd.shape[3]
    assert_sum_close(sp.values.grad, conv.weight.grad[mask], dwref, positions, "conv weight gradient")
    if bias:
        assert_sum_close(sp.bias.grad, conv.bias.grad, gy.abs().sum((0, 2, 3)), positions,
                         "conv bias gradient")


def test_conv_refusals():
    with pytest.raises(SparsityError, match="sparse"):
        SparseConv2d.from_dense(torch.nn.Conv2d(3, 4, 3))
    with pytest.raises(smaq_rs.SmaqError, match="groups=1"):
        SparseConv2d.from_dense(torch.nn.Conv2d(4, 4, 3, groups=2), min_sparsity=0)
    sp = SparseConv2d.from_dense(torch.nn.Conv2d(3, 4, 3), min_sparsity=0)
    with pytest.raises(smaq_rs.LayoutError, match=r"\(N, 3, H, W\)"):
        sp(torch.randn(2, 5, 8, 8))


def test_swap_leaves_batchnorm_statistics_and_training_flags_as_they_were():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.BatchNorm2d(8), torch.nn.Flatten(), masked_linear(8 * 6 * 6, 16, 0.9, 7),
    )
    model.train()
    model[3].eval()  # a frozen BatchNorm inside a training model keeps its own mode
    with torch.no_grad():  # statistics that a random batch would visibly move
        for bn in (model[1], model[3]):
            bn.running_mean.fill_(3.0)
            bn.running_var.fill_(9.0)
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k
               or "num_batches" in k}
    modes = [m.training for m in model.modules()]
    swap_modules_with_sparse(model, (4, 3, 6, 6), min_sparsity=0.8, repeats=1, verbose=False)
    for k, v in buffers.items():
        assert torch.equal(model.state_dict()[k], v), k
    assert [m.training for m in model.modules()] == modes
