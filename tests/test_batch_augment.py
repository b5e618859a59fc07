"""ul3d's batch-level augmentation (ul3d.data.batch_augment) computes MONAI's Affine + Flip + ShiftIntensity for the
parameters each sample drew, as MONAI's random transforms draw them."""

import numpy as np
import pytest
import torch
from monai.transforms import Affine, Flip, ShiftIntensity

from ul3d.data.batch_augment import MATRIX_KEY, OFFSET_KEY, BatchAugment, RandAffineMatrixd, RandShiftOffsetd


def _volume(shape, seed):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn((1,) + shape, generator=g)
    label = torch.randint(0, 3, (1,) + shape, generator=g).float()
    return {"image": image, "label": label}


def _monai(item, t: RandAffineMatrixd, offset: float, roi):
    """MONAI's own transforms with the parameters ``t`` drew."""
    out = {}
    for key, mode in (("image", "bilinear"), ("label", "nearest")):
        x = item[key]
        if t.do_affine:
            g = t.grid
            x = Affine(rotate_params=g.rotate_params or None, shear_params=g.shear_params or None,
                       translate_params=g.translate_params or None, scale_params=g.scale_params or None,
                       spatial_size=roi, mode=mode, padding_mode="zeros", image_only=True)(x)
        for axis, flipped in enumerate(t.flips):
            if flipped:
                x = Flip(spatial_axis=axis)(x)
        if key == "image" and offset:
            x = ShiftIntensity(offset)(x)
        out[key] = torch.as_tensor(x)
    return out


@pytest.mark.parametrize("dims", [2, 3])
def test_batch_augmentation_is_monai_affine_flip_and_shift(dims):
    roi = (12, 10, 14)[:dims]
    rotate = (0.3, 0.2, 0.5)[:dims] if dims == 3 else (0.5,)
    t = RandAffineMatrixd("image", dims, prob=0.8, rotate_range=rotate, scale_range=(0.2,) * dims,
                          translate_range=(1.5,) * dims, shear_range=(0.1,) * (6 if dims == 3 else 2), flip_prob=0.5)
    s = RandShiftOffsetd("image", offsets=0.3, prob=0.5)
    t.set_random_state(3)
    s.set_random_state(4)
    items, wants, drawn = [], [], []
    for i in range(8):
        item = s(t(_volume(roi, i)))
        drawn.append((t.do_affine, tuple(t.flips), s.offset != 0))
        wants.append(_monai(item, t, s.offset, roi))
        items.append(item)
    # the draws cover affine on/off, flips and offsets (the check would be weak otherwise)
    assert {d[0] for d in drawn} == {True, False} and any(any(d[1]) for d in drawn) and {d[2] for d in drawn} == {True, False}
    batch = {k: torch.stack([it[k] for it in items]) for k in ("image", "label", MATRIX_KEY, OFFSET_KEY)}
    out = BatchAugment(["image", "label"], ["bilinear", "nearest"], roi)(batch)
    assert set(out) == {"image", "label"} and out["image"].dtype == torch.float32
    for i, want in enumerate(wants):
        assert (out["image"][i] - want["image"]).abs().max() <= 1e-5, (i, drawn[i])
        # nearest neighbour: a coordinate on a voxel boundary may round either way by one float ulp
        assert (out["label"][i] != want["label"]).float().mean() <= 1e-3, (i, drawn[i])
        assert want["image"].abs().max() > 0.1


def test_identity_draws_copy_the_patch_exactly():
    t = RandAffineMatrixd("image", 3, prob=0.0, rotate_range=(0.1, 0.1, 0.1), flip_prob=0.0)
    s = RandShiftOffsetd("image", offsets=0.1, prob=0.0)
    item = s(t(_volume((5, 6, 7), 0)))
    assert torch.equal(item[MATRIX_KEY], torch.eye(4)) and item[OFFSET_KEY] == 0
    batch = {k: item[k][None] for k in item}
    out = BatchAugment(["image", "label"], ["bilinear", "nearest"], (5, 6, 7))(batch)
    assert torch.equal(out["image"][0], item["image"]) and torch.equal(out["label"][0], item["label"])


def test_draws_follow_the_transform_random_state():
    t = RandAffineMatrixd("image", 3, prob=1.0, rotate_range=(0.0, 0.0, 0.1), scale_range=(0.1, 0.1, 0.1))
    item = _volume((4, 4, 4), 0)
    t.set_random_state(7)
    a = [t(item)[MATRIX_KEY] for _ in range(3)]
    t.set_random_state(7)
    b = [t(item)[MATRIX_KEY] for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not torch.equal(a[0], a[1])
    for m in a:  # rotation about the last axis only, within ±0.1 rad; scales within 1 ± 0.1
        angle = np.arctan2(float(m[1, 0]), float(m[0, 0]))
        scale = np.linalg.norm(m[:3, :3].numpy(), axis=0)
        assert float(m[2, 2]) == pytest.approx(scale[2]) and abs(angle) <= 0.1 + 1e-6
        assert np.all(np.abs(scale - 1) <= 0.1 + 1e-6)


def test_bad_batches_are_refused_with_the_shapes():
    aug = BatchAugment(["image", "label"], ["bilinear", "nearest"], (4, 4, 4))
    batch = {"image": torch.zeros(2, 1, 4, 4), "label": torch.zeros(2, 1, 4, 4), MATRIX_KEY: torch.eye(4).repeat(2, 1, 1)}
    with pytest.raises(ValueError, match="do not fit patches of"):
        aug(batch)
    with pytest.raises(ValueError, match="2 keys but 1 modes"):
        BatchAugment(["image", "label"], ["bilinear"], (4, 4, 4))
    with pytest.raises(ValueError, match="3 spatial dimensions, expected 2"):
        RandAffineMatrixd("image", 2)(_volume((3, 3, 3), 0))


def test_train_loader_batches_are_augmented_patches(tmp_path):
    """ul3d train's loader: every batch is image and label patches of the ROI, labels still class values (nearest),
    each batch the collated per-patch draws resampled at once, the same for 0 and 2 loader processes."""
    from ul3d.config import load_config
    from ul3d.data.datasets import load_dataset
    from ul3d.data.synth import write_synthetic
    from ul3d.engine.train import build_train_loader, split_cases

    data = write_synthetic("msd-prostate", tmp_path / "data", n_cases=3, seed=3)
    spec = load_dataset(data)
    batches = {}
    for workers in (0, 2):
        cfg = load_config("prostate", ["train.roi_size=[24,24,24]", "train.num_samples=2", "data.spacing=[1.2,1.2,3.6]",
                                       f"data.num_workers={workers}", "train.augment.flip_prob=0.3"])
        items, _ = split_cases(spec, cfg)
        loader = build_train_loader(cfg, items, 3, spec.label_map, torch.device("cpu"), 0, 4)
        batches[workers] = list(loader)
    assert len(batches[0]) == 4
    for a, b in zip(batches[0], batches[2]):
        assert set(a) == {"image", "label"} and a["image"].shape == (2, 2, 24, 24, 24)  # MSD prostate: T2, ADC
        assert a["label"].shape == (2, 1, 24, 24, 24)
        assert set(torch.unique(a["label"]).tolist()) <= {0.0, 1.0, 2.0}
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    ds = loader.dataset
    drawn = ds[0]  # the first batch's two patches as drawn, before the batch augmentation
    assert {MATRIX_KEY, OFFSET_KEY} <= set(drawn[0]) and not torch.equal(drawn[0][MATRIX_KEY], torch.eye(4))
    want = loader.collate_fn([drawn])
    assert torch.equal(want["image"], batches[0][0]["image"])
