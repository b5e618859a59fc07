"""K-fold cross-validation on nnU-Net-compatible splits: ``ul3d cv`` / ``python -m ul3d.cv``.

For each fold: ``ul3d train`` on the fold's training cases (validating on its held-out cases), ``ul3d predict``
of the held-out cases in their original geometry with the fold's final checkpoint (never the best one, which was
chosen on those cases), ``ul3d evaluate`` into ``fold_K/validation/summary.json`` — the layout nnU-Net uses.
Then a cross-validation report: ``cv_summary.json``, ``cv_cases.csv``, ``cv_dice_boxplot.png`` and a table.

Splits: ``splits_final.json`` in nnU-Net's format (a list of ``{"train": [...], "val": [...]}``), from KFold with
shuffling over the sorted case ids and seed 12345 — the same folds nnU-Net makes — or a given file. Re-running the
same command skips finished folds and resumes an interrupted one from its last checkpoint.
"""

from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from .config import get
from .data.datasets import DatasetSpec, load_dataset
from .data.io import case_id, image_suffix, read_array, write_like
from .data.validation import validate_dataset
from .engine.evaluate import evaluate_folder
from .engine.infer import Predictor, group_cases
from .engine.train import train
from .utils import atomic_path
from .visualize import boxplot

__all__ = ["CVError", "kfold_splits", "load_splits", "run_cv", "collect_report", "main", "NNUNET_SPLIT_SEED"]

NNUNET_SPLIT_SEED = 12345


class CVError(ValueError):
    """A cross-validation that cannot start (too few cases, a bad splits file, ...)."""


