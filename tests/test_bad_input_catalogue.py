"""A catalogue of bad input and interruptions: what the project promises for each, checked.

Every case is one small function below: it builds its input in a temporary folder,
checks the promise and returns a one-line outcome. ``CATALOGUE`` collects (component,
input, outcome) of every case that ran; ``tests/conftest.py`` prints it as a table at
the end of the session.

The promises:

* Bad input gets a clear error that names the file (or folder) and the problem, or is
  dropped / skipped with a logged reason naming it while the rest goes on. Nothing is
  silent, nothing is wrong.
* make_submission writes a complete, valid submission (every row of test.csv, in order,
  values in [1e-4, 1 - 1e-4]) whenever test.csv itself is readable and the models load,
  falling back to the prior for each study that cannot be predicted.
* An interrupted write leaves the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import torch

import make_submission
from common import decoders
from common.checkpoint import CheckpointError, load_checkpoint, rebuild_model, save_checkpoint
from common.config import load_config, to_dict
from common.constants import TARGETS
from common.dicom import DicomReadError, load_study
from common.io import (atomic_path, remove_stale_temporaries, save_npz_atomic, write_csv_atomic,
                       write_text_atomic)
from common.nifti import MaskShapeError, load_rsna_mask
from common.trainer import TrainConfig, fit
from stage1_seg.boxes import boxes_from_labels
from stage1_seg.config import PreprocessConfig
from stage1_seg.data import prepare_cache, with_cervical_labels
from stage2_cls import crop
from stage2_cls.config import Stage2Config
from stage2_cls.model import build_model as build_stage2
from tests.tiny_models import STAGE2_OVERRIDES, write_tiny_dataset, write_tiny_models
from tests.toy_task import ToyTask
from tooling.dicom_writer import write_ct_series

REPO = Path(__file__).resolve().parents[1]
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"
RESCALE_SLOPE = (0x0028, 0x1053)
LOW, HIGH = 1e-4, 1 - 1e-4  # the clip every submitted value must respect

# (component, input, outcome) of every case that ran, in the order they ran.
CATALOGUE: list[tuple[str, str, str]] = []


# --- The catalogue's machinery ---------------------------------------------------------

@dataclass
class Ctx:
    """What a case gets: its own folder, the log, monkeypatch, and the shared tiny models."""

    tmp: Path
    caplog: pytest.LogCaptureFixture
    monkeypatch: pytest.MonkeyPatch
    request: pytest.FixtureRequest

    def submission(self) -> "SubmissionSetup":
        # Asked for lazily: only the make_submission cases pay for building the models.
        return self.request.getfixturevalue("submission_setup")

    def logged(self, level: int = logging.WARNING) -> str:
        return "\n".join(r.getMessage() for r in self.caplog.records if r.levelno >= level)


@dataclass(frozen=True)
class Case:
    component: str
    given: str
    check: Callable[[Ctx], str]


CASES: list[Case] = []


def case(component: str, given: str):
    """Register the decorated function as the catalogue case for ``given``."""
    def register(check: Callable[[Ctx], str]) -> Callable[[Ctx], str]:
        CASES.append(Case(component, given, check))
        return check
    return register


def raises(exc_type: type[BaseException], call: Callable[[], object], *named: object) -> BaseException:
    """Run ``call``; it must raise ``exc_type`` whose message contains every item of ``named``."""
    with pytest.raises(exc_type) as info:
        call()
    message = str(info.value)
    for item in named:
        assert str(item) in message, f"the error does not name {item}: {message}"
    return info.value


# --- Inputs: DICOM series, masks, submissions, crops ----------------------------------

def volume(n_slices: int = 4, size: int = 16, seed: int = 0) -> np.ndarray:
    """Random HU (slices, size, size) whose slices all differ, so a lost or swapped slice shows."""
    hu = np.random.default_rng(seed).integers(-1000, 1500, (n_slices, size, size))
    hu[:, 0, 0] = np.arange(n_slices) * 10
    return hu.astype(np.int16)


def smooth_volume(n_slices: int = 4, size: int = 64) -> np.ndarray:
    """Smooth CT-like HU within 12-bit storage: long enough JPEG streams to damage in the middle."""
    z, y, x = np.indices((n_slices, size, size))
    hu = 300 * np.sin(x / 5.0 + z) + 400 * np.cos(y / 7.0) + 10 * ((x * y + z) % 7)
    return hu.astype(np.int16)


def set_ds_text(path: Path, tag: tuple[int, int], text: bytes) -> None:
    """Rewrite a DS element of an explicit-VR little-endian file with raw ``text``.

    pydicom refuses to write a value such as 'abc', which real files nonetheless carry.
    """
    data = path.read_bytes()
    start = data.index(struct.pack("<HH", *tag) + b"DS")
    old_length = struct.unpack("<H", data[start + 6:start + 8])[0]
    text += b" " * (len(text) % 2)  # DICOM values have even lengths
    path.write_bytes(data[:start + 6] + struct.pack("<H", len(text)) + text
                     + data[start + 8 + old_length:])


def jpeg_scan(data: bytes) -> tuple[int, int]:
    """(first, end) byte offsets of the entropy-coded data of the one JPEG stream in ``data``."""
    sos = data.index(b"\xff\xda")
    first = sos + 2 + struct.unpack(">H", data[sos + 2:sos + 4])[0]
    return first, data.rindex(b"\xff\xd9")


def write_rsna_mask(path: Path, labels: np.ndarray) -> None:
    """Labels (slices head to feet, rows, cols) stored as the RSNA files are: (cols, rows reversed, z up)."""
    data = labels[::-1].transpose(2, 1, 0)[:, ::-1, :]
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), np.eye(4)), str(path))


def dead_pid() -> int:
    """The id of a process that has just exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@dataclass(frozen=True)
class SubmissionSetup:
    data: Path               # tiny synthetic RSNA folder (test_images, test.csv, train.csv)
    models: Path             # one random-weight fold per stage
    cfg: make_submission.SubmissionConfig
    uids: list[str]          # test studies, in test.csv order
    reference: pd.Series     # fractured by row_id on the clean data: what a good study gets


