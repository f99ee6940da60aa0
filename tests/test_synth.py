"""The synthetic RSNA dataset: layout, labels, determinism, exact DICOM/NIfTI round trips, anatomy."""
from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from common.constants import OVERALL, STUDY_COL, TARGETS, VERTEBRAE
from common.dicom import load_study
from common.nifti import load_rsna_mask
from tooling.phantom import render_phantom
from tooling.synth import SYNTAXES, draw_fractures, make_dataset, plan_dataset, segmentation_array, synth_study

# 5 studies cover all 5 syntaxes; study 1 is feet-first, studies 0, 2, 4 signed
ARGS = dict(n_train=5, n_seg=3, n_test=2, size=48, seed=3, n_slices=None)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    return out, make_dataset(out, workers=1, **ARGS)


def _study_folder(out: Path, spec) -> Path:
    return out / f"{spec.split}_images" / spec.uid


def test_layout_and_csv_columns(dataset):
    out, summary = dataset
    train = pd.read_csv(out / "train.csv")
    assert list(train.columns) == [STUDY_COL, OVERALL, *VERTEBRAE]
    assert (train[OVERALL] == train[list(VERTEBRAE)].max(axis=1)).all()
    assert set(train[STUDY_COL]) == {p.name for p in (out / "train_images").iterdir()}
    labels = pd.read_csv(out / "test_labels.csv")
    assert list(labels.columns) == list(train.columns)
    test = pd.read_csv(out / "test.csv")
    assert list(test.columns) == ["row_id", STUDY_COL, "prediction_type"]
    assert test.groupby(STUDY_COL).size().eq(8).all()
    assert set(test[STUDY_COL]) == set(labels[STUDY_COL]) == {p.name for p in (out / "test_images").iterdir()}
    assert (test["row_id"] == test[STUDY_COL] + "_" + test["prediction_type"]).all()
    assert set(test["prediction_type"]) == set(TARGETS)
    sample = pd.read_csv(out / "sample_submission.csv")
    assert list(sample.columns) == ["row_id", "fractured"]
    assert sample["row_id"].tolist() == test["row_id"].tolist() and (sample["fractured"] == 0.5).all()
    boxes = pd.read_csv(out / "train_bounding_boxes.csv")
    assert list(boxes.columns) == [STUDY_COL, "x", "y", "width", "height", "slice_number"]
    assert sorted(p.stem for p in (out / "segmentations").glob("*.nii")) == sorted(summary["segmented"])
    assert summary["segmented"] == summary["train"][:3]


def test_dicom_headers(dataset):
    out, _ = dataset
    specs = plan_dataset(**ARGS)
    assert [s.syntax for s in specs[:5]] == [str(uid) for uid in SYNTAXES]
    for spec in specs:
        files = sorted(_study_folder(out, spec).glob("*.dcm"), key=lambda p: int(p.stem))
        assert [int(p.stem) for p in files] == list(range(1, spec.n_slices + 1))
        ds = pydicom.dcmread(files[0])
        assert ds.file_meta.TransferSyntaxUID == spec.syntax
        assert ds.StudyInstanceUID == spec.uid and spec.uid.startswith("1.2.826.0.1.3680043.")
        assert ds.Modality == "CT" and ds.SOPClassUID == pydicom.uid.CTImageStorage
        assert int(ds.InstanceNumber) == 1 and ds.Rows == ds.Columns == 48
        assert int(ds.PixelRepresentation) == int(spec.signed)
        assert int(ds.BitsStored) == (16 if spec.signed else 12)
        assert float(ds.RescaleIntercept) == (0.0 if spec.signed else -1024.0)
        # decoded with pydicom alone, the first file is exactly the slice it should hold
        truth = synth_study(spec).hu[-1 if spec.feet_first else 0]
        hu = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu, truth)
        last = pydicom.dcmread(files[-1], stop_before_pixels=True)
        top_first = float(ds.ImagePositionPatient[2]) > float(last.ImagePositionPatient[2])
        assert top_first != spec.feet_first


def test_labels_follow_prevalence():
    flags = draw_fractures(np.random.default_rng(0), 2000)
    patient = flags.max(axis=1)
    assert patient.sum() == round(0.476 * 2000)
    prevalence = flags.mean(axis=0)
    assert np.all(np.abs(prevalence - [0.072, 0.141, 0.036, 0.054, 0.080, 0.137, 0.195]) < 0.035)
    assert np.argmax(prevalence) == 6 and np.argmin(prevalence) == 2  # C7 most, C3 least
    assert np.mean(flags[patient == 1].sum(axis=1) == 1) == pytest.approx(0.65, abs=0.05)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(folder).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_files(dataset, tmp_path):
    out, _ = dataset
    make_dataset(tmp_path, n_train=2, n_seg=1, n_test=1, size=32, seed=9, workers=1)  # stale studies to replace
    make_dataset(tmp_path, workers=2, **ARGS)  # a pool must not change a byte
    assert _digest(tmp_path) == _digest(out)
    other = plan_dataset(**{**ARGS, "seed": 4})
    assert [s.uid for s in other] != [s.uid for s in plan_dataset(**ARGS)]


