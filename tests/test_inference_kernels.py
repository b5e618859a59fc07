"""The inference kernels of ``accelerate(triton=True)`` (issue 7) compute the plain modules' function: the whole MKDC
as one kernel, the last upsampling + ReLU + head as one kernel and 2× max-pooling without indices. Without CUDA they run
in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ul3d.networks import depthwise as dw
from ul3d.networks.blocks import GAG, AttentionGate
from ul3d.networks.blocks.multikernel import MKDC, MKIR
from ul3d.networks.depthwise import max_pool_2x, multikernel_depthwise, triton_available
from ul3d.networks.fast import accelerate, fold_batchnorm
from ul3d.networks.nets._lean import upsample_relu_head
from ul3d.networks.nets.ultralightunet import UltraLightUNet

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not triton_available(DEVICE), reason="Triton is not installed")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
INF = float("inf")


@pytest.fixture(autouse=True)
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = False, False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _reference_mkdc(x, weights, biases, bounds, groups):
    """Eq. 2 term by term with PyTorch's convolutions, in float64."""
    c = x.shape[1]
    conv = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
    out = 0
    for w, b, (lo, hi) in zip(weights, biases, bounds):
        y = conv(x.double(), w.double(), None if b is None else b.double(), 1, tuple(k // 2 for k in w.shape[2:]), 1, c)
        out = out + y.clamp(lo, hi)
    return out.unflatten(1, (groups, c // groups)).transpose(1, 2).flatten(1, 2)


@pytest.mark.parametrize("shape,kernels,groups,bounds", [
    ((2, 2, 5, 6, 7), [(1, 1, 1), (3, 3, 3), (5, 5, 5)], 2, [(0.0, 6.0)] * 3),  # the paper's MKDC
    ((1, 2, 7, 5, 33), [(1, 1, 1), (3, 3, 3), (5, 5, 5)], 1, [(0.0, 6.0), (0.0, INF), (-INF, INF)]),  # 2 tiles along W
    ((1, 2, 3, 4, 37), [(1, 3, 5), (3, 3, 3)], 2, [(-1.0, 1.0), (0.0, 6.0)]),  # anisotropic, 2 branches
    ((1, 6, 9, 10), [(1, 1), (3, 3), (5, 5)], 3, [(0.0, 6.0)] * 3),  # 2D
    ((2, 2, 13), [(3,), (7,)], 1, [(0.0, 6.0)] * 2),  # 1D
    ((1, 2, 4, 4, 4), [(7, 7, 7)], 2, [(-INF, INF)]),  # one branch wider than the volume
])
def test_multikernel_depthwise_is_eq2(shape, kernels, groups, bounds):
    torch.manual_seed(0)
    c = shape[1]
    x = torch.randn(*shape, device=DEVICE)
    weights = [torch.randn(c, 1, *k, device=DEVICE) for k in kernels]
    biases = [torch.randn(c, device=DEVICE) if i % 2 == 0 else None for i in range(len(kernels))]
    ref = _reference_mkdc(x, weights, biases, bounds, groups)
    with torch.no_grad():
        got = multikernel_depthwise(x, weights, biases, bounds, groups)
        plain = multikernel_depthwise(x, weights, biases, bounds, groups, triton=False)
    assert got.shape == x.shape and ref.abs().max() > 1
    assert (got.double() - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert (plain.double() - ref).abs().max() <= 1e-4 * ref.abs().max()



@pytest.mark.parametrize("shape,kernels,setting", [
    ((1, 2, 4, 6, 7), [(1, 1, 1), (3, 3, 3), (5, 5, 5)], (2, 2, 2, 8, 1)),  # tiles partly outside the volume
    ((1, 2, 4, 9, 5), [(1, 3, 5), (3, 3, 3)], (4, 3, 2, 4, 1)),  # anisotropic, 2 branches, 2 tiles along W
])
def test_grid_kernel_is_eq2(shape, kernels, setting, monkeypatch):
    """``mkdc_forward_grid`` (input rows shared in depth and height: ``MKDC_GRID``) computes Eq. 2 as well, and runs
    only where its rows divide the volume."""
    torch.manual_seed(0)
    monkeypatch.setattr(dw, "MKDC_GRID", ((0, setting),))
    c = shape[1]
    x = torch.randn(*shape, device=DEVICE)
    weights = [torch.randn(c, 1, *k, device=DEVICE) for k in kernels]
    biases = [None if i == 1 else torch.randn(c, device=DEVICE) for i in range(len(kernels))]
    bounds = [(0.0, 6.0), (-1.0, INF), (-INF, 2.0)][:len(kernels)]
    ref = _reference_mkdc(x, weights, biases, bounds, 2)
    calls = []
    kernel = dw._kernels().mkdc_forward_grid
    monkeypatch.setattr(dw._kernels(), "mkdc_forward_grid", _Recording(kernel, calls))
    with torch.no_grad():
        got = multikernel_depthwise(x, weights, biases, bounds, 2)
    assert calls and ref.abs().max() > 1
    assert (got.double() - ref).abs().max() <= 1e-4 * ref.abs().max()
    calls.clear()
    with torch.no_grad():  # one depth row more: ROWS no longer divides it, so the other kernel runs
        x = torch.randn(shape[0], c, shape[2] + 1, *shape[3:], device=DEVICE)
        got = multikernel_depthwise(x, weights, biases, bounds, 2)
    ref = _reference_mkdc(x, weights, biases, bounds, 2)
    assert not calls and (got.double() - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("size,grid", [(24, True), (26, False), (12, False)])
def test_default_grid_table_picks_the_kernel_by_plane(size, grid, monkeypatch):
    """With the default ``MKDC_GRID``, 24² planes and up run ``mkdc_forward_grid`` (base's 24³ and 48³ stages at 96³
    patches), smaller planes, and heights its 4 rows do not divide (26), ``mkdc_forward``; both Eq. 2."""
    torch.manual_seed(0)
    x = torch.randn(1, 2, 8, size, size, device=DEVICE)
    weights = [torch.randn(2, 1, k, k, k, device=DEVICE) for k in (1, 3, 5)]
    biases = [torch.randn(2, device=DEVICE) for _ in weights]
    bounds = [(0.0, 6.0)] * 3
    calls = {"grid": [], "rows": []}
    k = dw._kernels()
    monkeypatch.setattr(k, "mkdc_forward_grid", _Recording(k.mkdc_forward_grid, calls["grid"]))
    monkeypatch.setattr(k, "mkdc_forward", _Recording(k.mkdc_forward, calls["rows"]))
    with torch.no_grad():
        got = multikernel_depthwise(x, weights, biases, bounds, 2)
    ref = _reference_mkdc(x, weights, biases, bounds, 2)
    assert (len(calls["grid"]), len(calls["rows"])) == ((1, 0) if grid else (0, 1))
    assert (got.double() - ref).abs().max() <= 1e-4 * ref.abs().max()


class _Recording:
    """A Triton kernel that records its launches."""

    def __init__(self, kernel, calls, name=None):
        self.kernel, self.calls, self.name = kernel, calls, name

    def __getitem__(self, grid):
        self.calls.append(grid if self.name is None else self.name)
        return self.kernel[grid]


def test_multikernel_depthwise_rejects_what_it_does_not_compute():
    x = torch.randn(1, 4, 5, 5, 5)
    w = torch.randn(4, 1, 3, 3, 3)
    with pytest.raises(ValueError, match="depth-wise branches"):
        multikernel_depthwise(x, [torch.randn(4, 1, 2, 2, 2)], [None], [(0, 6)])  # even kernel
    with pytest.raises(ValueError, match="depth-wise branches"):
        multikernel_depthwise(x, [w], [None, None], [(0, 6)])  # one bias too many
    with pytest.raises(ValueError, match="shuffle_groups=3"):
        multikernel_depthwise(x, [w], [None], [(0, 6)], shuffle_groups=3)


def _randomise_batchnorm(module):
    """Running statistics and affine parameters away from their initial values (so folding them is exercised)."""
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return module


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("dims", [2, 3])
def test_mkdc_inference_runs_one_kernel(dims, fold, monkeypatch):
    """An eval-mode MKDC (BatchNorm folded, or folded on the fly) with autograd off runs multikernel_depthwise and
    computes the plain forward; with autograd on it does not."""
    torch.manual_seed(0)
    ref = _randomise_batchnorm(MKIR(dims, 2, 6)).to(DEVICE).eval()
    fast = accelerate(fold_batchnorm(ref) if fold else copy.deepcopy(ref), triton=True, fused_mkdc=False)
    from ul3d.networks.blocks import multikernel

    calls, kernel = [], multikernel.multikernel_depthwise
    monkeypatch.setattr(multikernel, "multikernel_depthwise", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    x = torch.randn((1, 2) + (5,) * dims, device=DEVICE) * 2
    with torch.no_grad():
        a, b = ref(x), fast(x)
    assert calls == [1]
    assert (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max().item())
    fast(x.requires_grad_())  # autograd on: the per-branch Triton path, not the inference kernel
    assert calls == [1]


@pytest.mark.parametrize("shape,cout,pad,residual,bounds", [
    ((2, 16, 6, 5, 7), 32, (2, 2, 2), None, (0.0, 6.0)),  # an expand conv: ReLU6, padded for a 5³ MKDC
    ((1, 20, 5, 6, 4), 16, None, "identity", (-INF, INF)),  # project + identity shortcut
    ((2, 40, 3, 4, 5), 70, None, "conv", (-INF, INF)),  # project + 1×1 shortcut conv, two channel blocks
    ((2, 3, 9, 10), 17, (1, 2), None, (0.0, 6.0)),  # 2D, few channels, uneven padding
    ((1, 33, 12), 24, (3,), "conv", (0.0, INF)),  # 1D
])
def test_pointwise_act_is_the_plain_conv(shape, cout, pad, residual, bounds):
    """pointwise_act (bias, activation, shortcut, zero padding) against the same ops in float64, float32 within 1e-4."""
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE)
    w, b = torch.randn(cout, shape[1], device=DEVICE) / 4, torch.randn(cout, device=DEVICE)
    r = rw = None
    if residual == "identity":
        r = torch.randn(shape[0], cout, *shape[2:], device=DEVICE)
    elif residual == "conv":
        r, rw = torch.randn(shape[0], 11, *shape[2:], device=DEVICE), torch.randn(cout, 11, device=DEVICE) / 4
    with torch.no_grad():
        got = dw.pointwise_act(x, w, b, bounds, pad, r, rw)
    conv = (F.conv1d, F.conv2d, F.conv3d)[x.dim() - 3]
    k = (1,) * (x.dim() - 2)
    ref = conv(x.double(), w.double().reshape(cout, -1, *k), b.double())
    if r is not None:
        ref = ref + (r.double() if rw is None else conv(r.double(), rw.double().reshape(cout, -1, *k)))
    ref = ref.clamp(*bounds)
    if pad is not None:
        ref = F.pad(ref, [p for p in reversed(pad) for _ in range(2)])
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert (got.double() - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    with torch.no_grad():  # the PyTorch fallback is the same function
        plain = dw.pointwise_act(x, w, b, bounds, pad, r, rw, triton=False)
    assert (plain.double() - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    with pytest.raises(ValueError, match="pointwise_act"):
        dw.pointwise_act(x, w[:, :-1], b)


@pytest.mark.parametrize("dims", [2, 3])
def test_multikernel_depthwise_reads_a_padded_input(dims):
    """padded=True: the same output from the input already zero-padded for the widest kernel (kernel and fallback)."""
    torch.manual_seed(0)
    x = torch.randn((1, 4) + (4 if dims == 3 else 6,) * dims, device=DEVICE)
    weights = [torch.randn(4, 1, *(k,) * dims, device=DEVICE) for k in (1, 3, 5)]
    biases, bounds = [torch.randn(4, device=DEVICE), None, torch.randn(4, device=DEVICE)], [(0.0, 6.0)] * 3
    xp = F.pad(x, (2,) * (2 * dims))
    with torch.no_grad():
        ref = multikernel_depthwise(x, weights, biases, bounds, shuffle_groups=2)
        for triton in (True, False):
            got = multikernel_depthwise(xp, weights, biases, bounds, shuffle_groups=2, triton=triton, padded=True)
            assert got.shape == x.shape
            assert (got - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    with pytest.raises(ValueError, match="padded input"):
        multikernel_depthwise(x[..., :4], weights, biases, bounds, padded=True)  # 4 ≤ 2·2 along the last axis


@pytest.mark.parametrize("cin,cout,dims,fold", [(4, 6, 3, True), (3, 3, 3, False), (6, 4, 2, True)])
def test_mkir_inference_runs_three_kernels(cin, cout, dims, fold, monkeypatch):
    """An eval-mode MKIR (1×1 shortcut conv, or identity) with autograd off: expand and project as pointwise_act, the
    MKDC on the padded expand output; the plain block's function. Training mode and instance norm keep their paths."""
    torch.manual_seed(0)
    ref = _randomise_batchnorm(MKIR(dims, cin, cout)).to(DEVICE).eval()
    fast = accelerate(fold_batchnorm(ref) if fold else copy.deepcopy(ref), triton=True, fused_mkdc=False)
    from ul3d.networks.blocks import multikernel

    calls = []
    for name in ("pointwise_act", "multikernel_depthwise"):
        fn = getattr(multikernel, name)
        monkeypatch.setattr(multikernel, name, lambda *a, fn=fn, name=name, **k: calls.append(name) or fn(*a, **k))
    x = torch.randn((2 if dims == 2 else 1, cin) + (4 if dims == 3 else 6,) * dims, device=DEVICE)  # (interpreter)
    with torch.no_grad():
        a, b = ref(x), fast(x)
    assert calls == ["pointwise_act", "multikernel_depthwise", "pointwise_act"]
    assert (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max().item())
    assert fast.kernel_parts(x) is not None
    with torch.no_grad():  # the kernels' prepared weights follow an in-place change of a parameter, in place
        kept = fast.cached_kernel_parts(x)
        assert fast.cached_kernel_parts(x) is kept
        for m in (ref, fast):
            m.expand.conv.weight.mul_(1.5)
            m.project.conv.weight.mul_(-0.5)
        a, b = ref(x), fast(x)
        assert fast.cached_kernel_parts(x) is kept  # the same tensors (a CUDA graph that reads them stays valid)
    assert (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max().item())
    if not fold:  # eval -> train: batch statistics, not the prepared (folded running-statistics) weights
        fast.train()
        ref.train()
        with torch.no_grad():
            assert fast.cached_kernel_parts(x) is None
            torch.testing.assert_close(fast(x), ref(x))
    assert accelerate(copy.deepcopy(ref).train(), triton=True).kernel_parts(x) is None
    assert accelerate(MKIR(dims, cin, cout, norm="instance").to(DEVICE).eval(), triton=True).kernel_parts(x) is None
    assert accelerate(MKIR(dims, cin, cout, act="gelu").to(DEVICE).eval(), triton=True).kernel_parts(x) is None


def test_inference_copy_refresh_updates_the_prepared_kernel_weights_in_place():
    """InferenceCopy.refresh writes the live network's folded weights into the copy and the MKIR kernels' prepared
    weights in place (the tensors a CUDA graph captured at the first validation read), so the copy computes the
    live network's new function."""
    from ul3d.networks.fast import InferenceCopy

    torch.manual_seed(0)
    live = _randomise_batchnorm(MKIR(3, 4, 6)).to(DEVICE).eval()
    copy_ = InferenceCopy(live, graphs=False, triton=True, fused_mkdc=False)
    x = torch.randn(1, 4, 4, 4, 4, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(copy_(x), live(x), rtol=1e-4, atol=1e-4)
        kept = [t.data_ptr() for t in multikernel_tensors(copy_.net)]
        for p in live.parameters():
            p.mul_(0.9).add_(0.05)
        copy_.refresh()
        assert [t.data_ptr() for t in multikernel_tensors(copy_.net)] == kept
        # what a replayed graph does: the kernels on the kept tensors, without another look at the parameters
        key, parts = copy_.net._kernel_cache
        assert key[2] == copy_.net._state_key()
        torch.testing.assert_close(copy_.net.forward_kernels(x, parts), live(x), rtol=1e-4, atol=1e-4)


def multikernel_tensors(block):
    from ul3d.networks.blocks.multikernel import _tensors

    return _tensors(block._kernel_cache[1])


def test_folded_branches_refuses_what_it_cannot_fold():
    block = MKDC(3, 4).eval()
    weights, biases, bounds = block.folded_branches()
    assert len(weights) == 3 and bounds == [(0.0, 6.0)] * 3 and all(b is not None for b in biases)
    assert MKDC(3, 4).train().folded_branches() is None  # batch statistics
    assert MKDC(3, 4, norm="instance").eval().folded_branches() is None
    assert MKDC(3, 4, act="gelu").eval().folded_branches() is None
    assert MKDC(3, 4, parallel=False).eval().folded_branches() is None
    assert MKDC(3, 4, kernels=(1, 3, 5, 7)).eval().folded_branches() is None  # more than three branches


@pytest.mark.parametrize("shape,size,align_corners,relu,bias", [
    ((2, 5, 4, 6, 7), (8, 12, 14), False, True, True),  # the network's 2× case
    ((1, 3, 5, 6, 7), (9, 13, 10), True, True, False),  # any size, align_corners
    ((2, 4, 6, 7), (12, 14), False, False, True),  # 2D, no ReLU
    ((1, 3, 9), (20,), False, True, True),  # 1D
])
def test_upsample_relu_head_kernel_is_the_plain_function(shape, size, align_corners, relu, bias):
    torch.manual_seed(0)
    dims = len(size)
    x = torch.randn(*shape, device=DEVICE)
    head = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](shape[1], 3, 1, bias=bias).to(DEVICE)
    mode = ("linear", "bilinear", "trilinear")[dims - 1]
    with torch.no_grad():
        y = F.interpolate(x, size=list(size), mode=mode, align_corners=align_corners)
        ref = head(torch.relu(y) if relu else y)
        got = upsample_relu_head(x, list(size), head, relu=relu, align_corners=align_corners, triton=True)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())


def test_upsample_relu_head_kernel_leaves_what_it_does_not_compute():
    """More head channels than accumulators, a 3×3 head, autograd on: the plain ops."""
    from ul3d.networks.nets import _lean

    x = torch.randn(1, 4, 3, 3, 3, device=DEVICE)
    calls, kernel = [], _lean.upsample_relu_pointwise
    _lean.upsample_relu_pointwise = lambda *a, **k: calls.append(1) or kernel(*a, **k)
    try:
        for head, grad in ((nn.Conv3d(4, dw.MAX_HEAD_CHANNELS + 1, 1), False), (nn.Conv3d(4, 3, 3, padding=1), False),
                           (nn.Conv3d(4, 3, 1), True)):
            head = head.to(DEVICE)
            with torch.set_grad_enabled(grad):
                ref = head(torch.relu(F.interpolate(x, size=[6, 6, 6], mode="trilinear")))
                got = upsample_relu_head(x, [6, 6, 6], head, triton=True)
            torch.testing.assert_close(got, ref)
    finally:
        _lean.upsample_relu_pointwise = kernel
    assert calls == []


@pytest.mark.parametrize("shape,kernel,inter,setting", [
    ((2, 8, 4, 8, 12), 3, None, (4, 4, 2, 8, 1)),  # the network's gate (2 channels per group), 2 samples, 2 tiles
    ((1, 8, 8, 4, 6), 3, 2, (4, 2, 1, 8, 2)),  # 4 channels per group, 2 programs in depth, 2 x 2 rows
])
def test_gated_skip_sum_is_the_plain_gate(shape, kernel, inter, setting, monkeypatch):
    """The decoder's skip merge through a folded GAG (Eq. 6) in two kernels (the gate's grouped convs as the grid
    MKDC kernel summing each group's gate and skip planes, then ψ, sigmoid, product and sum): ``u + GAG(g=u, x=s)``
    of the plain module."""
    torch.manual_seed(0)
    monkeypatch.setattr(dw, "GATE_KERNEL", True)
    monkeypatch.setattr(dw, "MKDC_GRID", ((0, setting),))
    gate = _randomise_batchnorm(GAG(3, shape[1], shape[1], inter, kernel_size=kernel)).to(DEVICE).eval()
    fast = accelerate(fold_batchnorm(gate), triton=True)
    u, s = torch.randn(*shape, device=DEVICE), torch.randn(*shape, device=DEVICE)
    calls = []
    k = dw._kernels()
    monkeypatch.setattr(k, "gate_apply", _Recording(k.gate_apply, calls))
    with torch.no_grad():
        ref = u.double() + gate.double()(u.double(), s.double())
        got = fast.skip_sum(u, s)
    assert len(calls) == 1 and ref.abs().max() > 1
    assert (got.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_gated_skip_sum_leaves_what_it_does_not_compute(monkeypatch):
    """The modules run (and give the same sum) for an unfolded gate, Oktay's 1×1 attention gate, with autograd on,
    without ``triton``, for 2D inputs, volumes whose depth the grid rows do not divide and with ``GATE_KERNEL`` off (the
    default); the kernels reject mismatched inputs."""
    torch.manual_seed(0)
    monkeypatch.setattr(dw, "GATE_KERNEL", True)
    monkeypatch.setattr(dw, "MKDC_GRID", ((0, (4, 4, 1, 8, 1)),))
    shape = (1, 4, 4, 4, 5)
    u, s = torch.randn(*shape, device=DEVICE), torch.randn(*shape, device=DEVICE)
    calls = []
    k = dw._kernels()
    monkeypatch.setattr(k, "gate_apply", _Recording(k.gate_apply, calls))
    plain = _randomise_batchnorm(GAG(3, 4, 4)).to(DEVICE).eval()
    folded = fold_batchnorm(plain)
    fast = accelerate(copy.deepcopy(folded), triton=True)
    cases = [(accelerate(copy.deepcopy(plain), triton=True), False, u, s),
             (accelerate(fold_batchnorm(AttentionGate(3, 4, 4).to(DEVICE).eval()), triton=True), False, u, s),
             (fast, True, u, s), (copy.deepcopy(folded), False, u, s),
             (fast, False, u[:, :, :3], s[:, :, :3]),  # depth 3: the 4 grid rows do not divide it
             (accelerate(fold_batchnorm(GAG(2, 4, 4).to(DEVICE).eval()), triton=True), False, u[:, :, 0], s[:, :, 0])]
    for gate, grad, a, b in cases:
        with torch.set_grad_enabled(grad):
            got = gate.skip_sum(a, b)
            ref = a + gate(a, b)
        torch.testing.assert_close(got, ref)
    monkeypatch.setattr(dw, "GATE_KERNEL", False)
    with torch.no_grad():
        torch.testing.assert_close(fast.skip_sum(u, s), u + folded(u, s))
    assert calls == []
    with pytest.raises(ValueError, match="gated_skip_sum"):
        dw.gated_skip_sum(u, s[:, :, :3], fast._prepared_parts(torch.float32))


@pytest.mark.parametrize("dims", [2, 3])
def test_network_inference_kernels_are_the_same_function(dims, monkeypatch):
    """A small UltraLightUNet in eval mode with autograd off: every MKDC through the one kernel and the head kernel,
    the output as the plain network's."""
    torch.manual_seed(0)
    # 3D: 1³ + 3³ branches and a 3³ spatial attention (Triton's interpreter runs the 5³/7³ kernels 4-5× slower
    # without CUDA; their tests above take those sizes)
    small = dict(kernels=(1, 3), spatial_kernel=3) if dims == 3 and not torch.cuda.is_available() else {}
    net = _randomise_batchnorm(UltraLightUNet(dims, 1, 3, channels=(2, 4, 4, 4, 4), **small)).to(DEVICE).eval()
    fast = accelerate(fold_batchnorm(net), triton=True, fused_mkdc=False)
    from ul3d.networks.blocks import attention, multikernel
    from ul3d.networks.nets import _lean

    seen = []
    from ul3d.networks.nets import ultralightunet

    for module, name in ((multikernel, "multikernel_depthwise"), (_lean, "upsample_relu_pointwise"),
                         (_lean, "upsample2x_relu_pointwise"), (ultralightunet, "max_pool_2x"),
                         (multikernel, "max_pool_2x"), (multikernel, "pooled_stem"), (_lean, "linear_upsample"),
                         (_lean, "upsample2x_relu"), (multikernel, "pointwise_act"), (attention, "gated_skip_sum"),
                         (attention, "channel_spatial_attention")):
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, fn=fn, name=name, **k: seen.append(name) or fn(*a, **k))
    x = torch.randn((1, 1) + ((16, 16) if dims == 2 else (8, 8, 8)), device=DEVICE)
    with torch.no_grad():
        a, b = net(x), fast(x)
    # 3D: the stages on 1 and 2 input channels (2 and 4 hidden) run as pooled stems, the others MKDC kernel + pool
    stems = 2 if dims == 3 else 0
    assert seen.count("pooled_stem") == stems and seen.count("multikernel_depthwise") == 10 - stems
    # the upsamplings that double the volume run the cell kernels, the deepest ones (1 -> 1 voxel: the last pools
    # are ceil_mode; 16² -> 1² after 4 pools, 8³ after 3) the tabled one
    doubling = 3 if dims == 2 else 2
    assert seen.count("upsample2x_relu_pointwise") == 1 and seen.count("max_pool_2x") == 5 - stems
    assert seen.count("upsample2x_relu") == doubling and seen.count("linear_upsample") == 4 - doubling
    assert seen.count("upsample_relu_pointwise") == 0
    assert seen.count("pointwise_act") == 2 * (10 - stems)  # expand and project of every other block
    # GATE_KERNEL (on by default): each of the 4 skip merges of the 3D network asks for the gate kernels (at these
    # sizes the default grid settings take none of them: the modules run); 2D merges never ask
    assert seen.count("gated_skip_sum") == (4 if dims == 3 else 0)
    assert seen.count("channel_spatial_attention") == 5  # every decoder stage's CMFA
    assert (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max().item())


def test_network_with_the_gate_kernel_is_the_same_function(monkeypatch):
    """With ``GATE_KERNEL`` (and grid settings for every volume), a small UltraLightUNet3D's skip merges whose volumes
    the grid rows divide run :func:`~ul3d.networks.depthwise.gated_skip_sum`'s kernels; the output is the plain
    network's."""
    torch.manual_seed(0)
    monkeypatch.setattr(dw, "GATE_KERNEL", True)
    monkeypatch.setattr(dw, "MKDC_GRID", ((0, (4, 4, 1, 8, 1)),))
    small = {} if torch.cuda.is_available() else dict(kernels=(1, 3), spatial_kernel=3)
    net = _randomise_batchnorm(UltraLightUNet(3, 1, 3, channels=(2, 4, 4, 4, 4), **small)).to(DEVICE).eval()
    fast = accelerate(fold_batchnorm(net), triton=True, fused_mkdc=False)
    calls = []
    k = dw._kernels()
    monkeypatch.setattr(k, "gate_apply", _Recording(k.gate_apply, calls))
    x = torch.randn(1, 1, 16, 16, 16, device=DEVICE)
    with torch.no_grad():
        a, b = net(x), fast(x)
    assert len(calls) == 2  # the skips at 8³ and 4³ (at 2³ and 1³ the 4 grid rows do not divide the volume)
    assert (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max().item())


@pytest.mark.parametrize("cin,out,shape,kernels,fold,skip", [
    (1, 16, (1, 2, 6, 20), (1, 3, 5), True, True),  # the network's first stage (base), one program
    (1, 16, (1, 2, 6, 20), (1, 3, 5), True, False),  # ... with the out-of-window taps as weights of 0
    (1, 4, (2, 2, 4, 6), (1, 3, 5), False, True),  # BatchNorm folded on the fly, two samples
    (1, 4, (1, 4, 18, 34), (1, 3, 5), True, True),  # 2 × 3 pooled tiles, the last ones part-full
    (2, 8, (1, 4, 4, 8), (3, 5), True, True),  # a two-channel image (prostate): 4 hidden, two branches
])
def test_pooled_stem_is_the_plain_stage(cin, out, shape, kernels, fold, skip, monkeypatch):
    """An eval-mode MKIR on a few-channel image followed by 2× max-pooling, with autograd off, runs as one kernel
    (pooled_stem's stem_pooled) and computes pool(block(x)), whether the narrower branches skip their out-of-window
    taps or not."""
    torch.manual_seed(0)
    monkeypatch.setattr(dw, "STEM_SKIP", skip)
    ref = _randomise_batchnorm(MKIR(3, cin, out, kernels=kernels)).to(DEVICE).eval()
    fast = fold_batchnorm(ref) if fold else copy.deepcopy(ref)
    pool = nn.MaxPool3d(2, ceil_mode=True)
    calls = []
    k = dw._kernels()
    monkeypatch.setattr(k, "stem_pooled", _Recording(k.stem_pooled, calls, "stem_pooled"))
    x = torch.randn(shape[0], cin, *shape[1:], device=DEVICE) * 2
    with torch.no_grad():
        a, b = pool(ref(x)), fast.forward_pooled(x, pool, triton=True)
    assert calls == ["stem_pooled"] and b.shape == a.shape
    assert (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max().item())


def test_pooled_stem_leaves_what_it_does_not_compute(monkeypatch):
    """Odd sizes, a 2D image, more channels than the kernel takes, another pool, training-mode BatchNorm: the block
    and the pool (max_pool_2x where it applies), never the stem kernel."""
    from ul3d.networks.blocks import multikernel

    calls = []
    monkeypatch.setattr(multikernel, "pooled_stem", lambda *a, **k: calls.append(1))
    torch.manual_seed(0)
    cases = [(MKIR(3, 1, 4), (1, 1, 5, 6, 6), nn.MaxPool3d(2, ceil_mode=True)),
             (MKIR(2, 1, 4), (1, 1, 6, 6), nn.MaxPool2d(2)),
             (MKIR(3, 3, 4), (1, 3, 4, 4, 4), nn.MaxPool3d(2)),
             (MKIR(3, 1, 4), (1, 1, 4, 4, 4), nn.MaxPool3d(3, 2))]
    for block, shape, pool in cases:
        block = _randomise_batchnorm(block).to(DEVICE).eval()
        x = torch.randn(*shape, device=DEVICE)
        with torch.no_grad():
            torch.testing.assert_close(block.forward_pooled(x, pool, triton=True), pool(block(x)))
    block = MKIR(3, 1, 4).to(DEVICE).train()
    assert block.pooled_stem_parts(torch.randn(2, 1, 4, 4, 4, device=DEVICE), nn.MaxPool3d(2)) is None
    assert calls == []


@pytest.mark.parametrize("dims,size,channels,kernel", [
    (3, (5, 6, 7), 20, 3),  # 20 channels: two steps of 16, the second part-full; 210 voxels: one block
    (3, (8, 8, 8), 16, 7),  # the network's 7³ spatial conv; two voxel blocks
    (3, (3, 3, 3), 48, 3),  # the bottleneck's size, three channel steps (hidden 3)
    (2, (9, 11), 40, 7),  # 2D
    (3, (4, 8, 34), 4, 3),  # 1088 voxels: two plane_stats chunks of 1024, the second part-full
])
def test_cmfa_kernels_are_the_plain_attention(dims, size, channels, kernel, monkeypatch):
    """An eval-mode CMFA with ``triton`` and autograd off runs as plane_stats, cmfa_describe, the depth-wise kernel
    and cmfa_apply, and computes SA(CA(x)) (Eqs. 3-4)."""
    from ul3d.networks.blocks import CMFA

    monkeypatch.setattr(dw, "CMFA_STATS_CHUNK", 1024)
    torch.manual_seed(0)
    ref = CMFA(dims, channels, spatial_kernel=kernel).to(DEVICE).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.5)
    fast = accelerate(ref, triton=True, copy_model=True)
    calls = []
    k = dw._kernels()
    for name in ("plane_stats", "cmfa_describe", "cmfa_apply"):
        monkeypatch.setattr(k, name, _Recording(getattr(k, name), calls, name))
    x = torch.randn(2, channels, *size, device=DEVICE) * 2
    with torch.no_grad():
        a, b = ref(x), fast(x)
        calls_one = list(calls)
        x[1, 3, 0] = float("nan")  # a NaN: the max-pool and the channel maximum propagate it, as the modules do
        nan_a, nan_b = ref(x), fast(x)
    assert calls_one == ["plane_stats", "cmfa_describe", "cmfa_apply"]
    plane_stats = dw._kernels().plane_stats
    chunks = []
    monkeypatch.setattr(dw._kernels(), "plane_stats", _Recording(plane_stats, chunks))
    with torch.no_grad():
        fast(x)
    assert chunks == [(-(-math.prod(size) // 1024), 2 * channels)]  # (chunks, planes)
    assert b.shape == a.shape and b.dtype == a.dtype
    assert (a - b).abs().max() <= 1e-5 * max(1.0, a.abs().max().item())
    assert torch.equal(nan_a.isnan(), nan_b.isnan()) and nan_a.isnan().any()
    assert torch.allclose(nan_a.nan_to_num(), nan_b.nan_to_num(), atol=1e-5)


def test_cmfa_kernels_leave_what_they_do_not_compute(monkeypatch):
    """Autograd on, another MLP activation, more channels than the kernels take: the modules."""
    from ul3d.networks.blocks import CMFA

    calls = []
    monkeypatch.setattr(attention_module(), "channel_spatial_attention",
                        lambda *a, **k: calls.append(1) or dw.channel_spatial_attention(*a, **k))
    torch.manual_seed(0)
    x = torch.randn(1, 4, 4, 4, 4, device=DEVICE)
    block = accelerate(CMFA(3, 4, spatial_kernel=3).to(DEVICE).eval(), triton=True, copy_model=True)
    ref = block.spatial(block.channel(x))
    torch.testing.assert_close(block(x), ref)  # autograd on
    gelu = accelerate(CMFA(3, 4, spatial_kernel=3, act="gelu").to(DEVICE).eval(), triton=True, copy_model=True)
    with torch.no_grad():
        torch.testing.assert_close(gelu(x), gelu.spatial(gelu.channel(x)))
    assert calls == []
    monkeypatch.setattr(dw, "CMFA_MAX_CHANNELS", 2)
    with torch.no_grad():
        torch.testing.assert_close(block(x), ref.detach())
    assert calls == [1]  # asked, refused (None): the modules ran
    with pytest.raises(ValueError, match="not a CMFA's"):
        dw.channel_spatial_attention(x, torch.zeros(1, 4), torch.zeros(4, 1), torch.zeros(2, 1, 2, 2, 2))


def attention_module():
    from ul3d.networks.blocks import attention

    return attention


@pytest.mark.parametrize("shape", [
    (2, 5, 4, 6, 7),  # 3D
    (1, 3, 1, 3, 2),  # size-1 and size-2 axes: the end outputs copy the end inputs
    (1, 2, 9, 1, 5),
    (2, 4, 6, 7),  # 2D
    (1, 2, 1, 5),
])
def test_doubling_upsamplings_run_the_cell_kernels(shape, monkeypatch):
    """A 2× (bi/tri)linear upsampling with ``align_corners=False`` (the network's decoder) runs the cell kernels
    (upsample2x_relu_pointwise, upsample2x_relu), not the tabled ones, and computes F.interpolate (+ ReLU, + head);
    align_corners=True and any other size run the tabled kernels."""
    from ul3d.networks.nets import _lean
    from ul3d.networks.nets._lean import upsample_relu

    seen = []
    for name in ("upsample2x_relu_pointwise", "upsample2x_relu", "upsample_relu_pointwise", "linear_upsample"):
        fn = getattr(_lean, name)
        monkeypatch.setattr(_lean, name, lambda *a, fn=fn, name=name, **k: seen.append(name) or fn(*a, **k))
    torch.manual_seed(0)
    dims = len(shape) - 2
    x = torch.randn(*shape, device=DEVICE)
    mode = ("bilinear", "trilinear")[dims - 2]
    conv = (nn.Conv2d, nn.Conv3d)[dims - 2]
    for size, align_corners, cells in (([2 * s for s in shape[2:]], False, True),
                                       ([2 * s for s in shape[2:]], True, False),
                                       ([2 * s + 1 for s in shape[2:]], False, False)):
        for relu, bias in ((True, True), (False, False)):
            head = conv(shape[1], 3, 1, bias=bias).to(DEVICE)
            seen.clear()
            with torch.no_grad():
                y = F.interpolate(x, size=size, mode=mode, align_corners=align_corners)
                y = y.relu() if relu else y
                got = upsample_relu(x, size, relu=relu, align_corners=align_corners, triton=True)
                got_head = upsample_relu_head(x, size, head, relu=relu, align_corners=align_corners, triton=True)
                ref_head = head(y)
            assert seen == (["upsample2x_relu", "upsample2x_relu_pointwise"] if cells
                            else ["linear_upsample", "upsample_relu_pointwise"])
            assert got.dtype == x.dtype and got.shape == y.shape and got_head.shape == ref_head.shape
            assert (got - y).abs().max() <= 1e-6 * max(1.0, y.abs().max().item())
            assert (got_head - ref_head).abs().max() <= 1e-5 * max(1.0, ref_head.abs().max().item())
    nan = x.clone()
    nan[0, 0, 0] = float("nan")  # ReLU keeps NaN, as PyTorch's (and the head spreads it over its outputs)
    size = [2 * s for s in shape[2:]]
    with torch.no_grad():
        y = F.interpolate(nan, size=size, mode=mode).relu()
        got = upsample_relu(nan, size, relu=True, triton=True)
        got_head = upsample_relu_head(nan, size, head, relu=True, triton=True)
    assert torch.equal(got.isnan(), y.isnan()) and y.isnan().any()
    assert torch.equal(got_head.isnan(), head(y).isnan())


def test_cell_kernels_refuse_what_they_do_not_compute():
    x = torch.randn(1, 2, 5, device=DEVICE)
    assert not dw.doubled(x, [10]) and not dw.doubled(torch.randn(1, 2, 3, 4), [6, 9])
    assert dw.doubled(torch.randn(1, 2, 3, 4), [6, 8]) and not dw.doubled(torch.randn(1, 2, 3, 4), [6])
    with pytest.raises(ValueError, match="not 2D or 3D"):
        dw.upsample2x_relu(x)
    with pytest.raises(ValueError, match="1×1 head"):
        dw.upsample2x_relu_pointwise(torch.randn(1, 2, 3, 4, device=DEVICE), torch.randn(3, 4, device=DEVICE), None)


@pytest.mark.parametrize("shape,size,align_corners,relu", [
    ((2, 3, 3, 3, 3), [6, 6, 6], False, True),  # the decoder's case
    ((1, 2, 5, 3, 4), [9, 7, 8], True, False),
    ((1, 2, 4, 6), [7, 12], False, True),  # 2D
    ((2, 1, 5), [11], False, False),  # 1D
])
def test_linear_upsample_is_interpolate(shape, size, align_corners, relu):
    """upsample_relu's kernel: F.interpolate (+ ReLU), in the input's dtype."""
    from ul3d.networks.nets._lean import upsample_relu

    torch.manual_seed(0)
    x = torch.randn(*shape, device=DEVICE)
    mode = ("linear", "bilinear", "trilinear")[len(shape) - 3]
    with torch.no_grad():
        ref = F.interpolate(x, size=size, mode=mode, align_corners=align_corners)
        ref = ref.relu() if relu else ref
        got = upsample_relu(x, size, relu=relu, align_corners=align_corners, triton=True)
        again = upsample_relu(x * 2, size, relu=relu, align_corners=align_corners, triton=True)  # cached tables
    assert got.dtype == x.dtype
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(again, ref * 2)


@pytest.mark.parametrize("shape,ceil_mode", [
    ((2, 3, 6, 8, 10), False),  # the network's case
    ((1, 2, 7, 5, 9), True),  # odd sizes: windows cut by the input's end
    ((1, 2, 7, 5, 9), False),  # odd sizes: the last row dropped
    ((2, 3, 9, 6), True),  # 2D
    ((1, 2, 11), False),  # 1D
])
def test_max_pool_2x_is_the_plain_pool(shape, ceil_mode):
    torch.manual_seed(0)
    dims = len(shape) - 2
    pool = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[dims - 1](2, ceil_mode=ceil_mode)
    x = torch.randn(*shape, device=DEVICE)
    x.view(-1)[3] = float("nan")  # NaN propagates as in PyTorch
    with torch.no_grad():
        got, ref = max_pool_2x(x, pool), pool(x)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert torch.equal(got.isnan(), ref.isnan()) and ref.isnan().any()
    assert torch.equal(got.nan_to_num(), ref.nan_to_num())


def test_max_pool_2x_leaves_what_it_does_not_compute(monkeypatch):
    """Another window, stride or padding, indices, autograd on, float64: the pool itself."""
    kernels = dw._kernels()
    calls = []
    monkeypatch.setattr(dw, "_kernels", lambda: calls.append(1) or kernels)
    x = torch.randn(1, 2, 6, 6, 6, device=DEVICE)
    for pool in (nn.MaxPool3d(3, 2), nn.MaxPool3d(2, 1), nn.MaxPool3d(2, padding=1), nn.MaxPool3d(2, dilation=2),
                 nn.MaxPool3d(2, return_indices=True), nn.AvgPool3d(2)):
        with torch.no_grad():
            got, ref = max_pool_2x(x, pool), pool(x)
        torch.testing.assert_close(got, ref)
    with torch.enable_grad():
        torch.testing.assert_close(max_pool_2x(x.requires_grad_(), nn.MaxPool3d(2)), nn.MaxPool3d(2)(x))
    with torch.no_grad():
        torch.testing.assert_close(max_pool_2x(x.double(), nn.MaxPool3d(2)), nn.MaxPool3d(2)(x.double()))
    assert calls == []


@cuda_only
@pytest.mark.parametrize("variant", ["T", "base"])
def test_network_inference_kernels_on_cuda(variant):
    """UltraLightUNet3D at 4 × 64³: fp32 within 1e-4 of the plain network, under bf16 autocast within 2 % of the
    output's range."""
    from ul3d.networks import get_network

    torch.manual_seed(0)
    net = get_network("ultralightunet", variant, spatial_dims=3, in_channels=1, out_channels=3, init="default")
    net = _randomise_batchnorm(net).cuda().eval()
    fast = accelerate(fold_batchnorm(net), triton=True, fused_mkdc=False)
    x = torch.randn(4, 1, 64, 64, 64, device="cuda")
    with torch.no_grad():
        a, b = net(x), fast(x)
        assert (a - b).abs().max() <= 1e-4 * max(1.0, a.abs().max().item())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            c = fast(x)
    assert c.dtype == torch.bfloat16
    assert (c.float() - a).abs().max() <= 0.02 * (a.max() - a.min())
