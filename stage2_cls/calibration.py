"""Post-hoc calibration of the submitted probabilities, and the rule that decides whether to use it.

A calibration is one temperature and bias per label group, applied to the logit:
``p' = sigmoid(logit(p) / temperature + bias)``; group ``vertebra`` for C1..C7 and
``overall`` for patient_overall. It is stored as ``calibration.json``:

    {"use": true|false, "vertebra": {"temperature": t, "bias": b}, "overall": {...},
     "reason": "...", "evidence": {...}}

A calibration must never make a submission worse, so :func:`choose_calibration`
only keeps one when

- there are at least ``MIN_STUDIES`` out-of-fold studies from at least two folds
  (a handful of validation studies is often separable, and a fit on them is
  degenerate: temperature 0.05, bias -4.6 was seen on 9 studies). 20, not more:
  the tests below decide the rest, and a model trained on a small set is the one
  most likely to be over-confident. On a synthetic set with 24 training studies
  the five folds' raw OOF score was 0.835 (the best constant 0.531); calibrated
  on the other folds 0.668, better in all 2,000 resamples; on that set's 24 test
  studies the submission went from 0.564 to 0.511 with it. The risk, measured on
  a 48-study set whose model was not over-confident: a calibration chosen by
  these rules on 24 of its OOF studies drawn at random was kept in 13 of 100
  draws, and applied to the set's test submission scored 0.990-1.023x the raw
  (mean 1.007);
- the fit is regularised towards the identity (a Gaussian prior on log-temperature
  and bias worth ``PRIOR_STUDIES`` studies) and bounded (temperature 1/4..4);
- fitted on the other folds, it improves the competition score of the held-out
  folds taken together (cross-validated) by at least ``MIN_GAIN`` relative;
- and that gain is not noise: the score is a mean over studies, so the studies are
  resampled with replacement (``N_BOOTSTRAP`` times, seeded) and the cross-validated
  calibration must beat the raw probabilities in at least ``MIN_CONFIDENCE`` of the
  resamples. On a 48-study synthetic dataset a 1.4% gain was better in only 84% of
  them, and on that dataset's 24 test studies the calibration made the submission
  worse (0.3739 against 0.3684 raw) and the single fold models worse too (on average
  0.3935 against 0.3877): the fit did not carry over, whatever it was applied to.

Otherwise ``use`` is false, the reason says why, and make_submission submits the
raw probabilities.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from scipy.optimize import minimize

from common.constants import PRED_CLIP, TARGETS
from common.metric import competition_score, study_scores

IDENTITY = {"vertebra": {"temperature": 1.0, "bias": 0.0}, "overall": {"temperature": 1.0, "bias": 0.0}}
MIN_STUDIES = 20
PRIOR_STUDIES = 5.0
MAX_LOG_TEMPERATURE = float(np.log(4.0))
MAX_BIAS = 3.0
MIN_GAIN = 0.005  # relative improvement of the cross-validated score needed to keep a calibration
MIN_CONFIDENCE = 0.95  # share of study resamples in which the cross-validated calibration must win
N_BOOTSTRAP = 2000
GROUPS = (("vertebra", slice(0, 7)), ("overall", slice(7, 8)))


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, *PRED_CLIP)
    return np.log(p) - np.log1p(-p)


def _transform(probs: np.ndarray, calib: Mapping[str, Any] | None, inverse: bool) -> np.ndarray:
    """``sigmoid(logit(p) / t + b)`` per group, or its inverse; clipped to PRED_CLIP."""
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(TARGETS):
        raise ValueError(f"probabilities must have shape (N, {len(TARGETS)}), got {probs.shape}")
    if calib is None or not calib.get("use", True):
        return np.clip(probs, *PRED_CLIP)
    z = _logit(probs)
    for group, cols in GROUPS:
        t, b = float(calib[group]["temperature"]), float(calib[group]["bias"])
        if not t > 0:
            raise ValueError(f"calibration {group}.temperature must be positive, got {t}")
        z[:, cols] = (z[:, cols] - b) * t if inverse else z[:, cols] / t + b
    return np.clip(1.0 / (1.0 + np.exp(-z)), *PRED_CLIP)


def apply_calibration(probs: np.ndarray, calib: Mapping[str, Any] | None) -> np.ndarray:
    """Calibrate (N, 8) probabilities in TARGETS order; returns (N, 8) clipped to PRED_CLIP.

    ``calib`` is a calibration.json mapping; ``None`` or ``use: false`` leaves the
    probabilities as they are (clipped).
    """
    return _transform(probs, calib, inverse=False)


def invert_calibration(probs: np.ndarray, calib: Mapping[str, Any] | None) -> np.ndarray:
    """The probabilities ``calib`` was applied to, from the calibrated (N, 8) ``probs``: exact
    up to the clip to PRED_CLIP (a probability clipped there comes back at the clip's inverse).
    Lets an evaluation score a submission with and without its calibration."""
    return _transform(probs, calib, inverse=True)


def _params_to_calib(x: np.ndarray) -> dict[str, dict[str, float]]:
    return {"vertebra": {"temperature": float(np.exp(x[0])), "bias": float(x[1])},
            "overall": {"temperature": float(np.exp(x[2])), "bias": float(x[3])}}


def fit_calibration(y: np.ndarray, p: np.ndarray) -> dict[str, dict[str, float]]:
    """Regularised temperatures and biases minimising the competition score of ``p`` (N, 8) on ``y``.

    The penalty ``PRIOR_STUDIES * |x|^2 / N`` (x = log-temperatures and biases) pulls a
    fit on few studies towards the identity and fades as N grows.
    """
    n = len(y)
    bounds = np.array([MAX_LOG_TEMPERATURE, MAX_BIAS] * 2)

    def objective(x: np.ndarray) -> float:
        if (np.abs(x) > bounds).any():
            return 1e6
        return competition_score(y, apply_calibration(p, _params_to_calib(x))) + PRIOR_STUDIES * float(x @ x) / n

    start = np.zeros(4)
    result = minimize(objective, start, method="Nelder-Mead",
                      options={"xatol": 1e-4, "fatol": 1e-7, "maxiter": 2000})
    x = result.x if result.fun < objective(start) else start
    return _params_to_calib(x)


def cross_validated(y: np.ndarray, p: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Every study's probabilities calibrated by a fit on the other folds (N, 8)."""
    out = np.empty_like(np.asarray(p, np.float64))
    for k in np.unique(folds):
        held = folds == k
        out[held] = apply_calibration(p[held], {"use": True, **fit_calibration(y[~held], p[~held])})
    return out


def calibrated_validation_score(y: np.ndarray, p: np.ndarray) -> float:
    """One validation's score as it would be submitted: for model selection during training.

    With at least ``2 * MIN_STUDIES`` studies, a calibration is fitted on every other study
    and scored on the rest, and the other way round (a two-fold cross-fit in a fixed order, so
    successive validations are compared alike; each half is as many studies as the report
    needs); the better of that score and the raw one is returned, as the report keeps a
    calibration only when it helps. With fewer, the raw score is returned.
    """
    raw = competition_score(y, p)
    if len(y) < 2 * MIN_STUDIES:
        return raw
    return min(raw, competition_score(y, cross_validated(y, p, np.arange(len(y)) % 2)))


def bootstrap_confidence(y: np.ndarray, p: np.ndarray, q: np.ndarray, n: int = N_BOOTSTRAP,
                         seed: int = 0) -> float:
    """Share of ``n`` resamples of the studies (with replacement) in which ``q`` scores better than ``p``.

    The competition score is the mean of per-study scores, so a resample's difference
    is the mean of the resampled studies' paired differences. Seeded: the same inputs
    give the same share.
    """
    diff = study_scores(y, q) - study_scores(y, p)
    rows = np.random.default_rng(seed).integers(0, len(diff), size=(n, len(diff)))
    return float((diff[rows].mean(axis=1) < 0).mean())


def choose_calibration(y: np.ndarray, p: np.ndarray, folds: np.ndarray) -> dict[str, Any]:
    """The calibration.json content for OOF labels ``y``, probabilities ``p`` (N, 8) and their folds (N,)."""
    p = np.clip(np.asarray(p, np.float64), *PRED_CLIP)
    raw = competition_score(y, p)
    n_folds = len(np.unique(folds))
    evidence: dict[str, Any] = {"n_studies": int(len(y)), "n_folds": n_folds, "raw_score": raw}

    def refused(why: str) -> dict[str, Any]:
        return {"use": False, **IDENTITY, "evidence": evidence, "reason": f"{why}: raw probabilities"}

    if len(y) < MIN_STUDIES or n_folds < 2:
        return refused(f"too few out-of-fold studies to fit a calibration ({len(y)} studies from {n_folds} "
                       f"fold(s); at least {MIN_STUDIES} from 2 folds are needed)")
    p_cv = cross_validated(y, p, folds)
    cv = competition_score(y, p_cv)
    confidence = bootstrap_confidence(y, p, p_cv)
    calib = fit_calibration(y, p)
    evidence.update(cross_validated_score=cv, bootstrap_confidence=confidence,
                    fitted_score_same_data=competition_score(y, apply_calibration(p, {"use": True, **calib})))
    held_out = f"calibration fitted on other folds scored {cv:.4f} on the held-out folds against {raw:.4f} raw"
    if cv > raw * (1.0 - MIN_GAIN):
        return refused(f"{held_out} (needs a {MIN_GAIN:.1%} gain)")
    if confidence < MIN_CONFIDENCE:
        return refused(f"{held_out}, but was better in only {confidence:.0%} of {N_BOOTSTRAP} resamples of the "
                       f"studies (needs {MIN_CONFIDENCE:.0%})")
    return {"use": True, **calib, "evidence": evidence,
            "reason": f"cross-validated over {n_folds} folds, calibration improves the score from "
                      f"{raw:.4f} to {cv:.4f} (better in {confidence:.0%} of {N_BOOTSTRAP} resamples of the studies)"}
