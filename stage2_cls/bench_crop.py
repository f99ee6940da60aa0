"""Crop throughput on a synthetic study: decode once vs. re-read files per slice.

``python -m stage2_cls.bench_crop [--slices 300] [--size 512] [--syntax native|rle|j2k]
[--repeat 3]``

Writes one synthetic CT series as DICOM files into a temporary folder and prints, per
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
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

from common.dicom import load_study
from common.io import save_npz_atomic
from stage1_seg.boxes import vertebra_boxes
from stage2_cls.config import CropConfig
from stage2_cls.crop import COMPRESS_LEVEL, save_crop
from stage2_cls.stacks import boxes_array, build_stacks, mask_crops, square_window, centre_slices

SYNTAXES = {"native": ExplicitVRLittleEndian, "rle": RLELossless, "j2k": JPEG2000Lossless}


def write_ct_series(folder: str | Path, hu: np.ndarray, spacing: tuple[float, float, float] = (1.0, 0.5, 0.5),
                    syntax: str = "native", study_uid: str | None = None) -> list[Path]:
    """Write ``hu`` (S, H, W) int16, head to feet, as one DICOM file per slice.

    Files are named ``<InstanceNumber>.dcm`` (1 = head) and stored as 12-bit unsigned
    values with RescaleIntercept -1024, like most RSNA studies. Returns the paths.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    stored = (np.clip(hu, -1024, 3071).astype(np.int32) + 1024).astype(np.uint16)
    paths = []
    for i, image in enumerate(stored):
        ds = _ct_header(study_uid, series_uid, i, image.shape, spacing)
        ds.PixelData = image.tobytes()
        if syntax != "native":
            ds.compress(SYNTAXES[syntax], image)
        path = folder / f"{i + 1}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _ct_header(study_uid: str, series_uid: str, index: int, shape: tuple[int, int],
               spacing: tuple[float, float, float]) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality, ds.ImageType = "CT", ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [0.0, 0.0, -float(index) * spacing[0]]  # head first: z decreases
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [spacing[1], spacing[2]]
    ds.SliceThickness = spacing[0]
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    return ds


def synthetic_study(slices: int, size: int, seed: int = 0, low: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A noisy neck-like volume with seven stacked vertebral bodies.

    Returns hu (slices, size, size) int16 and probs (7, low, low, low) uint8, the
    vertebra masks as a stage-1 model would give them at its own resolution.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    neck = ((yy - 0.5) / 0.38) ** 2 + ((xx - 0.5) / 0.42) ** 2 <= 1
    hu = np.empty((slices, size, size), dtype=np.int16)
    bands = np.linspace(0.1 * slices, 0.9 * slices, 8)
    for z in range(slices):
        image = np.where(neck, 40.0, -1000.0) + rng.normal(0, 20, (size, size))
        c = np.searchsorted(bands, z) - 1
        if 0 <= c < 7:
            r = ((yy - 0.58) / 0.07) ** 2 + ((xx - 0.5) / 0.08) ** 2
            image[r <= 1] = 300 + 500 * (r[r <= 1] > 0.7) + rng.normal(0, 30, int((r <= 1).sum()))
        hu[z] = np.clip(image, -1024, 3071)
    zl = (np.arange(low) + 0.5) * slices / low - 0.5
    yl, xl = np.meshgrid((np.arange(low) + 0.5) / low, (np.arange(low) + 0.5) / low, indexing="ij")
    disc = ((yl - 0.58) / 0.07) ** 2 + ((xl - 0.5) / 0.08) ** 2 <= 1
    probs = np.zeros((7, low, low, low), dtype=np.uint8)
    for c in range(7):
        inside = (zl >= bands[c]) & (zl < bands[c + 1])
        probs[c][inside] = disc * 255
    return hu, probs


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
        stacks[c, :, -1] = mask_crops(probs[c], shape, centres, top, left, side, cfg.size)
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
        files = write_ct_series(study_dir, hu, syntax=syntax)
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
