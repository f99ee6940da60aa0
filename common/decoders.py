"""Read one DICOM slice: a cheap header pass, then pixel decoding straight into HU.

Decoder per transfer syntax, chosen by measurement on 512x512 CT slices, one core
(decoder alone; ``python -m common.bench`` times the whole of ``load_study``):

| syntax                  | used here                         | also measured                  |
| ----------------------- | --------------------------------- | ------------------------------ |
| Explicit / Implicit LE  | own read into the volume          | dicomsdl 3,800/s, pydicom 740/s|
| JPEG Lossless .57 / .70 | imagecodecs (libjpeg-turbo 3)     | dicomsdl 370/s, gdcm 190/s,    |
|                         | 590/s when installed, else dicomsdl | pylibjpeg 93/s               |
| RLE Lossless            | pydicom + pylibjpeg-rle 640/s     | dicomsdl 1,400/s [1], gdcm 80/s|
| JPEG 2000 .90 / .91     | pydicom's gdcm plugin, 60/s on 1.7 cores | dicomsdl, imagecodecs 43/s |

[1] dicomsdl crashed the process on corrupt RLE data in fuzzing.

pydicom handles JPEG 2000 because its gdcm plugin is multithreaded and it repairs
codestreams whose signedness disagrees with Pixel Representation. Anything else, and
any file a fast path rejects, goes to pydicom. Every path yields the stored values
of ``pydicom.dcmread(f).pixel_array`` (unused high bits corrected the same way).

dicomsdl crashes the interpreter on some malformed files (empty, truncated native
pixel data, corrupted lengths, corrupt RLE), so it only parses headers up to the
pixel data, and the fast decoders only see JPEG Lossless frames whose item table and
JPEG header were first checked here against the file size and the DICOM header.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder

try:  # optional fast decoders
    import dicomsdl
except ImportError:  # pragma: no cover - exercised only without dicomsdl
    dicomsdl = None
try:
    import imagecodecs  # libjpeg-turbo >= 3 decodes lossless JPEG, ~1.5x dicomsdl's speed
except ImportError:
    imagecodecs = None

LOG = logging.getLogger(__name__)

NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
JPEG_LOSSLESS_SYNTAXES = {"1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"}
RLE_SYNTAX = "1.2.840.10008.1.2.5"
# pydicom plugins to use, in order, where its default choice is unsafe: gdcm aborts the
# process on some corrupt JPEG Lossless streams and dicomsdl on some corrupt RLE ones,
# whereas pylibjpeg raises (its Rust RLE decoder panics, which is catchable).
_PYDICOM_PLUGINS = {**{uid: ("pylibjpeg",) for uid in JPEG_LOSSLESS_SYNTAXES},
                    RLE_SYNTAX: ("pylibjpeg", "pydicom")}
_PIXEL_DATA_GROUP = 0x7FE00000  # dicomsdl load_until: stop before the pixel data
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
_ITEM_TAG, _SEQ_END_TAG = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"

_HEADER_KEYWORDS = [
    "TransferSyntaxUID", "Modality", "SeriesInstanceUID", "ImageType", "InstanceNumber",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
    "Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation",
    "SamplesPerPixel", "NumberOfFrames", "RescaleSlope", "RescaleIntercept",
]

if dicomsdl is not None:
    # dicomsdl prints parse errors to stderr; they reach the caller as exceptions anyway.
    # (A Python logger callback would hang interpreter shutdown, hence the silencing.)
    dicomsdl.set_loglevel(dicomsdl.LogLevel.DISABLE)


class DicomReadError(ValueError):
    """A DICOM file (or study folder) that cannot be read; the message names it."""

    def __init__(self, path: Any, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


@dataclass(frozen=True)
class SliceHeader:
    """The header fields of one file that study assembly and decoding need."""

    path: str
    transfer_syntax: str
    modality: str
    series_uid: str
    image_type: tuple[str, ...]
    instance_number: int
    position: tuple[float, ...] | None  # ImagePositionPatient (3,)
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (6,)
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing) mm
    slice_thickness: float | None
    rows: int
    cols: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    samples_per_pixel: int
    n_frames: int
    slope: float
    intercept: float
    has_pixels: bool
    pixel_offset: int = -1  # file offset of the PixelData element; -1 when unknown


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def _number(value: Any, default: float) -> float:
    try:
        return default if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return default


def _rescale_slope(path: str, value: Any) -> float:
    """RescaleSlope; 1.0 when absent, and 1.0 with a warning naming the file when it is blank,
    not a number, zero or not finite (a zero slope would make the slice one constant value)."""
    if value is None:
        return 1.0
    slope = _number(value, float("nan"))
    if slope != 0 and np.isfinite(slope):
        return slope
    LOG.warning("%s: RescaleSlope %r is not a usable number; using 1.0", path, value)
    return 1.0


def _header_from_values(path: str, v: dict[str, Any], has_pixels: bool,
                        pixel_offset: int = -1) -> SliceHeader:
    image_type = v["ImageType"]
    if isinstance(image_type, str):
        image_type = image_type.split("\\")
    return SliceHeader(
        path=path,
        transfer_syntax=str(v["TransferSyntaxUID"] or "1.2.840.10008.1.2").strip(),
        modality=str(v["Modality"] or "").strip().upper(),
        series_uid=str(v["SeriesInstanceUID"] or "").strip(),
        image_type=tuple(str(t).strip().upper() for t in (image_type or ())),
        instance_number=int(_number(v["InstanceNumber"], 0)),
        position=_floats(v["ImagePositionPatient"], 3),
        orientation=_floats(v["ImageOrientationPatient"], 6),
        pixel_spacing=_floats(v["PixelSpacing"], 2),  # type: ignore[arg-type]
        slice_thickness=_number(v["SliceThickness"], 0.0) or None,
        rows=int(_number(v["Rows"], 0)),
        cols=int(_number(v["Columns"], 0)),
        bits_allocated=int(_number(v["BitsAllocated"], 16)),
        bits_stored=int(_number(v["BitsStored"], _number(v["BitsAllocated"], 16))),
        pixel_representation=int(_number(v["PixelRepresentation"], 0)),
        samples_per_pixel=int(_number(v["SamplesPerPixel"], 1)),
        n_frames=int(_number(v["NumberOfFrames"], 1)),
        slope=_rescale_slope(path, v["RescaleSlope"]),
        intercept=_number(v["RescaleIntercept"], 0.0),
        has_pixels=has_pixels,
        pixel_offset=pixel_offset,
    )


def _header_dicomsdl(path: str) -> SliceHeader:
    """Parse up to, not into, the pixel data (robust in fuzzing) and locate PixelData."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        if fh.read(132)[128:] != b"DICM":  # includes empty files, which crash dicomsdl
            raise ValueError("no DICM preamble")  # bare data sets are left to pydicom
        ds = dicomsdl.open(path, _PIXEL_DATA_GROUP)
        values = dict(zip(_HEADER_KEYWORDS, ds.getValues(_HEADER_KEYWORDS)))
        end = 0
        for element in ds:  # elements come in tag order: the last one precedes PixelData
            end = element.offset() + element.length()
        if not 0 < end <= size:
            raise ValueError("cannot locate the end of the header")
        fh.seek(end)
        has_pixels = fh.read(4) == _PIXEL_DATA_TAG
    if not has_pixels and end < size:
        raise ValueError("unexpected data after the header (undefined-length element?)")
    return _header_from_values(path, values, has_pixels, end if has_pixels else -1)


