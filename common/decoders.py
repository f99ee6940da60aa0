"""Read one DICOM slice: a cheap header pass, then pixel decoding straight into HU.

Decoder per transfer syntax. Rates relative to the fastest installed decoder, each in
a tight loop on one core (``python -m common.bench``: 300 slices of 512 x 512):

| syntax                  | used here                            | measured (fastest = 1)      |
| ----------------------- | ------------------------------------ | --------------------------- |
| Explicit / Implicit LE  | one read straight into the volume    | dicomsdl 1, gdcm 0.05,      |
|                         |                                      | pydicom 0.03-0.06           |
| JPEG Lossless .57 / .70 | imagecodecs (libjpeg-turbo 3), else  | imagecodecs 1, dicomsdl     |
|                         | dicomsdl, each after validation      | 0.6-0.7, gdcm 0.4-0.5,      |
|                         |                                      | pylibjpeg 0.2               |
| RLE Lossless            | imagecodecs ``dicomrle_decode``      | imagecodecs 1, dicomsdl     |
|                         |                                      | 0.7-0.8 (dies on corrupt    |
|                         |                                      | data), pylibjpeg 0.4-0.5,   |
|                         |                                      | gdcm 0.05                   |
| JPEG 2000 .90           | imagecodecs ``jpeg2k_decode``        | all four 0.9-1 (OpenJPEG in |
|                         | (numthreads=1: slices run in threads)| each)                       |
| JPEG 2000 .91           | pydicom (its gdcm plugin)            | may be irreversible: only   |
|                         |                                      | the reference decoder is    |
|                         |                                      | bit-identical to itself     |

Anything else, and any slice a fast path cannot read for a reason other than corrupt
data, goes to pydicom. Every path yields the stored values of
``pydicom.dcmread(f).pixel_array`` (unused high bits and JPEG 2000 signedness
corrected as pydicom does), then HU = stored x slope + intercept, rounded and clipped
to int16. imagecodecs' decoders release the GIL, so slices decode in parallel threads
(``common.dicom.load_study(workers=...)``); dicomsdl and gdcm hold it.

Robustness
----------
* dicomsdl crashes the interpreter on some malformed files (empty, truncated native
  pixel data, corrupted lengths, corrupt RLE), so it only parses headers up to the
  pixel data, and only decodes JPEG Lossless frames whose item table and JPEG header
  were first checked here against the file size and the DICOM header.
* Header quirks are parsed by one function whichever library read the header (both
  hand over the raw text of every DS/IS value): a blank, non-numeric, zero or
  non-finite RescaleSlope becomes 1.0 with a warning naming the file; an unreadable
  RescaleIntercept refuses the slice at decode time; unreadable positions, spacings and
  instance numbers count as absent.
* The pixel data length is checked against Rows x Columns before any volume is
  allocated (native: the element length and the file size; encapsulated: that a first
  fragment exists).
* Corrupt JPEG Lossless data decodes to garbage with every installed decoder, silently
  (libjpeg-turbo only counts a warning). A slice is refused (never handed to another
  decoder) when its entropy-coded segment holds a marker other than a restart, the
  stream lacks its EOI marker, or the decoded samples exceed the stream precision or
  BitsStored (a valid encoder never writes such bits; a desynchronised decoder soon
  does on a full CT slice). Where that range check is blind (16 stored bits), where
  the data holds a zeroed block (32 zero bytes in a row: zero bits often decode to
  flat, in-range values) and on the pydicom path (which masks the samples), the
  decoded samples must also re-encode to exactly the length of the entropy-coded data:
  libjpeg's own "extraneous bytes" / "premature end" condition, recomputed with numpy
  from the samples and the stream's Huffman table (~0.3 ms per 512x512 slice, ~18% of
  its decode, hence not for every slice; not done with restart intervals). Measured
  on three real 512x512 CT slices, 16 or 64 random bytes or a zeroed 4 KiB block
  written mid-stream, 120 trials each: 359 of 360 refused at 12 bits, and at 16. What
  passes: a decoder that fell back in step within the last byte, and a flipped bit
  inside a difference's magnitude bits, which leaves a valid stream no decoder can
  tell from the original.
* Corrupt JPEG 2000 is accepted by every installed decoder: 64 random bytes or one
  flipped bit inside a codestream decode to a wrong image with imagecodecs (OpenJPEG),
  pylibjpeg, gdcm and dicomsdl alike, without an error (fuzzed on 512x512 CT), so such
  damage cannot be detected; only a codestream whose tail is lost (no EOC marker, or tile-part
  lengths that miss it) is refused here before decoding.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder

try:  # optional fast decoders
    import dicomsdl
except ImportError:  # pragma: no cover - exercised only without dicomsdl
    dicomsdl = None
try:
    import imagecodecs
except ImportError:  # pragma: no cover - exercised only without imagecodecs
    imagecodecs = None

LOG = logging.getLogger(__name__)

IMPLICIT_LE = "1.2.840.10008.1.2"
NATIVE_SYNTAXES = {IMPLICIT_LE, "1.2.840.10008.1.2.1"}
JPEG_LOSSLESS_SYNTAXES = {"1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"}
RLE_SYNTAX = "1.2.840.10008.1.2.5"
J2K_LOSSLESS_SYNTAX = "1.2.840.10008.1.2.4.90"
_UNCOMPRESSED = NATIVE_SYNTAXES | {"1.2.840.10008.1.2.2"}  # + explicit big endian
# pydicom plugins to use, in order, where its default choice is unsafe: gdcm aborts the
# process on some corrupt JPEG Lossless streams and dicomsdl on some corrupt RLE ones,
# whereas pylibjpeg raises (its Rust RLE decoder panics, which is catchable).
_PYDICOM_PLUGINS = {**{uid: ("pylibjpeg",) for uid in JPEG_LOSSLESS_SYNTAXES},
                    RLE_SYNTAX: ("pylibjpeg", "pydicom")}
_PIXEL_DATA_GROUP = 0x7FE00000  # dicomsdl load_until: stop before the pixel data
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
_ITEM_TAG, _SEQ_END_TAG = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"
_UNDEFINED_LENGTH = 0xFFFFFFFF
_ZERO_RUN = bytes(32)
_O_RDONLY = os.O_RDONLY | getattr(os, "O_BINARY", 0)
_CHUNK = 1 << 15  # samples per step of the bit accounting (256 KiB of intp indices)

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


# --- From stored values to HU -----------------------------------------------------------

def correct_unused_bits(stored: np.ndarray, bits_stored: int) -> None:
    """In place: drop bits above BitsStored (sign-extending signed data), as pydicom does."""
    shift = 8 * stored.dtype.itemsize - bits_stored
    if 0 < shift < 8 * stored.dtype.itemsize:
        np.left_shift(stored, shift, out=stored)
        np.right_shift(stored, shift, out=stored)


def _bounds(stored: np.ndarray) -> tuple[int, int]:
    """(min, max) of ``stored``; unsigned data only pays for the max."""
    hi = int(stored.max())
    return (0 if stored.dtype.kind == "u" else int(stored.min())), hi


def _wrap_int16(value: int) -> np.int16:
    return np.int16(((value + 32768) & 0xFFFF) - 32768)


def rescale_into(stored: np.ndarray, slope: float, intercept: float, out: np.ndarray,
                 bounds: tuple[int, int] | None = None) -> None:
    """Write HU = stored * slope + intercept into ``out`` (int16), clipped and rounded.

    ``stored`` (rows, cols) may be a view of ``out``'s own buffer (decoded in place);
    ``bounds`` is its (min, max) when already known.
    """
    lo, hi = bounds if bounds is not None else _bounds(stored)
    if slope == 1.0 and float(intercept).is_integer():
        shift = int(intercept)
        if -32768 <= lo + shift and hi + shift <= 32767:
            # Integer fast path: int16 arithmetic wraps, and the result fits, so adding in
            # place is exact even for uint16 values above 32767 seen through ``out``.
            if not np.may_share_memory(stored, out):
                np.copyto(out, stored, casting="unsafe")
            if shift:
                np.add(out, _wrap_int16(shift), out=out)
            return
    hu = stored.astype(np.float64)
    if slope != 1.0:
        hu *= slope
    hu += intercept
    np.rint(hu, out=hu)
    np.clip(hu, -32768, 32767, out=hu)
    np.copyto(out, hu, casting="unsafe")


def _to_hu(stored: np.ndarray, header: SliceHeader, out: np.ndarray,
           allowed: tuple[int, int] | None = None) -> None:
    """Stored values (a view of ``out`` or a separate array) -> HU in ``out``.

    allowed: (min, max) stored values a valid stream can hold; outside -> corrupt.
    """
    lo, hi = _bounds(stored)
    if allowed is not None and (lo < allowed[0] or hi > allowed[1]):
        raise _CorruptPixelData(f"decoded samples span {lo}..{hi}, outside the {allowed[0]}.."
                                f"{allowed[1]} that BitsStored {header.bits_stored} and the "
                                "stream allow (corrupt JPEG data)")
    bits = header.bits_stored
    if stored.dtype.kind == "u" and hi >> bits or stored.dtype.kind == "i" \
            and not -(1 << (bits - 1)) <= lo <= hi < 1 << (bits - 1):
        if not stored.flags.writeable:
            stored = stored.copy()
        correct_unused_bits(stored, bits)
        lo, hi = _bounds(stored)
    rescale_into(stored, header.slope, header.intercept, out, (lo, hi))


# --- Encapsulated frames ----------------------------------------------------------------

def _read_from(path: str, offset: int) -> bytes:
    with open(path, "rb", buffering=0) as fh:
        fh.seek(offset)
        return fh.readall()


def _read_into(path: str, offset: int, out: np.ndarray) -> int:
    """Read ``out.nbytes`` bytes from ``offset`` straight into ``out``; bytes read."""
    if not hasattr(os, "preadv"):  # pragma: no cover - e.g. Windows
        with open(path, "rb", buffering=0) as fh:
            fh.seek(offset)
            return fh.readinto(memoryview(out).cast("B"))
    fd = os.open(path, _O_RDONLY)
    try:
        return os.preadv(fd, [memoryview(out).cast("B")], offset)
    finally:
        os.close(fd)


def _read_frame(header: SliceHeader) -> bytes:
    """Concatenated fragments of the single frame, after checking every item length."""
    data = _read_from(header.path, header.pixel_offset)
    pos, items = 0, []
    while data[pos:pos + 4] != _SEQ_END_TAG:
        length = int.from_bytes(data[pos + 4:pos + 8], "little")
        if data[pos:pos + 4] != _ITEM_TAG or pos + 8 + length > len(data):
            raise _CorruptPixelData(f"corrupt or truncated pixel data item at byte "
                                    f"{header.pixel_offset + pos}")
        items.append((pos + 8, pos + 8 + length))
        pos += 8 + length
    if len(items) < 2:
        raise _CorruptPixelData("encapsulated pixel data holds no fragment")
    fragments = items[1:]  # items[0] is the basic offset table
    if len(fragments) == 1:
        return data[fragments[0][0]:fragments[0][1]]
    return b"".join(data[a:b] for a, b in fragments)


# --- JPEG Lossless: structure, then consistency of the decoded samples with the stream --

@dataclass(frozen=True)
class _JpegScan:
    """What the checks need from a JPEG stream; ``lossless`` False for non-SOF3 frames."""

    lossless: bool
    precision: int = 16
    predictor: int = 1
    point_transform: int = 0
    restart_interval: int = 0
    dc_table: bytes = b""  # DHT counts (16) + symbols of the scan's table
    data_bytes: int = 0  # entropy-coded bytes once stuffing and restart markers are removed
    last_byte: int = 0xFF
    zero_run: bool = False  # 32 zero bytes in a row: a zeroed block, or a constant region


def _jpeg_segments(frame: bytes, header: SliceHeader) -> tuple[dict[str, Any], int]:
    """Walk the marker segments up to the scan: (parsed fields, start of the scan data)."""
    if frame[:2] != b"\xff\xd8":
        raise _CorruptPixelData("JPEG stream lacks its SOI marker")
    pos, n, found = 2, len(frame), {"tables": {}, "dri": 0}
    while True:
        if pos + 4 > n or frame[pos] != 0xFF:
            raise _CorruptPixelData(f"corrupt JPEG marker at byte {pos}")
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        end = pos + 2 + int.from_bytes(frame[pos + 2:pos + 4], "big")
        if end > n or end < pos + 4:
            raise _CorruptPixelData(f"JPEG segment at byte {pos} runs past the stream")
        body = frame[pos + 4:end]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            _check_sof(body, header)
            found["sof"] = (marker, body[0])
        elif marker == 0xC4:
            _read_dht(body, found["tables"])
        elif marker == 0xDD and len(body) >= 2:
            found["dri"] = int.from_bytes(body[:2], "big")
        elif marker == 0xDA:
            found["sos"] = body
            return found, end
        pos = end


def _check_sof(body: bytes, header: SliceHeader) -> None:
    """The start-of-frame must agree with Rows, Columns and one 2..16-bit component."""
    if len(body) < 6:
        raise _CorruptPixelData("truncated JPEG start-of-frame")
    precision, shape = body[0], (int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big"))
    if shape != (header.rows, header.cols) or body[5] != 1 or not 2 <= precision <= 16:
        raise _CorruptPixelData(f"JPEG frame {shape}, {body[5]} component(s), {precision} bits "
                                "disagrees with the header")


def _read_dht(body: bytes, tables: dict[int, bytes]) -> None:
    pos = 0
    while pos + 17 <= len(body):
        n_symbols = sum(body[pos + 1:pos + 17])
        tables[body[pos]] = body[pos + 1:pos + 17 + n_symbols]
        pos += 17 + n_symbols


def _scan_data(frame: bytes, start: int, restarts: bool) -> tuple[int, int, bool]:
    """(entropy-coded data bytes, last data byte, holds 32 zero bytes in a row) of the
    scan from ``start`` to the EOI.

    Raises _CorruptPixelData if the EOI is missing or a marker other than a restart
    (when restart intervals are on) sits inside the entropy-coded data.
    """
    end = len(frame)
    while end > start and frame[end - 1] == 0:  # the fragment's even-length padding
        end -= 1
    if end - start < 2 or frame[end - 2:end] != b"\xff\xd9":
        raise _CorruptPixelData("JPEG stream does not end with its EOI marker "
                                "(truncated or overwritten)")
    end -= 2
    while end > start and frame[end - 1] == 0xFF:  # fill bytes before the EOI
        end -= 1
    data = np.frombuffer(frame, np.uint8, count=end - start, offset=start)
    after_ff = data[np.flatnonzero(data == 0xFF) + 1]  # the last byte is not 0xFF
    stuffed = int(np.count_nonzero(after_ff == 0))
    rst = int(np.count_nonzero((after_ff >= 0xD0) & (after_ff <= 0xD7))) if restarts else 0
    if stuffed + rst != len(after_ff):
        raise _CorruptPixelData(f"{len(after_ff) - stuffed - rst} marker(s) inside the JPEG "
                                "entropy-coded data")
    last = 0xFF if len(data) >= 2 and data[-1] == 0 and data[-2] == 0xFF \
        else int(data[-1]) if len(data) else 0xFF
    return len(data) - stuffed - 2 * rst, last, frame.find(_ZERO_RUN, start, end) >= 0


def _jpeg_scan(frame: bytes, header: SliceHeader) -> _JpegScan:
    """Check the structure of a JPEG Lossless stream; raises _CorruptPixelData."""
    found, start = _jpeg_segments(frame, header)
    sof = found.get("sof")
    if sof is None:
        raise _CorruptPixelData("JPEG stream has no start-of-frame marker")
    if sof[0] != 0xC3:  # not Huffman lossless: decoded as before, without the scan checks
        return _JpegScan(lossless=False)
    sos = found["sos"]
    if len(sos) < 6 or sos[0] != 1:
        raise _CorruptPixelData("JPEG scan header is not one component's")
    table = found["tables"].get(sos[2] >> 4)  # DC table class 0, id Td
    if table is None:
        raise _CorruptPixelData("JPEG scan uses an undefined Huffman table")
    if not 1 <= sos[3] <= 7:
        raise _CorruptPixelData(f"JPEG lossless predictor {sos[3]} is invalid")
    data_bytes, last, zero_run = _scan_data(frame, start, found["dri"] > 0)
    return _JpegScan(lossless=True, precision=sof[1], predictor=sos[3],
                     point_transform=sos[5] & 0x0F, restart_interval=found["dri"],
                     dc_table=table, data_bytes=data_bytes, last_byte=last, zero_run=zero_run)


@functools.lru_cache(maxsize=1)
def _difference_categories() -> np.ndarray:
    """SSSS (bit length of |difference|) of each difference modulo 2**16: (65536,) uint8."""
    u = np.arange(65536)
    magnitude = np.minimum(u, 65536 - u)  # 32768 has category 16 (no extra bits)
    return np.frexp(magnitude.astype(np.float64))[1].astype(np.uint8)


_BITS_TABLES: dict[bytes, np.ndarray] = {}


def _bits_table(dc_table: bytes) -> np.ndarray:
    """Bits the encoder spends on each difference modulo 2**16: (65536,) uint8.

    Code length of its category plus that many extra bits (none for category 16);
    categories the table lacks cost 255, so that a stream using them never balances.
    """
    table = _BITS_TABLES.get(dc_table)
    if table is None:
        lengths = np.full(17, 255, np.int64)
        symbols, k = dc_table[16:], 0
        for length, count in enumerate(dc_table[:16], start=1):
            for symbol in symbols[k:k + count]:
                if symbol <= 16:
                    lengths[symbol] = min(lengths[symbol], length)
            k += count
        cost = np.minimum(lengths + np.where(np.arange(17) < 16, np.arange(17), 0), 255)
        table = cost.astype(np.uint8)[_difference_categories()]
        if len(_BITS_TABLES) > 64:  # many studies, many tables: keep the cache small
            _BITS_TABLES.clear()
        _BITS_TABLES[dc_table] = table
    return table


def _residuals(samples: np.ndarray, scan: _JpegScan) -> np.ndarray:
    """Differences modulo 2**16 the encoder coded, from the decoded (rows, cols) samples."""
    x = samples >> scan.point_transform if scan.point_transform else samples
    d = np.empty_like(x)
    initial = 1 << (scan.precision - scan.point_transform - 1)
    d[0, 0] = (int(x[0, 0]) - initial) & 0xFFFF
    np.subtract(x[0, 1:], x[0, :-1], out=d[0, 1:])  # first row: the left neighbour
    np.subtract(x[1:, 0], x[:-1, 0], out=d[1:, 0])  # first column: the sample above
    left, above, corner = x[1:, :-1], x[:-1, 1:], x[:-1, :-1]
    if scan.predictor in (1, 2, 3):
        np.subtract(x[1:, 1:], (left, above, corner)[scan.predictor - 1], out=d[1:, 1:])
        return d
    a, b, c = (v.astype(np.int32) for v in (left, above, corner))
    prediction = {4: a + b - c, 5: a + ((b - c) >> 1), 6: b + ((a - c) >> 1),
                  7: (a + b) >> 1}[scan.predictor]
    d[1:, 1:] = (x[1:, 1:] - prediction) & 0xFFFF
    return d


def _stream_balances(samples: np.ndarray, scan: _JpegScan) -> bool:
    """Do the decoded samples re-encode to exactly the entropy-coded data (1-padded)?"""
    table, residuals = _bits_table(scan.dc_table), _residuals(samples, scan).reshape(-1)
    # In chunks: take() makes an intp copy of its indices (8 bytes each), kept small here.
    bits = sum(int(np.take(table, residuals[k:k + _CHUNK], mode="clip").sum(dtype=np.uint32))
               for k in range(0, residuals.size, _CHUNK))
    pad = 8 * scan.data_bytes - bits
    return 0 <= pad < 8 and scan.last_byte & ((1 << pad) - 1) == (1 << pad) - 1


def _check_consumed(raw_forms: list[np.ndarray], scan: _JpegScan) -> None:
    """Refuse the slice unless one reading of the samples balances the stream.

    Streams with restart intervals are not checked (each interval would need its own
    count); neither are non-lossless frames.
    """
    if not scan.lossless or scan.restart_interval:
        return
    if not any(_stream_balances(raw, scan) for raw in raw_forms):
        raise _CorruptPixelData("decoded samples do not account for the JPEG entropy-coded "
                                "data (extraneous bytes or premature end: corrupt stream)")


def _allowed_samples(header: SliceHeader, scan: _JpegScan) -> tuple[int, int] | None:
    """Stored values a valid lossless stream can decode to (None: no check possible).

    Samples have at most ``precision`` bits, and the encoder got them from pixels of
    BitsStored bits (signed ones either sign-extended or not).
    """
    if not scan.lossless:
        return None
    bits = min(header.bits_stored, scan.precision)
    if header.pixel_representation:
        return (-(1 << (bits - 1)) if scan.precision == 16 else 0), min((1 << bits) - 1, 32767)
    return 0, (1 << bits) - 1


def _decode_jpeg_lossless(header: SliceHeader, out: np.ndarray,
                          decode: Callable[[bytes, np.ndarray], None]) -> None:
    """Validate, decode with ``decode(frame, raw_out)``, check, and write HU into ``out``."""
    frame = _read_frame(header)
    scan = _jpeg_scan(frame, header)
    raw = out.view(np.uint16)  # lossless JPEG has no sign: the decoder writes raw bits
    decode(frame, raw)
    # The range check in _to_hu catches desynchronised garbage, except where it is blind
    # (16 stored bits) and in zeroed blocks (zero bits often decode to flat, valid data).
    if min(header.bits_stored, scan.precision) >= 16 or scan.zero_run:
        _check_consumed([raw], scan)
    stored = out.view(np.int16 if header.pixel_representation else np.uint16)
    _to_hu(stored, header, out, _allowed_samples(header, scan))


def _imagecodecs_jpeg(frame: bytes, raw: np.ndarray) -> None:
    imagecodecs.jpeg8_decode(frame, out=raw)


def _dicomsdl_jpeg(header: SliceHeader) -> Callable[[bytes, np.ndarray], None]:
    def decode(frame: bytes, raw: np.ndarray) -> None:  # dicomsdl reads the file itself
        ds = dicomsdl.open(header.path)
        info = ds.getPixelDataInfo()
        dtype = np.dtype(info["dtype"])
        if (info["Rows"], info["Cols"]) != raw.shape or dtype.itemsize != 2:
            raise ValueError(f"pixel data {(info['Rows'], info['Cols'])} {dtype} != header")
        ds.copyFrameData(0, raw.view(dtype))
    return decode


# --- RLE and JPEG 2000 ------------------------------------------------------------------

def _decode_rle(header: SliceHeader, out: np.ndarray) -> None:
    frame = _read_frame(header)
    offsets = np.frombuffer(frame[:64], "<u4") if len(frame) >= 64 else np.zeros(16, "<u4")
    n = int(offsets[0])
    if n != 2 or offsets[1] != 64 or not 64 < offsets[2] < len(frame):
        raise _CorruptPixelData(f"RLE header declares {n} segment(s) at {offsets[1:3].tolist()}; "
                                "16-bit greyscale needs 2 inside the frame")
    try:
        decoded = imagecodecs.dicomrle_decode(frame, dtype="<u2", out=memoryview(out).cast("B"))
    except Exception as exc:  # imagecodecs raises on overflowing or undecodable segments
        raise _CorruptPixelData(f"corrupt RLE data ({type(exc).__name__}: {exc})") from exc
    if len(decoded) != out.nbytes:
        raise _CorruptPixelData(f"RLE segments decode to {len(decoded)} of {out.nbytes} bytes")
    _to_hu(out.view(np.int16 if header.pixel_representation else np.uint16), header, out)


def _j2k_siz(frame: bytes, header: SliceHeader) -> tuple[bool, int]:
    """(signed, precision) of a bare J2K codestream of one component the header's size."""
    if frame[:4] != b"\xff\x4f\xff\x51" or len(frame) < 45:
        raise ValueError("not a bare J2K codestream (JP2 wrapper?)")
    x, y, x0, y0 = (int.from_bytes(frame[k:k + 4], "big") for k in (8, 12, 16, 20))
    components, ssiz = int.from_bytes(frame[40:42], "big"), frame[42]
    precision = (ssiz & 0x7F) + 1
    if (y - y0, x - x0) != (header.rows, header.cols) or components != 1 \
            or not 9 <= precision <= 16:
        raise ValueError(f"J2K codestream {y - y0}x{x - x0}, {components} component(s), "
                         f"{precision} bits does not fit the header")
    return bool(ssiz & 0x80), precision


