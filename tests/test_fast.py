"""Fast paths compute the same function as the plain modules."""

import pytest
import torch
from torch import nn

from ul3d.networks import get_network
from ul3d.networks.fast import fold_batchnorm


def _with_statistics(net, shape):
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(shape) * 3 + 1)
    return net.eval()


@pytest.mark.parametrize("name,variant,dims", [("ultralightunet", "T", 3), ("ultralightunet", "base", 2),
                                               ("aulunet", "base", 3)])
def test_fold_batchnorm_is_the_same_function(name, variant, dims):
    shape = (2, 1) + (48,) * dims
    net = _with_statistics(get_network(name, variant, spatial_dims=dims, in_channels=1, out_channels=3,
                                       **({"init": "default"} if name == "ultralightunet" else {})), shape)
    fast = fold_batchnorm(net)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fast.modules())
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())  # original untouched
    x = torch.randn(shape)
    with torch.no_grad():
        ref, out = net(x), fast(x)
    assert ref.abs().max() > 1e-2
    assert (ref - out).abs().max() <= 1e-4


def test_fold_batchnorm_leaves_instance_norm_alone():
    net = get_network("ultralightunet", "T", spatial_dims=3, in_channels=1, out_channels=2, norm="instance").eval()
    fast = fold_batchnorm(net)
    x = torch.randn(1, 1, 64, 64, 64)  # instance norm needs > 1 voxel at the 1/32 bottleneck
    with torch.no_grad():
        assert torch.allclose(net(x), fast(x), atol=1e-5)


# --- fused MKDC (issue 7) --------------------------------------------------------------------------------------------

import copy

from ul3d.networks.blocks.multikernel import MKDC, MKIR
from ul3d.networks.fast import accelerate, fused_mkdc_count, plain
from ul3d.networks.nets.ultralightunet import ULTRALIGHTUNET_VARIANTS


@torch.no_grad()
def _bounded_init(module):
    """Weights bounded away from 0 (|w| in [0.5, 1]/sqrt(fan-in)): a conv followed by BatchNorm has gradients
    ∝ 1/|w|, so a near-zero init weight would turn fp32 rounding into a >1e-4 "difference"."""
    for p in module.parameters():
        fan_in = p[0].numel() if p.dim() > 1 else 1
        p.copy_(torch.sign(torch.randn_like(p)) * torch.empty_like(p).uniform_(0.5, 1.0) / fan_in**0.5)
    return module


def _pair(module, **flags):
    """(plain, fused) copies of ``module`` with identical parameters and buffers."""
    _bounded_init(module)
    fused = accelerate(copy.deepcopy(module), **flags)
    return module, fused


def _compare(ref_mod, fast_mod, shape, train):
    ref_mod.train(train)
    fast_mod.train(train)
    for _ in range(2):  # twice: the running statistics must evolve identically
        x = torch.randn(shape) * 2 + 0.5
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref, out = ref_mod(x1), fast_mod(x2)
        assert ref.abs().max() > 1e-2
        assert (ref - out).abs().max() <= 1e-4
        g = torch.randn_like(ref)
        ref.backward(g)
        out.backward(g)
        assert (x1.grad - x2.grad).abs().max() <= 1e-4
        for (name, p), q in zip(ref_mod.named_parameters(), fast_mod.parameters()):
            assert p.grad is not None and q.grad is not None, name
            assert (p.grad - q.grad).abs().max() <= 1e-4, name
        ref_mod.zero_grad()
        fast_mod.zero_grad()
    for (name, b), c in zip(ref_mod.named_buffers(), fast_mod.buffers()):
        assert torch.equal(b, c) if not b.is_floating_point() else (b - c).abs().max() <= 1e-5, name
    assert ref_mod.state_dict().keys() == fast_mod.state_dict().keys()


@pytest.mark.parametrize("kernels", [(1, 3, 5), (3,), (1, 3, 5, 7)])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("unit_scale", [True, False])
def test_fused_mkdc_is_the_same_function(kernels, dims, train, unit_scale):
    ref, fast = _pair(MKDC(dims, 6, kernels=kernels, shuffle_groups=2), unit_scale=unit_scale)
    assert fast.fused and not ref.fused and fast.fused_unsupported() is None
    _compare(ref, fast, (2, 6) + (7,) * dims, train)


@pytest.mark.parametrize("norm", ["instance", ("instance", {"affine": True}), ("batch", {"momentum": None})])
def test_fused_mkdc_other_norms(norm):
    ref, fast = _pair(MKDC(3, 4, kernels=(1, 3, 5), norm=norm))
    assert fast.fused_unsupported() is None
    _compare(ref, fast, (2, 4, 6, 6, 6), True)


