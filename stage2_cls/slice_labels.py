"""Slice-level fracture labels from ``train_bounding_boxes.csv``.

The competition ships, for 235 of its ~960 fractured training studies, a box on
every axial slice that shows a fracture (``StudyInstanceUID, x, y, width,
height, slice_number``; ``slice_number`` is the DICOM InstanceNumber). A
vertebra label says only that one of its 15 sampled slices shows a fracture;
these boxes say which ones, so a fracture a few slices thick is no longer taught
as if it filled the whole vertebra.

Stage 2 uses them as an auxiliary target (``model.box_head_weight``): a second
per-slice head learns "does this slice show a fracture" where that is known:

- every slice of a vertebra labelled intact (known negative);
- every slice of a fractured vertebra of a study with boxes: positive when a box
  lies on one of the CT slices the stack item shows (its centre +- ``context``);
- fractured vertebrae of studies without boxes: unknown, left out.

A box is matched to a vertebra by slice only (the files do not name the
vertebra); where two fractured vertebrae share a slice both get it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from common.constants import STUDY_COL

log = logging.getLogger(__name__)

BOXES_CSV = "train_bounding_boxes.csv"


def read_box_slices(data_dir: str | Path) -> dict[str, np.ndarray]:
    """``{uid: sorted unique InstanceNumbers with a fracture box}``; empty when the file is absent."""
    path = Path(data_dir) / BOXES_CSV
    if not path.is_file():
        log.info("no %s: no slice-level fracture labels", path)
        return {}
    frame = pd.read_csv(path, dtype={STUDY_COL: str})
    lacking = [c for c in (STUDY_COL, "slice_number") if c not in frame.columns]
    if lacking:
        raise ValueError(f"{path}: no column {', '.join(lacking)} (columns: {', '.join(frame.columns)})")
    numbers = pd.to_numeric(frame["slice_number"], errors="coerce")
    bad = numbers.isna() | (numbers != numbers.round())
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(f"{path}: slice_number must be a whole number, row {row + 2} has "
                         f"{frame['slice_number'].iloc[row]}")
    frame = frame.assign(slice_number=numbers.astype(np.int64))
    return {str(uid): np.unique(group["slice_number"].to_numpy()) for uid, group in frame.groupby(STUDY_COL)}


def slice_targets(instance_numbers: np.ndarray, centres: np.ndarray, context: int,
                  box_slices: np.ndarray) -> np.ndarray:
    """(S,) float32: 1 where a box lies on centre +- ``context`` (study slice indices, sorted order).

    ``instance_numbers`` (Z,) is the study's InstanceNumber per sorted slice index and
    ``centres`` (S,) the stack's centre indices (``slices`` of the crop file).
    """
    instance_numbers, centres = np.asarray(instance_numbers), np.asarray(centres)
    if (centres < 0).any() or (centres >= len(instance_numbers)).any():
        raise ValueError(f"slice_targets: centre indices {centres.min()}..{centres.max()} outside a study "
                         f"of {len(instance_numbers)} slices")
    boxed = np.isin(instance_numbers, box_slices).astype(np.int64)
    # Boxed slices within +-context of each centre, from a running sum.
    csum = np.concatenate([[0], np.cumsum(boxed)])
    lo = np.clip(centres - context, 0, len(boxed))
    hi = np.clip(centres + context + 1, 0, len(boxed))
    return (csum[hi] - csum[lo] > 0).astype(np.float32)
