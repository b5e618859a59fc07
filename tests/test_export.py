"""Every network variant exports to TorchScript (trace and script) and ONNX with the eager outputs."""

import pytest
import torch

from ul3d.networks import ULTRALIGHTUNET_VARIANTS, get_network
from ul3d.networks.export import export_onnx, export_torchscript, to_torchscript

ort = pytest.importorskip("onnxruntime")

CASES = [("ultralightunet", v, d) for d in (2, 3) for v in ULTRALIGHTUNET_VARIANTS] + [("aulunet", "base", 2), ("aulunet", "base", 3)]
SIZE = {2: (64, 48), 3: (32, 40, 32)}


def _trained_like(name, variant, dims):
    kwargs = {"init": "default"} if name == "ultralightunet" else {}
    net = get_network(name, variant, spatial_dims=dims, in_channels=2, out_channels=3, **kwargs)
    net.train()
    with torch.no_grad():  # non-trivial BatchNorm running statistics
        for _ in range(2):
            net(torch.randn(2, 2, *SIZE[dims]) * 2 + 0.5)
    return net.eval()


@pytest.mark.parametrize("name,variant,dims", CASES, ids=[f"{n}-{v}-{d}d" for n, v, d in CASES])
def test_export_roundtrips(name, variant, dims, tmp_path):
    net = _trained_like(name, variant, dims)
    x = torch.randn(2, 2, *SIZE[dims])
    with torch.no_grad():
        ref = net(x)
        assert ref.abs().max() > 1e-2  # a meaningful output to compare against
        traced = to_torchscript(net, x, method="trace")
        assert (traced(x) - ref).abs().max() <= 1e-4
        path = export_torchscript(net, tmp_path / "net.ts")  # scripted: keeps the input check
        scripted = torch.jit.load(str(path))
        assert (scripted(x) - ref).abs().max() <= 1e-4
        with pytest.raises(Exception, match="input channel"):
            scripted(torch.randn(1, 1, *SIZE[dims]))

    onnx_path = export_onnx(net, x[:1], tmp_path / "net.onnx", opset=17)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"image": x.numpy()})  # batch 2 through the dynamic batch axis
    assert abs(out - ref.numpy()).max() <= 1e-4
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave nothing behind


def test_onnx_opset_floor(tmp_path):
    net = get_network("ultralightunet", "T", spatial_dims=2, in_channels=1, out_channels=1)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(net, torch.zeros(1, 1, 32, 32), tmp_path / "x.onnx", opset=13)
    assert not (tmp_path / "x.onnx").exists()


def test_monai_tools_accept_the_networks():
    """MONAI's TorchScript converter (used by ckpt_export) and sliding-window inference on an odd volume."""
    from monai.inferers import sliding_window_inference
    from monai.networks.utils import convert_to_torchscript

    net = get_network("ultralightunet", "T", spatial_dims=3, in_channels=1, out_channels=3).eval()
    x = torch.randn(1, 1, 32, 32, 32)
    ts = convert_to_torchscript(net, verify=True, inputs=[x], device="cpu", rtol=1e-4, atol=1e-4)
    assert isinstance(ts, torch.jit.ScriptModule)
    vol = torch.randn(1, 1, 45, 70, 38)
    with torch.no_grad():
        out = sliding_window_inference(vol, (32, 32, 32), 2, net, overlap=0.25, mode="gaussian")
    assert out.shape == (1, 3, 45, 70, 38) and torch.isfinite(out).all()
