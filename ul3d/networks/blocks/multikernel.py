"""Multi-kernel convolution blocks of UltraLightUNet (Rahman et al., ICLR 2025 submission, §3.1).

Every block takes ``spatial_dims`` first and builds its layers from MONAI's dimension-keyed
factories, so one class serves 2D and 3D.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv
from torch import nn

__all__ = ["ChannelShuffle", "MKDC", "MKIR", "InvertedResidual", "MultiKernelDepthwiseConv", "MultiKernelInvertedResidual"]


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        for branch in self.branches:
            y = branch(x)
            out = y if out is None else out + y
            if not self.parallel:
                x = x + y
        return self.shuffle(out)


class MKIR(nn.Module):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.mkdc(self.expand(x)))
        if self.residual:
            out = out + self.shortcut(x)
        return out


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