def test_fused_mkdc_recompute_saves_nothing_extra_and_updates_stats_once():
    ref, fast = _pair(MKIR(3, 4, 8, kernels=(1, 3, 5)), recompute=True)
    _compare(ref, fast, (2, 4, 6, 6, 6), True)
    assert int(fast.mkdc.branches[0].adn.N.num_batches_tracked) == 2


def test_unsupported_configurations_fall_back_to_plain():
    for block in (MKDC(3, 4, parallel=False), MKDC(3, 4, act="gelu"),
                  MKDC(3, 4, norm=("instance", {"track_running_stats": True}))):
        ref, fast = _pair(block)
        assert fast.fused and fast.fused_unsupported() is not None
        _compare(ref, fast, (2, 4, 6, 6, 6), True)


@pytest.mark.parametrize("variant", list(ULTRALIGHTUNET_VARIANTS))
def test_accelerate_keeps_parameters_and_keys(variant):
    net = get_network("ultralightunet", variant, spatial_dims=3, in_channels=1, out_channels=3)
    keys, count = list(net.state_dict()), sum(p.numel() for p in net.parameters())
    fast = accelerate(net, copy_model=True, channels_last=True)
    assert list(fast.state_dict()) == keys and sum(p.numel() for p in fast.parameters()) == count
    n_fused, n_all = fused_mkdc_count(fast)
    assert n_fused == n_all > 0 and fused_mkdc_count(net)[0] == 0
    fast.load_state_dict(net.state_dict())  # checkpoints load both ways
    net.load_state_dict(fast.state_dict())
    assert fused_mkdc_count(plain(fast))[0] == 0


