"""Training kernels of ``accelerate(triton=True)`` (issue 7): the decoder's 2× upsampling + ReLU with its gradient
kernel computes ``F.interpolate`` + ReLU and their gradient; the BatchNorm (+ clamp) kernels compute BatchNorm with
batch statistics, its running statistics and gradients. Without CUDA the kernels run in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1)."""

import copy

import pytest
import torch
import torch.nn.functional as F

from ul3d.networks import depthwise as dw
from ul3d.networks.depthwise import triton_available
from ul3d.networks.nets import _lean
from ul3d.networks.nets.ultralightunet import DecoderStage

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_available(DEVICE), reason="Triton is not installed")


def _plain(x: torch.Tensor, relu: bool) -> torch.Tensor:
    mode = "bilinear" if x.dim() == 4 else "trilinear"
    y = F.interpolate(x, scale_factor=2, mode=mode, align_corners=False)
    return torch.relu(y) if relu else y


@pytest.mark.parametrize("shape", [(2, 3, 3, 4, 5), (1, 2, 1, 1, 2), (1, 1, 2, 7, 1), (2, 2, 5, 3), (1, 1, 1, 1),
                                   (1, 1, 2, 17, 40)])  # the last: several programs per plane
@pytest.mark.parametrize("relu", [True, False])
def test_upsample2x_trainable_is_interpolate_with_its_gradient(shape, relu):
    x = torch.randn(*shape, device=DEVICE)
    x.view(-1)[0] = -1.0  # at least one output of ReLU is 0
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = _plain(x1, relu), dw.upsample2x_relu_trainable(x2, relu=relu)
    assert a.shape == b.shape and (a - b).abs().max() <= 1e-6
    if relu:
        assert (a == 0).any()  # the ReLU mask matters to the gradient below
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g)
    assert (x1.grad - x2.grad).abs().max() <= 1e-5 * max(1.0, x1.grad.abs().max().item())


def test_upsample2x_backward_refuses_what_it_does_not_compute():
    with pytest.raises(ValueError, match="2× upsampling"):
        dw.upsample2x_backward(torch.randn(1, 2, 4, 5, device=DEVICE), None)  # odd fine width
    with pytest.raises(ValueError, match="2× upsampling"):
        dw.upsample2x_backward(torch.randn(1, 2, 4, device=DEVICE), None)  # 1D


def test_upsample2x_custom_operator_passes_torch_library_opcheck():
    x = torch.randn(1, 2, 2, 3, 4, device=DEVICE, requires_grad=True)
    for relu in (True, False):
        torch.library.opcheck(torch.ops.ul3d.upsample2x_relu.default, (x, relu))


@pytest.mark.parametrize("dims", [2, 3])
def test_decoder_stage_trains_through_the_upsampling_kernels(dims, monkeypatch):
    """With ``triton`` (``accelerate(triton=True)``) a decoder stage in training runs its 2× upsampling + ReLU as the
    trainable kernel and gives the plain stage's output and gradients; other sizes keep F.interpolate."""
    torch.manual_seed(0)
    stage = DecoderStage(torch.nn.Conv3d(3, 3, 1) if dims == 3 else torch.nn.Conv2d(3, 3, 1), dims, None, True)
    stage = stage.to(DEVICE).train()
    fast = copy.deepcopy(stage)
    fast.triton = True
    calls = []
    real = _lean.upsample2x_relu_trainable
    monkeypatch.setattr(_lean, "upsample2x_relu_trainable", lambda x, relu: calls.append(relu) or real(x, relu=relu))
    x = torch.randn(2, 3, *([5] * dims), device=DEVICE)
    skip = torch.randn(2, 3, *([10] * dims), device=DEVICE)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = stage(x1, [10] * dims, skip), fast(x2, [10] * dims, skip)
    assert calls == [True]
    assert (a - b).abs().max() <= 1e-5
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g)
    assert (x1.grad - x2.grad).abs().max() <= 1e-5 * max(1.0, x1.grad.abs().max().item())
    for p, q in zip(stage.parameters(), fast.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-5 * max(1.0, p.grad.abs().max().item())
    fast(x2, [9] * dims, None)  # not a doubling: F.interpolate
    assert calls == [True]


def _bn(dims: int, c: int) -> torch.nn.Module:
    bn = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)[dims - 1](c).to(DEVICE)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


