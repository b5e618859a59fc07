"""``ul3d demo``: a clear message without the data; the whole path on the real Colin27/AAL data when installed."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ul3d.cli import main
from ul3d.data.colin27 import DEFAULT_DATA_DIR, prepare_colin27

HAVE_DATA = (DEFAULT_DATA_DIR / "ch2bet.nii.gz").is_file() and (DEFAULT_DATA_DIR / "aal.nii.gz").is_file()
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="mricron-data (Colin27 + AAL) is not installed")


def test_missing_data_says_how_to_get_it(tmp_path, capsys):
    assert main(["demo", "--data-dir", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "apt-get install mricron-data" in err and "--data-dir" in err and "ch2bet.nii.gz" in err


@needs_data
def test_prepared_split_is_honest(tmp_path):
    root = prepare_colin27(tmp_path / "data")
    meta = json.loads((root / "dataset.json").read_text())
    assert list(meta["labels"]) == ["background", "cerebral cortex", "caudate", "putamen", "pallidum", "thalamus",
                                    "cerebellum"]
    left = np.asarray(nib.load(str(root / "labelsTr" / "colin27_left.nii.gz")).dataobj)
    right = np.asarray(nib.load(str(root / "labelsTr" / "colin27_right_mirrored.nii.gz")).dataobj)
    assert left.shape == right.shape == (88, 217, 181)
    assert set(np.unique(left)) == set(np.unique(right)) == set(range(7))  # every class in both halves
    assert not np.array_equal(left, right)  # the held-out half is different anatomy, not a copy
    aal = np.asarray(nib.load(str(DEFAULT_DATA_DIR / "aal.nii.gz")).dataobj)
    assert np.count_nonzero(aal[88:93]) > 0  # the excluded midline slab holds labelled voxels
    full = prepare_colin27(tmp_path / "full", full=True)
    assert len(json.loads((full / "dataset.json").read_text())["labels"]) == 55  # 54 classes + background


@needs_data
def test_demo_end_to_end_smoke(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output", str(out), "--set", "train.iterations=2", "train.val_interval=2",
                 "train.roi_size=[32,32,32]", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "Held-out (mirrored right hemisphere) Dice" in printed and "thalamus" in printed
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary["held_out_dice"]) == {"cerebral cortex", "caudate", "putamen", "pallidum", "thalamus", "cerebellum"}
    pred = nib.load(summary["prediction"])
    src = nib.load(str(out / "data" / "imagesTr" / "colin27_right_mirrored_0000.nii.gz"))
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine) and pred.get_data_dtype() == np.uint8
    png = Path(summary["figure"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
