"""Dataset readers producing MONAI datalists: MSD, FeTA 2021, Synapse/BTCV, nnU-Net v2 and plain datalists.

Every reader returns a :class:`DatasetSpec` whose ``training``/``test`` entries are MONAI datalist items with
absolute paths::

    {"id": "prostate_00", "image": "/data/Task05_Prostate/imagesTr/prostate_00.nii.gz", "label": "..."}

``image`` is one path (a single-channel image, or one 4-D NIfTI whose 4th axis holds the channels) or a list of
paths, one per channel; MONAI's ``LoadImaged`` + ``EnsureChannelFirstd`` handle both. Readers check the files of
their own layout and raise :class:`~ul3d.data.validation.DatasetError` listing every problem they found (when they
find one, the cases' contents are checked too, so that one error lists everything); the image contents of a
well-formed dataset are checked by :func:`~ul3d.data.validation.validate_dataset`.
"""

from __future__ import annotations

import csv
import json
import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ul3d.data.io import ImageReadError, case_id, read_header
from ul3d.data.validation import DatasetError, validate_dataset

__all__ = [
    "BTCV_8ORGAN_CLASSES",
    "BTCV_8ORGAN_LABEL_MAP",
    "BTCV_8ORGAN_TEST_CASES",
    "BTCV_CLASSES",
    "FETA_CLASSES",
    "LAYOUTS",
    "READERS",
    "DatasetError",
    "DatasetSpec",
    "load_dataset",
    "read_btcv",
    "read_datalist",
    "read_feta",
    "read_msd",
    "read_nnunet",
]

LAYOUTS: tuple[str, ...] = ("msd", "feta", "btcv", "nnunet", "datalist")

FETA_CLASSES: list[str] = [
    "background", "external CSF", "grey matter", "white matter", "ventricles", "cerebellum", "deep grey matter",
    "brainstem",
]  # fmt: skip
BTCV_CLASSES: list[str] = [
    "background", "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior vena cava", "portal and splenic veins", "pancreas", "right adrenal gland", "left adrenal gland",
]  # fmt: skip
BTCV_8ORGAN_CLASSES: list[str] = [
    "background", "aorta", "gallbladder", "left kidney", "right kidney", "liver", "pancreas", "spleen", "stomach",
]  # fmt: skip
#: TransUNet's 8-organ protocol: BTCV label value -> class index; esophagus, veins and adrenal glands -> background.
BTCV_8ORGAN_LABEL_MAP: dict[int, int] = {
    0: 0, 8: 1, 4: 2, 3: 3, 2: 4, 6: 5, 11: 6, 1: 7, 7: 8, 5: 0, 9: 0, 10: 0, 12: 0, 13: 0,
}  # fmt: skip
#: TransUNet's test cases (numbers of ``img00XX``); the other 18 labelled cases are for training.
BTCV_8ORGAN_TEST_CASES: tuple[int, ...] = (1, 2, 3, 4, 8, 22, 25, 29, 32, 35, 36, 38)

Problems = list[tuple[str, str]]


@dataclass
class DatasetSpec:
    """A segmentation dataset as MONAI datalists plus what the pipeline needs to know about it.

    Attributes:
        name: display name.
        root: the dataset folder (or datalist file).
        layout: ``"msd"``, ``"feta"``, ``"btcv"``, ``"nnunet"`` or ``"datalist"``.
        channel_names: one name per input channel, e.g. ``["T2", "ADC"]``.
        class_names: one name per class; the index is the label value after ``label_map``; ``[0]`` is background.
        training: ``{"id", "image", "label"}`` items with absolute paths.
        test: ``{"id", "image"}`` items, with ``"label"`` when known.
        label_map: applied to the label files' values at load time (e.g. BTCV's 8-organ protocol).
        source_labels: label values allowed in the files (before ``label_map``); ``None``: ``range(num_classes)``.
        file_ending: the image files' suffix.
    """

    name: str
    root: Path
    layout: str
    channel_names: list[str]
    class_names: list[str]
    training: list[dict[str, Any]]
    test: list[dict[str, Any]] = field(default_factory=list)
    label_map: dict[int, int] | None = None
    source_labels: list[int] | None = None
    file_ending: str = ".nii.gz"

    def remap_labels(self, labels):
        """Label values of a label-file array in the trained label space (``label_map`` applied; unchanged without one)."""
        import numpy as np

        if not self.label_map:
            return labels
        lut = np.zeros(int(max(self.label_map)) + 1, dtype=np.uint8)
        for src, dst in self.label_map.items():
            lut[src] = dst
        return lut[np.asarray(labels).astype(np.int64)]

    @property
    def num_channels(self) -> int:
        """Number of input channels."""
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        """Number of classes, background included."""
        return len(self.class_names)

    def to_datalist(self) -> dict[str, list[dict[str, Any]]]:
        """The MONAI datalist ``{"training": [...], "test": [...]}`` (copies of the items)."""
        return {"training": [dict(d) for d in self.training], "test": [dict(d) for d in self.test]}


