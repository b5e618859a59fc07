"""Micro-benchmark of the inference path's decoder upsamplings (CUDA, bf16 autocast): every ``upsample_relu`` and
``upsample_relu_head`` call of one UltraLightUNet3D forward at ``(4, 1, 96, 96, 96)``, recorded with its inputs and
replayed one by one as CUDA graphs through the tabled kernels (``linear_upsample``, ``upsample_relu_pointwise``: each
output voxel gathers its 8 sources per channel) and the 2× cell kernels (``upsample2x_relu``,
``upsample2x_relu_pointwise``: each cell reads its 2×2×2 sources once for its 8 outputs). Reports each call's
microseconds and the fraction of the GPU's memory bandwidth the bytes it must move (input once, output once) reach.

    python benchmarks/bench_upsample.py --variants base --out benchmarks/results --date 2026-12-03

Prints a markdown table and writes ``upsample_cuda_<device>_<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt

import torch

from cuda_timing import graph_ms, save_results
from ul3d.networks import depthwise as dw
from ul3d.networks.fast import accelerate
from ul3d.networks.nets import _lean
from ul3d.networks.registry import build_network

BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}


def record_calls(net: torch.nn.Module, x: torch.Tensor) -> list[tuple[str, tuple, dict]]:
    """(name, args, kwargs) of every cell-kernel call of one forward of ``net`` (all of its upsamplings double)."""
    calls, saved = [], {}
    for name in ("upsample2x_relu", "upsample2x_relu_pointwise"):
        saved[name] = fn = getattr(_lean, name)
        setattr(_lean, name, lambda *a, fn=fn, name=name, **k: calls.append((name, a, k)) or fn(*a, **k))
    try:
        net(x)
    finally:
        for name, fn in saved.items():
            setattr(_lean, name, fn)
    return calls


def tabled(name: str, args: tuple, kwargs: dict):
    """The same call through the tabled kernel."""
    x = args[0]
    size = [2 * s for s in x.shape[2:]]
    tables = _lean._tables(x, size, False)
    if name == "upsample2x_relu":
        return lambda: dw.linear_upsample(x, tables, size, **kwargs)
    return lambda: dw.upsample_relu_pointwise(x, tables, size, *args[1:], **kwargs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["base"])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--date", default=dt.date.today().isoformat())
    args = ap.parse_args()
    if not torch.cuda.is_available() or not dw.triton_available("cuda"):
        raise SystemExit("bench_upsample.py needs CUDA and Triton")
    name = torch.cuda.get_device_name()
    bandwidth = next((v for k, v in BANDWIDTH.items() if k in name), None)
    rows = []
    for variant in args.variants:
        net = build_network(f"ultralightunet:{variant}", out_channels=3).cuda().eval()
        net = accelerate(net, fused_mkdc=False, fold_bn=True, triton=True)
        x = torch.randn(4, 1, 96, 96, 96, device="cuda")
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            for kernel, a, k in record_calls(net, x):
                cells = lambda a=a, k=k, kernel=kernel: getattr(dw, kernel)(*a, **k)
                table = tabled(kernel, a, k)
                out = cells()
                diff = (out.float() - table().float()).abs().max().item()
                moved = (a[0].numel() * a[0].element_size() + out.numel() * out.element_size())
                us_cells, us_table = 1e3 * graph_ms(cells), 1e3 * graph_ms(table)
                rows.append(dict(variant=variant, kernel=kernel, shape=list(a[0].shape), out_channels=out.shape[1],
                                 cells_us=us_cells, tabled_us=us_table, bytes=moved, max_abs_diff=diff,
                                 cells_bandwidth_fraction=moved / (us_cells * 1e-6) / bandwidth if bandwidth else None))
                print(f"{variant} {kernel} {tuple(a[0].shape)}: cells {us_cells:.1f} µs, tabled {us_table:.1f} µs",
                      flush=True)
    lines = [f"\n{name}; torch {torch.__version__}; {args.date}\n",
             "| variant | call | input | µs cells | µs tabled | bandwidth fraction (cells) | max abs diff |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        frac = f"{r['cells_bandwidth_fraction']:.2f}" if r["cells_bandwidth_fraction"] else "—"
        lines.append(f"| {r['variant']} | {r['kernel']} | {'×'.join(map(str, r['shape']))} | {r['cells_us']:.1f} | "
                     f"{r['tabled_us']:.1f} | {frac} | {r['max_abs_diff']:.3g} |")
    for variant in args.variants:
        sel = [r for r in rows if r["variant"] == variant]
        lines.append(f"| {variant} | all | | {sum(r['cells_us'] for r in sel):.1f} | "
                     f"{sum(r['tabled_us'] for r in sel):.1f} | | |")
    print("\n".join(lines))
    save_results(args.out, "upsample", args.date, rows)


if __name__ == "__main__":
    main()