def kfold_splits(case_ids: Sequence[str], n_folds: int = 5, seed: int = NNUNET_SPLIT_SEED) -> list[dict[str, list[str]]]:
    """nnU-Net's folds: KFold with shuffling (``RandomState(seed)``) over the sorted case ids.

    The first ``n % n_folds`` folds get one case more; ``train`` and ``val`` lists are in sorted order.
    """
    ids = sorted(case_ids)
    n = len(ids)
    if n_folds < 2:
        raise CVError(f"cross-validation needs at least 2 folds, got {n_folds}")
    if n < n_folds:
        raise CVError(f"{n} case(s) cannot be split into {n_folds} folds: every fold needs at least one validation case")
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(n_folds, n // n_folds)
    sizes[: n % n_folds] += 1
    splits, start = [], 0
    for size in sizes:
        val = np.zeros(n, dtype=bool)
        val[order[start : start + size]] = True
        start += size
        splits.append({"train": [ids[i] for i in np.flatnonzero(~val)], "val": [ids[i] for i in np.flatnonzero(val)]})
    return splits


def load_splits(path: str | os.PathLike, case_ids: Sequence[str]) -> list[dict[str, list[str]]]:
    """Read and check an nnU-Net ``splits_final.json`` against the dataset's case ids."""
    path = Path(path)
    try:
        splits = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CVError(f"{path}: cannot read splits file: {e}") from None
    if not isinstance(splits, list) or not splits or not all(
        isinstance(s, dict) and isinstance(s.get("train"), list) and isinstance(s.get("val"), list) for s in splits
    ):
        raise CVError(f'{path}: expected nnU-Net\'s format, a list of {{"train": [...], "val": [...]}}')
    known = set(case_ids)
    problems = []
    for k, s in enumerate(splits):
        unknown = sorted((set(s["train"]) | set(s["val"])) - known)
        if unknown:
            problems.append(f"fold {k} names cases not in the dataset: {unknown}")
        if not s["val"]:
            problems.append(f"fold {k} has no validation cases")
        if set(s["train"]) & set(s["val"]):
            problems.append(f"fold {k} has cases in both train and val: {sorted(set(s['train']) & set(s['val']))}")
    if problems:
        raise CVError(f"{path}: " + "; ".join(problems))
    return splits


def _case_files(item: dict) -> list[Path]:
    return [Path(item["image"])] if isinstance(item["image"], str) else [Path(f) for f in item["image"]]


def _output_name(item: dict) -> str:
    """Predictions are named by the image's case id (nnU-Net: without the channel suffix)."""
    return group_cases(_case_files(item))[0][0]


def _write_reference(item: dict, spec: DatasetSpec, out: Path) -> None:
    """The reference label map in the trained label space (remapped where the dataset maps labels)."""
    target = out / f"{_output_name(item)}{image_suffix(item['label'])}"
    if target.exists():
        return
    if not spec.label_map:
        data = Path(item["label"]).read_bytes()
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
        return
    labels, _ = read_array(item["label"])
    write_like(spec.remap_labels(labels), item["label"], target, dtype=np.uint8)


def _run_fold(k: int, split: dict, spec: DatasetSpec, config: dict, data: Path, out: Path, device: str | None) -> None:
    fold_dir = out / f"fold_{k}"
    summary = fold_dir / "validation" / "summary.json"
    if summary.exists():
        print(f"[ul3d cv] fold {k}: finished earlier ({summary}), skipped")
        return
    cfg = copy.deepcopy(config)
    cfg.setdefault("data", {})["val_cases"] = list(split["val"])
    cfg["data"]["train_cases"] = list(split["train"])
    print(f"[ul3d cv] fold {k}: {len(split['train'])} training / {len(split['val'])} validation cases")
    result = train(cfg, data, fold_dir, resume=True, device=device, validate=False)  # run_cv validated once
    by_id = {it["id"]: it for it in spec.training}
    pred_dir, gt_dir = fold_dir / "validation", fold_dir / "gt"
    predictor = Predictor([result.last_checkpoint], device=device)
    for case in split["val"]:
        item = by_id[case]
        predictor.predict_to(_case_files(item), pred_dir, case=_output_name(item))
        _write_reference(item, spec, gt_dir)
    names = {i: n for i, n in enumerate(spec.class_names)}
    evaluate_folder(pred_dir, gt_dir, labels=list(range(1, spec.num_classes)), label_names=names, quiet=True)


def _parallel(folds: Sequence[int], gpus: Sequence[str], out: Path, data: Path, config_path: Path) -> None:
    """One fold per GPU at a time (``CUDA_VISIBLE_DEVICES``), each in its own ``ul3d cv --fold K`` process."""
    pending, running, failed = list(folds), {}, []
    free = list(gpus)
    while pending or running:
        while pending and free:
            k, gpu = pending.pop(0), free.pop(0)
            log = open(out / f"fold_{k}.log", "a")
            cmd = [sys.executable, "-m", "ul3d", "cv", "--config", str(config_path), "--data", str(data),
                   "--out", str(out), "--fold", str(k), "--device", "cuda", "--no-report"]
            threads = str(max(1, (os.cpu_count() or 2) // len(gpus)))  # share the CPU between concurrent folds
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu), OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
            running[k] = (subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), gpu, log)
            print(f"[ul3d cv] fold {k} started on GPU {gpu} (log: {out / f'fold_{k}.log'})")
        time.sleep(2)
        for k, (proc, gpu, log) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[k]
                free.append(gpu)
                print(f"[ul3d cv] fold {k} on GPU {gpu} {'finished' if proc.returncode == 0 else 'FAILED'}")
                if proc.returncode:
                    failed.append(k)
    if failed:
        raise CVError(f"fold(s) {failed} failed; see {out}/fold_K.log, then re-run the same command to resume")


def run_cv(
    config: dict,
    data: str | os.PathLike,
    out: str | os.PathLike,
    folds: int = 5,
    splits: str | os.PathLike | None = None,
    fold: int | None = None,
    gpus: Sequence[str] | None = None,
    device: str | None = None,
    report: bool = True,
) -> dict | None:
    """Run (or resume) a cross-validation; returns the report once every fold is finished."""
    t0 = time.time()
    out, data = Path(out), Path(data)
    protocol = get(config, "data.protocol")
    spec = load_dataset(data, layout=get(config, "data.layout"), **({"protocol": protocol} if protocol else {}))
    ids = [it["id"] for it in spec.training]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise CVError(f"{spec.root}: duplicate case ids {duplicates}")
    split_file = out / "splits_final.json"
    if splits is not None:
        split_list = load_splits(splits, ids)
    elif split_file.exists():
        split_list = load_splits(split_file, ids)
    else:
        split_list = kfold_splits(ids, folds)
    channels = get(config, "data.channels") or spec.num_channels
    validate_dataset(spec, expected_channels=int(channels))  # every case, once, before any training
    out.mkdir(parents=True, exist_ok=True)
    if not split_file.exists() or splits is not None:
        with atomic_path(split_file) as tmp:
            tmp.write_text(json.dumps(split_list, indent=2))
    config_path = out / "cv_config.yaml"
    with atomic_path(config_path) as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))

    todo = [fold] if fold is not None else list(range(len(split_list)))
    if fold is not None and not 0 <= fold < len(split_list):
        raise CVError(f"--fold {fold} is out of range: the splits have folds 0..{len(split_list) - 1}")
    if gpus and len(gpus) > 1 and fold is None:
        unfinished = [k for k in todo if not (out / f"fold_{k}" / "validation" / "summary.json").exists()]
        _parallel(unfinished, gpus, out, data, config_path)
    else:
        if gpus and len(gpus) == 1:
            device = f"cuda:{gpus[0]}"
        for k in todo:
            _run_fold(k, split_list[k], spec, config, data, out, device)
    done = all((out / f"fold_{k}" / "validation" / "summary.json").exists() for k in range(len(split_list)))
    if not report or not done:
        return None
    result = collect_report(out, len(split_list), spec.class_names)
    result["seconds"] = round(time.time() - t0, 1)
    return result


