"""Timing helper shared by the kernel benchmarks (run as scripts: ``python benchmarks/bench_*.py``)."""

import torch


def graph_ms(fn, iters: int = 50, warmup: int = 3) -> float:
    """Milliseconds per replay of ``fn`` captured as a CUDA graph (after ``warmup`` eager calls)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters
