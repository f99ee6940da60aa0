"""Cross-validation report of a stage-2 run, and the calibration fitted on it.

    python -m stage2_cls.report [--work-dir W] [--data-dir D] [--config C] [key=value ...]

Joins every ``W/stage2/<run>/oof_fold*.csv`` with train.csv and writes, in
``W/stage2/<run>/``: ``cv_report.json`` and ``cv_report.md`` (competition and
pooled scores, per-label log loss and AUC, the best constant beside them, per
fold scores), ``roc_curves.png``, ``calibration.png`` (reliability diagrams)
and ``calibration.json``.

``calibration.json`` comes from :func:`stage2_cls.calibration.choose_calibration`:
a regularised temperature and bias per label group, kept only when enough OOF
studies show, cross-validated over folds, that it improves the score; otherwise
it says why and ``make_submission`` submits raw probabilities.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from common.cli import parse_command
from common.constants import PRED_CLIP, STUDY_COL, TARGETS
from common.io import write_json_atomic, write_text_atomic
from common.metric import best_constant, competition_score, constant_score, per_label_table, pooled_score
from common.metric import read_labels_csv
from common.plots import plt, save_figure
from stage2_cls.calibration import apply_calibration, choose_calibration
from stage2_cls.config import Stage2Config

log = logging.getLogger(__name__)

_OOF_NAME = re.compile(r"oof_fold(\d+)\.csv$")


class ReportError(FileNotFoundError):
    """No out-of-fold predictions to report on, or predictions without labels."""


def read_oof(run_dir: str | Path) -> pd.DataFrame:
    """All ``oof_fold*.csv`` of a run, with a ``fold`` column; raises ReportError when none."""
    run_dir = Path(run_dir)
    files = sorted(f for f in run_dir.glob("oof_fold*.csv") if _OOF_NAME.search(f.name))
    if not files:
        raise ReportError(f"no oof_fold*.csv in {run_dir}: train folds with python -m stage2_cls.train first")
    parts = []
    for f in files:
        part = pd.read_csv(f, dtype={STUDY_COL: str})
        missing = [c for c in (STUDY_COL, *TARGETS) if c not in part.columns]
        if missing:
            raise ReportError(f"{f} lacks columns {missing}")
        parts.append(part.assign(fold=int(_OOF_NAME.search(f.name).group(1))))
    oof = pd.concat(parts, ignore_index=True)
    dup = oof[STUDY_COL][oof[STUDY_COL].duplicated()].tolist()
    if dup:
        raise ReportError(f"{run_dir}: studies appear in several OOF files, e.g. {dup[:3]}")
    return oof


def plot_roc(y: np.ndarray, p: np.ndarray, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    for j, name in enumerate(TARGETS):
        if 0 < y[:, j].sum() < len(y):
            fpr, tpr, _ = roc_curve(y[:, j], p[:, j])
            ax.plot(fpr, tpr, lw=1.5 if name == TARGETS[-1] else 1.0, label=name)
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC, out-of-fold")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_reliability(y: np.ndarray, p: np.ndarray, p_cal: np.ndarray, path: Path, bins: int = 10) -> None:
    """Observed frequency per predicted-probability bin, before and after calibration."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, (title, cols) in zip(axes, (("C1..C7 pooled", slice(0, 7)), ("patient_overall", slice(7, 8)))):
        for label, probs in (("raw", p), ("calibrated", p_cal)):
            yy, pp = y[:, cols].ravel(), probs[:, cols].ravel()
            which = np.minimum((pp * bins).astype(int), bins - 1)
            used = [b for b in range(bins) if (which == b).any()]
            ax.plot([pp[which == b].mean() for b in used], [yy[which == b].mean() for b in used],
                    marker="o", label=label)
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_xlabel("mean predicted probability")
        ax.set_ylabel("observed fraction fractured")
        ax.set_title(title)
        ax.legend()
    save_figure(fig, path)


