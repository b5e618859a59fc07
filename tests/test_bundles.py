"""ul3d's MONAI bundles, driven by MONAI's own clients: ``python -m monai.bundle run`` (train -> inference ->
evaluate on synthetic data in each dataset's layout), ``ConfigWorkflow.check_properties``, ``verify_net_in_out``,
``ckpt_export``, ONNX Runtime, ``torchrun`` with gloo, ``ul3d export-bundle``, and the bad-input errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ul3d.bundle import BundleError, check_bundle, export_bundle, export_models
from ul3d.bundle.metadata import validate_metadata
from ul3d.bundle.templates import load_template
from ul3d.config import load_config
from ul3d.data.datasets import load_dataset
from ul3d.data.synth import write_synthetic
from ul3d.engine.train import train

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
TEMPLATES = ["prostate", "feta", "btcv", "colin27_aal"]
# small runs: two epochs, validation every epoch, 32³ patches, coarse spacing
SMALL = ["--max_epochs", "2", "--val_interval", "1", "--roi_size", "[32,32,32]", "--num_workers", "0",
         "--cache_rate", "0.0", "--sw_batch_size", "2"]
LAYOUTS = {  # template: (synthetic layout or None for the real Colin27 data, coarser spacing)
    "prostate": ("msd-prostate", "[1.2,1.2,3.6]"),
    "feta": ("feta", "[1.6,1.6,1.6]"),
    "btcv": ("btcv", "[1.6,1.6,2.5]"),
    "colin27_aal": (None, "[3.0,3.0,3.0]"),
}


def _epochs(checkpoint: dict) -> int:
    """Epochs done by the trainer whose ignite state a full checkpoint holds."""
    state = checkpoint["trainer"]
    return state["epoch"] if "epoch" in state else state["iteration"] // state["epoch_length"]


def _bundle_dir(template: str) -> Path:
    return BUNDLES / load_template(template)["bundle"]


def _run(args: list[str], cwd: Path, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    env.pop("UL3D_DEBUG", None)
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _bundle_run(bundle: Path, config: str | list[str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    files = config if isinstance(config, str) else "[" + ",".join(f"'{c}'" for c in config) + "]"
    return _run([sys.executable, "-m", "monai.bundle", "run", "--config_file", files, "--bundle_root", str(bundle),
                 "--logging_file", str(bundle / "configs" / "logging.conf"), *args], cwd=bundle, check=check)


def _copy_bundle(template: str, dest: Path) -> Path:
    """The committed bundle's configs, docs and licence (no weights) in a scratch folder."""
    src = _bundle_dir(template)
    out = dest / src.name
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("models"))
    (out / "models").mkdir()
    return out


def _dataset(template: str, tmp: Path) -> Path:
    layout, _ = LAYOUTS[template]
    if layout is None:
        from ul3d.data.colin27 import MissingDataError, find_colin27, prepare_colin27

        try:
            find_colin27()
        except MissingDataError:
            pytest.skip("Colin27/AAL data (Debian mricron-data) not installed")
        return prepare_colin27(tmp / "data")
    return write_synthetic(layout, tmp / "data", n_cases=5, seed=3)


def _input_folder(data: Path, tmp: Path) -> Path:
    """Two labelled cases' images in a flat folder (nnU-Net's per-channel files kept together)."""
    spec = load_dataset(data)
    folder = tmp / "inputs"
    folder.mkdir()
    for item in spec.training[:2]:
        images = item["image"] if isinstance(item["image"], list) else [item["image"]]
        for c, path in enumerate(images):
            name = f"{item['id']}_{c:04d}.nii.gz" if len(images) > 1 else f"{item['id']}.nii.gz"
            shutil.copy(path, folder / name)
    return folder


_VERSIONED = ("monai_version", "pytorch_version", "numpy_version", "required_packages_version", "copyright")