@pytest.mark.parametrize("dims,train", [(3, True), (3, False), (2, True)])
def test_fused_network_is_the_same_function(dims, train):
    """Whole network. In training the 1/32 bottleneck holds 1 voxel × batch 2, so its BatchNorm amplifies rounding:
    even plain fp32 differs from plain fp64 by ~1e-4 there. Training is compared in fp64 (tight), eval in fp32."""
    torch.manual_seed(0)
    dtype, tol = (torch.float64, 1e-8) if train else (torch.float32, 1e-4)
    net = _bounded_init(get_network("ultralightunet", "T", spatial_dims=dims, in_channels=1, out_channels=3))
    if not train:
        net = _with_statistics(net, (2, 1) + (32,) * dims)
    net = net.to(dtype)
    fast = accelerate(copy.deepcopy(net))
    net.train(train)
    fast.train(train)
    x = torch.randn((2, 1) + (32,) * dims, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, out = net(x1), fast(x2)
    assert (ref - out).abs().max() <= tol
    ref.square().mean().backward()
    out.square().mean().backward()
    assert (x1.grad - x2.grad).abs().max() <= tol
    for (name, p), q in zip(net.named_parameters(), fast.parameters()):
        assert (p.grad - q.grad).abs().max() <= tol, name
    for (name, b), c in zip(net.named_buffers(), fast.buffers()):
        assert torch.allclose(b.double(), c.double(), atol=tol), name


def test_channels_last_fused_network_matches():
    torch.manual_seed(0)
    net = _with_statistics(get_network("ultralightunet", "T", spatial_dims=3, in_channels=1, out_channels=3,
                                       init="default"), (2, 1, 32, 32, 32))
    fast = accelerate(copy.deepcopy(net), channels_last=True)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        ref, out = net(x), fast(x.to(memory_format=torch.channels_last_3d))
    assert (ref - out).abs().max() <= 1e-4


def test_fused_mkdc_after_fold_batchnorm():
    torch.manual_seed(0)
    net = _with_statistics(_bounded_init(MKIR(3, 4, 8, kernels=(1, 3, 5))), (2, 4, 6, 6, 6))
    folded = fold_batchnorm(net)
    fast = accelerate(net, fold_bn=True)
    assert fast.mkdc.fused and fast.mkdc.fused_unsupported() is None
    x = torch.randn(2, 4, 6, 6, 6)
    with torch.no_grad():
        ref, a, b = net(x), folded(x), fast(x)
    assert (ref - a).abs().max() <= 1e-4 and (ref - b).abs().max() <= 1e-4


# --- ul3d predict picks a fast path with the plain path's output ------------------------------------------------------


@pytest.fixture(scope="module")
def prostate_checkpoint(tmp_path_factory):
    from ul3d.config import load_config
    from ul3d.data.synth import write_synthetic
    from ul3d.engine.train import train

    tmp = tmp_path_factory.mktemp("fastpath")
    data = write_synthetic("msd-prostate", tmp / "data", n_cases=2, seed=5)
    cfg = load_config("prostate", ["network.variant=T", "train.roi_size=[32,32,32]", "train.iterations=2",
                                   "train.val_interval=2", "train.num_samples=2", "data.num_workers=0",
                                   "infer.sw_batch_size=2", "infer.overlap=0.25", "data.spacing=[1.2,1.2,3.6]"])
    return data, train(cfg, data, tmp / "run", device="cpu").last_checkpoint


def test_predict_default_path_matches_plain(prostate_checkpoint):
    import numpy as np

    from ul3d.data.datasets import load_dataset
    from ul3d.engine.infer import Predictor

    data, ckpt = prostate_checkpoint
    image = load_dataset(data).training[0]["image"]
    auto, ref = Predictor([ckpt], device="cpu"), Predictor([ckpt], device="cpu", path="plain")
    assert auto.path == "cpu channels_last + folded BatchNorm + outer-product stem + in-place + merged pointwise" and ref.path == "cpu fp32 plain"
    assert "path: cpu channels_last" in auto.description
    (labels, probs), (ref_labels, ref_probs) = auto.predict_file(image), ref.predict_file(image)
    assert np.abs(probs - ref_probs).max() <= 1e-4
    for path in ("fused", "onnxruntime"):
        other = Predictor([ckpt], device="cpu", path=path)
        assert "fused MKDC" in other.path
        assert np.abs(other.predict_file(image)[1] - ref_probs).max() <= 1e-4
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Predictor([ckpt], device="cpu", path="cuda_graph")
    top2 = np.sort(ref_probs, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-3  # argmax is defined up to fp32 rounding only where two classes tie
    assert clear.mean() > 0.99 and np.array_equal(labels[clear], ref_labels[clear])
    assert np.array_equal(labels, ref_labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_predict_cuda_paths_agree(prostate_checkpoint):
    """On CUDA, the default path and the CUDA-graph path give the fp32 plain probabilities within bf16 precision."""
    import numpy as np

    from ul3d.data.datasets import load_dataset
    from ul3d.engine.infer import Predictor

    data, ckpt = prostate_checkpoint
    image = load_dataset(data).training[0]["image"]
    ref = Predictor([ckpt], device="cuda", path="plain").predict_file(image)[1]
    for path in ("auto", "cuda_graph"):
        predictor = Predictor([ckpt], device="cuda", path=path)
        assert np.abs(predictor.predict_file(image)[1] - ref).max() <= 3e-2, predictor.path


def test_mkdc_float32_is_the_same_function_and_runs_in_float32_under_autocast():
    from ul3d.networks.blocks.multikernel import MKDC

    torch.manual_seed(0)
    plain_block = MKDC(3, 8).eval()
    fast = accelerate(copy.deepcopy(plain_block), fused_mkdc=False, mkdc_float32=True)
    x = torch.randn(2, 8, 12, 12, 12)
    assert torch.equal(fast(x), plain_block(x))  # no autocast: the plain forward, bit for bit
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fast(x.bfloat16())
        y_bf16 = plain_block(x.bfloat16())
    assert y.dtype == torch.float32 and y_bf16.dtype == torch.bfloat16
    assert (y - plain_block(x.bfloat16().float())).abs().max().item() < 1e-5  # float32 math on the bf16 input
    torch.jit.script(fast)  # TorchScript keeps the plain path


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("train", [True, False])
def test_outer_product_stem_is_the_same_function(dims, train):
    """MKIR with a one-channel input: expand and shortcut 1×1 convs as broadcast multiplies (the CPU default of
    ul3d predict); output, gradients and running statistics as plain. Wider inputs keep the plain forward."""
    ref, fast = _pair(MKIR(dims, 1, 8), outer_product=True, fused_mkdc=False)
    assert fast.outer_product
    _compare(ref, fast, (2, 1) + (6,) * dims, train)
    wide = accelerate(MKIR(dims, 2, 8), outer_product=True, fused_mkdc=False).eval()
    x = torch.randn((1, 2) + (6,) * dims)
    torch.testing.assert_close(wide(x), wide.project(wide.mkdc(wide.expand(x))) + wide.shortcut(x))


def test_outer_product_inplace_folded_batchnorm_channels_last_network():
    net = _with_statistics(get_network("ultralightunet", "T", spatial_dims=3, in_channels=1, out_channels=3,
                                       init="default"), (2, 1, 32, 32, 32))
    fast = accelerate(net, fold_bn=True, channels_last=True, outer_product=True, fused_mkdc=False, inplace=True)
    assert all(m.inplace for m in fast.modules() if isinstance(m, (nn.ReLU, nn.ReLU6)))
    assert not any(m.inplace for m in net.modules() if isinstance(m, (nn.ReLU, nn.ReLU6)))  # the input model unchanged
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert (net(x) - fast(x.to(memory_format=torch.channels_last_3d))).abs().max() <= 1e-4


def test_merged_network_stays_channels_last_for_a_batch_of_one(monkeypatch):
    """A one-window batch keeps channels-last through every GAG on ``ul3d predict``'s CPU path (oneDNN's 1×1 convs
    return a batch of one channels-first; the decoder then ran its slow channels-first kernels and the GAGs their
    grouped convs), and the output is the plain network's."""
    from ul3d.networks.blocks import GAG
    from ul3d.networks.blocks.multikernel import is_channels_last

    net = _with_statistics(get_network("ultralightunet", "T", spatial_dims=3, in_channels=1, out_channels=3,
                                       init="default"), (2, 1, 32, 32, 32))
    fast = accelerate(copy.deepcopy(net), fold_bn=True, channels_last=True, outer_product=True, fused_mkdc=False,
                      inplace=True, merge_pointwise=True)
    x = torch.randn(1, 1, 64, 64, 64)  # a 2³ bottleneck (a 1³ one has no layout to keep)
    with torch.no_grad():
        ref = net.eval()(x)
    layouts, forward = [], GAG.forward
    monkeypatch.setattr(GAG, "forward", lambda self, g, x: layouts.append((is_channels_last(g), is_channels_last(x)))
                        or forward(self, g, x))
    with torch.no_grad():
        out = fast(x.contiguous(memory_format=torch.channels_last_3d))
    assert len(layouts) == 4 and all(g and s for g, s in layouts), layouts
    assert (out - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("dims,variant", [(3, "S"), (2, "base")])
def test_merge_pointwise_is_the_same_function(dims, variant, monkeypatch):
    """accelerate(merge_pointwise=True) on the CPU inference path: the shuffle folded into the project conv, the
    one-channel stem's project + shortcut as one product, the GAGs' grouped convs as depth-wise convs plus a channel
    sum, the 3D spatial-attention conv as 2D convs over depth slices, the last stage's upsampling + ReLU + head slab
    by slab (channels-last slabs in 3D): each merged path runs, the output is the plain network's within 1e-4, and
    training is untouched."""
    from ul3d.networks.blocks import GAG, MKIR
    from ul3d.networks.nets import _lean

    net = _with_statistics(get_network("ultralightunet", variant, spatial_dims=dims, in_channels=1, out_channels=3,
                                       init="default"), (2, 1) + (32,) * dims)
    fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
    fast = accelerate(net, fold_bn=True, channels_last=True, outer_product=True, fused_mkdc=False, inplace=True,
                      merge_pointwise=True)
    from ul3d.networks.blocks import SpatialAttention

    calls = {"stem": 0, "mkir": 0, "gag": 0, "sa": 0, "slabs": 0}
    merged, gates, sliced = MKIR._forward_merged, GAG._gates_depthwise, SpatialAttention._conv3d_sliced
    slabs = _lean._channels_last_slabs

    def spy_slabs(*args):
        calls["slabs"] += 1
        return slabs(*args)

    monkeypatch.setattr(_lean, "_channels_last_slabs", spy_slabs)

    def spy_mkir(self, x, pool=None):
        if pool is None or (x.shape[1] == 1 and MKIR._pool_fits(pool, x)):  # not a call that comes back unpooled
            calls["stem" if x.shape[1] == 1 else "mkir"] += 1
        return merged(self, x, pool)

    def spy_gag(self, g, x):
        calls["gag"] += 1
        return gates(self, g, x)

    monkeypatch.setattr(MKIR, "_forward_merged", spy_mkir)
    monkeypatch.setattr(GAG, "_gates_depthwise", spy_gag)

    def spy_sa(self, desc):
        calls["sa"] += 1
        return sliced(self, desc)

    monkeypatch.setattr(SpatialAttention, "_conv3d_sliced", spy_sa)
    x = torch.randn((2, 1) + (32,) * dims)
    with torch.no_grad():
        ref, out = net(x), fast(x.contiguous(memory_format=fmt))
    assert calls == {"stem": 1, "mkir": 9, "gag": 4, "sa": 5 if dims == 3 else 0, "slabs": 1 if dims == 3 else 0}
    assert ref.abs().max() > 1e-2 and (ref - out).abs().max() <= 1e-4
    # with autograd on the merged paths stay off (the plain modules train)
    trained = accelerate(copy.deepcopy(net).train(), merge_pointwise=True, fused_mkdc=False)
    before = dict(calls)
    trained(x).sum().backward()
    assert calls == before


@pytest.mark.parametrize("batch,size", [(4, 16), (1, 16), (2, 15)])
def test_forward_pooled_stem_is_pool_of_the_block(batch, size):
    """The merged stem computed two depth slices at a time and max-pooled at once (packed batches, a single window,
    odd sizes falling back to the pool): exactly ``pool(block(x))``, channels-last; other blocks and autograd on are
    ``pool(block(x))`` too."""
    from ul3d.networks.blocks import MKIR

    torch.manual_seed(0)
    net = _with_statistics(get_network("ultralightunet", "S", spatial_dims=3, in_channels=1, out_channels=3,
                                       init="default"), (2, 1, 16, 16, 16))
    fast = accelerate(net, fold_bn=True, channels_last=True, outer_product=True, fused_mkdc=False, inplace=True,
                      merge_pointwise=True)
    x = torch.randn(batch, 1, size, size, size).contiguous(memory_format=torch.channels_last_3d)
    stem, pool = fast.encoder[0].block, fast.pool
    assert MKIR._pool_fits(pool, x) == (size % 2 == 0)
    with torch.no_grad():
        got, ref = stem.forward_pooled(x, pool), pool(stem(x))
        assert got.is_contiguous(memory_format=torch.channels_last_3d)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
        h = fast.encoder[1].block
        torch.testing.assert_close(h.forward_pooled(ref, pool), pool(h(ref)), rtol=0, atol=0)
    # with autograd on, the plain modules run: the same tensor as pool(block(x)), with a gradient
    grads = accelerate(copy.deepcopy(net).eval(), merge_pointwise=True, fused_mkdc=False)
    xt = torch.randn(2, 1, 16, 16, 16)
    a = grads.encoder[0].block.forward_pooled(xt, grads.pool)
    assert a.requires_grad and torch.equal(a, grads.pool(grads.encoder[0].block(xt)))


def test_inplace_is_inference_only_and_keeps_training_exact():
    """accelerate(inplace=True): sums accumulate in place only with autograd off; with autograd on (training) the
    forward and every gradient equal the plain network's."""
    from ul3d.networks.nets.ultralightunet import DecoderStage

    torch.manual_seed(0)
    net = _bounded_init(get_network("ultralightunet", "T", spatial_dims=3, in_channels=1, out_channels=3)).double()
    fast = accelerate(copy.deepcopy(net), inplace=True, fused_mkdc=False)
    assert all(m.inplace for m in fast.modules() if isinstance(m, (MKDC, MKIR, DecoderStage)))
    x = torch.randn(2, 1, 32, 32, 32, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    a, b = net(x1), fast(x2)
    assert (a - b).abs().max() <= 1e-10
    a.square().mean().backward()
    b.square().mean().backward()
    assert (x1.grad - x2.grad).abs().max() <= 1e-10
    for (name, p), q in zip(net.named_parameters(), fast.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-10, name
    net.eval(), fast.eval()
    with torch.no_grad():
        assert (net(x) - fast(x)).abs().max() <= 1e-10
    assert not any(m.inplace for m in plain(fast).modules() if isinstance(m, (MKDC, MKIR, DecoderStage)))


@pytest.mark.parametrize("dims", [2, 3])
def test_channels_last_stays_channels_last_through_shuffle_and_outer_product(dims):
    """CPU inference keeps channels-last: the channel shuffle of a channels-last tensor and the outer-product stem
    (autograd off) return channels-last tensors with the plain values (a channels-first result sent every later 1×1
    conv to oneDNN's slow layout)."""
    from ul3d.networks.blocks.multikernel import ChannelShuffle, outer_product_conv

    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    x = torch.randn((2, 12) + (5,) * dims)
    shuffle = ChannelShuffle(3)
    y = shuffle(x.contiguous(memory_format=fmt))
    assert y.is_contiguous(memory_format=fmt) and torch.equal(y, shuffle(x))
    assert torch.equal(shuffle(x), x.view(2, 3, 4, *x.shape[2:]).transpose(1, 2).reshape(x.shape))
    one = torch.randn((2, 1) + (5,) * dims).contiguous(memory_format=fmt)
    w, b = torch.randn((8, 1) + (1,) * dims), torch.randn(8)
    conv = nn.functional.conv2d if dims == 2 else nn.functional.conv3d
    with torch.no_grad():
        out = outer_product_conv(one, w, b)
        assert out.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(out, conv(one, w, b), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outer_product_conv(one, w), conv(one, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dims,norm", [(3, "batch"), (2, "batch"), (2, "instance")])
def test_use_checkpoint_is_the_same_function_with_less_saved_memory(dims, norm):
    """``use_checkpoint`` (activation checkpointing of every stage, the stem's project + BatchNorm + shortcut merged,
    the last stage slab by slab, max-pooling keeping only indices): the same outputs, gradients and BatchNorm running
    statistics as the plain network over two steps in float64 (up to rounding: the merged stem computes its batch
    statistics in another order), far fewer bytes kept for backward, and the eval network still scripts."""
    import copy

    torch.manual_seed(0)
    ref = get_network("ultralightunet", "T", spatial_dims=dims, in_channels=1, out_channels=3, norm=norm).double().train()
    ckpt = copy.deepcopy(ref)
    ckpt.use_checkpoint = True
    x = torch.randn((2, 1) + ((32,) * dims if norm == "batch" else (64,) * dims), dtype=torch.float64)

    def saved_bytes(net):
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = net(x)
        return out, sum(storages.values())

    for _ in range(2):
        (a, ref_bytes), (b, ckpt_bytes) = saved_bytes(ref), saved_bytes(ckpt)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)
        (a.square().mean()).backward()
        (b.square().mean()).backward()
    assert ckpt_bytes < 0.3 * ref_bytes, (ckpt_bytes, ref_bytes)
    for (name, p), q in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-8, atol=1e-10, msg=name)
    for (name, p), q in zip(ref.named_buffers(), ckpt.buffers()):
        # running statistics updated once per step, not again in the recomputation
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12, msg=name)
    if norm == "batch":
        assert int(dict(ckpt.named_buffers())["encoder.0.block.expand.adn.N.num_batches_tracked"]) == 2
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(ckpt.eval())(x), ref.eval()(x), rtol=0, atol=1e-12)


def test_cuda_graph_inference_falls_back_without_cuda_or_with_autograd():
    from ul3d.networks.fast import CUDAGraphInference

    net = get_network("ultralightunet", "T", spatial_dims=3, in_channels=1, out_channels=2).eval()
    runner = CUDAGraphInference(net)
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(runner(x), net(x), rtol=0, atol=0)
    assert runner.graphs == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_inference_matches_eager_per_shape():
    """Replayed graphs give the eager outputs for each shape and autocast state; inputs are copied in, outputs out
    (a later call does not overwrite an earlier result); shapes beyond ``max_graphs`` run eagerly."""
    from ul3d.networks.fast import CUDAGraphInference

    net = _with_statistics(get_network("ultralightunet", "T", spatial_dims=3, in_channels=1, out_channels=3),
                           (2, 1, 32, 32, 32)).cuda()
    runner = CUDAGraphInference(net, max_graphs=2)
    with torch.no_grad():
        x4, x2 = torch.randn(4, 1, 32, 32, 32, device="cuda"), torch.randn(2, 1, 32, 32, 32, device="cuda")
        first = runner(x4)
        for _ in range(2):
            torch.testing.assert_close(runner(x4), net(x4), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(runner(x2), net(x2), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(first, net(x4), rtol=1e-5, atol=1e-5)
        assert len(runner.graphs) == 2
        with torch.autocast("cuda", dtype=torch.bfloat16):  # a third shape key: beyond max_graphs, eager
            out = runner(x4)
            torch.testing.assert_close(out, net(x4), rtol=0, atol=0)
        assert len(runner.graphs) == 2
    runner = CUDAGraphInference(net)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out, ref = runner(x4), net(x4)
        assert out.dtype == ref.dtype
        torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_cli_predict_offers_every_path():
    import argparse

    from ul3d import cli
    from ul3d.engine.infer import PATHS

    sub = argparse.ArgumentParser().add_subparsers()
    cli._add_predict(sub)
    action = next(a for a in sub.choices["predict"]._actions if a.dest == "path")
    assert tuple(action.choices) == PATHS


_FAULTS = """
import resource, sys, torch
from ul3d.networks import get_network
if sys.argv[1] == "keep":
    from ul3d.utils import keep_freed_memory
    assert keep_freed_memory() and keep_freed_memory()  # applied (glibc), idempotent
torch.set_num_threads(2)
net, x = get_network("ultralightunet", "T", 3, 1, 3).eval(), torch.randn(2, 1, 64, 64, 64)
faults = []
with torch.no_grad():
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        net(x)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[2:]))
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc malloc")
def test_keep_freed_memory_stops_page_faulting_every_activation():
    """With ``keep_freed_memory`` the activations of a repeated forward reuse freed heap blocks: the third and fourth
    forwards of a network page-fault far less than in a process with glibc's default thresholds, where every large
    activation is a fresh mapping."""
    import subprocess
    import sys

    faults = {mode: int(subprocess.run([sys.executable, "-c", _FAULTS, mode], check=True, capture_output=True,
                                       text=True).stdout.split()[-1]) for mode in ("default", "keep")}
    if faults["default"] <= 5000:  # seen once on a 2-core AMD VM (0 faults): the kernel or glibc reused the pages
        pytest.skip(f"glibc's default thresholds did not page-fault in this process ({faults}): nothing to compare")
    assert faults["keep"] < 0.2 * faults["default"], faults


def test_use_checkpoint_under_compile_updates_running_statistics_once():
    """Under torch.compile (aot_eager: no C compiler needed) a checkpointed stage's BatchNorm statistics are updated
    once per step, also where the region would not trace in one piece (momentum=None reads ``.item()``; such a
    region runs without checkpointing: with a checkpoint there, each step counted twice)."""
    import copy

    from ul3d.networks.nets._utils import _compiled_checkpoint_safe

    torch.manual_seed(0)
    ref = get_network("ultralightunet", "T", spatial_dims=2, in_channels=1, out_channels=3).train()
    assert _compiled_checkpoint_safe(ref.decoder[0])
    assert not _compiled_checkpoint_safe(accelerate(copy.deepcopy(ref), fused_mkdc=True, recompute=True).decoder[0])
    for m in ref.modules():  # cumulative-average BatchNorm everywhere
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    assert not _compiled_checkpoint_safe(ref.decoder[0])
    ckpt = copy.deepcopy(ref)
    ckpt.use_checkpoint = True
    compiled = torch.compile(ckpt, backend="aot_eager")
    x = torch.randn(2, 1, 64, 64)
    for _ in range(2):
        ref(x).square().mean().backward()
        compiled(x).square().mean().backward()
    torch._dynamo.reset()
    for (name, a), b in zip(ref.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_inference_keys_ignore_strides():
    """Windows that are views of a larger volume (MONAI's sliding window at sw_batch_size=1) share one graph whatever
    their strides, and give the eager result."""
    from ul3d.networks.fast import CUDAGraphInference

    net = _with_statistics(get_network("ultralightunet", "T", spatial_dims=3, in_channels=1, out_channels=3),
                           (2, 1, 32, 32, 32)).cuda()
    runner = CUDAGraphInference(net)
    with torch.no_grad():
        for size in (64, 96):
            vol = torch.randn(1, 1, size, size, size, device="cuda")
            for window in (vol[..., :32, :32, :32], vol[..., -32:, 16:48, -32:]):
                torch.testing.assert_close(runner(window), net(window.contiguous()), rtol=1e-5, atol=1e-5)
    assert len(runner.graphs) == 1 and not runner.failed



@pytest.mark.parametrize("shape", [(2, 16, 8, 6, 4), (2, 5, 3, 5, 7), (3, 8, 6, 10)])
def test_global_max_pool_channels_last_is_exact(shape):
    """GlobalMaxPool of a channels-last tensor (rows of channels, four voxels per row when they divide the volume)
    gives AdaptiveMaxPool's values exactly."""
    from ul3d.networks.blocks.attention import GlobalMaxPool

    x = torch.randn(shape)
    fmt = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
    ref = (nn.AdaptiveMaxPool3d(1) if x.dim() == 5 else nn.AdaptiveMaxPool2d(1))(x)
    assert torch.equal(GlobalMaxPool()(x), ref)
    assert torch.equal(GlobalMaxPool()(x.contiguous(memory_format=fmt)), ref)


@pytest.mark.parametrize("dims,channels,groups", [(3, 16, 8), (3, 16, 4), (2, 12, 3)])
def test_gag_depthwise_sum_is_the_same_function(dims, channels, groups):
    """GAG's grouped convs with one output per group as depth-wise convs plus a sum of each group's channels
    (2, 4 channels per group), BatchNorm folded, channels-last: the plain gate's output within 1e-5."""
    from ul3d.networks.blocks import GAG

    gag = GAG(dims, channels, channels, inter_channels=groups, groups=groups)
    gag.train()
    with torch.no_grad():
        for _ in range(3):
            gag(torch.randn((2, channels) + (6,) * dims) * 2, torch.randn((2, channels) + (6,) * dims))
    gag.eval()
    fast = accelerate(gag, fold_bn=True, channels_last=True, merge_pointwise=True, fused_mkdc=False)
    assert fast.depthwise_sum
    fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
    g, x = torch.randn((2, channels) + (7,) * dims), torch.randn((2, channels) + (7,) * dims)
    with torch.no_grad():
        assert fast._depthwise_path(g.contiguous(memory_format=fmt), x.contiguous(memory_format=fmt))
        assert not fast._depthwise_path(g, x)  # channels-first: the grouped convs (measured only channels-last)
        out = fast(g.contiguous(memory_format=fmt), x.contiguous(memory_format=fmt))
        torch.testing.assert_close(out, gag(g, x), rtol=1e-5, atol=1e-5)


def _train_steps(net, shape, steps=2):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net.train()
    for _ in range(steps):
        opt.zero_grad()
        net(torch.randn(shape) * 2 + 1).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("dims", [2, 3])
def test_inference_copy_follows_the_live_network_in_place(dims):
    """After each refresh the folded copy computes the live network's eval function (new weights and running
    statistics), in the same tensors (graphs captured earlier read them); the live network is untouched."""
    from ul3d.networks.fast import InferenceCopy

    shape = (2, 1) + (32,) * dims
    live = get_network("ultralightunet", "T", spatial_dims=dims, in_channels=1, out_channels=3)
    _train_steps(live, shape)
    copy_ = InferenceCopy(live, fused_mkdc=False)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in copy_.modules())
    # the live network is not a submodule: the copy's parameters are the folded network's alone
    assert {k for k, _ in copy_.named_parameters()} == {f"net.{k}" for k, _ in copy_.net.named_parameters()}
    ptrs = [t.data_ptr() for t in copy_.state_dict().values()]
    x = torch.randn(shape)
    with torch.no_grad():
        before = copy_.eval()(x)
        torch.testing.assert_close(before, live.eval()(x), rtol=1e-4, atol=1e-4)
    _train_steps(live, shape)
    with torch.no_grad():
        torch.testing.assert_close(copy_(x), before, rtol=0, atol=0)  # no refresh: the old weights
        ref = live.eval()(x)
        assert (ref - before).abs().max() > 1e-3  # training changed the function
        copy_.refresh()
        torch.testing.assert_close(copy_(x), ref, rtol=1e-4, atol=1e-4)
    assert [t.data_ptr() for t in copy_.state_dict().values()] == ptrs
    assert live.training is False and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in live.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_inference_copy_graphs_replay_the_refreshed_weights():
    from ul3d.networks.fast import InferenceCopy

    shape = (2, 1, 32, 32, 32)
    live = get_network("ultralightunet", "T", spatial_dims=3, in_channels=1, out_channels=3).cuda()
    opt = torch.optim.SGD(live.parameters(), lr=0.1)

    def steps():
        live.train()
        for _ in range(2):
            opt.zero_grad()
            live(torch.randn(shape, device="cuda")).square().mean().backward()
            opt.step()

    steps()
    copy_ = InferenceCopy(live, fused_mkdc=False, triton=True).eval()
    x = torch.randn(4, 1, 32, 32, 32, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(copy_(x), live.eval()(x), rtol=1e-3, atol=1e-3)
        assert len(copy_.graphs.graphs) == 1
    steps()
    with torch.no_grad():
        copy_.refresh()
        torch.testing.assert_close(copy_(x), live.eval()(x), rtol=1e-3, atol=1e-3)
        assert len(copy_.graphs.graphs) == 1  # the same graph, replayed with the new weights


@pytest.mark.parametrize("dims", [2, 3])
def test_packed_stem_is_the_same_function(dims, monkeypatch):
    """CPU inference: the one-channel stem packs the batch's samples as the channels of one tensor for its depth-wise
    convs (oneDNN fills a vector of channels per voxel) when all samples' hidden channels fit PACK_LANES; the network
    gives the plain network's output, and the unpacked merged path's, for batches that pack and batches that do not."""
    from ul3d.networks.blocks import MKIR

    net = _with_statistics(get_network("ultralightunet", "base", spatial_dims=dims, in_channels=1, out_channels=3,
                                       init="default"), (2, 1) + (32,) * dims)
    fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
    fast = accelerate(net, fold_bn=True, channels_last=True, outer_product=True, fused_mkdc=False, inplace=True,
                      merge_pointwise=True)
    packed = MKIR._packed_stem
    calls = []
    monkeypatch.setattr(MKIR, "_packed_stem", lambda self, x: calls.append(x.shape[0]) or packed(self, x))
    for n, packs in ((1, False), (3, True), (8, True), (9, False)):  # 2 hidden channels: 9 samples need 18 lanes
        x = torch.randn((n, 1) + (32,) * dims).contiguous(memory_format=fmt)
        with torch.no_grad():
            ref = net(x)
            out = fast(x)
            monkeypatch.setattr(MKIR, "PACK_LANES", 0)
            unpacked = fast(x)
            monkeypatch.setattr(MKIR, "PACK_LANES", 16)
        assert calls == ([n] if packs else []), n
        assert ref.abs().max() > 1e-2 and (ref - out).abs().max() <= 1e-4
        torch.testing.assert_close(out, unpacked, rtol=1e-5, atol=1e-6)
        with torch.no_grad():  # the stem's output stays channels-last for the next layers
            assert fast.encoder[0].block(x).is_contiguous(memory_format=fmt)
        calls.clear()


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("act", ["relu6", "relu", None])
def test_conv_act_post_op_is_the_same_function(dims, act, monkeypatch):
    """conv_act: oneDNN's conv with the activation as a post-op for channels-last float32 CPU inference, the conv then
    the activation module otherwise; the same values either way (depth-wise and dense convs)."""
    from monai.networks.blocks import Convolution

    import ul3d.networks.blocks.multikernel as mk

    fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
    taken = []
    available = mk._onednn_conv_act_available
    monkeypatch.setattr(mk, "_onednn_conv_act_available", lambda: taken.append(1) or available())
    for groups, k in ((8, 5), (8, 1), (1, 1), (1, 3)):
        block = Convolution(dims, 8, 8, kernel_size=k, groups=groups, bias=True, norm=None, act=act).eval()
        x = torch.randn((2, 8) + (12,) * dims) * 3
        with torch.no_grad():
            ref = block(x)
            for layout, fast in ((x.contiguous(memory_format=fmt), True), (x, False)):
                taken.clear()
                out = mk.conv_act(layout, block.conv, getattr(block, "adn", None))
                torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
                assert bool(taken) == (fast and torch.backends.mkldnn.is_available()), (groups, k, fast)
        taken.clear()
        y = mk.conv_act(x.contiguous(memory_format=fmt).requires_grad_(), block.conv, getattr(block, "adn", None))
        assert not taken and y.requires_grad  # autograd on: the plain conv and activation
