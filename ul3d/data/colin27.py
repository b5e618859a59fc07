"""The Colin27 T1 + AAL atlas demo dataset (Debian package ``mricron-data``).

An honest split on one real brain (``docs/real-data``): train on the left hemisphere, hold out the
right hemisphere mirrored onto the left (contralateral generalisation), leave out the midline slab.
Written as an nnU-Net raw dataset so the demo runs through the same readers as every dataset.

* coarse (default, CPU): 7 classes — background, cerebral cortex, caudate, putamen, pallidum,
  thalamus, cerebellum + vermis.
* full: 54 bilateral AAL classes (label k -> (k + 1) // 2 for k in 1..108; vermis left as background).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..utils import atomic_path
from .io import write_nifti

__all__ = ["DEFAULT_DATA_DIR", "COARSE_CLASSES", "find_colin27", "prepare_colin27", "MissingDataError"]

DEFAULT_DATA_DIR = Path("/usr/share/mricron/templates")
COARSE_CLASSES = ["background", "cerebral cortex", "caudate", "putamen", "pallidum", "thalamus", "cerebellum"]
_FILES = ("ch2bet.nii.gz", "aal.nii.gz", "aal.nii.txt")
#: voxel index of x = 0 on the Colin27/AAL grid; training keeps i <= 87, held-out i >= 93
_LEFT_LAST, _RIGHT_FIRST, _MIDLINE = 87, 93, 90


class MissingDataError(FileNotFoundError):
    """The Colin27/AAL files are not where they were looked for."""


def find_colin27(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding ``ch2bet.nii.gz``, ``aal.nii.gz`` and ``aal.nii.txt``, or a clear error saying how to get it."""
    folder = Path(data_dir) if data_dir else DEFAULT_DATA_DIR
    missing = [f for f in _FILES if not (folder / f).is_file()]
    if missing:
        raise MissingDataError(
            f"Colin27/AAL files {missing} not found in {folder}. Install them with "
            f"`sudo apt-get install mricron-data` (Debian/Ubuntu; they land in {DEFAULT_DATA_DIR}), "
            f"or point --data-dir at a folder holding {', '.join(_FILES)}."
        )
    return folder


def _aal_names(folder: Path) -> dict[int, str]:
    names = {}
    for line in (folder / "aal.nii.txt").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    return names


def _class_map(full: bool, folder: Path) -> tuple[np.ndarray, list[str]]:
    """Lookup table AAL label (0..255) -> class, and the class names."""
    lut = np.zeros(256, dtype=np.uint8)
    if full:
        names = _aal_names(folder)
        classes = ["background"]
        for k in range(1, 109, 2):
            lut[k] = lut[k + 1] = (k + 1) // 2
            classes.append(names.get(k, f"AAL{k}").removesuffix("_L"))
        return lut, classes
    lut[1:91] = 1
    for value, cls in ((71, 2), (72, 2), (73, 3), (74, 3), (75, 4), (76, 4), (77, 5), (78, 5)):
        lut[value] = cls
    lut[91:117] = 6
    return lut, list(COARSE_CLASSES)


def prepare_colin27(out: str | os.PathLike, data_dir: str | os.PathLike | None = None, full: bool = False) -> Path:
    """Write the demo as an nnU-Net raw dataset under ``out`` and return its root.

    Cases (1 mm, the atlas grid): ``colin27_left`` (voxels i <= 87) and ``colin27_right_mirrored``
    (i >= 93, flipped along the first axis so it overlays the left hemisphere). Both share the left
    half's affine, so the mirrored half is a plausible left hemisphere of a new subject.
    """
    import nibabel as nib

    folder = find_colin27(data_dir)
    t1_img = nib.load(str(folder / "ch2bet.nii.gz"))
    aal = np.asarray(nib.load(str(folder / "aal.nii.gz")).dataobj).astype(np.uint8)
    t1 = np.asarray(t1_img.dataobj).astype(np.float32)
    if t1.shape != aal.shape or t1.shape[0] <= _RIGHT_FIRST:
        raise ValueError(f"{folder}: expected ch2bet and aal on the same 181×217×181 grid, got {t1.shape} and {aal.shape}")
    lut, classes = _class_map(full, folder)
    labels = lut[aal]
    affine = t1_img.affine
    width = _LEFT_LAST + 1
    halves = {
        "colin27_left": (t1[:width], labels[:width]),
        "colin27_right_mirrored": (t1[_RIGHT_FIRST:][::-1][:width], labels[_RIGHT_FIRST:][::-1][:width]),
    }
    root = Path(out)
    for case, (img, lab) in halves.items():
        write_nifti(np.ascontiguousarray(img), affine, root / "imagesTr" / f"{case}_0000.nii.gz", dtype=np.float32)
        write_nifti(np.ascontiguousarray(lab), affine, root / "labelsTr" / f"{case}.nii.gz", dtype=np.uint8)
    meta = {
        "name": "Colin27_AAL_" + ("full" if full else "coarse"),
        "description": "Colin27 T1 (brain-extracted) + AAL; left hemisphere for training, mirrored right held out",
        "channel_names": {"0": "T1"},
        "labels": {name: i for i, name in enumerate(classes)},
        "numTraining": len(halves),
        "file_ending": ".nii.gz",
        "licence": "Debian mricron-data (BSD-3-Clause); AAL: Tzourio-Mazoyer et al. 2002; Colin27: MNI",
    }
    with atomic_path(root / "dataset.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2))
    return root
