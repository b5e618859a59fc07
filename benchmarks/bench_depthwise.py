"""Micro-benchmark of the operations that dominate an UltraLightUNet3D training step on CUDA (see
``bench_networks.py --profile``): depth-wise 3D convolution and BatchNorm3d on full-resolution MKDC tensors.

For a depth-wise ``k³`` convolution on ``(2, C, 96, 96, 96)`` (bf16) it times forward and forward+backward of
* ``native``: ``F.conv3d(groups=C)`` — PyTorch's own depth-wise 3D CUDA kernels;
* ``cl``: the same in channels_last_3d memory format;
* ``fp32``: the same in float32;
* ``triton``/``triton_fp32``: ul3d's Triton kernels (``ul3d.networks.depthwise``) in bf16/fp32;
* ``dw2d``: the same function as a sum over the ``k`` depth taps of depth-wise 2D convolutions (cuDNN/ATen 2D kernels);
* ``dense_group``: ``groups=C//2`` with 2 input channels per group (cuDNN's grouped path; a different function,
  shown only as the speed cuDNN reaches on a nearby shape);
and BatchNorm3d forward+backward in bf16/fp32, channels-first and channels_last. Prints a table, writes JSON.

``--mkdc`` instead times inference's whole MKDC (Eq. 2, BatchNorm folded: branches 1³, 3³, 5³, bias, ReLU6, sum,
channel shuffle) on ``(4, C, S³)`` bf16: PyTorch's convs and element-wise ops, ul3d's Triton depth-wise convs with
PyTorch's element-wise ops, and :func:`ul3d.networks.depthwise.multikernel_depthwise`'s one kernel at several
settings (depth rows per program, tile elements per row, warps).

``--wgrad`` times the depth-wise weight gradient of every depth-wise conv shape in a base UltraLightUNet3D training
step (batch 2, 96³, bf16): ul3d's ``dw_weight_grad`` against PyTorch's (``convolution_backward``, weight only), each
checked against float64. (A tensor-core kernel measured here on 2026-12-04 was 8× slower than ``dw_weight_grad``,
``results/depthwise_wgrad_cuda_h200_2026-12-04.json``, and was removed.)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time

import torch
import torch.nn.functional as F

from ul3d.networks import depthwise as dwmod
from ul3d.networks.depthwise import depthwise_conv, multikernel_depthwise


def _time(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def _tile_forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """depthwise_conv with its forward on the one-load-per-tap kernel (``DW_FORWARD = "tile"``)."""
    saved, dwmod.DW_FORWARD = dwmod.DW_FORWARD, "tile"
    try:
        return depthwise_conv(x, w)
    finally:
        dwmod.DW_FORWARD = saved


def dw2d(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Depth-wise 3D conv ('same' padding) as Σ_d depth-wise 2D convs of depth-shifted slices."""
    b, c, d, h, wd = x.shape
    k = w.shape[-1]
    p = k // 2
    xp = F.pad(x, (0, 0, 0, 0, p, p))
    out = None
    for t in range(k):
        sl = xp[:, :, t:t + d].transpose(1, 2).reshape(b * d, c, h, wd)
        y = F.conv2d(sl, w[:, :, t], padding=p, groups=c)
        out = y if out is None else out + y
    return out.reshape(b, d, c, h, wd).transpose(1, 2)


def _save(path: str | None, rows: list) -> None:
    if path:
        with open(path, "w") as f:
            json.dump({"date": dt.date.today().isoformat(), "device": torch.cuda.get_device_name(0),
                       "torch": torch.__version__, "rows": rows}, f, indent=1)


