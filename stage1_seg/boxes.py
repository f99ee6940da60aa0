"""Vertebra boxes from stage-1 probabilities, in original slice/pixel coordinates.

The box table has one row per study and vertebra:
``StudyInstanceUID, vertebra (C1..C7), z0, z1, y0, y1, x0, x1, voxels, status``.
``z0..z1`` are inclusive slice indices in the head-to-feet order of ``Study.hu``;
``y0:y1`` and ``x0:x1`` are half-open pixel ranges; ``status`` is ``found`` (at the
main threshold), ``weak`` (only at the fallback threshold) or ``missing`` (all
coordinates -1).

Box offsets correct a model's slice-range bias: the median signed error of each vertebra's
start and end (in cube voxels), fitted by ``stage1_seg.predict`` on the studies that have
masks and subtracted from every study's range (``box_offsets.json`` beside the fold
checkpoints; ``make_submission`` applies the same file).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from common.constants import STUDY_COL, VERTEBRAE
from common.volume import full_region, region_overlap

BOX_COLUMNS = [STUDY_COL, "vertebra", "z0", "z1", "y0", "y1", "x0", "x1", "voxels", "status"]
STATUSES = ("found", "weak", "missing")


def _box_of(mask: np.ndarray, shape: tuple[int, int, int], region: np.ndarray) -> tuple[int, ...] | None:
    """Bounds of a low-resolution boolean mask ``(d, h, w)`` covering ``region`` in a study of ``shape``.

    None when the mask lies wholly outside the study (in the padding of its region).
    """
    bounds = []
    for axis, full in enumerate(shape):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        origin, scale = region[2 * axis], (region[2 * axis + 1] - region[2 * axis]) / mask.shape[axis]
        start = int(np.floor(origin + hits[0] * scale))
        stop = int(np.ceil(origin + (hits[-1] + 1) * scale))
        start, stop = max(0, start), min(full, stop)
        if start >= stop:
            return None
        bounds.append((start, stop))
    (z0, z1), (y0, y1), (x0, x1) = bounds
    return z0, z1 - 1, y0, y1, x0, x1


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected blob of a boolean volume (stray voxels elsewhere would stretch the box)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def _slice_coordinates(depth: int, z_start: int, z_stop: int, n_slices: int) -> tuple[np.ndarray, np.ndarray]:
    """The study slices a cube of ``depth`` covering slices ``z_start:z_stop`` spans, and their
    (fractional) cube coordinates: slice centres mapped onto cube voxel centres, as ``to_original`` does."""
    scale = (z_stop - z_start) / depth
    slices = np.arange(max(0, z_start), min(n_slices, z_stop))
    return slices, (slices + 0.5 - z_start) / scale - 0.5


def _refined_z(probs: np.ndarray, c: int, level: float, component: np.ndarray,
               region: np.ndarray, n_slices: int) -> tuple[int, int] | None:
    """First and last study slice where vertebra ``c`` wins, once the probabilities are
    interpolated along z onto the study's slices (sub-voxel boundaries: a cube voxel spans
    several thin slices). Only the columns and the z-span (plus one voxel) of ``component``,
    the vertebra's connected blob at cube resolution, are looked at, so a stray blob elsewhere
    cannot stretch the range."""
    depth = probs.shape[1]
    footprint = component.any(axis=0)                      # (h, w) columns the blob occupies
    inside = component[:, footprint]                       # (d, n): the blob, not other blobs of c
    inside = ndimage.binary_dilation(inside, structure=np.ones((3, 1), bool))  # one voxel more along z
    slices, coord = _slice_coordinates(depth, int(region[0]), int(region[1]), n_slices)
    coord = np.clip(coord, 0, depth - 1)
    below = np.floor(coord).astype(np.int64)
    above = np.minimum(below + 1, depth - 1)
    near = inside.any(axis=1)                              # (d,) planes the dilated blob reaches
    keep = near[below] | near[above]
    slices, coord, below, above = slices[keep], coord[keep], below[keep], above[keep]
    if not len(slices):
        return None
    columns = probs[:, :, footprint]                       # (7, d, n)
    weight = (coord - below)[None, :, None]
    values = columns[:, below] * (1 - weight) + columns[:, above] * weight     # (7, slices, n)
    wins = (values.argmax(0) == c) & (values[c] >= level) & (inside[below] | inside[above])
    hits = slices[wins.any(axis=1)]
    return (int(hits[0]), int(hits[-1])) if len(hits) else None


def vertebra_boxes(probs: np.ndarray, shape: tuple[int, int, int], uid: str,
                   threshold: float = 0.2, fallback: float = 0.05, min_voxels: int = 8,
                   region: np.ndarray | None = None) -> pd.DataFrame:
    """Seven box rows for one study.

    probs: ``(7, d, h, w)`` probabilities in [0, 1] (float) or 0..255 (uint8) covering
    ``region`` (see ``common.volume``; default: the whole study) of a study of ``shape``
    (S, H, W) at its original resolution.

    Each voxel belongs to the vertebra with the highest probability there (where that
    reaches ``threshold``; else ``fallback`` for a ``weak`` row), so a class that bleeds
    into its neighbour does not stretch its range over it; the largest connected blob of
    each vertebra gives its box, and the slice range is refined on the study's own slices.
    Measured on the recipe check's held-out studies (z-IoU >= 0.7), against per-class
    thresholding: slices-60 61% -> 73%, varied-96 57% -> 66%, few-masks 61% -> 72%.
    """
    if probs.ndim != 4 or probs.shape[0] != len(VERTEBRAE):
        raise ValueError(f"{uid}: expected probabilities of shape (7, d, h, w), got {probs.shape}")
    probs = probs.astype(np.float32) / 255.0 if probs.dtype == np.uint8 else probs.astype(np.float32, copy=False)
    region = full_region(shape) if region is None else np.asarray(region, dtype=np.int64)
    winner, top = probs.argmax(axis=0), probs.max(axis=0)
    rows = []
    for c, name in enumerate(VERTEBRAE):
        row = {STUDY_COL: uid, "vertebra": name}
        for status, level in (("found", threshold), ("weak", fallback)):
            mask = largest_component((winner == c) & (top >= level))
            voxels = int(mask.sum())
            box = _box_of(mask, shape, region) if voxels >= min_voxels else None
            if box is not None:
                z0, z1, y0, y1, x0, x1 = box
                z0, z1 = _refined_z(probs, c, level, mask, region, shape[0]) or (z0, z1)
                row.update(z0=z0, z1=z1, y0=y0, y1=y1, x0=x0, x1=x1, voxels=voxels, status=status)
                break
        else:
            row.update(z0=-1, z1=-1, y0=-1, y1=-1, x0=-1, x1=-1, voxels=0, status="missing")
        rows.append(row)
    return pd.DataFrame(rows, columns=BOX_COLUMNS)


def read_boxes(path: str | Path) -> pd.DataFrame:
    """Read a box table and check its columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"box table not found: {path} (run `python -m stage1_seg.predict` first)")
    frame = pd.read_csv(path, dtype={STUDY_COL: str})
    missing = [c for c in BOX_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: not a vertebra box table (missing columns {missing})")
    return frame


def study_dice(probs: np.ndarray, region: np.ndarray, labels: np.ndarray, level: float = 0.5) -> np.ndarray:
    """Dice of each vertebra's mask at the study's own resolution, ``(7,)``.

    probs: ``(7, d, h, w)`` cube probabilities (uint8 0..255 or float 0..1) covering ``region``;
    labels: ``(S, H, W)`` with C1..C7 as 1..7. Each map is interpolated trilinearly onto the
    study's voxels (cube voxel centres on the centres of the voxels they cover, as the crops'
    mask channel reads it) and cut at ``level``; truth outside the region counts as missed.
    A vertebra absent from both counts 1, as in stage-1 validation. The Dice of validation is
    taken on the cube's coarse grid, where a vertebra is a few voxels thick head to feet.
    """
    import torch
    import torch.nn.functional as F

    region = np.asarray(region, dtype=np.int64)
    size = tuple(int(v) for v in region[1::2] - region[0::2])
    inside, part = region_overlap(labels.shape, region)
    scale = 255.0 if probs.dtype == np.uint8 else 1.0
    out = np.ones(len(VERTEBRAE))
    window = labels[inside]
    truth_totals = np.bincount(labels.ravel(), minlength=len(VERTEBRAE) + 1)  # voxels of each label value
    for c in range(len(VERTEBRAE)):  # one map at a time: a study-sized float volume each
        channel = torch.from_numpy(np.ascontiguousarray(probs[c], dtype=np.float32))[None, None]
        pred = F.interpolate(channel, size=size, mode="trilinear", align_corners=False)[0, 0].numpy()
        pred = pred[part] >= level * scale
        denominator = int(pred.sum()) + int(truth_totals[c + 1])
        if denominator:
            out[c] = 2.0 * int((pred & (window == c + 1)).sum()) / denominator
    return out


def z_iou(a: tuple[int, int], b: tuple[int, int]) -> float:
    """IoU of two inclusive slice ranges."""
    inter = max(0, min(a[1], b[1]) - max(a[0], b[0]) + 1)
    union = (a[1] - a[0] + 1) + (b[1] - b[0] + 1) - inter
    return inter / union if union > 0 else 0.0


def boxes_from_labels(labels: np.ndarray, uid: str) -> pd.DataFrame:
    """Ground-truth boxes from a label volume ``(S, H, W)`` with 1..7 = C1..C7 (the whole extent of each)."""
    rows = []
    for c, name in enumerate(VERTEBRAE):
        row = {STUDY_COL: uid, "vertebra": name}
        mask = labels == c + 1
        if mask.any():
            (z0, z1), (y0, y1), (x0, x1) = (
                (int(hits[0]), int(hits[-1])) for hits in
                (np.flatnonzero(mask.any(axis=other)) for other in ((1, 2), (0, 2), (0, 1))))
            row.update(z0=z0, z1=z1, y0=y0, y1=y1 + 1, x0=x0, x1=x1 + 1, voxels=int(mask.sum()), status="found")
        else:
            row.update(z0=-1, z1=-1, y0=-1, y1=-1, x0=-1, x1=-1, voxels=0, status="missing")
        rows.append(row)
    return pd.DataFrame(rows, columns=BOX_COLUMNS)


# --- Box offsets: the slice-range bias of a stage-1 model, fitted on the studies with masks ---

OFFSETS_FILE = "box_offsets.json"


def cube_slices(region: np.ndarray, depth: int) -> float:
    """Study slices per cube voxel along z for probabilities of ``depth`` covering ``region``."""
    return float(region[1] - region[0]) / depth


def z_errors(pred: np.ndarray, truth: np.ndarray, slices_per_voxel: float) -> np.ndarray:
    """Signed errors ``(7, 2)`` of predicted minus true ``(z0, z1)`` in cube voxels; NaN where
    either is missing (-1). ``pred`` and ``truth`` are ``(7, 2)`` inclusive slice ranges."""
    pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    err = (pred - truth) / slices_per_voxel
    err[(pred < 0).any(axis=1) | (truth < 0).any(axis=1)] = np.nan
    return err


def fit_box_offsets(errors: np.ndarray, min_count: int = 5) -> np.ndarray:
    """Per-vertebra offsets ``(7, 2)`` (start, end; cube voxels) from signed errors ``(N, 7, 2)``:
    the median error of each, 0 where fewer than ``min_count`` studies have that vertebra."""
    errors = np.asarray(errors, np.float64).reshape(-1, len(VERTEBRAE), 2)
    counts = np.isfinite(errors).sum(axis=0)
    with warnings.catch_warnings():   # a vertebra no study has: NaN here, 0 below
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(errors, axis=0) if len(errors) else np.zeros((len(VERTEBRAE), 2))
    return np.where(counts >= min_count, np.nan_to_num(median), 0.0)


def apply_box_offsets(boxes: pd.DataFrame, offsets: np.ndarray, slices_per_voxel: float,
                      n_slices: int) -> pd.DataFrame:
    """One study's seven box rows with each found or weak slice range moved by minus its
    vertebra's offset (cube voxels, scaled to this study's slices), kept inside the study."""
    out = boxes.copy()
    present = out["status"].to_numpy() != "missing"
    shift = np.round(np.asarray(offsets, np.float64) * slices_per_voxel).astype(np.int64)   # (7, 2)
    z0 = np.clip(out["z0"].to_numpy() - shift[:, 0], 0, n_slices - 1)
    z1 = np.clip(out["z1"].to_numpy() - shift[:, 1], 0, n_slices - 1)
    out.loc[present, "z0"] = np.minimum(z0, z1)[present]
    out.loc[present, "z1"] = np.maximum(z0, z1)[present]
    return out


def write_box_offsets(path: str | Path, offsets: np.ndarray, studies: int) -> None:
    offsets = np.asarray(offsets, np.float64)
    Path(path).write_text(json.dumps({
        "unit": "cube voxels; subtracted from each predicted slice range (start, end)",
        "studies": int(studies), "vertebrae": list(VERTEBRAE),
        "z0": [round(float(v), 3) for v in offsets[:, 0]], "z1": [round(float(v), 3) for v in offsets[:, 1]]},
        indent=2))


def read_box_offsets(path: str | Path) -> np.ndarray:
    """Offsets ``(7, 2)`` from a file written by :func:`write_box_offsets`; an error naming it otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        offsets = np.stack([np.asarray(data["z0"], np.float64), np.asarray(data["z1"], np.float64)], axis=1)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a box-offsets file ({exc})") from exc
    if offsets.shape != (len(VERTEBRAE), 2) or not np.isfinite(offsets).all():
        raise ValueError(f"{path}: expected 7 finite start and end offsets, got shape {offsets.shape}")
    return offsets
