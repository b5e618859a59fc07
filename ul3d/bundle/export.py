"""Write a MONAI bundle folder from a template and (optionally) a trained ul3d checkpoint, and check it.

``ul3d export-bundle --checkpoint CKPT --template prostate|feta|btcv|colin27_aal|custom --out DIR`` calls
:func:`export_bundle`: configs, metadata, model card and licence from the template; ``models/model.pt`` (the
network's state dict), ``models/model.ts`` (MONAI's ``ckpt_export``) and ``models/model.onnx`` from the checkpoint.
The folder is assembled beside ``DIR`` and renamed into place only after :func:`check_bundle` passes.
"""

from __future__ import annotations

import datetime as _dt
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import get
from ..data.datasets import BTCV_8ORGAN_LABEL_MAP, BTCV_CLASSES
from .metadata import metadata_errors
from .templates import (
    LOGGING_CONF,
    btcv_13organ_overlay,
    evaluate_config,
    inference_config,
    load_template,
    multi_gpu_config,
    run_config,
    train_config,
)

__all__ = ["BundleError", "write_bundle", "export_bundle", "export_models", "check_bundle", "build_metadata",
           "metrics_from_summary", "BUNDLE_VERSION"]

BUNDLE_VERSION = "0.1.0"


class BundleError(ValueError):
    """A bundle could not be written or does not pass its checks; the message lists every problem."""


def _label_map(config: dict) -> dict[int, int] | None:
    if get(config, "data.layout") == "btcv" and get(config, "data.protocol") == "8organ":
        return dict(BTCV_8ORGAN_LABEL_MAP)
    return None


def _versions() -> dict[str, Any]:
    import monai

    return {
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {name: _version_of(name) for name in
                                      ("ul3d", "nibabel", "SimpleITK", "pytorch-ignite", "tensorboard")},
    }


def _version_of(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "n/a"


def build_metadata(template: dict, config: dict, net_spec: dict, class_names: list[str], channel_names: list[str],
                   eval_metrics: dict[str, float] | None = None, changelog: dict[str, str] | None = None) -> dict:
    """``configs/metadata.json``: the MONAI bundle specification's mandatory keys plus changelog, references,
    ``network_data_format`` with channel and class definitions, and ``eval_metrics`` when measured."""
    roi = [int(s) for s in (get(config, "infer.roi_size") or get(config, "train.roi_size"))]
    variant = net_spec.get("variant") or ("base" if net_spec["name"] in ("ultralightunet", "aulunet") else "")
    name = {"ultralightunet": "UltraLightUNet3D", "aulunet": "AULUNet"}.get(net_spec["name"], net_spec["name"])
    meta = {
        "schema": "ul3d/bundle/schema/metadata.schema.json",
        "version": BUNDLE_VERSION,
        "changelog": changelog or {BUNDLE_VERSION: "first release: configs, model card; weights where trained"},
        **_versions(),
        "name": template["bundle"],
        "task": template["task"],
        "description": " ".join(str(template["description"]).split()),
        "authors": "ul3d developers",
        "copyright": f"Copyright (c) {_dt.date.today().year} ul3d developers",
        "network": f"{name} {variant}".strip(),
        "data_source": template["data_source"],
        "data_type": template["data_type"],
        "intended_use": "Research only; not for clinical or diagnostic use.",
        "image_classes": f"{len(channel_names)} channel(s): {', '.join(channel_names)}, z-scored or windowed as in train.json",
        "label_classes": ", ".join(f"{i}: {c}" for i, c in enumerate(class_names)),
        "pred_classes": f"{len(class_names)} channels of logits, one per class; the argmax is the label",
        "references": [
            "Rahman M.M., Munir M., Jha D., Bagci U., Marculescu R. UltraLightUNet: Rethinking U-shaped Network "
            "with Multi-kernel Lightweight Convolutions for Medical Image Segmentation. ICLR 2025 submission.",
            "Cardoso M.J. et al. MONAI: An open-source framework for deep learning in healthcare. arXiv:2211.02701 (2022).",
        ],
        "network_data_format": {
            "inputs": {"image": {
                "type": "image", "format": template.get("image_format", "magnitude"), "modality": template["modality"],
                "num_channels": len(channel_names), "spatial_shape": roi, "dtype": "float32", "value_range": [],
                "is_patch_data": True, "channel_def": {str(i): c for i, c in enumerate(channel_names)},
            }},
            "outputs": {"pred": {
                "type": "image", "format": "labels", "num_channels": len(class_names), "spatial_shape": roi,
                "dtype": "float32", "value_range": [], "is_patch_data": True,
                "channel_def": {str(i): c for i, c in enumerate(class_names)},
            }},
        },
    }
    if eval_metrics:
        meta["eval_metrics"] = {k: round(float(v), 4) for k, v in eval_metrics.items()}
    return meta


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=4) + "\n")


