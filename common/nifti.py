"""Read an RSNA segmentation (NIfTI) as labels aligned voxel for voxel with a Study.

The RSNA masks are stored as (columns, rows, slices) with the image rows reversed and
the slices ordered by increasing patient z (feet first). The slice order is derived
from the study's own geometry (``Study.z_positions``), so studies whose instance
numbers run feet to head need no special list.
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from common.dicom import Study

__all__ = ["MaskReadError", "MaskShapeError", "has_cervical_labels", "load_rsna_mask",
           "vertebra_labels"]

N_CERVICAL = 7  # labels 1..7 are C1..C7; 8.. are thoracic


class MaskShapeError(ValueError):
    """A segmentation whose shape does not match its study."""


class MaskReadError(ValueError):
    """A segmentation file that cannot be read (truncated, corrupt, not NIfTI)."""


def _read_voxels(path: Path) -> np.ndarray:
    """The stored voxels of ``path`` in their on-disk dtype; MaskReadError naming it."""
    try:
        # dataobj keeps the on-disk dtype (get_fdata would make a float64 copy, 8x larger).
        return np.asanyarray(nib.load(str(path)).dataobj)
    except (EOFError, zlib.error) as exc:
        raise MaskReadError(f"{path}: truncated or corrupt compressed data "
                            f"({type(exc).__name__}: {exc})") from exc
    except (ImageFileError, OSError, ValueError) as exc:
        raise MaskReadError(f"{path}: unreadable segmentation ({type(exc).__name__}: {exc})") \
            from exc


def _as_labels(data: np.ndarray, path: Path) -> np.ndarray:
    """Integer label volume as uint8, refusing values that are not labels 0..255."""
    if data.dtype == np.uint8:
        return data
    if data.size and (data.min() < 0 or data.max() > 255):
        raise ValueError(f"{path}: label values {data.min()}..{data.max()} outside 0..255")
    if data.dtype.kind == "f":
        rounded = np.rint(data)
        if not np.array_equal(rounded, data):
            raise ValueError(f"{path}: non-integer label values in a segmentation")
        data = rounded
    return data.astype(np.uint8)


def load_rsna_mask(path: str | os.PathLike, study: Study) -> np.ndarray:
    """Labels of ``path`` (.nii or .nii.gz) as uint8 (slices, rows, cols) like ``study.hu``.

    Label values are kept as stored (1-7 = C1-C7, 8+ = thoracic, 0 = background).
    Raises FileNotFoundError if the file is missing, MaskReadError naming the file if
    it is truncated, corrupt or not NIfTI, and MaskShapeError (both ValueErrors)
    naming the file and both shapes if it does not match the study.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"segmentation not found: {path}")
    data = _read_voxels(path)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    n_slices, rows, cols = study.hu.shape
    if data.shape != (cols, rows, n_slices):
        raise MaskShapeError(
            f"{path}: mask shape {tuple(data.shape)} (cols, rows, slices) does not match study "
            f"{study.uid} volume {study.hu.shape} (slices, rows, cols); expected "
            f"{(cols, rows, n_slices)}")
    # (cols, rows reversed, z ascending) -> (z ascending, rows, cols)
    by_z = _as_labels(data, path).transpose(2, 1, 0)[:, ::-1, :]
    # NIfTI slice k is the k-th lowest slice; put it where that slice sits in study.hu.
    lowest_first = np.argsort(study.z_positions, kind="stable")
    mask = np.empty((n_slices, rows, cols), dtype=np.uint8)
    mask[lowest_first] = by_z
    return mask


def vertebra_labels(mask: np.ndarray) -> np.ndarray:
    """Keep the cervical labels 1..7 (C1..C7); every other value becomes 0. Same shape."""
    return np.where((mask >= 1) & (mask <= N_CERVICAL), mask, 0).astype(np.uint8)


def has_cervical_labels(mask: np.ndarray) -> bool:
    """Whether any voxel of ``mask`` (any shape) is labelled C1..C7 (values 1..7).

    Some segmentations hold thoracic labels only; such a study teaches the cervical
    segmenter nothing and should be skipped with a warning.
    """
    return bool(np.any((mask >= 1) & (mask <= N_CERVICAL)))
