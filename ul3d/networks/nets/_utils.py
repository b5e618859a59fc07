"""Small helpers shared by the networks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["as_tuple", "check_input", "interpolate_mode", "init_normal_"]


def as_tuple(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    """Broadcast an int to ``n`` entries, or check that a sequence has exactly ``n`` entries."""
    if isinstance(value, int):
        return (value,) * n
    value = tuple(int(v) for v in value)
    if len(value) != n:
        raise ValueError(f"{name} must have {n} entries (one per stage), got {len(value)}: {value}.")
    return value


def check_input(x: torch.Tensor, spatial_dims: int, in_channels: int, network: str) -> None:
    """Raise a ``ValueError`` naming what was expected when ``x`` is not ``(B, in_channels, *spatial)``.

    Written in the TorchScript subset so that scripted networks keep the check.
    """
    if x.dim() != spatial_dims + 2:
        axes = "H, W" if spatial_dims == 2 else "D, H, W"
        raise ValueError(
            network + ": expected a " + str(spatial_dims + 2) + "-D input (B, C, " + axes + ") for spatial_dims="
            + str(spatial_dims) + ", got a " + str(x.dim()) + "-D tensor of shape " + str(list(x.shape)) + "."
        )
    if int(x.shape[1]) != in_channels:
        raise ValueError(
            network + ": expected " + str(in_channels) + " input channel(s) (dimension 1), got "
            + str(int(x.shape[1])) + " in a tensor of shape " + str(list(x.shape)) + "."
        )


def interpolate_mode(spatial_dims: int) -> str:
    """The (multi)linear interpolation mode for ``spatial_dims``: linear, bilinear or trilinear."""
    return ("linear", "bilinear", "trilinear")[spatial_dims - 1]


def init_normal_(module: nn.Module, std: float = 0.02) -> None:
    """The released code's ``'normal'`` scheme: conv weights N(0, std), conv biases 0, norm weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            if getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
