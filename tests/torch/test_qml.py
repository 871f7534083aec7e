"""QML layers and quantizers (smaq_rs.torch.qml) against plain torch and reference algorithms.

- With identity quantizers QLinear / QConv2d compute exactly what nn.Linear / nn.Conv2d compute:
  forward, input, weight and bias gradients, bit for bit (stride, padding, dilation, groups).
- Each of the eight paths applies its quantizer where the layer framework places it: a recording
  quantizer per path logs the tensor it saw, which must equal the plain-torch expression of the
  quantized upstream values.
- HsumAccumulator equals the sum of quantized local gradients computed independently (one plain
  nn.Linear / nn.Conv2d backward per worker micro-batch).
- FloatingPointQuantizer / IntQuantizer / TiledQuantizer / CodecQuantizer against reference
  implementations and the codecs themselves; bad input refused with typed errors.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

import smaq_rs
from smaq_rs.torch import qml
from smaq_rs.torch.qml import (
    CodecQuantizer, FloatingPointQuantizer, HsumAccumulator, Identity, IntQuantizer, PrefixBundle,
    QConv2d, QLinear, Quantizer, SumAccumulator, TiledQuantizer, quantize_model,
)


# -- references ----------------------------------------------------------------------------------
def ref_fp(x: torch.Tensor, m: int) -> torch.Tensor:
    """Mantissa truncation written out per value in float64: x = s * f * 2^e with f in [1, 2),
    keep floor(f * 2^m) / 2^m."""
    out = []
    for v in x.double().flatten().tolist():
        if v == 0 or not math.isfinite(v):
            out.append(v)
            continue
        e = math.floor(math.log2(abs(v)))
        f = abs(v) / 2.0 ** e
        if f >= 2.0:  # log2 rounding at a power of two
            e, f = e + 1, f / 2
        elif f < 1.0:
            e, f = e - 1, f * 2
        out.append(math.copysign(math.floor(f * 2 ** m) / 2 ** m * 2.0 ** e, v))
    return torch.tensor(out, dtype=torch.float64).reshape(x.shape).to(x.dtype)


def ref_int(x: torch.Tensor, bits: int):
    """Per row of dim 0, codes round((x - min) / (max - min) * (2^bits - 1)), row by row."""
    codes, deq = [], []
    for row in x.reshape(x.shape[0], -1):
        lo, hi = row.min().item(), row.max().item()
        levels = 2 ** bits - 1
        c = [0.0 if hi == lo else float(round_half_even((v - lo) / (hi - lo) * levels))
             for v in row.tolist()]
        codes.append(c)
        deq.append([ci / levels * (hi - lo) + lo for ci in c])
    return (torch.tensor(codes).reshape(x.shape), torch.tensor(deq).reshape(x.shape))


def round_half_even(v: float) -> int:
    return int(np.round(v))


class Recording(Quantizer):
    """Logs what it saw and applies a mantissa truncation (distinct per path)."""

    def __init__(self, name: str, m: int, log: list):
        self.name, self.inner, self.log = name, FloatingPointQuantizer(m), log

    def quantize(self, t):
        q, ctx = self.inner.quantize(t)
        self.log.append((self.name, t.detach().clone(), q.detach().clone()))
        return q, ctx

    def dequantize(self, t, ctx):
        return t


def recording_bundle(log):
    ms = dict(qx=3, qdx=4, qy=5, qdy=2, qw=1, qdw=6, qb=0, qdb=7)
    return PrefixBundle(**{k: Recording(k, m, log) for k, m in ms.items()})


def exact_pair(plain: nn.Module, quant: nn.Module, x: torch.Tensor):
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    ya, yb = plain(xa), quant(xb)
    g = torch.randn_like(ya)
    ya.backward(g)
    grads_a = [p.grad.clone() for p in plain.parameters()]
    plain.zero_grad()
    yb.backward(g)
    grads_b = [p.grad.clone() for p in quant.parameters()]
    return (ya, yb), (xa.grad, xb.grad), list(zip(grads_a, grads_b))


# -- identity: exactly nn.Linear / nn.Conv2d -----------------------------------------------------
@pytest.mark.parametrize("shape,bias", [((9, 7), True), ((9, 7), False), ((3, 5, 7), True),
                                        ((7,), True)])
def test_qlinear_identity_equals_linear_exactly(shape, bias):
    torch.manual_seed(0)
    lin = nn.Linear(7, 6, bias=bias)
    q = QLinear.from_float(lin, PrefixBundle(default=Identity()))
    assert q.weight is lin.weight and q.bias is lin.bias  # shared, not copied
    (ya, yb), (dxa, dxb), grads = exact_pair(lin, q, torch.randn(*shape))
    assert torch.equal(ya, yb) and torch.equal(dxa, dxb)
    assert len(grads) == (2 if bias else 1)
    for ga, gb in grads:
        assert torch.equal(ga, gb)


@pytest.mark.parametrize("kw", [
    dict(), dict(stride=2, padding=1), dict(stride=(2, 1), padding=(1, 2), dilation=2),
    dict(groups=2, padding=1), dict(groups=4, padding="same"), dict(padding="valid", bias=False),
])
def test_qconv2d_identity_equals_conv2d_exactly(kw):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 8, 3, **kw)
    q = QConv2d.from_float(conv)
    (ya, yb), (dxa, dxb), grads = exact_pair(conv, q, torch.randn(5, 4, 10, 9))
    assert torch.equal(ya, yb) and torch.equal(dxa, dxb)
    for ga, gb in grads:
        assert torch.equal(ga, gb)


def test_qconv2d_unbatched_input():
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    q = QConv2d.from_float(conv)
    x = torch.randn(3, 6, 6)
    assert torch.equal(conv(x), q(x))


# -- each path where the framework puts it --------------------------------------------------------
def _by_name(log):
    seen = {}
    for name, before, after in log:
        assert name not in seen, f"{name} applied twice"
        seen[name] = (before, after)
    return seen


def test_qlinear_paths_recorded():
    torch.manual_seed(3)
    log: list = []
    q = QLinear(6, 5, bundle=recording_bundle(log))
    x = torch.randn(4, 6, requires_grad=True)
    y = q(x)
    g = torch.randn(4, 5)
    y.backward(g)
    s = _by_name(log)
    assert set(s) == set(qml.PATHS)
    assert [n for n, _, _ in log][:4] == ["qx", "qw", "qb", "qy"]  # forward paths first
    xq, wq, bq = s["qx"][1], s["qw"][1], s["qb"][1]
    assert torch.equal(s["qx"][0], x.detach()) and torch.equal(s["qw"][0], q.weight.detach())
    assert torch.equal(s["qb"][0], q.bias.detach())
    for name, m in (("qx", 3), ("qw", 1), ("qb", 0)):
        assert torch.equal(s[name][1], ref_fp(s[name][0], m))
    torch.testing.assert_close(s["qy"][0], xq @ wq.T + bq, rtol=1e-6, atol=1e-6)
    assert torch.equal(y.detach(), s["qy"][1])
    assert torch.equal(s["qdy"][0], g)
    dyq = s["qdy"][1]
    torch.testing.assert_close(s["qdx"][0], dyq @ wq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s["qdw"][0], dyq.T @ xq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s["qdb"][0], dyq.sum(0), rtol=1e-6, atol=1e-6)
    assert torch.equal(x.grad, s["qdx"][1]) and torch.equal(q.weight.grad, s["qdw"][1])
    assert torch.equal(q.bias.grad, s["qdb"][1])
    for name, m in (("qdx", 4), ("qdw", 6), ("qdb", 7), ("qy", 5), ("qdy", 2)):
        assert torch.equal(s[name][1], ref_fp(s[name][0], m)), name


def test_qconv2d_paths_recorded():
    torch.manual_seed(4)
    log: list = []
    q = QConv2d(4, 6, 3, stride=2, padding=1, groups=2, bundle=recording_bundle(log))
    x = torch.randn(3, 4, 7, 7, requires_grad=True)
    y = q(x)
    g = torch.randn_like(y)
    y.backward(g)
    s = _by_name(log)
    xq, wq, bq = s["qx"][1], s["qw"][1], s["qb"][1]
    assert torch.equal(s["qx"][0], x.detach()) and torch.equal(s["qw"][0], q.weight.detach())
    ref = nn.functional.conv2d(xq, wq, bq, stride=2, padding=1, groups=2)
    torch.testing.assert_close(s["qy"][0], ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(s["qdy"][0], g)
    # the gradients of the plain conv of the quantized tensors, by autograd
    xr = xq.clone().requires_grad_()
    wr = wq.clone().requires_grad_()
    br = bq.clone().requires_grad_()
    nn.functional.conv2d(xr, wr, br, stride=2, padding=1, groups=2).backward(s["qdy"][1])
    torch.testing.assert_close(s["qdx"][0], xr.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s["qdw"][0], wr.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s["qdb"][0], br.grad, rtol=1e-6, atol=1e-6)
    assert torch.equal(x.grad, s["qdx"][1]) and torch.equal(q.weight.grad, s["qdw"][1])
    assert torch.equal(q.bias.grad, s["qdb"][1])


# -- accumulators -----------------------------------------------------------------------------------
def _local_grads(plain: nn.Module, x: torch.Tensor, g: torch.Tensor, spw: int):
    """Each worker's gradients from its own micro-batch, by a plain backward."""
    out = []
    for xc, gc in zip(torch.split(x, spw), torch.split(g, spw)):
        plain.zero_grad()
        plain(xc).backward(gc)
        out.append([p.grad.clone() for p in plain.parameters()])
    return out


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_hsum_equals_sum_of_quantized_local_gradients(kind):
    torch.manual_seed(5)
    workers, spw = 4, 3
    if kind == "linear":
        plain, x = nn.Linear(8, 5), torch.randn(workers * spw, 8)
        make = QLinear.from_float
    else:
        plain, x = nn.Conv2d(3, 4, 3, padding=1), torch.randn(workers * spw, 3, 5, 5)
        make = QConv2d.from_float
    q1 = IntQuantizer(3)
    acc = HsumAccumulator([(spw, q1), (workers, None)])
    g = torch.randn_like(plain(x))
    locals_ = _local_grads(plain, x, g, spw)
    plain.zero_grad()
    q = make(plain, PrefixBundle(aw=acc, ab=acc))
    q(x).backward(g)
    for i, p in enumerate(q.parameters()):
        parts = [lg[i] for lg in locals_]
        expect = sum(ref_int(pt.reshape(pt.shape[0], -1), 3)[1].reshape(pt.shape) for pt in parts)
        torch.testing.assert_close(p.grad, expect, rtol=1e-5, atol=1e-6)
        if i == 0:  # the weight: the quantizer did act (a bias row is one value: exact)
            assert not torch.allclose(p.grad, sum(parts), atol=1e-4)


