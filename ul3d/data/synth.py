"""Small synthetic datasets in the on-disk layouts of MSD (prostate), FeTA 2021, Synapse/BTCV and nnU-Net v2.

Each case has a smooth random label map (one noisy blob per class inside a noisy body ellipsoid; every class is
present in every case), intensities made of a class-dependent mean, Gaussian noise and a smooth bias field, a
realistic voxel spacing and an oblique affine (a rotation of a few degrees, a non-zero origin). They are meant
for tests, demos and smoke runs: the readers in :mod:`ul3d.data.datasets` load them as they are.

Smoothing uses numpy's FFT only, so the output is the same whether or not scipy is installed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ul3d.data.io import write_nifti
from ul3d.utils import atomic_path

__all__ = ["SYNTHETIC_LAYOUTS", "write_synthetic"]

SYNTHETIC_LAYOUTS: tuple[str, ...] = ("msd-prostate", "feta", "btcv", "nnunet")

#: BTCV training case numbers, in the order synthetic cases use them (mixes TransUNet's test and training cases).
_BTCV_NUMBERS = (1, 5, 6, 22, 23, 40, 2, 3, 4, 7, 8, 9, 10, 21, *range(24, 40))


@dataclass(frozen=True)
class _Recipe:
    """How to draw one kind of case."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    means: tuple[tuple[float, ...], ...]  # per channel: (outside the body, background in the body, class 1, ...)
    noise: tuple[float, ...]  # per channel: noise standard deviation
    ct: bool = False  # additive bias and HU clipping instead of a multiplicative MR bias field
    flip: tuple[float, float, float] = (1.0, 1.0, 1.0)  # axis signs of the affine (e.g. LPS-like storage)

    @property
    def num_classes(self) -> int:
        return len(self.means[0]) - 1


_PROSTATE = _Recipe(
    shape=(48, 48, 20),
    spacing=(0.6, 0.6, 3.6),
    means=((5.0, 120.0, 260.0, 170.0), (0.0, 900.0, 1600.0, 1200.0)),  # T2, ADC: outside, background, PZ, TZ
    noise=(15.0, 80.0),
)
_FETA = _Recipe(
    shape=(40, 40, 40),
    spacing=(0.8, 0.8, 0.8),
    means=((5.0, 200.0, 900.0, 450.0, 600.0, 950.0, 500.0, 400.0, 520.0),),
    noise=(30.0,),
)
_BTCV = _Recipe(
    shape=(48, 48, 32),
    spacing=(0.8, 0.8, 2.5),
    means=((-1000.0, -60.0, 50.0, 160.0, 160.0, 10.0, 40.0, 60.0, 30.0, 180.0, 140.0, 160.0, 45.0, 35.0, 35.0),),
    noise=(15.0,),
    ct=True,
    flip=(-1.0, -1.0, 1.0),
)
_RECIPES = {"msd-prostate": _PROSTATE, "feta": _FETA, "btcv": _BTCV, "nnunet": _PROSTATE}
_DEFAULT_CASES = {"msd-prostate": 4, "feta": 4, "btcv": 6, "nnunet": 4}


