"""Decode one DICOM slice's pixel data straight into HU, after a cheap header pass
(``common.dicom_header``).

Decoder per transfer syntax. Rates relative to the fastest installed decoder, each in
a tight loop on one core (``python -m tooling.bench.decode``: 300 slices of 512 x 512):

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
  were first checked (``common.jpeg_lossless``) against the file size and the DICOM
  header.
* Header quirks and pixel data too short for the image: see ``common.dicom_header``.
* Corrupt JPEG Lossless data, which every installed decoder turns into garbage
  silently: see ``common.jpeg_lossless`` for the checks and what they catch.
* Corrupt JPEG 2000 is accepted by every installed decoder: 64 random bytes or one
  flipped bit inside a codestream decode to a wrong image with imagecodecs (OpenJPEG),
  pylibjpeg, gdcm and dicomsdl alike, without an error (fuzzed on 512x512 CT), so such
  damage cannot be detected; only a codestream whose tail is lost (no EOC marker, or tile-part
  lengths that miss it) is refused here before decoding.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Callable

import numpy as np
import pydicom
from pydicom.pixels import get_decoder

from common.dicom_header import (NATIVE_SYNTAXES, _ITEM_TAG, _O_RDONLY, _SEQ_END_TAG,
                                 _CorruptPixelData)
# Public API, re-exported: code that imports them from common.decoders keeps working.
from common.dicom_header import DicomReadError, SliceHeader, read_header  # noqa: F401
from common.jpeg_lossless import _allowed_samples, _check_consumed, _jpeg_scan

try:  # optional fast decoders
    import dicomsdl
except ImportError:  # pragma: no cover - exercised only without dicomsdl
    dicomsdl = None
try:
    import imagecodecs
except ImportError:  # pragma: no cover - exercised only without imagecodecs
    imagecodecs = None

LOG = logging.getLogger(__name__)

JPEG_LOSSLESS_SYNTAXES = {"1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"}
RLE_SYNTAX = "1.2.840.10008.1.2.5"
J2K_LOSSLESS_SYNTAX = "1.2.840.10008.1.2.4.90"
# pydicom plugins to use, in order, where its default choice is unsafe: gdcm aborts the
# process on some corrupt JPEG Lossless streams and dicomsdl on some corrupt RLE ones,
# whereas pylibjpeg raises (its Rust RLE decoder panics, which is catchable).
_PYDICOM_PLUGINS = {**{uid: ("pylibjpeg",) for uid in JPEG_LOSSLESS_SYNTAXES},
                    RLE_SYNTAX: ("pylibjpeg", "pydicom")}


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


# --- JPEG Lossless decoding (its checks: common.jpeg_lossless) --------------------------

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