def bench_mkdc(a, dev: torch.device) -> None:
    rows = []
    saved = (dwmod.MKDC_ROWS, dwmod.MKDC_TILE, dwmod.MKDC_WARPS, dwmod.MKDC_LOOP_PLANE, dwmod.MKDC_LOOP_TILE,
             dwmod.MKDC_GRID)
    dwmod.MKDC_GRID = ()
    if a.mkdc_loop_plane is not None:
        dwmod.MKDC_LOOP_PLANE = a.mkdc_loop_plane
    for c, dtype in [(c, d) for c in a.channels for d in a.mkdc_dtypes]:
        x = torch.randn(4, c, a.size, a.size, a.size, device=dev, dtype=getattr(torch, dtype))
        ws = [torch.randn(c, 1, k, k, k, device=dev) / k ** 1.5 for k in (1, 3, 5)]
        bs = [torch.randn(c, device=dev) for _ in ws]
        bounds = [(0.0, 6.0)] * 3

        def separate(triton: bool):
            out = None
            for w, b in zip(ws, bs):
                y = (depthwise_conv(x, w.to(x.dtype), b.to(x.dtype)) if triton else
                     F.conv3d(x, w.to(x.dtype), b.to(x.dtype), padding=w.shape[-1] // 2, groups=c)).clamp(0, 6)
                out = y if out is None else out + y
            return out.unflatten(1, (2, c // 2)).transpose(1, 2).flatten(1, 2)

        ref = multikernel_depthwise(x.float(), ws, bs, bounds, 2, triton=False)
        variants = {"pytorch": lambda: separate(False), "triton dw + pytorch": lambda: separate(True)}
        for depth_rows, bh, bw, warps in a.mkdc_settings:
            def fused(depth_rows=depth_rows, tile=(bh, bw), warps=warps):
                dwmod.MKDC_ROWS, dwmod.MKDC_TILE, dwmod.MKDC_WARPS = depth_rows, tile, warps
                dwmod.MKDC_LOOP_TILE = tile
                return multikernel_depthwise(x, ws, bs, bounds, 2)
            variants[f"fused rows {depth_rows} tile {bh}x{bw} warps {warps}"] = fused
        for grid in a.mkdc_grid:
            def fused_grid(grid=grid):
                dwmod.MKDC_GRID = ((0, grid),)
                try:
                    return multikernel_depthwise(x, ws, bs, bounds, 2)
                finally:
                    dwmod.MKDC_GRID = ()
            variants["grid rows {} x {} tile {}x{} warps {}".format(*grid)] = fused_grid
        for name, fn in variants.items():
            with torch.no_grad():
                t0 = time.perf_counter()
                err = (fn().float() - ref).abs().max().item()  # (the first call compiles)
                first_s = time.perf_counter() - t0
                rows.append({"op": "mkdc 1,3,5 inference", "channels": c, "size": a.size, "dtype": dtype,
                             "loop_plane": dwmod.MKDC_LOOP_PLANE, "variant": name, "first_call_s": first_s,
                             "fwd_ms": _time(fn), "max_abs_diff_vs_fp32": err})
            print(json.dumps(rows[-1]), flush=True)
    (dwmod.MKDC_ROWS, dwmod.MKDC_TILE, dwmod.MKDC_WARPS, dwmod.MKDC_LOOP_PLANE, dwmod.MKDC_LOOP_TILE,
     dwmod.MKDC_GRID) = saved
    print("\n| C | size | input | variant | fwd ms | max abs diff |\n|---:|---:|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['channels']} | {r['size']} | {r['dtype']} | {r['variant']} | {r['fwd_ms']:.3f} "
              f"| {r['max_abs_diff_vs_fp32']:.3g} |")
    _save(a.out, rows)


def _training_dw_shapes() -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(input shape, kernel) of every depth-wise conv with a kernel wider than 1 in a base training step's forward."""
    from ul3d.networks import build_network

    net = build_network("ultralightunet", "base", spatial_dims=3, in_channels=1, out_channels=3).train()
    seen: list = []

    def hook(mod, inp, _out):
        key = ((2,) + tuple(inp[0].shape[1:]), tuple(mod.kernel_size))
        if mod.groups == mod.in_channels == mod.out_channels and max(key[1]) > 1 and key not in seen:
            seen.append(key)

    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    with torch.no_grad():
        net(torch.zeros(1, 1, 96, 96, 96))
    for h in handles:
        h.remove()
    return seen


def bench_wgrad(a, dev: torch.device) -> None:
    rows = []
    for shape, kernel in _training_dw_shapes():
        x = torch.randn(*shape, device=dev, dtype=torch.bfloat16)
        g = torch.randn(*shape, device=dev, dtype=torch.bfloat16)
        c, pad = shape[1], tuple(k // 2 for k in kernel)
        ref = torch.nn.grad.conv3d_weight(x.double(), (c, 1) + kernel, g.double(), padding=pad,
                                          groups=c).reshape(c, *kernel)
        w = torch.empty(c, 1, *kernel, device=dev, dtype=torch.bfloat16)
        variants = {
            "ul3d": lambda: dwmod._launch_weight_grad(x, g, kernel),
            "pytorch": lambda: torch.ops.aten.convolution_backward(g, x, w, None, (1, 1, 1), pad, (1, 1, 1), False,
                                                                   (0, 0, 0), c, (False, False, True))[2],
        }
        row = {"op": "dw weight grad", "shape": list(shape), "kernel": list(kernel)}
        for name, fn in variants.items():
            got = fn().double().reshape(ref.shape)
            row[f"{name}_err"] = (got - ref).abs().max().item() / ref.abs().max().item()
            row[f"{name}_ms"] = _time(fn)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| shape | kernel | ul3d ms | PyTorch ms | ul3d rel err | PyTorch rel err |\n|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['kernel']} | {r['ul3d_ms']:.3f} | {r['pytorch_ms']:.3f} | {r['ul3d_err']:.2g} "
              f"| {r['pytorch_err']:.2g} |")
    print(f"| total | | {sum(r['ul3d_ms'] for r in rows):.3f} | {sum(r['pytorch_ms'] for r in rows):.3f} | | |")
    _save(a.out, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channels", type=int, nargs="+", default=[32])
    p.add_argument("--kernels", type=int, nargs="+", default=[3, 5])
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--out", default=None)
    p.add_argument("--mkdc", action="store_true", help="time inference's whole MKDC instead (see above)")
    p.add_argument("--wgrad", action="store_true", help="time the depth-wise weight-gradient kernels (see above)")
    p.add_argument("--mkdc-settings", type=lambda v: tuple(int(i) for i in v.split(",")), nargs="+",
                   default=[(4, 4, 32, 4), (4, 1, 128, 4), (4, 2, 128, 4), (4, 4, 128, 4), (4, 8, 64, 4)],
                   metavar="ROWS,BH,BW,WARPS", help="--mkdc: the kernel's settings to time (rows × BH × BW tiles)")
    p.add_argument("--mkdc-grid", type=lambda v: tuple(int(i) for i in v.split(",")), nargs="*", default=[],
                   metavar="ROWS,HR,BH,BW,WARPS", help="--mkdc: settings of the kernel that shares input rows in depth "
                   "and height too (mkdc_forward_grid: ROWS depth × HR height rows of BH × BW tiles)")
    p.add_argument("--mkdc-loop-plane", type=int, default=None,
                   help="--mkdc: planes of at least this many voxels loop over their rows (0: all; default: the module's)")
    p.add_argument("--mkdc-dtypes", nargs="+", default=["bfloat16"], choices=["bfloat16", "float16", "float32"],
                   help="--mkdc: the input's dtypes")
    a = p.parse_args()
    dev = torch.device("cuda")
    rows = []
    if a.mkdc:
        return bench_mkdc(a, dev)
    if a.wgrad:
        return bench_wgrad(a, dev)
    for c in a.channels:
        shape = (2, c, a.size, a.size, a.size)
        for k in a.kernels:
            w32 = torch.randn(c, 1, k, k, k, device=dev, requires_grad=True)
            x32 = torch.randn(*shape, device=dev, requires_grad=True)
            ref = F.conv3d(x32, w32, padding=k // 2, groups=c)
            check = (dw2d(x32, w32) - ref).abs().max().item()
            check_triton = (depthwise_conv(x32, w32) - ref).abs().max().item()
            variants = {
                "native": (torch.bfloat16, False, lambda x, w: F.conv3d(x, w, padding=k // 2, groups=c)),
                "cl": (torch.bfloat16, True, lambda x, w: F.conv3d(x, w, padding=k // 2, groups=c)),
                "fp32": (torch.float32, False, lambda x, w: F.conv3d(x, w, padding=k // 2, groups=c)),
                "dw2d": (torch.bfloat16, False, dw2d),
                "triton": (torch.bfloat16, False, depthwise_conv),
                "triton_fp32": (torch.float32, False, depthwise_conv),
                "triton_tile": (torch.bfloat16, False, _tile_forward),
            }
            for name, (dtype, cl, fn) in variants.items():
                x = torch.randn(*shape, device=dev, dtype=dtype)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last_3d)
                x.requires_grad_(True)
                w = torch.randn(c, 1, k, k, k, device=dev, dtype=dtype, requires_grad=True)
                fwd = _time(lambda: fn(x, w))
                g = torch.randn_like(fn(x, w))
                both = _time(lambda: torch.autograd.grad(fn(x, w), (x, w), g))
                rows.append({"op": f"dwconv k={k}", "channels": c, "variant": name, "fwd_ms": fwd, "fwd_bwd_ms": both,
                             "max_abs_diff_fp32": {"dw2d": check, "triton": check_triton}.get(name, 0.0)})
                print(json.dumps(rows[-1]), flush=True)
            x = torch.randn(*shape, device=dev, dtype=torch.bfloat16, requires_grad=True)
            wg = torch.randn(c, 2, k, k, k, device=dev, dtype=torch.bfloat16, requires_grad=True)
            fn = lambda: F.conv3d(x, wg, padding=k // 2, groups=c // 2)
            g = torch.randn_like(fn())
            rows.append({"op": f"dwconv k={k}", "channels": c, "variant": "dense_group (2 ch/group)",
                         "fwd_ms": _time(fn), "fwd_bwd_ms": _time(lambda: torch.autograd.grad(fn(), (x, wg), g))})
            print(json.dumps(rows[-1]), flush=True)
        for dtype in (torch.bfloat16, torch.float32):
            for cl in (False, True):
                bn = torch.nn.BatchNorm3d(c).to(dev)
                x = torch.randn(*shape, device=dev, dtype=dtype)
                if cl:
                    x = x.contiguous(memory_format=torch.channels_last_3d)
                x.requires_grad_(True)

                def run():
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                        return bn(x)

                g = torch.randn_like(run())
                rows.append({"op": "batchnorm3d", "channels": c, "variant": f"{str(dtype)[6:]}{' cl' if cl else ''}",
                             "fwd_ms": _time(run), "fwd_bwd_ms": _time(lambda: torch.autograd.grad(run(), x, g))})
                print(json.dumps(rows[-1]), flush=True)
    print("\n| op | C | variant | fwd ms | fwd+bwd ms |\n|---|---:|---|---:|---:|")
    for r in rows:
        print(f"| {r['op']} | {r['channels']} | {r['variant']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} |")
    _save(a.out, rows)


if __name__ == "__main__":
    main()
