"""MONAI transform pipelines built from a run config (``configs/*.yaml``).

* :func:`preprocessing` — deterministic and invertible (load, channel-first, label remap,
  orientation, spacing, intensity normalisation, optional foreground crop). Training caches
  its output; inference inverts it with ``Invertd`` to restore each input's geometry.
* :func:`train_augmentation` — random patch sampling and 3D UX-Net's augmentations, applied to
  cached volumes.

Each pipeline is first written as a list of MONAI bundle config items (``{"_target_": "Spacingd", ...}``,
:func:`preprocessing_spec`, :func:`train_augmentation_spec`) and then instantiated with MONAI's
``ConfigParser``: the engine and the MONAI bundles (:mod:`ul3d.bundle`) run the same transforms from
one definition. ``refs`` lets a bundle put a reference such as ``"@roi_size"`` where the engine puts a number.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from monai import transforms as T
from monai.bundle import ConfigParser
from monai.data import get_track_meta, set_track_meta

from ..config import get
from .batch_augment import MATRIX_KEY, OFFSET_KEY

__all__ = ["batch_augmentation", "metadata_tracking", "preprocessing", "train_augmentation", "preprocessing_spec", "train_augmentation_spec", "compose"]

#: the reader every pipeline loads with: NIfTI through nibabel, NRRD/MetaImage through SimpleITK
READER = "$ul3d.data.io.monai_reader()"


@contextmanager
def metadata_tracking(on: bool) -> Iterator[None]:
    """MONAI's MetaTensor tracking (``monai.data.set_track_meta``) switched ``on``/off inside the block, then restored.

    Training patches need no metadata once the volumes are preprocessed; without it MONAI's crops and affine
    augmentation skip their affine bookkeeping (small matrix products, copies and, for volumes cached on the GPU,
    host-device round trips) and give the same arrays as plain tensors. MONAI keeps the switch in one process-wide
    variable: code running in another thread meanwhile sees it too (only the types of its outputs change).
    """
    previous = get_track_meta()
    set_track_meta(on)
    try:
        yield
    finally:
        set_track_meta(previous)


def compose(spec: Sequence[Mapping[str, Any]]) -> T.Compose:
    """Instantiate a list of bundle config items as a ``Compose``."""
    import ul3d.data.io  # noqa: F401 - the reader expression needs it

    parser = ConfigParser({"transforms": list(spec)}, globals={"ul3d": "ul3d"})
    return T.Compose(parser.get_parsed_content("transforms"))


def _intensity(config: dict) -> dict | None:
    cfg = get(config, "data.intensity", {}) or {}
    mode = cfg.get("mode", "zscore")
    if mode == "zscore":
        return {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": bool(cfg.get("nonzero", True)),
                "channel_wise": True}
    if mode == "window":
        return {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": float(cfg["a_min"]),
                "a_max": float(cfg["a_max"]), "b_min": float(cfg.get("b_min", 0.0)),
                "b_max": float(cfg.get("b_max", 1.0)), "clip": True}
    if mode in (None, "none"):
        return None
    raise ValueError(f"data.intensity.mode must be 'zscore', 'window' or 'none', got {mode!r}")


def preprocessing_spec(
    config: dict,
    with_label: bool = True,
    label_map: dict[int, int] | None = None,
    pad_to: Sequence[int] | str | None = None,
    class_indices: int | str | None = None,
    refs: Mapping[str, str] | None = None,
    fg_bg_indices: bool = False,
) -> list[dict]:
    """Config items of :func:`preprocessing`; ``refs`` may name ``"pixdim"`` to reference instead of the spacing."""
    refs = dict(refs or {})
    keys = ["image", "label"] if with_label else ["image"]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    tfs: list[dict] = [{"_target_": "LoadImaged", "keys": keys, "reader": READER, "ensure_channel_first": True,
                        "image_only": True}]
    if with_label and label_map:
        src = sorted(label_map)
        tfs.append({"_target_": "MapLabelValued", "keys": "label", "orig_labels": [int(s) for s in src],
                    "target_labels": [int(label_map[s]) for s in src]})
    if get(config, "data.orientation"):
        tfs.append({"_target_": "Orientationd", "keys": keys, "axcodes": get(config, "data.orientation"), "labels": None})
    spacing = get(config, "data.spacing")
    if spacing:
        tfs.append({"_target_": "Spacingd", "keys": keys, "pixdim": refs.get("pixdim", [float(s) for s in spacing]),
                    "mode": modes})
    norm = _intensity(config)
    if norm is not None:
        tfs.append(norm)
    if get(config, "data.crop_foreground", False):
        tfs.append({"_target_": "CropForegroundd", "keys": keys, "source_key": "image", "allow_smaller": True})
    if pad_to is not None:
        tfs.append({"_target_": "SpatialPadd", "keys": keys,
                    "spatial_size": pad_to if isinstance(pad_to, str) else [int(s) for s in pad_to]})
    if class_indices:
        tfs.append({"_target_": "ClassesToIndicesd", "keys": "label", "num_classes": class_indices,
                    "indices_postfix": "_cls_indices", "image_key": "image", "image_threshold": 0})
    if fg_bg_indices:
        tfs.append({"_target_": "FgBgToIndicesd", "keys": "label", "image_key": "image", "image_threshold": 0})
    tfs.append({"_target_": "EnsureTyped", "keys": keys, "dtype": None})
    return tfs


def preprocessing(
    config: dict,
    with_label: bool = True,
    label_map: dict[int, int] | None = None,
    pad_to: Sequence[int] | None = None,
    class_indices: int | None = None,
    fg_bg_indices: bool = False,
) -> T.Compose:
    """Deterministic preprocessing of ``{"image": ..., "label": ...}`` items.

    Args:
        config: the run config (``data.*`` keys).
        with_label: also load and resample ``label`` (nearest neighbour).
        label_map: remap label values at load time (e.g. BTCV's 8-organ protocol).
        pad_to: pad image (and label) to at least this size — training pads thin volumes to the patch.
        class_indices: number of classes; precompute each class's voxel indices (``label_cls_indices``) so
            class-balanced patch sampling does not search the volume for every patch.
        fg_bg_indices: precompute the foreground and background voxel indices (``label_fg_indices``,
            ``label_bg_indices``) for ``posneg`` patch sampling, which otherwise searches the whole volume for
            every patch (the data loader's largest cost in ``ul3d train``, issue 7).
    """
    return compose(preprocessing_spec(config, with_label, label_map, pad_to, class_indices, fg_bg_indices=fg_bg_indices))


def train_augmentation_spec(
    config: dict, num_classes: int | str | None = None, refs: Mapping[str, str] | None = None, device: str | None = None,
    batched: bool = False,
) -> list[dict]:
    """Config items of :func:`train_augmentation`; ``refs`` may name ``"roi_size"`` and ``"num_samples"``; ``device``:
    where the affine augmentation builds its sampling grid (the device of the cached volumes). ``batched``: the
    affine, flips and intensity shift only drawn per patch, applied by :func:`batch_augmentation` after collation."""
    refs = dict(refs or {})
    roi = refs.get("roi_size", [int(s) for s in get(config, "train.roi_size")])
    aug = get(config, "train.augment", {}) or {}
    keys = ["image", "label"]
    sampling = get(config, "train.sampling", "posneg")
    samples = refs.get("num_samples", int(get(config, "train.num_samples", 1)))
    if sampling == "posneg":
        crop = {"_target_": "RandCropByPosNegLabeld", "keys": keys, "label_key": "label", "spatial_size": roi,
                "pos": float(get(config, "train.pos", 1)), "neg": float(get(config, "train.neg", 1)),
                "num_samples": samples, "image_key": "image", "image_threshold": 0, "allow_smaller": True,
                "fg_indices_key": "label_fg_indices", "bg_indices_key": "label_bg_indices"}  # used when cached
    elif sampling == "classes":
        if not num_classes:
            raise ValueError("train.sampling=classes needs the number of classes")
        crop = {"_target_": "RandCropByLabelClassesd", "keys": keys, "label_key": "label", "spatial_size": roi,
                "num_classes": num_classes, "num_samples": samples, "image_key": "image", "image_threshold": 0,
                "allow_smaller": True, "warn": False, "indices_key": "label_cls_indices"}
    else:
        raise ValueError(f"train.sampling must be 'posneg' or 'classes', got {sampling!r}")
    tfs: list[dict] = [crop]
    if batched:
        return tfs + _batched_draws(config, keys)
    if float(aug.get("affine_prob", 0)) > 0:
        tfs.append({"_target_": "RandAffined", "keys": keys, "mode": ["bilinear", "nearest"],
                    "prob": float(aug["affine_prob"]), "spatial_size": roi, "rotate_range": aug.get("rotate_range"),
                    "scale_range": aug.get("scale_range"), "padding_mode": "zeros"})
        if device is not None:  # without it MONAI builds every 96³ grid on the CPU and copies it over (39 ms/batch)
            tfs[-1].update(device=str(device), cache_grid=True)
    if float(aug.get("flip_prob", 0)) > 0:
        dims = len(get(config, "train.roi_size"))
        tfs += [{"_target_": "RandFlipd", "keys": keys, "prob": float(aug["flip_prob"]), "spatial_axis": a}
                for a in range(dims)]
    if float(aug.get("intensity_shift_prob", 0)) > 0:
        tfs.append({"_target_": "RandShiftIntensityd", "keys": "image", "offsets": float(aug["intensity_shift"]),
                    "prob": float(aug["intensity_shift_prob"])})
    tfs.append({"_target_": "EnsureTyped", "keys": keys, "track_meta": False})
    tfs.append({"_target_": "SelectItemsd", "keys": keys})  # drop cached indices from the batch
    return tfs


def _batched_draws(config: dict, keys: list[str]) -> list[dict]:
    """Per-patch draws of :func:`train_augmentation_spec`'s affine, flips and shift (``ul3d.data.batch_augment``)."""
    aug = get(config, "train.augment", {}) or {}
    dims = len(get(config, "train.roi_size"))
    tfs: list[dict] = []
    affine, flip = float(aug.get("affine_prob", 0)), float(aug.get("flip_prob", 0))
    if affine > 0 or flip > 0:
        tfs.append({"_target_": "ul3d.data.batch_augment.RandAffineMatrixd", "keys": "image", "spatial_dims": dims,
                    "prob": affine, "rotate_range": aug.get("rotate_range"), "scale_range": aug.get("scale_range"),
                    "flip_prob": flip})
    if float(aug.get("intensity_shift_prob", 0)) > 0:
        tfs.append({"_target_": "ul3d.data.batch_augment.RandShiftOffsetd", "keys": "image",
                    "offsets": float(aug["intensity_shift"]), "prob": float(aug["intensity_shift_prob"])})
    tfs.append({"_target_": "EnsureTyped", "keys": keys, "track_meta": False})
    drawn = [MATRIX_KEY] if affine > 0 or flip > 0 else []
    if float(aug.get("intensity_shift_prob", 0)) > 0:
        drawn.append(OFFSET_KEY)
    tfs.append({"_target_": "SelectItemsd", "keys": keys + drawn})
    return tfs


def train_augmentation(config: dict, num_classes: int | None = None, device: str | None = None,
                       batched: bool = False) -> T.Compose:
    """Random part of training: patch sampling then 3D UX-Net's augmentations.

    ``train.sampling``: ``posneg`` (default: patch centres on foreground with probability pos/(pos+neg)) or
    ``classes`` (centres drawn class by class with equal probability — small structures are seen as often as
    large ones; needs ``num_classes``). ``batched``: the augmentations only drawn per patch; apply
    :func:`batch_augmentation` to the collated batch.
    """
    return compose(train_augmentation_spec(config, num_classes, device=device, batched=batched))


def batch_augmentation(config: dict):
    """The batch half of ``train_augmentation(config, batched=True)``: MONAI's ``Affine`` + ``Flip`` +
    ``ShiftIntensity`` with every patch's drawn parameters, one ``grid_sample`` per key for the batch
    (:class:`ul3d.data.batch_augment.BatchAugment`)."""
    from .batch_augment import BatchAugment

    return BatchAugment(["image", "label"], ["bilinear", "nearest"], [int(s) for s in get(config, "train.roi_size")])
