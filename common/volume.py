"""Volume operations shared by training and inference: HU windowing and resampling.

Resampling shrinks with area averaging (no aliasing of thin cortical bone) and
grows with trilinear interpolation; label maps are resampled one channel at a
time, never by interpolating label ids.
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


def to_original(probs: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Bring low-resolution per-class probabilities ``(C, d, h, w)`` back to ``shape`` (trilinear)."""
    tensor = torch.from_numpy(np.ascontiguousarray(probs)).float()
    out = F.interpolate(tensor.unsqueeze(0), size=tuple(shape), mode="trilinear", align_corners=False)
    return out.squeeze(0).numpy()