def write_bundle(out: str | Path, template_name: str, checkpoint: dict | None = None,
                 eval_metrics: dict[str, float] | None = None, model_card_extra: str = "") -> Path:
    """Write the bundle's configs, metadata, model card, licence and (from ``checkpoint``) ``models/model.pt`` into
    ``out`` (created; existing files are overwritten). Returns ``out``."""
    from .model_card import LICENSE_TEXT, model_card

    template = load_template(template_name)
    out = Path(out)
    if checkpoint is not None and template_name != "custom":  # the template's text must describe this model
        classes, channels = len(checkpoint["class_names"]), int(checkpoint["network_spec"]["in_channels"])
        if classes != len(template["class_names"]) or channels != len(template["channel_names"]):
            raise BundleError(
                f"the checkpoint has {channels} input channel(s) and {classes} classes; template {template_name!r} is "
                f"for {len(template['channel_names'])} ({', '.join(template['channel_names'])}) and "
                f"{len(template['class_names'])}: use --template custom")
    if checkpoint is not None:
        config = checkpoint["config"]
        net_spec = dict(checkpoint["network_spec"])
        class_names = list(checkpoint["class_names"])
        channel_names = list(checkpoint.get("channel_names") or [f"channel {i}" for i in range(net_spec["in_channels"])])
    else:
        config = run_config(template)
        class_names, channel_names = list(template["class_names"]), list(template["channel_names"])
        net_spec = {"name": get(config, "network.name", "ultralightunet"), "variant": get(config, "network.variant"),
                    "spatial_dims": 3, "in_channels": len(channel_names), "out_channels": len(class_names),
                    "kwargs": dict(get(config, "network.kwargs") or {})}
    layout, protocol = get(config, "data.layout"), get(config, "data.protocol")
    label_map = _label_map(config)
    args = (config, net_spec, template, class_names, channel_names, layout, protocol)
    configs = out / "configs"
    _write_json(configs / "train.json", train_config(*args, label_map))
    _write_json(configs / "inference.json", inference_config(*args))
    _write_json(configs / "evaluate.json", evaluate_config(*args, label_map))
    _write_json(configs / "multi_gpu_train.json", multi_gpu_config())
    if layout == "btcv" and protocol == "8organ":
        _write_json(configs / "13organ.json", btcv_13organ_overlay(BTCV_CLASSES))
    (configs / "logging.conf").write_text(LOGGING_CONF)
    meta = build_metadata(template, config, net_spec, class_names, channel_names, eval_metrics)
    _write_json(configs / "metadata.json", meta)
    (out / "models").mkdir(parents=True, exist_ok=True)
    if checkpoint is not None:
        torch.save(checkpoint["network"], out / "models" / "model.pt")
    else:
        (out / "models" / "README.md").write_text(
            "No weights are shipped with this bundle yet. `python -m monai.bundle run --config_file configs/train.json "
            "--dataset_dir DIR` writes the best model here as `model.pt` (and the full training state as "
            "`checkpoint_epoch=N.pt`); `ul3d export-bundle --checkpoint CKPT` packages a `ul3d train` checkpoint.\n")
    (out / "docs").mkdir(parents=True, exist_ok=True)
    (out / "docs" / "README.md").write_text(model_card(template_name, template, meta, config, checkpoint, model_card_extra))
    (out / "LICENSE").write_text(LICENSE_TEXT)
    return out


def _load_network(bundle: Path, weights: bool = True) -> torch.nn.Module:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    net = parser.get_parsed_content("network_def")
    if weights and (bundle / "models" / "model.pt").is_file():
        net.load_state_dict(torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True))
    return net.eval()


