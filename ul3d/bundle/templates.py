"""The configs of ul3d's MONAI bundles, written from a run config (``configs/*.yaml``) and a template
(``configs/bundle_templates.yaml``).

A bundle's ``train.json``, ``inference.json``, ``evaluate.json`` and ``multi_gpu_train.json`` are plain MONAI bundle
configs: MONAI's ``SupervisedTrainer``/``SupervisedEvaluator``, handlers, inferers and transforms, with ul3d's
network and a few input checks (:mod:`ul3d.bundle.components`). The transform lists are the ones ``ul3d train``
and ``ul3d predict`` run (:func:`ul3d.data.transforms.preprocessing_spec`), so a bundle and the command line
compute the same thing. Every number a user may want to change is a top-level key (``roi_size``, ``overlap``,
``dataset_dir``, ``device``, ...) overridable as ``--key value`` on ``python -m monai.bundle run``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from ..config import CONFIG_DIR, get, load_config
from ..data.transforms import preprocessing_spec, train_augmentation_spec
from ..networks import AULUNET_VARIANTS, ULTRALIGHTUNET_VARIANTS

__all__ = ["TEMPLATES_FILE", "load_template", "template_names", "network_def", "train_config", "inference_config",
           "evaluate_config", "multi_gpu_config", "btcv_13organ_overlay", "LOGGING_CONF"]

TEMPLATES_FILE = CONFIG_DIR / "bundle_templates.yaml"

#: rank-0-only handlers sit at the end of ``train#handlers`` (see :func:`multi_gpu_config`)
_RANK0_TRAIN_HANDLERS = 2

_IMPORTS = ["$import os", "$import numpy", "$import torch", "$import monai", "$import ul3d", "$import ul3d.bundle.components",
            "$import ul3d.data.io", "$import ul3d.engine.train"]


def template_names() -> list[str]:
    return [k for k in yaml.safe_load(TEMPLATES_FILE.read_text()) if not k.startswith("_")]


def load_template(name: str) -> dict[str, Any]:
    """One entry of ``configs/bundle_templates.yaml`` (``prostate``, ``feta``, ``btcv``, ``colin27_aal``, ``custom``)."""
    templates = {k: v for k, v in yaml.safe_load(TEMPLATES_FILE.read_text()).items() if not k.startswith("_")}
    if name not in templates:
        raise ValueError(f"unknown bundle template {name!r}; available: {', '.join(templates)}")
    return dict(templates[name])


def network_def(spec: dict) -> dict:
    """The ``network_def`` component of a network spec (``{"name", "variant", "spatial_dims", "in_channels",
    "out_channels", "kwargs"}`` as stored in ul3d checkpoints): ul3d's own networks as their class with explicit
    stage widths, MONAI's peers through :func:`ul3d.networks.build_network`."""
    classes = {"ultralightunet": ("ul3d.networks.UltraLightUNet", ULTRALIGHTUNET_VARIANTS, "base"),
               "aulunet": ("ul3d.networks.AULUNet", AULUNET_VARIANTS, "base")}
    kwargs = dict(spec.get("kwargs") or {})
    common = {"spatial_dims": int(spec.get("spatial_dims", 3)), "in_channels": "@in_channels", "out_channels": "@out_channels"}
    name = spec["name"].lower()
    if name in classes:
        target, variants, default = classes[name]
        lookup = {v.lower(): v for v in variants}
        if "channels" not in kwargs:
            kwargs["channels"] = list(variants[lookup[(spec.get("variant") or default).lower()]])
        return {"_target_": target, **common, **kwargs}
    return {"_target_": "ul3d.networks.build_network", "name": name, "variant": spec.get("variant"), **common,
            "roi_size": "@roi_size", **kwargs}


def _common(config: dict, net_spec: dict, template: dict, class_names: list[str], channel_names: list[str],
            layout: str | None, protocol: str | None) -> dict[str, Any]:
    roi = get(config, "infer.roi_size") or get(config, "train.roi_size")
    spacing = get(config, "data.spacing")
    return {
        "imports": list(_IMPORTS),
        "bundle_root": ".",
        "ckpt_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": template.get("dataset_dir", "/workspace/data"),
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "layout": layout,
        "protocol": protocol,
        "channel_names": list(channel_names),
        "class_names": list(class_names),
        "in_channels": len(channel_names),
        "out_channels": len(class_names),
        "pixdim": [float(s) for s in spacing] if spacing else None,
        "roi_size": [int(s) for s in roi],
        "overlap": float(get(config, "infer.overlap", 0.5)),
        "sw_batch_size": int(get(config, "infer.sw_batch_size", 4)),
        "sw_mode": get(config, "infer.mode", "gaussian"),
        "amp": "$torch.device(@device).type == 'cuda'",
        "network_def": network_def(net_spec),
        "network": "$@network_def.to(@device)",
    }


