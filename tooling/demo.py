"""The whole pipeline on a synthetic RSNA-format dataset, on a laptop CPU.

    python -m tooling.demo --out demo        (make demo)

Makes the dataset, trains stage 1 and stage 2 (one fold each, demo configs),
predicts masks and boxes, cuts the crops, writes ``submission.csv`` for the
synthetic test studies and scores it against their hidden labels beside the
constant prior. Every step resumes: run it again and finished steps are skipped.
The figures land in ``<out>/report/``.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

import make_submission
from common.cli import setup_logging
from configs import config_path
from common.config import load_config
from common.constants import TARGETS
from common.metric import constant_score, evaluate_submission, read_labels_csv
from tooling.synth import make_dataset
from stage1_seg import predict as stage1_predict
from stage1_seg import train as stage1_train
from stage1_seg.config import Stage1Config
from stage2_cls import crop as stage2_crop
from stage2_cls import report as stage2_report
from stage2_cls import train as stage2_train
from stage2_cls.config import Stage2Config

log = logging.getLogger("demo")


def _step(name: str, done: bool, action: Callable[[], Any], timings: dict[str, float]) -> Any:
    if done:
        log.info("== %s: already done, skipped", name)
        return None
    log.info("== %s", name)
    started = time.perf_counter()
    result = action()
    timings[name] = round(time.perf_counter() - started, 1)
    log.info("== %s: %.1f s", name, timings[name])
    return result


def run(out: Path, n_train: int, n_seg: int, n_test: int, size: int, seed: int, fold: int = 0,
        overrides1: Sequence[str] = (), overrides2: Sequence[str] = ()) -> dict[str, Any]:
    data, work = out / "data", out / "work"
    cfg1 = load_config(Stage1Config, config_path("demo/stage1.yaml"), [f"predict.folds=[{fold}]", *overrides1])
    cfg2 = load_config(Stage2Config, config_path("demo/stage2.yaml"), overrides2)
    sub_cfg = load_config(make_submission.SubmissionConfig, config_path("demo/submission.yaml"))
    s1_dir, s2_dir = work / "stage1" / cfg1.run, work / "stage2" / cfg2.run
    timings: dict[str, float] = {}
    started = time.perf_counter()

    _step("synthetic dataset", (data / "test_labels.csv").is_file(),
          lambda: make_dataset(data, n_train, n_seg, n_test, size, seed), timings)
    _step("stage 1 training", (s1_dir / f"fold{fold}" / "metrics.json").is_file(),
          lambda: stage1_train.run(cfg1, data, work, fold, resume=True), timings)
    _step("stage 1 prediction", (s1_dir / "boxes.csv").is_file(),
          lambda: stage1_predict.run(cfg1, data, work, ["train"]), timings)
    _step("stage 2 crops", False, lambda: stage2_crop.run(cfg2, data, work, "train"), timings)
    _step("stage 2 training", (s2_dir / f"fold{fold}" / "metrics.json").is_file(),
          lambda: stage2_train.run(cfg2, data, work, fold, resume=True), timings)
    _step("stage 2 report", False, lambda: stage2_report.run(cfg2, data, work), timings)
    submission = out / "submission.csv"
    _step("submission", False,
          lambda: make_submission.run(sub_cfg, data, work, submission), timings)
    result = score(data, submission)
    result["seconds"] = {**timings, "total": round(time.perf_counter() - started, 1)}
    result["stage1"] = json.loads((s1_dir / f"fold{fold}" / "metrics.json").read_text())
    result["stage2"] = json.loads((s2_dir / f"fold{fold}" / "metrics.json").read_text())
    try:
        from tooling.demo_report import write_report
        result["figures"] = write_report(out, data, work, cfg1, cfg2, fold)
    except Exception as exc:  # the figures are a bonus: never lose the score over them
        log.warning("figures not written: %s", exc)
    (out / "demo_result.json").write_text(json.dumps(result, indent=2, default=str))
    print_result(result)
    return result


def score(data: Path, submission: Path) -> dict[str, Any]:
    """The submission's score on the hidden test labels, beside the constant prior's."""
    labels = read_labels_csv(data / "test_labels.csv")
    evaluation = evaluate_submission(labels, pd.read_csv(submission, dtype={"row_id": str}))
    prior = make_submission.load_prior(data)
    y = labels[list(TARGETS)].to_numpy(np.float64)
    return {"score": evaluation["score"], "pooled": evaluation["pooled"],
            "constant_prior_score": constant_score(y, prior),
            "best_constant_on_test_score": evaluation["best_constant_score"],
            "n_test_studies": len(labels)}


def print_result(result: dict[str, Any]) -> None:
    s1 = result["stage1"]
    print("\nstage 1 validation mean Dice %.3f (%s)" % (
        s1["mean_dice"], ", ".join(f"C{c} {s1[f'dice_C{c}']:.2f}" for c in range(1, 8))))
    print("stage 2 validation score %.4f (constant %.4f)" % (
        result["stage2"]["score"], result["stage2"].get("constant_score", float("nan"))))
    print("seconds: %s" % result["seconds"])
    print("test studies: %d" % result["n_test_studies"])
    print("constant prior score  %.4f" % result["constant_prior_score"])
    print("best constant (oracle) %.4f" % result["best_constant_on_test_score"])
    print("submission score      %.4f" % result["score"])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo", help="folder for the data, models and report")
    parser.add_argument("--n-train", type=int, default=48)
    parser.add_argument("--n-seg", type=int, default=24)
    parser.add_argument("--n-test", type=int, default=12)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage1", nargs="*", default=[], metavar="key=value", help="stage-1 overrides")
    parser.add_argument("--stage2", nargs="*", default=[], metavar="key=value", help="stage-2 overrides")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    return run(Path(args.out), args.n_train, args.n_seg, args.n_test, args.size, args.seed,
               overrides1=args.stage1, overrides2=args.stage2)


if __name__ == "__main__":
    main()