# --------------------------------------------------------------------------------------------------- helpers
def _abs(base: Path, path: str | os.PathLike) -> str:
    """``path`` made absolute against ``base`` (``./`` and ``..`` collapsed, symlinks kept)."""
    path = Path(os.path.expanduser(str(path)))
    return os.path.normpath(path if path.is_absolute() else Path(base).absolute() / path)


def _missing(paths: str | Sequence[str], problems: Problems, what: str = "file not found") -> bool:
    """Record every path of ``paths`` that is not a file; whether any was missing."""
    missing = [p for p in ([paths] if isinstance(paths, str) else paths) if not os.path.isfile(p)]
    problems.extend((p, what) for p in missing)
    return bool(missing)


def _read_json(path: Path, name: str, root: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(name, root, [(str(path), "missing (expected a dataset.json describing the dataset)")])
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(name, root, [(str(path), f"malformed JSON: {e}")]) from e
    if not isinstance(data, dict):
        raise DatasetError(name, root, [(str(path), f"expected a JSON object, got {type(data).__name__}")])
    return data


def _indexed_names(value: Any, where: str, what: str, problems: Problems) -> list[str]:
    """Names from ``{"0": "T2", "1": "ADC"}`` (or a plain list), ordered by index; indices must be 0..N-1."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    if not isinstance(value, Mapping) or not value:
        problems.append((where, f'\'{what}\' must be a non-empty mapping like {{"0": "name"}}, got {value!r}'))
        return []
    try:
        indexed = {int(k): str(v) for k, v in value.items()}
    except (TypeError, ValueError):
        problems.append((where, f"'{what}' keys must be integer indices, got {list(value)}"))
        return []
    if sorted(indexed) != list(range(len(indexed))):
        problems.append((where, f"'{what}' indices must be 0..{len(indexed) - 1}, got {sorted(indexed)}"))
        return []
    return [indexed[i] for i in range(len(indexed))]


def _class_names(labels: Any, where: str, problems: Problems) -> list[str]:
    """Class names from MSD-style ``{"0": "background", ...}``, nnU-Net-style ``{"background": 0, ...}`` or a list."""
    if isinstance(labels, Mapping) and labels and all(isinstance(v, (int, list, tuple)) for v in labels.values()):
        regions = [k for k, v in labels.items() if isinstance(v, (list, tuple))]
        if regions:
            problem = f"region-based labels are not supported (labels {regions} are lists of values)"
            problems.append((where, problem + "; use one integer value per class"))
            return []
        if "ignore" in labels:
            problems.append((where, "an 'ignore' label is not supported; remove it from 'labels'"))
            return []
        inverted = {}
        for name, value in labels.items():
            if value in inverted:
                problems.append((where, f"labels {inverted[value]!r} and {name!r} share the value {value}"))
                return []
            inverted[value] = name
        return _indexed_names({str(v): n for v, n in inverted.items()}, where, "labels", problems)
    return _indexed_names(labels, where, "labels", problems)


def _check_unique_ids(items: Sequence[dict[str, Any]], problems: Problems) -> None:
    seen: dict[str, Any] = {}
    for item in items:
        first = seen.setdefault(item["id"], item)
        if first is not item:
            files = [_first(first["image"]), _first(item["image"])]
            problems.append((item["id"], f"duplicate case id (images {files[0]} and {files[1]})"))


def _first(image: str | Sequence[str]) -> str:
    return image if isinstance(image, str) else image[0]


def _content_problems(spec: DatasetSpec, reported: Problems) -> Problems:
    """What :func:`validate_dataset` finds beyond the files already ``reported`` (so one error lists everything)."""
    if not spec.class_names:  # the metadata itself is broken: nothing to check the labels against
        return []
    seen = {where for where, _ in reported}
    try:
        validate_dataset(spec, expected_channels=spec.num_channels or None)
    except DatasetError as e:
        return [(where, what) for where, what in e.problems if where not in seen]
    return []


def _finish(spec: DatasetSpec, problems: Problems, require_training: bool = True) -> DatasetSpec:
    """Final checks shared by every reader: unique ids, at least one case; raise the problems found.

    When the layout has problems, the cases' contents are checked as well before raising, so that the error lists
    every problem at once rather than one kind per run.
    """
    _check_unique_ids(list(spec.training) + list(spec.test), problems)
    if require_training and not spec.training and not problems:
        problems.append((str(spec.root), "no training cases found"))
    if problems:
        raise DatasetError(spec.name, spec.root, problems + _content_problems(spec, problems))
    return spec


# ------------------------------------------------------------------------------------------------------- MSD
def read_msd(root: str | os.PathLike) -> DatasetSpec:
    """Read a Medical Segmentation Decathlon task (``dataset.json``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/``).

    Args:
        root: the task folder, e.g. ``Task05_Prostate``.

    Raises:
        DatasetError: ``dataset.json`` missing or malformed, or listed training files missing.
    """
    root = Path(root)
    json_path = root / "dataset.json"
    meta = _read_json(json_path, root.name, root)
    name, where, problems = str(meta.get("name") or root.name), str(json_path), []
    if "modality" not in meta or "labels" not in meta:
        problems.append((where, "expected MSD keys 'modality' and 'labels'"))
        raise DatasetError(name, root, problems)
    channel_names = _indexed_names(meta["modality"], where, "modality", problems)
    class_names = _class_names(meta["labels"], where, problems)
    training = []
    for i, entry in enumerate(meta.get("training") or []):
        if not (
            isinstance(entry, Mapping) and isinstance(entry.get("image"), str) and isinstance(entry.get("label"), str)
        ):
            problems.append((where, f'training[{i}] must be {{"image": path, "label": path}}, got {entry!r}'))
            continue
        image, label = _abs(root, entry["image"]), _abs(root, entry["label"])
        _missing([image, label], problems)
        training.append({"id": case_id(image), "image": image, "label": label})
    test = []
    for entry in meta.get("test") or []:
        image = entry.get("image") if isinstance(entry, Mapping) else entry
        if not isinstance(image, str):
            problems.append((where, f"test entries must be paths, got {entry!r}"))
            continue
        image = _abs(root, image)
        if not os.path.isfile(image):  # test images are optional (often deleted to save space)
            warnings.warn(f"{name}: test image {image} listed in {json_path} is missing; skipped", stacklevel=2)
            continue
        test.append({"id": case_id(image), "image": image})
    spec = DatasetSpec(name, root, "msd", channel_names, class_names, training, test)
    return _finish(spec, problems)


# ------------------------------------------------------------------------------------------------------ FeTA
def _feta_base(root: Path) -> Path:
    """The folder holding the ``sub-*`` folders: ``root`` itself or a single ``feta*`` folder under it."""
    if any(p.is_dir() for p in root.glob("sub-*")):
        return root
    nested = [p for p in root.glob("*") if p.is_dir() and p.name.lower().startswith("feta") and any(p.glob("sub-*"))]
    return nested[0] if len(nested) == 1 else root


def _visible(paths) -> list[Path]:
    return sorted(p for p in paths if not p.name.startswith("."))


def read_feta(root: str | os.PathLike) -> DatasetSpec:
    """Read the FeTA 2021 fetal brain dataset (``sub-XXX/anat/sub-XXX_rec-<rec>_T2w.nii.gz`` + ``..._dseg.nii.gz``).

    Args:
        root: the folder holding the ``sub-*`` folders, or its parent holding a single ``feta*`` folder.

    Raises:
        DatasetError: no subject folders, or a subject without a T2w image or segmentation.
    """
    root = Path(root)
    base = _feta_base(root)
    problems: Problems = []
    subjects = _visible(p for p in base.glob("sub-*") if p.is_dir())
    if not subjects:
        raise DatasetError("FeTA", root, [(str(root), "no sub-*/anat folders found (expected the FeTA layout)")])
    training = []
    for subject in subjects:
        images = _visible((subject / "anat").glob("*_T2w.nii*"))
        if not images:
            problems.append((str(subject / "anat"), "no *_T2w.nii.gz image found"))
        for image in images:
            label = image.with_name(image.name.replace("_T2w.", "_dseg."))
            _missing(str(label), problems, "segmentation not found (expected beside the T2w image)")
            cid = subject.name if len(images) == 1 else case_id(image).removesuffix("_T2w")
            training.append({"id": cid, "image": _abs(base, image), "label": _abs(base, label)})
    spec = DatasetSpec("FeTA", base, "feta", ["T2w"], list(FETA_CLASSES), training)
    return _finish(spec, problems)


# ------------------------------------------------------------------------------------------------------ BTCV
_BTCV_IMAGE = re.compile(r"^img(\d+)(\.nii\.gz|\.nii)$")


def _btcv_base(root: Path) -> Path | None:
    for base in (root, root / "RawData" / "Training", root / "Training", root / "RawData"):
        if (base / "img").is_dir() and (base / "label").is_dir():
            return base
    return None


def _btcv_cases(folder: Path) -> list[tuple[int, Path]]:
    cases = []
    for path in _visible(folder.glob("img*")):
        match = _BTCV_IMAGE.match(path.name)
        if match:
            cases.append((int(match.group(1)), path))
    return cases


def read_btcv(root: str | os.PathLike, protocol: str = "13organ") -> DatasetSpec:
    """Read the Synapse multi-organ (BTCV) dataset: ``img/img0001.nii.gz`` + ``label/label0001.nii.gz``.

    Args:
        root: the folder holding ``img/`` and ``label/``, or a parent with ``RawData/Training/`` or ``Training/``.
        protocol: ``"13organ"``: the 13 BTCV organs, every labelled case for training (unlabelled
            ``Testing/img`` images, when present, as test); ``"8organ"``: TransUNet's protocol, 8 organs through
            :data:`BTCV_8ORGAN_LABEL_MAP` and its 18/12 split (:data:`BTCV_8ORGAN_TEST_CASES` are the test cases).

    Raises:
        DatasetError: no ``img/`` + ``label/`` folders, or an image without its label.
        ValueError: unknown ``protocol``.
    """
    if protocol not in ("13organ", "8organ"):
        raise ValueError(f"unknown BTCV protocol {protocol!r} (expected '13organ' or '8organ')")
    root = Path(root)
    base = _btcv_base(root)
    if base is None:
        problem = "no img/ and label/ folders (looked in ., RawData/Training/, Training/)"
        raise DatasetError("BTCV", root, [(str(root), problem)])
    problems: Problems = []
    training, test = [], []
    for number, image in _btcv_cases(base / "img"):
        label = base / "label" / image.name.replace("img", "label", 1)
        _missing(str(label), problems, f"label not found for {image.name}")
        item = {"id": case_id(image), "image": _abs(base, image), "label": _abs(base, label)}
        (test if protocol == "8organ" and number in BTCV_8ORGAN_TEST_CASES else training).append(item)
    if protocol == "8organ":
        spec = DatasetSpec(
            "BTCV-8organ",
            base,
            "btcv",
            ["CT"],
            list(BTCV_8ORGAN_CLASSES),
            training,
            test,
            label_map=dict(BTCV_8ORGAN_LABEL_MAP),
            source_labels=list(range(len(BTCV_CLASSES))),
        )
    else:
        unlabelled = base.parent / "Testing" / "img" if base.name == "Training" else None
        if unlabelled is not None and unlabelled.is_dir():
            test = [{"id": case_id(p), "image": _abs(base, p)} for _, p in _btcv_cases(unlabelled)]
        spec = DatasetSpec("BTCV", base, "btcv", ["CT"], list(BTCV_CLASSES), training, test)
    return _finish(spec, problems)


# --------------------------------------------------------------------------------------------------- nnU-Net
def _nnunet_group(folder: Path, ending: str, problems: Problems) -> dict[str, dict[int, str]]:
    """``{case: {channel: path}}`` from ``CASE_XXXX<ending>`` files."""
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    cases: dict[str, dict[int, str]] = {}
    for path in _visible(folder.iterdir()):
        match = pattern.match(path.name)
        if match is None:
            if path.name.endswith(ending):
                problems.append((str(path), f"not named CASE_XXXX{ending} (4-digit channel index)"))
            continue
        cases.setdefault(match.group(1), {})[int(match.group(2))] = str(path.absolute())
    return cases


def _nnunet_images(
    case: str, files: dict[int, str], folder: Path, ending: str, n: int, problems: Problems
) -> list[str]:
    """The case's channel files ``0..n-1`` (missing ones recorded as problems, kept in the list at their place)."""
    images = []
    for c in range(n):
        if c not in files:
            problems.append((str(folder.absolute() / f"{case}_{c:04d}{ending}"), "channel file not found"))
        images.append(files.get(c, str(folder.absolute() / f"{case}_{c:04d}{ending}")))
    for c in sorted(c for c in files if c >= n):
        problems.append((files[c], f"channel {c} is not in dataset.json's channel_names ({n} channels)"))
    return images


def read_nnunet(root: str | os.PathLike) -> DatasetSpec:
    """Read an nnU-Net v2 raw dataset (``dataset.json``, ``imagesTr/CASE_0000<ending>``, ``labelsTr/CASE<ending>``).

    Args:
        root: the dataset folder, e.g. ``Dataset001_Prostate``.

    Raises:
        DatasetError: ``dataset.json`` missing or malformed (incl. region-based labels), a case missing a channel
            file or its label, or ``numTraining`` not matching the cases found.
    """
    root = Path(root)
    json_path = root / "dataset.json"
    meta = _read_json(json_path, root.name, root)
    name, where, problems = str(meta.get("name") or root.name), str(json_path), []
    if "channel_names" not in meta or "labels" not in meta:
        raise DatasetError(name, root, [(where, "expected nnU-Net v2 keys 'channel_names' and 'labels'")])
    channel_names = _indexed_names(meta["channel_names"], where, "channel_names", problems)
    class_names = _class_names(meta["labels"], where, problems)
    ending = str(meta.get("file_ending") or ".nii.gz")
    if not (root / "imagesTr").is_dir() or not (root / "labelsTr").is_dir():
        raise DatasetError(name, root, [*problems, (str(root), "expected imagesTr/ and labelsTr/ folders")])
    training = []
    for case, files in sorted(_nnunet_group(root / "imagesTr", ending, problems).items()):
        images = _nnunet_images(case, files, root / "imagesTr", ending, len(channel_names), problems)
        label = str((root / "labelsTr" / f"{case}{ending}").absolute())
        _missing(label, problems, f"label not found for case {case}")
        training.append({"id": case, "image": images, "label": label})
    cases = {item["id"] for item in training}
    for label in _visible((root / "labelsTr").glob(f"*{ending}")):
        if label.name[: -len(ending)] not in cases:
            problems.append((str(label.absolute()), "label without images in imagesTr/"))
    num_training = meta.get("numTraining")
    if num_training is None or not isinstance(num_training, int) or num_training != len(training):
        problems.append((where, f"numTraining is {num_training!r} but {len(training)} training cases were found"))
    test = []
    if (root / "imagesTs").is_dir():
        for case, files in sorted(_nnunet_group(root / "imagesTs", ending, problems).items()):
            images = _nnunet_images(case, files, root / "imagesTs", ending, len(channel_names), problems)
            test.append({"id": case, "image": images})
    spec = DatasetSpec(name, root, "nnunet", channel_names, class_names, training, test, file_ending=ending)
    return _finish(spec, problems)


# -------------------------------------------------------------------------------------------------- datalist
def _datalist_item(entry: Any, base: Path, where: str, needs_label: bool, problems: Problems) -> dict[str, Any] | None:
    """One MONAI datalist entry (a dict, or a plain image path for unlabelled items) with absolute paths."""
    if isinstance(entry, (str, list)):
        entry = {"image": entry}
    image = entry.get("image") if isinstance(entry, Mapping) else None
    if not (isinstance(image, str) or (isinstance(image, list) and image and all(isinstance(p, str) for p in image))):
        problems.append((where, f'expected {{"image": path or [paths], "label": path}}, got {entry!r}'))
        return None
    label = entry.get("label")
    if needs_label and not isinstance(label, str):
        problems.append((where, f"training entry without a 'label' path: {entry!r}"))
        return None
    image = _abs(base, image) if isinstance(image, str) else [_abs(base, p) for p in image]
    item = {**entry, "id": str(entry.get("id") or case_id(_first(image))), "image": image}
    if isinstance(label, str):
        item["label"] = _abs(base, label)
        _missing(item["label"], problems)
    _missing(image, problems)
    return item


def _read_datalist_json(path: Path, problems: Problems) -> tuple[dict[str, Any], list[dict], list[dict]]:
    meta = _read_json(path, path.stem, path)
    training, test = [], []
    for key, needs_label, out in (("training", True, training), ("validation", True, training), ("test", False, test)):
        entries = meta.get(key) or []
        if not isinstance(entries, list):
            problems.append((str(path), f"'{key}' must be a list"))
            continue
        for i, entry in enumerate(entries):
            item = _datalist_item(entry, path.parent, f"{path} [{key}[{i}]]", needs_label, problems)
            if item is not None:
                out.append(item)
    return meta, training, test


def _read_datalist_csv(path: Path, problems: Problems) -> tuple[list[dict], list[dict]]:
    training, test = [], []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = [c.strip() for c in reader.fieldnames or []]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(path.stem, path, [(str(path), f"unreadable CSV: {e}")]) from e
    if "image" not in columns:
        raise DatasetError(path.stem, path, [(str(path), f"expected a header 'image,label[,id]', got {columns}")])
    for line, row in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        images = [p.strip() for p in row.get("image", "").split(";") if p.strip()]
        entry: dict[str, Any] = {"image": images[0] if len(images) == 1 else images}
        if row.get("id"):
            entry["id"] = row["id"]
        if row.get("label"):
            entry["label"] = row["label"]
        item = _datalist_item(entry, path.parent, f"{path} [line {line}]", False, problems) if images else None
        if not images:
            problems.append((f"{path} [line {line}]", "empty 'image'"))
        elif item is not None:
            (training if "label" in item else test).append(item)
    return training, test


def _infer_channels(training: list[dict], test: list[dict], path: Path, problems: Problems) -> list[str]:
    items = training or test
    if not items:
        return []
    image = items[0]["image"]
    if isinstance(image, list):
        return [f"channel{i}" for i in range(len(image))]
    try:
        n = read_header(image).channels
    except ImageReadError as e:
        problems.append((image, f"unreadable: {e.reason}"))
        return []
    return ["image"] if n == 1 else [f"channel{i}" for i in range(n)]


def read_datalist(
    path: str | os.PathLike,
    class_names: Sequence[str] | None = None,
    channel_names: Sequence[str] | None = None,
) -> DatasetSpec:
    """Read a MONAI-style JSON datalist or a CSV list of cases.

    JSON: ``{"training": [{"image": ..., "label": ...}], "validation": [...], "test": [...]}`` with optional
    ``"labels"`` (MSD ``{"0": "background"}`` or nnU-Net ``{"background": 0}`` form), ``"channel_names"`` or
    ``"modality"`` and ``"name"``; validation cases are appended to training (the trainer makes its own split).
    CSV: a header ``image,label[,id]``; ``image`` may hold several channel paths separated by ``;``; rows without
    a label are test cases. Relative paths are relative to the file's folder.

    Args:
        path: the ``.json`` or ``.csv`` file.
        class_names: class names (background first); overrides the file's ``"labels"``; required when the file has
            none (CSV).
        channel_names: channel names; overrides the file's; default: read from the file, else inferred from the
            first case.

    Raises:
        DatasetError: the file is missing or malformed, listed files are missing, or the class names are unknown.
    """
    path = Path(path)
    problems: Problems = []
    if not path.is_file():
        raise DatasetError(path.stem, path, [(str(path), "datalist file not found")])
    meta: dict[str, Any] = {}
    if path.suffix.lower() == ".csv":
        training, test = _read_datalist_csv(path, problems)
    elif path.suffix.lower() == ".json":
        meta, training, test = _read_datalist_json(path, problems)
    else:
        raise DatasetError(path.stem, path, [(str(path), "expected a .json or .csv datalist")])
    if class_names is None and "labels" in meta:
        class_names = _class_names(meta["labels"], str(path), problems)
    elif class_names is None:
        problems.append((str(path), 'class names unknown: add "labels" to the JSON or pass class_names'))
    if channel_names is None and ("channel_names" in meta or "modality" in meta):
        key = "channel_names" if "channel_names" in meta else "modality"
        channel_names = _indexed_names(meta[key], str(path), key, problems)
    elif channel_names is None and not problems:
        channel_names = _infer_channels(training, test, path, problems)
    name = str(meta.get("name") or path.stem)
    spec = DatasetSpec(name, path, "datalist", list(channel_names or []), list(class_names or []), training, test)
    if not training and not test and not problems:
        problems.append((str(path), "no cases listed"))
    return _finish(spec, problems, require_training=False)


# ------------------------------------------------------------------------------------------------- detection
READERS: dict[str, Callable[..., DatasetSpec]] = {
    "msd": read_msd,
    "feta": read_feta,
    "btcv": read_btcv,
    "nnunet": read_nnunet,
    "datalist": read_datalist,
}


def _detect_layout(path: Path) -> str:
    if path.is_file():
        if path.suffix.lower() in (".json", ".csv"):
            return "datalist"
        raise DatasetError(path.stem, path, [(str(path), "a dataset file must be a .json or .csv datalist")])
    json_path = path / "dataset.json"
    if json_path.is_file():
        meta = _read_json(json_path, path.name, path)
        if "channel_names" in meta:
            return "nnunet"
        if "modality" in meta:
            return "msd"
        problem = "has neither 'channel_names' (nnU-Net v2) nor 'modality' (Medical Segmentation Decathlon)"
        raise DatasetError(path.name, path, [(str(json_path), problem)])
    if any((p / "anat").is_dir() for p in _feta_base(path).glob("sub-*")):
        return "feta"
    if _btcv_base(path) is not None:
        return "btcv"
    looked_for = [
        "dataset.json with 'channel_names' (nnU-Net v2)",
        "dataset.json with 'modality' (msd)",
        "sub-*/anat folders (feta)",
        "img/ + label/, RawData/Training/ or Training/ (btcv)",
        "a .json or .csv file (datalist)",
    ]
    raise DatasetError(path.name, path, [(str(path), "unknown dataset layout; looked for " + "; ".join(looked_for))])


def load_dataset(path: str | os.PathLike, layout: str | None = None, **kwargs: Any) -> DatasetSpec:
    """Read a dataset, detecting its layout when ``layout`` is ``None``.

    Detection: a ``.json``/``.csv`` file is a datalist; a folder with a ``dataset.json`` holding ``channel_names``
    is nnU-Net v2, one holding ``modality`` is MSD; ``sub-*/anat`` folders are FeTA; ``img/`` + ``label/`` (or
    ``RawData/Training/``, ``Training/``) are BTCV.

    Args:
        path: the dataset folder or datalist file.
        layout: one of :data:`LAYOUTS`, or ``None`` to detect it.
        kwargs: passed to the reader (e.g. ``protocol="8organ"`` for BTCV, ``class_names=`` for a datalist).

    Raises:
        DatasetError: the path is missing, the layout cannot be detected, or the reader found problems.
        ValueError: unknown ``layout``.
    """
    path = Path(path)
    if layout is not None and layout not in READERS:
        raise ValueError(f"unknown dataset layout {layout!r} (expected one of {', '.join(LAYOUTS)})")
    if not path.exists():
        raise DatasetError(path.name, path, [(str(path), "not found")])
    return READERS[layout or _detect_layout(path)](path, **kwargs)


def cached_bytes(items: Sequence[Mapping[str, Any]], spacing: Sequence[float] | None, pad_to: Sequence[int]) -> int:
    """Estimated float32 size of the preprocessed (cached) ``items``, read from the image headers only.

    Each case: its image channels plus one label channel over its shape resampled to ``spacing`` (``None``: as
    stored) and padded to at least ``pad_to``. Reorientation and foreground cropping are ignored: an estimate for
    deciding where a training set can be cached (``data.cache_device: auto``), not an allocation.
    """
    total = 0
    for item in items:
        paths = [item["image"]] if isinstance(item["image"], (str, os.PathLike)) else list(item["image"])
        headers = [read_header(p) for p in paths]
        h = headers[0]
        target = spacing or h.spacing
        shape = [max(int(round(n * s / t)), int(r)) for n, s, t, r in zip(h.shape, h.spacing, target, pad_to)]
        voxels = 1
        for n in shape:
            voxels *= n
        total += 4 * voxels * (sum(x.channels for x in headers) + ("label" in item))
    return total

