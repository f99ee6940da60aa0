"""Tiny stage-1/stage-2 checkpoints (random weights, real configs) and a tiny dataset for end-to-end tests."""
from __future__ import annotations

from pathlib import Path

from tooling.bench.pipeline import write_models
from common.config import load_config
from tooling.synth import make_dataset
from stage1_seg.config import Stage1Config
from stage2_cls.config import Stage2Config

STAGE1_OVERRIDES = ["run=tiny", "preprocess.size=32", "model.encoder=efficientnet-b0",
                    "model.decoder_channels=[16,16,8,8,8]", "predict.threshold=0.5"]
# pretrained=true as in the real configs: rebuilding these checkpoints (make_submission, the
# offline notebook) must never look for ImageNet weights.
STAGE2_OVERRIDES = ["run=tiny", "crop.size=32", "crop.n_slices=5", "model.backbone=convnext_atto",
                    "model.pretrained=true", "model.lstm_hidden=16", "model.lstm_layers=1"]


def write_tiny_models(models_dir: Path, n_folds: int = 1) -> dict[str, str]:
    """Random-weight fold checkpoints laid out as make_submission expects; returns the globs."""
    write_models(models_dir, n_folds, load_config(Stage1Config, None, STAGE1_OVERRIDES),
                 load_config(Stage2Config, None, STAGE2_OVERRIDES))
    return {"stage1_checkpoints": "stage1/tiny/fold*/best.pt", "stage2_checkpoints": "stage2/tiny/fold*/best.pt",
            "ensemble": "stage2/ensemble.json"}


def write_tiny_dataset(data_dir: Path, n_test: int = 3) -> dict:
    return make_dataset(data_dir, n_train=4, n_seg=2, n_test=n_test, size=48, seed=5, workers=1)
