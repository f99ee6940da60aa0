"""The competition metric (weighted multi-label log loss) and submission checks.

Arrays of labels ``y`` and predictions ``p`` have shape (N, 8): one row per
study, columns in ``TARGETS`` order (C1..C7, patient_overall).

Weights depend on the true label: vertebra 1 (negative) / 2 (positive),
patient_overall 7 / 14. The competition score normalises per study,
``L_i = sum_j w_ij l_ij / sum_j w_ij``, then averages over studies; the pooled
reading ``sum w l / sum w`` over everything is reported as a secondary figure.

Command line: ``python -m common.metric LABELS_CSV SUBMISSION_CSV`` prints the
per-label table, the pooled reading, the best-constant reference and, on the
last line, ``score <value>``.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from common.constants import (
    METRIC_CLIP, OVERALL_WEIGHT_NEG, OVERALL_WEIGHT_POS, PRED_CLIP, PRED_COL,
    PREDICTION_TYPE_COL, ROW_ID_COL, STUDY_COL, TARGETS, VERTEBRA_WEIGHT_NEG,
    VERTEBRA_WEIGHT_POS,
)

_NEG_WEIGHTS = np.array([VERTEBRA_WEIGHT_NEG] * 7 + [OVERALL_WEIGHT_NEG])
_POS_WEIGHTS = np.array([VERTEBRA_WEIGHT_POS] * 7 + [OVERALL_WEIGHT_POS])
_MAX_SHOWN = 10
log = logging.getLogger(__name__)


class SubmissionError(ValueError):
    """A submission (or prediction table) that cannot be scored as given.

    ``problems`` maps a reason ("missing", "duplicated", ...) to the offending ids.
    """

    def __init__(self, message: str, problems: Mapping[str, list[str]] | None = None):
        super().__init__(message)
        self.problems = dict(problems or {})


# ----------------------------------------------------------------------------- arrays

def _as_label_array(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 2 or y.shape[1] != len(TARGETS) or y.shape[0] == 0:
        raise ValueError(f"labels must have shape (N>0, {len(TARGETS)}), got {y.shape}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1 (no NaN)")
    return y


def _as_pair(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = _as_label_array(y)
    p = np.asarray(p, dtype=np.float64)
    if p.shape != y.shape:
        raise ValueError(f"predictions shape {p.shape} differs from labels shape {y.shape}")
    if not np.isfinite(p).all():
        raise ValueError("predictions contain NaN or infinite values")
    return y, p


def label_weights(y: np.ndarray) -> np.ndarray:
    """Metric weights (N, 8) from true labels (N, 8): 1/2 per vertebra, 7/14 overall."""
    y = _as_label_array(y)
    return np.where(y > 0.5, _POS_WEIGHTS, _NEG_WEIGHTS)


def _log_losses(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Element-wise binary log loss (N, 8), p clipped as the metric does."""
    p = np.clip(p, *METRIC_CLIP)
    return -(y * np.log(p) + (1.0 - y) * np.log1p(-p))


