"""Image I/O: headers, arrays in NIfTI voxel order, geometry-preserving atomic writes for NIfTI, NRRD and MetaImage."""

import pickle

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from ul3d.data import io
from ul3d.data.io import ImageReadError, case_id, image_suffix, read_array, read_header, write_like, write_nifti

SHAPE = (9, 7, 5)


def _oblique_affine(spacing=(0.7, 0.8, 2.5), degrees=(4.0, -3.0, 6.0), signs=(1, 1, 1), origin=(-12.5, 30.0, 7.25)):
    ax, ay, az = np.deg2rad(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ ry @ rx @ np.diag(np.asarray(signs) * np.asarray(spacing))
    affine[:3, 3] = origin
    return affine


def _volume(shape=SHAPE, seed=0):
    return np.random.default_rng(seed).normal(100.0, 20.0, size=shape).astype(np.float32)


def _labels(shape=SHAPE, seed=1):
    return np.random.default_rng(seed).integers(0, 4, size=shape).astype(np.uint8)


def _sitk_reference(path, shape=SHAPE):
    """An oblique LPS image written by SimpleITK (array given in (x, y, z) order)."""
    image = sitk.GetImageFromArray(np.transpose(_volume(shape), (2, 1, 0)))
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((10.0, -20.0, 5.0))
    affine = _oblique_affine(spacing=(1, 1, 1))
    image.SetDirection(tuple(affine[:3, :3].ravel()))
    sitk.WriteImage(image, str(path))
    return path


def test_suffix_and_case_id():
    assert image_suffix("/a/b/prostate_00.nii.gz") == ".nii.gz"
    assert image_suffix("x.NII") == ".nii"
    assert image_suffix("ct.mha") == ".mha"
    assert image_suffix("notes.txt") == ".txt"
    assert case_id("/data/imagesTr/prostate_00.nii.gz") == "prostate_00"
    assert case_id("case.v2.nrrd") == "case.v2"
    assert case_id("sub-001_rec-mial_T2w.nii") == "sub-001_rec-mial_T2w"


def test_nifti_roundtrip_oblique(tmp_path):
    affine, data = _oblique_affine(), _volume()
    out = write_nifti(data, affine, tmp_path / "img.nii.gz")
    header = read_header(out)
    assert header.shape == SHAPE and header.channels == 1 and header.dtype == np.float32
    np.testing.assert_allclose(header.affine, affine, atol=1e-5)
    np.testing.assert_allclose(header.spacing, (0.7, 0.8, 2.5), atol=1e-5)
    array, _ = read_array(out)
    np.testing.assert_array_equal(array, data)
    img = nib.load(str(out))
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1

    four_d = write_nifti(np.stack([data, data * 2], axis=-1), affine, tmp_path / "two.nii")
    header = read_header(four_d)
    assert header.shape == SHAPE and header.channels == 2
    assert read_array(four_d)[0].shape == (*SHAPE, 2)


def test_array_order_agrees_with_simpleitk(tmp_path):
    """Our NIfTI (nibabel) and NRRD (SimpleITK) paths give the same voxels and the same RAS affine."""
    affine, data = _oblique_affine(signs=(-1, -1, 1)), _volume()
    nii = write_nifti(data, affine, tmp_path / "img.nii.gz")
    nrrd = write_like(data, nii, tmp_path / "img.nrrd", dtype=np.float32)
    a, ha = read_array(nii)
    b, hb = read_array(nrrd)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(ha.affine, hb.affine, atol=1e-5)
    # SimpleITK reading the NIfTI itself agrees with our conversion of its (LPS) geometry
    np.testing.assert_array_equal(np.transpose(sitk.GetArrayFromImage(sitk.ReadImage(str(nii))), (2, 1, 0)), a)
    np.testing.assert_allclose(io._sitk_header(nii).affine, ha.affine, atol=1e-4)


@pytest.mark.parametrize("out_suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_write_like_nifti_reference(tmp_path, out_suffix):
    ref = tmp_path / "ref.nii.gz"
    img = nib.Nifti1Image(_volume(), _oblique_affine(signs=(-1, 1, 1)))
    img.header.set_sform(img.affine, code=2)
    img.header.set_qform(img.affine, code=1)
    nib.save(img, str(ref))
    labels = _labels()
    out = write_like(labels, ref, tmp_path / f"seg{out_suffix}")
    array, header = read_array(out)
    ref_header = read_header(ref)
    np.testing.assert_array_equal(array, labels)
    assert array.dtype == np.uint8 and header.shape == ref_header.shape
    np.testing.assert_allclose(header.affine, ref_header.affine, atol=1e-5)
    assert nib.aff2axcodes(header.affine) == nib.aff2axcodes(ref_header.affine) == ("L", "A", "S")
    if out_suffix.startswith(".nii"):
        written = nib.load(str(out)).header
        assert int(written["sform_code"]) == 2 and int(written["qform_code"]) == 1


@pytest.mark.parametrize(
    "ref_suffix,out_suffix", [(".nrrd", ".nrrd"), (".mha", ".mha"), (".mha", ".nii.gz"), (".nrrd", ".mhd")]
)
def test_write_like_sitk_reference(tmp_path, ref_suffix, out_suffix):
    ref = _sitk_reference(tmp_path / f"ref{ref_suffix}")
    labels = _labels()
    out = write_like(labels, ref, tmp_path / f"seg{out_suffix}")
    array, header = read_array(out)
    np.testing.assert_array_equal(array, labels)
    np.testing.assert_allclose(header.affine, read_header(ref).affine, atol=1e-5)
    if not out_suffix.startswith(".nii"):  # same geometry as SimpleITK sees it
        a, b = sitk.ReadImage(str(ref)), sitk.ReadImage(str(out))
        np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-6)
        np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_sitk_header_matches_nibabel_convention(tmp_path):
    ref = _sitk_reference(tmp_path / "ref.mha")
    header = read_header(ref)
    assert header.shape == SHAPE and header.channels == 1 and header.dtype == np.float32
    np.testing.assert_allclose(header.spacing, (0.7, 0.8, 2.5), atol=1e-6)
    np.testing.assert_allclose(header.affine[:3, 3], (-10.0, 20.0, 5.0))  # LPS origin -> RAS
    array, _ = read_array(ref)
    np.testing.assert_array_equal(array, _volume())


@pytest.mark.parametrize("out_suffix", [".nii.gz", ".nrrd"])
def test_probability_maps(tmp_path, out_suffix):
    ref = write_nifti(_volume(), _oblique_affine(), tmp_path / "ref.nii.gz")
    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=SHAPE).astype(np.float32)  # (x, y, z, 3)
    channel_first = np.moveaxis(probs, -1, 0)
    out = write_like(channel_first, ref, tmp_path / f"probs{out_suffix}", dtype=np.float32)
    header = read_header(out)
    assert header.shape == SHAPE and header.channels == 3
    np.testing.assert_allclose(header.affine, read_header(ref).affine, atol=1e-5)
    array, _ = read_array(out)
    np.testing.assert_allclose(array, probs, atol=1e-7)


