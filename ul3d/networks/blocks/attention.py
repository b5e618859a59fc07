"""Attention blocks of UltraLightUNet (§3.2–3.4): CMFA (channel + spatial attention), MKIRA, GAG."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv, Pool
from monai.networks.layers.utils import get_act_layer
from torch import nn

from .. import depthwise as _depthwise
from ..depthwise import (TRITON_DTYPES, channel_spatial_attention, depthwise_conv, gated_skip_sum, pack_branches,
                         pack_gate, triton_available)
from .multikernel import MKIR, KernelPartsCache, accumulate, channels_last_format, is_channels_last

__all__ = [
    "GlobalMaxPool",
    "ChannelAttention",
    "SpatialAttention",
    "CMFA",
    "MKIRA",
    "GAG",
    "GroupedAttentionGate",
    "AttentionGate",
    "ConvolutionalMultiFocalAttention",
    "MultiKernelInvertedResidualAttention",
    "one_per_group_conv",
]


def one_per_group_unsupported(conv: nn.Module) -> str | None:
    """Why :func:`one_per_group_conv` cannot compute ``conv`` (without its bias), or None when it can."""
    k = conv.kernel_size
    if conv.out_channels != conv.groups:
        return "not one output channel per group"
    if any(s != 1 for s in conv.stride) or any(d != 1 for d in conv.dilation) or conv.padding_mode != "zeros":
        return "strided, dilated or not zero-padded"
    if any(kk % 2 == 0 for kk in k) or tuple(conv.padding) != tuple(kk // 2 for kk in k):
        return "not an odd kernel with 'same' padding"
    return None


#: the spatial attention's depth-wise conv (k³, 2 channels) in training on ul3d's Triton kernels too (with
#: ``accelerate(triton=True)``); off: PyTorch's depth-wise conv in training, ul3d's forward kernel with autograd off
#: (H200, base training step as one CUDA graph, eager: 37.8 → 37.1 ms,
#: ``benchmarks/results/levers_cuda_h200_2026-12-04_up2x_quick.json``)
SPATIAL_TRITON_TRAINING = True


def one_per_group_depthwise(x: torch.Tensor, conv: nn.Module, triton: bool) -> torch.Tensor:
    """The depth-wise half of :func:`one_per_group_conv`: ``w[o, i] ⋆ x[o·p + i]`` for every input channel, i.e. a
    depth-wise conv with the weights ``w.reshape(C_in, 1, k…)`` (ul3d's Triton kernels with ``triton``, where they
    run; otherwise PyTorch's conv, in ``x``'s memory format)."""
    w = conv.weight.reshape(conv.in_channels, 1, *conv.weight.shape[2:])
    if is_channels_last(x):
        w = w.contiguous(memory_format=channels_last_format(w.dim()))
    return depthwise_conv(x, w, triton=triton)


def group_channel_sum(y: torch.Tensor, groups: int) -> torch.Tensor:
    """``(B, groups·p, *S) -> (B, groups, *S)``: the sum of every ``p`` consecutive channels, as strided adds (any
    memory layout; a sum over a size-``p`` axis of a channels-last tensor took 9.5 vs 1.2 ms on the CPU at 4×16×48³)."""
    p = y.shape[1] // groups
    if p == 1:
        return y
    out = y[:, 0::p] + y[:, 1::p]
    for i in range(2, p):
        out += y[:, i::p]
    return out


def one_per_group_conv(x: torch.Tensor, conv: nn.Module, triton: bool = True) -> torch.Tensor:
    """``conv(x)`` for a grouped conv (stride 1, "same" zero padding) whose groups each map ``p = C_in / groups``
    input channels to one output channel: ``y[o] = Σ_{i<p} w[o, i] ⋆ x[o·p + i] + b[o]``, computed as a depth-wise
    conv (:func:`one_per_group_depthwise`) and a sum of each group's channels (:func:`group_channel_sum`). GAG's
    grouped convs (Eq. 6; ``p = 2`` in the paper's networks) and the spatial attention's 2 -> 1 conv (Eq. 4, one group)
    are such convs; cuDNN computes them with its slow generic kernel (4.7 ms of a 28 ms H200 profile of a base
    forward at 4×96³ for the GAGs, 1.8 ms for the spatial attention)."""
    y = group_channel_sum(one_per_group_depthwise(x, conv, triton), conv.groups)
    if conv.bias is not None:
        y = accumulate(y, conv.bias.reshape(1, -1, *([1] * (x.dim() - 2))), True)  # y: a fresh intermediate
    return y


class GlobalMaxPool(nn.Module):
    """Global max pooling (the AMP of Eq. 3) as one reduction: the values of ``AdaptiveMaxPool{1,2,3}d(1)``,
    ``(B, C, *S) -> (B, C, 1, ...)``, without that kernel's cost (4 ms of a 75 ms H100 training step of the 3D base
    network, ``benchmarks/results/profile_cuda_h100_2026-11-23.json``). Counted like adaptive max pooling by
    :mod:`ul3d.profiling`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[0], x.shape[1]
        if is_channels_last(x):
            # channels-last: reduce over the voxels as rows of channels; four voxels per row (when they divide the
            # volume) give PyTorch's CPU reduction a vectorisable inner size (4·C): 11.5 -> 0.9 ms at 4×16×48³
            rows = x.movedim(1, -1).reshape(n, -1, c)
            if rows.shape[1] % 4 == 0:
                out = rows.reshape(n, -1, 4 * c).amax(dim=1).reshape(n, 4, c).amax(dim=1)
            else:
                out = rows.amax(dim=1)
        else:
            out = x.flatten(2).amax(dim=2)
        for _ in range(x.dim() - 2):
            out = out.unsqueeze(-1)
        return out