@pytest.mark.parametrize("template", TEMPLATES)
def test_committed_bundles_are_what_export_bundle_writes(template, tmp_path):
    """bundles/* are the output of `ul3d export-bundle --template T` (configs identical, metadata identical up to the
    software versions; model card identical where no weights are shipped) and pass every check."""
    committed = _bundle_dir(template)
    fresh = export_bundle(None, template, tmp_path / "fresh")
    names = sorted(p.name for p in (fresh / "configs").iterdir())
    assert names == sorted(p.name for p in (committed / "configs").iterdir())
    for name in names:
        if name != "metadata.json":
            assert (committed / "configs" / name).read_text() == (fresh / "configs" / name).read_text(), name
    meta = validate_metadata(committed / "configs" / "metadata.json")
    fresh_meta = json.loads((fresh / "configs" / "metadata.json").read_text())
    shipped = (committed / "models" / "model.pt").is_file()
    for key in set(meta) | set(fresh_meta):
        if key not in _VERSIONED and not (shipped and key == "eval_metrics"):
            assert meta.get(key) == fresh_meta.get(key), key
    if not shipped:
        assert (committed / "docs" / "README.md").read_text() == (fresh / "docs" / "README.md").read_text()
    assert (committed / "LICENSE").read_text() == (fresh / "LICENSE").read_text()
    if shipped:  # the shipped model.ts / model.onnx compute what model.pt does (checked on a copy)
        copy = tmp_path / committed.name
        shutil.copytree(committed, copy)
        assert {p.name for p in (copy / "models").iterdir()} == {"model.pt", "model.ts", "model.onnx"}
        assert check_bundle(copy) == []


def test_btcv_13organ_overlay_gives_14_classes():
    from monai.bundle import ConfigParser

    bundle = _bundle_dir("btcv")
    for config in ("train.json", "evaluate.json"):
        parser = ConfigParser()
        parser.read_config([str(bundle / "configs" / config), str(bundle / "configs" / "13organ.json")])
        assert parser.get_parsed_content("network_def").out_channels == 14
        assert parser["protocol"] == "13organ" and len(parser["class_names"]) == 14
        assert parser.get_parsed_content("label_values") == parser.get_parsed_content("class_values") == list(range(14))
    plain = ConfigParser()
    plain.read_config(str(bundle / "configs" / "train.json"))
    assert plain.get_parsed_content("network_def").out_channels == 9


@pytest.mark.parametrize("template", TEMPLATES)
def test_train_inference_evaluate_with_monai_bundle_run(template, tmp_path):
    data = _dataset(template, tmp_path)
    bundle = _copy_bundle(template, tmp_path)
    spacing = LAYOUTS[template][1]
    _bundle_run(bundle, "configs/train.json", "--dataset_dir", str(data), "--pixdim", spacing, *SMALL)
    models = bundle / "models"
    assert (models / "model.pt").is_file() and (models / "checkpoint_final.pt").is_file()
    full = torch.load(models / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "lr_scheduler", "trainer"} <= set(full)
    assert _epochs(full) == 2

    inputs = _input_folder(data, tmp_path)
    preds = tmp_path / "preds"
    _bundle_run(bundle, "configs/inference.json", "--input_dir", str(inputs), "--output_dir", str(preds),
                "--pixdim", spacing, "--roi_size", "[32,32,32]", "--sw_batch_size", "2")
    spec = load_dataset(data)
    for item in spec.training[:2]:
        first = item["image"][0] if isinstance(item["image"], list) else item["image"]
        src, out = nib.load(first), nib.load(preds / f"{item['id']}.nii.gz")
        assert out.shape == src.shape[:3], item["id"]
        np.testing.assert_allclose(out.affine, src.affine, atol=1e-4)
        assert out.get_data_dtype() == np.uint8
        assert int(np.asarray(out.dataobj).max()) < len(spec.class_names)
    assert not [p for p in preds.iterdir() if p.name.startswith(".")], "temporary files left behind"

    _bundle_run(bundle, "configs/evaluate.json", "--dataset_dir", str(data), "--pixdim", spacing,
                "--roi_size", "[32,32,32]", "--sw_batch_size", "2")
    summary = json.loads((bundle / "eval" / "summary.json").read_text())
    assert summary["hd95_unit"] == "mm"
    assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0
    assert len(summary["metric_per_case"]) == len(list((bundle / "eval" / "predictions").glob("*.nii.gz")))


@pytest.fixture(scope="module")
def trained_bundle(tmp_path_factory):
    """The prostate bundle after two epochs of `monai.bundle run` on synthetic MSD data."""
    tmp = tmp_path_factory.mktemp("bundle")
    data = write_synthetic("msd-prostate", tmp / "data", n_cases=5, seed=4)
    bundle = _copy_bundle("prostate", tmp)
    _bundle_run(bundle, "configs/train.json", "--dataset_dir", str(data), "--pixdim", "[1.2,1.2,3.6]", *SMALL)
    return bundle, data


