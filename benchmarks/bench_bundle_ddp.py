"""Training throughput of a ul3d MONAI bundle on 1 GPU and on N GPUs (DDP through ``torchrun`` and the bundle's
``multi_gpu_train.json``), on a synthetic dataset of prostate-sized volumes.

    python benchmarks/bench_bundle_ddp.py --bundle bundles/ultralightunet3d_prostate --gpus 1 2 --epochs 4 \\
        --out benchmarks/results/bundle_ddp_<device>_<date>.json

Each run trains ``--epochs`` epochs without validation; the first epoch (cache fill, cuDNN autotuning) is left out
of the timing. Throughput = training patches per second over the remaining epochs, read from ignite's per-epoch
"Time taken" lines. Prints a markdown table and writes JSON with the device name and date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

_EPOCH_TIME = re.compile(r"SupervisedTrainer - INFO - Epoch\[(\d+)\] Complete\. Time taken: (\d+):(\d+):([\d.]+)")


def _epoch_seconds(log: str) -> dict[int, float]:
    times = {}
    for m in _EPOCH_TIME.finditer(log):
        times[int(m.group(1))] = int(m.group(2)) * 3600 + int(m.group(3)) * 60 + float(m.group(4))
    return times


def run(bundle: Path, data: Path, gpus: int, epochs: int, workers: int, extra: list[str]) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"ddp{gpus}_"))
    b = work / bundle.name
    shutil.copytree(bundle, b, ignore=shutil.ignore_patterns("models", "eval"))
    (b / "models").mkdir()
    args = ["--bundle_root", str(b), "--dataset_dir", str(data), "--max_epochs", str(epochs), "--val_interval",
            str(epochs + 1), "--num_workers", str(workers), "--val_fraction", "0.0", *extra]
    if gpus == 1:
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "-m",
               "monai.bundle", "run", "--config_file", "['configs/train.json','configs/multi_gpu_train.json']", *args]
    print(f"[bench] {gpus} GPU(s): {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=b, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    (work / "log.txt").write_text(log)
    if proc.returncode != 0:
        raise SystemExit(f"run with {gpus} GPU(s) failed; log in {work / 'log.txt'}:\n{log[-4000:]}")
    times = _epoch_seconds(log)
    steady = [times[e] for e in sorted(times) if e > 1]
    iters = re.findall(r"Epoch: 1/\d+, Iter: \d+/(\d+)", log)
    iters_per_epoch = int(iters[0]) if iters else None
    return {"gpus": gpus, "epoch_seconds": times, "iterations_per_epoch_per_rank": iters_per_epoch,
            "steady_epoch_seconds": sum(steady) / len(steady) if steady else None, "log": str(work / "log.txt")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="bundles/ultralightunet3d_prostate")
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--cases", type=int, default=32)
    p.add_argument("--shape", type=int, nargs=3, default=[320, 320, 20], help="synthetic volume shape (MSD prostate-sized)")
    p.add_argument("--workers", type=int, default=6, help="data loader workers per process")
    p.add_argument("--out", default=None)
    p.add_argument("extra", nargs="*", help="more bundle overrides, e.g. --roi_size [64,64,64]")
    a = p.parse_args()

    import torch

    from ul3d.data.synth import write_synthetic

    data = write_synthetic("msd-prostate", Path(tempfile.mkdtemp(prefix="data_")), n_cases=a.cases, shape=tuple(a.shape))
    results = [run(Path(a.bundle).resolve(), data, g, a.epochs, a.workers, a.extra) for g in a.gpus]
    meta = json.loads((Path(a.bundle) / "configs" / "train.json").read_text())
    patches = (a.cases * int(meta["num_samples"]))  # every training case gives num_samples patches per epoch
    base = results[0]["steady_epoch_seconds"]
    print("\n| GPUs | steady epoch (s) | patches/s | speed-up |\n|---:|---:|---:|---:|")
    for r in results:
        s = r["steady_epoch_seconds"]
        r["patches_per_second"] = patches / s if s else None
        r["speedup"] = base / s if s and base else None
        print(f"| {r['gpus']} | {s:.2f} | {r['patches_per_second']:.1f} | {r['speedup']:.2f}x |")
    report = {
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "device_count": torch.cuda.device_count(),
        "torch": torch.__version__, "bundle": str(a.bundle), "cases": a.cases, "shape": a.shape,
        "epochs": a.epochs, "workers_per_process": a.workers, "patches_per_epoch": patches, "results": results,
        "cpu_count": os.cpu_count(),
    }
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
