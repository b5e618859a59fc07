"""train -> predict -> evaluate on every dataset layout, resume after SIGKILL, and bad input handling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from ul3d.cli import main
from ul3d.config import load_config
from ul3d.data.datasets import load_dataset
from ul3d.data.io import write_like
from ul3d.data.synth import write_synthetic
from ul3d.engine.infer import Predictor, group_cases, predict_paths
from ul3d.engine.train import load_checkpoint, network_from_spec, train

FAST = [
    "network.variant=T", "train.roi_size=[32,32,32]", "train.iterations=2", "train.val_interval=2",
    "train.num_samples=2", "data.num_workers=0", "infer.sw_batch_size=2", "infer.overlap=0.25",
]
LAYOUTS = {  # layout: (config, extra overrides)
    "msd-prostate": ("prostate", ["data.spacing=[1.2,1.2,3.6]"]),
    "feta": ("feta", ["data.spacing=[1.6,1.6,1.6]"]),
    "btcv": ("btcv", ["data.spacing=[1.6,1.6,2.5]"]),
    "nnunet": ("nnunet", []),
}


def _images_of(spec):
    return [it["image"] for it in spec.training + spec.test]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_train_predict_evaluate_every_layout(layout, tmp_path, capsys):
    root = write_synthetic(layout, tmp_path / "data", seed=1)
    config_name, extra = LAYOUTS[layout]
    run = tmp_path / "run"
    assert main(["train", "--config", config_name, "--data", str(root), "--output", str(run),
                 "--set", *FAST, *extra, "--device", "cpu"]) == 0
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    spec = load_dataset(root, **({"protocol": "8organ"} if layout == "btcv" else {}))
    assert ckpt["class_names"] == spec.class_names and ckpt["iteration"] == 2
    assert (run / "checkpoints" / "best.pt").exists() and (run / "history.json").exists()
    # every interval's record says how long training took and how much of it went to waiting for batches
    record = json.loads((run / "history.json").read_text())[-1]
    assert 0 <= record["data_wait_seconds"] <= record["train_seconds"] + 0.01 and record["train_seconds"] > 0
    assert list((run / "tensorboard").iterdir())

    # predict two labelled cases (nnU-Net: one file per channel) and check the geometry of every output
    labelled = spec.training[:2]
    inputs = [f for it in labelled for f in ([it["image"]] if isinstance(it["image"], str) else it["image"])]
    pred_dir = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(run / "checkpoints" / "last.pt"), "--input", *inputs,
                 "--output", str(pred_dir), "--device", "cpu"]) == 0
    def files(item):
        return [Path(item["image"])] if isinstance(item["image"], str) else [Path(f) for f in item["image"]]

    def pred_name(item):  # predictions are named by the image's case id (nnU-Net: without _0000)
        return group_cases(files(item))[0][0] + ".nii.gz"

    for item in labelled:
        src = nib.load(str(files(item)[0]))
        out = nib.load(str(pred_dir / pred_name(item)))
        assert out.shape == src.shape[:3]
        assert np.allclose(out.affine, src.affine, atol=1e-4)
        assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(src.affine)
        assert out.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(out.dataobj))) <= set(range(spec.num_classes))
    assert not list(pred_dir.glob(".*tmp*"))

    # evaluate against the references of the predicted cases
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    for item in labelled:  # references in the trained label space (BTCV 8-organ: remapped)
        ref = nib.load(item["label"])
        lab = spec.remap_labels(np.asarray(ref.dataobj)).astype(np.uint8)
        nib.save(nib.Nifti1Image(lab, ref.affine), str(ref_dir / pred_name(item)))
    assert main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir)]) == 0
    summary = json.loads((pred_dir / "summary.json").read_text())
    assert {"metric_per_case", "mean", "foreground_mean"} <= set(summary)
    assert len(summary["metric_per_case"]) == 2
    assert "Dice" in summary["foreground_mean"] and "HD95" in summary["foreground_mean"]
    assert (pred_dir / "metrics.csv").exists()


def test_thin_prostate_volumes_and_btcv_protocol(tmp_path):
    root = write_synthetic("msd-prostate", tmp_path / "p", seed=2)
    spec = load_dataset(root)
    shape = nib.load(spec.training[0]["image"]).shape
    assert shape[2] < 32 and shape[3] == 2  # thinner than the patch, two channels
    btcv = load_dataset(write_synthetic("btcv", tmp_path / "b", seed=2), protocol="8organ")
    assert btcv.num_classes == 9 and btcv.label_map[8] == 1 and btcv.label_map[5] == 0


def _kill_and_resume_cmd(data, out, extra=()):
    return [sys.executable, "-m", "ul3d", "train", "--config", "feta", "--data", str(data), "--output", str(out),
            "--device", "cpu", "--seed", "7", "--set", "network.variant=T", "train.roi_size=[32,32,32]",
            "train.iterations=24", "train.val_interval=4", "train.num_samples=2", "data.num_workers=0",
            "data.spacing=[1.6,1.6,1.6]", "data.val_fraction=0", *extra]


def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path):
    data = write_synthetic("feta", tmp_path / "data", seed=3)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    ref_out, cut_out = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(_kill_and_resume_cmd(data, ref_out), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(_kill_and_resume_cmd(data, cut_out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = cut_out / "checkpoints" / "last.pt"
    killed_at = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if last.exists():
            it = torch.load(last, weights_only=False)["iteration"]
            if 8 <= it < 24:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed_at = it
                break
        time.sleep(0.05)
    assert killed_at is not None, "the run finished before it could be killed; make it longer"
    assert torch.load(last, weights_only=False)["iteration"] < 24  # really interrupted
    subprocess.run(_kill_and_resume_cmd(data, cut_out) + ["--resume"], check=True, env=env, capture_output=True)
    ref = load_checkpoint(ref_out / "checkpoints" / "last.pt")
    cut = load_checkpoint(last)
    assert cut["iteration"] == ref["iteration"] == 24
    for k, v in ref["network"].items():
        assert torch.equal(v, cut["network"][k]), f"{k} differs after resume"
    assert [h["loss"] for h in cut["history"]] == [h["loss"] for h in ref["history"]]


def test_same_seed_same_weights_and_workers_do_not_matter(tmp_path):
    data = write_synthetic("feta", tmp_path / "data", seed=4)
    cfg = load_config("feta", FAST + ["data.spacing=[1.6,1.6,1.6]", "data.val_fraction=0", "train.iterations=3",
                                      "train.val_interval=3"])
    a = train(cfg, data, tmp_path / "a", device="cpu")
    b = train(load_config("feta", FAST + ["data.spacing=[1.6,1.6,1.6]", "data.val_fraction=0", "train.iterations=3",
                                          "train.val_interval=3", "data.num_workers=2"]), data, tmp_path / "b", device="cpu")
    wa, wb = load_checkpoint(a.last_checkpoint)["network"], load_checkpoint(b.last_checkpoint)["network"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    data = write_synthetic("msd-prostate", tmp / "data", seed=5)
    cfg = load_config("prostate", FAST + ["data.spacing=[1.2,1.2,3.6]"])
    result = train(cfg, data, tmp / "run", device="cpu")
    return data, result


def test_predict_skips_bad_files_and_reports_them(trained, tmp_path, capsys):
    data, result = trained
    spec = load_dataset(data)
    good = Path(spec.training[0]["image"])
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / good.name).write_bytes(good.read_bytes())
    (inputs / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
    one_channel = nib.Nifti1Image(np.zeros((40, 40, 12), np.float32), np.eye(4))
    nib.save(one_channel, str(inputs / "one_channel.nii.gz"))
    out = tmp_path / "out"
    code = main(["predict", "--checkpoint", str(result.last_checkpoint), "--input", str(inputs), "--output", str(out),
                 "--device", "cpu"])
    assert code == 1
    err = capsys.readouterr().err
    assert "broken.nii.gz" in err and "one_channel.nii.gz" in err and "expected 2 channel(s), found 1" in err
    assert sorted(p.name for p in out.iterdir()) == [good.name]  # the good one finished, nothing half-written


def test_predict_nrrd_tta_ensemble_and_probabilities(trained, tmp_path):
    import SimpleITK as sitk

    data, result = trained
    spec = load_dataset(data)
    src = spec.training[0]["image"]
    arr = np.asarray(nib.load(src).dataobj, dtype=np.float32)  # (x, y, z, 2): T2 + ADC
    nrrd = tmp_path / "case.nrrd"  # the same two channels as a 3-D vector image with the same geometry
    write_like(np.moveaxis(arr, -1, 0), src, nrrd, dtype=np.float32)
    img = sitk.ReadImage(str(nrrd))
    assert img.GetNumberOfComponentsPerPixel() == 2 and img.GetDimension() == 3
    predictor = Predictor([result.last_checkpoint, result.best_checkpoint], device="cpu", tta=True)
    report = predict_paths(predictor, [nrrd], tmp_path / "out", save_probabilities=True, progress=False)
    assert report.ok, report.failed
    out = sitk.ReadImage(str(tmp_path / "out" / "case.nrrd"))
    assert out.GetSize() == img.GetSize()
    assert np.allclose(out.GetSpacing(), img.GetSpacing()) and np.allclose(out.GetOrigin(), img.GetOrigin())
    assert np.allclose(out.GetDirection(), img.GetDirection())
    probs = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "case_probabilities.nrrd")))
    assert np.allclose(probs.sum(-1), 1, atol=1e-3)


def test_checkpoint_errors_are_clear(trained, tmp_path, capsys):
    data, result = trained
    bogus = tmp_path / "bogus.pt"
    torch.save({"weights": 1}, bogus)
    assert main(["predict", "--checkpoint", str(bogus), "--input", str(data), "--output", str(tmp_path / "o")]) == 2
    assert "not a ul3d checkpoint" in capsys.readouterr().err
    ckpt = load_checkpoint(result.last_checkpoint)
    ckpt["network"] = {k: v[..., :1] if v.dim() > 1 else v for k, v in ckpt["network"].items()}
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    assert main(["predict", "--checkpoint", str(bad), "--input", str(data), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad.pt" in err and "do not fit" in err


def test_train_rejects_bad_datasets_before_training(tmp_path, capsys):
    root = write_synthetic("feta", tmp_path / "data", seed=6)
    spec = load_dataset(root)
    Path(spec.training[0]["label"]).unlink()
    bad_img = nib.load(spec.training[1]["image"])
    arr = np.asarray(bad_img.dataobj).astype(np.float32)
    arr[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(arr, bad_img.affine), spec.training[1]["image"])
    code = main(["train", "--config", "feta", "--data", str(root), "--output", str(tmp_path / "run"), "--set", *FAST])
    err = capsys.readouterr().err
    assert code == 2
    assert Path(spec.training[0]["label"]).name in err and Path(spec.training[1]["image"]).name in err
    assert not (tmp_path / "run" / "checkpoints").exists()
    # wrong channel count declared by the config
    root2 = write_synthetic("feta", tmp_path / "data2", seed=6)
    assert main(["train", "--config", "feta", "--data", str(root2), "--output", str(tmp_path / "r2"),
                 "--set", *FAST, "data.channels=2"]) == 2
    assert "channel" in capsys.readouterr().err


def test_config_errors(tmp_path, capsys):
    root = write_synthetic("feta", tmp_path / "data", seed=6)
    assert main(["train", "--config", "nope.yaml", "--data", str(root)]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["train", "--config", "feta", "--data", str(root), "--set", "train.iterations=5",
                 "train.val_interval=2"]) == 2
    assert "multiple of train.val_interval" in capsys.readouterr().err
    assert main(["train", "--config", "feta", "--data", str(root), "--set", "novalue"]) == 2
    assert "key=value" in capsys.readouterr().err


@pytest.mark.parametrize("layout,expected", [("nnunet", "nnunet"), ("msd-prostate", "msd"), ("feta", "feta"), ("btcv", "btcv")])
def test_synth_command(layout, expected, tmp_path, capsys):
    assert main(["synth", "--layout", layout, "--out", str(tmp_path / "s")]) == 0
    root = capsys.readouterr().out.strip().rsplit(" to ", 1)[1]
    spec = load_dataset(root)
    assert spec.layout == expected and len(spec.training) >= 4


def test_cache_device_setting(tmp_path):
    data = write_synthetic("msd-prostate", tmp_path / "data", n_cases=3, seed=7)
    bad = load_config("prostate", FAST + ["data.spacing=[1.2,1.2,3.6]", "data.cache_device=gpu"])
    with pytest.raises(ValueError, match="data.cache_device must be 'cpu', 'cuda' or 'auto'"):
        train(bad, data, tmp_path / "bad", device="cpu")
    # auto: the header estimate of the cached training set is exact for these volumes (resampled, padded to the patch)
    from ul3d.data.datasets import cached_bytes, load_dataset
    from ul3d.data.transforms import preprocessing
    from ul3d.engine.train import _cache_on_gpu

    cfg = load_config("prostate", FAST + ["data.spacing=[1.2,1.2,3.6]"])
    spec = load_dataset(data)
    pre = preprocessing(cfg, label_map=spec.label_map, pad_to=[32, 32, 32])
    cached = [pre(item) for item in spec.training]
    assert cached_bytes(spec.training, [1.2, 1.2, 3.6], [32, 32, 32]) == sum(
        4 * (d["image"].numel() + d["label"].numel()) for d in cached)
    assert not _cache_on_gpu("auto", torch.device("cpu"), nbytes=lambda: 0)  # never on a CPU run
    assert not _cache_on_gpu("cuda", torch.device("cpu"))
    if not torch.cuda.is_available():
        pytest.skip("the GPU cache needs CUDA")
    cfg = load_config("prostate", FAST + ["data.spacing=[1.2,1.2,3.6]", "data.cache_device=cuda"])
    result = train(cfg, data, tmp_path / "gpu", device="cuda")
    assert result.iterations == 2 and result.last_checkpoint.is_file()
    # the side-stream loader hands over the batches a plain loop over the same samples gives
    from ul3d.data.datasets import load_dataset
    from ul3d.engine.train import SideStreamData, build_train_loader, split_cases

    spec = load_dataset(data)
    items, _ = split_cases(spec, cfg)
    loader = build_train_loader(cfg, items, 3, spec.label_map, torch.device("cuda"), 0, 6)
    assert isinstance(loader.dataset, SideStreamData)
    batches = list(loader)  # all first: the loader thread and a plain loop must not share the transforms at once
    plain = loader.dataset.dataset
    assert len(batches) == 6
    for b, batch in enumerate(batches):
        expected = loader.dataset.batch_collate([plain[b]])  # list_data_collate, then the batch augmentation
        for key in ("image", "label"):
            assert torch.equal(torch.as_tensor(batch[key]), torch.as_tensor(expected[key])), (b, key)


def test_group_cases_only_groups_complete_channel_sets(tmp_path):
    names = ["CASE_0000.nii.gz", "CASE_0001.nii.gz", "scan_0001.nii.gz", "scan_0002.nii.gz", "solo.nii.gz"]
    files = [tmp_path / n for n in names]
    cases = dict(group_cases(files))
    assert cases["CASE"] == files[:2]
    assert cases["scan_0001"] == [files[2]] and cases["scan_0002"] == [files[3]] and cases["solo"] == [files[4]]


def test_compile_and_kernel_settings(tmp_path):
    """train.compile_mode and train.kernels are checked before any work (CUDA-graph modes are refused with a reason); on
    CUDA a compiled run with ul3d's kernels trains and checkpoints (state_dict keys as plain)."""
    data = write_synthetic("msd-prostate", tmp_path / "data", n_cases=3, seed=7)
    base = FAST + ["data.spacing=[1.2,1.2,3.6]"]
    for override, message in (("train.compile_mode=fast", "train.compile_mode must be one of"),
                              ("train.compile_mode=reduce-overhead", "uses torch.compile.s CUDA graphs"),
                              ("train.kernels=sometimes", "train.kernels must be true, false or auto"),
                              ("train.cuda_graph=maybe", "train.cuda_graph must be true, false or auto")):
        with pytest.raises(ValueError, match=message):
            train(load_config("prostate", base + [override]), data, tmp_path / "bad", device="cpu")
    if not torch.cuda.is_available():
        pytest.skip("compiled training with ul3d's kernels needs CUDA")
    cfg = load_config("prostate", base + ["train.compile=true", "train.kernels=true"])
    result = train(cfg, data, tmp_path / "gpu", device="cuda")
    ckpt = torch.load(result.last_checkpoint, map_location="cpu", weights_only=False)
    assert result.iterations == 2 and not any(k.startswith("_orig_mod") for k in ckpt["network"])


