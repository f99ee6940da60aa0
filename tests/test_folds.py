"""Seeded multilabel-stratified folds and their write-once folds.csv."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from common.constants import STUDY_COL, TARGETS
from common.folds import (
    FoldsError, fold_imbalance, list_segmentation_uids, load_or_make_folds, make_folds,
    split_uids,
)


def _labels(n: int, seed: int = 0, rate: float = 0.1) -> pd.DataFrame:
    """train.csv-like frame with n studies; patient_overall = max(C1..C7)."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 7)) < rate).astype(int)
    frame = pd.DataFrame(y, columns=list(TARGETS[:7]))
    frame.insert(0, "patient_overall", y.max(axis=1))
    frame.insert(0, STUDY_COL, [f"1.2.826.0.1.3680043.{u}" for u in rng.permutation(10 * n)[:n]])
    return frame


def test_every_study_in_one_balanced_stratified_fold():
    labels = _labels(200)
    folds = make_folds(labels, seg_uids=[], n_folds=5, seed=42)
    assert list(folds.columns) == [STUDY_COL, "fold", "seg_fold"]
    assert folds[STUDY_COL].tolist() == labels[STUDY_COL].tolist()      # caller's order
    assert set(folds["fold"]) == set(range(5))
    sizes = folds["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 1
    merged = folds.merge(labels, on=STUDY_COL)
    overall = merged["patient_overall"].mean()
    per_fold = merged.groupby("fold")["patient_overall"].mean()
    # 40 studies a fold: 0.05 is two studies off the fair share.
    assert (per_fold - overall).abs().max() <= 0.05
    y = merged[list(TARGETS)].to_numpy()
    assert fold_imbalance(y, merged["fold"].to_numpy(), 5) <= 2.0


def test_validation_sets_partition_the_studies():
    labels = _labels(50)
    folds = make_folds(labels, seg_uids=[], n_folds=5, seed=1)
    seen = []
    for k in range(5):
        train, val = split_uids(folds, k)
        assert not set(train) & set(val)
        assert len(train) + len(val) == 50
        seen += val
    assert sorted(seen) == sorted(labels[STUDY_COL])
    with pytest.raises(FoldsError, match="out of range"):
        split_uids(folds, 5)


def test_seg_folds_only_for_segmented_studies():
    labels = _labels(120)
    seg = labels[STUDY_COL].iloc[::4].tolist()                           # 30 studies
    folds = make_folds(labels, seg_uids=seg + ["9.9.9"], n_folds=5, seed=42)
    is_seg = folds[STUDY_COL].isin(seg)
    assert (folds.loc[~is_seg, "seg_fold"] == -1).all()
    seg_sizes = folds.loc[is_seg, "seg_fold"].value_counts()
    assert sorted(seg_sizes.index) == list(range(5)) and seg_sizes.max() - seg_sizes.min() <= 1
    train, val = split_uids(folds, 0, column="seg_fold")
    assert set(train) | set(val) == set(seg)


def test_few_segmented_studies_use_plain_kfold_or_fail_clearly():
    labels = _labels(40)
    folds = make_folds(labels, seg_uids=labels[STUDY_COL].iloc[:7], n_folds=5, seed=0)
    assert sorted(folds.loc[folds["seg_fold"] >= 0, "seg_fold"].value_counts()) == [1, 1, 1, 2, 2]
    with pytest.raises(FoldsError, match="only 3 segmented studies for 5"):
        make_folds(labels, seg_uids=labels[STUDY_COL].iloc[:3], n_folds=5, seed=0)


def test_deterministic_for_seed_and_row_order():
    labels = _labels(150)
    seg = labels[STUDY_COL].iloc[:40]
    first = make_folds(labels, seg, n_folds=5, seed=7)
    shuffled = make_folds(labels.sample(frac=1.0, random_state=3), seg, n_folds=5, seed=7)
    pd.testing.assert_frame_equal(first, shuffled.set_index(STUDY_COL).loc[
        labels[STUDY_COL]].reset_index())
    other = make_folds(labels, seg, n_folds=5, seed=8)
    assert (first["fold"] != other["fold"]).any()
    assert (first["seg_fold"] != other["seg_fold"]).any()


def test_all_negative_labels_still_split():
    labels = _labels(30, rate=0.0)
    folds = make_folds(labels, labels[STUDY_COL], n_folds=3, seed=0)
    assert sorted(folds["fold"].value_counts()) == [10, 10, 10]
    assert sorted(folds["seg_fold"].value_counts()) == [10, 10, 10]


def _data_dir(tmp_path, n: int = 30, n_seg: int = 10):
    data = tmp_path / "data"
    (data / "segmentations").mkdir(parents=True)
    labels = _labels(n)
    labels.to_csv(data / "train.csv", index=False)
    for i, uid in enumerate(labels[STUDY_COL].iloc[:n_seg]):
        (data / "segmentations" / (uid + (".nii" if i % 2 else ".nii.gz"))).touch()
    (data / "segmentations" / "notes.txt").touch()
    return data, labels


def test_list_segmentation_uids(tmp_path):
    data, labels = _data_dir(tmp_path)
    assert list_segmentation_uids(data / "segmentations") == sorted(labels[STUDY_COL].iloc[:10])
    assert list_segmentation_uids(tmp_path / "absent") == []


def test_load_or_make_folds_writes_once_and_reuses(tmp_path, caplog):
    data, labels = _data_dir(tmp_path)
    work = tmp_path / "work"
    caplog.set_level("INFO", logger="common.folds")
    first = load_or_make_folds(data, work, n_folds=5, seed=3)
    assert "wrote" in caplog.text
    settings = json.loads((work / "folds.json").read_text())
    assert (settings["n_folds"], settings["seed"], settings["n_studies"]) == (5, 3, 30)
    assert (first["seg_fold"] >= 0).sum() == 10
    mtime = (work / "folds.csv").stat().st_mtime_ns
    again = load_or_make_folds(data, work, n_folds=5, seed=3)
    assert (work / "folds.csv").stat().st_mtime_ns == mtime
    assert "reusing" in caplog.text
    pd.testing.assert_frame_equal(first, again)
    assert again[STUDY_COL].tolist() == labels[STUDY_COL].tolist()    # UIDs read back as text
    assert not list(work.glob(".*.tmp"))


def test_load_or_make_folds_refuses_mismatches(tmp_path):
    data, labels = _data_dir(tmp_path)
    work = tmp_path / "work"
    load_or_make_folds(data, work, n_folds=5, seed=3)
    with pytest.raises(FoldsError, match="n_folds=5 seed=3.*delete"):
        load_or_make_folds(data, work, n_folds=4, seed=3)
    with pytest.raises(FoldsError, match="seed=4 was requested"):
        load_or_make_folds(data, work, n_folds=5, seed=4)
    labels.iloc[:-1].to_csv(data / "train.csv", index=False)
    with pytest.raises(FoldsError, match="1 gone"):
        load_or_make_folds(data, work, n_folds=5, seed=3)
    labels.to_csv(data / "train.csv", index=False)
    (data / "segmentations" / (labels[STUDY_COL].iloc[20] + ".nii")).touch()
    with pytest.raises(FoldsError, match="segmented studies"):
        load_or_make_folds(data, work, n_folds=5, seed=3)


def test_load_or_make_folds_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.csv"):
        load_or_make_folds(tmp_path / "nothing", tmp_path / "work")
    data, _ = _data_dir(tmp_path, n=30, n_seg=3)
    with pytest.raises(FoldsError, match="train.csv: only 3 segmented studies"):
        load_or_make_folds(data, tmp_path / "work", n_folds=5)
    assert not (tmp_path / "work" / "folds.csv").exists()
