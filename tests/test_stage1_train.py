"""Stage-1 training, DDP, kill-and-resume and prediction on a tiny synthetic dataset."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from common.checkpoint import load_checkpoint
from common.config import load_config
from tooling.synth import make_dataset
from stage1_seg import predict, train
from stage1_seg.boxes import apply_box_offsets, cube_slices, read_box_offsets
from configs import config_path
from stage1_seg.config import Stage1Config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["run=tiny", "preprocess.size=32", "model.encoder=efficientnet-b0", "model.pretrained=false",
        "model.decoder_channels=[16,16,8,8,8]", "train.batch_size=2", "train.val_batch_size=2",
        "train.num_workers=0", "train.eval_every=2", "train.warmup_steps=1", "augment.elastic_p=0.5",
        "predict.folds=[0]"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("s1data")
    make_dataset(root, n_train=7, n_seg=6, n_test=1, size=48, seed=11, workers=1)
    return root


def _cfg(*extra):
    return load_config(Stage1Config, None, [*TINY, *extra])


@pytest.mark.slow
def test_train_one_fold_writes_everything(data, tmp_path):
    metrics = train.run(_cfg("train.steps=4"), data, tmp_path, fold=0)
    fold_dir = tmp_path / "stage1" / "tiny" / "fold0"
    for name in ("best.pt", "last.pt", "log.csv", "metrics.json", "config.yaml", "learning_curves.png"):
        assert (fold_dir / name).is_file(), name
    written = json.loads((fold_dir / "metrics.json").read_text())
    per_class = [written[f"dice_C{c}"] for c in range(1, 8)]
    assert written["mean_dice"] == pytest.approx(np.mean(per_class))
    assert written["mean_dice"] == pytest.approx(metrics["mean_dice"])
    assert written["mean_dice"] == pytest.approx(written["mean_dice@0.5"])
    assert written["best_threshold"] in train.THRESHOLDS
    assert len(pd.read_csv(fold_dir / "log.csv")) == 2
    ckpt = load_checkpoint(fold_dir / "last.pt", stage="stage1")
    assert ckpt["config"]["preprocess"]["size"] == 32 and ckpt["step"] == 4
    # the cache is keyed by the preprocessing settings
    assert list((tmp_path / "cache" / "stage1").iterdir())[0].name.startswith("size32-")

    summary = predict.run(_cfg(), data, tmp_path, splits=["train", "test"])
    assert summary["failed"] == [] and summary["studies"] == 8
    boxes = pd.read_csv(tmp_path / "stage1" / "tiny" / "boxes.csv", dtype={"StudyInstanceUID": str})
    assert len(boxes) == 8 * 7 and set(boxes["status"]) <= {"found", "weak", "missing"}
    with np.load(next((tmp_path / "stage1" / "tiny" / "masks").glob("*.npz"))) as npz:
        assert npz["probs"].shape == (7, 32, 32, 32) and npz["probs"].dtype == np.uint8
    assert summary["ziou_studies"] == 6
    # the slice-range bias is fitted on the 6 studies with masks and applied to every box
    run_dir = tmp_path / "stage1" / "tiny"
    assert summary["box_offsets_fitted_on"] == 6
    offsets = read_box_offsets(run_dir / "box_offsets.json")
    assert np.allclose(offsets, summary["box_offsets"], atol=1e-3)
    for uid, rows in boxes.groupby("StudyInstanceUID"):
        path = run_dir / "masks" / f"{uid}.npz"
        with np.load(path) as npz:
            vox, n = cube_slices(npz["region"], npz["probs"].shape[1]), int(npz["shape"][0])
        expected = apply_box_offsets(predict.boxes_from_npz(path, uid), offsets, vox, n)
        assert rows[["z0", "z1"]].to_numpy().tolist() == expected[["z0", "z1"]].to_numpy().tolist()
    again = predict.run(_cfg(), data, tmp_path, splits=["train", "test"])
    assert again["predicted"] == 0 and again["skipped"] == 8  # resumable
    # the test split alone has no masks: the run's fitted file is used
    test_only = predict.run(_cfg(), data, tmp_path, splits=["test"])
    assert test_only["box_offsets_fitted_on"] == "box_offsets.json"
    no_offsets = predict.run(_cfg("predict.box_offsets=false"), data, tmp_path, splits=["test"])
    assert no_offsets["box_offsets"] is None


@pytest.mark.slow
def test_softmax_head_trains_and_predicts_seven_maps(data, tmp_path):
    cfg = _cfg("train.steps=2", "model.head=softmax", "run=tinysoft")
    metrics = train.run(cfg, data, tmp_path, fold=0)
    assert 0.0 <= metrics["mean_dice"] <= 1.0 and np.isfinite(metrics["val_loss"])
    ckpt = load_checkpoint(tmp_path / "stage1" / "tinysoft" / "fold0" / "last.pt", stage="stage1")
    assert ckpt["config"]["model"]["head"] == "softmax"
    summary = predict.run(cfg, data, tmp_path, splits=["test"])
    assert summary["failed"] == [] and summary["studies"] == 1
    with np.load(next((tmp_path / "stage1" / "tinysoft" / "masks").glob("*.npz"))) as npz:
        probs = npz["probs"].astype(np.int64)
    assert probs.shape == (7, 32, 32, 32) and probs.sum(0).max() <= 255 + 7  # one distribution per voxel


def _train_cmd(data, work, *extra):
    return [sys.executable, "-m", "stage1_seg.train", "--fold", "0", "--data-dir", str(data),
            "--work-dir", str(work), "--config", str(config_path("stage1.yaml")), *TINY, *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_torchrun_two_ranks_stay_in_sync(data, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           *_train_cmd(data, tmp_path, "train.steps=2")[1:]]
    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "stage1" / "tiny" / "fold0" / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    a, b = metrics["rank_weight_checksums"]
    assert a == b


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_weights(data, tmp_path):
    epochs = "train.steps=6"
    full = subprocess.run(_train_cmd(data, tmp_path / "full", epochs), cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-3000:]
    work = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(data, work, epochs), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = work / "stage1" / "tiny" / "fold0" / "last.pt"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if last.exists() and load_checkpoint(last)["step"] >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.2)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training ended before it could be killed"
    assert load_checkpoint(last)["step"] < 6
    resumed = subprocess.run(_train_cmd(data, work, epochs, ) + ["--resume"], cwd=ROOT, env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_checkpoint(tmp_path / "full" / "stage1" / "tiny" / "fold0" / "last.pt")
    b = load_checkpoint(last)
    assert a["step"] == b["step"] == 6
    assert all(torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-5) for k in a["model"])