def test_shape_mismatch_names_the_file(tmp_path):
    ref = write_nifti(_volume(), np.eye(4), tmp_path / "case_07.nii.gz")
    with pytest.raises(ValueError, match=r"case_07\.nii\.gz") as err:
        write_like(np.zeros((9, 7, 4), np.uint8), ref, tmp_path / "seg.nii.gz")
    assert "(9, 7, 4)" in str(err.value) and "(9, 7, 5)" in str(err.value)
    with pytest.raises(ValueError, match="do not fit"):
        write_like(np.full(SHAPE, 300), ref, tmp_path / "seg.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_07.nii.gz"]


def test_failed_writes_leave_nothing(tmp_path, monkeypatch):
    ref = write_nifti(_volume(), _oblique_affine(), tmp_path / "ref.nii.gz")
    old = write_like(_labels(), ref, tmp_path / "seg.nii.gz")
    before = old.read_bytes()

    def broken_nib_save(img, filename):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    def broken_sitk_write(image, filename, *args):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(nib, "save", broken_nib_save)
    monkeypatch.setattr(sitk, "WriteImage", broken_sitk_write)
    with pytest.raises(OSError, match="disk full"):
        write_like(np.zeros(SHAPE, np.uint8), ref, tmp_path / "seg.nii.gz")
    with pytest.raises(OSError, match="disk full"):
        write_nifti(_volume(), np.eye(4), tmp_path / "new.nii.gz")
    for suffix in (".nrrd", ".mhd"):
        with pytest.raises(RuntimeError, match="disk full"):
            write_like(_labels(), ref, tmp_path / f"seg{suffix}")
    assert old.read_bytes() == before  # the previous result is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.nii.gz", "seg.nii.gz"]


def test_read_errors_name_the_file(tmp_path):
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")
    (tmp_path / "broken.nrrd").write_bytes(b"not an nrrd")
    (tmp_path / "notes.txt").write_text("hello")
    for name in ("broken.nii.gz", "broken.nrrd", "missing.nii.gz", "notes.txt"):
        with pytest.raises(ImageReadError, match=name.replace(".", r"\.")) as err:
            read_array(tmp_path / name)
        assert isinstance(err.value, ValueError)
        copy = pickle.loads(pickle.dumps(err.value))
        assert str(copy) == str(err.value)
    # a truncated gzip: the header reads, the voxels do not
    good = write_nifti(_volume((20, 20, 20)), np.eye(4), tmp_path / "cut.nii.gz")
    good.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ImageReadError, match=r"cut\.nii\.gz"):
        read_array(good)
