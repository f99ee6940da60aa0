"""Benchmark ``load_study`` against every installed decoder: ``python -m tooling.bench.decode``.

Builds, in a temporary folder, one CT-like study per transfer syntax (from the real
series in the tests' data folder when present, else a synthetic phantom), then times, each
in a fresh subprocess pinned to its CPUs, on the same files in the same run:

* load_study on 1 core and on all ``--cores`` (``workers`` = cores);
* each installed decoder on 1 core, in the loop a careful user would write: sort the
  files by ImagePositionPatient (dicomsdl header pass), decode each slice into a
  preallocated int16 volume, rescale in place: ``dicomsdl`` (copyFrameData),
  ``imagecodecs`` (jpeg8 / dicomrle / jpeg2k, numthreads=1), ``gdcm`` (ImageReader)
  and ``pylibjpeg`` (pydicom with that plugin); best = the fastest of them;
* naive: ``np.stack([dcmread(f).pixel_array * slope + intercept for f in sorted(files)])``
  with pydicom's default plugins.

Every loader must yield the same HU (compared slice by slice, order-free, since the
naive loop sorts by file name). Loaders take turns, one run each per round (after a
warm-up on a few files), and rates are the median over ``--repeats`` rounds, in slices
per second of wall clock; the 1-core ratio is also given per CPU-second, which other
jobs on a shared machine disturb less, and the table prints the highest load average
seen. 1-core runs use the last CPU of the process's affinity mask.

Peak memory is the growth of the process's resident set (VmHWM after resetting it via
/proc/self/clear_refs, minus VmRSS before the load), so it counts C-library buffers
too, divided by the size of the int16 volume. Also holds the small DICOM writers the
tests use (``write_ct_series``, ``transcode_file``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from tooling.dicom_writer import write_ct_series

SYNTAXES = {  # benchmark name -> transfer syntax UID
    "explicit-le": "1.2.840.10008.1.2.1",
    "jpeg-lossless": "1.2.840.10008.1.2.4.70",
    "jpeg2000": "1.2.840.10008.1.2.4.90",
    "rle": "1.2.840.10008.1.2.5",
}
# The real series the tests carry (present in a checkout, not in an installed wheel).
REAL_SERIES = Path(__file__).resolve().parents[2] / "tests" / "data" / "totalsegmentator_example_ct" / "dicom"


def _resample_in_plane(image: np.ndarray, size: int) -> np.ndarray:
    rows = np.linspace(0, image.shape[0] - 1, size).round().astype(int)
    cols = np.linspace(0, image.shape[1] - 1, size).round().astype(int)
    return image[np.ix_(rows, cols)]


def bench_volume(slices: int, size: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """A CT-like (slices, size, size) HU volume, head to feet, and where it came from.

    Real slices (each reused for several neighbours) plus a little noise, so that the
    compressed sizes stay realistic; a noisy phantom when the real series is absent.
    """
    rng = np.random.default_rng(seed)
    real = sorted(REAL_SERIES.glob("*")) if REAL_SERIES.is_dir() else []
    if real:
        from common.dicom import load_study

        base = load_study(REAL_SERIES).hu
        source = f"real series ({len(base)} slices) + noise sd 5 HU"
    else:
        from tooling.phantom import render_phantom

        base = render_phantom(rng, size, 20, (0,) * 7).hu
        source = "rendered neck phantom (20 slices) + noise sd 5 HU"
    vol = np.empty((slices, size, size), dtype=np.int16)
    for k in range(slices):
        image = _resample_in_plane(base[k * len(base) // slices].astype(np.float64), size)
        vol[k] = np.clip(np.rint(image + rng.normal(0, 5, image.shape)), -1024, 3071)
    return vol, source


def naive_load(folder: str | os.PathLike, plugin: str = "") -> np.ndarray:
    """The common baseline: files sorted by name, pydicom decode, float HU, stacked.

    plugin: force a pydicom decoding plugin (e.g. "pylibjpeg"); default pydicom's choice.
    """
    import pydicom

    slices = []
    for path in sorted(Path(folder).iterdir()):
        ds = pydicom.dcmread(path)
        if plugin and ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.pixel_array_options(decoding_plugin=plugin)
        slices.append(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    return np.stack(slices)


# --- The decoders, each in the loop a careful user would write ---------------------------

def _sorted_slices(folder: str) -> tuple[list[tuple[str, float, float]], tuple[int, int]]:
    """(path, slope, intercept) head to feet, and (rows, cols), from a dicomsdl header pass."""
    import dicomsdl

    rows = []
    for path in (str(p) for p in Path(folder).iterdir()):
        position, slope, intercept, n_rows, n_cols = dicomsdl.open(path, 0x7FE00000).getValues(
            ["ImagePositionPatient", "RescaleSlope", "RescaleIntercept", "Rows", "Columns"])
        rows.append((-position[2], path, slope or 1.0, intercept or 0.0, (n_rows, n_cols)))
    return [row[1:4] for row in sorted(rows)], rows[0][4]


def _rescale(stored: np.ndarray, slope: float, intercept: float, out: np.ndarray) -> None:
    """HU into ``out`` (int16), in place when ``stored`` is a view of it."""
    if slope == 1 and float(intercept).is_integer():
        if not np.may_share_memory(stored, out):
            np.copyto(out, stored, casting="unsafe")
        out += np.int16(intercept)
    else:
        np.copyto(out, np.rint(stored * slope + intercept), casting="unsafe")


def _frame(path: str) -> bytes:
    """The single fragment of an encapsulated file (item table walked, no checks)."""
    data = Path(path).read_bytes()
    pos = data.rindex(b"\xe0\x7f\x10\x00") + 12
    pos += 8 + int.from_bytes(data[pos + 4:pos + 8], "little")  # the basic offset table
    return data[pos + 8:pos + 8 + int.from_bytes(data[pos + 4:pos + 8], "little")]


def _decoder_loop(folder: str, decode: Callable[[str, np.ndarray], np.ndarray]) -> np.ndarray:
    """Volume of ``decode(path, slice of the volume) -> stored`` over the sorted slices,
    as int16 HU."""
    slices, shape = _sorted_slices(folder)
    hu = np.empty((len(slices),) + shape, np.int16)
    for i, (path, slope, intercept) in enumerate(slices):
        _rescale(decode(path, hu[i]), slope, intercept, hu[i])
    return hu


def _dicomsdl_decode(path: str, out: np.ndarray) -> np.ndarray:
    import dicomsdl

    ds = dicomsdl.open(path)
    stored = out.view(np.dtype(ds.getPixelDataInfo()["dtype"]))
    ds.copyFrameData(0, stored)
    return stored


def _imagecodecs_decode(syntax: str) -> Callable[[str, np.ndarray], np.ndarray]:
    import imagecodecs

    def decode(path: str, out: np.ndarray) -> np.ndarray:
        frame, raw = _frame(path), out.view(np.uint16)
        if syntax == SYNTAXES["rle"]:
            imagecodecs.dicomrle_decode(frame, dtype="<u2", out=memoryview(out).cast("B"))
        elif syntax == SYNTAXES["jpeg2000"]:
            imagecodecs.jpeg2k_decode(frame, numthreads=1, out=raw)
        else:
            imagecodecs.jpeg8_decode(frame, out=raw)
        return raw
    return decode


def _gdcm_decode(path: str, out: np.ndarray) -> np.ndarray:
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(path)
    if not reader.Read():
        raise RuntimeError(f"{path}: gdcm cannot read it")
    image = reader.GetImage()
    dtype = np.int16 if image.GetPixelFormat().GetPixelRepresentation() else np.uint16
    return np.frombuffer(image.GetBuffer().encode("utf-8", "surrogateescape"),
                         dtype).reshape(out.shape)


def _pylibjpeg_decode(path: str, out: np.ndarray) -> np.ndarray:
    import pydicom

    ds = pydicom.dcmread(path)
    ds.pixel_array_options(decoding_plugin="pylibjpeg")
    return ds.pixel_array


def _load_study_hu(folder: str, workers: int) -> np.ndarray:
    from common.dicom import load_study

    return load_study(folder, workers=workers).hu


DECODERS = {  # name -> (syntaxes it decodes, factory(syntax) -> decode(path, out))
    "dicomsdl": (set(SYNTAXES.values()), lambda syntax: _dicomsdl_decode),
    "imagecodecs": (set(SYNTAXES.values()) - {SYNTAXES["explicit-le"]}, _imagecodecs_decode),
    "gdcm": (set(SYNTAXES.values()), lambda syntax: _gdcm_decode),
    "pylibjpeg": (set(SYNTAXES.values()) - {SYNTAXES["explicit-le"]},
                  lambda syntax: _pylibjpeg_decode),
}


def installed_decoders(syntax: str) -> list[str]:
    """Names of the DECODERS installed here that decode ``syntax``."""
    import importlib.util

    modules = {"pylibjpeg": "pylibjpeg"}
    return [name for name, (syntaxes, _) in DECODERS.items()
            if syntax in syntaxes and importlib.util.find_spec(modules.get(name, name))]


def run_loader(loader: str, folder: str, syntax: str, workers: int = 1) -> np.ndarray:
    """HU volume of ``folder`` by one loader: load_study, naive or a DECODERS name."""
    if loader == "load_study":
        return _load_study_hu(folder, workers)
    if loader == "naive":
        return naive_load(folder)
    return _decoder_loop(folder, DECODERS[loader][1](syntax))


def slice_digest(hu: np.ndarray) -> str:
    """Order-free digest of the int16 HU of every slice (the naive loop sorts by name)."""
    digests = sorted(hashlib.sha1(np.ascontiguousarray(s, np.int16).tobytes()).hexdigest()
                     for s in np.rint(hu).astype(np.int16))
    return hashlib.sha1("".join(digests).encode()).hexdigest()


# --- Measurement (in pinned subprocesses) -----------------------------------------------

def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _warm_up(loader: str, folder: str, syntax: str, workers: int) -> None:
    """Pay imports, first-call set-up (plugin discovery...) and the warming of Python's
    specialising interpreter on a few of the files, so that a single timed run is in
    the steady state of a long job."""
    with tempfile.TemporaryDirectory(prefix="warm_") as tmp:
        for path in sorted(Path(folder).iterdir())[:4]:
            os.symlink(path, Path(tmp) / path.name)
        for _ in range(8):
            run_loader(loader, tmp, syntax, workers)


def _measure(loader: str, folder: str, syntax: str, workers: int, repeats: int) -> dict:
    """Run one loader ``repeats`` times in this process: median rate, largest RSS growth."""
    import common.dicom  # noqa: F401  (imports happen before the memory baseline)
    import pydicom  # noqa: F401

    _warm_up(loader, folder, syntax, workers)
    times, cpu_times, peak = [], [], 0
    for _ in range(repeats):
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        rss0 = _proc_status_kb("VmRSS")
        start, cpu_start = time.perf_counter(), time.process_time()
        hu = run_loader(loader, folder, syntax, workers)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        peak = max(peak, (_proc_status_kb("VmHWM") - rss0) * 1024)
        shape, digest = hu.shape, slice_digest(hu)
        del hu
    return dict(slices_per_s=shape[0] / float(np.median(times)),
                slices_per_cpu_s=shape[0] / float(np.median(cpu_times)), peak_bytes=peak,
                int16_bytes=int(np.prod(shape)) * 2, digest=digest, load_avg=os.getloadavg()[0])


def _child(loader: str, folder: str, syntax: str, cores: int, repeats: int) -> dict:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[-cores:])
    return _measure(loader, folder, syntax, cores, repeats)


def _run_child(loader: str, folder: Path, syntax: str, cores: int, repeats: int) -> dict:
    cmd = [sys.executable, "-m", "tooling.bench.decode", "--child", loader, str(folder), syntax,
           "--cores", str(cores), "--repeats", str(repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _combine(runs: list[dict]) -> dict:
    """One loader's rounds: median rate, largest peak and load, the digest if they agree."""
    digests = {r["digest"] for r in runs}
    return dict(slices_per_s=float(np.median([r["slices_per_s"] for r in runs])),
                slices_per_cpu_s=float(np.median([r["slices_per_cpu_s"] for r in runs])),
                peak_bytes=max(r["peak_bytes"] for r in runs), int16_bytes=runs[0]["int16_bytes"],
                digest=digests.pop() if len(digests) == 1 else "differs between runs",
                load_avg=max(r["load_avg"] for r in runs))


