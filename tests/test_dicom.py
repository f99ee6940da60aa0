"""DICOM study reader: ordering, geometry, pixel formats, transfer syntaxes, bad input."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tooling.dicom_writer import write_ct_series
from common.decoders import fast_path
from common.dicom_header import read_header
from common.dicom import DicomReadError, load_study

EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"
RLE = "1.2.840.10008.1.2.5"
J2K = "1.2.840.10008.1.2.4.90"


def ramp_volume(shape=(5, 12, 10), lo=-1000, hi=2000, seed=0) -> np.ndarray:
    """HU volume whose every slice differs, so any misordering shows."""
    rng = np.random.default_rng(seed)
    vol = rng.integers(lo, hi, size=shape)
    vol[:, 0, 0] = np.arange(shape[0]) * 10  # slice index readable in a corner
    return vol.astype(np.int16)


def reference_hu(study) -> np.ndarray:
    """HU computed file by file with plain pydicom, in the study's slice order."""
    out = []
    for path in study.files:
        ds = pydicom.dcmread(path)
        slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
        hu = ds.pixel_array * slope + intercept
        out.append(np.clip(np.rint(hu), -32768, 32767))
    return np.stack(out).astype(np.int16)


# --- Real scanner data ----------------------------------------------------------------

def test_real_series_order_and_geometry(real_ct_study):
    s = real_ct_study
    assert s.hu.shape == (20, 512, 512) and s.hu.dtype == np.int16
    np.testing.assert_array_equal(s.instance_numbers, np.arange(267, 287))
    assert np.all(np.diff(s.z_positions) < 0)  # head to feet
    assert s.positions[[0, -1], 2] == pytest.approx([-766.5, -804.5])
    assert s.spacing == pytest.approx((2.0, 0.977, 0.977), abs=1e-3)
    assert s.uid == "dicom" and not s.dropped
    assert s.hu.min() == -1024 and 1000 < s.hu.max() < 3072  # air floor, bone present
    np.testing.assert_array_equal(s.hu, reference_hu(s))


@pytest.mark.parametrize("syntax", ["explicit-le", "implicit-le", "jpeg-lossless-70",
                                    "jpeg-lossless-57", "rle", "jpeg2000-91"])
def test_real_series_every_syntax_bit_identical(real_ct_transcoded, real_ct_study, syntax):
    study = load_study(real_ct_transcoded[syntax])
    expected = real_ct_study.hu[np.isin(real_ct_study.instance_numbers, study.instance_numbers)]
    assert study.hu.shape == (4, 512, 512)
    np.testing.assert_array_equal(study.hu, expected)
    np.testing.assert_array_equal(load_study(real_ct_transcoded[syntax], method="pydicom").hu,
                                  expected)


def test_fast_decoder_is_chosen_where_measured_faster(real_ct_transcoded):
    from common import decoders

    first = lambda name: read_header(str(sorted(real_ct_transcoded[name].iterdir())[0]))
    assert fast_path(first("explicit-le")) == "native"
    assert fast_path(first("implicit-le")) == "native"
    assert fast_path(first("rle")) == "imagecodecs"  # never dicomsdl, which crashed on corrupt RLE
    assert fast_path(first("jpeg2000-91")) == "pydicom"  # possibly lossy: only the reference matches itself
    jpeg = "imagecodecs" if decoders.imagecodecs is not None else \
        "dicomsdl" if decoders.dicomsdl is not None else "pydicom"
    assert fast_path(first("jpeg-lossless-70")) == jpeg
    assert load_study(real_ct_transcoded["jpeg-lossless-70"]).decoders == {jpeg: 4}


@pytest.mark.parametrize("fmt", ["s16", "s12", "u16-high"])
def test_every_jpeg_lossless_backend_is_exact(tmp_path, monkeypatch, fmt):
    """imagecodecs, dicomsdl and pydicom (each when installed) give the same HU."""
    from common import decoders

    signed, bits, slope, intercept, lo, hi = FORMATS[fmt]
    hu = ramp_volume((3, 12, 10), lo, hi)
    write_ct_series(tmp_path, hu, signed=signed, bits_stored=bits, slope=slope,
                    intercept=intercept, transfer_syntax=JPEG_LOSSLESS)
    backends = {"pydicom": load_study(tmp_path, method="pydicom")}
    if decoders.imagecodecs is not None:
        backends["imagecodecs"] = load_study(tmp_path)
    if decoders.dicomsdl is not None:
        monkeypatch.setattr(decoders, "imagecodecs", None)
        backends["dicomsdl"] = load_study(tmp_path)
    for name, study in backends.items():
        assert study.decoders == {name: 3}
        np.testing.assert_array_equal(study.hu, hu)


