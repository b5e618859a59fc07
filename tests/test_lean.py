"""The memory-lean pieces of ``use_checkpoint`` training (issue 7): each computes the plain modules' function."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ul3d.networks.blocks import MKIR
from ul3d.networks.nets._lean import max_pool_keeping_indices, slab_rows, upsample_relu_head

MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def _saved_storages(fn, *args):
    """(output, {storage pointer: bytes}) of the tensors autograd keeps for backward while computing ``fn(*args)``."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, kept


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("sizes", [(6, 12), (6, 11), (5, 5), (7, 3)])
def test_upsample_relu_head_is_the_plain_function_with_its_gradients(dims, align_corners, sizes):
    """Values and gradients (input and head parameters) of the slab-by-slab, checkpointed computation equal the
    plain ``head(relu(F.interpolate(x)))`` in float64, for upsampling, same-size and downsampling, several slabs."""
    torch.manual_seed(0)
    n_in, n_out = sizes
    x = torch.randn(2, 3, n_in, *([4] * (dims - 1)), dtype=torch.float64, requires_grad=True)
    size = [n_out] + [7] * (dims - 1)
    head = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1](3, 2, 1).double()
    ref_head = copy.deepcopy(head)
    slab = 2 * 3 * 2 * 7 ** (dims - 1)  # two output rows per slab
    assert slab_rows(n_out, 2 * 3 * 7 ** (dims - 1), slab) == min(2, n_out)
    got = upsample_relu_head(x, size, head, align_corners=align_corners, slab_elements=slab, checkpointed=True)
    xr = x.detach().clone().requires_grad_(True)
    ref = ref_head(torch.relu(F.interpolate(xr, size=size, mode=MODES[dims], align_corners=align_corners)))
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    g = torch.randn_like(ref)
    got.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=1e-12)
    for p, q in zip(head.parameters(), ref_head.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12)


def test_upsample_relu_head_keeps_only_its_input_and_matches_in_float32_and_without_relu():
    """Checkpointed, only the low-resolution input is kept for backward (no full-resolution tensor); in float32 the
    result is within 1e-5 of the plain path; ``relu=False`` skips the ReLU."""
    torch.manual_seed(1)
    x = torch.randn(2, 4, 8, 8, 8, requires_grad=True)
    head = nn.Conv3d(4, 3, 1)
    out, kept = _saved_storages(lambda: upsample_relu_head(x, [16, 16, 16], head, slab_elements=2 * 4 * 2 * 256,
                                                           checkpointed=True))
    assert out.shape == (2, 3, 16, 16, 16)
    assert max(kept.values()) <= x.numel() * 4, kept  # the input (and small index tensors), nothing at 16³
    ref = head(torch.relu(F.interpolate(x, size=[16, 16, 16], mode="trilinear")))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    plain = head(F.interpolate(x, size=[16, 16, 16], mode="trilinear"))
    torch.testing.assert_close(upsample_relu_head(x, [16, 16, 16], head, relu=False), plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("shape", [8, 7])
def test_max_pool_keeping_indices_is_max_pool_without_keeping_its_input(dims, shape):
    """Same values and gradients as ``MaxPool`` (ceil mode, odd sizes too), and the input is not kept for backward."""
    torch.manual_seed(2)
    pool = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[dims - 1](kernel_size=2, stride=2, ceil_mode=True)
    x = torch.randn(2, 3, *([shape] * dims), requires_grad=True)
    y, kept = _saved_storages(max_pool_keeping_indices, x, pool)
    assert x.untyped_storage().data_ptr() not in kept
    xr = x.detach().clone().requires_grad_(True)
    ref = pool(xr)
    assert torch.equal(y, ref)
    g = torch.randn_like(ref)
    y.backward(g)
    ref.backward(g)
    assert torch.equal(x.grad, xr.grad)


def test_max_pool_keeping_indices_falls_back_to_the_pool_for_overlapping_windows():
    pool = nn.MaxPool3d(kernel_size=3, stride=2)
    x = torch.randn(1, 2, 9, 9, 9, requires_grad=True)
    y, kept = _saved_storages(max_pool_keeping_indices, x, pool)
    assert torch.equal(y, pool(x))
    assert x.untyped_storage().data_ptr() in kept  # PyTorch's own max-pool backward
    with torch.no_grad():
        assert torch.equal(max_pool_keeping_indices(x, pool), pool(x))


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_mkir_forward_lean_is_forward_with_the_same_gradients_and_running_statistics(dims, momentum):
    """The stem's merged project + BatchNorm + shortcut: over two training steps in float64 the same outputs,
    gradients of every parameter and input, running statistics and batch counts as :meth:`MKIR.forward`; fewer bytes
    kept for backward; eval mode is ``forward``."""
    torch.manual_seed(3)
    block = MKIR(dims, 1, 16).double().train()
    for m in block.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    assert block.lean_unsupported() is None
    ref = copy.deepcopy(block)
    for _ in range(2):
        x = torch.randn(2, 1, *([10] * dims), dtype=torch.float64, requires_grad=True)
        xr = x.detach().clone().requires_grad_(True)
        y, kept = _saved_storages(block.forward_lean, x)
        yr, kept_ref = _saved_storages(ref, xr)
        torch.testing.assert_close(y, yr, rtol=0, atol=1e-10)
        assert sum(kept.values()) < sum(kept_ref.values())
        g = torch.randn_like(yr)
        y.backward(g)
        yr.backward(g)
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-8, atol=1e-10)
    for (name, p), q in zip(ref.named_parameters(), block.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-8, atol=1e-10, msg=name)
    for (name, p), q in zip(ref.named_buffers(), block.buffers()):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12, msg=name)
    assert int(block.project.adn.N.num_batches_tracked) == 2
    block.eval()
    ref.eval()
    x = torch.randn(1, 1, *([10] * dims), dtype=torch.float64)
    torch.testing.assert_close(block.forward_lean(x), ref(x), rtol=0, atol=1e-12)  # running stats differ by rounding