def _check_j2k_tile_parts(frame: bytes) -> None:
    """Refuse a codestream whose tile-part lengths do not lead exactly to its EOC marker.

    This is what gdcm checks (it raises where OpenJPEG decodes a cut stream to garbage).
    """
    end = len(frame)
    while end > 2 and frame[end - 1] == 0:  # the fragment's even-length padding
        end -= 1
    if frame[end - 2:end] != b"\xff\xd9":
        raise _CorruptPixelData("JPEG 2000 codestream does not end with its EOC marker "
                                "(truncated or overwritten)")
    eoc, pos = end - 2, 2
    while frame[pos:pos + 2] != b"\xff\x90":  # main header segments, up to the first SOT
        if pos + 4 > eoc or frame[pos] != 0xFF:
            raise _CorruptPixelData(f"corrupt JPEG 2000 main header at byte {pos}")
        pos += 2 + int.from_bytes(frame[pos + 2:pos + 4], "big")
    while pos < eoc:
        if frame[pos:pos + 2] != b"\xff\x90":
            raise _CorruptPixelData(f"no JPEG 2000 tile-part where the previous one ends ({pos})")
        length = int.from_bytes(frame[pos + 6:pos + 10], "big")
        pos = eoc if length == 0 else pos + length  # 0: the last tile-part, up to the EOC
    if pos != eoc:
        raise _CorruptPixelData(f"JPEG 2000 tile-parts end at byte {pos}, the EOC is at {eoc}")