@pytest.fixture(scope="module")
def submission_setup(tmp_path_factory) -> SubmissionSetup:
    root = tmp_path_factory.mktemp("catalogue_submission")
    write_tiny_dataset(root / "data", n_test=3)
    cfg = make_submission.SubmissionConfig(**write_tiny_models(root / "models", n_folds=1))
    test = pd.read_csv(root / "data" / "test.csv", dtype=str)
    make_submission.run(cfg, root / "data", root / "models", root / "reference.csv")
    reference = pd.read_csv(root / "reference.csv", dtype={"row_id": str}).set_index("row_id")["fractured"]
    return SubmissionSetup(root / "data", root / "models", cfg,
                           list(dict.fromkeys(test["StudyInstanceUID"])), reference)


def submission_data(ctx: Ctx, copied: tuple[str, ...] = ()) -> tuple[SubmissionSetup, Path, pd.DataFrame]:
    """A data folder for one case: the test studies (linked, or ``copied`` to be damaged),
    train.csv for the prior and the clean test.csv; returns the setup, the folder and test.csv to edit."""
    setup, data = ctx.submission(), ctx.tmp / "data"
    (data / "test_images").mkdir(parents=True)
    for uid in setup.uids:
        source, target = setup.data / "test_images" / uid, data / "test_images" / uid
        if uid in copied:
            shutil.copytree(source, target)
        else:
            target.symlink_to(source, target_is_directory=True)
    shutil.copy(setup.data / "train.csv", data / "train.csv")
    shutil.copy(setup.data / "test.csv", data / "test.csv")
    return setup, data, pd.read_csv(setup.data / "test.csv", dtype=str)


def run_submission(setup: SubmissionSetup, data: Path, test: pd.DataFrame, **changes) -> tuple[dict, pd.Series]:
    """Write ``test`` as test.csv, run make_submission, check the submission is complete and valid.

    Returns the summary and fractured by row (row order as in test.csv, repeats kept).
    """
    test.to_csv(data / "test.csv", index=False)
    cfg = make_submission.SubmissionConfig(**{**setup.cfg.__dict__, **changes})
    out = data.parent / "out" / "submission.csv"
    out.parent.mkdir(exist_ok=True)
    summary = make_submission.run(cfg, data, setup.models, out)
    sub = pd.read_csv(out, dtype={"row_id": str}, keep_default_na=False)
    given = pd.read_csv(data / "test.csv", dtype=str, keep_default_na=False)
    assert list(sub.columns) == ["row_id", "fractured"]
    assert sub["row_id"].tolist() == given["row_id"].tolist(), "not every row of test.csv, in order"
    values = sub["fractured"].astype(float)
    assert values.between(LOW, HIGH).all(), values.describe()
    return summary, pd.Series(values.to_numpy(), index=sub["row_id"])


def linked_models(ctx: Ctx) -> Path:
    """A models folder whose checkpoints link to the shared ones, free to receive a bad file."""
    source, models = ctx.submission().models, ctx.tmp / "models"
    (models / "stage2").mkdir(parents=True)
    (models / "stage1").symlink_to(source / "stage1", target_is_directory=True)
    for run in (source / "stage2").iterdir():
        (models / "stage2" / run.name).symlink_to(run, target_is_directory=True)
    return models


def prior_rows(data: Path, uid: str) -> pd.Series:
    """The prior make_submission falls back to, by row_id of study ``uid``."""
    return pd.Series(make_submission.load_prior(data), index=[f"{uid}_{t}" for t in TARGETS])


CROP_SETTINGS = ["crop.n_slices=3", "crop.size=16", "crop.workers=1"]


def crop_inputs(ctx: Ctx, uids: list[str]) -> tuple[Path, Path]:
    """Train studies with C1..C3 and their oracle stage-1 outputs (masks, boxes.csv)."""
    data, work = ctx.tmp / "data", ctx.tmp / "work"
    stage1 = work / "stage1" / "default"
    boxes = []
    for i, uid in enumerate(uids):
        labels = np.zeros((8, 24, 24), dtype=np.uint8)
        for c, (z0, z1) in enumerate([(1, 3), (3, 5), (5, 7)]):
            labels[z0:z1, 6 + c:18, 5:19 - c] = c + 1
        hu = np.where(labels > 0, 700, 40).astype(np.int16) + volume(8, 24, seed=i) // 50
        write_ct_series(data / "train_images" / uid, hu)
        boxes.append(boxes_from_labels(labels, uid))
        onehot = np.stack([labels == c + 1 for c in range(7)]).astype(np.uint8) * 255
        save_npz_atomic(stage1 / "masks" / f"{uid}.npz", probs=onehot, shape=np.array(hu.shape))
    write_csv_atomic(stage1 / "boxes.csv", pd.concat(boxes))
    write_csv_atomic(data / "train.csv", pd.DataFrame({"StudyInstanceUID": uids, "patient_overall": 0}))
    return data, work


TINY_TRAIN = TrainConfig(steps=2, eval_every=2, batch_size=2, val_batch_size=5, num_workers=0, warmup_steps=1)


# === load_study ==========================================================================

@case("load_study", "empty folder")
def empty_folder(ctx: Ctx) -> str:
    folder = ctx.tmp / "empty"
    folder.mkdir()
    raises(DicomReadError, lambda: load_study(folder), folder, "no DICOM files")
    return "DicomReadError naming the folder: no DICOM files in the study folder"


@case("load_study", "missing folder")
def missing_folder(ctx: Ctx) -> str:
    raises(FileNotFoundError, lambda: load_study(ctx.tmp / "absent"), ctx.tmp / "absent")
    return "FileNotFoundError naming the folder"


@case("load_study", "only non-DICOM files (.txt, .json, .png, .DS_Store)")
def only_non_dicom(ctx: Ctx) -> str:
    folder = ctx.tmp / "study"
    folder.mkdir()
    for name in ("notes.txt", "meta.json", "preview.png", ".DS_Store"):
        (folder / name).write_bytes(b"not an image")
    raises(DicomReadError, lambda: load_study(folder, tolerant=True), folder, "no DICOM files")
    return "DicomReadError naming the folder: no DICOM files (known non-image files are not parsed)"


