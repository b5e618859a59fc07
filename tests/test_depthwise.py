"""ul3d's Triton depth-wise convolution (issue 7) computes F.conv{1,2,3}d's function, alone, inside MKDC and in a
whole network. Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from ul3d.networks import get_network
from ul3d.networks.blocks.multikernel import MKDC, MKIR
from ul3d.networks.depthwise import depthwise_conv, triton_available, unsupported_conv
from ul3d.networks.fast import accelerate

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_available(DEVICE), reason="Triton is not installed")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def no_tf32():
    """fp32 references without TF32 (cuDNN's default on CUDA rounds conv inputs to 10-bit mantissas)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = False, False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _reference(x, w, b):
    dims = x.dim() - 2
    return (F.conv1d, F.conv2d, F.conv3d)[dims - 1](x, w, b, 1, tuple(k // 2 for k in w.shape[2:]), 1, x.shape[1])


@pytest.mark.parametrize("shape,kernel", [
    ((2, 3, 5, 7, 9), (3, 3, 3)),
    ((1, 2, 6, 5, 11), (5, 5, 5)),
    ((1, 2, 3, 4, 37), (1, 3, 5)),  # anisotropic kernel; W spans two tiles
    ((2, 3, 9, 10), (3, 3)),
    ((2, 2, 13), (5,)),
    ((1, 2, 4, 6, 40), (3, 5, 7)),  # the widest kernel of the Triton weight gradient
    ((2, 4, 3, 3, 3), (1, 1, 1)),  # 1×1×1: a per-channel scale
])
@pytest.mark.parametrize("bias", [False, True])
def test_depthwise_conv_matches_conv_forward_and_gradients(shape, kernel, bias):
    x = torch.randn(*shape, device=DEVICE, requires_grad=True)
    w = torch.randn(shape[1], 1, *kernel, device=DEVICE, requires_grad=True)
    b = torch.randn(shape[1], device=DEVICE, requires_grad=True) if bias else None
    inputs = (x, w) + ((b,) if bias else ())
    y, ref = depthwise_conv(x, w, b), _reference(x, w, b)
    assert triton_available(x.device)
    assert ref.abs().max() > 0.1 and (y - ref).abs().max() <= 1e-4
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref, inputs, g)):
        assert (got - want).abs().max() <= 1e-4 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,kernel", [
    ((2, 3, 7, 9, 20), (3, 3, 3)),  # W: one full and one partial block of 16
    ((1, 2, 5, 6, 37), (5, 5, 5)),
    ((2, 2, 1, 11, 19), (1, 3, 5)),  # a 2D conv as the kernels see it
    ((1, 2, 6, 5, 8), (3, 1, 7)),  # one kernel row: KH = 1
])
def test_weight_gradient_kernel_matches_float64(dtype, shape, kernel):
    """The weight-gradient kernel on bfloat16 and float32 inputs (float32 sums): within 1e-4 (relative) of float64 on
    the same inputs."""
    from ul3d.networks import depthwise as dwmod

    x = torch.randn(*shape, device=DEVICE).to(dtype)
    g = torch.randn(*shape, device=DEVICE).to(dtype)
    want = torch.nn.grad.conv3d_weight(x.double(), (shape[1], 1) + kernel, g.double(), groups=shape[1],
                                       padding=tuple(k // 2 for k in kernel)).reshape(shape[1], *kernel)
    got = dwmod._launch_weight_grad(x, g, kernel)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got.double() - want).abs().max() <= 1e-4 * want.abs().max()


def test_depthwise_conv_rejects_what_it_does_not_compute():
    with pytest.raises(ValueError, match="depth-wise"):
        depthwise_conv(torch.randn(1, 3, 4, 4), torch.randn(3, 1, 2, 2))  # even kernel
    with pytest.raises(ValueError, match="depth-wise"):
        depthwise_conv(torch.randn(1, 3, 4, 4), torch.randn(3, 2, 3, 3))  # not depth-wise


def test_float64_uses_pytorch_conv():
    x = torch.randn(1, 2, 4, 5, 6, dtype=torch.float64, device=DEVICE)
    w = torch.randn(2, 1, 3, 3, 3, dtype=torch.float64, device=DEVICE)
    assert torch.equal(depthwise_conv(x, w), _reference(x, w, None))


def test_custom_operator_passes_torch_library_opcheck():
    """PyTorch's own checks of a custom operator: fake (meta) kernel, autograd registration, schema."""
    x = torch.randn(1, 2, 3, 4, 5, device=DEVICE, requires_grad=True)
    w = torch.randn(2, 3, 3, 3, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.ul3d.depthwise_conv.default, (x, w))


def test_unsupported_conv_reasons():
    conv = torch.nn.Conv3d
    assert unsupported_conv(conv(4, 4, 3, padding=1, groups=4, bias=False)) is None
    assert "depth-wise" in unsupported_conv(conv(4, 4, 3, padding=1, groups=2))
    assert "strided" in unsupported_conv(conv(4, 4, 3, stride=2, padding=1, groups=4))
    assert "same" in unsupported_conv(conv(4, 4, 3, padding=0, groups=4))
    assert "padding mode" in unsupported_conv(conv(4, 4, 3, padding=1, groups=4, padding_mode="reflect"))


def _grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


def _same_step(ref, fast, x):
    """One forward and backward of both modules on ``x``: output, input gradient and every parameter gradient agree
    to 1e-4 (relative to the gradient's size when that is above 1)."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = ref(x1), fast(x2)
    assert (a - b).abs().max() <= 1e-4
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g)
    assert (x1.grad - x2.grad).abs().max() <= 1e-4
    ga, gb = _grads(ref), _grads(fast)
    worst = {name: ((ga[name] - gb[name]).abs().max() / max(1.0, ga[name].abs().max().item())).item() for name in ga}
    assert max(worst.values()) <= 1e-4, {name: err for name, err in worst.items() if err > 1e-4}  # every one named


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("train,bn_kernels", [(True, False), (True, True), (False, False)])
def test_triton_mkdc_is_the_same_function(dims, train, bn_kernels, no_tf32, monkeypatch):
    """MKIR (expand -> MKDC(1, 3, 5) -> project, with shortcut): output, gradients and BatchNorm running statistics;
    with ``BATCHNORM_KERNELS`` the training BatchNorms of the MKDC branches as ul3d's kernels."""
    from ul3d.networks import depthwise as dwmod

    monkeypatch.setattr(dwmod, "BATCHNORM_KERNELS", bn_kernels)
    calls, real = [], dwmod.batchnorm_clamp
    monkeypatch.setattr(dwmod, "batchnorm_clamp", lambda *a: calls.append(1) or real(*a))
    ref = MKIR(dims, 2, 3, kernels=(1, 3, 5)).to(DEVICE)
    fast = accelerate(copy.deepcopy(ref), triton=True)
    assert fast.mkdc.triton and fast.mkdc.triton_unsupported() is None
    for _ in range(2):  # the running statistics evolve identically
        ref.train(train)
        fast.train(train)
        # (one 3D sample: Triton's interpreter without CUDA is slow, and 125 voxels give BatchNorm its statistics)
        _same_step(ref, fast, torch.randn((2 if dims == 2 else 1, 2) + (5,) * dims, device=DEVICE) * 2 + 0.5)
        ref.zero_grad()
        fast.zero_grad()
    for (name, p), q in zip(ref.named_buffers(), fast.buffers()):
        assert torch.allclose(p.float(), q.float(), atol=1e-5), name
    assert ref.state_dict().keys() == fast.state_dict().keys()
    assert len(calls) == (6 if bn_kernels and train else 0)  # the three branches' BatchNorms, two steps


def test_triton_mkdc_falls_back_where_it_does_not_apply():
    block = accelerate(MKDC(3, 4, stride=2), triton=True, fused_mkdc=False)
    assert block.triton and "strided" in block.triton_unsupported()
    x = torch.randn(1, 4, 6, 6, 6)
    torch.testing.assert_close(block(x), block.forward_plain(x))


@pytest.mark.parametrize("dims,channels,groups,train", [(3, 8, 4, True), (2, 6, 3, True), (2, 6, 3, False)])
def test_triton_gag_is_the_same_function(dims, channels, groups, train, no_tf32):
    """GAG with its grouped convs (2 and 4 channels per group) as Triton depth-wise convs plus channel sums, with
    BatchNorm in training and eval mode: output, input and parameter gradients and running statistics."""
    from ul3d.networks.blocks import GAG

    torch.manual_seed(0)
    ref = GAG(dims, channels, channels, inter_channels=groups, groups=groups).to(DEVICE)
    fast = accelerate(copy.deepcopy(ref), triton=True)
    assert fast.triton
    for _ in range(2):
        ref.train(train)
        fast.train(train)
        g, x = (torch.randn((2 if dims == 2 else 1, channels) + (5,) * dims, device=DEVICE) * 2 + 0.5 for _ in range(2))
        (g1, x1), (g2, x2) = [(g.clone().requires_grad_(), x.clone().requires_grad_()) for _ in range(2)]
        a, b = ref(g1, x1), fast(g2, x2)
        assert fast._depthwise_path(g2, x2)
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        a.square().sum().backward()
        b.square().sum().backward()
        torch.testing.assert_close(g2.grad, g1.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-4)
        # relative to the largest gradient: the conv biases before a training-mode BatchNorm have a zero gradient in
        # exact arithmetic, and fp32 leaves them rounding noise of the sums they pass through
        scale = max(1.0, max(p.grad.abs().max().item() for p in ref.parameters()))
        for (name, p), q in zip(ref.named_parameters(), fast.parameters()):
            assert (q.grad - p.grad).abs().max() <= 1e-5 * scale, name
        ref.zero_grad()
        fast.zero_grad()
    for (name, p), q in zip(ref.named_buffers(), fast.buffers()):
        torch.testing.assert_close(q.float(), p.float(), rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("train_triton", [False, True])
def test_triton_spatial_attention_is_the_same_function(dims, train_triton, no_tf32, monkeypatch):
    """The spatial attention's 2 -> 1, 7^d conv as a depth-wise conv plus a channel sum: output and gradients; in
    training PyTorch's depth-wise conv, or ul3d's kernels with ``SPATIAL_TRITON_TRAINING``."""
    from ul3d.networks.blocks import SpatialAttention
    from ul3d.networks.blocks import attention as attention_module

    monkeypatch.setattr(attention_module, "SPATIAL_TRITON_TRAINING", train_triton)

    ref = SpatialAttention(dims).to(DEVICE)
    fast = accelerate(copy.deepcopy(ref), triton=True)
    assert fast.depthwise
    from ul3d.networks.blocks import attention

    calls, conv = [], attention.one_per_group_conv
    monkeypatch.setattr(attention, "one_per_group_conv", lambda *a, **k: calls.append(1) or conv(*a, **k))
    x = torch.randn((2, 4) + (7,) * dims, device=DEVICE)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    from ul3d.networks import depthwise

    ops, op = [], depthwise._depthwise_op
    monkeypatch.setattr(depthwise, "_depthwise_op", lambda *a: ops.append(1) or op(*a))
    a, b = ref(x1), fast(x2)
    assert calls == [1] and len(ops) == int(train_triton)
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    a.square().sum().backward()
    b.square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast.conv.weight.grad, ref.conv.weight.grad, rtol=1e-4, atol=1e-4)
    # autograd off: ul3d's forward kernel (its depth taps a loop for 7³), the same function
    launched, launch = [], depthwise._launch_forward
    monkeypatch.setattr(depthwise, "_launch_forward", lambda *a, **k: launched.append(1) or launch(*a, **k))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-4, atol=1e-5)
    assert launched == [1]


