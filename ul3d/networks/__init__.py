"""ul3d networks: UltraLightUNet (2D/3D, T–L) and AULUNet, their blocks, and a registry."""

from . import blocks
from .nets import AULUNET_VARIANTS, ULTRALIGHTUNET_VARIANTS, AULUNet, UltraLightUNet
from .registry import build_network, get_network, list_networks, parse_network_spec, register_network

UltraLightUNet3D = UltraLightUNet  # the 3D network is the same class at spatial_dims=3

__all__ = [
    "blocks", "AULUNet", "AULUNET_VARIANTS", "UltraLightUNet", "UltraLightUNet3D", "ULTRALIGHTUNET_VARIANTS",
    "build_network", "get_network", "list_networks", "parse_network_spec", "register_network",
]
