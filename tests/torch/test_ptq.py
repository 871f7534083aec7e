"""Post-training quantization (smaq_rs.torch.ptq) on a trained digits CNN and small modules.

- int8 static PTQ of the trained digits CNN (examples/train_digits.py's model and split) keeps
  test accuracy within 1 point of fp32, with the stored weights >= 3.9x smaller in real bytes.
- The stored weights are the int codec's packed bytes (uint8 buffers in state_dict), identical to
  smaq_rs.compress of the weight per output channel; they survive torch.save /
  torch.load(weights_only=True) and smaq_rs.save / load, and a fresh quantized model loads them.
- Each layer computes its op on the decoded weight with a QDQ input: checked against torch's own
  fake quantization with the observed (static) or the input's own (dynamic) range.
- Observers: minmax = the extremes seen; percentile = torch.quantile of the values; mse picks a
  range whose QDQ error is no larger than min-max's.
- Bad input refused; unsupported layers reported and left in float.
"""

import importlib.util
import io

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import smaq_rs
from helpers import EXAMPLES
from smaq_rs.torch import ptq

_spec = importlib.util.spec_from_file_location("train_digits", EXAMPLES / "train_digits.py")
td = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(td)


def decoded(buf, shape):
    """The weight a packed uint8 buffer holds, decoded by smaq_rs.decompress."""
    return torch.from_numpy(smaq_rs.decompress(bytes(buf.numpy()))).reshape(shape)


def fake_quant(x, lo, hi, bits=8):
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (2 ** bits - 1)
    zp = round(-lo / scale)
    return torch.fake_quantize_per_tensor_affine(x, scale, int(zp), 0, 2 ** bits - 1)


@pytest.fixture(scope="module")
def trained():
    pytest.importorskip("sklearn")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x_tr, y_tr, x_te, y_te = td.load_digits_tensors(0)
        torch.manual_seed(0)
        model = td.DigitsCNN()
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(1)
        for _ in range(12):
            perm = torch.randperm(len(x_tr), generator=gen)
            for i in range(0, len(perm), 128):
                idx = perm[i:i + 128]
                loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        yield model, (x_tr, y_tr, x_te, y_te)
    finally:
        torch.set_num_threads(threads)


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def calib_batches(x_tr, n=4, size=128):
    return [x_tr[i * size:(i + 1) * size] for i in range(n)]


def test_int8_static_within_one_point_and_3_9x_smaller(trained):
    model, (x_tr, y_tr, x_te, y_te) = trained
    fp32 = accuracy(model, x_te, y_te)
    q = ptq.quantize(model, mode="static", calib=calib_batches(x_tr), bits=8)
    acc = accuracy(q, x_te, y_te)
    assert fp32 > 0.9
    assert acc >= fp32 - 0.01, (fp32, acc)
    rows = ptq.report(q)
    assert [r.name for r in rows] == ["conv1", "conv2", "fc1", "fc2"]
    assert all(r.bits == 8 and r.rel_rms_error < 0.02 and r.act_range is not None for r in rows)
    sd = q.state_dict()
    stored = sum(sd[f"{r.name}.weight_packed"].numel() for r in rows)
    dense = sum(p.numel() * 4 for n, p in model.named_parameters() if n.endswith("weight"))
    assert stored == sum(r.stored_nbytes for r in rows)
    assert dense / stored >= 3.9, dense / stored
    assert not any(k.endswith(".weight") for k in sd)  # no dense weight kept
    # the original model is untouched
    assert isinstance(model.fc1, nn.Linear)


def test_stored_bytes_are_the_codec_bytes(trained):
    model, _ = trained
    for bits in (8, 4):
        q = ptq.quantize(model, mode="dynamic", bits=bits)
        w = model.conv2.weight.detach()
        ref = smaq_rs.compress(w.reshape(w.shape[0], -1).contiguous(), "int", bits=bits,
                               scheme="absmax", granularity="row", row_size=w[0].numel())
        assert bytes(q.conv2.weight_packed.numpy()) == ref.to_bytes()
        r = {row.name: row for row in ptq.report(q)}["conv2"]
        dec = smaq_rs.decompress(ref).reshape(w.shape)
        assert r.max_abs_error == pytest.approx((dec - w).abs().max().item(), rel=1e-6)
    per_tensor = ptq.quantize(model, bits=8, per="tensor")
    assert per_tensor.fc1.stored_nbytes < ptq.quantize(model, bits=8).fc1.stored_nbytes


