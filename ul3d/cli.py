"""The ``ul3d`` command line: ``ul3d <command> [options]`` (``ul3d --help`` lists the commands)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _add_profile(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="params, MACs and activation memory of ul3d's networks and MONAI's",
        description="Print params, MACs (true convolution MACs and the papers' convention) and an estimate of "
        "forward activation memory for ul3d's networks and MONAI's UNet, SegResNet, SwinUNETR, UNETR and DynUNet.",
    )
    p.add_argument(
        "networks", nargs="*", metavar="NAME[:VARIANT]",
        help="e.g. ultralightunet:M aulunet unet (MONAI peers: unet segresnet swinunetr unetr dynunet). "
        "Default: every ul3d variant and every MONAI peer.",
    )
    p.add_argument("--spatial-dims", type=int, default=3, choices=(2, 3))
    p.add_argument("--roi", type=int, nargs="+", default=None, help="input size per axis (default 96³ / 256²)")
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--out-channels", type=int, default=3)
    p.add_argument("--batch", type=int, default=1, help="batch size of the profiled input (default 1)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_run_profile)


def _run_profile(args: argparse.Namespace) -> int:
    from .profiling import profile_table

    roi = args.roi or ([96] * 3 if args.spatial_dims == 3 else [256] * 2)
    if len(roi) == 1:
        roi = roi * args.spatial_dims
    if len(roi) != args.spatial_dims:
        raise SystemExit(f"ul3d profile: --roi needs {args.spatial_dims} sizes for --spatial-dims {args.spatial_dims}, got {roi}")
    try:
        rows = profile_table(args.networks, args.spatial_dims, roi, args.in_channels, args.out_channels, args.batch)
    except ValueError as e:
        raise SystemExit(f"ul3d profile: {e}") from None
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    else:
        from .profiling import format_table

        print(format_table(rows))
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a network on a dataset (MSD, FeTA, BTCV, nnU-Net raw, datalist)",
                       description="Train with MONAI transforms, DiceCELoss and sliding-window validation.")
    p.add_argument("--config", required=True, help="YAML config (a path, or a name in configs/: prostate, feta, btcv, nnunet)")
    p.add_argument("--data", required=True, help="dataset folder or datalist (.json/.csv)")
    p.add_argument("--output", default=None, help="output folder (default runs/<config name>)")
    p.add_argument("--network", default=None, metavar="NAME[:VARIANT]", help="e.g. ultralightunet:M, aulunet, unet")
    p.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. train.iterations=1000 data.spacing=[1,1,2]")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoints/last.pt")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, choices=("cpu", "cuda"))
    p.set_defaults(func=_run_train)


def _config_from_args(args: argparse.Namespace) -> dict:
    from .config import load_config

    overrides = list(args.overrides)
    if args.network:
        name, _, variant = args.network.partition(":")
        overrides += [f"network.name={name}", f"network.variant={variant or 'null'}"]
    if getattr(args, "seed", None) is not None:
        overrides.append(f"train.seed={args.seed}")
    return load_config(args.config, overrides)


def _run_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .engine.train import train

    config = _config_from_args(args)
    output = args.output or str(Path("runs") / Path(args.config).stem)
    result = train(config, args.data, output, resume=args.resume, device=args.device)
    print(f"[ul3d train] done in {result.seconds:.0f}s: best val Dice {result.best_metric:.4f} at iteration "
          f"{result.best_iteration}; checkpoints in {result.last_checkpoint.parent}")
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="sliding-window inference on NIfTI/NRRD/MHA files or folders",
                       description="Write uint8 label maps with each input's shape, affine and orientation.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", nargs="+", help="checkpoint(s); several are ensembled (softmax average)")
    src.add_argument("--cv-dir", help="a `ul3d cv` output folder: ensemble the final checkpoint of every fold")
    p.add_argument("--input", nargs="+", required=True, help="image files and/or folders")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"))
    p.add_argument("--overlap", type=float, default=None)
    p.add_argument("--sw-batch-size", type=int, default=None)
    p.add_argument("--tta", action="store_true", help="average over mirrored inputs")
    p.add_argument("--path", default=None,
                   choices=("auto", "plain", "fused", "channels_last", "onnxruntime", "compile", "cuda_graph"),
                   help="execution path (default: the config's infer.path, else auto = fastest for the device)")
    p.add_argument("--save-probabilities", action="store_true", help="also write CASE_probabilities (float32, C channels)")
    p.set_defaults(func=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from .engine.infer import Predictor, predict_paths

    checkpoints = args.checkpoint or _cv_checkpoints(args.cv_dir)
    predictor = Predictor(checkpoints, device=args.device, overlap=args.overlap, sw_batch_size=args.sw_batch_size,
                          tta=args.tta, path=args.path)
    print(f"[ul3d predict] {predictor.description}")
    report = predict_paths(predictor, args.input, args.output, args.save_probabilities, progress=sys.stderr.isatty())
    print(f"[ul3d predict] wrote {len(report.written)} prediction(s) to {args.output} in {report.seconds:.1f}s")
    if report.failed:
        print(f"[ul3d predict] {len(report.failed)} input(s) failed:", file=sys.stderr)
        for f, why in report.failed.items():
            print(f"  {f}: {why}", file=sys.stderr)
        return 1
    return 0


def _cv_checkpoints(cv_dir: str) -> list[str]:
    from pathlib import Path

    found = sorted(Path(cv_dir).glob("fold_*/checkpoints/last.pt"), key=lambda p: int(p.parts[-3].split("_")[1]))
    if not found:
        raise FileNotFoundError(f"no fold_K/checkpoints/last.pt under {cv_dir}: is it a `ul3d cv` output folder?")
    return [str(f) for f in found]


def _add_cv(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cv", help="K-fold cross-validation on nnU-Net-compatible splits, with a report",
                       description="Writes splits_final.json (nnU-Net format, seed 12345), trains one model per fold, "
                       "predicts and evaluates each fold's validation cases, and reports. Re-running resumes.")
    p.add_argument("--config", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--splits", default=None, help="use this splits_final.json instead of making one")
    p.add_argument("--fold", type=int, default=None, help="run only fold K")
    p.add_argument("--gpus", default=None, help="comma-separated GPU ids: run folds concurrently, one per GPU")
    p.add_argument("--network", default=None, metavar="NAME[:VARIANT]")
    p.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"))
    p.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=_run_cv)


def _run_cv(args: argparse.Namespace) -> int:
    from .cv import run_cv

    config = _config_from_args(args)
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    run_cv(config, args.data, args.out, folds=args.folds, splits=args.splits, fold=args.fold, gpus=gpus,
           device=args.device, report=not args.no_report)
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="Dice, IoU and HD95 (mm) of predictions against references",
                       description="Writes summary.json (nnU-Net keys) and metrics.csv, prints a table.")
    p.add_argument("--pred", required=True)
    p.add_argument("--ref", required=True)
    p.add_argument("--labels", type=int, nargs="+", default=None, help="label values (default: all in the references)")
    p.add_argument("--output", default=None, help="folder for summary.json/metrics.csv (default: --pred)")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from .engine.evaluate import evaluate_folder

    evaluate_folder(args.pred, args.ref, labels=args.labels, output_dir=args.output)
    return 0


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write a small synthetic dataset in a dataset's exact layout")
    p.add_argument("--layout", required=True, choices=("msd-prostate", "feta", "btcv", "nnunet"))
    p.add_argument("--out", required=True)
    p.add_argument("--cases", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from .data.synth import write_synthetic

    root = write_synthetic(args.layout, args.out, n_cases=args.cases, seed=args.seed)
    print(f"[ul3d synth] wrote a synthetic {args.layout} dataset to {root}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train and evaluate UltraLightUNet3D on real anatomy (Colin27 T1 + AAL)",
                       description="Left hemisphere for training, mirrored right hemisphere held out. CPU default: "
                       "7 classes at 2 mm; --full: 54 classes at 1 mm (meant for a GPU).")
    p.add_argument("--output", default="outputs/demo")
    p.add_argument("--data-dir", default=None, help="folder with ch2bet.nii.gz, aal.nii.gz, aal.nii.txt "
                   "(default /usr/share/mricron/templates from Debian's mricron-data)")
    p.add_argument("--full", action="store_true")
    p.add_argument("--network", default=None, metavar="NAME[:VARIANT]", help="e.g. ultralightunet:S or unet (MONAI)")
    p.add_argument("--device", default=None, choices=("cpu", "cuda"))
    p.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.output, args.data_dir, args.full, args.network, args.device, args.overrides)
    return 0


def _add_export_bundle(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export-bundle", help="package a trained checkpoint as a MONAI bundle (checked before it is written)",
                       description="Write a MONAI bundle folder (configs for train/inference/evaluate/multi-GPU, "
                       "metadata, model card, licence, models/model.pt, model.ts via ckpt_export, model.onnx) from a "
                       "checkpoint of `ul3d train` or `ul3d cv`, run MONAI's checks on it, and only then move it to --out.")
    p.add_argument("--checkpoint", default=None, help="a ul3d checkpoint (e.g. RUN/checkpoints/last.pt); without it, "
                   "the template's untrained bundle (train it with its configs/train.json)")
    p.add_argument("--template", required=True, choices=("prostate", "feta", "btcv", "colin27_aal", "custom"),
                   help="text and defaults of the bundle; preprocessing, classes and channels come from the checkpoint")
    p.add_argument("--out", required=True, help="bundle folder to create")
    p.add_argument("--metrics", default=None, help="a summary.json of `ul3d evaluate` (or the bundle's evaluate.json): "
                   "its mean Dice and HD95 go into metadata eval_metrics (default: the checkpoint's last validation Dice)")
    p.add_argument("--no-onnx", action="store_true", help="do not write models/model.onnx")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_run_export_bundle)


def _run_export_bundle(args: argparse.Namespace) -> int:
    from .bundle import export_bundle

    metrics = None
    if args.metrics:
        from .bundle.export import metrics_from_summary

        metrics = metrics_from_summary(args.metrics)
    out = export_bundle(args.checkpoint, args.template, args.out, eval_metrics=metrics, onnx=not args.no_onnx,
                        force=args.force)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    print(f"[ul3d export-bundle] wrote {out} ({len(files)} files: {', '.join(files)})")
    print(f"[ul3d export-bundle] checks passed: metadata schema, check_properties (train, inference), "
          f"verify_net_in_out" + (f", TorchScript{'' if args.no_onnx else ' and ONNX'} outputs = eager" if args.checkpoint else "")
          )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="ul3d", description="Ultra-lightweight U-shaped networks for medical image segmentation.")
    parser.add_argument("--version", action="version", version=f"ul3d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_profile(sub)
    _add_train(sub)
    _add_predict(sub)
    _add_evaluate(sub)
    _add_synth(sub)
    _add_demo(sub)
    _add_cv(sub)
    _add_export_bundle(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .config import ConfigError
    from .data.validation import DatasetError

    try:
        return int(args.func(args) or 0)
    except (DatasetError, ConfigError, FileNotFoundError, ValueError) as e:
        # one clear message, never a deep traceback, for bad input (UL3D_DEBUG=1 shows the traceback)
        if os.environ.get("UL3D_DEBUG"):
            raise
        print(f"ul3d {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
