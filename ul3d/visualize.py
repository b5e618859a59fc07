"""Label overlays as RGB arrays and PNG figures (numpy + Pillow; no plotting library needed)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .utils import atomic_path

__all__ = ["label_colors", "overlay", "orthogonal_figure"]


def label_colors(num_classes: int) -> np.ndarray:
    """Distinct RGB colours (uint8) for labels ``0..num_classes-1``; label 0 is black."""
    base = np.array(
        [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
         [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
         [170, 110, 40], [255, 250, 200], [128, 0, 0]], dtype=np.uint8)
    if num_classes <= len(base):
        return base[:num_classes]
    rng = np.random.default_rng(0)
    extra = rng.integers(40, 255, size=(num_classes - len(base), 3), dtype=np.uint8)
    return np.concatenate([base, extra])


def _to_gray(image: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(image, [1, 99]) if image.size else (0, 1)
    scaled = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
    return (scaled * 255).astype(np.uint8)


def overlay(image: np.ndarray, label: np.ndarray | None, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    """RGB (H, W, 3) uint8: a grey 2D ``image`` with the non-zero ``label`` values tinted on top."""
    gray = _to_gray(np.asarray(image, dtype=np.float32))
    rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)
    if label is not None:
        lab = np.asarray(label).astype(np.int64).clip(0, num_classes - 1)
        colors = label_colors(num_classes).astype(np.float32)[lab]
        mask = (lab > 0)[..., None]
        rgb = np.where(mask, (1 - alpha) * rgb + alpha * colors, rgb)
    return rgb.clip(0, 255).astype(np.uint8)


def _slices(volume: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    """Three orthogonal slices through ``centre``, rotated so the first volume axis runs left-right."""
    i, j, k = centre
    return [np.rot90(volume[:, :, k]), np.rot90(volume[:, j, :]), np.rot90(volume[i, :, :])]


def orthogonal_figure(
    image: np.ndarray,
    reference: np.ndarray,
    prediction: np.ndarray,
    num_classes: int,
    path: str | os.PathLike,
    centre: Sequence[int] | None = None,
    scale: int = 2,
) -> None:
    """Write a PNG: rows = axial, coronal, sagittal slices; columns = image, reference overlay, prediction overlay.

    ``image``, ``reference`` and ``prediction`` are 3D arrays on the same grid (first axis left-right,
    as RAS-oriented arrays are). ``centre`` defaults to the centre of mass of the reference foreground.
    """
    from PIL import Image

    if centre is None:
        fg = np.argwhere(reference > 0)
        centre = fg.mean(0).astype(int) if len(fg) else np.array(image.shape) // 2
    rows = []
    for im, ref, pred in zip(_slices(image, centre), _slices(reference, centre), _slices(prediction, centre)):
        tiles = [overlay(im, None, num_classes), overlay(im, ref, num_classes), overlay(im, pred, num_classes)]
        rows.append(np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0))) for t in tiles], axis=1))
    width = max(r.shape[1] for r in rows)
    canvas = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows], axis=0)
    img = Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST)
    with atomic_path(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")
