"""Synthetic datasets: real on-disk layouts, every class in every case, oblique geometry, determinism."""

import json

import nibabel as nib
import numpy as np
import pytest

from ul3d.data.datasets import load_dataset
from ul3d.data.io import read_array, read_header
from ul3d.data.synth import SYNTHETIC_LAYOUTS, write_synthetic

SPACING = {"msd-prostate": (0.6, 0.6, 3.6), "feta": (0.8, 0.8, 0.8), "btcv": (0.8, 0.8, 2.5), "nnunet": (0.6, 0.6, 3.6)}
DEFAULT_SHAPE = {"msd-prostate": (48, 48, 20), "feta": (40, 40, 40), "btcv": (48, 48, 32), "nnunet": (48, 48, 20)}
CASES = {"msd-prostate": 4, "feta": 4, "btcv": 6, "nnunet": 4}


def _first(image):
    return image if isinstance(image, str) else image[0]


@pytest.mark.parametrize("layout", SYNTHETIC_LAYOUTS)
def test_default_dataset(layout, tmp_path):
    """Default size: the documented shapes, spacings, dtypes, classes and an oblique affine per case."""
    spec = load_dataset(write_synthetic(layout, tmp_path))
    assert len(spec.training) == CASES[layout]
    allowed = spec.source_labels or list(range(spec.num_classes))
    affines = []
    for item in spec.training:
        labels, label_header = read_array(item["label"])
        image, header = read_array(_first(item["image"]))
        assert header.shape == label_header.shape == DEFAULT_SHAPE[layout]
        assert image.dtype == np.float32 and labels.dtype == np.uint8 and np.isfinite(image).all()
        assert sorted(np.unique(labels)) == allowed  # every class present in every case
        np.testing.assert_allclose(header.spacing, SPACING[layout], rtol=1e-5)
        np.testing.assert_allclose(header.affine, label_header.affine)
        rotation = header.affine[:3, :3] / np.asarray(header.spacing)
        off_diagonal = np.abs(rotation - np.diag(np.diag(rotation)))
        assert 1e-3 < off_diagonal.max() < np.sin(np.deg2rad(10))  # a rotation of a few degrees
        assert np.abs(header.affine[:3, 3]).max() > 1.0
        affines.append(header.affine)
    assert not np.allclose(affines[0], affines[1])  # each case has its own geometry


def test_intensities_follow_the_labels(tmp_path):
    root = write_synthetic("btcv", tmp_path, n_cases=1, shape=(32, 32, 16))
    image, _ = read_array(root / "RawData" / "Training" / "img" / "img0001.nii.gz")
    labels, _ = read_array(root / "RawData" / "Training" / "label" / "label0001.nii.gz")
    assert -1000.0 <= image.min() and image.max() <= 1000.0 and image.min() == -1000.0  # HU, air outside
    assert np.median(image[labels == 8]) > np.median(image[labels == 6]) + 50  # contrast aorta brighter than liver

    root = write_synthetic("msd-prostate", tmp_path / "p", n_cases=1, shape=(24, 24, 10))
    image, header = read_array(root / "imagesTr" / "prostate_00.nii.gz")
    labels, _ = read_array(root / "labelsTr" / "prostate_00.nii.gz")
    assert header.channels == 2 and image.shape == (24, 24, 10, 2) and image.min() >= 0.0
    t2 = image[..., 0]
    assert np.median(t2[labels == 1]) > np.median(t2[labels == 2]) > np.median(t2[labels == 0])


def test_deterministic_for_a_seed(tmp_path):
    paths = [write_synthetic("nnunet", tmp_path / name, n_cases=2, seed=seed, shape=(12, 12, 6)) for name, seed in
             (("a", 7), ("b", 7), ("c", 8))]  # fmt: skip
    arrays = [read_array(p / "imagesTr" / "synth_001_0001.nii.gz") for p in paths]
    np.testing.assert_array_equal(arrays[0][0], arrays[1][0])
    np.testing.assert_array_equal(arrays[0][1].affine, arrays[1][1].affine)
    assert not np.array_equal(arrays[0][0], arrays[2][0])


def test_layout_files(tmp_path):
    msd = write_synthetic("msd", tmp_path / "msd", n_cases=2, shape=(8, 8, 4))
    meta = json.loads((msd / "dataset.json").read_text())
    assert meta["modality"] == {"0": "T2", "1": "ADC"} and meta["labels"] == {"0": "background", "1": "PZ", "2": "TZ"}
    assert meta["numTraining"] == 2 and meta["training"][1] == {
        "image": "./imagesTr/prostate_01.nii.gz",
        "label": "./labelsTr/prostate_01.nii.gz",
    }
    assert meta["test"] == ["./imagesTs/prostate_02.nii.gz", "./imagesTs/prostate_03.nii.gz"]
    assert nib.load(str(msd / "imagesTs" / "prostate_03.nii.gz")).shape == (8, 8, 4, 2)

    feta = write_synthetic("feta", tmp_path / "feta", n_cases=2, shape=(8, 8, 8))
    assert feta.name == "feta_2.1"
    assert (feta / "participants.tsv").read_text().splitlines()[0] == "participant_id\tPathology\tGestational age"
    assert (feta / "sub-002" / "anat" / "sub-002_rec-irtk_T2w.nii.gz").is_file()

    btcv = write_synthetic("btcv", tmp_path / "btcv", n_cases=4, shape=(8, 8, 8))
    names = sorted(p.name for p in (btcv / "RawData" / "Training" / "img").iterdir())
    assert names == ["img0001.nii.gz", "img0005.nii.gz", "img0006.nii.gz", "img0022.nii.gz"]
    assert read_header(btcv / "RawData" / "Training" / "img" / "img0001.nii.gz").affine[0, 0] < 0  # LPS-like storage

    nnunet = write_synthetic("nnunet", tmp_path / "nn", n_cases=3, shape=(8, 8, 4))
    meta = json.loads((nnunet / "dataset.json").read_text())
    labels = {"background": 0, "PZ": 1, "TZ": 2}
    assert meta == {"name": "Synth", "channel_names": {"0": "T2", "1": "ADC"}, "labels": labels, "numTraining": 3,
                    "file_ending": ".nii.gz"}  # fmt: skip
    assert sorted(p.name for p in (nnunet / "imagesTs").iterdir()) == ["synth_003_0000.nii.gz", "synth_003_0001.nii.gz"]
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic layout"):
        write_synthetic("kits", tmp_path)
    with pytest.raises(ValueError, match="n_cases"):
        write_synthetic("feta", tmp_path, n_cases=0)
    with pytest.raises(ValueError, match="shape"):
        write_synthetic("feta", tmp_path, shape=(8, 8))