def test_j2k_codestream_sign_mismatch(tmp_path):
    from pydicom.data import get_testdata_file

    src = Path(get_testdata_file("J2K_pixelrep_mismatch.dcm"))
    shutil.copy(src, tmp_path / src.name)
    study = load_study(tmp_path)
    ds = pydicom.dcmread(src)
    assert ds.PixelRepresentation == 1
    np.testing.assert_array_equal(study.hu[0], ds.pixel_array * float(ds.RescaleSlope)
                                  + float(ds.RescaleIntercept))
    # Padding -2000 outside the field of view; the rest spans air to bone, not 0..8191.
    assert study.hu.min() == -2000 and study.hu.max() < 3000
    inside = study.hu[study.hu > -2000]
    assert np.mean((inside >= -1100) & (inside <= 2000)) > 0.99 and inside.max() > 500


# --- Pixel formats and syntaxes on synthetic series ------------------------------------

FORMATS = {  # name -> (signed, bits stored, slope, intercept, HU low, HU high)
    "s16": (True, 16, 1.0, -1024.0, -2000, 3000),
    "s16-extremes": (True, 16, 1.0, 0.0, -32768, 32767),
    "s12": (True, 12, 1.0, 0.0, -2048, 2047),
    "u12": (False, 12, 1.0, -1024.0, -1024, 3071),
    "u16-high": (False, 16, 1.0, -32768.0, -1024, 32767),
    "s16-slope": (True, 16, 0.5, -1024.0, -2000, 3000),
}


@pytest.mark.parametrize("syntax", [EXPLICIT, IMPLICIT, JPEG_LOSSLESS, RLE, J2K])
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_pixel_formats_give_exact_hu(tmp_path, fmt, syntax):
    signed, bits, slope, intercept, lo, hi = FORMATS[fmt]
    hu = ramp_volume((3, 12, 10), lo, hi)
    hu[0, 1, :2] = lo, hi  # both ends of the range
    write_ct_series(tmp_path, hu, signed=signed, bits_stored=bits, slope=slope,
                    intercept=intercept, transfer_syntax=syntax)
    study = load_study(tmp_path)
    np.testing.assert_array_equal(study.hu, hu)
    np.testing.assert_array_equal(load_study(tmp_path, method="pydicom").hu, hu)


@pytest.mark.parametrize("signed", [True, False])
def test_unused_high_bits_are_ignored_like_pydicom(tmp_path, signed):
    """BitsStored 12 with garbage in the top 4 bits: the 12 stored bits decide."""
    hu = ramp_volume((3, 8, 8), 0, 2000)
    write_ct_series(tmp_path, hu, signed=signed, bits_stored=16, intercept=0.0)
    rng = np.random.default_rng(1)
    for path in tmp_path.iterdir():
        ds = pydicom.dcmread(path)
        raw = ds.pixel_array.view(np.uint16) | (rng.integers(0, 16, ds.pixel_array.shape,
                                                              dtype=np.uint16) << 12)
        ds.BitsStored, ds.HighBit, ds.PixelData = 12, 11, raw.tobytes()
        ds.save_as(path)
    study = load_study(tmp_path)
    np.testing.assert_array_equal(study.hu, reference_hu(study))
    # 0..2000 survives masking (unsigned) but 2048.. wraps negative when signed.
    expected = np.where(hu >= 2048, hu - 4096, hu) if signed else hu
    np.testing.assert_array_equal(study.hu, expected)


# --- Ordering --------------------------------------------------------------------------

def test_feet_to_head_instances_give_same_volume(tmp_path):
    hu = ramp_volume()
    write_ct_series(tmp_path / "a", hu, head_first_instances=True)
    write_ct_series(tmp_path / "b", hu, head_first_instances=False)
    a, b = load_study(tmp_path / "a"), load_study(tmp_path / "b")
    np.testing.assert_array_equal(a.hu, hu)
    np.testing.assert_array_equal(b.hu, hu)
    np.testing.assert_array_equal(a.z_positions, b.z_positions)
    np.testing.assert_array_equal(b.instance_numbers, a.instance_numbers[::-1])
    assert a.spacing == pytest.approx((2.0, 0.8, 0.8))


def test_file_names_unrelated_to_order_and_no_extension(tmp_path):
    hu = ramp_volume((7, 8, 8))
    names = ["img5", "img1", "zz", "0", "img10", "b.DCM", "CT.1.2.3"]
    write_ct_series(tmp_path, hu, names=names, head_first_instances=False)
    study = load_study(tmp_path, uid="case-1")
    np.testing.assert_array_equal(study.hu, hu)
    assert [Path(f).name for f in study.files] == names and study.uid == "case-1"


