"""Speed and memory of ul3d's networks against MONAI's, in one run, with ratios to MONAI's UNet.

    python benchmarks/bench_networks.py                  # CUDA: training step (bf16 autocast and fp32),
                                                         # peak memory, inference patches/s, sliding window
    python benchmarks/bench_networks.py --device cpu     # CPU sliding window (192×192×96, overlap 0.25)

Settings (issue 7): 1 input channel, 3 classes; training batch 2 at 96³ with AdamW + DiceCELoss; inference
batches of 4 patches; sliding window over 256×256×128 at overlap 0.5 (sw batch 4) on the GPU. Prints a markdown
table and writes JSON (device name, date, versions) to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from pathlib import Path

import torch

from ul3d.networks import build_network
from ul3d.networks.fast import fold_batchnorm
from ul3d.profiling import profile_model

GPU_NETWORKS = ["ultralightunet:T", "ultralightunet:S", "ultralightunet:base", "ultralightunet:M", "ultralightunet:L",
                "aulunet", "unet", "segresnet", "swinunetr", "unetr", "dynunet"]
CPU_NETWORKS = ["ultralightunet:T", "ultralightunet:S", "ultralightunet:base", "unet"]
ROI = (96, 96, 96)


FOLD_BN = False


def _net(spec: str, device: torch.device, inference: bool = False) -> torch.nn.Module:
    name, _, variant = spec.partition(":")
    net = build_network(name, variant or None, spatial_dims=3, in_channels=1, out_channels=3, roi_size=ROI)
    if inference and FOLD_BN:
        net = fold_batchnorm(net)
    return net.to(device)


def _timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def train_step(spec: str, device: torch.device, dtype: torch.dtype | None, iters: int) -> tuple[float, float]:
    """(seconds per step, peak GiB) for one AdamW + DiceCELoss step at batch 2."""
    from monai.losses import DiceCELoss

    net = _net(spec, device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    x = torch.randn(2, 1, *ROI, device=device)
    y = torch.randint(0, 3, (2, 1, *ROI), device=device).float()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sec = _timed(step, device, 3, iters)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return sec, peak


@torch.no_grad()
def inference(spec: str, device: torch.device, iters: int) -> float:
    net = _net(spec, device, inference=True).eval()
    x = torch.randn(4, 1, *ROI, device=device)

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            net(x)

    return 4 / _timed(run, device, 3, iters)


@torch.no_grad()
def sliding_window(spec: str, device: torch.device, shape, overlap: float, iters: int) -> float:
    from monai.inferers import sliding_window_inference

    net = _net(spec, device, inference=True).eval()
    vol = torch.randn(1, 1, *shape, device=device)

    def run():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            sliding_window_inference(vol, ROI, 4, net, overlap=overlap, mode="gaussian")

    return _timed(run, device, 1, iters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--networks", nargs="+", default=None)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--fold-bn", action="store_true", help="inference measurements with BatchNorm folded into convs")
    args = ap.parse_args()
    global FOLD_BN
    FOLD_BN = args.fold_bn
    device = torch.device(args.device)
    specs = args.networks or (GPU_NETWORKS if device.type == "cuda" else CPU_NETWORKS)
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    rows = []
    for spec in specs:
        prof = profile_model(spec, _net(spec, torch.device("cpu")), (1, 1, *ROI))
        row = {"network": spec, "params": prof.params, "gmacs": prof.conv_macs / 1e9}
        if device.type == "cuda":
            row["train_ms_bf16"], row["peak_gib_bf16"] = (v * s for v, s in zip(train_step(spec, device, torch.bfloat16, args.iters), (1e3, 1)))
            row["train_ms_fp32"], _ = (v * s for v, s in zip(train_step(spec, device, None, args.iters), (1e3, 1)))
            row["infer_patches_per_s"] = inference(spec, device, args.iters)
            row["sw_s_per_volume"] = sliding_window(spec, device, (256, 256, 128), 0.5, 3)
        else:
            row["cpu_sw_s_per_volume"] = sliding_window(spec, device, (192, 192, 96), 0.25, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    ref = next((r for r in rows if r["network"] == "unet"), None)
    keys = [k for k in rows[0] if k not in ("network", "params", "gmacs")]
    lines = [f"Device: {name}; torch {torch.__version__}; {dt.date.today()}{'; BatchNorm folded for inference' if FOLD_BN else ''}", "",
             "| network | params M | GMACs | " + " | ".join(keys) + " |", "|---|---:|---:|" + "---:|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            ratio = f" ({r[k] / ref[k]:.2f}×)" if ref and ref[k] else ""
            cells.append(f"{r[k]:.3g}{ratio}")
        lines.append(f"| {r['network']} | {r['params'] / 1e6:.3f} | {r['gmacs']:.2f} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    import monai

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = ("cuda" if device.type == "cuda" else "cpu") + ("_foldbn" if FOLD_BN else "")
    path = out / f"networks_{tag}_{dt.date.today()}.json"
    path.write_text(json.dumps({"device": name, "date": str(dt.date.today()), "torch": torch.__version__,
                                "monai": monai.__version__, "settings": {"roi": ROI, "train_batch": 2, "classes": 3, "fold_bn": FOLD_BN},
                                "rows": rows, "table": table}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
