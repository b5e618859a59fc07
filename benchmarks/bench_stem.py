"""Micro-benchmark of UltraLightUNet3D's first encoder stage and its 2× max-pool in inference (CUDA, bf16 autocast,
``(4, 1, 96, 96, 96)``, BatchNorm folded): ``ul3d predict``'s Triton path without the stem kernel (the MKDC kernel,
cuDNN's 1×1 convs and sum, :func:`ul3d.networks.depthwise.max_pool_2x`) against
:func:`ul3d.networks.depthwise.pooled_stem`'s one kernel at several tiles (pooled rows × columns, warps), with the
narrower branches' out-of-window taps skipped or multiplied by 0 (``STEM_SKIP``). (2026-12-03: a second kernel that
expanded each input voxel once per pooled voxel, ``stem_pooled_cells``, was slower at every tile tried,
``stem_cuda_h200_2026-12-03{,_cells2}.json``, and is removed.) Each
variant is timed as a replayed CUDA graph (as the sliding window runs it) and checked against the unfused output.

    python benchmarks/bench_stem.py --out benchmarks/results --date 2026-12-02

Prints a markdown table and writes ``stem_cuda_<device>_<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time

import torch

from cuda_timing import graph_ms, save_results
from ul3d.networks import depthwise as dw
from ul3d.networks.fast import accelerate
from ul3d.networks.registry import build_network

#: (pooled tile, warps, skip): the narrower branches' out-of-window taps skipped (True, dw.STEM_SKIP's default) or
#: multiplied by 0 (False)
SETTINGS = [((8, 16), 4, True), ((8, 16), 4, False), ((8, 16), 8, True), ((4, 16), 4, True), ((4, 32), 4, True),
            ((8, 8), 4, True), ((2, 16), 2, True), ((16, 16), 8, True)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["base", "T"])
    ap.add_argument("--settings", type=int, default=len(SETTINGS), help="time the first N of SETTINGS")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--date", default=dt.date.today().isoformat())
    args = ap.parse_args()
    if not torch.cuda.is_available() or not dw.triton_available("cuda"):
        raise SystemExit("bench_stem.py needs CUDA and Triton")
    rows = []
    saved = dw.STEM_TILE, dw.STEM_WARPS, dw.STEM_SKIP
    for variant in args.variants:
        net = build_network(f"ultralightunet:{variant}", out_channels=3).cuda().eval()
        net = accelerate(net, fused_mkdc=False, fold_bn=True, triton=True)
        stage, pool = net.encoder[0], net.pool
        x = torch.randn(4, 1, 96, 96, 96, device="cuda")
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            ref = dw.max_pool_2x(stage(x), pool)
            rows.append(dict(variant=variant, what="unfused", ms=graph_ms(lambda: dw.max_pool_2x(stage(x), pool))))
            print(rows[-1], flush=True)
            for tile, warps, skip in SETTINGS[:args.settings]:
                dw.STEM_TILE, dw.STEM_WARPS, dw.STEM_SKIP = tile, warps, skip
                t0 = time.perf_counter()
                got = stage.forward_pooled(x, pool, triton=True)
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                rows.append(dict(variant=variant, what=f"pooled_stem tile {tile} warps {warps} skip {skip}",
                                 ms=graph_ms(lambda: stage.forward_pooled(x, pool, triton=True)), first_call_s=first,
                                 max_abs_diff_bf16=(got.float() - ref.float()).abs().max().item(),
                                 ref_max=ref.float().abs().max().item()))
                print(rows[-1], flush=True)
    dw.STEM_TILE, dw.STEM_WARPS, dw.STEM_SKIP = saved
    name = torch.cuda.get_device_name()
    print(f"\n{name}; torch {torch.__version__}; {args.date}\n")
    print("| variant | path | ms | vs unfused |\n|---|---|---:|---:|")
    base = {r["variant"]: r["ms"] for r in rows if r["what"] == "unfused"}
    for r in rows:
        print(f"| {r['variant']} | {r['what']} | {r['ms']:.3f} | {r['ms'] / base[r['variant']]:.2f}× |")
    save_results(args.out, "stem", args.date, rows)


if __name__ == "__main__":
    main()
