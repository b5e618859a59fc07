"""``docs/README.md`` (the model card) and ``LICENSE`` of a ul3d bundle."""

from __future__ import annotations

from ..config import get

__all__ = ["model_card", "LICENSE_TEXT"]

LICENSE_TEXT = """Copyright (c) 2026 ul3d developers

Licensed under the Apache License, Version 2.0 (the "License"); you may not use the configuration files and
model weights of this bundle except in compliance with the License. You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software and weights distributed under the License
are distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
See the License for the specific language governing permissions and limitations under the License.

The weights were trained on third-party data whose own licence applies to them as well; see docs/README.md
("Data").
"""


def _fmt(v) -> str:
    return "—" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))


def model_card(template_name: str, template: dict, meta: dict, config: dict, checkpoint: dict | None, extra: str = "") -> str:
    """A model card: what the model does, its data, preprocessing, training recipe, metrics, how to run every
    config, multi-GPU training, limitations and citations."""
    inp = meta["network_data_format"]["inputs"]["image"]
    out = meta["network_data_format"]["outputs"]["pred"]
    intensity = get(config, "data.intensity", {}) or {}
    if intensity.get("mode") == "window":
        norm = f"CT window [{intensity.get('a_min')}, {intensity.get('a_max')}] HU scaled to [0, 1]"
    elif intensity.get("mode") == "zscore":
        norm = "z-score per channel" + (" over non-zero voxels" if intensity.get("nonzero", True) else "")
    else:
        norm = "none"
    spacing = get(config, "data.spacing")
    aug = get(config, "train.augment", {}) or {}
    weights = "shipped in `models/model.pt` (and `model.ts`, `model.onnx`)" if checkpoint is not None else (
        "not shipped: train them with `configs/train.json` on the dataset (below), or package a checkpoint with "
        f"`ul3d export-bundle --checkpoint CKPT --template {template_name} --out DIR`")
    metrics = meta.get("eval_metrics")
    metric_lines = "\n".join(f"| {k} | {v:.4f} |" for k, v in metrics.items()) if metrics else ""
    classes = "\n".join(f"| {k} | {v} |" for k, v in out["channel_def"].items())
    channels = ", ".join(f"{k}: {v}" for k, v in inp["channel_def"].items())
    name = meta["name"]
    lines = [
        f"# {name}",
        "",
        f"{meta['description']}",
        "",
        f"**Task**: {meta['task']}. **Network**: {meta['network']} (ul3d {meta['required_packages_version']['ul3d']}, "
        f"MONAI {meta['monai_version']}). **Weights**: {weights}.",
        "",
        "## Data",
        "",
        f"Source: {meta['data_source']}. Input: {inp['num_channels']} channel(s) ({channels}), {inp['modality']}.",
        f"The dataset folder (`--dataset_dir`) is read in the `{get(config, 'data.layout') or 'auto-detected'}` layout; "
        "`--layout msd|feta|btcv|nnunet|datalist` (or `null` to detect) reads another one, e.g. a JSON/CSV datalist. "
        "Every case is checked before training (missing files, shape or affine mismatches, channel counts, label "
        "values outside the classes).",
        "",
        "| label | class |",
        "|---:|---|",
        classes,
        "",
        "## Preprocessing and training",
        "",
        f"- orientation {get(config, 'data.orientation') or 'as stored'}; resampling to "
        f"{' × '.join(_fmt(float(s)) for s in spacing) + ' mm' if spacing else 'none (own spacing)'}; intensity: {norm}.",
        f"- patches {' × '.join(str(s) for s in get(config, 'train.roi_size'))} ({get(config, 'train.num_samples')} per volume, "
        f"{get(config, 'train.sampling')} sampling), DiceCELoss, AdamW lr {_fmt(float(get(config, 'train.optimizer.lr')))} "
        f"with cosine decay, {get(config, 'train.iterations')} iterations (`iterations` in train.json; `max_epochs` "
        "follows from the number of training cases).",
        f"- augmentation (3D UX-Net's recipe): random affine p={_fmt(aug.get('affine_prob'))}, rotation "
        f"{aug.get('rotate_range')}, scale {aug.get('scale_range')}, intensity shift p={_fmt(aug.get('intensity_shift_prob'))}.",
        f"- inference: sliding window {' × '.join(str(s) for s in inp['spatial_shape'])}, overlap {get(config, 'infer.overlap')}, "
        f"{get(config, 'infer.mode')} blending; predictions are mapped back to each input's geometry (`Invertd`).",
        "",
        "## Metrics",
        "",
    ]
    if metric_lines:
        lines += ["| metric | value |", "|---|---:|", metric_lines, ""]
    else:
        lines += ["No weights are shipped, so nothing is measured here yet. `configs/evaluate.json` writes "
                  "nnU-Net's `summary.json` (Dice, IoU, HD95 in mm per case and class) for trained weights.", ""]
    if template.get("trained_by") and checkpoint is not None:
        lines += [f"Weights trained by {' '.join(str(template['trained_by']).split())}.", ""]
    if extra:
        lines += [extra.strip(), ""]
    lines += [
        "## How to run",
        "",
        "From the bundle folder, with ul3d installed (`bash scripts/bootstrap.sh` in the ul3d repository provides the "
        "network and the input checks):",
        "",
        "```bash",
        "# train (the best validation model is written to models/model.pt, the full state to models/checkpoint_*.pt)",
        "python -m monai.bundle run --config_file configs/train.json --dataset_dir /data/DATASET",
        "# resume an interrupted run",
        "python -m monai.bundle run --config_file configs/train.json --dataset_dir /data/DATASET --resume true",
        "# multi-GPU (DDP; NCCL on GPUs, gloo on CPUs)",
        "torchrun --standalone --nproc_per_node=2 -m monai.bundle run \\",
        "    --config_file \"['configs/train.json','configs/multi_gpu_train.json']\" --dataset_dir /data/DATASET",
        "# predict every volume of a folder (uint8 label maps in each input's geometry, preds/CASE.nii.gz)",
        "python -m monai.bundle run --config_file configs/inference.json --input_dir /data/images --output_dir preds",
        f"# evaluate on the {'labelled test' if template.get('eval_split') == 'test' else 'validation'} cases "
        "(eval/summary.json with Dice and HD95 in mm; --eval_split val|all|test)",
        "python -m monai.bundle run --config_file configs/evaluate.json --dataset_dir /data/DATASET",
        "# export TorchScript",
        "python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\",
        "    --meta_file configs/metadata.json --config_file configs/inference.json",
        "```",
        "",
        "Override any top-level key on the command line: `--roi_size [64,64,64]`, `--overlap 0.25`, `--device cpu`, "
        "`--bundle_root DIR`, `--output_dir DIR`, `--iterations N`, `--max_epochs N`.",
        "",
    ]
    if template.get("notes"):
        lines += [" ".join(str(template["notes"]).split()), ""]
    if template_name == "btcv":
        lines += ["All 13 organs instead of the 8-organ protocol: add `configs/13organ.json` to each `--config_file` "
                  "list, e.g. `--config_file \"['configs/train.json','configs/13organ.json']\"`.", ""]
    lines += [
        "Bad input stops with one line that names the file and what was expected: a missing `dataset_dir`, a "
        "checkpoint whose tensors do not fit the network, a volume with the wrong number of channels (skipped; the "
        "other volumes are predicted).",
        "",
        "## Limitations",
        "",
        "- Research use only; not validated for clinical use.",
        "- Trained for the data above; other scanners, contrasts or fields of view need retraining or validation.",
        "- BatchNorm statistics come from training patches: keep the batch composition and intensity normalisation.",
        "- `--resume true` restores model, optimizer, scheduler and trainer state; the best-metric tracking of "
        "`models/model.pt` restarts, so the first validation after a resume writes it again.",
        "- `configs/metadata.json` is checked against ul3d's schema (`ul3d.bundle.metadata.validate_metadata`); "
        "MONAI's `verify_metadata` downloads a schema from the URL in `schema` and needs network access.",
        "",
        "## Citations",
        "",
    ]
    lines += [f"- {r}" for r in meta.get("references", [])]
    return "\n".join(lines) + "\n"
