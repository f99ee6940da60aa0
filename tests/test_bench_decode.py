"""The decode benchmark's machinery on tiny studies (python -m tooling.bench.decode)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tooling.bench import decode as bench


@pytest.mark.parametrize("name", list(bench.SYNTAXES))
def test_every_loader_yields_the_same_hu(tmp_path, name):
    hu = np.random.default_rng(0).integers(-1024, 3000, (3, 24, 24)).astype(np.int16)
    bench.write_ct_series(tmp_path, hu, signed=False, bits_stored=12,
                          transfer_syntax=bench.SYNTAXES[name])
    loaders = ["load_study", "naive"] + bench.installed_decoders(bench.SYNTAXES[name])
    assert {"dicomsdl", "gdcm"} <= set(loaders)  # installed with the package
    digests = {}
    for loader in loaders:
        volume = bench.run_loader(loader, str(tmp_path), bench.SYNTAXES[name], workers=2)
        assert volume.shape == hu.shape, loader
        digests[loader] = bench.slice_digest(volume)
    assert set(digests.values()) == {bench.slice_digest(hu)}, digests


def test_measure_and_table(tmp_path):
    bench.write_ct_series(tmp_path, np.zeros((4, 16, 16), np.int16))
    syntax = bench.SYNTAXES["explicit-le"]
    loaders = {label: bench._measure(loader, str(tmp_path), syntax, workers, repeats=1)
               for label, loader, workers in [("load_study", "load_study", 1),
                                              ("load_study x2", "load_study", 2),
                                              ("dicomsdl", "dicomsdl", 1),
                                              ("gdcm", "gdcm", 1), ("naive", "naive", 1)]}
    assert len({r["digest"] for r in loaders.values()}) == 1
    assert all(r["slices_per_s"] > 0 and r["slices_per_cpu_s"] > 0
               and r["int16_bytes"] == 4 * 16 * 16 * 2 for r in loaders.values())
    table = bench.format_table([dict(syntax="explicit-le", mib=0.01, decoder="native",
                                     cores=2, loaders=loaders)])
    assert "| explicit-le |" in table and "load_study / best" in table
    best = max(("dicomsdl", "gdcm"), key=lambda k: loaders[k]["slices_per_s"])
    assert f"| {best} " in table


def test_help():
    out = subprocess.run([sys.executable, "-m", "tooling.bench.decode", "--help"], capture_output=True,
                         text=True, cwd=Path(bench.__file__).resolve().parents[1], check=True)
    assert "--slices" in out.stdout and "--cores" in out.stdout


@pytest.mark.slow
def test_small_benchmark_run():
    out = subprocess.run([sys.executable, "-m", "tooling.bench.decode", "--slices", "6", "--size", "64",
                          "--repeats", "1", "--syntaxes", "explicit-le,rle"],
                         capture_output=True, text=True, check=True,
                         cwd=Path(bench.__file__).resolve().parents[1])
    rows = [line for line in out.stdout.splitlines() if line.startswith("| rle ")]
    assert rows and "imagecodecs" in rows[-1]
    assert any(line.startswith("| explicit-le ") for line in out.stdout.splitlines())
