"""Load one CT study (a folder of single-frame DICOM slices) as an int16 HU volume.

Slices are ordered by ImagePositionPatient projected on the slice normal, never by
file name or InstanceNumber, and always come out head to feet (decreasing patient
z; DICOM LPS has +z superior), whatever order the scanner numbered them in.

Threads: headers are read in one thread (their parsers hold the GIL); slices are then
decoded straight into the preallocated volume by ``workers`` threads (imagecodecs and
numpy release the GIL), so peak memory stays about one volume. The default,
``default_workers()``, is the number of CPUs this process may use (its affinity mask
and cgroup CPU quota), capped by the environment variables DICOM_DECODE_WORKERS and
OMP_NUM_THREADS, and 1 inside a torch DataLoader worker. Where studies are already
processed in parallel, keep the two levels from oversubscribing the machine:

* process pools: set ``DICOM_DECODE_WORKERS=1`` in the pool's initializer (as
  ``stage2_cls.crop._init_worker`` does), or pass ``workers=1``;
* torch DataLoader workers need nothing (detected); other thread pools over studies
  should pass ``workers=1``, or cores // their own thread count.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.decoders import decode_into
from common.dicom_header import DicomReadError, SliceHeader, read_header

__all__ = ["Study", "DicomReadError", "load_study", "default_workers", "DECODE_WORKERS_ENV",
           "MAX_SLICE_SIDE", "MAX_STUDY_VOXELS"]

LOG = logging.getLogger(__name__)

DECODE_WORKERS_ENV = "DICOM_DECODE_WORKERS"  # caps default_workers(); "1" in pool workers
# A study larger than this is refused before its volume is allocated (16 GiB of int16).
MAX_SLICE_SIDE = 2048  # Rows and Columns
MAX_STUDY_VOXELS = 2000 * 2048 * 2048
# cgroup CPU quota files (v2, then v1 quota and period)
_CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1 = (Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"),
              Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us"))

# Files that are certainly not slices; anything else must parse as DICOM.
_SKIP_SUFFIXES = {
    ".txt", ".json", ".csv", ".md", ".xml", ".html", ".pdf", ".log", ".ini", ".db",
    ".nii", ".gz", ".npz", ".npy", ".png", ".jpg", ".jpeg", ".zip", ".yaml", ".yml",
}
_SKIP_NAMES = {"DICOMDIR", "Thumbs.db", "desktop.ini"}
_ORIENTATION_TOL = 1e-3  # IOP direction cosines differing by more: another series
_DUPLICATE_TOL_MM = 1e-2  # slices closer than this along the normal: same position
_AXIAL_MIN_NZ = 0.7  # |normal z| above this (tilt under ~45 degrees) counts as axial


@dataclass
class Study:
    """One CT study, all arrays in the same slice order (head to feet).

    hu: (slices, rows, cols) int16 Hounsfield units.
    spacing: (z, y, x) mm; z is the median distance between slice planes.
    z_positions: (slices,) float64, ImagePositionPatient projected on ``normal``
        (oriented towards the head), hence strictly decreasing.
    instance_numbers: (slices,) int64. files: (slices,) paths.
    orientation: (6,) ImageOrientationPatient; normal: (3,) unit slice normal with
        non-negative patient-z component; origin: (3,) IPP of the first (top) slice;
        positions: (slices, 3) IPP of every slice.
    dropped: "path: reason" for every file left out of the volume.
    decoders: how many slices each decoder read (e.g. {"native": 300}).
    """

    uid: str
    hu: np.ndarray
    spacing: tuple[float, float, float]
    z_positions: np.ndarray
    instance_numbers: np.ndarray
    files: list[str]
    orientation: np.ndarray
    normal: np.ndarray
    origin: np.ndarray
    positions: np.ndarray
    series_uid: str = ""
    dropped: list[str] = field(default_factory=list)
    decoders: dict[str, int] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]


def _env_limit(name: str) -> int | None:
    try:
        value = int(os.environ.get(name, ""))
    except ValueError:
        return None
    return value if value >= 1 else None


def _cgroup_cpus() -> int | None:
    """CPUs the cgroup quota allows (rounded up), or None without a quota."""
    try:
        if _CGROUP_V2.is_file():
            quota, period = _CGROUP_V2.read_text().split()[:2]
        else:
            quota, period = (p.read_text().strip() for p in _CGROUP_V1)
        if quota == "max" or int(quota) <= 0:
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def _in_torch_worker() -> bool:
    data = sys.modules.get("torch.utils.data")  # never imports torch itself
    return data is not None and data.get_worker_info() is not None


def default_workers() -> int:
    """Threads ``load_study`` decodes with when not told: see the module docstring.

    min(CPUs in this process's affinity mask, the cgroup CPU quota,
    $DICOM_DECODE_WORKERS, $OMP_NUM_THREADS), 1 in a torch DataLoader worker; >= 1.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - platforms without affinity masks
        n = os.cpu_count() or 1
    for limit in (_cgroup_cpus(), _env_limit(DECODE_WORKERS_ENV), _env_limit("OMP_NUM_THREADS")):
        if limit is not None:
            n = min(n, limit)
    return 1 if _in_torch_worker() else max(1, n)


