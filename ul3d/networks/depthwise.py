"""Depth-wise convolution as Triton kernels, for the MKDC branches (issue 7).

PyTorch's native CUDA depth-wise 3D kernels take 23 ms of a 75 ms H100 training step of UltraLightUNet3D (base), most
of it in the weight and input gradients (``benchmarks/results/profile_cuda_h100_2026-11-23.json``). This module
computes the same function, ``y[n, c, p] = Σ_t w[c, t] · x[n, c, p + t − k//2]`` (stride 1, zero "same" padding, odd
kernel sizes up to 7 along the last axis, 1–3 spatial dimensions), with three tiled Triton kernels:

* forward: each program computes one ``BD×BH×BW`` output tile of one ``(n, c)`` plane, looping over the kernel taps
  with loads of the shifted tile of a zero-padded input copy (one fixed offset per tap, fp32 accumulation);
* input gradient: the same kernel on the output gradient with the kernel flipped (stride 1, "same" padding);
* weight gradient: each program takes one ``(n, c)`` plane, one ``(kd, kh)`` tap row and a run of tiles, keeps one
  accumulator tile per ``kw`` tap and reduces each once at the end; the partial sums are added up in PyTorch.

The kernels are registered as the custom operators ``ul3d::depthwise_conv`` and ``ul3d::depthwise_conv_backward``, so
``torch.compile`` keeps them as opaque calls and autograd uses the backward above. A 1×1×1 depth-wise conv is a
per-channel scale and is computed with PyTorch element-wise ops (which ``torch.compile`` fuses with its neighbours).

:func:`depthwise_conv` runs the kernels on CUDA tensors when Triton is importable, and on CPU tensors only under
Triton's interpreter (``TRITON_INTERPRET=1``, used by the tests on machines without a GPU); otherwise it calls
``torch.nn.functional.conv{1,2,3}d``. TorchScript and ONNX export always see the plain convolution modules.

:func:`multikernel_depthwise` is inference's whole MKDC (Eq. 2 with its BatchNorms folded) as one kernel: every branch
reads the same loads of the input tile, and bias, ReLU6, the branch sum and the channel shuffle happen before the one
store (autograd off). :func:`upsample_relu_pointwise` is the decoder's last step in inference, a 1×1 head after
ReLU after (tri)linear upsampling, as one kernel that never writes the full-resolution features;
:func:`max_pool_2x` inference's 2× max-pooling without the indices PyTorch's CUDA kernel always writes;
:func:`pointwise_act` an MKIR's 1×1 conv with its folded bias, activation, shortcut and (before the MKDC) zero padding.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["compute_dtype", "depthwise_conv", "multikernel_depthwise", "pack_branches", "pointwise_act",
           "upsample_relu_pointwise", "upsample2x_relu_pointwise", "upsample2x_relu", "upsample2x_backward",
           "upsample2x_relu_trainable", "batchnorm_clamp", "doubled", "gated_skip_sum",
           "pack_gate", "channel_spatial_attention", "linear_upsample", "max_pool_2x", "max_pool_geometry",
           "pooled_stem", "stem_unsupported", "triton_available", "unsupported_conv", "MAX_KERNEL_W", "TRITON_DTYPES"]

#: widest kernel (last axis) of the Triton weight-gradient kernel; wider kernels use PyTorch's convolution
MAX_KERNEL_W = 7
#: kernels of more taps than this loop over their depth taps in the forward kernel instead of unrolling them (7³)
DEPTH_LOOP_TAPS = 125
#: tensor dtypes the Triton kernels read and write
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


_TRITON: list = []  # [triton module or None], filled on first use (a plain global: torch.compile traces it cheaply)


def _triton():
    """The Triton module, or None when it cannot be imported."""
    if not _TRITON:
        try:
            import triton
            import triton.language  # noqa: F401
        except Exception:  # noqa: BLE001 - any import failure means "no Triton"
            triton = None
        _TRITON.append(triton)
    return _TRITON[0]


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ops on ``x`` compute in: autocast's where it is on for x's device, else x's own."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def triton_available(device: torch.device | str) -> bool:
    """True when :func:`depthwise_conv` runs its Triton kernels for tensors on ``device``."""
    device = torch.device(device)
    if _triton() is None:
        return False
    return (device.type == "cuda" and not _interpret()) or (device.type == "cpu" and _interpret())


def unsupported_conv(conv: nn.Module) -> str | None:
    """Why :func:`depthwise_conv` cannot replace ``conv``, or None when it computes the same function."""
    if not isinstance(conv, nn.modules.conv._ConvNd) or conv.transposed:
        return f"{type(conv).__name__} is not a convolution"
    k = conv.kernel_size
    if conv.groups != conv.in_channels or conv.out_channels != conv.in_channels:
        return "not depth-wise (groups = in = out channels)"
    if any(s != 1 for s in conv.stride) or any(d != 1 for d in conv.dilation):
        return "strided or dilated"
    if any(kk % 2 == 0 for kk in k) or tuple(conv.padding) != tuple(kk // 2 for kk in k):
        return "not an odd kernel with 'same' padding"
    if k[-1] > MAX_KERNEL_W:
        return f"kernel {tuple(k)} wider than {MAX_KERNEL_W} along the last axis"
    if conv.padding_mode != "zeros":
        return f"padding mode {conv.padding_mode!r}"
    return None


def _kernels():
    from . import _depthwise_kernels

    return _depthwise_kernels


def _pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _blocks(shape: tuple[int, int, int], elements: int) -> tuple[int, int, int]:
    """Tile sizes (powers of two, ``elements`` in all) for a ``(D, H, W)`` volume: 32 wide (16 for narrow volumes),
    then H, then D; few distinct tiles keep Triton's compiled variants few."""
    d, h, w = shape
    bw = 32 if w > 16 else 16
    if d == 1:  # 2D (and 1D) inputs
        return 1, min(elements // bw, _pow2(h)), bw
    bh = 8
    return max(elements // (bw * bh), 1), bh, bw


def _padded(x: torch.Tensor, kernel: tuple[int, int, int]) -> torch.Tensor:
    kd, kh, kw = kernel
    return F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, kd // 2, kd // 2)).contiguous()


#: which kernel computes :func:`depthwise_conv`'s forward: "rows" (the MKDC kernel with one branch, no bias, clamp or
#: shuffle: each input row loaded once serves MKDC_ROWS output rows) or "tile" (``dw_forward``, every tap one load)
DW_FORWARD = "rows"


def _launch_forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (N, C, D, H, W) contiguous, w (C, KD, KH, KW) contiguous in x's dtype."""
    n, c, d, h, wd = x.shape
    kd, kh, kw = w.shape[1:]
    if DW_FORWARD == "rows" and kd % 2 and kh % 2 and kw % 2:
        inf = float("inf")
        return multikernel_depthwise(x, [w.unsqueeze(1)], [None], [(-inf, inf)])
    y = torch.empty_like(x)
    bd, bh, bw = _blocks((d, h, wd), 1024)
    td, th, tw = -(-d // bd), -(-h // bh), -(-wd // bw)
    _kernels().dw_forward[(td * th * tw, n * c)](_padded(x, (kd, kh, kw)), w, y, c, d, h, wd, th, tw, KD=kd, KH=kh, KW=kw,
                               BD=bd, BH=bh, BW=bw, DEPTH_LOOP=kd * kh * kw > DEPTH_LOOP_TAPS, num_warps=4)
    return y


def _launch_weight_grad(x: torch.Tensor, g: torch.Tensor, kernel: tuple[int, int, int]) -> torch.Tensor:
    """Σ over batch and space of g · shifted x, (C, KD, KH, KW) in float32. (A tensor-core version, products of
    gradient rows with shifted input rows and the taps read off their diagonals, was 8× slower on an H200: 11.9 vs
    1.5 ms over a base training step's shapes, ``benchmarks/results/depthwise_wgrad_cuda_h200_2026-12-04.json``.)"""
    n, c, d, h, wd = x.shape
    kd, kh, kw = kernel
    bd, bh, bw = _blocks((d, h, wd), 1024)
    th, tw = -(-h // bh), -(-wd // bw)
    tiles = -(-d // bd) * th * tw
    # split each plane's tiles into runs so that about 4096 programs share the GPU
    splits = max(1, min(tiles, -(-4096 // (n * c * kd * kh))))
    per = -(-tiles // splits)
    splits = -(-tiles // per)
    part = torch.empty((splits, n, c, kd * kh * kw), device=x.device, dtype=torch.float32)
    _kernels().dw_weight_grad[(n * c, kd * kh, splits)](_padded(x, kernel), g, part, c, d, h, wd, th, tw, n * c, tiles, per,
                                    KD=kd, KH=kh, KW=kw, BD=bd, BH=bh, BW=bw, num_warps=4)
    return part.sum((0, 1)).reshape(c, kd, kh, kw)


@torch.library.custom_op("ul3d::depthwise_conv", mutates_args=())
def _depthwise_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _launch_forward(x, weight)


@_depthwise_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("ul3d::depthwise_conv_backward", mutates_args=())
def _depthwise_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad = grad.contiguous()
    grad_x = _launch_forward(grad, weight.flip((1, 2, 3)).contiguous())
    grad_w = _launch_weight_grad(x, grad, tuple(weight.shape[1:])).to(weight.dtype)
    return grad_x, grad_w


@_depthwise_backward_op.register_fake
def _(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    x, weight = inputs
    ctx.save_for_backward(x, weight)


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x, grad_w = _depthwise_backward_op(grad, x, weight)
    return grad_x, grad_w


_depthwise_op.register_autograd(_backward, setup_context=_setup_context)


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, triton: bool = True
                   ) -> torch.Tensor:
    """Depth-wise convolution, stride 1, zero "same" padding: ``F.conv{N}d(x, weight, bias, padding=k//2, groups=C)``.

    Args:
        x: ``(B, C, *S)`` with 1–3 spatial dimensions.
        weight: ``(C, 1, *k)``, odd kernel sizes.
        bias: optional ``(C,)``.
        triton: False computes it with ``F.conv{N}d`` on every device.

    Under autocast the convolution runs in the autocast dtype, as PyTorch's convolutions do; the Triton kernels
    accumulate in float32. Inputs in other dtypes (float64), kernels wider than :data:`MAX_KERNEL_W` and devices
    without the kernels use ``F.conv{N}d``.
    """
    dims = x.dim() - 2
    kernel = tuple(weight.shape[2:])
    if not 1 <= dims <= 3 or weight.shape[0] != x.shape[1] or weight.shape[1] != 1 or len(kernel) != dims \
            or any(k % 2 == 0 for k in kernel):
        raise ValueError(f"depthwise_conv: input {tuple(x.shape)} and weight {tuple(weight.shape)} are not a "
                         "depth-wise convolution with odd kernel sizes")
    if not triton or not triton_available(x.device) or kernel[-1] > MAX_KERNEL_W \
            or x.dtype not in TRITON_DTYPES:
        conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        return conv(x, weight, bias, 1, tuple(k // 2 for k in kernel), 1, x.shape[1])
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    else:
        weight = weight.to(x.dtype)
    b, c = x.shape[:2]
    view = (1, c) + (1,) * dims
    if all(k == 1 for k in kernel):  # a per-channel scale
        y = x * weight.reshape(view)
    else:
        pad = (1,) * (3 - dims)
        x5 = x.reshape(b, c, *pad, *x.shape[2:]).contiguous()
        w4 = weight.reshape(c, *pad, *kernel).contiguous()
        y = _depthwise_op(x5, w4).reshape(x.shape)
    return y if bias is None else y + bias.reshape(view)


#: most branches of :func:`multikernel_depthwise`'s kernel
MAX_BRANCHES = 3
#: depth rows, (H, W) tile of each row and warps per program of :func:`multikernel_depthwise`'s kernel, and the tile of
#: planes of at least MKDC_LOOP_PLANE voxels, whose kernel loops over the in-plane rows of its taps at run time
#: (``benchmarks/bench_depthwise.py --mkdc`` measures other settings; H200, 4 × 32 × 48³ bf16: 0.59 ms unrolled,
#: 0.45 ms looped with 8 × 64 tiles; 4 × 64 × 24³: 0.15 ms unrolled, 0.26 ms looped)
MKDC_ROWS, MKDC_TILE, MKDC_WARPS = 4, (4, 32), 4
MKDC_LOOP_PLANE, MKDC_LOOP_TILE = 48 * 48, (8, 64)
#: ``mkdc_forward_grid``'s (input rows shared in depth and height) settings: ``(least plane voxels, (depth rows,
#: height rows, BH, BW, warps))`` pairs, the first pair whose plane size the volume's planes reach applies; volumes
#: below every pair, or whose depth and height those rows do not divide, run ``mkdc_forward`` (H200, base network,
#: sliding window 256 x 256 x 128: 0.0470 s without, 0.0424 s with the 48² pair alone, 0.0405 s with the 2 x 32 tile
#: from 24² up; ``benchmarks/results/levers_cuda_h200_2026-12-03_grid*``); ``()`` turns the kernel off
MKDC_GRID: tuple[tuple[int, tuple[int, int, int, int, int]], ...] = ((48 * 48, (4, 4, 1, 64, 2)),
                                                                    (24 * 24, (4, 4, 2, 32, 2)))


def _kernel_sizes(widest: tuple[int, int, int], kernels: list[tuple[int, int, int]]) -> dict:
    """The MKDC kernels' compile-time kernel sizes: the widest window MD×MH×MW and the branches' (0 for absent ones)."""
    k3 = list(kernels) + [(0, 0, 0)] * (MAX_BRANCHES - len(kernels))
    return dict(MD=widest[0], MH=widest[1], MW=widest[2], **{f"K{i}{a}": k3[i][j] for i in range(MAX_BRANCHES)
                                                             for j, a in enumerate("DHW")})


def _grid_setting(d: int, h: int, w: int, taps: int) -> tuple[int, int, int, int, int] | None:
    """:data:`MKDC_GRID`'s setting for a d×h×w output volume whose widest kernel has ``taps`` taps, or None where
    ``mkdc_forward_grid`` does not run (2D/1D, no pair for its planes, rows that do not divide depth and height)."""
    if d <= 1 or taps > DEPTH_LOOP_TAPS:
        return None
    grid = next((g for plane, g in MKDC_GRID if h * w >= plane), None)
    return None if grid is None or d % grid[0] or h % grid[1] else grid


def _launch_grid(setting: tuple[int, int, int, int, int], xp: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
                 y: torch.Tensor, shuffle_groups: int, lohi: list[float], kernel_sizes: dict, ipo: int = 1) -> None:
    """``mkdc_forward_grid`` over ``y`` ``(N, C, D, H, W)`` with a :func:`_grid_setting` (the kernel is compiled for
    each volume size); ``ipo``: input planes summed into each output channel."""
    n, c, d, h, wd = y.shape
    rows, hrows, bh, bw, warps = setting
    th, tw = -(-h // (bh * hrows)), -(-wd // bw)
    _kernels().mkdc_forward_grid[(d // rows * th * tw, n * c)](
        xp, w, b, y, c, d, h, wd, th, tw, c // shuffle_groups, shuffle_groups, *lohi, **kernel_sizes, ROWS=rows,
        HR=hrows, BH=bh, BW=bw, IPO=ipo, num_warps=warps)


def pack_branches(weights: list[torch.Tensor], biases: list[torch.Tensor | None]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`multikernel_depthwise`'s kernel arguments for these branches: every branch's taps of each channel in
    one row ``(C, Σ taps)`` and the biases as ``(MAX_BRANCHES, C)`` (zeros for absent ones), in float32."""
    c = weights[0].shape[0]
    w = torch.cat([wt.reshape(c, -1).float() for wt in weights], 1).contiguous()
    return w, _branch_biases(biases, c, w.device)


def _branch_biases(biases: list[torch.Tensor | None], c: int, device: torch.device) -> torch.Tensor:
    """The branches' biases as ``(MAX_BRANCHES, C)`` float32, zeros for absent biases and branches."""
    zero = torch.zeros(c, device=device, dtype=torch.float32)
    return torch.stack([zero if b is None else b.float() for b in biases] + [zero] * (MAX_BRANCHES - len(biases)))


def _branch_bounds(bounds: list[tuple[float, float]]) -> list[float]:
    """The branches' ``(lo, hi)`` flattened for the kernels, padded to :data:`MAX_BRANCHES`."""
    return [float(v) for b in bounds for v in b] + [0.0, 0.0] * (MAX_BRANCHES - len(bounds))


def _kernel3(kernel: tuple[int, ...]) -> tuple[int, int, int]:
    return (1,) * (3 - len(kernel)) + tuple(kernel)


def multikernel_depthwise(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                          bounds: list[tuple[float, float]], shuffle_groups: int = 1, triton: bool = True,
                          padded: bool = False, packed: tuple[torch.Tensor, torch.Tensor] | None = None
                          ) -> torch.Tensor:
    """``CS(Σ_b clamp(DWC_b(x) + bias_b, lo_b, hi_b))``: Eq. 2's MKDC with its norms folded into the branch convs.

    Args:
        x: ``(B, C, *S)`` with 1–3 spatial dimensions.
        weights: per branch, a depth-wise weight ``(C, 1, *k)`` with odd kernel sizes ("same" padding, stride 1).
        biases: per branch, ``(C,)`` or None.
        bounds: per branch, the activation's ``(lo, hi)`` (ReLU6: ``(0, 6)``; ``±inf`` for none).
        shuffle_groups: groups of the channel shuffle after the sum (1: none).
        triton: False computes it with PyTorch's convolutions on every device.
        padded: x is already zero-padded by half the widest kernel on each side of every spatial axis (as
            :func:`pointwise_act` writes it with ``pad``); the output has the unpadded size.
        packed: the kernel's weights and biases as :func:`pack_branches` gives them for ``weights`` and ``biases``
            (kept by the caller across calls: packing launches a few small kernels); None packs them here.

    With Triton (CUDA, or its interpreter on the CPU), 1–3 branches and x in float32/bfloat16/float16, one kernel
    computes it: every branch accumulates (in float32) from the same loads of the input tile, and the sum is stored
    once into its shuffled channel. Under autocast it runs in the autocast dtype. Not differentiable (inference).
    """
    dims, c = x.dim() - 2, x.shape[1]
    kernels = [tuple(w.shape[2:]) for w in weights]
    if not 1 <= dims <= 3 or not weights or len(biases) != len(weights) or len(bounds) != len(weights) \
            or c % shuffle_groups or any(tuple(w.shape[:2]) != (c, 1) or len(k) != dims or any(kk % 2 == 0 for kk in k)
                                         for w, k in zip(weights, kernels)):
        raise ValueError(f"multikernel_depthwise: input {tuple(x.shape)}, weights {[tuple(w.shape) for w in weights]}, "
                         f"{len(biases)} biases, {len(bounds)} bounds and shuffle_groups={shuffle_groups} are not "
                         "depth-wise branches with odd kernel sizes")
    if torch.is_autocast_enabled(x.device.type) and x.dtype in TRITON_DTYPES:
        x = x.to(torch.get_autocast_dtype(x.device.type))
    widest = tuple(max(k[i] for k in kernels) for i in range(dims))
    out_size = [s_ - 2 * (k // 2) for s_, k in zip(x.shape[2:], widest)] if padded else list(x.shape[2:])
    if padded:
        if min(out_size) < 1:
            raise ValueError(f"multikernel_depthwise: padded input {tuple(x.shape)} is not larger than the padding of "
                             f"the widest kernel {widest}")
        if not (triton and triton_available(x.device)) or len(weights) > MAX_BRANCHES or x.dtype not in TRITON_DTYPES:
            inner = tuple(slice(k // 2, k // 2 + s_) for s_, k in zip(out_size, widest))
            return multikernel_depthwise(x[(slice(None), slice(None)) + inner], weights, biases, bounds, shuffle_groups,
                                         triton)
    if not triton or not triton_available(x.device) or len(weights) > MAX_BRANCHES \
            or x.dtype not in TRITON_DTYPES:
        conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        out = None
        for w, b, (lo, hi), k in zip(weights, biases, bounds, kernels):
            y = conv(x, w.to(x.dtype), None if b is None else b.to(x.dtype), 1, tuple(kk // 2 for kk in k), 1, c)
            y = y.clamp(lo, hi)
            out = y if out is None else out + y
        return out.unflatten(1, (shuffle_groups, c // shuffle_groups)).transpose(1, 2).flatten(1, 2)
    m3 = _kernel3(widest)
    lohi = _branch_bounds(bounds)
    w, b = packed if packed is not None else pack_branches(weights, biases)
    n = x.shape[0]
    x5 = x.reshape(n, c, *_kernel3(tuple(x.shape[2:]))).contiguous()
    d, h, wd = _kernel3(tuple(out_size))
    y = torch.empty((n, c, d, h, wd), device=x.device, dtype=x.dtype)
    loop = d > 1 and (h * wd >= MKDC_LOOP_PLANE or math.prod(m3) > DEPTH_LOOP_TAPS)  # (7³ unrolled: minutes to compile)
    if d > 1:  # volumes: two tile shapes, so few compiled variants per dtype (small volumes are cheap)
        rows, (bh, bw) = MKDC_ROWS, MKDC_LOOP_TILE if loop else MKDC_TILE
    else:
        rows, (_, bh, bw) = 1, _blocks((1, h, wd), MKDC_TILE[0] * MKDC_TILE[1])
    xp = x5 if padded else _padded(x5, m3)
    kernel_sizes = _kernel_sizes(m3, [_kernel3(k) for k in kernels])
    grid = _grid_setting(d, h, wd, math.prod(m3))
    if grid is not None:
        _launch_grid(grid, xp, w, b, y, shuffle_groups, lohi, kernel_sizes)
        return y.reshape(n, c, *out_size)
    th, tw = -(-h // bh), -(-wd // bw)
    _kernels().mkdc_forward[(-(-d // rows) * th * tw, n * c)](
        xp, w, b, y, c, d, h, wd, th, tw, c // shuffle_groups, shuffle_groups, *lohi, **kernel_sizes, ROWS=rows, BH=bh,
        BW=bw, ROW_LOOP=loop, num_warps=MKDC_WARPS)
    return y.reshape(n, c, *out_size)


#: voxels × output channels of one :func:`pointwise_act` program, and the input channels of each of its dot products
POINTWISE_VOXELS, POINTWISE_CHANNELS, POINTWISE_K = 128, 64, 32
#: warps of one :func:`pointwise_act` program (None: 8 for 64 × 128 accumulators and up, else 4) and its software
#: pipeline stages over the input channels (None: Triton's default)
POINTWISE_WARPS, POINTWISE_STAGES = None, None


def _launch_options(warps: int, stages: int | None) -> dict:
    return {"num_warps": warps, **({"num_stages": stages} if stages else {})}


def pointwise_act(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  bounds: tuple[float, float] = (float("-inf"), float("inf")), pad: tuple[int, ...] | None = None,
                  residual: torch.Tensor | None = None, residual_weight: torch.Tensor | None = None,
                  triton: bool = True) -> torch.Tensor:
    """``clamp(conv1x1(x, weight, bias) + r, lo, hi)``, optionally zero-padded: a 1×1 convolution with its folded norm,
    activation and shortcut (Eq. 1's ``PWC_1`` + ReLU6, or ``PWC_2`` + residual) for inference.

    Args:
        x: ``(B, C_in, *S)`` with 1–3 spatial dimensions.
        weight: ``(C_out, C_in)`` (or the conv's ``(C_out, C_in, 1, ...)``); bias ``(C_out,)`` or None.
        bounds: ``(lo, hi)`` of the activation (ReLU6: ``(0, 6)``; the default: none).
        pad: zeros added on both sides of each spatial axis of the output (so :func:`multikernel_depthwise` reads it
            with ``padded=True``); None: none.
        residual: added before the clamp: ``(B, C_out, *S)`` itself, or with ``residual_weight`` ``(C_out, C_r)`` the
            1×1 conv ``residual_weight · residual`` of a ``(B, C_r, *S)`` tensor.
        triton: False computes it with PyTorch's ops on every device.

    With Triton (:func:`triton_available`) one kernel computes it (tensor-core dot products accumulated in float32,
    exact float32 products for float32 inputs) and writes the output once: cuDNN's 1×1 convs are followed by a bias
    add, a clamp and (before an MKDC) a padded copy, each a pass over the output. Under autocast the output is in the
    autocast dtype."""
    dims = x.dim() - 2
    n, cin = x.shape[:2]
    w2 = weight.reshape(weight.shape[0], -1)
    cout = w2.shape[0]
    pad3 = (0,) * (3 - dims) + tuple(int(p_) for p_ in pad) if pad is not None else (0, 0, 0)
    if (pad is not None and len(pad) != dims) or w2.shape[1] != cin or (bias is not None and bias.shape != (cout,)) \
            or not 1 <= dims <= 3:
        raise ValueError(f"pointwise_act: input {tuple(x.shape)}, weight {tuple(weight.shape)}, bias "
                         f"{None if bias is None else tuple(bias.shape)} and pad {pad} are not a 1×1 convolution")
    if residual is not None:
        want = (n, residual_weight.shape[1] if residual_weight is not None else cout, *x.shape[2:])
        if tuple(residual.shape) != want or (residual_weight is not None and residual_weight.shape[0] != cout):
            raise ValueError(f"pointwise_act: residual {tuple(residual.shape)} (weight "
                             f"{None if residual_weight is None else tuple(residual_weight.shape)}) does not match "
                             f"input {tuple(x.shape)} and weight {tuple(weight.shape)}")
    dtype = compute_dtype(x)
    padded_size = [int(s_) + 2 * p_ for s_, p_ in zip(x.shape[2:], pad3[3 - dims:])]
    total = math.prod(padded_size)  # output voxels (>= input voxels): int32 offsets within a sample must fit
    fits = max(cin, cout, residual.shape[1] if residual is not None else 0) * total < 2 ** 31
    if not triton or not triton_available(x.device) or dtype not in TRITON_DTYPES or not fits:
        with torch.autocast(x.device.type, enabled=False):
            conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
            kshape = (1,) * dims
            y = conv(x.to(dtype), w2.to(dtype).reshape(cout, cin, *kshape), None if bias is None else bias.to(dtype))
            if residual is not None:
                r = residual.to(dtype)
                if residual_weight is not None:
                    r = conv(r, residual_weight.to(dtype).reshape(cout, -1, *kshape))
                y = y + r
            if bounds[0] != float("-inf") or bounds[1] != float("inf"):
                y = y.clamp(*bounds)
            if pad is not None:
                y = F.pad(y, [p_ for p_ in reversed(pad) for _ in range(2)])
            return y
    res_kind = 0 if residual is None else (2 if residual_weight is not None else 1)
    x5 = x.to(dtype).reshape(n, cin, *_kernel3(tuple(x.shape[2:]))).contiguous()
    r5 = None if residual is None else residual.to(dtype).reshape(n, residual.shape[1], *x5.shape[2:]).contiguous()
    y = torch.empty((n, cout, *padded_size), device=x.device, dtype=dtype)
    bco = min(max(_pow2(cout), 16), POINTWISE_CHANNELS)
    bk = min(max(_pow2(max(cin, r5.shape[1] if res_kind == 2 else 0)), 16), POINTWISE_K)
    _kernels().pointwise[(-(-total // POINTWISE_VOXELS), n, -(-cout // bco))](
        x5, w2.to(dtype).contiguous(), bias.float().contiguous() if bias is not None else w2,
        r5 if r5 is not None else x5, residual_weight.reshape(cout, -1).to(dtype).contiguous() if res_kind == 2 else w2,
        y, cin, cout, r5.shape[1] if r5 is not None else 0, *x5.shape[2:], *pad3, float(bounds[0]), float(bounds[1]),
        HAS_BIAS=bias is not None, RES=res_kind, PADDED=pad is not None and any(pad3), BK=bk, BCO=bco,
        BP=POINTWISE_VOXELS, PRECISION="ieee" if dtype == torch.float32 else "tf32",
        **_launch_options(POINTWISE_WARPS or (8 if bco * POINTWISE_VOXELS >= 8192 else 4), POINTWISE_STAGES))
    # (4 warps spill a 64 × 128 accumulator: ptxas, sm_90)
    return y


def _tables3(x: torch.Tensor, tables: tuple[torch.Tensor, ...], size: list[int]) -> tuple:
    """Input and output sizes as 3D and the upsampling tables with a leading entry (index 0, weight 0) for each
    size-1 axis a 1D/2D input lacks (3D inputs: the tables as they are)."""
    pad = 3 - (x.dim() - 2)
    if pad:
        tables = tuple(torch.cat([torch.zeros(pad, device=x.device, dtype=t.dtype), t]) for t in tables)
    return _kernel3(tuple(x.shape[2:])), _kernel3(tuple(int(s) for s in size)), tables


#: most output channels of :func:`upsample_relu_pointwise`'s kernel (accumulators per voxel)
MAX_HEAD_CHANNELS = 16


def upsample_relu_pointwise(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                            size: list[int], weight: torch.Tensor, bias: torch.Tensor | None, relu: bool = True
                            ) -> torch.Tensor:
    """``conv1x1(relu(upsample(x)), weight, bias)`` as one Triton kernel (inference; needs :func:`triton_available`).

    Args:
        x: ``(B, C, *s)`` with 1–3 spatial dimensions, float32/bfloat16/float16.
        tables: the (multi)linear upsampling's ``(i0, i1, λ)`` per output row of every spatial axis, concatenated over
            the axes (first axis first), as :func:`~ul3d.networks.nets._lean.linear_source_weights` gives them.
        size: the output's spatial size.
        weight: ``(K, C)`` with ``K ≤`` :data:`MAX_HEAD_CHANNELS`; bias ``(K,)`` or None.

    Each program interpolates a block of output voxels channel by channel in float32 and accumulates the head's ``K``
    outputs, so only the ``K``-channel output is written. Under autocast the output is in the autocast dtype.
    """
    dims = x.dim() - 2
    n, c = x.shape[:2]
    k = weight.shape[0]
    if not 1 <= dims <= 3 or len(size) != dims or tuple(weight.shape) != (k, c) or k > MAX_HEAD_CHANNELS:
        raise ValueError(f"upsample_relu_pointwise: input {tuple(x.shape)}, size {list(size)} and weight "
                         f"{tuple(weight.shape)} are not a 1×1 head of at most {MAX_HEAD_CHANNELS} channels")
    dtype = compute_dtype(x)
    src, out, (i0, i1, lam) = _tables3(x, tables, size)
    y = torch.empty((n, k, *size), device=x.device, dtype=dtype)
    block = 256
    total = out[0] * out[1] * out[2]
    _kernels().upsample_relu_pointwise[(-(-total // block), n)](
        x.contiguous(), i0, i1, lam.float(), weight.float().contiguous(),
        bias.float().contiguous() if bias is not None else weight, y, c, k, *src, *out,
        RELU=bool(relu), HAS_BIAS=bias is not None, KP=max(_pow2(k), 2), BLOCK=block, num_warps=4)
    return y


def doubled(x: torch.Tensor, size: list[int], align_corners: bool = False) -> bool:
    """True when a (bi/tri)linear upsampling of a 2D or 3D ``x`` to ``size`` doubles every spatial axis with
    ``align_corners=False``: the case of :func:`upsample2x_relu` and :func:`upsample2x_relu_pointwise`."""
    return not align_corners and x.dim() in (4, 5) and len(size) == x.dim() - 2 \
        and all(int(o) == 2 * int(i) for o, i in zip(size, x.shape[2:]))


def _cell_launch(x: torch.Tensor, planes: int) -> tuple[tuple[int, int, int], tuple[int, int, int], int, int]:
    """The input size as 3D, the grid of a 2× cell kernel over ``planes`` (samples or sample-channels), its depth
    factor and its cells per program."""
    d, h, w = _kernel3(tuple(x.shape[2:]))
    sd = 2 if x.dim() == 5 else 1
    block = min(128, max(32, _pow2((h + 1) * (w + 1))))
    return (d, h, w), (-(-((h + 1) * (w + 1)) // block), d + sd - 1, planes), sd, block


def upsample2x_relu_pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool = True
                              ) -> torch.Tensor:
    """:func:`upsample_relu_pointwise` for a (bi/tri)linear 2× upsampling with ``align_corners=False`` of a 2D or 3D
    ``x`` (:func:`doubled`) as one Triton kernel that reads each cell's 2×2(×2) source voxels once for its 4 (8)
    outputs, the weights 0.75 and 0.25 as constants (``F.interpolate``'s for this case: the tables do not enter)."""
    n, c = x.shape[:2]
    k = weight.shape[0]
    if x.dim() not in (4, 5) or tuple(weight.shape) != (k, c) or k > MAX_HEAD_CHANNELS:
        raise ValueError(f"upsample2x_relu_pointwise: input {tuple(x.shape)} and weight {tuple(weight.shape)} are not "
                         f"a 2D/3D input and a 1×1 head of at most {MAX_HEAD_CHANNELS} channels")
    src, grid, sd, block = _cell_launch(x, n)
    y = torch.empty((n, k, *(2 * s for s in x.shape[2:])), device=x.device, dtype=compute_dtype(x))
    _kernels().upsample2x_relu_pointwise[grid](
        x.contiguous(), weight.float().contiguous(), bias.float().contiguous() if bias is not None else weight, y,
        c, k, *src, RELU=bool(relu), HAS_BIAS=bias is not None, SD=sd, KP=max(_pow2(k), 2), BLOCK=block,
        num_warps=4)
    return y


def upsample2x_relu(x: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """:func:`linear_upsample` for a 2× upsampling with ``align_corners=False`` of a 2D or 3D ``x`` (:func:`doubled`)
    as one Triton kernel over cells (:func:`upsample2x_relu_pointwise`), in x's dtype."""
    if x.dim() not in (4, 5):
        raise ValueError(f"upsample2x_relu: input {tuple(x.shape)} is not 2D or 3D")
    src, grid, sd, block = _cell_launch(x, x.shape[0] * x.shape[1])
    y = torch.empty((*x.shape[:2], *(2 * s for s in x.shape[2:])), device=x.device, dtype=x.dtype)
    _kernels().upsample2x_relu[grid](x.contiguous(), y, *src, RELU=bool(relu), SD=sd, BLOCK=block,
                                     num_warps=max(1, min(4, block // 32)))
    return y


def upsample2x_backward(grad: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """The input gradient of :func:`upsample2x_relu` from its output gradient ``grad`` (``(B, C, 2d, 2h, 2w)`` or
    ``(B, C, 2h, 2w)``) as one Triton kernel; ``y``: the forward's output where it applied ReLU (the gradient passes
    where ``y > 0``), else None."""
    if grad.dim() not in (4, 5) or any(s % 2 for s in grad.shape[2:]) or (y is not None and y.shape != grad.shape):
        raise ValueError(f"upsample2x_backward: gradient {tuple(grad.shape)} is not a 2D/3D 2× upsampling's output")
    sd = 2 if grad.dim() == 5 else 1
    coarse = [s // 2 for s in grad.shape[2:]]
    d, h, w = _kernel3(tuple(coarse))
    gx = torch.empty((*grad.shape[:2], *coarse), device=grad.device, dtype=grad.dtype)
    block = min(256, max(32, _pow2(h * w)))
    grad = grad.contiguous()
    _kernels().upsample2x_backward[(-(-(h * w) // block), d, grad.shape[0] * grad.shape[1])](
        grad, y.contiguous() if y is not None else grad, gx, d, h, w, RELU=y is not None, SD=sd, BLOCK=block,
        num_warps=max(1, min(4, block // 64)))
    return gx


@torch.library.custom_op("ul3d::upsample2x_relu", mutates_args=())
def _upsample2x_op(x: torch.Tensor, relu: bool) -> torch.Tensor:
    return upsample2x_relu(x, relu=relu)


@_upsample2x_op.register_fake
def _(x: torch.Tensor, relu: bool) -> torch.Tensor:
    return x.new_empty((*x.shape[:2], *(2 * s for s in x.shape[2:])))


@torch.library.custom_op("ul3d::upsample2x_backward", mutates_args=())
def _upsample2x_backward_op(grad: torch.Tensor, y: torch.Tensor, relu: bool) -> torch.Tensor:
    return upsample2x_backward(grad, y if relu else None)


@_upsample2x_backward_op.register_fake
def _(grad: torch.Tensor, y: torch.Tensor, relu: bool) -> torch.Tensor:
    return grad.new_empty((*grad.shape[:2], *(s // 2 for s in grad.shape[2:])))


def _upsample2x_setup(ctx, inputs, output) -> None:
    ctx.relu = inputs[1]
    ctx.save_for_backward(output if ctx.relu else None)


def _upsample2x_grad(ctx, grad):
    (y,) = ctx.saved_tensors
    return _upsample2x_backward_op(grad, grad if y is None else y, ctx.relu), None


_upsample2x_op.register_autograd(_upsample2x_grad, setup_context=_upsample2x_setup)


def upsample2x_relu_trainable(x: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """:func:`upsample2x_relu` with a gradient (:func:`upsample2x_backward`), as a custom operator (``torch.compile``
    keeps it whole): training's decoder upsampling + ReLU in two kernels (PyTorch's CUDA upsampling gradient scatters
    with atomics: 0.43 ms for 2 × 16 × 96³ in an H200 training step, ``benchmarks/results/profile_cuda_h200_
    2026-12-04_train.json``)."""
    return _upsample2x_op(x, bool(relu))


#: voxels per block of the BatchNorm kernels, the programs their reductions aim at, and whether the MKDC branches and
#: MKIR 1×1 blocks use them in training with ``accelerate(triton=True)`` outside ``torch.compile``
#: (:func:`~ul3d.networks.blocks.multikernel.batchnorm_act`). PyTorch's BatchNorm kernels reduce each channel in one
#: block: 8 ms for the backward of four 2 × 2 × 96³ BatchNorms in an H200 training step
#: (``benchmarks/results/profile_cuda_h200_2026-12-04_train.json``); with these kernels the eager base step as one CUDA
#: graph took 15.1 instead of 45.4 ms (``levers_cuda_h200_2026-12-04_bnk_quick.json``). On by default since a seed
#: sweep on an H200 (``benchmarks/results/bn_kernels_seed_sweep_cuda_h200_2026-12-04.json``: MKIR(1, 3, 5) against
#: the plain modules, 40 seeds each in 2D and 3D) found every output and gradient within 1e-4 without TF32, with and
#: without these kernels; with cuDNN's TF32 convs in the reference both settings fail now and then (4 and 10 of 40
#: 3D seeds), which is what the one CUDA failure seen before was
BN_BLOCK, BN_PROGRAMS, BATCHNORM_KERNELS = 1024, 2048, True


def _bn_chunks(n: int, c: int, s: int) -> tuple[int, int]:
    """(voxels per chunk, chunks per plane) of the BatchNorm reductions: about BN_PROGRAMS programs in all."""
    blocks = -(-s // BN_BLOCK)
    chunks = max(1, min(blocks, -(-BN_PROGRAMS // (n * c))))
    per = -(-blocks // chunks) * BN_BLOCK
    return per, -(-s // per)


def _bn_bounds(lo: float, hi: float) -> dict:
    return {"LO": lo != float("-inf"), "HI": hi != float("inf")}


class _BatchNormClampKernels(torch.autograd.Function):
    """:func:`batchnorm_clamp` with batch statistics: three Triton kernels forward (chunk statistics, per-channel
    statistics and running-statistics update, normalise + clamp), three backward; keeps ``z`` and seven per-channel
    values for backward (the clamp mask is recomputed by the same formula)."""

    @staticmethod
    def forward(ctx, z, weight, bias, running_mean, running_var, momentum, eps, lo, hi):
        z = z.contiguous()
        n, c = z.shape[:2]
        s = z[0, 0].numel()
        per, chunks = _bn_chunks(n, c, s)
        part = torch.empty((n * c * chunks, 2), device=z.device, dtype=torch.float32)
        par = torch.empty((7, c), device=z.device, dtype=torch.float32)
        k = _kernels()
        k.bn_stats[(chunks, n * c)](z, part, s, per, chunks, BLOCK=BN_BLOCK, num_warps=4)
        track = running_mean is not None
        k.bn_finalize[(c,)](part, weight if weight is not None else par, bias if bias is not None else par,
                            running_mean if track else par, running_var if track else par, par, c, n, chunks, s, per,
                            float(momentum), float(eps), HAS_W=weight is not None, HAS_B=bias is not None,
                            TRACK=track, BLOCK=128, num_warps=4)
        y = torch.empty_like(z)
        bounds = _bn_bounds(lo, hi)
        k.bn_apply[(-(-s // BN_BLOCK), n * c)](z, par, y, c, s, float(lo), float(hi), **bounds, BLOCK=BN_BLOCK,
                                                num_warps=4)
        ctx.save_for_backward(z, weight, par)
        ctx.lo, ctx.hi, ctx.bias_dtype = lo, hi, bias.dtype if bias is not None else None
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        z, weight, par = ctx.saved_tensors
        grad = grad.contiguous()
        n, c = z.shape[:2]
        s = z[0, 0].numel()
        per, chunks = _bn_chunks(n, c, s)
        part = torch.empty((n * c * chunks, 2), device=z.device, dtype=torch.float32)
        bounds = _bn_bounds(ctx.lo, ctx.hi)
        k = _kernels()
        k.bn_backward_stats[(chunks, n * c)](z, grad, par, part, c, s, per, chunks, float(ctx.lo), float(ctx.hi),
                                             **bounds, BLOCK=BN_BLOCK, num_warps=4)
        dwb = torch.empty((2, c), device=z.device, dtype=torch.float32)
        par = par.clone()  # (a second backward through a retained graph reads the forward's values)
        k.bn_backward_finalize[(c,)](part, weight if weight is not None else par, par, dwb[0], dwb[1], c, n, chunks,
                                     s, HAS_W=weight is not None, BLOCK=128, num_warps=4)
        dz = torch.empty_like(z)
        k.bn_backward_apply[(-(-s // BN_BLOCK), n * c)](z, grad, par, dz, c, s, float(ctx.lo), float(ctx.hi),
                                                         **bounds, BLOCK=BN_BLOCK, num_warps=4)
        dw = dwb[0].to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = dwb[1].to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return dz, dw, db, None, None, None, None, None, None


def batchnorm_clamp(z: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    running_mean: torch.Tensor | None, running_var: torch.Tensor | None, momentum: float, eps: float,
                    lo: float = float("-inf"), hi: float = float("inf")) -> torch.Tensor:
    """``clamp(batch_norm(z, training=True), lo, hi)``: BatchNorm with the batch's statistics (updating the running
    ones in place with factor ``momentum``, as ``nn.BatchNorm`` does, where they are given) and an optional clamp
    (ReLU: ``lo=0``; ReLU6: ``0, 6``; none: ±inf), with its gradient, as Triton kernels whose reductions split every
    channel into chunks. ``z``: ``(B, C, *S)`` float32/bfloat16/float16 on a device with Triton; the output in z's
    dtype (as BatchNorm's under autocast); each chunk's mean and squared deviations in float32 (merged as Welford's
    algorithm does), combined over chunks in float64."""
    if z.dim() < 3 or not triton_available(z.device) or z.dtype not in TRITON_DTYPES:
        raise ValueError(f"batchnorm_clamp: input {tuple(z.shape)} {z.dtype} on {z.device} is not a (B, C, *S) "
                         "tensor the Triton kernels compute")
    return _BatchNormClampKernels.apply(z, weight, bias, running_mean, running_var, momentum, eps, lo, hi)


#: voxels of one ``gate_apply`` program of :func:`gated_skip_sum`, and whether the decoder's GAG skip merges use
#: :func:`gated_skip_sum` (H200, base, sliding window: 0.0387 s without, 0.0367 s with,
#: ``levers_cuda_h200_2026-12-03_cells_gate_quick.json``; a first one-pass kernel, 256 voxels per program looping over
#: the gate's channels, was slower, ``levers_cuda_h200_2026-12-03_gate{,off}_quick.json``)
GATE_BLOCK, GATE_KERNEL = 512, True


def pack_gate(wu: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor, wpsi: torch.Tensor, bpsi: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """:func:`gated_skip_sum`'s arguments for a GAG whose grouped convs have the weights ``wu``, ``ws``
    ``(C / P, P, *k)``: every group's taps of its P gate and then its P skip channels in one row ``(2C, Π k)``, the
    summed biases as ``(MAX_BRANCHES, C / P)``, ψ's weights ``(C / P,)`` and bias ``(1,)``, all float32, and ``k``."""
    groups, p = wu.shape[:2]
    w = torch.stack([wu.reshape(groups, p, -1), ws.reshape(groups, p, -1)], 1).reshape(2 * groups * p, -1)
    return (w.float().contiguous(), _branch_biases([bias], groups, wu.device), wpsi.reshape(-1).float().contiguous(),
            bpsi.reshape(1).float().contiguous(), tuple(wu.shape[2:]))


def gated_skip_sum(u: torch.Tensor, s: torch.Tensor, packed: tuple) -> torch.Tensor | None:
    """``u + s · σ(bpsi + wpsi · ReLU(GC_u(u) + GC_s(s) + bias))``: a decoder's skip merge through its grouped attention
    gate (Eq. 6 with both norms folded, :class:`~ul3d.networks.blocks.GAG` ``(g=u, x=s)``) in two Triton kernels
    (inference; needs :func:`triton_available`), or None where they do not run (the caller runs the modules).

    Args:
        u, s: ``(B, C, D, H, W)``, the same shape, float32/bfloat16/float16.
        packed: the gate's weights as :func:`pack_gate` gives them (odd kernel sizes, "same" zero padding).

    The gate's C/P channels come from ``mkdc_forward_grid`` with one branch, each output channel summing its 2P
    input planes (the group's gate and skip channels, zero-padded into one tensor by ``pack_pair``: one pass instead
    of a zero fill and two copies) with input rows shared in depth and
    height, then its bias and ReLU; a second kernel reads them with u and s and writes ``u + s·ψ``. It runs where
    :data:`MKDC_GRID` has a setting for the volume (3D, its rows dividing depth and height). Under autocast the output
    is in the autocast dtype.
    """
    w, b3, wpsi, bpsi, k = packed
    n, c = u.shape[:2]
    groups = b3.shape[1]
    if u.dim() != 5 or u.shape != s.shape or len(k) != 3 or any(kk % 2 == 0 for kk in k) or c % groups \
            or tuple(w.shape) != (2 * c, math.prod(k)):
        raise ValueError(f"gated_skip_sum: inputs {tuple(u.shape)}, {tuple(s.shape)} and packed weights "
                         f"{tuple(w.shape)} (kernel {k}) are not a grouped attention gate over the inputs' channels")
    d, h, wd = u.shape[2:]
    grid = _grid_setting(d, h, wd, math.prod(k))
    if grid is None:
        return None
    dtype = compute_dtype(u)
    p = c // groups
    kd, kh, kw = k
    xp = torch.empty((n, groups, 2, p, d + kd - 1, h + kh - 1, wd + kw - 1), device=u.device, dtype=dtype)
    u, s = u.to(dtype).contiguous(), s.to(dtype).contiguous()
    bw = max(_pow2(wd + kw - 1), 16)
    rows = max(1, 1024 // bw)
    _kernels().pack_pair[(-(-((d + kd - 1) * (h + kh - 1)) // rows), n * 2 * c)](
        u, s, xp, c, p, d, h, wd, kd // 2, kh // 2, kw // 2, ROWS=rows, BW=bw, num_warps=4)
    gate = torch.empty((n, groups, d, h, wd), device=u.device, dtype=dtype)
    _launch_grid(grid, xp, w, b3, gate, 1, _branch_bounds([(0.0, float("inf"))]), _kernel_sizes(k, [k]), ipo=2 * p)
    y = torch.empty((n, c, d, h, wd), device=u.device, dtype=dtype)
    total = d * h * wd
    _kernels().gate_apply[(-(-total // GATE_BLOCK), n)](
        u, s, gate, wpsi, bpsi, y, total, C=c, G=groups,
        BLOCK=GATE_BLOCK, num_warps=4)
    return y


#: most channels and hidden channels of :func:`channel_spatial_attention`'s kernels, their channels per step and
#: voxels per program, and whether CMFA blocks use them (``accelerate(triton=True)``, autograd off; H200, base,
#: sliding window 0.0361 s without, 0.0336 s with, ``levers_cuda_h200_2026-12-03_cmfa_quick.json``)
CMFA_MAX_CHANNELS, CMFA_MAX_HIDDEN, CMFA_CHANNELS, CMFA_BLOCK, CMFA_KERNELS = 1024, 64, 16, 256, True
#: voxels of one ``plane_stats`` program (at least; rounded up to whole blocks) and the most programs per plane (one
#: program per plane took 0.17 ms for the five CMFAs of a 4 × 96³ forward on an H200: 64 programs at 48³)
CMFA_STATS_CHUNK, CMFA_MAX_CHUNKS = 8192, 64
_STATS_BLOCK = 1024  # voxels of one step of a plane_stats program


def channel_spatial_attention(x: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor, spatial: torch.Tensor,
                              packed: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
    """CMFA (§3.2): ``SA(CA(x))`` with Eq. 3's channel attention (``fc1`` (HID, C), ``fc2`` (C, HID), float32: its
    bias-free shared MLP with ReLU) and Eq. 4's spatial attention (``spatial``: its bias-free 2 -> 1 conv's weight as
    the depth-wise weight ``(2, 1, *k)``, odd k; ``packed``: :func:`pack_branches` of it, kept by the caller) in four
    Triton kernels (inference; needs :func:`triton_available`), or None where they do not run (the caller runs the
    modules).

    ``plane_stats`` reads x once for every channel's mean and maximum; ``cmfa_describe`` computes the channel weights
    and, in one more read, the channel maximum and mean of ``x·cw`` into a zero-padded two-channel descriptor;
    the depth-wise kernel convolves its two channels (:func:`multikernel_depthwise`, ``padded``); ``cmfa_apply``
    writes ``x·cw·σ(a_0 + a_1)``. The modules take ~19 kernels and five passes over x or ``x·cw``. Under autocast the
    output is in the autocast dtype; the kernels compute in float32."""
    dims = x.dim() - 2
    n, c = x.shape[:2]
    hidden = fc1.shape[0]
    k = tuple(spatial.shape[2:])
    if not 1 <= dims <= 3 or tuple(fc1.shape) != (hidden, c) or tuple(fc2.shape) != (c, hidden) or len(k) != dims \
            or tuple(spatial.shape[:2]) != (2, 1) or any(kk % 2 == 0 for kk in k):
        raise ValueError(f"channel_spatial_attention: input {tuple(x.shape)}, fc1 {tuple(fc1.shape)}, fc2 "
                         f"{tuple(fc2.shape)} and spatial weight {tuple(spatial.shape)} are not a CMFA's")
    dtype = compute_dtype(x)
    if c > CMFA_MAX_CHANNELS or hidden > CMFA_MAX_HIDDEN or dtype not in TRITON_DTYPES:
        return None
    xc = x.to(dtype).contiguous()
    size = [int(s_) for s_ in x.shape[2:]]
    total = math.prod(size)
    chunk = max(CMFA_STATS_CHUNK, -(-total // CMFA_MAX_CHUNKS))
    chunk = -(-chunk // _STATS_BLOCK) * _STATS_BLOCK  # whole blocks of plane_stats
    chunks = -(-total // chunk)
    sums = torch.empty(n * c * chunks, device=x.device, dtype=torch.float32)
    maxs = torch.empty_like(sums)
    _kernels().plane_stats[(chunks, n * c)](xc, sums, maxs, total, chunk, chunks, BLOCK=_STATS_BLOCK, num_warps=4)
    pads = [kk // 2 for kk in k]
    desc = torch.zeros((n, 2, *(s_ + 2 * p_ for s_, p_ in zip(size, pads))), device=x.device, dtype=dtype)
    cw = torch.empty((n, c), device=x.device, dtype=torch.float32)
    _, h3, w3 = _kernel3(tuple(size))
    pd, ph, pw = (0,) * (3 - dims) + tuple(pads)
    grid = (-(-total // CMFA_BLOCK), n)
    _kernels().cmfa_describe[grid](xc, sums, maxs, fc1, fc2, cw, desc, c, hidden, total, h3, w3, pd, ph, pw, chunks,
                                   CP=max(_pow2(c), 2), HP=max(_pow2(hidden), 2), NP=max(_pow2(chunks), 2),
                                   CB=CMFA_CHANNELS, BLOCK=CMFA_BLOCK, num_warps=4)
    inf = float("inf")
    a = multikernel_depthwise(desc, [spatial], [None], [(-inf, inf)], padded=True, packed=packed)
    y = torch.empty_like(xc)
    _kernels().cmfa_apply[grid](xc, cw, a, y, c, total, G=2, CB=CMFA_CHANNELS, BLOCK=CMFA_BLOCK, num_warps=4)
    return y


#: most input channels / hidden channels of :func:`pooled_stem`'s kernel (a few-channel image and its expansion)
STEM_MAX_INPUTS, STEM_MAX_HIDDEN = 2, 4
#: pooled tile (rows × columns) of one :func:`pooled_stem` program (8·8·16 full-resolution voxels) and its warps
STEM_TILE, STEM_WARPS = (8, 16), 4
#: skip the narrower MKDC branches' taps outside their windows by a uniform branch (False: weights of 0, the old code)
STEM_SKIP = True


def stem_unsupported(x: torch.Tensor, expand_weight: torch.Tensor, weights: list[torch.Tensor],
                     out_weight: torch.Tensor) -> str | None:
    """Why :func:`pooled_stem`'s kernel does not take these shapes (it then runs PyTorch's ops), or None."""
    cin, hidden = x.shape[1], expand_weight.shape[0]
    if x.dim() != 5 or any(s % 2 for s in x.shape[2:]):
        return "not a 3D input of even size"
    if cin > STEM_MAX_INPUTS or hidden > STEM_MAX_HIDDEN:
        return f"more than {STEM_MAX_INPUTS} input or {STEM_MAX_HIDDEN} hidden channels"
    if not 1 <= len(weights) <= MAX_BRANCHES or any(len(set(w.shape[2:])) != 1 for w in weights):
        return f"not 1-{MAX_BRANCHES} cubic branches"
    if x.dtype not in TRITON_DTYPES:
        return f"dtype {x.dtype}"
    return None if out_weight.shape[0] <= 64 else "more than 64 output channels"


def pooled_stem(x: torch.Tensor, expand: tuple[torch.Tensor, torch.Tensor | None, tuple[float, float]],
                branches: tuple[list, list, list], out_weight: torch.Tensor, out_bias: torch.Tensor | None,
                triton: bool = True) -> torch.Tensor:
    """``maxpool2(Wo·[MKDC(clamp(We·x + be)), x] + bo)``: an MKIR on a few-channel image (the first encoder stage),
    its norms folded, followed by 2×2×2 max-pooling, for inference.

    Args:
        x: ``(B, C_in, D, H, W)``.
        expand: the expand conv's ``(weight (HC, C_in, 1, 1, 1), bias (HC,) or None, (lo, hi))``.
        branches: the MKDC's ``(weights, biases, bounds)`` as :meth:`~ul3d.networks.blocks.MKDC.folded_branches`.
        out_weight: ``(OC, HC + C_in)``: the project conv's columns (in the order of the MKDC's unshuffled sum) and then
            the shortcut's; out_bias ``(OC,)`` or None.
        triton: False computes it with PyTorch's ops on every device.

    With Triton (:func:`triton_available`) and shapes :func:`stem_unsupported` accepts, one kernel computes it: the
    expanded hidden channels are recomputed at every tap from the input (never stored), and only the pooled output is
    written (on an H200 the unfused stem of UltraLightUNet3D base, 4 × 96³ windows, writes and reads 16-channel
    full-resolution tensors). Under autocast the output is in the autocast dtype; the kernel computes in float32.
    """
    we, be, (lo_e, hi_e) = expand
    weights, biases, bounds = branches
    hidden, cin = we.shape[:2]
    dtype = compute_dtype(x)
    if not triton or not triton_available(x.device) or stem_unsupported(x, we, weights, out_weight) is not None:
        with torch.autocast(x.device.type, enabled=False):
            xf = x.to(dtype)
            e = F.conv3d(xf, we.to(dtype), None if be is None else be.to(dtype)).clamp(lo_e, hi_e)
            h = multikernel_depthwise(e, [w.to(dtype) for w in weights],
                                      [None if b is None else b.to(dtype) for b in biases], bounds, triton=False)
            wo = out_weight.to(dtype).reshape(*out_weight.shape, 1, 1, 1)
            out = F.conv3d(torch.cat([h, xf], 1), wo, None if out_bias is None else out_bias.to(dtype))
            return F.max_pool3d(out, 2)
    m = max(w.shape[2] for w in weights)
    taps = m ** 3
    zero = torch.zeros(hidden, device=x.device, dtype=torch.float32)
    wb = torch.zeros(MAX_BRANCHES, hidden, m, m, m, device=x.device, dtype=torch.float32)
    for i, w in enumerate(weights):  # every branch's taps placed in the widest window
        r = (m - w.shape[2]) // 2
        wb[i, :, r:m - r, r:m - r, r:m - r] = w.reshape(hidden, *w.shape[2:]).float()
    bb = _branch_biases(biases, hidden, x.device)
    lohi = _branch_bounds(bounds)
    ks = [w.shape[2] for w in weights] + [0] * (MAX_BRANCHES - len(weights))
    n, _, d, h, w = x.shape
    oc = out_weight.shape[0]
    ph, pw = h // 2, w // 2
    bh, bw = STEM_TILE
    th, tw = -(-ph // bh), -(-pw // bw)
    y = torch.empty((n, oc, d // 2, ph, pw), device=x.device, dtype=dtype)
    bo = out_bias.float().contiguous() if out_bias is not None else torch.zeros(oc, device=x.device)
    _kernels().stem_pooled[((d // 2) * th * tw, n)](
        _padded(x, (m, m, m)), we.reshape(hidden, cin).float().contiguous(),
        be.float().contiguous() if be is not None else zero, wb.reshape(MAX_BRANCHES, hidden, taps), bb,
        out_weight.float().contiguous(), bo, y, d, h, w, ph, pw, th, tw, float(lo_e), float(hi_e), *lohi,
        CIN=cin, HC=hidden, OC=oc, K0=ks[0], K1=ks[1], K2=ks[2], M=m, PBH=bh, PBW=bw, SKIP=STEM_SKIP,
        num_warps=STEM_WARPS)
    return y


def linear_upsample(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor], size: list[int],
                    relu: bool = False) -> torch.Tensor:
    """``relu(upsample(x))`` (``relu=False``: without the ReLU) for a (multi)linear upsampling given by ``tables`` (as
    :func:`upsample_relu_pointwise` takes them) as one Triton kernel (inference; needs :func:`triton_available` and
    x in :data:`TRITON_DTYPES`). The output is in x's dtype, as ``F.interpolate``'s; the kernel computes in float32.
    PyTorch's CUDA kernel parallelises over the output's plane only: UltraLightUNet3D's decoder upsamplings of
    4 × 96 × 3³ and 4 × 64 × 6³ windows take it 0.09 and 0.07 ms on an H200."""
    dims = x.dim() - 2
    if not 1 <= dims <= 3 or len(size) != dims:
        raise ValueError(f"linear_upsample: input {tuple(x.shape)} and size {list(size)} do not match")
    src, out, (i0, i1, lam) = _tables3(x, tables, size)
    y = torch.empty((*x.shape[:2], *size), device=x.device, dtype=x.dtype)
    block = 512
    _kernels().upsample_relu[(-(-(out[0] * out[1] * out[2]) // block), x.shape[0] * x.shape[1])](
        x.contiguous(), i0, i1, lam.float(), y, *src, *out, RELU=bool(relu), BLOCK=block, num_warps=4)
    return y


def max_pool_geometry(pool: nn.Module, dims: int) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(kernel, stride)`` per spatial axis of a ``MaxPool{1,2,3}d`` for ``dims``-D inputs without padding, dilation
    or returned indices; None for any other module."""
    if not isinstance(pool, nn.modules.pooling._MaxPoolNd) or pool.return_indices:
        return None
    stride = pool.stride if pool.stride is not None else pool.kernel_size
    kernel, stride, padding, dilation = (tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims
                                         for v in (pool.kernel_size, stride, pool.padding, pool.dilation))
    if any(len(v) != dims for v in (kernel, stride, padding, dilation)) or any(p != 0 for p in padding) \
            or any(d != 1 for d in dilation):
        return None
    return kernel, stride


def max_pool_2x(x: torch.Tensor, pool: nn.Module) -> torch.Tensor:
    """``pool(x)`` for a ``MaxPool{1,2,3}d`` of kernel 2, stride 2, no padding or dilation (either ``ceil_mode``) as
    one Triton kernel with autograd off where Triton runs (PyTorch's CUDA max-pooling also writes int64 indices:
    0.25 ms of a 6.1 ms H200 forward of UltraLightUNet3D base at 4×96³); any other pool or case runs ``pool``."""
    dims = x.dim() - 2
    if not 1 <= dims <= 3 or max_pool_geometry(pool, dims) != ((2,) * dims, (2,) * dims) or torch.is_grad_enabled() \
            or not triton_available(x.device) or x.dtype not in TRITON_DTYPES:
        return pool(x)
    out = [-(-s // 2) if pool.ceil_mode else s // 2 for s in x.shape[2:]]
    if not all(out):
        return pool(x)  # PyTorch's error for an input smaller than the window
    out3 = _kernel3(tuple(out))
    y = torch.empty((*x.shape[:2], *out), device=x.device, dtype=x.dtype)
    block = 512
    _kernels().max_pool2x[(-(-(out3[0] * out3[1] * out3[2]) // block), x.shape[0] * x.shape[1])](
        x.contiguous(), y, *_kernel3(tuple(x.shape[2:])), *out3, BLOCK=block, num_warps=4)
    return y
