"""Helpers shared by the kernel benchmarks (run as scripts: ``python benchmarks/bench_*.py``)."""

import json
from pathlib import Path

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


def write_results(path: Path, device: str, date: str, rows: list) -> None:
    """``{device, date, torch, rows}`` as JSON at ``path``, written to a temporary file first, then renamed."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(device=device, date=date, torch=torch.__version__, rows=rows), indent=1))
    tmp.replace(path)


def save_results(out_dir: str, kind: str, date: str, rows: list) -> Path:
    """:func:`write_results` to ``out_dir/{kind}_cuda_{device's last word}_{date}.json`` (the folder made as needed);
    prints and returns the path."""
    name = torch.cuda.get_device_name()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{kind}_cuda_{name.split()[-1].lower()}_{date}.json"
    write_results(path, name, date, rows)
    print(f"wrote {path}")
    return path
