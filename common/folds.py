"""Seeded, multilabel-stratified K folds over studies, written once and reused.

Every study of train.csv gets a ``fold`` (stage 2, stratified on C1..C7 and
patient_overall). The studies with a segmentation mask also get a ``seg_fold``
(stage 1), assigned the same way among themselves only; the others get -1.
``load_or_make_folds`` writes ``folds.csv`` (plus its settings in ``folds.json``)
the first time and then reuses it, so every run and every stage sees the same split:
the folds file is the one place the number of folds and their seed are set.
The first training command makes it with the defaults (5 folds, seed 42); to
choose others, make it first:

    python -m common.folds --data-dir D --work-dir W --n-folds 4 --seed 7
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
from sklearn.model_selection import KFold

from common.constants import STUDY_COL, TARGETS
from common.io import write_csv_atomic, write_json_atomic

logger = logging.getLogger(__name__)

N_FOLDS = 5
FOLD_SEED = 42
FOLDS_CSV = "folds.csv"
FOLDS_JSON = "folds.json"
# Below this many studies per fold, iterative stratification has nothing to balance.
MIN_STRATIFIED_PER_FOLD = 2
# Seeded stratified draws tried per split; the most balanced one is kept.
N_DRAWS = 16
_METHOD = (f"best of {N_DRAWS} iterstrat.MultilabelStratifiedKFold(shuffle=True) draws "
           "on studies sorted by UID")


class FoldsError(ValueError):
    """Folds that cannot be made, or a saved split that does not match the request."""


def _stratified_draw(y: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    splitter = MultilabelStratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    fold = np.full(len(y), -1, dtype=np.int64)
    for k, (_, val_idx) in enumerate(splitter.split(np.zeros(len(y)), y)):
        fold[val_idx] = k
    return fold


def fold_imbalance(y: np.ndarray, fold: np.ndarray, n_folds: int) -> float:
    """Worst gap, in studies, between a fold's positives of a label and its fair share.

    ``y`` (N, 8) labels, ``fold`` (N,) fold index. Fold sizes differing by more
    than one count as infinitely imbalanced.
    """
    sizes = np.bincount(fold, minlength=n_folds)
    if sizes.max() - sizes.min() > 1:
        return float("inf")
    counts = np.stack([y[fold == k].sum(axis=0) for k in range(n_folds)])
    expected = y.sum(axis=0)[None, :] * sizes[:, None] / len(y)
    return float(np.abs(counts - expected).max())


def _assign_folds(y: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold index (N,) for label rows ``y`` (N, 8).

    Iterative stratification balances the rare labels first, which leaves the
    common patient_overall (the heaviest in the metric) to chance; the best of
    ``N_DRAWS`` seeded draws halves the worst per-fold deviation at little cost.
    """
    if len(y) < MIN_STRATIFIED_PER_FOLD * n_folds:
        splitter = KFold(n_splits=n_folds, shuffle=True, random_state=seed)
        fold = np.full(len(y), -1, dtype=np.int64)
        for k, (_, val_idx) in enumerate(splitter.split(np.zeros(len(y)))):
            fold[val_idx] = k
        return fold
    best, best_cost = None, float("inf")
    for draw_seed in np.random.SeedSequence(seed).generate_state(N_DRAWS):
        fold = _stratified_draw(y, n_folds, int(draw_seed))
        cost = fold_imbalance(y, fold, n_folds)
        if best is None or cost < best_cost:
            best, best_cost = fold, cost
    return best


def _label_matrix(labels: pd.DataFrame) -> np.ndarray:
    missing = [c for c in (STUDY_COL, *TARGETS) if c not in labels.columns]
    if missing:
        raise FoldsError(f"labels lack columns {missing}")
    y = labels[list(TARGETS)].to_numpy(np.float64)
    if not np.isin(y, (0.0, 1.0)).all():
        raise FoldsError("labels must be 0 or 1 in every target column")
    dup = labels[STUDY_COL][labels[STUDY_COL].duplicated()].tolist()
    if dup:
        raise FoldsError(f"labels repeat studies: {dup[:10]}")
    return y.astype(np.int64)


