"""Speed and memory of ul3d's networks against MONAI's, in one run, with ratios to MONAI's UNet.

    python benchmarks/bench_networks.py                  # CUDA: training step (bf16 autocast and fp32),
                                                         # peak memory, inference patches/s, sliding window
    python benchmarks/bench_networks.py --device cpu     # CPU sliding window (192×192×96, overlap 0.25)
    python benchmarks/bench_networks.py --levers         # issue 7: every speed lever on ULUNet base/T vs UNet
    python benchmarks/bench_networks.py --levers fused fused+compile --quick

Levers (``--levers``; names joined with ``+``): ``plain``; ``cl`` channels_last(_3d) parameters and inputs; ``fused``
fused MKDC (``ul3d.networks.fast.accelerate``); ``pad1`` fused with the 1×1 branch as a zero-padded tap instead of a
per-channel scale; ``recompute`` fused MKDC recomputed in backward (less memory); ``foldbn`` BatchNorm folded for
inference; ``compile`` torch.compile (default mode); ``maxautotune`` mode="max-autotune-no-cudagraphs"; ``cudagraphs``
mode="reduce-overhead" (CUDA graphs); ``ort`` ONNX Runtime (inference only); ``threads1`` one CPU thread; ``triton`` MKDC depth-wise
convs as ul3d's Triton kernels (``ul3d.networks.depthwise``); ``pwmm`` MKIR 1×1 convs as matrix products;
``outer`` one-channel 1×1 convs as broadcast multiplies;
``inplace`` in-place activations and sums (inference); ``bf16`` bf16 autocast on the CPU too (sliding window);
``graph`` the sliding window's forward replayed as CUDA graphs (``ul3d.networks.fast.CUDAGraphInference``; inference
only, no training row); ``ckpt`` activation checkpointing of every stage (``use_checkpoint=True``; training);
``merge`` inference: shuffles folded into the project convs, the stem's project + shortcut as one product, GAGs'
grouped convs as depth-wise convs (``accelerate(merge_pointwise=True)``); ``stepgraph`` the whole training step
(forward, loss, backward, capturable AdamW) captured once and replayed as one CUDA graph, as ``ul3d train`` with
``train.cuda_graph`` does (training; the sliding window is the lever without it); ``half`` inference: the network's
parameters in bfloat16 and the windows cast to it, no autocast (CUDA); ``gate`` inference: the decoder's GAG skip
merges as ``ul3d.networks.depthwise.gated_skip_sum``'s kernels (``GATE_KERNEL``, the default; with ``triton``), ``nogate``
without them; ``nocmfa`` inference: the CMFA
blocks as their modules, not ``channel_spatial_attention``'s kernels (``CMFA_KERNELS``); ``noup2x`` training: the
decoder's 2× upsampling + ReLU as PyTorch's ops, not ``upsample2x_relu_trainable``'s kernels; ``nosatriton``
training: the spatial attention's 7³ conv as PyTorch's depth-wise conv, not ul3d's Triton kernels
(``SPATIAL_TRITON_TRAINING``); ``bnk`` / ``nobnk`` training outside ``torch.compile``: BatchNorm (+ ReLU6) as
``batchnorm_clamp``'s kernels / as PyTorch's (``BATCHNORM_KERNELS``, on by default since 2026-12-04); ``membudget`` torch.compile's activation memory budget (0.5; the partitioner recomputes cheap activations). The
network ``null`` (a 1×1 conv, 1 → 3 channels) gives the sliding-window inferer's own cost. On CUDA each
lever gets a training step (bf16, batch 2, 96³), its peak memory and a sliding window (256×256×128, overlap 0.5,
bf16); on CPU a sliding window (192×192×96, overlap 0.25). Compiled levers pad the last sliding-window batch to the
full sw batch (no recompilation for a new shape). ``min_gb`` is the activation traffic a training step cannot avoid:
every leaf module's output of the plain network written once in forward and read once in backward, in bf16;
``bw_frac`` is ``min_gb`` / step time over the GPU's memory bandwidth.

Settings (issue 7): 1 input channel, 3 classes; training batch 2 at 96³ with AdamW + DiceCELoss; inference
batches of 4 patches; sliding window over 256×256×128 at overlap 0.5 (sw batch 4) on the GPU. Prints a markdown
table and writes JSON (device name, date, versions) to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import platform
import time
from pathlib import Path

import torch

from ul3d.networks import build_network
from ul3d.networks.fast import accelerate, fold_batchnorm
from ul3d.profiling import profile_model

GPU_NETWORKS = ["ultralightunet:T", "ultralightunet:S", "ultralightunet:base", "ultralightunet:M", "ultralightunet:L",
                "aulunet", "unet", "segresnet", "swinunetr", "unetr", "dynunet"]
CPU_NETWORKS = ["ultralightunet:T", "ultralightunet:S", "ultralightunet:base", "unet"]
LEVER_NETWORKS = ["ultralightunet:base", "ultralightunet:T", "unet"]
GPU_LEVERS = ["plain", "cl", "fused", "fused+cl", "fused+recompute", "compile", "fused+compile", "fused+compile+cl",
              "fused+cudagraphs"]
GPU_LEVERS_OPTIONAL = ["pad1", "maxautotune", "fused+maxautotune"]
CPU_LEVERS = ["plain", "fused", "pad1", "cl", "fused+cl", "foldbn", "fused+foldbn", "threads1", "fused+threads1",
              "compile", "fused+compile", "ort", "fused+ort"]
UNET_LEVERS = ["plain", "cl", "compile", "cudnnbench", "compile+cudnnbench", "cudagraphs", "bf16", "cl+bf16", "cl+foldbn",
               "cl+foldbn+bf16", "graph", "foldbn+graph", "membudget+compile", "membudget+cudagraphs",
               "stepgraph", "compile+stepgraph", "foldbn+graph+half"]  # levers that apply to MONAI's UNet (no MKDC)
TOKENS = {"plain", "cl", "fused", "pad1", "recompute", "foldbn", "compile", "maxautotune", "cudagraphs", "ort", "threads1",
          "cudnnbench", "fp32dw", "triton", "pwmm", "outer", "inplace", "bf16", "graph", "ckpt", "membudget", "merge",
          "stepgraph", "half", "gate", "nogate", "nocmfa", "noup2x", "nosatriton", "nobnk", "bnk"}
INFERENCE_ONLY = {"ort", "graph", "half", "gate", "nogate", "nocmfa"}  # levers with no training row
MEMORY_BUDGET = 0.5  # ``membudget``: torch._functorch.config.activation_memory_budget
BANDWIDTH = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12), ("H800", 3.35e12),
             ("A100-SXM4-80GB", 2.04e12), ("A100 80GB PCIe", 1.94e12), ("A100", 1.56e12), ("L40S", 0.864e12),
             ("A10", 0.6e12), ("L4", 0.3e12)]  # bytes/s, matched in this order against the device name
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


def make_step(net: torch.nn.Module, device: torch.device, dtype: torch.dtype | None, forward=None, prepare=None,
              before=None, graphed: bool = False):
    """One AdamW + DiceCELoss training step at batch 2, 96³, 3 classes (autocast to ``dtype`` when given).

    ``forward``: the callable run on the batch (default ``net``, e.g. a compiled ``net``); ``prepare``: applied to the
    input once (e.g. a memory format); ``before``: called at the start of every step (e.g. a CUDA-graph step mark)."""
    from monai.losses import DiceCELoss

    forward = net if forward is None else forward  # not `or`: a compiled module has no truth value
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, capturable=graphed)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    x = torch.randn(2, 1, *ROI, device=device)
    x = prepare(x) if prepare else x
    y = torch.randint(0, 3, (2, 1, *ROI), device=device).float()

    def step():
        if before is not None:
            before()
        opt.zero_grad(set_to_none=True)
        # graphed: the warm-up steps under the capture's autocast settings (a compiled forward guards on them: a
        # difference would recompile it inside the capture, which fails)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None,
                            cache_enabled=not graphed):
            loss = loss_fn(forward(x), y)
        loss.backward()
        opt.step()

    if not graphed:
        return step
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False), \
            torch.cuda.graph(graph):
        loss = loss_fn(forward(x), y)
        loss.backward()
        opt.step()

    def replay():
        graph.replay()

    # the graph reads these tensors (batch, labels, optimizer state, its own outputs): keep them alive with it
    replay.keep = (x, y, opt, loss, graph)
    return replay


def train_step(spec: str, device: torch.device, dtype: torch.dtype | None, iters: int) -> tuple[float, float]:
    """(seconds per step, peak GiB) for one AdamW + DiceCELoss step at batch 2."""
    step = make_step(_net(spec, device).train(), device, dtype)
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


# --- issue 7: speed levers ------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _tokens(lever: str) -> set[str]:
    toks = set(lever.split("+"))
    bad = toks - TOKENS
    if bad:
        raise SystemExit(f"unknown lever token(s) {sorted(bad)} in {lever!r}; known: {sorted(TOKENS)}")
    return toks - {"plain"}


def _lever_net(spec: str, device: torch.device, toks: set[str], inference: bool) -> torch.nn.Module:
    if spec == "null":  # the inferer's own cost: the cheapest network with the right channels
        return torch.nn.Conv3d(1, 3, 1).to(device).train(not inference)
    name, _, variant = spec.partition(":")
    kwargs = {"use_checkpoint": True} if "ckpt" in toks else {}
    net = build_network(name, variant or None, spatial_dims=3, in_channels=1, out_channels=3, roi_size=ROI, **kwargs)
    net = accelerate(net.train(not inference), fused_mkdc=bool(toks & {"fused", "pad1", "recompute"}),
                     unit_scale="pad1" not in toks, recompute="recompute" in toks,
                     fold_bn=inference and "foldbn" in toks, channels_last="cl" in toks, mkdc_float32="fp32dw" in toks,
                     triton="triton" in toks, pointwise_matmul="pwmm" in toks,
                     outer_product="outer" in toks, inplace=inference and "inplace" in toks,
                     merge_pointwise=inference and "merge" in toks)
    return net.to(device).train(not inference)


def _compile_mode(toks: set[str]) -> str | None:
    if "cudagraphs" in toks:
        return "reduce-overhead"
    if "maxautotune" in toks:
        return "max-autotune-no-cudagraphs"
    return "default" if "compile" in toks else None


def _fmt(x: torch.Tensor, toks: set[str]) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last_3d) if "cl" in toks else x


def lever_train(spec: str, device: torch.device, toks: set[str], iters: int) -> dict:
    """Training step (bf16 autocast on CUDA, fp32 on CPU), batch 2, AdamW + DiceCELoss."""
    with _kernel_switches(toks):
        return _lever_train(spec, device, toks, iters)


def _lever_train(spec: str, device: torch.device, toks: set[str], iters: int) -> dict:
    net = _lever_net(spec, device, toks, inference=False)
    mode = _compile_mode(toks)
    cuda = device.type == "cuda"
    graphed = cuda and "stepgraph" in toks
    if graphed:  # a replay allocates nothing: the peak is that of the warm-up steps and the capture
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = make_step(net, device, torch.bfloat16 if cuda else None,
                     forward=torch.compile(net, mode=mode) if mode else net, prepare=lambda x: _fmt(x, toks),
                     before=torch.compiler.cudagraph_mark_step_begin if mode == "reduce-overhead" else None,
                     graphed=graphed)

    t0 = time.perf_counter()
    if "membudget" in toks:  # read when the backward graph is partitioned, i.e. in the first step
        import torch._functorch.config as functorch_config

        with functorch_config.patch(activation_memory_budget=MEMORY_BUDGET):
            step()
    else:
        step()  # first step: compilation / cuDNN autotuning
    if cuda:
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    if cuda and not graphed:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    sec = _timed(step, device, 2, iters)
    out = {"train_ms": sec * 1e3, "warmup_s": first}
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


class _OrtPredictor:
    """Sliding-window predictor running an ONNX export of the network in ONNX Runtime."""

    def __init__(self, net: torch.nn.Module, threads: int) -> None:
        import tempfile

        import onnxruntime as ort

        from ul3d.networks.export import export_onnx

        path = Path(tempfile.mkdtemp()) / "net.onnx"
        export_onnx(net.cpu().eval(), torch.randn(1, 1, *ROI), path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"image": x.float().contiguous().numpy()})[0])


def _padded(net, batch: int):
    """Call ``net`` on full batches only (a compiled graph is not recompiled for the last, smaller batch)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n < batch:
            x = torch.cat([x, x.new_zeros(batch - n, *x.shape[1:])])
        return net(x)[:n]

    return run