def collect_report(out: str | os.PathLike, n_folds: int, class_names: Sequence[str]) -> dict:
    """Summarise finished folds: per class and overall, mean ± std across folds and over all cases."""
    out = Path(out)
    names = {str(i): n for i, n in enumerate(class_names)}
    labels = [str(i) for i in range(1, len(class_names))]
    per_fold, rows = [], []
    for k in range(n_folds):
        summary = json.loads((out / f"fold_{k}" / "validation" / "summary.json").read_text())
        per_fold.append(summary)
        for case in summary["metric_per_case"]:
            cid = case_id(case["prediction_file"])
            for lab in labels:
                m = case["metrics"].get(lab, {})
                rows.append({"fold": k, "case": cid, "label": int(lab), "name": names[lab],
                             **{key: m.get(key, float("nan")) for key in ("Dice", "IoU", "HD95")}})

    def stats(values):
        v = np.asarray([x for x in values if x == x], dtype=float)
        return (float(v.mean()), float(v.std())) if v.size else (float("nan"), float("nan"))

    classes = {}
    for lab in labels:
        entry = {}
        for metric in ("Dice", "IoU", "HD95"):
            fm, fs = stats([f["mean"].get(lab, {}).get(metric, float("nan")) for f in per_fold])
            cm, cs = stats([r[metric] for r in rows if str(r["label"]) == lab])
            entry[metric] = {"mean_over_folds": fm, "std_over_folds": fs, "mean_over_cases": cm, "std_over_cases": cs}
        classes[names[lab]] = entry
    overall = {}
    for metric in ("Dice", "IoU", "HD95"):
        fm, fs = stats([f["foreground_mean"].get(metric, float("nan")) for f in per_fold])
        case_means = {}
        for r in rows:
            case_means.setdefault((r["fold"], r["case"]), []).append(r[metric])
        cm, cs = stats([stats(v)[0] for v in case_means.values()])
        overall[metric] = {"mean_over_folds": fm, "std_over_folds": fs, "mean_over_cases": cm, "std_over_cases": cs}
    report = {
        "folds": [{"fold": k, "foreground_mean": f["foreground_mean"],
                   "mean": {names[lab]: f["mean"].get(lab, {}) for lab in labels}} for k, f in enumerate(per_fold)],
        "per_class": classes,
        "foreground_mean": overall,
        "n_cases": len({(r["fold"], r["case"]) for r in rows}),
    }
    with atomic_path(out / "cv_summary.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    with atomic_path(out / "cv_cases.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["fold", "case", "label", "name", "Dice", "IoU", "HD95"])
        writer.writeheader()
        writer.writerows(rows)
    boxplot({names[lab]: [r["Dice"] for r in rows if str(r["label"]) == lab] for lab in labels},
            out / "cv_dice_boxplot.png", title=f"{n_folds}-fold cross-validation, {report['n_cases']} cases")
    print(format_report(report))
    return report


def format_report(report: dict) -> str:
    lines = ["", "| class | Dice (folds) | Dice (cases) | IoU (cases) | HD95 mm (cases) |", "|---|---:|---:|---:|---:|"]
    for name, e in list(report["per_class"].items()) + [("foreground mean", report["foreground_mean"])]:
        d, i, h = e["Dice"], e["IoU"], e["HD95"]
        lines.append(f"| {name} | {d['mean_over_folds']:.3f} ± {d['std_over_folds']:.3f} | {d['mean_over_cases']:.3f} ± "
                     f"{d['std_over_cases']:.3f} | {i['mean_over_cases']:.3f} | {h['mean_over_cases']:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ul3d.cv ...`` = ``ul3d cv ...``."""
    from .cli import main as cli_main

    return cli_main(["cv", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
