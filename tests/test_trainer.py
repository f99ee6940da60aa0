"""The shared training loop: outputs, step schedule, selection, resume, reseeding, checkpoint errors."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch.utils.data import Dataset

from common import trainer
from common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from common.trainer import StepSampler, TrainConfig, fit, warmup_cosine
from tests.toy_task import ToyTask

CFG = TrainConfig(steps=24, eval_every=6, batch_size=4, val_batch_size=3, lr=1e-2, warmup_steps=3,
                  num_workers=0, seed=3)


def test_fit_writes_outputs_and_learns(tmp_path):
    task = ToyTask()
    result = fit(task, CFG, tmp_path, fold=0, full_config={"a": 1})
    for name in ("last.pt", "best.pt", "log.csv", "metrics.json", "learning_curves.png", "config.yaml"):
        assert (tmp_path / name).is_file(), name
    log = pd.read_csv(tmp_path / "log.csv")
    assert list(log["step"]) == [6, 12, 18, 24]
    assert log["train_loss"].iloc[-1] < log["train_loss"].iloc[0]
    assert log["neg_mse"].iloc[-1] > log["neg_mse"].iloc[0]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # select="last": the final weights, with the final validation's figures
    assert metrics["selected_step"] == 24 and metrics["neg_mse"] == pytest.approx(log["neg_mse"].iloc[-1])
    assert metrics["n"] == 10  # every validation sample scored once
    assert result["selected_step"] == metrics["selected_step"]
    assert task.best_calls == 4  # the selected weights changed at every validation
    ckpt = load_checkpoint(tmp_path / "last.pt", stage="toy")
    assert ckpt["step"] == 24 and ckpt["fold"] == 0 and ckpt["config"] == {"a": 1}
    assert isinstance(ckpt["git_commit"], str)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {"a": 1}


def test_select_best_keeps_the_best_validation(tmp_path):
    cfg = TrainConfig(**{**CFG.__dict__, "select": "best", "lr": 0.3})  # noisy on purpose
    result = fit(ToyTask(), cfg, tmp_path, fold=0, full_config={})
    log = pd.read_csv(tmp_path / "log.csv")
    best_row = log.loc[log["neg_mse"].idxmax()]
    assert result["selected_step"] == best_row["step"]
    assert load_checkpoint(tmp_path / "best.pt")["step"] == best_row["step"]


def test_steps_not_passes_over_the_data(tmp_path):
    """A smaller training set gets the same number of optimiser steps."""
    small, large = fit(ToyTask(n_train=8), CFG, tmp_path / "a", fold=0, full_config={}), \
        fit(ToyTask(n_train=80), CFG, tmp_path / "b", fold=0, full_config={})
    assert load_checkpoint(tmp_path / "a" / "last.pt")["step"] == 24 == \
        load_checkpoint(tmp_path / "b" / "last.pt")["step"]
    assert small["steps"] == large["steps"] == 24
    sampler = StepSampler(length=5, n_samples=12, seed=0)
    drawn = list(sampler)
    assert len(drawn) == 12 and sorted(drawn[:5]) == list(range(5)) and sorted(drawn[5:10]) == list(range(5))


def test_step_sampler_draws_in_proportion_to_weights():
    weights = np.array([4.0, 1.0, 1.0, 1.0, 1.0])
    drawn = np.array(list(StepSampler(length=5, n_samples=8000, seed=1, weights=weights)))
    assert np.bincount(drawn, minlength=5)[0] / 8000 == pytest.approx(0.5, abs=0.02)
    assert list(StepSampler(5, 50, seed=2, weights=weights)) == list(StepSampler(5, 50, seed=2, weights=weights))
    assert list(StepSampler(5, 50, seed=2, weights=weights)) != list(StepSampler(5, 50, seed=3, weights=weights))


def test_ema_weights_are_what_is_saved(tmp_path):
    cfg = TrainConfig(**{**CFG.__dict__, "ema_decay": 0.9})
    fit(ToyTask(), cfg, tmp_path, fold=0, full_config={})
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert set(ckpt["train_model"]) == set(ckpt["model"])
    assert any(not torch.equal(ckpt["train_model"][k], ckpt["model"][k]) for k in ckpt["model"])


class _Killed(Exception):
    pass


def _dying_task(at_call: int) -> ToyTask:
    task = ToyTask()
    original, calls = task.compute_metrics, {"n": 0}

    def dying(outputs):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise _Killed()
        return original(outputs)

    task.compute_metrics = dying
    return task


@pytest.mark.parametrize("ema", [0.0, 0.8])
def test_resume_after_kill_gives_same_result(tmp_path, ema):
    cfg = TrainConfig(**{**CFG.__dict__, "ema_decay": ema})
    full = fit(ToyTask(), cfg, tmp_path / "full", fold=0, full_config={})
    with pytest.raises(_Killed):  # "killed" during the third validation
        fit(_dying_task(3), cfg, tmp_path / "resumed", fold=0, full_config={})
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["step"] == 12
    resumed = fit(ToyTask(), cfg, tmp_path / "resumed", fold=0, full_config={}, resume=True)
    assert resumed["last"]["train_loss"] == pytest.approx(full["last"]["train_loss"], rel=1e-6)
    assert resumed["neg_mse"] == pytest.approx(full["neg_mse"], rel=1e-6)
    a = load_checkpoint(tmp_path / "full" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


def test_kill_between_best_and_last_leaves_consistent_files(tmp_path, monkeypatch):
    """best.pt is written before last.pt: a kill between them never leaves last.pt naming unsaved weights."""
    cfg = TrainConfig(**{**CFG.__dict__, "select": "best"})
    full = fit(ToyTask(), cfg, tmp_path / "full", fold=0, full_config={})
    real_save, writes = trainer.save_checkpoint, []

    def dying_save(path, **state):
        writes.append(path.name)
        if path.name == "last.pt" and len(writes) >= 4 and writes[-2] == "best.pt":
            raise _Killed()  # best.pt of this validation is on disk, last.pt is not
        real_save(path, **state)

    monkeypatch.setattr(trainer, "save_checkpoint", dying_save)
    with pytest.raises(_Killed):
        fit(ToyTask(), cfg, tmp_path / "run", fold=0, full_config={})
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["step"] > last["step"]  # newer weights in best.pt than last.pt records: never the reverse
    resumed = fit(ToyTask(), cfg, tmp_path / "run", fold=0, full_config={}, resume=True)
    assert resumed["selected_step"] == full["selected_step"]
    assert load_checkpoint(tmp_path / "run" / "best.pt")["step"] == resumed["selected_step"]
    a, b = load_checkpoint(tmp_path / "full" / "best.pt")["model"], load_checkpoint(tmp_path / "run" / "best.pt")["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


def test_resume_rejects_other_config_before_writing_anything(tmp_path):
    cfg = TrainConfig(steps=2, eval_every=2, num_workers=0)
    fit(ToyTask(), cfg, tmp_path, fold=0, full_config={"x": 1})
    with pytest.raises(CheckpointError, match="different config"):
        fit(ToyTask(), cfg, tmp_path, fold=0, full_config={"x": 2}, resume=True)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == {"x": 1}


def test_resume_refuses_a_run_selected_on_another_metric(tmp_path):
    """select=best cannot compare validations scored on another metric (an older version's run)."""
    cfg = TrainConfig(steps=2, eval_every=2, num_workers=0, select="best")
    fit(ToyTask(), cfg, tmp_path, fold=0, full_config={"x": 1})

    class OtherMetric(ToyTask):
        metric = "n"

    longer = TrainConfig(steps=4, eval_every=2, num_workers=0, select="best")
    with pytest.raises(CheckpointError, match="selected on 'neg_mse'.*selects on 'n'"):
        fit(OtherMetric(), longer, tmp_path, fold=0, full_config={"x": 1}, resume=True)
    assert fit(ToyTask(), longer, tmp_path, fold=0, full_config={"x": 1}, resume=True)["steps"] == 4
    # select=last keeps the last weights whatever the metric: such a run resumes.
    last = TrainConfig(steps=2, eval_every=2, num_workers=0)
    fit(ToyTask(), last, tmp_path / "last", fold=0, full_config={"x": 1})
    resumed = fit(OtherMetric(), TrainConfig(steps=4, eval_every=2, num_workers=0), tmp_path / "last", fold=0,
                  full_config={"x": 1}, resume=True)
    assert resumed["selected_step"] == 4


class _Draws(Dataset):
    """Every item is the same sample; what it returns is a fresh random draw (like augmentation)."""

    def __init__(self) -> None:
        self.generator = np.random.default_rng(0)

    def reseed(self, seed: int) -> None:
        self.generator = np.random.default_rng(seed)

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> dict:
        return {"x": torch.tensor([self.generator.random(), np.random.random()])}


class _DrawTask(ToyTask):
    def __init__(self) -> None:
        super().__init__()
        self.draws: list[tuple[float, float]] = []

    def datasets(self):
        return _Draws(), super().datasets()[1]

    def loss(self, model, batch, device):
        self.draws.append(tuple(batch["x"][0].tolist()))
        return (model(torch.zeros(1, 4)) ** 2).mean()


def test_augmentation_draws_differ_per_worker_and_chunk_and_repeat_on_rerun(tmp_path):
    """2 workers x 2 chunks: four different draws of the same sample, the same four on a rerun."""
    cfg = TrainConfig(steps=4, eval_every=2, batch_size=1, val_batch_size=5, num_workers=2, seed=9)
    runs = []
    for k in range(2):
        task = _DrawTask()
        fit(task, cfg, tmp_path / str(k), fold=0, full_config={})
        runs.append(task.draws)
    assert len(runs[0]) == 4 and len(set(runs[0])) == 4  # own generator and NumPy both differ
    assert len({d[0] for d in runs[0]}) == 4 and len({d[1] for d in runs[0]}) == 4
    assert runs[0] == runs[1]


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


def test_weight_average_matches_timms_update_and_copies_integer_buffers():
    from timm.utils import ModelEmaV2
    from torch import nn

    from common.trainer import WeightAverage
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Linear(6, 3))
    ours, timms = WeightAverage(model, decay=0.9), ModelEmaV2(model, decay=0.9)
    for step in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()(torch.randn(2, 2, 8, 8))        # moves BatchNorm's statistics and batch count
        ours.decay = timms.decay = 0.5 + 0.1 * step
        ours.update(model)
        timms.update(model)
    for (name, a), b, m in zip(ours.module.state_dict().items(), timms.module.state_dict().values(),
                               model.state_dict().values()):
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-6), name
            assert not torch.allclose(a, m), name       # an average, not a copy
        else:
            assert a == m == 5, name                      # the batch count follows the model
