import json
import math

import pandas as pd
import pytest
import torch

from common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from common.trainer import TrainConfig, fit, warmup_cosine
from tests.toy_task import ToyTask

CFG = TrainConfig(epochs=4, batch_size=4, val_batch_size=3, lr=1e-2, warmup_epochs=1, num_workers=0, seed=3)


def test_fit_writes_outputs_and_learns(tmp_path):
    task = ToyTask()
    result = fit(task, CFG, tmp_path, fold=0, full_config={"a": 1})
    for name in ("last.pt", "best.pt", "log.csv", "metrics.json", "learning_curves.png"):
        assert (tmp_path / name).is_file(), name
    log = pd.read_csv(tmp_path / "log.csv")
    assert list(log["epoch"]) == [1, 2, 3, 4]
    assert log["train_loss"].iloc[-1] < log["train_loss"].iloc[0]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["neg_mse"] == pytest.approx(log["neg_mse"].max())
    assert metrics["n"] == 10  # every validation sample scored once
    assert result["best_epoch"] == metrics["best_epoch"]
    assert task.best_calls >= 1
    ckpt = load_checkpoint(tmp_path / "last.pt", stage="toy")
    assert ckpt["epoch"] == 3 and ckpt["fold"] == 0 and ckpt["config"] == {"a": 1}
    assert isinstance(ckpt["git_commit"], str)


def test_resume_after_kill_gives_same_result(tmp_path):
    full = fit(ToyTask(), CFG, tmp_path / "full", fold=0, full_config={})
    # "Kill" after two epochs: train a run whose config says 4 epochs but stop it early.
    class Killed(Exception):
        pass

    task = ToyTask()
    original = task.compute_metrics
    calls = {"n": 0}

    def dying(outputs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Killed()
        return original(outputs)

    task.compute_metrics = dying
    with pytest.raises(Killed):
        fit(task, CFG, tmp_path / "resumed", fold=0, full_config={})
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1
    resumed = fit(ToyTask(), CFG, tmp_path / "resumed", fold=0, full_config={}, resume=True)
    assert resumed["last"]["train_loss"] == pytest.approx(full["last"]["train_loss"], rel=1e-6)
    assert resumed["neg_mse"] == pytest.approx(full["neg_mse"], rel=1e-6)
    a = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


def test_resume_rejects_other_config(tmp_path):
    fit(ToyTask(), TrainConfig(epochs=1, num_workers=0), tmp_path, fold=0, full_config={"x": 1})
    with pytest.raises(CheckpointError, match="different config"):
        fit(ToyTask(), TrainConfig(epochs=1, num_workers=0), tmp_path, fold=0, full_config={"x": 2}, resume=True)


def test_truncated_and_foreign_checkpoints_give_clear_errors(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, stage="toy", model_state={"w": torch.ones(3)}, config={}, fold=0, epoch=0)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.pt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}}, foreign)
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="expected stage2"):
        load_checkpoint(good, stage="stage2")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_warmup_cosine_shape():
    f = warmup_cosine(total_steps=100, warmup_steps=10, min_ratio=0.01)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.01)
