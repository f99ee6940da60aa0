"""Predict C1-C7 masks and vertebra boxes for every study with the stage-1 fold ensemble.

    python -m stage1_seg.predict [--split train test] [--data-dir D] [--work-dir W] [key=value ...]

Writes ``work/stage1/<run>/masks/<uid>.npz`` (``probs`` uint8 (7, d, h, w),
``shape`` (S, H, W), ``boxes`` and ``status``) study by study, skipping studies
already done, then gathers ``work/stage1/<run>/boxes.csv``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from common.checkpoint import rebuild_model
from common.cli import base_parser, resolve_data_dir, setup_logging
from common.config import load_config
from common.constants import STUDY_COL, VERTEBRAE
from common.dicom import load_study
from common.distributed import choose_device
from common.io import save_npz_atomic, write_csv_atomic, write_json_atomic
from common.trainer import autocast_context
from common.nifti import load_rsna_mask
from stage1_seg.boxes import BOX_COLUMNS, STATUSES, boxes_from_labels, vertebra_boxes, z_iou
from stage1_seg.config import PreprocessConfig, Stage1Config
from stage1_seg.data import preprocess_hu
from stage1_seg.model import build_model

log = logging.getLogger(__name__)

_COORDS = ["z0", "z1", "y0", "y1", "x0", "x1", "voxels"]


def find_checkpoints(run_dir: Path, folds: Sequence[int], name: str = "best.pt") -> list[Path]:
    """The fold checkpoints that exist under ``run_dir``; an error when there are none."""
    found = [run_dir / f"fold{k}" / name for k in folds if (run_dir / f"fold{k}" / name).is_file()]
    if not found:
        raise FileNotFoundError(f"no stage-1 checkpoints ({name}) for folds {list(folds)} under {run_dir}; "
                                "train with `python -m stage1_seg.train --fold K` first")
    return found


class Stage1Ensemble:
    """Fold models rebuilt from their saved configs; mean of sigmoids, optional flip TTA."""

    def __init__(self, checkpoints: Sequence[Path], device: torch.device | None = None,
                 flip_tta: bool = False, amp: bool = True) -> None:
        self.device = device or choose_device()
        self.flip_tta, self.amp = flip_tta, amp
        self.models, configs = [], []
        for path in checkpoints:
            model, cfg = rebuild_model(path, "stage1", Stage1Config, build_model)
            self.models.append(model.to(self.device))
            configs.append(cfg)
        self.config: Stage1Config = configs[0]
        self.preprocess: PreprocessConfig = configs[0].preprocess
        self.in_channels = configs[0].model.in_channels
        if any(c.preprocess != self.preprocess or c.model.in_channels != self.in_channels for c in configs):
            raise ValueError("stage-1 checkpoints disagree on preprocessing; ensemble models trained alike")

    @torch.no_grad()
    def predict_cube(self, cube: np.ndarray, n_models: int | None = None) -> np.ndarray:
        """Preprocessed cube ``(D, H, W)`` -> mean probabilities ``(7, D, H, W)`` float32.

        ``n_models`` limits the ensemble to its first models (a cheaper path under a time budget).
        """
        x = torch.from_numpy(cube).to(self.device)[None, None].expand(1, self.in_channels, -1, -1, -1)
        total = torch.zeros((7, *cube.shape), device=self.device)
        count = 0
        for model in self.models[:n_models] if n_models else self.models:
            views = [False, True] if self.flip_tta else [False]
            for flip in views:
                inp = x.flip(-1) if flip else x
                with autocast_context(self.device, self.amp):
                    probs = torch.sigmoid(model(inp).float())[0]
                total += probs.flip(-1) if flip else probs
                count += 1
        return (total / count).cpu().numpy()

    def predict_hu(self, hu: np.ndarray, n_models: int | None = None) -> np.ndarray:
        """HU volume ``(S, H, W)`` -> probabilities ``(7, d, h, w)`` as uint8 (x255)."""
        probs = self.predict_cube(preprocess_hu(hu, self.preprocess), n_models)
        return np.round(probs * 255).astype(np.uint8)


def list_studies(data_dir: Path, split: str) -> list[str]:
    folder = data_dir / f"{split}_images"
    if not folder.is_dir():
        raise FileNotFoundError(f"no {split}_images folder in {data_dir}")
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def predict_study(ensemble: Stage1Ensemble, folder: Path, cfg: Stage1Config,
                  mask_path: Path | None = None) -> dict[str, np.ndarray]:
    """Everything saved for one study: probs, shape, box coordinates and status codes.

    With a ground-truth ``mask_path``, also the z-IoU of each predicted slice range
    with the true one (``ziou`` (7,), NaN where the vertebra is absent from the truth).
    """
    study = load_study(folder, tolerant=True)
    probs = ensemble.predict_hu(study.hu)
    p = cfg.predict
    boxes = vertebra_boxes(probs, study.hu.shape, study.uid, p.threshold, p.fallback_threshold, p.min_voxels)
    out = {"probs": probs, "shape": np.asarray(study.hu.shape, dtype=np.int64),
           "boxes": boxes[_COORDS].to_numpy(np.int64),
           "status": boxes["status"].map(STATUSES.index).to_numpy(np.int64)}
    if mask_path is not None:
        truth = boxes_from_labels(load_rsna_mask(mask_path, study), study.uid)
        out["ziou"] = np.array([
            z_iou((pr.z0, pr.z1), (tr.z0, tr.z1)) if tr.status != "missing" else np.nan
            for pr, tr in zip(boxes.itertuples(), truth.itertuples())])
    return out


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
    done, failed, frames, zious = 0, [], [], []
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
        frames.append(boxes_from_npz(path, uid))
        with np.load(path) as data:
            if "ziou" in data:
                zious.append(data["ziou"])
    boxes = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=BOX_COLUMNS)
    write_csv_atomic(run_dir / "boxes.csv", boxes)
    summary = {"studies": len(jobs), "predicted": done, "skipped": len(jobs) - done - len(failed),
               "failed": failed, "status_counts": boxes["status"].value_counts().to_dict(),
               "models": len(ensemble.models), "device": str(ensemble.device)}
    if zious:  # how well the boxes cover the true vertebra slice ranges, on segmented studies
        values = np.concatenate(zious)
        values = values[~np.isnan(values)]
        summary.update(ziou_studies=len(zious), ziou_mean=float(values.mean()),
                       ziou_frac_ge_0_7=float((values >= 0.7).mean()))
    write_json_atomic(run_dir / "predict_summary.json", summary)
    log.info("stage 1 predict: %s", {k: v for k, v in summary.items() if k != "failed"})
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = base_parser("Predict C1-C7 masks and vertebra boxes with the stage-1 ensemble.", "stage1.yaml")
    parser.add_argument("--split", nargs="+", choices=["train", "test"], default=None,
                        help="which image folders (default: predict.splits from the config)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N studies")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    cfg = load_config(Stage1Config, args.config, args.overrides)
    return run(cfg, resolve_data_dir(args.data_dir), Path(args.work_dir), args.split, args.limit)


if __name__ == "__main__":
    main()