@pytest.mark.parametrize("shape", [(2, 3, 5, 6, 7), (3, 2, 33), (2, 4, 3, 9), (1, 2, 1, 1, 3)])
@pytest.mark.parametrize("act", ["relu6", "relu", "hardtanh", None])
@pytest.mark.parametrize("block", [1024, 16])  # 16: several blocks per chunk and several chunks per plane
def test_batchnorm_clamp_is_batchnorm_and_activation(shape, act, block, monkeypatch):
    """Output, running statistics over two steps, input and parameter gradients of nn.BatchNorm + activation."""
    monkeypatch.setattr(dw, "BN_BLOCK", block)
    monkeypatch.setattr(dw, "BN_PROGRAMS", 8)
    torch.manual_seed(0)
    ref = _bn(len(shape) - 2, shape[1])
    mine = copy.deepcopy(ref)
    lohi = {"relu6": (0.0, 6.0), "relu": (0.0, float("inf")), "hardtanh": (-0.5, 0.5),
            None: (float("-inf"), float("inf"))}[act]
    fn = {"relu6": F.relu6, "relu": F.relu, "hardtanh": lambda t: F.hardtanh(t, -0.5, 0.5), None: lambda t: t}[act]
    for _ in range(2):
        z = torch.randn(*shape, device=DEVICE) * 2 + 1
        z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
        a = fn(ref(z1))
        b = dw.batchnorm_clamp(z2, mine.weight, mine.bias, mine.running_mean, mine.running_var, 0.1, ref.eps, *lohi)
        assert (a - b).abs().max() <= 1e-5
        if act is not None:
            assert (a == lohi[0]).any()  # the clamp's mask enters the gradient
        if act == "hardtanh":
            assert (a == lohi[1]).any()
        g = torch.randn_like(a)
        a.backward(g)
        b.backward(g)
        assert (z1.grad - z2.grad).abs().max() <= 1e-5 * max(1.0, z1.grad.abs().max().item())
    for name in ("running_mean", "running_var"):
        assert (getattr(ref, name) - getattr(mine, name)).abs().max() <= 1e-6
    for p, q in ((ref.weight, mine.weight), (ref.bias, mine.bias)):
        assert (p.grad - q.grad).abs().max() <= 1e-5 * max(1.0, p.grad.abs().max().item())


def test_batchnorm_clamp_statistics_far_from_zero(monkeypatch):
    """Values around 1000 with spread 1 (and one outlier in the first voxel): mean and variance as float64 gives them
    (chunk means and squared deviations, no sums of squares around 0)."""
    monkeypatch.setattr(dw, "BN_BLOCK", 64)
    z = torch.randn(2, 2, 3000, device=DEVICE) + 1000.0
    z[0, :, 0] = 1100.0
    rm, rv = torch.zeros(2, device=DEVICE), torch.ones(2, device=DEVICE)
    out = dw.batchnorm_clamp(z, None, None, rm, rv, 1.0, 1e-5)
    zd = z.double()
    mean, var = zd.mean((0, 2)), zd.var((0, 2), unbiased=False)
    assert (rm.double() - mean).abs().max() <= 1e-4
    assert ((rv.double() - zd.var((0, 2))) / var).abs().max() <= 1e-5
    ref = (zd - mean[None, :, None]) / (var[None, :, None] + 1e-5).sqrt()
    assert (out.double() - ref).abs().max() <= 2e-3  # z itself holds float32: 6e-5 at 1000