def test_cuda_graph_setting_and_resume_across_modes(tmp_path, capsys):
    """train.cuda_graph=true falls back (and says so) without CUDA; on CUDA a graph run stopped after a checkpoint is
    resumed eagerly and an eager one with graphs (the optimizer state is converted both ways, AMP's scaler restored)."""
    data = write_synthetic("msd-prostate", tmp_path / "data", n_cases=3, seed=7)
    base = FAST + ["data.spacing=[1.2,1.2,3.6]", "train.iterations=4"]
    result = train(load_config("prostate", base + ["train.cuda_graph=true"]), data, tmp_path / "cpu", device="cpu")
    assert result.iterations == 4 and "train.cuda_graph needs a CUDA device; training on cpu" in capsys.readouterr().out
    if not torch.cuda.is_available():
        pytest.skip("CUDA-graph training needs CUDA")
    import ul3d.engine.train as train_module

    class Stop(Exception):
        pass

    def stop_after_8(msg):  # a crash right after the checkpoint at iteration 8 of 16
        if "iteration 8/16" in msg:
            raise Stop

    cfg = {mode: load_config("prostate", FAST + ["data.spacing=[1.2,1.2,3.6]", "train.iterations=16",
                                                 "train.val_interval=4", f"train.cuda_graph={mode}", "train.kernels=auto"])
           for mode in ("true", "false")}
    for first, second in (("true", "false"), ("false", "true")):
        out = tmp_path / f"gpu_{first}"
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train_module, "_log", stop_after_8)
            with pytest.raises(Stop):
                train(cfg[first], data, out, device="cuda")
        result = train(cfg[second], data, out, device="cuda", resume=True)
        assert result.iterations == 16 and [h["iteration"] for h in result.history] == [4, 8, 12, 16]
        assert all(h["loss"] == h["loss"] and h["train_seconds"] > 0 for h in result.history)  # finite, timed
        ckpt = torch.load(result.last_checkpoint, map_location="cpu", weights_only=False)
        assert ckpt["scheduler"]["last_epoch"] == 16