def build_report(oof: pd.DataFrame, labels: pd.DataFrame) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """(report dict, labels (N, 8), OOF probabilities (N, 8)) for OOF rows joined to ``labels``."""
    table = labels.set_index(STUDY_COL)
    unknown = sorted(set(oof[STUDY_COL]) - set(table.index))
    if unknown:
        raise ReportError(f"{len(unknown)} OOF studies are not in train.csv, e.g. {unknown[:3]}")
    y = table.loc[oof[STUDY_COL], list(TARGETS)].to_numpy(np.float64)
    p = np.clip(oof[list(TARGETS)].to_numpy(np.float64), *PRED_CLIP)
    folds = oof["fold"].to_numpy()
    calibration = choose_calibration(y, p, folds)
    per_label = per_label_table(y, p)
    per_label["constant_wlogloss"] = per_label_table(y, np.broadcast_to(best_constant(y), y.shape))["wlogloss"]
    report = {
        "n_studies": len(oof), "folds": sorted(int(k) for k in np.unique(folds)),
        "score": competition_score(y, p), "pooled_score": pooled_score(y, p),
        "constant_score": constant_score(y, best_constant(y)),
        "fold_scores": {int(k): competition_score(y[folds == k], p[folds == k]) for k in np.unique(folds)},
        "per_label": per_label.reset_index().to_dict(orient="records"),
        "calibration": calibration,
    }
    return report, y, p


def format_markdown(report: Mapping[str, Any], run: str) -> str:
    per_label = pd.DataFrame(report["per_label"]).set_index("label")
    calib = report["calibration"]
    evidence = calib["evidence"]
    cv = evidence.get("cross_validated_score")
    lines = [
        f"# Stage 2 cross-validation: run `{run}`", "",
        f"{report['n_studies']} studies, folds {report['folds']}.", "",
        "| reading | value |", "| --- | --- |",
        f"| competition score (lower is better) | {report['score']:.4f} |",
        f"| pooled score | {report['pooled_score']:.4f} |",
        f"| best constant per label (fitted on these labels) | {report['constant_score']:.4f} |",
        f"| after calibration, cross-validated over folds | {'n/a' if cv is None else f'{cv:.4f}'} |", "",
        "Per fold: " + ", ".join(f"fold {k} {v:.4f}" for k, v in report["fold_scores"].items()), "",
        markdown_table(per_label), "",
        f"Calibration ({'used' if calib['use'] else 'not used'}): {calib['reason']}. "
        + ", ".join(f"{g} t={calib[g]['temperature']:.3f} b={calib[g]['bias']:+.3f}" for g in ("vertebra", "overall")),
        "", "Plots: roc_curves.png, calibration.png. The metric weighs positives double, so its optimum "
        "sits above the observed frequency (2m / (1 + m) for a constant): a metric-calibrated curve "
        "lies above the diagonal.", "",
    ]
    return "\n".join(lines)


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame (index = first column) as a Markdown table, floats to 4 decimals."""
    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    header = [frame.index.name or ""] + [str(c) for c in frame.columns]
    rows = [[str(i)] + [cell(v) for v in row] for i, row in zip(frame.index, frame.itertuples(index=False))]
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows])


def run(cfg: Stage2Config, data_dir: str | Path, work_dir: str | Path) -> dict[str, Any]:
    """Write the report files of run ``cfg.run``; returns the report dict."""
    run_dir = Path(work_dir) / "stage2" / cfg.run
    oof = read_oof(run_dir)
    labels = read_labels_csv(Path(data_dir) / "train.csv")
    report, y, p = build_report(oof, labels)
    write_json_atomic(run_dir / "cv_report.json", report)
    write_text_atomic(run_dir / "cv_report.md", format_markdown(report, cfg.run))
    write_json_atomic(run_dir / "calibration.json", report["calibration"])
    plot_roc(y, p, run_dir / "roc_curves.png")
    plot_reliability(y, p, apply_calibration(p, report["calibration"]), run_dir / "calibration.png")
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cmd = parse_command("Cross-validation report and OOF calibration of a stage-2 run.", "stage2.yaml",
                        Stage2Config, argv)
    report = run(cmd.cfg, cmd.data_dir, cmd.work_dir)
    print(format_markdown(report, cmd.cfg.run))
    return report


if __name__ == "__main__":
    main()
