"""Parameter and MAC counts against the papers' tables and the authors' released 2D code."""

import pytest
import torch

from ul3d.networks import ULTRALIGHTUNET_VARIANTS, AULUNet, UltraLightUNet
from ul3d.networks.paper_numbers import (
    ABLATIONS, AULUNET_2D, AULUNET_RELEASED_PARAMS, RELEASED_2D, ULTRALIGHTUNET_2D, ULTRALIGHTUNET_3D,
)
from ul3d.profiling import count_parameters, paper_macs

PAPER_2D, PAPER_3D = ULTRALIGHTUNET_2D, ULTRALIGHTUNET_3D
NOT_REPRODUCED_FLOPS = {"T7 MKIRA in encoder and decoder"}  # 0.326G vs 0.346G: see docs/architecture.md


def rel(a, b):
    return abs(a - b) / b


def macs_on_meta(net, shape, train=False):
    net = net.to("meta").train(train)
    return paper_macs(net, torch.zeros(shape, device="meta"))


@pytest.mark.parametrize("variant", list(ULTRALIGHTUNET_VARIANTS))
def test_2d_matches_released_code_exactly(variant):
    """With the released code's auxiliary heads the parameter count is identical, MACs within 0.1 %."""
    net = UltraLightUNet(2, 3, 1, channels=ULTRALIGHTUNET_VARIANTS[variant], deep_supervision=True)
    params, macs = RELEASED_2D[variant]
    assert count_parameters(net) == params
    # the released forward computes its auxiliary heads in every mode; ours in training mode
    assert rel(macs_on_meta(net, (1, 3, 256, 256), train=True), macs) < 1e-3


@pytest.mark.parametrize("variant", list(ULTRALIGHTUNET_VARIANTS))
def test_2d_default_matches_paper(variant):
    net = UltraLightUNet(2, 3, 1, channels=ULTRALIGHTUNET_VARIANTS[variant])
    params, macs = PAPER_2D[variant]
    assert rel(count_parameters(net), params) < 0.015  # paper rounds to 2-3 digits
    assert rel(macs_on_meta(net, (1, 3, 256, 256)), macs) < 0.05


@pytest.mark.parametrize("variant", list(ULTRALIGHTUNET_VARIANTS))
def test_3d_matches_paper(variant):
    params, macs = PAPER_3D[variant]
    net = UltraLightUNet(3, 1, 1, channels=ULTRALIGHTUNET_VARIANTS[variant])
    assert rel(count_parameters(net), params) < 0.03
    # Table 10's FLOPs were counted with a 3-channel first block (the released code repeats a
    # 1-channel volume to 3 channels); the cost is that of a 3-channel input
    net3 = UltraLightUNet(3, 3, 1, channels=ULTRALIGHTUNET_VARIANTS[variant])
    assert rel(macs_on_meta(net3, (1, 3, 96, 96, 96)), macs) < 0.05


def test_aulunet_matches_paper():
    net = AULUNet(2, 3, 1)
    assert count_parameters(net) == AULUNET_RELEASED_PARAMS
    assert rel(count_parameters(net), AULUNET_2D[0]) < 0.03
    assert net.paper_flops_convention == "thop"
    assert rel(macs_on_meta(net, (1, 3, 256, 256)), AULUNET_2D[1]) < 0.05


@pytest.mark.parametrize("row", list(ABLATIONS))
def test_ablation_rows(row):
    kwargs, params, flops = ABLATIONS[row]
    net = UltraLightUNet(2, 3, 1, deep_supervision=True, **kwargs)  # the released code's head set
    assert rel(count_parameters(net), params) < 0.03
    if row not in NOT_REPRODUCED_FLOPS:
        assert rel(macs_on_meta(net, (1, 3, 256, 256), train=True), flops) < 0.05
