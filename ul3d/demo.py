"""``ul3d demo``: train UltraLightUNet3D on real anatomy (Colin27 T1 + AAL) and evaluate it on held-out anatomy.

prepare (left hemisphere for training, mirrored right held out) -> ``ul3d train`` -> ``ul3d predict`` on the
held-out hemisphere (last checkpoint: the held-out half is monitored during training but never used to
pick a checkpoint) -> ``ul3d evaluate`` at the atlas' 1 mm grid -> a PNG figure. Every step is the same
code path the commands use.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .config import load_config
from .data.colin27 import prepare_colin27
from .engine.evaluate import evaluate_folder
from .engine.infer import Predictor
from .engine.train import train
from .utils import atomic_path
from .visualize import orthogonal_figure

__all__ = ["run_demo", "HELD_OUT"]

HELD_OUT = "colin27_right_mirrored"


def run_demo(
    output: str | os.PathLike = "outputs/demo",
    data_dir: str | os.PathLike | None = None,
    full: bool = False,
    network: str | None = None,
    device: str | None = None,
    overrides: Sequence[str] = (),
) -> dict:
    """Run the demo end to end; returns (and writes ``demo_summary.json``) the measured numbers."""
    import nibabel as nib

    t0 = time.time()
    out = Path(output)
    root = prepare_colin27(out / "data", data_dir, full=full)
    extra = list(overrides)
    if network:
        name, _, variant = network.partition(":")
        extra = [f"network.name={name}", f"network.variant={variant or 'null'}"] + extra
    config = load_config("demo_colin27_full" if full else "demo_colin27", extra)
    result = train(config, root, out / "run", device=device)

    image_path = root / "imagesTr" / f"{HELD_OUT}_0000.nii.gz"
    ref_dir = out / "reference"
    ref_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / "labelsTr" / f"{HELD_OUT}.nii.gz", ref_dir / f"{HELD_OUT}.nii.gz")
    pred_dir = out / "prediction"
    t_pred = time.time()
    predictor = Predictor([result.last_checkpoint], device=device)
    final = predictor.predict_to(image_path, pred_dir)  # named by case id, as the reference is
    predict_seconds = time.time() - t_pred

    classes = result.class_names
    summary = evaluate_folder(pred_dir, ref_dir, labels=list(range(1, len(classes))),
                              label_names={i: n for i, n in enumerate(classes)}, quiet=True)
    dice = {classes[int(k)]: v["Dice"] for k, v in summary["mean"].items()}

    image = np.asarray(nib.load(str(image_path)).dataobj, dtype=np.float32)
    ref = np.asarray(nib.load(str(ref_dir / f"{HELD_OUT}.nii.gz")).dataobj)
    pred = np.asarray(nib.load(str(final)).dataobj)
    net = config["network"]
    net_name = f"{net['name']}:{net.get('variant')}" if net.get("variant") else net["name"]
    orthogonal_figure(image, ref, pred, len(classes), out / "demo.png", class_names=classes,
                      title=f"Colin27/AAL held-out (mirrored right) hemisphere - {net_name}, "
                            f"{result.iterations} iterations, mean Dice {summary['foreground_mean']['Dice']:.3f}")

    report = {
        "network": net_name,
        "classes": len(classes) - 1,
        "iterations": result.iterations,
        "train_seconds": round(result.seconds, 1),
        "predict_seconds": round(predict_seconds, 1),
        "total_seconds": round(time.time() - t0, 1),
        "held_out_dice": dice,
        "held_out_mean_dice": summary["foreground_mean"]["Dice"],
        "held_out_mean_hd95_mm": summary["foreground_mean"].get("HD95"),
        "prediction": str(final),
        "figure": str(out / "demo.png"),
        "checkpoint": str(result.last_checkpoint),
    }
    with atomic_path(out / "demo_summary.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    _print_report(report)
    return report


def _print_report(r: dict) -> None:
    print()
    print(f"Held-out (mirrored right hemisphere) Dice — {r['network']}, {r['iterations']} iterations, "
          f"trained in {r['train_seconds']:.0f}s, predicted in {r['predict_seconds']:.1f}s")
    width = max(len(n) for n in r["held_out_dice"])
    for name, d in r["held_out_dice"].items():
        print(f"  {name:<{width}}  {d:.3f}")
    print(f"  {'mean':<{width}}  {r['held_out_mean_dice']:.3f}   (HD95 {r['held_out_mean_hd95_mm']:.1f} mm)")
    print(f"prediction: {r['prediction']}\nfigure:     {r['figure']}\ntotal {r['total_seconds']:.0f}s")
