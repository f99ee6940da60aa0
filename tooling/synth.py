"""A synthetic RSNA 2022 cervical spine dataset in the Kaggle layout.

``python -m tooling.synth --out DIR`` writes, under DIR::

    train_images/<UID>/<InstanceNumber>.dcm   test_images/<UID>/<n>.dcm
    segmentations/<UID>.nii                   (the first --n-seg training studies)
    train.csv  train_bounding_boxes.csv  test.csv  sample_submission.csv
    test_labels.csv                           (hidden labels of the test studies)
    vertebra_slices.csv                       (hidden: every study's true C1..C7 slice ranges)
    synth_info.json                           (per-study syntax, slice order, pixel sign, spacing)

Each study is a rendered neck phantom (``tooling.phantom``) with fractures drawn
to match the competition's label prevalence. ``--variety`` picks how much the
studies differ (``tooling.anatomy.PRESETS``): ``easy`` is the original
generator; ``varied`` spans fields of view, slice spacings, scan ranges, poses,
noise, calibration, artefacts and fracture kinds like real neck CTs. Studies cycle through transfer
syntaxes (uncompressed explicit/implicit VR, JPEG Lossless, JPEG 2000 lossless,
RLE), slice orders (head-first and feet-first instance numbers) and pixel
encodings (signed 16-bit, unsigned 12-bit with intercept -1024), so a reader
meets every case the real data holds. Everything follows from ``seed``: the
same seed gives the same pixels, masks and CSVs, whatever the worker count.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from pydicom.uid import (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1,
                         RLELossless)
from tqdm import tqdm

from common.constants import OVERALL, PRED_COL, PREDICTION_TYPE_COL, ROW_ID_COL, STUDY_COL, TARGETS, VERTEBRAE
from common.io import write_bytes_atomic, write_csv_atomic, write_json_atomic
from common.parallel import worker_pool
from tooling.dicom_writer import write_ct_series
from tooling.anatomy import PRESETS
from tooling.phantom import Phantom, render_phantom

log = logging.getLogger(__name__)

UID_ROOT = "1.2.826.0.1.3680043."
SYNTAXES = (ExplicitVRLittleEndian, JPEGLosslessSV1, JPEG2000Lossless, RLELossless, ImplicitVRLittleEndian)
# train.csv prevalences (COMPETITION.md): patient level, then per vertebra C1..C7
PATIENT_PREVALENCE = 0.476
VERTEBRA_PREVALENCE = (0.072, 0.141, 0.036, 0.054, 0.080, 0.137, 0.195)
N_FRACTURED = ((1, 0.65), (2, 0.25), (3, 0.07), (4, 0.02), (5, 0.01))  # vertebrae per positive patient
BOX_FRACTION = 0.5  # fractured training studies that get bounding boxes
BOX_COLUMNS = [STUDY_COL, "x", "y", "width", "height", "slice_number"]
RANGE_COLUMNS = [STUDY_COL, "vertebra", "z0", "z1"]  # vertebra_slices.csv: true head-to-feet slice ranges


@dataclass(frozen=True)
class DatasetSpec:
    """One synthetic dataset of the demo and the recipe check: its size, seed and how much its studies differ."""

    name: str
    n_train: int = 48
    n_seg: int = 24
    n_test: int = 24
    size: int = 96
    seed: int = 0
    n_slices: int | None = None   # None: from the variety's slice spacing
    variety: str = "varied"


@dataclass(frozen=True)
class StudySpec:
    """Everything that decides one study's files; ``index`` and ``seed`` seed its phantom."""

    uid: str
    split: str  # "train" or "test"
    index: int
    seed: int
    size: int
    n_slices: int | None  # None: the variety's slice spacing decides
    fractured: tuple[int, ...]  # 7 flags, C1..C7
    syntax: str
    feet_first: bool  # InstanceNumber 1 is the lowest slice
    signed: bool  # int16 pixels; else uint16 with 12 bits stored and intercept -1024
    segmented: bool
    boxes: bool
    variety: str = "easy"  # a name in tooling.anatomy.PRESETS


