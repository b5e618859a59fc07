"""Image I/O shared by the pipeline: headers, voxel arrays and geometry-preserving, atomic writes.

NIfTI files (``.nii``, ``.nii.gz``) go through nibabel; NRRD and MetaImage files (``.nrrd``, ``.nhdr``, ``.mha``,
``.mhd``) through SimpleITK. Whatever the format, arrays use NIfTI voxel order ``(i, j, k[, c])`` (SimpleITK's
``(z, y, x)`` arrays are transposed) and affines map voxel indices to RAS world coordinates in mm (SimpleITK's LPS
geometry is converted), so that a label map predicted for an image can be written back with that image's geometry.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import DTypeLike

from ul3d.utils import atomic_path

__all__ = [
    "IMAGE_SUFFIXES",
    "NIFTI_SUFFIXES",
    "ImageHeader",
    "ImageReadError",
    "case_id",
    "image_suffix",
    "is_nifti",
    "read_array",
    "read_header",
    "write_like",
    "write_nifti",
]

IMAGE_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
_DETACHED_SUFFIXES = (".nhdr", ".mhd")  # header + separate data file named after the header
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


class ImageReadError(ValueError):
    """An image file that cannot be read (missing, truncated, corrupt or of an unsupported type).

    Args:
        path: the file.
        reason: what went wrong.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path}: {reason}")

    def __reduce__(self):  # keep the exception picklable (worker processes) despite the custom signature
        return type(self), (self.path, self.reason)


@dataclass
class ImageHeader:
    """Geometry and storage type of an image file, read without its voxel data.

    Attributes:
        shape: spatial shape ``(i, j, k)`` in NIfTI voxel order.
        channels: number of channels (a 4-D NIfTI's 4th dimension, a vector image's components, else 1).
        affine: 4x4 voxel-to-world matrix, RAS+ world coordinates in mm.
        spacing: voxel size in mm along ``i, j, k``.
        dtype: the on-disk voxel type.
    """

    shape: tuple[int, ...]
    channels: int
    affine: np.ndarray
    spacing: tuple[float, ...]
    dtype: np.dtype


def image_suffix(path: str | os.PathLike) -> str:
    """The full image suffix of ``path`` (``".nii.gz"`` counted as one), lower case.

    Known image suffixes (:data:`IMAGE_SUFFIXES`) are matched case-insensitively; for any other file the last
    suffix (possibly ``""``) is returned.
    """
    name = Path(path).name.lower()
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return Path(name).suffix


def case_id(path: str | os.PathLike) -> str:
    """The file name of ``path`` without its image suffix, e.g. ``"prostate_00"`` for ``prostate_00.nii.gz``."""
    name = Path(path).name
    suffix = image_suffix(path)
    return name[: len(name) - len(suffix)] if suffix else name