def study_scores(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Each study's row-normalised weighted log loss (N,): the competition score is their mean."""
    y, p = _as_pair(y, p)
    w = label_weights(y)
    return (w * _log_losses(y, p)).sum(axis=1) / w.sum(axis=1)


def competition_score(y: np.ndarray, p: np.ndarray) -> float:
    """Row-normalised weighted log loss, mean over studies (lower is better)."""
    return float(study_scores(y, p).mean())


def pooled_score(y: np.ndarray, p: np.ndarray) -> float:
    """Pooled reading: sum(w * l) / sum(w) over every study and label."""
    y, p = _as_pair(y, p)
    w = label_weights(y)
    return float((w * _log_losses(y, p)).sum() / w.sum())


def per_label_table(y: np.ndarray, p: np.ndarray) -> pd.DataFrame:
    """One row per label: n, positives, prevalence, mean_pred, wlogloss, auc.

    ``wlogloss`` is that label's weighted log loss sum(w l) / sum(w); ``auc`` is
    NaN when the label has a single class.
    """
    y, p = _as_pair(y, p)
    w, loss = label_weights(y), _log_losses(y, p)
    rows = []
    for j, name in enumerate(TARGETS):
        positives = int(y[:, j].sum())
        one_class = positives in (0, len(y))
        rows.append({
            "label": name,
            "n": len(y),
            "positives": positives,
            "prevalence": positives / len(y),
            "mean_pred": float(p[:, j].mean()),
            "wlogloss": float((w[:, j] * loss[:, j]).sum() / w[:, j].sum()),
            "auc": np.nan if one_class else float(roc_auc_score(y[:, j], p[:, j])),
        })
    return pd.DataFrame(rows).set_index("label")


def best_constant(y: np.ndarray, pooled: bool = False) -> np.ndarray:
    """The per-label constant (8,) that minimises the score on labels ``y`` (N, 8).

    Each label's loss is sum_i a_i l(y_i, c) for fixed, label-only factors a_i,
    so setting the derivative to zero gives c = sum(a y) / sum(a). Pooled:
    a_i = w_i, i.e. c = 2m / (1 + m) for prevalence m under the 2:1 weights.
    Row-normalised (the competition score): a_i = w_i / sum_j w_ij, which sits
    lower because positive studies have larger row sums.
    """
    y = _as_label_array(y)
    a = label_weights(y)
    if not pooled:
        a = a / a.sum(axis=1, keepdims=True)
    return (a * y).sum(axis=0) / a.sum(axis=0)


def constant_score(y: np.ndarray, c: Sequence[float] | np.ndarray, pooled: bool = False) -> float:
    """Score of predicting the constants ``c`` (8,) for every study of ``y`` (N, 8)."""
    y = _as_label_array(y)
    p = np.broadcast_to(np.asarray(c, dtype=np.float64), y.shape)
    return pooled_score(y, p) if pooled else competition_score(y, p)


# ----------------------------------------------------------------------------- frames

def expected_row_ids(uids: Iterable[str]) -> list[str]:
    """Row ids ``<UID>_<label>`` for every study and label, study by study."""
    return [f"{uid}_{name}" for uid in uids for name in TARGETS]


def split_row_ids(row_ids: Iterable[str]) -> pd.DataFrame:
    """Split row ids into (StudyInstanceUID, label) on the known label suffixes.

    UIDs contain dots and ``patient_overall`` contains an underscore, so the
    label is matched as a suffix rather than by splitting on ``_``.
    """
    ids = pd.Series(list(row_ids), dtype=object).astype(str)
    label = pd.Series([None] * len(ids), dtype=object)
    for name in TARGETS:
        label[ids.str.endswith("_" + name).to_numpy()] = name
    unknown = ids[label.isna().to_numpy()].tolist()
    if unknown:
        raise SubmissionError(_format_problems({"no known label suffix": unknown}),
                              {"no known label suffix": unknown})
    uid = [rid[: -len(name) - 1] for rid, name in zip(ids, label)]
    return pd.DataFrame({STUDY_COL: uid, "label": label.to_numpy()})


def submission_to_wide(sub: pd.DataFrame) -> pd.DataFrame:
    """``row_id, fractured`` (long) -> ``StudyInstanceUID, C1..C7, patient_overall``.

    Studies keep their first-appearance order; absent labels become NaN.
    """
    _check_submission_columns(sub)
    parts = split_row_ids(sub[ROW_ID_COL])
    parts["value"] = pd.to_numeric(sub[PRED_COL], errors="coerce").to_numpy(dtype=np.float64)
    dup = parts.duplicated([STUDY_COL, "label"], keep=False)
    if dup.any():
        ids = sorted(set(sub[ROW_ID_COL].astype(str)[dup.to_numpy()]))
        raise SubmissionError(_format_problems({"duplicated": ids}), {"duplicated": ids})
    wide = parts.pivot(index=STUDY_COL, columns="label", values="value")
    order = pd.unique(parts[STUDY_COL])
    wide = wide.reindex(index=order, columns=list(TARGETS))
    wide.columns.name = None
    return wide.rename_axis(STUDY_COL).reset_index()


def wide_to_submission(wide: pd.DataFrame, test_frame: pd.DataFrame,
                       fallback: Mapping[str, float] | Sequence[float] | None = None,
                       clip: tuple[float, float] | None = PRED_CLIP) -> pd.DataFrame:
    """Write a value for every row of ``test_frame`` (test.csv), in its order.

    ``wide``: StudyInstanceUID, C1..C7, patient_overall. Studies of test.csv
    absent from ``wide`` get ``fallback`` (per label, e.g. a prior) or raise
    when it is None. Values are clipped to ``clip`` unless it is None.
    """
    _require_columns(wide, [STUDY_COL, *TARGETS], "prediction table")
    if wide[STUDY_COL].duplicated().any():
        raise ValueError("prediction table has duplicated StudyInstanceUID values")
    _require_columns(test_frame, [ROW_ID_COL], "test.csv")
    if PREDICTION_TYPE_COL in test_frame and STUDY_COL in test_frame:
        keys = pd.DataFrame({STUDY_COL: test_frame[STUDY_COL].astype(str).to_numpy(),
                             "label": test_frame[PREDICTION_TYPE_COL].astype(str).to_numpy()})
        bad = sorted(set(keys["label"]) - set(TARGETS))
        if bad:
            raise ValueError(f"test.csv has unknown prediction_type values: {bad}")
    else:
        keys = split_row_ids(test_frame[ROW_ID_COL])
    long = wide.assign(**{STUDY_COL: wide[STUDY_COL].astype(str)}).melt(
        id_vars=STUDY_COL, value_vars=list(TARGETS), var_name="label", value_name="value")
    values = keys.merge(long, on=[STUDY_COL, "label"], how="left")["value"].to_numpy(
        np.float64, copy=True)
    missing = np.isnan(values)
    if missing.any():
        if fallback is None:
            uids = sorted(set(keys[STUDY_COL][missing]))
            raise ValueError(f"no prediction for {len(uids)} test studies and no fallback: "
                             f"{_shorten(uids)}")
        prior = dict(fallback) if isinstance(fallback, Mapping) else dict(zip(TARGETS, fallback))
        values[missing] = keys["label"][missing].map(prior).to_numpy(np.float64)
        if np.isnan(values).any():
            raise ValueError(f"fallback must give a value for every label {list(TARGETS)}")
    if clip is not None:
        values = np.clip(values, *clip)
    return pd.DataFrame({ROW_ID_COL: test_frame[ROW_ID_COL].astype(str).to_numpy(),
                         PRED_COL: values})


def align(labels_wide: pd.DataFrame, preds_wide: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Label and prediction arrays (N, 8) over the studies of ``labels_wide``, in its order.

    Extra prediction studies are ignored; a labelled study without a complete,
    finite prediction row raises SubmissionError naming it.
    """
    _require_columns(labels_wide, [STUDY_COL, *TARGETS], "labels")
    _require_columns(preds_wide, [STUDY_COL, *TARGETS], "predictions")
    for frame, what in ((labels_wide, "labels"), (preds_wide, "predictions")):
        dup = frame[STUDY_COL][frame[STUDY_COL].duplicated()].astype(str).tolist()
        if dup:
            raise SubmissionError(f"{what} repeat studies: {_shorten(dup)}", {"duplicated": dup})
    uids = labels_wide[STUDY_COL].astype(str)
    preds = preds_wide.assign(**{STUDY_COL: preds_wide[STUDY_COL].astype(str)})
    p = preds.set_index(STUDY_COL).reindex(uids)[list(TARGETS)].to_numpy(np.float64)
    bad = uids[~np.isfinite(p).all(axis=1)].tolist()
    if bad:
        raise SubmissionError(f"{len(bad)} studies lack a complete prediction: {_shorten(bad)}",
                              {"missing": bad})
    y = _as_label_array(labels_wide[list(TARGETS)].to_numpy(np.float64))
    return y, p


def validate_submission(sub: pd.DataFrame, expected_row_ids: Iterable[str]) -> None:
    """Raise SubmissionError unless ``sub`` has columns row_id, fractured, every
    expected row id as many times as it is expected (once, unless test.csv itself
    repeats it), nothing else, and finite values in [0, 1]."""
    _check_submission_columns(sub)
    ids = sub[ROW_ID_COL].astype(str)
    wanted = Counter(str(r) for r in expected_row_ids)
    expected = list(wanted)
    expected_set, present = set(expected), set(ids)
    found = Counter(ids)
    values = pd.to_numeric(sub[PRED_COL], errors="coerce").to_numpy(np.float64)
    finite = np.isfinite(values)
    with np.errstate(invalid="ignore"):
        out_of_range = finite & ((values < 0.0) | (values > 1.0))
    problems = {
        "missing": [r for r in expected if r not in present],
        "duplicated": [r for r in dict.fromkeys(ids) if found[r] > wanted.get(r, 1)],
        "unexpected": list(dict.fromkeys(r for r in ids if r not in expected_set)),
        "NaN or not a finite number": ids[~finite].tolist(),
        "out of range [0, 1]": ids[out_of_range].tolist(),
    }
    problems = {reason: rows for reason, rows in problems.items() if rows}
    if problems:
        raise SubmissionError(_format_problems(problems), problems)


def read_test_csv(path: str | Path) -> pd.DataFrame:
    """test.csv as ``row_id, StudyInstanceUID, prediction_type``, checked, every row kept as given.

    The row_id is what is scored, so the study and label are taken from it; rows
    whose StudyInstanceUID or prediction_type columns say otherwise are named in a
    warning. Repeated rows are kept (and named). A header-only file gives an empty
    frame. Raises ValueError naming the file when it is empty, lacks a row_id column
    or holds a row_id without a known label suffix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"test.csv not found: {path}")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty file (not even a header row)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not a readable CSV file ({exc})") from None
    if ROW_ID_COL not in frame.columns:
        raise ValueError(f"{path}: no {ROW_ID_COL} column (columns: {list(frame.columns)})")
    try:
        keys = split_row_ids(frame[ROW_ID_COL])
    except SubmissionError as exc:
        raise ValueError(f"{path}: {exc}") from None
    for column, derived in ((STUDY_COL, keys[STUDY_COL]), (PREDICTION_TYPE_COL, keys["label"])):
        if column in frame.columns:
            differ = (frame[column].astype(str).to_numpy() != derived.to_numpy())
            if differ.any():
                log.warning("%s: %d rows whose %s disagrees with their row_id (the row_id is what is scored, "
                            "so it decides): %s", path, int(differ.sum()), column,
                            _shorten(frame[ROW_ID_COL][differ].tolist()))
    repeated = frame[ROW_ID_COL][frame[ROW_ID_COL].duplicated()].tolist()
    if repeated:
        log.warning("%s: %d repeated rows (each study is predicted once; every row is written as given): %s",
                    path, len(repeated), _shorten(list(dict.fromkeys(repeated))))
    return pd.DataFrame({ROW_ID_COL: frame[ROW_ID_COL].astype(str), STUDY_COL: keys[STUDY_COL].to_numpy(),
                         PREDICTION_TYPE_COL: keys["label"].to_numpy()})


def _check_submission_columns(sub: pd.DataFrame) -> None:
    if list(sub.columns) != [ROW_ID_COL, PRED_COL]:
        raise SubmissionError(f"submission columns must be ['{ROW_ID_COL}', '{PRED_COL}'], "
                              f"got {list(map(str, sub.columns))}")


def _require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} lacks columns {missing} (has {list(map(str, frame.columns))})")


