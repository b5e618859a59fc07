"""Training kernels of ``accelerate(triton=True)`` (issue 7): the decoder's 2× upsampling + ReLU with its gradient
kernel computes ``F.interpolate`` + ReLU and their gradient. Without CUDA the kernels run in Triton's interpreter
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


@pytest.mark.parametrize("shape", [(2, 3, 3, 4, 5), (1, 2, 1, 1, 2), (1, 1, 2, 7, 1), (2, 2, 5, 3), (1, 1, 1, 1)])
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
