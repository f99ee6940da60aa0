"""Write ``submission.csv`` for the studies of a test.csv, study by study, in memory.

    python -m make_submission [--data-dir D] [--models-dir M] [--out submission.csv]
                              [--time-budget HOURS] [key=value ...]

Per study: load_study -> stage-1 fold ensemble -> vertebra boxes -> stacks (the
same ``build_stacks`` as ``stage2_cls.crop``) -> stage-2 fold ensemble -> C1..C7
and patient_overall (calibrated when ``calibration.json`` is present). A study
that is missing or fails gets the prior and a log line; the run never stops on
one study. ``--time-budget`` switches to one model per stage (stage 2 without
its test-time flips), then to the prior, before the budget runs out.
"""
from __future__ import annotations

import glob
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from common.cli import parse_command
from common.config import replace
from common.constants import PRED_CLIP, STUDY_COL, TARGETS
from common.dicom import Study, load_study
from common.io import remove_stale_temporaries, write_csv_atomic
from common.metric import best_constant, read_labels_csv, read_test_csv, validate_submission, wide_to_submission
from stage1_seg.boxes import OFFSETS_FILE, apply_box_offsets, cube_slices, read_box_offsets, vertebra_boxes
from stage1_seg.infer import Stage1Ensemble
from stage2_cls.calibration import apply_calibration
from stage2_cls.dataset import fill_missing
from stage2_cls.infer import OVERALL_RULES, Stage2Ensemble, combine
from stage2_cls.stacks import build_stacks

log = logging.getLogger("make_submission")

# Best constant per label on the 2019 training labels (COMPETITION.md), C1..C7, patient_overall:
# the prior when no train.csv is at hand.
COMPETITION_PRIOR = (0.103, 0.193, 0.051, 0.075, 0.111, 0.184, 0.256, 0.531)
# decode: seconds to read the study (in the background thread when prefetching); wait: how long the
# networks waited for it (about 0 once the decoding of the next study overlaps the networks).
PHASES = ("decode", "wait", "stage1", "crops", "stage2")


@dataclass(frozen=True)
class SubmissionConfig:
    stage1_checkpoints: str = "stage1/default/fold*/best.pt"   # globs, relative to the models folder
    stage2_checkpoints: str = "stage2/default/fold*/best.pt"   # used when there is no ensemble file
    # Written by stage2_cls.report: the stage-2 runs to use, the patient_overall rule and the calibration.
    ensemble: str = "stage2/ensemble.json"
    flip_tta: bool = False                               # stage 1: average with the left-right flipped volume
    # Stage 2's test-time views: null keeps each checkpoint's own ``tta`` (what its out-of-fold
    # predictions, hence the calibration, were made with); "none" or "flips" overrides it.
    stage2_tta: Optional[str] = None
    amp: bool = True
    time_budget_hours: float = 8.5                       # Kaggle allows 9 h
    prefetch: int = 1                                    # studies decoded ahead, in a thread (0: none)
    split: str = "test"                                  # images folder: <split>_images


class Predictor:
    """Both ensembles plus everything needed to turn one study into 8 probabilities."""

    def __init__(self, models_dir: Path, cfg: SubmissionConfig, prior: np.ndarray) -> None:
        self.ensemble = read_ensemble(models_dir / cfg.ensemble)
        s1 = _glob(models_dir, cfg.stage1_checkpoints, "stage-1")
        patterns = [f"stage2/{run}/fold*/best.pt" for run in self.ensemble["runs"]] or [cfg.stage2_checkpoints]
        s2 = [path for pattern in patterns for path in _glob(models_dir, pattern, "stage-2")]
        log.info("models: %d stage-1 and %d stage-2 checkpoints from %s", len(s1), len(s2), models_dir)
        self.stage1 = Stage1Ensemble(s1, flip_tta=cfg.flip_tta, amp=cfg.amp)
        self.stage2 = Stage2Ensemble(s2, amp=cfg.amp, tta=cfg.stage2_tta)
        predict = self.stage1.config.predict
        self.box_cfg = {"threshold": predict.threshold, "fallback": predict.fallback_threshold,
                        "min_voxels": predict.min_voxels}
        # the slice-range bias stage1_seg.predict fitted for these checkpoints, beside their fold folders
        offsets_path = s1[0].parent.parent / OFFSETS_FILE
        self.box_offsets = read_box_offsets(offsets_path) if offsets_path.is_file() else None
        log.info("stage 1: box offsets %s", offsets_path if self.box_offsets is not None else "none")
        self.rule = self.ensemble["overall"] if 2 in self.stage2.types else "vertebrae"
        calibration = self.ensemble["calibration"]
        log.info("stage 2: types %s, patient_overall from %s; calibration: %s", self.stage2.types, self.rule,
                 calibration.get("reason", "used") if calibration else "none (raw probabilities)")
        self.prior = prior

    def predict(self, study: Study, cheap: bool = False) -> tuple[np.ndarray, dict[str, float]]:
        """One decoded study -> (8,) probabilities in TARGETS order, and seconds per phase."""
        times: dict[str, float] = {}
        t = time.perf_counter()
        probs, region = self.stage1.predict_hu(study.hu, study.spacing, n_models=1 if cheap else None)
        boxes = vertebra_boxes(probs, study.hu.shape, study.uid, region=region, **self.box_cfg)
        if self.box_offsets is not None:
            boxes = apply_box_offsets(boxes, self.box_offsets, cube_slices(region, probs.shape[1]), study.hu.shape[0])
        times["stage1"] = _lap(t)
        t = time.perf_counter()
        stacks = build_stacks(study.hu, probs, boxes, self.stage2.crop, region)
        times["crops"] = _lap(t)
        t = time.perf_counter()
        outputs = self.stage2.predict(stacks.stacks, stacks.missing, n_models=1 if cheap else None,
                                      tta="none" if cheap else None)
        outputs = {key: fill_missing(value[None], stacks.missing[None], self.prior[:7]) if key != "overall2" else value
                   for key, value in outputs.items()}
        row = combine(outputs, self.rule, self.stage2.overall)
        row = apply_calibration(row, self.ensemble["calibration"])
        times["stage2"] = _lap(t)
        return row[0], times


