"""NIfTI mask reader on bad input: truncated or non-NIfTI files, masks without C1..C7."""
from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from tooling.dicom_writer import write_ct_series
from common.dicom import load_study
from common.nifti import MaskReadError, has_cervical_labels, load_rsna_mask


@pytest.fixture
def study_and_mask(tmp_path):
    """A 6 x 16 x 12 study and a matching .nii.gz of labels 0..19."""
    shape = (6, 16, 12)
    write_ct_series(tmp_path / "study", np.zeros(shape, np.int16))
    labels = (np.arange(np.prod(shape)) % 20).reshape(shape).astype(np.uint8)
    path = tmp_path / "seg.nii.gz"
    nib.save(nib.Nifti1Image(labels[::-1].transpose(2, 1, 0)[:, ::-1, :].copy(), np.eye(4)),
             str(path))
    return load_study(tmp_path / "study"), path


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_nii_gz_names_the_file(study_and_mask, keep):
    study, path = study_and_mask
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(MaskReadError, match=rf"{path.name}.*(truncated|unreadable)"):
        load_rsna_mask(path, study)


def test_corrupt_gzip_and_non_nifti_name_the_file(study_and_mask, tmp_path):
    study, path = study_and_mask
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[400:800] = bytes(400)  # zeroed voxels are fine; a broken deflate stream is not
    broken = bytearray(gzip.compress(bytes(raw)))
    broken[len(broken) // 2:len(broken) // 2 + 40] = bytes(40)
    path.write_bytes(bytes(broken))
    with pytest.raises(MaskReadError, match=path.name):
        load_rsna_mask(path, study)
    text = tmp_path / "notes.nii"
    text.write_text("not a NIfTI file at all")
    with pytest.raises(MaskReadError, match="notes.nii"):
        load_rsna_mask(text, study)


def test_has_cervical_labels():
    mask = np.zeros((4, 5, 6), np.uint8)
    assert not has_cervical_labels(mask)
    mask[1, 2, 3] = 8  # T1 only
    mask[2, 2, 3] = 19
    assert not has_cervical_labels(mask)
    mask[3, 0, 0] = 7  # one C7 voxel
    assert has_cervical_labels(mask)
    assert has_cervical_labels(np.array([[1]], np.uint8))
    assert not has_cervical_labels(np.zeros((0, 3, 3), np.uint8))