def _compose(spec: list[dict]) -> dict:
    """A ``Compose``; a label remap refers to the top-level ``label_values``/``class_values`` (an overlay such as
    BTCV's ``13organ.json`` changes them)."""
    spec = [dict(t, orig_labels="@label_values", target_labels="@class_values") if t["_target_"] == "MapLabelValued"
            and t["keys"] == "label" else t for t in spec]
    return {"_target_": "Compose", "transforms": spec}


def _label_keys(label_map: dict[int, int] | None) -> dict[str, Any]:
    if not label_map:
        return {}
    src = sorted(label_map)
    return {"label_values": [int(s) for s in src], "class_values": [int(label_map[s]) for s in src]}


def _sliding_window() -> dict:
    return {"_target_": "SlidingWindowInferer", "roi_size": "@roi_size", "sw_batch_size": "@sw_batch_size",
            "overlap": "@overlap", "mode": "@sw_mode"}


def _refs(config: dict) -> dict[str, str]:
    return {"pixdim": "@pixdim"} if get(config, "data.spacing") else {}


def _mean_dice(key: str = "label") -> dict:
    return {"_target_": "MeanDice", "include_background": False,
            "output_transform": f"$monai.handlers.from_engine(['pred', '{key}'])"}


def _datalist(split: str, check: bool = False) -> str:
    extra = ", channels=@in_channels, check=True" if check else ""
    return (f"$ul3d.bundle.components.datalist(@dataset_dir, '{split}', layout=@layout, protocol=@protocol, "
            f"val_fraction=@val_fraction, val_cases=@val_cases, seed=@seed{extra})")


