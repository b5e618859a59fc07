"""MONAI transform pipelines built from a run config (``configs/*.yaml``).

* :func:`preprocessing` — deterministic and invertible (load, channel-first, label remap,
  orientation, spacing, intensity normalisation, optional foreground crop). Training caches
  its output; inference inverts it with ``Invertd`` to restore each input's geometry.
* :func:`train_augmentation` — random patch sampling and 3D UX-Net's augmentations, applied to
  cached volumes.
"""

from __future__ import annotations

from collections.abc import Sequence

from monai import transforms as T

from ..config import get
from .io import monai_reader

__all__ = ["preprocessing", "train_augmentation"]


def _intensity(config: dict):
    cfg = get(config, "data.intensity", {}) or {}
    mode = cfg.get("mode", "zscore")
    if mode == "zscore":
        return T.NormalizeIntensityd(keys="image", nonzero=bool(cfg.get("nonzero", True)), channel_wise=True)
    if mode == "window":
        return T.ScaleIntensityRanged(
            keys="image", a_min=float(cfg["a_min"]), a_max=float(cfg["a_max"]),
            b_min=float(cfg.get("b_min", 0.0)), b_max=float(cfg.get("b_max", 1.0)), clip=True,
        )
    if mode in (None, "none"):
        return None
    raise ValueError(f"data.intensity.mode must be 'zscore', 'window' or 'none', got {mode!r}")


def preprocessing(
    config: dict,
    with_label: bool = True,
    label_map: dict[int, int] | None = None,
    pad_to: Sequence[int] | None = None,
    class_indices: int | None = None,
) -> T.Compose:
    """Deterministic preprocessing of ``{"image": ..., "label": ...}`` items.

    Args:
        config: the run config (``data.*`` keys).
        with_label: also load and resample ``label`` (nearest neighbour).
        label_map: remap label values at load time (e.g. BTCV's 8-organ protocol).
        pad_to: pad image (and label) to at least this size — training pads thin volumes to the patch.
        class_indices: number of classes; precompute each class's voxel indices (``label_cls_indices``) so
            class-balanced patch sampling does not search the volume for every patch.
    """
    keys = ["image", "label"] if with_label else ["image"]
    modes = ("bilinear", "nearest") if with_label else ("bilinear",)
    # NIfTI through nibabel (MONAI's default), NRRD/MetaImage through SimpleITK
    tfs: list = [T.LoadImaged(keys=keys, reader=monai_reader(), ensure_channel_first=True, image_only=True)]
    if with_label and label_map:
        src = sorted(label_map)
        tfs.append(T.MapLabelValued(keys="label", orig_labels=src, target_labels=[label_map[s] for s in src]))
    if get(config, "data.orientation"):
        tfs.append(T.Orientationd(keys=keys, axcodes=get(config, "data.orientation"), labels=None))
    spacing = get(config, "data.spacing")
    if spacing:
        tfs.append(T.Spacingd(keys=keys, pixdim=tuple(float(s) for s in spacing), mode=modes))
    norm = _intensity(config)
    if norm is not None:
        tfs.append(norm)
    if get(config, "data.crop_foreground", False):
        tfs.append(T.CropForegroundd(keys=keys, source_key="image", allow_smaller=True))
    if pad_to is not None:
        tfs.append(T.SpatialPadd(keys=keys, spatial_size=tuple(int(s) for s in pad_to)))
    if class_indices:
        tfs.append(T.ClassesToIndicesd(keys="label", num_classes=class_indices, indices_postfix="_cls_indices",
                                       image_key="image", image_threshold=0))
    tfs.append(T.EnsureTyped(keys=keys, dtype=None))
    return T.Compose(tfs)


def train_augmentation(config: dict, num_classes: int | None = None) -> T.Compose:
    """Random part of training: patch sampling then 3D UX-Net's augmentations.

    ``train.sampling``: ``posneg`` (default: patch centres on foreground with probability pos/(pos+neg)) or
    ``classes`` (centres drawn class by class with equal probability — small structures are seen as often as
    large ones; needs ``num_classes``).
    """
    roi = tuple(int(s) for s in get(config, "train.roi_size"))
    aug = get(config, "train.augment", {}) or {}
    keys = ["image", "label"]
    sampling = get(config, "train.sampling", "posneg")
    samples = int(get(config, "train.num_samples", 1))
    if sampling == "posneg":
        crop = T.RandCropByPosNegLabeld(
            keys=keys, label_key="label", spatial_size=roi, pos=float(get(config, "train.pos", 1)),
            neg=float(get(config, "train.neg", 1)), num_samples=samples, image_key="image", image_threshold=0,
            allow_smaller=True,
        )
    elif sampling == "classes":
        if not num_classes:
            raise ValueError("train.sampling=classes needs the number of classes")
        crop = T.RandCropByLabelClassesd(
            keys=keys, label_key="label", spatial_size=roi, num_classes=num_classes, num_samples=samples,
            image_key="image", image_threshold=0, allow_smaller=True, warn=False, indices_key="label_cls_indices",
        )
    else:
        raise ValueError(f"train.sampling must be 'posneg' or 'classes', got {sampling!r}")
    tfs: list = [crop]
    if float(aug.get("affine_prob", 0)) > 0:
        tfs.append(
            T.RandAffined(
                keys=keys, mode=("bilinear", "nearest"), prob=float(aug["affine_prob"]), spatial_size=roi,
                rotate_range=aug.get("rotate_range"), scale_range=aug.get("scale_range"), padding_mode="zeros",
            )
        )
    if float(aug.get("flip_prob", 0)) > 0:
        tfs += [T.RandFlipd(keys=keys, prob=float(aug["flip_prob"]), spatial_axis=a) for a in range(len(roi))]
    if float(aug.get("intensity_shift_prob", 0)) > 0:
        tfs.append(T.RandShiftIntensityd(keys="image", offsets=float(aug["intensity_shift"]), prob=float(aug["intensity_shift_prob"])))
    tfs.append(T.EnsureTyped(keys=keys, track_meta=False))
    tfs.append(T.SelectItemsd(keys=keys))  # drop cached indices from the batch
    return T.Compose(tfs)