def _shorten(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_SHOWN])
    more = len(items) - _MAX_SHOWN
    return shown + (f" ... and {more} more" if more > 0 else "")


def _format_problems(problems: Mapping[str, list[str]]) -> str:
    lines = ["invalid submission:"]
    for reason, rows in problems.items():
        lines.append(f"  {reason} ({len(rows)} row{'' if len(rows) == 1 else 's'}): {_shorten(rows)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- files / CLI

def read_labels_csv(path: str | Path) -> pd.DataFrame:
    """A train.csv-like file -> DataFrame with StudyInstanceUID and the 8 targets (0/1)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file not found: {path}")
    frame = pd.read_csv(path, dtype={STUDY_COL: str})
    try:
        _require_columns(frame, [STUDY_COL, *TARGETS], f"labels file {path}")
        if frame.empty:
            raise ValueError(f"labels file {path} has no rows")
        _as_label_array(frame[list(TARGETS)].to_numpy(np.float64))
    except (ValueError, TypeError) as err:
        raise ValueError(f"labels file {path}: {err}") from None
    dup = frame[STUDY_COL][frame[STUDY_COL].duplicated()].tolist()
    if dup:
        raise ValueError(f"labels file {path} repeats studies: {_shorten(dup)}")
    return frame[[STUDY_COL, *TARGETS]]


def read_submission_csv(path: str | Path) -> pd.DataFrame:
    """A submission file, row_id read as text (UIDs must not become numbers)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"submission file not found: {path}")
    return pd.read_csv(path, dtype={ROW_ID_COL: str})


