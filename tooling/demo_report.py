"""The demo's figures: what a person looks at instead of reading logs.

``write_report`` puts PNGs in ``<out>/report/``: learning curves of both stages,
per-vertebra Dice, a predicted-mask overlay on a sagittal and an axial slice,
ROC curves, and crop stacks with their predicted probabilities.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from common.constants import STUDY_COL, VERTEBRAE  # noqa: E402
from common.dicom import load_study  # noqa: E402
from common.folds import read_folds  # noqa: E402
from common.nifti import load_rsna_mask  # noqa: E402
from common.plots import save_figure  # noqa: E402
from common.volume import to_original  # noqa: E402
from stage1_seg.config import Stage1Config  # noqa: E402
from stage2_cls.config import Stage2Config  # noqa: E402

COLORS = plt.get_cmap("tab10")(np.arange(7))[:, :3]


def dice_bars(metrics: dict, path: Path) -> None:
    values = [metrics[f"dice_{v}"] for v in VERTEBRAE]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(VERTEBRAE, values, color=COLORS)
    ax.axhline(metrics["mean_dice"], color="k", ls="--", lw=1, label=f"mean {metrics['mean_dice']:.3f}")
    ax.set_ylim(0, 1)
    ax.set_ylabel("validation Dice")
    ax.legend(loc="lower right")
    save_figure(fig, path)


def _overlay(ax, image: np.ndarray, labels: np.ndarray, title: str, aspect: float = 1.0) -> None:
    ax.imshow(image, cmap="gray", vmin=-300, vmax=1200, aspect=aspect)
    rgba = np.zeros((*labels.shape, 4))
    for c in range(7):
        rgba[labels == c + 1] = (*COLORS[c], 0.45)
    ax.imshow(rgba, aspect=aspect)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def mask_overlay(data: Path, mask_npz: Path, uid: str, path: Path) -> None:
    """Truth and prediction, sagittal and axial, for one segmented validation study."""
    study = load_study(data / "train_images" / uid)
    truth = load_rsna_mask(next((data / "segmentations").glob(f"{uid}.nii*")), study)
    truth = np.where(truth <= 7, truth, 0)
    with np.load(mask_npz) as npz:
        probs = to_original(npz["probs"].astype(np.float32) / 255.0, study.hu.shape, npz["region"])
    pred = np.where(probs.max(0) >= 0.5, probs.argmax(0) + 1, 0)
    col = int(np.median(np.nonzero(truth)[2]))
    axial = int(np.median(np.nonzero(truth == 2)[0]))
    aspect = study.spacing[0] / study.spacing[1]
    fig, axes = plt.subplots(1, 4, figsize=(13, 4))
    _overlay(axes[0], study.hu[:, :, col], truth[:, :, col], "sagittal, truth", aspect)
    _overlay(axes[1], study.hu[:, :, col], pred[:, :, col], "sagittal, stage-1 prediction", aspect)
    _overlay(axes[2], study.hu[axial], truth[axial], f"axial slice {axial} (C2), truth")
    _overlay(axes[3], study.hu[axial], pred[axial], "axial, prediction")
    fig.suptitle(f"{uid} (validation study)", fontsize=10)
    save_figure(fig, path)


def crop_gallery(crops: Path, oof: pd.DataFrame, labels: pd.DataFrame, path: Path, rows: int = 4) -> None:
    """Stacks of fractured and intact vertebrae with their out-of-fold probabilities."""
    merged = oof.merge(labels, on=STUDY_COL, suffixes=("_p", ""))
    picks = []
    for want in (1, 0):
        for _, r in merged.iterrows():
            for c, v in enumerate(VERTEBRAE):
                if r[v] == want and len([p for p in picks if p[3] == want]) < rows // 2:
                    picks.append((r[STUDY_COL], c, r[f"{v}_p"], want))
    fig, axes = plt.subplots(len(picks), 8, figsize=(14, 2 * len(picks)), squeeze=False)
    for row, (uid, c, prob, label) in enumerate(picks):
        with np.load(crops / f"{uid}.npz") as npz:
            stack = npz["stacks"][c]
        for j, s in enumerate(np.linspace(0, len(stack) - 1, 8).round().astype(int)):
            ax = axes[row, j]
            ax.imshow(stack[s, stack.shape[1] // 2 - 1], cmap="gray", vmin=0, vmax=255)  # centre CT slice
            ax.contour(stack[s, -1] > 127, levels=[0.5], colors="lime", linewidths=0.6)
            ax.axis("off")
        axes[row, 0].set_title(f"{VERTEBRAE[c]} {'fractured' if label else 'intact'}: p={prob:.2f}",
                               fontsize=9, loc="left")
    save_figure(fig, path)


def write_report(out: Path, data: Path, work: Path, cfg1: Stage1Config, cfg2: Stage2Config, fold: int) -> list[str]:
    report = out / "report"
    report.mkdir(parents=True, exist_ok=True)
    s1, s2 = work / "stage1" / cfg1.run, work / "stage2" / cfg2.run
    shutil.copy(s1 / f"fold{fold}" / "learning_curves.png", report / "stage1_learning_curves.png")
    shutil.copy(s2 / f"fold{fold}" / "learning_curves.png", report / "stage2_learning_curves.png")
    dice_bars(json.loads((s1 / f"fold{fold}" / "metrics.json").read_text()), report / "stage1_dice.png")
    folds = read_folds(work / "folds.csv")
    uid = folds.loc[folds["seg_fold"] == fold, STUDY_COL].iloc[0]
    mask_overlay(data, s1 / "masks" / f"{uid}.npz", uid, report / "stage1_mask_overlay.png")
    for name in ("roc_curves.png", "calibration.png"):
        if (work / "stage2" / "report" / name).is_file():
            shutil.copy(work / "stage2" / "report" / name, report / f"stage2_{name}")
    oof = pd.read_csv(s2 / f"oof_fold{fold}.csv", dtype={STUDY_COL: str})
    labels = pd.read_csv(data / "train.csv", dtype={STUDY_COL: str})
    crop_gallery(work / "crops", oof, labels, report / "stage2_crops.png")
    return sorted(p.name for p in report.glob("*.png"))
