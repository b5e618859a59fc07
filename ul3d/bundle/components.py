"""What the bundle configs (``bundles/*/configs/*.json``) call at run time.

Everything here reads user input — a dataset folder, a folder of volumes, a checkpoint — and turns a bad
one into one line that names the file and what was expected. Under ``python -m monai.bundle run`` that line
is all the user sees (``SystemExit``); set ``UL3D_DEBUG=1`` to get the exception and its traceback instead.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch
from monai.data import NibabelWriter

from ..data.datasets import load_dataset
from ..data.io import case_id, read_header
from ..data.validation import validate_dataset
from ..engine.infer import CHANNEL_FILE, find_images, group_cases
from ..engine.train import split_cases
from ..utils import atomic_path

__all__ = [
    "BundleInputError", "datalist", "image_datalist", "check_checkpoint", "latest_checkpoint", "AtomicNibabelWriter",
    "unwrap", "case_name", "CaseNames", "EvaluateFolder",
]


class BundleInputError(ValueError):
    """A bundle was given input it cannot use; the message names the file and what was expected."""


def _clean_errors(fn):
    """Turn ul3d's input errors (``ValueError`` family, missing files) into a one-line exit under the bundle CLI."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError) as e:
            if os.environ.get("UL3D_DEBUG"):
                raise
            raise SystemExit(f"error: {e}") from None

    return wrapper


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The network inside a ``DistributedDataParallel``/``DataParallel`` wrapper (or the network itself)."""
    return getattr(network, "module", network)


def _dataset(dataset_dir: str | os.PathLike | None, layout: str | None, protocol: str | None):
    if not dataset_dir or not Path(dataset_dir).exists():
        raise BundleInputError(
            f"dataset_dir {str(dataset_dir)!r} does not exist: expected a dataset folder "
            f"({layout or 'MSD, FeTA, BTCV, nnU-Net'} layout) or a datalist file; set it with --dataset_dir DIR"
        )
    return load_dataset(dataset_dir, layout=layout, **({"protocol": protocol} if protocol else {}))


@_clean_errors
def datalist(
    dataset_dir: str | os.PathLike | None,
    split: str = "train",
    layout: str | None = None,
    protocol: str | None = None,
    val_fraction: float = 0.2,
    val_cases: list[str] | None = None,
    seed: int = 0,
    channels: int | None = None,
    check: bool = False,
) -> list[dict[str, Any]]:
    """Items ``{"image", "label", "id"}`` of one split of a labelled dataset in any layout ul3d reads.

    Args:
        dataset_dir: dataset folder or datalist file.
        split: ``"train"``, ``"val"`` (the same seeded split as ``ul3d train``: ``val_cases`` or a
            ``val_fraction`` of the cases), ``"all"`` (every labelled training case) or ``"test"`` (the labelled
            held-out cases of the protocol, e.g. BTCV's TransUNet test cases).
        layout, protocol: as in :func:`ul3d.data.datasets.load_dataset` (None = detect / default).
        channels: expected input channels, checked when ``check``.
        check: validate every case first (:func:`ul3d.data.validation.validate_dataset`) — missing files,
            shape/affine mismatches, wrong channel counts, label values outside the classes.
    """
    spec = _dataset(dataset_dir, layout, protocol)
    if check:
        validate_dataset(spec, expected_channels=int(channels) if channels else None)
    if split == "all":
        return [dict(item) for item in spec.training]
    if split == "test":  # labelled held-out cases of the protocol (BTCV's 12 TransUNet test cases)
        items = [dict(item) for item in spec.test if item.get("label")]
        if not items:
            raise BundleInputError(f"{dataset_dir}: no labelled test cases in this dataset (use --eval_split val or all)")
        return items
    config = {"data": {"val_cases": list(val_cases or []), "val_fraction": float(val_fraction)}, "train": {"seed": int(seed)}}
    train_items, val_items = split_cases(spec, config)
    if split == "train":
        return [dict(item) for item in train_items]
    if split == "val":
        return [dict(item) for item in val_items]
    raise BundleInputError(f"split must be 'train', 'val', 'all' or 'test', got {split!r}")


@_clean_errors
def image_datalist(input_dir: str | os.PathLike | None, channels: int, channel_names: list[str] | None = None) -> list[dict]:
    """Items ``{"image"}`` for every volume in ``input_dir`` (nnU-Net's ``CASE_0000, CASE_0001 …`` files form one
    case). A volume with the wrong number of channels is named on stderr and skipped; the rest are predicted."""
    folder = Path(input_dir) if input_dir else None
    if folder is None or not folder.is_dir():
        raise BundleInputError(f"input_dir {str(input_dir)!r} is not a folder: expected a folder of volumes "
                               f"(.nii.gz, .nii, .nrrd, .mha); set it with --input_dir DIR")
    cases = group_cases(find_images([folder]))
    if int(channels) == 1:  # a single-channel network: CASE_0000, CASE_0001 ... are separate volumes
        cases = [(case_id(f), [f]) for _, files in cases for f in files]
    if not cases:
        raise BundleInputError(f"{folder}: no volumes found (expected .nii.gz, .nii, .nrrd or .mha files)")
    expected = f"{channels} channel(s)" + (f" ({', '.join(channel_names)})" if channel_names else "")
    items, skipped = [], []
    for case, files in cases:
        try:
            found = len(files) if len(files) > 1 else read_header(files[0]).channels
        except ValueError as e:
            skipped.append(f"{files[0]}: unreadable ({e}); skipped")
            continue
        if found != int(channels):
            skipped.append(f"{files[0]}: has {found} channel(s), the network expects {expected}; skipped")
            continue
        items.append({"image": [str(f) for f in files] if len(files) > 1 else str(files[0]), "id": case})
    for line in skipped:
        print(f"error: {line}", file=sys.stderr, flush=True)
    if not items:
        raise BundleInputError(f"{folder}: none of the {len(cases)} volume(s) can be predicted (see above)")
    return items


@_clean_errors
def check_checkpoint(path: str | os.PathLike, network: torch.nn.Module) -> str:
    """``path`` when it holds weights that fit ``network`` (a plain state dict or ``{"model": state dict}``);
    otherwise one error naming the file and the first tensors that do not fit."""
    path = Path(path)
    if not path.is_file():
        raise BundleInputError(f"checkpoint {path} not found: expected the network's weights (models/model.pt, "
                               f"written by train.json or `ul3d export-bundle`); set it with --ckpt_path FILE")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BundleInputError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise BundleInputError(f"{path}: expected a state dict of tensors, found {type(state).__name__}")
    net = unwrap(network)
    expected = net.state_dict()
    problems = [f"{k} missing" for k in expected if k not in state]
    problems += [f"{k} is not a tensor of the network" for k in state if k not in expected]
    problems += [
        f"{k} has shape {list(state[k].shape)}, expected {list(v.shape)}"
        for k, v in expected.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise BundleInputError(f"{path}: the weights do not fit {type(net).__name__} "
                               f"({len(expected)} tensors): " + "; ".join(problems[:3]) + more)
    return str(path)


_EPOCH = re.compile(r"epoch=(\d+)")


@_clean_errors
def latest_checkpoint(ckpt_dir: str | os.PathLike) -> str:
    """The newest full training checkpoint (``checkpoint_epoch=N.pt``, written by ``CheckpointSaver``) to resume."""
    found = sorted(Path(ckpt_dir).glob("checkpoint_epoch=*.pt"), key=lambda p: int(_EPOCH.search(p.name).group(1)))
    if not found:
        raise BundleInputError(f"{ckpt_dir}: no checkpoint_epoch=N.pt to resume from (train without --resume first)")
    return str(found[-1])


class AtomicNibabelWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` writing to a temporary file beside the target, then renaming it: an interrupted
    run never leaves a half-written prediction."""

    def write(self, filename, verbose: bool = False, **obj_kwargs):
        name = Path(filename).name
        with atomic_path(filename, suffix=".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix) as tmp:
            super().write(str(tmp), verbose=verbose, **obj_kwargs)


def _source_file(metadict: dict | None) -> str:
    """The (first) file an item was loaded from, as ``LoadImaged`` recorded it."""
    source = metadict.get("filename_or_obj", "") if metadict else ""
    return str(source[0] if isinstance(source, (list, tuple)) else source)


def case_name(metadict: dict, saver) -> dict:
    """``SaveImaged`` name formatter: the case id of the input (``CASE`` for ``CASE.nii.gz`` and for nnU-Net's
    ``CASE_0000.nii.gz``), so predictions are named like nnU-Net's and pair with their references."""
    name = case_id(Path(_source_file(metadict)))
    m = CHANNEL_FILE.fullmatch(name)
    return {"subject": m.group(1) if m else name, "idx": None}


class CaseNames:
    """``SaveImaged`` name formatter that names each output by its datalist item's ``id`` (found through the item's
    image or label file), so predictions and references pair up even where image and label files are named
    differently (FeTA's ``_T2w`` / ``_dseg``); files not in the list fall back to :func:`case_name`."""

    def __init__(self, items: list[dict]) -> None:
        self.ids: dict[str, str] = {}
        for item in items:
            if "id" not in item:
                continue
            for key in ("image", "label"):
                files = item.get(key)
                for f in files if isinstance(files, (list, tuple)) else [files]:
                    if f:
                        self.ids[str(Path(f).resolve())] = str(item["id"])

    def __call__(self, metadict: dict, saver) -> dict:
        source = _source_file(metadict)
        found = self.ids.get(str(Path(source).resolve())) if source else None
        return {"subject": found, "idx": None} if found else case_name(metadict, saver)


class EvaluateFolder:
    """Handler: when the evaluator completes, compare this run's cases (``case_ids``) in ``prediction_dir`` with their
    references in ``reference_dir`` (both written in the original geometry) with
    :func:`ul3d.engine.evaluate.evaluate_folder` — Dice, IoU and HD95 in mm per case and class — and write nnU-Net's
    ``summary.json`` and ``metrics.csv`` to ``output_dir``. Files left in the folders by earlier runs are not counted."""

    def __init__(self, prediction_dir: str, reference_dir: str, output_dir: str, class_names: list[str],
                 case_ids: list[str] | None = None) -> None:
        self.prediction_dir, self.reference_dir, self.output_dir = prediction_dir, reference_dir, output_dir
        self.class_names = list(class_names)
        self.case_ids = None if case_ids is None else [str(c) for c in case_ids]

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine) -> None:
        from ..engine.evaluate import evaluate_folder

        summary = evaluate_folder(self.prediction_dir, self.reference_dir, labels=list(range(1, len(self.class_names))),
                                  output_dir=self.output_dir, label_names=dict(enumerate(self.class_names)),
                                  quiet=False, case_ids=self.case_ids)
        engine.state.metrics["summary_mean_dice"] = float(summary["foreground_mean"]["Dice"])
        engine.state.metrics["summary_mean_hd95_mm"] = float(summary["foreground_mean"].get("HD95", float("nan")))