def test_train_with_activation_checkpointing_from_the_config(tmp_path):
    """network.kwargs.use_checkpoint=true reaches the network through ul3d train: training runs, the checkpoint
    records the setting, and the weights load back into a network built from the checkpoint's spec."""
    data = write_synthetic("msd-prostate", tmp_path / "data", n_cases=3, seed=3)
    cfg = load_config("prostate", FAST + ["data.spacing=[1.2,1.2,3.6]", "network.kwargs.use_checkpoint=true"])
    result = train(cfg, data, tmp_path / "run", device="cpu")
    assert result.iterations == 2 and all(h["loss"] == h["loss"] for h in result.history)
    ckpt = torch.load(result.last_checkpoint, map_location="cpu", weights_only=False)
    assert ckpt["network_spec"]["kwargs"] == {"use_checkpoint": True}
    net = network_from_spec(ckpt["network_spec"])
    assert net.use_checkpoint
    net.load_state_dict(ckpt["network"])


def test_training_patches_without_metadata_are_the_same(tmp_path):
    """ul3d train augments with MONAI's MetaTensor tracking off (faster): the same patches as with it on, and the
    process-wide switch is back on afterwards, also when a transform raises."""
    from monai.data import get_track_meta

    from ul3d.data.transforms import metadata_tracking
    from ul3d.engine.train import _sample_seed, build_train_loader, split_cases

    data = write_synthetic("msd-prostate", tmp_path / "data", n_cases=3, seed=3)
    cfg = load_config("prostate", FAST + ["data.spacing=[1.2,1.2,3.6]"])
    spec = load_dataset(data)
    items, _ = split_cases(spec, cfg)
    ds = build_train_loader(cfg, items, 3, spec.label_map, torch.device("cpu"), 0, 8).dataset
    for i in range(6):
        patches = ds[i]
        assert get_track_meta()
        ds.transform.set_random_state(seed=_sample_seed(ds.seed, i))
        tracked = ds.transform(ds.base[ds.case_index(i)])  # metadata on (MONAI's default)
        assert len(patches) == len(tracked) == 2
        for p, t in zip(patches, tracked):
            for key in ("image", "label"):
                assert type(p[key]) is torch.Tensor
                assert torch.equal(p[key], torch.as_tensor(t[key])), (i, key)
    with pytest.raises(RuntimeError, match="boom"), metadata_tracking(False):
        assert not get_track_meta()
        raise RuntimeError("boom")
    assert get_track_meta()