def _header_pydicom(path: str) -> SliceHeader:
    try:
        ds = pydicom.dcmread(path, defer_size=256)
    except InvalidDicomError:
        # No "DICM" preamble: accept a bare data set only if it looks like an image.
        ds = pydicom.dcmread(path, defer_size=256, force=True)
        if "SOPClassUID" not in ds and "Rows" not in ds:
            raise
    meta = getattr(ds, "file_meta", None)
    values = {k: ds.get(k) for k in _HEADER_KEYWORDS}
    if values["RescaleSlope"] is None and "RescaleSlope" in ds:
        values["RescaleSlope"] = ""  # present but blank (pydicom reads it as None, like an absent one)
    values["TransferSyntaxUID"] = meta.get("TransferSyntaxUID") if meta is not None else None
    return _header_from_values(path, values, "PixelData" in ds)


def read_header(path: str) -> SliceHeader:
    """Header of one file (dicomsdl when installed, else or on failure pydicom)."""
    errors = []
    readers = ([_header_dicomsdl] if dicomsdl is not None else []) + [_header_pydicom]
    for reader in readers:
        try:
            header = reader(path)
        except Exception as exc:  # any parser failure means "try the next reader"
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        if header.has_pixels and (header.rows <= 0 or header.cols <= 0):
            errors.append("pixel data without valid Rows/Columns (truncated header?)")
            continue
        return header
    raise DicomReadError(path, "not a readable DICOM file (" + "; ".join(errors) + ")")


def correct_unused_bits(stored: np.ndarray, bits_stored: int) -> None:
    """In place: drop bits above BitsStored (sign-extending signed data), as pydicom does."""
    shift = 8 * stored.dtype.itemsize - bits_stored
    if 0 < shift < 8 * stored.dtype.itemsize:
        np.left_shift(stored, shift, out=stored)
        np.right_shift(stored, shift, out=stored)


