"""Per-vertebra slice stacks for the stage-2 classifier, built in memory.

For each vertebra C1..C7 the stack holds ``n_slices`` centre slices evenly spaced
over the vertebra's slice range; each stack item has 6 channels: the CT slices
``z-context .. z+context`` (clamped at the study ends) and the vertebra's predicted
mask at ``z``, all cropped to a square around the vertebra's in-plane box and
resized to ``size x size`` uint8.

The same function serves ``stage2_cls.crop`` (which caches stacks on disk) and the
submission (which uses them straight away), so training and inference see
identical inputs. Pure numpy + OpenCV: no torch, no disk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import cv2
import numpy as np
import pandas as pd

from common.constants import VERTEBRAE
from common.volume import full_region
from stage2_cls.config import CropConfig

AIR_HU = -1024  # what the crop is padded with where it leaves the image

BoxesLike = Union[pd.DataFrame, np.ndarray]


@dataclass
class StackResult:
    """Stacks of one study.

    stacks: (7, n_slices, 2*context+2, size, size) uint8; channels are the CT slices
        z-context..z+context, then the vertebra's mask at z (0..255).
    missing: (7,) bool, True where the vertebra had no box (its stack is all zero).
    slices: (7, n_slices) int64 centre slice indices into the study (-1 if missing).
    """

    stacks: np.ndarray
    missing: np.ndarray
    slices: np.ndarray


def boxes_array(boxes: BoxesLike) -> np.ndarray:
    """(7, 6) int64 ``[z0, z1, y0, y1, x0, x1]`` per vertebra; -1 rows for missing ones.

    boxes: a box table (``stage1_seg.boxes`` columns) holding one study's rows, or an
    array of shape (7, 6). A vertebra absent from the table, or with status
    ``missing``, gets a row of -1.
    """
    if isinstance(boxes, pd.DataFrame):
        if "StudyInstanceUID" in boxes.columns and boxes["StudyInstanceUID"].nunique() > 1:
            raise ValueError("build_stacks: the box table holds rows of several studies; "
                             "pass the rows of one study")
        out = np.full((len(VERTEBRAE), 6), -1, dtype=np.int64)
        rows = boxes.set_index("vertebra")
        for c, name in enumerate(VERTEBRAE):
            if name not in rows.index:
                continue
            row = rows.loc[name]
            if isinstance(row, pd.DataFrame):
                raise ValueError(f"build_stacks: vertebra {name} appears twice in the box table")
            if str(row.get("status", "found")) == "missing":
                continue
            out[c] = [int(row[k]) for k in ("z0", "z1", "y0", "y1", "x0", "x1")]
        return out
    arr = np.asarray(boxes)
    if arr.shape != (len(VERTEBRAE), 6):
        raise ValueError(f"build_stacks: boxes must be a box table or a (7, 6) array, got shape {arr.shape}")
    return arr.astype(np.int64)


def centre_slices(z0: int, z1: int, n: int) -> np.ndarray:
    """``n`` slice indices evenly spaced over the inclusive range z0..z1 (repeats if short)."""
    return np.round(np.linspace(z0, z1, n)).astype(np.int64)


def square_window(box: np.ndarray, margin: float, image_hw: tuple[int, int]) -> tuple[int, int, int]:
    """Square crop ``(top, left, side)`` around an in-plane box ``[y0, y1, x0, x1]``.

    The side is the larger box side grown by ``margin`` of it on each side. The square is
    centred on the box and then shifted back inside the image where the image is large
    enough; along an axis shorter than the side it stays centred and the caller pads.
    """
    height, width = image_hw
    y0, y1, x0, x1 = (int(v) for v in box)
    y0, y1 = sorted((min(max(y0, 0), height), min(max(y1, 0), height)))
    x0, x1 = sorted((min(max(x0, 0), width), min(max(x1, 0), width)))
    side = int(np.ceil(max(y1 - y0, x1 - x0) * (1.0 + 2.0 * margin)))
    side = min(max(side, 2), max(height, width))  # a zero-size box still gives a small crop
    corners = []
    for lo, hi, full in ((y0, y1, height), (x0, x1, width)):
        start = int(round((lo + hi) / 2.0 - side / 2.0))
        if side <= full:
            start = min(max(start, 0), full - side)
        corners.append(start)
    return corners[0], corners[1], side


def _crop_padded(hu: np.ndarray, zs: np.ndarray, top: int, left: int, side: int) -> np.ndarray:
    """``hu[zs, top:top+side, left:left+side]`` (len(zs), side, side), air outside the image."""
    _, height, width = hu.shape
    ya, yb = max(top, 0), min(top + side, height)
    xa, xb = max(left, 0), min(left + side, width)
    if ya == top and xa == left and yb == top + side and xb == left + side:
        return hu[zs, ya:yb, xa:xb]
    out = np.full((len(zs), side, side), AIR_HU, dtype=hu.dtype)
    if ya < yb and xa < xb:
        out[:, ya - top:yb - top, xa - left:xb - left] = hu[zs, ya:yb, xa:xb]
    return out


def _window_uint8(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """HU -> 0..255 uint8 over the window [center - width/2, center + width/2]."""
    low = center - width / 2.0
    scaled = (hu.astype(np.float32) - low) * (255.0 / max(width, 1e-6))
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def _resize_slices(images: np.ndarray, size: int) -> np.ndarray:
    """(k, s, s) -> (k, size, size); area when shrinking, linear when enlarging."""
    side = images.shape[-1]
    if side == size:
        return np.ascontiguousarray(images)
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    out = np.empty((len(images), size, size), dtype=images.dtype)
    for i, image in enumerate(images):
        out[i] = cv2.resize(image, (size, size), interpolation=interp)
    return out


def _minmax_uint8(ct: np.ndarray) -> np.ndarray:
    """(n, C, s, s) float -> uint8, each stack item scaled over its own min..max."""
    low = ct.min(axis=(1, 2, 3), keepdims=True)
    high = ct.max(axis=(1, 2, 3), keepdims=True)
    scaled = (ct - low) * (255.0 / np.maximum(high - low, 1e-6))
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def mask_crops(prob: np.ndarray, region: np.ndarray, zs: np.ndarray,
               top: int, left: int, side: int, size: int) -> np.ndarray:
    """One vertebra's probabilities at slices ``zs``, over the crop window, as uint8.

    prob: (d, h, w) low-resolution probabilities (uint8 0..255 or float 0..1) covering
    ``region`` ``[z0, z1, y0, y1, x0, x1]`` of the study (see ``common.volume``): voxel i of
    an axis of n covers original coordinates [r0 + i (r1 - r0) / n, r0 + (i + 1) (r1 - r0) / n).
    Only the one or two low-resolution slices around each z are touched, then sampled
    straight onto the (size, size) output grid. Returns (len(zs), size, size) uint8.
    """
    depth, low_h, low_w = prob.shape
    z0, z1, y0, y1, x0, x1 = (int(v) for v in region)
    scale = 1.0 if prob.dtype == np.uint8 else 255.0
    # Centre of each output pixel in original coordinates, then in low-resolution ones.
    centres = (np.arange(size, dtype=np.float64) + 0.5) * (side / size) - 0.5
    map_y = (top + centres + 0.5 - y0) * (low_h / (y1 - y0)) - 0.5
    map_x = (left + centres + 0.5 - x0) * (low_w / (x1 - x0)) - 0.5
    grid_x, grid_y = np.meshgrid(map_x.astype(np.float32), map_y.astype(np.float32))
    out = np.empty((len(zs), size, size), dtype=np.uint8)
    for i, z in enumerate(zs):
        zf = min(max((z + 0.5 - z0) * (depth / (z1 - z0)) - 0.5, 0.0), depth - 1.0)
        k = int(np.floor(zf))
        t = zf - k
        plane = prob[k].astype(np.float32)
        if t > 1e-6 and k + 1 < depth:
            plane = plane * (1.0 - t) + prob[k + 1].astype(np.float32) * t
        sampled = cv2.remap(plane * scale, grid_x, grid_y, interpolation=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
        out[i] = np.clip(sampled + 0.5, 0, 255).astype(np.uint8)
    return out


def vertebra_stack(hu: np.ndarray, prob: np.ndarray, box: np.ndarray, cfg: CropConfig,
                   region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stack of one present vertebra: ((n, 2*context+2, size, size) uint8, (n,) centres).

    hu: (S, H, W) int16; prob: (d, h, w) this vertebra's probabilities covering ``region``;
    box: (6,) ``[z0, z1, y0, y1, x0, x1]`` with z inclusive and y/x half-open.
    """
    n_slices, context, size = cfg.n_slices, cfg.context, cfg.size
    last = hu.shape[0] - 1
    z0, z1 = sorted((min(max(int(box[0]), 0), last), min(max(int(box[1]), 0), last)))
    centres = centre_slices(z0, z1, n_slices)
    offsets = np.arange(-context, context + 1)
    needed = np.clip(centres[:, None] + offsets[None, :], 0, last)  # (n, 2*context+1)
    # Neighbouring centres share most CT slices: crop and resize each one once.
    unique, where = np.unique(needed, return_inverse=True)
    top, left, side = square_window(box[2:], cfg.margin, hu.shape[1:])
    crops = _crop_padded(hu, unique, top, left, side)
    if cfg.minmax:
        ct = _resize_slices(crops.astype(np.float32), size)[where.reshape(needed.shape)]
        ct = _minmax_uint8(ct)
    else:
        ct = _resize_slices(_window_uint8(crops, cfg.window_center, cfg.window_width), size)
        ct = ct[where.reshape(needed.shape)]
    stack = np.empty((n_slices, len(offsets) + 1, size, size), dtype=np.uint8)
    stack[:, :-1] = ct
    stack[:, -1] = mask_crops(prob, region, centres, top, left, side, size)
    return stack, centres


