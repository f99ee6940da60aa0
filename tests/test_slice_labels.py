"""Slice-level fracture labels from train_bounding_boxes.csv: parsing, matching, augmentation, training."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from common.constants import STUDY_COL
from common.io import save_npz_atomic
from stage2_cls.augment import StackAugmenter
from stage2_cls.dataset import CropStore, VertebraDataset
from stage2_cls.infer import Stage2Ensemble
from stage2_cls.model import box_loss, build_model
from stage2_cls.slice_labels import BOXES_CSV, read_box_slices, slice_targets
from stage2_cls.train import batch_loss, run
from tests.test_stage2_train import make_crop_data, tiny_config


def test_read_box_slices_parses_and_refuses_bad_rows(tmp_path):
    assert read_box_slices(tmp_path) == {}  # no file: no slice labels, no error
    pd.DataFrame({STUDY_COL: ["1.2", "1.2", "1.2", "1.3"], "x": 1.0, "y": 1.0, "width": 2.0, "height": 2.0,
                  "slice_number": [7, 5, 7, 12]}).to_csv(tmp_path / BOXES_CSV, index=False)
    boxes = read_box_slices(tmp_path)
    assert sorted(boxes) == ["1.2", "1.3"]
    assert boxes["1.2"].tolist() == [5, 7] and boxes["1.3"].tolist() == [12]
    pd.DataFrame({STUDY_COL: ["1.2", "1.2"], "slice_number": [3, 4.5]}).to_csv(tmp_path / BOXES_CSV, index=False)
    with pytest.raises(ValueError, match=rf"{BOXES_CSV}.*row 3 has 4.5"):
        read_box_slices(tmp_path)
    pd.DataFrame({STUDY_COL: ["1.2"], "x": [1]}).to_csv(tmp_path / BOXES_CSV, index=False)
    with pytest.raises(ValueError, match="no column slice_number"):
        read_box_slices(tmp_path)


def test_slice_targets_match_instance_numbers_within_the_context():
    # A study numbered feet to head: slice index 0 (the head) is InstanceNumber 20.
    numbers = np.arange(20, 0, -1)
    boxes = np.array([11, 12])  # InstanceNumbers 11 and 12 = slice indices 9 and 8
    centres = np.array([0, 5, 6, 8, 11, 12, 19])
    assert slice_targets(numbers, centres, 0, boxes).tolist() == [0, 0, 0, 1, 0, 0, 0]
    assert slice_targets(numbers, centres, 2, boxes).tolist() == [0, 0, 1, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="outside a study of 20 slices"):
        slice_targets(numbers, np.array([3, 20]), 2, boxes)


def _boxed_dataset(tmp_path, **augment):
    """Crops of make_crop_data with instance numbers; every fractured study has a box on slice index 1."""
    data_dir, work_dir, labels = make_crop_data(tmp_path, n_slices=4)
    uids = labels[STUDY_COL].tolist()
    for uid in uids:  # centres 0..3 of 10 slices numbered feet to head, boxes on InstanceNumber 9 = index 1
        path = work_dir / "crops" / f"{uid}.npz"
        with np.load(path) as npz:
            arrays = dict(npz)
        save_npz_atomic(path, **arrays, instance_numbers=np.arange(10, 0, -1))
    boxed = labels.loc[labels["patient_overall"] == 1, STUDY_COL].tolist()
    store = CropStore(work_dir / "crops", uids)
    y = labels[[f"C{i}" for i in range(1, 8)]].to_numpy()
    aug = StackAugmenter(tiny_config(**augment).augment) if augment else None
    data = VertebraDataset(store, y, train=True, augment=aug, box_slices={u: np.array([9]) for u in boxed[:-1]},
                           context=0)
    return data, y, boxed


def test_dataset_gives_known_slice_targets_and_moves_them_with_the_shuffle(tmp_path):
    data, y, boxed = _boxed_dataset(tmp_path)
    positive = y[data.items[:, 0], data.items[:, 1]] > 0
    boxed_rows = np.isin(np.array(data.store.uids)[data.items[:, 0]], boxed[:-1])
    # intact vertebrae: known, all zero; fractured with boxes: known, slice 1 only; the rest unknown
    assert data.box_known[~positive].all() and not data.box_targets[~positive].any()
    assert data.box_known[positive & boxed_rows].all()
    assert (data.box_targets[positive & boxed_rows] == [0, 1, 0, 0]).all()
    assert not data.box_known[positive & ~boxed_rows].any() and (positive & ~boxed_rows).any()

    plain = VertebraDataset(data.store, y, train=True)  # no boxes given: every item unknown, targets zero
    item = plain[int(np.flatnonzero(positive & boxed_rows)[0])]
    assert not bool(item["box_known"]) and item["box_target"].tolist() == [0.0] * 4

    shuffled, _, _ = _boxed_dataset(tmp_path / "shuffle", **{"augment.shuffle_p": 1.0, "augment.ssr_p": 0.0,
                                                             "augment.flip_p": 0.0})
    k = int(np.flatnonzero(shuffled.box_targets.any(axis=1))[0])
    marked = shuffled.store.stack(*shuffled.items[k]).copy()
    np.random.seed(3)
    moved = set()
    for _ in range(8):
        item = shuffled[k]
        # the target follows the slice it labels: find where slice 1's pixels went
        where = [j for j in range(4) if np.array_equal(item["image"][j, 5].numpy(), marked[1, 5])]
        assert item["box_target"].tolist() == [float(j in where) for j in range(4)]
        moved.add(int(np.argmax(item["box_target"].numpy())))
        assert bool(item["box_known"])
    assert len(moved) > 1  # the shuffle did move it


def test_box_loss_counts_known_samples_only_and_trains_the_head(tmp_path):
    cfg = tiny_config(**{"model.box_head_weight": 1.0})
    model = build_model(cfg.model, pretrained_source=False)
    x = torch.rand(3, 4, 6, 32, 32)
    out = model(x)
    assert out["box_logits"].shape == (3, 4)
    target = torch.tensor([[0, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    known = torch.tensor([True, True, False])
    logits = out["box_logits"].detach()
    w = torch.tensor([[1, 2, 1, 1], [1, 1, 1, 1]], dtype=torch.float32)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[:2], target[:2], reduction="none")
    assert box_loss(out, target, known).item() == pytest.approx(float((w * bce).sum() / w.sum()), rel=1e-5)
    none = box_loss(out, target, torch.zeros(3, dtype=torch.bool))
    assert none.item() == 0.0 and none.requires_grad  # still in the graph (DDP needs every output used)
    batch = {"image": (x * 255).to(torch.uint8), "label": torch.tensor([1.0, 0.0, 1.0]),
             "weight": torch.tensor([2.0, 1.0, 2.0]), "box_target": target, "box_known": known}
    with_head = batch_loss(cfg, model, batch, torch.device("cpu"))
    with_head.backward()
    assert model.box_head.weight.grad.abs().sum() > 0
    plain = batch_loss(tiny_config(**{"model.box_head_weight": 0.0}), model, batch, torch.device("cpu"))
    assert with_head.item() > plain.item()
    with pytest.raises(ValueError, match="box_head_weight"):
        build_model(tiny_config(**{"model.box_head_weight": -1.0}).model, pretrained_source=False)


def test_run_reads_the_boxes_file_and_reports_what_it_labelled(tmp_path, caplog):
    data_dir, work_dir, labels = make_crop_data(tmp_path)
    fractured = labels.loc[labels["patient_overall"] == 1, STUDY_COL].tolist()
    pd.DataFrame({STUDY_COL: fractured, "x": 1.0, "y": 1.0, "width": 3.0, "height": 3.0,
                  "slice_number": 2}).to_csv(data_dir / BOXES_CSV, index=False)
    with caplog.at_level(logging.INFO):
        metrics = run(tiny_config(**{"model.box_head_weight": 0.5}), data_dir, work_dir, fold=0)
    # make_crop_data's files predate instance numbers: said, and the run goes on without them
    assert "lack instance_numbers" in caplog.text
    assert "slice-level fracture labels: 0 of" in caplog.text
    assert np.isfinite(metrics["score"])
    # the checkpoint holds the head; inference rebuilds it and ignores its output
    ensemble = Stage2Ensemble([work_dir / "stage2" / "demo" / "fold0" / "best.pt"], device=torch.device("cpu"))
    store = CropStore(work_dir / "crops", labels[STUDY_COL].tolist()[:1])
    vertebra = ensemble.predict(store.study(0), store.missing[0])["type1"]
    assert vertebra.shape == (7,) and np.isfinite(vertebra).all()