def export_models(bundle: str | Path, onnx: bool = True) -> dict[str, Path]:
    """``models/model.ts`` through MONAI's ``ckpt_export`` (TorchScript with the metadata and configs inside) and
    ``models/model.onnx`` (opset 17, input ``image``, output ``pred``, dynamic batch) from ``models/model.pt``."""
    from monai.bundle import ckpt_export

    from ..networks.export import export_onnx

    bundle = Path(bundle)
    models = bundle / "models"
    written = {}
    ckpt_export(net_id="network_def", filepath=str(models / "model.ts"), ckpt_file=str(models / "model.pt"),
                meta_file=str(bundle / "configs" / "metadata.json"),
                config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle))
    written["ts"] = models / "model.ts"
    if onnx and importlib.util.find_spec("onnx") is None:
        print("[ul3d export-bundle] onnx is not installed (pip install 'ul3d[onnx]'): models/model.onnx not written")
        onnx = False
    if onnx:
        net = _load_network(bundle)
        meta = json.loads((bundle / "configs" / "metadata.json").read_text())
        image = meta["network_data_format"]["inputs"]["image"]
        example = torch.randn(1, image["num_channels"], *image["spatial_shape"])
        export_onnx(net, example, models / "model.onnx")
        written["onnx"] = models / "model.onnx"
    return written


def _check_properties(bundle: Path, workflow: str, name: str, dataset_dir: str | Path | None) -> list[str]:
    """MONAI's ``ConfigWorkflow.check_properties`` (which instantiates every property: trainer, datasets, handlers).
    Without a dataset the data lists are emptied, and without weights the inference checkpoint loader is off."""
    from monai.bundle import ConfigWorkflow

    override: dict[str, Any] = {}
    if dataset_dir is not None:
        override["dataset_dir"] = str(dataset_dir)
    elif workflow == "train":
        override.update({"train#dataset#data": [], "validate#dataset#data": [], "train#dataloader#shuffle": False})
    else:
        override["datalist"] = []
    if workflow == "infer" and not (bundle / "models" / "model.pt").is_file():
        override.update({"handlers#0#_disabled_": True, "handlers#0#load_path": None})
    config = bundle / "configs" / name
    try:
        wf = ConfigWorkflow(config_file=str(config), meta_file=str(bundle / "configs" / "metadata.json"),
                            logging_file=str(bundle / "configs" / "logging.conf"), workflow_type=workflow,
                            bundle_root=str(bundle), **override)
        wf.initialize()
        missing = wf.check_properties()
    except (Exception, SystemExit) as e:
        return [f"{config}: the {workflow} workflow does not initialise: {type(e).__name__}: {_first_line(e)}"]
    return [f"{config}: check_properties() reports missing or misnamed {missing}"] if missing else []


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def check_bundle(bundle: str | Path, weights: bool = True, dataset_dir: str | Path | None = None) -> list[str]:
    """Every problem of a bundle folder (empty when it passes): layout, metadata against the schema, MONAI's
    ``check_properties`` for the train and inference workflows, ``verify_net_in_out``, and — when weights are
    present — the state dict fitting the network and TorchScript/ONNX outputs equal to the eager network's.
    ``dataset_dir``: a dataset to instantiate the workflows on (default: none, the data lists are empty)."""
    from monai.bundle import verify_net_in_out

    bundle = Path(bundle)
    problems: list[str] = []
    for rel in ("LICENSE", "configs/metadata.json", "configs/train.json", "configs/inference.json",
                "configs/evaluate.json", "configs/multi_gpu_train.json", "configs/logging.conf", "docs/README.md"):
        if not (bundle / rel).is_file():
            problems.append(f"{bundle / rel}: missing")
    if problems:
        return problems
    meta_file = bundle / "configs" / "metadata.json"
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        return [f"{meta_file}: not JSON ({e})"]
    meta_problems = [f"{meta_file}: {p}" for p in metadata_errors(meta)]
    problems += meta_problems
    for workflow, name in (("train", "train.json"), ("infer", "inference.json")):
        problems += _check_properties(bundle, workflow, name, dataset_dir)
    try:
        verify_net_in_out(net_id="network_def", meta_file=str(meta_file), config_file=str(bundle / "configs" / "inference.json"),
                          device="cpu", bundle_root=str(bundle))
    except Exception as e:
        problems.append(f"{bundle}: verify_net_in_out failed: {type(e).__name__}: {_first_line(e)}")
    model_pt = bundle / "models" / "model.pt"
    if weights and model_pt.is_file() and not meta_problems:  # the export checks read the metadata's input shape
        problems += _check_exports(bundle, meta)
    return problems