def draw_fractures(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 7) 0/1 fracture flags, C1..C7, with the competition's prevalence.

    Exactly round(0.476 n) studies are positive (so small sets hold both classes);
    each gets 1..5 fractured vertebrae, chosen with weights proportional to the
    per-vertebra prevalence.
    """
    flags = np.zeros((n, 7), np.int64)
    weights = np.asarray(VERTEBRA_PREVALENCE) / sum(VERTEBRA_PREVALENCE)
    counts, probs = zip(*N_FRACTURED)
    for i in sorted(rng.permutation(n)[: int(round(PATIENT_PREVALENCE * n))]):
        k = int(rng.choice(counts, p=probs))
        flags[i, rng.choice(7, size=k, replace=False, p=weights)] = 1
    return flags


def plan_dataset(n_train: int, n_seg: int, n_test: int, size: int, seed: int,
                 n_slices: int | None = None, variety: str = "easy") -> list[StudySpec]:
    """The studies of one dataset, training first; study i uses syntax i mod 5,
    feet-first order when i mod 3 == 1 and signed pixels when i is even."""
    if min(n_train, n_seg, n_test) < 0 or n_seg > n_train or n_train + n_test == 0:
        raise ValueError(f"need 0 <= n_seg <= n_train and some studies; got n_train={n_train}, "
                         f"n_seg={n_seg}, n_test={n_test}")
    if size < 32:
        raise ValueError(f"size {size} is too small for the phantom (use 32 or more)")
    rng = np.random.default_rng(seed)
    total = n_train + n_test
    numbers = rng.choice(np.arange(1000, 33000), size=total, replace=False)
    fractured = np.concatenate([draw_fractures(rng, n_train), draw_fractures(rng, n_test)])
    lo, hi = round(0.8 * size), round(1.2 * size)
    if variety not in PRESETS:
        raise ValueError(f"unknown variety {variety!r}; presets: {', '.join(PRESETS)}")
    slices = rng.integers(lo, hi + 1, size=total) if n_slices is None else np.full(total, n_slices)
    by_spacing = n_slices is None and PRESETS[variety].slice_mm is not None
    with_boxes = rng.random(total) < BOX_FRACTION
    return [StudySpec(uid=f"{UID_ROOT}{numbers[i]}", split="train" if i < n_train else "test", index=i,
                      seed=seed, size=size, n_slices=None if by_spacing else int(slices[i]),
                      fractured=tuple(int(f) for f in fractured[i]), variety=variety,
                      syntax=str(SYNTAXES[i % len(SYNTAXES)]), feet_first=i % 3 == 1, signed=i % 2 == 0,
                      segmented=i < n_seg, boxes=bool(i < n_train and fractured[i].any() and with_boxes[i]))
            for i in range(total)]


def synth_study(spec: StudySpec) -> Phantom:
    """Render the phantom of one planned study (deterministic: same spec, same volumes)."""
    rng = np.random.default_rng([spec.seed, spec.index])
    vrng = np.random.default_rng([spec.seed, spec.index, 1])  # the variety's own stream
    return render_phantom(rng, spec.size, spec.n_slices, spec.fractured, PRESETS[spec.variety], vrng)


def instance_numbers(spec: StudySpec, n: int) -> np.ndarray:
    """(n,) InstanceNumber of each slice, head to feet."""
    return np.arange(n, 0, -1) if spec.feet_first else np.arange(1, n + 1)


def write_dicom_series(folder: Path, spec: StudySpec, ph: Phantom) -> np.ndarray:
    """Write ``ph`` as ``folder/<InstanceNumber>.dcm`` (atomically); returns (S,) instance numbers, head to feet."""
    write_ct_series(folder, ph.hu, spacing=ph.spacing, origin=(ph.origin[0], ph.origin[1], ph.origin[2]),
                    signed=spec.signed, head_first_instances=not spec.feet_first,
                    transfer_syntax=spec.syntax, study_uid=spec.uid, atomic=True)
    return instance_numbers(spec, len(ph.hu))


def segmentation_array(labels: np.ndarray) -> np.ndarray:
    """Labels (S, R, C) head to feet -> the RSNA NIfTI layout (C, R, S): axis 0 = column,
    axis 1 = row reversed, axis 2 = slices by increasing patient z."""
    return np.ascontiguousarray(labels[::-1, ::-1, :].transpose(2, 1, 0))


def write_segmentation(path: Path, ph: Phantom) -> None:
    """Save the label map as an RSNA-style uint8 NIfTI with a RAS affine matching the DICOM."""
    n, rows, _ = ph.labels.shape
    dz, dy, dx = ph.spacing
    x0, y0, _ = ph.origin
    z_low = float(ph.z_positions[-1])
    # voxel (i, j, k) = column i, row rows-1-j, k-th slice from the bottom; LPS -> RAS flips x and y
    affine = np.array([[-dx, 0, 0, -x0], [0, dy, 0, -(y0 + (rows - 1) * dy)], [0, 0, dz, z_low], [0, 0, 0, 1]])
    image = nib.Nifti1Image(segmentation_array(ph.labels), affine)
    image.header.set_xyzt_units("mm")
    write_bytes_atomic(path, image.to_bytes())


def build_study(spec: StudySpec, out: Path) -> dict[str, Any]:
    """Render and write one study; returns its bounding-box rows and a short record."""
    logging.getLogger("openjpeg").setLevel(logging.WARNING)  # it logs every encoded tile at INFO
    ph = synth_study(spec)
    numbers = write_dicom_series(out / f"{spec.split}_images" / spec.uid, spec, ph)
    if spec.segmented:
        write_segmentation(out / "segmentations" / f"{spec.uid}.nii", ph)
    boxes = [dict(zip(BOX_COLUMNS, (spec.uid, float(x), float(y), float(w), float(h), int(numbers[s]))))
             for s, x, y, w, h, _ in ph.boxes] if spec.boxes else []
    record = {k: v for k, v in asdict(spec).items() if k not in ("seed", "size")}
    record["n_slices"] = len(ph.hu)
    ranges = [(spec.uid, name, *_slice_range(ph.labels, c + 1)) for c, name in enumerate(VERTEBRAE)]
    record.update(spacing=list(ph.spacing), kinds={VERTEBRAE[k - 1]: v for k, v in ph.kinds.items()})
    return {"boxes": boxes, "record": record, "ranges": ranges}


def _slice_range(labels: np.ndarray, label: int) -> tuple[int, int]:
    """First and last head-to-feet slice holding ``label`` (-1, -1 when absent)."""
    slices = np.flatnonzero((labels == label).any(axis=(1, 2)))
    return (int(slices[0]), int(slices[-1])) if slices.size else (-1, -1)


def label_table(specs: list[StudySpec]) -> pd.DataFrame:
    """train.csv columns: StudyInstanceUID, patient_overall, C1..C7."""
    flags = np.array([spec.fractured for spec in specs], np.int64).reshape(-1, 7)
    frame = pd.DataFrame(flags, columns=list(VERTEBRAE))
    frame.insert(0, OVERALL, flags.max(axis=1) if len(flags) else [])
    frame.insert(0, STUDY_COL, [spec.uid for spec in specs])
    return frame


def submission_tables(specs: list[StudySpec]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """test.csv (row_id, StudyInstanceUID, prediction_type) and sample_submission.csv (row_id, fractured)."""
    rows = [(f"{spec.uid}_{target}", spec.uid, target) for spec in specs for target in TARGETS]
    test = pd.DataFrame(rows, columns=[ROW_ID_COL, STUDY_COL, PREDICTION_TYPE_COL])
    return test, pd.DataFrame({ROW_ID_COL: test[ROW_ID_COL], PRED_COL: 0.5})


def _remove_stale(out: Path, specs: list[StudySpec]) -> None:
    """Drop studies a previous run left in ``out`` that this dataset does not hold,
    and the hidden half-written folders of an interrupted run."""
    keep = {f"{spec.split}_images/{spec.uid}" for spec in specs}
    keep |= {f"segmentations/{spec.uid}.nii" for spec in specs if spec.segmented}
    for sub in ("train_images", "test_images", "segmentations"):
        for entry in [*(out / sub).glob(f"{UID_ROOT}*"), *(out / sub).glob(f".{UID_ROOT}*")]:
            if f"{sub}/{entry.name}" in keep:
                continue
            log.info("removing %s (not part of this dataset)", entry)
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def _run_studies(specs: list[StudySpec], out: Path, workers: int) -> list[dict[str, Any]]:
    """Build every study, in parallel when ``workers`` > 1; results keep the plan's order."""
    job = partial(build_study, out=out)
    bar = dict(total=len(specs), desc="synthetic studies", unit="study")
    if workers <= 1 or len(specs) < 4:  # starting workers costs more than a few studies
        return [job(spec) for spec in tqdm(specs, **bar)]
    with worker_pool(workers) as pool:
        return list(tqdm(pool.map(job, specs), **bar))


