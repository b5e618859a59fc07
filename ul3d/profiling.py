"""Model profiling: parameters, MACs in two conventions, and a forward-activation estimate.

* **conv MACs** ("true" MACs): multiply-accumulates of every convolution and matrix product, from
  ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2). Norms, activations and element-wise ops
  are not counted.
* **paper MACs**: the convention each paper's "#FLOPs" column was computed with, reproduced from
  module forward hooks (see ``docs/architecture.md``):

  - ``"ptflops"`` (UltraLightUNet; also used for MONAI's networks): ptflops' module hooks with
    functional ops not counted — conv ``out_elements·k·C_in/groups`` plus ``out_elements`` for a bias;
    norm layers ``numel`` (×2 when affine); ReLU-family activation modules ``numel``; adaptive
    pooling and linear layers. The released code applies max-pooling and interpolation as functions,
    so resampling is not counted.
  - ``"thop"`` (AULUNet): thop's rules — conv ``out_elements·k·C_in/groups``; norm layers
    ``2·numel`` (×2 when affine); average pooling one op per output, adaptive average pooling
    ``(window + 1)`` per output; activations and resampling 0.

* **activation memory**: bytes of every leaf module's output in one forward pass at batch 1, an
  estimate of what autograd keeps for the backward pass (element-wise ops inside ``forward``
  methods are not seen, so it is a lower bound for the released-style blocks).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .networks.blocks.attention import GlobalMaxPool

__all__ = ["ModelProfile", "count_parameters", "conv_macs", "paper_macs", "activation_bytes", "profile_model"]

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_ACTS = (nn.ReLU, nn.ReLU6, nn.PReLU, nn.ELU, nn.LeakyReLU)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of (unique) parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _run(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model(x)


def conv_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of all convolutions and matrix products in one forward pass of ``x``."""
    counter = FlopCounterMode(display=False)
    with counter:
        _run(model, x)
    return counter.get_total_flops() // 2


def _norm_affine(m: nn.Module) -> bool:
    return bool(getattr(m, "affine", False) or getattr(m, "elementwise_affine", False))


def _conv_rule(m: nn.modules.conv._ConvNd, inp: torch.Tensor, out: torch.Tensor, bias: bool) -> int:
    k = math.prod(m.kernel_size)
    if m.transposed:  # ptflops/thop count transposed convs over the input positions
        positions = inp.shape[0] * math.prod(inp.shape[2:])
    else:
        positions = out.shape[0] * math.prod(out.shape[2:])
    macs = positions * k * m.in_channels * (m.out_channels // m.groups)
    if bias and m.bias is not None:
        macs += positions * m.out_channels
    return macs


def _ptflops_rule(m: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    if isinstance(m, nn.modules.conv._ConvNd):
        return _conv_rule(m, inp, out, bias=True)
    if isinstance(m, _NORMS):
        return inp.numel() * (2 if _norm_affine(m) else 1)
    if isinstance(m, _ACTS):
        return out.numel()
    if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                      nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, GlobalMaxPool)):
        return inp.numel()
    if isinstance(m, nn.Linear):
        return out.numel() // m.out_features * m.in_features * m.out_features + (out.numel() if m.bias is not None else 0)
    return 0


def _thop_rule(m: nn.Module, inp: torch.Tensor, out: torch.Tensor) -> int:
    if isinstance(m, nn.modules.conv._ConvNd):
        return _conv_rule(m, inp, out, bias=False)
    if isinstance(m, _NORMS):
        return 2 * inp.numel() * (2 if _norm_affine(m) else 1)
    if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        return out.numel()
    if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
        window = math.prod(i // o for i, o in zip(inp.shape[2:], out.shape[2:]))
        return (window + 1) * out.numel()
    if isinstance(m, nn.Linear):
        return out.numel() // m.out_features * m.in_features * m.out_features
    return 0


_RULES = {"ptflops": _ptflops_rule, "thop": _thop_rule}


def _first_tensor(value) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (list, tuple)):
        for v in value:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def _hooked_sum(model: nn.Module, x: torch.Tensor, per_module) -> int:
    total = [0]

    def hook(m, inputs, output):
        inp, out = _first_tensor(inputs), _first_tensor(output)
        if inp is not None and out is not None:
            total[0] += int(per_module(m, inp, out))

    handles = [m.register_forward_hook(hook) for m in model.modules() if len(list(m.children())) == 0]
    try:
        _run(model, x)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def paper_macs(model: nn.Module, x: torch.Tensor, convention: str | None = None) -> int:
    """MACs of one forward pass of ``x`` in a paper's counting convention (module docstring).

    Args:
        model: the network.
        x: an input batch.
        convention: ``"ptflops"`` or ``"thop"``; defaults to the model's ``paper_flops_convention``
            attribute, else ``"ptflops"``.
    """
    convention = convention or getattr(model, "paper_flops_convention", "ptflops")
    if convention not in _RULES:
        raise ValueError(f"Unknown MAC convention {convention!r}; choose from {sorted(_RULES)}.")
    return _hooked_sum(model, x, _RULES[convention])


def activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of all leaf-module outputs in one forward pass of ``x``."""
    return _hooked_sum(model, x, lambda m, i, o: o.numel() * o.element_size())


@dataclass
class ModelProfile:
    name: str
    params: int
    conv_macs: int
    paper_macs: int
    convention: str
    activation_bytes: int
    input_shape: tuple[int, ...]

    def as_dict(self) -> dict:
        return asdict(self)


def profile_model(name: str, model: nn.Module, input_shape: Sequence[int], device: str | torch.device = "meta") -> ModelProfile:
    """Profile ``model`` on one input of ``input_shape`` (batch included).

    Counting needs only shapes, so it runs on the ``"meta"`` device by default (no memory, no
    arithmetic); networks whose forward needs real values fall back to the CPU.
    """
    model = model.eval()
    convention = getattr(model, "paper_flops_convention", "ptflops")
    params = count_parameters(model)

    def measure(dev: torch.device | str):
        m = model.to(dev)
        x = torch.zeros(tuple(input_shape), device=dev)
        return conv_macs(m, x), paper_macs(m, x, convention), activation_bytes(m, x)

    try:
        cm, pm, ab = measure(device)
    except Exception:
        if str(device) != "meta":
            raise
        model = model.to_empty(device="cpu")
        cm, pm, ab = measure("cpu")
    return ModelProfile(name, params, cm, pm, convention, ab, tuple(int(s) for s in input_shape))


def _all_specs() -> list[str]:
    from .networks import list_networks
    from .networks.peers import MONAI_PEERS

    specs = [f"{name}:{v}" for name, variants in list_networks().items() for v in variants]
    return specs + list(MONAI_PEERS)


def build_for_profile(spec: str, spatial_dims: int, roi: Sequence[int], in_channels: int, out_channels: int) -> nn.Module:
    """A ul3d network (``NAME[:VARIANT]``) or a MONAI peer (``unet``, ``swinunetr``, ...)."""
    from .networks import get_network, list_networks
    from .networks.peers import MONAI_PEERS, get_peer

    name, variant = spec.partition(":")[0].lower(), spec.partition(":")[2] or None
    if name in list_networks():
        return get_network(name, variant, spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels)
    if name.removeprefix("monai.") in MONAI_PEERS:
        return get_peer(name, spatial_dims, in_channels, out_channels, roi)
    raise ValueError(f"unknown network {spec!r}; ul3d: {sorted(list_networks())}, MONAI: {sorted(MONAI_PEERS)}")


def profile_table(
    specs: Sequence[str] | None,
    spatial_dims: int,
    roi: Sequence[int],
    in_channels: int,
    out_channels: int,
    batch: int = 1,
) -> list[ModelProfile]:
    """Profile every network in ``specs`` (all ul3d variants and MONAI peers when empty) at one setting."""
    rows = []
    for spec in specs or _all_specs():
        model = build_for_profile(spec, spatial_dims, roi, in_channels, out_channels)
        rows.append(profile_model(spec, model, (batch, in_channels, *roi)))
    return rows


def format_table(rows: Sequence[ModelProfile]) -> str:
    """A markdown table of profiles."""
    shape = "×".join(str(s) for s in rows[0].input_shape[1:]) if rows else ""
    lines = [
        f"input {shape} (batch {rows[0].input_shape[0]})" if rows else "",
        "",
        "| network | params | conv GMACs | paper GMACs | convention | activations MiB (fp32) |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.params:,} | {r.conv_macs / 1e9:.3f} | {r.paper_macs / 1e9:.3f} | {r.convention} "
            f"| {r.activation_bytes / 2**20:,.1f} |"
        )
    return "\n".join(lines)