@contextlib.contextmanager
def _kernel_switches(toks: set[str]):
    """``ul3d.networks.depthwise.GATE_KERNEL`` on for the ``gate`` lever (the default), off for ``nogate``;
    ``CMFA_KERNELS`` off for ``nocmfa``; training: ``ul3d.networks.nets._lean.UPSAMPLE2X_TRAINING`` off for ``noup2x``,
    ``ul3d.networks.blocks.attention.SPATIAL_TRITON_TRAINING`` off for ``nosatriton``, ``BATCHNORM_KERNELS`` on for
    ``bnk``, off for ``nobnk``; all restored afterwards."""
    from ul3d.networks import depthwise as dwmod

    from ul3d.networks.blocks import attention
    from ul3d.networks.nets import _lean

    saved = (dwmod.GATE_KERNEL, dwmod.CMFA_KERNELS, _lean.UPSAMPLE2X_TRAINING, attention.SPATIAL_TRITON_TRAINING,
             dwmod.BATCHNORM_KERNELS)
    dwmod.GATE_KERNEL = "gate" in toks or (saved[0] and "nogate" not in toks)
    dwmod.CMFA_KERNELS = saved[1] and "nocmfa" not in toks
    _lean.UPSAMPLE2X_TRAINING = saved[2] and "noup2x" not in toks
    attention.SPATIAL_TRITON_TRAINING = saved[3] and "nosatriton" not in toks
    dwmod.BATCHNORM_KERNELS = (saved[4] or "bnk" in toks) and "nobnk" not in toks
    try:
        yield
    finally:
        (dwmod.GATE_KERNEL, dwmod.CMFA_KERNELS, _lean.UPSAMPLE2X_TRAINING, attention.SPATIAL_TRITON_TRAINING,
         dwmod.BATCHNORM_KERNELS) = saved