class StudyReader:
    """Decodes the next studies in a background thread while the current one runs through the networks.

    ``get(folder)`` returns ``(study, seconds it took to decode)`` and raises what
    ``load_study`` raised, so every error stays with its study. At most ``depth``
    studies are decoded ahead (each is about one volume of memory); the decoders
    release the GIL, so the networks and the decoding share the cores.
    """

    def __init__(self, folders: Sequence[Path], depth: int = 1) -> None:
        self.queue = [f for f in folders]
        self.depth = max(0, depth)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode") if self.depth else None
        self.pending: dict[Path, Future] = {}

    @staticmethod
    def _load(folder: Path) -> tuple[Study, float]:
        started = time.perf_counter()
        return load_study(folder, tolerant=True), time.perf_counter() - started

    def _fill(self) -> None:
        while self.pool is not None and self.queue and len(self.pending) < self.depth:
            folder = self.queue.pop(0)
            self.pending[folder] = self.pool.submit(self._load, folder)

    def get(self, folder: Path) -> tuple[Study, float]:
        if folder in self.queue:
            self.queue.remove(folder)
        future = self.pending.pop(folder, None)
        self._fill()  # start the next one before waiting for this one
        return future.result() if future is not None else self._load(folder)

    def skip(self, folder: Path) -> None:
        """Forget a study that will not be predicted (its decoding, if started, is dropped)."""
        if folder in self.queue:
            self.queue.remove(folder)
        future = self.pending.pop(folder, None)
        if future is not None:
            future.cancel()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def read_ensemble(path: Path) -> dict[str, Any]:
    """``ensemble.json`` (see stage2_cls.report), or, without one, a single run's raw noisy-OR."""
    if not path.is_file():
        log.info("no %s: the stage-2 checkpoints of the config, patient_overall from the vertebrae, "
                 "no calibration", path)
        return {"runs": [], "overall": "vertebrae", "calibration": None}
    try:
        ensemble = json.loads(path.read_text())
        runs, rule = list(ensemble["runs"]), ensemble["overall"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not an ensemble file written by stage2_cls.report ({exc})") from exc
    if rule not in OVERALL_RULES:
        raise ValueError(f"{path}: unknown patient_overall rule {rule!r}")
    return {"runs": runs, "overall": rule, "calibration": ensemble.get("calibration")}


def _lap(start: float) -> float:
    return time.perf_counter() - start


def _glob(models_dir: Path, pattern: str, what: str) -> list[Path]:
    found = sorted(Path(p) for p in glob.glob(str(models_dir / pattern)))
    if not found:
        raise FileNotFoundError(f"no {what} checkpoints match {models_dir / pattern}")
    return found


def load_prior(data_dir: Path) -> np.ndarray:
    """Best constant per label from train.csv when present, else the competition's figures."""
    path = data_dir / "train.csv"
    if path.is_file():
        labels = read_labels_csv(path)
        prior = best_constant(labels[list(TARGETS)].to_numpy(np.float64))
    else:
        prior = np.asarray(COMPETITION_PRIOR)
    return np.clip(prior, *PRED_CLIP)


def run(cfg: SubmissionConfig, data_dir: Path, models_dir: Path, out: Path,
        test_csv: Path | None = None) -> dict[str, Any]:
    """Predict every study of test.csv and write ``out``; returns a summary."""
    started = time.perf_counter()
    if out.parent.is_dir():
        remove_stale_temporaries(out.parent)
    test = read_test_csv(test_csv or data_dir / "test.csv")
    prior = load_prior(data_dir)
    uids = list(dict.fromkeys(test[STUDY_COL]))
    if not uids:  # a header-only test.csv: nothing to predict, still a valid (empty) submission
        write_csv_atomic(out, pd.DataFrame(columns=["row_id", "fractured"]))
        log.warning("test.csv has no rows: wrote an empty submission %s", out)
        return _summary(pd.DataFrame(columns=[STUDY_COL, "status", *PHASES]), time.perf_counter() - started, out)
    predictor = Predictor(models_dir, cfg, prior)
    budget = cfg.time_budget_hours * 3600.0
    folders = {uid: data_dir / f"{cfg.split}_images" / uid for uid in uids}
    reader = StudyReader([f for f in folders.values() if f.is_dir()], depth=cfg.prefetch)
    rows, records = {}, []
    try:
        for i, uid in enumerate(tqdm(uids, desc="studies", unit="study", dynamic_ncols=True)):
            record = {STUDY_COL: uid, "status": "ok", **{p: np.nan for p in PHASES}}
            elapsed = time.perf_counter() - started
            per_study = elapsed / max(i, 1)
            folder = folders[uid]
            if elapsed + per_study > budget:
                record["status"] = "prior: time budget"
                reader.skip(folder)
            elif not folder.is_dir():
                record["status"] = "prior: no image folder"
            else:
                cheap = i > 0 and elapsed + (len(uids) - i) * per_study > 0.9 * budget
                try:
                    waited = time.perf_counter()
                    study, decode_seconds = reader.get(folder)
                    record.update(wait=time.perf_counter() - waited, decode=decode_seconds)
                    rows[uid], times = predictor.predict(study, cheap=cheap)
                    record.update(times, status="ok (one model per stage, no stage-2 flips)" if cheap else "ok")
                except Exception as exc:  # one bad study never stops the submission
                    log.error("study %s: %s: %s; using the prior", uid, type(exc).__name__, exc)
                    record["status"] = f"prior: {type(exc).__name__}"
            if not record["status"].startswith("ok"):
                rows[uid] = prior
                if record["status"] != "prior: no image folder":
                    log.warning("study %s: %s", uid, record["status"])
            record["finished"] = time.perf_counter() - started
            records.append(record)
    finally:
        reader.close()
    wide = pd.DataFrame([[u, *rows[u]] for u in uids], columns=[STUDY_COL, *TARGETS])
    submission = wide_to_submission(wide, test)
    validate_submission(submission, test["row_id"].tolist())
    write_csv_atomic(out, submission)
    timing = pd.DataFrame(records)
    write_csv_atomic(out.with_name(out.stem + "_log.csv"), timing)
    summary = _summary(timing, time.perf_counter() - started, out)
    log.info("wrote %s: %s", out, summary)
    return summary


def _summary(timing: pd.DataFrame, seconds: float, out: Path) -> dict[str, Any]:
    ok = timing["status"].str.startswith("ok")
    per_phase = {p: float(timing.loc[ok, p].mean()) if ok.any() else float("nan") for p in PHASES}
    finished = timing.loc[ok, "finished"].to_numpy(float) if "finished" in timing else np.zeros(0)
    # Steady state: wall time between the first and the last predicted study (the first one pays
    # for the warm-up of every model), per study.
    steady = float((finished[-1] - finished[0]) / (len(finished) - 1)) if len(finished) > 1 else float("nan")
    return {"studies": len(timing), "predicted": int(ok.sum()), "fallback": int((~ok).sum()),
            "seconds": round(seconds, 2), "seconds_per_study": per_phase,
            "first_study_seconds": float(finished[0]) if len(finished) else float("nan"),
            "steady_state_seconds_per_study": steady,
            "statuses": timing["status"].value_counts().to_dict(), "out": str(out)}


def _arguments(parser) -> None:
    parser.add_argument("--models-dir", default=None,
                        help="folder with stage1/<run>/fold*/best.pt and stage2/... (default: --work-dir)")
    parser.add_argument("--out", default="submission.csv")
    parser.add_argument("--test-csv", default=None, help="default: <data-dir>/test.csv")
    parser.add_argument("--time-budget", type=float, default=None, help="hours (default from the config)")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cmd = parse_command("Write submission.csv for the studies of test.csv.", "submission.yaml",
                        SubmissionConfig, argv, _arguments)
    args, cfg = cmd.args, cmd.cfg
    if args.time_budget is not None:
        cfg = replace(cfg, time_budget_hours=args.time_budget)
    models_dir = Path(args.models_dir) if args.models_dir else cmd.work_dir
    test_csv = Path(args.test_csv) if args.test_csv else None
    return run(cfg, cmd.data_dir, models_dir, Path(args.out), test_csv)


if __name__ == "__main__":
    main()