def _truncate_second_slice(ctx: Ctx) -> tuple[Path, list[Path], np.ndarray]:
    hu = volume()
    paths = write_ct_series(ctx.tmp / "study", hu)
    paths[1].write_bytes(paths[1].read_bytes()[:-100])
    return ctx.tmp / "study", paths, hu


@case("load_study", "truncated slice, strict")
def truncated_slice_strict(ctx: Ctx) -> str:
    folder, paths, _ = _truncate_second_slice(ctx)
    raises(DicomReadError, lambda: load_study(folder), paths[1])
    return "DicomReadError naming the file"


@case("load_study", "truncated slice, tolerant")
def truncated_slice_tolerant(ctx: Ctx) -> str:
    folder, paths, hu = _truncate_second_slice(ctx)
    study = load_study(folder, tolerant=True)
    np.testing.assert_array_equal(study.hu, hu[[0, 2, 3]])
    assert len(study.dropped) == 1 and study.dropped[0].startswith(str(paths[1]))
    assert paths[1].name in ctx.logged()
    return "slice dropped, recorded in Study.dropped and logged; the other 3 slices read exactly"


def _junk_slice(ctx: Ctx, junk: bytes) -> str:
    hu = volume()
    write_ct_series(ctx.tmp / "study", hu)
    bad = ctx.tmp / "study" / "junk.dcm"
    bad.write_bytes(junk)
    raises(DicomReadError, lambda: load_study(ctx.tmp / "study"), bad, "not a readable DICOM file")
    study = load_study(ctx.tmp / "study", tolerant=True)
    np.testing.assert_array_equal(study.hu, hu)
    assert [d.split(":")[0] for d in study.dropped] == [str(bad)] and "junk.dcm" in ctx.logged()
    return "strict: DicomReadError naming the file; tolerant: dropped with a logged reason, rest read"


@case("load_study", "zero-byte slice")
def zero_byte_slice(ctx: Ctx) -> str:
    return _junk_slice(ctx, b"")


@case("load_study", "random bytes named .dcm")
def random_bytes_slice(ctx: Ctx) -> str:
    return _junk_slice(ctx, np.random.default_rng(0).bytes(3000))


@case("load_study", "mixed series: axial 6 + axial 3 + sagittal 2 slices")
def mixed_series(ctx: Ctx) -> str:
    folder, hu = ctx.tmp / "study", volume(6)
    write_ct_series(folder, hu, names=[f"main{i}.dcm" for i in range(6)])
    write_ct_series(folder, volume(3, seed=1), names=[f"other{i}.dcm" for i in range(3)])
    write_ct_series(folder, volume(2, 20, seed=2), names=["sag0.dcm", "sag1.dcm"], orientation=(0, 1, 0, 0, 0, -1))
    study = load_study(folder)
    np.testing.assert_array_equal(study.hu, hu)
    assert len(study.dropped) == 5
    assert all(name in ctx.logged() for name in ("other0.dcm", "sag0.dcm", "other series"))
    return "largest axial series kept; the 5 other files dropped with a warning naming them"


@case("load_study", "localizer (scout) beside the axial series")
def localizer(ctx: Ctx) -> str:
    folder, hu = ctx.tmp / "study", volume()
    write_ct_series(folder, hu)
    write_ct_series(folder, volume(1, 24, seed=1), names=["scout.dcm"],
                    image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), orientation=(0, 1, 0, 0, 0, -1))
    study = load_study(folder)
    np.testing.assert_array_equal(study.hu, hu)
    assert "scout.dcm" in ctx.logged() and "localizer" in ctx.logged()
    return "localizer dropped with a warning naming it; the series read exactly"


@case("load_study", "two files at the same position")
def duplicate_positions(ctx: Ctx) -> str:
    folder, hu = ctx.tmp / "study", volume()
    paths = write_ct_series(folder, hu)
    shutil.copy(paths[2], folder / "copy_of_3.dcm")
    study = load_study(folder)
    np.testing.assert_array_equal(study.hu, hu)
    assert len(study.dropped) == 1 and "copy_of_3.dcm" in study.dropped[0]
    assert "duplicate position" in ctx.logged() and "copy_of_3.dcm" in ctx.logged()
    return "one kept; the other dropped with a warning naming both"


@case("load_study", "MR study (Modality MR)")
def mr_modality(ctx: Ctx) -> str:
    folder = ctx.tmp / "study"
    write_ct_series(folder, volume(), extra={"Modality": "MR"})
    raises(DicomReadError, lambda: load_study(folder, tolerant=True), folder, "no CT image slices")
    assert "modality MR" in ctx.logged()
    return "DicomReadError naming the folder (no CT image slices); the log says 'modality MR, not CT'"


@case("load_study", "unsupported transfer syntax (MPEG2)")
def unsupported_syntax(ctx: Ctx) -> str:
    from pydicom.encaps import encapsulate

    folder = ctx.tmp / "study"
    paths = write_ct_series(folder, volume())
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
        ds.PixelData = encapsulate([bytes(64)])
        ds["PixelData"].VR = "OB"
        ds.save_as(path, enforce_file_format=True)
    raises(DicomReadError, lambda: load_study(folder), paths[0], "1.2.840.10008.1.2.4.100")
    raises(DicomReadError, lambda: load_study(folder, tolerant=True), folder, "no slice")
    assert paths[0].name in ctx.logged()
    return "strict: DicomReadError naming the file and the syntax; tolerant: every slice dropped, study refused"


@case("load_study", "slices numbered feet to head")
def feet_to_head(ctx: Ctx) -> str:
    hu = volume(6)
    write_ct_series(ctx.tmp / "study", hu, head_first_instances=False)
    study = load_study(ctx.tmp / "study")
    np.testing.assert_array_equal(study.hu, hu)
    assert np.all(np.diff(study.z_positions) < 0) and study.instance_numbers[0] == 6
    return "read head to feet (by position, not InstanceNumber), voxels exact"