def test_layers_compute_on_decoded_weight_with_qdq_input(trained):
    model, (x_tr, _, x_te, _) = trained
    calib = calib_batches(x_tr)
    q = ptq.quantize(model, mode="static", calib=calib)
    # conv1's observed range is the min / max of the calibration inputs (the later layers see
    # the outputs of layers whose weights are already quantized)
    allx = torch.cat(calib)
    assert q.conv1.act_range.tolist() == [allx.min().item(), allx.max().item()]
    lo, hi = q.fc2.act_range.tolist()
    assert lo == 0.0 and hi > 0  # fc2 reads a ReLU output
    x = torch.randn(5, 128)
    w = decoded(q.fc2.weight_packed, (10, 128))
    expect = F.linear(fake_quant(x, lo, hi), w, q.fc2.bias)
    assert torch.equal(q.fc2(x), expect)
    d = ptq.quantize(model, mode="dynamic")
    expect = F.linear(fake_quant(x, x.min().item(), x.max().item()), w, d.fc2.bias)
    assert torch.equal(d.fc2(x), expect)
    xi = x_te[:3]
    wc = decoded(d.conv1.weight_packed, (16, 1, 3, 3))
    expect = F.conv2d(fake_quant(xi, xi.min().item(), xi.max().item()), wc, d.conv1.bias,
                      padding=1)
    assert torch.equal(d.conv1(xi), expect)


def test_observers():
    torch.manual_seed(3)
    lin = nn.Sequential(nn.Linear(64, 8))
    data = [torch.randn(256, 64) for _ in range(3)]
    data[1][0, 0] = 40.0  # an outlier
    allv = torch.cat(data).flatten()
    mm = ptq.quantize(lin, mode="static", calib=data, observer="minmax")
    assert mm[0].act_range.tolist() == pytest.approx([allv.min().item(), 40.0])
    pc = ptq.quantize(lin, mode="static", calib=data, observer="percentile", percentile=99.9)
    expect = torch.quantile(allv.double(), torch.tensor([0.001, 0.999], dtype=torch.float64))
    assert pc[0].act_range.tolist() == pytest.approx(expect.tolist(), rel=1e-5)
    ema = ptq.quantize(lin, mode="static", calib=data, observer="ema")
    lo, hi = data[0].min().item(), data[0].max().item()
    for b in data[1:]:
        lo, hi = lo + 0.01 * (b.min().item() - lo), hi + 0.01 * (b.max().item() - hi)
    assert ema[0].act_range.tolist() == pytest.approx([lo, hi], rel=1e-6)
    ms = ptq.quantize(lin, mode="static", calib=data, observer="mse")
    lo, hi = ms[0].act_range.tolist()
    assert hi < 40.0
    err = lambda a, b: (fake_quant(allv, a, b) - allv).pow(2).mean().item()  # noqa: E731
    assert err(lo, hi) <= err(allv.min().item(), 40.0)


def test_state_dict_survives_torch_and_smaq_save(trained, tmp_path):
    model, (x_tr, _, x_te, _) = trained
    q = ptq.quantize(model, mode="static", calib=calib_batches(x_tr), bits=4)
    sd = q.state_dict()
    assert sd["fc1.weight_packed"].dtype == torch.uint8
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=True)
    smaq_rs.save(sd, tmp_path / "q.smaq")
    back2 = smaq_rs.load(tmp_path / "q.smaq")
    for k, v in sd.items():
        assert torch.equal(back[k], v) and torch.equal(back2[k], v), k
    # a fresh quantized model (other weights, same structure) takes the bytes and ranges
    torch.manual_seed(99)
    fresh = ptq.quantize(td.DigitsCNN(), mode="static", calib=calib_batches(x_tr), bits=4)
    fresh.load_state_dict(back2)
    with torch.no_grad():
        assert torch.equal(fresh(x_te[:50]), q(x_te[:50]))


