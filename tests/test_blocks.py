"""Each paper block against its equation, in 2D and 3D."""

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets.attentionunet import AttentionBlock
from torch import nn

from ul3d.networks.blocks import (
    AKF,
    CMFA,
    GAG,
    LSG,
    MKDC,
    MKIR,
    MKIRA,
    RGF,
    AttentionGate,
    ChannelAttention,
    ChannelShuffle,
    InvertedResidual,
    SpatialAttention,
)

SIZES = {2: (17, 22), 3: (9, 10, 11)}


def _x(dims, c, b=2):
    return torch.randn(b, c, *SIZES[dims])


def test_channel_shuffle_permutation():
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert ChannelShuffle(2)(x).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    assert ChannelShuffle(3)(x).flatten().tolist() == [0, 2, 4, 1, 3, 5]
    x3 = torch.randn(2, 8, 3, 4, 5)
    assert torch.equal(ChannelShuffle(1)(x3), x3)
    with pytest.raises(ValueError):
        ChannelShuffle(0)


@pytest.mark.parametrize("dims", [2, 3])
def test_mkdc_is_shuffled_sum_of_branches(dims):
    block = MKDC(dims, 8, kernels=(1, 3, 5), shuffle_groups=4).eval()
    x = _x(dims, 8)
    conv_type = nn.Conv2d if dims == 2 else nn.Conv3d
    expected = 0
    for branch, k in zip(block.branches, (1, 3, 5)):
        conv, bn = branch.conv, branch.adn.N
        assert isinstance(conv, conv_type) and conv.groups == 8 and conv.kernel_size == (k,) * dims and conv.bias is None
        expected = expected + F.relu6(bn(conv(x)))
    assert torch.allclose(block(x), ChannelShuffle(4)(expected), atol=1e-6)


def test_mkdc_sequential_mode_and_validation():
    block = MKDC(2, 4, kernels=(3, 5), parallel=False).eval()
    x = _x(2, 4)
    y1 = block.branches[0](x)
    y2 = block.branches[1](x + y1)
    assert torch.allclose(block(x), y1 + y2, atol=1e-6)
    with pytest.raises(ValueError, match="odd"):
        MKDC(2, 4, kernels=(2,))
    with pytest.raises(ValueError, match="shuffle_groups"):
        MKDC(2, 6, shuffle_groups=4)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("cin,cout", [(8, 8), (3, 16), (16, 12)])
def test_mkir_equation_1(dims, cin, cout):
    block = MKIR(dims, cin, cout).eval()
    x = _x(dims, cin)
    hidden = block.mkdc(block.expand(x))
    assert hidden.shape[1] == 2 * cin
    shortcut = x if cin == cout else block.shortcut(x)
    assert torch.allclose(block(x), block.project(hidden) + shortcut, atol=1e-5)
    assert block.mkdc.shuffle.groups == torch.gcd(torch.tensor(2 * cin), torch.tensor(cout)).item()
    # Eq. 1 literally: no shortcut
    plain = MKIR(dims, cin, cout, shortcut="none").eval()
    plain.load_state_dict(block.state_dict(), strict=False)
    assert torch.allclose(plain(x), plain.project(plain.mkdc(plain.expand(x))), atol=1e-6)


def test_irb_is_single_kernel_without_shuffle():
    irb = InvertedResidual(2, 16, 32)
    assert irb.mkdc.kernels == (3,) and irb.mkdc.shuffle.groups == 1


@pytest.mark.parametrize("dims", [2, 3])
def test_channel_attention_equation_3(dims):
    ca = ChannelAttention(dims, 32, reduction=8).eval()
    x = _x(dims, 32)
    axes = tuple(range(2, 2 + dims))
    mlp = lambda v: ca.fc2(F.relu(ca.fc1(v)))
    avg = x.mean(dim=axes, keepdim=True)
    mx = x.amax(dim=axes, keepdim=True)
    assert torch.allclose(ca(x), torch.sigmoid(mlp(avg) + mlp(mx)) * x, atol=1e-6)
    assert ca.fc1.out_channels == 4
    assert ChannelAttention(dims, 4, reduction=16).fc1.out_channels == 1  # r falls back to C


