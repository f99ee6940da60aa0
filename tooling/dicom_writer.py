"""The one DICOM CT series writer (synthetic data, benchmarks, tests) and the one transcoder.

``write_ct_series`` writes an HU volume (slices, rows, cols), ordered head to feet,
as one single-frame CT file per slice in any transfer syntax the readers support:
uncompressed explicit / implicit VR little endian, RLE Lossless, JPEG 2000 Lossless
(encoded by pydicom's own encoders), JPEG Lossless (.57 / .70) and JPEG 2000 (.91)
(transcoded with python-gdcm, which pydicom cannot encode). Every encoding used is
lossless, so a reader must give back exactly the HU written.

With ``study_uid`` given, every UID and date is derived from it, so the same call
writes the same bytes (synthetic datasets are reproducible from their seed).
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless,
                         RLELossless, generate_uid)
from tqdm.auto import tqdm

NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
PYDICOM_ENCODED = (RLELossless, JPEG2000Lossless)  # pydicom's encoders; the rest goes through gdcm
_GDCM_NAMES = {  # transfer syntax UID -> gdcm.TransferSyntax attribute
    "1.2.840.10008.1.2": "ImplicitVRLittleEndian",
    "1.2.840.10008.1.2.1": "ExplicitVRLittleEndian",
    "1.2.840.10008.1.2.4.57": "JPEGLosslessProcess14",
    "1.2.840.10008.1.2.4.70": "JPEGLosslessProcess14_1",
    "1.2.840.10008.1.2.4.90": "JPEG2000Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG2000",
    "1.2.840.10008.1.2.5": "RLELossless",
}


def transcode_file(src: str | os.PathLike, dst: str | os.PathLike, transfer_syntax: str) -> None:
    """Re-encode one DICOM file losslessly into ``transfer_syntax`` with python-gdcm."""
    import gdcm  # needed only to write syntaxes pydicom cannot encode

    if transfer_syntax not in _GDCM_NAMES:
        raise ValueError(f"cannot transcode to transfer syntax {transfer_syntax}")
    reader = gdcm.ImageReader()
    reader.SetFileName(str(src))
    if not reader.Read():
        raise RuntimeError(f"{src}: gdcm cannot read the image")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, _GDCM_NAMES[transfer_syntax])))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise RuntimeError(f"{src}: gdcm cannot transcode to {transfer_syntax}")
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise RuntimeError(f"{dst}: gdcm cannot write the transcoded image")


def stored_range(signed: bool, bits_stored: int) -> tuple[int, int]:
    """The stored values a pixel of ``bits_stored`` bits can hold."""
    return (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (0, 2 ** bits_stored - 1)


def _series_dataset(shape: tuple[int, int], spacing: Sequence[float], orientation: Sequence[float],
                    study_uid: str, series_uid: str, image_type: Sequence[str], signed: bool,
                    bits_stored: int, slope: float, intercept: float) -> Dataset:
    """The header every slice shares; ``_point_at_slice`` fills in the per-slice fields."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID, ds.Modality = CTImageStorage, "CT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.FrameOfReferenceUID, ds.PatientID = f"{study_uid}.2", study_uid.rsplit(".", 1)[-1]
    ds.ImageType, ds.PatientPosition, ds.SeriesNumber = list(image_type), "HFS", 1
    # Fixed dates: gdcm stamps the current time into a missing StudyTime, which would
    # make two runs with the same seed write different bytes.
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20220701"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.SliceThickness = f"{spacing[0]:.5f}"
    ds.PixelSpacing = [f"{spacing[1]:.6f}", f"{spacing[2]:.6f}"]
    ds.Rows, ds.Columns = shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated = 1, "MONOCHROME2", 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, int(signed)
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, slope, "HU"
    ds.WindowCenter, ds.WindowWidth = 400, 1800
    return ds


def _encode(ds: Dataset, stored: np.ndarray, syntax: str, path: Path, scratch: Path) -> None:
    """Write one slice in ``syntax`` to ``path`` (one write per file: pydicom's small writes cost 2x)."""
    native = ImplicitVRLittleEndian if syntax == ImplicitVRLittleEndian else ExplicitVRLittleEndian
    ds.file_meta.TransferSyntaxUID = native
    encoded = False
    if syntax in PYDICOM_ENCODED:
        try:
            ds.compress(syntax, stored, generate_instance_uid=False)
            encoded = True
        except RuntimeError:  # e.g. OpenJPEG refuses images smaller than its resolution levels
            ds.file_meta.TransferSyntaxUID = native
    if not encoded:
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW"
    if syntax in NATIVE or encoded:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        path.write_bytes(buffer.getvalue())
        return
    ds.save_as(scratch, enforce_file_format=True)
    transcode_file(scratch, path, syntax)


