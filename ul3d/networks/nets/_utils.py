"""Small helpers shared by the networks."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["as_tuple", "check_input", "checkpointed", "interpolate_mode", "init_normal_"]


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


@contextlib.contextmanager
def _running_stats_kept(module: nn.Module):
    """The norm layers of ``module`` end the block with the running statistics (and ``num_batches_tracked``) they
    entered it with: the recomputation of a checkpointed region must not update them a second time."""
    buffers = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
               for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)


def _compiled_checkpoint_safe(module: nn.Module) -> bool:
    """Whether ``torch.compile`` traces the region in one piece, so its recomputation cannot update running
    statistics again: BatchNorm with ``momentum=None`` (a cumulative average, read with ``.item()``) and the fused
    MKDC's own recomputation break the graph, and an eager checkpoint inside a compiled region has no guard."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats and m.momentum is None:
            return False
        if getattr(m, "fused_recompute", False) and getattr(m, "fused", False):
            return False
    return True


def checkpointed(module: nn.Module, fn, *args):
    """``fn(*args)`` under activation checkpointing (:func:`torch.utils.checkpoint.checkpoint`, non-reentrant): only
    the inputs are kept for backward and the region is recomputed there. ``module`` holds the region's norm layers,
    whose running statistics are updated once, in the forward pass (eagerly, they are restored after the
    recomputation). Under ``torch.compile`` the compiler's partitioner recomputes the traced region and replays no
    buffer update; a region it would not trace in one piece runs without checkpointing instead. The networks draw no
    random numbers, so the RNG state is not saved (which CUDA-graph capture would refuse on older PyTorch)."""
    if torch.compiler.is_compiling():
        if not _compiled_checkpoint_safe(module):
            return fn(*args)
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False,
                      context_fn=lambda: (contextlib.nullcontext(), _running_stats_kept(module)))