@torch.no_grad()
def lever_sliding_window(spec: str, device: torch.device, toks: set[str], shape, overlap: float, iters: int,
                         sw_batch: int = 4) -> dict:
    with _kernel_switches(toks):
        return _lever_sliding_window(spec, device, toks, shape, overlap, iters, sw_batch)


def _lever_sliding_window(spec: str, device: torch.device, toks: set[str], shape, overlap: float, iters: int,
                          sw_batch: int) -> dict:
    from monai.inferers import sliding_window_inference

    net = _lever_net(spec, device, toks, inference=True)
    mode = _compile_mode(toks)
    if "ort" in toks:
        predictor = _OrtPredictor(net, torch.get_num_threads())
    elif mode:
        predictor = _padded(torch.compile(net, mode=mode), sw_batch)
        if "graph" in toks:  # the compiled forward (inductor's fused kernels) replayed as CUDA graphs
            from ul3d.networks.fast import CUDAGraphInference

            predictor = CUDAGraphInference(predictor)
    elif "graph" in toks:
        from ul3d.networks.fast import CUDAGraphInference

        predictor = CUDAGraphInference(net)
    else:
        predictor = net
    if "half" in toks:  # parameters in bf16 (no autocast casts), windows cast to bf16
        net.to(torch.bfloat16)
        predictor = (lambda inner: lambda x: inner(x.to(torch.bfloat16)))(predictor)
    vol = _fmt(torch.randn(1, 1, *shape, device=device), toks)
    autocast = (device.type == "cuda" or "bf16" in toks) and "half" not in toks

    def run():  # bf16 autocast: always on CUDA (but with ``half``), on the CPU with the ``bf16`` token
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            sliding_window_inference(vol, ROI, sw_batch, predictor, overlap=overlap, mode="gaussian")

    t0 = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    return {"sw_s": _timed(run, device, 0, iters), "sw_first_s": first}


