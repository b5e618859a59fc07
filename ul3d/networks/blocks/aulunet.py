"""Blocks of AULUNet (Khan et al., BMVC 2025, §2): PointConv, AKF, RGF, LSG."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv, Pool
from torch import nn

__all__ = ["PointConv", "AKF", "RGF", "LSG", "AdaptiveKernelFusion", "ResidualGlobalFusion", "LightSkipGate"]


class PointConv(Convolution):
    """PointConv (Fig. 2e): bias-free 1×1 conv -> norm -> ReLU."""

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, norm: str | tuple = "batch", act: str | tuple = "relu"
    ) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, kernel_size=1, bias=False, norm=norm, act=act)


class AKF(nn.Module):
    """Adaptive kernel fusion, Eqs. 1–2: ``z = ReLU(BN(Conv1x1(α ⊙ F_l + (1 − α) ⊙ F_g)))``.

    ``F_l`` and ``F_g`` are bias-free 3×3 depth-wise convolutions with dilations ``d_1`` and ``d_2``
    (1 and 2 in the paper, Table 4); ``α = σ(Conv1x1(GAP(x)))`` is a per-channel gate computed
    from the block input (the 1×1 conv has a bias). Width is unchanged and there is no residual.

    Args:
        spatial_dims: 2 or 3.
        channels: input = output channels.
        dilations: dilations of the two depth-wise branches. Defaults to ``(1, 2)``.
        kernel_size: kernel of both branches. Defaults to 3.
        norm: normalisation of the output PointConv. Defaults to batch.
        act: activation of the output PointConv. Defaults to ReLU.
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        dilations: Sequence[int] = (1, 2),
        kernel_size: int = 3,
        norm: str | tuple = "batch",
        act: str | tuple = "relu",
    ) -> None:
        super().__init__()
        if len(dilations) != 2:
            raise ValueError(f"AKF: expected two dilations (local, dilated), got {tuple(dilations)}.")
        conv = Conv[Conv.CONV, spatial_dims]
        self.local = conv(
            channels, channels, kernel_size, padding=dilations[0] * (kernel_size // 2), dilation=dilations[0],
            groups=channels, bias=False,
        )
        self.dilated = conv(
            channels, channels, kernel_size, padding=dilations[1] * (kernel_size // 2), dilation=dilations[1],
            groups=channels, bias=False,
        )
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.gate = conv(channels, channels, kernel_size=1, bias=True)
        self.fuse = PointConv(spatial_dims, channels, channels, norm=norm, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = torch.sigmoid(self.gate(self.pool(x)))
        return self.fuse(alpha * self.local(x) + (1 - alpha) * self.dilated(x))


class RGF(nn.Module):
    """Residual global fusion, Eqs. 3–4: ``G = tanh(Conv1x1(GAP(B)))``, ``B' = B + B ⊙ G``.

    Args:
        spatial_dims: 2 or 3.
        channels: input = output channels. The 1×1 conv is bias-free; there is no norm.
    """

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        self.pool = Pool[Pool.ADAPTIVEAVG, spatial_dims](1)
        self.conv = Conv[Conv.CONV, spatial_dims](channels, channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + x * torch.tanh(self.conv(self.pool(x)))


class LSG(nn.Module):
    """Lightweight skip gate, Eqs. 5–7: ``β = σ(BN(Conv1x1([D, E'])))``, ``S = D + β ⊙ E'``.

    ``E' = E`` when the widths match, otherwise a bias-free 1×1 projection of the encoder features
    (Eq. 5; never needed in the network, whose skips match the decoder widths).

    Args:
        spatial_dims: 2 or 3.
        decoder_channels: channels of ``D``.
        encoder_channels: channels of ``E``.
        norm: normalisation of the gate. Defaults to batch.
    """

    def __init__(self, spatial_dims: int, decoder_channels: int, encoder_channels: int, norm: str | tuple = "batch") -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.project: nn.Module = (
            nn.Identity()
            if decoder_channels == encoder_channels
            else conv(encoder_channels, decoder_channels, kernel_size=1, bias=False)
        )
        self.gate = Convolution(
            spatial_dims, 2 * decoder_channels, decoder_channels, kernel_size=1, bias=False, norm=norm, act="sigmoid"
        )

    def forward(self, d: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        e = self.project(e)
        return d + self.gate(torch.cat([d, e], dim=1)) * e


AdaptiveKernelFusion = AKF
ResidualGlobalFusion = RGF
LightSkipGate = LSG
