"""Tests of ul3d.engine.evaluate on tiny synthetic label maps."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from ul3d.engine.evaluate import EvaluationError, evaluate_case, evaluate_folder, format_summary_table

SHAPE = (16, 16, 16)


def _cube(shape=SHAPE, lo=4, hi=10, value=1, shift=(0, 0, 0)) -> np.ndarray:
    arr = np.zeros(shape, dtype=np.uint8)
    arr[tuple(slice(lo + s, hi + s) for s in shift)] = value
    return arr


def _save(arr: np.ndarray, path: Path, spacing=(1.0, 1.0, 1.0)) -> Path:
    """Write ``arr`` (x, y, z) with voxel size ``spacing``; NIfTI via nibabel, the rest via SimpleITK."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith((".nii.gz", ".nii")):
        nib.save(nib.Nifti1Image(arr, np.diag([*spacing, 1.0])), str(path))
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))  # sitk arrays are (z, y, x)
        image.SetSpacing(tuple(float(s) for s in spacing))
        sitk.WriteImage(image, str(path))
    return path


def _same(a, b) -> bool:
    """Equality of nested metric dicts/lists with NaN == NaN and float tolerance."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-9)
    return a == b


# --------------------------------------------------------------------------- evaluate_case


def test_dice_iou_counts_exact():
    ref = _cube()  # 6^3 = 216 voxels
    pred = _cube(shift=(1, 0, 0))  # overlap 5 * 36 = 180
    m = evaluate_case(pred, ref, [1], (1, 1, 1))["1"]
    assert list(m) == ["Dice", "IoU", "HD95", "TP", "FP", "FN", "TN", "n_pred", "n_ref"]
    assert m["Dice"] == pytest.approx(2 * 180 / 432, rel=1e-6)
    assert m["IoU"] == pytest.approx(180 / 252, rel=1e-6)
    assert (m["TP"], m["FP"], m["FN"], m["n_pred"], m["n_ref"]) == (180, 36, 36, 216, 216)
    assert m["TN"] == 16**3 - 252
    assert all(isinstance(m[k], int) for k in ("TP", "FP", "FN", "TN", "n_pred", "n_ref"))
    assert m["HD95"] == pytest.approx(1.0)


def test_multilabel_noncontiguous_labels_and_unevaluated_values():
    ref = _cube(value=3) + _cube(lo=11, hi=14, value=7)
    pred = ref.copy()
    pred[0, 0, 0] = 5  # a value that is not evaluated counts as background
    out = evaluate_case(pred, ref, [7, 3, 3], (1, 1, 1))
    assert list(out) == ["3", "7"]
    for key in out:
        assert out[key]["Dice"] == pytest.approx(1.0) and out[key]["IoU"] == pytest.approx(1.0)
        assert out[key]["HD95"] == 0.0 and out[key]["FP"] == 0
    assert out["3"]["n_ref"] == 216 and out["7"]["n_ref"] == 27


@pytest.mark.parametrize(("axis", "expected_mm"), [(0, 6.0), (1, 2.0), (2, 1.0)])
def test_hd95_in_mm_follows_anisotropic_spacing(axis, expected_mm):
    shift = [0, 0, 0]
    shift[axis] = 2
    m = evaluate_case(_cube(shift=tuple(shift)), _cube(), [1], (3.0, 1.0, 0.5))["1"]
    assert m["HD95"] == pytest.approx(expected_mm)
    assert m["Dice"] == pytest.approx(2 / 3, rel=1e-6)


def test_both_empty_class_is_nan():
    ref = _cube()
    m = evaluate_case(ref, ref, [1, 2], (1, 1, 1))["2"]
    assert math.isnan(m["Dice"]) and math.isnan(m["IoU"]) and math.isnan(m["HD95"])
    assert (m["TP"], m["FP"], m["FN"], m["TN"], m["n_pred"], m["n_ref"]) == (0, 0, 0, 16**3, 0, 0)


@pytest.mark.parametrize("missing", ["pred", "ref"])
def test_one_empty_class_scores_zero_and_diagonal(missing):
    shape, spacing = (8, 10, 12), (2.0, 1.0, 0.5)
    full, empty = _cube(shape, lo=2, hi=6), np.zeros(shape, np.uint8)
    pred, ref = (empty, full) if missing == "pred" else (full, empty)
    m = evaluate_case(pred, ref, [1], spacing)["1"]
    assert m["Dice"] == 0.0 and m["IoU"] == 0.0
    assert m["HD95"] == pytest.approx(math.sqrt(16**2 + 10**2 + 6**2))
    assert (m["n_pred"], m["n_ref"]) == ((0, 64) if missing == "pred" else (64, 0))


def test_evaluate_case_validates_inputs():
    ref = _cube()
    with pytest.raises(ValueError, match="shape"):
        evaluate_case(ref[:-1], ref, [1], (1, 1, 1))
    with pytest.raises(ValueError, match="background"):
        evaluate_case(ref, ref, [0, 1], (1, 1, 1))
    with pytest.raises(ValueError, match="spacing"):
        evaluate_case(ref, ref, [1], (1, 1))
    assert evaluate_case(ref, ref, [], (1, 1, 1)) == {}


# --------------------------------------------------------------------------- evaluate_folder


@pytest.fixture
def folders(tmp_path):
    """Three cases, labels 1 and 2, spacing (2, 1, 1); label 2 is absent from case ``c`` entirely."""
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    spacing = (2.0, 1.0, 1.0)
    lesion = _cube(lo=12, hi=14, value=2)
    cases = {
        "a": (_cube() + lesion, _cube() + lesion),  # perfect
        "b": (_cube(shift=(1, 0, 0)), _cube() + lesion),  # shifted organ, lesion missed
        "c": (_cube(shift=(0, 2, 0)), _cube()),  # label 2 in neither
    }
    for name, (pred, ref) in cases.items():
        _save(pred, pred_dir / f"{name}.nii.gz", spacing)
        _save(ref, ref_dir / f"{name}.nii.gz", spacing)
    return pred_dir, ref_dir, cases, spacing


def test_evaluate_folder_summary_csv_and_table(folders, capsys):
    pred_dir, ref_dir, cases, spacing = folders
    names = {1: "organ", 2: "lesion"}
    summary = evaluate_folder(pred_dir, ref_dir, labels=[1, 2], label_names=names)

    # summary.json: nnU-Net v2 layout, NaN as JSON NaN, identical to the returned dict
    text = (pred_dir / "summary.json").read_text()
    assert "NaN" in text
    loaded = json.loads(text)
    assert _same(loaded, summary)
    assert list(loaded)[:3] == ["metric_per_case", "mean", "foreground_mean"]
    assert loaded["hd95_unit"] == "mm" and loaded["label_names"] == {"1": "organ", "2": "lesion"}
    per_case = loaded["metric_per_case"]
    assert [Path(c["reference_file"]).name for c in per_case] == ["a.nii.gz", "b.nii.gz", "c.nii.gz"]
    assert [Path(c["prediction_file"]).parent for c in per_case] == [pred_dir] * 3
    for case, (name, (pred, ref)) in zip(per_case, cases.items()):
        assert _same(case["metrics"], evaluate_case(pred, ref, [1, 2], spacing))

    # means: NaN-ignoring over cases, then over classes
    assert loaded["mean"]["1"]["Dice"] == pytest.approx(np.mean([c["metrics"]["1"]["Dice"] for c in per_case]))
    assert loaded["mean"]["2"]["Dice"] == pytest.approx(0.5)  # case a: 1, case b: 0, case c: NaN
    diag = math.sqrt(32**2 + 16**2 + 16**2)
    assert loaded["mean"]["2"]["HD95"] == pytest.approx(diag / 2)
    assert loaded["mean"]["1"]["HD95"] == pytest.approx((0 + 2 + 2) / 3)
    for metric in ("Dice", "IoU", "HD95", "TP"):
        expected = np.mean([loaded["mean"][k][metric] for k in ("1", "2")])
        assert loaded["foreground_mean"][metric] == pytest.approx(expected)

    # metrics.csv: one row per case and class, the same numbers
    with open(pred_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["case", "label", "name", "Dice", "IoU", "HD95", "TP", "FP", "FN", "n_pred", "n_ref"]
    assert [(r["case"], r["label"], r["name"]) for r in rows] == [
        (c, k, names[int(k)]) for c in "abc" for k in ("1", "2")
    ]
    for row in rows:
        metrics = per_case["abc".index(row["case"])]["metrics"][row["label"]]
        for col in ("Dice", "IoU", "HD95", "TP", "FP", "FN", "n_pred", "n_ref"):
            assert _same(float(row[col]), float(metrics[col]))

    # the printed table is format_summary_table's
    printed = capsys.readouterr().out
    table = format_summary_table(summary)
    assert printed.strip() == table.strip()
    assert "organ" in table and "lesion" in table and "foreground mean" in table and "HD95 [mm]" in table
    assert not [p for p in pred_dir.iterdir() if p.name.endswith(".tmp")]


def test_evaluate_folder_output_dir_and_quiet(folders, tmp_path, capsys):
    pred_dir, ref_dir, _, _ = folders
    out = tmp_path / "reports" / "run1"
    evaluate_folder(pred_dir, ref_dir, output_dir=out, quiet=True)
    assert (out / "summary.json").is_file() and (out / "metrics.csv").is_file()
    assert not (pred_dir / "summary.json").exists()
    assert capsys.readouterr().out == ""
    # a second run ignores the reports written beside the predictions
    evaluate_folder(pred_dir, ref_dir, quiet=True)
    evaluate_folder(pred_dir, ref_dir, quiet=True)


def test_label_discovery(tmp_path):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    r1, p1 = _cube(value=1), _cube(value=1, shift=(1, 0, 0))
    p1[0, 0, 0] = 9  # present only in a prediction: not a class
    r2 = _cube(value=4)
    p2 = _cube(value=1)  # 1 predicted where the reference has only 4
    for name, (p, r) in {"x": (p1, r1), "y": (p2, r2)}.items():
        _save(p, pred_dir / f"{name}.nii.gz")
        _save(r, ref_dir / f"{name}.nii.gz")
    summary = evaluate_folder(pred_dir, ref_dir, quiet=True)
    assert list(summary["mean"]) == ["1", "4"]
    assert [list(c["metrics"]) for c in summary["metric_per_case"]] == [["1", "4"], ["1", "4"]]
    explicit = evaluate_folder(pred_dir, ref_dir, labels=[1, 4], output_dir=tmp_path / "o", quiet=True)
    assert _same(summary, explicit)
    assert math.isnan(summary["metric_per_case"][0]["metrics"]["4"]["Dice"])  # x: 4 in neither
    assert summary["metric_per_case"][1]["metrics"]["1"]["Dice"] == 0.0  # y: 1 only predicted


def test_missing_predictions_listed_and_extra_prediction_reported(tmp_path, caplog):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    for name in ("case_01", "case_02", "case_03"):
        _save(_cube(), ref_dir / f"{name}.nii.gz")
    _save(_cube(), pred_dir / "case_02.nii.gz")
    _save(_cube(), pred_dir / "stray.nii.gz")
    with caplog.at_level(logging.WARNING), pytest.raises(EvaluationError) as info:
        evaluate_folder(pred_dir, ref_dir, quiet=True)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "case_01" in message and "case_03" in message and "case_02" not in message
    assert "stray.nii.gz" in caplog.text

    # with every reference predicted, the stray prediction is only reported
    for name in ("case_01", "case_03"):
        _save(_cube(), pred_dir / f"{name}.nii.gz")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        summary = evaluate_folder(pred_dir, ref_dir, quiet=True)
    assert len(summary["metric_per_case"]) == 3 and "stray.nii.gz" in caplog.text


def test_shape_mismatch_names_both_files(tmp_path):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    _save(_cube(), ref_dir / "ok.nii.gz")
    _save(_cube(), pred_dir / "ok.nii.gz")
    _save(_cube(), ref_dir / "bad.nii.gz")
    _save(_cube((16, 16, 12), lo=2, hi=6), pred_dir / "bad.nii.gz")
    with pytest.raises(EvaluationError) as info:
        evaluate_folder(pred_dir, ref_dir, quiet=True)
    message = str(info.value)
    assert str(pred_dir / "bad.nii.gz") in message and str(ref_dir / "bad.nii.gz") in message
    assert "(16, 16, 12)" in message and "(16, 16, 16)" in message and "ok.nii.gz" not in message


def test_ambiguous_case_id(tmp_path):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    _save(_cube(), ref_dir / "a.nii.gz")
    _save(_cube(), pred_dir / "a.nii.gz")
    _save(_cube(), pred_dir / "a.nrrd")
    with pytest.raises(EvaluationError, match="a.nrrd"):
        evaluate_folder(pred_dir, ref_dir, quiet=True)


@pytest.mark.parametrize("ext", [".nrrd", ".mha", ".mhd"])
def test_sitk_formats_match_nifti(tmp_path, ext):
    # non-cubic shape, anisotropic spacing and an asymmetric shift: an axis-order slip changes the numbers
    shape, spacing = (10, 14, 18), (3.0, 1.0, 0.5)
    ref = np.zeros(shape, np.uint8)
    ref[2:6, 3:9, 4:12] = 1
    ref[6:8, 10:13, 13:16] = 2
    pred = np.zeros_like(ref)
    pred[3:7, 3:10, 6:12] = 1
    pred[6:8, 11:13, 12:16] = 2
    results = {}
    for suffix in (".nii.gz", ext):
        root = tmp_path / suffix.strip(".")
        _save(pred, root / "pred" / f"case{suffix}", spacing)
        _save(ref, root / "ref" / f"case{suffix}", spacing)
        results[suffix] = evaluate_folder(root / "pred", root / "ref", quiet=True)
    assert _same(results[".nii.gz"]["mean"], results[ext]["mean"])
    assert _same(results[".nii.gz"]["mean"]["1"], evaluate_case(pred, ref, [1, 2], spacing)["1"])
    assert results[ext]["metric_per_case"][0]["reference_file"].endswith(f"case{ext}")


def test_float_label_maps_and_non_integer_values(tmp_path):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    _save(_cube().astype(np.float32), ref_dir / "f.nii")
    _save(_cube(shift=(1, 0, 0)).astype(np.float32), pred_dir / "f.nii")
    summary = evaluate_folder(pred_dir, ref_dir, quiet=True)
    assert summary["mean"]["1"]["TP"] == 180
    _save(_cube().astype(np.float32) * 0.5, pred_dir / "f.nii")
    with pytest.raises(EvaluationError, match="non-integer"):
        evaluate_folder(pred_dir, ref_dir, quiet=True)


def test_format_summary_table_nan_and_json_label_names():
    summary = {
        "metric_per_case": [{}, {}],
        "mean": {"1": {"Dice": 0.91234, "IoU": 0.8, "HD95": 3.456}, "2": {"Dice": float("nan"), "IoU": 0.5, "HD95": 1}},
        "foreground_mean": {"Dice": 0.91234, "IoU": 0.65, "HD95": 2.228},
        "label_names": {"1": "liver"},
    }
    lines = format_summary_table(summary).splitlines()
    assert "2 cases" in lines[0]
    row1 = next(line for line in lines if line.startswith("1 liver"))
    assert row1.split()[-3:] == ["0.9123", "0.8000", "3.46"]
    row2 = next(line for line in lines if line.startswith("2 "))
    assert row2.split()[1] == "nan"
    assert lines[-1].startswith("foreground mean") and lines[-1].split()[-3:] == ["0.9123", "0.6500", "2.23"]
    assert "tumour" in format_summary_table(summary, label_names={2: "tumour"})
