"""UltraLightUNet and UltraLightUNet3D (Rahman et al., ICLR 2025 submission, §3.5, Fig. 2a)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Pool
from torch import nn

from ..blocks import CMFA, GAG, MKIR, MKIRA, InvertedResidual, SpatialAttention
from ..blocks.multikernel import accumulate
from ..depthwise import max_pool_2x
from ._lean import max_pool_keeping_indices, upsample_relu, upsample_relu_head
from ._utils import as_tuple, check_input, checkpointed, init_normal_, interpolate_mode

__all__ = ["UltraLightUNet", "ULTRALIGHTUNET_VARIANTS", "EncoderStage", "DecoderStage"]

#: Stage widths of the named variants (paper Tables 9 and 10; the 3D variants use the same widths).
ULTRALIGHTUNET_VARIANTS: dict[str, tuple[int, ...]] = {
    "T": (4, 8, 16, 24, 32),
    "S": (8, 16, 32, 48, 80),
    "base": (16, 32, 64, 96, 160),
    "M": (32, 64, 128, 192, 320),
    "L": (64, 128, 256, 384, 512),
}


def _lean(block: nn.Module):
    """The block's ``forward_lean`` (MKIR, IRB, MKIRA: less kept for backward in training), else the block."""
    return getattr(block, "forward_lean", block)


