"""Benchmark ``load_study`` against the naive pydicom loop: ``python -m tooling.bench.decode``.

Builds, in a temporary folder, one CT-like study per transfer syntax (from the real
series in the tests' data folder when present, else a synthetic phantom), then times in a
fresh, CPU-pinned subprocess per measurement:

* load_study: ``common.dicom.load_study(folder)``
* naive: ``np.stack([dcmread(f).pixel_array * slope + intercept for f in sorted(files)])``
  with pydicom's default plugin (gdcm when installed), and for compressed syntaxes
  again with pylibjpeg forced ("naive-pylibjpeg", a common install without gdcm)

Rates are the best of ``--repeats`` runs, by wall clock and per CPU-second (the
latter is less sensitive to other load on the machine; the table prints the load
average). Loaders run one after another, each pinned to ``--cores`` CPUs.

Peak memory is the growth of the process's resident set (VmHWM after resetting it via
/proc/self/clear_refs, minus VmRSS before the load), so it counts C-library buffers
too, divided by the size of the int16 volume.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

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


LOADERS = {  # measured loaders: name -> function(folder) -> volume
    "load_study": lambda folder: _load_study_hu(folder),
    "naive": lambda folder: naive_load(folder),
    "naive-pylibjpeg": lambda folder: naive_load(folder, plugin="pylibjpeg"),
}


def _load_study_hu(folder: str) -> np.ndarray:
    from common.dicom import load_study

    return load_study(folder).hu


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _measure(method: str, folder: str, repeats: int) -> dict[str, Any]:
    """Run one loader ``repeats`` times in this process: best times, largest RSS growth."""
    import common.dicom  # noqa: F401  (imports happen before the memory baseline)
    import pydicom  # noqa: F401

    best_wall, best_cpu, peak = np.inf, np.inf, 0
    for _ in range(repeats):
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        rss0 = _proc_status_kb("VmRSS")
        wall0, cpu0 = time.perf_counter(), time.process_time()
        hu = LOADERS[method](folder)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        peak = max(peak, (_proc_status_kb("VmHWM") - rss0) * 1024)
        best_wall, best_cpu = min(best_wall, wall), min(best_cpu, cpu)
        values = hu.astype(np.int64)
        checksum = [int(values.sum()), int((values ** 2).sum())]  # order-free: naive sorts by name
        shape = hu.shape
        del hu, values
    return dict(slices_per_s=shape[0] / best_wall, slices_per_cpu_s=shape[0] / best_cpu,
                peak_bytes=peak, int16_bytes=int(np.prod(shape)) * 2, checksum=checksum,
                load_avg=os.getloadavg()[0])


def _child(method: str, folder: str, cores: int, repeats: int) -> dict[str, Any]:
    cpus = sorted(os.sched_getaffinity(0))[:cores]
    os.sched_setaffinity(0, cpus)  # fairness: every loader gets the same cores
    return _measure(method, folder, repeats)


def _run_child(method: str, folder: Path, cores: int, repeats: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "tooling.bench.decode", "--child", method, str(folder),
           "--cores", str(cores), "--repeats", str(repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(slices: int, size: int, syntaxes: list[str], cores: int, repeats: int) -> list[dict]:
    """Build one study per syntax in a temp dir, measure every loader, return the rows."""
    from common.decoders import fast_path, read_header

    vol, source = bench_volume(slices, size)
    print(f"volume {vol.shape} int16 = {vol.nbytes / 2**20:.0f} MiB from {source}; "
          f"{cores} core(s) per loader, best of {repeats}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="dicom_bench_") as tmp:
        for name in syntaxes:
            folder = Path(tmp) / name
            paths = write_ct_series(folder, vol, signed=False, bits_stored=12,
                                    spacing=(1.0, 0.5, 0.5), transfer_syntax=SYNTAXES[name],
                                    progress=True)
            for p in paths:  # warm the page cache so no loader pays for the disk
                p.read_bytes()
            methods = list(LOADERS) if name != "explicit-le" else ["load_study", "naive"]
            row = {m: _run_child(m, folder, cores, repeats) for m in methods}
            if len({tuple(r["checksum"]) for r in row.values()}) != 1:
                raise RuntimeError(f"{name}: the loaders disagree on the HU values")
            row.update(syntax=name, decoder=fast_path(read_header(str(paths[0]))),
                       mib=sum(p.stat().st_size for p in paths) / 2**20)
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table; rates are best-of-repeats, wall clock and per CPU-second."""
    lines = ["| syntax | MiB | load_study decoder | load_study slices/s (per CPU-s) | "
             "naive slices/s (per CPU-s) | speedup wall (CPU) | naive-pylibjpeg slices/s | "
             "load_study peak / int16 vol | naive peak / int16 vol | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f, n, p = r["load_study"], r["naive"], r.get("naive-pylibjpeg")
        plugin_cell = f"{p['slices_per_s']:.0f}" if p else "n/a (uncompressed)"
        lines.append(
            f"| {r['syntax']} | {r['mib']:.0f} | {r['decoder']} | "
            f"{f['slices_per_s']:.0f} ({f['slices_per_cpu_s']:.0f}) | "
            f"{n['slices_per_s']:.0f} ({n['slices_per_cpu_s']:.0f}) | "
            f"{f['slices_per_s'] / n['slices_per_s']:.1f}x "
            f"({f['slices_per_cpu_s'] / n['slices_per_cpu_s']:.1f}x) | {plugin_cell} | "
            f"{f['peak_bytes'] / f['int16_bytes']:.2f} | "
            f"{n['peak_bytes'] / n['int16_bytes']:.2f} | {f['load_avg']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--syntaxes", default=",".join(SYNTAXES),
                        help=f"comma-separated subset of {', '.join(SYNTAXES)}")
    parser.add_argument("--cores", type=int, default=1, help="CPU cores each loader may use")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs; the best is kept")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], args.cores, args.repeats)))
        return []
    names = [s.strip() for s in args.syntaxes.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SYNTAXES))
    if unknown:
        parser.error(f"unknown syntaxes {unknown}; choose from {list(SYNTAXES)}")
    rows = run(args.slices, args.size, names, args.cores, args.repeats)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
