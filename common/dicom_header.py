"""Read one DICOM slice's header: the fields study assembly and decoding need, and where
its pixel data lies, checked against the file before any pixel is decoded.

``read_header`` tries dicomsdl (when installed), which parses up to, not into, the
pixel data (it crashes the interpreter on some malformed files otherwise), then
pydicom; both readers yield the same ``SliceHeader``. Decoding the pixels is
``common.decoders``.

Robustness
----------
* Header quirks are parsed by one function whichever library read the header (both
  hand over the raw text of every DS/IS value): a blank, non-numeric, zero or
  non-finite RescaleSlope becomes 1.0 with a warning naming the file; an unreadable
  RescaleIntercept refuses the slice at decode time; unreadable positions, spacings and
  instance numbers count as absent.
* The pixel data length is checked against Rows x Columns before any volume is
  allocated (native: the element length and the file size; encapsulated: that a first
  fragment exists).
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

try:  # optional fast header reader
    import dicomsdl
except ImportError:  # pragma: no cover - exercised only without dicomsdl
    dicomsdl = None

IMPLICIT_LE = "1.2.840.10008.1.2"
NATIVE_SYNTAXES = {IMPLICIT_LE, "1.2.840.10008.1.2.1"}
_UNCOMPRESSED = NATIVE_SYNTAXES | {"1.2.840.10008.1.2.2"}  # + explicit big endian
_PIXEL_DATA_GROUP = 0x7FE00000  # dicomsdl load_until: stop before the pixel data
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
_ITEM_TAG, _SEQ_END_TAG = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"
_UNDEFINED_LENGTH = 0xFFFFFFFF
_O_RDONLY = os.O_RDONLY | getattr(os, "O_BINARY", 0)

# DS / IS values: both header readers hand over their raw text, parsed by _numbers().
_TEXT_NUMBER_KEYWORDS = [
    "InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
    "SliceThickness", "NumberOfFrames", "RescaleSlope", "RescaleIntercept",
]
_TEXT_NUMBER_TAGS = [0x00200013, 0x00200032, 0x00200037, 0x00280030, 0x00180050, 0x00280008,
                     0x00281053, 0x00281052]  # the same, as tags (faster lookups in dicomsdl)
_OTHER_KEYWORDS = [
    "TransferSyntaxUID", "Modality", "SeriesInstanceUID", "ImageType", "Rows", "Columns",
    "BitsAllocated", "BitsStored", "PixelRepresentation", "SamplesPerPixel",
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


class _CorruptPixelData(ValueError):
    """Pixel data that a decoder would turn into garbage: refuse, never try another."""


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
    intercept: float  # NaN when unreadable: the slice is refused at decode time
    has_pixels: bool
    pixel_offset: int = -1  # file offset of the PixelData *value*; -1 when absent
    pixel_length: int = 0  # its length in bytes; -1 when undefined (encapsulated)
    notes: tuple[str, ...] = ()  # header repairs to report, e.g. an unusable slope


# --- Header values ----------------------------------------------------------------------

def _text(raw: Any) -> str:
    if isinstance(raw, bytes):
        return raw.decode("latin-1")
    if isinstance(raw, (list, tuple)):  # an already converted multi-valued element
        return "\\".join(str(v) for v in raw)
    return str(raw)


def _numbers(raw: Any) -> tuple[float, ...] | None:
    """Values of a DS / IS element: None if absent, () if empty.

    Raises ValueError if any value is not a finite decimal number.
    """
    if raw is None:
        return None
    if isinstance(raw, bytes):  # most values repeat from file to file (IOP, spacing...)
        return _cached_numbers(raw)
    return _parse_numbers(raw)


@functools.lru_cache(maxsize=4096)
def _cached_numbers(raw: bytes) -> tuple[float, ...]:
    return _parse_numbers(raw)


def _parse_numbers(raw: Any) -> tuple[float, ...]:
    text = _text(raw).strip(" \x00")
    if not text:
        return ()
    try:
        values = tuple(map(float, text.split("\\")))  # float() ignores surrounding spaces
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if "_" in text or not all(map(math.isfinite, values)):  # float() takes "1_0", "nan"
        raise ValueError(f"{text!r} is not a finite decimal number")
    return values


def _vector(raw: Any, n: int, positive: bool = False) -> tuple[float, ...] | None:
    """``n`` numbers (all > 0 if ``positive``), or None when absent or unreadable."""
    try:
        values = _numbers(raw)
    except ValueError:
        return None
    if not values or len(values) != n or (positive and min(values) <= 0):
        return None
    return values


def _integer(raw: Any, default: int) -> int:
    values = _vector(raw, 1)
    return int(values[0]) if values and values[0].is_integer() else default


def _slope(raw: Any, notes: list[str]) -> float:
    """RescaleSlope; a present but empty, non-numeric or zero one counts as 1.0 (noted)."""
    if raw is None:
        return 1.0
    values = _vector(raw, 1)
    if values and values[0] != 0:
        return values[0]
    notes.append(f"RescaleSlope {_text(raw).strip()!r} is not a usable number; using 1.0")
    return 1.0


def _intercept(raw: Any, notes: list[str]) -> float:
    """RescaleIntercept, or NaN (with a note) when present but unreadable."""
    if raw is None:
        return 0.0
    values = _vector(raw, 1)
    if values:
        return values[0]
    notes.append(f"RescaleIntercept {_text(raw).strip()!r} is not a number, so HU are unknown")
    return math.nan


def _uint(value: Any, default: int) -> int:
    """A US value; lists (odd lengths), strings and None fall back to ``default``."""
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _string(value: Any) -> str:
    return "" if value is None else str(value).strip(" \x00")


def _header_fields(v: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    """SliceHeader fields (all but path and pixel data) from the two kinds of values."""
    image_type = v["ImageType"]
    if isinstance(image_type, str):
        image_type = image_type.split("\\")
    notes: list[str] = []
    bits_allocated = _uint(v["BitsAllocated"], 16)
    bits_stored = _uint(v["BitsStored"], bits_allocated)
    thickness = _vector(raw["SliceThickness"], 1, positive=True)
    return dict(
        transfer_syntax=_string(v["TransferSyntaxUID"]) or IMPLICIT_LE,
        modality=_string(v["Modality"]).upper(),
        series_uid=_string(v["SeriesInstanceUID"]),
        image_type=tuple(_string(t).upper() for t in (image_type or ())),
        instance_number=_integer(raw["InstanceNumber"], 0),
        position=_vector(raw["ImagePositionPatient"], 3),
        orientation=_vector(raw["ImageOrientationPatient"], 6),
        pixel_spacing=_vector(raw["PixelSpacing"], 2, positive=True),
        slice_thickness=thickness[0] if thickness else None,
        rows=_uint(v["Rows"], 0),
        cols=_uint(v["Columns"], 0),
        bits_allocated=bits_allocated,
        bits_stored=bits_stored if 1 <= bits_stored <= bits_allocated else bits_allocated,
        pixel_representation=_uint(v["PixelRepresentation"], 0),
        samples_per_pixel=_uint(v["SamplesPerPixel"], 1),
        n_frames=max(1, _integer(raw["NumberOfFrames"], 1)),
        slope=_slope(raw["RescaleSlope"], notes),
        intercept=_intercept(raw["RescaleIntercept"], notes),
        notes=tuple(notes),
    )


# --- Locating and checking the pixel data ----------------------------------------------

def _seek_read(fd: int, n: int, offset: int) -> bytes:  # pragma: no cover - no os.pread
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, n)


_pread = getattr(os, "pread", _seek_read)  # reads by offset, whatever a file object's position


def _pixel_element(head: bytes, implicit: bool) -> tuple[int, int]:
    """(element header size, value length) of the PixelData element starting ``head``."""
    if head[:4] != _PIXEL_DATA_TAG:
        raise ValueError("no PixelData element where the header ends")
    if implicit:
        return 8, int.from_bytes(head[4:8], "little")
    if head[4:6] not in (b"OB", b"OW"):
        raise ValueError(f"unexpected PixelData VR {head[4:6]!r}")
    return 12, int.from_bytes(head[8:12], "little")


def _native_bytes(f: dict[str, Any]) -> int:
    bits = f["rows"] * f["cols"] * f["samples_per_pixel"] * f["n_frames"] * f["bits_allocated"]
    return (bits + 7) // 8


def _check_pixel_value(fd: int, path: str, f: dict[str, Any], start: int, length: int,
                       size: int) -> None:
    """Refuse pixel data that cannot hold the image the header declares.

    Runs before any volume is allocated, so that huge Rows/Columns with a few bytes
    of pixels fail here, naming the file, instead of as a MemoryError later.
    """
    if f["rows"] <= 0 or f["cols"] <= 0:
        raise DicomReadError(path, "pixel data without valid Rows/Columns (truncated header?)")
    if f["transfer_syntax"] in _UNCOMPRESSED:
        need = _native_bytes(f)
        if length == _UNDEFINED_LENGTH or length < need:
            raise DicomReadError(path, f"PixelData holds {length} bytes but {f['rows']} x "
                                       f"{f['cols']} x {f['bits_allocated']}-bit needs {need}")
        if start + need > size:
            raise DicomReadError(path, f"truncated pixel data: {size - start} of {need} bytes")
    elif length == _UNDEFINED_LENGTH:
        item = _pread(fd, 8, start)
        table = int.from_bytes(item[4:8], "little")
        first = _pread(fd, 8, start + 8 + table)
        fragment = int.from_bytes(first[4:8], "little")
        if item[:4] != _ITEM_TAG or first[:4] != _ITEM_TAG or fragment == 0 \
                or start + 16 + table + fragment > size:
            raise DicomReadError(path, "encapsulated pixel data holds no complete frame")


def _with_pixels(fd: int, path: str, f: dict[str, Any], offset: int, size: int) -> SliceHeader:
    """The SliceHeader, given the file offset where the PixelData element starts (or -1)."""
    if offset < 0:
        return SliceHeader(path=path, has_pixels=False, **f)
    head_size, length = _pixel_element(_pread(fd, 12, offset),
                                       f["transfer_syntax"] == IMPLICIT_LE)
    _check_pixel_value(fd, path, f, offset + head_size, length, size)
    return SliceHeader(path=path, has_pixels=True, pixel_offset=offset + head_size,
                       pixel_length=-1 if length == _UNDEFINED_LENGTH else length, **f)


def _native_tail(fd: int, f: dict[str, Any], size: int) -> int:
    """Offset of a native PixelData element that ends the file, or -1.

    Nearly every native file ends with its pixel data; checking the one place it must
    start spares walking every header element.
    """
    if f["transfer_syntax"] not in NATIVE_SYNTAXES:
        return -1
    head = 8 if f["transfer_syntax"] == IMPLICIT_LE else 12
    offset = size - _native_bytes(f) - head
    if offset < 132:
        return -1
    try:
        return offset if _pixel_element(_pread(fd, 12, offset), head == 8)[1] \
            == size - offset - head else -1
    except ValueError:
        return -1


# --- The two header readers -------------------------------------------------------------

def _dicomsdl_texts(ds: Any) -> dict[str, bytes | None]:
    """Raw text of each DS / IS keyword (None when absent: an absent element has offset 0)."""
    elements = [ds.getDataElement(tag) for tag in _TEXT_NUMBER_TAGS]
    return {k: e.toBytes() if e.offset() else None for k, e in zip(_TEXT_NUMBER_KEYWORDS, elements)}


def _dicomsdl_header_end(ds: Any, fd: int, size: int) -> int:
    """Offset of the PixelData element (-1 if absent), from the end of the last element."""
    element = None
    for element in ds:  # elements come in tag order: the last one precedes PixelData
        pass
    end = 0 if element is None else element.offset() + element.length()
    if not 0 < end <= size:
        raise ValueError("cannot locate the end of the header")
    if _pread(fd, 4, end) == _PIXEL_DATA_TAG:
        return end
    if end < size:
        raise ValueError("unexpected data after the header (undefined-length element?)")
    return -1


def _header_dicomsdl(path: str) -> SliceHeader:
    """Parse up to, not into, the pixel data (robust in fuzzing) and locate PixelData."""
    fd = os.open(path, _O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if _pread(fd, 4, 128) != b"DICM":  # includes empty files, which crash dicomsdl
            raise ValueError("no DICM preamble")  # bare data sets are left to pydicom
        ds = dicomsdl.open(path, _PIXEL_DATA_GROUP)
        values = dict(zip(_OTHER_KEYWORDS, ds.getValues(_OTHER_KEYWORDS)))
        fields = _header_fields(values, _dicomsdl_texts(ds))
        offset = _native_tail(fd, fields, size)
        if offset < 0:
            offset = _dicomsdl_header_end(ds, fd, size)
        return _with_pixels(fd, path, fields, offset, size)
    finally:
        os.close(fd)


def _pydicom_text(ds: Any, keyword: str) -> Any:
    element = ds.get_item(keyword)
    if element is None:
        return None
    if element.value is None:  # empty, or deferred (longer than defer_size)
        return ds[keyword].value if getattr(element, "length", 0) else b""
    return element.value


def _header_pydicom(path: str) -> SliceHeader:
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        try:
            ds = pydicom.dcmread(fh, defer_size=256, stop_before_pixels=True)
        except InvalidDicomError:
            # No "DICM" preamble: accept a bare data set only if it looks like an image.
            fh.seek(0)
            ds = pydicom.dcmread(fh, defer_size=256, stop_before_pixels=True, force=True)
            if "SOPClassUID" not in ds and "Rows" not in ds:
                raise
        offset = fh.tell()  # dcmread stops at the start of the PixelData element
        has_pixels = fh.read(4) == _PIXEL_DATA_TAG
        meta = getattr(ds, "file_meta", None)
        values = {k: ds.get(k) for k in _OTHER_KEYWORDS}
        values["TransferSyntaxUID"] = meta.get("TransferSyntaxUID") if meta is not None else None
        fields = _header_fields(values, {k: _pydicom_text(ds, k) for k in _TEXT_NUMBER_KEYWORDS})
        return _with_pixels(fh.fileno(), path, fields, offset if has_pixels else -1, size)


def read_header(path: str) -> SliceHeader:
    """Header of one file (dicomsdl when installed, else or on failure pydicom).

    Raises DicomReadError naming the file if neither can read it, or if its pixel
    data cannot hold the image its header declares.
    """
    errors = []
    readers = ([_header_dicomsdl] if dicomsdl is not None else []) + [_header_pydicom]
    for reader in readers:
        try:
            return reader(path)
        except DicomReadError:  # both readers would agree: the file itself is at fault
            raise
        except Exception as exc:  # any parser failure means "try the next reader"
            errors.append(f"{type(exc).__name__}: {exc}")
    raise DicomReadError(path, "not a readable DICOM file (" + "; ".join(errors) + ")")
