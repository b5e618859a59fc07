"""Multi-kernel convolution blocks of UltraLightUNet (Rahman et al., ICLR 2025 submission, §3.1).

Every block takes ``spatial_dims`` first and builds its layers from MONAI's dimension-keyed
factories, so one class serves 2D and 3D.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import depthwise as _dw
from ..depthwise import (MAX_BRANCHES, TRITON_DTYPES, compute_dtype, depthwise_conv, max_pool_2x, max_pool_geometry,
                         multikernel_depthwise, pack_branches, pointwise_act, pooled_stem, stem_unsupported,
                         triton_available, unsupported_conv)

__all__ = ["MKDC", "MKIR", "ChannelShuffle", "InvertedResidual", "MultiKernelDepthwiseConv", "MultiKernelInvertedResidual",
           "batchnorm_act", "batchnorm_of_pointwise", "conv_act", "pointwise_conv", "outer_product_conv"]


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether ``x`` is laid out channels-last (channels the innermost memory axis) and not plainly contiguous."""
    return x.dim() > 2 and not x.is_contiguous() and x.movedim(1, -1).is_contiguous()


def _layout_like(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` channels-last when ``x`` is and a kernel returned ``y`` channels-first (oneDNN's 1×1 convs do for a batch
    of one: the decoder then ran channels-first, and a last one-window batch of the CPU sliding window took 1.8× the
    time per window of a batch of four)."""
    if is_channels_last(x) and y.dim() == x.dim() and not is_channels_last(y):
        return y.contiguous(memory_format=channels_last_format(y.dim()))
    return y


def channels_last_format(ndim: int) -> torch.memory_format:
    """The channels-last memory format of ``ndim``-D tensors (5: ``channels_last_3d``, 4: ``channels_last``)."""
    return torch.channels_last_3d if ndim == 5 else torch.channels_last


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A 1×1 convolution (``groups=1``, stride 1) as one matrix product per sample over the flattened spatial dims:
    ``y[b] = W · x[b]`` with ``W`` of shape ``(out, in)``; ``weight`` is the conv's ``(out, in, 1, ...)`` tensor.

    The same function as ``F.conv{N}d(x, weight, bias)``; autocast runs it in its matmul dtype.
    """
    b, c = x.shape[:2]
    y = torch.matmul(weight.reshape(weight.shape[0], c), x.reshape(b, c, -1)).reshape(b, weight.shape[0], *x.shape[2:])
    return y if bias is None else y + bias.reshape(1, -1, *([1] * (x.dim() - 2)))


def outer_product_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A 1×1 convolution of a one-channel input, ``(B, 1, *S) -> (B, out, *S)``, as one outer product
    ``x · w[:, 0]`` (plus bias): the same function as ``F.conv{N}d(x, weight, bias)``.

    With autograd off it is ``addmm`` of the ``(B·S, 1)`` voxel column and the ``(1, out)`` weight row, so the result
    is laid out channels-last (a permuted view of the ``(B·S, out)`` product), the layout the CPU inference path keeps throughout.
    On a 2-core CPU (batch 4 × 96³, 1 -> 16 channels) oneDNN's conv takes 204 ms, a broadcast multiply 122 ms and
    gives a channels-first tensor (everything after it then runs channels-first: the 2 -> 16 project conv 210 instead
    of 58 ms), this 72 ms."""
    n, out = x.shape[0], weight.shape[0]
    if torch.is_grad_enabled():  # training: the broadcast multiply (its weight gradient sums as the plain conv's)
        view = (1, out) + (1,) * (x.dim() - 2)
        y = x * weight.reshape(view)
        return y if bias is None else y + bias.reshape(view)
    rows = x.reshape(-1, 1)  # rows in (B, *S) order (a view in either layout: the channel dim has size 1)
    w = weight.reshape(1, out)
    y = rows @ w if bias is None else torch.addmm(bias, rows, w)
    return y.reshape(n, *x.shape[2:], out).movedim(-1, 1)


def _activation_attr(adn: nn.Module | None) -> tuple[str, list[float]] | None:
    """oneDNN's post-op name and scalars for a MONAI ``ADN`` holding only an activation (its norm folded away), or
    None when it holds anything else."""
    if adn is None:
        return "none", []
    acts = [m for m in adn.children() if not isinstance(m, nn.Identity)]
    if not acts:
        return "none", []
    if len(acts) > 1:
        return None
    act = acts[0]
    if isinstance(act, nn.Hardtanh):  # ReLU6 is Hardtanh(0, 6)
        return "hardtanh", [float(act.min_val), float(act.max_val)]
    if isinstance(act, nn.ReLU):
        return "relu", []
    return None


def _onednn_conv_act_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def conv_act(x: torch.Tensor, conv: nn.Module, adn: nn.Module | None, weight: torch.Tensor | None = None,
             bias: torch.Tensor | None = None, groups: int | None = None) -> torch.Tensor:
    """``adn(conv(x))`` (``weight``/``bias``/``groups`` override the conv's own). For CPU inference (float32,
    channels-last, autograd off, an ``adn`` that is only ReLU/ReLU6 after folding) the activation runs as a post-op of
    oneDNN's convolution, in the same pass over the output (2-core CPU, 4×32×48³ depth-wise: 5³ 19.1 -> 16.4 ms,
    3³ 7.1 -> 5.0 ms, 1³ 3.9 -> 2.8 ms); elsewhere the conv and then ``adn``."""
    weight = conv.weight if weight is None else weight
    bias = conv.bias if bias is None else bias
    groups = conv.groups if groups is None else groups
    attr = _activation_attr(adn)
    if (attr is not None and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and not isinstance(conv.padding, str) and is_channels_last(x) and _onednn_conv_act_available()):
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, list(conv.padding), list(conv.stride),
                                                       list(conv.dilation), groups, attr[0], attr[1], "")
    y = (F.conv3d if weight.dim() == 5 else F.conv2d)(x, weight, bias, conv.stride, conv.padding, conv.dilation, groups)
    return y if adn is None else adn(y)


def _pointwise_block(block: nn.Module, x: torch.Tensor, conv=pointwise_conv, kernels: bool = False) -> torch.Tensor:
    """A MONAI ``Convolution`` block (1×1 conv, then its norm/act) with the conv computed by ``conv``; ``kernels``: a
    training BatchNorm (+ activation) after it as ul3d's kernels where they run (:func:`batchnorm_act`)."""
    y = conv(x, block.conv.weight, block.conv.bias)
    adn = getattr(block, "adn", None)
    if adn is None:
        return y
    return _norm_act(y, adn) if kernels else adn(y)


def _batchnorm_step(bn: nn.modules.batchnorm._BatchNorm, count: int, shape: list[int]) -> float:
    """What ``bn``'s training forward does before normalising with batch statistics of ``count`` values per channel:
    refuse a single value per channel, count the batch and return the running-statistics factor (``momentum``, or the
    cumulative average's ``1 / num_batches_tracked``, which BatchNorm also reads on the host)."""
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {shape}")
    momentum = 0.0 if bn.momentum is None else bn.momentum
    if bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            momentum = 1.0 / float(bn.num_batches_tracked)
    return momentum


def batchnorm_of_pointwise(h: torch.Tensor, weight: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode BatchNorm of a bias-free 1×1 conv's output, ``BN(W h) = scale · (W h_c) + β`` with
    ``h_c = h − mean(h)``, the batch statistics of ``z = W h`` computed from those of ``h`` instead of from ``z``
    itself: per output channel ``o``, ``mean(z_o) = W_o · mean(h)`` and ``var(z_o) = W_o Σ_h W_oᵀ`` (``Σ_h`` the biased
    channel covariance of ``h``), so ``z`` need not exist before it is normalised. Updates ``bn``'s running statistics
    as BatchNorm does (momentum or cumulative average, unbiased variance). Returns ``(scale, β, h_c)``: ``scale`` and
    ``β`` of shape ``(C_out,)`` in float64, ``h_c`` in ``h``'s dtype promoted to float32; differentiable in ``h``,
    ``weight`` and the affine parameters, with the gradients of BatchNorm's batch statistics.

    Numerics: the statistics are computed in float64 (a float32 covariance summed over millions of voxels is ~1e-5 off
    in relative terms, which BatchNorm turns into output differences of ~1e-4), and the conv runs on the centred
    ``h_c`` (as BatchNorm subtracts the mean before scaling): on the uncentred ``h`` the weight gradient would be a
    difference of large sums, ~20× less accurate than BatchNorm's in float32.
    """
    dims = [0] + list(range(2, h.dim()))
    count = h.numel() // h.shape[1]
    stats = torch.float64 if h.device.type in ("cpu", "cuda") else torch.promote_types(h.dtype, torch.float32)
    work = torch.promote_types(h.dtype, torch.float32)
    w = weight.reshape(weight.shape[0], -1).to(stats)
    view = (1, -1) + (1,) * (h.dim() - 2)
    m = _batchnorm_step(bn, count, list(h.shape))
    with torch.autocast(h.device.type, enabled=False):
        # one cast of h: the gradients of the mean and of the centring then meet in float64, as BatchNorm's do in its
        # float32 kernel (two casts would add them in h's dtype: bf16 gradients 1.5-5x less accurate)
        hs = h.to(stats)
        mean_h = hs.mean(dims)
        flat64 = hs - mean_h.reshape(view)
        centred = flat64.to(work)
        flat = flat64.transpose(0, 1).reshape(h.shape[1], -1)
        cov = flat @ flat.t() / count
        var = ((w @ cov) * w).sum(1)
        scale = torch.rsqrt(var + bn.eps)
        if bn.affine:
            scale = scale * bn.weight.to(stats)
        beta = bn.bias.to(stats) if bn.affine else torch.zeros_like(scale)
    if bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            bn.running_mean.mul_(1 - m).add_((w @ mean_h).detach().to(bn.running_mean.dtype), alpha=m)
            unbiased = var.detach() * (count / max(count - 1, 1))
            bn.running_var.mul_(1 - m).add_(unbiased.to(bn.running_var.dtype), alpha=m)
    return scale, beta, centred


def fold_into_conv(bn: nn.modules.batchnorm._BatchNorm, weight: torch.Tensor, bias: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias of one convolution computing ``bn(conv(x))`` for an eval-mode BatchNorm (running
    statistics): ``W' = W γ/σ``, ``b' = (b − μ) γ/σ + β`` with ``σ = sqrt(var + eps)``."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.affine:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale + (bn.bias if bn.affine else 0)
    if bias is not None:
        shift = shift + bias * scale
    return weight * scale.reshape(-1, *([1] * (weight.dim() - 1))), shift


def folded_convolution(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, nn.Module | None] | None:
    """``(weight, bias, act)`` of a MONAI ``Convolution`` (conv -> norm -> act) in inference: an eval-mode BatchNorm
    (running statistics) folded into the conv's weight and bias (:func:`fold_into_conv`; none, or one already folded,
    leaves them as they are) and the activation module (None: none); None for anything else (training-mode or other
    norms, active dropout, another order of the parts)."""
    conv, adn = getattr(block, "conv", None), getattr(block, "adn", None)
    if not isinstance(conv, nn.modules.conv._ConvNd):
        return None
    parts = {name: m for name, m in (adn.named_children() if adn is not None else ())
             if not isinstance(m, nn.Identity) and not (isinstance(m, nn.modules.dropout._DropoutNd) and not m.training)}
    if list(parts) not in ([], ["N"], ["A"], ["N", "A"]):
        return None
    bn, act = parts.get("N"), parts.get("A")
    weight, bias = conv.weight, conv.bias
    if bn is not None:
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.training or bn.running_mean is None:
            return None
        weight, bias = fold_into_conv(bn, weight, bias)
    return weight, bias, act


def _local_batchnorm(m) -> bool:
    """A BatchNorm whose batch statistics are those of the local batch (not SyncBatchNorm, which reduces them
    across processes)."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)


def _clamp_range(act: nn.Module) -> tuple[float, float] | None:
    """(min, max) of a ReLU / ReLU6 / Hardtanh activation module, None for anything else."""
    if isinstance(act, nn.ReLU6):
        return 0.0, 6.0
    if isinstance(act, nn.Hardtanh):
        return float(act.min_val), float(act.max_val)
    if isinstance(act, nn.ReLU):
        return 0.0, float("inf")
    return None


class _BatchNormClampFn(torch.autograd.Function):
    """``clamp(BN(z), lo, hi)`` with batch statistics, keeping only ``z`` and the statistics for backward: the
    normalised tensor is recomputed there (the same kernel on the same input: the same values and clamp mask)."""

    @staticmethod
    def forward(ctx, z, weight, bias, running_mean, running_var, momentum, eps, lo, hi):
        out, mean, invstd = torch.native_batch_norm(z, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(z, weight, bias, mean, invstd)
        ctx.eps, ctx.lo, ctx.hi = eps, lo, hi
        return out.clamp_(lo, hi) if hi != float("inf") else out.clamp_(min=lo)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        z, weight, bias, mean, invstd = ctx.saved_tensors
        out = torch.native_batch_norm(z, weight, bias, None, None, True, 0.0, ctx.eps)[0]
        grad = grad * ((out > ctx.lo) & (out < ctx.hi))  # hardtanh's backward: zero where clamped (and at the bounds)
        masks = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                 bias is not None and ctx.needs_input_grad[2]]
        gz, gw, gb = torch.ops.aten.native_batch_norm_backward(grad, z, weight, None, None, mean, invstd, True, ctx.eps,
                                                               masks)
        return gz, gw, gb, None, None, None, None, None, None


def batchnorm_act(z: torch.Tensor, adn: nn.Module | None, kernels: bool = False) -> torch.Tensor:
    """``adn(z)`` for a MONAI ``Convolution`` block's norm -> activation (``ADN`` with ``N`` then ``A``), keeping less
    for backward in training: with a BatchNorm that normalises with batch statistics and a ReLU / ReLU6 / Hardtanh,
    only ``z`` and the per-channel statistics are kept (PyTorch keeps ``z`` for the norm and the normalised tensor for
    the activation); running statistics are updated as BatchNorm does. ``kernels`` (``accelerate(triton=True)``):
    where Triton runs, such a BatchNorm (+ activation, or none) as ul3d's kernels
    (:func:`~ul3d.networks.depthwise.batchnorm_clamp`, :data:`~ul3d.networks.depthwise.BATCHNORM_KERNELS`). Anything
    else (and code being compiled by ``torch.compile``) runs ``adn``."""
    if adn is None:
        return z
    bn, act = getattr(adn, "N", None), getattr(adn, "A", None)
    rest = [name for name, m in adn.named_children() if name not in ("N", "A") and not isinstance(m, nn.Identity)]
    bounds = _clamp_range(act) if act is not None else None
    kernels = kernels and _dw.BATCHNORM_KERNELS and _dw.triton_available(z.device) and z.dtype in _dw.TRITON_DTYPES
    if kernels and act is None:
        bounds = (float("-inf"), float("inf"))
    children = list(adn.children())
    if (rest or bounds is None or not _local_batchnorm(bn) or not torch.is_grad_enabled()
            or torch.compiler.is_compiling()  # the compiler's partitioner chooses what to keep
            or not (bn.training or bn.running_mean is None)
            or (act is not None and children.index(bn) > children.index(act))):
        return adn(z)
    bn._check_input_dim(z)
    momentum = _batchnorm_step(bn, z.numel() // z.shape[1], list(z.shape)) if bn.training else 0.0
    stats = (bn.running_mean, bn.running_var) if bn.training and bn.track_running_stats else (None, None)
    if kernels:
        return _dw.batchnorm_clamp(z, bn.weight, bn.bias, *stats, momentum, bn.eps, *bounds)
    return _BatchNormClampFn.apply(z, bn.weight, bn.bias, *stats, momentum, bn.eps, *bounds)


def _norm_act(z: torch.Tensor, adn: nn.Module | None) -> torch.Tensor:
    """``adn(z)``; with :data:`~ul3d.networks.depthwise.BATCHNORM_KERNELS` on, a training BatchNorm (+ ReLU/ReLU6, or
    none) as ul3d's kernels where they run (:func:`batchnorm_act` with ``kernels``)."""
    if adn is None:
        return z
    return batchnorm_act(z, adn, kernels=True) if _dw.BATCHNORM_KERNELS else adn(z)


def _tensors(parts) -> list[torch.Tensor]:
    """The tensors of a nested tuple/list, in order."""
    if isinstance(parts, torch.Tensor):
        return [parts]
    if isinstance(parts, (tuple, list)):
        return [t for p in parts for t in _tensors(p)]
    return []


def accumulate(total: torch.Tensor, y: torch.Tensor, inplace: bool) -> torch.Tensor:
    """``total + y``; with ``inplace`` and autograd off, added into ``total`` (a fresh intermediate the caller owns),
    which saves allocating and first-touching a new full-size tensor in inference."""
    if inplace and not torch.is_grad_enabled():
        return total.add_(y)
    return total + y


class ChannelShuffle(nn.Module):
    """Channel shuffle (Zhang et al., ShuffleNet), the ``CS`` of Eq. 2.

    Splits the channels into ``groups`` groups and interleaves them:
    ``(B, g·n, *S) -> (B, n·g, *S)``. Works for any number of spatial dimensions.

    Args:
        groups: number of groups; 1 makes the shuffle the identity.
    """

    def __init__(self, groups: int) -> None:
        super().__init__()
        if groups < 1:
            raise ValueError(f"ChannelShuffle: groups must be >= 1, got {groups}.")
        self.groups = int(groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return x
        c = x.shape[1]
        if is_channels_last(x):
            # channels-last: shuffle the last memory axis so the result stays channels-last (the plain expression's
            # copy comes out channels-first, and the next 1×1 conv then runs on the slow layout: CPU inference)
            last = x.movedim(1, -1)
            return last.unflatten(-1, (self.groups, c // self.groups)).transpose(-1, -2).flatten(-2).movedim(-1, 1)
        return x.unflatten(1, (self.groups, c // self.groups)).transpose(1, 2).flatten(1, 2)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


class MKDC(nn.Module):
    """Multi-kernel depth-wise convolution, Eq. 2: ``MKDC(x) = CS(Σ_{k∈K} ReLU6(BN(DWC_k(x))))``.

    One branch per kernel size ``k`` (a depth-wise conv with ``groups=channels``, padding ``k//2``,
    no bias, then norm and activation); the branch outputs are summed and channel-shuffled.

    Args:
        spatial_dims: 2 or 3.
        channels: input = output channels.
        kernels: kernel sizes of the parallel branches. Defaults to ``(1, 3, 5)`` (paper Table 5).
        stride: stride of every branch. Defaults to 1 (the network never strides; it max-pools).
        norm: normalisation of each branch, a MONAI norm name or ``(name, kwargs)``. Defaults to batch.
        act: activation of each branch. Defaults to ReLU6.
        shuffle_groups: groups of the channel shuffle after the sum; 1 disables it.
        parallel: True (paper, released code): every branch reads the block input. False is the
            released code's unused sequential mode, where each branch's output is added to the
            input of the next branch.

    Contract (kept by any fused fast path): input ``(B, C, *S)`` -> output ``(B, C, *S/stride)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        kernels: Sequence[int] = (1, 3, 5),
        stride: int = 1,
        norm: str | tuple = "batch",
        act: str | tuple = "relu6",
        shuffle_groups: int = 1,
        parallel: bool = True,
    ) -> None:
        super().__init__()
        kernels = tuple(int(k) for k in kernels)
        if not kernels or any(k < 1 or k % 2 == 0 for k in kernels):
            raise ValueError(f"MKDC: kernels must be a non-empty list of odd sizes, got {kernels}.")
        if channels % shuffle_groups:
            raise ValueError(f"MKDC: shuffle_groups={shuffle_groups} must divide channels={channels}.")
        self.kernels = kernels
        self.parallel = parallel
        self.branches = nn.ModuleList(
            Convolution(
                spatial_dims,
                channels,
                channels,
                strides=stride,
                kernel_size=k,
                groups=channels,
                bias=False,
                norm=norm,
                act=act,
            )
            for k in kernels
        )
        self.shuffle = ChannelShuffle(shuffle_groups)
        # Fast path (issue 7), off by default; switched on per instance by ``ul3d.networks.fast.accelerate``. Plain
        # attributes, not parameters or buffers: the state_dict is the same either way. ``fused_unit_scale``: the 1×1
        # branch as a per-channel scale instead of a zero-padded centre tap; ``fused_recompute``: in training,
        # recompute the branch activations in backward instead of saving them.
        self.fused, self.fused_unit_scale, self.fused_recompute = False, True, False
        # ``float32``: under autocast, run the branches in float32 (PyTorch's depth-wise 3D and BatchNorm kernels are
        # faster in float32 than in bfloat16 on CUDA, benchmarks/results/depthwise_cuda_h100_2026-11-23.json)
        self.float32 = False
        # ``triton``: each branch's depth-wise conv runs ul3d's Triton kernels (:mod:`ul3d.networks.depthwise`) where they
        # are available (CUDA), followed by the branch's own norm and activation modules
        self.triton = False
        # ``inplace`` (``accelerate(inplace=True)``, inference): the branch sum accumulates in place when autograd is off
        self.inplace = False
        # ``conv_act`` (``accelerate(merge_pointwise=True)``, CPU inference): each branch's activation as a post-op of
        # oneDNN's conv (:func:`conv_act`)
        self.conv_act = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript (and exports) always see the plain modules
            if self.float32 and torch.is_autocast_enabled(x.device.type):
                with torch.autocast(x.device.type, enabled=False):
                    return self._forward_eager(x.float())
            return self._forward_eager(x)
        return self.forward_plain(x)

    @torch.jit.unused
    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        if self.triton and self.triton_unsupported() is None and triton_available(x.device):
            if not torch.is_grad_enabled():
                folded = self.folded_branches()
                if folded is not None:
                    return multikernel_depthwise(x, *folded, shuffle_groups=self.shuffle.groups)
            return self.forward_triton(x)
        if self.fused and self.fused_unsupported() is None:
            return self.forward_fused(x)
        return self.forward_plain(x)

    def forward_plain(self, x: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.branch_sum(x))

    def branch_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``Σ_k ReLU6(BN(DWC_k(x)))`` of Eq. 2 with the plain modules, before the channel shuffle."""
        out = x
        for i, branch in enumerate(self.branches):
            if self.conv_act and not torch.jit.is_scripting():
                y = self._branch_conv_act(branch, x)
            else:
                y = branch(x)
            out = y if i == 0 else accumulate(out, y, self.inplace)
            if not self.parallel:
                x = x + y
        return out

    @torch.jit.unused
    def _branch_conv_act(self, branch: nn.Module, x: torch.Tensor) -> torch.Tensor:
        conv = getattr(branch, "conv", None)
        return branch(x) if conv is None else conv_act(x, conv, getattr(branch, "adn", None))

    @torch.jit.unused
    def packed_unsupported(self) -> str | None:
        """Why :meth:`packed_branch_sum` cannot compute this block's branch sum, or None when it can."""
        if not self.parallel:
            return "sequential branches"
        for branch in self.branches:
            conv, adn = getattr(branch, "conv", None), getattr(branch, "adn", None)
            if conv is None or conv.groups != conv.in_channels or conv.in_channels != conv.out_channels:
                return "not a depth-wise conv"
            if conv.stride != (1,) * len(conv.stride) or conv.dilation != (1,) * len(conv.dilation):
                return "strided or dilated"
            if _activation_attr(adn) is None:
                return "a norm after the conv (fold BatchNorm first)"
        return None

    @torch.jit.unused
    def packed_branch_sum(self, packed: torch.Tensor, samples: int) -> torch.Tensor:
        """:meth:`branch_sum` of ``samples`` inputs packed as the channels of one: ``packed`` is ``(1, N·C, *S)`` with
        channel ``n·C + c`` holding channel ``c`` of sample ``n``, and every branch's conv runs once over it with its
        weights repeated ``N`` times (same function; needs :meth:`packed_unsupported` to be None).

        oneDNN's channels-last depth-wise kernels fill one vector of channels per voxel: with the first stage's two
        channels they use 2 of 16 lanes, so a batch of 4 windows costs 4 times what it could (2-core CPU, 5³ conv over
        4×2×96³: 57 ms; the same voxels packed as 1×8×96³: 15 ms)."""
        out = packed
        for i, branch in enumerate(self.branches):
            conv = branch.conv
            reps = (samples,) + (1,) * (conv.weight.dim() - 1)
            y = conv_act(packed, conv, getattr(branch, "adn", None), conv.weight.repeat(reps),
                         None if conv.bias is None else conv.bias.repeat(samples), conv.groups * samples)
            out = y if i == 0 else accumulate(out, y, self.inplace)
        return out

    @torch.jit.unused
    def forward_lean(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` keeping less for backward in training: each branch's BatchNorm and activation through
        :func:`batchnorm_act` (its depth-wise conv through ul3d's Triton kernels when ``triton`` is on and they run
        here). Other configurations (fused, float32, sequential branches) run :meth:`forward`."""
        if not (torch.is_grad_enabled() and self.training) or self.fused or self.float32 or not self.parallel:
            return self.forward(x)
        triton = self.triton and self.triton_unsupported() is None and triton_available(x.device)
        out = None
        for branch in self.branches:
            conv = branch.conv
            y = depthwise_conv(x, conv.weight, conv.bias) if triton else conv(x)
            y = batchnorm_act(y, getattr(branch, "adn", None), kernels=triton)
            out = y if out is None else out + y
        return self.shuffle(out)

    @torch.jit.unused
    def triton_unsupported(self) -> str | None:
        """Why :meth:`forward_triton` cannot compute this block's function, or None when it can."""
        for branch in self.branches:
            why = unsupported_conv(getattr(branch, "conv", None))
            if why is not None:
                return why
        return None

    @torch.jit.unused
    def folded_branches(self) -> tuple[list, list, list] | None:
        """Every branch as ``(weight, bias, (lo, hi))`` with an eval-mode BatchNorm folded into the conv
        (``W' = W γ/σ``, ``b' = (b − μ) γ/σ + β``) and a ReLU/ReLU6/Hardtanh (or no activation) after it, as three
        lists for :func:`~ul3d.networks.depthwise.multikernel_depthwise`; None when a branch is anything else
        (training-mode or instance norm, other activations, dropout, sequential branches, more than three)."""
        if not self.parallel or len(self.branches) > MAX_BRANCHES:
            return None
        weights, biases, bounds = [], [], []
        for branch in self.branches:
            folded = folded_convolution(branch)
            if folded is None:
                return None
            weight, bias, act = folded
            lohi = _clamp_range(act) if act is not None else (float("-inf"), float("inf"))
            if lohi is None:
                return None
            weights.append(weight)
            biases.append(bias)
            bounds.append(lohi)
        return weights, biases, bounds

    @torch.jit.unused
    def forward_triton(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward_plain` with each branch's depth-wise conv computed by :func:`~ul3d.networks.depthwise.
        depthwise_conv` (Triton kernels on CUDA) and the branch's own norm/activation modules after it, so parameters,
        running statistics and the function are the plain forward's."""
        out = None
        for branch in self.branches:
            conv = branch.conv
            y = _norm_act(depthwise_conv(x, conv.weight, conv.bias), getattr(branch, "adn", None))
            out = y if out is None else out + y
            if not self.parallel:
                x = x + y
        return self.shuffle(out)

    @torch.jit.unused
    def fused_unsupported(self) -> str | None:
        """Why :meth:`forward_fused` cannot compute this block's function, or None when it can."""
        if not self.parallel:
            return "sequential branches"
        ref = None
        for branch in self.branches:
            conv, adn = getattr(branch, "conv", None), getattr(branch, "adn", None)
            if not isinstance(conv, nn.modules.conv._ConvNd) or adn is None or conv.transposed:
                return "branch is not conv -> ADN"
            k = conv.kernel_size[0]
            if any(s != 1 for s in conv.stride):
                return "strided branches"
            if conv.groups != conv.in_channels or conv.out_channels != conv.in_channels \
                    or any(d != 1 for d in conv.dilation) or set(conv.kernel_size) != {k} \
                    or tuple(conv.padding) != (k // 2,) * len(conv.kernel_size) or conv.padding_mode != "zeros":
                return "branch conv is not an undilated, 'same'-padded depth-wise conv"
            order = [n for n, m in adn.named_children() if not (n == "D" and isinstance(m, nn.Identity))]
            if order != ["N", "A"]:
                return f"ADN ordering {order} is not norm -> act"
            norm, act = adn.N, adn.A
            if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                kind = "batch"
            elif isinstance(norm, nn.modules.instancenorm._InstanceNorm) and not norm.track_running_stats:
                kind = "instance"
            elif isinstance(norm, nn.Identity):  # e.g. BatchNorm folded into the conv by fold_batchnorm
                kind = "none"
            else:
                return f"norm {type(norm).__name__} is not supported"
            if not isinstance(act, (nn.ReLU6, nn.ReLU, nn.Hardtanh)):
                return f"activation {type(act).__name__} is not supported"
            sig = (kind, type(norm), getattr(norm, "eps", None), getattr(norm, "momentum", None), getattr(norm, "affine", None),
                   getattr(norm, "track_running_stats", None), norm.training, type(act), repr(act), conv.stride,
                   conv.bias is None)
            if ref is not None and sig != ref:
                return "branches differ in norm/activation/stride"
            ref = sig
        return None

    @torch.jit.unused
    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        """The same function as :meth:`forward_plain` with one grouped convolution, one norm and one activation over the
        stacked branches (plus a per-channel scale for the 1×1 branch when ``fused_unit_scale``).

        The stacked weights are built from the branches' own parameters on every call, so gradients reach them; in
        training, batch statistics are used and the branches' running statistics are updated exactly as the plain
        per-branch BatchNorms would.
        """
        branches = list(self.branches)
        norm0 = branches[0].adn.N
        is_bn = isinstance(norm0, nn.modules.batchnorm._BatchNorm)
        train_stats = is_bn and norm0.training and norm0.track_running_stats
        if train_stats:  # num_batches_tracked / momentum bookkeeping of nn.BatchNorm, once per branch
            for b in branches:
                if b.adn.N.num_batches_tracked is not None:
                    b.adn.N.num_batches_tracked.add_(1)
        groups = [[i for i, b in enumerate(branches) if b.conv.kernel_size[0] == 1],
                  [i for i, b in enumerate(branches) if b.conv.kernel_size[0] > 1]]
        if not (self.fused_unit_scale and groups[0] and groups[1]):
            groups = [list(range(len(branches)))]
        if self.fused_recompute and norm0.training and torch.is_grad_enabled():
            calls = [0]

            def run(inp: torch.Tensor) -> torch.Tensor:
                calls[0] += 1  # the recomputation in backward must not update the running statistics again
                return self._fused_sum(inp, branches, groups, train_stats, write_back=calls[0] == 1)

            out = checkpoint(run, x, use_reentrant=False)
        else:
            out = self._fused_sum(x, branches, groups, train_stats, write_back=True)
        return self.shuffle(out)

    def _fused_sum(self, x: torch.Tensor, branches: list, groups: list[list[int]], track: bool, write_back: bool
                   ) -> torch.Tensor:
        out = None
        for idx in groups:
            y = self._fused_group(x, [branches[i] for i in idx], track, write_back)
            out = y if out is None else out + y
        return out

    def _fused_group(self, x: torch.Tensor, branches: list, track: bool, write_back: bool) -> torch.Tensor:
        """Σ_branches act(norm(dwconv_k(x))) for branches computed as one stacked tensor ``(B, C·n, *S)``, channel
        ``c·n + i`` holding branch ``i`` of channel ``c``."""
        n, c, dims = len(branches), x.shape[1], x.dim() - 2
        convs, norms = [b.conv for b in branches], [b.adn.N for b in branches]
        act = branches[0].adn.A
        kmax = max(cv.kernel_size[0] for cv in convs)
        norm0 = norms[0]
        is_bn = isinstance(norm0, nn.modules.batchnorm._BatchNorm)
        # BatchNorm in eval mode (or without batch statistics) is affine: fold it into the conv weights and a bias
        fold = is_bn and not norm0.training and norm0.running_mean is not None

        def stack(ts: list[torch.Tensor]) -> torch.Tensor:  # per-branch (C,) -> (C·n,) in the channel-major order
            return torch.stack(ts, 1).reshape(-1)

        weights = [cv.weight if cv.kernel_size[0] == kmax else F.pad(cv.weight, [(kmax - cv.kernel_size[0]) // 2] * 2 * dims)
                   for cv in convs]
        w = torch.stack(weights, 1).reshape(c * n, 1, *([kmax] * dims))
        bias = stack([cv.bias for cv in convs]) if convs[0].bias is not None else None
        if fold:
            scale = torch.rsqrt(stack([m.running_var for m in norms]) + norm0.eps)
            shift = ((bias if bias is not None else 0) - stack([m.running_mean for m in norms])) * scale
            if norm0.affine:
                gamma = stack([m.weight for m in norms])
                scale, shift = scale * gamma, shift * gamma + stack([m.bias for m in norms])
            w = w * scale.reshape(-1, *([1] * (dims + 1)))
            bias = shift
        if kmax == 1:  # depth-wise 1×1: a per-channel scale (and shift)
            lead = (1, c) if n == 1 else (1, c, n)
            xs = x if n == 1 else x.unsqueeze(2)
            w_c = w.reshape(*lead, *([1] * dims)).to(x.dtype)
            y = xs * w_c if bias is None else torch.addcmul(bias.reshape(*lead, *([1] * dims)).to(x.dtype), xs, w_c)
            y = y if n == 1 else y.flatten(1, 2)
        else:
            conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
            y = conv(x, w, bias, convs[0].stride, kmax // 2, 1, c)
        if not fold and not isinstance(norm0, nn.Identity):
            weight = stack([m.weight for m in norms]) if norm0.affine else None
            nbias = stack([m.bias for m in norms]) if norm0.affine else None
            if is_bn:
                if track:  # running statistics of the stacked channels, written back to the branches once
                    rm, rv = stack([m.running_mean for m in norms]), stack([m.running_var for m in norms])
                    momentum = norm0.momentum
                    if momentum is None:  # cumulative moving average, as nn.BatchNorm
                        momentum = 1.0 / float(norm0.num_batches_tracked)
                    y = F.batch_norm(y, rm, rv, weight, nbias, True, momentum, norm0.eps)
                    with torch.no_grad():
                        for i, m in enumerate(norms if write_back else ()):
                            m.running_mean.copy_(rm.view(c, n)[:, i])
                            m.running_var.copy_(rv.view(c, n)[:, i])
                else:  # batch statistics without running statistics
                    y = F.batch_norm(y, None, None, weight, nbias, True, 0.0, norm0.eps)
            else:
                y = F.instance_norm(y, None, None, weight, nbias, True, 0.0, norm0.eps)
        y = act(y)
        return y if n == 1 else y.unflatten(1, (c, n)).sum(2)


class KernelPartsCache:
    """Mixin of the blocks whose inference kernels read prepared weights (:class:`MKIR`, :class:`~ul3d.networks.blocks.
    GAG`): the block defines ``_prepared_parts(dtype)`` (None where its kernels do not apply) and sets
    ``self._kernel_cache = None`` in ``__init__``."""

    @torch.jit.unused
    def cached_kernel_parts(self, x: torch.Tensor) -> tuple | None:
        """``_prepared_parts(compute dtype of x)`` (the kernels' weights: cast, folded, packed), kept until a parameter
        or buffer of the block changes (in place, e.g. an optimizer step or ``load_state_dict``, or replaced) or x's
        device or dtype does: preparing them launches ~10 small kernels per block and call, about 0.1 ms of an H200
        forward of UltraLightUNet3D base. When the parameters change in place the kept tensors are overwritten in place
        too, so a CUDA graph that read them reads the new values after :meth:`refresh_kernel_cache`
        (``InferenceCopy.refresh`` calls it) or any eager call."""
        dtype = compute_dtype(x)
        if torch.compiler.is_compiling():
            return self._prepared_parts(dtype)
        cache = self._kernel_cache
        if cache is None or cache[0][:2] != (x.device, dtype):
            parts = self._prepared_parts(dtype)
            self._kernel_cache = ((x.device, dtype, self._state_key()), parts)
            return parts
        if cache[0][2] != self._state_key():
            self.refresh_kernel_cache()
        return self._kernel_cache[1]

    @torch.jit.unused
    def refresh_kernel_cache(self) -> None:
        """Prepare :meth:`cached_kernel_parts` again from the current parameters, written into the kept tensors in place
        (same shapes and dtypes; otherwise they are replaced)."""
        if self._kernel_cache is None:
            return
        (device, dtype, _), old = self._kernel_cache
        new = self._prepared_parts(dtype)
        olds, news = _tensors(old), _tensors(new)
        if old is not None and new is not None and len(olds) == len(news) \
                and all(a.shape == b.shape and a.dtype == b.dtype and a.device == b.device for a, b in zip(olds, news)):
            with torch.no_grad():
                for a, b in zip(olds, news):
                    a.copy_(b)
            new = old
        self._kernel_cache = ((device, dtype, self._state_key()), new)

    @torch.jit.unused
    def _state_key(self) -> tuple:
        """What the prepared parts depend on: every parameter and buffer (identity, storage, in-place version) and the
        modules' training flags."""
        return (tuple(m.training for m in self.modules()),
                tuple((id(t), t.data_ptr(), t._version) for t in itertools.chain(self.parameters(), self.buffers())))


class MKIR(KernelPartsCache, nn.Module):
    """Multi-kernel inverted residual, Eq. 1: ``BN(PWC_2(MKDC(ReLU6(BN(PWC_1(x))))))`` plus a shortcut.

    ``PWC_1`` expands ``in_channels`` by ``expansion`` (2 in the paper), :class:`MKDC` mixes space at
    several kernel sizes, ``PWC_2`` projects to ``out_channels`` with norm and no activation.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        kernels: MKDC kernel sizes. Defaults to ``(1, 3, 5)``.
        expansion: expansion factor of ``PWC_1`` (on the input width). Defaults to 2.
        stride: stride of the depth-wise convolutions. Defaults to 1.
        norm: normalisation (MONAI name or ``(name, kwargs)``). Defaults to batch.
        act: activation after ``PWC_1`` and in MKDC. Defaults to ReLU6.
        shuffle: channel shuffle after the MKDC sum with ``gcd(expanded, out_channels)`` groups, as in
            the released code. Defaults to True.
        shortcut: ``"projection"`` (released code, default): identity when the widths match,
            otherwise a bias-free 1×1 conv; ``"identity"`` (MobileNetV2): residual only when widths
            match and stride is 1; ``"none"``: Eq. 1 literally, no residual.
        parallel: see :class:`MKDC`.

    Note:
        The paper's Eq. 1 shows no residual; the released 2D code adds one with a 1×1 projection
        whenever the widths differ, and the paper's parameter counts include those projections, so
        ``"projection"`` is the default. No residual is added when ``stride != 1``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernels: Sequence[int] = (1, 3, 5),
        expansion: int = 2,
        stride: int = 1,
        norm: str | tuple = "batch",
        act: str | tuple = "relu6",
        shuffle: bool = True,
        shortcut: str = "projection",
        parallel: bool = True,
    ) -> None:
        super().__init__()
        if shortcut not in ("projection", "identity", "none"):
            raise ValueError(f"MKIR: shortcut must be 'projection', 'identity' or 'none', got {shortcut!r}.")
        hidden = int(in_channels * expansion)
        self.expand = Convolution(spatial_dims, in_channels, hidden, kernel_size=1, bias=False, norm=norm, act=act)
        self.mkdc = MKDC(
            spatial_dims,
            hidden,
            kernels=kernels,
            stride=stride,
            norm=norm,
            act=act,
            shuffle_groups=math.gcd(hidden, out_channels) if shuffle else 1,
            parallel=parallel,
        )
        self.project = Convolution(spatial_dims, hidden, out_channels, kernel_size=1, bias=False, norm=norm, act=None)
        self.residual = stride == 1 and (shortcut == "projection" or (shortcut == "identity" and in_channels == out_channels))
        if self.residual and in_channels != out_channels:
            self.shortcut: nn.Module = Conv[Conv.CONV, spatial_dims](in_channels, out_channels, kernel_size=1, bias=False)
        else:
            self.shortcut = nn.Identity()
        # Fast path (issue 7), off by default, switched on by ``ul3d.networks.fast.accelerate(pointwise_matmul=True)``:
        # the 1×1 convs (expand, project, shortcut) as matrix products (:func:`pointwise_conv`); same parameters.
        self.pointwise_matmul = False
        # ``outer_product`` (``accelerate(outer_product=True)``, ``ul3d predict``'s CPU default): with one input channel
        # (the first encoder stage) expand and shortcut are broadcast multiplies (:func:`outer_product_conv`)
        self.outer_product = False
        # ``inplace`` (``accelerate(inplace=True)``, inference): the shortcut is added in place when autograd is off
        self.inplace = False
        # ``merge_pointwise`` (``accelerate(merge_pointwise=True)``, inference with autograd off): the MKDC's channel
        # shuffle becomes a permutation of the project conv's input channels, and with a one-channel input (and
        # BatchNorm folded) project and shortcut are one matrix product over [MKDC output, input]
        self.merge_pointwise = False
        # ``triton`` (``accelerate(triton=True)``, inference with autograd off, where Triton runs): the block as three
        # kernels, expand (+ folded norm, ReLU6, the MKDC's zero padding), the MKDC, project (+ folded norm, shortcut)
        # (:meth:`forward_kernels`)
        self.triton = False
        self._kernel_cache: tuple | None = None  # (key, parts) of the last :meth:`cached_kernel_parts`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if self.triton and not torch.is_grad_enabled() and triton_available(x.device):
                parts = self.cached_kernel_parts(x)
                if parts is not None:
                    return self.forward_kernels(x, parts)
            if self.merge_pointwise and not torch.is_grad_enabled() and self.mkdc_plain():
                return self._forward_merged(x)
            if self.pointwise_matmul or (self.outer_product and x.shape[1] == 1):
                return self._forward_fast(x)
        out = self.project(self.mkdc(self.expand(x)))
        if self.residual:
            out = accumulate(out, self.shortcut(x), self.inplace)
        return out

    @torch.jit.unused
    def _forward_fast(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` with the 1×1 convs of expand and shortcut as :func:`pointwise_conv` (``pointwise_matmul``,
        project too) or, for a one-channel input, as :func:`outer_product_conv` (``outer_product``)."""
        conv = pointwise_conv if self.pointwise_matmul else outer_product_conv
        h = self.mkdc(_pointwise_block(self.expand, x, conv, kernels=self.triton))
        out = _pointwise_block(self.project, h, kernels=self.triton) if self.pointwise_matmul else self.project(h)
        if self.residual:
            sc = self.shortcut
            out = accumulate(out, conv(x, sc.weight, sc.bias) if isinstance(sc, nn.modules.conv._ConvNd) else x,
                             self.inplace)
        return out

    @torch.jit.unused
    def kernel_parts(self, x: torch.Tensor | torch.dtype) -> tuple | None:
        """What :meth:`forward_kernels` computes the block with for input ``x`` (or in dtype ``x``): ``(expand,
        branches, shuffle groups, project, shortcut)`` with ``expand = (weight, bias, (lo, hi))`` and ``project =
        (weight, bias)`` (eval-mode BatchNorms folded, :func:`folded_convolution`), ``branches`` as
        :meth:`MKDC.folded_branches` and ``shortcut`` a 1×1 conv weight, ``x`` itself (``"identity"``) or None (no
        residual); None when the block is anything else (training-mode norms, another activation, strides, a
        sequential MKDC, dtypes the kernels do not take)."""
        dtype = x if isinstance(x, torch.dtype) else compute_dtype(x)
        if dtype not in TRITON_DTYPES or not isinstance(self.mkdc, MKDC) or self.mkdc.triton_unsupported() is not None:
            return None
        folded = self._folded_parts()
        if folded is None or any(s != 1 for s in self.expand.conv.stride + self.project.conv.stride):
            return None
        expand, branches, project = folded
        shortcut = None
        if self.residual:
            sc = self.shortcut
            if isinstance(sc, nn.modules.conv._ConvNd):
                if sc.bias is not None or any(k != 1 for k in sc.kernel_size) or any(s != 1 for s in sc.stride):
                    return None
                shortcut = sc.weight
            elif isinstance(sc, nn.Identity):
                shortcut = "identity"
            else:
                return None
        return expand, branches, self.mkdc.shuffle.groups, project, shortcut

    @torch.jit.unused
    def _folded_parts(self) -> tuple | None:
        """``(expand (weight, bias, (lo, hi)), branches, project (weight, bias))`` with eval-mode BatchNorms folded
        (:func:`folded_convolution`, :meth:`MKDC.folded_branches`); None unless every part folds, expand's activation
        is a clamp (ReLU/ReLU6/Hardtanh or none) and project has none."""
        expand, project, branches = folded_convolution(self.expand), folded_convolution(self.project), \
            self.mkdc.folded_branches()
        if expand is None or project is None or branches is None or project[2] is not None:
            return None
        bounds = _clamp_range(expand[2]) if expand[2] is not None else (float("-inf"), float("inf"))
        if bounds is None:
            return None
        return (expand[0], expand[1], bounds), branches, project[:2]

    @torch.jit.unused
    def _prepared_parts(self, dtype: torch.dtype) -> tuple | None:
        """:meth:`kernel_parts` with weights cast to ``dtype``, biases in float32 and the MKDC's weights packed."""
        parts = self.kernel_parts(dtype)
        if parts is None:
            return None
        (we, be, bounds), branches, groups, (wp, bp), shortcut = parts

        def cast(t):
            return None if t is None else t.detach().reshape(t.shape[0], -1).to(dtype).contiguous()

        def f32(t):
            return None if t is None else t.detach().float().contiguous()

        weights = [w.detach().float().contiguous() for w in branches[0]]
        biases = [f32(b) for b in branches[1]]
        return ((cast(we), f32(be), bounds), (weights, biases, branches[2]), groups, (cast(wp), f32(bp)),
                shortcut if shortcut is None or isinstance(shortcut, str) else cast(shortcut),
                pack_branches(weights, biases))

    @torch.jit.unused
    def forward_kernels(self, x: torch.Tensor, parts: tuple) -> torch.Tensor:
        """:meth:`forward` in three Triton kernels (inference; ``parts`` from :meth:`kernel_parts`): expand, its bias,
        ReLU6 and the zero padding of the MKDC's widest kernel as one :func:`~ul3d.networks.depthwise.pointwise_act`;
        the MKDC as :func:`~ul3d.networks.depthwise.multikernel_depthwise` reading that padded tensor; project, its
        bias and the shortcut (identity or 1×1 conv) as another ``pointwise_act``. Every intermediate is written once
        (the plain path adds a bias add, a clamp and a padded copy after each of cuDNN's 1×1 convs)."""
        (we, be, bounds), branches, groups, (wp, bp), shortcut = parts[:5]
        widest = [max(w.shape[2 + i] for w in branches[0]) // 2 for i in range(x.dim() - 2)]
        e = pointwise_act(x, we, be, bounds, pad=widest)
        h = multikernel_depthwise(e, *branches, shuffle_groups=groups, padded=True,
                                  packed=parts[5] if len(parts) > 5 else None)
        if shortcut is None:
            return pointwise_act(h, wp, bp)
        if isinstance(shortcut, str):
            return pointwise_act(h, wp, bp, residual=x)
        return pointwise_act(h, wp, bp, residual=x, residual_weight=shortcut.reshape(shortcut.shape[0], -1))

    @torch.jit.unused
    def lean_unsupported(self) -> str | None:
        """Why :meth:`forward_lean` computes project, BatchNorm and shortcut separately, or None when it merges them."""
        adn = getattr(self.project, "adn", None)
        bn = getattr(adn, "N", None) if adn is not None else None
        if not _local_batchnorm(bn) or any(
                not isinstance(m, nn.Identity) for name, m in adn.named_children() if name != "N"):
            return "the project conv is not followed by BatchNorm alone (not SyncBatchNorm)"
        if self.project.conv.bias is not None:
            return "the project conv has a bias"
        sc = self.shortcut
        if self.residual and not (isinstance(sc, nn.modules.conv._ConvNd) and sc.bias is None):
            return "identity shortcut (nothing to merge)"
        hidden, out = self.project.conv.in_channels, self.project.conv.out_channels
        if hidden + (self.expand.conv.in_channels if self.residual else 0) >= out:
            return "no narrower than its output: merging would not save memory"
        return None

    @torch.jit.unused
    def forward_lean(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` keeping less for backward in training (``use_checkpoint``): the expand's and every MKDC
        branch's BatchNorm + ReLU6 keep only their input (:func:`batchnorm_act`, :meth:`MKDC.forward_lean`), and in a
        block whose hidden and input channels together are fewer than its output's (the first encoder stage: 2 + 1 →
        16) the project conv's BatchNorm uses batch statistics computed from the hidden channels
        (:func:`batchnorm_of_pointwise`), so project, BatchNorm, shortcut and sum are one 1×1 conv over
        ``[hidden − mean(hidden), input]`` with weights ``[scale · W_2, W_s]`` and bias ``β``: the output is then the
        only full-width tensor. The same function, gradients and running statistics as :meth:`forward` (up to rounding); in
        eval mode or with autograd off it is :meth:`forward`."""
        if not (self.training and torch.is_grad_enabled()):
            return self.forward(x)
        e = self.expand
        h = self.mkdc.forward_lean(batchnorm_act(e.conv(x), getattr(e, "adn", None)))
        if self.lean_unsupported() is not None or not self.project.adn.N.training:
            out = self.project(h)
            return out + self.shortcut(x) if self.residual else out
        w = self.project.conv.weight
        scale, shift, centred = batchnorm_of_pointwise(h, w, self.project.adn.N)
        wcat = scale.reshape((-1,) + (1,) * (w.dim() - 1)) * w.to(scale.dtype)
        inputs = centred
        if self.residual:
            wcat = torch.cat([wcat, self.shortcut.weight.to(scale.dtype)], 1)
            inputs = torch.cat([centred, x.to(centred.dtype)], 1)
        # under autocast the conv casts float32 weights itself (it leaves float64 alone); without it the conv runs in
        # the centred channels' dtype (float32 at least) and the output is cast to the block's dtype
        autocast = torch.is_autocast_enabled(x.device.type)
        target = torch.float32 if autocast else inputs.dtype
        out = (F.conv1d, F.conv2d, F.conv3d)[w.dim() - 3](inputs, wcat.to(target), shift.to(target))
        return out if autocast else out.to(h.dtype)

    @torch.jit.unused
    def mkdc_plain(self) -> bool:
        """Whether the MKDC runs its plain modules (not its fused, Triton or float32-under-autocast forward)."""
        return not (self.mkdc.fused or self.mkdc.triton or self.mkdc.float32)

    def _unshuffled(self, w: torch.Tensor) -> torch.Tensor:
        """The project conv's weight ``w`` with its input channels in the order of the MKDC's sum before the channel
        shuffle: ``PWC_2(CS(h)) = PWC_2'(h)``. ``CS`` puts channel ``i·n + j`` of ``h`` at ``j·g + i`` (``g`` groups
        of ``n``), so ``W'[:, i·n + j] = W[:, j·g + i]``."""
        g = self.mkdc.shuffle.groups
        if g == 1:
            return w
        c = w.shape[1]
        return w[:, torch.arange(c, device=w.device).view(c // g, g).t().reshape(-1)]

    @torch.jit.unused
    def forward_pooled(self, x: torch.Tensor, pool: nn.Module, triton: bool = False) -> torch.Tensor:
        """``pool(self(x))``; for inference on the merged path (``merge_pointwise``, autograd off) with a one-channel,
        channels-last 3D input of even size and a 2×2×2 max-pool, the merged project + shortcut product is computed
        two depth slices at a time and max-pooled at once, so the full-resolution ``C_1``-channel output never exists
        (2-core CPU, 4 × 96³ windows of the base network: it is 226 MB). With ``triton`` (``UltraLightUNet``'s
        ``triton_kernels``, autograd off) a block on a few-channel image whose norms fold runs as one Triton kernel,
        pooled (:func:`~ul3d.networks.depthwise.pooled_stem`, where Triton runs), else the pooling is
        :func:`~ul3d.networks.depthwise.max_pool_2x`."""
        if self.merge_pointwise and not torch.is_grad_enabled() and self.mkdc_plain():
            return self._forward_merged(x, pool)
        if triton and not torch.is_grad_enabled():
            stem = self.pooled_stem_parts(x, pool)
            if stem is not None and triton_available(x.device):
                return pooled_stem(x, *stem)
            return max_pool_2x(self(x), pool)
        return pool(self(x))

    @torch.jit.unused
    def pooled_stem_parts(self, x: torch.Tensor, pool: nn.Module) -> tuple | None:
        """The arguments after ``x`` of :func:`~ul3d.networks.depthwise.pooled_stem` that compute ``pool(self(x))``
        (eval-mode or folded BatchNorms, a 2×2×2 max-pool, shapes its kernel takes), or None."""
        if max_pool_geometry(pool, x.dim() - 2) != ((2, 2, 2), (2, 2, 2)) or not self.residual:
            return None
        folded = self._folded_parts()
        if folded is None:
            return None
        expand, branches, (wp, bp) = folded
        sc = self.shortcut
        if not isinstance(sc, nn.modules.conv._ConvNd) or stem_unsupported(x, expand[0], branches[0], wp) is not None:
            return None
        out_weight = torch.cat([self._unshuffled(wp).reshape(wp.shape[0], -1), sc.weight.reshape(wp.shape[0], -1)], 1)
        bias = [b for b in (bp, sc.bias) if b is not None]
        return expand, branches, out_weight, sum(bias) if bias else None

    @staticmethod
    def _pool_fits(pool: nn.Module | None, x: torch.Tensor) -> bool:
        """Whether :meth:`_pooled_stem_slabs` computes ``pool`` on the block's output for input ``x``."""
        return isinstance(pool, nn.MaxPool3d) and x.dim() == 5 and not any(int(s) % 2 for s in x.shape[2:]) \
            and max_pool_geometry(pool, 3) == ((2, 2, 2), (2, 2, 2))

    @staticmethod
    def _pooled_stem_slabs(h: torch.Tensor, x: torch.Tensor, wcat: torch.Tensor, bias: torch.Tensor | None
                           ) -> torch.Tensor:
        """2×2×2 max-pool of ``[h, x] @ wcat (+ bias)`` over ``(N, D, H, W, ·)`` voxels, two depth slices at a time;
        ``h`` is ``(N, D, H, W, C)`` (channels innermost), ``x`` ``(N, 1, D, H, W)``. Returns ``(N, O, D/2, H/2, W/2)``
        channels-last."""
        n, d, hh, ww, c = h.shape
        o = wcat.shape[1]
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else wcat.dtype
        out = torch.empty((n, d // 2, hh // 2, ww // 2, o), dtype=dtype, device=h.device)
        xv = x.reshape(n, d, hh, ww, 1)
        for s in range(n):
            for a in range(0, d, 2):
                rows = torch.cat([h[s, a:a + 2], xv[s, a:a + 2]], -1).reshape(-1, c + 1)
                z = (rows @ wcat).view(2, hh, ww, o)
                m = torch.maximum(z[0], z[1])
                m = torch.maximum(m[0::2], m[1::2])
                pooled = torch.maximum(m[:, 0::2], m[:, 1::2], out=out[s, a // 2])
                if bias is not None:  # a per-channel constant commutes with the max: added to the pooled slab
                    pooled.add_(bias.to(dtype))
        return out.permute(0, 4, 1, 2, 3)

    @torch.jit.unused
    def _forward_merged(self, x: torch.Tensor, pool: nn.Module | None = None) -> torch.Tensor:
        """:meth:`forward` for inference (autograd off) without the shuffle's copy: ``PWC_2(CS(h)) = PWC_2'(h)``
        (:meth:`_unshuffled`). For a one-channel (channels-last)
        input with BatchNorm folded into the project conv, ``W'·h + b + w_s·x`` is one ``addmm`` over the
        concatenated ``[h, x]`` voxels: no separate shortcut tensor and no sum. With ``pool`` the result is
        ``pool(forward(x))`` (see :meth:`forward_pooled`)."""
        one = self.outer_product and x.shape[1] == 1
        if pool is not None and not (one and self._pool_fits(pool, x)):
            return pool(self._forward_merged(x))
        conv = self.project.conv
        w = self._unshuffled(conv.weight)
        adn = getattr(self.project, "adn", None)
        affine_only = adn is None or all(isinstance(m, nn.Identity) for m in adn.children())
        sc = self.shortcut
        merged_stem = one and self.residual and affine_only and isinstance(sc, nn.modules.conv._ConvNd) and sc.bias is None
        if merged_stem and self._packable(x):
            h = self._packed_stem(x)  # (N, *S, C), the branch sum of every sample, channels innermost
        else:
            if one:
                expanded = _pointwise_block(self.expand, x, outer_product_conv)
            else:
                expanded = conv_act(x, self.expand.conv, getattr(self.expand, "adn", None))
            h = self.mkdc.branch_sum(expanded)
            merged_stem = merged_stem and is_channels_last(h)
            h = h.movedim(1, -1) if merged_stem else h
        if pool is not None and merged_stem and self._pool_fits(pool, x):
            wcat = torch.cat([w.reshape(w.shape[0], -1), sc.weight.reshape(w.shape[0], 1)], 1).t()
            return self._pooled_stem_slabs(h, x, wcat, conv.bias)
        if merged_stem:
            # the bias as one more input column of ones (addmm would first copy it into every output row)
            cols = [h, x.movedim(1, -1)] + ([] if conv.bias is None else [torch.ones_like(x.movedim(1, -1))])
            rows = torch.cat(cols, -1).reshape(-1, sum(c.shape[-1] for c in cols))
            wcols = [w.reshape(w.shape[0], -1), sc.weight.reshape(w.shape[0], 1)]
            wcat = torch.cat(wcols + ([] if conv.bias is None else [conv.bias.reshape(-1, 1)]), 1).t()
            out = (rows @ wcat).reshape(x.shape[0], *x.shape[2:], w.shape[0]).movedim(-1, 1)
            return out if pool is None else pool(out)
        channels_last = is_channels_last(h)
        if channels_last:
            w = w.contiguous(memory_format=channels_last_format(w.dim()))
        out = _layout_like(conv._conv_forward(h, w, conv.bias), h)
        if adn is not None:
            out = adn(out)
        if self.residual:
            shortcut = outer_product_conv(x, sc.weight, sc.bias) if one and isinstance(sc, nn.modules.conv._ConvNd) \
                else _layout_like(sc(x), x)
            out = accumulate(out, shortcut, self.inplace)
        return out if pool is None else pool(out)


    #: vector lanes (float32) the packed stem fills at most: AVX-512 holds 16
    PACK_LANES = 16

    @torch.jit.unused
    def _packable(self, x: torch.Tensor) -> bool:
        """Whether :meth:`_packed_stem` applies: a CPU batch of several samples whose hidden channels, all samples
        together, fit one vector, an expand conv with its norm folded, and an MKDC :meth:`MKDC.packed_branch_sum` takes."""
        hidden, n = self.mkdc.branches[0].conv.in_channels, x.shape[0]
        return (x.device.type == "cpu" and n > 1 and hidden * n <= self.PACK_LANES and hidden < self.PACK_LANES // 2
                and self.mkdc.packed_unsupported() is None
                and _activation_attr(getattr(self.expand, "adn", None)) is not None)

    @torch.jit.unused
    def _packed_stem(self, x: torch.Tensor) -> torch.Tensor:
        """Expand and MKDC branch sum of a one-channel batch ``(N, 1, *S)`` with the samples packed as channels: the
        voxels of all samples are laid out ``(*S, N)``, the expand's outer product gives ``(*S, N, C)``, i.e. one
        ``(1, N·C, *S)`` channels-last tensor for :meth:`MKDC.packed_branch_sum`. Returns the branch sum as ``(N, *S, C)``
        (a view; channels innermost), the same values as the unpacked path."""
        n, spatial = x.shape[0], x.shape[2:]
        e = self.expand.conv
        hidden = e.weight.shape[0]
        voxels = x.reshape(n, -1).t().contiguous()  # (M, N): the samples of each voxel side by side
        h = voxels.unsqueeze(-1) * e.weight.reshape(1, 1, hidden)
        if e.bias is not None:
            h += e.bias.reshape(1, 1, hidden)
        adn = getattr(self.expand, "adn", None)
        if adn is not None:
            h = adn(h)
        packed = h.reshape(1, *spatial, n * hidden).movedim(-1, 1)  # (1, N·C, *S), channels-last
        out = self.mkdc.packed_branch_sum(packed, n)  # (1, N·C, *S), channels-last: memory (*S, N, C)
        return out.squeeze(0).movedim(0, -1).reshape(-1, n, hidden).transpose(0, 1).reshape(n, *spatial, hidden)


class InvertedResidual(MKIR):
    """MobileNetV2's inverted residual block (IRB; Sandler et al., 2018), the baseline of paper Table 6.

    An :class:`MKIR` with a single 3×3 depth-wise kernel and no channel shuffle; the shortcut rule
    is the same as the MKIR it replaces, so the Table 6 comparison changes only the block.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        expansion: int = 2,
        stride: int = 1,
        norm: str | tuple = "batch",
        act: str | tuple = "relu6",
        shortcut: str = "projection",
    ) -> None:
        super().__init__(
            spatial_dims,
            in_channels,
            out_channels,
            kernels=(kernel_size,),
            expansion=expansion,
            stride=stride,
            norm=norm,
            act=act,
            shuffle=False,
            shortcut=shortcut,
        )


# long names, as the released code spells them
MultiKernelDepthwiseConv = MKDC
MultiKernelInvertedResidual = MKIR
