"""Fast paths compute the same function as the plain modules."""

import pytest
import torch
from torch import nn

from ul3d.networks import get_network
from ul3d.networks.fast import fold_batchnorm


def _with_statistics(net, shape):
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(shape) * 3 + 1)
    return net.eval()


@pytest.mark.parametrize("name,variant,dims", [("ultralightunet", "T", 3), ("ultralightunet", "base", 2),
                                               ("aulunet", "base", 3)])
def test_fold_batchnorm_is_the_same_function(name, variant, dims):
    shape = (2, 1) + (48,) * dims
    net = _with_statistics(get_network(name, variant, spatial_dims=dims, in_channels=1, out_channels=3,
                                       **({"init": "default"} if name == "ultralightunet" else {})), shape)
    fast = fold_batchnorm(net)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fast.modules())
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())  # original untouched
    x = torch.randn(shape)
    with torch.no_grad():
        ref, out = net(x), fast(x)
    assert ref.abs().max() > 1e-2
    assert (ref - out).abs().max() <= 1e-4


def test_fold_batchnorm_leaves_instance_norm_alone():
    net = get_network("ultralightunet", "T", spatial_dims=3, in_channels=1, out_channels=2, norm="instance").eval()
    fast = fold_batchnorm(net)
    x = torch.randn(1, 1, 64, 64, 64)  # instance norm needs > 1 voxel at the 1/32 bottleneck
    with torch.no_grad():
        assert torch.allclose(net(x), fast(x), atol=1e-5)
