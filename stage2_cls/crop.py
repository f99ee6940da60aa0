"""Cache the stage-2 vertebra stacks of every study on disk.

``python -m stage2_cls.crop [--data-dir D] [--work-dir W] [--config C] [--split train|test]
[--limit N] [key=value ...]``

Reads ``W/stage1/<crop.stage1_run>/boxes.csv`` and ``.../masks/<uid>.npz``, decodes
each study once, builds its stacks in memory (``stage2_cls.stacks.build_stacks``) and
writes ``W/crops/<uid>.npz`` (compressed, atomic) holding ``stacks`` uint8
(7, n_slices, 6, size, size), ``missing`` bool (7,), ``slices`` int64 (7, n_slices) and
``instance_numbers`` int64 (study slices,): the InstanceNumber of each slice index, which
ties ``train_bounding_boxes.csv`` to the stacks (``stage2_cls.slice_labels``; files
written before it was added lack it and get no slice-level labels).

Resuming: ``W/crops/settings.json`` records the crop settings; a later run with the
same settings skips studies whose file exists, and a run with other settings stops
with an error (delete the folder or use another ``--work-dir``) rather than mixing
two kinds of crops in one folder.

Studies without stage-1 outputs (no mask file or no box rows) are skipped with a
warning naming them; a study that cannot be read is logged with its file and
skipped (studies are read with ``tolerant=True``, and a volume whose shape differs
from its stage-1 mask is refused rather than cropped out of register). A summary goes
to ``W/crops/summary_<split>.json``. The command fails (exit 1) only when no study of
the split has a crop at the end.
"""
from __future__ import annotations

import json
import logging
import time
import zipfile
from concurrent.futures import as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from common.cli import parse_command
from common.config import to_dict
from common.constants import STUDY_COL
from common.dicom import load_study
from common.io import atomic_path, remove_stale_temporaries, write_json_atomic
from common.parallel import worker_pool
from stage1_seg.boxes import read_boxes
from stage2_cls.config import CropConfig, Stage2Config
from stage2_cls.stacks import StackResult, boxes_array, build_stacks

LOG = logging.getLogger(__name__)

CROP_FORMAT = 1  # bump when the meaning of a crop file changes
# Deflate level 1: noisy CT crops gain ~15% from level 6 but cost 3-5x the time, and
# compression is the slowest step of cropping (see tooling.bench.crop).
COMPRESS_LEVEL = 1
SPLITS = {"train": ("train.csv", "train_images"), "test": ("test.csv", "test_images")}


class CropSettingsError(RuntimeError):
    """The crops folder holds crops made with other settings."""


@dataclass(frozen=True)
class CropJob:
    """Everything one worker needs for one study (picklable)."""

    uid: str
    study_dir: Path
    mask_path: Path
    boxes: np.ndarray  # (7, 6)
    out_path: Path
    cfg: CropConfig


def crop_settings(cfg: CropConfig) -> dict[str, Any]:
    """The settings that change the content of a crop file (not e.g. the worker count)."""
    settings = to_dict(cfg)
    settings.pop("workers", None)
    return {"format": CROP_FORMAT, "crop": settings}


def check_settings(crops_dir: Path, cfg: CropConfig, record: bool = True) -> None:
    """Stop if ``crops_dir`` holds crops of other settings; else record them if ``record``."""
    path = crops_dir / "settings.json"
    wanted = crop_settings(cfg)
    if path.is_file():
        found = json.loads(path.read_text())
        if found != wanted:
            changed = sorted(k for k in set(found.get("crop", {})) | set(wanted["crop"])
                             if found.get("crop", {}).get(k) != wanted["crop"].get(k))
            raise CropSettingsError(
                f"{crops_dir} holds crops made with other settings ({path}; differs in "
                f"{', '.join(changed) or 'format'}): delete that folder or use another "
                f"--work-dir to make crops with the current settings")
        return
    if any(crops_dir.glob("*.npz")):
        raise CropSettingsError(f"{crops_dir} holds crop files but no settings.json, so their "
                                "settings are unknown: delete that folder or use another --work-dir")
    if record:
        write_json_atomic(path, wanted)