def test_bad_input(trained):
    model, (x_tr, _, _, _) = trained
    with pytest.raises(ValueError, match="needs a calibration loader"):
        ptq.quantize(model, mode="static")
    with pytest.raises(ValueError, match="'dynamic' or 'static'"):
        ptq.quantize(model, mode="qat")
    with pytest.raises(ValueError, match="observer must be one of minmax, ema, percentile, mse"):
        ptq.quantize(model, mode="static", calib=[x_tr[:8]], observer="kl")
    with pytest.raises(ValueError, match="per must be 'channel' or 'tensor'"):
        ptq.quantize(model, per="row")
    with pytest.raises(ValueError, match="bits must be an int in 2..16"):
        ptq.quantize(model, bits=1)
    with pytest.raises(smaq_rs.CodecError, match="unknown weight_codec"):
        ptq.quantize(model, weight_codec="int9")
    with pytest.raises(ValueError, match="no batch"):
        ptq.quantize(model, mode="static", calib=[])
    with pytest.raises(TypeError, match="calibration batch"):
        ptq.quantize(model, mode="static", calib=["text"])
    with pytest.raises(TypeError, match="nn.Module"):
        ptq.quantize("model")
    q = ptq.quantize(model, bits=8)
    sd = q.state_dict()
    sd["fc1.weight_packed"] = sd["fc1.weight_packed"][:-3].clone()
    with pytest.raises(RuntimeError, match="not a valid packed weight"):
        q.load_state_dict(sd)
    sd = q.state_dict()
    sd["fc1.weight_packed"] = q.fc2.weight_packed.clone()
    with pytest.raises(RuntimeError, match="holds 1280 values, the layer needs 65536"):
        q.load_state_dict(sd)


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.norm = nn.LayerNorm(8)
        self.up = nn.ConvTranspose1d(8, 8, 3)
        self.conv = nn.Conv1d(8, 8, 3, padding=1, padding_mode="reflect")
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, ids):
        h = self.norm(self.emb(ids)).transpose(1, 2)
        return self.head(self.conv(h).transpose(1, 2))


def test_unsupported_layers_reported_and_left_float():
    torch.manual_seed(4)
    m = Odd()
    ids = torch.randint(0, 16, (2, 12))
    q = ptq.quantize(m, mode="static", calib=[ids])
    rows = {r.name: r for r in ptq.report(q)}
    assert rows["conv"].bits == 8 and isinstance(q.conv, ptq.PTQConv)
    assert "tied to emb" in rows["head"].reason and isinstance(q.head, nn.Linear)
    assert "no PTQ layer" in rows["emb"].reason and "no PTQ layer" in rows["norm"].reason
    assert "transposed" in rows["up"].reason
    # reflect padding is honoured: the quantized conv matches a float conv on the decoded weight
    x = torch.randn(2, 8, 12)
    w = decoded(q.conv.weight_packed, (8, 8, 3))
    lo, hi = q.conv.act_range.tolist()
    ref = F.conv1d(F.pad(fake_quant(x, lo, hi), (1, 1), mode="reflect"), w, q.conv.bias)
    assert torch.equal(q.conv(x), ref)
    assert "tied" in ptq.format_report(ptq.report(q))


def test_transformers_conv1d():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(5)
    m = nn.Sequential(Conv1D(12, 6))  # nf=12 outputs, nx=6 inputs: weight is 6 x 12
    x = torch.randn(3, 4, 6)
    q = ptq.quantize(m, mode="dynamic")
    assert isinstance(q[0], ptq.PTQLinear) and q[0].transposed
    ref = smaq_rs.compress(m[0].weight.detach().t().contiguous(), "int", bits=8, scheme="absmax",
                           granularity="row", row_size=6)
    assert bytes(q[0].weight_packed.numpy()) == ref.to_bytes()
    w = smaq_rs.decompress(ref)  # (out, in)
    expect = F.linear(fake_quant(x, x.min().item(), x.max().item()), w, m[0].bias)
    assert torch.equal(q(x), expect)
    torch.testing.assert_close(q(x), m(x), atol=0.05, rtol=0.05)


def test_gpt2_dynamic_ptq_reports_the_tied_head():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(6)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 64, (2, 32))
    q = ptq.quantize(model, mode="dynamic")
    rows = {r.name: r for r in ptq.report(q)}
    conv1d = [n for n, r in rows.items() if not r.reason]
    assert sorted(conv1d) == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                              "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"]
    assert "tied to transformer.wte" in rows["lm_head"].reason
    with torch.no_grad():
        a = model(input_ids=ids, labels=ids).loss.item()
        b = q(input_ids=ids, labels=ids).loss.item()
    assert abs(a - b) < 0.01 * a
    assert q.lm_head.weight is q.transformer.wte.weight  # the tie is kept


def test_other_weight_codec():
    torch.manual_seed(7)
    m = nn.Sequential(nn.Linear(32, 16))
    q = ptq.quantize(m, weight_codec="fp8", weight_params={"format": "e5m2"})
    ref = smaq_rs.compress(m[0].weight.detach().contiguous(), "fp8", format="e5m2")
    assert bytes(q[0].weight_packed.numpy()) == ref.to_bytes()
    row = ptq.report(q)[0]
    assert row.bits is None and row.codec == "fp8" and row.stored_nbytes == ref.nbytes