def test_hsum_second_level_quantizer_and_per_sample_groups():
    torch.manual_seed(6)
    t = torch.randn(12, 4, 5)  # per-sample gradients
    q1, q2 = IntQuantizer(4), FloatingPointQuantizer(2)
    acc = HsumAccumulator([(3, q1), (4, q2)])
    locals_ = torch.stack([c.sum(0) for c in torch.split(t, 3)])
    expect = q2(torch.stack([q1(loc) for loc in locals_]).sum(0))
    assert torch.equal(acc.accumulate(t, group=1), expect)
    # pre-summed in groups of 3 (what the layers hand over): same
    assert torch.equal(acc.accumulate(locals_), expect)
    # an incomplete last worker is allowed, more samples than the levels cover is not
    assert acc.accumulate(t[:10], group=1).shape == (4, 5)
    with pytest.raises(ValueError, match="exceed"):
        acc.accumulate(torch.randn(13, 4, 5), group=1)
    with pytest.raises(ValueError, match="does not divide"):
        acc.accumulate(t, group=2)


def test_custom_accumulator_receives_per_sample_gradients():
    class PerSample(qml.Accumulator):
        seen = None

        def accumulate(self, t):
            PerSample.seen = t.clone()
            return t.sum(0)

    torch.manual_seed(7)
    q = QLinear(3, 2, bias=False, bundle=PrefixBundle(aw=PerSample()))
    x = torch.randn(5, 3)
    g = torch.randn(5, 2)
    q(x).backward(g)
    expect = torch.stack([torch.outer(g[i], x[i]) for i in range(5)])
    torch.testing.assert_close(PerSample.seen, expect)


