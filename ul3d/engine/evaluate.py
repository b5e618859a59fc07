"""Evaluation of predicted label maps against reference label maps.

The per-class metrics come from MONAI (:func:`monai.metrics.compute_dice`, :func:`monai.metrics.compute_iou`,
:func:`monai.metrics.compute_hausdorff_distance`, on masks encoded with :func:`monai.networks.utils.one_hot`);
this module handles reading, pairing, voxel counts, the edge cases and the reports.

:func:`evaluate_folder` writes a ``summary.json`` in the layout of nnU-Net v2's ``summary.json``
(``metric_per_case`` / ``mean`` / ``foreground_mean``, class keys as strings, NaN written as JSON ``NaN``),
so tools that read nnU-Net summaries read ours. Added keys: ``HD95`` (in mm) per class, ``hd95_unit`` and,
when given, ``label_names``. A ``metrics.csv`` holds one row per case and class.

Edge cases (per class, per case):

* reference and prediction both empty: Dice, IoU and HD95 are NaN (nnU-Net's convention); such a case does
  not enter the class mean (means are NaN-ignoring, like :func:`numpy.nanmean`).
* exactly one of them empty: Dice and IoU are 0; HD95 is the diagonal of the image's field of view in mm,
  ``sqrt(sum((shape_i * spacing_i) ** 2))``. It is larger than any distance between two voxels of the image,
  so a missed or hallucinated structure scores worse than any real contour error, yet it stays finite and
  the means stay finite (MONAI itself would return ``inf`` or NaN here).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou
from monai.networks.utils import one_hot

from ul3d.data import io as image_io
from ul3d.data.io import IMAGE_SUFFIXES, read_array, read_header
from ul3d.utils import atomic_path

__all__ = [
    "EvaluationError",
    "METRIC_NAMES",
    "SUPPORTED_EXTENSIONS",
    "evaluate_case",
    "evaluate_folder",
    "format_summary_table",
]

logger = logging.getLogger(__name__)

#: Metrics reported per class, in this order (nnU-Net v2's names, plus ``HD95`` in mm).
METRIC_NAMES: tuple[str, ...] = ("Dice", "IoU", "HD95", "TP", "FP", "FN", "TN", "n_pred", "n_ref")

#: Image file endings recognised in a folder (those :mod:`ul3d.data.io` reads; ``.nii.gz`` before ``.nii``).
SUPPORTED_EXTENSIONS: tuple[str, ...] = IMAGE_SUFFIXES
_CSV_COLUMNS = ("case", "label", "name", "Dice", "IoU", "HD95", "TP", "FP", "FN", "n_pred", "n_ref")
_COUNT_METRICS = ("TP", "FP", "FN", "TN", "n_pred", "n_ref")


class EvaluationError(ValueError):
    """The prediction and reference folders cannot be evaluated as given (missing, unpaired or mismatched files)."""


# ---------------------------------------------------------------------------------------------------------------
# one case
# ---------------------------------------------------------------------------------------------------------------


def _check_labels(labels: Iterable[int]) -> list[int]:
    """Sorted, de-duplicated integer labels; background (0) and negative values are refused."""
    out: set[int] = set()
    for label in labels:
        if isinstance(label, (bool, np.bool_)) or int(label) != label:
            raise ValueError(f"labels must be integers, got {label!r}.")
        out.add(int(label))
    if 0 in out:
        raise ValueError("label 0 is the background and is never evaluated as a class; leave it out of `labels`.")
    if any(label < 0 for label in out):
        raise ValueError(f"labels must be positive, got {sorted(out)}.")
    return sorted(out)


def _check_spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    """Voxel spacing as a tuple of ``ndim`` positive finite floats."""
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim:
        raise ValueError(f"spacing {spacing} has {len(spacing)} entries but the label maps have {ndim} dimensions.")
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be positive and finite, got {spacing}.")
    return spacing


def _one_hot_foreground(label_map: np.ndarray, labels: Sequence[int]) -> torch.Tensor:
    """Encode ``label_map`` as a ``(1, len(labels), *spatial)`` uint8 tensor, channel ``i`` = ``labels[i]``.

    Values outside ``labels`` (background and classes not evaluated) fall in the dropped channel 0.
    """
    index = np.zeros(label_map.shape, dtype=np.int64)
    for i, label in enumerate(labels, start=1):
        index[label_map == label] = i
    encoded = one_hot(torch.from_numpy(index)[None, None], num_classes=len(labels) + 1, dtype=torch.uint8)
    return encoded[:, 1:]


def _empty_class_result(n_voxels: int) -> dict[str, float]:
    """Metrics of a class that is absent from both the prediction and the reference."""
    nan = float("nan")
    return {"Dice": nan, "IoU": nan, "HD95": nan, "TP": 0, "FP": 0, "FN": 0, "TN": n_voxels, "n_pred": 0, "n_ref": 0}


def evaluate_case(
    pred: np.ndarray, ref: np.ndarray, labels: Sequence[int], spacing: Sequence[float]
) -> dict[str, dict[str, float]]:
    """Per-class metrics of one predicted label map against its reference.

    Args:
        pred: predicted label map (integer values), any number of spatial dimensions.
        ref: reference label map, same shape as ``pred``.
        labels: the non-zero label values to evaluate, one class each (background 0 is never a class;
            passing it raises ``ValueError``). Values of ``pred``/``ref`` not in ``labels`` count as background.
        spacing: voxel size in mm along each axis of the arrays.

    Returns:
        ``{str(label): {"Dice", "IoU", "HD95", "TP", "FP", "FN", "TN", "n_pred", "n_ref"}}`` with labels in
        ascending order. ``HD95`` is MONAI's symmetric 95th-percentile Hausdorff distance between the two
        surfaces, in mm (the larger of the two directed 95th percentiles). Dice, IoU and HD95 carry MONAI's
        float32 precision. The counts are exact ``int`` voxel counts, ``n_pred = TP + FP``, ``n_ref = TP + FN``.

        Edge cases: a class empty in both maps gets Dice, IoU and HD95 = NaN; a class empty in exactly one
        gets Dice = IoU = 0 and HD95 = the field-of-view diagonal ``sqrt(sum((shape_i * spacing_i) ** 2))``
        mm, a finite worst case larger than any distance within the image.

    Raises:
        ValueError: if the shapes differ, the spacing does not match the number of dimensions, or the
            labels are not positive integers.
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}.")
    labels = _check_labels(labels)
    spacing = _check_spacing(spacing, ref.ndim)
    if not labels:
        return {}

    y_pred = _one_hot_foreground(pred, labels)
    y = _one_hot_foreground(ref, labels)

    # ignore_empty=False gives 0 when exactly one map is empty (and 1 when both are, replaced by NaN below)
    dice = compute_dice(y_pred, y, include_background=True, ignore_empty=False)[0]
    iou = compute_iou(y_pred, y, include_background=True, ignore_empty=False)[0]
    # voxel counts in int64: MONAI's get_confusion_matrix returns float32, inexact beyond 2**24 voxels
    spatial = tuple(range(2, y.ndim))
    tp = (y_pred & y).sum(dim=spatial, dtype=torch.int64)[0]
    n_pred = y_pred.sum(dim=spatial, dtype=torch.int64)[0]
    n_ref = y.sum(dim=spatial, dtype=torch.int64)[0]
    fp, fn = n_pred - tp, n_ref - tp
    tn = ref.size - tp - fp - fn

    hd95 = torch.full((len(labels),), float("nan"), dtype=torch.float64)
    hd95[(n_pred > 0) ^ (n_ref > 0)] = math.sqrt(sum((n * s) ** 2 for n, s in zip(ref.shape, spacing)))
    both = torch.nonzero((n_pred > 0) & (n_ref > 0)).flatten()
    if both.numel():
        with warnings.catch_warnings():
            # MONAI 1.5+ passes a deprecated argument to itself; nothing the caller can act on
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
            hd95[both] = compute_hausdorff_distance(
                y_pred[:, both], y[:, both], include_background=True, percentile=95, spacing=list(spacing)
            )[0].double()

    results: dict[str, dict[str, float]] = {}
    for i, label in enumerate(labels):
        if n_pred[i] == 0 and n_ref[i] == 0:
            results[str(label)] = _empty_class_result(int(tn[i]))
            continue
        results[str(label)] = {
            "Dice": float(dice[i]),
            "IoU": float(iou[i]),
            "HD95": float(hd95[i]),
            "TP": int(tp[i]),
            "FP": int(fp[i]),
            "FN": int(fn[i]),
            "TN": int(tn[i]),
            "n_pred": int(n_pred[i]),
            "n_ref": int(n_ref[i]),
        }
    return results


