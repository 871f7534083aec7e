"""BN-aware SmaQ (smaq_rs.train.bn) against plain SmaQ and against torch's BatchNorm."""

import pytest

torch = pytest.importorskip("torch")

from smaq_rs.torch import _store  # noqa: E402
from smaq_rs.train.bn import BNAwareFeatureMaps, bn_roundtrip, channel_stats  # noqa: E402

P = dict(bits_main=6, bits_outlier=8, rounding="nearest")


def _map(seed=0):
    """A conv-like feature map whose channels have very different means and spreads."""
    g = torch.Generator().manual_seed(seed)
    n, c = 8, 16
    scale = torch.logspace(-2, 1, c)
    shift = torch.linspace(-5, 5, c)
    return torch.randn(n, c, 6, 6, generator=g) * scale.view(1, c, 1, 1) + shift.view(1, c, 1, 1)


def test_channel_stats_match_batchnorm():
    x = _map()
    m, v = channel_stats(x)
    bn = torch.nn.BatchNorm2d(x.shape[1], momentum=1.0)
    bn.train()
    bn(x)  # momentum 1: the running mean is the batch mean, running var the unbiased one
    torch.testing.assert_close(m, bn.running_mean)
    n = x.numel() / x.shape[1]
    torch.testing.assert_close(v * n / (n - 1), bn.running_var)


def test_exact_codec_gives_back_the_map():
    x = _map()
    m, v = channel_stats(x)
    y, nbytes = bn_roundtrip(x, m, v, codec="fp32")
    torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    assert nbytes >= x.numel() * 4


def test_bn_aware_beats_plain_smaq_on_unequal_channels():
    x = _map()
    m, v = channel_stats(x)
    y_bn, n_bn = bn_roundtrip(x, m, v, **P)
    s = _store.encode(x, "smaq", P)
    y_plain = _store.decode(s)

    def chan_err(y):  # per-channel error relative to each channel's spread
        d = (y - x).square().mean(dim=(0, 2, 3))
        return d / x.var(dim=(0, 2, 3))

    e_bn, e_plain = chan_err(y_bn), chan_err(y_plain)
    assert float(e_bn.max()) < float(e_plain.max()) / 10
    assert float(e_bn.median()) < float(e_plain.median())
    assert abs(n_bn - s.nbytes) <= 64  # same packed size, one SmaQ record each
    # the scalar variant is an affine map of the whole tensor: SmaQ's own per-tensor
    # statistics absorb it, so it codes like plain SmaQ (up to float rounding)
    y_sc, _ = bn_roundtrip(x, m, v, per_channel=False, **P)
    assert float(chan_err(y_sc).max()) > float(e_bn.max()) * 10


def test_hooks_code_batchnorm_inputs_with_straight_through_gradient():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                              torch.nn.ReLU())
    x = torch.randn(4, 3, 10, 10)
    w = torch.randn(4, 8, 8, 8)  # a loss BatchNorm does not make invariant
    ref = (net(x) * w).sum()
    ref.backward()
    g_ref = net[0].weight.grad.clone()
    net.zero_grad()
    coder = BNAwareFeatureMaps(net, P, stats="batch")
    seen = []
    net[1].register_forward_pre_hook(lambda m, i: seen.append(i[0]))  # after the coder's hook
    out = net(x)
    st = coder.pop_stats()
    assert st["dense"] == 4 * 8 * 8 * 8 * 4 and 0 < st["packed"] < st["dense"]
    assert 0 < st["rel_mse"] < 1e-3
    loss = (out * w).sum()
    assert not torch.equal(loss, ref)  # the values were coded
    loss.backward()
    # straight-through: d(coded)/d(conv output) is the identity, so the conv's weight gradient
    # is torch's conv2d_weight of the gradient BN + ReLU give at the coded map
    y = seen[0].detach().requires_grad_(True)
    bn = net[1]
    z = torch.nn.functional.batch_norm(y, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    (torch.relu(z) * w).sum().backward()
    expect = torch.nn.grad.conv2d_weight(x, net[0].weight.shape, y.grad)
    torch.testing.assert_close(net[0].weight.grad, expect, rtol=1e-4, atol=1e-4)
    assert float((net[0].weight.grad - g_ref).norm() / g_ref.norm()) > 0  # coded, not plain
    coder.remove()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
    assert coder.pop_stats()["dense"] == 0


def test_bad_input():
    x = _map()
    with pytest.raises(ValueError, match="statistics of shape"):
        bn_roundtrip(x, torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="channel dimension"):
        channel_stats(torch.zeros(5))
    with pytest.raises(ValueError, match="'running' or 'batch'"):
        BNAwareFeatureMaps(torch.nn.BatchNorm2d(2), P, stats="ema")