@case("load_study", "a DICOM file without pixel data among the slices")
def no_pixel_data(ctx: Ctx) -> str:
    folder, hu = ctx.tmp / "study", volume()
    paths = write_ct_series(folder, hu)
    ds = pydicom.dcmread(paths[0])
    del ds.PixelData
    ds.save_as(folder / "report.dcm")
    study = load_study(folder)
    np.testing.assert_array_equal(study.hu, hu)
    assert "report.dcm" in ctx.logged() and "no pixel data" in ctx.logged()
    return "dropped with a warning naming it (no pixel data); the series read exactly"


def _slope_case(ctx: Ctx, text: bytes, reader: str) -> str:
    """A series whose RescaleSlope is ``text``: HU with slope 1.0 and a warning naming the file,
    or the study refused naming it; never the constant volume that slope 0 makes."""
    if reader == "pydicom":
        ctx.monkeypatch.setattr(decoders, "dicomsdl", None)
    folder, hu = ctx.tmp / "study", volume(seed=4)
    paths = write_ct_series(folder, hu, signed=False)  # 12-bit, intercept -1024: like most RSNA studies
    for path in paths:
        set_ds_text(path, RESCALE_SLOPE, text)
    try:
        study = load_study(folder)
    except DicomReadError as exc:
        assert folder.name in str(exc), exc
        return f"study refused: DicomReadError naming {Path(exc.path).name}"
    assert np.ptp(study.hu) > 0, f"a constant {study.hu.flat[0]} HU volume"
    np.testing.assert_array_equal(study.hu, hu)
    warned = [r.getMessage() for r in ctx.caplog.records
              if r.levelno >= logging.WARNING and "slope" in r.getMessage().lower()]
    assert any(p.name in m for m in warned for p in paths), f"no warning names the file: {warned}"
    return "read with slope 1.0; a warning names the file"


@case("load_study", "RescaleSlope blank, dicomsdl header path")
def slope_blank_dicomsdl(ctx: Ctx) -> str:
    return _slope_case(ctx, b"", "dicomsdl")


@case("load_study", "RescaleSlope 'abc', dicomsdl header path")
def slope_text_dicomsdl(ctx: Ctx) -> str:
    return _slope_case(ctx, b"abc", "dicomsdl")


@case("load_study", "RescaleSlope 0, dicomsdl header path")
def slope_zero_dicomsdl(ctx: Ctx) -> str:
    return _slope_case(ctx, b"0", "dicomsdl")


@case("load_study", "RescaleSlope blank, pydicom header path")
def slope_blank_pydicom(ctx: Ctx) -> str:
    return _slope_case(ctx, b"", "pydicom")


@case("load_study", "RescaleSlope 'abc', pydicom header path")
def slope_text_pydicom(ctx: Ctx) -> str:
    return _slope_case(ctx, b"abc", "pydicom")


@case("load_study", "RescaleSlope 0, pydicom header path")
def slope_zero_pydicom(ctx: Ctx) -> str:
    return _slope_case(ctx, b"0", "pydicom")


def _corrupt_jpeg_case(ctx: Ctx, damage: Callable[[bytearray, int, int], None]) -> str:
    """JPEG Lossless series with slice 1 damaged: strict names the file, tolerant drops it."""
    folder, hu = ctx.tmp / "study", smooth_volume()
    paths = write_ct_series(folder, hu, signed=False, transfer_syntax=JPEG_LOSSLESS)
    data = bytearray(paths[1].read_bytes())
    damage(data, *jpeg_scan(bytes(data)))
    paths[1].write_bytes(bytes(data))
    raises(DicomReadError, lambda: load_study(folder), paths[1])
    study = load_study(folder, tolerant=True)
    np.testing.assert_array_equal(study.hu, hu[[0, 2, 3]])
    assert [d.split(":")[0] for d in study.dropped] == [str(paths[1])] and paths[1].name in ctx.logged()
    return "strict: DicomReadError naming the file; tolerant: slice dropped with a logged reason"


@case("load_study", "JPEG Lossless slice with random bytes mid-stream")
def jpeg_random_bytes(ctx: Ctx) -> str:
    def damage(data: bytearray, first: int, end: int) -> None:
        middle = (first + end) // 2
        data[middle:middle + 256] = np.random.default_rng(7).bytes(256)
    return _corrupt_jpeg_case(ctx, damage)


@case("load_study", "JPEG Lossless slice with its second half zeroed")
def jpeg_zeroed_half(ctx: Ctx) -> str:
    def damage(data: bytearray, first: int, end: int) -> None:
        middle = (first + end) // 2
        data[middle:end] = bytes(end - middle)
    return _corrupt_jpeg_case(ctx, damage)


@case("load_study", "Rows/Columns 65535x65535 over a few KB of pixels")
def huge_dimensions(ctx: Ctx) -> str:
    folder = ctx.tmp / "study"
    paths = write_ct_series(folder, volume(4, 8))
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.Rows = ds.Columns = 65535
        ds.save_as(path)

    def read(tolerant: bool) -> None:
        try:
            load_study(folder, tolerant=tolerant)
        except MemoryError as exc:  # a 32 GiB volume must never be allocated for 512 bytes of pixels
            pytest.fail(f"MemoryError instead of a DicomReadError naming the file: {exc}")

    raises(DicomReadError, lambda: read(False), paths[0])
    raises(DicomReadError, lambda: read(True), folder)
    return "DicomReadError naming the file (no MemoryError); tolerant: study refused"


# === Mask reader (load_rsna_mask) =======================================================

def _mask_study(ctx: Ctx):
    return load_study(write_ct_series(ctx.tmp / "study", volume(8, 24))[0].parent)


@case("mask reader", "mask of the wrong shape (7 slices for an 8-slice study)")
def mask_wrong_shape(ctx: Ctx) -> str:
    study, path = _mask_study(ctx), ctx.tmp / "seg.nii.gz"
    write_rsna_mask(path, np.ones((7, 24, 24), np.uint8))
    raises(MaskShapeError, lambda: load_rsna_mask(path, study), path, "(24, 24, 7)", "(8, 24, 24)")
    return "MaskShapeError naming the file and both shapes"


