"""MONAI's networks at the settings ul3d compares against (``ul3d profile``, benchmarks).

UNet matches the configuration of ``docs/gpu-measurements`` (16–256 channels, two residual
units); DynUNet is an nnU-Net ``3d_fullres``-like plan for a 96³ patch (six levels, instance norm).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

__all__ = ["MONAI_PEERS", "get_peer"]


def _unet(sd: int, cin: int, cout: int, roi: Sequence[int]) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(sd, cin, cout, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)


def _segresnet(sd: int, cin: int, cout: int, roi: Sequence[int]) -> nn.Module:
    from monai.networks.nets import SegResNet

    return SegResNet(sd, init_filters=16, in_channels=cin, out_channels=cout)


def _swinunetr(sd: int, cin: int, cout: int, roi: Sequence[int]) -> nn.Module:
    from monai.networks.nets import SwinUNETR

    return SwinUNETR(cin, cout, feature_size=48, spatial_dims=sd)


def _unetr(sd: int, cin: int, cout: int, roi: Sequence[int]) -> nn.Module:
    from monai.networks.nets import UNETR

    return UNETR(cin, cout, img_size=tuple(roi), spatial_dims=sd)


def _dynunet(sd: int, cin: int, cout: int, roi: Sequence[int]) -> nn.Module:
    from monai.networks.nets import DynUNet

    return DynUNet(
        sd, cin, cout,
        kernel_size=[[3] * sd] * 6,
        strides=[[1] * sd] + [[2] * sd] * 5,
        upsample_kernel_size=[[2] * sd] * 5,
        filters=(32, 64, 128, 256, 320, 320),
        norm_name="instance",
    )


MONAI_PEERS: dict[str, Callable[..., nn.Module]] = {
    "unet": _unet,
    "segresnet": _segresnet,
    "swinunetr": _swinunetr,
    "unetr": _unetr,
    "dynunet": _dynunet,
}


def get_peer(name: str, spatial_dims: int, in_channels: int, out_channels: int, roi: Sequence[int]) -> nn.Module:
    """Build MONAI network ``name`` (see :data:`MONAI_PEERS`) for inputs of size ``roi``."""
    key = name.lower().removeprefix("monai.").removeprefix("monai:")
    if key not in MONAI_PEERS:
        raise ValueError(f"Unknown MONAI network {name!r}; available: {sorted(MONAI_PEERS)}.")
    return MONAI_PEERS[key](spatial_dims, in_channels, out_channels, roi)