def _check_exports(bundle: Path, meta: dict) -> list[str]:
    problems = []
    try:
        net = _load_network(bundle)
    except RuntimeError as e:
        return [f"{bundle / 'models' / 'model.pt'}: does not fit network_def: {str(e).splitlines()[0]}"]
    image = meta["network_data_format"]["inputs"]["image"]
    x = torch.randn(1, image["num_channels"], *image["spatial_shape"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = net(x)
    ts_file = bundle / "models" / "model.ts"
    if ts_file.is_file():
        ts = torch.jit.load(str(ts_file), map_location="cpu")
        with torch.no_grad():
            diff = (ts(x) - ref).abs().max().item()
        if diff > 1e-4:
            problems.append(f"{ts_file}: outputs differ from the eager network by {diff:.2e} (> 1e-4)")
    onnx_file = bundle / "models" / "model.onnx"
    if onnx_file.is_file():
        try:
            import onnxruntime as ort
        except ImportError:
            return problems
        sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
        out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        diff = float(np.abs(out - ref.numpy()).max())
        if diff > 1e-4:
            problems.append(f"{onnx_file}: onnxruntime outputs differ from the eager network by {diff:.2e} (> 1e-4)")
    return problems


def metrics_from_summary(path: str | Path) -> dict[str, float]:
    """``eval_metrics`` from an nnU-Net-style ``summary.json`` (``ul3d evaluate``, the bundle's evaluate.json): the
    foreground mean Dice and HD95 (mm) and each class's mean Dice; or from ``ul3d demo``'s ``demo_summary.json``."""
    path = Path(path)
    try:
        summary = json.loads(path.read_text())
        if "held_out_mean_dice" in summary:  # ul3d demo's demo_summary.json
            metrics = {"held_out_mean_dice": float(summary["held_out_mean_dice"])}
            if summary.get("held_out_mean_hd95_mm") is not None:
                metrics["held_out_mean_hd95_mm"] = float(summary["held_out_mean_hd95_mm"])
            metrics.update({f"held_out_dice_{k}".replace(" ", "_"): float(v) for k, v in summary["held_out_dice"].items()})
            return metrics
        fg = summary["foreground_mean"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise BundleError(f"{path}: not a summary.json of ul3d evaluate ({type(e).__name__}: {e})") from None
    metrics = {"mean_dice": float(fg["Dice"])}
    if fg.get("HD95") is not None:
        metrics["mean_hd95_mm"] = float(fg["HD95"])
    names = summary.get("label_names") or {}
    for label, values in (summary.get("mean") or {}).items():
        metrics[f"dice_{names.get(str(label), label)}".replace(" ", "_")] = float(values["Dice"])
    return metrics


def export_bundle(checkpoint: str | Path | None, template: str, out: str | Path,
                  eval_metrics: dict[str, float] | None = None, onnx: bool = True, force: bool = False,
                  model_card_extra: str = "") -> Path:
    """Package a ``ul3d train`` (or cross-validation fold) checkpoint as a checked MONAI bundle at ``out``; without a
    checkpoint, the template's untrained bundle (configs, metadata, model card — train it with ``train.json``).

    Raises:
        BundleError: ``out`` exists (without ``force``) or the written bundle fails :func:`check_bundle`; nothing
            is left at ``out`` then.
    """
    from ..engine.train import load_checkpoint

    out = Path(out)
    if out.exists() and not force:
        raise BundleError(f"{out} exists; choose another --out or pass --force to replace it")
    ckpt = load_checkpoint(checkpoint) if checkpoint is not None else None
    if ckpt is not None and eval_metrics is None:
        vals = [h["val_mean_dice"] for h in ckpt.get("history", []) if "val_mean_dice" in h]
        eval_metrics = {"val_mean_dice": vals[-1]} if vals else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write_bundle(tmp, template, ckpt, eval_metrics, model_card_extra)
        if ckpt is not None:
            export_models(tmp, onnx=onnx)
        problems = check_bundle(tmp)
        if problems:
            source = f"from {checkpoint}" if checkpoint else f"from template {template!r}"
            raise BundleError(f"the bundle written {source} fails its checks:\n" + "\n".join(problems))
        shutil.rmtree(tmp / "eval", ignore_errors=True)  # TensorBoard folders made by the workflow checks
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