def measure_syntax(folder: Path, syntax: str, cores: int, repeats: int) -> dict[str, dict]:
    """Every loader on ``folder``: load_study on 1 and ``cores`` cores, decoders, naive.

    Loaders take turns, one timed run each per round, so that load from other jobs
    that comes and goes falls on all of them alike.
    """
    runs = {"load_study": (1, "load_study"), f"load_study x{cores}": (cores, "load_study")}
    runs.update({name: (1, name) for name in installed_decoders(syntax)})
    runs["naive"] = (1, "naive")
    rounds: dict[str, list[dict]] = {label: [] for label in runs}
    for _ in range(repeats):
        for label, (n, loader) in runs.items():
            rounds[label].append(_run_child(loader, folder, syntax, n, 1))
    row = {label: _combine(r) for label, r in rounds.items()}
    if len({r["digest"] for r in row.values()}) != 1:
        raise RuntimeError(f"{folder.name}: the loaders disagree on the HU values: "
                           + ", ".join(f"{k} {r['digest'][:8]}" for k, r in row.items()))
    return row


def run(slices: int, size: int, syntaxes: list[str], cores: int, repeats: int) -> list[dict]:
    """Build one study per syntax in a temp dir, measure every loader, return the rows."""
    from common.decoders import fast_path
    from common.dicom_header import read_header

    vol, source = bench_volume(slices, size)
    print(f"volume {vol.shape} int16 = {vol.nbytes / 2**20:.0f} MiB from {source}; "
          f"load_study on 1 and {cores} core(s), decoders and naive on 1; median of {repeats}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dicom_bench_") as tmp:
        for name in syntaxes:
            folder = Path(tmp) / name
            paths = write_ct_series(folder, vol, signed=False, bits_stored=12,
                                    spacing=(1.0, 0.5, 0.5), transfer_syntax=SYNTAXES[name],
                                    progress=True)
            for p in paths:  # warm the page cache so no loader pays for the disk
                p.read_bytes()
            row = {"loaders": measure_syntax(folder, SYNTAXES[name], cores, repeats)}
            row.update(syntax=name, cores=cores, decoder=fast_path(read_header(str(paths[0]))),
                       mib=sum(p.stat().st_size for p in paths) / 2**20)
            rows.append(row)
            print(format_table(rows[-1:]), flush=True)
    return rows


