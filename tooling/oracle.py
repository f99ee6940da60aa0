"""Stage-1 outputs from the true labels of a synthetic dataset: the "oracle" stage 1.

Stage 2 trained on crops cut from these outputs shows what stage 2 can do when stage 1
is perfect, so the recipe check can tell a stage-2 failure from a stage-1 one. The
generator is deterministic per study (:func:`tooling.synth.synth_study`), so every
training study's label volume is rendered again, including the studies that were
written without a mask. Each study gets what ``stage1_seg.predict`` writes
(``masks/<uid>.npz``: the labels reduced to the stage-1 cube as one-hot
probabilities, the cube's region, boxes and statuses) and the run gets its
``boxes.csv``, so ``stage2_cls.crop`` reads it as it reads any stage-1 run.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from common.dicom import load_study
from common.io import save_npz_atomic, write_csv_atomic
from common.volume import crop_region, resample_labels
from stage1_seg.config import Stage1Config
from stage1_seg.data import cube_region, cube_shape
from stage1_seg.predict import boxes_from_npz, study_outputs
from tooling.synth import plan_dataset, synth_study

log = logging.getLogger(__name__)

ORACLE_RUN = "oracle"


def oracle_outputs(hu: np.ndarray, spacing, labels: np.ndarray, uid: str, cfg: Stage1Config) -> dict[str, np.ndarray]:
    """What ``stage1_seg.predict`` saves for one study, from its label volume ``(S, H, W)`` (1..7 = C1..C7)."""
    if labels.shape != hu.shape:
        raise ValueError(f"{uid}: labels {labels.shape} do not match the study's volume {hu.shape}")
    region = cube_region(hu, spacing, cfg.preprocess)
    probs = np.round(resample_labels(crop_region(labels, region, 0), cube_shape(cfg.preprocess)) * 255).astype(np.uint8)
    return study_outputs(probs, region, hu.shape, uid, cfg)[0]


def write_oracle_stage1(data_dir: Path, work_dir: Path, cfg: Stage1Config, n_train: int, n_test: int,
                        size: int, seed: int, n_slices: int | None = None, variety: str = "easy") -> Path:
    """Write ``work_dir/stage1/oracle`` for every training study of the dataset that
    ``make_dataset`` made with these arguments; returns the run folder.

    Each study is read back from its DICOM series (as stage 1 would read it) and checked
    against the re-rendered phantom: a dataset made with other arguments fails loudly
    instead of giving stage 2 the labels of other studies.
    """
    data_dir, work_dir = Path(data_dir), Path(work_dir)
    run_dir = work_dir / "stage1" / ORACLE_RUN
    specs = [s for s in plan_dataset(n_train, n_train, n_test, size, seed, n_slices, variety) if s.split == "train"]
    frames = []
    for spec in tqdm(specs, desc="oracle stage 1", unit="study", dynamic_ncols=True):
        path = run_dir / "masks" / f"{spec.uid}.npz"
        if not path.is_file():
            folder = data_dir / "train_images" / spec.uid
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder}: not in the dataset; was it made with other arguments?")
            study = load_study(folder)
            phantom = synth_study(spec)
            if phantom.hu.shape != study.hu.shape or \
                    np.abs(phantom.hu.astype(np.float32) - study.hu).mean() > 1.0:
                raise ValueError(f"{folder}: the series does not match the generator's study {spec.index} "
                                 f"(seed {seed}); was the dataset made with other arguments?")
            save_npz_atomic(path, **oracle_outputs(study.hu, study.spacing, phantom.labels, spec.uid, cfg))
        frames.append(boxes_from_npz(path, spec.uid))
    write_csv_atomic(run_dir / "boxes.csv", pd.concat(frames, ignore_index=True))
    log.info("oracle stage 1: %d studies in %s", len(frames), run_dir)
    return run_dir