@pytest.mark.parametrize("index", range(7))
def test_load_study_recovers_exact_hu(dataset, index):
    out, _ = dataset
    spec = plan_dataset(**ARGS)[index]
    truth = synth_study(spec)
    study = load_study(_study_folder(out, spec))
    assert study.hu.dtype == np.int16
    np.testing.assert_array_equal(study.hu, truth.hu)
    np.testing.assert_allclose(study.spacing, truth.spacing, atol=1e-4)
    np.testing.assert_allclose(study.z_positions, truth.z_positions, atol=1e-4)
    expected_numbers = np.arange(spec.n_slices, 0, -1) if spec.feet_first else np.arange(1, spec.n_slices + 1)
    np.testing.assert_array_equal(study.instance_numbers, expected_numbers)


@pytest.mark.parametrize("index", [0, 1])  # head-first, then feet-first instance numbers
def test_masks_align_with_images(dataset, index):
    out, _ = dataset
    spec = plan_dataset(**ARGS)[index]
    assert spec.feet_first == bool(index)
    truth = synth_study(spec)
    study = load_study(_study_folder(out, spec))
    mask = load_rsna_mask(out / "segmentations" / f"{spec.uid}.nii", study)
    np.testing.assert_array_equal(mask, truth.labels)
    assert study.hu[mask > 0].mean() > 150  # bone, not the soft tissue a flip would land on
    assert study.hu[(mask >= 1) & (mask <= 7)].mean() > 150


def test_nifti_layout(dataset):
    out, _ = dataset
    spec = plan_dataset(**ARGS)[0]
    truth = synth_study(spec)
    image = nib.load(out / "segmentations" / f"{spec.uid}.nii")
    data = np.asanyarray(image.dataobj)
    assert data.dtype == np.uint8 and data.shape == (48, 48, spec.n_slices)
    np.testing.assert_array_equal(data, segmentation_array(truth.labels))
    assert set(np.unique(data)) >= set(range(1, 9)) and data.max() <= 10
    # axis 2 runs up the patient: the affine's z grows with the slice index, from the lowest slice
    assert image.affine[2, 2] > 0
    assert image.affine[2, 3] == pytest.approx(truth.z_positions.min(), abs=1e-4)


def test_anatomy_order_and_bone():
    fractured = [1, 1, 0, 0, 1, 0, 1]
    ph = render_phantom(np.random.default_rng(11), 64, 70, fractured)
    assert ph.hu.shape == ph.labels.shape == (70, 64, 64) and ph.hu.dtype == np.int16
    centre = [np.nonzero(ph.labels == k)[0].mean() for k in range(1, 10)]
    assert np.all(np.diff(centre) > 0)  # C1 at the top, then C2..C7, T1, T2 going down
    tops = [np.nonzero(ph.labels == k)[0].min() for k in range(1, 8)]
    assert tops[0] == min(tops)
    assert ph.hu[0].min() <= -900 and ph.hu[ph.labels > 0].mean() > 150
    for k in range(1, 8):
        assert ph.hu[ph.labels == k].mean() > 150
    assert sorted(ph.kinds) == [1, 2, 5, 7]
    assert {b[5] for b in ph.boxes} == {1, 2, 5, 7}  # every fractured vertebra has a visible break
    for s, x, y, w, h, _ in ph.boxes:
        assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and w > 0 and h > 0


def test_fracture_lines_are_dark_inside_bone():
    base = render_phantom(np.random.default_rng(5), 96, 96, [0] * 7)
    broken = render_phantom(np.random.default_rng(5), 96, 96, [0, 0, 0, 0, 0, 1, 0])
    boxes = [b for b in broken.boxes if b[5] == 6]
    assert boxes
    darker = 0
    for s, x, y, w, h, _ in boxes:
        region = (slice(y, y + h), slice(x, x + w))
        bone = broken.labels[s][region] == 6
        darker += np.sum((broken.hu[s][region] < 120) & bone)
    assert darker >= 2 * len(boxes)  # the break shows as soft-tissue HU inside the labelled vertebra
    assert base.boxes == [] and base.kinds == {}
