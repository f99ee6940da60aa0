"""JPEG Lossless checks: the stream's structure, then the consistency of the decoded
samples with the stream.

``common.decoders`` calls ``_jpeg_scan`` (structure; raises _CorruptPixelData) before
decoding a frame, and ``_allowed_samples`` (the range check) and ``_check_consumed``
(the bit accounting) after, whichever decoder ran.

Corrupt JPEG Lossless data decodes to garbage with every installed decoder, silently
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
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.dicom_header import SliceHeader, _CorruptPixelData

_ZERO_RUN = bytes(32)
_CHUNK = 1 << 15  # samples per step of the bit accounting (256 KiB of intp indices)


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
