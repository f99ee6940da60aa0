"""Volume operations shared by training and inference: HU windowing, resampling, regions.

Resampling shrinks with area averaging (no aliasing of thin cortical bone) and
grows with trilinear interpolation; label maps are resampled one channel at a
time, never by interpolating label ids.

A *region* is the part of a study that a low-resolution grid covers: an int array
``[z0, z1, y0, y1, x0, x1]`` of half-open ranges in the study's voxels, which may
reach outside the study (the grid is padded with air there). Voxel ``i`` of an
axis of ``n`` covers study coordinates ``[r0 + i (r1 - r0) / n, r0 + (i + 1) (r1 - r0) / n)``.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def window(hu: np.ndarray | torch.Tensor, center: float, width: float):
    """Map HU ``[center - width/2, center + width/2]`` linearly to [0, 1], clipped."""
    low = center - width / 2.0
    if isinstance(hu, torch.Tensor):
        return ((hu.float() - low) / width).clamp_(0.0, 1.0)
    return np.clip((hu.astype(np.float32) - low) / width, 0.0, 1.0)


def resample(volume: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Resample ``(C, D, H, W)`` (float) to ``(C, *shape)``.

    Axes that shrink are first area-averaged to their target size; the result is
    then brought to ``shape`` trilinearly (a no-op where sizes already match).
    """
    if volume.ndim != 4:
        raise ValueError(f"expected (C, D, H, W), got shape {tuple(volume.shape)}")
    x = volume.float().unsqueeze(0)
    shape = tuple(int(s) for s in shape)
    shrunk = tuple(min(cur, tgt) for cur, tgt in zip(x.shape[2:], shape))
    if shrunk != tuple(x.shape[2:]):
        x = F.adaptive_avg_pool3d(x, shrunk)
    if tuple(x.shape[2:]) != shape:
        x = F.interpolate(x, size=shape, mode="trilinear", align_corners=False)
    return x.squeeze(0)


def resample_labels(labels: np.ndarray, shape: Sequence[int], n_classes: int = 7) -> np.ndarray:
    """Per-class fractions ``(n_classes, *shape)`` float32 of a label map ``(S, H, W)``.

    Class c occupies label value c + 1. Each class is resampled as its own binary
    channel, so fractions (soft targets) replace any averaging of label ids.
    """
    out = np.zeros((n_classes, *shape), dtype=np.float32)
    for c in range(n_classes):
        channel = labels == c + 1
        if channel.any():
            out[c] = resample(torch.from_numpy(channel).unsqueeze(0), shape)[0].numpy()
    return out


def full_region(shape: Sequence[int]) -> np.ndarray:
    """The region of a whole study of ``shape`` (S, H, W)."""
    return np.array([0, shape[0], 0, shape[1], 0, shape[2]], dtype=np.int64)


def crop_region(volume: np.ndarray, region: np.ndarray, fill: float) -> np.ndarray:
    """``volume[z0:z1, y0:y1, x0:x1]`` (S, H, W) with ``fill`` where the region leaves the volume."""
    region = np.asarray(region, dtype=np.int64)
    if np.array_equal(region, full_region(volume.shape)):
        return volume
    out = np.full(tuple(region[1::2] - region[0::2]), fill, dtype=volume.dtype)
    src, dst = region_overlap(volume.shape, region)
    out[dst] = volume[src]
    return out


def region_overlap(shape: Sequence[int], region: np.ndarray) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Where ``region`` and a study of ``shape`` (S, H, W) overlap: (the study's slices, the same
    voxels' slices in region coordinates); empty slices where they do not overlap."""
    region = np.asarray(region, dtype=np.int64)
    src, dst = [], []
    for axis in range(3):
        lo, hi = max(int(region[2 * axis]), 0), min(int(region[2 * axis + 1]), int(shape[axis]))
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - int(region[2 * axis]), max(lo, hi) - int(region[2 * axis])))
    return tuple(src), tuple(dst)


def body_square(hu: np.ndarray, spacing: Sequence[float], side_mm: float, body_hu: float = -300.0) -> np.ndarray:
    """The region of a square of ``side_mm`` in-plane, all slices, centred on the body.

    hu: (S, H, W); spacing: (z, y, x) mm. The centre is that of the largest blob of
    tissue (> ``body_hu``) present in at least half of the middle slices (the neck,
    away from the head above and the shoulders below); a table or a headrest under
    the patient is a separate, smaller blob. With no tissue found, the image centre.
    """
    from scipy import ndimage

    n, height, width = hu.shape
    step = max(1, max(height, width) // 128)  # a coarse grid is enough to find the neck
    middle = hu[int(0.2 * n): max(int(0.8 * n), int(0.2 * n) + 1), ::step, ::step]
    present = (middle > body_hu).mean(axis=0) >= 0.5
    labels, count = ndimage.label(present)
    if count:
        sizes = np.bincount(labels.ravel())[1:]
        cy, cx = ndimage.center_of_mass(labels == int(np.argmax(sizes)) + 1)
        cy, cx = cy * step + (step - 1) / 2, cx * step + (step - 1) / 2
    else:
        cy, cx = (height - 1) / 2, (width - 1) / 2
    half_y, half_x = side_mm / spacing[1] / 2, side_mm / spacing[2] / 2
    y0, x0 = int(round(cy + 0.5 - half_y)), int(round(cx + 0.5 - half_x))
    return np.array([0, n, y0, y0 + max(1, int(round(2 * half_y))), x0, x0 + max(1, int(round(2 * half_x)))],
                    dtype=np.int64)


def to_original(probs: np.ndarray, shape: Sequence[int], region: np.ndarray | None = None) -> np.ndarray:
    """Bring low-resolution per-class probabilities ``(C, d, h, w)`` covering ``region`` to ``shape``.

    Trilinear; outside the region the probabilities are 0. ``region`` None: the whole study.
    """
    region = full_region(shape) if region is None else np.asarray(region, dtype=np.int64)
    tensor = torch.from_numpy(np.ascontiguousarray(probs)).float()
    size = tuple(int(v) for v in region[1::2] - region[0::2])
    grown = F.interpolate(tensor.unsqueeze(0), size=size, mode="trilinear", align_corners=False)[0].numpy()
    out = np.zeros((probs.shape[0], *shape), dtype=np.float32)
    for c in range(probs.shape[0]):  # the inverse of crop_region: place the region back in the study
        inverse = np.array([-region[0], shape[0] - region[0], -region[2], shape[1] - region[2],
                            -region[4], shape[2] - region[4]])
        out[c] = crop_region(grown[c], inverse, 0.0)
    return out
