"""End-to-end training throughput of a real ``ul3d train`` run (data loading, augmentation, AMP step, sliding-window
validation and checkpoints), on a synthetic dataset of MSD-prostate-sized volumes (issue 7, item 4).

    python benchmarks/bench_train_throughput.py --iterations 1000 --val-interval 500 --compile false true

The paper's schedule is 40,000 iterations (batch 2 = 1 volume x 2 patches, 96³), validating every 500. The steady
rate is taken between the first and the last validation (so start-up, caching and compilation are left out, one
validation per interval is in), and the 40,000-iteration time is extrapolated from it. Prints a markdown table and
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
    p.add_argument("--compile", nargs="+", default=["false"], choices=("true", "false"))
    p.add_argument("--cache-device", default="cpu", choices=("cpu", "cuda"), help="data.cache_device of the runs")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides for every run")
    p.add_argument("--out", default=None)
    a = p.parse_args()

    from ul3d.config import load_config
    from ul3d.data.synth import write_synthetic
    from ul3d.engine.train import train

    data = write_synthetic("msd-prostate", Path(tempfile.mkdtemp(prefix="tp_")), n_cases=a.cases, shape=tuple(a.shape))
    rows = []
    for comp in a.compile:
        cfg = load_config("prostate", [f"network.variant={a.variant}", f"train.iterations={a.iterations}",
                                       f"train.val_interval={a.val_interval}", f"data.num_workers={a.workers}",
                                       f"train.compile={comp}", f"data.cache_device={a.cache_device}", *a.set])
        t0 = time.perf_counter()
        result = train(cfg, data, Path(tempfile.mkdtemp(prefix="run_")), quiet=True)
        total = time.perf_counter() - t0
        h = result.history
        steady = (h[-1]["seconds"] - h[0]["seconds"]) / (h[-1]["iteration"] - h[0]["iteration"]) if len(h) > 1 else None
        row = {"compile": comp, "cache_device": a.cache_device, "iterations": a.iterations, "total_s": total, "first_validation_s": h[0]["seconds"],
               "steady_s_per_iteration": steady, "iterations_per_s": 1 / steady if steady else None,
               "projected_40k_minutes": 40000 * steady / 60 if steady else None, "history": h}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "history"}), flush=True)
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    print(f"\n{name}, {a.cases} volumes {a.shape}, UltraLightUNet3D {a.variant}, batch 2 x 96³, validation every "
          f"{a.val_interval}\n\n| compile | steady it/s | s/iteration | projected 40k iterations (min) |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['compile']} | {r['iterations_per_s']:.2f} | {r['steady_s_per_iteration']:.4f} | {r['projected_40k_minutes']:.1f} |")
    if a.out:
        Path(a.out).write_text(json.dumps({"date": dt.date.today().isoformat(), "device": name,
                                           "torch": torch.__version__, "settings": vars(a), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