def test_monai_checks_ckpt_export_and_onnx(trained_bundle):
    bundle, data = trained_bundle
    # MONAI's command-line clients on the bundle
    _run([sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file",
          "configs/metadata.json", "--config_file", "configs/inference.json", "--bundle_root", str(bundle)], cwd=bundle)
    _run([sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", "models/model.ts",
          "--ckpt_file", "models/model.pt", "--meta_file", "configs/metadata.json", "--config_file",
          "configs/inference.json", "--bundle_root", str(bundle)], cwd=bundle)
    from monai.bundle import ConfigWorkflow

    for workflow, name in (("train", "train.json"), ("infer", "inference.json")):
        wf = ConfigWorkflow(config_file=str(bundle / "configs" / name), meta_file=str(bundle / "configs" / "metadata.json"),
                            workflow_type=workflow, bundle_root=str(bundle), dataset_dir=str(data),
                            input_dir=str(data / "imagesTs"), pixdim=[1.2, 1.2, 3.6])
        wf.initialize()
        assert wf.check_properties() == [], name

    net = __import__("ul3d").networks.get_network("ultralightunet", "base", 3, 2, 3)
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", map_location="cpu", weights_only=True))
    net.eval()
    x = torch.randn(1, 2, 96, 96, 96)
    ts = torch.jit.load(str(bundle / "models" / "model.ts"))
    with torch.no_grad():
        ref = net(x)
        assert (ts(x) - ref).abs().max().item() < 1e-4
    pytest.importorskip("onnxruntime")
    written = export_models(bundle)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(written["onnx"]), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(out - ref.numpy()).max() < 1e-4
    assert check_bundle(bundle) == []
    assert check_bundle(bundle, dataset_dir=data) == []


def test_check_bundle_finds_broken_metadata_and_exports(trained_bundle, tmp_path):
    bundle, _ = trained_bundle
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    meta = json.loads((broken / "configs" / "metadata.json").read_text())
    del meta["network_data_format"]["inputs"]["image"]["num_channels"]
    meta["network_data_format"]["outputs"]["pred"]["num_channels"] = 5
    (broken / "configs" / "metadata.json").write_text(json.dumps(meta))
    problems = "\n".join(check_bundle(broken))
    assert "num_channels" in problems and "verify_net_in_out" in problems
    # a TorchScript file of other weights no longer equals the eager network
    shutil.copytree(bundle, tmp_path / "other")
    sd = torch.load(bundle / "models" / "model.pt", weights_only=True)
    torch.save({k: (v + 0.5 if v.is_floating_point() else v) for k, v in sd.items()}, tmp_path / "other" / "models" / "model.pt")
    export_models(tmp_path / "other", onnx=False)
    shutil.copy(bundle / "models" / "model.pt", tmp_path / "other" / "models" / "model.pt")
    assert any("model.ts: outputs differ" in p for p in check_bundle(tmp_path / "other"))


def test_resume_continues_from_the_full_checkpoint(trained_bundle, tmp_path):
    bundle, data = trained_bundle
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    args = ["--dataset_dir", str(data), "--pixdim", "[1.2,1.2,3.6]", *SMALL]
    args[args.index("--max_epochs") + 1] = "3"
    proc = _bundle_run(copy, "configs/train.json", *args, "--resume", "true")
    assert "resuming from iteration" in proc.stdout + proc.stderr
    full = torch.load(copy / "models" / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    # the third epoch ran from the restored state (epoch 2), not from scratch
    assert _epochs(full) == 3
    assert "Epoch: 3/3" in proc.stdout + proc.stderr and "Epoch: 1/3" not in proc.stdout + proc.stderr


def test_torchrun_two_processes_gloo(trained_bundle, tmp_path):
    _, data = trained_bundle
    bundle = _copy_bundle("prostate", tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = _run(torchrun + ["-m", "monai.bundle", "run", "--config_file",
                            "['configs/train.json','configs/multi_gpu_train.json']", "--bundle_root", str(bundle),
                            "--dataset_dir", str(data), "--pixdim", "[1.2,1.2,3.6]", *SMALL], cwd=bundle)
    log = proc.stdout + proc.stderr
    # 4 training cases split over 2 ranks: 2 iterations per epoch per rank; rank 0 alone logs and saves
    assert log.count("Epoch: 2/2, Iter: 2/2") == 1
    full = torch.load(bundle / "models" / "checkpoint_final.pt", map_location="cpu", weights_only=False)
    assert _epochs(full) == 2 and (bundle / "models" / "model.pt").is_file()
    assert not any(k.startswith("module.") for k in full["model"]), "DDP wrapper saved instead of the network"


def test_bad_input_gives_one_clear_error(trained_bundle, tmp_path):
    bundle, data = trained_bundle
    # a missing dataset_dir
    proc = _bundle_run(bundle, "configs/train.json", "--dataset_dir", str(tmp_path / "nowhere"), *SMALL, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: dataset_dir '{tmp_path / 'nowhere'}' does not exist")
    # a checkpoint whose tensors do not fit the network (weights of the T variant)
    wrong = tmp_path / "wrong.pt"
    torch.save(__import__("ul3d").networks.get_network("ultralightunet", "T", 3, 2, 3).state_dict(), wrong)
    inputs = _input_folder(data, tmp_path)
    proc = _bundle_run(bundle, "configs/inference.json", "--input_dir", str(inputs), "--ckpt_path", str(wrong),
                       "--output_dir", str(tmp_path / "p1"), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {wrong}: the weights do not fit UltraLightUNet") and "expected" in last
    # a volume with the wrong number of channels: named, skipped, the others predicted
    first = sorted(inputs.iterdir())[0]
    img = nib.load(first)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., 0], img.affine), inputs / "one_channel.nii.gz")
    proc = _bundle_run(bundle, "configs/inference.json", "--input_dir", str(inputs), "--output_dir",
                       str(tmp_path / "p2"), "--pixdim", "[1.2,1.2,3.6]", "--roi_size", "[32,32,32]")
    assert f"error: {inputs / 'one_channel.nii.gz'}: has 1 channel(s), the network expects 2 channel(s) (T2, ADC); skipped" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "p2").iterdir()) == sorted(p.name for p in inputs.iterdir() if p.name != "one_channel.nii.gz")


