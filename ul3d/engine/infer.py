"""Sliding-window inference on image files, writing label maps in each input's own geometry.

The checkpoint carries the preprocessing config: each input is loaded, reoriented, resampled and
normalised exactly as in training, predicted by sliding window (optionally with mirror TTA and an
ensemble of checkpoints, whose softmax probabilities are averaged), then ``Invertd`` maps the
probabilities back to the input's grid before the argmax. Outputs are uint8 label maps with the
input's shape, affine and orientation, written atomically; probability maps on request.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from monai.transforms import Invertd

from ..config import get
from ..data.io import IMAGE_SUFFIXES, case_id, image_suffix, write_like
from ..data.transforms import preprocessing
from ..utils import keep_freed_memory
from .train import load_checkpoint, network_from_spec

__all__ = ["PATHS", "PredictionReport", "Predictor", "find_images", "group_cases", "predict_paths"]

#: nnU-Net's per-channel file name ``CASE_XXXX`` (case, channel index)
CHANNEL_FILE = re.compile(r"(.+)_(\d{4})")

# Execution paths of Predictor (issue 7). "auto" picks the fastest measured one for the device (benchmarks/README.md):
# CUDA: "cuda_graph" (the fused MKDC and channels-last measured slower on an H100); CPU: channels-last memory with
# BatchNorm folded into the convs ("channels_last"). "fused": fused MKDC; "onnxruntime": the fused network exported to
# ONNX Runtime (CPU); "compile": fused + torch.compile; "cuda_graph": CUDA, bf16 with BatchNorm folded and ul3d's
# Triton inference kernels (MKDC, max-pooling, last head), each window batch replayed as a CUDA graph. "plain": fp32
# modules as trained.
PATHS = ("auto", "plain", "fused", "channels_last", "onnxruntime", "compile", "cuda_graph")


class _OnnxRuntimeNet:
    """A network exported to ONNX (fixed patch size, dynamic batch) and run in ONNX Runtime on the CPU."""

    def __init__(self, net: torch.nn.Module, patch: Sequence[int], in_channels: int) -> None:
        import tempfile

        import onnxruntime as ort

        from ..networks.export import export_onnx

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "net.onnx"
            export_onnx(net.eval(), torch.zeros(1, in_channels, *patch), path)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"image": x.float().contiguous().numpy()})[0])


def find_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files named directly or found (non-recursively) in the given folders, sorted."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.is_file() and image_suffix(f) in IMAGE_SUFFIXES)
        else:
            files.append(p)
    return files


def _root_cause(e: BaseException) -> str:
    """The innermost exception's message (MONAI wraps reader errors in "applying transform ...")."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"


def group_cases(files: Sequence[Path]) -> list[tuple[str, list[Path]]]:
    """Group files into cases: nnU-Net's ``CASE_0000.nii.gz, CASE_0001.nii.gz, ...`` (indices exactly 0..n-1) form one
    case ``CASE`` with one file per channel, in channel order; any other file — ``scan_0001 … scan_0050`` included —
    is a case of its own named by its file name."""
    groups: dict[str, list[tuple[int, Path]]] = {}
    for f in files:
        m = CHANNEL_FILE.fullmatch(case_id(f))
        key, idx = (m.group(1), int(m.group(2))) if m else (case_id(f), -1)
        groups.setdefault(key, []).append((idx, f))
    cases: list[tuple[str, list[Path]]] = []
    for case, members in groups.items():
        members.sort()
        if [i for i, _ in members] == list(range(len(members))):
            cases.append((case, [f for _, f in members]))
        else:
            cases += [(case_id(f), [f]) for _, f in members]
    return cases


@dataclass
class PredictionReport:
    written: list[Path] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


