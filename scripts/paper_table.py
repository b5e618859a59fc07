"""Print ul3d's parameter and MAC counts beside the papers' numbers (markdown), optionally as JSON.

    python scripts/paper_table.py [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from ul3d.networks import ULTRALIGHTUNET_VARIANTS, AULUNet, UltraLightUNet
from ul3d.networks.paper_numbers import ABLATIONS, AULUNET_2D, RELEASED_2D, ULTRALIGHTUNET_2D, ULTRALIGHTUNET_3D
from ul3d.profiling import count_parameters, paper_macs


def _macs(net, shape, train=False):
    net = net.to("meta").train(train)
    return paper_macs(net, torch.zeros(shape, device="meta"))


def _row(label, params, macs, paper_params, paper_macs_):
    return {"row": label, "params": params, "paper_params": paper_params, "macs": macs, "paper_macs": paper_macs_,
            "params_diff_pct": 100 * (params / paper_params - 1), "macs_diff_pct": 100 * (macs / paper_macs_ - 1)}


def collect() -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {"2d": [], "3d": [], "aulunet": [], "ablations": []}
    for v, ch in ULTRALIGHTUNET_VARIANTS.items():
        net = UltraLightUNet(2, 3, 1, channels=ch)
        out["2d"].append(_row(f"UltraLightUNet-{v}", count_parameters(net), _macs(net, (1, 3, 256, 256)), *ULTRALIGHTUNET_2D[v]))
        ds = UltraLightUNet(2, 3, 1, channels=ch, deep_supervision=True)
        out["2d"].append(_row("  + released aux heads", count_parameters(ds), _macs(ds, (1, 3, 256, 256), True), *RELEASED_2D[v]))
        net3 = UltraLightUNet(3, 1, 1, channels=ch)
        macs3 = _macs(UltraLightUNet(3, 3, 1, channels=ch), (1, 3, 96, 96, 96))
        out["3d"].append(_row(f"UltraLightUNet3D-{v}", count_parameters(net3), macs3, *ULTRALIGHTUNET_3D[v]))
    au = AULUNet(2, 3, 1)
    out["aulunet"].append(_row("AULUNet (v3)", count_parameters(au), _macs(au, (1, 3, 256, 256)), *AULUNET_2D))
    for label, (kwargs, p, f) in ABLATIONS.items():
        net = UltraLightUNet(2, 3, 1, deep_supervision=True, **kwargs)
        out["ablations"].append(_row(label, count_parameters(net), _macs(net, (1, 3, 256, 256), True), p, f))
    return out


def to_markdown(tables: dict[str, list[dict]]) -> str:
    titles = {
        "2d": "2D, 3×256², 1 class (paper Table 9; second rows: the released code's head set, its measured counts)",
        "3d": "3D, params at 1 input channel / 1 class; MACs at 3×96³ / 1 class (paper Table 10)",
        "aulunet": "AULUNet 2D, 3×256², 1 class (thop convention)",
        "ablations": "Ablations, 2D base, 3×256², 1 class, released head set (paper Tables 4–8)",
    }
    lines = []
    for key, rows in tables.items():
        lines += [f"**{titles[key]}**", "", "| network | params | paper | Δ | GMACs | paper | Δ |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            lines.append(
                f"| {r['row']} | {r['params']:,} | {r['paper_params']:,.0f} | {r['params_diff_pct']:+.1f}% "
                f"| {r['macs'] / 1e9:.4f} | {r['paper_macs'] / 1e9:.4g} | {r['macs_diff_pct']:+.1f}% |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", help="also write the rows to this JSON file")
    args = ap.parse_args()
    tables = collect()
    print(to_markdown(tables))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(tables, f, indent=2)
