"""Decoding slices in threads: same volumes, same errors, one volume of memory, and no
oversubscription where studies are already processed in parallel."""
from __future__ import annotations

import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from common import dicom
from tooling.dicom_writer import write_ct_series
from common.dicom import DECODE_WORKERS_ENV, DicomReadError, default_workers, load_study

SYNTAXES = {
    "explicit-le": "1.2.840.10008.1.2.1",
    "implicit-le": "1.2.840.10008.1.2",
    "jpeg-lossless": "1.2.840.10008.1.2.4.70",
    "rle": "1.2.840.10008.1.2.5",
    "jpeg2000-90": "1.2.840.10008.1.2.4.90",
    "jpeg2000-91": "1.2.840.10008.1.2.4.91",
}


# --- default_workers -------------------------------------------------------------------

@pytest.fixture
def clean_limits(monkeypatch, tmp_path):
    """Four CPUs in the affinity mask, no environment limit, no cgroup quota."""
    monkeypatch.setattr(dicom.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    for name in (DECODE_WORKERS_ENV, "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dicom, "_CGROUP_V2", tmp_path / "absent")
    monkeypatch.setattr(dicom, "_CGROUP_V1", (tmp_path / "absent", tmp_path / "absent"))
    return monkeypatch


def test_default_workers_is_the_affinity_mask(clean_limits):
    assert default_workers() == 4


@pytest.mark.parametrize("name", [DECODE_WORKERS_ENV, "OMP_NUM_THREADS"])
def test_default_workers_honours_environment_limits(clean_limits, name):
    clean_limits.setenv(name, "2")
    assert default_workers() == 2
    clean_limits.setenv(name, "16")  # a limit, never more threads than CPUs
    assert default_workers() == 4
    for junk in ("", "0", "-3", "two"):
        clean_limits.setenv(name, junk)
        assert default_workers() == 4


def test_default_workers_honours_cgroup_quota(clean_limits, tmp_path):
    quota = tmp_path / "cpu.max"
    clean_limits.setattr(dicom, "_CGROUP_V2", quota)
    quota.write_text("150000 100000\n")  # 1.5 CPUs: 2 threads
    assert default_workers() == 2
    quota.write_text("max 100000\n")
    assert default_workers() == 4
    v1 = (tmp_path / "quota", tmp_path / "period")
    clean_limits.setattr(dicom, "_CGROUP_V2", tmp_path / "absent")
    clean_limits.setattr(dicom, "_CGROUP_V1", v1)
    v1[0].write_text("100000\n"), v1[1].write_text("100000\n")
    assert default_workers() == 1
    v1[0].write_text("-1\n")
    assert default_workers() == 4


def test_crop_process_pool_workers_decode_with_one_thread(monkeypatch):
    from common.parallel import worker_pool

    monkeypatch.delenv(DECODE_WORKERS_ENV, raising=False)
    with worker_pool(1) as pool:  # the pool of the crop command, the stage-1 cache and the synthetic data
        assert pool.submit(default_workers).result() == 1


class _WorkersDataset:
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        return default_workers()


def test_dataloader_workers_decode_with_one_thread():
    from torch.utils.data import DataLoader

    loader = DataLoader(_WorkersDataset(), batch_size=None, num_workers=1)
    assert [int(n) for n in loader] == [1, 1]


# --- Same volumes, same errors ----------------------------------------------------------

@pytest.fixture(scope="module")
def real_slices(real_ct_study) -> np.ndarray:
    """Nine real 512 x 512 slices (real entropy-coded data for every syntax)."""
    return real_ct_study.hu[::2][:9]


@pytest.mark.parametrize("name", list(SYNTAXES))
def test_threads_give_the_same_volume(tmp_path, real_slices, name):
    write_ct_series(tmp_path, real_slices, signed=False, bits_stored=12,
                    transfer_syntax=SYNTAXES[name])
    serial = load_study(tmp_path, workers=1)
    np.testing.assert_array_equal(serial.hu, real_slices)
    for workers in (2, 4):
        study = load_study(tmp_path, workers=workers)
        np.testing.assert_array_equal(study.hu, serial.hu)
        assert study.decoders == serial.decoders and study.files == serial.files


def test_slices_are_decoded_by_several_threads(tmp_path, monkeypatch):
    write_ct_series(tmp_path, np.zeros((8, 16, 16), np.int16))
    threads, original = set(), dicom.decode_into

    def recording(header, out, method):
        threads.add(threading.get_ident())
        time.sleep(0.01)  # long enough for every thread to take a slice
        return original(header, out, method)

    monkeypatch.setattr(dicom, "decode_into", recording)
    load_study(tmp_path, workers=3)
    assert len(threads) == 3
    threads.clear()
    load_study(tmp_path, workers=1)
    assert threads == {threading.get_ident()}


def zero_jpeg_tail(path: Path) -> None:
    """Zero the second half of the JPEG stream, EOI included (a cut-short slice)."""
    data = bytearray(path.read_bytes())
    start = data.index(b"\xff\xd8\xff", data.rindex(b"\xe0\x7f\x10\x00"))
    end = data.rindex(b"\xff\xd9") + 2
    data[(start + end) // 2:end] = bytes(end - (start + end) // 2)
    path.write_bytes(bytes(data))


def test_threads_drop_exactly_the_bad_slices_and_name_the_first(tmp_path, real_slices):
    paths = write_ct_series(tmp_path, real_slices, signed=False, bits_stored=12,
                            transfer_syntax=SYNTAXES["jpeg-lossless"])
    for k in (3, 7):
        zero_jpeg_tail(paths[k])
    paths[5].write_bytes(paths[5].read_bytes()[:-20000])  # truncated: refused in the header pass
    for _ in range(3):  # the error is the one a serial loop meets first, every time
        with pytest.raises(DicomReadError) as info:
            load_study(tmp_path, workers=4)
        assert paths[3].name in str(info.value) or paths[5].name in str(info.value)
    with pytest.raises(DicomReadError, match=paths[3].name):  # headers are all fine now
        paths[5].unlink()
        load_study(tmp_path, workers=4)
    study = load_study(tmp_path, tolerant=True, workers=4)
    np.testing.assert_array_equal(study.hu, real_slices[[0, 1, 2, 4, 6, 8]])
    assert sorted(Path(d.split(":")[0]).name for d in study.dropped) \
        == sorted([paths[3].name, paths[7].name])


def test_peak_memory_is_about_one_volume(tmp_path, real_slices):
    """Threads decode into the preallocated volume: no per-slice copies kept."""
    write_ct_series(tmp_path, np.tile(real_slices, (3, 1, 1)), signed=False, bits_stored=12,
                    transfer_syntax=SYNTAXES["jpeg-lossless"])
    volume_bytes = 27 * 512 * 512 * 2
    load_study(tmp_path, workers=4)  # warm up imports and caches
    tracemalloc.start()
    try:
        study = load_study(tmp_path, workers=4)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert study.hu.nbytes == volume_bytes
    # the volume, plus per thread a compressed frame and the bit accounting's buffers
    assert peak < volume_bytes + 4 * 2**20