def _pooled(stage: nn.Module, pool: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return max_pool_keeping_indices(stage(x, lean=True), pool)


class EncoderStage(nn.Module):
    """One encoder stage: an MKIR (or IRB) and, for the Table 7 ablation, a CMFA after it.

    The max-pooling that follows each stage lives in the network.
    """

    def __init__(self, block: nn.Module, attention: nn.Module | None = None) -> None:
        super().__init__()
        self.block = block
        self.attention = attention if attention is not None else nn.Identity()

    @torch.jit.unused
    def forward_pooled(self, x: torch.Tensor, pool: nn.Module, triton: bool = False) -> torch.Tensor:
        """``pool(self(x))``, through the block's ``forward_pooled`` when there is no attention after it (``triton``:
        its Triton inference kernels, see :meth:`~ul3d.networks.blocks.MKIR.forward_pooled`)."""
        if isinstance(self.attention, nn.Identity) and hasattr(self.block, "forward_pooled"):
            return self.block.forward_pooled(x, pool, triton)
        return max_pool_2x(self(x), pool) if triton else pool(self(x))

    def forward(self, x: torch.Tensor, lean: bool = False) -> torch.Tensor:
        """``lean``: the block's :meth:`~ul3d.networks.blocks.MKIR.forward_lean` (``use_checkpoint``: less memory)."""
        if lean and not torch.jit.is_scripting():
            return self.attention(_lean(self.block)(x))
        return self.attention(self.block(x))


class DecoderStage(nn.Module):
    """One decoder stage: MKIRA (or MKIR) -> (multi)linear upsampling to ``size`` -> ReLU -> skip merge.

    The skip is merged by addition, through a gate when one is given: ``x + gate(g=x, x=skip)``.

    Args:
        block: the MKIRA (or plain MKIR/IRB for the "without MKIRA" ablation).
        spatial_dims: 2 or 3.
        gate: GAG/AG applied to the skip, or None to add the skip as it is.
        upsample_relu: apply ReLU after upsampling (released code; not among the paper's blocks).
        align_corners: interpolation setting. Defaults to False (released code).
    """

    def __init__(
        self,
        block: nn.Module,
        spatial_dims: int,
        gate: nn.Module | None = None,
        upsample_relu: bool = True,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        self.block = block
        self.gate = gate
        self.mode = interpolate_mode(spatial_dims)
        self.upsample_relu = upsample_relu
        self.align_corners = align_corners
        # ``inplace`` (``accelerate(inplace=True)``, inference): ReLU and skip sum overwrite the upsampled tensor
        # when autograd is off
        self.inplace = False
        # ``triton`` (``accelerate(triton=True)``): upsampling and ReLU as one Triton kernel where Triton runs
        # (:func:`~ul3d.networks.depthwise.linear_upsample`; PyTorch's CUDA upsampling is slow on the decoder's small
        # volumes); in training only a 2× upsampling, with its gradient kernel (PyTorch's scatters with atomics)
        self.triton = False

    def forward(self, x: torch.Tensor, size: list[int], skip: Optional[torch.Tensor] = None, lean: bool = False
                ) -> torch.Tensor:
        """``lean``: the block's ``forward_lean`` (``use_checkpoint``: less kept for backward)."""
        if lean and not torch.jit.is_scripting():
            x = _lean(self.block)(x)
        else:
            x = self.block(x)
        inplace = self.inplace and not torch.is_grad_enabled()
        if self.triton and not torch.jit.is_scripting():  # (in training: a 2× upsampling's kernels)
            x = upsample_relu(x, size, relu=self.upsample_relu, align_corners=self.align_corners, triton=True)
        else:
            x = F.interpolate(x, size=size, mode=self.mode, align_corners=self.align_corners)
            if self.upsample_relu:
                x = torch.relu_(x) if inplace else torch.relu(x)
        if skip is not None:
            if not torch.jit.is_scripting():
                if self.triton and isinstance(self.gate, GAG):
                    return self.gate.skip_sum(x, skip, inplace)  # (GATE_KERNEL: the gate's kernels where they run)
            x = accumulate(x, self.gate(x, skip) if self.gate is not None else skip, inplace)
        return x


class UltraLightUNet(nn.Module):
    """UltraLightUNet (2D) and UltraLightUNet3D (3D): one class, ``spatial_dims`` selects the dimension.

    Encoder: five stages, each an :class:`~ul3d.networks.blocks.MKIR` (stride 1) followed by 2× max
    pooling (so the bottleneck is at 1/32). Decoder: five stages, each an
    :class:`~ul3d.networks.blocks.MKIRA` (Eq. 5) at the low resolution, (multi)linear upsampling
    ×2, then the skip from the encoder added through a :class:`~ul3d.networks.blocks.GAG` (Eq. 6);
    the last stage returns to full resolution and has no skip. A 1×1 segmentation head gives
    logits (apply softmax/sigmoid outside, as MONAI's losses expect).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels, used as they are (1 for CT/T1, 2 for prostate T2+ADC).
        out_channels: number of classes (logit channels).
        channels: stage widths ``C_1..C_5``. Defaults to the base variant ``(16, 32, 64, 96, 160)``;
            named variants are in :data:`ULTRALIGHTUNET_VARIANTS`.
        kernels: MKDC kernel sizes (Table 5). Defaults to ``(1, 3, 5)``.
        expansion: MKIR expansion factor. Defaults to 2.
        reductions: channel-attention ratio of each decoder stage. Defaults to ``(16, 16, 16, 8, 4)``.
        spatial_kernel: spatial-attention kernel. Defaults to 7.
        gate_kernel: GAG kernel. Defaults to 3.
        norm: normalisation everywhere: ``"batch"`` (default, as the paper) or ``"instance"``
            (often preferable in 3D at batch size 1–2), or a MONAI ``(name, kwargs)`` tuple.
        act: activation inside MKIR/MKDC. Defaults to ReLU6.
        block: ``"mkir"`` (default) or ``"irb"`` — MobileNetV2's inverted residual (Table 6).
        encoder_attention: add a CMFA after each encoder MKIR (Table 7, "MKIRA in the encoder").
        decoder_attention: CMFA before each decoder MKIR, i.e. MKIRA (default); False is Table 4's
            "without MKIRA".
        skip_gate: ``"gag"`` (default), ``"ag"`` (Oktay's attention gate, Table 8) or None (skips
            added as they are; Table 4's "without GAG").
        share_spatial_attention: one spatial-attention conv shared by all decoder stages, as in the
            released code (default). False gives each CMFA its own, as drawn in Fig. 2b.
        shortcut: MKIR shortcut, see :class:`~ul3d.networks.blocks.MKIR`. Defaults to ``"projection"``.
        upsample_relu: ReLU after each decoder upsampling (released code). Defaults to True.
        deep_supervision: add the released code's three auxiliary heads (on the outputs of decoder
            stages 2–4). In training mode the network then returns a list ``[final, aux_1, ...]``,
            every map upsampled to the input size; in eval mode only the final map. Defaults to
            False: the paper optimises only the final map.
        deep_supr_num: number of auxiliary heads. Defaults to 3 (released code).
        init: ``"normal"`` (released code: blocks' convs N(0, 0.02), heads left at PyTorch's
            default) or ``"default"`` (PyTorch's default everywhere).
        use_checkpoint: in training, keep only each encoder and decoder stage's inputs for backward and recompute
            the stage there (activation checkpointing, as MONAI's SwinUNETR ``use_checkpoint``): the same function
            and gradients with much less activation memory, for about one more forward pass per step. BatchNorm
            running statistics are updated once per step. Every MKIR then keeps less for backward
            (:meth:`~ul3d.networks.blocks.MKIR.forward_lean`: BatchNorm + ReLU6 keep only their input; the first stage
            merges project, BatchNorm and shortcut into one conv), and the last stage's full-resolution upsampling, ReLU and the
            head then run one slab of rows at a time, each slab checkpointed
            (:func:`~ul3d.networks.nets._lean.upsample_relu_head`), so no full-resolution feature map is kept
            (without deep supervision), and max-pooling keeps only its indices for backward. Defaults to False.

    Note:
        Where paper and released code differ (see ``docs/architecture.md``), the default follows
        the released code whenever the paper's parameter/FLOP counts only match it: projection
        shortcuts, the shared spatial-attention conv, ReLU after upsampling. The released code
        silently repeats a 1-channel input to 3 channels; this class never does. Inputs of any
        size work: pooling uses ``ceil_mode`` and every upsampling goes to the skip's exact size,
        so the output always has the input's spatial size (sizes ≥ 32 per axis are recommended).

    Examples::

        # 2D, base variant, RGB input, binary output
        net = UltraLightUNet(2, in_channels=3, out_channels=1)
        # 3D-M for prostate T2 + ADC, 3 classes
        net = UltraLightUNet(3, 2, 3, channels=ULTRALIGHTUNET_VARIANTS["M"], norm="instance")
    """

    #: how the paper counted its "#FLOPs" (see :func:`ul3d.profiling.paper_macs`)
    paper_flops_convention = "ptflops"

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int] = (16, 32, 64, 96, 160),
        kernels: Sequence[int] = (1, 3, 5),
        expansion: int = 2,
        reductions: Sequence[int] | int = (16, 16, 16, 8, 4),
        spatial_kernel: int = 7,
        gate_kernel: int = 3,
        norm: str | tuple = "batch",
        act: str | tuple = "relu6",
        block: str = "mkir",
        encoder_attention: bool = False,
        decoder_attention: bool = True,
        skip_gate: str | None = "gag",
        share_spatial_attention: bool = True,
        shortcut: str = "projection",
        upsample_relu: bool = True,
        deep_supervision: bool = False,
        deep_supr_num: int = 3,
        init: str = "normal",
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"UltraLightUNet: spatial_dims must be 2 or 3, got {spatial_dims}.")
        channels = tuple(int(c) for c in channels)
        n = len(channels)
        if n < 2:
            raise ValueError(f"UltraLightUNet: channels needs at least 2 stage widths, got {channels}.")
        reductions = as_tuple(reductions, n, "reductions")
        if block not in ("mkir", "irb"):
            raise ValueError(f"UltraLightUNet: block must be 'mkir' or 'irb', got {block!r}.")
        if skip_gate not in ("gag", "ag", None):
            raise ValueError(f"UltraLightUNet: skip_gate must be 'gag', 'ag' or None, got {skip_gate!r}.")
        if deep_supervision and not 1 <= deep_supr_num <= n - 1:
            raise ValueError(f"UltraLightUNet: deep_supr_num must be in [1, {n - 1}], got {deep_supr_num}.")
        if init not in ("normal", "default"):
            raise ValueError(f"UltraLightUNet: init must be 'normal' or 'default', got {init!r}.")

        self.spatial_dims = spatial_dims
        self._name = f"{type(self).__name__}({spatial_dims}D)"
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = channels
        self.deep_supervision = deep_supervision
        self.use_checkpoint = bool(use_checkpoint)
        # ``slab_head`` (``ul3d.networks.fast.accelerate(merge_pointwise=True)``, inference with autograd off): the last
        # stage's upsampling, ReLU and head run slab by slab (:func:`~ul3d.networks.nets._lean.upsample_relu_head`),
        # and the encoder stages pool through their block's ``forward_pooled`` (the stem: pooled two slices at a time)
        self.slab_head = False
        # ``triton_kernels`` (``accelerate(triton=True)``, inference with autograd off): where Triton runs, the last
        # stage's upsampling, ReLU and head as one Triton kernel
        # (:func:`~ul3d.networks.depthwise.upsample_relu_pointwise`; elsewhere the plain modules), the first stage and
        # its pooling as another (:func:`~ul3d.networks.depthwise.pooled_stem`) and the other max-poolings without
        # indices (:func:`~ul3d.networks.depthwise.max_pool_2x`)
        self.triton_kernels = False
        self._mode = interpolate_mode(spatial_dims)

        def make_block(cin: int, cout: int) -> nn.Module:
            common = dict(expansion=expansion, norm=norm, act=act, shortcut=shortcut)
            if block == "irb":
                return InvertedResidual(spatial_dims, cin, cout, **common)
            return MKIR(spatial_dims, cin, cout, kernels=kernels, **common)

        # encoder: MKIR (+ CMFA for Table 7) then max-pool, five times
        widths_in = (in_channels,) + channels[:-1]
        self.encoder = nn.ModuleList(
            EncoderStage(
                make_block(cin, cout),
                CMFA(spatial_dims, cout, 16, spatial_kernel) if encoder_attention else None,
            )
            for cin, cout in zip(widths_in, channels)
        )
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=2, stride=2, ceil_mode=True)

        # decoder: widths C_n -> C_{n-1} -> ... -> C_1 -> C_1
        dec_in = channels[::-1]
        dec_out = channels[-2::-1] + (channels[0],)
        shared_sa = SpatialAttention(spatial_dims, spatial_kernel) if decoder_attention and share_spatial_attention else None
        stages = []
        for i, (cin, cout) in enumerate(zip(dec_in, dec_out)):
            if decoder_attention:
                stage_block: nn.Module = MKIRA(
                    spatial_dims, cin, cout, reductions[i], spatial_kernel, spatial_attention=shared_sa,
                    block=make_block(cin, cout),
                )
            else:
                stage_block = make_block(cin, cout)
            gate = None
            if i < n - 1 and skip_gate is not None:
                gk, groups = (gate_kernel, None) if skip_gate == "gag" else (1, 1)
                gate = GAG(spatial_dims, cout, cout, kernel_size=gk, groups=groups, norm=norm)
            stages.append(DecoderStage(stage_block, spatial_dims, gate, upsample_relu))
        self.decoder = nn.ModuleList(stages)

        conv = Conv[Conv.CONV, spatial_dims]
        if init == "normal":
            init_normal_(self)
        self.head = conv(channels[0], out_channels, kernel_size=1)
        self.aux_heads = nn.ModuleList(
            conv(dec_out[i], out_channels, kernel_size=1) for i in range(n - 1 - deep_supr_num, n - 1)
        ) if deep_supervision else nn.ModuleList()

    #: elements of one upsampled slab with ``slab_head`` (4 MiB in float32: it stays in a CPU core's cache; 2-core CPU,
    #: 4 × 16 × 48³ → 96³: 62.6 → 39.5 ms against the full-volume upsampling, ReLU and head)
    SLAB_ELEMENTS = 1 << 20

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, list[torch.Tensor]]:
        check_input(x, self.spatial_dims, self.in_channels, self._name)
        size = list(x.shape[2:])
        ckpt = self.use_checkpoint and self.training and torch.is_grad_enabled()
        skips: list[torch.Tensor] = []
        for stage in self.encoder:
            if ckpt and not torch.jit.is_scripting():
                x = checkpointed(stage, _pooled, stage, self.pool, x)
            elif self.slab_head and not torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = stage.forward_pooled(x, self.pool)
            elif self.triton_kernels and not torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = stage.forward_pooled(x, self.pool, triton=True)
            else:
                x = self.pool(stage(x))
            skips.append(x)
        n = len(self.decoder)
        supervise = self.deep_supervision and self.training
        features: list[torch.Tensor] = []
        for i, stage in enumerate(self.decoder):
            skip: Optional[torch.Tensor] = skips[n - 2 - i] if i < n - 1 else None
            stage_size = list(skip.shape[2:]) if skip is not None else size
            if ckpt and skip is None and not supervise and not torch.jit.is_scripting():
                # the last stage: block checkpointed, then upsampling + ReLU + head slab by slab
                x = checkpointed(stage, _lean(stage.block), x)
                return upsample_relu_head(x, size, self.head, relu=stage.upsample_relu,
                                          align_corners=stage.align_corners, checkpointed=True)
            if (self.slab_head or self.triton_kernels) and skip is None and not supervise \
                    and not torch.is_grad_enabled() and not torch.jit.is_scripting():
                return upsample_relu_head(stage.block(x), size, self.head, relu=stage.upsample_relu,
                                          align_corners=stage.align_corners, slab_elements=self.SLAB_ELEMENTS,
                                          triton=self.triton_kernels)
            if ckpt and not torch.jit.is_scripting():
                x = checkpointed(stage, stage, x, stage_size, skip, True)
            else:
                x = stage(x, stage_size, skip)
            if supervise:
                features.append(x)
        out = self.head(x)
        if not supervise:
            return out
        # auxiliary heads read the outputs of the decoder stages just before the last one
        first = n - 1 - len(self.aux_heads)
        outputs = [out]
        for j, aux_head in enumerate(self.aux_heads):
            aux = F.interpolate(aux_head(features[first + j]), size=size, mode=self._mode, align_corners=False)
            outputs.insert(1, aux)  # highest resolution first, as MONAI's DynUNet orders them
        return outputs