@torch.no_grad()
def activation_bytes(spec: str) -> float:
    """Bytes (bf16) of every leaf module's output in one plain forward at batch 2, 96³.

    Measured at batch 1, 32³ on the CPU and scaled by 2·27: every feature map of these networks scales exactly
    (96 and 32 halve cleanly five times)."""
    net = _lever_net(spec, torch.device("cpu"), set(), inference=True)  # eval: batch 1 with BatchNorm
    total = [0]

    def hook(_m, _i, out):
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor):
                total[0] += t.numel()

    handles = [m.register_forward_hook(hook) for m in net.modules() if not list(m.children())]
    net(torch.randn(1, 1, 32, 32, 32))
    for h in handles:
        h.remove()
    return total[0] * 2 * 2 * 27.0


def _bandwidth(name: str) -> float | None:
    return next((bw for key, bw in BANDWIDTH if key in name), None)


def run_levers(args, device: torch.device, name: str) -> None:
    cuda = device.type == "cuda"
    levers = args.levers or (GPU_LEVERS if cuda else CPU_LEVERS)
    if args.levers == ["all"]:
        levers = GPU_LEVERS + GPU_LEVERS_OPTIONAL if cuda else CPU_LEVERS
    for lever in levers:
        _tokens(lever)
    specs = args.networks or LEVER_NETWORKS
    iters = args.iters if args.iters_given else (5 if args.quick else 10 if cuda else 1)
    sw_iters = args.sw_iters or (1 if (args.quick or not cuda) else 2)
    shape, overlap = ((256, 256, 128), 0.5) if cuda else ((192, 192, 96), 0.25)
    bw = _bandwidth(name) if cuda else None
    start = time.perf_counter()
    threads = torch.get_num_threads()
    _log(f"device {name}; levers {levers}; networks {specs}; budget {args.budget_s:.0f}s")
    rows = []
    for spec in specs:
        act = activation_bytes(spec) if cuda and spec != "null" else None
        for lever in levers:
            toks = _tokens(lever)
            if spec == "unet" and lever not in UNET_LEVERS:
                continue
            if spec == "null" and lever not in ("plain", "graph"):
                continue
            if "ort" in toks and cuda:
                continue
            compiled = _compile_mode(toks) is not None
            elapsed = time.perf_counter() - start
            if compiled and elapsed > args.budget_s:
                _log(f"skip {spec} {lever}: {elapsed:.0f}s elapsed > budget {args.budget_s:.0f}s")
                continue
            row = {"network": spec, "lever": lever}
            _log(f"{spec} {lever} ...")
            try:
                if "threads1" in toks:
                    torch.set_num_threads(1)
                torch.backends.cudnn.benchmark = "cudnnbench" in toks  # cuDNN autotuning of every conv shape
                if cuda and not toks & INFERENCE_ONLY and spec != "null":
                    row.update(lever_train(spec, device, toks, iters))
                    if act is not None:
                        row["min_gb"] = act * 2 / 1e9  # written in forward + read in backward
                        if bw:
                            row["bw_frac"] = row["min_gb"] * 1e9 / (row["train_ms"] / 1e3) / bw
                if not (args.quick and cuda and compiled and "cudagraphs" in toks) and "stepgraph" not in toks:
                    row.update(lever_sliding_window(spec, device, toks, shape, overlap, sw_iters, args.sw_batch))
            except Exception as e:  # noqa: BLE001 - a lever that fails is reported, the run goes on
                row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
            finally:
                torch.backends.cudnn.benchmark = False
                torch.set_num_threads(threads)
                if compiled:
                    torch._dynamo.reset()
                if cuda:
                    torch.cuda.empty_cache()
            rows.append(row)
            _log(json.dumps(row))
    ref = next((r for r in rows if r["network"] == "unet" and r["lever"] == "plain"), None)
    keys = [k for k in ("train_ms", "peak_gib", "sw_s", "min_gb", "bw_frac", "warmup_s", "sw_first_s")
            if any(k in r for r in rows)]
    ratio_keys = {"train_ms", "peak_gib", "sw_s"}
    lines = [f"Device: {name}; torch {torch.__version__}; {args.date}; levers (issue 7); ratios to MONAI UNet plain", "",
             "| network | lever | " + " | ".join(keys) + " |", "|---|---|" + "---:|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            if k not in r:
                cells.append("—")
                continue
            ratio = f" ({r[k] / ref[k]:.2f}×)" if k in ratio_keys and ref and ref.get(k) else ""
            cells.append(f"{r[k]:.3g}{ratio}")
        err = f" ({r['error']})" if "error" in r else ""
        lines.append(f"| {r['network']} | {r['lever']}{err} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table, flush=True)
    import monai

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cuda_" + name.split()[1].lower() if cuda and len(name.split()) > 1 else "cpu_2core" if not cuda else "cuda"
    if not cuda and threads != 2:
        tag = f"cpu_{threads}thread"
    tag += "_keepmem" if args.keep_freed_memory else ""
    tag += f"_swbatch{args.sw_batch}" if args.sw_batch != 4 else ""
    path = out / f"levers_{tag}_{args.date}{'_quick' if args.quick else ''}.json"
    path.write_text(json.dumps({"device": name, "date": args.date, "torch": torch.__version__, "monai": monai.__version__,
                                "settings": {"roi": ROI, "train_batch": 2, "classes": 3, "sw_shape": shape,
                                             "overlap": overlap, "sw_batch": args.sw_batch, "iters": iters,
                                             "sw_iters": sw_iters,
                                             "keep_freed_memory": args.keep_freed_memory,
                                             "bandwidth_Bps": bw},
                                "rows": rows, "table": table, "seconds": time.perf_counter() - start}, indent=1))
    _log(f"wrote {path} after {time.perf_counter() - start:.0f}s")


def _ops_by_device_time(prof, n: int) -> list[dict]:
    """The ``n`` operators (grouped by input shapes) whose own kernels took the most device time in ``prof``."""
    ops = [e for e in prof.key_averages(group_by_input_shape=True)
           if e.device_type.name == "CPU" and getattr(e, "self_device_time_total", 0) > 0]
    ops.sort(key=lambda e: -e.self_device_time_total)
    return [{"op": e.key, "shapes": str(e.input_shapes)[:160], "ms": e.self_device_time_total / 1e3, "calls": e.count}
            for e in ops[:n]]


def run_profile(args, device: torch.device, name: str) -> None:
    """Where one training step's time goes: CUDA kernel time by kernel name (top 15) per network and lever."""
    from torch.profiler import ProfilerActivity, profile

    levers = args.profile or ["plain"]
    report = []
    for spec in args.networks or ["ultralightunet:base", "unet"]:
        for lever in levers:
            toks = _tokens(lever)
            torch.backends.cudnn.benchmark = "cudnnbench" in toks
            infer = args.profile_infer
            with _kernel_switches(toks):
                net = _lever_net(spec, device, toks, inference=infer)
                mode = _compile_mode(toks)
                if infer:  # one eval forward of a sliding-window batch (4 patches, bf16)
                    x4 = torch.randn(4, 1, *ROI, device=device)
                    forward = torch.compile(net, mode=mode) if mode else net

                    @torch.no_grad()
                    def step():
                        with torch.autocast("cuda", dtype=torch.bfloat16):
                            forward(x4)
                else:
                    step = make_step(net, device, torch.bfloat16, forward=torch.compile(net, mode=mode) if mode else net,
                                     before=torch.compiler.cudagraph_mark_step_begin if mode == "reduce-overhead" else None)

                for _ in range(3):
                    step()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
                    step()
                    torch.cuda.synchronize()
                ops = _ops_by_device_time(prof, 25)
                events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
                total = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3
                top = sorted(events, key=lambda e: -getattr(e, "self_device_time_total", 0))[:15]
                rows = [{"kernel": e.key[:120], "ms": getattr(e, "self_device_time_total", 0) / 1e3, "calls": e.count} for e in top]
                torch.cuda.synchronize()
                wall = _timed(step, device, 1, 10) * 1e3
                _log(f"{spec} {lever}: {total:.1f} ms of CUDA kernels in one {'forward' if infer else 'step'}, "
                     f"{wall:.1f} ms wall")
                for r in rows:
                    print(f"  {r['ms']:8.2f} ms  {r['calls']:5d}x  {r['kernel']}", flush=True)
                print("  by the op that launched the kernels, with its input shapes:")
                for r in ops:
                    print(f"  {r['ms']:8.2f} ms  {r['calls']:5d}x  {r['op']}  {r['shapes']}", flush=True)
                sequence = [{"kernel": e.name[:60], "us": round(e.time_range.end - e.time_range.start, 1)}  # every kernel, in launch order
                            for e in sorted((e for e in prof.events() if e.device_type.name == "CUDA"),
                                            key=lambda e: e.time_range.start)]
                report.append({"network": spec, "lever": lever, "what": "forward, batch 4" if infer else "training step",
                               "cuda_ms": total, "wall_ms": wall, "launches": sum(e.count for e in events), "top": rows,
                               "ops": ops, "sequence": sequence})
                torch.backends.cudnn.benchmark = False
            del net, step
            torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = name.split()[1].lower() if len(name.split()) > 1 else "cuda"
    path = out / f"profile_{'infer_' if args.profile_infer else ''}cuda_{tag}_{args.date}.json"
    path.write_text(json.dumps({"device": name, "date": args.date, "torch": torch.__version__, "profiles": report}, indent=1))
    _log(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--networks", nargs="+", default=None)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--fold-bn", action="store_true", help="inference measurements with BatchNorm folded into convs")
    ap.add_argument("--levers", nargs="*", default=None, metavar="LEVER",
                    help="issue 7: measure speed levers (no names: the device's default set; 'all': with optional ones)")
    ap.add_argument("--quick", action="store_true", help="fewer iterations (levers)")
    ap.add_argument("--sw-iters", type=int, default=None,
                    help="levers: timed sliding windows per row, the median is reported (default 1 on CPU, 2 on CUDA)")
    ap.add_argument("--sw-batch", type=int, default=4,
                    help="sliding-window batch (levers; default 4, as MONAI's and ul3d's configs)")
    ap.add_argument("--budget-s", type=float, default=240.0,
                    help="levers: skip compiled levers once this many seconds have passed (default 240)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: 2 on CPU)")
    ap.add_argument("--profile-infer", action="store_true",
                    help="with --profile: profile one eval forward of 4 patches (bf16) instead of a training step")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="glibc malloc keeps freed blocks for reuse (ul3d.utils.keep_freed_memory), for every network "
                    "of the run; ul3d predict does this on the CPU")
    ap.add_argument("--date", default=str(dt.date.today()), help="date in the result file name")
    ap.add_argument("--profile", nargs="*", default=None, metavar="LEVER",
                    help="CUDA: print the kernels that take the time in one training step of each --networks entry "
                    "for each lever (default plain), from torch.profiler, and write them to JSON")
    args = ap.parse_args()
    args.iters_given = any(a.startswith("--iters") for a in __import__("sys").argv[1:])
    global FOLD_BN
    FOLD_BN = args.fold_bn
    if args.keep_freed_memory:
        from ul3d.utils import keep_freed_memory

        if not keep_freed_memory():
            raise SystemExit("--keep-freed-memory needs Linux with glibc")
    device = torch.device(args.device)
    specs = args.networks or (GPU_NETWORKS if device.type == "cuda" else CPU_NETWORKS)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or min(2, torch.get_num_threads()))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    if args.profile is not None:
        return run_profile(args, device, name)
    if args.levers is not None:
        return run_levers(args, device, name)
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