def train_config(config: dict, net_spec: dict, template: dict, class_names: list[str], channel_names: list[str],
                 layout: str | None, protocol: str | None, label_map: dict[int, int] | None) -> dict[str, Any]:
    """``configs/train.json``: MONAI ``SupervisedTrainer`` with sliding-window validation every ``val_every``
    iterations, the best model (validation mean Dice) saved as ``models/model.pt`` and the full state (model,
    optimizer, scheduler, trainer) as ``models/checkpoint_epoch=N.pt``; ``--resume true`` continues from it."""
    balanced = get(config, "train.sampling", "posneg") == "classes"
    train_pre = preprocessing_spec(config, True, label_map, pad_to="@roi_size",
                                   class_indices="@out_channels" if balanced else None, refs=_refs(config),
                                   fg_bg_indices=not balanced)
    train_aug = train_augmentation_spec(config, "@out_channels", refs={"roi_size": "@roi_size", "num_samples": "@num_samples"})
    onehot = {"_target_": "AsDiscreted", "keys": ["pred", "label"], "argmax": [True, False], "to_onehot": "@out_channels"}
    softmax = {"_target_": "Activationsd", "keys": "pred", "softmax": True}
    loss = dict(get(config, "train.loss") or {})
    opt = dict(get(config, "train.optimizer") or {})
    full_state = {"model": "@network", "optimizer": "@optimizer", "lr_scheduler": "@lr_scheduler", "trainer": "@train#trainer"}
    cfg = _common(config, net_spec, template, class_names, channel_names, layout, protocol)
    cfg.update(_label_keys(label_map))
    cfg.update({
        "roi_size": [int(s) for s in get(config, "train.roi_size")],
        "val_fraction": float(get(config, "data.val_fraction", 0.2)),
        "val_cases": list(get(config, "data.val_cases") or []),
        "seed": int(get(config, "train.seed", 0)),
        "batch_size": int(get(config, "train.batch_size", 1)),
        "num_samples": int(get(config, "train.num_samples", 2)),
        "iterations": int(get(config, "train.iterations")),
        "val_every": int(get(config, "train.val_interval")),
        "max_epochs": "$max(1, -(-@iterations // max(1, len(@train#dataloader))))",
        "val_interval": "$max(1, @val_every // max(1, len(@train#dataloader)))",
        "learning_rate": float(opt.get("lr", 1e-3)),
        "weight_decay": float(opt.get("weight_decay", 1e-5)),
        "cache_rate": float(get(config, "data.cache_rate", 1.0)),
        "num_workers": int(get(config, "data.num_workers", 2) or 0),
        "resume": False,
        "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True,
                 "lambda_dice": float(loss.get("lambda_dice", 1.0)), "lambda_ce": float(loss.get("lambda_ce", 1.0))},
        "optimizer": {"_target_": "torch.optim.AdamW", "params": "$@network.parameters()", "lr": "@learning_rate",
                      "weight_decay": "@weight_decay"},
        "scheduler": get(config, "train.scheduler", "cosine"),
        "warmup": int(get(config, "train.warmup", 0) or 0),
        # the learning-rate factor of ul3d train: linear warm-up, then cosine (or constant) over the optimizer steps
        "lr_scheduler": {"_target_": "torch.optim.lr_scheduler.LambdaLR", "optimizer": "@optimizer",
                         "lr_lambda": "$ul3d.engine.train.lr_factor(@scheduler, @warmup, @max_epochs * len(@train#dataloader))"},
        "train": {
            "preprocessing": _compose(train_pre + train_aug),
            "dataset": {"_target_": "CacheDataset", "data": _datalist("train", check=True),
                        "transform": "@train#preprocessing", "cache_rate": "@cache_rate", "num_workers": "@num_workers"},
            "dataloader": {"_target_": "DataLoader", "dataset": "@train#dataset", "batch_size": "@batch_size",
                           "shuffle": True, "num_workers": "@num_workers"},
            "inferer": {"_target_": "SimpleInferer"},
            "postprocessing": _compose([softmax, onehot]),
            "handlers": [
                {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "print_lr": False, "epoch_level": False},
                {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
                 "interval": "@val_interval"},
                # the last two run on rank 0 only under multi_gpu_train.json
                {"_target_": "StatsHandler", "tag_name": "train_loss",
                 "output_transform": "$monai.handlers.from_engine(['loss'], first=True)"},
                {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "tag_name": "train_loss",
                 "output_transform": "$monai.handlers.from_engine(['loss'], first=True)"},
            ],
            "key_metric": {"train_mean_dice": _mean_dice()},
            "trainer": {"_target_": "SupervisedTrainer", "max_epochs": "@max_epochs", "device": "@device",
                        "train_data_loader": "@train#dataloader", "network": "@network", "loss_function": "@loss",
                        "optimizer": "@optimizer", "inferer": "@train#inferer", "postprocessing": "@train#postprocessing",
                        "key_train_metric": "@train#key_metric", "train_handlers": "@train#handlers", "amp": "@amp"},
        },
        "validate": {
            "preprocessing": _compose(preprocessing_spec(config, True, label_map, refs=_refs(config))),
            "dataset": {"_target_": "CacheDataset", "data": _datalist("val"), "transform": "@validate#preprocessing",
                        "cache_rate": "@cache_rate", "num_workers": "@num_workers"},
            "dataloader": {"_target_": "DataLoader", "dataset": "@validate#dataset", "batch_size": 1, "shuffle": False,
                           "num_workers": 0},
            "inferer": _sliding_window(),
            "postprocessing": _compose([softmax, onehot]),
            "handlers": [
                {"_target_": "StatsHandler", "iteration_log": False},
                {"_target_": "TensorBoardStatsHandler", "log_dir": "@output_dir", "iteration_log": False},
                {"_target_": "CheckpointSaver", "save_dir": "@ckpt_dir", "save_dict": {"model": "@network"},
                 "save_key_metric": True, "key_metric_filename": "model.pt"},
            ],
            "key_metric": {"val_mean_dice": _mean_dice()},
            "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@validate#dataloader",
                          "network": "@network", "inferer": "@validate#inferer",
                          "postprocessing": "@validate#postprocessing", "key_val_metric": "@validate#key_metric",
                          "val_handlers": "@validate#handlers", "amp": "@amp"},
        },
        # the full state (model, optimizer, scheduler, trainer: epoch and iteration) every validation interval; attached
        # in "run" because its save_dict names the trainer, which cannot be referenced from its own handlers
        "checkpoint_saver": {"_target_": "CheckpointSaver", "save_dir": "@ckpt_dir", "save_dict": full_state,
                             "save_interval": "@val_interval", "epoch_level": True, "n_saved": 1, "save_final": True,
                             "final_filename": "checkpoint_final.pt"},
        # resume: loads that state before the first epoch
        "resume_loader": {"_target_": "CheckpointLoader", "_disabled_": "$not @resume",
                          "load_path": "$ul3d.bundle.components.latest_checkpoint(@ckpt_dir) if @resume else None",
                          "load_dict": full_state, "map_location": "@device"},
        "initialize": ["$monai.utils.set_determinism(seed=@seed)"],
        "run": ["$@checkpoint_saver.attach(@train#trainer)",
                "$@resume_loader.attach(@train#trainer) if @resume else None",
                "$@train#trainer.run()"],
    })
    return cfg


