"""Dataset readers (MSD, FeTA, BTCV, nnU-Net, datalists), layout detection and dataset validation."""

import json
import pickle
import shutil

import nibabel as nib
import numpy as np
import pytest

from ul3d.data.datasets import (
    BTCV_8ORGAN_LABEL_MAP,
    DatasetError,
    load_dataset,
    read_btcv,
    read_datalist,
    read_feta,
    read_msd,
    read_nnunet,
)
from ul3d.data.io import read_array, read_header, write_nifti
from ul3d.data.synth import write_synthetic
from ul3d.data.validation import validate_dataset

SHAPE = (16, 16, 8)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """Every synthetic layout, written once (tiny volumes); tests that modify one copy it first."""
    out = tmp_path_factory.mktemp("synth")
    return {
        layout: write_synthetic(layout, out / layout, shape=SHAPE)
        for layout in ("msd-prostate", "feta", "btcv", "nnunet")
    }


def _copy(root, tmp_path):
    return shutil.copytree(root, tmp_path / root.name)


def _ids(items):
    return [item["id"] for item in items]


# ------------------------------------------------------------------------------------------------ readers
def test_read_msd(synth):
    spec = read_msd(synth["msd-prostate"])
    assert (spec.layout, spec.num_channels, spec.num_classes) == ("msd", 2, 3)
    assert spec.channel_names == ["T2", "ADC"] and spec.class_names == ["background", "PZ", "TZ"]
    assert _ids(spec.training) == ["prostate_00", "prostate_01", "prostate_02", "prostate_03"]
    assert _ids(spec.test) == ["prostate_04", "prostate_05"] and "label" not in spec.test[0]
    item = spec.training[0]
    assert item["image"].startswith(str(synth["msd-prostate"])) and item["image"].endswith(
        "imagesTr/prostate_00.nii.gz"
    )
    assert item["label"].endswith("labelsTr/prostate_00.nii.gz") and "/./" not in item["image"]
    assert read_header(item["image"]).channels == 2


def test_read_feta(synth):
    for root in (synth["feta"], synth["feta"].parent):  # the subjects' folder, or its parent with feta_2.1/
        spec = read_feta(root)
        assert (spec.layout, spec.num_channels, spec.num_classes) == ("feta", 1, 8)
        assert _ids(spec.training) == ["sub-001", "sub-002", "sub-003", "sub-004"]
        assert spec.class_names[1] == "external CSF" and spec.class_names[7] == "brainstem"
        assert spec.training[2]["label"].endswith("sub-003/anat/sub-003_rec-irtk_dseg.nii.gz")


def test_read_btcv_13organ(synth):
    for root in (synth["btcv"], synth["btcv"] / "RawData" / "Training"):
        spec = read_btcv(root)
        assert spec.num_classes == 14 and spec.num_channels == 1 and spec.label_map is None
        assert _ids(spec.training) == ["img0001", "img0005", "img0006", "img0022", "img0023", "img0040"]
        assert spec.training[0]["label"].endswith("label/label0001.nii.gz")
    assert _ids(read_btcv(synth["btcv"]).test) == ["img0061"]  # the unlabelled RawData/Testing image


def test_read_btcv_8organ(synth):
    spec = read_btcv(synth["btcv"], protocol="8organ")
    assert _ids(spec.test) == ["img0001", "img0022"] and all("label" in item for item in spec.test)
    assert _ids(spec.training) == ["img0005", "img0006", "img0023", "img0040"]
    assert spec.class_names == ["background", "aorta", "gallbladder", "left kidney", "right kidney", "liver",
                                "pancreas", "spleen", "stomach"]  # fmt: skip
    assert spec.source_labels == list(range(14)) and spec.label_map == BTCV_8ORGAN_LABEL_MAP
    assert sorted(spec.label_map) == list(range(14))
    labels, _ = read_array(spec.training[0]["label"])
    mapped = np.vectorize(spec.label_map.get)(labels)
    assert set(np.unique(mapped)) == set(range(9))  # every 8-organ class present, esophagus etc. now background
    assert np.all(mapped[labels == 5] == 0) and np.all(mapped[labels == 8] == 1) and np.all(mapped[labels == 1] == 7)
    validate_dataset(spec, expected_channels=1)  # label files hold 0..13: allowed through source_labels
    with pytest.raises(ValueError, match="protocol"):
        read_btcv(synth["btcv"], protocol="9organ")


