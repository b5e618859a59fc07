"""Training: MONAI's ``SupervisedTrainer``/``SupervisedEvaluator`` driven by a run config.

Randomness of the data is a pure function of ``(seed, sample index)`` (:class:`IterationDataset`), so a
run is reproducible for a seed, independent of the number of loader workers, and a resumed run sees
exactly the batches the uninterrupted run would have seen. Every ``train.val_interval`` iterations the
trainer validates by sliding window and writes ``last.pt`` (and ``best.pt`` when the mean Dice
improves) atomically: model, optimizer, scheduler, grad scaler, iteration, RNG states, the config,
class and channel names.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Events
from monai.data import CacheDataset, DataLoader, ThreadDataLoader
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import (
    LrScheduleHandler,
    MeanDice,
    TensorBoardStatsHandler,
    ValidationHandler,
    from_engine,
)
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.transforms import AsDiscreted, Compose, EnsureTyped
from monai.utils import set_determinism
from torch.utils.data import Dataset, Sampler

from .. import __version__
from ..config import ConfigError, get
from ..data.datasets import DatasetSpec, cached_bytes, load_dataset
from ..data.transforms import batch_augmentation, metadata_tracking, preprocessing, train_augmentation
from ..data.validation import validate_dataset
from ..networks import build_network
from ..networks.fast import InferenceCopy, accelerate
from ..utils import atomic_path
from .graphed import CUDAGraphStep, conform_optimizer
from .warm import start_kernel_warmup, stop_kernel_warmup

__all__ = ["IterationDataset", "TrainResult", "train", "split_cases", "load_checkpoint", "lr_factor", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "ul3d-checkpoint/1"


def _sample_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


class IterationDataset(Dataset):
    """Sample ``i`` = (case, augmentation seed) fixed by ``(seed, i)``.

    Cases are visited in a fresh random permutation every ``len(base)`` samples; the random transforms
    are re-seeded per sample. ``base`` holds preprocessed (cached) volumes.
    """

    def __init__(self, base: Dataset, transform: Compose, seed: int, length: int) -> None:
        self.base, self.transform, self.seed, self.length = base, transform, int(seed), int(length)
        self._perm_cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.length

    def case_index(self, i: int) -> int:
        n = len(self.base)
        block = i // n
        if self._perm_cache is None or self._perm_cache[0] != block:
            self._perm_cache = (block, np.random.default_rng([self.seed, block]).permutation(n))
        return int(self._perm_cache[1][i % n])

    def __getitem__(self, i: int):
        item = self.base[self.case_index(i)]  # preprocessed with its metadata (geometry)
        self.transform.set_random_state(seed=_sample_seed(self.seed, i))
        # patches need no metadata: without MetaTensor tracking the crops and affine augmentation skip their affine
        # bookkeeping and give the same patches (H200, GPU-cached data: 22.5 -> 16.2 ms per training iteration)
        with metadata_tracking(False):
            return self.transform(item)


class AugmentingCollate:
    """``list_data_collate``, then the batch half of the training augmentation
    (:func:`~ul3d.data.transforms.batch_augmentation`: each patch's drawn affine, flips and intensity shift applied to
    the whole batch at once). A plain object, so loader worker processes can take it."""

    def __init__(self, augment) -> None:
        self.augment = augment

    def __call__(self, items: list):
        from monai.data import list_data_collate

        batch = list_data_collate(items)
        return self.augment(batch) if self.augment is not None else batch


class SideStreamData:
    """Training data cached on the GPU (``data.cache_device=cuda``), sampled and augmented on its own CUDA stream.

    MONAI's transforms read values back to the CPU here and there. On the default stream each read waits for the
    training step queued before it, so the loader thread and a replayed CUDA-graph step ran in turn (38 ms per
    iteration on an H100 against a 21 ms step). On a side stream a read waits only for the data's own kernels. Every
    batch is complete (the stream synchronised) when it is handed over, and marked as used by the default stream, so its
    memory is not reused before the training step has read it.
    """

    def __init__(self, dataset: Dataset, device: torch.device, collate=None) -> None:
        self.dataset, self.batch_collate = dataset, collate or AugmentingCollate(None)
        self.stream = torch.cuda.Stream(device)
        self.consumer = torch.cuda.default_stream(device)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        with torch.cuda.stream(self.stream):
            return self.dataset[i]

    def collate(self, items: list):
        with torch.cuda.stream(self.stream):
            batch = self.batch_collate(items)
        self.stream.synchronize()
        for value in batch.values():
            if torch.is_tensor(value) and value.is_cuda:
                value.record_stream(self.consumer)
        return batch


class _RangeSampler(Sampler):
    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop

    def __iter__(self):
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


@dataclass
class TrainResult:
    output_dir: Path
    best_checkpoint: Path | None
    last_checkpoint: Path
    best_metric: float
    best_iteration: int
    iterations: int
    seconds: float
    class_names: list[str]
    history: list[dict] = field(default_factory=list)


def split_cases(spec: DatasetSpec, config: dict) -> tuple[list[dict], list[dict]]:
    """Training and validation items: ``data.val_cases`` ids, else a seeded ``data.val_fraction`` split."""
    items = list(spec.training)
    ids = [it["id"] for it in items]
    val_ids = list(get(config, "data.val_cases") or [])
    if val_ids:
        unknown = sorted(set(val_ids) - set(ids))
        if unknown:
            raise ConfigError(f"data.val_cases names cases not in {spec.root}: {unknown}")
    else:
        frac = float(get(config, "data.val_fraction", 0.2))
        n_val = max(1, round(frac * len(items))) if frac > 0 and len(items) > 1 else 0
        order = np.random.default_rng(int(get(config, "train.seed", 0))).permutation(len(items))
        val_ids = [ids[i] for i in sorted(order[:n_val])]
    train_ids = get(config, "data.train_cases")  # e.g. a cross-validation fold; default: every non-validation case
    if train_ids:
        unknown = sorted(set(train_ids) - set(ids))
        if unknown:
            raise ConfigError(f"data.train_cases names cases not in {spec.root}: {unknown}")
    train_items = [it for it in items if it["id"] not in set(val_ids) and (not train_ids or it["id"] in set(train_ids))]
    val_items = [it for it in items if it["id"] in set(val_ids)]
    if not train_items:
        raise ConfigError(f"no training cases left in {spec.root} after holding out {len(val_items)} for validation")
    return train_items, val_items


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Read a ul3d checkpoint, with one clear error when the file is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a ul3d checkpoint (expected a dict with format {CHECKPOINT_FORMAT!r})")
    return ckpt


def lr_factor(kind: str, warmup: int, total: int):
    """The learning-rate factor of iteration ``it``: linear warm-up over ``warmup`` iterations, then ``cosine`` decay
    to 0 at ``total`` or ``constant`` (also used by the MONAI bundles' ``LambdaLR``)."""
    if kind not in ("cosine", "constant"):
        raise ConfigError(f"train.scheduler must be 'cosine' or 'constant', got {kind!r}")
    warmup = int(warmup or 0)

    def factor(it: int) -> float:
        if warmup and it < warmup:
            return (it + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = (it - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _scheduler(optimizer: torch.optim.Optimizer, config: dict, total: int):
    factor = lr_factor(get(config, "train.scheduler", "cosine"), int(get(config, "train.warmup", 0) or 0), total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _network_spec(config: dict, in_channels: int, out_channels: int) -> dict:
    return {
        "name": get(config, "network.name", "ultralightunet"),
        "variant": get(config, "network.variant"),
        "spatial_dims": 3,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "roi_size": list(get(config, "train.roi_size")),
        "kwargs": dict(get(config, "network.kwargs") or {}),
    }


#: ``data.cache_device: auto`` caches on the GPU when the training set takes at most this share of its memory
GPU_CACHE_SHARE = 0.25


def _cache_on_gpu(setting: str, device: torch.device, nbytes=None) -> bool:
    """``data.cache_device``: ``cpu`` (loader worker processes crop and augment), ``cuda`` (the preprocessed training
    volumes are cached on the GPU, cropped and augmented there on a side stream, fed by a thread) or ``auto`` (default:
    ``cuda`` on a CUDA device when the training set, estimated from its headers by ``nbytes()``, takes at most
    :data:`GPU_CACHE_SHARE` of the GPU's memory). On the H100 the GPU loader makes 93.8 batches/s against 19.8 with 8
    loader processes (``benchmarks/results/loader_*``)."""
    if setting not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"data.cache_device must be 'cpu', 'cuda' or 'auto', got {setting!r}")
    if device.type != "cuda" or setting == "cpu":
        return False
    if setting == "cuda":
        return True
    return nbytes is not None and nbytes() <= GPU_CACHE_SHARE * torch.cuda.get_device_properties(device).total_memory


def _on_cuda(key: str, setting, device: torch.device, iterations: int) -> bool:
    """A true / false / ``auto`` switch of a CUDA-only speed path; ``auto``: on CUDA for runs of at least 2,000
    iterations. Off without CUDA, whatever the setting.

    ``train.compile``: torch.compile the training step, where the faster step repays the ~90 s of compilation (H100,
    UltraLightUNet3D base: 47 vs 71–78 ms, benchmarks/results/levers_cuda_h100_*.json). ``train.cuda_graph``: run each
    step (forward, loss, backward, AdamW) as one replayed CUDA graph (:class:`~ul3d.engine.graphed.CUDAGraphStep`)."""
    if setting == "auto":
        return device.type == "cuda" and iterations >= 2000
    if isinstance(setting, bool):
        return setting and device.type == "cuda"
    raise ConfigError(f"{key} must be true, false or auto, got {setting!r}")


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def _compile_mode(setting) -> str:
    """``train.compile_mode``: torch.compile's mode for the training step. Its CUDA-graph modes (``reduce-overhead``,
    ``max-autotune``) are refused: inside MONAI's SupervisedTrainer the backward then read activations that a later
    graph replay overwrote (H100, 2026-11-23). ``train.cuda_graph`` captures the whole step instead."""
    if setting in ("reduce-overhead", "max-autotune"):
        raise ConfigError(f"train.compile_mode {setting!r} uses torch.compile's CUDA graphs, which fail inside MONAI's "
                          f"trainer; use one of {', '.join(COMPILE_MODES)} with train.cuda_graph=true (the whole step "
                          f"as one CUDA graph)")
    if setting not in COMPILE_MODES:
        raise ConfigError(f"train.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {setting!r}")
    return setting


def _use_kernels(setting, device: torch.device, graphed: bool = False) -> bool:
    """``train.kernels``: true, false or ``auto`` (default: on with ``train.cuda_graph``) — ul3d's fast paths (Triton
    depth-wise convs in every MKDC, MKIR 1×1 convs as matrix products; ``ul3d.networks.fast.accelerate``) on CUDA with
    Triton. They pay only when the step is replayed as a CUDA graph (``ul3d train`` on an H100, compiled, GPU-cached
    data: 38.1 against 61.7 ms per iteration, ``benchmarks/results/train_throughput_graph_gpucache_kernels_*``);
    without graphs their extra kernel launches make the step slower (compiled 53 vs 47 ms, eager 81 vs 71 ms;
    ``benchmarks/results/levers_cuda_h100_*.json``)."""
    from ..networks.depthwise import triton_available

    if setting == "auto":
        setting = graphed
    if not isinstance(setting, bool):
        raise ConfigError(f"train.kernels must be true, false or auto, got {setting!r}")
    return setting and device.type == "cuda" and triton_available(device)


def network_from_spec(spec: dict) -> torch.nn.Module:
    """Rebuild the network a checkpoint was trained with."""
    return build_network(
        spec["name"], spec.get("variant"), spatial_dims=spec["spatial_dims"], in_channels=spec["in_channels"],
        out_channels=spec["out_channels"], roi_size=spec.get("roi_size"), **spec.get("kwargs", {}),
    )


def _log(msg: str) -> None:
    print(msg, flush=True)


def build_train_loader(config: dict, items: list[dict], num_classes: int, label_map: dict[int, int] | None,
                       device: torch.device, start: int, total: int):
    """The training loader of ``ul3d train``: cached preprocessed volumes (``data.cache_device``), then per sample the
    random patch sampling and augmentation of :func:`~ul3d.data.transforms.train_augmentation`, batches of
    ``train.batch_size`` volumes for iterations ``start`` to ``total`` (sample randomness fixed by ``train.seed``)."""
    roi = [int(s) for s in get(config, "train.roi_size")]
    seed, batch = int(get(config, "train.seed", 0)), int(get(config, "train.batch_size", 1))
    workers = int(get(config, "data.num_workers", 0) or 0)
    cache_rate = float(get(config, "data.cache_rate", 1.0))
    balanced = get(config, "train.sampling", "posneg") == "classes"
    spacing = get(config, "data.spacing")
    on_gpu = _cache_on_gpu(get(config, "data.cache_device", "auto"), device,
                           nbytes=lambda: cached_bytes(items, [float(x) for x in spacing] if spacing else None, roi))
    pre = preprocessing(config, label_map=label_map, pad_to=roi, class_indices=num_classes if balanced else None,
                        fg_bg_indices=not balanced)
    if on_gpu:  # cached volumes live on the GPU; crops and augmentation then run there too
        pre = Compose([*pre.transforms, EnsureTyped(keys=["image", "label"], device=device)])
    base = CacheDataset(items, pre, cache_rate=1.0 if on_gpu else cache_rate, num_workers=max(1, workers),
                        progress=False)
    # each patch draws its augmentation; the batch is resampled at once after collation (AugmentingCollate)
    dataset = IterationDataset(base, train_augmentation(config, num_classes, batched=True), seed, total * batch)
    collate = AugmentingCollate(batch_augmentation(config))
    sampler = _RangeSampler(start * batch, total * batch)
    if on_gpu:  # CUDA tensors cannot cross process boundaries: a background thread prepares the next batch
        torch.cuda.synchronize(device)  # the cached volumes are complete before the side stream reads them
        data = SideStreamData(dataset, device, collate)
        return ThreadDataLoader(data, batch_size=batch, sampler=sampler, num_workers=0, buffer_size=2,
                                collate_fn=data.collate)
    return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, persistent_workers=workers > 0,
                      collate_fn=collate)


def train(
    config: dict,
    data: str | Path,
    output_dir: str | Path,
    resume: bool = False,
    device: str | None = None,
    quiet: bool = False,
    validate: bool = True,
) -> TrainResult:
    """Train on the dataset at ``data`` (any layout :func:`ul3d.data.datasets.load_dataset` reads).

    Args:
        config: a run config (:func:`ul3d.config.load_config`).
        data: dataset folder or datalist file.
        output_dir: receives ``checkpoints/{last,best}.pt``, ``tensorboard/``, ``config.yaml``, ``history.json``.
        resume: continue from ``output_dir/checkpoints/last.pt`` when it exists.
        device: ``"cpu"``, ``"cuda"`` or None (CUDA when available).
        quiet: no progress bar.
        validate: check every case (:func:`~ul3d.data.validation.validate_dataset`) first; callers that
            already did (cross-validation) pass False so the images are not read again for every fold.
    """
    import yaml

    t0 = time.time()
    out = Path(output_dir)
    ckpt_dir = out / "checkpoints"
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    protocol = get(config, "data.protocol")
    spec = load_dataset(data, layout=get(config, "data.layout"), **({"protocol": protocol} if protocol else {}))
    channels = get(config, "data.channels") or spec.num_channels
    if validate:
        validate_dataset(spec, expected_channels=int(channels))
    classes = list(spec.class_names)
    train_items, val_items = split_cases(spec, config)

    total = int(get(config, "train.iterations"))
    interval = int(get(config, "train.val_interval"))
    if total <= 0 or interval <= 0 or total % interval:
        raise ConfigError(f"train.iterations ({total}) must be a positive multiple of train.val_interval ({interval})")
    roi = [int(s) for s in get(config, "train.roi_size")]
    seed = int(get(config, "train.seed", 0))
    set_determinism(seed)

    net_spec = _network_spec(config, int(channels), len(classes))
    network = network_from_spec(net_spec).to(dev)
    ckpt = load_checkpoint(last_path) if resume and last_path.exists() else None
    start = int(ckpt["iteration"]) if ckpt else 0
    graph_setting = get(config, "train.cuda_graph", "auto")
    graphed = _on_cuda("train.cuda_graph", graph_setting, dev, total - start)
    if graph_setting is True and not graphed:
        _log(f"[ul3d train] train.cuda_graph needs a CUDA device; training on {dev} without CUDA graphs")
    kernels = _use_kernels(get(config, "train.kernels", "auto"), dev, graphed)
    mode = _compile_mode(get(config, "train.compile_mode", "default"))
    if kernels:  # same parameters and function; the evaluator and the checkpoints see the same module
        accelerate(network, fused_mkdc=False, triton=True, pointwise_matmul=True)
    warm_setting = get(config, "train.warm_kernels", "auto")
    if warm_setting not in (True, False, "auto"):
        raise ConfigError(f"train.warm_kernels must be true, false or auto, got {warm_setting!r}")
    warmup = []
    if kernels and warm_setting and start < total:  # compiles the kernels in the background while data is cached
        batch_patches = int(get(config, "train.batch_size", 1)) * int(get(config, "train.num_samples", 1))
        warmup = start_kernel_warmup(net_spec, dev, roi, batch_patches, int(get(config, "infer.sw_batch_size", 4)),
                                     bool(get(config, "train.amp", True)))
    opt_cfg = dict(get(config, "train.optimizer") or {})
    optimizer = torch.optim.AdamW(network.parameters(), lr=float(opt_cfg.get("lr", 1e-3)),
                                  weight_decay=float(opt_cfg.get("weight_decay", 1e-5)))
    scheduler = _scheduler(optimizer, config, total)

    if ckpt is not None:
        if ckpt["network_spec"] != net_spec:
            raise ConfigError(f"{last_path}: trained with network {ckpt['network_spec']}, the config now asks for {net_spec}")
        network.load_state_dict(ckpt["network"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
    # after the scheduler took its float base rates; also converts a resumed state written in the other mode
    conform_optimizer(optimizer, capturable=graphed, device=dev)
    history: list[dict] = list(ckpt.get("history", [])) if ckpt else []
    best = dict(ckpt["best"]) if ckpt else {"metric": -1.0, "iteration": 0}

    workers = int(get(config, "data.num_workers", 0) or 0)
    cache_rate = float(get(config, "data.cache_rate", 1.0))
    label_map = spec.label_map
    train_loader = build_train_loader(config, train_items, len(classes), label_map, dev, start, total)

    use_amp = bool(get(config, "train.amp", True)) and dev.type == "cuda"
    compiled = _on_cuda("train.compile", get(config, "train.compile", "auto"), dev, total - start)
    evaluator = None
    if val_items:
        val_ds = CacheDataset(val_items, preprocessing(config, label_map=label_map), cache_rate=cache_rate,
                              num_workers=max(1, workers), progress=False)
        k = len(classes)
        # with CUDA-graph training, validation too replays CUDA graphs, of a BatchNorm-folded copy refreshed in place
        val_net = InferenceCopy(network, fused_mkdc=False, triton=kernels) if graphed else network
        evaluator = SupervisedEvaluator(
            device=dev,
            val_data_loader=DataLoader(val_ds, batch_size=1, num_workers=0),
            network=val_net,
            inferer=SlidingWindowInferer(
                roi_size=get(config, "infer.roi_size") or roi, sw_batch_size=int(get(config, "infer.sw_batch_size", 4)),
                overlap=float(get(config, "infer.overlap", 0.5)), mode=get(config, "infer.mode", "gaussian"),
            ),
            postprocessing=Compose([AsDiscreted(keys="pred", argmax=True, to_onehot=k), AsDiscreted(keys="label", to_onehot=k)]),
            key_val_metric={"val_mean_dice": MeanDice(include_background=False, output_transform=from_engine(["pred", "label"]))},
            additional_metrics={"val_class_dice": MeanDice(include_background=False, reduction="mean_batch",
                                                           output_transform=from_engine(["pred", "label"]))},
            amp=use_amp,
        )
        if isinstance(val_net, InferenceCopy):
            evaluator.add_event_handler(Events.STARTED, lambda _: val_net.refresh())

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start + 1 if start else None)
    loss_cfg = dict(get(config, "train.loss") or {})
    trainer = SupervisedTrainer(
        device=dev,
        max_epochs=total // interval,
        epoch_length=interval,
        train_data_loader=train_loader,
        network=network,
        optimizer=optimizer,
        loss_function=DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=float(loss_cfg.get("lambda_dice", 1.0)),
                                 lambda_ce=float(loss_cfg.get("lambda_ce", 1.0))),
        amp=use_amp,
        decollate=False,
        compile=compiled,  # the training forward/backward only; validation and checkpoints use the plain module
        compile_kwargs={"mode": mode} if compiled else None,
        iteration_update=CUDAGraphStep() if graphed else None,  # replays one captured step (uses the compiled net)
    )
    LrScheduleHandler(scheduler, epoch_level=False, print_lr=False).attach(trainer)
    # every 10th loss: reading a loss waits for the GPU, and a wait every iteration stops the CPU from queueing the next
    # steps while the GPU runs this one (with CUDA graphs the CPU side is otherwise a few ms per step)
    TensorBoardStatsHandler(summary_writer=writer, iteration_log=10, epoch_log=False, tag_name="train/loss",
                            output_transform=lambda o: o["loss"].item()).attach(trainer)

    @trainer.on(Events.ITERATION_COMPLETED(every=10))
    def _log_lr(engine):
        writer.add_scalar("train/lr", float(optimizer.param_groups[0]["lr"]), engine.state.iteration)

    # time the trainer waits for its next batch (data-bound runs show it: the loader cannot keep up with the step)
    waited = {"s": 0.0, "t": 0.0}
    trainer.add_event_handler(Events.GET_BATCH_STARTED, lambda _: waited.update(t=time.perf_counter()))
    trainer.add_event_handler(Events.GET_BATCH_COMPLETED,
                              lambda _: waited.update(s=waited["s"] + time.perf_counter() - waited["t"]))

    if evaluator is not None:
        ValidationHandler(validator=evaluator, interval=1, epoch_level=True).attach(trainer)

    @trainer.on(Events.EPOCH_COMPLETED)
    def _validate_and_checkpoint(engine):
        it = engine.state.iteration
        record = {"iteration": it, "loss": engine.state.output["loss"].item(), "seconds": round(time.time() - t0, 1),
                  "train_seconds": round(engine.state.times.get("EPOCH_COMPLETED") or 0.0, 2),  # this interval's steps
                  "data_wait_seconds": round(waited["s"], 2)}  # of which waiting for batches
        waited["s"] = 0.0
        if evaluator is not None:
            record["val_seconds"] = round(evaluator.state.times.get("COMPLETED") or 0.0, 2)
            mean = float(evaluator.state.metrics["val_mean_dice"])
            per_class = [float(v) for v in torch.as_tensor(evaluator.state.metrics["val_class_dice"]).flatten()]
            record.update(val_mean_dice=mean, val_class_dice=dict(zip(classes[1:], per_class)))
            writer.add_scalar("val/mean_dice", mean, it)
            for name, v in zip(classes[1:], per_class):
                writer.add_scalar(f"val/dice/{name}", v, it)
            _tensorboard_overlay(writer, evaluator, len(classes), it)
            engine.state.metrics["val_dice"] = mean
            if mean > best["metric"]:
                best.update(metric=mean, iteration=it)
        history.append(record)
        payload = {
            "format": CHECKPOINT_FORMAT, "ul3d_version": __version__, "iteration": it,
            "network": network.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": trainer.scaler.state_dict() if use_amp else None, "trainer": engine.state_dict(),
            "rng": _rng_state(), "config": config, "class_names": classes, "channel_names": list(spec.channel_names),
            "network_spec": net_spec, "best": dict(best), "history": history,
        }
        if evaluator is not None and best["iteration"] == it:
            with atomic_path(best_path) as tmp:
                torch.save(payload, tmp)
        with atomic_path(last_path) as tmp:
            torch.save(payload, tmp)
        with atomic_path(out / "history.json") as tmp:
            tmp.write_text(json.dumps(history, indent=1))
        msg = f"[ul3d train] iteration {it}/{total}  loss {record['loss']:.4f}"
        if evaluator is not None:
            msg += f"  val Dice {record['val_mean_dice']:.4f} (best {best['metric']:.4f} @ {best['iteration']})  " + " ".join(
                f"{n}={v:.3f}" for n, v in record["val_class_dice"].items())
        _log(msg + f"  [{record['seconds']:.0f}s]")

    if not quiet and sys.stderr.isatty():
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False).attach(trainer, output_transform=lambda o: {"loss": o["loss"].item()}, metric_names=["val_dice"],
                                          event_name=Events.ITERATION_COMPLETED(every=10))  # reading the loss waits

    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    if ckpt is not None:
        trainer.load_state_dict(ckpt["trainer"])
        if use_amp and ckpt.get("scaler"):  # MONAI's Trainer.run() makes a fresh GradScaler: restore it after that
            trainer.add_event_handler(Events.STARTED, lambda engine, state=ckpt["scaler"]: engine.scaler.load_state_dict(state))
        _set_rng_state(ckpt["rng"])
        _log(f"[ul3d train] resuming {last_path} at iteration {start}/{total}")
    if start < total:
        _log(f"[ul3d train] {len(train_items)} training / {len(val_items)} validation cases, classes {classes}, "
             f"network {net_spec['name']}{':' + net_spec['variant'] if net_spec['variant'] else ''} on {dev}"
             f"{f' (torch.compile, {mode})' if compiled else ''}{' with ul3d kernels' if kernels else ''}"
             f"{', each step one CUDA graph (bf16)' if graphed else ''}"
             f"{'; training data cached on the GPU' if isinstance(train_loader.dataset, SideStreamData) else ''}")
        try:
            trainer.run()
        finally:
            stop_kernel_warmup(warmup)
    stop_kernel_warmup(warmup)
    writer.close()
    return TrainResult(out, best_path if best_path.exists() else None, last_path, best["metric"], best["iteration"],
                       total, time.time() - t0, classes, history)


def _tensorboard_overlay(writer, evaluator, num_classes: int, step: int) -> None:
    """Middle-slice overlay (image | reference | prediction) of the last validation case."""
    from ..visualize import overlay

    output = evaluator.state.output
    batch = evaluator.state.batch
    if not output or batch is None:
        return
    item = output[0] if isinstance(output, list) else output
    first = batch[0] if isinstance(batch, list) else batch  # decollated (list) or batched (dict)
    image = torch.as_tensor(first["image"])
    image = (image[0] if image.dim() == 5 else image)[0].cpu().numpy()
    ref = torch.as_tensor(item["label"]).argmax(0).cpu().numpy()
    pred = torch.as_tensor(item["pred"]).argmax(0).cpu().numpy()
    z = int(np.argmax((ref > 0).sum((0, 1)))) if ref.any() else image.shape[-1] // 2
    tiles = [overlay(image[..., z], None, num_classes), overlay(image[..., z], ref[..., z], num_classes),
             overlay(image[..., z], pred[..., z], num_classes)]
    writer.add_image("val/overlay", np.concatenate(tiles, axis=1), step, dataformats="HWC")
