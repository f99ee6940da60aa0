"""The competition metric, the submission format conversions and the metric CLI."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from common.constants import STUDY_COL, TARGETS
from common.metric import (
    SubmissionError, align, best_constant, competition_score, constant_score,
    expected_row_ids, main, per_label_table, pooled_score, submission_to_wide,
    validate_submission, wide_to_submission,
)

UIDS = ["1.2.826.0.1.3680043.10001", "1.2.826.0.1.3680043.10002", "1.2.826.0.1.3680043.777"]


def _labels(n: int = 60, seed: int = 0) -> np.ndarray:
    """Random consistent labels (n, 8): patient_overall = max(C1..C7)."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 8)) < 0.15).astype(float)
    y[:, 7] = y[:, :7].max(axis=1)
    return y


def _wide(values: np.ndarray, uids: list[str]) -> pd.DataFrame:
    frame = pd.DataFrame(values, columns=list(TARGETS))
    frame.insert(0, STUDY_COL, uids)
    return frame


def _two_studies() -> tuple[np.ndarray, np.ndarray]:
    # Study A: nothing broken, p = 0.1 everywhere.
    # Study B: C2 broken (so patient_overall too); p(C2) = 0.8, p(overall) = 0.5, others 0.2.
    y = np.zeros((2, 8))
    y[1, 1] = y[1, 7] = 1
    p = np.full((2, 8), 0.1)
    p[1] = [0.2, 0.8, 0.2, 0.2, 0.2, 0.2, 0.2, 0.5]
    return y, p


def test_two_studies_by_hand():
    y, p = _two_studies()
    # A: weights 7*1 + 7 = 14, every loss -ln 0.9, so L_A = -ln 0.9 = 0.1053605.
    sum_a = 14 * -math.log(0.9)
    # B: weights C1 1, C2 2, C3..C7 5*1, overall 14 -> 22.
    #    losses: six negatives -ln(1-0.2) = -ln 0.8 (weight 1 each), C2 -ln 0.8 (weight 2),
    #    overall -ln 0.5 = ln 2 (weight 14): 8 * 0.2231436 + 14 * 0.6931472 = 11.4892089.
    sum_b = 8 * -math.log(0.8) + 14 * math.log(2)
    assert sum_b == pytest.approx(11.4892089, abs=1e-7)
    row_normalised = (sum_a / 14 + sum_b / 22) / 2      # (0.1053605 + 0.5222368) / 2
    pooled = (sum_a + sum_b) / (14 + 22)                # 12.9642560 / 36
    assert row_normalised == pytest.approx(0.3137986, abs=1e-7)
    assert pooled == pytest.approx(0.3601182, abs=1e-7)
    assert competition_score(y, p) == pytest.approx(row_normalised, rel=1e-12)
    assert pooled_score(y, p) == pytest.approx(pooled, rel=1e-12)
    # The two readings differ: B has the larger row sum, so pooling weighs it more.
    assert pooled_score(y, p) - competition_score(y, p) > 0.04


def test_constant_half_is_ln2_and_perfect_is_zero():
    y = _labels()
    assert competition_score(y, np.full_like(y, 0.5)) == pytest.approx(math.log(2), abs=1e-12)
    assert pooled_score(y, np.full_like(y, 0.5)) == pytest.approx(math.log(2), abs=1e-12)
    assert competition_score(y, y) < 1e-12
    assert pooled_score(y, y) < 1e-12


def test_hard_wrong_predictions_are_clipped_and_finite():
    y = _labels()
    worst = competition_score(y, 1.0 - y)
    assert np.isfinite(worst)
    # -ln(1e-15) = 34.5388 per label (1 - 1e-15 rounds slightly in float64)
    assert worst == pytest.approx(-math.log(1e-15), rel=1e-4)
    assert np.isfinite(pooled_score(y, 1.0 - y))


def test_bad_inputs_raise():
    y = _labels(5)
    with pytest.raises(ValueError, match="shape"):
        competition_score(y, np.full((5, 7), 0.5))
    with pytest.raises(ValueError, match="NaN"):
        competition_score(y, np.full((5, 8), np.nan))
    with pytest.raises(ValueError, match="0 or 1"):
        competition_score(np.full((5, 8), 0.3), np.full((5, 8), 0.5))


