"""Dataset checks run before any training starts: every problem of every case, reported at once."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ul3d.data.io import ImageHeader, ImageReadError, read_array, read_header

if TYPE_CHECKING:
    from ul3d.data.datasets import DatasetSpec

__all__ = ["DatasetError", "validate_dataset"]

_AFFINE_ATOL = 1e-3
_MAX_VALUES_SHOWN = 10


class DatasetError(ValueError):
    """A dataset that cannot be used as it is, with every problem found.

    The message is one readable block::

        Prostate: 2 problem(s) found in /data/Task05_Prostate
          labelsTr/prostate_00.nii.gz: shape (320, 320, 15) does not match the image's (320, 320, 20)
          imagesTr/prostate_01.nii.gz: 12 NaN/Inf intensities

    Args:
        name: the dataset's name.
        root: the dataset's folder or list file; problem files under it are shown relative to it.
        problems: ``(file or case, problem)`` pairs.
    """

    def __init__(self, name: str, root: str | os.PathLike, problems: Sequence[tuple[str, str]]) -> None:
        self.name = name
        self.root = Path(root)
        self.problems: list[tuple[str, str]] = [(str(where), str(what)) for where, what in problems]
        super().__init__(self._format())

    def __reduce__(self):  # picklable despite the custom signature
        return type(self), (self.name, self.root, self.problems)

    def _display(self, where: str) -> str:
        path = Path(where)
        if path.is_absolute():
            base = self.root if self.root.is_dir() else self.root.parent
            try:
                return str(path.relative_to(base))
            except ValueError:
                return where
        return where

    def _format(self) -> str:
        lines = [f"{self.name}: {len(self.problems)} problem(s) found in {self.root}"]
        lines += [f"  {self._display(where)}: {what}" for where, what in self.problems]
        return "\n".join(lines)


def _as_list(image: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(image, (str, os.PathLike)):
        return [Path(image)]
    return [Path(p) for p in image]


def _fmt_shape(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def _fmt_values(values: np.ndarray) -> str:
    shown = ", ".join(f"{v:g}" for v in values[:_MAX_VALUES_SHOWN])
    return shown + (f", ... ({len(values)} in all)" if len(values) > _MAX_VALUES_SHOWN else "")


def _read_headers(paths: list[Path], problems: list[tuple[str, str]]) -> list[ImageHeader] | None:
    """Headers of ``paths``; ``None`` (with the problems recorded) when one is missing or unreadable."""
    headers = []
    for path in paths:
        if not path.exists():
            problems.append((str(path), "file not found"))
            continue
        try:
            headers.append(read_header(path))
        except ImageReadError as e:
            problems.append((str(path), f"unreadable: {e.reason}"))
    return headers if len(headers) == len(paths) else None


def _check_channel_files(paths: list[Path], headers: list[ImageHeader], problems: list[tuple[str, str]]) -> bool:
    """Every channel file of a multi-file image must share the first file's grid."""
    ok = True
    first = headers[0]
    for path, header in zip(paths[1:], headers[1:]):
        if header.shape != first.shape:
            problem = (
                f"shape {_fmt_shape(header.shape)} does not match the first channel file's {_fmt_shape(first.shape)}"
            )
            problems.append((str(path), f"{problem} (first: {paths[0].name})"))
            ok = False
        elif not np.allclose(header.affine, first.affine, atol=_AFFINE_ATOL):
            problems.append((str(path), f"affine does not match the first channel file {paths[0].name}"))
            ok = False
    return ok


def _check_geometry(
    image_path: Path, image: ImageHeader, label_path: Path, label: ImageHeader, problems: list[tuple[str, str]]
) -> None:
    if label.channels != 1:
        problems.append((str(label_path), f"label has {label.channels} channels (expected a single 3-D map)"))
    if label.shape != image.shape:
        problem = f"shape {_fmt_shape(label.shape)} does not match the image's {_fmt_shape(image.shape)}"
        problems.append((str(label_path), f"{problem} (image: {image_path.name})"))
    elif not np.allclose(label.affine, image.affine, atol=_AFFINE_ATOL):
        diff = float(np.abs(label.affine - image.affine).max())
        problem = f"affine does not match the image's (largest difference {diff:.4g})"
        problems.append((str(label_path), f"{problem} (image: {image_path.name})"))


