"""Stage-2 training: the loss weighting, the dataset, and a one-epoch run() on tiny crops."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from common.config import load_config, replace
from common.constants import STUDY_COL, TARGETS
from common.folds import load_or_make_folds
from common.io import save_npz_atomic
from configs import config_path
from common.metric import competition_score, label_weights
from stage2_cls.config import Stage2Config
from stage2_cls.dataset import CropStore, VertebraDataset, fill_missing
from stage2_cls.infer import Stage2Ensemble
from stage2_cls.model import weighted_loss
from stage2_cls.train import run, study_probabilities



def fracture_stack(rng: np.random.Generator, n_slices: int, size: int, fractured: bool) -> np.ndarray:
    """uint8 (S, 6, H, W): a bright disc (the vertebra) with a dark line across it when fractured."""
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 3) ** 2
    stack = rng.integers(0, 40, (n_slices, 6, size, size)).astype(np.uint8)
    stack[:, :5][:, :, disc] = 180
    stack[:, 5][:, disc] = 255
    if fractured:
        stack[:, :5, size // 2 - 1: size // 2 + 1, :] = 0
    return stack


def make_crop_data(root: Path, n_studies: int = 6, n_slices: int = 4, size: int = 32,
                   seed: int = 0) -> tuple[Path, Path, pd.DataFrame]:
    """train.csv under root/data and crop files under root/work/crops; returns (data, work, labels)."""
    rng = np.random.default_rng(seed)
    data_dir, crops = root / "data", root / "work" / "crops"
    data_dir.mkdir(parents=True)
    uids = [f"1.2.3.{i}" for i in range(n_studies)]
    y = np.zeros((n_studies, 7), int)
    positive = np.arange(0, n_studies, 2)  # every other study has one fractured vertebra
    y[positive, rng.integers(0, 7, size=len(positive))] = 1
    labels = pd.DataFrame(y, columns=list(TARGETS[:7]))
    labels.insert(0, STUDY_COL, uids)
    labels.insert(1, "patient_overall", y.max(axis=1))
    labels.to_csv(data_dir / "train.csv", index=False)
    for i, uid in enumerate(uids):
        stacks = np.stack([fracture_stack(rng, n_slices, size, bool(y[i, v])) for v in range(7)])
        missing = np.zeros(7, bool)
        if i == 1:  # one vertebra stage 1 did not find: an empty stack
            missing[6] = True
            stacks[6] = 0
        save_npz_atomic(crops / f"{uid}.npz", stacks=stacks, missing=missing,
                        slices=np.tile(np.arange(n_slices), (7, 1)))
    load_or_make_folds(data_dir, root / "work", n_folds=2)  # the folds file is where their number is set
    return data_dir, root / "work", labels


def tiny_config(**changes) -> Stage2Config:
    cfg = load_config(Stage2Config, config_path("demo/stage2.yaml"))
    return replace(cfg, **{"model.lstm_hidden": 8, "train.steps": 5, "train.eval_every": 5,
                           "train.warmup_steps": 1, "train.batch_size": 4, "train.val_batch_size": 8,
                           "train.num_workers": 0, "train.cpu_bf16": False, **changes})  # fp32 as inference


def test_weighted_loss_matches_metric_weights_by_hand():
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0])
    y = np.zeros((4, 8))
    y[[0, 3], [2, 5]] = 1  # place the four labels in the metric's vertebra columns
    weights = torch.tensor([label_weights(y)[0, 2], label_weights(y)[1, 2], label_weights(y)[2, 0],
                            label_weights(y)[3, 5]], dtype=torch.float32)
    assert weights.tolist() == [2.0, 1.0, 1.0, 2.0]
    slice_logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5], [-3.0, 1.0, 0.0], [0.0, 0.0, 4.0]])
    got = weighted_loss({"slice_logits": slice_logits}, labels, weights)

    def bce(logit, t):
        p = 1 / (1 + math.exp(-logit))
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))
    per_sample = [np.mean([bce(z, t) for z in row]) for row, t in zip(slice_logits.tolist(), labels.tolist())]
    w = weights.tolist()
    expected = sum(wi * li for wi, li in zip(w, per_sample)) / sum(w)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # Attention pooling: one BCE per sample on the weighted slice logit.
    attention = torch.tensor([[1.0, 0.0, 0.0], [0.2, 0.3, 0.5], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]])
    got = weighted_loss({"slice_logits": slice_logits, "attention": attention}, labels, weights)
    pooled = (attention * slice_logits).sum(1).tolist()
    expected = sum(wi * bce(z, t) for wi, z, t in zip(w, pooled, labels.tolist())) / sum(w)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_study_probabilities_noisy_or_and_max():
    p = np.array([[0.1, 0.2, 0.0, 0.0, 0.0, 0.0, 0.5]])
    noisy = study_probabilities(p, "noisy_or")
    assert noisy.shape == (1, 8)
    assert noisy[0, 7] == pytest.approx(1 - 0.9 * 0.8 * 0.5)
    assert noisy[0, 2] == pytest.approx(1e-4)  # clipped to PRED_CLIP
    assert study_probabilities(p, "max")[0, 7] == pytest.approx(0.5)
    filled = fill_missing(p, np.eye(1, 7, 6, dtype=bool), np.full(7, 0.3))
    assert filled[0, 6] == 0.3 and filled[0, 0] == 0.1


def test_dataset_items_labels_weights_and_missing(tmp_path):
    data_dir, work_dir, labels = make_crop_data(tmp_path)
    uids = labels[STUDY_COL].tolist()
    store = CropStore(work_dir / "crops", uids, lru_studies=2)
    y = labels[list(TARGETS[:7])].to_numpy()
    train = VertebraDataset(store, y, train=True)
    val = VertebraDataset(store, y, train=False)
    assert len(val) == 6 * 7 and len(train) == 6 * 7 - 1  # the missing vertebra is not trained on
    item = val[2 * 7 + int(np.argmax(y[2]))]
    assert item["image"].dtype == torch.uint8 and tuple(item["image"].shape) == (4, 6, 32, 32)
    assert item["label"].item() == 1.0 and item["weight"].item() == 2.0
    assert val[1 * 7 + 6]["missing"].item() and val[1 * 7 + 6]["image"].max() == 0
    assert len(store._cache) <= 2
    decoded = CropStore(work_dir / "crops", uids, decoded_dir=tmp_path / "decoded")
    assert np.array_equal(decoded.stack(3, 4), store.stack(3, 4))
    assert (tmp_path / "decoded" / f"{uids[3]}.npy").is_file()


def test_positive_oversampling_keeps_the_expected_loss(tmp_path):
    """Fractures drawn k times as often weigh 1/k as much: sum of draw rate x loss weight is unchanged."""
    _, work_dir, labels = make_crop_data(tmp_path)
    store = CropStore(work_dir / "crops", labels[STUDY_COL].tolist())
    y = labels[list(TARGETS[:7])].to_numpy()
    plain, over = VertebraDataset(store, y, train=True), VertebraDataset(store, y, train=True, positive_oversampling=4)
    assert plain.sample_weights is None and VertebraDataset(store, y, train=False, positive_oversampling=4).sample_weights is None
    positive = y[over.items[:, 0], over.items[:, 1]] > 0.5
    assert positive.any() and (~positive).any()
    assert np.array_equal(over.sample_weights, np.where(positive, 4.0, 1.0))
    plain_w = np.array([plain[j]["weight"].item() for j in range(len(plain))])
    over_w = np.array([over[j]["weight"].item() for j in range(len(over))])
    assert np.allclose(over_w[positive], plain_w[positive] / 4) and np.array_equal(over_w[~positive], plain_w[~positive])
    rate = over.sample_weights / over.sample_weights.sum() * len(over)  # draws per item, relative to uniform
    assert np.sum(rate * over_w * positive) / np.sum(rate * over_w) == pytest.approx(
        np.sum(plain_w * positive) / np.sum(plain_w))
    with pytest.raises(ValueError, match="positive_oversampling"):
        VertebraDataset(store, y, train=True, positive_oversampling=0)


def test_run_one_epoch_writes_metrics_and_oof(tmp_path, caplog):
    data_dir, work_dir, labels = make_crop_data(tmp_path)
    (work_dir / "crops" / "1.2.3.5.npz").unlink()  # a study without crops is skipped, not fatal
    cfg = tiny_config()
    with caplog.at_level(logging.WARNING):
        metrics = run(cfg, data_dir, work_dir, fold=0)
    assert "without a crop file" in caplog.text
    fold_dir = work_dir / "stage2" / "demo" / "fold0"
    for name in ("log.csv", "metrics.json", "best.pt", "last.pt", "config.yaml"):
        assert (fold_dir / name).is_file(), name
    saved = json.loads((fold_dir / "metrics.json").read_text())
    assert math.isfinite(saved["score"]) and saved["score"] == pytest.approx(metrics["score"])
    assert {"pooled_score", "constant_score", "auc_vertebra", "val_loss"} <= set(saved)
    assert saved["calibrated_score"] == pytest.approx(saved["score"])  # too few studies to calibrate
    oof = pd.read_csv(work_dir / "stage2" / "demo" / "oof_fold0.csv", dtype={STUDY_COL: str})
    assert list(oof.columns) == [STUDY_COL, *TARGETS]
    values = oof[list(TARGETS)].to_numpy()
    assert ((values > 0) & (values < 1)).all()
    folds = pd.read_csv(work_dir / "folds.csv", dtype={STUDY_COL: str})
    expected = set(folds.loc[folds["fold"] == 0, STUDY_COL]) - {"1.2.3.5"}
    assert set(oof[STUDY_COL]) == expected
    y = labels.set_index(STUDY_COL).loc[oof[STUDY_COL], list(TARGETS)].to_numpy()
    assert competition_score(y, values) == pytest.approx(saved["score"], rel=1e-6)
    assert len(pd.read_csv(fold_dir / "log.csv")) == 1


def test_run_attention_pooling_with_mixup_matches_inference(tmp_path):
    """The OOF file written in training equals what the inference ensemble gives from best.pt."""
    data_dir, work_dir, labels = make_crop_data(tmp_path, seed=1)
    cfg = tiny_config(**{"model.pooling": "attention", "augment.mixup_p": 1.0, "overall": "max"})
    run(cfg, data_dir, work_dir, fold=1)
    oof = pd.read_csv(work_dir / "stage2" / "demo" / "oof_fold1.csv", dtype={STUDY_COL: str})
    ensemble = Stage2Ensemble([work_dir / "stage2" / "demo" / "fold1" / "best.pt"], device=torch.device("cpu"))
    store = CropStore(work_dir / "crops", oof[STUDY_COL].tolist())
    for i, row in oof.iterrows():
        vertebra = ensemble.predict(store.study(i), store.missing[i])["type1"]
        present = ~store.missing[i]
        assert np.allclose(row[list(TARGETS[:7])].to_numpy(float)[present], np.clip(vertebra, 1e-4, 1 - 1e-4)[present],
                           atol=1e-5)
        assert row["patient_overall"] == pytest.approx(row[list(TARGETS[:7])].max())  # overall: max
    # the OOF file was made with the config's test-time flips; one view alone gives other probabilities
    assert cfg.tta == "flips"
    single = Stage2Ensemble([work_dir / "stage2" / "demo" / "fold1" / "best.pt"], device=torch.device("cpu"),
                            tta="none")
    assert not np.allclose(single.predict(store.study(0), store.missing[0])["type1"],
                           ensemble.predict(store.study(0), store.missing[0])["type1"], atol=1e-5)
    assert np.allclose(ensemble.predict(store.study(0), store.missing[0], tta="none")["type1"],
                       single.predict(store.study(0), store.missing[0])["type1"])


def test_flip_tta_needs_flips_in_training(tmp_path):
    data_dir, work_dir, _ = make_crop_data(tmp_path)
    with pytest.raises(ValueError, match="augment.flip_p is 0"):
        run(tiny_config(**{"augment.flip_p": 0.0}), data_dir, work_dir, fold=0)
    assert not (work_dir / "stage2").exists()  # refused before anything was written
    run(tiny_config(**{"augment.flip_p": 0.0, "tta": "none"}), data_dir, work_dir, fold=0)
    assert (work_dir / "stage2" / "demo" / "oof_fold0.csv").is_file()


def test_study_loss_is_the_competition_metric():
    """Type 2 trains on the metric itself: with every slice of a vertebra at the same logit,
    the loss equals the competition score of the implied probabilities."""
    from stage2_cls.model import study_loss

    rng = np.random.default_rng(0)
    y = (rng.random((5, 8)) < 0.3).astype(np.float64)
    y[:, 7] = y[:, :7].max(1)
    z = rng.normal(size=(5, 8))
    output = {"slice_logits": torch.tensor(z[:, :7, None].repeat(4, axis=2), dtype=torch.float32),
              "overall_logit": torch.tensor(z[:, 7], dtype=torch.float32)}
    no_missing = torch.zeros(5, 7, dtype=torch.bool)
    loss = study_loss(output, torch.tensor(y), no_missing).item()
    assert loss == pytest.approx(competition_score(y, 1 / (1 + np.exp(-z))), rel=1e-5)
    # a missing vertebra weighs nothing: changing its logit changes nothing
    missing = no_missing.clone()
    missing[2, 4] = True
    a = study_loss(output, torch.tensor(y), missing).item()
    output["slice_logits"][2, 4] += 5.0
    assert study_loss(output, torch.tensor(y), missing).item() == pytest.approx(a, rel=1e-6)


def test_label_smoothing_softens_the_targets_not_the_weights():
    from stage2_cls.model import study_loss

    eps = 0.1
    labels = torch.tensor([1.0, 0.0])
    weights = torch.tensor([2.0, 1.0])
    z = torch.tensor([[3.0, -1.0], [0.5, -4.0]])

    def bce(logit, t):
        p = 1 / (1 + math.exp(-logit))
        return -(t * math.log(p) + (1 - t) * math.log(1 - p))
    soft = [1 - eps / 2, eps / 2]
    per_sample = [np.mean([bce(v, t) for v in row]) for row, t in zip(z.tolist(), soft)]
    expected = (2.0 * per_sample[0] + 1.0 * per_sample[1]) / 3.0
    assert weighted_loss({"slice_logits": z}, labels, weights, eps).item() == pytest.approx(expected, rel=1e-5)
    # A positive at the logit that meets its soft target is no longer pushed further out;
    # with hard labels it still is.
    at_target = torch.full((1, 3), math.log((1 - eps / 2) / (eps / 2)), requires_grad=True)
    weighted_loss({"slice_logits": at_target}, labels[:1], weights[:1], eps).backward()
    assert at_target.grad.abs().max().item() < 1e-6
    at_target.grad = None
    weighted_loss({"slice_logits": at_target}, labels[:1], weights[:1]).backward()
    assert (at_target.grad < -1e-3).all()
    # Type 2: the metric's weights (2 / 1, patient_overall 14 / 7) stay those of the hard labels.
    y = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 1.0]])
    logits = torch.tensor([[0.4, -1.0, -2.0, 0.0, 1.0, -0.5, -3.0, 0.7]])
    output = {"slice_logits": logits[:, :7, None].repeat(1, 1, 2), "overall_logit": logits[:, 7]}
    w = [2.0] + [1.0] * 6 + [14.0]
    t = [1 - eps / 2] + [eps / 2] * 6 + [1 - eps / 2]
    expected = sum(wi * bce(zi, ti) for wi, zi, ti in zip(w, logits[0].tolist(), t)) / sum(w)
    got = study_loss(output, y, torch.zeros(1, 7, dtype=torch.bool), eps).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_run_refuses_label_smoothing_outside_0_1(tmp_path):
    data_dir, work_dir, _ = make_crop_data(tmp_path)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="label_smoothing"):
            run(tiny_config(label_smoothing=bad), data_dir, work_dir, fold=0)
    assert not (work_dir / "stage2").exists()


def test_run_type2_writes_a_learned_overall(tmp_path):
    data_dir, work_dir, labels = make_crop_data(tmp_path)
    metrics = run(tiny_config(**{"model.type": 2, "train.batch_size": 2, "run": "demo-type2",
                                 "type2.steps": 4, "type2.eval_every": 2}), data_dir, work_dir, fold=0)
    assert 0 < metrics["score"] < 2
    log = pd.read_csv(work_dir / "stage2" / "demo-type2" / "fold0" / "log.csv")
    assert log["step"].tolist() == [2, 4]                 # type2's schedule, not train's 5 steps
    oof = pd.read_csv(work_dir / "stage2" / "demo-type2" / "oof_fold0.csv", dtype={STUDY_COL: str})
    p = oof[list(TARGETS)].to_numpy()
    noisy_or = 1 - np.prod(1 - p[:, :7], axis=1)
    assert not np.allclose(p[:, 7], noisy_or, atol=1e-3)  # patient_overall comes from the learned head
    ckpt = torch.load(work_dir / "stage2" / "demo-type2" / "fold0" / "best.pt", weights_only=True)
    assert any(k.startswith("patient_lstm.") for k in ckpt["model"])