def _decode_j2k(header: SliceHeader, out: np.ndarray) -> None:
    frame = _read_frame(header)
    signed, precision = _j2k_siz(frame, header)
    _check_j2k_tile_parts(frame)
    imagecodecs.jpeg2k_decode(frame, out=out.view(np.int16 if signed else np.uint16),
                              numthreads=1)  # slices, not code blocks, run in parallel
    stored = out.view(np.int16 if header.pixel_representation else np.uint16)
    if signed != bool(header.pixel_representation) and precision < 16:
        # pydicom's repair for codestreams whose signedness disagrees with the header
        np.left_shift(stored, 16 - precision, out=stored)
        np.right_shift(stored, 16 - precision, out=stored)
    _to_hu(stored, header, out)


def _decode_native(header: SliceHeader, out: np.ndarray) -> None:
    stored = out.view(np.int16 if header.pixel_representation else np.uint16)
    n_read = _read_into(header.path, header.pixel_offset, stored)
    if n_read != stored.nbytes:
        raise ValueError(f"truncated pixel data: {n_read} of {stored.nbytes} bytes")
    _to_hu(stored, header, out)


# --- pydicom, the reference and fallback ------------------------------------------------

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


def _decode_pydicom(header: SliceHeader, out: np.ndarray) -> None:
    """pydicom's decode, with the JPEG Lossless checks that its decoders lack."""
    scan = None
    if header.transfer_syntax in JPEG_LOSSLESS_SYNTAXES and header.pixel_offset >= 0:
        try:
            scan = _jpeg_scan(_read_frame(header), header)
        except _CorruptPixelData:
            raise
        except Exception as exc:  # e.g. the file vanished: name it, do not crash the study
            raise DicomReadError(header.path, f"cannot check its JPEG stream "
                                              f"({type(exc).__name__}: {exc})") from exc
    try:
        stored = _stored_pydicom(header)
    except Exception as exc:
        raise DicomReadError(
            header.path, f"pixel data of transfer syntax {header.transfer_syntax} "
            f"cannot be decoded ({type(exc).__name__}: {exc})") from exc
    if stored.shape != out.shape:
        raise DicomReadError(header.path, f"decoded shape {stored.shape} != expected {out.shape}")
    if scan is not None and stored.dtype.itemsize == 2:
        # pydicom already dropped bits above BitsStored (and sign-extended signed data):
        # the stream may have held the samples either way.
        raw = stored.view(np.uint16)
        forms = [raw, raw & ((1 << header.bits_stored) - 1)] if header.bits_stored < 16 else [raw]
        _check_consumed(forms, scan)
    _to_hu(stored, header, out)


