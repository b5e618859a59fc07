"""Name -> network registry: ``get_network("ultralightunet", variant="M", spatial_dims=3, ...)``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .nets import AULUNET_VARIANTS, ULTRALIGHTUNET_VARIANTS, AULUNet, UltraLightUNet

__all__ = ["build_network", "get_network", "list_networks", "register_network", "parse_network_spec"]


@dataclass(frozen=True)
class _Entry:
    cls: Callable[..., nn.Module]
    variants: dict[str, tuple[int, ...]]
    default: str


_REGISTRY: dict[str, _Entry] = {}


def register_network(name: str, cls: Callable[..., nn.Module], variants: dict[str, tuple[int, ...]], default: str) -> None:
    """Register a network class whose named variants differ by their ``channels`` argument."""
    _REGISTRY[name.lower()] = _Entry(cls, dict(variants), default)


register_network("ultralightunet", UltraLightUNet, ULTRALIGHTUNET_VARIANTS, "base")
register_network("aulunet", AULUNet, AULUNET_VARIANTS, "base")


def list_networks() -> dict[str, list[str]]:
    """Registered network names and, for each, its variant names."""
    return {name: list(entry.variants) for name, entry in _REGISTRY.items()}


def parse_network_spec(spec: str) -> tuple[str, str | None]:
    """Split ``"NAME[:VARIANT]"`` into its parts."""
    name, _, variant = spec.partition(":")
    return name.strip().lower(), (variant.strip() or None)


def get_network(
    name: str,
    variant: str | None = None,
    spatial_dims: int = 3,
    in_channels: int = 1,
    out_channels: int = 2,
    **kwargs,
) -> nn.Module:
    """Build a registered network.

    Args:
        name: ``"ultralightunet"`` or ``"aulunet"`` (see :func:`list_networks`); ``"NAME:VARIANT"``
            is accepted too.
        variant: a variant name (``T``, ``S``, ``base``, ``M``, ``L`` for UltraLightUNet; matched
            case-insensitively). Defaults to the network's default variant. Ignored when
            ``channels`` is given in ``kwargs``.
        spatial_dims: 2 or 3. Defaults to 3.
        in_channels: input channels. Defaults to 1.
        out_channels: output classes. Defaults to 2.
        **kwargs: any other argument of the network class (norm, kernels, skip_gate, ...).
    """
    if ":" in name:
        name, spec_variant = parse_network_spec(name)
        variant = variant or spec_variant
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"Unknown network {name!r}; available: {sorted(_REGISTRY)}.")
    entry = _REGISTRY[key]
    if "channels" not in kwargs:
        chosen = variant or entry.default
        lookup = {v.lower(): v for v in entry.variants}
        if chosen.lower() not in lookup:
            raise ValueError(f"Unknown variant {chosen!r} of {key!r}; available: {list(entry.variants)}.")
        kwargs["channels"] = entry.variants[lookup[chosen.lower()]]
    return entry.cls(spatial_dims, in_channels, out_channels, **kwargs)


def build_network(
    name: str,
    variant: str | None = None,
    spatial_dims: int = 3,
    in_channels: int = 1,
    out_channels: int = 2,
    roi_size=None,
    **kwargs,
) -> nn.Module:
    """A ul3d network (:func:`get_network`) or one of MONAI's comparison networks
    (:data:`ul3d.networks.peers.MONAI_PEERS`: ``unet``, ``segresnet``, ``swinunetr``, ``unetr``, ``dynunet``,
    which need ``roi_size`` only for UNETR and take no extra arguments)."""
    from .peers import MONAI_PEERS, get_peer

    key = parse_network_spec(name)[0]
    if key in _REGISTRY:
        return get_network(name, variant, spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs)
    if key.removeprefix("monai.") in MONAI_PEERS:
        return get_peer(key, spatial_dims, in_channels, out_channels, roi_size or (96,) * spatial_dims)
    raise ValueError(f"Unknown network {name!r}; ul3d: {sorted(_REGISTRY)}, MONAI: {sorted(MONAI_PEERS)}.")
