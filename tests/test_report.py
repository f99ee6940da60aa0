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
from stage2_cls import calibration as calibration_module
from stage2_cls.calibration import (IDENTITY, MIN_CONFIDENCE, MIN_STUDIES, apply_calibration, bootstrap_confidence,
                                  calibrated_validation_score, choose_calibration, fit_calibration)
from stage2_cls.train import ClassifierTask
from stage2_cls.calibration import invert_calibration
from stage2_cls.infer import study_probabilities
from stage2_cls.report import DEFAULT_RULES, ReportError, choose_rule, main, read_oof


def make_labels(root: Path, n: int = 120, seed: int = 0) -> tuple[Path, np.ndarray, list[str]]:
    """train.csv in root/data; returns (data dir, labels (n, 8), uids)."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 7)) < 0.15).astype(int)
    y = np.concatenate([y, y.max(1, keepdims=True)], axis=1)
    uids = [f"9.8.{i}" for i in range(n)]
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    labels = pd.DataFrame(y, columns=list(TARGETS))
    labels.insert(0, STUDY_COL, uids)
    labels[[STUDY_COL, "patient_overall", *TARGETS[:7]]].to_csv(data_dir / "train.csv", index=False)
    return data_dir, y, uids


def write_run(work: Path, name: str, kind: int, p: np.ndarray, uids: list[str], n_folds: int = 3) -> None:
    """OOF files and a fold config of a stage-2 run of model type ``kind``."""
    run_dir = work / "stage2" / name
    folds = np.arange(len(uids)) % n_folds
    for k in range(n_folds):
        part = pd.DataFrame(p[folds == k], columns=list(TARGETS))
        part.insert(0, STUDY_COL, np.array(uids)[folds == k])
        (run_dir / f"fold{k}").mkdir(parents=True, exist_ok=True)
        part.to_csv(run_dir / f"oof_fold{k}.csv", index=False)
        (run_dir / f"fold{k}" / "config.yaml").write_text(f"model:\n  type: {kind}\noverall: noisy_or\n")


def make_oof_run(root: Path, n: int = 120, n_folds: int = 3, seed: int = 0) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """A type-1 run root/work/stage2/demo: vertebra predictions informative but overconfident,
    patient_overall their noisy-OR (as type-1 training writes it)."""
    data_dir, y, uids = make_labels(root, n, seed)
    rng = np.random.default_rng(seed + 1)
    z = 3.0 * (2 * y - 1) + rng.normal(scale=3.0, size=y.shape) - 1.0
    p = study_probabilities(np.clip(1 / (1 + np.exp(-z[:, :7])), *PRED_CLIP))
    write_run(root / "work", "demo", 1, p, uids, n_folds)
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


def test_inverting_a_calibration_gives_back_what_it_was_applied_to():
    p = np.random.default_rng(7).uniform(0.01, 0.99, (6, 8))
    calib = {"use": True, "vertebra": {"temperature": 1.7, "bias": -0.4}, "overall": {"temperature": 0.6, "bias": 0.9}}
    calibrated = apply_calibration(p, calib)
    assert np.abs(calibrated - p).max() > 0.05
    assert np.allclose(invert_calibration(calibrated, calib), p, atol=1e-9)
    for unused in (None, {**calib, "use": False}):
        assert np.allclose(invert_calibration(p, unused), p)
    with pytest.raises(ValueError, match="shape"):
        invert_calibration(p[:, :7], calib)


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
    assert calibration["vertebra"]["temperature"] > 1.1
    assert calibration["evidence"]["cross_validated_score"] < report["score"] - 0.01
    assert calibration["evidence"]["fitted_score_same_data"] <= calibration["evidence"]["cross_validated_score"]
    assert report["chosen"] == "type 1" and list(report["candidates"]) == ["type 1"]
    out = work_dir / "stage2" / "report"
    for name in ("cv_report.json", "cv_report.md", "roc_curves.png", "calibration.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    ensemble = json.loads((work_dir / "stage2" / "ensemble.json").read_text())
    assert ensemble["runs"] == ["demo"] and ensemble["overall"] == "vertebrae"
    assert np.allclose(apply_calibration(p, ensemble["calibration"]), apply_calibration(p, report["calibration"]))
    per_label = {row["label"]: row for row in report["per_label"]}
    assert set(per_label) == set(TARGETS) and "type 1 auc" in per_label["C1"]
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


def test_calibration_kept_when_it_clearly_helps():
    """Over-confident predictions on 200 studies: the fix is large and holds in every resample."""
    rng = np.random.default_rng(5)
    n = 200
    y = (rng.random((n, 8)) < 0.2).astype(float)
    y[:, 7] = y[:, :7].max(1)
    z = 1.0 * (2 * y - 1) + rng.normal(scale=1.0, size=y.shape)
    p = 1 / (1 + np.exp(-3.0 * z))  # the right ranking, three times too extreme
    chosen = choose_calibration(y, p, np.arange(n) % 5)
    assert chosen["use"] is True
    assert chosen["evidence"]["bootstrap_confidence"] >= MIN_CONFIDENCE
    assert chosen["vertebra"]["temperature"] > 1.2  # it shrinks the log-odds back
    assert chosen["evidence"]["cross_validated_score"] < 0.9 * chosen["evidence"]["raw_score"]


def test_calibration_kept_on_a_small_set_only_when_the_model_is_far_off():
    """24 OOF studies from 5 folds, as a 24-study training set gives: an over-confident model
    (the right ranking, log-odds four times too large) is calibrated; a model that is already
    about right is left raw; under MIN_STUDIES nothing is fitted."""
    rng = np.random.default_rng(11)
    n = 24
    truth = np.empty((n, 8))
    truth[:, :7] = 1 / (1 + np.exp(-rng.normal(-1.5, 1.5, size=(n, 7))))
    truth[:, 7] = 1 - np.prod(1 - truth[:, :7], axis=1)
    y = (rng.random((n, 7)) < truth[:, :7]).astype(float)
    y = np.concatenate([y, y.max(1, keepdims=True)], axis=1)
    sane = 2 * truth / (1 + truth)  # the metric's optimum for these chances (positives weigh double)
    z = np.log(sane / (1 - sane))
    folds = np.arange(n) % 5
    wild = 1 / (1 + np.exp(-4.0 * z))
    chosen = choose_calibration(y, wild, folds)
    assert MIN_STUDIES <= n < 40
    assert chosen["use"] is True, chosen["reason"]
    assert chosen["vertebra"]["temperature"] > 1.5
    assert chosen["evidence"]["cross_validated_score"] < 0.85 * chosen["evidence"]["raw_score"]
    assert chosen["evidence"]["bootstrap_confidence"] >= MIN_CONFIDENCE
    assert choose_calibration(y, sane, folds)["use"] is False
    few = slice(0, MIN_STUDIES - 1)
    refused = choose_calibration(y[few], wild[few], folds[few])
    assert refused["use"] is False and "too few" in refused["reason"]


def test_bootstrap_confidence_is_the_share_of_resamples_won_and_seeded():
    y = np.zeros((40, 8))
    y[::4, [0, 7]] = 1
    p = np.full(y.shape, 0.3)
    better = np.where(y > 0, 0.4, 0.25)  # better on every study
    assert bootstrap_confidence(y, p, better) == 1.0
    assert bootstrap_confidence(y, better, p) == 0.0
    mixed = better.copy()
    mixed[1::2] = np.where(y[1::2] > 0, 0.2, 0.35)  # worse on half of them
    share = bootstrap_confidence(y, p, mixed)
    assert 0.0 < share < 1.0 and share == bootstrap_confidence(y, p, mixed)
    assert share != bootstrap_confidence(y, p, mixed, seed=1)


def test_calibration_refused_when_its_gain_rests_on_few_studies(monkeypatch):
    """A cross-validated gain above MIN_GAIN that comes from one study and is lost on the rest."""
    rng = np.random.default_rng(6)
    n = 60
    y = (rng.random((n, 8)) < 0.2).astype(float)
    y[:, 7] = y[:, :7].max(1)
    y[0] = 1
    p = np.clip(np.where(y > 0, 0.4, 0.2), *PRED_CLIP)
    p[0] = 0.02  # one study badly wrong raw

    def one_study_fixed(y_, p_, folds_):
        out = np.clip(p_ * 0.97, *PRED_CLIP)  # a little worse on the positives of every study ...
        out[0] = 0.9  # ... and the one bad study fixed
        return out

    monkeypatch.setattr(calibration_module, "cross_validated", one_study_fixed)
    chosen = choose_calibration(y, p, np.arange(n) % 5)
    evidence = chosen["evidence"]
    assert evidence["cross_validated_score"] < evidence["raw_score"] * 0.995  # the mean gain alone would keep it
    assert evidence["bootstrap_confidence"] < MIN_CONFIDENCE
    assert chosen["use"] is False and "resamples" in chosen["reason"]


def test_selection_score_prefers_the_better_ranking_that_calibration_fixes():
    """Validation A ranks well and is shifted; B ranks poorly and is centred. Raw, B looks better;
    as submitted (after the calibration the report fits), A is. Training selects on the latter."""
    rng = np.random.default_rng(7)
    n = 400
    y = (rng.random((n, 8)) < 0.15).astype(float)
    y[:, 7] = y[:, :7].max(1)
    base = np.log(best_constant(y) / (1 - best_constant(y)))
    shifted = 1 / (1 + np.exp(-(base + 1.5 * (2 * y - 1) + rng.normal(scale=1.0, size=y.shape) + 3.0)))
    weak = 1 / (1 + np.exp(-(base + 0.3 * (2 * y - 1) + rng.normal(scale=0.3, size=y.shape))))
    assert competition_score(y, weak) < competition_score(y, shifted)
    assert calibrated_validation_score(y, shifted) < calibrated_validation_score(y, weak)
    assert calibrated_validation_score(y, shifted) <= competition_score(y, shifted)
    assert ClassifierTask.metric == "calibrated_score" and ClassifierTask.metric_mode == "min"
    # Too few studies for a calibration: the raw score, as the report would submit raw.
    few = slice(0, 2 * MIN_STUDIES - 1)
    assert calibrated_validation_score(y[few], shifted[few]) == competition_score(y[few], shifted[few])


def test_type2_and_ensemble_compared_side_by_side_and_the_best_rule_kept(tmp_path):
    """A type-2 run whose learned patient_overall is better than the noisy-OR of the vertebrae."""
    data_dir, work_dir, y, p1 = make_oof_run(tmp_path)
    rng = np.random.default_rng(9)
    z2 = 2.0 * (2 * y - 1) + rng.normal(scale=1.0, size=y.shape) - 0.5
    p2 = np.clip(1 / (1 + np.exp(-z2)), *PRED_CLIP)
    write_run(work_dir, "demo-type2", 2, p2, [f"9.8.{i}" for i in range(len(y))])
    report = main(["--data-dir", str(data_dir), "--work-dir", str(work_dir), "--runs", "demo", "demo-type2",
                   "--config", str(config_path("demo/stage2.yaml"))])
    names = set(report["candidates"])
    assert names == {"type 1", "type 2", "type 2, overall from its vertebrae", "ensemble (vertebrae)",
                     "ensemble (type2)", "ensemble (mean)"}
    assert report["candidates"]["type 2"] == pytest.approx(competition_score(y, p2))
    assert report["score"] == min(report["candidates"].values())
    assert report["rule"]["overall"] in ("type2", "mean")  # the learned head beats the noisy-OR here
    choice = report["rule_choice"]  # by enough, on 120 studies, to leave the default
    assert choice["default"] == "ensemble (vertebrae)" and choice["chosen"] == report["chosen"] == choice["best"]
    assert choice["bootstrap_confidence"] >= MIN_CONFIDENCE
    per_label = pd.DataFrame(report["per_label"]).set_index("label")
    assert {"type 1 auc", "type 2 auc", "ensemble (type2) wlogloss"} <= set(per_label.columns)
    ensemble = json.loads((work_dir / "stage2" / "ensemble.json").read_text())
    assert ensemble["rule_choice"] == choice
    # The submission runs the chosen candidate's types only.
    assert ensemble["runs"] == [r for r, t in (("demo", 1), ("demo-type2", 2)) if t in report["rule"]["types"]]
    assert ensemble["overall"] == report["rule"]["overall"]
    overall = per_label.loc["patient_overall"]
    assert overall["type 2 wlogloss"] < overall["type 2, overall from its vertebrae wlogloss"]


def test_read_oof_errors(tmp_path):
    with pytest.raises(ReportError, match="no oof_fold"):
        read_oof(tmp_path)
    pd.DataFrame({STUDY_COL: ["a"], "C1": [0.1]}).to_csv(tmp_path / "oof_fold0.csv", index=False)
    with pytest.raises(ReportError, match="lacks columns"):
        read_oof(tmp_path)


def test_the_default_rule_is_kept_unless_another_wins_in_most_resamples():
    """On few studies a candidate that scores a little better out of fold does not replace the
    default (the mean of both types' vertebrae, noisy-OR); one better on nearly every study does."""
    rng = np.random.default_rng(3)
    n = 48
    y = (rng.random((n, 7)) < 0.15).astype(float)
    y = np.concatenate([y, y.max(1, keepdims=True)], axis=1)

    def predictions(strength: float, seed: int) -> np.ndarray:
        z = strength * (2 * y - 1) + np.random.default_rng(seed).normal(scale=1.5, size=y.shape) - 1.0
        return np.clip(1 / (1 + np.exp(-z)), *PRED_CLIP)

    default, close, strong = predictions(1.0, 10), predictions(1.0, 11), predictions(4.0, 12)
    assert DEFAULT_RULES[0] == "ensemble (vertebrae)"
    found = {"type 1": ({}, close), "ensemble (vertebrae)": ({}, default)}
    # Two models of the same strength: by chance type 1 scores 15% better on these 48 studies.
    assert competition_score(y, close) < 0.9 * competition_score(y, default)
    choice = choose_rule(y, found)
    assert choice["best"] == "type 1" and choice["default"] == "ensemble (vertebrae)"
    assert choice["chosen"] == "ensemble (vertebrae)" and "needs 95%" in choice["reason"]
    assert 0.5 < choice["bootstrap_confidence"] < MIN_CONFIDENCE
    # The default scoring best is simply kept.
    kept = choose_rule(y, {"type 1": ({}, default), "ensemble (vertebrae)": ({}, close)})
    assert kept["chosen"] == kept["best"] == "ensemble (vertebrae)" and kept["bootstrap_confidence"] is None
    # A much better candidate is taken, with its share of wins.
    choice = choose_rule(y, {**found, "ensemble (mean)": ({}, strong)})
    assert choice["chosen"] == choice["best"] == "ensemble (mean)"
    assert choice["bootstrap_confidence"] >= MIN_CONFIDENCE and "ensemble (mean)" in choice["reason"]
    # Without the ensemble, type 1 is the default; type 2 alone, the noisy-OR of its vertebrae.
    assert choose_rule(y, {"type 1": ({}, close), "type 2": ({}, default)})["default"] == "type 1"
    alone = {"type 2": ({}, close), "type 2, overall from its vertebrae": ({}, default)}
    assert choose_rule(y, alone)["default"] == "type 2, overall from its vertebrae"