def study_uids(data_dir: Path, split: str) -> tuple[list[str], Path]:
    """Study UIDs of a split in CSV order, and the folder holding their image folders."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    csv_name, images = SPLITS[split]
    csv_path = data_dir / csv_name
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path} not found: is {data_dir} an RSNA data folder?")
    frame = pd.read_csv(csv_path, dtype={STUDY_COL: str})
    if STUDY_COL not in frame.columns:
        raise ValueError(f"{csv_path}: no {STUDY_COL} column")
    uids = list(dict.fromkeys(frame[STUDY_COL].astype(str)))
    images_dir = data_dir / images
    if split == "test":
        # The public test.csv names studies whose images are not shipped: only crop those present.
        absent = [u for u in uids if not (images_dir / u).is_dir()]
        if absent:
            LOG.warning("%d test studies in %s have no image folder; not cropped", len(absent), csv_path)
        uids = [u for u in uids if u not in set(absent)]
    return uids, images_dir


def save_crop(path: str | Path, result: StackResult, instance_numbers: np.ndarray | None = None) -> None:
    """Write a crop file atomically: a compressed npz that ``np.load`` reads as usual."""
    arrays = {"stacks": result.stacks, "missing": result.missing, "slices": result.slices}
    if instance_numbers is not None:
        arrays["instance_numbers"] = np.asarray(instance_numbers, dtype=np.int64)
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED,
                             compresslevel=COMPRESS_LEVEL) as archive:
            for name, array in arrays.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.ascontiguousarray(array), allow_pickle=False)


def _read_mask(path: Path) -> tuple[np.ndarray, tuple[int, ...], np.ndarray | None]:
    """(probs, volume shape, region) of a stage-1 mask file; a damaged file raises naming it."""
    try:
        with np.load(path) as npz:
            region = npz["region"] if "region" in npz else None
            return npz["probs"], tuple(int(v) for v in npz["shape"]), region
    except Exception as exc:  # zipfile, zlib and numpy each raise their own type, none naming the file
        raise ValueError(f"{path}: cannot read the stage-1 mask ({type(exc).__name__}: {exc})") from exc


def crop_study(job: CropJob) -> tuple[str, str, str]:
    """Build and write one study's crops; returns (uid, "written" | "failed", message)."""
    try:
        probs, shape, region = _read_mask(job.mask_path)
        study = load_study(job.study_dir, tolerant=True, uid=job.uid)
        if study.hu.shape != shape:
            raise ValueError(f"{job.study_dir}: volume shape {study.hu.shape} differs from the "
                             f"stage-1 mask {job.mask_path} (shape {shape})")
        result = build_stacks(study.hu, probs, job.boxes, job.cfg, region)
        save_crop(job.out_path, result, study.instance_numbers)
        return job.uid, "written", f"{int(result.missing.sum())} vertebrae missing"
    except Exception as exc:  # one bad study must not stop the others: report and go on
        return job.uid, "failed", f"{type(exc).__name__}: {exc}"


def _plan_jobs(uids: Sequence[str], images_dir: Path, stage1_dir: Path, crops_dir: Path,
               cfg: CropConfig) -> tuple[list[CropJob], list[str], list[str]]:
    """Jobs to run, UIDs already cropped, and UIDs without stage-1 outputs."""
    boxes = read_boxes(stage1_dir / "boxes.csv")
    by_uid = {str(uid): rows for uid, rows in boxes.groupby(STUDY_COL)}
    jobs, done, no_stage1 = [], [], []
    for uid in uids:
        out_path = crops_dir / f"{uid}.npz"
        if out_path.is_file():
            done.append(uid)
            continue
        mask_path = stage1_dir / "masks" / f"{uid}.npz"
        if uid not in by_uid or not mask_path.is_file():
            no_stage1.append(uid)
            continue
        jobs.append(CropJob(uid, images_dir / uid, mask_path, boxes_array(by_uid[uid]), out_path, cfg))
    return jobs, done, no_stage1


