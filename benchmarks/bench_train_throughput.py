"""End-to-end training throughput of a real ``ul3d train`` run (data loading, augmentation, AMP step, sliding-window
validation and checkpoints), on a synthetic dataset of MSD-prostate-sized volumes (issue 7, item 4).

    python benchmarks/bench_train_throughput.py --iterations 1000 --val-interval 500 \
        --runs train.compile=false train.compile=true,train.cuda_graph=true,train.kernels=true

The paper's schedule is 40,000 iterations (batch 2 = 1 volume x 2 patches, 96³), validating every 500. The steady
rate is taken between the first and the last validation (so start-up, caching and compilation are left out, one
validation per interval is in), and the 40,000-iteration time is extrapolated from it. ``train_ms``/``val_s`` split
the steady intervals into training iterations and validation runs (ul3d train's history); ``data_wait_ms`` is the part
of ``train_ms`` the trainer spent waiting for its next batch (a data-bound run). Prints a markdown table and
writes JSON with the device name and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=1000)
    p.add_argument("--val-interval", type=int, default=500)
    p.add_argument("--cases", type=int, default=32)
    p.add_argument("--shape", type=int, nargs=3, default=[320, 320, 20])
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--variant", default="base")
    p.add_argument("--runs", nargs="+", default=["train.compile=false"], metavar="KEY=VALUE[,KEY=VALUE...]",
                   help="one run per argument, with these config overrides (comma-separated)")
    p.add_argument("--cache-device", default="cpu", choices=("cpu", "cuda"), help="data.cache_device of the runs")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides for every run")
    p.add_argument("--loader-only", type=int, default=0, metavar="N",
                   help="instead of training, time N batches of ul3d train's loader for each run (data pipeline alone)")
    p.add_argument("--switch-interval", type=float, default=None, metavar="S",
                   help="Python's thread switch interval (sys.setswitchinterval; default 0.005 s) during the runs")
    p.add_argument("--warm-processes", default=None, metavar="PHASES[;PHASES]",
                   help="the kernel warm-up's processes (ul3d.engine.warm.PROCESSES), e.g. 'train;infer' (two, the "
                   "default) or 'train,infer' (one)")
    p.add_argument("--data", default=None, help="dataset folder: reused when it exists, else the synthetic set is "
                   "written there (default: a new temporary folder)")
    p.add_argument("--out", default=None)
    a = p.parse_args()

    from ul3d.config import load_config
    from ul3d.data.synth import write_synthetic
    from ul3d.engine.train import train

    if a.warm_processes:
        from ul3d.engine import warm

        warm.PROCESSES = tuple(tuple(g.split(",")) for g in a.warm_processes.split(";"))
    if a.switch_interval is not None:
        import sys

        sys.setswitchinterval(a.switch_interval)

    written = sorted(Path(a.data).glob("*/dataset.json")) if a.data else []
    if written:  # written by an earlier run
        data = written[0].parent
    else:
        data = write_synthetic("msd-prostate", Path(a.data or tempfile.mkdtemp(prefix="tp_")), n_cases=a.cases,
                               shape=tuple(a.shape))
    rows = []
    for run in a.runs:
        cfg = load_config("prostate", [f"network.variant={a.variant}", f"train.iterations={a.iterations}",
                                       f"train.val_interval={a.val_interval}", f"data.num_workers={a.workers}",
                                       f"data.cache_device={a.cache_device}", *a.set, *run.split(",")])
        if a.loader_only:
            rows.append(loader_rate(cfg, data, run, a.loader_only))
            print(json.dumps(rows[-1]), flush=True)
            continue
        t0 = time.perf_counter()
        result = train(cfg, data, Path(tempfile.mkdtemp(prefix="run_")), quiet=True)
        total = time.perf_counter() - t0
        h = result.history
        steady = (h[-1]["seconds"] - h[0]["seconds"]) / (h[-1]["iteration"] - h[0]["iteration"]) if len(h) > 1 else None
        later = h[1:]
        train_ms = 1e3 * sum(r["train_seconds"] for r in later) / (a.val_interval * len(later)) if later else None
        val_s = sum(r.get("val_seconds", 0.0) for r in later) / len(later) if later else None
        wait_ms = 1e3 * sum(r.get("data_wait_seconds", 0.0) for r in later) / (a.val_interval * len(later)) if later else None
        row = {"run": run, "train_ms": train_ms, "data_wait_ms": wait_ms, "val_s": val_s, "cache_device": a.cache_device, "iterations": a.iterations, "total_s": total, "first_validation_s": h[0]["seconds"],
               "steady_s_per_iteration": steady, "iterations_per_s": 1 / steady if steady else None,
               "projected_40k_minutes": 40000 * steady / 60 if steady else None, "history": h}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "history"}), flush=True)
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    if a.loader_only:
        print(f"\n{name}, ul3d train's loader alone, {a.cases} volumes {a.shape}\n\n| run | batches/s | ms/batch |\n|---|---:|---:|")
        for r in rows:
            print(f"| {r['run']} | {r['batches_per_s']:.1f} | {1e3 / r['batches_per_s']:.1f} |")
        _write(a, name, rows)
        return
    print(f"\n{name}, {a.cases} volumes {a.shape}, UltraLightUNet3D {a.variant}, batch 2 x 96³, validation every "
          f"{a.val_interval}\n\n| run | steady it/s | s/iteration | training ms/it | of which waiting for data | s per validation | "
          "projected 40k iterations (min) |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["steady_s_per_iteration"] is None:
            print(f"| {r['run']} | (one interval: no steady rate) | | | | | |")
            continue
        print(f"| {r['run']} | {r['iterations_per_s']:.2f} | {r['steady_s_per_iteration']:.4f} | {r['train_ms']:.1f} | "
              f"{r['data_wait_ms']:.1f} | {r['val_s']:.2f} | {r['projected_40k_minutes']:.1f} |")
    _write(a, name, rows)


def _write(a, name: str, rows: list[dict]) -> None:
    if a.out:
        Path(a.out).write_text(json.dumps({"date": dt.date.today().isoformat(), "device": name,
                                           "torch": torch.__version__, "settings": vars(a), "rows": rows}, indent=1))


def loader_rate(cfg: dict, data: Path, run: str, n: int) -> dict:
    """Batches per second of ``ul3d train``'s training loader alone (same cache, sampling, augmentation, workers),
    each batch moved to the training device as the trainer does; the first 10 batches (worker start-up) not timed."""
    from ul3d.config import get
    from ul3d.data.datasets import load_dataset
    from ul3d.engine.train import build_train_loader, split_cases

    spec = load_dataset(data)
    items, _ = split_cases(spec, cfg)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    loader = build_train_loader(cfg, items, len(spec.class_names), spec.label_map, dev, 0, n + 10)
    t0 = None
    for i, batch in enumerate(loader):
        if i == 10:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        batch["image"].to(dev, non_blocking=True), batch["label"].to(dev, non_blocking=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    rate = n / (time.perf_counter() - t0)
    return {"run": run, "batches": n, "batches_per_s": rate, "workers": get(cfg, "data.num_workers"),
            "cache_device": get(cfg, "data.cache_device")}


if __name__ == "__main__":
    main()