def test_one_per_group_conv_refuses_what_it_does_not_compute():
    from ul3d.networks.blocks.attention import one_per_group_unsupported

    conv3d = torch.nn.Conv3d
    assert one_per_group_unsupported(conv3d(8, 4, 3, padding=1, groups=4)) is None
    assert one_per_group_unsupported(conv3d(2, 1, 7, padding=3)) is None
    assert "one output" in one_per_group_unsupported(conv3d(8, 8, 3, padding=1, groups=4))
    assert "strided" in one_per_group_unsupported(conv3d(8, 4, 3, padding=1, groups=4, stride=2))
    assert "same" in one_per_group_unsupported(conv3d(8, 4, 3, padding=0, groups=4))


@cuda_only  # Triton's interpreter takes minutes for a whole network on CPU; the blocks are compared above
@pytest.mark.parametrize("variant", ["T", "base"])
def test_triton_network_is_the_same_function(variant):
    """UltraLightUNet3D with BatchNorm statistics (eval mode), fp32 without TF32: forward, input gradient and every
    parameter gradient. (In training mode the 1-voxel bottleneck's batch statistics amplify fp32 rounding to ~1e-4 even
    between two plain runs, see tests/test_fast.py; training is compared per block above.)"""
    torch.manual_seed(0)
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = False, False
    net = get_network("ultralightunet", variant, spatial_dims=3, in_channels=1, out_channels=3).to(DEVICE)
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(2, 1, 32, 32, 32, device=DEVICE) * 3 + 1)
    net.eval()
    fast = accelerate(copy.deepcopy(net), triton=True)
    x = torch.randn(2, 1, 48, 48, 48, device=DEVICE)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = net(x1), fast(x2)
    assert (a - b).abs().max() <= 1e-4
    a.square().mean().backward()
    b.square().mean().backward()
    assert (x1.grad - x2.grad).abs().max() <= 1e-4
    ga, gb = _grads(net), _grads(fast)
    worst = max(((ga[n] - gb[n]).abs().max() / max(1.0, ga[n].abs().max().item())).item() for n in ga)
    assert worst <= 1e-4


@cuda_only
def test_triton_mkdc_under_autocast_and_compile():
    ref = MKIR(3, 16, 16).cuda()
    fast = accelerate(copy.deepcopy(ref), triton=True)
    x = torch.randn(2, 16, 24, 24, 24, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = ref(x)
        b = fast(x)
        c = torch.compile(fast)(x)
    assert b.dtype == a.dtype
    assert (a.float() - b.float()).abs().max() <= 0.05 * a.float().abs().max()
    assert (b.float() - c.float()).abs().max() <= 0.05 * a.float().abs().max()


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("cin,cout", [(4, 6), (6, 6)])
def test_pointwise_matmul_mkir_is_the_same_function(dims, cin, cout):
    """MKIR with its 1×1 convs (expand, project, projection shortcut) as matrix products, on the CPU."""
    ref = MKIR(dims, cin, cout)
    fast = accelerate(copy.deepcopy(ref), pointwise_matmul=True, fused_mkdc=False)
    assert fast.pointwise_matmul and not ref.pointwise_matmul
    _same_step(ref, fast, torch.randn((2, cin) + (5,) * dims))
    assert list(ref.state_dict()) == list(fast.state_dict())


def test_wide_kernels_use_pytorch_conv():
    x = torch.randn(1, 2, 3, 4, 12, device=DEVICE)
    w = torch.randn(2, 1, 1, 1, 9, device=DEVICE)
    assert torch.equal(depthwise_conv(x, w), _reference(x, w, None))
    assert "wider" in unsupported_conv(torch.nn.Conv3d(2, 2, (1, 1, 9), padding=(0, 0, 4), groups=2))
