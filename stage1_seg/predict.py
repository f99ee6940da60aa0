"""Predict C1-C7 masks and vertebra boxes for every study with the stage-1 fold ensemble.

    python -m stage1_seg.predict [--split train test] [--data-dir D] [--work-dir W] [key=value ...]

Writes ``work/stage1/<run>/masks/<uid>.npz`` (``probs`` uint8 (7, d, h, w),
``shape`` (S, H, W), ``region`` (6,): the part of the study the probabilities cover,
``boxes`` and ``status`` as the model gives them; with a mask also ``ziou`` and the true
slice ranges ``true_z``) study by study, skipping studies already done. Then, with
``predict.box_offsets``, fits the model's slice-range bias on the studies with masks
(``box_offsets.json``; see ``stage1_seg.boxes``; with fewer than
``predict.box_offsets_min_studies`` such studies an earlier file of the run is used, else
none) and gathers ``work/stage1/<run>/boxes.csv`` with it applied.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from common.cli import parse_command
from common.constants import STUDY_COL, VERTEBRAE
from common.dicom import load_study
from common.io import remove_stale_temporaries, save_npz_atomic, write_csv_atomic, write_json_atomic
from common.nifti import load_rsna_mask
from stage1_seg.boxes import (BOX_COLUMNS, OFFSETS_FILE, STATUSES, apply_box_offsets, boxes_from_labels, cube_slices,
                              fit_box_offsets, read_box_offsets, study_dice, vertebra_boxes, write_box_offsets, z_errors,
                              z_iou)
from stage1_seg.config import Stage1Config
from stage1_seg.infer import Stage1Ensemble, find_checkpoints

log = logging.getLogger(__name__)

_COORDS = ["z0", "z1", "y0", "y1", "x0", "x1", "voxels"]


def list_studies(data_dir: Path, split: str) -> list[str]:
    folder = data_dir / f"{split}_images"
    if not folder.is_dir():
        raise FileNotFoundError(f"no {split}_images folder in {data_dir}")
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def study_outputs(probs: np.ndarray, region: np.ndarray, shape: tuple[int, int, int], uid: str,
                  cfg: Stage1Config) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """What is saved for one study from its cube probabilities ``(7, d, h, w)`` covering ``region``
    of a study of ``shape``: probs, shape, region, box coordinates and status codes; and its box rows."""
    p = cfg.predict
    boxes = vertebra_boxes(probs, shape, uid, p.threshold, p.fallback_threshold, p.min_voxels, region)
    out = {"probs": probs, "shape": np.asarray(shape, dtype=np.int64), "region": region,
           "boxes": boxes[_COORDS].to_numpy(np.int64),
           "status": boxes["status"].map(STATUSES.index).to_numpy(np.int64)}
    return out, boxes


def predict_study(ensemble: Stage1Ensemble, folder: Path, cfg: Stage1Config,
                  mask_path: Path | None = None) -> dict[str, np.ndarray]:
    """Everything saved for one study: probs, shape, box coordinates and status codes.

    With a ground-truth ``mask_path``, also the z-IoU of each predicted slice range
    with the true one (``ziou`` (7,), NaN where the vertebra is absent from the truth), the
    true ranges (``true_z`` (7, 2), -1 where absent) and each vertebra's Dice at the study's
    own resolution (``dice`` (7,), see :func:`stage1_seg.boxes.study_dice`).
    """
    study = load_study(folder, tolerant=True)
    probs, region = ensemble.predict_hu(study.hu, study.spacing)
    out, boxes = study_outputs(probs, region, study.hu.shape, study.uid, cfg)
    if mask_path is not None:
        labels = load_rsna_mask(mask_path, study)
        truth = boxes_from_labels(labels, study.uid)
        out["ziou"] = ziou_rows(boxes, truth)
        out["true_z"] = truth[["z0", "z1"]].to_numpy(np.int64)
        out["dice"] = study_dice(probs, region, labels)
    return out


def ziou_rows(boxes: pd.DataFrame, truth: pd.DataFrame) -> np.ndarray:
    """z-IoU (7,) of predicted against true slice ranges; NaN where the truth has no vertebra."""
    return np.array([z_iou((pr.z0, pr.z1), (tr.z0, tr.z1)) if tr.z0 >= 0 else np.nan
                     for pr, tr in zip(boxes.itertuples(), truth.itertuples())])


def _segmentation(data_dir: Path, split: str, uid: str) -> Path | None:
    if split != "train":
        return None
    for suffix in (".nii", ".nii.gz"):
        if (data_dir / "segmentations" / f"{uid}{suffix}").is_file():
            return data_dir / "segmentations" / f"{uid}{suffix}"
    return None


def boxes_from_npz(path: Path, uid: str) -> pd.DataFrame:
    with np.load(path) as data:
        frame = pd.DataFrame(data["boxes"], columns=_COORDS)
        frame["status"] = [STATUSES[i] for i in data["status"]]
    frame.insert(0, "vertebra", list(VERTEBRAE))
    frame.insert(0, STUDY_COL, uid)
    return frame[BOX_COLUMNS]


def run(cfg: Stage1Config, data_dir: Path, work_dir: Path, splits: Sequence[str] | None = None,
        limit: int | None = None) -> dict[str, Any]:
    """Predict every study of ``splits``; returns a summary (also in ``predict_summary.json``)."""
    run_dir = Path(work_dir) / "stage1" / cfg.run
    ensemble = Stage1Ensemble(find_checkpoints(run_dir, cfg.predict.folds, cfg.predict.checkpoint),
                              flip_tta=cfg.predict.flip_tta, amp=cfg.train.amp)
    mask_dir = run_dir / "masks"
    for folder in (run_dir, mask_dir):
        if folder.is_dir():
            remove_stale_temporaries(folder)
    done, failed, studies = 0, [], []
    jobs = [(split, uid) for split in (splits or cfg.predict.splits) for uid in list_studies(data_dir, split)]
    jobs = jobs[:limit] if limit else jobs
    for split, uid in tqdm(jobs, desc="stage1 predict", dynamic_ncols=True):
        path = mask_dir / f"{uid}.npz"
        if not path.exists():
            try:
                result = predict_study(ensemble, data_dir / f"{split}_images" / uid, cfg,
                                       _segmentation(data_dir, split, uid))
                save_npz_atomic(path, **result)
                done += 1
            except Exception as exc:  # one bad study must not stop the other 2,000
                log.error("study %s failed: %s", uid, exc)
                failed.append(uid)
                continue
        with np.load(path) as data:
            studies.append((boxes_from_npz(path, uid), cube_slices(data["region"], data["probs"].shape[1]),
                            int(data["shape"][0]), data["true_z"] if "true_z" in data else None))
    offsets, fitted_on = box_offsets(cfg, run_dir, studies)
    frames = [apply_box_offsets(frame, offsets, vox, n) if offsets is not None else frame
              for frame, vox, n, _ in studies]
    boxes = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=BOX_COLUMNS)
    write_csv_atomic(run_dir / "boxes.csv", boxes)
    summary = {"studies": len(jobs), "predicted": done, "skipped": len(jobs) - done - len(failed),
               "failed": failed, "status_counts": boxes["status"].value_counts().to_dict(),
               "models": len(ensemble.models), "device": str(ensemble.device),
               "box_offsets": None if offsets is None else np.round(offsets, 3).tolist(),
               "box_offsets_fitted_on": fitted_on}
    truths = [(raw, frame, true) for (raw, _, _, true), frame in zip(studies, frames) if true is not None]
    if truths:  # how well the boxes cover the true vertebra slice ranges, on segmented studies
        truth_frames = [pd.DataFrame(true, columns=["z0", "z1"]) for _, _, true in truths]
        for key, index in (("ziou", 0), ("ziou_with_offsets", 1)):
            values = np.concatenate([ziou_rows(t[index], tf) for t, tf in zip(truths, truth_frames)])
            values = values[~np.isnan(values)]
            summary.update({f"{key}_mean": float(values.mean()), f"{key}_frac_ge_0_7": float((values >= 0.7).mean())})
        summary["ziou_studies"] = len(truths)  # ziou_with_offsets: on the studies the offsets were fitted on
    write_json_atomic(run_dir / "predict_summary.json", summary)
    log.info("stage 1 predict: %s", {k: v for k, v in summary.items() if k != "failed"})
    return summary


def box_offsets(cfg: Stage1Config, run_dir: Path, studies: list) -> tuple[np.ndarray | None, int | str | None]:
    """The run's box offsets and what they were fitted on: fitted now on ``studies`` (rows of
    (boxes, slices per cube voxel, slices, true ranges or None)) when enough have masks and
    written to ``box_offsets.json``; else that file from an earlier prediction; else none."""
    p = cfg.predict
    if not p.box_offsets:
        return None, None
    path = run_dir / OFFSETS_FILE
    errors = [z_errors(frame[["z0", "z1"]].to_numpy(), true, vox) for frame, vox, _, true in studies
              if true is not None]
    if len(errors) >= p.box_offsets_min_studies:
        offsets = fit_box_offsets(np.stack(errors), p.box_offsets_min_studies)
        write_box_offsets(path, offsets, len(errors))
        log.info("box offsets fitted on %d studies with masks (cube voxels, start / end): %s", len(errors),
                 ", ".join(f"{v} {a:+.2f} / {b:+.2f}" for v, (a, b) in zip(VERTEBRAE, offsets)))
        # What the file holds (rounded), not the fit itself: make_submission and a later prediction
        # apply the file, and a range on a rounding boundary would otherwise move by a slice.
        return read_box_offsets(path), len(errors)
    if path.is_file():
        log.info("box offsets from %s (%d studies with masks here, %d needed to refit)", path, len(errors),
                 p.box_offsets_min_studies)
        return read_box_offsets(path), str(path.name)
    log.warning("no box offsets: %d studies with masks among those predicted, %d needed, and no %s yet "
                "(predict the train split first)", len(errors), p.box_offsets_min_studies, path)
    return None, None


def _arguments(parser) -> None:
    parser.add_argument("--split", nargs="+", choices=["train", "test"], default=None,
                        help="which image folders (default: predict.splits from the config)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N studies")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cmd = parse_command("Predict C1-C7 masks and vertebra boxes with the stage-1 ensemble.", "stage1.yaml",
                        Stage1Config, argv, _arguments)
    return run(cmd.cfg, cmd.data_dir, cmd.work_dir, cmd.args.split, cmd.args.limit)


if __name__ == "__main__":
    main()