def make_folds(labels: pd.DataFrame, seg_uids: Iterable[str], n_folds: int = 5,
               seed: int = 42) -> pd.DataFrame:
    """Assign folds to the studies of ``labels`` (train.csv-like frame).

    Returns a frame ``StudyInstanceUID, fold, seg_fold`` in the order of
    ``labels``; ``seg_fold`` is -1 for studies not in ``seg_uids``. Studies are
    sorted by UID before splitting, so the result depends only on the label
    set, ``n_folds`` and ``seed``, not on row order.
    """
    if n_folds < 2:
        raise FoldsError(f"n_folds must be at least 2, got {n_folds}")
    labels = labels.assign(**{STUDY_COL: labels[STUDY_COL].astype(str)})
    _label_matrix(labels)
    if len(labels) < n_folds:
        raise FoldsError(f"{len(labels)} studies cannot fill {n_folds} folds")
    ordered = labels.sort_values(STUDY_COL, kind="stable").reset_index(drop=True)
    y = _label_matrix(ordered)
    fold = _assign_folds(y, n_folds, seed)

    seg = {str(u) for u in seg_uids}
    unknown = sorted(seg - set(ordered[STUDY_COL]))
    if unknown:
        logger.warning("ignoring %d segmentations of studies not in the labels: %s",
                       len(unknown), unknown[:10])
    is_seg = ordered[STUDY_COL].isin(seg).to_numpy()
    n_seg = int(is_seg.sum())
    seg_fold = np.full(len(ordered), -1, dtype=np.int64)
    if n_seg == 0:
        logger.warning("no segmented studies: seg_fold is -1 everywhere (stage 1 cannot train)")
    elif n_seg < n_folds:
        raise FoldsError(f"only {n_seg} segmented studies for {n_folds} stage-1 folds; "
                         f"use n_folds <= {n_seg} or add segmentations")
    else:
        seg_fold[is_seg] = _assign_folds(y[is_seg], n_folds, seed)

    result = pd.DataFrame({STUDY_COL: ordered[STUDY_COL], "fold": fold, "seg_fold": seg_fold})
    # Back to the caller's row order.
    return result.set_index(STUDY_COL).loc[labels[STUDY_COL]].reset_index()


def list_segmentation_uids(seg_dir: str | Path) -> list[str]:
    """UIDs of ``<seg_dir>/<UID>.nii`` or ``.nii.gz`` files, sorted; [] if the folder is absent."""
    seg_dir = Path(seg_dir)
    if not seg_dir.is_dir():
        return []
    uids = set()
    for path in seg_dir.iterdir():
        for suffix in (".nii.gz", ".nii"):
            if path.is_file() and path.name.endswith(suffix):
                uids.add(path.name[: -len(suffix)])
                break
    return sorted(uids)


def read_folds(path: str | Path) -> pd.DataFrame:
    """Read a folds.csv written by ``load_or_make_folds`` (UIDs kept as text)."""
    path = Path(path)
    frame = pd.read_csv(path, dtype={STUDY_COL: str})
    missing = [c for c in (STUDY_COL, "fold", "seg_fold") if c not in frame.columns]
    if missing:
        raise FoldsError(f"{path} lacks columns {missing}; delete it to remake the folds")
    return frame[[STUDY_COL, "fold", "seg_fold"]].astype({"fold": np.int64, "seg_fold": np.int64})


def _check_saved(folds_csv: Path, folds: pd.DataFrame, labels: pd.DataFrame,
                 seg_uids: list[str], n_folds: int | None, seed: int | None) -> None:
    """Raise FoldsError unless the saved split matches the request (None: any) and the data."""
    folds_json = folds_csv.with_name(FOLDS_JSON)
    hint = f"delete {folds_csv} and {folds_json} to remake them, or pass matching settings"
    try:
        saved = json.loads(folds_json.read_text())
    except (OSError, ValueError) as err:
        raise FoldsError(f"{folds_json} is missing or unreadable ({err}); {hint}") from None
    if (n_folds is not None and saved.get("n_folds") != n_folds) or (seed is not None and saved.get("seed") != seed):
        raise FoldsError(f"{folds_csv} was made with n_folds={saved.get('n_folds')} "
                         f"seed={saved.get('seed')}, but n_folds={n_folds} seed={seed} "
                         f"was requested; {hint}")
    saved_uids, uids = set(folds[STUDY_COL]), set(labels[STUDY_COL].astype(str))
    if saved_uids != uids:
        raise FoldsError(f"{folds_csv} covers {len(saved_uids)} studies, train.csv has "
                         f"{len(uids)} ({len(uids - saved_uids)} new, "
                         f"{len(saved_uids - uids)} gone); {hint}")
    saved_seg = set(folds.loc[folds["seg_fold"] >= 0, STUDY_COL])
    if saved_seg != set(seg_uids) & uids:
        raise FoldsError(f"{folds_csv} has {len(saved_seg)} segmented studies but the "
                         f"segmentations folder now gives {len(set(seg_uids) & uids)}; {hint}")


