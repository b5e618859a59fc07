"""What is alive at the peak of one training step: every tensor the step creates, tracked until it is freed.

    python benchmarks/bench_memory.py --levers plain ckpt --networks ultralightunet:base unet [--device cuda]

For each network and lever (``bench_networks.py``'s names; the step is its AdamW + DiceCELoss step at batch 2 × 96³,
bf16 autocast on CUDA, float32 on the CPU) a dispatch mode records each op's output storages and when they are freed.
It reports the peak of their sum (gradients, optimizer state and parameters from earlier steps are not counted: only
what the step itself allocates), the op at which it occurs and the largest tensors alive then, with the op that made
each; on CUDA also ``torch.cuda.max_memory_allocated`` of the same step. On the CPU every tensor is float32, so the
ranking of networks matches a GPU run in one dtype; CPU autocast would cast pooling and upsampling to float32, which
CUDA autocast does not. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_networks as bn  # noqa: E402


class LiveTensors(TorchDispatchMode):
    """Sum of the storages of every op output from its creation until it is freed; the snapshot at the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[int, tuple]] = {}
        self.current = self.peak = self.ops = 0
        self.peak_op = ""
        self.snapshot: list[tuple[int, tuple]] = []

    def _freed(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.current -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self.live or storage.nbytes() == 0:
                continue
            self.live[key] = (storage.nbytes(), (self.ops, str(func).removeprefix("aten."), list(t.shape),
                                                 str(t.dtype).removeprefix("torch.")))
            self.current += storage.nbytes()
            weakref.finalize(storage, self._freed, key)
            if self.current > self.peak:
                self.peak, self.peak_op = self.current, f"{self.ops}: {func}"
                self.snapshot = list(self.live.values())
        return out


def measure(spec: str, lever: str, device: torch.device, top: int) -> dict:
    toks = bn._tokens(lever)
    net = bn._lever_net(spec, device, toks, inference=False)
    step = bn.make_step(net, device, torch.bfloat16 if device.type == "cuda" else None)
    step()  # optimizer state and gradients exist before the measured step
    gc.collect()
    row = {"network": spec, "lever": lever}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize()
        row["max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        row["max_above_start_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    tracker = LiveTensors()
    with tracker:
        step()
    row["peak_mib"] = tracker.peak / 2**20
    row["peak_op"] = tracker.peak_op
    row["ops"] = tracker.ops
    row["largest"] = [{"mib": round(b / 2**20, 2), "op": info[1], "op_index": info[0], "shape": info[2], "dtype": info[3]}
                      for b, info in sorted(tracker.snapshot, key=lambda e: -e[0])[:top]]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--networks", nargs="+", default=["ultralightunet:base", "unet"])
    p.add_argument("--levers", nargs="+", default=["plain", "ckpt"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--date", default=dt.date.today().isoformat())
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for spec in args.networks:
        for lever in args.levers:
            if spec == "unet" and lever not in bn.UNET_LEVERS:
                continue
            row = measure(spec, lever, device, args.top)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "largest"}), flush=True)
    ref = next((r for r in rows if r["network"] == "unet" and r["lever"] == "plain"), None)
    cols = ["peak_mib"] + (["max_allocated_mib"] if device.type == "cuda" else [])
    lines = [f"Device: {name}; torch {torch.__version__}; {args.date}; one training step (batch 2, 96³); "
             "ratios to MONAI UNet plain", "", "| network | lever | " + " | ".join(cols) + " | peak at | largest alive |",
             "|---|---|" + "---:|" * len(cols) + "---|---|"]
    for r in rows:
        cells = [f"{r[c]:.0f}" + (f" ({r[c] / ref[c]:.2f}×)" if ref else "") for c in cols]
        big = ", ".join(f"{e['mib']:.0f} {e['op']}" for e in r["largest"][:4])
        lines.append(f"| {r['network']} | {r['lever']} | " + " | ".join(cells) + f" | {r['peak_op'].split(': ')[-1]} | {big} |")
    table = "\n".join(lines)
    print(table)
    tag = "cuda_" + name.split()[1].lower() if device.type == "cuda" and len(name.split()) > 1 else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"memory_{tag}_{args.date}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"device": name, "date": args.date, "torch": torch.__version__, "rows": rows,
                               "table": table}, indent=1))
    tmp.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