def rescale_into(stored: np.ndarray, slope: float, intercept: float, out: np.ndarray) -> None:
    """Write HU = stored * slope + intercept into ``out`` (int16), clipped and rounded.

    ``stored`` (rows, cols) may be a view of ``out``'s own buffer (decoded in place).
    """
    if slope == 1.0 and float(intercept).is_integer() and stored.dtype.kind in "iu" \
            and stored.dtype.itemsize <= 2:
        lo, hi = int(stored.min()), int(stored.max())
        shift = int(intercept)
        if -32768 <= lo + shift and hi + shift <= 32767 and hi <= 32767:
            # Integer fast path: no float temporaries; values fit int16 exactly.
            if not np.shares_memory(stored, out):
                np.copyto(out, stored, casting="unsafe")
            if shift:
                out += np.int16(shift)
            return
    hu = stored.astype(np.float64)
    if slope != 1.0:
        hu *= slope
    hu += intercept
    np.rint(hu, out=hu)
    np.clip(hu, -32768, 32767, out=hu)
    np.copyto(out, hu, casting="unsafe")


def _stored_native(header: SliceHeader, out: np.ndarray) -> np.ndarray:
    """Read uncompressed little-endian pixels straight from the file into ``out``."""
    dtype = np.dtype("<i2" if header.pixel_representation else "<u2")
    stored = out.view(dtype)
    with open(header.path, "rb") as fh:
        fh.seek(header.pixel_offset)
        head = fh.read(12)
        if header.transfer_syntax == "1.2.840.10008.1.2":  # implicit VR: tag, length
            length, start = int.from_bytes(head[4:8], "little"), 8
        elif head[4:6] in (b"OW", b"OB"):  # explicit VR: tag, VR, 2 reserved, length
            length, start = int.from_bytes(head[8:12], "little"), 12
        else:
            raise ValueError(f"unexpected PixelData VR {head[4:6]!r}")
        if head[:4] != _PIXEL_DATA_TAG or length < stored.nbytes:
            raise ValueError(f"PixelData holds {length} bytes, {stored.nbytes} expected")
        fh.seek(header.pixel_offset + start)
        n_read = fh.readinto(stored.reshape(-1).view(np.uint8))
    if n_read != stored.nbytes:
        raise ValueError(f"truncated pixel data: {n_read} of {stored.nbytes} bytes")
    return stored


def _first_frame(header: SliceHeader, data: bytes) -> bytes:
    """Concatenated fragments of the single frame, after checking every item length."""
    pos = header.pixel_offset + 12
    if data[header.pixel_offset + 4:pos] != b"OB\x00\x00\xff\xff\xff\xff":
        raise ValueError("encapsulated PixelData lacks its OB / undefined-length header")
    items = []
    while data[pos:pos + 4] != _SEQ_END_TAG:
        length = int.from_bytes(data[pos + 4:pos + 8], "little")
        if data[pos:pos + 4] != _ITEM_TAG or pos + 8 + length > len(data):
            raise ValueError(f"corrupt or truncated pixel data item at byte {pos}")
        items.append(data[pos + 8:pos + 8 + length])
        pos += 8 + length
    if len(items) < 2:
        raise ValueError("encapsulated pixel data holds no fragment")
    return b"".join(items[1:])  # items[0] is the basic offset table


def _check_jpeg_frame(frame: bytes, header: SliceHeader) -> None:
    """The JPEG SOF marker must agree with Rows, Columns and one 2..16-bit component."""
    if frame[:2] != b"\xff\xd8":
        raise ValueError("JPEG stream lacks its SOI marker")
    pos = 2
    while pos + 10 <= len(frame):
        marker = frame[pos + 1]
        if frame[pos] != 0xFF:
            raise ValueError(f"corrupt JPEG marker at byte {pos}")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            precision = frame[pos + 4]
            shape = (int.from_bytes(frame[pos + 5:pos + 7], "big"),
                     int.from_bytes(frame[pos + 7:pos + 9], "big"))
            if shape != (header.rows, header.cols) or frame[pos + 9] != 1 \
                    or not 2 <= precision <= 16:
                raise ValueError(f"JPEG frame {shape}, {frame[pos + 9]} component(s), "
                                 f"{precision} bits disagrees with the header")
            return
        pos += 2 + int.from_bytes(frame[pos + 2:pos + 4], "big")
    raise ValueError("JPEG stream has no start-of-frame marker")