def is_nifti(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a NIfTI file (by its suffix)."""
    return image_suffix(path) in NIFTI_SUFFIXES


def _check_readable(path: Path) -> str:
    suffix = image_suffix(path)
    if suffix not in IMAGE_SUFFIXES:
        raise ImageReadError(path, f"unsupported file type {suffix!r} (expected one of {', '.join(IMAGE_SUFFIXES)})")
    if not path.is_file():
        raise ImageReadError(path, "file not found")
    return suffix


# ---------------------------------------------------------------------------------------------------- NIfTI
def _short_reason(error: Exception, path: Path) -> str:
    """``"<type>: <message>"`` with the (already reported) full path shortened to the file name."""
    message = str(error).replace(str(path), path.name).strip()
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _nifti_layout(shape: tuple[int, ...], path: Path) -> tuple[tuple[int, ...], int]:
    """Spatial shape and channel count of a NIfTI data shape (2-D padded to 3-D; ``(x, y, z, 1, c)`` accepted)."""
    if len(shape) == 2:
        return (shape[0], shape[1], 1), 1
    if len(shape) == 3:
        return tuple(shape), 1
    if len(shape) == 4:
        return tuple(shape[:3]), shape[3]
    if len(shape) == 5 and shape[3] == 1:  # ITK-style vector NIfTI
        return tuple(shape[:3]), shape[4]
    raise ImageReadError(path, f"unsupported NIfTI data shape {tuple(shape)} (expected 3-D or 4-D)")


def _load_nifti(path: Path):
    import nibabel as nib

    try:
        return nib.load(str(path))
    except Exception as e:  # nibabel raises many types for corrupt files
        raise ImageReadError(path, _short_reason(e, path)) from e


def _nifti_header(path: Path) -> ImageHeader:
    img = _load_nifti(path)
    shape, channels = _nifti_layout(tuple(int(s) for s in img.header.get_data_shape()), path)
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    zooms = zooms + (1.0,) * (3 - len(zooms))
    return ImageHeader(shape, channels, np.asarray(img.affine, dtype=np.float64), zooms, img.header.get_data_dtype())


def _nifti_array(path: Path) -> np.ndarray:
    img = _load_nifti(path)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        raise ImageReadError(path, f"cannot read voxel data: {_short_reason(e, path)}") from e
    shape, channels = _nifti_layout(data.shape, path)
    return data.reshape(shape + ((channels,) if data.ndim > 3 else ()))


# ------------------------------------------------------------------------------------------------ SimpleITK
def _sitk_dtypes() -> dict[int, np.dtype]:
    import SimpleITK as sitk

    names = {
        "UInt8": np.uint8, "Int8": np.int8, "UInt16": np.uint16, "Int16": np.int16, "UInt32": np.uint32,
        "Int32": np.int32, "UInt64": np.uint64, "Int64": np.int64, "Float32": np.float32, "Float64": np.float64,
    }  # fmt: skip
    table = {}
    for name, dtype in names.items():
        for prefix in ("sitk", "sitkVector"):
            pixel_id = getattr(sitk, prefix + name, None)
            if isinstance(pixel_id, int) and pixel_id >= 0:
                table[pixel_id] = np.dtype(dtype)
    return table


def _itk_reason(error: Exception) -> str:
    """The informative line of an ITK exception message."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if line.startswith("Description:"):
            return line[len("Description:") :].strip()
    return lines[-1] if lines else type(error).__name__


def _sitk_affine(spacing, origin, direction, dim: int) -> np.ndarray:
    """RAS voxel-to-world affine from SimpleITK's (LPS) spacing, origin and row-major direction matrix."""
    spacing = np.asarray(tuple(spacing)[:3], dtype=np.float64)
    origin = np.asarray(tuple(origin)[:3], dtype=np.float64)
    direction = np.asarray(direction, dtype=np.float64).reshape(dim, dim)[:3, :3]
    if dim == 2:
        spacing, origin = np.append(spacing, 1.0), np.append(origin, 0.0)
        direction = np.pad(direction, ((0, 1), (0, 1)))
        direction[2, 2] = 1.0
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(spacing)
    affine[:3, 3] = _LPS_TO_RAS @ origin
    return affine


def _sitk_layout(size: tuple[int, ...], components: int, path: Path) -> tuple[tuple[int, ...], int]:
    if len(size) == 2:
        return (size[0], size[1], 1), components
    if len(size) == 3:
        return tuple(size), components
    if len(size) == 4 and components == 1:
        return tuple(size[:3]), size[3]
    raise ImageReadError(path, f"unsupported image size {tuple(size)} with {components} component(s)")


def _sitk_header(path: Path) -> ImageHeader:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except Exception as e:  # SimpleITK raises RuntimeError with ITK's message
        raise ImageReadError(path, _itk_reason(e)) from e
    dim = reader.GetDimension()
    shape, channels = _sitk_layout(tuple(reader.GetSize()), reader.GetNumberOfComponents(), path)
    affine = _sitk_affine(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection(), dim)
    spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    dtype = _sitk_dtypes().get(reader.GetPixelID(), np.dtype(np.float64))
    return ImageHeader(shape, channels, affine, spacing, dtype)


def _sitk_array(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
        data = sitk.GetArrayFromImage(image)  # (z, y, x) or (t, z, y, x), components last
    except Exception as e:
        raise ImageReadError(path, _itk_reason(e)) from e
    _sitk_layout(tuple(image.GetSize()), image.GetNumberOfComponentsPerPixel(), path)  # validates the layout
    ndim = image.GetDimension()
    data = np.transpose(data, tuple(reversed(range(ndim))) + tuple(range(ndim, data.ndim)))  # (x, y, z[, c])
    if ndim == 2:
        data = np.expand_dims(data, 2)
    return np.ascontiguousarray(data)


# --------------------------------------------------------------------------------------------------- reading
def read_header(path: str | os.PathLike) -> ImageHeader:
    """Read the geometry of an image file without loading its voxel data.

    Args:
        path: a NIfTI, NRRD or MetaImage file.

    Returns:
        the file's :class:`ImageHeader`.

    Raises:
        ImageReadError: the file is missing, unreadable or of an unsupported type.
    """
    path = Path(path)
    suffix = _check_readable(path)
    return _nifti_header(path) if suffix in NIFTI_SUFFIXES else _sitk_header(path)


def read_array(path: str | os.PathLike) -> tuple[np.ndarray, ImageHeader]:
    """Read an image's voxels in NIfTI voxel order ``(i, j, k[, c])`` together with its header.

    Args:
        path: a NIfTI, NRRD or MetaImage file.

    Returns:
        ``(array, header)``; the array has a trailing channel axis only for multi-channel images.

    Raises:
        ImageReadError: the file is missing, unreadable or of an unsupported type.
    """
    path = Path(path)
    header = read_header(path)
    data = _nifti_array(path) if is_nifti(path) else _sitk_array(path)
    return data, header


# --------------------------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def _atomic_image_path(out_path: Path) -> Iterator[Path]:
    """Yield a temporary file name with ``out_path``'s format; move the result onto ``out_path`` on success.

    Single-file formats use :func:`ul3d.utils.atomic_path` with the real extension. Detached formats (``.nhdr``,
    ``.mhd``) name their data file after the header, so they are written under their final name in a hidden
    temporary folder beside ``out_path``; the data file(s) are moved first and the header last.
    """
    suffix = image_suffix(out_path)
    if suffix not in _DETACHED_SUFFIXES:
        with atomic_path(out_path, suffix=suffix) as tmp:
            yield tmp
        return
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent))
    try:
        tmp = tmp_dir / out_path.name
        yield tmp
        for item in sorted(tmp_dir.iterdir(), key=lambda p: p.name == out_path.name):  # header last
            os.replace(item, out_path.parent / item.name)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _cast(array: np.ndarray, dtype: DTypeLike | None, out_path: Path) -> np.ndarray:
    """Cast to ``dtype`` (``None``: keep, but store bool as uint8 and int64 as int32), refusing overflow."""
    array = np.asarray(array)
    if dtype is None:
        dtype = {np.dtype(bool): np.uint8, np.dtype(np.int64): np.int32, np.dtype(np.uint64): np.uint32}.get(
            array.dtype, array.dtype
        )
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer) and array.size and array.dtype != dtype and array.dtype != bool:
        info = np.iinfo(dtype)
        lo, hi = array.min(), array.max()
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < info.min or hi > info.max:
            raise ValueError(f"cannot write {out_path}: values in [{lo}, {hi}] do not fit {dtype}")
    return array.astype(dtype, copy=False)