@case("mask reader", "truncated .nii.gz")
def mask_truncated(ctx: Ctx) -> str:
    study, path = _mask_study(ctx), ctx.tmp / "seg.nii.gz"
    write_rsna_mask(path, np.random.default_rng(0).integers(0, 8, (8, 24, 24)).astype(np.uint8))
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 3 // 4])
    with pytest.raises(Exception) as info:
        load_rsna_mask(path, study)
    assert str(path) in str(info.value), f"{type(info.value).__name__} does not name the file: {info.value}"
    return f"{type(info.value).__name__} naming the file"


@case("mask reader", "non-integer float labels (0.5, 1.5, ...)")
def mask_float_labels(ctx: Ctx) -> str:
    study, path = _mask_study(ctx), ctx.tmp / "seg.nii.gz"
    write_rsna_mask(path, np.full((8, 24, 24), 1.5, np.float32))
    raises(ValueError, lambda: load_rsna_mask(path, study), path, "non-integer")
    return "ValueError naming the file: non-integer label values"


@case("mask reader", "label values outside 0..255 (-1)")
def mask_negative_labels(ctx: Ctx) -> str:
    study, path = _mask_study(ctx), ctx.tmp / "seg.nii.gz"
    write_rsna_mask(path, np.full((8, 24, 24), -1, np.int16))
    raises(ValueError, lambda: load_rsna_mask(path, study), path, "outside 0..255")
    return "ValueError naming the file and the value range"


@case("mask reader", "missing mask file")
def mask_missing(ctx: Ctx) -> str:
    study = _mask_study(ctx)
    raises(FileNotFoundError, lambda: load_rsna_mask(ctx.tmp / "absent.nii", study), ctx.tmp / "absent.nii")
    return "FileNotFoundError naming the file"


# === Stage-1 data =======================================================================

def _segmented(ctx: Ctx, labels_by_uid: dict[str, int | None]) -> Path:
    """train_images for each uid; a segmentation filled with the given label (None: no file)."""
    data = ctx.tmp / "data"
    (data / "segmentations").mkdir(parents=True)
    for i, (uid, label) in enumerate(labels_by_uid.items()):
        write_ct_series(data / "train_images" / uid, volume(8, 24, seed=i))
        if label is not None:
            labels = np.zeros((8, 24, 24), np.uint8)
            labels[2:6, 8:16, 8:16] = label
            write_rsna_mask(data / "segmentations" / f"{uid}.nii", labels)
    return data


@case("stage-1 data", "segmentation with only thoracic labels (T1)")
def thoracic_only(ctx: Ctx) -> str:
    data = _segmented(ctx, {"1.2.1": 3, "1.2.2": 8})
    cache = prepare_cache(["1.2.1", "1.2.2"], data, ctx.tmp / "work", PreprocessConfig(size=16, crop_mm=0))
    assert with_cervical_labels(["1.2.1", "1.2.2"], cache) == ["1.2.1"]
    assert "1.2.2" in ctx.logged() and "without any C1-C7" in ctx.logged()
    return "skipped from training with a warning naming the study; the others kept"


@case("stage-1 data", "segmented study listed but its .nii file missing")
def segmentation_missing(ctx: Ctx) -> str:
    data = _segmented(ctx, {"1.2.1": None})
    raises(FileNotFoundError, lambda: prepare_cache(["1.2.1"], data, ctx.tmp / "work", PreprocessConfig(size=16)),
           "1.2.1", data / "segmentations")
    return "FileNotFoundError naming the study and the segmentations folder"


# === Checkpoints (load_checkpoint / rebuild_model) =====================================

def _small_checkpoint(ctx: Ctx, stage: str = "stage1") -> Path:
    path = ctx.tmp / "best.pt"
    save_checkpoint(path, stage=stage, model_state={"w": torch.ones(64)}, config={}, fold=0, epoch=1)
    return path