def _list_candidate_files(folder: Path) -> list[str]:
    if not folder.exists():
        raise FileNotFoundError(f"study folder not found: {folder}")
    if not folder.is_dir():
        raise NotADirectoryError(f"study path is not a folder: {folder}")
    files = [
        entry.path for entry in os.scandir(folder)
        if entry.is_file() and not entry.name.startswith(".")
        and entry.name not in _SKIP_NAMES
        and Path(entry.name).suffix.lower() not in _SKIP_SUFFIXES
    ]
    if not files:
        raise DicomReadError(folder, "no DICOM files in the study folder")
    return sorted(files)


def _read_headers(files: list[str], tolerant: bool, dropped: list[str]) -> list[SliceHeader]:
    headers = []
    for path in files:
        try:
            headers.append(read_header(path))
        except DicomReadError as exc:
            if not tolerant:
                raise
            LOG.warning("skipping unreadable file %s", exc)
            dropped.append(f"{path}: {exc.problem}")
    return headers


def _unit_normal(orientation: tuple[float, ...]) -> np.ndarray:
    """Slice normal (row x column cosines) flipped, if needed, to point to the head."""
    iop = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(normal)
    normal = normal / norm if norm > 0 else np.array([0.0, 0.0, 1.0])
    return -normal if normal[2] < 0 else normal


def _not_a_ct_slice(h: SliceHeader) -> str | None:
    """Why this file is not a slice of a CT volume, or None if it is one."""
    if not h.has_pixels:
        return "no pixel data"
    if h.modality not in ("CT", ""):
        return f"modality {h.modality}, not CT"
    if "LOCALIZER" in h.image_type:
        return "localizer / scout image"
    if h.samples_per_pixel != 1:
        return f"{h.samples_per_pixel} samples per pixel, not a greyscale slice"
    if h.n_frames > 1:
        return f"multi-frame image ({h.n_frames} frames) is not supported"
    if h.position is None or h.orientation is None:
        return "no ImagePositionPatient / ImageOrientationPatient"
    return None


def _group_series(images: list[SliceHeader]) -> list[list[SliceHeader]]:
    """Split into groups sharing series UID, pixel shape and orientation."""
    groups: dict[tuple, list[list[SliceHeader]]] = defaultdict(list)
    for h in images:
        candidates = groups[(h.series_uid, h.rows, h.cols)]
        for group in candidates:
            if np.abs(np.subtract(group[0].orientation, h.orientation)).max() < _ORIENTATION_TOL:
                group.append(h)
                break
        else:
            candidates.append([h])
    return [g for gs in groups.values() for g in gs]


def _describe(group: list[SliceHeader]) -> str:
    h = group[0]
    iop = ",".join(f"{v:g}" for v in h.orientation or ())
    return (f"series {h.series_uid or '?'} ({len(group)} files, {h.rows}x{h.cols}, "
            f"IOP {iop})")


def _select_series(headers: list[SliceHeader], folder: Path,
                   dropped: list[str]) -> list[SliceHeader]:
    """Keep the axial CT series with the most slices; record every other file."""
    reasons: dict[str, list[str]] = defaultdict(list)
    images = []
    for h in headers:
        reason = _not_a_ct_slice(h)
        if reason:
            reasons[reason].append(h.path)
        else:
            images.append(h)
    if not images:
        _log_dropped(reasons, dropped)
        raise DicomReadError(folder, "no CT image slices in the study folder")
    groups = _group_series(images)
    best = max(groups, key=lambda g: (abs(_unit_normal(g[0].orientation)[2]) >= _AXIAL_MIN_NZ,
                                      len(g)))
    for group in groups:
        if group is not best:
            reasons[f"other {_describe(group)}; kept {_describe(best)}"] += [h.path for h in group]
    if abs(_unit_normal(best[0].orientation)[2]) < _AXIAL_MIN_NZ:
        LOG.warning("%s: no axial series; using the non-axial %s", folder, _describe(best))
    _log_dropped(reasons, dropped)
    return best