def make_dataset(out: str | os.PathLike, n_train: int = 40, n_seg: int = 20, n_test: int = 6, size: int = 128,
                 seed: int = 0, n_slices: int | None = None, workers: int | None = None,
                 variety: str = "easy") -> dict[str, Any]:
    """Write a complete synthetic dataset under ``out`` (see the module docstring).

    n_slices: slices per study (default: from the variety's slice spacing, else drawn per study
    in 0.8..1.2 x size); variety: a preset of ``tooling.anatomy.PRESETS``;
    workers: processes (default: one per core, at most 8). Returns a summary: the train, test and
    segmented UIDs, counts, seconds taken and one record per study.
    """
    start = time.perf_counter()
    out = Path(out)
    specs = plan_dataset(n_train, n_seg, n_test, size, seed, n_slices, variety)
    for sub in ("train_images", "test_images", "segmentations"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    _remove_stale(out, specs)
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    results = _run_studies(specs, out, workers)
    train, test = [s for s in specs if s.split == "train"], [s for s in specs if s.split == "test"]
    boxes = pd.DataFrame([b for r in results for b in r["boxes"]], columns=BOX_COLUMNS)
    test_csv, sample = submission_tables(test)
    write_csv_atomic(out / "train.csv", label_table(train))
    write_csv_atomic(out / "train_bounding_boxes.csv", boxes)
    write_csv_atomic(out / "test.csv", test_csv)
    write_csv_atomic(out / "sample_submission.csv", sample)
    write_csv_atomic(out / "test_labels.csv", label_table(test))
    ranges = pd.DataFrame([row for r in results for row in r["ranges"]], columns=RANGE_COLUMNS)
    write_csv_atomic(out / "vertebra_slices.csv", ranges)
    records = [r["record"] for r in results]
    write_json_atomic(out / "synth_info.json", {"seed": seed, "size": size, "variety": variety, "studies": records})
    summary = {"out": str(out), "train": [s.uid for s in train], "test": [s.uid for s in test],
               "segmented": [s.uid for s in specs if s.segmented],
               "train_positive": int(sum(max(s.fractured) for s in train)),
               "box_rows": len(boxes), "seconds": round(time.perf_counter() - start, 2), "studies": records}
    log.info("wrote %d training (%d fractured, %d segmented) and %d test studies to %s in %.1f s",
             len(train), summary["train_positive"], len(summary["segmented"]), len(test), out, summary["seconds"])
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m tooling.synth",
                                     description="Write a synthetic RSNA 2022 dataset in the Kaggle layout.")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--n-train", type=int, default=40, help="training studies")
    parser.add_argument("--n-seg", type=int, default=20, help="training studies with a segmentation")
    parser.add_argument("--n-test", type=int, default=6, help="test studies (labels in test_labels.csv)")
    parser.add_argument("--size", type=int, default=128, help="rows = columns of every slice")
    parser.add_argument("--slices", type=int, default=None, help="slices per study (default: 0.8-1.2 x size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: one per core, at most 8)")
    parser.add_argument("--variety", choices=sorted(PRESETS), default="easy",
                        help="how studies differ (tooling.anatomy.PRESETS; 'easy' is the original generator)")
    args = parser.parse_args(argv)
    from common.cli import setup_logging

    setup_logging()
    return make_dataset(args.out, args.n_train, args.n_seg, args.n_test, args.size, args.seed,
                        args.slices, args.workers, args.variety)


if __name__ == "__main__":
    main()
