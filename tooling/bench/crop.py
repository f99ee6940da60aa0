"""Crop throughput on a synthetic study: decode once vs. re-read files per slice.

``python -m tooling.bench.crop [--slices 300] [--size 512] [--syntax native|rle|j2k]
[--repeat 3]``

Writes one rendered neck phantom as DICOM files into a temporary folder and prints, per
study: ``build_stacks`` alone on the volume in memory; ``load_study`` + ``build_stacks``
+ compressed save (what ``stage2_cls.crop`` does); and the naive public approach beside
it, which reads the 5 DICOM files of every one of the 7 x 15 stack items with pydicom,
so a slice is decoded up to ~5 times. Also the bytes of a crop file against raw.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from common.dicom import load_study
from common.io import save_npz_atomic
from common.volume import full_region, resample_labels
from stage1_seg.boxes import vertebra_boxes
from stage2_cls.config import CropConfig
from stage2_cls.crop import COMPRESS_LEVEL, save_crop
from stage2_cls.stacks import boxes_array, build_stacks, mask_crops, square_window, centre_slices
from tooling.dicom_writer import write_ct_series
from tooling.phantom import render_phantom

SYNTAXES = {"native": ExplicitVRLittleEndian, "rle": RLELossless, "j2k": JPEG2000Lossless}


def synthetic_study(slices: int, size: int, seed: int = 0, low: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A rendered neck phantom and its C1..C7 masks as a stage-1 model would give them.

    Returns hu (slices, size, size) int16 and probs (7, low, low, low) uint8 (the
    true masks resampled to the stage-1 resolution).
    """
    ph = render_phantom(np.random.default_rng(seed), size, slices, (0,) * 7)
    probs = resample_labels(ph.labels, (low, low, low))
    return ph.hu, np.round(probs * 255).astype(np.uint8)


def naive_stacks(files: list[Path], probs: np.ndarray, box_rows: np.ndarray, shape: tuple[int, int, int],
                 cfg: CropConfig) -> np.ndarray:
    """The public recipe: for every stack item read its 2*context+1 files again with pydicom."""
    files = sorted(files, key=lambda p: int(p.stem))  # by file name = InstanceNumber
    n_ch = 2 * cfg.context + 2
    stacks = np.zeros((7, cfg.n_slices, n_ch, cfg.size, cfg.size), dtype=np.uint8)
    low = cfg.window_center - cfg.window_width / 2
    for c, box in enumerate(box_rows):
        if (box < 0).any():
            continue
        top, left, side = square_window(box[2:], cfg.margin, shape[1:])
        centres = centre_slices(int(box[0]), int(box[1]), cfg.n_slices)
        for i, z in enumerate(centres):
            for k, dz in enumerate(range(-cfg.context, cfg.context + 1)):
                ds = pydicom.dcmread(files[int(np.clip(z + dz, 0, shape[0] - 1))])
                slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
                image = ds.pixel_array.astype(np.float32) * slope + intercept
                image = np.clip((image - low) * 255.0 / cfg.window_width, 0, 255).astype(np.uint8)
                crop = image[max(top, 0):top + side, max(left, 0):left + side]
                stacks[c, i, k] = cv2.resize(crop, (cfg.size, cfg.size), interpolation=cv2.INTER_AREA)
        stacks[c, :, -1] = mask_crops(probs[c], full_region(shape), centres, top, left, side, cfg.size)
    return stacks


def _best_of(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def benchmark(slices: int, size: int, syntax: str, repeat: int) -> list[tuple[str, str]]:
    """Run every measurement; returns (what, value) rows."""
    cfg = CropConfig()
    cv2.setNumThreads(1)  # one study per worker process in stage2_cls.crop
    hu, probs = synthetic_study(slices, size)
    boxes = boxes_array(vertebra_boxes(probs, hu.shape, "bench"))
    raw = 7 * cfg.n_slices * (2 * cfg.context + 2) * cfg.size * cfg.size
    with tempfile.TemporaryDirectory() as tmp:
        study_dir, out, ref = Path(tmp) / "study", Path(tmp) / "crop.npz", Path(tmp) / "ref.npz"
        files = write_ct_series(study_dir, hu, spacing=(1.0, 0.5, 0.5), signed=False,
                                transfer_syntax=SYNTAXES[syntax])
        result = build_stacks(hu, probs, boxes, cfg)
        t_build = _best_of(lambda: build_stacks(hu, probs, boxes, cfg), repeat)
        t_load = _best_of(lambda: load_study(study_dir), repeat)
        t_once = _best_of(lambda: build_stacks(load_study(study_dir).hu, probs, boxes, cfg), repeat)
        t_naive = _best_of(lambda: naive_stacks(files, probs, boxes, hu.shape, cfg), 1)
        t_save = _best_of(lambda: save_crop(out, result), repeat)
        t_npz = _best_of(lambda: save_npz_atomic(ref, stacks=result.stacks, missing=result.missing,
                                                 slices=result.slices), 1)
        on_disk, npz_size = out.stat().st_size, ref.stat().st_size
    t_full = t_once + t_save
    n_reads = int((boxes >= 0).all(axis=1).sum()) * cfg.n_slices * (2 * cfg.context + 1)
    return [
        ("study", f"{slices} x {size} x {size}, {syntax} DICOM, one process"),
        ("build_stacks only (volume in memory)", f"{t_build:.3f} s"),
        ("load_study only", f"{t_load:.3f} s"),
        ("load_study + build_stacks (decode once)", f"{t_once:.3f} s"),
        ("naive: pydicom reads 5 files per stack item", f"{t_naive:.3f} s"),
        ("speed-up of decode-once over naive", f"{t_naive / t_once:.1f}x"),
        ("slices decoded: decode-once vs naive", f"{slices} vs {n_reads}"),
        (f"save_crop (deflate level {COMPRESS_LEVEL})", f"{t_save:.3f} s, {on_disk / 1e6:.2f} MB"),
        ("np.savez_compressed (default level)", f"{t_npz:.3f} s, {npz_size / 1e6:.2f} MB"),
        ("raw stacks (7*15*6*224*224 bytes)", f"{raw / 1e6:.2f} MB (level {COMPRESS_LEVEL}: "
                                              f"{raw / on_disk:.1f}x smaller)"),
        ("stage2_cls.crop per study (load+build+save)",
         f"{t_full:.3f} s = {1 / t_full:.2f} studies/s per process"),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Crop throughput on a synthetic study.")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--syntax", choices=sorted(SYNTAXES), default="native")
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs (the naive one runs once)")
    args = parser.parse_args(argv)
    rows = benchmark(args.slices, args.size, args.syntax, args.repeat)
    width = max(len(what) for what, _ in rows)
    for what, value in rows:
        print(f"{what:<{width}}  {value}")


if __name__ == "__main__":
    main()
