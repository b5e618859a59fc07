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
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> None:
    """Write a PNG: rows = axial, coronal, sagittal slices; columns = image, reference overlay, prediction overlay.

    ``image``, ``reference`` and ``prediction`` are 3D arrays on the same grid (first axis left-right,
    as RAS-oriented arrays are). ``centre`` defaults to the centre of mass of the reference foreground.
    With ``class_names`` a colour legend is drawn; ``title`` goes on top.
    """
    from PIL import Image, ImageDraw

    if centre is None:
        fg = np.argwhere(reference > 0)
        centre = fg.mean(0).astype(int) if len(fg) else np.array(image.shape) // 2
    tiles = []
    for im, ref, pred in zip(_slices(image, centre), _slices(reference, centre), _slices(prediction, centre)):
        tiles.append([overlay(im, None, num_classes), overlay(im, ref, num_classes), overlay(im, pred, num_classes)])
    cell_h = max(t.shape[0] for row in tiles for t in row) + 8
    cell_w = max(t.shape[1] for row in tiles for t in row) + 8

    def in_cell(t: np.ndarray) -> np.ndarray:  # centre every tile in an equal cell so columns line up
        top, left = (cell_h - t.shape[0]) // 2, (cell_w - t.shape[1]) // 2
        return np.pad(t, ((top, cell_h - t.shape[0] - top), (left, cell_w - t.shape[1] - left), (0, 0)))

    grid = np.concatenate([np.concatenate([in_cell(t) for t in row], axis=1) for row in tiles], axis=0)
    grid_img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)

    header, line = 22, 16
    legend_rows = (len(class_names) - 1 + 3) // 4 if class_names else 0
    canvas = Image.new("RGB", (grid_img.width, grid_img.height + 2 * header + legend_rows * line + 8), "black")
    canvas.paste(grid_img, (0, 2 * header))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((6, 4), title, fill="white")
    col = grid_img.width // 3
    for i, name in enumerate(("image", "reference", "prediction")):
        draw.text((i * col + col // 2 - 3 * len(name), header + 4), name, fill="white")
    if class_names:
        colors = label_colors(num_classes)
        y0 = 2 * header + grid_img.height + 4
        cell = grid_img.width // 4
        for k, name in enumerate(class_names[1:], start=1):
            x, y = ((k - 1) % 4) * cell + 6, y0 + ((k - 1) // 4) * line
            draw.rectangle([x, y + 2, x + 10, y + 12], fill=tuple(int(c) for c in colors[k]))
            draw.text((x + 14, y + 1), str(name), fill="white")
    with atomic_path(path, suffix=".png") as tmp:
        canvas.save(tmp, format="PNG")


def boxplot(values: dict[str, Sequence[float]], path: str | os.PathLike, title: str = "", ylabel: str = "Dice") -> None:
    """Write a PNG box plot (median, quartiles, 1.5·IQR whiskers, outliers as dots, mean as a cross) per group.

    ``values`` maps a group name (e.g. a class) to its values in [0, 1]; NaN values are dropped.
    """
    from PIL import Image, ImageDraw

    names = list(values)
    box_w, gap, left, top, bottom, height = 34, 26, 46, 30, 90, 300
    width = left + len(names) * (box_w + gap) + gap
    img = Image.new("RGB", (max(width, 320), top + height + bottom), "white")
    draw = ImageDraw.Draw(img)

    def y_of(v: float) -> float:
        return top + (1.0 - float(np.clip(v, 0.0, 1.0))) * height

    for t in np.linspace(0, 1, 6):  # axis and grid
        y = y_of(t)
        draw.line([(left - 4, y), (img.width - 8, y)], fill=(225, 225, 225))
        draw.text((6, y - 6), f"{t:.1f}", fill="black")
    draw.line([(left, top), (left, top + height)], fill="black")
    draw.text((left, 8), f"{title}  ({ylabel})" if title else ylabel, fill="black")
    colors = label_colors(len(names) + 1)[1:]
    for i, name in enumerate(names):
        v = np.asarray([x for x in values[name] if x == x], dtype=float)
        x0 = left + gap + i * (box_w + gap)
        xc = x0 + box_w / 2
        if v.size:
            q1, med, q3 = np.percentile(v, [25, 50, 75])
            iqr = q3 - q1
            lo, hi = v[v >= q1 - 1.5 * iqr].min(), v[v <= q3 + 1.5 * iqr].max()
            draw.line([(xc, y_of(lo)), (xc, y_of(q1))], fill="black")
            draw.line([(xc, y_of(q3)), (xc, y_of(hi))], fill="black")
            for w in (lo, hi):
                draw.line([(x0 + 8, y_of(w)), (x0 + box_w - 8, y_of(w))], fill="black")
            draw.rectangle([x0, y_of(q3), x0 + box_w, y_of(q1)], fill=tuple(int(c) for c in colors[i]), outline="black")
            draw.line([(x0, y_of(med)), (x0 + box_w, y_of(med))], fill="black", width=2)
            for o in v[(v < lo) | (v > hi)]:
                draw.ellipse([xc - 2, y_of(o) - 2, xc + 2, y_of(o) + 2], outline="black")
            m = y_of(float(v.mean()))
            draw.line([(xc - 4, m - 4), (xc + 4, m + 4)], fill="black")
            draw.line([(xc - 4, m + 4), (xc + 4, m - 4)], fill="black")
        label = name if len(name) <= 12 else name[:11] + "…"
        draw.text((x0 - 4, top + height + 8 + (i % 2) * 14), label, fill="black")
    with atomic_path(path, suffix=".png") as tmp:
        img.save(tmp, format="PNG")
