"""Export networks to TorchScript and ONNX; files are written atomically."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ..utils import atomic_path

__all__ = ["to_torchscript", "export_torchscript", "export_onnx"]


def to_torchscript(model: nn.Module, example: torch.Tensor | None = None, method: str = "script") -> torch.jit.ScriptModule:
    """Script (default) or trace ``model`` in eval mode. Tracing needs ``example``."""
    model = model.eval()
    if method == "script":
        return torch.jit.script(model)
    if method == "trace":
        if example is None:
            raise ValueError("to_torchscript(method='trace') needs an example input.")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return torch.jit.trace(model, example)
    raise ValueError(f"method must be 'script' or 'trace', got {method!r}.")


def export_torchscript(
    model: nn.Module, path: str | os.PathLike, example: torch.Tensor | None = None, method: str = "script"
) -> Path:
    """Write ``model`` as a TorchScript file at ``path``."""
    ts = to_torchscript(model, example, method)
    with atomic_path(path) as tmp:
        torch.jit.save(ts, str(tmp))
    return Path(path)


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    opset: int = 17,
    dynamic_batch: bool = True,
) -> Path:
    """Write ``model`` (eval mode) as ONNX at ``path`` with input ``image`` and output ``logits``.

    Uses the TorchScript-based exporter, which is fast and exact for these networks, and the
    dynamo exporter where the former is unavailable. The spatial size is fixed to ``example``'s
    (sliding-window inference feeds fixed-size patches); the batch axis is dynamic.
    """
    if opset < 17:
        raise ValueError(f"export_onnx: opset must be >= 17, got {opset}.")
    model = model.eval()
    axes = {"image": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with atomic_path(path) as tmp, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kwargs = dict(opset_version=opset, input_names=["image"], output_names=["logits"], dynamic_axes=axes)
        try:
            torch.onnx.export(model, (example,), str(tmp), dynamo=False, **kwargs)
        except (TypeError, RuntimeError, NotImplementedError):
            torch.onnx.export(model, (example,), str(tmp), dynamo=True, **kwargs)
    return Path(path)