@pytest.mark.parametrize("pooled", [False, True])
def test_best_constant_beats_nearby_constants(pooled):
    y = _labels(200, seed=3)
    c = best_constant(y, pooled=pooled)
    best = constant_score(y, c, pooled=pooled)
    for j in range(8):
        for step in (-0.02, -0.005, 0.005, 0.02):
            nearby = c.copy()
            nearby[j] += step
            assert constant_score(y, nearby, pooled=pooled) > best
    assert best < constant_score(y, y.mean(axis=0), pooled=pooled)


def test_best_constant_pooled_is_2m_over_1_plus_m():
    y = _labels(200, seed=4)
    m = y.mean(axis=0)
    np.testing.assert_allclose(best_constant(y, pooled=True), 2 * m / (1 + m), rtol=1e-12)
    # Row-normalised optimum sits lower: positive studies have larger row sums.
    assert (best_constant(y) < best_constant(y, pooled=True)).all()


def test_reference_values_on_train_like_labels():
    """Labels with train.csv's marginals reproduce the published constant scores."""
    rng = np.random.default_rng(0)
    positives = np.array([146, 285, 73, 108, 162, 277, 393], dtype=float)
    per_patient = np.repeat([1, 2, 3, 4, 5, 6], [623, 239, 64, 26, 7, 2])
    y = np.zeros((2019, 8))
    for i in np.argsort(-per_patient, kind="stable"):
        chosen = rng.choice(7, size=per_patient[i], replace=False, p=positives / positives.sum())
        y[i, chosen] = 1
        positives[chosen] = np.maximum(positives[chosen] - 1, 1e-9)
    y[:, 7] = y[:, :7].max(axis=1)
    assert constant_score(y, np.full(8, 0.5)) == pytest.approx(0.6931, abs=1e-4)
    assert constant_score(y, y.mean(axis=0)) == pytest.approx(0.5638, abs=2e-3)
    assert constant_score(y, best_constant(y)) == pytest.approx(0.5573, abs=2e-3)
    assert best_constant(y)[7] == pytest.approx(0.531, abs=5e-3)


def test_per_label_table():
    y = _labels(40)
    y[:, 2] = 0                                        # C3 has a single class
    p = np.full_like(y, 0.5)
    p[:, 0] = y[:, 0] * 0.8 + 0.1                      # C1 separates perfectly
    table = per_label_table(y, p)
    assert list(table.index) == list(TARGETS)
    assert table.loc["C1", "positives"] == int(y[:, 0].sum())
    assert table.loc["C1", "auc"] == pytest.approx(1.0)
    assert np.isnan(table.loc["C3", "auc"])
    assert table.loc["C4", "wlogloss"] == pytest.approx(math.log(2))
    assert table.loc["patient_overall", "prevalence"] == pytest.approx(y[:, 7].mean())


def test_wide_submission_round_trip_in_test_order():
    rng = np.random.default_rng(1)
    wide = _wide(rng.uniform(0.01, 0.99, (3, 8)), UIDS)
    test = pd.DataFrame({"row_id": expected_row_ids(UIDS)})
    test[STUDY_COL] = np.repeat(UIDS, 8)
    test["prediction_type"] = list(TARGETS) * 3
    test = test.sample(frac=1.0, random_state=0).reset_index(drop=True)
    sub = wide_to_submission(wide, test)
    assert list(sub.columns) == ["row_id", "fractured"]
    assert sub["row_id"].tolist() == test["row_id"].tolist()
    assert sub["row_id"].str.endswith("_patient_overall").sum() == 3
    back = submission_to_wide(sub).set_index(STUDY_COL).loc[UIDS]
    np.testing.assert_allclose(back.to_numpy(), wide[list(TARGETS)].to_numpy(), rtol=1e-12)
    assert back.loc[UIDS[2], "patient_overall"] == wide.loc[2, "patient_overall"]