# ---------------------------------------------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------------------------------------------


def _split_case_id(name: str) -> tuple[str, str] | None:
    """``(case_id, extension)`` of a supported image file name, else ``None`` (hidden files included)."""
    suffix = image_io.image_suffix(name)
    if name.startswith(".") or suffix not in SUPPORTED_EXTENSIONS:
        return None
    return image_io.case_id(name), suffix


def _list_cases(folder: Path, role: str) -> dict[str, Path]:
    """Map case id -> image file for every supported image in ``folder`` (not recursive)."""
    if not folder.is_dir():
        raise EvaluationError(f"{role} folder {folder} does not exist or is not a folder.")
    cases: dict[str, Path] = {}
    duplicates: list[str] = []
    for path in sorted(folder.iterdir()):
        split = _split_case_id(path.name)
        if split is None or not path.is_file():
            continue
        case_id = split[0]
        if case_id in cases:
            duplicates.append(f"  {case_id}: {cases[case_id].name} and {path.name}")
            continue
        cases[case_id] = path
    if duplicates:
        raise EvaluationError(
            f"{role} folder {folder} holds several images for the same case id:\n" + "\n".join(duplicates)
        )
    return cases


def _drop_trailing_singletons(shape: Sequence[int]) -> tuple[int, ...]:
    """Drop size-1 axes beyond the third (e.g. NIfTI ``(x, y, z, 1)`` label maps)."""
    shape = tuple(int(n) for n in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _read_header(path: Path) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Shape and spacing (mm) of an image without reading its voxels; axes in (x, y, z) order."""
    header = read_header(path)
    shape = _drop_trailing_singletons(header.shape)
    return shape, tuple(float(z) for z in header.spacing)[: len(shape)]


def _read_label_map(path: Path) -> tuple[np.ndarray, tuple[float, ...]]:
    """Voxels and spacing (mm) of a label map, axes in (x, y, z) order whatever the file format
    (:func:`ul3d.data.io.read_array`). Floating-point label maps are accepted when every value is integral.
    """
    array, header = read_array(path)
    if header.channels != 1:
        raise EvaluationError(f"{path} is a multi-component image, not a label map.")
    array = np.asarray(array).reshape(_drop_trailing_singletons(array.shape))
    if not np.issubdtype(array.dtype, np.integer) and not np.issubdtype(array.dtype, np.bool_):
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise EvaluationError(f"{path} holds non-integer values; expected a label map.")
        array = rounded.astype(np.int64)
    return array, tuple(float(z) for z in header.spacing)[: array.ndim]


# ---------------------------------------------------------------------------------------------------------------
# folders and reports
# ---------------------------------------------------------------------------------------------------------------


def _nanmean(values: Sequence[float]) -> float:
    """Mean ignoring NaN; NaN (without a warning) when there is nothing to average."""
    array = np.asarray(values, dtype=np.float64)
    array = array[~np.isnan(array)]
    return float(array.mean()) if array.size else float("nan")


def _normalise_label_names(label_names: Mapping[Any, str] | None) -> dict[int, str]:
    return {int(k): str(v) for k, v in (label_names or {}).items()}


def _summarise(
    per_case: list[dict[str, Any]], labels: Sequence[int], label_names: dict[int, str]
) -> dict[str, Any]:
    """Assemble the nnU-Net-v2-style summary from the per-case entries."""
    mean = {
        str(label): {m: _nanmean([case["metrics"][str(label)][m] for case in per_case]) for m in METRIC_NAMES}
        for label in labels
    }
    foreground_mean = {m: _nanmean([mean[str(label)][m] for label in labels]) for m in METRIC_NAMES}
    summary: dict[str, Any] = {"metric_per_case": per_case, "mean": mean, "foreground_mean": foreground_mean}
    if label_names:
        summary["label_names"] = {str(label): label_names[label] for label in sorted(label_names)}
    summary["hd95_unit"] = "mm"
    return summary


def _write_json(summary: dict[str, Any], path: Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(summary, f, indent=4)  # allow_nan: NaN is written as NaN, as nnU-Net does
            f.write("\n")


def _write_csv(summary: dict[str, Any], case_ids: Sequence[str], label_names: dict[int, str], path: Path) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(_CSV_COLUMNS)
            for case_id, case in zip(case_ids, summary["metric_per_case"]):
                for key, metrics in case["metrics"].items():
                    name = label_names.get(int(key), "")
                    writer.writerow([case_id, key, name] + [metrics[c] for c in _CSV_COLUMNS[3:]])


def _format_number(value: float, digits: int) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def format_summary_table(summary: Mapping[str, Any], label_names: Mapping[Any, str] | None = None) -> str:
    """Plain-text table of a summary from :func:`evaluate_folder`: one row per class, then the foreground mean.

    Args:
        summary: the summary dict (or a loaded ``summary.json``).
        label_names: class names by label; defaults to the summary's ``label_names``, if any.

    Returns:
        The table, columns ``class``, mean ``Dice``, ``IoU`` and ``HD95`` (mm), without a trailing newline.
        Means ignore NaN (cases where the class is absent from both maps); ``nan`` means no case counted.
    """
    names = _normalise_label_names(label_names if label_names is not None else summary.get("label_names"))
    rows: list[tuple[str, str, str, str]] = []
    for key, metrics in summary["mean"].items():
        name = names.get(int(key))
        rows.append(
            (
                f"{key} {name}" if name else key,
                _format_number(metrics["Dice"], 4),
                _format_number(metrics["IoU"], 4),
                _format_number(metrics["HD95"], 2),
            )
        )
    fg = summary["foreground_mean"]
    footer = (
        "foreground mean",
        _format_number(fg["Dice"], 4),
        _format_number(fg["IoU"], 4),
        _format_number(fg["HD95"], 2),
    )
    header = ("class", "Dice", "IoU", "HD95 [mm]")
    widths = [max(len(row[i]) for row in [header, footer, *rows]) for i in range(4)]

    def line(row: Sequence[str]) -> str:
        return "  ".join([row[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])])

    rule = "-" * len(line(header))
    n_cases = len(summary.get("metric_per_case", []))
    title = f"Evaluation of {n_cases} case{'s' if n_cases != 1 else ''} (means over cases, NaN ignored)"
    return "\n".join([title, line(header), rule, *(line(r) for r in rows), rule, line(footer)])


def evaluate_folder(
    pred_dir: str | os.PathLike,
    ref_dir: str | os.PathLike,
    labels: Sequence[int] | None = None,
    output_dir: str | os.PathLike | None = None,
    label_names: dict[int, str] | None = None,
    quiet: bool = False,
    case_ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Evaluate every reference label map in ``ref_dir`` against the same-named prediction in ``pred_dir``.

    Files are paired by case id, the file name without ``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha`` or ``.mhd``
    (hidden files and other files are ignored). NIfTI is read with nibabel, the others with SimpleITK (both
    as ``(x, y, z)`` arrays); the voxel spacing is taken from the reference header. A prediction without a
    reference is reported (logged warning) and skipped. All pairs are checked before any metric is computed.

    Args:
        pred_dir: folder of predicted label maps.
        ref_dir: folder of reference label maps.
        labels: non-zero labels to evaluate; default: every non-zero value present in any reference, sorted.
        output_dir: where ``summary.json`` and ``metrics.csv`` are written (atomically); default ``pred_dir``.
        label_names: optional class names by label, stored in ``summary.json`` and used in the CSV and table.
        quiet: if ``False``, print :func:`format_summary_table` of the result.
        case_ids: evaluate only these cases; other files in the folders (e.g. left by earlier runs) are ignored.

    Returns:
        The summary written to ``summary.json``: ``metric_per_case`` (list of ``{"metrics": {label: {...}},
        "prediction_file", "reference_file"}`` in case-id order), ``mean`` (per class, per metric, NaN-ignoring
        mean over cases), ``foreground_mean`` (per metric, NaN-ignoring mean over classes of the class means),
        ``label_names`` (if given) and ``hd95_unit`` (``"mm"``). See :func:`evaluate_case` for the metrics and
        the empty-class conventions.

    Raises:
        EvaluationError: if a folder is missing or holds no reference, if references lack predictions (all
            missing cases are listed), if a case id is ambiguous, or if a pair's shapes differ (all such
            pairs are listed with both files and shapes).
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    output_dir = Path(output_dir) if output_dir is not None else pred_dir
    names = _normalise_label_names(label_names)
    labels = _check_labels(labels) if labels is not None else None

    refs = _list_cases(ref_dir, "reference")
    preds = _list_cases(pred_dir, "prediction")
    if case_ids is not None:
        wanted = {str(c) for c in case_ids}
        refs = {c: f for c, f in refs.items() if c in wanted}
        preds = {c: f for c, f in preds.items() if c in wanted}
    if not refs:
        raise EvaluationError(f"reference folder {ref_dir} holds no {'/'.join(SUPPORTED_EXTENSIONS)} images.")
    for case_id in sorted(set(preds) - set(refs)):
        logger.warning("prediction %s has no reference in %s; it is not evaluated.", preds[case_id], ref_dir)
    missing = sorted(set(refs) - set(preds))
    if missing:
        listing = "\n".join(f"  {case_id} (reference {refs[case_id]})" for case_id in missing)
        raise EvaluationError(
            f"{len(missing)} of {len(refs)} reference case(s) have no prediction in {pred_dir}:\n{listing}"
        )

    case_ids = sorted(refs)
    mismatched: list[str] = []
    for case_id in case_ids:
        ref_shape, ref_spacing = _read_header(refs[case_id])
        pred_shape, pred_spacing = _read_header(preds[case_id])
        if ref_shape != pred_shape:
            mismatched.append(f"  {preds[case_id]} {pred_shape} vs reference {refs[case_id]} {ref_shape}")
        elif not np.allclose(pred_spacing, ref_spacing, rtol=1e-3, atol=1e-5):
            logger.warning(
                "prediction %s has spacing %s but reference %s has %s; the reference spacing is used.",
                preds[case_id],
                pred_spacing,
                refs[case_id],
                ref_spacing,
            )
    if mismatched:
        raise EvaluationError("prediction and reference shapes differ:\n" + "\n".join(mismatched))

    per_case: list[dict[str, Any]] = []
    discovered: set[int] = set()
    n_voxels: list[int] = []
    for case_id in case_ids:
        ref, spacing = _read_label_map(refs[case_id])
        pred, _ = _read_label_map(preds[case_id])
        if pred.shape != ref.shape:  # headers agreed; guard against unusual files
            raise EvaluationError(
                f"prediction and reference shapes differ:\n  {preds[case_id]} {pred.shape} vs reference "
                f"{refs[case_id]} {ref.shape}"
            )
        if labels is None:
            # single pass: evaluate what this case holds; classes found later are filled in below
            ref_labels = {int(v) for v in np.unique(ref) if v > 0}
            discovered |= ref_labels
            case_labels = sorted(ref_labels | {int(v) for v in np.unique(pred) if v > 0})
        else:
            case_labels = labels
        metrics = evaluate_case(pred, ref, case_labels, spacing)
        per_case.append(
            {"metrics": metrics, "prediction_file": str(preds[case_id]), "reference_file": str(refs[case_id])}
        )
        n_voxels.append(int(ref.size))

    if labels is None:
        labels = sorted(discovered)
        for case, size in zip(per_case, n_voxels):
            # a class absent from this case's reference and prediction: the both-empty result
            case["metrics"] = {str(k): case["metrics"].get(str(k), _empty_class_result(size)) for k in labels}
        if not labels:
            logger.warning("the references in %s hold no non-zero label; there is nothing to evaluate.", ref_dir)

    summary = _summarise(per_case, labels, names)
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_json(summary, output_dir / "summary.json")
    _write_csv(summary, case_ids, names, output_dir / "metrics.csv")
    if not quiet:
        print(format_summary_table(summary))
    return summary
