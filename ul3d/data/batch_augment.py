"""Training augmentation resampled once per batch (issue 7: the loader has to keep up with a ~12 ms training step).

MONAI's ``RandAffined`` resamples each patch on its own: the random matrix, a grid, a matrix product over the grid,
its normalisation and one ``grid_sample`` per key, dozens of small tensor operations per patch (4 ms per 96³ patch on
an H200 with the volumes cached on the GPU; ``ul3d train``'s loader alone ran 12.7 ms per batch of two patches,
``benchmarks/results/loader_cuda_h200_2026-12-04.json``). Here each sample only *draws* its parameters, as MONAI's
transforms draw them (:class:`RandAffineMatrixd`, :class:`RandShiftOffsetd`: the same distributions, from the sample's
own random state, so the data stay a function of ``(seed, sample index)``); after collation :class:`BatchAugment`
resamples the whole batch with one grid and one ``grid_sample`` per key and adds the intensity offsets.

The function is MONAI's ``Affine`` (``RandAffined``'s resampling: rotation/shear/translation/scale about the patch
centre, output voxel ``o`` read at input voxel ``A (o - (n_out - 1)/2) + (n_in - 1)/2``, zeros outside), followed by
``Flip`` on the flipped axes and ``ShiftIntensity``; ``tests/test_batch_augment.py`` compares it with them. A flip is
folded into the matrix (``A · diag(±1)``: the grid is centred), so flipped and unflipped patches share the one
``grid_sample``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import MapTransform, Randomizable, RandAffineGrid
from monai.transforms.utils import create_rotate, create_scale, create_shear, create_translate

__all__ = ["RandAffineMatrixd", "RandShiftOffsetd", "BatchAugment", "MATRIX_KEY", "OFFSET_KEY"]

#: the item key of a sample's affine matrix ((dims + 1)², float32) and of its intensity offset (float32 scalar)
MATRIX_KEY, OFFSET_KEY = "augment_matrix", "augment_offset"


class RandAffineMatrixd(Randomizable, MapTransform):
    """Draws ``RandAffined(prob, rotate_range, shear_range, translate_range, scale_range)``'s parameters and
    ``RandFlipd(flip_prob, spatial_axis=a)`` for every axis ``a``, and stores the matrix that applies them
    (``data[MATRIX_KEY]``); the identity where the affine is not drawn and no axis is flipped.

    The ranges mean what they mean to MONAI's ``RandAffineGrid`` (which draws them here, from this transform's random
    state). ``keys`` names the image whose number of spatial dimensions the matrix has.
    """

    def __init__(self, keys, spatial_dims: int, prob: float = 1.0, rotate_range=None, shear_range=None,
                 translate_range=None, scale_range=None, flip_prob: float = 0.0) -> None:
        MapTransform.__init__(self, keys)
        self.spatial_dims, self.prob, self.flip_prob = int(spatial_dims), float(prob), float(flip_prob)
        self.grid = RandAffineGrid(rotate_range=rotate_range, shear_range=shear_range, translate_range=translate_range,
                                   scale_range=scale_range)
        self.do_affine, self.flips = False, [False] * self.spatial_dims

    def randomize(self, data: Any = None) -> None:
        self.do_affine = self.R.rand() < self.prob
        if self.do_affine:
            self.grid.R = self.R  # MONAI's draw, from this transform's state
            self.grid.randomize()
        self.flips = [bool(self.R.rand() < self.flip_prob) for _ in range(self.spatial_dims)] if self.flip_prob > 0 \
            else [False] * self.spatial_dims

    def matrix(self) -> np.ndarray:
        """The drawn parameters' matrix, composed in ``AffineGrid``'s order (rotate, shear, translate, scale), then
        the flips."""
        d = self.spatial_dims
        a = np.eye(d + 1)
        if self.do_affine:
            g = self.grid
            if g.rotate_params:
                a = a @ create_rotate(d, g.rotate_params, backend="numpy")
            if g.shear_params:
                a = a @ create_shear(d, g.shear_params, backend="numpy")
            if g.translate_params:
                a = a @ create_translate(d, g.translate_params, backend="numpy")
            if g.scale_params:
                a = a @ create_scale(d, g.scale_params, backend="numpy")
        return a @ np.diag([-1.0 if f else 1.0 for f in self.flips] + [1.0])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            dims = d[key].ndim - 1
            if dims != self.spatial_dims:
                raise ValueError(f"RandAffineMatrixd: {key!r} has {dims} spatial dimensions, expected "
                                 f"{self.spatial_dims}")
        d[MATRIX_KEY] = torch.as_tensor(self.matrix(), dtype=torch.float32)
        return d


class RandShiftOffsetd(Randomizable, MapTransform):
    """Draws ``RandShiftIntensityd(offsets, prob)``'s offset as MONAI does (``R.rand() < prob``, then
    ``R.uniform(-offsets, offsets)``) and stores it (``data[OFFSET_KEY]``, 0 where not drawn)."""

    def __init__(self, keys, offsets: float | Sequence[float], prob: float = 0.1) -> None:
        MapTransform.__init__(self, keys)
        lo, hi = (-abs(float(offsets)), abs(float(offsets))) if np.isscalar(offsets) else map(float, offsets)
        self.offsets, self.prob, self.offset = (min(lo, hi), max(lo, hi)), float(prob), 0.0

    def randomize(self, data: Any = None) -> None:
        do = self.R.rand() < self.prob
        self.offset = float(self.R.uniform(low=self.offsets[0], high=self.offsets[1])) if do else 0.0

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        self.randomize()
        d[OFFSET_KEY] = torch.tensor(self.offset, dtype=torch.float32)
        return d


class BatchAugment:
    """Applies a collated batch's drawn matrices (``batch[MATRIX_KEY]``, ``(N, d + 1, d + 1)``) and offsets
    (``batch[OFFSET_KEY]``, ``(N,)``) to ``(N, C, *S)`` tensors: one grid for the batch, one ``grid_sample`` per key
    (``modes``: ``"bilinear"``/``"nearest"``), zeros outside the patch, output ``spatial_size``, float32 (as MONAI's
    ``Resample`` gives); the offsets are added to ``offset_keys``. The parameter entries are removed from the batch.
    """

    def __init__(self, keys: Sequence[str], modes: Sequence[str], spatial_size: Sequence[int],
                 offset_keys: Sequence[str] = ("image",)) -> None:
        if len(keys) != len(modes):
            raise ValueError(f"BatchAugment: {len(keys)} keys but {len(modes)} modes")
        self.keys, self.modes = list(keys), list(modes)
        self.spatial_size, self.offset_keys = [int(s) for s in spatial_size], list(offset_keys)
        self._base: dict[tuple, torch.Tensor] = {}

    def _centred(self, device: torch.device) -> torch.Tensor:
        """Homogeneous output voxel coordinates about the centre, ``(d + 1, prod(S))`` float32 (MONAI's
        ``create_grid``)."""
        key = (str(device),)
        if key not in self._base:
            axes = [torch.linspace(-(n - 1) / 2, (n - 1) / 2, n, device=device) for n in self.spatial_size]
            mesh = torch.meshgrid(*axes, indexing="ij")
            self._base[key] = torch.stack([*mesh, torch.ones_like(mesh[0])]).reshape(len(axes) + 1, -1)
        return self._base[key]

    def grid(self, matrices: torch.Tensor, in_size: Sequence[int]) -> torch.Tensor:
        """``grid_sample``'s grid ``(N, *S, d)`` (last axis x = the last spatial axis) for inputs of ``in_size``."""
        d = len(self.spatial_size)
        coords = torch.matmul(matrices[:, :d].to(torch.float32), self._centred(matrices.device))  # (N, d, P)
        scale = torch.tensor([2.0 / max(2, n) for n in in_size], device=coords.device)
        coords = coords * scale[None, :, None]
        return coords.flip(1).transpose(1, 2).reshape(matrices.shape[0], *self.spatial_size, d)

    def _flips_only(self, matrices: torch.Tensor, in_size: tuple) -> list[list[int] | None]:
        """Per sample: the flipped axes when its matrix only flips (patch and output of one size), else None."""
        d = len(self.spatial_size)
        if tuple(in_size) != tuple(self.spatial_size):
            return [None] * len(matrices)
        out = []
        for m in matrices:
            diag = torch.diagonal(m[:d, :d])
            signed = torch.equal(m[:d, :d], torch.diag(diag)) and bool((diag.abs() == 1).all())
            out.append([a for a in range(d) if diag[a] < 0] if signed and not m[:d, d].any() else None)
        return out

    def __call__(self, batch: dict) -> dict:
        batch = dict(batch)
        matrices, offsets = batch.pop(MATRIX_KEY, None), batch.pop(OFFSET_KEY, None)
        first = batch[self.keys[0]]
        if matrices is None:  # nothing spatial drawn (no affine, no flips configured)
            matrices = torch.eye(len(first.shape) - 1).expand(len(first), -1, -1)
        in_size = tuple(first.shape[2:])
        if len(in_size) != len(self.spatial_size) or matrices.shape[-1] != len(in_size) + 1:
            raise ValueError(f"BatchAugment: batch {tuple(first.shape)} and matrices {tuple(matrices.shape)} do not "
                             f"fit patches of {self.spatial_size}")
        matrices = torch.as_tensor(matrices, dtype=torch.float32)
        exact = self._flips_only(matrices, in_size)  # copied exactly, as MONAI does when it draws no affine
        warp = [i for i in range(len(matrices)) if exact[i] is None]
        grid = self.grid(matrices[warp].to(first.device), in_size) if warp else None
        for key, mode in zip(self.keys, self.modes):
            x = torch.as_tensor(batch[key]).to(torch.float32)
            if tuple(x.shape[2:]) != in_size:
                raise ValueError(f"BatchAugment: {key!r} is {tuple(x.shape)}, {self.keys[0]!r} {tuple(first.shape)}")
            if len(warp) == len(x):
                batch[key] = F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)
                continue
            out = x.clone()
            if warp:
                out[warp] = F.grid_sample(x[warp], grid, mode=mode, padding_mode="zeros", align_corners=False)
            for i, axes in enumerate(exact):
                if axes:
                    out[i] = x[i].flip([a + 1 for a in axes])
            batch[key] = out
        if offsets is not None:
            view = (-1,) + (1,) * (len(in_size) + 1)
            for key in self.offset_keys:
                batch[key] = batch[key] + torch.as_tensor(offsets).to(batch[key].device, torch.float32).reshape(view)
        return batch
