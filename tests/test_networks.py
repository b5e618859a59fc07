"""Network shapes, sizes, gradients, determinism, input validation and the registry."""

import pytest
import torch

from ul3d.networks import (
    AULUNET_VARIANTS, ULTRALIGHTUNET_VARIANTS, AULUNet, UltraLightUNet, get_network, list_networks,
)

ODD = {2: (33, 47), 3: (33, 34, 35)}
VARIANTS = list(ULTRALIGHTUNET_VARIANTS)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("variant", VARIANTS)
def test_ultralightunet_variants_shapes(dims, variant):
    net = get_network("ultralightunet", variant, spatial_dims=dims, in_channels=2, out_channels=3).eval()
    with torch.no_grad():
        y = net(torch.randn(1, 2, *ODD[dims]))
    assert y.shape == (1, 3, *ODD[dims])
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize(
    "size", [{2: (32, 32), 3: (32, 32, 32)}, {2: (64, 40), 3: (40, 33, 48)}, {2: (97, 32), 3: (64, 32, 37)}]
)
@pytest.mark.parametrize("net_cls", [UltraLightUNet, AULUNet])
def test_any_size_at_least_32_keeps_input_size(dims, size, net_cls):
    channels = (4, 8, 16, 24, 32) if net_cls is UltraLightUNet else (5, 10, 15, 25, 35, 60)
    net = net_cls(dims, 1, 2, channels=channels).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 1, *size[dims])).shape == (2, 2, *size[dims])


@pytest.mark.parametrize("dims", [2, 3])
def test_aulunet_shapes(dims):
    net = get_network("aulunet", spatial_dims=dims, in_channels=1, out_channels=4).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 1, *ODD[dims])).shape == (2, 4, *ODD[dims])
    assert AULUNet(dims, 1, 1, sigmoid=True).eval()(torch.randn(1, 1, *ODD[dims])).min() >= 0


def _grad_check(net, x):
    net.train()
    out = net(x)
    outs = out if isinstance(out, list) else [out]
    sum(o.square().mean() for o in outs).backward()
    params = dict(net.named_parameters())
    missing = [n for n, p in params.items() if p.grad is None]
    assert not missing, f"no gradient reached: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in params.values())
    # a channel-attention MLP of hidden width 1-2 can start with a dead ReLU; everything else must move
    zero = [n for n, p in params.items() if not torch.any(p.grad != 0)]
    assert len(zero) <= 0.05 * len(params), f"zero gradients: {zero}"


@pytest.mark.parametrize(
    "dims,kwargs",
    [
        (2, dict()),
        (3, dict(channels=(4, 8, 16, 24, 32))),
        (2, dict(deep_supervision=True, encoder_attention=True, share_spatial_attention=False)),
        (3, dict(channels=(4, 8, 16, 24, 32), norm="instance", skip_gate="ag", block="irb")),
    ],
)
def test_gradients_reach_every_parameter_ultralightunet(dims, kwargs):
    size = (64, 64) if dims == 2 else (64, 64, 64)
    _grad_check(UltraLightUNet(dims, 2, 3, **kwargs), torch.randn(2, 2, *size))


@pytest.mark.parametrize("dims", [2, 3])
def test_gradients_reach_every_parameter_aulunet(dims):
    size = (64, 64) if dims == 2 else (64, 64, 64)
    _grad_check(AULUNet(dims, 1, 2), torch.randn(2, 1, *size))


@pytest.mark.parametrize("net", [UltraLightUNet(3, 1, 2, channels=(4, 8, 16, 24, 32)), AULUNet(3, 1, 2)])
def test_eval_mode_is_deterministic(net):
    net.train()
    for _ in range(2):  # move BN running statistics away from their initial values
        net(torch.randn(2, 1, 32, 32, 32))
    net.eval()
    x = torch.randn(1, 1, 40, 36, 33)
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
        assert torch.equal(net(x)[:1], net(torch.cat([x, torch.randn_like(x)]))[:1]) or torch.allclose(
            net(x)[:1], net(torch.cat([x, torch.randn_like(x)]))[:1], atol=1e-6
        )


def test_deep_supervision_outputs():
    net = UltraLightUNet(2, 1, 3, deep_supervision=True)
    x = torch.randn(2, 1, 64, 48)
    outs = net.train()(x)
    assert isinstance(outs, list) and len(outs) == 4
    assert all(o.shape == (2, 3, 64, 48) for o in outs)
    assert net.eval()(x).shape == (2, 3, 64, 48)
    assert len(UltraLightUNet(2, 1, 3).aux_heads) == 0  # off by default


@pytest.mark.parametrize("net_cls", [UltraLightUNet, AULUNet])
def test_wrong_input_raises_clear_value_error(net_cls):
    net = net_cls(3, 1, 2)
    with pytest.raises(ValueError, match=r"expected 1 input channel\(s\).*got 3"):
        net(torch.randn(1, 3, 32, 32, 32))
    with pytest.raises(ValueError, match=r"expected a 5-D input.*got a 4-D tensor"):
        net(torch.randn(1, 32, 32, 32))
    net2 = net_cls(2, 2, 2)
    with pytest.raises(ValueError, match=r"expected a 4-D input.*got a 5-D tensor"):
        net2(torch.randn(1, 2, 32, 32, 32))


def test_no_silent_channel_repetition():
    net = UltraLightUNet(3, 1, 2)
    assert net.encoder[0].block.expand.conv.in_channels == 1
    prostate = UltraLightUNet(3, 2, 3)
    assert prostate.encoder[0].block.expand.conv.in_channels == 2


def test_registry():
    assert list_networks() == {"ultralightunet": VARIANTS, "aulunet": list(AULUNET_VARIANTS)}
    net = get_network("ultralightunet", variant="m", spatial_dims=3, in_channels=1, out_channels=2)
    assert net.channels == ULTRALIGHTUNET_VARIANTS["M"]
    assert get_network("UltraLightUNet:T", spatial_dims=2).channels == ULTRALIGHTUNET_VARIANTS["T"]
    assert get_network("ultralightunet", spatial_dims=2).channels == ULTRALIGHTUNET_VARIANTS["base"]
    custom = get_network("ultralightunet", spatial_dims=2, channels=(8, 8, 8, 8, 8), kernels=(3,), norm="instance")
    assert custom.channels == (8, 8, 8, 8, 8)
    assert isinstance(get_network("aulunet", spatial_dims=2, in_channels=3, out_channels=1), AULUNet)
    with pytest.raises(ValueError, match="Unknown network"):
        get_network("vnet")
    with pytest.raises(ValueError, match="Unknown variant"):
        get_network("ultralightunet", variant="XL")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(spatial_dims=1), "spatial_dims"),
        (dict(block="resnet"), "block"),
        (dict(skip_gate="cbam"), "skip_gate"),
        (dict(reductions=(16, 16)), "reductions must have 5 entries"),
        (dict(deep_supervision=True, deep_supr_num=9), "deep_supr_num"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(spatial_dims=3, in_channels=1, out_channels=2) | kwargs
    with pytest.raises(ValueError, match=match):
        UltraLightUNet(**args)