def _check_label_values(label_path: Path, allowed: set[int], problems: list[tuple[str, str]]) -> None:
    try:
        data, _ = read_array(label_path)
    except ImageReadError as e:
        problems.append((str(label_path), f"unreadable: {e.reason}"))
        return
    values = np.unique(data)
    if np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.complexfloating):
        finite = np.isfinite(values)
        bad = values[~finite | (values != np.round(np.where(finite, values, 0)))]
        if bad.size:
            problems.append((str(label_path), f"label values are not integers: {_fmt_values(bad)}"))
            return
    unexpected = np.asarray([v for v in values if int(v) not in allowed])
    if unexpected.size:
        expected = _fmt_values(np.asarray(sorted(allowed)))
        problems.append((str(label_path), f"unexpected label values {_fmt_values(unexpected)} (expected {expected})"))


def _check_intensities(paths: list[Path], problems: list[tuple[str, str]]) -> None:
    for path in paths:
        try:
            data, _ = read_array(path)
        except ImageReadError as e:
            problems.append((str(path), f"unreadable: {e.reason}"))
            continue
        if np.issubdtype(data.dtype, np.floating):
            n_bad = int(data.size - np.count_nonzero(np.isfinite(data)))
            if n_bad:
                n_nan = int(np.count_nonzero(np.isnan(data)))
                problems.append((str(path), f"{n_bad} non-finite intensities ({n_nan} NaN, {n_bad - n_nan} Inf)"))


def _check_case(
    item: dict[str, Any],
    allowed: set[int],
    expected_channels: int | None,
    check_intensities: bool,
    problems: list[tuple[str, str]],
) -> None:
    image_paths = _as_list(item["image"])
    label_path = Path(item["label"]) if item.get("label") else None
    images = _read_headers(image_paths, problems)
    labels = _read_headers([label_path], problems) if label_path is not None else []
    if images is None:
        return
    if not _check_channel_files(image_paths, images, problems):
        return
    channels = sum(h.channels for h in images)
    if expected_channels is not None and channels != expected_channels:
        problems.append((str(image_paths[0]), f"image has {channels} channel(s), expected {expected_channels}"))
    if labels:
        _check_geometry(image_paths[0], images[0], label_path, labels[0], problems)
        _check_label_values(label_path, allowed, problems)
    if check_intensities:
        _check_intensities(image_paths, problems)


def validate_dataset(
    spec: DatasetSpec,
    expected_channels: int | None = None,
    check_intensities: bool = True,
    items: Sequence[dict[str, Any]] | None = None,
) -> None:
    """Check every case of a dataset and report all problems in one :class:`DatasetError`.

    Headers are checked first (missing/unreadable files, image/label shape and affine agreement, channel files
    sharing one grid, channel count); voxel data are loaded only for the value checks (label values integral and
    among ``spec.source_labels`` -- or ``range(spec.num_classes)`` --, finite image intensities).

    Args:
        spec: the dataset.
        expected_channels: the channel count every image must have (``None``: not checked).
        check_intensities: also load the images to look for NaN/Inf intensities.
        items: the cases to check (default: every training case and every labelled test case).

    Raises:
        DatasetError: listing every problem of every bad case.
    """
    if items is None:
        items = list(spec.training) + [item for item in spec.test if item.get("label")]
    allowed = set(int(v) for v in (spec.source_labels if spec.source_labels is not None else range(spec.num_classes)))
    problems: list[tuple[str, str]] = []
    for item in items:
        _check_case(item, allowed, expected_channels, check_intensities, problems)
    if problems:
        raise DatasetError(spec.name, spec.root, problems)