# --- Dispatch ---------------------------------------------------------------------------

def _decode_imagecodecs(header: SliceHeader, out: np.ndarray) -> None:
    if header.transfer_syntax == RLE_SYNTAX:
        _decode_rle(header, out)
    elif header.transfer_syntax == J2K_LOSSLESS_SYNTAX:
        _decode_j2k(header, out)
    else:
        _decode_jpeg_lossless(header, out, _imagecodecs_jpeg)


_FAST_DECODERS: dict[str, Callable[[SliceHeader, np.ndarray], None]] = {
    "native": _decode_native,
    "imagecodecs": _decode_imagecodecs,
    "dicomsdl": lambda h, out: _decode_jpeg_lossless(h, out, _dicomsdl_jpeg(h)),
}


def _imagecodecs_has(codec: str) -> bool:
    return imagecodecs is not None \
        and getattr(getattr(imagecodecs, codec, None), "available", False)


def fast_path(header: SliceHeader) -> str:
    """Decoder tried first for this slice: 'native', 'imagecodecs', 'dicomsdl' or 'pydicom'."""
    if header.bits_allocated != 16 or header.samples_per_pixel != 1 \
            or header.n_frames != 1 or header.pixel_offset < 0:
        return "pydicom"
    syntax = header.transfer_syntax
    if syntax in NATIVE_SYNTAXES:
        return "native"
    if syntax in JPEG_LOSSLESS_SYNTAXES:
        if _imagecodecs_has("JPEG8"):
            return "imagecodecs"
        return "dicomsdl" if dicomsdl is not None else "pydicom"
    if syntax == RLE_SYNTAX and _imagecodecs_has("DICOMRLE") \
            or syntax == J2K_LOSSLESS_SYNTAX and _imagecodecs_has("JPEG2K"):
        return "imagecodecs"
    return "pydicom"