def test_sum_accumulator_is_the_plain_sum():
    t = torch.randn(6, 3)
    assert torch.equal(SumAccumulator().accumulate(t), t.sum(0))


# -- quantizers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("m", [0, 1, 2, 5, 10])
def test_floating_point_quantizer_matches_reference(m):
    torch.manual_seed(8)
    x = torch.cat([torch.randn(500) * 10.0 ** torch.randint(-6, 6, (500,)),
                   torch.tensor([0.0, -0.0, 1.0, -1.5, 3.75, float("inf"), float("-inf"),
                                 1e-40, -3.3e-41, 1.5e-45, 1.1754944e-38, -3.4e38])])
    y = FloatingPointQuantizer(m)(x)
    assert torch.equal(y, ref_fp(x, m))
    assert torch.equal(y.view(torch.int32), ref_fp(x, m).view(torch.int32))  # -0.0 kept
    x64 = x.double() * 1e-300
    assert torch.equal(FloatingPointQuantizer(m)(x64), ref_fp(x64, m))
    xb = x[:500].bfloat16()
    assert torch.equal(FloatingPointQuantizer(m)(xb), ref_fp(xb, m))
    # bit view: the low 23 - m mantissa bits of float32 are cleared, sign and exponent kept
    finite = torch.isfinite(x) & (x.abs() >= torch.finfo(torch.float32).tiny)
    bits = y[finite].view(torch.int32)
    assert torch.all(bits & ((1 << (23 - m)) - 1) == 0)
    assert torch.equal(bits >> 23, x[finite].view(torch.int32) >> 23)
    assert torch.isnan(FloatingPointQuantizer(m)(torch.tensor([float("nan")]))).all()


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_int_quantizer_matches_reference(bits):
    torch.manual_seed(9)
    x = torch.randn(6, 3, 4)
    x[2] = 0.75  # a constant row
    codes, ctx = IntQuantizer(bits).quantize(x)
    ref_codes, ref_deq = ref_int(x, bits)
    assert torch.equal(codes, ref_codes)
    assert codes.min() >= 0 and codes.max() <= 2 ** bits - 1
    torch.testing.assert_close(IntQuantizer(bits).dequantize(codes, ctx), ref_deq)
    assert torch.equal(IntQuantizer(bits)(x)[2], x[2])


