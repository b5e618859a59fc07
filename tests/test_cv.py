"""Cross-validation: nnU-Net splits, a complete tiny CV on FeTA and MSD layouts, resume, ensembles, bad input."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ul3d.cli import main
from ul3d.cv import CVError, kfold_splits, load_splits
from ul3d.data.datasets import load_dataset
from ul3d.data.synth import write_synthetic

FAST = ["network.variant=T", "train.roi_size=[32,32,32]", "train.iterations=2", "train.val_interval=2",
        "train.num_samples=2", "data.num_workers=0", "infer.sw_batch_size=2", "infer.overlap=0.25"]
SPACING = {"feta": "data.spacing=[1.6,1.6,1.6]", "prostate": "data.spacing=[1.2,1.2,3.6]"}


def test_splits_are_nnunets():
    """Same folds as sklearn's KFold(5, shuffle=True, random_state=12345) on the sorted ids (what nnU-Net uses);
    reference computed with scikit-learn 1.x."""
    ids = [f"case_{i:03d}" for i in range(13)][::-1]
    splits = kfold_splits(ids, 5)
    assert [s["val"] for s in splits] == [
        ["case_000", "case_007", "case_009"], ["case_003", "case_006", "case_010"],
        ["case_008", "case_011", "case_012"], ["case_001", "case_004"], ["case_002", "case_005"],
    ]
    for s in splits:
        assert set(s) == {"train", "val"} and sorted(s["train"] + s["val"]) == sorted(ids)
        assert s["train"] == sorted(s["train"]) and s["val"] == sorted(s["val"])
    vals = [c for s in splits for c in s["val"]]
    assert sorted(vals) == sorted(ids)  # every case validated exactly once
    with pytest.raises(CVError, match="3 case\\(s\\) cannot be split into 5 folds"):
        kfold_splits(ids[:3], 5)


def test_splits_file_errors(tmp_path):
    bad = tmp_path / "splits.json"
    bad.write_text(json.dumps([{"train": ["a", "zzz"], "val": ["b"]}]))
    with pytest.raises(CVError, match="names cases not in the dataset: \\['zzz'\\]"):
        load_splits(bad, ["a", "b"])
    bad.write_text(json.dumps({"train": []}))
    with pytest.raises(CVError, match="nnU-Net's format"):
        load_splits(bad, ["a"])


@pytest.mark.parametrize("layout,config", [("feta", "feta"), ("msd-prostate", "prostate")])
def test_complete_tiny_cv_and_report(layout, config, tmp_path, capsys):
    data = write_synthetic(layout, tmp_path / "data", n_cases=6, seed=11)
    out = tmp_path / "cv"
    assert main(["cv", "--config", config, "--data", str(data), "--folds", "3", "--out", str(out), "--device", "cpu",
                 "--set", *FAST, SPACING[config]]) == 0
    printed = capsys.readouterr().out
    assert "| foreground mean |" in printed
    splits = json.loads((out / "splits_final.json").read_text())
    spec = load_dataset(data)
    ids = sorted(it["id"] for it in spec.training)
    assert len(splits) == 3 and sorted(c for s in splits for c in s["val"]) == ids
    assert splits == kfold_splits(ids, 3)
    for k, s in enumerate(splits):
        summary = json.loads((out / f"fold_{k}" / "validation" / "summary.json").read_text())
        assert {"metric_per_case", "mean", "foreground_mean"} <= set(summary)
        assert len(summary["metric_per_case"]) == len(s["val"])
        for case in summary["metric_per_case"]:  # predictions keep the input's geometry
            pred = nib.load(case["prediction_file"])
            item = next(it for it in spec.training if Path(case["prediction_file"]).name.startswith(it["id"]))
            img = nib.load(item["image"] if isinstance(item["image"], str) else item["image"][0])
            assert pred.shape == img.shape[:3] and np.allclose(pred.affine, img.affine, atol=1e-4)
    report = json.loads((out / "cv_summary.json").read_text())
    assert report["n_cases"] == 6 and len(report["folds"]) == 3
    assert set(report["per_class"]) == set(spec.class_names[1:])
    assert {"mean_over_folds", "std_over_folds", "mean_over_cases", "std_over_cases"} <= set(report["foreground_mean"]["Dice"])
    rows = (out / "cv_cases.csv").read_text().strip().splitlines()
    assert rows[0] == "fold,case,label,name,Dice,IoU,HD95" and len(rows) == 1 + 6 * (spec.num_classes - 1)
    assert (out / "cv_dice_boxplot.png").read_bytes()[:4] == b"\x89PNG"

    # the folds as an ensemble
    pred_dir = tmp_path / "ensemble"
    image = spec.training[0]["image"]
    assert main(["predict", "--cv-dir", str(out), "--input", image, "--output", str(pred_dir), "--device", "cpu"]) == 0
    assert "3 checkpoint(s)" in capsys.readouterr().out
    assert len(list(pred_dir.glob("*.nii.gz"))) == 1


def test_resume_skips_finished_folds_and_finishes_interrupted_ones(tmp_path, capsys):
    data = write_synthetic("feta", tmp_path / "data", n_cases=6, seed=12)
    out = tmp_path / "cv"
    args = ["cv", "--config", "feta", "--data", str(data), "--folds", "3", "--out", str(out), "--device", "cpu",
            "--set", *FAST, SPACING["feta"]]
    assert main(args + ["--fold", "0"]) == 0
    assert (out / "fold_0" / "validation" / "summary.json").exists() and not (out / "fold_1").exists()
    assert not (out / "cv_summary.json").exists()  # not every fold is done yet
    # fold 1 trained but interrupted before its predictions were written
    assert main(args + ["--fold", "1"]) == 0
    ckpt = out / "fold_1" / "checkpoints" / "last.pt"
    stamp = ckpt.stat().st_mtime_ns
    for f in (out / "fold_1" / "validation").iterdir():
        f.unlink()
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "fold 0: finished earlier" in printed
    assert ckpt.stat().st_mtime_ns == stamp  # fold 1 was not retrained, only predicted and evaluated
    assert (out / "fold_1" / "validation" / "summary.json").exists() and (out / "cv_summary.json").exists()


def test_bad_input_fails_before_training(tmp_path, capsys):
    data = write_synthetic("feta", tmp_path / "data", n_cases=4, seed=13)
    assert main(["cv", "--config", "feta", "--data", str(data), "--folds", "5", "--out", str(tmp_path / "a"),
                 "--set", *FAST]) == 2
    assert "4 case(s) cannot be split into 5 folds" in capsys.readouterr().err
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps([{"train": ["sub-001"], "val": ["sub-999"]}]))
    assert main(["cv", "--config", "feta", "--data", str(data), "--splits", str(splits), "--out", str(tmp_path / "b"),
                 "--set", *FAST]) == 2
    assert "sub-999" in capsys.readouterr().err
    # duplicate case ids in a datalist
    spec = load_dataset(data)
    items = [{"id": "x", "image": it["image"], "label": it["label"]} for it in spec.training[:2]]
    dl = tmp_path / "dl.json"
    dl.write_text(json.dumps({"labels": {str(i): n for i, n in enumerate(spec.class_names)}, "training": items}))
    assert main(["cv", "--config", "feta", "--data", str(dl), "--folds", "2", "--out", str(tmp_path / "c"),
                 "--set", *FAST, "data.layout=datalist"]) == 2
    err = capsys.readouterr().err
    assert "x" in err and "duplicate" in err.lower()
    for d in ("a", "b", "c"):
        assert not (tmp_path / d / "fold_0").exists()  # nothing trained


def test_module_entry_point():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "ul3d.cv", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--splits" in out and "--gpus" in out and "--fold" in out