def decode_into(header: SliceHeader, out: np.ndarray, method: str = "auto") -> str:
    """Decode one slice into ``out`` ((rows, cols) int16) as HU; return the decoder used.

    method: "auto" (fastest correct decoder, falling back to pydicom) or "pydicom".
    Raises DicomReadError naming the file if no decoder can read the pixels, if they
    are corrupt (no other decoder is tried then) or if its RescaleIntercept is unreadable.
    Thread-safe: slices of one volume may be decoded concurrently.
    """
    if method not in ("auto", "pydicom"):
        raise ValueError(f"unknown decoder method {method!r}; use 'auto' or 'pydicom'")
    if not math.isfinite(header.intercept):
        raise DicomReadError(header.path, "; ".join(header.notes))
    path = fast_path(header) if method == "auto" else "pydicom"
    try:
        if path != "pydicom":
            try:
                _FAST_DECODERS[path](header, out)
                return path
            except _CorruptPixelData:
                raise
            except Exception as exc:  # fall back to the reference decoder below
                LOG.debug("%s: %s decoder failed (%s); falling back to pydicom",
                          header.path, path, exc)
        _decode_pydicom(header, out)
    except _CorruptPixelData as exc:
        raise DicomReadError(header.path, str(exc)) from exc
    return "pydicom"