def test_read_nnunet(synth):
    spec = read_nnunet(synth["nnunet"])
    assert (spec.layout, spec.num_channels, spec.num_classes) == ("nnunet", 2, 3)
    assert spec.class_names == ["background", "PZ", "TZ"] and spec.file_ending == ".nii.gz"
    assert _ids(spec.training) == ["synth_000", "synth_001", "synth_002", "synth_003"] and _ids(spec.test) == [
        "synth_004"
    ]
    image = spec.training[1]["image"]
    assert [p.rsplit("/", 1)[1] for p in image] == ["synth_001_0000.nii.gz", "synth_001_0001.nii.gz"]


@pytest.mark.parametrize(
    "layout,subpath,expected",
    [
        ("msd-prostate", "", ("msd", 4, 2, 3)),
        ("feta", "", ("feta", 4, 1, 8)),
        ("feta", "..", ("feta", 4, 1, 8)),
        ("btcv", "", ("btcv", 6, 1, 14)),
        ("btcv", "RawData/Training", ("btcv", 6, 1, 14)),
        ("nnunet", "", ("nnunet", 4, 2, 3)),
    ],
)
def test_load_dataset_detects_layout(synth, layout, subpath, expected):
    root = (synth[layout] / subpath) if subpath else synth[layout]
    spec = load_dataset(root)
    assert (spec.layout, len(spec.training), spec.num_channels, spec.num_classes) == expected
    validate_dataset(spec, expected_channels=spec.num_channels)  # every synthetic dataset is clean


def test_load_dataset_kwargs_and_errors(synth, tmp_path):
    assert load_dataset(synth["btcv"], protocol="8organ").num_classes == 9
    assert load_dataset(synth["nnunet"], layout="nnunet").layout == "nnunet"
    with pytest.raises(ValueError, match="unknown dataset layout 'foo'"):
        load_dataset(synth["nnunet"], layout="foo")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="unknown dataset layout") as err:
        load_dataset(tmp_path / "empty")
    for looked_for in ("channel_names", "modality", "sub-*/anat", "img/ + label/", ".json or .csv"):
        assert looked_for in str(err.value)
    with pytest.raises(DatasetError, match="not found"):
        load_dataset(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- datalists
def test_datalist_json(synth, tmp_path):
    msd = synth["msd-prostate"]
    rel = f"../{msd.parent.name}/{msd.name}"  # relative to the JSON's folder
    lists = tmp_path / "lists"
    lists.mkdir()
    shutil.copytree(msd.parent, tmp_path / msd.parent.name)
    datalist = {
        "labels": {"background": 0, "PZ": 1, "TZ": 2},
        "training": [
            {"image": f"{rel}/imagesTr/prostate_0{i}.nii.gz", "label": f"{rel}/labelsTr/prostate_0{i}.nii.gz"}
            for i in (0, 1)
        ],
        "validation": [
            {"id": "val", "image": f"{rel}/imagesTr/prostate_02.nii.gz", "label": f"{rel}/labelsTr/prostate_02.nii.gz"}
        ],
        "test": [f"{rel}/imagesTs/prostate_04.nii.gz"],
    }
    path = lists / "split.json"
    path.write_text(json.dumps(datalist))
    spec = load_dataset(path)
    assert spec.layout == "datalist" and spec.name == "split"
    assert _ids(spec.training) == ["prostate_00", "prostate_01", "val"] and _ids(spec.test) == ["prostate_04"]
    assert spec.class_names == ["background", "PZ", "TZ"]
    assert spec.channel_names == ["channel0", "channel1"]  # inferred from the 4-D image
    assert spec.training[2]["image"] == str(tmp_path / msd.parent.name / msd.name / "imagesTr" / "prostate_02.nii.gz")
    validate_dataset(spec, expected_channels=2)

    datalist["labels"] = {"0": "background", "1": "PZ", "2": "TZ"}  # MSD form
    datalist["modality"] = {"0": "T2", "1": "ADC"}
    path.write_text(json.dumps(datalist))
    spec = read_datalist(path)
    assert spec.class_names == ["background", "PZ", "TZ"] and spec.channel_names == ["T2", "ADC"]
    assert read_datalist(path, class_names=["bg", "a", "b"], channel_names=["x", "y"]).class_names == ["bg", "a", "b"]


def test_datalist_csv_multichannel(synth, tmp_path):
    root = synth["nnunet"]
    rows = ["image,label,id"]
    for i in range(3):
        rows.append(
            f"{root}/imagesTr/synth_00{i}_0000.nii.gz;{root}/imagesTr/synth_00{i}_0001.nii.gz,{root}/labelsTr/synth_00{i}.nii.gz,case{i}"
        )
    rows.append(f"{root}/imagesTs/synth_004_0000.nii.gz; {root}/imagesTs/synth_004_0001.nii.gz,,")
    path = tmp_path / "cases.csv"
    path.write_text("\n".join(rows) + "\n")
    spec = load_dataset(path, class_names=["background", "PZ", "TZ"])
    assert _ids(spec.training) == ["case0", "case1", "case2"] and _ids(spec.test) == ["synth_004_0000"]
    assert len(spec.training[0]["image"]) == 2 and spec.num_channels == 2 and spec.num_classes == 3
    validate_dataset(spec, expected_channels=2)
    with pytest.raises(DatasetError, match="class names unknown"):
        read_datalist(path)


# ----------------------------------------------------------------------------------------- malformed input
def test_missing_and_malformed_dataset_json(synth, tmp_path):
    root = _copy(synth["msd-prostate"], tmp_path)
    (root / "dataset.json").unlink()
    with pytest.raises(DatasetError, match=r"dataset\.json: missing"):
        read_msd(root)
    (root / "dataset.json").write_text("{ not json")
    with pytest.raises(DatasetError, match=r"dataset\.json: malformed JSON"):
        read_msd(root)
    with pytest.raises(DatasetError, match=r"dataset\.json: malformed JSON"):
        load_dataset(root)


def test_msd_missing_training_file(synth, tmp_path):
    root = _copy(synth["msd-prostate"], tmp_path)
    (root / "labelsTr" / "prostate_01.nii.gz").unlink()
    (root / "imagesTr" / "prostate_03.nii.gz").unlink()
    with pytest.raises(DatasetError) as err:
        read_msd(root)
    assert err.value.problems == [
        (str(root / "labelsTr" / "prostate_01.nii.gz"), "file not found"),
        (str(root / "imagesTr" / "prostate_03.nii.gz"), "file not found"),
    ]
    lines = str(err.value).splitlines()
    assert lines[0] == f"PROSTATE: 2 problem(s) found in {root}"
    assert lines[1:] == [
        "  labelsTr/prostate_01.nii.gz: file not found",
        "  imagesTr/prostate_03.nii.gz: file not found",
    ]
    assert str(pickle.loads(pickle.dumps(err.value))) == str(err.value)


def test_nnunet_errors(synth, tmp_path):
    root = _copy(synth["nnunet"], tmp_path)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "numTraining": 7}))
    with pytest.raises(DatasetError, match=r"dataset\.json: numTraining is 7 but 4 training cases were found"):
        read_nnunet(root)
    (root / "dataset.json").write_text(json.dumps({**meta, "labels": {"background": 0, "whole": [1, 2], "core": 2}}))
    with pytest.raises(DatasetError, match=r"dataset\.json: region-based labels are not supported"):
        read_nnunet(root)
    (root / "dataset.json").write_text(json.dumps(meta))
    (root / "imagesTr" / "synth_002_0001.nii.gz").unlink()
    (root / "labelsTr" / "synth_003.nii.gz").unlink()
    with pytest.raises(DatasetError) as err:
        load_dataset(root)
    text = str(err.value)
    assert "imagesTr/synth_002_0001.nii.gz: channel file not found" in text
    assert "labelsTr/synth_003.nii.gz: label not found for case synth_003" in text
    assert text.startswith("Synth: 2 problem(s) found in")


