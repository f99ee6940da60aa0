"""Stage-2 CV report and calibration on hand-made out-of-fold files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common.constants import PRED_CLIP, STUDY_COL, TARGETS
from common.metric import best_constant, competition_score, constant_score, pooled_score
from configs import config_path
from stage2_cls.calibration import IDENTITY, MIN_STUDIES, apply_calibration, choose_calibration, fit_calibration
from stage2_cls.report import ReportError, main, read_oof


def make_oof_run(root: Path, n: int = 120, n_folds: int = 3, seed: int = 0) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """train.csv in root/data, OOF files in root/work/stage2/demo; predictions informative but overconfident."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 7)) < 0.15).astype(int)
    y = np.concatenate([y, y.max(1, keepdims=True)], axis=1)
    uids = [f"9.8.{i}" for i in range(n)]
    data_dir = root / "data"
    data_dir.mkdir(parents=True)
    labels = pd.DataFrame(y, columns=list(TARGETS))
    labels.insert(0, STUDY_COL, uids)
    labels[[STUDY_COL, "patient_overall", *TARGETS[:7]]].to_csv(data_dir / "train.csv", index=False)
    z = 3.0 * (2 * y - 1) + rng.normal(scale=3.0, size=y.shape) - 1.0
    p = np.clip(1 / (1 + np.exp(-z)), *PRED_CLIP)
    run_dir = root / "work" / "stage2" / "demo"
    run_dir.mkdir(parents=True)
    folds = np.arange(n) % n_folds
    for k in range(n_folds):
        part = pd.DataFrame(p[folds == k], columns=list(TARGETS))
        part.insert(0, STUDY_COL, np.array(uids)[folds == k])
        part.to_csv(run_dir / f"oof_fold{k}.csv", index=False)
    return data_dir, root / "work", y, p


def test_identity_calibration_changes_nothing():
    p = np.random.default_rng(1).uniform(0.01, 0.99, (5, 8))
    assert np.allclose(apply_calibration(p, IDENTITY), p)
    assert np.allclose(apply_calibration(p, None), p)
    cold = {"use": False, "vertebra": {"temperature": 0.1, "bias": 3.0}, "overall": IDENTITY["overall"]}
    assert np.allclose(apply_calibration(p, cold), p)  # a calibration marked unused is not applied
    hot = apply_calibration(p, {"vertebra": {"temperature": 2.0, "bias": 0.0}, "overall": IDENTITY["overall"]})
    assert (np.abs(hot[:, :7] - 0.5) < np.abs(p[:, :7] - 0.5)).all() and np.allclose(hot[:, 7], p[:, 7])
    with pytest.raises(ValueError, match="shape"):
        apply_calibration(p[:, :7], IDENTITY)


def test_report_scores_match_metric_and_calibration_helps(tmp_path, capsys):
    data_dir, work_dir, y, p = make_oof_run(tmp_path)
    report = main(["--data-dir", str(data_dir), "--work-dir", str(work_dir),
                   "--config", str(config_path("demo/stage2.yaml"))])
    assert report["score"] == pytest.approx(competition_score(y, p))
    assert report["pooled_score"] == pytest.approx(pooled_score(y, p))
    assert report["constant_score"] == pytest.approx(constant_score(y, best_constant(y)))
    calibration = report["calibration"]
    # The predictions are overconfident by design: a temperature above 1 is found, and it
    # improves the held-out folds when fitted on the others, so it is used.
    assert calibration["use"] is True
    assert calibration["vertebra"]["temperature"] > 1.2
    assert calibration["evidence"]["cross_validated_score"] < report["score"] - 0.01
    assert calibration["evidence"]["fitted_score_same_data"] <= calibration["evidence"]["cross_validated_score"]
    run_dir = work_dir / "stage2" / "demo"
    for name in ("cv_report.json", "cv_report.md", "calibration.json", "roc_curves.png", "calibration.png"):
        assert (run_dir / name).is_file() and (run_dir / name).stat().st_size > 0, name
    calib = json.loads((run_dir / "calibration.json").read_text())
    assert np.allclose(apply_calibration(p, calib), apply_calibration(p, report["calibration"]))
    per_label = {row["label"]: row for row in report["per_label"]}
    assert set(per_label) == set(TARGETS) and "auc" in per_label["C1"]
    assert "competition score" in capsys.readouterr().out


def test_calibration_never_worse_on_its_own_data():
    rng = np.random.default_rng(2)
    y = (rng.random((60, 8)) < 0.3).astype(float)
    y[:, 7] = y[:, :7].max(1)
    p = np.full(y.shape, 0.5)  # already the flat prior: little to gain, nothing to lose
    calib = fit_calibration(y, p)
    assert competition_score(y, apply_calibration(p, calib)) <= competition_score(y, p) + 1e-12


def test_calibration_refused_on_few_separable_studies():
    """The demo's old failure: 9 separable validation studies gave temperature 0.05, bias -4.6."""
    rng = np.random.default_rng(3)
    y = (rng.random((9, 8)) < 0.3).astype(float)
    y[:, 7] = y[:, :7].max(1)
    p = np.where(y > 0, 0.8, 0.3)  # perfectly separable, under-confident
    chosen = choose_calibration(y, p, np.arange(9) % 3)
    assert chosen["use"] is False and "too few" in chosen["reason"]
    assert np.allclose(apply_calibration(p, chosen), np.clip(p, *PRED_CLIP))
    # Even when forced to fit, the prior keeps the fit on 9 studies mild.
    fitted = fit_calibration(y, p)
    assert 0.25 <= fitted["overall"]["temperature"] and abs(fitted["overall"]["bias"]) < 3.0


def test_calibration_refused_when_it_does_not_help_held_out_folds():
    rng = np.random.default_rng(4)
    n = 3 * MIN_STUDIES
    y = (rng.random((n, 8)) < 0.2).astype(float)
    y[:, 7] = y[:, :7].max(1)
    # Already the best constant per label, with a little uninformative jitter: nothing to gain.
    z = np.log(best_constant(y) / (1 - best_constant(y))) + rng.normal(scale=0.05, size=(n, 8))
    p = 1 / (1 + np.exp(-z))
    chosen = choose_calibration(y, p, np.arange(n) % 4)
    assert chosen["use"] is False and "raw probabilities" in chosen["reason"]
    assert chosen["evidence"]["cross_validated_score"] >= chosen["evidence"]["raw_score"] * 0.995


def test_read_oof_errors(tmp_path):
    with pytest.raises(ReportError, match="no oof_fold"):
        read_oof(tmp_path)
    pd.DataFrame({STUDY_COL: ["a"], "C1": [0.1]}).to_csv(tmp_path / "oof_fold0.csv", index=False)
    with pytest.raises(ReportError, match="lacks columns"):
        read_oof(tmp_path)