def _file_names(paths: list[str]) -> str:
    """The first five file names, and how many more."""
    more = f" (+{len(paths) - 5} more)" if len(paths) > 5 else ""
    return ", ".join(os.path.basename(p) for p in paths[:5]) + more


def _log_dropped(reasons: dict[str, list[str]], dropped: list[str]) -> None:
    for reason, paths in reasons.items():
        LOG.warning("%s: dropped %d file(s), %s: %s", os.path.dirname(paths[0]),
                    len(paths), reason, _file_names(paths))
        dropped.extend(f"{p}: {reason}" for p in paths)


def _order_head_to_feet(series: list[SliceHeader], normal: np.ndarray,
                        dropped: list[str]) -> tuple[list[SliceHeader], np.ndarray]:
    """Sort by position along the normal, highest first; drop repeated positions."""
    proj = np.array([np.dot(h.position, normal) for h in series])
    # Among equal positions keep the lowest instance number (then file name).
    order = sorted(range(len(series)), key=lambda i: (-proj[i], series[i].instance_number,
                                                       series[i].path))
    kept: list[int] = []
    duplicates: dict[str, list[str]] = defaultdict(list)
    for i in order:
        if kept and abs(proj[kept[-1]] - proj[i]) < _DUPLICATE_TOL_MM:
            kept_name = os.path.basename(series[kept[-1]].path)
            duplicates[f"duplicate position of {kept_name}"].append(series[i].path)
        else:
            kept.append(i)
    _log_dropped(duplicates, dropped)
    return [series[i] for i in kept], proj[kept]


def _z_spacing(z_positions: np.ndarray, first: SliceHeader, folder: Path) -> float:
    if len(z_positions) < 2:
        return float(first.slice_thickness or 1.0)
    gaps = -np.diff(z_positions)
    dz = float(np.median(gaps))
    if gaps.max() > 1.5 * dz or gaps.min() < 0.5 * dz:
        LOG.warning("%s: irregular slice spacing (%.3g to %.3g mm, median %.3g mm)",
                    folder, gaps.min(), gaps.max(), dz)
    return dz


def _allocate(series: list[SliceHeader], folder: Path) -> np.ndarray:
    """The empty (slices, rows, cols) int16 volume, refusing absurd sizes first."""
    n, rows, cols = len(series), series[0].rows, series[0].cols
    gib = n * rows * cols * 2 / 2**30
    if max(rows, cols) > MAX_SLICE_SIDE:
        raise DicomReadError(folder, f"slices of {rows} x {cols} pixels (e.g. {series[0].path}) "
                                     f"exceed MAX_SLICE_SIDE = {MAX_SLICE_SIDE}")
    if n * rows * cols > MAX_STUDY_VOXELS:
        raise DicomReadError(folder, f"{n} slices of {rows} x {cols} ({gib:.1f} GiB) exceed "
                                     f"MAX_STUDY_VOXELS = {MAX_STUDY_VOXELS}")
    try:
        return np.empty((n, rows, cols), dtype=np.int16)
    except MemoryError as exc:
        raise MemoryError(f"{folder}: cannot allocate the {gib:.1f} GiB volume "
                          f"({n} x {rows} x {cols} int16)") from exc


def _decode_slices(series: list[SliceHeader], hu: np.ndarray, method: str, workers: int,
                   stop_on_error: bool) -> list:
    """Decode slice i into hu[i] with ``workers`` threads; returns, per slice, the
    decoder's name, its DicomReadError, or None if never tried (after an error when
    ``stop_on_error``: every slice before the first failure is still decoded, so the
    lowest failing index is the one a serial loop would have hit first).
    """
    results: list = [None] * len(series)
    indices = iter(range(len(series)))  # handed out in order, one at a time
    lock, failed = threading.Lock(), threading.Event()

    def work() -> None:
        while not (stop_on_error and failed.is_set()):
            with lock:
                i = next(indices, None)
            if i is None:
                return
            try:
                results[i] = decode_into(series[i], hu[i], method)
            except DicomReadError as exc:
                results[i] = exc
                failed.set()

    n_threads = max(1, min(workers, len(series)))
    if n_threads == 1:
        work()
    else:
        with ThreadPoolExecutor(n_threads, thread_name_prefix="dicom-decode") as pool:
            for future in [pool.submit(work) for _ in range(n_threads)]:
                future.result()  # re-raises anything that is not a DicomReadError
    return results