def write_ct_series(folder: str | os.PathLike, hu: np.ndarray, *,
                    spacing: Sequence[float] = (2.0, 0.8, 0.8), origin: Sequence[float] | None = None,
                    signed: bool = True, bits_stored: int | None = None, intercept: float | None = None,
                    slope: float = 1.0, head_first_instances: bool = True, first_instance: int = 1,
                    names: Sequence[str] | None = None, suffix: str = ".dcm",
                    transfer_syntax: str = ExplicitVRLittleEndian, study_uid: str | None = None,
                    series_uid: str | None = None,
                    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
                    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0), atomic: bool = False,
                    progress: bool = False, extra: Mapping[str, Any] | None = None) -> list[Path]:
    """Write ``hu`` ((slices, rows, cols), head to feet) as a CT series; return the paths in ``hu`` order.

    spacing: (slice gap, row, column) mm; slices lie ``spacing[0]`` apart along the
    slice normal, the first one highest. origin: patient (x, y, z) of the first
    slice's first pixel (default: the image centred on x = y = 0, top at z = 0).
    Pixels are signed 16-bit with intercept 0 by default, or (``signed=False``)
    12-bit unsigned with intercept -1024, like most RSNA studies; stored values =
    (hu - intercept) / slope must fit. File names default to
    ``<InstanceNumber><suffix>``; ``names`` (in ``hu`` order) overrides them.
    ``head_first_instances=False`` numbers the slices feet to head. ``atomic``
    builds the series in a hidden sibling folder and renames it into place (the
    folder is replaced), so an interrupted run never leaves half a study.
    ``extra`` sets further header keywords on every slice.
    """
    folder, hu = Path(folder), np.asarray(hu)
    bits_stored = bits_stored or (16 if signed else 12)
    intercept = (0.0 if signed else -1024.0) if intercept is None else intercept
    lo, hi = stored_range(signed, bits_stored)
    extremes = np.rint((np.array([hu.min(), hu.max()], dtype=np.float64) - intercept) / slope)
    if extremes.min() < lo or extremes.max() > hi:
        raise ValueError(f"stored values {extremes.min():g}..{extremes.max():g} do not fit "
                         f"{bits_stored}-bit {'signed' if signed else 'unsigned'} pixels")
    n_slices, rows, cols = hu.shape
    iop = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    normal = -normal if normal[2] < 0 else normal
    if origin is None:
        origin = (-0.5 * cols * spacing[2], -0.5 * rows * spacing[1], 0.0)
    series_uid = series_uid or (f"{study_uid}.1" if study_uid else generate_uid())
    ds = _series_dataset((rows, cols), spacing, orientation, study_uid or generate_uid(prefix=None),
                         series_uid, image_type, signed, bits_stored, slope, intercept)
    for key, value in (extra or {}).items():
        setattr(ds, key, value)
    folder.parent.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent)) if atomic else folder
    target.mkdir(parents=True, exist_ok=True)
    paths = []
    try:
        for i in tqdm(range(n_slices), desc=f"writing {folder.name}", disable=not progress, leave=False):
            instance = first_instance + (i if head_first_instances else n_slices - 1 - i)
            sop = f"{series_uid}.{instance}" if study_uid else generate_uid()  # both within 64 characters
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = sop
            ds.InstanceNumber = instance
            position = np.asarray(origin, dtype=np.float64) - i * spacing[0] * normal
            ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
            ds.SliceLocation = f"{position[2]:.4f}"
            stored = np.rint((hu[i].astype(np.float64) - intercept) / slope).astype(np.int16 if signed else np.uint16)
            name = names[i] if names is not None else f"{instance}{suffix}"
            _encode(ds, stored, transfer_syntax, target / name, target / ".scratch.tmp")
            paths.append(folder / name)
        (target / ".scratch.tmp").unlink(missing_ok=True)
        if atomic:
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(target, folder)
    finally:
        if atomic and target.exists():
            shutil.rmtree(target)
    return paths