@pytest.mark.parametrize("dims", [2, 3])
def test_spatial_attention_equation_4(dims):
    sa = SpatialAttention(dims, 7).eval()
    x = _x(dims, 6)
    desc = torch.cat([x.amax(1, keepdim=True), x.mean(1, keepdim=True)], 1)
    assert sa.conv.kernel_size == (7,) * dims
    assert torch.allclose(sa(x), torch.sigmoid(sa.conv(desc)) * x, atol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_cmfa_and_mkira_equation_5(dims):
    shared = SpatialAttention(dims)
    mkira = MKIRA(dims, 16, 8, reduction=4, spatial_attention=shared).eval()
    assert mkira.cmfa.spatial is shared
    x = _x(dims, 16)
    cmfa = mkira.cmfa
    assert torch.allclose(cmfa(x), cmfa.spatial(cmfa.channel(x)), atol=1e-6)
    assert torch.allclose(mkira(x), mkira.mkir(cmfa(x)), atol=1e-6)
    assert isinstance(CMFA(dims, 16).spatial, SpatialAttention)


@pytest.mark.parametrize("dims", [2, 3])
def test_gag_equation_6(dims):
    gag = GAG(dims, 16, 16).eval()
    assert gag.gate_conv.conv.groups == 8 and gag.gate_conv.conv.out_channels == 8
    assert gag.gate_conv.conv.kernel_size == (3,) * dims
    g, x = _x(dims, 16), _x(dims, 16)
    a = F.relu(gag.gate_conv(g) + gag.skip_conv(x))
    psi = torch.sigmoid(gag.psi.adn.N(gag.psi.conv(a)))
    assert torch.allclose(gag(g, x), x * psi, atol=1e-6)
    with pytest.raises(ValueError, match="groups"):
        GAG(dims, 16, 16, groups=3)


@pytest.mark.parametrize("dims", [2, 3])
def test_attention_gate_equals_monai_attention_block(dims):
    """Table 8's AG is Oktay's gate: same function as MONAI's AttentionBlock with the same weights."""
    ag = AttentionGate(dims, 12, 12).eval()
    ref = AttentionBlock(dims, f_int=6, f_g=12, f_l=12).eval()
    for mine, theirs in [(ag.gate_conv, ref.W_g), (ag.skip_conv, ref.W_x), (ag.psi, ref.psi)]:
        theirs[0].conv.load_state_dict(mine.conv.state_dict())
        theirs[1].load_state_dict(mine.adn.N.state_dict())
    for bn in list(ag.modules()) + list(ref.modules()):  # non-trivial running statistics
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.running_mean.fill_(0.1)
            bn.running_var.fill_(2.0)
    g, x = _x(dims, 12), _x(dims, 12)
    assert torch.allclose(ag(g, x), ref(g, x), atol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_akf_equations_1_2(dims):
    akf = AKF(dims, 6).eval()
    x = _x(dims, 6)
    axes = tuple(range(2, 2 + dims))
    alpha = torch.sigmoid(akf.gate(x.mean(dim=axes, keepdim=True)))
    assert akf.local.dilation == (1,) * dims and akf.dilated.dilation == (2,) * dims
    expected = akf.fuse(alpha * akf.local(x) + (1 - alpha) * akf.dilated(x))
    assert torch.allclose(akf(x), expected, atol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_rgf_equations_3_4(dims):
    rgf = RGF(dims, 6).eval()
    x = _x(dims, 6)
    g = torch.tanh(rgf.conv(x.mean(dim=tuple(range(2, 2 + dims)), keepdim=True)))
    assert torch.allclose(rgf(x), x + x * g, atol=1e-6)


@pytest.mark.parametrize("dims", [2, 3])
def test_lsg_equations_5_to_7(dims):
    lsg = LSG(dims, 6, 6).eval()
    d, e = _x(dims, 6), _x(dims, 6)
    beta = torch.sigmoid(lsg.gate.adn.N(lsg.gate.conv(torch.cat([d, e], 1))))
    assert torch.allclose(lsg(d, e), d + beta * e, atol=1e-6)
    proj = LSG(dims, 6, 10).eval()  # Eq. 5: 1x1 projection when widths differ
    assert proj(d, _x(dims, 10)).shape == d.shape


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_norm_is_selectable(norm):
    block = MKIR(3, 4, 8, norm=norm)
    kinds = {type(m).__name__ for m in block.modules()}
    assert ("BatchNorm3d" in kinds) == (norm == "batch")
    assert ("InstanceNorm3d" in kinds) == (norm == "instance")


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_global_max_pool_equals_adaptive_max_pool(dims):
    from ul3d.networks.blocks.attention import GlobalMaxPool

    x = torch.randn(2, 5, *([7] * dims), requires_grad=True)
    ref = getattr(torch.nn, f"AdaptiveMaxPool{dims}d")(1)(x)
    out = GlobalMaxPool()(x)
    assert out.shape == ref.shape and torch.equal(out, ref)
    g_ref, = torch.autograd.grad(ref.sum(), x)
    g, = torch.autograd.grad(out.sum(), x)
    assert torch.equal(g, g_ref)  # no ties in random data: the gradient goes to the same voxel
