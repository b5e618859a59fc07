"""Inference fast paths that compute the same function as the plain modules.

:func:`fold_batchnorm` folds every eval-mode BatchNorm that follows a convolution inside a MONAI ``Convolution``
block (conv -> norm -> act) into the convolution's weights and bias: ``y = γ (W x + b − μ) / σ + β``
becomes one convolution with ``W' = W γ/σ`` and ``b' = (b − μ) γ/σ + β``. UltraLightUNet and AULUNet build all
their conv+BN pairs this way.
"""

from __future__ import annotations

import copy

import torch
from monai.networks.blocks import Convolution
from torch import nn

__all__ = ["fold_batchnorm"]


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with BatchNorm folded into the preceding convolutions.

    Only for inference: the copy's running statistics are gone, so do not train it. The input model is unchanged.
    """
    model = copy.deepcopy(model).eval()
    for block in model.modules():
        if not isinstance(block, Convolution) or not hasattr(block, "adn"):
            continue
        norm = getattr(block.adn, "N", None)
        conv = block.conv
        if not isinstance(norm, nn.modules.batchnorm._BatchNorm) or getattr(conv, "transposed", False):
            continue
        if norm.running_mean is None:  # batch statistics at inference: nothing fixed to fold
            continue
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.affine:
            scale = scale * norm.weight
        shift = -norm.running_mean * scale + (norm.bias if norm.affine else 0)
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        conv.weight.copy_(conv.weight * scale.reshape(-1, *([1] * (conv.weight.dim() - 1))))
        conv.bias = nn.Parameter(shift.clone())
        block.adn.N = nn.Identity()
    return model