def build_stacks(hu: np.ndarray, probs: np.ndarray, boxes: BoxesLike, cfg: CropConfig,
                 region: np.ndarray | None = None) -> StackResult:
    """The seven vertebra stacks of one study.

    hu: (S, H, W) int16 HU volume, head to feet. probs: (7, d, h, w) stage-1
    probabilities (uint8 0..255 or float 0..1) at any resolution, covering ``region``
    of the study (see ``common.volume``; default: all of it). boxes: the study's box
    table rows or a (7, 6) array (see ``boxes_array``). Returns stacks
    (7, n_slices, 2*context+2, size, size) uint8.
    """
    if hu.ndim != 3:
        raise ValueError(f"build_stacks: hu must be (S, H, W), got shape {hu.shape}")
    if probs.ndim != 4 or probs.shape[0] != len(VERTEBRAE):
        raise ValueError(f"build_stacks: probs must be (7, d, h, w), got shape {probs.shape}")
    if cfg.n_slices < 1 or cfg.size < 1 or cfg.context < 0:
        raise ValueError(f"build_stacks: bad crop settings n_slices={cfg.n_slices}, "
                         f"size={cfg.size}, context={cfg.context}")
    box_rows = boxes_array(boxes)
    region = full_region(hu.shape) if region is None else np.asarray(region, dtype=np.int64)
    n_ch = 2 * cfg.context + 2
    stacks = np.zeros((len(VERTEBRAE), cfg.n_slices, n_ch, cfg.size, cfg.size), dtype=np.uint8)
    missing = np.ones(len(VERTEBRAE), dtype=bool)
    slices = np.full((len(VERTEBRAE), cfg.n_slices), -1, dtype=np.int64)
    for c, box in enumerate(box_rows):
        if (box < 0).any() or hu.shape[0] == 0:
            continue
        stacks[c], slices[c] = vertebra_stack(hu, probs[c], box, cfg, region)
        missing[c] = False
    return StackResult(stacks=stacks, missing=missing, slices=slices)
