"""NIfTI mask reader: alignment with the DICOM volume on real and synthetic studies."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from tooling.dicom_writer import write_ct_series
from common.dicom import load_study
from common.nifti import MaskShapeError, load_rsna_mask, vertebra_labels

SHAPE = (8, 32, 30)  # slices, rows, cols: rows != cols so a transpose cannot hide


def asymmetric_labels(shape=SHAPE) -> np.ndarray:
    """Labels 0..19 that change along every axis, with no symmetry to mask a flip."""
    s, r, c = np.indices(shape)
    return ((3 * s + 5 * r * r + c + r * c) % 20).astype(np.uint8)


def write_rsna_nifti(path, labels: np.ndarray, dtype=np.uint8) -> None:
    """Store labels ((slices head to feet, rows, cols)) the way the RSNA files are:
    (cols, rows reversed, slices by increasing z)."""
    data = labels[::-1].transpose(2, 1, 0)[:, ::-1, :]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data).astype(dtype), np.eye(4)), str(path))


@pytest.fixture(params=["head_first", "feet_first"])
def tiny_study(request, tmp_path):
    """8x32x30 series whose instance numbers run head to feet or feet to head."""
    hu = np.random.default_rng(0).integers(-1000, 1500, SHAPE).astype(np.int16)
    folder = tmp_path / request.param
    write_ct_series(folder, hu, head_first_instances=request.param == "head_first")
    return load_study(folder)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_mask_aligned_with_study(tiny_study, tmp_path, suffix):
    labels = asymmetric_labels()
    path = tmp_path / f"seg{suffix}"
    write_rsna_nifti(path, labels)
    mask = load_rsna_mask(path, tiny_study)
    assert mask.dtype == np.uint8 and mask.shape == tiny_study.hu.shape
    np.testing.assert_array_equal(mask, labels)


def test_matches_the_published_recipe_in_instance_order(tiny_study, tmp_path):
    """data[:, ::-1, ::-1].T for head-first numbering, data[:, ::-1].T for feet-first."""
    path = tmp_path / "seg.nii"
    write_rsna_nifti(path, asymmetric_labels())
    data = np.asanyarray(nib.load(str(path)).dataobj)
    head_first = tiny_study.instance_numbers[0] < tiny_study.instance_numbers[-1]
    recipe = (data[:, ::-1, ::-1] if head_first else data[:, ::-1]).transpose(2, 1, 0)
    rank = np.argsort(np.argsort(tiny_study.instance_numbers))  # hu index -> instance order
    np.testing.assert_array_equal(load_rsna_mask(path, tiny_study), recipe[rank])


def test_float_stored_labels_are_kept(tiny_study, tmp_path):
    labels = asymmetric_labels()
    write_rsna_nifti(tmp_path / "seg.nii.gz", labels, dtype=np.float32)
    np.testing.assert_array_equal(load_rsna_mask(tmp_path / "seg.nii.gz", tiny_study), labels)


def test_shape_mismatch_names_file_and_shapes(tiny_study, tmp_path):
    path = tmp_path / "short.nii.gz"
    write_rsna_nifti(path, asymmetric_labels((7,) + SHAPE[1:]))
    with pytest.raises(MaskShapeError, match=r"short\.nii\.gz.*\(30, 32, 7\).*\(8, 32, 30\)"):
        load_rsna_mask(path, tiny_study)
    with pytest.raises(FileNotFoundError, match="missing.nii"):
        load_rsna_mask(tmp_path / "missing.nii", tiny_study)


def test_vertebra_labels_keeps_c1_to_c7():
    mask = np.arange(20, dtype=np.uint8).reshape(4, 5)
    out = vertebra_labels(mask)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out.ravel(), [0, 1, 2, 3, 4, 5, 6, 7] + [0] * 12)


def test_real_segmentation_puts_vertebrae_on_bone(real_ct_dir, real_ct_study):
    """T11/T12 (TotalSegmentator labels 32/33) must sit on bone, ~+270 HU on average."""
    mask = load_rsna_mask(real_ct_dir.parent / "segmentation.nii.gz", real_ct_study)
    vertebrae = np.isin(mask, (32, 33))
    assert vertebrae.sum() > 5000
    assert 240 < real_ct_study.hu[vertebrae].mean() < 320  # measured 274
    # The bound catches every single-axis mistake: rows (-294), slices (191), columns (111).
    for flipped in (vertebrae[:, ::-1], vertebrae[::-1], vertebrae[:, :, ::-1]):
        assert real_ct_study.hu[flipped].mean() < 240