class _RunsCode:
    """Unpickling this object creates a folder: proof that a load executed code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@case("checkpoint", "truncated checkpoint")
def checkpoint_truncated(ctx: Ctx) -> str:
    path = _small_checkpoint(ctx)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    raises(CheckpointError, lambda: load_checkpoint(path), path, "truncated or corrupt")
    return "CheckpointError naming the file (truncated or corrupt)"


@case("checkpoint", "a pickle that would execute code on load")
def checkpoint_executes_code(ctx: Ctx) -> str:
    path, marker = ctx.tmp / "evil.pt", ctx.tmp / "code_ran"
    torch.save({"format": "rsna-csfd-checkpoint", "version": 1, "stage": "stage1", "model": {},
                "config": _RunsCode(marker)}, path)
    raises(CheckpointError, lambda: load_checkpoint(path), path)
    assert not marker.exists(), "loading the checkpoint executed code"
    torch.load(path, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()
    return "refused (weights_only): CheckpointError naming the file; the code never ran"


@case("checkpoint", "a stage-1 checkpoint given to the stage-2 rebuild")
def checkpoint_wrong_stage(ctx: Ctx) -> str:
    path = _small_checkpoint(ctx, stage="stage1")
    raises(CheckpointError, lambda: rebuild_model(path, "stage2", Stage2Config, build_stage2), path,
           "expected stage2")
    return "CheckpointError naming the file: a stage1 checkpoint, expected stage2"


@case("checkpoint", "a foreign .pt file (plain state_dict)")
def checkpoint_foreign(ctx: Ctx) -> str:
    path = ctx.tmp / "resnet.pt"
    torch.save(torch.nn.Linear(4, 2).state_dict(), path)
    raises(CheckpointError, lambda: load_checkpoint(path), path, "not a checkpoint of this project")
    return "CheckpointError naming the file: not a checkpoint of this project"


@case("checkpoint", "weights that do not fit the model its config describes")
def checkpoint_weights_mismatch(ctx: Ctx) -> str:
    path = ctx.tmp / "best.pt"
    cfg = to_dict(load_config(Stage2Config, None, STAGE2_OVERRIDES))
    save_checkpoint(path, stage="stage2", model_state={"head.weight": torch.ones(3)}, config=cfg, fold=0, epoch=1)
    raises(CheckpointError, lambda: rebuild_model(path, "stage2", Stage2Config, build_stage2), path,
           "do not fit")
    return "CheckpointError naming the file: weights do not fit the model"


@case("checkpoint", "checkpoint of an unknown format version")
def checkpoint_future_version(ctx: Ctx) -> str:
    path = _small_checkpoint(ctx)
    payload = torch.load(path, weights_only=True)
    torch.save({**payload, "version": 99}, path)
    raises(CheckpointError, lambda: load_checkpoint(path), path, "version 99")
    return "CheckpointError naming the file and the version"


@case("checkpoint", "missing checkpoint file")
def checkpoint_missing(ctx: Ctx) -> str:
    raises(CheckpointError, lambda: load_checkpoint(ctx.tmp / "best.pt"), ctx.tmp / "best.pt", "not found")
    return "CheckpointError naming the file: not found"


# === make_submission ====================================================================

@case("make_submission", "zero-byte test.csv")
def zero_byte_test_csv(ctx: Ctx) -> str:
    setup, data, _ = submission_data(ctx)
    (data / "test.csv").write_bytes(b"")
    out = ctx.tmp / "submission.csv"
    raises(ValueError, lambda: make_submission.run(setup.cfg, data, setup.models, out), data / "test.csv", "empty")
    assert not out.exists()
    return "ValueError naming test.csv (empty file); no submission written"


@case("make_submission", "header-only test.csv")
def header_only_test_csv(ctx: Ctx) -> str:
    setup, data, test = submission_data(ctx)
    summary, values = run_submission(setup, data, test.iloc[:0])
    assert summary["studies"] == 0 and values.empty
    return "an empty, valid submission (header row only)"


@case("make_submission", "test.csv whose rows repeat (one study listed twice)")
def repeated_rows(ctx: Ctx) -> str:
    setup, data, test = submission_data(ctx)
    again = test[test["StudyInstanceUID"] == setup.uids[0]]
    summary, values = run_submission(setup, data, pd.concat([test, again]))
    assert len(values) == len(test) + 8 and summary["predicted"] == len(setup.uids)
    log = pd.read_csv(data.parent / "out" / "submission_log.csv", dtype=str)
    assert sorted(log["StudyInstanceUID"]) == sorted(setup.uids), "a study was predicted twice"
    np.testing.assert_allclose(values.to_numpy(), setup.reference[values.index].to_numpy(), atol=1e-6)
    assert f"{setup.uids[0]}_C1" in ctx.logged() and "repeated" in ctx.logged()
    return "every row written as given; each study predicted once; a warning names the repeats"


@case("make_submission", "row_id disagreeing with its StudyInstanceUID / prediction_type")
def disagreeing_row(ctx: Ctx) -> str:
    setup, data, test = submission_data(ctx)
    row = f"{setup.uids[0]}_C1"
    test.loc[test["row_id"] == row, ["StudyInstanceUID", "prediction_type"]] = [setup.uids[1], "C5"]
    _, values = run_submission(setup, data, test)
    assert values[row] == pytest.approx(setup.reference[row], abs=1e-6)
    assert values[row] != pytest.approx(setup.reference[f"{setup.uids[1]}_C5"], abs=1e-6)
    assert row in ctx.logged() and "disagrees" in ctx.logged()
    return "the row_id decides the value; a warning names the row"


@case("make_submission", "test.csv naming a study without an image folder")
def study_without_images(ctx: Ctx) -> str:
    setup, data, test = submission_data(ctx)
    ghost = "1.2.826.0.1.3680043.77777"
    prior = prior_rows(data, ghost)
    extra = pd.DataFrame({"row_id": prior.index, "StudyInstanceUID": ghost,
                          "prediction_type": [r.split("_", 1)[1] for r in prior.index]})
    summary, values = run_submission(setup, data, pd.concat([test, extra]))
    np.testing.assert_allclose(values[prior.index], prior, atol=1e-6)
    np.testing.assert_allclose(values[test["row_id"]], setup.reference[test["row_id"]], atol=1e-6)
    assert summary["statuses"].get("prior: no image folder") == 1
    return "the prior for it (status 'prior: no image folder'); the others predicted"


@case("make_submission", "one unreadable study among good ones")
def one_corrupt_study(ctx: Ctx) -> str:
    uid = ctx.submission().uids[1]
    setup, data, test = submission_data(ctx, copied=(uid,))
    for path in (data / "test_images" / uid).iterdir():
        path.write_bytes(b"not a dicom file")
    summary, values = run_submission(setup, data, test)
    prior = prior_rows(data, uid)
    np.testing.assert_allclose(values[prior.index], prior, atol=1e-6)
    good = test["row_id"][test["StudyInstanceUID"] != uid]
    np.testing.assert_allclose(values[good], setup.reference[good], atol=1e-6)
    assert summary["fallback"] == 1 and str(data / "test_images" / uid) in ctx.logged(logging.ERROR)
    return "the prior for it, an error log naming its folder; the others predicted"


@case("make_submission", "one corrupt slice in a test study")
def one_corrupt_slice(ctx: Ctx) -> str:
    uid = ctx.submission().uids[0]
    setup, data, test = submission_data(ctx, copied=(uid,))
    bad = sorted((data / "test_images" / uid).iterdir())[3]
    bad.write_bytes(b"\x00" * 200)
    summary, values = run_submission(setup, data, test)
    assert summary["fallback"] == 0 and summary["predicted"] == len(setup.uids)
    assert bad.name in ctx.logged()
    return "predicted from the other slices; a warning names the dropped file"


@case("make_submission", "test.csv row_id without a known label suffix")
def unknown_label_suffix(ctx: Ctx) -> str:
    setup, data, test = submission_data(ctx)
    test.loc[0, "row_id"] = f"{setup.uids[0]}_C8"
    test.to_csv(data / "test.csv", index=False)
    raises(ValueError, lambda: make_submission.run(setup.cfg, data, setup.models, ctx.tmp / "s.csv"),
           data / "test.csv", f"{setup.uids[0]}_C8")
    assert not (ctx.tmp / "s.csv").exists()
    return "ValueError naming test.csv and the row; no submission written"


@case("make_submission", "no model checkpoints in the models folder")
def no_models(ctx: Ctx) -> str:
    setup, data, _ = submission_data(ctx)
    (ctx.tmp / "models").mkdir()
    out = ctx.tmp / "submission.csv"
    raises(FileNotFoundError, lambda: make_submission.run(setup.cfg, data, ctx.tmp / "models", out),
           "stage-1 checkpoints", ctx.tmp / "models")
    assert not out.exists()
    return "FileNotFoundError naming the checkpoint pattern; no submission written"


@case("make_submission", "corrupt stage2/ensemble.json")
def corrupt_ensemble(ctx: Ctx) -> str:
    setup, data, _ = submission_data(ctx)
    models = linked_models(ctx)
    (models / "stage2" / "ensemble.json").write_text('{"runs": ["tiny"], "overall": ')
    raises(ValueError, lambda: make_submission.run(setup.cfg, data, models, ctx.tmp / "s.csv"),
           models / "stage2" / "ensemble.json")
    assert not (ctx.tmp / "s.csv").exists()
    return "ValueError naming ensemble.json; no submission written"


@case("make_submission", "truncated stage-2 checkpoint")
def truncated_model(ctx: Ctx) -> str:
    setup, data, _ = submission_data(ctx)
    models = linked_models(ctx)
    (models / "stage2" / "tiny").unlink()
    source = setup.models / "stage2" / "tiny" / "fold0" / "best.pt"
    bad = models / "stage2" / "tiny" / "fold0" / "best.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(source.read_bytes()[:100_000])
    raises(CheckpointError, lambda: make_submission.run(setup.cfg, data, models, ctx.tmp / "s.csv"), bad)
    assert not (ctx.tmp / "s.csv").exists()
    return "CheckpointError naming the file; no submission written"


@case("make_submission", "time budget spent before the first study")
def time_budget_spent(ctx: Ctx) -> str:
    setup, data, test = submission_data(ctx)
    summary, values = run_submission(setup, data, test, time_budget_hours=0.0)
    assert summary["statuses"] == {"prior: time budget": len(setup.uids)}
    np.testing.assert_allclose(values[prior_rows(data, setup.uids[0]).index], prior_rows(data, setup.uids[0]),
                               atol=1e-6)
    return "the prior for every study; a complete submission"


@case("make_submission", "temporary file of a killed run beside submission.csv")
def stale_submission_temporary(ctx: Ctx) -> str:
    setup, data, test = submission_data(ctx)
    (data.parent / "out").mkdir()
    stale = data.parent / "out" / f".submission.csv.{dead_pid()}.x1y2.tmp"
    stale.write_text("row_id,fractured\nhalf")
    run_submission(setup, data, test)
    assert not stale.exists()
    return "removed at the start of the next run; the submission written complete"


# === Crop command (stage2_cls.crop) ====================================================

@case("crop", "a study whose volume shape differs from its stage-1 mask (slice removed)")
def crop_shape_mismatch(ctx: Ctx) -> str:
    data, work = crop_inputs(ctx, ["1.3.1", "1.3.2"])
    sorted((data / "train_images" / "1.3.2").iterdir())[0].unlink()
    summary = crop.run(load_config(Stage2Config, None, CROP_SETTINGS), data, work)
    assert summary["written"] == 1 and list(summary["failed"]) == ["1.3.2"]
    message = summary["failed"]["1.3.2"]
    assert str(data / "train_images" / "1.3.2") in message and "differs from the stage-1 mask" in message
    assert str(work / "stage1" / "default" / "masks" / "1.3.2.npz") in message
    assert "1.3.2" in ctx.logged(logging.ERROR) and not (work / "crops" / "1.3.2.npz").exists()
    return "reported failed, naming the folder and the mask; no crop file for it; the others written"


@case("crop", "crop settings changed between two runs in one folder")
def crop_settings_changed(ctx: Ctx) -> str:
    data, work = crop_inputs(ctx, ["1.3.1", "1.3.2"])
    crop.run(load_config(Stage2Config, None, CROP_SETTINGS), data, work, limit=1)
    before = (work / "crops" / "1.3.1.npz").read_bytes()
    other = load_config(Stage2Config, None, [*CROP_SETTINGS, "crop.size=20"])
    raises(crop.CropSettingsError, lambda: crop.run(other, data, work), work / "crops", "size")
    assert (work / "crops" / "1.3.1.npz").read_bytes() == before
    assert not (work / "crops" / "1.3.2.npz").exists()
    return "CropSettingsError naming the folder and the changed setting; nothing written"


@case("crop", "truncated stage-1 mask file")
def crop_truncated_mask(ctx: Ctx) -> str:
    data, work = crop_inputs(ctx, ["1.3.1", "1.3.2"])
    mask = work / "stage1" / "default" / "masks" / "1.3.1.npz"
    mask.write_bytes(mask.read_bytes()[:200])
    summary = crop.run(load_config(Stage2Config, None, CROP_SETTINGS), data, work)
    assert summary["written"] == 1 and list(summary["failed"]) == ["1.3.1"]
    assert str(mask) in summary["failed"]["1.3.1"], summary["failed"]
    return "reported failed, naming the mask file; the others written"


@case("crop", "a study without stage-1 outputs")
def crop_no_stage1(ctx: Ctx) -> str:
    data, work = crop_inputs(ctx, ["1.3.1", "1.3.2"])
    (work / "stage1" / "default" / "masks" / "1.3.2.npz").unlink()
    summary = crop.run(load_config(Stage2Config, None, CROP_SETTINGS), data, work)
    assert summary["written"] == 1 and summary["no_stage1"] == ["1.3.2"] and "1.3.2" in ctx.logged()
    return "skipped with a warning naming it; the others written"


# === Training (common.trainer.fit, shared by both stages) ==============================

@case("training", "--resume with another config")
def resume_other_config(ctx: Ctx) -> str:
    fit(ToyTask(), TINY_TRAIN, ctx.tmp, fold=0, full_config={"lr": 1})
    config, last = (ctx.tmp / "config.yaml").read_bytes(), (ctx.tmp / "last.pt").read_bytes()
    raises(CheckpointError, lambda: fit(ToyTask(), TINY_TRAIN, ctx.tmp, fold=0, full_config={"lr": 2}, resume=True),
           ctx.tmp / "last.pt", "different config")
    assert (ctx.tmp / "config.yaml").read_bytes() == config and (ctx.tmp / "last.pt").read_bytes() == last
    return "CheckpointError naming last.pt; config.yaml and last.pt untouched"


@case("training", "--resume from a truncated last.pt")
def resume_truncated(ctx: Ctx) -> str:
    fit(ToyTask(), TINY_TRAIN, ctx.tmp, fold=0, full_config={"lr": 1})
    last = ctx.tmp / "last.pt"
    last.write_bytes(last.read_bytes()[:300])
    config = (ctx.tmp / "config.yaml").read_bytes()
    raises(CheckpointError, lambda: fit(ToyTask(), TINY_TRAIN, ctx.tmp, fold=0, full_config={"lr": 1}, resume=True),
           last, "truncated or corrupt")
    assert (ctx.tmp / "config.yaml").read_bytes() == config
    return "CheckpointError naming last.pt; config.yaml untouched"


class _Diverging(ToyTask):
    """The loss turns NaN after ``after`` steps."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after, self.calls = after, 0

    def loss(self, model, batch, device):
        self.calls += 1
        loss = super().loss(model, batch, device)
        return loss * float("nan") if self.calls > self.after else loss