def test_export_bundle_from_ul3d_train_checkpoint(tmp_path, capsys):
    from ul3d.cli import main

    data = write_synthetic("msd-prostate", tmp_path / "data", n_cases=4, seed=6)
    cfg = load_config("prostate", ["network.variant=T", "train.roi_size=[32,32,32]", "train.iterations=2",
                                   "train.val_interval=2", "data.num_workers=0", "data.spacing=[1.2,1.2,3.6]"])
    result = train(cfg, data, tmp_path / "run", device="cpu", quiet=True)
    out = tmp_path / "exported"
    assert main(["export-bundle", "--checkpoint", str(result.last_checkpoint), "--template", "prostate", "--out", str(out)]) == 0
    assert "checks passed" in capsys.readouterr().out
    assert {p.name for p in (out / "models").iterdir()} == {"model.pt", "model.ts", "model.onnx"}
    meta = validate_metadata(out / "configs" / "metadata.json")
    assert meta["eval_metrics"]["val_mean_dice"] == pytest.approx(result.history[-1]["val_mean_dice"], abs=1e-4)
    assert check_bundle(out) == []
    # the exported bundle predicts with its own inference.json (the checkpoint's T variant and spacing)
    preds = tmp_path / "preds"
    _bundle_run(out, "configs/inference.json", "--input_dir", str(data / "imagesTs"), "--output_dir", str(preds))
    assert len(list(preds.glob("*.nii.gz"))) == 2
    # an existing --out is not replaced without --force; a bogus checkpoint is one clear error
    assert main(["export-bundle", "--checkpoint", str(result.last_checkpoint), "--template", "custom", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    bogus = tmp_path / "bogus.pt"
    bogus.write_text("not a checkpoint")
    assert main(["export-bundle", "--checkpoint", str(bogus), "--template", "custom", "--out", str(tmp_path / "x")]) == 2
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # a template that does not describe the checkpoint (FeTA: 1 channel, 8 classes) is refused
    assert main(["export-bundle", "--checkpoint", str(result.last_checkpoint), "--template", "feta", "--out",
                 str(tmp_path / "y")]) == 2
    assert "use --template custom" in capsys.readouterr().err and not (tmp_path / "y").exists()
    with pytest.raises(BundleError, match="exists"):
        export_bundle(result.last_checkpoint, "custom", out)


def test_colin27_bundle_reproduces_the_demo_on_real_data(tmp_path):
    """The shipped weights, run through the bundle's own evaluate.json on the real held-out hemisphere, give the
    held-out Dice the demo measured when it trained them (metadata eval_metrics), here on the CPU."""
    data = _dataset("colin27_aal", tmp_path)
    src = _bundle_dir("colin27_aal")
    bundle = tmp_path / src.name
    shutil.copytree(src, bundle)
    _bundle_run(bundle, "configs/evaluate.json", "--dataset_dir", str(data), "--device", "cpu")
    summary = json.loads((bundle / "eval" / "summary.json").read_text())
    measured = json.loads((src / "configs" / "metadata.json").read_text())["eval_metrics"]["held_out_mean_dice"]
    assert [c["reference_file"].endswith("colin27_right_mirrored.nii.gz") for c in summary["metric_per_case"]] == [True]
    assert summary["foreground_mean"]["Dice"] == pytest.approx(measured, abs=0.01)
    assert summary["foreground_mean"]["Dice"] > 0.8
