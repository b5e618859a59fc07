"""Fast paths that compute the same function as the plain modules.

:func:`accelerate` switches every :class:`~ul3d.networks.blocks.MKDC` of a model to its fused forward (one grouped
depth-wise convolution, one norm and one activation over the stacked branches, for training and inference), and
optionally moves the model to channels-last memory; parameters and state_dict keys are unchanged, so checkpoints load
into either form. :func:`plain` switches back.

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

from .blocks.multikernel import channels_last_format, fold_into_conv, is_channels_last

__all__ = ["CUDAGraphInference", "InferenceCopy", "accelerate", "fold_batchnorm", "fused_mkdc_count", "plain"]


def accelerate(
    model: nn.Module,
    *,
    fused_mkdc: bool = True,
    unit_scale: bool = True,
    recompute: bool = False,
    channels_last: bool = False,
    fold_bn: bool = False,
    copy_model: bool = False,
    mkdc_float32: bool = False,
    triton: bool = False,
    pointwise_matmul: bool = False,
    outer_product: bool = False,
    inplace: bool = False,
    merge_pointwise: bool = False,
) -> nn.Module:
    """Switch ``model`` (in place, or a deep copy with ``copy_model=True``) to the fast paths; returns it.

    Args:
        fused_mkdc: every MKDC whose configuration the fused forward supports (parallel branches, conv -> BatchNorm or
            InstanceNorm without running stats -> ReLU/ReLU6) uses it; the others keep the plain forward.
        unit_scale: compute the 1×1 depth-wise branch as a per-channel scale instead of a zero-padded tap of the
            stacked convolution (fewer MACs, one more small kernel).
        recompute: in training, recompute the MKDC branch activations in backward instead of saving them (less
            memory, more compute; running statistics are still updated once).
        channels_last: ``channels_last_3d`` (3D) / ``channels_last`` (2D) memory format for the parameters; feed
            inputs in the same format to keep activations there.
        fold_bn: inference only: fold eval-mode BatchNorm into the convs (:func:`fold_batchnorm`, returns a copy).
        mkdc_float32: under autocast, compute every MKDC (depth-wise convs, BatchNorm, ReLU6, sum) in float32: the same
            function at higher precision, and faster on CUDA where the bfloat16 depth-wise/BatchNorm kernels are slow.
        triton: every MKDC computes its depth-wise convs with ul3d's Triton kernels (:mod:`ul3d.networks.depthwise`)
            wherever they are available (CUDA tensors with Triton installed), and keeps its norm/activation modules;
            elsewhere (CPU, TorchScript, export) the plain modules run. Takes precedence over ``fused_mkdc``. Every GAG's
            grouped convs run as Triton depth-wise convs plus channel sums there too, and every spatial-attention conv
            as PyTorch's depth-wise conv plus a channel sum
            (:func:`~ul3d.networks.blocks.attention.one_per_group_conv`; cuDNN's generic kernel is slow on both).
            With autograd off (inference) every MKDC whose norms are eval-mode BatchNorms (or folded) runs as one
            kernel (:func:`~ul3d.networks.depthwise.multikernel_depthwise`), every such MKIR as three (its 1×1 convs
            with their bias, activation, shortcut and padding as :func:`~ul3d.networks.depthwise.pointwise_act`;
            :meth:`~ul3d.networks.blocks.MKIR.forward_kernels`), the spatial attention's conv as ul3d's depth-wise
            kernel, and UltraLightUNet's last upsampling, ReLU and head as another, its first stage and pooling as
            another
            (:func:`~ul3d.networks.depthwise.pooled_stem`), its other max-poolings without indices
            (``triton_kernels``) and every decoder upsampling + ReLU as one kernel
            (:func:`~ul3d.networks.depthwise.linear_upsample`).
        pointwise_matmul: every MKIR computes its 1×1 convs (expand, project, shortcut) as matrix products over the
            flattened volume (cuBLAS instead of cuDNN's channels-first 3D kernels).
        outer_product: every MKIR with a one-channel input computes its 1×1 expand and shortcut convs as broadcast
            multiplies (``ul3d predict``'s CPU default: oneDNN is slow on one-channel channels-last 1×1 convs).
        inplace: inference: ReLU/ReLU6/Hardtanh modules overwrite their input (every one of them in ul3d's networks acts
            on a fresh conv/norm/sum output), and with autograd off the MKDC branch sums, MKIR shortcuts and the decoder's
            ReLU and skip sums accumulate into fresh intermediates instead of allocating new full-size tensors
            (``ul3d predict``'s CPU default; 2-core CPU, base sliding window −25 %).
        merge_pointwise: inference with autograd off: every MKIR folds its MKDC's channel shuffle into the project
            conv's weight (no shuffle copy) and, for a one-channel input with BatchNorm folded, computes project and
            shortcut as one matrix product (:meth:`~ul3d.networks.blocks.MKIR._forward_merged`); every GAG whose
            grouped convs map each group to one channel computes them as depth-wise convs plus a channel sum; every 3D
            spatial-attention conv runs as 2D convs over the depth slices plus a shifted sum; UltraLightUNet's last stage
            upsamples, applies ReLU and the head one slab of rows at a time (``slab_head``).
    """
    from .blocks.attention import CMFA, GAG, SpatialAttention
    from .blocks.multikernel import MKDC, MKIR
    from .nets.ultralightunet import DecoderStage, UltraLightUNet

    if fold_bn:
        model = fold_batchnorm(model)
    elif copy_model:
        model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, MKDC):
            m.fused = bool(fused_mkdc)
            m.fused_unit_scale = bool(unit_scale)
            m.fused_recompute = bool(recompute)
            m.float32 = bool(mkdc_float32)
            m.triton = bool(triton)
            m.conv_act = bool(merge_pointwise)
        if isinstance(m, MKIR):
            m.pointwise_matmul = bool(pointwise_matmul)
            m.outer_product = bool(outer_product)
            m.merge_pointwise = bool(merge_pointwise)
            m.triton = bool(triton)
        if isinstance(m, GAG):
            m.depthwise_sum = bool(merge_pointwise)
            m.triton = bool(triton)
        if isinstance(m, SpatialAttention):
            m.sliced = bool(merge_pointwise)
            m.depthwise = bool(triton)
        if isinstance(m, CMFA):
            m.triton = bool(triton)
        if inplace and isinstance(m, (nn.ReLU, nn.ReLU6, nn.Hardtanh)):
            m.inplace = True
        if isinstance(m, (MKDC, MKIR, DecoderStage)):
            m.inplace = bool(inplace)
        if isinstance(m, DecoderStage):
            m.triton = bool(triton)
        if isinstance(m, UltraLightUNet):
            m.slab_head = bool(merge_pointwise)
            m.triton_kernels = bool(triton)
    if channels_last:
        dims = next((p.dim() for p in model.parameters() if p.dim() >= 4), 5)
        model = model.to(memory_format=channels_last_format(dims))
    return model


def plain(model: nn.Module) -> nn.Module:
    """Switch every MKDC of ``model`` back to the plain forward (in place); returns the model."""
    return accelerate(model, fused_mkdc=False)


def fused_mkdc_count(model: nn.Module) -> tuple[int, int]:
    """(MKDCs that run the fused forward, all MKDCs) of ``model``."""
    from .blocks.multikernel import MKDC

    blocks = [m for m in model.modules() if isinstance(m, MKDC)]
    return sum(m.fused and m.fused_unsupported() is None for m in blocks), len(blocks)


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
        weight, bias = fold_into_conv(norm, conv.weight, conv.bias)
        conv.weight.copy_(weight)
        conv.bias = nn.Parameter(bias.clone())
        block.adn.N = nn.Identity()
    return model


class CUDAGraphInference:
    """``net``'s eval-mode forward replayed as one CUDA graph per input shape (inference only).

    A network as small as UltraLightUNet3D launches a few hundred kernels per forward; replaying them as a CUDA graph
    removes the CPU launch cost between them. The first call with a new shape (and autocast state) runs ``warmup``
    eager forwards on a side stream, then captures one; later calls copy the input into the graph's static input,
    replay it and return a copy of its output. Every graph shares one memory pool (replays are sequential on one
    stream and each output is copied out at once). Graphs are keyed by shape, memory format, dtype, device, inference
    mode and autocast state, not strides. Calls without CUDA, with autograd enabled, or while a graph is being
    captured run ``net`` directly; so does a shape whose capture failed (the reason is kept in ``failed``).

    Args:
        net: the network, in eval mode (BatchNorm with running statistics: a graph reads the parameters as they are
            at each replay; the MKIR kernels' prepared weights follow in-place changes of the parameters at the next
            eager call or :meth:`InferenceCopy.refresh`, :meth:`~ul3d.networks.blocks.MKIR.refresh_kernel_cache`).
        max_graphs: shapes captured at most; further shapes run eagerly (a sliding window needs two: the full
            window batch and the last, smaller one).
        warmup: eager forwards before each capture (cuDNN/Triton autotuning happens there, not in the graph).
    """

    def __init__(self, net: nn.Module, max_graphs: int = 4, warmup: int = 2) -> None:
        self.net = net
        self.max_graphs = int(max_graphs)
        self.warmup = int(warmup)
        self.graphs: dict[tuple, tuple[torch.Tensor, torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.failed: dict[tuple, str] = {}  # keys whose capture failed (they run eagerly), with the reason
        self.pool = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.as_tensor() if hasattr(x, "as_tensor") else x  # MONAI MetaTensor -> plain tensor (the graph is plain)
        if x.device.type != "cuda" or torch.is_grad_enabled() or torch.cuda.is_current_stream_capturing():
            return self.net(x)
        channels_last = is_channels_last(x)
        # strides are not part of the key (a window may be a view of the whole volume): copy_ takes any layout
        key = (tuple(x.shape), channels_last, x.dtype, x.device, torch.is_inference_mode_enabled(),
               torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        entry = self.graphs.get(key)
        if entry is None:
            if len(self.graphs) >= self.max_graphs or key in self.failed:
                return self.net(x)
            with torch.cuda.device(x.device):
                try:
                    entry = self._capture(x, channels_last)
                except RuntimeError as e:  # e.g. an op that cannot be captured: this shape runs eagerly
                    self.failed[key] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    torch.cuda.synchronize(x.device)
                    return self.net(x)
            self.graphs[key] = entry
        static_in, graph, static_out = entry
        with torch.cuda.device(x.device):
            static_in.copy_(x)
            graph.replay()
            return static_out.clone()

    def _capture(self, x: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, torch.cuda.CUDAGraph, torch.Tensor]:
        static_in = x.clone(memory_format=channels_last_format(x.dim()) if channels_last else torch.contiguous_format)
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.net(static_in)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # autocast's cache of cast weights must stay out of the graph (its tensors are freed when autocast exits)
        # thread_local: another thread may use the GPU meanwhile (ul3d train's data thread during validation)
        with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"),
                            cache_enabled=False), torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            static_out = self.net(static_in)
        return static_in, graph, static_out


class InferenceCopy(nn.Module):
    """An inference copy of a network that is being trained: BatchNorm folded, the fast paths of :func:`accelerate`,
    and on CUDA the forward replayed as CUDA graphs (:class:`CUDAGraphInference`).

    :meth:`refresh` folds the live network's current parameters and running statistics again and writes the result
    into the copy's own tensors in place, so the graphs captured at the first validation stay valid for every later one
    (a fresh copy per validation would capture them again). ``ul3d train`` validates through one of these when it
    trains with CUDA graphs. The live network is not a submodule: ``state_dict()`` and ``parameters()`` are the copy's.

    Args:
        live: the network in training (not modified).
        graphs: replay the forward as CUDA graphs on CUDA inputs (elsewhere the copy runs eagerly).
        fast: :func:`accelerate` options of the copy besides ``fold_bn`` (e.g. ``triton=True, fused_mkdc=False``).
    """

    def __init__(self, live: nn.Module, graphs: bool = True, **fast) -> None:
        super().__init__()
        self._live = [live]  # a list: not registered as a submodule
        self._fast = dict(fast, fold_bn=True)
        self.net = accelerate(live, **self._fast)
        self.graphs = CUDAGraphInference(self.net) if graphs else None

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the live network's current weights, folded, into this copy (same tensors: graphs stay valid)."""
        fresh = accelerate(self._live[0], **self._fast).state_dict()
        mine = self.net.state_dict(keep_vars=True)
        if list(fresh) != list(mine):
            raise RuntimeError("InferenceCopy.refresh: the live network's structure changed since the copy was made")
        for key, dst in mine.items():
            dst.copy_(fresh[key])
        for m in self.net.modules():  # the kernels' prepared weights too, in place (graphs read them)
            if hasattr(m, "refresh_kernel_cache"):
                m.refresh_kernel_cache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graphs(x) if self.graphs is not None else self.net(x)