@case("training", "loss turns NaN mid-run")
def training_diverges(ctx: Ctx) -> str:
    cfg = TrainConfig(**{**TINY_TRAIN.__dict__, "steps": 4})
    with pytest.raises(FloatingPointError, match="nan"):
        fit(_Diverging(after=3), cfg, ctx.tmp, fold=0, full_config={})
    assert load_checkpoint(ctx.tmp / "last.pt")["step"] == 2  # the last validated weights, intact
    return "FloatingPointError stating the loss; last.pt of the last validation intact"


# === Atomic writes and temporaries (common.io) =========================================

@case("io", "temporaries of a dead and of a live process in one folder")
def stale_temporaries(ctx: Ctx) -> str:
    dead = ctx.tmp / f".boxes.csv.{dead_pid()}.k3j4.tmp"
    live = ctx.tmp / f".log.csv.{os.getpid()}.a1b2.tmp"
    other = ctx.tmp / ".editor-swap.tmp"  # not ours: no pid in the name
    for path in (dead, live, other):
        path.write_text("partial")
    assert remove_stale_temporaries(ctx.tmp) == [dead]
    assert not dead.exists() and live.exists() and other.exists()
    assert str(ctx.tmp) in ctx.logged(logging.INFO)
    return "the dead process's temporary removed (logged); the live one's and foreign files kept"