def load_or_make_folds(data_dir: str | Path, work_dir: str | Path, n_folds: int | None = None,
                       seed: int | None = None) -> pd.DataFrame:
    """The fold table ``StudyInstanceUID, fold, seg_fold`` for ``<data_dir>/train.csv``.

    Made once (with ``n_folds`` and ``seed``, by default N_FOLDS and FOLD_SEED) and
    saved to ``<work_dir>/folds.csv`` (settings in ``folds.json``); later calls reuse
    it after checking it matches the studies and segmentations found now, and
    ``n_folds`` / ``seed`` when given.
    """
    data_dir, work_dir = Path(data_dir), Path(work_dir)
    train_csv = data_dir / "train.csv"
    if not train_csv.is_file():
        raise FileNotFoundError(f"labels file not found: {train_csv}")
    labels = pd.read_csv(train_csv, dtype={STUDY_COL: str})
    seg_uids = list_segmentation_uids(data_dir / "segmentations")
    folds_csv = work_dir / FOLDS_CSV

    if folds_csv.is_file():
        folds = read_folds(folds_csv)
        _check_saved(folds_csv, folds, labels, seg_uids, n_folds, seed)
        logger.info("reusing %s (%d studies, %d folds)", folds_csv, len(folds), int(folds["fold"].max()) + 1)
        return folds

    n_folds = N_FOLDS if n_folds is None else n_folds
    seed = FOLD_SEED if seed is None else seed
    try:
        folds = make_folds(labels, seg_uids, n_folds=n_folds, seed=seed)
    except FoldsError as err:
        raise FoldsError(f"{train_csv}: {err}") from None
    n_seg = int((folds["seg_fold"] >= 0).sum())
    settings = {"n_folds": n_folds, "seed": seed, "n_studies": len(folds),
                "n_seg_studies": n_seg, "method": _METHOD}
    # Settings first: folds.csv is the marker of a finished write.
    write_json_atomic(work_dir / FOLDS_JSON, settings)
    write_csv_atomic(folds_csv, folds)
    logger.info("wrote %s: %d studies in %d folds (%d segmented studies in seg folds), seed %d",
                folds_csv, len(folds), n_folds, n_seg, seed)
    return folds


def split_uids(folds: pd.DataFrame, fold: int, column: str = "fold") -> tuple[list[str], list[str]]:
    """(train UIDs, validation UIDs) for ``fold`` of ``column`` ("fold" or "seg_fold").

    Rows with -1 in ``column`` (e.g. unsegmented studies for seg_fold) are in neither.
    """
    values = folds[column].to_numpy()
    n_folds = int(values.max()) + 1 if len(values) else 0
    if not 0 <= fold < n_folds:
        raise FoldsError(f"fold {fold} out of range: {column} has folds 0..{n_folds - 1}")
    uids = folds[STUDY_COL].astype(str)
    return uids[(values >= 0) & (values != fold)].tolist(), uids[values == fold].tolist()


def fold_split(data_dir: str | Path, work_dir: str | Path, fold: int,
               column: str = "fold") -> tuple[list[str], list[str]]:
    """(train UIDs, validation UIDs) of ``fold``: the one fold split both stages use.

    ``column`` is "fold" (every study, stage 2) or "seg_fold" (segmented studies,
    stage 1). Under torchrun, rank 0 makes the folds file and the others read it.
    """
    from common import distributed as D  # torch is only needed here

    if D.init_distributed().is_main:
        load_or_make_folds(data_dir, work_dir)
    D.barrier()
    folds = load_or_make_folds(data_dir, work_dir)
    if column == "seg_fold" and not (folds["seg_fold"] >= 0).any():
        raise FoldsError(f"{Path(data_dir) / 'segmentations'} holds no segmentation of a train.csv study: "
                         "stage 1 cannot train")
    return split_uids(folds, fold, column)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    import argparse

    from common.cli import resolve_data_dir, setup_logging

    parser = argparse.ArgumentParser(description="Make the seeded, stratified folds every stage uses "
                                                 "(work/folds.csv); reuses them when they already exist.")
    parser.add_argument("--data-dir", default=None, help="RSNA data root (default: $RSNA_DATA_DIR)")
    parser.add_argument("--work-dir", default="work")
    parser.add_argument("--n-folds", type=int, default=N_FOLDS)
    parser.add_argument("--seed", type=int, default=FOLD_SEED)
    args = parser.parse_args(argv)
    setup_logging()
    folds = load_or_make_folds(resolve_data_dir(args.data_dir), Path(args.work_dir), args.n_folds, args.seed)
    print(folds.groupby("fold").size().rename("studies").to_frame().assign(
        segmented=folds[folds["seg_fold"] >= 0].groupby("seg_fold").size()).fillna(0).astype(int))
    return folds


if __name__ == "__main__":
    main()
