"""MemoryMeter figures from real buffers; simulation mode (Compressor, wrap_model)."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import smaq_rs
import smaq_rs.torch as st


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 4 * 4, 10))


def test_meter_reports_real_buffers_and_calls_back():
    model = small_cnn()
    opt = st.Adam(model.parameters(), min_numel=1024)
    acts = st.compressed_activations(model=model, rounding="nearest")
    seen = []
    meter = st.MemoryMeter(model, opt, activations=acts, callback=seen.append)
    x = torch.randn(32, 1, 8, 8)
    y = torch.arange(32) % 10
    for _ in range(3):
        with acts:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        meter.step()
        opt.zero_grad(set_to_none=True)
    assert len(seen) == 3 and seen[-1] is meter.records[-1]
    r = meter.records[-1]
    nparam = sum(p.numel() for p in model.parameters())
    assert r["weights"]["held"] == r["weights"]["dense"] == 4 * nparam
    assert r["gradients"]["held"] == 4 * nparam  # grads exist at step() time
    a = r["activations"]
    assert a["dense"] > a["held"] > 0 and a["ratio"] == pytest.approx(a["dense"] / a["held"])
    assert r["peak_activation_store"] == a["held"]
    d, h = st.state_nbytes(opt)
    assert r["optimizer"] == {"dense": d, "held": h, "ratio": d / h}
    assert r["rss_peak"] >= r["rss"] > 0
    out = meter.as_dict()
    assert out["last"] is meter.records[-1] and len(out["steps"]) == 3
    table = meter.table()
    for tag in ("weights", "gradients", "activations", "optimizer", "rss_peak"):
        assert tag in table


def test_meter_with_a_plain_torch_optimizer():
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    meter = st.MemoryMeter(model, opt)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    opt.step()
    r = meter.step()
    nparam = sum(p.numel() for p in model.parameters())
    assert r["optimizer"]["held"] == r["optimizer"]["dense"] == 4 * nparam
    assert "activations" not in r


def test_compressor_simulates_both_directions_with_switches():
    torch.manual_seed(0)
    x = torch.randn(4096, requires_grad=True)
    g = torch.randn(4096)
    y = st.Compressor.apply(x, "smaq", {"rounding": "nearest"}, True, True, None)
    assert not torch.equal(y, x) and ((y - x).norm() / x.norm()) < 0.1
    y.backward(g)
    assert not torch.equal(x.grad, g) and ((x.grad - g).norm() / g.norm()) < 0.1
    x.grad = None
    y = st.Compressor.apply(x, "smaq", {}, False, False, None)
    assert torch.equal(y, x)
    y.backward(g)
    assert torch.equal(x.grad, g)


def test_wrap_model_inserts_after_chosen_layers_and_logs_sizes():
    model = small_cnn()
    x = torch.randn(16, 1, 8, 8)
    ref = model(x)
    meter = st.MemoryMeter()
    st.wrap_model(model, layer_types=["conv"], meter=meter, rounding="nearest")
    assert len(model._smaq_handles) == 2
    out = model(x)
    assert not torch.equal(out, ref) and ((out - ref).norm() / ref.norm()) < 0.2
    out.sum().backward()
    r = meter.step()
    for tag in ("feature_maps", "gradient_maps"):
        assert r[tag]["dense"] > 4 * r[tag]["held"] > 0
    st.unwrap_model(model)
    assert torch.equal(model(x), ref)
    st.wrap_model(model, layer_types=nn.Linear, forward=False, backward=False)
    assert torch.equal(model(x), ref)
    with pytest.raises(ValueError):
        st.wrap_model(model, layer_types="convolution")
    with pytest.raises(smaq_rs.CodecError):
        st.wrap_model(model, codec="nope")