def _nifti_image(array: np.ndarray, affine: np.ndarray, qform=None, sform=None):
    """A NIfTI-1 image; ``qform``/``sform`` are ``(matrix, code)`` pairs (default: ``affine``, code 1 = scanner)."""
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    header = img.header
    header.set_data_dtype(array.dtype)
    header.set_xyzt_units("mm", "sec")
    qform = qform if qform is not None else (affine, 1)
    sform = sform if sform is not None else (affine, 1)
    header.set_qform(qform[0], code=int(qform[1]))
    header.set_sform(sform[0], code=int(sform[1]))
    return img


def _save_nifti(img, out_path: Path) -> None:
    import nibabel as nib

    with _atomic_image_path(out_path) as tmp:
        nib.save(img, str(tmp))


def write_nifti(
    array: np.ndarray,
    affine: np.ndarray,
    out_path: str | os.PathLike,
    dtype: DTypeLike | None = None,
) -> Path:
    """Write ``array`` (NIfTI voxel order ``(i, j, k[, c])``) as a NIfTI file with ``affine``, atomically.

    Both the qform and the sform are set to ``affine`` with code 1 (scanner).

    Args:
        array: voxel data, 3-D or 4-D with channels last.
        affine: 4x4 voxel-to-world (RAS) matrix.
        out_path: a ``.nii`` or ``.nii.gz`` file.
        dtype: stored type; ``None`` keeps the array's type (bool stored as uint8, 64-bit integers as 32-bit).

    Returns:
        ``out_path``.
    """
    out_path = Path(out_path)
    if not is_nifti(out_path):
        raise ValueError(f"write_nifti needs a .nii or .nii.gz file name, got {out_path}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape} (writing {out_path})")
    _save_nifti(_nifti_image(_cast(array, dtype, out_path), affine), out_path)
    return out_path


def _sitk_geometry(reference: Path, header: ImageHeader) -> tuple[tuple, tuple, tuple]:
    """SimpleITK spacing, origin and direction of ``reference`` (read directly for non-NIfTI files)."""
    if not is_nifti(reference):
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(reference))
        reader.ReadImageInformation()
        if reader.GetDimension() == 3:
            return tuple(reader.GetSpacing()), tuple(reader.GetOrigin()), tuple(reader.GetDirection())
    matrix = _LPS_TO_RAS @ header.affine[:3, :3]  # RAS -> LPS (the flip is its own inverse)
    spacing = np.linalg.norm(matrix, axis=0)
    direction = matrix / spacing
    origin = _LPS_TO_RAS @ header.affine[:3, 3]
    return tuple(map(float, spacing)), tuple(map(float, origin)), tuple(map(float, direction.ravel()))


