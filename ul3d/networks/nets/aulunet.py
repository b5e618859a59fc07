"""AULUNet (Khan et al., "AULUNet: An Adaptive Ultra-Lightweight UNet Framework ...", BMVC 2025, §2, Fig. 2a)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv, Pool
from torch import nn

from ..blocks import AKF, LSG, RGF, PointConv
from ._utils import check_input, interpolate_mode

__all__ = ["AULUNet", "AULUNET_VARIANTS"]

#: The one published configuration ("v3": 0.029M params, 0.069 GFLOPs at 3×256²).
AULUNET_VARIANTS: dict[str, tuple[int, ...]] = {"base": (5, 10, 15, 25, 35, 60)}


class UpProj(nn.Module):
    """Upsample (multi)linearly to ``size`` (``align_corners=True``, as released), then PointConv."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str | tuple = "batch") -> None:
        super().__init__()
        self.mode = interpolate_mode(spatial_dims)
        self.conv = PointConv(spatial_dims, in_channels, out_channels, norm=norm)

    def forward(self, x: torch.Tensor, size: list[int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode=self.mode, align_corners=True))


class SkipAdd(nn.Module):
    """Plain additive skip merge ``D + E``: the "without LSG" ablation."""

    def forward(self, d: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return d + e


class AULUNet(nn.Module):
    """AULUNet in 2D or 3D: six levels with AKF in every stage, RGF at the bottleneck, LSG on every skip.

    Level 0: 3×3 conv (bias-free) -> norm -> ReLU -> :class:`~ul3d.networks.blocks.AKF` at full
    resolution. Levels 1–5: 2× average pooling -> AKF at the incoming width -> PointConv to the
    new width. Bottleneck: :class:`~ul3d.networks.blocks.RGF`. Decoder levels 4..0: upsample ->
    PointConv -> :class:`~ul3d.networks.blocks.LSG` with the encoder features -> AKF. Head: 1×1 conv.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: number of classes (logit channels).
        channels: the six level widths. Defaults to ``(5, 10, 15, 25, 35, 60)`` (the paper's v3).
        dilations: AKF branch dilations (Table 4). Defaults to ``(1, 2)``.
        norm: ``"batch"`` (default) or ``"instance"`` or a MONAI ``(name, kwargs)`` tuple.
        use_akf: AKF blocks on (Table 3's ablations M2, M3, M6 turn them off). Defaults to True.
        use_rgf: RGF at the bottleneck. Defaults to True.
        use_lsg: LSG on the skips; False adds the skip as it is. Defaults to True.
        sigmoid: apply a sigmoid to the output, as the released code does inside the model.
            Defaults to False: the network returns logits for MONAI's losses.

    Note:
        Any input size works: pooling uses ``ceil_mode`` and upsampling goes to each skip's size.

    Examples::

        net = AULUNet(2, in_channels=3, out_channels=1)          # the paper's 0.029M network
        net = AULUNet(3, in_channels=1, out_channels=8, norm="instance")
    """

    #: how the paper counted its "#FLOPs" (see :func:`ul3d.profiling.paper_macs`)
    paper_flops_convention = "thop"

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (5, 10, 15, 25, 35, 60),
        dilations: Sequence[int] = (1, 2),
        norm: str | tuple = "batch",
        use_akf: bool = True,
        use_rgf: bool = True,
        use_lsg: bool = True,
        sigmoid: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"AULUNet: spatial_dims must be 2 or 3, got {spatial_dims}.")
        channels = tuple(int(c) for c in channels)
        if len(channels) < 2:
            raise ValueError(f"AULUNet: channels needs at least 2 level widths, got {channels}.")
        self.spatial_dims = spatial_dims
        self._name = f"{type(self).__name__}({spatial_dims}D)"
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = channels
        self.sigmoid = sigmoid

        def akf(c: int) -> nn.Module:
            return AKF(spatial_dims, c, dilations, norm=norm) if use_akf else nn.Identity()

        self.stem = nn.Sequential(
            Convolution(spatial_dims, in_channels, channels[0], kernel_size=3, bias=False, norm=norm, act="relu"),
            akf(channels[0]),
        )
        self.pool = Pool[Pool.AVG, spatial_dims](kernel_size=2, stride=2, ceil_mode=True)
        self.encoder = nn.ModuleList(
            nn.Sequential(akf(cin), PointConv(spatial_dims, cin, cout, norm=norm))
            for cin, cout in zip(channels[:-1], channels[1:])
        )
        self.bottleneck = RGF(spatial_dims, channels[-1]) if use_rgf else nn.Identity()
        self.up = nn.ModuleList(UpProj(spatial_dims, cin, cout, norm) for cin, cout in zip(channels[:0:-1], channels[-2::-1]))
        self.skip_gates = nn.ModuleList(
            LSG(spatial_dims, c, c, norm=norm) if use_lsg else SkipAdd() for c in channels[-2::-1]
        )
        self.decoder = nn.ModuleList(akf(c) for c in channels[-2::-1])
        self.head = Conv[Conv.CONV, spatial_dims](channels[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.spatial_dims, self.in_channels, self._name)
        x = self.stem(x)
        skips = [x]
        for stage in self.encoder:
            x = stage(self.pool(x))
            skips.append(x)
        x = self.bottleneck(x)
        for i, (up, gate, stage) in enumerate(zip(self.up, self.skip_gates, self.decoder)):
            e = skips[-2 - i]
            d = up(x, list(e.shape[2:]))
            x = stage(gate(d, e))
        out = self.head(x)
        return torch.sigmoid(out) if self.sigmoid else out