@pytest.mark.parametrize("orientation", [(1, 0, 0, 0, 0.9272, -0.3746),  # gantry tilt
                                         (-1, 0, 0, 0, 1, 0)])  # normal points to the feet
def test_order_follows_patient_z_for_any_orientation(tmp_path, orientation):
    hu = ramp_volume((6, 8, 8))
    write_ct_series(tmp_path, hu, orientation=orientation, head_first_instances=False)
    study = load_study(tmp_path)
    np.testing.assert_array_equal(study.hu, hu)
    assert np.all(np.diff(study.positions[:, 2]) < 0) and study.normal[2] > 0
    assert study.spacing[0] == pytest.approx(2.0, rel=1e-4)


# --- Folders holding more than one series ----------------------------------------------

def test_other_series_and_localizer_are_dropped(tmp_path, caplog):
    hu = ramp_volume((6, 12, 10))
    write_ct_series(tmp_path, hu, names=[f"main{i}.dcm" for i in range(6)])
    write_ct_series(tmp_path, ramp_volume((3, 12, 10), seed=3),
                    names=[f"other{i}.dcm" for i in range(3)])
    write_ct_series(tmp_path, ramp_volume((1, 20, 16), seed=4), names=["scout.dcm"],
                    image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                    orientation=(0, 1, 0, 0, 0, -1))
    write_ct_series(tmp_path, ramp_volume((2, 20, 16), seed=5), names=["sag0", "sag1"],
                    orientation=(0, 1, 0, 0, 0, -1))
    with caplog.at_level(logging.WARNING, logger="common.dicom"):
        study = load_study(tmp_path)
    np.testing.assert_array_equal(study.hu, hu)
    text = caplog.text
    assert "localizer" in text and "scout.dcm" in text and "other series" in text
    assert "other0.dcm" in text and "sag0" in text
    assert len(study.dropped) == 6


def test_duplicate_positions_keep_one(tmp_path, caplog):
    hu = ramp_volume((5, 8, 8))
    paths = write_ct_series(tmp_path, hu)
    shutil.copy(paths[2], tmp_path / "copy_of_3.dcm")
    with caplog.at_level(logging.WARNING, logger="common.dicom"):
        study = load_study(tmp_path)
    np.testing.assert_array_equal(study.hu, hu)
    assert "duplicate position" in caplog.text and "copy_of_3.dcm" in caplog.text
    assert study.dropped and "copy_of_3.dcm" in study.dropped[0]


# --- Broken input ----------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:End of file reached")
@pytest.mark.parametrize("syntax", [EXPLICIT, JPEG_LOSSLESS])
def test_truncated_file_raises_or_is_skipped(tmp_path, syntax):
    hu = ramp_volume((5, 16, 16))
    paths = write_ct_series(tmp_path, hu, transfer_syntax=syntax)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 100])
    with pytest.raises(DicomReadError, match=paths[1].name):
        load_study(tmp_path)
    study = load_study(tmp_path, tolerant=True)
    np.testing.assert_array_equal(study.hu, hu[[0, 2, 3, 4]])
    assert len(study.dropped) == 1 and paths[1].name in study.dropped[0]


@pytest.mark.parametrize("n_bytes", [0, 100, 3000])
def test_garbage_or_empty_file_raises_unless_tolerant(tmp_path, n_bytes):
    hu = ramp_volume((3, 8, 8))
    write_ct_series(tmp_path, hu)
    (tmp_path / "junk.dcm").write_bytes(np.random.default_rng(0).bytes(n_bytes))
    with pytest.raises(DicomReadError, match="junk.dcm"):
        load_study(tmp_path)
    study = load_study(tmp_path, tolerant=True)
    np.testing.assert_array_equal(study.hu, hu)
    assert len(study.dropped) == 1 and "junk.dcm" in study.dropped[0]


def test_hidden_and_text_files_are_ignored(tmp_path):
    hu = ramp_volume((3, 8, 8))
    write_ct_series(tmp_path, hu)
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x01garbage")
    (tmp_path / "notes.txt").write_text("not an image")
    np.testing.assert_array_equal(load_study(tmp_path).hu, hu)


def test_empty_missing_and_imageless_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_study(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomReadError, match="empty"):
        load_study(tmp_path / "empty")
    write_ct_series(tmp_path / "scouts", ramp_volume((2, 8, 8)), image_type=("LOCALIZER",))
    with pytest.raises(DicomReadError, match="scouts.*no CT image"):
        load_study(tmp_path / "scouts")
