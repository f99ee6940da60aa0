"""Stage-1 Dice at the study's own resolution (``stage1_seg.boxes.study_dice``)."""
import numpy as np
import pytest

from stage1_seg.boxes import study_dice


def _labels():
    labels = np.zeros((20, 16, 16), np.uint8)
    for c in range(5):  # C1..C5 stacked head to feet, 4 slices each; C6 and C7 absent
        labels[4 * c:4 * c + 4, 4:12, 5:11] = c + 1
    return labels


def _probs(labels, dtype=np.uint8):
    onehot = np.stack([labels == c + 1 for c in range(7)]).astype(np.float32)
    return np.round(onehot * 255).astype(np.uint8) if dtype == np.uint8 else onehot


def test_a_mask_on_the_study_grid_scores_one_and_absent_vertebrae_count_one():
    labels = _labels()
    region = np.array([0, 20, 0, 16, 0, 16])
    assert study_dice(_probs(labels), region, labels) == pytest.approx(np.ones(7))
    assert study_dice(_probs(labels, np.float32), region, labels) == pytest.approx(np.ones(7))


def test_misses_and_false_positives_count():
    labels = _labels()
    region = np.array([0, 20, 0, 16, 0, 16])
    probs = _probs(labels)
    probs[1] = 0                      # C2 missed entirely
    probs[6, 0:2, 0:2, 0:2] = 255     # C7 predicted where there is none
    probs[2, 8:10] = 0                # half of C3 missed
    dice = study_dice(probs, region, labels)
    assert dice[1] == 0.0 and dice[6] == 0.0
    assert dice[2] == pytest.approx(2 * 96 / (96 + 192))
    assert dice[[0, 3, 4, 5]] == pytest.approx(np.ones(4))


def test_truth_outside_the_region_is_missed_and_padding_is_ignored():
    labels = _labels()
    # the cube covers slices 8..27: 12 of the study's slices and 8 of padding below its last one
    region = np.array([8, 28, 0, 16, 0, 16])
    probs = np.zeros((7, 20, 16, 16), np.uint8)
    probs[:, :12] = _probs(labels)[:, 8:]
    probs[4, 15:] = 255               # a prediction in the padding: never compared with anything
    dice = study_dice(probs, region, labels)
    assert dice[0] == 0.0 and dice[1] == 0.0               # C1, C2 lie above the region
    assert dice[2:5] == pytest.approx(np.ones(3))
    assert dice[5:] == pytest.approx(np.ones(2))


def test_a_coarser_cube_is_interpolated_onto_the_study():
    labels = _labels()
    region = np.array([0, 20, 0, 16, 0, 16])
    coarse = _probs(labels, np.float32)[:, ::2, ::2, ::2]   # (7, 10, 8, 8)
    dice = study_dice(coarse, region, labels)
    assert dice.shape == (7,) and (dice[:5] > 0.5).all() and (dice[:5] < 1.0).all()
