"""Micro-benchmark of the inference path's 1×1 convolutions (CUDA, bf16 autocast, BatchNorm folded): every
:func:`ul3d.networks.depthwise.pointwise_act` call of one UltraLightUNet3D forward at ``(4, 1, 96, 96, 96)``,
recorded with its inputs and replayed one by one as CUDA graphs, under several launch settings of the Triton kernel
(voxels × output channels per program, input channels per dot, warps, pipeline stages) and as PyTorch's ops (cuDNN's
1×1 conv, bias, residual, clamp and padding as separate kernels). Reports each call's microseconds, their sum and the
fraction of the GPU's memory bandwidth the bytes every call must move (inputs once, output once) reach.

    python benchmarks/bench_pointwise.py --variants base --out benchmarks/results --date 2026-12-03

Prints a markdown table and writes ``pointwise_cuda_<device>_<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt

import torch

from cuda_timing import graph_ms, save_results
from ul3d.networks import depthwise as dw
from ul3d.networks.blocks import multikernel
from ul3d.networks.fast import accelerate
from ul3d.networks.registry import build_network

#: (voxels, output channels, input channels per dot, warps or None, stages or None); the first is the default
SETTINGS = [(128, 64, 32, None, None), (256, 64, 32, None, None), (64, 64, 32, None, None), (128, 32, 32, None, None),
            (128, 64, 32, None, 1), (128, 64, 32, 4, None), (256, 32, 32, 4, None), (128, 64, 64, None, None)]
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}


def record_calls(net: torch.nn.Module, x: torch.Tensor) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) of every pointwise_act call in one forward of ``net``."""
    calls, inner = [], multikernel.pointwise_act

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return inner(*args, **kwargs)

    multikernel.pointwise_act = spy
    try:
        net(x)
    finally:
        multikernel.pointwise_act = inner
    return calls


def describe(args: tuple, kwargs: dict) -> tuple[str, float]:
    """A call's shapes and the bytes it must move (inputs and output once)."""
    x, w = args[0], args[1]
    r, pad = kwargs.get("residual"), kwargs.get("pad")
    out = inner_out = x.shape[0] * w.shape[0] * x[0, 0].numel()
    if pad is not None:
        inner_out = x.shape[0] * w.shape[0] * torch.Size([s + 2 * p for s, p in zip(x.shape[2:], pad)]).numel()
    moved = (x.numel() + (r.numel() if r is not None else 0) + max(out, inner_out)) * 2  # bf16
    what = (f"{x.shape[1]}→{w.shape[0]} @ {'×'.join(map(str, x.shape[2:]))}"
            f"{' +res' if r is not None else ''}{'(1×1)' if kwargs.get('residual_weight') is not None else ''}"
            f"{' pad' if pad is not None and any(pad) else ''}")
    return what, moved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["base"])
    ap.add_argument("--settings", type=int, default=len(SETTINGS), help="time the first N of SETTINGS")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--date", default=dt.date.today().isoformat())
    args = ap.parse_args()
    if not torch.cuda.is_available() or not dw.triton_available("cuda"):
        raise SystemExit("bench_pointwise.py needs CUDA and Triton")
    name = torch.cuda.get_device_name()
    bandwidth = next((v for k, v in BANDWIDTH.items() if k in name), None)
    saved = (dw.POINTWISE_VOXELS, dw.POINTWISE_CHANNELS, dw.POINTWISE_K, dw.POINTWISE_WARPS, dw.POINTWISE_STAGES)
    rows, lines = [], []
    for variant in args.variants:
        net = build_network(f"ultralightunet:{variant}", out_channels=3).cuda().eval()
        net = accelerate(net, fused_mkdc=False, fold_bn=True, triton=True)
        x = torch.randn(4, 1, 96, 96, 96, device="cuda")
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            calls = record_calls(net, x)
            shapes = [describe(a, k) for a, k in calls]
            ref = [multikernel.pointwise_act(*a, **{**k, "triton": False}) for a, k in calls]
            variants = [("pytorch", None)] + [(f"triton {s}", s) for s in SETTINGS[:args.settings]]
            for label, setting in variants:
                if setting:
                    (dw.POINTWISE_VOXELS, dw.POINTWISE_CHANNELS, dw.POINTWISE_K, dw.POINTWISE_WARPS,
                     dw.POINTWISE_STAGES) = setting
                us, diff = [], 0.0
                for (a, k), r in zip(calls, ref):
                    kw = {**k, "triton": setting is not None}
                    got = multikernel.pointwise_act(*a, **kw)
                    diff = max(diff, (got.float() - r.float()).abs().max().item())
                    us.append(1e3 * graph_ms(lambda: multikernel.pointwise_act(*a, **kw), warmup=2))
                moved = sum(m for _, m in shapes)
                row = dict(variant=variant, path=label, total_us=sum(us), calls=[
                    dict(what=w, us=u, bytes=m) for (w, m), u in zip(shapes, us)], max_abs_diff=diff,
                    bandwidth_fraction=moved / (sum(us) * 1e-6) / bandwidth if bandwidth else None)
                rows.append(row)
                print(f"{variant} {label}: {row['total_us']:.1f} µs, max |diff| {diff:.3g}", flush=True)
    (dw.POINTWISE_VOXELS, dw.POINTWISE_CHANNELS, dw.POINTWISE_K, dw.POINTWISE_WARPS, dw.POINTWISE_STAGES) = saved
    lines.append(f"\n{name}; torch {torch.__version__}; {args.date}\n")
    lines.append("| variant | path | µs (all calls) | bandwidth fraction | max abs diff |\n|---|---|---:|---:|---:|")
    for r in rows:
        frac = f"{r['bandwidth_fraction']:.2f}" if r["bandwidth_fraction"] else "—"
        lines.append(f"| {r['variant']} | {r['path']} | {r['total_us']:.1f} | {frac} | {r['max_abs_diff']:.3g} |")
    first = next(r for r in rows if r["path"].startswith("triton"))
    lines.append("\nPer call (first Triton setting, PyTorch):\n\n| call | µs | PyTorch µs | GB/s |\n|---|---:|---:|---:|")
    torch_row = next(r for r in rows if r["path"] == "pytorch" and r["variant"] == first["variant"])
    for c, t in zip(first["calls"], torch_row["calls"]):
        lines.append(f"| {c['what']} | {c['us']:.1f} | {t['us']:.1f} | {c['bytes'] / c['us'] / 1e3:.0f} |")
    print("\n".join(lines))
    save_results(args.out, "pointwise", args.date, rows)


if __name__ == "__main__":
    main()