def test_batchnorm_clamp_without_affine_or_running_stats_keeps_nan():
    z = torch.randn(2, 3, 4, 5, device=DEVICE)
    ref = F.batch_norm(z, None, None, training=True).clamp(0, 6)
    assert (dw.batchnorm_clamp(z, None, None, None, None, 0.0, 1e-5, 0.0, 6.0) - ref).abs().max() <= 1e-5
    z[0, 1, 2, 3] = float("nan")
    w, b = torch.ones(3, device=DEVICE, requires_grad=True), torch.zeros(3, device=DEVICE, requires_grad=True)
    out = dw.batchnorm_clamp(z, w, b, None, None, 0.0, 1e-5, 0.0, 6.0)
    assert out[:, 1].isnan().all() and not out[:, 0].isnan().any()  # NaN spoils its channel's statistics, as in torch
    w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ref = F.relu6(F.batch_norm(z, None, None, w2, b2, training=True))
    g = torch.rand_like(ref)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(b.grad[[0, 2]], b2.grad[[0, 2]])  # the other channels untouched by the NaN
    if DEVICE.type == "cpu":  # the NaN channel's as PyTorch's CPU BatchNorm + ReLU6 gives it (0: its mask is off
        # where the output is NaN); PyTorch's CUDA hardtanh_backward passes the gradient through a NaN instead
        torch.testing.assert_close(b.grad, b2.grad, equal_nan=True)


def test_batchnorm_clamp_refuses_what_it_does_not_compute():
    with pytest.raises(ValueError, match="batchnorm_clamp"):
        dw.batchnorm_clamp(torch.randn(4, 3, device=DEVICE), None, None, None, None, 0.1, 1e-5)
    with pytest.raises(ValueError, match="batchnorm_clamp"):
        dw.batchnorm_clamp(torch.randn(2, 3, 4, device=DEVICE, dtype=torch.float64), None, None, None, None, 0.1, 1e-5)


def test_batchnorm_act_uses_the_kernels_in_training_only(monkeypatch):
    """``batchnorm_act(kernels=True)`` with ``BATCHNORM_KERNELS`` (on by default): a MONAI conv block's training
    BatchNorm + ReLU6 (and a BatchNorm alone) as the kernels, with num_batches_tracked counted; eval mode, other
    activations and BATCHNORM_KERNELS off: the modules."""
    from monai.networks.blocks import Convolution

    from ul3d.networks.blocks.multikernel import batchnorm_act

    calls = []
    real = dw.batchnorm_clamp
    monkeypatch.setattr(dw, "batchnorm_clamp", lambda *a: calls.append(a[-2:]) or real(*a))
    monkeypatch.setattr(dw, "BATCHNORM_KERNELS", True)
    z = torch.randn(2, 4, 5, 6, device=DEVICE)
    for act, bounds in (("relu6", (0.0, 6.0)), (None, (float("-inf"), float("inf"))), ("prelu", None)):
        ref = Convolution(2, 4, 4, kernel_size=1, norm="batch", act=act).to(DEVICE)
        mine = copy.deepcopy(ref)
        calls.clear()
        a, b = ref.adn(z), batchnorm_act(z, mine.adn, kernels=True)
        assert calls == ([bounds] if bounds else [])
        assert (a - b).abs().max() <= 1e-5
        assert int(mine.adn.N.num_batches_tracked) == int(ref.adn.N.num_batches_tracked) == 1
        mine.eval()
        calls.clear()
        batchnorm_act(z, mine.adn, kernels=True)
        assert calls == []
    block = Convolution(2, 4, 4, kernel_size=1, norm="batch", act="relu6").to(DEVICE)
    batchnorm_act(z, block.adn, kernels=True)
    assert len(calls) == 1
    monkeypatch.setattr(dw, "BATCHNORM_KERNELS", False)
    batchnorm_act(z, block.adn, kernels=True)
    assert len(calls) == 1