def test_tiled_quantizer_is_the_quantizer_per_tile():
    torch.manual_seed(10)
    x = torch.randn(4, 6, 2)
    q = IntQuantizer(3)
    y = TiledQuantizer([2, 3], q)(x)
    for i in range(0, 4, 2):
        for j in range(0, 6, 3):
            tile = x[i:i + 2, j:j + 3]
            expect = ref_int(tile.reshape(1, -1), 3)[1].reshape(tile.shape)
            torch.testing.assert_close(y[i:i + 2, j:j + 3], expect)
    # 1-D tiles = blockwise
    flat = torch.randn(256)
    yb = TiledQuantizer([64], q)(flat)
    for k in range(4):
        torch.testing.assert_close(yb[64 * k:64 * (k + 1)],
                                   ref_int(flat[64 * k:64 * (k + 1)].reshape(1, -1), 3)[1][0])
    with pytest.raises(ValueError, match="not a multiple"):
        TiledQuantizer([3], q)(torch.randn(4, 2))


def test_codec_quantizer_packed_and_simulated():
    torch.manual_seed(11)
    x = torch.randn(128, 256)
    q = CodecQuantizer("int", bits=4, granularity="row", scheme="absmax")
    raw, ctx = q.quantize(x)
    ref = smaq_rs.compress(x, "int", bits=4, granularity="row", scheme="absmax", row_size=256)
    assert raw.dtype == torch.uint8 and raw.numel() == ctx.nbytes == ref.nbytes
    assert bytes(raw.numpy()) == ref.to_bytes()
    assert ctx.nbytes < x.numel() * 4 / 7  # 4-bit codes: over 7x smaller
    assert torch.equal(q.dequantize(raw, ctx), smaq_rs.decompress(ref))
    sim = CodecQuantizer("int", packed=False, bits=4, granularity="row", scheme="absmax")
    assert torch.equal(sim(x), q(x))
    fp8 = CodecQuantizer("fp8", packed=False)
    assert torch.equal(fp8(x), smaq_rs.decompress(smaq_rs.compress(x, "fp8")))


def test_codec_quantizer_bad_input():
    with pytest.raises(smaq_rs.CodecError, match="unknown codec 'nope'"):
        CodecQuantizer("nope")
    with pytest.raises(smaq_rs.CodecError):
        CodecQuantizer("int", bits=99)
    with pytest.raises(smaq_rs.DtypeError, match="int64"):
        CodecQuantizer("fp16").quantize(torch.arange(4))