def multi_gpu_config() -> dict[str, Any]:
    """``configs/multi_gpu_train.json``, merged over ``train.json`` under ``torchrun``: DDP (NCCL on GPUs, gloo on
    CPUs), a ``DistributedSampler`` per rank, logging and checkpoints on rank 0 only."""
    n = _RANK0_TRAIN_HANDLERS
    return {
        # `iterations` stays the number of patches-batches of the whole run: each of the N ranks takes 1/N of them
        "max_epochs": "$max(1, -(-@iterations // max(1, len(@train#dataloader) * dist.get_world_size())))",
        "val_interval": "$max(1, @val_every // max(1, len(@train#dataloader) * dist.get_world_size()))",
        "device": "$torch.device('cuda:' + os.environ['LOCAL_RANK'] if torch.cuda.is_available() else 'cpu')",
        "network": {"_target_": "torch.nn.parallel.DistributedDataParallel", "module": "$@network_def.to(@device)",
                    "device_ids": "$[@device] if torch.cuda.is_available() else None"},
        "train#sampler": {"_target_": "DistributedSampler", "dataset": "@train#dataset", "even_divisible": True,
                          "shuffle": True},
        "train#dataloader#sampler": "@train#sampler",
        "train#dataloader#shuffle": False,
        "train#trainer#train_handlers": f"$@train#handlers[: -{n} if dist.get_rank() > 0 else None]",
        # every rank validates its share; with fewer validation cases than ranks the cases are repeated
        "validate#sampler": {"_target_": "DistributedSampler", "dataset": "@validate#dataset",
                             "even_divisible": "$len(@validate#dataset) < dist.get_world_size()", "shuffle": False},
        "validate#dataloader#sampler": "@validate#sampler",
        "validate#evaluator#val_handlers": "$None if dist.get_rank() > 0 else @validate#handlers",
        "initialize": [
            "$import torch.distributed as dist",
            "$dist.is_initialized() or dist.init_process_group(backend='nccl' if torch.cuda.is_available() else 'gloo')",
            "$torch.cuda.set_device(@device) if torch.cuda.is_available() else None",
            "$monai.utils.set_determinism(seed=@seed)",
        ],
        "run": [
            "$@checkpoint_saver.attach(@train#trainer) if dist.get_rank() == 0 else None",
            "$@resume_loader.attach(@train#trainer) if @resume else None",
            "$import ignite",
            "$@train#trainer.add_event_handler(ignite.engine.Events.EPOCH_STARTED, "
            "lambda engine: @train#sampler.set_epoch(engine.state.epoch))",
            "$@train#trainer.run()",
        ],
        # every rank waits until rank 0 has saved its last checkpoint before the process group goes: a rank that tore
        # gloo down while the other was still writing aborted at exit ("terminate called without an active exception")
        "finalize": ["$dist.is_initialized() and dist.barrier()", "$dist.is_initialized() and dist.destroy_process_group()"],
    }


def _infer_postprocessing(config: dict, label_map: dict[int, int] | None, with_reference: bool) -> list[dict]:
    save = {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@prediction_dir", "output_postfix": "",
            "output_ext": ".nii.gz", "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False,
            "print_log": False, "writer": "$ul3d.bundle.components.AtomicNibabelWriter",
            "output_name_formatter": "$ul3d.bundle.components.CaseNames(@datalist)"}
    tfs = [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
         "nearest_interp": False, "to_tensor": True},
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
        save,
    ]
    if with_reference:  # the reference label in its own file's geometry (label values remapped when the protocol says so)
        # a key the batch does not have, so MONAI's engine keeps it in the output the metric reads
        tfs.append({"_target_": "CopyItemsd", "keys": "label_file", "names": "reference"})
        tfs.append({"_target_": "LoadImaged", "keys": "reference", "reader": "$ul3d.data.io.monai_reader()",
                    "ensure_channel_first": True, "image_only": True})
        if label_map:
            tfs.append({"_target_": "MapLabelValued", "keys": "reference", "orig_labels": "@label_values",
                        "target_labels": "@class_values"})
        tfs.append(dict(save, keys="reference", output_dir="@reference_dir"))
        tfs.append({"_target_": "AsDiscreted", "keys": ["pred", "reference"], "to_onehot": "@out_channels"})
    return tfs