class ChannelAttention(nn.Module):
    """Channel attention, Eq. 3: ``σ(PWC_2(ReLU(PWC_1(AMP(x)))) + PWC_2(ReLU(PWC_1(AAP(x))))) ⊗ x``.

    Global max and average pooling share one bias-free two-layer 1×1-conv MLP
    ``C -> C // r -> C``.

    Args:
        spatial_dims: 2 or 3.
        channels: input = output channels.
        reduction: reduction ratio ``r`` (16 in the paper). When ``channels < r`` the ratio falls back
            to ``channels`` (hidden width 1), as in the released code.
        act: activation between the two convolutions. Defaults to ReLU.
    """

    def __init__(self, spatial_dims: int, channels: int, reduction: int = 16, act: str | tuple = "relu") -> None:
        super().__init__()
        r = reduction if channels >= reduction else channels
        hidden = max(channels // r, 1)
        conv = Conv[Conv.CONV, spatial_dims]
        self.avg_pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.max_pool = GlobalMaxPool()
        self.fc1 = conv(channels, hidden, kernel_size=1, bias=False)
        self.act = get_act_layer(act)
        self.fc2 = conv(hidden, channels, kernel_size=1, bias=False)

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """The attention weights ``(B, C, 1, ...)`` of Eq. 3, before the product with ``x``."""
        avg = self.fc2(self.act(self.fc1(self.avg_pool(x))))
        mx = self.fc2(self.act(self.fc1(self.max_pool(x))))
        return torch.sigmoid(avg + mx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weights(x) * x


class SpatialAttention(nn.Module):
    """Spatial attention, Eq. 4: ``σ(LKC([Channel_max(x), Channel_avg(x)])) ⊗ x``.

    Args:
        spatial_dims: 2 or 3.
        kernel_size: the large kernel of ``LKC`` (bias-free, 2 -> 1 channels). Defaults to 7.
    """

    def __init__(self, spatial_dims: int, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"SpatialAttention: kernel_size must be odd, got {kernel_size}.")
        self.conv = Conv[Conv.CONV, spatial_dims](2, 1, kernel_size=kernel_size, padding=kernel_size // 2, bias=False)
        # ``sliced`` (``accelerate(merge_pointwise=True)``, 3D inference with autograd off): the k³ conv as k 2D convs
        # (one per depth tap) over the depth slices plus a shifted sum (oneDNN's 3D conv to one output channel is
        # slow on the CPU: 29.5 -> 7.4 ms at 4×48³)
        self.sliced = False
        # ``depthwise`` (``accelerate(triton=True)``; training and inference): the conv as a depth-wise conv plus a
        # sum of the two channels (:func:`one_per_group_conv`); cuDNN runs the 2 -> 1 conv with its generic kernel
        # (1.39 ms at 4×48³ in bf16 on an H200). In training PyTorch's depth-wise conv; with autograd off ul3d's
        # Triton forward kernel, its depth taps a loop (PyTorch's kernel: 0.23 ms of a 3.9 ms H200 forward of the 3D
        # base network at 4×48³)
        self.depthwise = False

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        """The attention map ``(B, 1, *S)`` of Eq. 4."""
        desc = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        if not torch.jit.is_scripting():  # (TorchScript skips this block)
            if self.depthwise and one_per_group_unsupported(self.conv) is None:
                triton = SPATIAL_TRITON_TRAINING or not torch.is_grad_enabled()
                return torch.sigmoid(one_per_group_conv(desc, self.conv, triton=triton))
            if self.sliced and desc.dim() == 5 and not torch.is_grad_enabled():
                return torch.sigmoid(self._conv3d_sliced(desc))
        return torch.sigmoid(self.conv(desc))

    @torch.jit.unused
    def _conv3d_sliced(self, desc: torch.Tensor) -> torch.Tensor:
        """``conv(desc)`` ("same" zero padding, stride 1, no bias) as ``y[d] = Σ_j z_j[d + j - k//2]`` with
        ``z_j = conv2d(desc[:, :, d], W[:, :, j])``: one 2D conv with ``k`` output channels over the ``B·D`` slices."""
        w = self.conv.weight  # (1, 2, k, k, k)
        k, pad = w.shape[2], w.shape[2] // 2
        n, c, d, h, wd = desc.shape
        slices = desc.transpose(1, 2).reshape(n * d, c, h, wd)
        z = F.conv2d(slices, w[0].transpose(0, 1).contiguous(), None, 1, pad).view(n, d, k, h, wd)
        z = F.pad(z, (0, 0, 0, 0, 0, 0, pad, pad))  # zero depth padding
        out = z[:, 0:d, 0].clone()
        for j in range(1, k):
            out += z[:, j:j + d, j]
        return out.unsqueeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weights(x) * x


class CMFA(KernelPartsCache, nn.Module):
    """Convolutional multi-focal attention (§3.2, Fig. 2f): channel attention, then spatial attention.

    Args:
        spatial_dims: 2 or 3.
        channels: input = output channels.
        reduction: channel-attention reduction ratio. Defaults to 16.
        spatial_kernel: spatial-attention kernel. Defaults to 7.
        act: channel-attention hidden activation. Defaults to ReLU.
        spatial_attention: an existing :class:`SpatialAttention` to use instead of a new one. The
            released code shares one spatial-attention conv across all decoder stages.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        reduction: int = 16,
        spatial_kernel: int = 7,
        act: str | tuple = "relu",
        spatial_attention: SpatialAttention | None = None,
    ) -> None:
        super().__init__()
        self.channel = ChannelAttention(spatial_dims, channels, reduction, act)
        self.spatial = spatial_attention if spatial_attention is not None else SpatialAttention(spatial_dims, spatial_kernel)
        # ``triton`` (``accelerate(triton=True)``): with autograd off, both attentions as ul3d's four Triton kernels
        # where they run (:func:`~ul3d.networks.depthwise.channel_spatial_attention`)
        self.triton = False
        self._kernel_cache: tuple | None = None  # (key, parts) of the last :meth:`cached_kernel_parts`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # (TorchScript skips this block)
            if _depthwise.CMFA_KERNELS and self.triton and not torch.is_grad_enabled() and triton_available(x.device) \
                    and x.dtype in TRITON_DTYPES:
                parts = self.cached_kernel_parts(x)
                y = None if parts is None else channel_spatial_attention(x, *parts)
                if y is not None:
                    return y
        return self.spatial(self.channel(x))

    @torch.jit.unused
    def _prepared_parts(self, dtype: torch.dtype) -> tuple | None:
        """:func:`~ul3d.networks.depthwise.channel_spatial_attention`'s weights (the MLP's two convs as float32
        matrices, the spatial conv as a depth-wise weight and packed), or None where it does not compute this CMFA:
        the MLP's act is ReLU, its convs and the spatial conv are bias-free (as built) with odd spatial kernels."""
        ca, conv = self.channel, self.spatial.conv
        if type(ca.act) is not nn.ReLU or ca.fc1.bias is not None or ca.fc2.bias is not None or conv.bias is not None \
                or any(k % 2 == 0 for k in conv.kernel_size) or any(p != k // 2 for p, k in zip(conv.padding,
                                                                                            conv.kernel_size)) \
                or any(s != 1 for s in conv.stride) or any(d != 1 for d in conv.dilation) or conv.groups != 1 \
                or conv.padding_mode != "zeros":
            return None
        fc1 = ca.fc1.weight.detach().reshape(ca.fc1.out_channels, -1).float().contiguous()
        fc2 = ca.fc2.weight.detach().reshape(ca.fc2.out_channels, -1).float().contiguous()
        spatial = conv.weight.detach().reshape(2, 1, *conv.weight.shape[2:]).float().contiguous()
        return fc1, fc2, spatial, pack_branches([spatial], [None])


class MKIRA(nn.Module):
    """Multi-kernel inverted residual attention, Eq. 5: ``MKIRA(x) = MKIR(CMFA(x))``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (attention runs at this width).
        out_channels: output channels.
        reduction: channel-attention reduction ratio. Defaults to 16.
        spatial_kernel: spatial-attention kernel. Defaults to 7.
        spatial_attention: shared :class:`SpatialAttention`, see :class:`CMFA`.
        block: the MKIR (or IRB) after the attention; built from ``block_kwargs`` when None.
        **block_kwargs: arguments of :class:`MKIR` (kernels, expansion, norm, act, ...).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        reduction: int = 16,
        spatial_kernel: int = 7,
        spatial_attention: SpatialAttention | None = None,
        block: nn.Module | None = None,
        **block_kwargs,
    ) -> None:
        super().__init__()
        self.cmfa = CMFA(spatial_dims, in_channels, reduction, spatial_kernel, spatial_attention=spatial_attention)
        self.mkir = block if block is not None else MKIR(spatial_dims, in_channels, out_channels, **block_kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mkir(self.cmfa(x))

    @torch.jit.unused
    def forward_lean(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` with the MKIR's :meth:`~ul3d.networks.blocks.MKIR.forward_lean` (less kept for backward)."""
        return getattr(self.mkir, "forward_lean", self.mkir)(self.cmfa(x))


class GAG(KernelPartsCache, nn.Module):
    """Grouped attention gate, Eq. 6: ``x ⊗ σ(BN(Conv(ReLU(BN(GC_g(g)) + BN(GC_x(x))))))``.

    ``g`` is the gating signal (upsampled decoder features), ``x`` the skip features it gates.

    Args:
        spatial_dims: 2 or 3.
        gate_channels: channels of ``g`` (F_g).
        skip_channels: channels of ``x`` (F_l).
        inter_channels: F_int. Defaults to ``skip_channels // 2`` (released code).
        kernel_size: kernel of both grouped convolutions. Defaults to 3 (paper, §3.4).
        groups: groups of both grouped convolutions. Defaults to ``gcd(gate_channels, skip_channels,
            inter_channels)``, which is ``C/2`` for the network's even widths (released code: every
            group maps 2 channels to 1).
        norm: normalisation. Defaults to batch.
        act: activation after the sum. Defaults to ReLU.

    Note:
        With ``kernel_size=1, groups=1`` this is Oktay et al.'s attention gate (Attention U-Net),
        the baseline of paper Table 8 — see :class:`AttentionGate`; it then computes the same
        function as ``monai.networks.nets.attentionunet.AttentionBlock``.
    """

    def __init__(
        self,
        spatial_dims: int,
        gate_channels: int,
        skip_channels: int,
        inter_channels: int | None = None,
        kernel_size: int = 3,
        groups: int | None = None,
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
    ) -> None:
        super().__init__()
        inter = inter_channels if inter_channels is not None else max(skip_channels // 2, 1)
        if groups is None:
            groups = math.gcd(math.gcd(gate_channels, skip_channels), inter)
        if gate_channels % groups or skip_channels % groups or inter % groups:
            raise ValueError(
                f"GAG: groups={groups} must divide gate_channels={gate_channels}, "
                f"skip_channels={skip_channels} and inter_channels={inter}."
            )
        self.gate_conv = Convolution(
            spatial_dims, gate_channels, inter, kernel_size=kernel_size, groups=groups, bias=True, norm=norm, act=None
        )
        self.skip_conv = Convolution(
            spatial_dims, skip_channels, inter, kernel_size=kernel_size, groups=groups, bias=True, norm=norm, act=None
        )
        self.act = get_act_layer(act)
        self.psi = Convolution(spatial_dims, inter, 1, kernel_size=1, bias=True, norm=norm, act="sigmoid")
        # the grouped convs as depth-wise convs plus a sum of each group's channels (:func:`one_per_group_conv`), when
        # every group maps its input channels to one output channel: ``triton`` (``accelerate(triton=True)``,
        # training and inference) with ul3d's Triton kernels wherever they run; ``depthwise_sum``
        # (``accelerate(merge_pointwise=True)``, channels-last inference with autograd off) with PyTorch's depth-wise
        # conv (oneDNN's grouped 3D conv with 2 channels per group is slow on the CPU)
        self.triton = False
        self.depthwise_sum = False
        self._kernel_cache: tuple | None = None  # (key, parts) of the last :meth:`cached_kernel_parts`

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # (TorchScript skips this block)
            if self._depthwise_path(g, x):
                return x * self.psi(self.act(self._gates_depthwise(g, x)))
        return x * self.psi(self.act(self.gate_conv(g) + self.skip_conv(x)))

    @torch.jit.unused
    def _depthwise_path(self, g: torch.Tensor, x: torch.Tensor) -> bool:
        """Whether :meth:`_gates_depthwise` computes the gates of this call (see ``triton`` / ``depthwise_sum``)."""
        merged = self.depthwise_sum and not torch.is_grad_enabled() and is_channels_last(g) and is_channels_last(x)
        if not (merged or (self.triton and triton_available(x.device))):
            return False
        return all(one_per_group_unsupported(b.conv) is None for b in (self.gate_conv, self.skip_conv))

    @torch.jit.unused
    def _gates_depthwise(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``BN(GC_g(g)) + BN(GC_x(x))`` with each grouped conv computed by :func:`one_per_group_conv`. With both norms
        folded (inference) and the same grouping, the two depth-wise outputs are added before one channel sum."""
        triton = self.triton
        blocks = ((self.gate_conv, g), (self.skip_conv, x))
        adns = [getattr(b, "adn", None) for b, _ in blocks]
        affine = all(adn is None or all(isinstance(m, nn.Identity) for m in adn.children()) for adn in adns)
        gc, sc = self.gate_conv.conv, self.skip_conv.conv
        if affine and gc.in_channels == sc.in_channels and gc.groups == sc.groups:
            total = accumulate(one_per_group_depthwise(g, gc, triton), one_per_group_depthwise(x, sc, triton), True)
            out = group_channel_sum(total, gc.groups)
            bias = [c.bias for c in (gc, sc) if c.bias is not None]
            if bias:
                out = accumulate(out, sum(bias).reshape(1, -1, *([1] * (x.dim() - 2))), True)
            return out
        gate, skip = (one_per_group_conv(t, b.conv, triton) for b, t in blocks)
        gate, skip = (y if adn is None else adn(y) for y, adn in zip((gate, skip), adns))
        return gate + skip

    @torch.jit.unused
    def skip_sum(self, g: torch.Tensor, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``g + self(g, x)``: the decoder's skip merge (:class:`~ul3d.networks.nets.ultralightunet.DecoderStage`).
        With :data:`~ul3d.networks.depthwise.GATE_KERNEL` (on by default), ``triton``, autograd off,
        Triton available and both norms folded (inference), two kernels where they run
        (:func:`~ul3d.networks.depthwise.gated_skip_sum`: the gate's convs with input rows shared, then ψ, the
        sigmoid, the product and the sum in one pass); otherwise the modules, ``inplace`` adding into ``g``."""
        if _depthwise.GATE_KERNEL and self.triton and not torch.is_grad_enabled() and triton_available(x.device) \
                and g.shape == x.shape and g.dim() == 5 and g.dtype in TRITON_DTYPES and x.dtype in TRITON_DTYPES:
            parts = self.cached_kernel_parts(x)
            y = None if parts is None else gated_skip_sum(g, x, parts)
            if y is not None:
                return y
        return accumulate(g, self(g, x), inplace)

    @torch.jit.unused
    def _prepared_parts(self, dtype: torch.dtype) -> tuple | None:
        """:func:`~ul3d.networks.depthwise.gated_skip_sum`'s packed weights (:func:`~ul3d.networks.depthwise.pack_gate`),
        or None where it does not compute this gate: each grouped conv maps its groups' channels to one output and has
        no norm left (folded), the act is ReLU, ψ is a 1×1 conv whose norm is folded, then a sigmoid."""
        gc, sc = self.gate_conv.conv, self.skip_conv.conv
        if any(one_per_group_unsupported(c) is not None for c in (gc, sc)) or gc.weight.shape != sc.weight.shape \
                or gc.in_channels != sc.in_channels or type(self.act) is not nn.ReLU:
            return None
        if not all(_only(getattr(b, "adn", None), ()) for b in (self.gate_conv, self.skip_conv)):
            return None
        psi = self.psi.conv
        if not _only(getattr(self.psi, "adn", None), (nn.Sigmoid,)) or psi.out_channels != 1 \
                or any(k != 1 for k in psi.kernel_size) or psi.groups != 1:
            return None
        zero = torch.zeros(gc.out_channels, device=gc.weight.device)
        bias = sum(c.bias.detach().float() if c.bias is not None else zero for c in (gc, sc))
        bpsi = psi.bias.detach().float() if psi.bias is not None else zero[:1]
        return pack_gate(gc.weight.detach(), sc.weight.detach(), bias, psi.weight.detach(), bpsi)


def _only(adn: nn.Module | None, last: tuple) -> bool:
    """Whether a MONAI ``ADN`` (or None) is identities but for, with ``last``, one module of that type at its end."""
    mods = [] if adn is None else [m for m in adn.children() if not isinstance(m, nn.Identity)]
    if not last:
        return not mods
    return len(mods) == 1 and type(mods[0]) in last


class AttentionGate(GAG):
    """Oktay et al.'s attention gate (AG), the Table 8 baseline: a :class:`GAG` with 1×1, ungrouped convs."""

    def __init__(
        self,
        spatial_dims: int,
        gate_channels: int,
        skip_channels: int,
        inter_channels: int | None = None,
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
    ) -> None:
        super().__init__(spatial_dims, gate_channels, skip_channels, inter_channels, 1, 1, norm, act)


GroupedAttentionGate = GAG
ConvolutionalMultiFocalAttention = CMFA
MultiKernelInvertedResidualAttention = MKIRA

