"""ul3d's Triton kernels compiled ahead, in background processes, while a training run starts (issue 7: cold start).

On a machine with empty compile caches a ``ul3d train`` run with ul3d's kernels spent 286 s before its first
validation (H200, ``benchmarks/results/train_throughput_batchaug_cuda_h200_2026-12-04.json``): torch.compile's graphs,
then at first use every Triton kernel variant of the training step, then at the first validation those of the
inference path (78 s), one after another. Triton keeps what it compiles in its on-disk cache (written atomically, shared
by processes), so other processes that run the same network once compile those variants while the training process
is still caching data and compiling its graphs; the training process then loads them from the cache. Two processes
run side by side: one training step (forward and backward), and the validation's inference forward.

:func:`start_kernel_warmup` starts them (``spawn``, daemonic); a failed warm-up is harmless (the training process then
compiles what it needs itself); they are stopped when training ends.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from collections.abc import Sequence

import torch

__all__ = ["start_kernel_warmup", "stop_kernel_warmup", "warm_kernels", "MIN_FREE_BYTES", "PHASES", "PROCESSES"]

#: the warm-up runs only when the GPU has at least this much memory free (its processes hold a base training step
#: and an inference batch of their own)
MIN_FREE_BYTES = 8 << 30
#: what the warm-up can run
PHASES = ("train", "infer")
#: the phases each background process runs (``benchmarks/bench_train_throughput.py --warm-processes`` compares)
PROCESSES: tuple[tuple[str, ...], ...] = (("train",), ("infer",))


def warm_kernels(net_spec: dict, device: str, roi: Sequence[int], batch: int, sw_batch: int, amp: bool,
                 phases: Sequence[str] = PHASES) -> None:
    """Run ``net_spec``'s network with ``ul3d train``'s kernel settings once, for each of ``phases``: ``"train"``, a
    training step (forward and backward, bf16 autocast when ``amp``) on ``batch`` patches of ``roi``; ``"infer"``, the
    BatchNorm-folded validation copy on ``sw_batch`` windows and on one (a sliding window's last, partial batch)."""
    from ..networks.fast import InferenceCopy, accelerate
    from .train import network_from_spec

    unknown = set(phases) - set(PHASES)
    if unknown:
        raise ValueError(f"warm-up phases must be among {PHASES}, got {sorted(unknown)}")
    dev = torch.device(device)
    net = network_from_spec(net_spec).to(dev)
    accelerate(net, fused_mkdc=False, triton=True, pointwise_matmul=True)
    shape = (int(net_spec["in_channels"]), *[int(s) for s in roi])
    if "train" in phases:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            net.train()
            net(torch.randn(batch, *shape, device=dev)).float().mean().backward()
    if "infer" in phases:
        copy = InferenceCopy(net, graphs=False, fused_mkdc=False, triton=True)
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            for n in dict.fromkeys((sw_batch, 1)):
                copy(torch.randn(n, *shape, device=dev))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _main(*args) -> None:
    t0 = time.perf_counter()
    try:
        warm_kernels(*args)
    except BaseException:  # noqa: BLE001 - a failed warm-up only means the training process compiles for itself
        raise SystemExit(1) from None
    print(f"[ul3d train] kernel warm-up ({'/'.join(args[-1])}) compiled in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr, flush=True)


def start_kernel_warmup(net_spec: dict, device: torch.device, roi: Sequence[int], batch: int, sw_batch: int,
                        amp: bool) -> list[multiprocessing.process.BaseProcess]:
    """Start :func:`warm_kernels` in the background, one process for each group of phases in :data:`PROCESSES`; none
    (an empty list) off CUDA or when the GPU has less than :data:`MIN_FREE_BYTES` free."""
    if device.type != "cuda":
        return []
    free, _ = torch.cuda.mem_get_info(device)
    if free < MIN_FREE_BYTES:
        return []
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for phases in PROCESSES:
        proc = ctx.Process(target=_main, name=f"ul3d-kernel-warmup-{'-'.join(phases)}", daemon=True,
                           args=(net_spec, str(device), list(roi), int(batch), int(sw_batch), bool(amp), tuple(phases)))
        proc.start()
        procs.append(proc)
    return procs


def stop_kernel_warmup(procs: Sequence[multiprocessing.process.BaseProcess]) -> None:
    """Stop the warm-up processes still running (a training run shorter than its warm-up)."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=10)
