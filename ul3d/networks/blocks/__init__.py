"""Paper blocks, one small module each; every block takes ``spatial_dims`` first."""

from .attention import (
    CMFA,
    GAG,
    MKIRA,
    AttentionGate,
    ChannelAttention,
    ConvolutionalMultiFocalAttention,
    GroupedAttentionGate,
    MultiKernelInvertedResidualAttention,
    SpatialAttention,
)
from .aulunet import AKF, LSG, RGF, AdaptiveKernelFusion, LightSkipGate, PointConv, ResidualGlobalFusion
from .multikernel import MKDC, MKIR, ChannelShuffle, InvertedResidual, MultiKernelDepthwiseConv, MultiKernelInvertedResidual

__all__ = [
    "AKF", "LSG", "RGF", "CMFA", "GAG", "MKDC", "MKIR", "MKIRA", "AttentionGate", "AdaptiveKernelFusion",
    "ChannelAttention", "ChannelShuffle", "ConvolutionalMultiFocalAttention", "GroupedAttentionGate",
    "InvertedResidual", "LightSkipGate", "MultiKernelDepthwiseConv", "MultiKernelInvertedResidual",
    "MultiKernelInvertedResidualAttention", "PointConv", "ResidualGlobalFusion", "SpatialAttention",
]