def test_reader_errors_include_content_problems(synth, tmp_path):
    """A reader that finds a missing file also reports the other cases' problems: one error lists everything."""
    root = _copy(synth["feta"], tmp_path)
    (root / "sub-001" / "anat" / "sub-001_rec-mial_dseg.nii.gz").unlink()
    image = root / "sub-003" / "anat" / "sub-003_rec-irtk_T2w.nii.gz"
    data = np.asanyarray(nib.load(str(image)).dataobj).copy()
    data[1, 2, 3] = np.nan
    _rewrite(image, data=data)
    with pytest.raises(DatasetError) as err:
        load_dataset(root)
    assert [where.rsplit("/", 1)[1] for where, _ in err.value.problems] == [
        "sub-001_rec-mial_dseg.nii.gz",
        "sub-003_rec-irtk_T2w.nii.gz",
    ]
    assert "1 non-finite intensities (1 NaN, 0 Inf)" in str(err.value)


def test_feta_missing_segmentation(synth, tmp_path):
    root = _copy(synth["feta"], tmp_path)
    (root / "sub-002" / "anat" / "sub-002_rec-mial_dseg.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"sub-002/anat/sub-002_rec-mial_dseg\.nii\.gz: segmentation not found"):
        read_feta(root)


def test_duplicate_ids(synth, tmp_path):
    root = synth["msd-prostate"]
    entry = {
        "image": str(root / "imagesTr" / "prostate_00.nii.gz"),
        "label": str(root / "labelsTr" / "prostate_00.nii.gz"),
    }
    path = tmp_path / "dup.json"
    path.write_text(
        json.dumps({"labels": ["background", "PZ", "TZ"], "training": [entry, {**entry, "id": "x"}, entry]})
    )
    with pytest.raises(DatasetError, match="prostate_00: duplicate case id") as err:
        read_datalist(path)
    assert len(err.value.problems) == 1


# ---------------------------------------------------------------------------------------------- validation
def _rewrite(path, data=None, affine=None, dtype=None):
    img = nib.load(str(path))
    data = np.asanyarray(img.dataobj) if data is None else data
    write_nifti(data, img.affine if affine is None else affine, path, dtype=dtype)


def test_validation_reports_every_bad_case(tmp_path):
    root = write_synthetic("msd-prostate", tmp_path, n_cases=10, shape=(12, 12, 6), seed=3)
    spec = load_dataset(root)  # the reader itself refuses missing files: break the dataset after reading it
    img, lab = root / "imagesTr", root / "labelsTr"
    name = "prostate_{:02d}.nii.gz".format
    (lab / name(0)).unlink()  # missing file
    _rewrite(lab / name(1), data=np.zeros((12, 12, 5), np.uint8))  # shape mismatch
    affine = nib.load(str(lab / name(2))).affine.copy()
    affine[:3, 3] += 1.5
    _rewrite(lab / name(2), affine=affine)  # affine mismatch
    image3 = nib.load(str(img / name(3)))
    _rewrite(img / name(3), data=np.concatenate([np.asanyarray(image3.dataobj)] * 2, axis=-1)[..., :3])  # 3 channels
    labels4 = np.asanyarray(nib.load(str(lab / name(4))).dataobj).copy()
    labels4[0, 0, 0], labels4[1, 0, 0] = 7, 9
    _rewrite(lab / name(4), data=labels4)  # label values outside the classes
    image5 = np.asanyarray(nib.load(str(img / name(5))).dataobj).copy()
    image5[2, 3, 1, 0], image5[4, 4, 4, 1] = np.nan, np.inf
    _rewrite(img / name(5), data=image5)  # NaN/Inf intensities
    labels6 = np.asanyarray(nib.load(str(lab / name(6))).dataobj).astype(np.float32)
    labels6[5, 5, 2] = 0.5
    _rewrite(lab / name(6), data=labels6)  # non-integer label values
    (img / name(7)).write_bytes(b"garbage")  # unreadable
    # cases 8 and 9 are clean

    with pytest.raises(DatasetError) as err:
        validate_dataset(spec, expected_channels=2)
    problems = dict(err.value.problems)
    expected = {
        str(lab / name(0)): "file not found",
        str(lab / name(1)): "shape (12, 12, 5) does not match the image's (12, 12, 6)",
        str(lab / name(2)): "affine does not match the image's",
        str(img / name(3)): "image has 3 channel(s), expected 2",
        str(lab / name(4)): "unexpected label values 7, 9 (expected 0, 1, 2)",
        str(img / name(5)): "2 non-finite intensities (1 NaN, 1 Inf)",
        str(lab / name(6)): "label values are not integers: 0.5",
        str(img / name(7)): "unreadable",
    }
    assert set(problems) == set(expected), err.value
    for where, text in expected.items():
        assert text in problems[where], (where, problems[where])
    message = str(err.value)
    assert message.splitlines()[0] == f"PROSTATE: {len(expected)} problem(s) found in {root}"
    assert "labelsTr/prostate_04.nii.gz: unexpected label values 7, 9" in message
    assert name(8) not in message and name(9) not in message
    # only the clean cases: no error; without the intensity check the NaN case passes too
    validate_dataset(spec, expected_channels=2, items=spec.training[8:])
    validate_dataset(spec, check_intensities=False, items=[spec.training[5]])


def test_validation_multi_file_channels(synth, tmp_path):
    root = _copy(synth["nnunet"], tmp_path)
    channel = root / "imagesTr" / "synth_001_0001.nii.gz"
    affine = nib.load(str(channel)).affine.copy()
    affine[:3, :3] *= 1.1
    _rewrite(channel, affine=affine)
    _rewrite(root / "imagesTr" / "synth_002_0001.nii.gz", data=np.zeros((16, 16, 7), np.float32))
    spec = load_dataset(root)
    with pytest.raises(DatasetError) as err:
        validate_dataset(spec, expected_channels=3)
    problems = dict(err.value.problems)
    assert "affine does not match the first channel file" in problems[str(channel)]
    assert (
        "shape (16, 16, 7) does not match the first channel file's (16, 16, 8)"
        in problems[str(root / "imagesTr" / "synth_002_0001.nii.gz")]
    )
    wrong_count = [p for p in err.value.problems if "expected 3" in p[1]]
    assert sorted(p[0].rsplit("/", 1)[1] for p in wrong_count) == ["synth_000_0000.nii.gz", "synth_003_0000.nii.gz"]