def _decode_volume(series: list[SliceHeader], tolerant: bool, method: str, workers: int,
                   folder: Path, dropped: list[str],
                   used: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Fill a preallocated (slices, rows, cols) int16 volume, slices in parallel.

    Returns the volume and a boolean mask of the slices that decoded. Failed slices are
    squeezed out in place, so peak memory stays one volume plus a slice per thread.
    ``used`` counts the slices each decoder read.
    """
    hu = _allocate(series, folder)
    results = _decode_slices(series, hu, method, workers, stop_on_error=not tolerant)
    errors = [r for r in results if isinstance(r, DicomReadError)]
    if errors and not tolerant:
        raise errors[0]
    for exc in errors:
        LOG.warning("skipping slice that cannot be decoded: %s", exc)
        dropped.append(f"{exc.path}: {exc.problem}")
    ok = np.array([isinstance(r, str) for r in results], dtype=bool)
    for name in results:
        if isinstance(name, str):
            used[name] = used.get(name, 0) + 1
    LOG.debug("decoders used: %s", used)
    n_ok = int(ok.sum())
    if n_ok < len(series):
        for j, i in enumerate(np.flatnonzero(ok)):
            if j != i:
                hu[j] = hu[i]
        hu.resize((n_ok,) + hu.shape[1:], refcheck=False)
    return hu, ok


def _log_notes(series: list[SliceHeader], folder: Path) -> None:
    """Warn once per kind of header repair (e.g. an unusable RescaleSlope), naming files."""
    notes: dict[str, list[str]] = defaultdict(list)
    for h in series:
        for note in h.notes:
            notes[note].append(h.path)
    for note, paths in notes.items():
        LOG.warning("%s: %d file(s): %s: %s", folder, len(paths), note, _file_names(paths))


def load_study(folder: str | os.PathLike, tolerant: bool = False, uid: str | None = None,
               *, method: str = "auto", workers: int | None = None) -> Study:
    """Read a study folder into a Study with ``hu`` (slices, rows, cols) head to feet.

    tolerant: skip (and log, and record in ``Study.dropped``) unreadable slices instead
        of raising DicomReadError. Other series, localizers and duplicate positions are
        always dropped with a warning. uid: defaults to the folder name.
    method: "auto" (fastest correct decoder per transfer syntax) or "pydicom".
    workers: decoding threads; None: ``default_workers()``.
    """
    folder = Path(folder)
    dropped: list[str] = []
    headers = _read_headers(_list_candidate_files(folder), tolerant, dropped)
    if not headers:
        raise DicomReadError(folder, "no readable DICOM file in the study folder")
    series = _select_series(headers, folder, dropped)
    normal = _unit_normal(series[0].orientation)
    series, z_positions = _order_head_to_feet(series, normal, dropped)
    used: dict[str, int] = {}
    hu, ok = _decode_volume(series, tolerant, method,
                            default_workers() if workers is None else workers,
                            folder, dropped, used)
    if not ok.any():
        raise DicomReadError(folder, "no slice of the study could be decoded")
    series = [h for h, good in zip(series, ok) if good]
    _log_notes(series, folder)
    z_positions = z_positions[ok]
    first = series[0]
    row_mm, col_mm = first.pixel_spacing or (1.0, 1.0)
    if first.pixel_spacing is None:
        LOG.warning("%s: no PixelSpacing; assuming 1 mm", folder)
    return Study(
        uid=uid if uid is not None else folder.name,
        hu=hu,
        spacing=(_z_spacing(z_positions, first, folder), float(row_mm), float(col_mm)),
        z_positions=z_positions.astype(np.float64),
        instance_numbers=np.array([h.instance_number for h in series], dtype=np.int64),
        files=[h.path for h in series],
        orientation=np.asarray(first.orientation, dtype=np.float64),
        normal=normal,
        origin=np.asarray(first.position, dtype=np.float64),
        positions=np.array([h.position for h in series], dtype=np.float64),
        series_uid=first.series_uid,
        dropped=dropped,
        decoders=used,
    )