class Predictor:
    """One or several checkpoints (an ensemble) ready to predict files.

    Args:
        checkpoints: ul3d checkpoint paths; several are averaged (softmax) — fold ensembles.
        device: ``"cpu"``, ``"cuda"`` or None (CUDA when available). On the CPU the process's malloc keeps freed
            memory for reuse (:func:`ul3d.utils.keep_freed_memory`).
        overlap, sw_batch_size, mode, roi_size: sliding-window settings; None = the checkpoint config's.
        tta: average over all mirrorings of the spatial axes (8 passes in 3D).
        path: execution path, one of :data:`PATHS`; None = the config's ``infer.path``, else ``"auto"`` (the fastest
            measured path for the device). ``"plain"`` runs the fp32 PyTorch modules as trained.
    """

    def __init__(
        self,
        checkpoints: Sequence[str | os.PathLike],
        device: str | None = None,
        overlap: float | None = None,
        sw_batch_size: int | None = None,
        mode: str | None = None,
        roi_size: Sequence[int] | None = None,
        tta: bool = False,
        path: str | None = None,
    ) -> None:
        if not checkpoints:
            raise ValueError("at least one checkpoint is needed")
        requested_path = path
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cpu":  # reuse freed activation memory (2-core CPU sliding window: base -40 %)
            keep_freed_memory()
        ckpts = [load_checkpoint(c) for c in checkpoints]
        first = ckpts[0]
        for ck_path, c in zip(checkpoints[1:], ckpts[1:]):
            if c["class_names"] != first["class_names"] or c["network_spec"]["in_channels"] != first["network_spec"]["in_channels"]:
                raise ValueError(f"{ck_path}: classes/channels differ from {checkpoints[0]}; cannot ensemble them")
        self.config = first["config"]
        self.class_names: list[str] = list(first["class_names"])
        self.in_channels = int(first["network_spec"]["in_channels"])
        self.networks = []
        for ck_path, c in zip(checkpoints, ckpts):
            net = network_from_spec(c["network_spec"])
            try:
                net.load_state_dict(c["network"])
            except RuntimeError as e:
                raise ValueError(f"{ck_path}: weights do not fit network {c['network_spec']['name']}: {str(e).splitlines()[0]}") from None
            self.networks.append(net.to(self.device).eval())
        cfg = self.config
        self.inferer = SlidingWindowInferer(
            roi_size=list(roi_size or get(cfg, "infer.roi_size") or get(cfg, "train.roi_size")),
            sw_batch_size=int(sw_batch_size or get(cfg, "infer.sw_batch_size", 4)),
            overlap=float(overlap if overlap is not None else get(cfg, "infer.overlap", 0.5)),
            mode=mode or get(cfg, "infer.mode", "gaussian"),
        )
        self.tta = tta
        self.path = self._select_path(requested_path or get(cfg, "infer.path", None) or "auto")
        self.preprocess = preprocessing(cfg, with_label=False)
        self.invert = Invertd(keys="pred", transform=self.preprocess, orig_keys="image", nearest_interp=False,
                              to_tensor=True)

    @property
    def description(self) -> str:
        spec = f"{len(self.networks)} checkpoint(s)"
        return f"{spec} on {self.device.type}, sliding window {tuple(self.inferer.roi_size)}, " \
               f"overlap {self.inferer.overlap}{', mirror TTA' if self.tta else ''}; path: {self.path}"

    def _select_path(self, path: str) -> str:
        """Set up the execution path; returns its description ("cuda bf16 + fused MKDC", "cpu onnxruntime", ...)."""
        from ..networks.depthwise import triton_available
        from ..networks.fast import CUDAGraphInference, accelerate, fused_mkdc_count

        if path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {path!r}")
        cuda = self.device.type == "cuda"
        self.autocast = cuda and path != "plain"
        self.predictors: list = list(self.networks)
        if path == "plain":
            return f"{self.device.type} fp32 plain"
        if path == "onnxruntime" and cuda:
            raise ValueError("path 'onnxruntime' runs on the CPU only; use --device cpu")
        if path == "cuda_graph" and not cuda:
            raise ValueError("path 'cuda_graph' needs a CUDA device; use --device cuda or another path")
        if path in ("auto", "cuda_graph") and cuda:
            # H200, base, 256×256×128 at overlap 0.5: 0.249 s plain bf16, 0.107 s this way (MONAI UNet 0.071 s;
            # benchmarks/results/levers_cuda_h200_onepergroup_2026-11-23.json), 0.082 s with the MKDC and head inference
            # kernels (UNet 0.069 s; levers_cuda_h200_mkdc_head_kernels_2026-12-01_quick.json), 0.070 s with the 4-row
            # MKDC kernel and max-pooling without indices (UNet 0.070 s;
            # levers_cuda_h200_mkdc_rows_2026-12-02_quick.json), 0.061 s with the first stage + pooling and the decoder
            # upsamplings as kernels too (UNet 0.070 s; levers_cuda_h200_linear_upsample_2026-12-02_quick.json),
            # 0.051 s with every MKIR's 1×1 convs + epilogues as kernels (UNet 0.068-0.070 s;
            # levers_cuda_h200_cached_parts_sa_2026-12-02_quick*.json). The first call on a machine compiles the Triton
            # kernels (34 s on an H200; Triton caches them on disk)
            self.networks = [accelerate(n, fused_mkdc=False, fold_bn=True, triton=True) for n in self.networks]
            self.predictors = [CUDAGraphInference(n) for n in self.networks]
            kernels = " + Triton inference kernels" if triton_available(self.device) else ""
            note = " (the first volume compiles the Triton kernels unless cached: 34 s on an H200)" if kernels else ""
            return f"cuda bf16 + folded BatchNorm{kernels} + CUDA graphs{note}"
        if path in ("auto", "channels_last"):  # CPU: oneDNN's channels-last depth-wise convs + BatchNorm folded, and
            # one-channel 1×1 convs as broadcast multiplies, in-place activations and sums (2-core CPU, base sliding
            # window 3.8-4.2 s -> 2.6-2.8 s, benchmarks/results/levers_cpu_2core_inplace_*.json)
            # and the MKDC shuffles folded into the project convs, the stem's project + shortcut as one product and the
            # GAGs' grouped convs as depth-wise convs, the 3D spatial-attention conv over depth slices (merge_pointwise;
            # forward of 4 base windows 0.60 -> 0.47 s), the stem's batch packed as channels for its depth-wise convs and
            # the activations as oneDNN post-ops (0.415 -> 0.342 s; sliding window 1.00-1.06x MONAI UNet,
            # benchmarks/results/levers_cpu_2core_keepmem_convact_run*_2026-12-01.json)
            self.networks = [accelerate(n, fused_mkdc=False, fold_bn=True, channels_last=True, outer_product=True,
                                        inplace=True, merge_pointwise=True) for n in self.networks]
            self.predictors = list(self.networks)
            return (f"{self.device.type}{' bf16' if self.autocast else ''} channels_last + folded BatchNorm"
                    " + outer-product stem + in-place + merged pointwise")
        for net in self.networks:
            accelerate(net)
        fused = sum(fused_mkdc_count(n)[0] for n in self.networks)
        what = f"{self.device.type}{' bf16' if self.autocast else ''}" + (" + fused MKDC" if fused else "")
        if path == "onnxruntime":
            self.predictors = [_OnnxRuntimeNet(n, self.inferer.roi_size, self.in_channels) for n in self.networks]
            return f"cpu onnxruntime{' + fused MKDC' if fused else ''}"
        if path == "compile":
            self.predictors = [torch.compile(n) for n in self.networks]
            return f"{what} + torch.compile"
        return what

    @torch.no_grad()
    def probabilities(self, image: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities ``(C, *S)`` for a preprocessed image ``(channels, *S)``."""
        x = image.unsqueeze(0).to(self.device)
        dims = list(range(2, x.dim()))
        flips = [()] + [c for r in range(1, len(dims) + 1) for c in itertools.combinations(dims, r)] if self.tta else [()]
        total = None
        for net in self.predictors:
            for axes in flips:
                xi = torch.flip(x, axes) if axes else x
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    logits = self.inferer(xi, net)
                p = torch.softmax(logits.float(), dim=1)
                p = torch.flip(p, axes) if axes else p
                total = p if total is None else total + p
        return (total / (len(self.networks) * len(flips)))[0].cpu()

    def predict_file(self, paths: str | os.PathLike | Sequence[str | os.PathLike]) -> tuple[np.ndarray, np.ndarray]:
        """Labels (uint8) and probabilities (float32, ``(C, *S)``) on the input's own voxel grid.

        ``paths``: one image file (channels in a 4-D file when there are several), or one file per channel.
        """
        files = [Path(p) for p in paths] if isinstance(paths, (list, tuple)) else [Path(paths)]
        path = files[0] if len(files) == 1 else ", ".join(str(f) for f in files)
        try:
            data = self.preprocess({"image": str(files[0]) if len(files) == 1 else [str(f) for f in files]})
        except Exception as e:  # noqa: BLE001 - report any reader failure as "cannot read"
            raise ValueError(f"cannot read {path}: {_root_cause(e)}") from None
        image = data["image"]
        if image.shape[0] != self.in_channels:
            raise ValueError(f"{path}: expected {self.in_channels} channel(s), found {image.shape[0]} "
                             f"(image shape {tuple(image.shape[1:])})")
        if image.dim() != 4:
            raise ValueError(f"{path}: expected a 3D volume, got an array of shape {tuple(image.shape)}")
        probs = self.probabilities(image)
        from monai.data import MetaTensor

        data["pred"] = MetaTensor(probs, meta=image.meta, applied_operations=list(image.applied_operations))
        restored = self.invert(data)["pred"]
        probs_np = torch.as_tensor(restored).float().numpy()
        return probs_np.argmax(0).astype(np.uint8), probs_np

    def predict_to(self, paths: Path | Sequence[Path], output_dir: Path, save_probabilities: bool = False,
                   case: str | None = None) -> Path:
        """Predict one case and write ``output_dir/<case><suffix>`` (and ``<case>_probabilities<suffix>``)."""
        files = [Path(p) for p in paths] if isinstance(paths, (list, tuple)) else [Path(paths)]
        labels, probs = self.predict_file(files)
        ref = files[0]
        suffix = image_suffix(ref)
        case = case or group_cases(files)[0][0]
        out = Path(output_dir) / f"{case}{suffix}"
        write_like(labels, ref, out, dtype=np.uint8)
        if save_probabilities:
            write_like(probs.astype(np.float32), ref, Path(output_dir) / f"{case}_probabilities{suffix}", dtype=np.float32)
        return out


def predict_paths(
    predictor: Predictor,
    inputs: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    save_probabilities: bool = False,
    progress: bool = True,
) -> PredictionReport:
    """Predict every input file case by case; a failing file is reported and skipped."""
    from tqdm import tqdm

    t0 = time.time()
    report = PredictionReport()
    files = find_images(inputs)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for case, members in tqdm(group_cases(files), desc="ul3d predict", unit="case", disable=not progress):
        try:
            report.written.append(predictor.predict_to(members, out, save_probabilities, case=case))
        except (ValueError, OSError, RuntimeError) as e:
            name = str(members[0]) if len(members) == 1 else f"{case} ({', '.join(m.name for m in members)})"
            report.failed[name] = str(e)
            tqdm.write(f"[ul3d predict] skipped {name}: {e}")
    report.seconds = time.time() - t0
    return report