def _best_decoder(loaders: dict[str, dict]) -> tuple[str, dict]:
    decoders = {k: v for k, v in loaders.items() if k in DECODERS}
    name = max(decoders, key=lambda k: decoders[k]["slices_per_s"])
    return name, decoders[name]


def format_table(rows: list[dict]) -> str:
    """Markdown table: slices/s (median), load_study / best decoder on 1 core, memory."""
    lines = ["| syntax | MiB | load_study decoder | load_study 1 core | load_study all cores "
             "(speed-up) | best decoder, 1 core | load_study / best (per CPU-s) | other "
             "decoders | naive "
             "pydicom | peak / int16 vol (load_study 1 core, all cores; naive) | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lo = r["loaders"]
        one, many = lo["load_study"], lo[f"load_study x{r['cores']}"]
        best, b = _best_decoder(lo)
        others = ", ".join(f"{k} {v['slices_per_s']:.0f}" for k, v in lo.items()
                           if k in DECODERS and k != best)
        lines.append(
            f"| {r['syntax']} | {r['mib']:.0f} | {r['decoder']} | {one['slices_per_s']:.0f} | "
            f"{many['slices_per_s']:.0f} on {r['cores']} "
            f"({many['slices_per_s'] / one['slices_per_s']:.2f}x) | "
            f"{best} {b['slices_per_s']:.0f} | {one['slices_per_s'] / b['slices_per_s']:.2f}x "
            f"({one['slices_per_cpu_s'] / b['slices_per_cpu_s']:.2f}x) | "
            f"{others} | {lo['naive']['slices_per_s']:.0f} | "
            f"{one['peak_bytes'] / one['int16_bytes']:.2f}, "
            f"{many['peak_bytes'] / many['int16_bytes']:.2f}; "
            f"{lo['naive']['peak_bytes'] / lo['naive']['int16_bytes']:.2f} | "
            f"{max(v['load_avg'] for v in lo.values()):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--syntaxes", default=",".join(SYNTAXES),
                        help=f"comma-separated subset of {', '.join(SYNTAXES)}")
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                        help="CPU cores for the all-cores load_study run (default: all)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="rounds of timed runs (one per loader each); the median is kept")
    parser.add_argument("--child", nargs=3, metavar=("LOADER", "FOLDER", "SYNTAX"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(*args.child, args.cores, args.repeats)))
        return []
    names = [s.strip() for s in args.syntaxes.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SYNTAXES))
    if unknown:
        parser.error(f"unknown syntaxes {unknown}; choose from {list(SYNTAXES)}")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    rows = run(args.slices, args.size, names, args.cores, args.repeats)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
