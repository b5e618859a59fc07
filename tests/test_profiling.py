"""The MAC counters on single layers, and the ``ul3d profile`` command."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from ul3d.cli import main
from ul3d.profiling import activation_bytes, conv_macs, count_parameters, paper_macs


def test_counters_on_single_layers():
    x = torch.zeros(1, 2, 8, 8, 8)
    conv = nn.Conv3d(2, 4, 3, padding=1)
    positions = 8**3
    assert conv_macs(conv, x) == positions * 27 * 2 * 4
    assert paper_macs(conv, x, "ptflops") == positions * 27 * 2 * 4 + positions * 4  # bias counted
    assert paper_macs(conv, x, "thop") == positions * 27 * 2 * 4
    dw = nn.Conv3d(4, 4, 5, padding=2, groups=4, bias=False)
    assert paper_macs(dw, torch.zeros(1, 4, 8, 8, 8), "ptflops") == positions * 125 * 4
    seq = nn.Sequential(nn.BatchNorm3d(2), nn.ReLU6(), nn.AdaptiveAvgPool3d(1))
    assert paper_macs(seq, x, "ptflops") == 2 * x.numel() + x.numel() + x.numel()
    assert paper_macs(seq, x, "thop") == 4 * x.numel() + (positions + 1) * 2
    pool = nn.Sequential(nn.MaxPool3d(2), nn.AvgPool3d(2))
    assert paper_macs(pool, x, "ptflops") == 0  # resampling is not counted
    assert paper_macs(pool, x, "thop") == 2 * 2**3  # one op per average-pool output (2 channels × 2³)
    assert activation_bytes(nn.Sequential(nn.ReLU(), nn.Identity()), x) == 2 * x.numel() * 4
    with pytest.raises(ValueError, match="convention"):
        paper_macs(conv, x, "fvcore")


def test_profile_json_matches_direct_counts(capsys):
    assert main(["profile", "ultralightunet:T", "aulunet", "unet", "--roi", "64", "64", "64",
                 "--in-channels", "1", "--out-channels", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["ultralightunet:T", "aulunet", "unet"]
    from ul3d.networks import get_network

    net = get_network("ultralightunet", "T", spatial_dims=3, in_channels=1, out_channels=3)
    assert rows[0]["params"] == count_parameters(net)
    x = torch.zeros(1, 1, 64, 64, 64)
    assert rows[0]["conv_macs"] == conv_macs(net.eval(), x)
    assert rows[0]["paper_macs"] == paper_macs(net, x)
    assert rows[1]["convention"] == "thop"
    assert rows[2]["params"] == 4_807_482 and rows[2]["conv_macs"] > 5 * rows[0]["conv_macs"]
    assert all(r["activation_bytes"] > 0 and r["input_shape"] == [1, 1, 64, 64, 64] for r in rows)


def test_profile_table_2d_and_every_peer(capsys):
    assert main(["profile", "ultralightunet:base", "unet", "segresnet", "swinunetr", "unetr", "dynunet",
                 "--spatial-dims", "2", "--roi", "64", "--in-channels", "3", "--out-channels", "2"]) == 0
    out = capsys.readouterr().out
    assert "| network | params | conv GMACs | paper GMACs |" in out
    for name in ["ultralightunet:base", "unet", "segresnet", "swinunetr", "unetr", "dynunet"]:
        assert f"| {name} |" in out


def test_profile_errors():
    with pytest.raises(SystemExit, match="unknown network 'vnet'"):
        main(["profile", "vnet"])
    with pytest.raises(SystemExit, match="--roi needs 3 sizes"):
        main(["profile", "unet", "--roi", "64", "64"])


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "ul3d", "profile", "ultralightunet:T", "--roi", "32", "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)[0]["params"] > 60_000