def test_kernel_warmup_starts_only_on_cuda_and_refuses_bad_settings(tmp_path):
    """The background warm-up (ul3d.engine.warm) starts no process off CUDA; unknown phases and a bad
    train.warm_kernels are refused before any work (running it on the CPU would put Triton's interpreter through a
    whole training step: minutes; the CUDA test below runs it)."""
    from ul3d.engine.train import _network_spec
    from ul3d.engine.warm import start_kernel_warmup, stop_kernel_warmup, warm_kernels

    cfg = load_config("prostate", FAST)
    spec = _network_spec(cfg, 2, 3)
    with pytest.raises(ValueError, match="phases must be among"):
        warm_kernels(spec, "cpu", [16, 16, 16], 2, 2, False, phases=("train", "test"))
    assert start_kernel_warmup(spec, torch.device("cpu"), [16, 16, 16], 2, 2, False) == []
    stop_kernel_warmup([])
    data = write_synthetic("msd-prostate", tmp_path / "data", n_cases=3, seed=7)
    with pytest.raises(ValueError, match="train.warm_kernels must be true, false or auto"):
        train(load_config("prostate", FAST + ["data.spacing=[1.2,1.2,3.6]", "train.warm_kernels=sometimes"]), data,
              tmp_path / "bad", device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernel_warmup_runs_the_network_on_cuda():
    """On CUDA the warm-up runs a training step and the validation copy of the run's network in the background
    processes it starts, which exit cleanly."""
    from ul3d.engine.train import _network_spec
    from ul3d.engine.warm import PROCESSES, start_kernel_warmup, stop_kernel_warmup, warm_kernels

    spec = _network_spec(load_config("prostate", FAST), 2, 3)
    warm_kernels(spec, "cuda", [32, 32, 32], 2, 2, True)
    procs = start_kernel_warmup(spec, torch.device("cuda"), [32, 32, 32], 2, 2, True)
    assert len(procs) == len(PROCESSES)
    for proc in procs:
        proc.join(timeout=600)
    assert [proc.exitcode for proc in procs] == [0] * len(procs)
    stop_kernel_warmup(procs)