def _validated_jpeg_frame(header: SliceHeader) -> bytes:
    with open(header.path, "rb") as fh:
        frame = _first_frame(header, fh.read())
    _check_jpeg_frame(frame, header)
    return frame


def _stored_imagecodecs(header: SliceHeader, out: np.ndarray) -> np.ndarray:
    """Decode JPEG Lossless with libjpeg-turbo (imagecodecs) straight into ``out``."""
    stored = out.view(np.int16 if header.pixel_representation else np.uint16)
    # Lossless JPEG has no sign: the decoder writes the raw bits, read back as ``stored``.
    imagecodecs.jpeg8_decode(_validated_jpeg_frame(header), out=out.view(np.uint16))
    return stored


def _stored_dicomsdl(header: SliceHeader, out: np.ndarray) -> np.ndarray:
    """Decode JPEG Lossless with dicomsdl, after validating what it will read."""
    _validated_jpeg_frame(header)
    ds = dicomsdl.open(header.path)
    info = ds.getPixelDataInfo()
    dtype = np.dtype(info["dtype"])
    if (info["Rows"], info["Cols"]) != out.shape or dtype.itemsize != 2:
        raise ValueError(f"pixel data {(info['Rows'], info['Cols'])} {dtype} != header")
    stored = out.view(dtype)
    ds.copyFrameData(0, stored)
    return stored


def _pydicom_plugin(transfer_syntax: str) -> str | None:
    """First installed plugin of _PYDICOM_PLUGINS for this syntax; None: pydicom's choice.

    Only one is tried: a stream that makes one decoder fail is corrupt, and another
    decoder might crash on it, or silently return garbage.
    """
    preferred = _PYDICOM_PLUGINS.get(transfer_syntax, ())
    try:
        available = get_decoder(transfer_syntax).available_plugins
    except Exception:  # syntax without a decoder: let pydicom raise its own message
        return None
    return next((p for p in preferred if p in available), None)


def _stored_pydicom(header: SliceHeader) -> np.ndarray:
    ds = pydicom.dcmread(header.path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:  # bare data set without a meta header
        ds.file_meta.TransferSyntaxUID = header.transfer_syntax
    plugin = _pydicom_plugin(header.transfer_syntax)
    if plugin:
        ds.pixel_array_options(decoding_plugin=plugin)
    try:
        return ds.pixel_array
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: B036 - Rust panics derive from BaseException
        raise ValueError(f"{plugin or 'default'} plugin: {type(exc).__name__}: {exc}") from exc


_FAST_READERS = {"native": _stored_native, "imagecodecs": _stored_imagecodecs,
                 "dicomsdl": _stored_dicomsdl}


def fast_path(header: SliceHeader) -> str:
    """Decoder tried first for this slice: 'native', 'imagecodecs', 'dicomsdl' or 'pydicom'."""
    if header.bits_allocated != 16 or header.samples_per_pixel != 1 \
            or header.n_frames != 1 or header.pixel_offset < 0:
        return "pydicom"
    if header.transfer_syntax in NATIVE_SYNTAXES:
        return "native"
    if header.transfer_syntax in JPEG_LOSSLESS_SYNTAXES:
        if imagecodecs is not None and imagecodecs.JPEG8.available:
            return "imagecodecs"
        if dicomsdl is not None:
            return "dicomsdl"
    return "pydicom"


def decode_into(header: SliceHeader, out: np.ndarray, method: str = "auto") -> str:
    """Decode one slice into ``out`` ((rows, cols) int16) as HU; return the decoder used.

    method: "auto" (fastest correct decoder, falling back to pydicom) or "pydicom".
    Raises DicomReadError naming the file if no decoder can read the pixels.
    """
    if method not in ("auto", "pydicom"):
        raise ValueError(f"unknown decoder method {method!r}; use 'auto' or 'pydicom'")
    path = fast_path(header) if method == "auto" else "pydicom"
    if path != "pydicom":
        try:
            stored = _FAST_READERS[path](header, out)
            correct_unused_bits(stored, header.bits_stored)
            rescale_into(stored, header.slope, header.intercept, out)
            return path
        except Exception as exc:  # fall back to the reference decoder below
            LOG.debug("%s: %s reader failed (%s); falling back to pydicom", header.path, path, exc)
    try:
        stored = _stored_pydicom(header)
    except Exception as exc:
        raise DicomReadError(
            header.path, f"pixel data of transfer syntax {header.transfer_syntax} "
            f"cannot be decoded ({type(exc).__name__}: {exc})") from exc
    if stored.shape != out.shape:
        raise DicomReadError(header.path, f"decoded shape {stored.shape} != expected {out.shape}")
    rescale_into(stored, header.slope, header.intercept, out)
    return "pydicom"