def _run_jobs(jobs: list[CropJob], workers: int) -> list[tuple[str, str, str]]:
    if workers <= 1 or len(jobs) <= 1:
        return [crop_study(job) for job in tqdm(jobs, desc="crops", unit="study")]
    # A worker killed from outside (e.g. out of memory) raises BrokenProcessPool here
    # instead of hanging; finished crops stay on disk and a rerun resumes.
    with worker_pool(min(workers, len(jobs))) as pool:
        futures = [pool.submit(crop_study, job) for job in jobs]
        return [f.result() for f in tqdm(as_completed(futures), total=len(futures),
                                         desc="crops", unit="study")]


def run(cfg: Stage2Config, data_dir: str | Path, work_dir: str | Path, split: str = "train",
        limit: int | None = None) -> dict[str, Any]:
    """Crop the studies of ``split`` (the first ``limit`` of them); returns the summary."""
    data_dir, work_dir = Path(data_dir), Path(work_dir)
    stage1_dir = work_dir / "stage1" / cfg.crop.stage1_run
    crops_dir = work_dir / "crops"
    start = time.perf_counter()
    uids, images_dir = study_uids(data_dir, split)
    if limit is not None:
        uids = uids[:limit]
    crops_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(crops_dir)
    check_settings(crops_dir, cfg.crop, record=False)  # existing crops count only if they match
    jobs, done, no_stage1 = _plan_jobs(uids, images_dir, stage1_dir, crops_dir, cfg.crop)
    if jobs:
        check_settings(crops_dir, cfg.crop)
    if no_stage1:
        LOG.warning("%d studies have no stage-1 outputs in %s (mask file or box rows): not cropped: %s%s",
                    len(no_stage1), stage1_dir, ", ".join(no_stage1[:10]),
                    " ..." if len(no_stage1) > 10 else "")
    LOG.info("%d studies to crop, %d already cropped, into %s", len(jobs), len(done), crops_dir)
    results = _run_jobs(jobs, cfg.crop.workers)
    for uid, status, msg in results:
        if status == "written":
            LOG.debug("cropped %s (%s)", uid, msg)
    failed = {uid: msg for uid, status, msg in results if status == "failed"}
    for uid, msg in failed.items():
        LOG.error("crop failed for %s: %s", uid, msg)
    written = sorted(uid for uid, status, _ in results if status == "written")
    summary = {
        "split": split, "crops_dir": str(crops_dir), "stage1_dir": str(stage1_dir),
        "n_studies": len(uids), "written": len(written), "skipped": len(done),
        "failed": failed, "no_stage1": no_stage1,
        "seconds": round(time.perf_counter() - start, 2),
    }
    write_json_atomic(crops_dir / f"summary_{split}.json", summary)
    LOG.info("crops: %d written, %d skipped (already there), %d failed, %d without stage-1 outputs "
             "(%.1f s)", len(written), len(done), len(failed), len(no_stage1), summary["seconds"])
    return summary


def _arguments(parser) -> None:
    parser.add_argument("--split", choices=sorted(SPLITS), default="train",
                        help="which studies to crop (default: train)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N studies")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cmd = parse_command("Cache the per-vertebra stage-2 stacks of every study.", "stage2.yaml", Stage2Config,
                        argv, _arguments)
    summary = run(cmd.cfg, cmd.data_dir, cmd.work_dir, split=cmd.args.split, limit=cmd.args.limit)
    if summary["written"] + summary["skipped"] == 0 and (summary["failed"] or summary["no_stage1"]):
        LOG.error("no study could be cropped")
        raise SystemExit(1)
    return summary


if __name__ == "__main__":
    main()