# ---------------------------------------------------------------------------------------------- random fields
def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise (sigma as a fraction of each axis' length), zero mean, unit std."""
    noise = rng.standard_normal(shape)
    freqs = np.meshgrid(*[np.fft.fftfreq(n) for n in shape[:-1]], np.fft.rfftfreq(shape[-1]), indexing="ij")
    # sigma in voxels is sigma * n along each axis: the transfer function is exp(-2 pi^2 sigma_vox^2 f^2)
    exponent = sum((np.asarray(f) * n) ** 2 for f, n in zip(freqs, shape))
    field = np.fft.irfftn(np.fft.rfftn(noise) * np.exp(-2.0 * np.pi**2 * sigma**2 * exponent), s=shape)
    return (field - field.mean()) / (field.std() + 1e-12)


def _blur(volume: np.ndarray, sigma_vox: float) -> np.ndarray:
    """Light Gaussian blur (partial-volume effect), periodic boundaries."""
    shape = volume.shape
    freqs = np.meshgrid(*[np.fft.fftfreq(n) for n in shape[:-1]], np.fft.rfftfreq(shape[-1]), indexing="ij")
    transfer = np.exp(-2.0 * np.pi**2 * sigma_vox**2 * sum(np.asarray(f) ** 2 for f in freqs))
    return np.fft.irfftn(np.fft.rfftn(volume) * transfer, s=shape)


def _grid(shape: tuple[int, ...]) -> list[np.ndarray]:
    """Open grid of coordinates normalised to [-1, 1] along each axis."""
    return list(np.ogrid[tuple(slice(-1.0, 1.0, complex(0, n)) for n in shape)])


def _spread_points(rng: np.random.Generator, n: int, radius: float) -> np.ndarray:
    """``n`` points in a ball, far apart from each other (greedy farthest-point choice among candidates)."""
    candidates = rng.uniform(-1.0, 1.0, size=(64 * max(n, 1), 3))
    candidates = candidates[np.linalg.norm(candidates, axis=1) <= 1.0] * radius
    chosen = [candidates[0]]
    distance = np.linalg.norm(candidates - chosen[0], axis=1)
    for _ in range(n - 1):
        chosen.append(candidates[int(np.argmax(distance))])
        distance = np.minimum(distance, np.linalg.norm(candidates - chosen[-1], axis=1))
    return np.asarray(chosen[:n])


def _label_map(
    rng: np.random.Generator, shape: tuple[int, int, int], num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, body)``: one smooth noisy blob per foreground class inside a noisy body ellipsoid."""
    coords = _grid(shape)
    body = sum((c / 0.92) ** 2 for c in coords) + 0.12 * _smooth_noise(rng, shape, 0.12) < 1.0
    n_fg = num_classes - 1
    centers = _spread_points(rng, n_fg, 0.55)
    scale = 0.5 / max(n_fg, 1) ** (1.0 / 3.0)
    best, labels = np.full(shape, 0.5), np.zeros(shape, dtype=np.uint8)  # a class needs f > 0.5 to show
    for c, center in enumerate(centers, start=1):
        axes = scale * rng.uniform(0.7, 1.3, size=3)
        field = np.exp(-0.5 * sum(((x - m) / s) ** 2 for x, m, s in zip(coords, center, axes)))
        field = field + 0.2 * _smooth_noise(rng, shape, 0.08)
        win = field > best
        labels[win], best = c, np.where(win, field, best)
    labels[~body] = 0
    for c, center in enumerate(centers, start=1):  # every class present, whatever the noise did
        if not np.any(labels == c):
            index = tuple(int(np.rint((m + 1.0) / 2.0 * (n - 1))) for m, n in zip(center, shape))
            ball = tuple(slice(max(i - 1, 0), i + 2) for i in index)
            labels[ball], body[ball] = c, True
    return labels, body


def _intensities(rng: np.random.Generator, recipe: _Recipe, labels: np.ndarray, body: np.ndarray) -> np.ndarray:
    """``(x, y, z, C)`` float32 image: class means (jittered per case), partial-volume blur, noise, bias field."""
    channels = []
    for means, noise in zip(recipe.means, recipe.noise):
        means = np.asarray(means) * rng.uniform(0.95, 1.05, size=len(means))
        mean_map = np.where(body, means[1:][labels], means[0])
        image = _blur(mean_map, 0.7) + noise * rng.standard_normal(labels.shape)
        bias = _smooth_noise(rng, labels.shape, 0.25)
        if recipe.ct:
            image = np.clip(image + 20.0 * bias, -1000.0, 1000.0)
        else:
            image = np.clip(image * np.exp(0.1 * bias), 0.0, None)
        channels.append(image.astype(np.float32))
    return np.stack(channels, axis=-1)


def _rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.uniform(-max_degrees, max_degrees, size=3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _oblique_affine(rng: np.random.Generator, shape: tuple[int, ...], recipe: _Recipe) -> np.ndarray:
    """Voxel-to-RAS affine: a rotation of a few degrees, the recipe's spacing and axis signs, a centred origin."""
    matrix = _rotation(rng, 5.0) @ np.diag(np.asarray(recipe.flip) * np.asarray(recipe.spacing))
    affine = np.eye(4)
    affine[:3, :3] = matrix
    affine[:3, 3] = -matrix @ ((np.asarray(shape) - 1) / 2.0) + rng.uniform(-20.0, 20.0, size=3)
    return affine


def _case(rng: np.random.Generator, recipe: _Recipe, shape: tuple[int, int, int]):
    """``(image (x, y, z, C) float32, labels (x, y, z) uint8, affine)`` of one synthetic case."""
    labels, body = _label_map(rng, shape, recipe.num_classes)
    return _intensities(rng, recipe, labels, body), labels, _oblique_affine(rng, shape, recipe)


# ---------------------------------------------------------------------------------------------------- writers
def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _write_json(path: Path, data: dict) -> None:
    _write_text(path, json.dumps(data, indent=4) + "\n")


def _write_msd(out: Path, n_cases: int, rng: np.random.Generator, shape: tuple[int, int, int]) -> Path:
    root = out / "Task05_Prostate"
    n_test = 2 if n_cases > 1 else 1
    training, test = [], []
    for i in range(n_cases + n_test):
        image, labels, affine = _case(rng, _PROSTATE, shape)
        name = f"prostate_{i:02d}.nii.gz"
        if i < n_cases:
            write_nifti(image, affine, root / "imagesTr" / name)
            write_nifti(labels, affine, root / "labelsTr" / name, dtype=np.uint8)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            write_nifti(image, affine, root / "imagesTs" / name)
            test.append(f"./imagesTs/{name}")
    meta = {
        "name": "PROSTATE",
        "description": "Synthetic prostate transitional and peripheral zone segmentation (ul3d)",
        "reference": "synthetic",
        "licence": "CC-BY-SA 4.0",
        "tensorImageSize": "4D",
        "modality": {"0": "T2", "1": "ADC"},
        "labels": {"0": "background", "1": "PZ", "2": "TZ"},
        "numTraining": n_cases,
        "numTest": n_test,
        "training": training,
        "test": test,
    }
    _write_json(root / "dataset.json", meta)
    return root


def _write_feta(out: Path, n_cases: int, rng: np.random.Generator, shape: tuple[int, int, int]) -> Path:
    root = out / "feta_2.1"
    rows = ["participant_id\tPathology\tGestational age"]
    for i in range(1, n_cases + 1):
        image, labels, affine = _case(rng, _FETA, shape)
        subject, rec = f"sub-{i:03d}", ("mial" if i <= (n_cases + 1) // 2 else "irtk")
        anat = root / subject / "anat"
        write_nifti(image[..., 0], affine, anat / f"{subject}_rec-{rec}_T2w.nii.gz")
        write_nifti(labels, affine, anat / f"{subject}_rec-{rec}_dseg.nii.gz", dtype=np.uint8)
        pathology = "Neurotypical" if i % 2 else "Pathological"
        rows.append(f"{subject}\t{pathology}\t{rng.uniform(20.0, 35.0):.1f}")
    _write_text(root / "participants.tsv", "\n".join(rows) + "\n")
    return root


def _write_btcv(out: Path, n_cases: int, rng: np.random.Generator, shape: tuple[int, int, int]) -> Path:
    root = out / "BTCV"
    if n_cases > len(_BTCV_NUMBERS):
        raise ValueError(f"BTCV has {len(_BTCV_NUMBERS)} labelled cases, asked for {n_cases}")
    training = root / "RawData" / "Training"
    for number in _BTCV_NUMBERS[:n_cases]:
        image, labels, affine = _case(rng, _BTCV, shape)
        write_nifti(image[..., 0], affine, training / "img" / f"img{number:04d}.nii.gz")
        write_nifti(labels, affine, training / "label" / f"label{number:04d}.nii.gz", dtype=np.uint8)
    image, _, affine = _case(rng, _BTCV, shape)  # one unlabelled test image, as in RawData/Testing
    write_nifti(image[..., 0], affine, root / "RawData" / "Testing" / "img" / "img0061.nii.gz")
    return root


def _write_nnunet(out: Path, n_cases: int, rng: np.random.Generator, shape: tuple[int, int, int]) -> Path:
    root = out / "Dataset001_Synth"
    for i in range(n_cases + 1):
        image, labels, affine = _case(rng, _PROSTATE, shape)
        folder, case = ("imagesTr" if i < n_cases else "imagesTs"), f"synth_{i:03d}"
        for c in range(image.shape[-1]):
            write_nifti(image[..., c], affine, root / folder / f"{case}_{c:04d}.nii.gz")
        if i < n_cases:
            write_nifti(labels, affine, root / "labelsTr" / f"{case}.nii.gz", dtype=np.uint8)
    meta = {
        "name": "Synth",
        "channel_names": {"0": "T2", "1": "ADC"},
        "labels": {"background": 0, "PZ": 1, "TZ": 2},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
    }
    _write_json(root / "dataset.json", meta)
    return root


_WRITERS = {"msd-prostate": _write_msd, "feta": _write_feta, "btcv": _write_btcv, "nnunet": _write_nnunet}


def write_synthetic(
    layout: str,
    out: str | os.PathLike,
    n_cases: int | None = None,
    seed: int = 0,
    shape: tuple[int, int, int] | None = None,
) -> Path:
    """Write a small synthetic dataset in a real dataset's on-disk layout.

    ========================  ================================  ==================================================
    layout                    root (under ``out``)              content
    ========================  ================================  ==================================================
    ``"msd-prostate"``        ``Task05_Prostate/``              T2+ADC 4-D NIfTI, 3 classes, 0.6x0.6x3.6 mm,
                                                                (48, 48, 20), MSD ``dataset.json``, 2 test images
    ``"feta"``                ``feta_2.1/``                     T2w, 8 classes, 0.8 mm, (40, 40, 40),
                                                                ``sub-XXX/anat``, ``participants.tsv``
    ``"btcv"``                ``BTCV/`` (``RawData/Training``)  CT in HU, labels 0..13, 0.8x0.8x2.5 mm,
                                                                (48, 48, 32), ``img0001``, ``img0005``, ...,
                                                                one unlabelled ``RawData/Testing`` image
    ``"nnunet"``              ``Dataset001_Synth/``             T2+ADC as ``CASE_0000``/``CASE_0001``, 3 classes,
                                                                nnU-Net v2 ``dataset.json``, one ``imagesTs`` case
    ========================  ================================  ==================================================

    Args:
        layout: one of :data:`SYNTHETIC_LAYOUTS` (``"msd"`` is accepted for ``"msd-prostate"``).
        out: the folder to write into (created if needed).
        n_cases: labelled cases (default 4, BTCV 6; BTCV case numbers 1, 5, 6, 22, 23, 40, 2, ... so that
            TransUNet's 8-organ split has cases on both sides).
        seed: random seed; the output is deterministic for a seed.
        shape: spatial shape of every case (default: the layout's, above).

    Returns:
        the dataset root, loadable by :func:`ul3d.data.datasets.load_dataset`.
    """
    layout = "msd-prostate" if layout == "msd" else layout
    if layout not in _WRITERS:
        raise ValueError(f"unknown synthetic layout {layout!r} (expected one of {', '.join(SYNTHETIC_LAYOUTS)})")
    n_cases = _DEFAULT_CASES[layout] if n_cases is None else int(n_cases)
    if n_cases < 1:
        raise ValueError(f"n_cases must be at least 1, got {n_cases}")
    shape = tuple(int(s) for s in (shape or _RECIPES[layout].shape))
    if len(shape) != 3 or min(shape) < 4:
        raise ValueError(f"shape must be 3 sizes of at least 4 voxels, got {shape}")
    rng = np.random.default_rng(seed)
    return _WRITERS[layout](Path(out), n_cases, rng, shape)