@case("io", "files written under umask 027 and 002")
def umask_permissions(ctx: Ctx) -> str:
    for umask in (0o027, 0o002):
        old = os.umask(umask)
        try:
            base = ctx.tmp / f"u{umask:03o}"
            write_text_atomic(base / "a.txt", "x")
            write_csv_atomic(base / "b.csv", pd.DataFrame({"a": [1]}))
            save_npz_atomic(base / "c.npz", a=np.zeros(2))
            save_checkpoint(base / "d.pt", stage="toy", model_state={}, config={}, fold=0, epoch=0)
        finally:
            os.umask(old)
        found = {p.name: p.stat().st_mode & 0o777 for p in base.iterdir()}
        assert set(found.values()) == {0o666 & ~umask}, found
    return "mode 0640 and 0664 as the umask says (not the temporary's 0600)"


@case("io", "exception in the middle of an atomic write")
def atomic_write_exception(ctx: Ctx) -> str:
    target = ctx.tmp / "metrics.json"
    target.write_text('{"old": true}')
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text('{"new": ')
            raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"old": True} and sorted(ctx.tmp.iterdir()) == [target]
    return "the old file intact; no temporary left behind"


_KILLED_WRITER = """
import sys, time
from pathlib import Path
from common.io import atomic_path
target, ready = Path(sys.argv[1]), Path(sys.argv[2])
with atomic_path(target) as tmp:
    with open(tmp, "w") as fh:
        fh.write("new content, first half ")
        fh.flush()
        ready.touch()
        time.sleep(120)
        fh.write("second half")
"""


@case("io", "SIGKILL during an atomic write")
def sigkill_during_write(ctx: Ctx) -> str:
    target, ready = ctx.tmp / "boxes.csv", ctx.tmp / "ready"
    target.write_text("old content")
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target), str(ready)], cwd=REPO)
    try:
        deadline = time.time() + 60
        while not ready.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the writer never reached the middle of its write"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert target.read_text() == "old content"
    left = [p for p in ctx.tmp.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1 and left[0].name.startswith(f".boxes.csv.{proc.pid}.")
    assert remove_stale_temporaries(ctx.tmp) == left and not left[0].exists()
    return "the old file intact; its half-written temporary removed by the next run"


# === The test ===========================================================================

def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:150] if text else ""


@pytest.mark.parametrize("case", CASES, ids=[c.check.__name__ for c in CASES])
def test_bad_input(case: Case, tmp_path, caplog, monkeypatch, request):
    caplog.set_level(logging.INFO)
    outcome = "FAILED"
    try:
        outcome = case.check(Ctx(tmp_path, caplog, monkeypatch, request))
        assert isinstance(outcome, str) and outcome and "\n" not in outcome
    except BaseException as exc:
        outcome = f"FAILED ({type(exc).__name__}: {_first_line(exc)})"
        raise
    finally:
        CATALOGUE.append((case.component, case.given, outcome))


def test_catalogue_is_large_and_named_once():
    assert len(CASES) >= 35
    names = [c.check.__name__ for c in CASES]
    assert len(set(names)) == len(names) and len({c.given for c in CASES}) == len(CASES)
