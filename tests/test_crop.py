"""stage2_cls.crop end to end on tiny DICOM studies with oracle stage-1 outputs."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from common.config import load_config
from common.io import save_npz_atomic, write_csv_atomic
from stage1_seg.boxes import boxes_from_labels
from stage2_cls import crop
from tooling.dicom_writer import write_ct_series
from stage2_cls.config import Stage2Config

S, SIZE = 16, 32
UIDS = ["1.2.3.1", "1.2.3.2", "1.2.3.3", "1.2.3.4"]
BROKEN, NO_STAGE1 = "1.2.3.3", "1.2.3.4"
SETTINGS = ["crop.n_slices=4", "crop.size=24", "crop.workers=1"]


def study_volume(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(S, SIZE, SIZE) HU and labels with C1..C3 stacked along z (C4..C7 absent)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((S, SIZE, SIZE), dtype=np.uint8)
    for c, (z0, z1) in enumerate([(2, 6), (6, 10), (10, 14)]):
        labels[z0:z1, 10 + c:22, 8:24 - c] = c + 1
    hu = np.where(labels > 0, 700, 40) + rng.integers(-20, 20, size=labels.shape)
    return hu.astype(np.int16), labels


def lowres_onehot(labels: np.ndarray) -> np.ndarray:
    """(7, S/2, SIZE/2, SIZE/2) uint8: one-hot * 255, block-averaged by 2."""
    onehot = np.stack([labels == c + 1 for c in range(7)]).astype(np.float32)
    d, h, w = (n // 2 for n in labels.shape)
    return np.round(onehot.reshape(7, d, 2, h, 2, w, 2).mean(axis=(2, 4, 6)) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """RSNA-like data folder; stage-1 outputs live in ``<root>/work_template``."""
    root = tmp_path_factory.mktemp("crop_data")
    data, stage1 = root / "data", root / "work_template" / "stage1" / "default"
    boxes = []
    for i, uid in enumerate(UIDS):
        hu, labels = study_volume(i)
        paths = write_ct_series(data / "train_images" / uid, hu, spacing=(1.0, 0.8, 0.8))
        if uid == BROKEN:
            for path in paths:
                path.write_bytes(b"not a dicom file")
        if uid != NO_STAGE1:
            boxes.append(boxes_from_labels(labels, uid))
            save_npz_atomic(stage1 / "masks" / f"{uid}.npz", probs=lowres_onehot(labels),
                            shape=np.array(hu.shape, dtype=np.int64))
    write_csv_atomic(stage1 / "boxes.csv", pd.concat(boxes))
    labels_csv = pd.DataFrame({"StudyInstanceUID": UIDS, "patient_overall": 0})
    write_csv_atomic(data / "train.csv", labels_csv)
    write_csv_atomic(data / "test.csv", pd.DataFrame({
        "row_id": ["9.9_C1", UIDS[0] + "_C1"], "StudyInstanceUID": ["9.9", UIDS[0]],
        "prediction_type": ["C1", "C1"]}))
    shutil.copytree(data / "train_images" / UIDS[0], data / "test_images" / UIDS[0])
    return root


@pytest.fixture()
def work(dataset: Path, tmp_path: Path) -> Path:
    """A fresh work dir holding a copy of the stage-1 outputs."""
    shutil.copytree(dataset / "work_template", tmp_path / "work")
    return tmp_path / "work"


def test_crop_writes_files_resumes_and_reports_failures(dataset, work, caplog):
    cfg = load_config(Stage2Config, None, SETTINGS)
    with caplog.at_level(logging.INFO):
        summary = crop.run(cfg, dataset / "data", work)
    assert summary["written"] == 2 and summary["skipped"] == 0
    assert list(summary["failed"]) == [BROKEN] and summary["no_stage1"] == [NO_STAGE1]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(BROKEN in m and str(Path("train_images") / BROKEN) in m for m in errors), errors
    for uid in UIDS[:2]:
        with np.load(work / "crops" / f"{uid}.npz") as npz:
            assert npz["stacks"].shape == (7, 4, 6, 24, 24) and npz["stacks"].dtype == np.uint8
            assert npz["missing"].tolist() == [False] * 3 + [True] * 4
            assert npz["slices"][0].tolist() == [2, 3, 4, 5]
            assert npz["instance_numbers"].tolist() == list(range(1, S + 1))  # ties fracture boxes to slices
            assert npz["stacks"][:3, :, 5].max() == 255  # the mask channel is filled
    assert not (work / "crops" / f"{BROKEN}.npz").exists()
    assert (work / "crops" / "settings.json").is_file()
    assert (work / "crops" / "summary_train.json").is_file()

    before = (work / "crops" / f"{UIDS[0]}.npz").stat().st_mtime_ns
    again = crop.run(cfg, dataset / "data", work)
    assert again["written"] == 0 and again["skipped"] == 2 and list(again["failed"]) == [BROKEN]
    assert (work / "crops" / f"{UIDS[0]}.npz").stat().st_mtime_ns == before


def test_crops_match_build_stacks_in_memory(dataset, work):
    from common.dicom import load_study
    from stage2_cls.stacks import build_stacks

    cfg = load_config(Stage2Config, None, SETTINGS)
    crop.run(cfg, dataset / "data", work, limit=1)
    study = load_study(dataset / "data" / "train_images" / UIDS[0])
    with np.load(work / "stage1" / "default" / "masks" / f"{UIDS[0]}.npz") as npz:
        probs = npz["probs"]
    boxes = pd.read_csv(work / "stage1" / "default" / "boxes.csv")
    direct = build_stacks(study.hu, probs, boxes[boxes.StudyInstanceUID == UIDS[0]], cfg.crop)
    with np.load(work / "crops" / f"{UIDS[0]}.npz") as npz:
        assert np.array_equal(npz["stacks"], direct.stacks)
    assert not (work / "crops" / f"{UIDS[1]}.npz").exists()  # --limit 1


def test_other_settings_in_the_same_folder_are_refused(dataset, work):
    crop.run(load_config(Stage2Config, None, SETTINGS), dataset / "data", work, limit=1)
    other = load_config(Stage2Config, None, SETTINGS + ["crop.size=40"])
    with pytest.raises(crop.CropSettingsError, match="size"):
        crop.run(other, dataset / "data", work, limit=1)
    more_workers = load_config(Stage2Config, None, SETTINGS + ["crop.workers=3"])
    assert crop.run(more_workers, dataset / "data", work, limit=1)["skipped"] == 1


def test_main_with_worker_pool_and_test_split(dataset, work, tmp_path):
    config = tmp_path / "stage2.yaml"
    config.write_text(yaml.safe_dump({"crop": {"n_slices": 4, "size": 24, "workers": 2}}))
    args = ["--data-dir", str(dataset / "data"), "--work-dir", str(work), "--config", str(config)]
    summary = crop.main(args)
    assert summary["written"] == 2 and list(summary["failed"]) == [BROKEN]
    test = crop.main(args + ["--split", "test"])
    # test.csv names a study without images (9.9): left out; UIDS[0] is already cropped.
    assert test["n_studies"] == 1 and test["skipped"] == 1


def test_exit_code_when_nothing_can_be_cropped(dataset, work, tmp_path):
    config = tmp_path / "stage2.yaml"
    config.write_text(yaml.safe_dump({"crop": {"stage1_run": "nothing_here"}}))
    (work / "stage1" / "nothing_here").mkdir()
    pd.read_csv(work / "stage1" / "default" / "boxes.csv").iloc[:0].to_csv(
        work / "stage1" / "nothing_here" / "boxes.csv", index=False)
    with pytest.raises(SystemExit) as exc:
        crop.main(["--data-dir", str(dataset / "data"), "--work-dir", str(work), "--config", str(config)])
    assert exc.value.code == 1
    with pytest.raises(FileNotFoundError, match="boxes.csv"):
        crop.run(load_config(Stage2Config, None, ["crop.stage1_run=absent"]), dataset / "data", work)


def test_study_whose_volume_disagrees_with_its_stage1_mask_fails_cleanly(dataset, tmp_path):
    uid = UIDS[1]
    mask = tmp_path / "mask.npz"
    save_npz_atomic(mask, probs=np.zeros((7, 4, 4, 4), np.uint8), shape=np.array([S + 1, SIZE, SIZE]))
    cfg = load_config(Stage2Config, None, SETTINGS).crop
    job = crop.CropJob(uid, dataset / "data" / "train_images" / uid, mask, np.zeros((7, 6), np.int64),
                       tmp_path / "out.npz", cfg)
    got_uid, status, message = crop.crop_study(job)
    assert (got_uid, status) == (uid, "failed") and "differs from the stage-1 mask" in message
    assert not (tmp_path / "out.npz").exists()


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_killed_crop_leaves_no_worker_running(dataset, tmp_path):
    """kill -9 of the command: its two workers die with it and write nothing more."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data, work = tmp_path / "data", tmp_path / "work"
    shutil.copytree(dataset / "data", data)
    shutil.copytree(dataset / "work_template", work)
    stage1 = work / "stage1" / "default"
    boxes = pd.read_csv(stage1 / "boxes.csv", dtype={"StudyInstanceUID": str})
    uids = [f"1.2.4.{i}" for i in range(40)]  # many copies of a good study: minutes of work
    for uid in uids:
        shutil.copytree(data / "train_images" / UIDS[0], data / "train_images" / uid)
        shutil.copy(stage1 / "masks" / f"{UIDS[0]}.npz", stage1 / "masks" / f"{uid}.npz")
    rows = [boxes[boxes.StudyInstanceUID == UIDS[0]].assign(StudyInstanceUID=uid) for uid in uids]
    write_csv_atomic(stage1 / "boxes.csv", pd.concat([boxes, *rows]))
    write_csv_atomic(data / "train.csv", pd.DataFrame({"StudyInstanceUID": uids, "patient_overall": 0}))
    cmd = [sys.executable, "-m", "stage2_cls.crop", "--data-dir", str(data), "--work-dir", str(work),
           "crop.n_slices=15", "crop.size=224", "crop.workers=2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.time() + 120, []
    while time.time() < deadline and not list((work / "crops").glob("*.npz")):
        workers = _children(proc.pid) or workers
        time.sleep(0.1)
    assert list((work / "crops").glob("*.npz")), "no crop was written in time"
    workers = [pid for pid in _children(proc.pid) if pid != proc.pid] or workers
    assert workers, "the crop command started no worker processes"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(3)
    alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()
             and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]]
    assert not alive, f"workers {alive} outlived their parent"
    written = len(list((work / "crops").glob("*.npz")))
    time.sleep(2)
    assert len(list((work / "crops").glob("*.npz"))) == written