def test_mkir_forward_lean_float32_and_autocast():
    """float32 within 1e-4 of ``forward`` (the issue's tolerance); under bfloat16 autocast within bfloat16 rounding."""
    torch.manual_seed(4)
    block = MKIR(3, 1, 16).train()
    ref = copy.deepcopy(block)
    x = torch.randn(2, 1, 12, 12, 12)
    torch.testing.assert_close(block.forward_lean(x), ref(x), rtol=0, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = block.forward_lean(x), ref(x)
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)


def test_mkir_forward_lean_says_why_it_runs_the_plain_forward():
    """Identity shortcut (16 → 16), instance norm, or a block as wide inside as outside: the plain forward."""
    assert "identity" in MKIR(3, 16, 16).lean_unsupported()
    assert "BatchNorm" in MKIR(3, 1, 16, norm="instance").lean_unsupported()
    assert "narrower" in MKIR(3, 8, 16).lean_unsupported()
    block = MKIR(3, 8, 16).train()
    x = torch.randn(2, 8, 6, 6, 6)
    torch.manual_seed(5)
    ref = copy.deepcopy(block)
    torch.testing.assert_close(block.forward_lean(x), ref(x), rtol=0, atol=0)


@pytest.mark.parametrize("act", ["relu6", "relu", "hardtanh", "leakyrelu"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_act_is_adn_keeping_only_its_input(act, momentum):
    """BatchNorm + activation of a MONAI Convolution block: the same values, gradients (input, weight, bias) and
    running statistics as ``adn`` over two steps in float64, with only the input (and per-channel statistics) kept
    for backward; eval mode and autograd off run ``adn``."""
    from monai.networks.blocks import Convolution

    from ul3d.networks.blocks.multikernel import batchnorm_act

    torch.manual_seed(6)
    block = Convolution(3, 4, 4, kernel_size=1, norm="batch", act="relu" if act == "hardtanh" else act).double().train()
    if act == "hardtanh":
        block.adn.A = nn.Hardtanh(-1.0, 2.0)
    block.adn.N.momentum = momentum
    nn.init.uniform_(block.adn.N.weight, 0.5, 1.5)
    nn.init.uniform_(block.adn.N.bias, -0.5, 0.5)
    ref = copy.deepcopy(block.adn)
    for _ in range(2):
        z = (3 * torch.randn(2, 4, 5, 5, 5, dtype=torch.float64)).requires_grad_(True)
        zr = z.detach().clone().requires_grad_(True)
        y, kept = _saved_storages(batchnorm_act, z, block.adn)
        yr = ref(zr)
        torch.testing.assert_close(y, yr, rtol=0, atol=1e-12)
        if act != "leakyrelu":  # not a clamp: adn itself runs
            assert sum(kept.values()) < z.numel() * 8 + 1024  # z itself and per-channel statistics
        g = torch.randn_like(yr)
        y.backward(g)
        yr.backward(g)
        torch.testing.assert_close(z.grad, zr.grad, rtol=0, atol=1e-12)
    for p, q in zip(block.adn.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-12)
    for p, q in zip(block.adn.buffers(), ref.buffers()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)
    block.eval()
    ref.eval()
    z = torch.randn(1, 4, 3, 3, 3, dtype=torch.float64)
    assert torch.equal(batchnorm_act(z, block.adn), ref(z))
    with torch.no_grad():
        block.train()
        ref.train()
        assert torch.equal(batchnorm_act(z, block.adn), ref(z))


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_mkdc_and_mkir_forward_lean_keep_less_for_a_wide_block(norm):
    """A 16 → 32 MKIR (not merged): ``forward_lean`` gives the same outputs and gradients as ``forward`` and keeps
    fewer bytes with BatchNorm; with InstanceNorm it is the plain forward (nothing to save)."""
    torch.manual_seed(7)
    block = MKIR(3, 16, 32, norm=norm).double().train()
    ref = copy.deepcopy(block)
    x = torch.randn(2, 16, 8, 8, 8, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y, kept = _saved_storages(block.forward_lean, x)
    yr, kept_ref = _saved_storages(ref, xr)
    torch.testing.assert_close(y, yr, rtol=0, atol=1e-12)
    if norm == "batch":
        assert sum(kept.values()) < 0.75 * sum(kept_ref.values()), (sum(kept.values()), sum(kept_ref.values()))
    g = torch.randn_like(yr)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=1e-12)
    for (name, p), q in zip(ref.named_parameters(), block.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-12, msg=name)
    for (name, p), q in zip(ref.named_buffers(), block.buffers()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-14, msg=name)


def _bounded(module):
    """Weights bounded away from 0 (see test_fast._bounded_init): fp32 differences then reflect rounding, not a
    near-zero conv weight ahead of BatchNorm."""
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.sign(torch.randn_like(p)) * torch.empty_like(p).uniform_(0.5, 1.0) / fan_in**0.5)
    return module


def test_use_checkpoint_float32_within_1e_4_and_as_accurate_as_the_plain_network():
    """float32 training forward and backward: T (bounded weights) within 1e-4 of the plain network in outputs and
    every gradient (or, where the plain gradient is itself further from float64, no further from it than the plain);
    S, where the plain network's own float32 gradients are up to ~4e-2 off (BatchNorm over few voxels), about as far
    from the float64 result as the plain network is (median relative gradient error within 3× the plain network's,
    outputs within 2× its error plus 1e-4)."""
    from ul3d.networks import get_network

    def run(variant):
        torch.manual_seed(0)
        ref = _bounded(get_network("ultralightunet", variant, spatial_dims=3, in_channels=1, out_channels=3)).train()
        lean, truth = copy.deepcopy(ref), copy.deepcopy(ref).double()
        lean.use_checkpoint = True
        x = torch.randn(2, 1, 32, 32, 32) * 2 + 0.5
        outs = []
        for net, inp in ((ref, x), (lean, x), (truth, x.double())):
            out = net(inp)
            out.square().mean().backward()
            outs.append(out.double())
        grads = [[p.grad.double() for p in net.parameters()] for net in (ref, lean, truth)]
        return outs, grads

    (a, b, _), (ga, gb, gt) = run("T")
    assert (a - b).abs().max() <= 1e-4
    for p, q, t in zip(ga, gb, gt):
        # within 1e-4 of the plain gradient; where the plain network's own float32 gradient is further than that from
        # float64 (on an AVX2-only CPU oneDNN's backward kernels put one 4e-4 off, the lean one 4e-6), no further
        # from float64 than the plain one
        assert (p - q).abs().max() <= 1e-4 or (q - t).abs().max() <= max((p - t).abs().max(), 1e-4)
    (a, b, t), (ga, gb, gt) = run("S")
    assert (b - t).abs().max() <= 2 * (a - t).abs().max() + 1e-4  # within the plain error band plus the tolerance
    # per-parameter relative error against float64, median over the parameters (the largest single errors sit in a
    # few ill-conditioned gradients and vary with any change of summation order, plain or lean)
    def median_error(grads):
        errs = sorted(((g - t).norm() / t.norm()).item() for g, t in zip(grads, gt) if t.norm() > 1e-8)
        return errs[len(errs) // 2]

    plain, lean = median_error(ga), median_error(gb)
    assert plain > 1e-6 and lean <= 3 * plain, (lean, plain)


@pytest.fixture
def no_tf32():
    """cuDNN / cuBLAS in full float32 (TF32 would add ~1e-3 relative noise to every comparison)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernels", [False, True])
def test_use_checkpoint_on_cuda_is_as_accurate_as_the_plain_network(kernels, no_tf32):
    """On CUDA (cuDNN, and ul3d's Triton depth-wise kernels with ``kernels``) the lean checkpointed network's float32
    outputs and gradients are no further from the float64 plain network than the float32 plain network's are (2×);
    under bfloat16 autocast the loss agrees within bfloat16 rounding."""
    from ul3d.networks import get_network
    from ul3d.networks.depthwise import triton_available
    from ul3d.networks.fast import accelerate

    if kernels and not triton_available("cuda"):
        pytest.skip("needs Triton")
    torch.manual_seed(8)
    ref = _bounded(get_network("ultralightunet", "T", spatial_dims=3, in_channels=1, out_channels=3)).cuda().train()
    lean, truth = copy.deepcopy(ref), copy.deepcopy(ref).double()
    lean.use_checkpoint = True
    if kernels:
        accelerate(lean, fused_mkdc=False, triton=True, pointwise_matmul=True)
    x = torch.randn(2, 1, 48, 48, 48, device="cuda") * 2 + 0.5
    outs = []
    for net, inp in ((ref, x), (lean, x), (truth, x.double())):
        out = net(inp)
        out.square().mean().backward()
        outs.append(out.double())
    a, b, t = outs
    assert (b - t).abs().max() <= 2 * (a - t).abs().max() + 1e-5
    err = [max((p.grad.double() - q.grad).abs().max().item() for p, q in zip(net.parameters(), truth.parameters()))
           for net in (ref, lean)]
    assert err[1] <= 2 * err[0] + 1e-5, err
    with torch.autocast("cuda", dtype=torch.bfloat16):
        la, lb = ref(x).float().square().mean(), lean(x).float().square().mean()
    torch.testing.assert_close(lb, la, rtol=0.02, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_use_checkpoint_training_step_captures_as_a_cuda_graph(no_tf32):
    """The lean checkpointed forward + backward captures as one CUDA graph, as ``ul3d train``'s ``train.cuda_graph``
    needs (no host round trip, no host-to-device copy); a replay gives the gradients of an eager pass from the same
    state, and the BatchNorm running statistics advance once per replay."""
    from ul3d.networks import get_network

    torch.manual_seed(9)
    net = _bounded(get_network("ultralightunet", "T", spatial_dims=3, in_channels=1, out_channels=3)).cuda().train()
    net.use_checkpoint = True
    eager = copy.deepcopy(net)
    x = torch.randn(2, 1, 32, 32, 32, device="cuda") * 2 + 0.5

    def step(model):
        for p in model.parameters():
            p.grad = None
        model(x).square().mean().backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (cuDNN, Triton) outside the capture, on both copies
        step(net)
        step(eager)
    torch.cuda.current_stream().wait_stream(side)
    for p in net.parameters():
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        net(x).square().mean().backward()
    graph.replay()
    step(eager)
    torch.cuda.synchronize()
    for (name, p), q in zip(net.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=name)
    bn = net.encoder[0].block.project.adn.N
    assert int(bn.num_batches_tracked) == int(eager.encoder[0].block.project.adn.N.num_batches_tracked) == 2


def test_use_checkpoint_runs_the_lean_paths_in_forward_and_in_the_recomputation(monkeypatch):
    """A checkpointed training step of the 3D network goes through every lean piece, in the forward and again in the
    backward's recomputation: each MKIR's ``forward_lean`` (the stem merged), ``batchnorm_act``, the slab-wise last
    stage and the index-only max-pool; eval mode and ``use_checkpoint=False`` go through none of them."""
    from ul3d.networks import get_network
    from ul3d.networks.blocks import multikernel
    from ul3d.networks.nets import ultralightunet

    calls = {"lean": 0, "merged": 0, "bn_act": 0, "slabs": 0, "pool": 0}

    def spy(key, fn, method=False):
        def wrapped(*args, **kwargs):
            calls[key] += 1
            if key == "lean" and args[0].lean_unsupported() is None:
                calls["merged"] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(MKIR, "forward_lean", spy("lean", MKIR.forward_lean))
    monkeypatch.setattr(multikernel, "batchnorm_act", spy("bn_act", multikernel.batchnorm_act))
    monkeypatch.setattr(ultralightunet, "upsample_relu_head", spy("slabs", ultralightunet.upsample_relu_head))
    monkeypatch.setattr(ultralightunet, "max_pool_keeping_indices",
                        spy("pool", ultralightunet.max_pool_keeping_indices))
    net = get_network("ultralightunet", "T", spatial_dims=3, in_channels=1, out_channels=3).train()
    x = torch.randn(2, 1, 32, 32, 32)
    net(x).sum().backward()
    assert calls == {"lean": 0, "merged": 0, "bn_act": 0, "slabs": 0, "pool": 0}  # not checkpointed: plain modules
    net.use_checkpoint = True
    out = net(x)
    forward = dict(calls)
    # 5 encoder + 5 decoder MKIRs; 4 BatchNorm+ReLU6 per MKIR (expand, three branches); the stem merged; one slab
    # call; 5 pools
    assert forward == {"lean": 10, "merged": 1, "bn_act": 40, "slabs": 1, "pool": 5}, forward
    out.sum().backward()
    assert calls["lean"] == 20 and calls["bn_act"] == 80 and calls["merged"] == 2 and calls["pool"] == 10, calls
    net.eval()
    with torch.no_grad():
        net(x)
    assert calls["lean"] == 20 and calls["slabs"] == 1