def test_wide_to_submission_fallback_and_clip():
    test = pd.DataFrame({"row_id": expected_row_ids(UIDS[:2])})
    wide = _wide(np.zeros((1, 8)), UIDS[:1])
    with pytest.raises(ValueError, match=UIDS[1]):
        wide_to_submission(wide, test)
    sub = wide_to_submission(wide, test, fallback=np.linspace(0.1, 0.8, 8))
    values = sub["fractured"].to_numpy()
    assert (values[:8] == 1e-4).all()                  # 0 clipped to PRED_CLIP
    np.testing.assert_allclose(values[8:], np.linspace(0.1, 0.8, 8))


def test_align_names_missing_studies():
    labels = _wide(_labels(3), UIDS)
    preds = _wide(np.full((2, 8), 0.3), UIDS[:2])
    with pytest.raises(SubmissionError, match=UIDS[2].replace(".", r"\.")):
        align(labels, preds)
    y, p = align(labels.iloc[:2], pd.concat([preds, _wide(np.zeros((1, 8)), ["9.9"])]))
    assert y.shape == p.shape == (2, 8)


def _good_submission(uids: list[str]) -> pd.DataFrame:
    ids = expected_row_ids(uids)
    return pd.DataFrame({"row_id": ids, "fractured": np.full(len(ids), 0.3)})


def test_validate_submission_names_bad_rows():
    expected = expected_row_ids(UIDS)
    validate_submission(_good_submission(UIDS), expected)          # no error
    sub = _good_submission(UIDS)
    sub.loc[3, "fractured"] = np.nan
    sub.loc[4, "fractured"] = 1.5
    sub = pd.concat([sub.drop(index=10), sub.iloc[[0]],
                     pd.DataFrame({"row_id": ["x_C1"], "fractured": [0.1]})], ignore_index=True)
    with pytest.raises(SubmissionError) as info:
        validate_submission(sub, expected)
    problems, message = info.value.problems, str(info.value)
    assert problems["missing"] == [expected[10]]
    assert problems["duplicated"] == [expected[0]]
    assert problems["unexpected"] == ["x_C1"]
    assert problems["NaN or not a finite number"] == [expected[3]]
    assert problems["out of range [0, 1]"] == [expected[4]]
    for row_id in (expected[10], expected[0], "x_C1", expected[3], expected[4]):
        assert row_id in message


def test_validate_submission_shortens_long_lists_and_checks_columns():
    many = [f"1.2.{i}" for i in range(5)]
    with pytest.raises(SubmissionError, match=r"missing \(32 rows\).*and 22 more"):
        validate_submission(_good_submission(many[:1]), expected_row_ids(many))
    with pytest.raises(SubmissionError, match="columns"):
        validate_submission(_good_submission(UIDS).rename(columns={"fractured": "p"}),
                            expected_row_ids(UIDS))


def _write_labels(path, y: np.ndarray, uids: list[str]) -> None:
    frame = _wide(y.astype(int), uids)
    frame[[STUDY_COL, "patient_overall", *TARGETS[:7]]].to_csv(path, index=False)


def test_cli_prints_score_last(tmp_path, capsys):
    y, p = _two_studies()
    _write_labels(tmp_path / "labels.csv", y, UIDS[:2])
    wide_to_submission(_wide(p, UIDS[:2]), pd.DataFrame({"row_id": expected_row_ids(UIDS[:2])}),
                       clip=None).to_csv(tmp_path / "sub.csv", index=False)
    assert main([str(tmp_path / "labels.csv"), str(tmp_path / "sub.csv")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == "score 0.313799"
    assert any(line.startswith("pooled 0.360118") for line in lines)
    assert any(line.startswith("patient_overall") for line in lines)


def test_cli_bad_submission_exits_2_with_row_ids(tmp_path, capsys):
    _write_labels(tmp_path / "labels.csv", _labels(3), UIDS)
    sub = _good_submission(UIDS)
    bad_id = sub.loc[7, "row_id"]
    sub.drop(index=7).to_csv(tmp_path / "sub.csv", index=False)
    assert main([str(tmp_path / "labels.csv"), str(tmp_path / "sub.csv")]) == 2
    captured = capsys.readouterr()
    assert bad_id in captured.err and "missing" in captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert main([str(tmp_path / "nope.csv"), str(tmp_path / "sub.csv")]) == 2
    assert "nope.csv" in capsys.readouterr().err