def inference_config(config: dict, net_spec: dict, template: dict, class_names: list[str],
                     channel_names: list[str], layout: str | None, protocol: str | None) -> dict[str, Any]:
    """``configs/inference.json``: every volume in ``input_dir`` -> ``output_dir/CASE.nii.gz``, a uint8 label map in
    the input's own geometry (sliding window at ``roi_size``, ``Invertd`` of the preprocessing, ``SaveImaged``)."""
    cfg = _common(config, net_spec, template, class_names, channel_names, layout, protocol)
    cfg.update({
        "input_dir": "$@dataset_dir + '/imagesTs'",
        "prediction_dir": "@output_dir",
        "ckpt_path": "$@ckpt_dir + '/model.pt'",
        "datalist": "$ul3d.bundle.components.image_datalist(@input_dir, @in_channels, @channel_names)",
        "preprocessing": _compose(preprocessing_spec(config, with_label=False, refs=_refs(config))),
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False, "num_workers": 0},
        "inferer": _sliding_window(),
        "postprocessing": _compose(_infer_postprocessing(config, None, with_reference=False)),
        "handlers": [
            {"_target_": "CheckpointLoader", "load_path": "$ul3d.bundle.components.check_checkpoint(@ckpt_path, @network)",
             "load_dict": {"model": "@network"}, "map_location": "@device"},
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": "@amp"},
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    })
    return cfg


def evaluate_config(config: dict, net_spec: dict, template: dict, class_names: list[str], channel_names: list[str],
                    layout: str | None, protocol: str | None, label_map: dict[int, int] | None) -> dict[str, Any]:
    """``configs/evaluate.json``: predict the labelled cases of ``eval_split`` (default: the validation cases of
    ``train.json``), save predictions and references in the original geometry, report MONAI's mean Dice and
    ul3d's nnU-Net-style ``summary.json`` (Dice, IoU, HD95 in mm per case and class) in ``output_dir``."""
    cfg = inference_config(config, net_spec, template, class_names, channel_names, layout, protocol)
    pre = preprocessing_spec(config, with_label=False, refs=_refs(config))
    copy_label = {"_target_": "CopyItemsd", "keys": "label", "names": "label_file"}
    cfg.pop("input_dir")
    cfg.update(_label_keys(label_map))
    cfg.update({
        "eval_split": template.get("eval_split", "val"),
        "val_fraction": float(get(config, "data.val_fraction", 0.2)),
        "val_cases": list(get(config, "data.val_cases") or []),
        "seed": int(get(config, "train.seed", 0)),
        "prediction_dir": "$@output_dir + '/predictions'",
        "reference_dir": "$@output_dir + '/references'",
        "datalist": ("$ul3d.bundle.components.datalist(@dataset_dir, @eval_split, layout=@layout, protocol=@protocol, "
                     "val_fraction=@val_fraction, val_cases=@val_cases, seed=@seed, channels=@in_channels, check=True)"),
        "preprocessing": _compose([copy_label] + pre),
        "postprocessing": _compose(_infer_postprocessing(config, label_map, with_reference=True)),
        "key_metric": {"mean_dice": _mean_dice("reference")},
    })
    cfg["handlers"].append({"_target_": "ul3d.bundle.components.EvaluateFolder", "prediction_dir": "@prediction_dir",
                            "reference_dir": "@reference_dir", "output_dir": "@output_dir",
                            "class_names": "@class_names", "case_ids": "$[item['id'] for item in @datalist]"})
    cfg["evaluator"]["key_val_metric"] = "@key_metric"
    return cfg


def btcv_13organ_overlay(class_names: list[str]) -> dict[str, Any]:
    """``configs/13organ.json``: all 13 BTCV organs instead of TransUNet's 8 (merge after train/inference/evaluate):
    the labels are kept as they are in the files."""
    values = list(range(len(class_names)))
    return {"protocol": "13organ", "class_names": list(class_names), "out_channels": len(class_names),
            "label_values": values, "class_values": values}


LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def run_config(template: dict, checkpoint_config: dict | None = None) -> dict:
    """The run config a template stands for: the checkpoint's own when given, else ``configs/<template config>``."""
    if checkpoint_config is not None:
        return copy.deepcopy(checkpoint_config)
    if not template.get("config"):
        raise ValueError("the custom template needs a checkpoint (its run config says how the data was prepared)")
    return load_config(str(Path(CONFIG_DIR) / f"{template['config']}.yaml"), template.get("overrides") or [])
