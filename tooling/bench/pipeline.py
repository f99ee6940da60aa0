"""Seconds per study of the whole submission path, by phase, at real sizes.

    python -m tooling.bench.pipeline [--studies 3] [--size 512] [--slices 300] [--folds 5]

Writes random-weight fold checkpoints built from configs/stage1.yaml and
configs/stage2.yaml (the full 5+5-fold ensemble by default), synthesises test
studies, runs ``make_submission.run`` on them and prints decode / stage 1 /
crops / stage 2 seconds per study beside the Kaggle budget (9 h / 1,500 studies).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Sequence

import torch

import make_submission
from common.checkpoint import save_checkpoint
from common.config import load_config, to_dict
from configs import config_path
from tooling.synth import make_dataset
from stage1_seg.config import Stage1Config
from stage1_seg.model import build_model as build_seg
from stage2_cls.config import Stage2Config
from stage2_cls.model import build_model as build_cls

KAGGLE_SECONDS_PER_STUDY = 9 * 3600 / 1500


def write_models(models: Path, folds: int, cfg1: Stage1Config, cfg2: Stage2Config) -> None:
    """Random-weight fold checkpoints under ``models/stage{1,2}/<run>/fold<k>/best.pt``.

    Random weights on purpose: the configs' ImageNet start (``model.pretrained``)
    is not looked for, so this runs offline; the configs are saved as given.
    """
    for fold in range(folds):
        torch.manual_seed(fold)
        seg = build_seg(cfg1.model, pretrained_source=False)
        save_checkpoint(models / "stage1" / cfg1.run / f"fold{fold}" / "best.pt", stage="stage1",
                        model_state=seg.state_dict(), config=to_dict(cfg1), fold=fold, epoch=0)
        cls = build_cls(cfg2.model, pretrained_source=False)
        save_checkpoint(models / "stage2" / cfg2.run / f"fold{fold}" / "best.pt", stage="stage2",
                        model_state=cls.state_dict(), config=to_dict(cfg2), fold=fold, epoch=0)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--stage1", nargs="*", default=[], help="stage-1 config overrides")
    parser.add_argument("--stage2", nargs="*", default=[], help="stage-2 config overrides")
    parser.add_argument("--work", default=None, help="keep the data and models here (default: a temp dir)")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.work or tmp)
        make_dataset(root / "data", n_train=2, n_seg=0, n_test=args.studies, size=args.size, seed=0,
                     n_slices=args.slices)
        cfg1 = load_config(Stage1Config, config_path("stage1.yaml"), ["run=bench", *args.stage1])
        cfg2 = load_config(Stage2Config, config_path("stage2.yaml"), ["run=bench", *args.stage2])
        write_models(root / "models", args.folds, cfg1, cfg2)
        for name, prefetch in (("sequential", 0), ("prefetch", 1)):  # the baseline first, same machine, same run
            cfg = make_submission.SubmissionConfig(stage1_checkpoints="stage1/bench/fold*/best.pt",
                                                   stage2_checkpoints="stage2/bench/fold*/best.pt", prefetch=prefetch)
            results[name] = make_submission.run(cfg, root / "data", root / "models", root / f"{name}.csv")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\n{args.studies} studies of {args.slices}x{args.size}x{args.size}, {args.folds}+{args.folds} "
          f"fold models, device {device}; mean seconds per study by phase (decode runs in a background "
          "thread with prefetch, wait is what the networks waited for it)")
    print(f"{'phase':28} " + " ".join(f"{name:>11}" for name in results))
    for phase in make_submission.PHASES:
        print(f"{phase:28} " + " ".join(f"{r['seconds_per_study'][phase]:11.3f}" for r in results.values()))
    for key, label in (("first_study_seconds", "first study (warm-up)"),
                       ("steady_state_seconds_per_study", "steady state s/study")):
        print(f"{label:28} " + " ".join(f"{r[key]:11.3f}" for r in results.values()))
    print(f"Kaggle budget {KAGGLE_SECONDS_PER_STUDY:.1f} s/study")
    return results


if __name__ == "__main__":
    main()