def test_quantizer_bad_arguments():
    with pytest.raises(ValueError, match="0..52"):
        FloatingPointQuantizer(-1)
    with pytest.raises(ValueError, match="1..24"):
        IntQuantizer(0)
    with pytest.raises(TypeError, match="floating-point"):
        IntQuantizer(4).quantize(torch.arange(6).reshape(2, 3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        IntQuantizer(4).quantize(torch.tensor([[1.0, float("inf")]]))
    with pytest.raises(TypeError, match="Quantizer"):
        TiledQuantizer([2], "int8")
    with pytest.raises(TypeError, match="size, quantizer"):
        HsumAccumulator([4])


# -- bundles and model swapping -------------------------------------------------------------------------
def test_prefix_bundle_keys_and_defaults():
    q8, fp = IntQuantizer(8), FloatingPointQuantizer(2)
    acc = HsumAccumulator([(2, None), (2, None)])
    b = PrefixBundle(default=q8, qdw=fp)
    assert b.qdw is fp and b.qx is q8 and isinstance(b.aw, SumAccumulator)
    b.aw = acc
    assert b.get("aw") is acc and isinstance(b.ab, SumAccumulator)
    a = PrefixBundle(default=acc)
    assert isinstance(a.qx, Identity) and a.ab is acc
    merged = PrefixBundle(default=q8).merged(a)
    assert merged.qy is q8 and merged.aw is acc
    with pytest.raises(ValueError, match="valid keys: default, qx, qdx, qy, qdy, qw, qdw, qb, "
                                         "qdb, aw, ab"):
        PrefixBundle(qz=q8)
    with pytest.raises(ValueError, match="'qxx' is not a data path"):
        b.qxx = q8
    with pytest.raises(TypeError, match="aw takes a Accumulator"):
        PrefixBundle(aw=q8)
    with pytest.raises(TypeError, match="qx takes a Quantizer"):
        PrefixBundle(qx=acc)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.circ = nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular")
        self.bn = nn.BatchNorm2d(4)
        self.body = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 8))
        self.attn = nn.MultiheadAttention(8, 2)
        self.emb = nn.Embedding(10, 8)

    def forward(self, x):
        h = self.bn(self.circ(self.conv(x)))
        return self.body(h.flatten(1)[:, :64])


def test_quantize_model_swaps_and_reports():
    torch.manual_seed(12)
    m = Mixed()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(2, 1, 4, 4)
    before = m(x)
    rep = quantize_model(m, PrefixBundle(default=Identity()))
    assert rep.swapped == ["conv", "body.0", "body.2"]
    left = {n: why for n, _, why in rep.left}
    assert "padding_mode='zeros'" in left["circ"]
    assert "no QML layer" in left["bn"] and "no QML layer" in left["emb"]
    assert "subclass of Linear" in left["attn.out_proj"]
    assert isinstance(m.body[0], QLinear) and isinstance(m.conv, QConv2d)
    assert torch.equal(m(x), before)
    m(x).sum().backward()
    opt_params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(m.body[0].weight) in opt_params and m.body[0].weight.grad is not None
    with pytest.raises(ValueError, match="cannot quantize layer type 'BatchNorm2d'"):
        quantize_model(Mixed(), layer_types=(nn.BatchNorm2d,))
    with pytest.raises(TypeError, match="PrefixBundle"):
        quantize_model(Mixed(), "int8")


def test_int8_everywhere_trains():
    """A small regression problem learns with Int8 on every path (the layer is usable)."""
    torch.manual_seed(13)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    quantize_model(net, PrefixBundle(default=IntQuantizer(8)))
    x = torch.randn(256, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    first = None
    for _ in range(150):
        loss = nn.functional.mse_loss(net(x), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 * first


def test_codec_quantizer_on_layer_paths():
    """A packed codec on qw and qx: the layer computes on the codec's decoded tensors."""
    torch.manual_seed(14)
    qw = CodecQuantizer("int", bits=4, granularity="row", scheme="absmax")
    qx = CodecQuantizer("bf16")
    lin = QLinear(16, 8, bundle=PrefixBundle(qw=qw, qx=qx))
    x = torch.randn(5, 16)
    w_dec = smaq_rs.decompress(smaq_rs.compress(lin.weight.detach(), "int", bits=4,
                                                granularity="row", scheme="absmax",
                                                row_size=16))
    x_dec = smaq_rs.decompress(smaq_rs.compress(x, "bf16"))
    assert torch.equal(lin(x), nn.functional.linear(x_dec, w_dec, lin.bias))
    assert not torch.equal(w_dec, lin.weight)