def _write_sitk(array: np.ndarray, reference: Path, header: ImageHeader, out_path: Path) -> None:
    import SimpleITK as sitk

    if array.ndim == 4:  # (C, x, y, z) -> vector image, components last
        image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (3, 2, 1, 0))), isVector=True)
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    spacing, origin, direction = _sitk_geometry(reference, header)
    image.SetSpacing(spacing)  # what CopyInformation would copy, without loading the reference's voxels
    image.SetOrigin(origin)
    image.SetDirection(direction)
    with _atomic_image_path(out_path) as tmp:
        sitk.WriteImage(image, str(tmp), True)


def _write_nifti_like(array: np.ndarray, reference: Path, header: ImageHeader, out_path: Path) -> None:
    if array.ndim == 4:  # (C, x, y, z) -> (x, y, z, C)
        array = np.moveaxis(array, 0, -1)
    qform = sform = None
    if is_nifti(reference):
        ref_header = _load_nifti(reference).header
        qform = (ref_header.get_qform(), ref_header["qform_code"])
        sform = (ref_header.get_sform(), ref_header["sform_code"])
    _save_nifti(_nifti_image(np.ascontiguousarray(array), header.affine, qform, sform), out_path)


def write_like(
    array: np.ndarray,
    reference_path: str | os.PathLike,
    out_path: str | os.PathLike,
    dtype: DTypeLike | None = np.uint8,
) -> Path:
    """Write a label or probability map with the geometry of the image it was computed from, atomically.

    The output format follows ``out_path``'s suffix: NIfTI is written with nibabel using the reference's affine
    (and, for a NIfTI reference, its qform/sform codes); NRRD/MetaImage with SimpleITK using the reference's
    spacing, origin and direction.

    Args:
        array: ``(x, y, z)`` label map, or ``(C, x, y, z)`` channel-first probability map (written as a 4-D NIfTI
            with channels last, or a vector image), in the reference's NIfTI voxel order.
        reference_path: the image the map belongs to.
        out_path: the file to write.
        dtype: stored type (default uint8; use float32 for probabilities, ``None`` to keep the array's type).

    Returns:
        ``out_path``.

    Raises:
        ValueError: the array's spatial shape differs from the reference's, or values do not fit ``dtype``.
        ImageReadError: the reference cannot be read.
    """
    reference, out_path = Path(reference_path), Path(out_path)
    if image_suffix(out_path) not in IMAGE_SUFFIXES:
        raise ValueError(f"cannot write {out_path}: unsupported suffix (expected one of {', '.join(IMAGE_SUFFIXES)})")
    header = read_header(reference)
    array = np.asarray(array)
    if array.ndim not in (3, 4) or tuple(array.shape[-3:]) != tuple(header.shape):
        raise ValueError(
            f"cannot write {out_path}: array shape {tuple(array.shape)} does not match the spatial shape "
            f"{tuple(header.shape)} of the reference {reference} (expected (x, y, z) or (C, x, y, z))"
        )
    array = _cast(array, dtype, out_path)
    writer = _write_nifti_like if is_nifti(out_path) else _write_sitk
    writer(array, reference, header, out_path)
    return out_path


# ------------------------------------------------------------------------------------------- MONAI reader
class SimpleITKReader:
    """A MONAI ``ImageReader`` for NRRD and MetaImage files through SimpleITK (MONAI's own ``ITKReader``
    needs the separate ``itk`` package). Arrays are in ``(x, y, z[, c])`` order with a RAS affine, as
    MONAI's readers give them, so ``Orientationd``/``Spacingd``/``Invertd`` treat every format alike.
    """

    suffixes = (".nrrd", ".nhdr", ".mha", ".mhd")

    def verify_suffix(self, filename) -> bool:
        names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
        return all(image_suffix(n) in self.suffixes for n in names)

    def read(self, data, **kwargs):
        return [data] if isinstance(data, (str, os.PathLike)) else list(data)

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        arrays, headers = zip(*(read_array(p) for p in img))
        first = headers[0]
        if len(arrays) > 1:  # one file per channel
            array, channel_dim = np.stack(arrays, axis=0), 0
        else:
            array, channel_dim = arrays[0], (-1 if first.channels > 1 else float("nan"))
        meta = {
            "affine": first.affine.copy(),
            "original_affine": first.affine.copy(),
            "spatial_shape": np.asarray(first.shape),
            "original_channel_dim": channel_dim,
            "space": "RAS",
            "filename_or_obj": str(img[0]),
        }
        return array, meta


def monai_reader():
    """The :class:`SimpleITKReader` registered as a ``monai.data.ImageReader`` subclass (built lazily)."""
    from monai.data import ImageReader

    return type("SimpleITKImageReader", (SimpleITKReader, ImageReader), {})()