def evaluate_submission(labels: pd.DataFrame, sub: pd.DataFrame) -> dict:
    """Validate ``sub`` against every study x label of ``labels`` and score it.

    Returns ``{"score", "pooled", "best_constant_score", "table"}``.
    """
    validate_submission(sub, expected_row_ids(labels[STUDY_COL].astype(str)))
    y, p = align(labels, submission_to_wide(sub))
    return {
        "score": competition_score(y, p),
        "pooled": pooled_score(y, p),
        "best_constant_score": constant_score(y, best_constant(y)),
        "table": per_label_table(y, p),
    }


def format_report(result: Mapping) -> str:
    """Human-readable report; the last line is ``score <value>``."""
    return "\n".join([
        result["table"].to_string(float_format=lambda v: f"{v:.4f}"),
        "",
        f"pooled {result['pooled']:.6f}  (sum w*l / sum w over all rows; secondary reading)",
        f"best constant {result['best_constant_score']:.6f}  (reference: per-label constant prior)",
        f"score {result['score']:.6f}",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m common.metric",
        description="Score a submission against labels with the competition metric.")
    parser.add_argument("labels_csv", help="train.csv-like labels: StudyInstanceUID, "
                                           "patient_overall, C1..C7")
    parser.add_argument("submission_csv", help="submission: row_id, fractured")
    args = parser.parse_args(argv)
    try:
        labels = read_labels_csv(args.labels_csv)
        result = evaluate_submission(labels, read_submission_csv(args.submission_csv))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
