"""Memory-lean pieces of ``use_checkpoint`` training (issue 7): the decoder's last step computed one slab of output
rows at a time, and max-pooling that keeps only its indices for backward.

:func:`upsample_relu_head`: the decoder's last step, ``head(relu(upsample(x)))``, one slab of output rows at a time.

At full resolution the last decoder stage upsamples ``C_1`` channels to the input size, applies ReLU and the 1×1
head. In training those full-resolution tensors (upsampled, ReLU output, and their gradients) dominate the peak
memory of a checkpointed step: for UltraLightUNet3D (base) at batch 2 × 96³ they are 54 MiB each in bfloat16 and
108 MiB in float32, more than every other saved activation together. The function below computes the same output
slab by slab along the first spatial axis, so only one slab of the full-resolution tensors ever exists; in training
each slab is checkpointed (only the low-resolution input is kept and the slab is recomputed in backward).

The upsampling is PyTorch's (multi)linear interpolation, written separably: along the first spatial axis with the
source indices and weights of ``F.interpolate`` (``area_pixel_compute_source_index``), the remaining axes with
``F.interpolate`` itself, computed in float32 (float64 for float64 inputs) and rounded once to the input's dtype. The result equals the plain
``F.interpolate`` up to float32 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..depthwise import (MAX_HEAD_CHANNELS, TRITON_DTYPES, doubled, linear_upsample, max_pool_geometry,
                         triton_available, upsample2x_relu, upsample2x_relu_pointwise, upsample2x_relu_trainable,
                         upsample_relu_pointwise)

__all__ = ["linear_source_weights", "max_pool_keeping_indices", "slab_rows", "upsample_relu_head"]

_MODES = {0: "linear", 1: "bilinear", 2: "trilinear"}  # by the number of spatial axes minus one
#: in training, a 2× upsampling (+ ReLU) with ``triton`` as :func:`~ul3d.networks.depthwise.upsample2x_relu_trainable`
UPSAMPLE2X_TRAINING = True


def linear_source_weights(in_size: int, out_size: int, align_corners: bool, device: torch.device,
                          dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(i0, i1, λ) per output row of a linear interpolation from ``in_size`` to ``out_size`` rows, as
    ``F.interpolate(size=...)`` computes them in ``dtype`` (its accumulation type: float32, or float64 for float64
    inputs): ``out[j] = (1 − λ_j) · in[i0_j] + λ_j · in[i1_j]``."""
    # Python scalars, not device tensors: no host-to-device copy (a CUDA-graph capture refuses one); an op with a
    # Python float runs in ``dtype``, as F.interpolate's ``scale`` does
    dst = torch.arange(out_size, device=device, dtype=dtype)
    if align_corners:
        src = dst * ((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0)
    else:
        src = ((dst + 0.5) * (in_size / out_size) - 0.5).clamp_min(0.0)
    i0 = src.floor().long().clamp_max(in_size - 1)
    i1 = (i0 + 1).clamp_max(in_size - 1)
    return i0, i1, src - i0.to(dtype)


def slab_rows(out_rows: int, row_elements: int, slab_elements: int) -> int:
    """Rows per slab so that one slab holds at most ``slab_elements`` elements (at least one row)."""
    return max(1, min(out_rows, slab_elements // max(row_elements, 1)))


def _slab(x: torch.Tensor, i0: torch.Tensor, i1: torch.Tensor, lam: torch.Tensor, rest: list[int],
          align_corners: bool, relu: bool, head: nn.Module) -> torch.Tensor:
    """head(relu(upsample(x))) for the output rows whose source indices and weights are (i0, i1, λ)."""
    view = (1, 1, -1) + (1,) * len(rest)
    lam = lam.reshape(view)
    y = x.index_select(2, i0).to(lam.dtype) * (1.0 - lam) + x.index_select(2, i1).to(lam.dtype) * lam
    if rest:
        n, c, d = y.shape[:3]
        y = F.interpolate(y.reshape(n, c * d, *y.shape[3:]), size=rest, mode=_MODES[len(rest) - 1],
                          align_corners=align_corners).reshape(n, c, d, *rest)
    y = y.to(x.dtype)
    return head(torch.relu(y) if relu else y)


#: the tables of :func:`_tables` by sizes, corner mode and device (they depend on nothing else): built once, not by
#: ~20 small kernels in every forward (a sliding window replays the same few shapes)
_TABLES: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _tables(x: torch.Tensor, size: list[int], align_corners: bool) -> tuple[torch.Tensor, ...]:
    """:func:`linear_source_weights` of every spatial axis of ``x`` -> ``size``, concatenated (first axis first), as
    the Triton upsampling kernels take them (cached)."""
    key = (tuple(int(i) for i in x.shape[2:]), tuple(size), bool(align_corners), x.device)
    tables = _TABLES.get(key)
    if tables is None:
        axes = [linear_source_weights(int(i), int(o), align_corners, x.device) for i, o in zip(x.shape[2:], size)]
        tables = tuple(torch.cat([a[j] for a in axes]) for j in range(3))
        if len(_TABLES) >= 256:
            _TABLES.clear()
        _TABLES[key] = tables
    return tables


def upsample_relu(x: torch.Tensor, size: list[int], *, relu: bool = True, align_corners: bool = False,
                  triton: bool = False) -> torch.Tensor:
    """``relu(F.interpolate(x, size, mode="(bi/tri)linear", align_corners))`` (``relu=False``: no ReLU); with
    ``triton`` and Triton running, as one kernel (:func:`~ul3d.networks.depthwise.linear_upsample`; a 2× upsampling:
    :func:`~ul3d.networks.depthwise.upsample2x_relu`), and in training a 2× upsampling as a kernel with a gradient
    kernel (:func:`~ul3d.networks.depthwise.upsample2x_relu_trainable`)."""
    size = [int(s) for s in size]
    if triton and triton_available(x.device) and x.dtype in TRITON_DTYPES:
        training = torch.is_grad_enabled()
        if doubled(x, size, align_corners) and (UPSAMPLE2X_TRAINING or not training):
            return upsample2x_relu_trainable(x, relu=relu) if training else upsample2x_relu(x, relu=relu)
        if not training:
            return linear_upsample(x, _tables(x, size, align_corners), size, relu=relu)
    y = F.interpolate(x, size=size, mode=_MODES.get(x.dim() - 3, "trilinear"), align_corners=align_corners)
    return torch.relu(y) if relu else y


def upsample_relu_head(x: torch.Tensor, size: list[int], head: nn.Module, *, relu: bool = True,
                       align_corners: bool = False, slab_elements: int = 1 << 22, checkpointed: bool = False,
                       triton: bool = False) -> torch.Tensor:
    """``head(relu(F.interpolate(x, size, mode="(bi/tri)linear", align_corners)))``, one slab of output rows (first
    spatial axis) at a time.

    Args:
        x: ``(B, C, *S)`` with 1–3 spatial dimensions.
        size: the output's spatial size.
        head: a module applied to each slab independently (a 1×1 convolution: pointwise in space).
        relu: apply ReLU between upsampling and head.
        align_corners: as in ``F.interpolate``.
        slab_elements: the most elements of one upsampled slab (``B · C · rows · prod(size[1:])``).
        checkpointed: in training, keep only ``x`` for backward and recompute each slab there
            (:func:`torch.utils.checkpoint.checkpoint`, non-reentrant; ``head`` must not draw random numbers or
            update buffers).
        triton: with autograd off and a 1×1 head of at most 16 channels, compute it as one Triton kernel where
            Triton runs (:func:`~ul3d.networks.depthwise.upsample_relu_pointwise`: no full-resolution features are
            written; ``ul3d predict``'s CUDA path); where it does not, as the plain ops (no slabs).

    With autograd off, a channels-last 3D ``x`` and a 1×1 conv head, each slab stays channels-last from end to end
    (two source slices, a bilinear upsampling of the slab's rows, ReLU in place, the head as one matrix product) and
    is written into a contiguous output: ``ul3d predict``'s CPU path, where the slab stays in cache.
    """
    size = [int(s) for s in size]
    pointwise = _pointwise_head(head)
    kernel = triton and not torch.is_grad_enabled() and triton_available(x.device) and x.dtype in TRITON_DTYPES
    if kernel and pointwise is not None and pointwise[0].shape[0] <= MAX_HEAD_CHANNELS:
        if doubled(x, size, align_corners):
            return upsample2x_relu_pointwise(x, *pointwise, relu=relu)
        return upsample_relu_pointwise(x, _tables(x, size, align_corners), size, *pointwise, relu=relu)
    if pointwise is None or (triton and not kernel):  # slabs are exact only for a head that is pointwise in space
        y = F.interpolate(x, size=size, mode=_MODES.get(x.dim() - 3, "trilinear"), align_corners=align_corners)
        return head(torch.relu(y) if relu else y)
    if (not torch.is_grad_enabled() and x.dim() == 5 and x.shape[0] * x.shape[1] > 1
            and x.is_contiguous(memory_format=torch.channels_last_3d)):
        return _channels_last_slabs(x, size, head, relu, align_corners, slab_elements)
    rest = size[1:]
    i0, i1, lam = linear_source_weights(int(x.shape[2]), size[0], align_corners, x.device,
                                        torch.promote_types(x.dtype, torch.float32))
    row = int(x.shape[0]) * int(x.shape[1])
    for s in rest:
        row *= s
    rows = slab_rows(size[0], row, slab_elements)
    outs = []
    for a in range(0, size[0], rows):
        idx = (i0[a:a + rows], i1[a:a + rows], lam[a:a + rows])
        if checkpointed and torch.is_grad_enabled():
            outs.append(checkpoint(_slab, x, *idx, rest, align_corners, relu, head, use_reentrant=False,
                                   preserve_rng_state=False))
        else:
            outs.append(_slab(x, *idx, rest, align_corners, relu, head))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 2)


def _pointwise_head(head: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight (O, C), bias) of a 1×1 convolution head, None for any other module."""
    if not isinstance(head, nn.modules.conv._ConvNd) or head.groups != 1 or any(k != 1 for k in head.kernel_size) \
            or any(s != 1 for s in head.stride) or any(p != 0 for p in head.padding) or head.padding_mode != "zeros":
        return None
    return head.weight.reshape(head.weight.shape[0], -1), head.bias


def _upsample2x(src: torch.Tensor, dim: int, out: torch.Tensor) -> torch.Tensor:
    """Linear 2× upsampling along ``dim`` with ``align_corners=False`` (``F.interpolate``'s weights: every output
    sample is ``0.75 · nearest + 0.25 · next nearest`` source sample, the two ends copy the end samples), written into
    ``out`` (``src``'s shape with ``dim`` doubled) with two strided ``lerp`` passes."""
    n = src.shape[dim]
    even, odd = out.narrow(dim, 0, 2 * n).unflatten(dim, (n, 2)).unbind(dim + 1)
    if n > 1:
        torch.lerp(src.narrow(dim, 1, n - 1), src.narrow(dim, 0, n - 1), 0.25, out=even.narrow(dim, 1, n - 1))
        torch.lerp(src.narrow(dim, 0, n - 1), src.narrow(dim, 1, n - 1), 0.25, out=odd.narrow(dim, 0, n - 1))
    even.narrow(dim, 0, 1).copy_(src.narrow(dim, 0, 1))
    odd.narrow(dim, n - 1, 1).copy_(src.narrow(dim, n - 1, 1))
    return out


def _channels_last_slabs(x: torch.Tensor, size: list[int], head: nn.Module, relu: bool, align_corners: bool,
                         slab_elements: int) -> torch.Tensor:
    """:func:`upsample_relu_head` for a channels-last ``(N, C, D, H, W)`` input with autograd off: per slab, each
    output row is one ``lerp`` of two source rows, the rows are upsampled in-plane (exact 2×: two strided ``lerp``
    passes per axis; otherwise bilinear ``F.interpolate``), ReLU runs in place and the head is one batched matrix
    product per slab. Returns a contiguous ``(N, O, *size)`` tensor."""
    n, c = int(x.shape[0]), int(x.shape[1])
    d, h, w = size
    hs, ws = int(x.shape[3]), int(x.shape[4])
    weight, bias = _pointwise_head(head)
    i0, i1, lam = (t.tolist() for t in linear_source_weights(int(x.shape[2]), d, align_corners, x.device))
    last = x.movedim(1, -1)  # (N, D', H', W', C), contiguous
    dtype = torch.promote_types(x.dtype, weight.dtype)
    autocast = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
    out = torch.empty((n, weight.shape[0], d, h, w), dtype=autocast or dtype, device=x.device)
    wb = weight.to(dtype).expand(n, -1, -1)
    bb = None if bias is None else bias.to(dtype).reshape(1, -1, 1)
    exact = not align_corners and h == 2 * hs and w == 2 * ws
    rows = slab_rows(d, n * c * h * w, slab_elements)
    for a in range(0, d, rows):
        r = min(a + rows, d) - a
        src = x.new_empty((n, r, hs, ws, c))
        for j in range(r):
            torch.lerp(last[:, i0[a + j]], last[:, i1[a + j]], lam[a + j], out=src[:, j])
        planes = src.view(n * r, hs, ws, c)
        if exact:
            up = _upsample2x(_upsample2x(planes, 2, planes.new_empty((n * r, hs, w, c))), 1,
                             planes.new_empty((n * r, h, w, c)))
        else:
            up = F.interpolate(planes.permute(0, 3, 1, 2), size=(h, w), mode="bilinear",
                               align_corners=align_corners).permute(0, 2, 3, 1)
        if relu:
            up = up.relu_()
        voxels = up.reshape(n, r * h * w, c).transpose(1, 2).to(dtype)  # (N, C, r·H·W)
        res = torch.bmm(wb, voxels) if bb is None else torch.baddbmm(bb, wb, voxels)
        out[:, :, a:a + r] = res.view(n, -1, r, h, w)
    return out


class _MaxPoolIndices(torch.autograd.Function):
    """Max-pooling whose backward scatters the gradient through the argmax indices alone (PyTorch's max-pool
    backward also keeps the full-size input, only to read its shape)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kernel: tuple, stride: tuple, ceil_mode: bool) -> torch.Tensor:
        pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[x.dim() - 3]
        y, idx = pool(x, kernel, stride, 0, 1, ceil_mode, return_indices=True)
        ctx.save_for_backward(idx)
        ctx.input_shape = x.shape
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        n, c = ctx.input_shape[:2]
        gx = grad.new_zeros(ctx.input_shape)
        # windows do not overlap (stride >= kernel): every input position receives at most one gradient
        gx.view(n, c, -1).scatter_(2, idx.reshape(n, c, -1), grad.reshape(n, c, -1))
        return gx, None, None, None


def max_pool_keeping_indices(x: torch.Tensor, pool: nn.Module) -> torch.Tensor:
    """``pool(x)`` for a ``MaxPool{1,2,3}d`` without padding or dilation whose windows do not overlap; in training
    only the argmax indices are kept for backward, not ``x``. Other pools, and calls without autograd, run ``pool``."""
    geometry = max_pool_geometry(pool, x.dim() - 2)
    if geometry is None or not (torch.is_grad_enabled() and x.requires_grad) \
            or any(s < k for k, s in zip(*geometry)):
        return pool(x)
    return _MaxPoolIndices.apply(x, *geometry, bool(pool.ceil_mode))
