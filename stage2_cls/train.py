"""Train the stage-2 vertebra classifier on one fold.

    python -m stage2_cls.train --fold 0 [--resume] [--data-dir D] [--work-dir W] [key=value ...]
    torchrun --nproc_per_node 2 -m stage2_cls.train --fold 0

Outputs go to ``W/stage2/<run>/fold<K>/`` (checkpoints, log.csv, metrics.json,
config.yaml) and the best epoch's out-of-fold predictions to
``W/stage2/<run>/oof_fold<K>.csv`` (StudyInstanceUID, C1..C7, patient_overall).

Loss: binary cross-entropy with the metric's vertebra weights (positive 2,
negative 1), normalised by the batch's weight sum: ``sum(w * l) / sum(w)``.
With ``pooling: mean`` the loss of a sample is the mean over its slices of the
per-slice BCE against the vertebra label (the winners' recipe: every slice of a
fractured vertebra is pushed up); with ``pooling: attention`` it is the BCE of
the attention-pooled vertebra logit. Validation scores the vertebra
probability (mean of slice probabilities, or the attention output) instead.
With ``model.box_head_weight > 0`` an auxiliary per-slice loss on the slices
``train_bounding_boxes.csv`` marks is added (``stage2_cls.slice_labels``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from common.cli import add_fold_arguments, parse_command
from common.config import replace, to_dict
from common.constants import PRED_CLIP, STUDY_COL, TARGETS, VERTEBRAE
from common.folds import fold_split
from common.io import write_csv_atomic
from common.metric import (best_constant, competition_score, constant_score, label_weights, pooled_score,
                           read_labels_csv)
from common.trainer import fit
from stage2_cls.augment import StackAugmenter, mixup
from stage2_cls.calibration import calibrated_validation_score
from stage2_cls.config import Stage2Config, for_model_type
from stage2_cls.dataset import (CropStore, StudyDataset, VertebraDataset, available_crops, fill_missing,
                                prepare_images)
from stage2_cls.infer import study_probabilities
from stage2_cls.model import (box_loss, build_model, check_pretrained, check_smoothing, study_loss,
                              predict_logits, weighted_loss)
from stage2_cls.slice_labels import read_box_slices

log = logging.getLogger(__name__)


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(roc_auc_score(y, p)) if 0 < y.sum() < len(y) else float("nan")


def batch_loss(cfg: Stage2Config, model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    """The training loss of one batch (``image`` uint8 (B, S, C, H, W), ``label``, ``weight``), mixup included.

    With an auxiliary slice head (``model.box_head_weight > 0``) its loss on the batch's
    ``box_target`` / ``box_known`` is added with that weight.
    """
    images = prepare_images(batch["image"], device)
    label, weight = batch["label"].to(device), batch["weight"].to(device)
    box_weight = cfg.model.box_head_weight
    if box_weight > 0:
        target, known = batch["box_target"].to(device), batch["box_known"].to(device)

    def loss(output: dict, index: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        value = weighted_loss(output, label[index], weight[index], cfg.label_smoothing)
        if box_weight > 0:
            value = value + box_weight * box_loss(output, target[index], known[index])
        return value

    aug = cfg.augment
    if aug.mixup_p > 0 and len(images) > 1 and np.random.random() < aug.mixup_p:
        images, perm, lam = mixup(images, aug.mixup_alpha)
        output = model(images)
        return lam * loss(output) + (1.0 - lam) * loss(output, perm)
    return loss(model(images))


class ClassifierTask:
    """The stage-2 :class:`common.trainer.Task`."""

    stage = "stage2"
    # select=best keeps the validation with the best score after the calibration the report would
    # fit (stage2_cls.calibration.calibrated_validation_score): not the raw score that calibration moves.
    metric = "calibrated_score"
    metric_mode = "min"

    def __init__(self, cfg: Stage2Config, crops_dir: Path, run_dir: Path, fold: int,
                 train_uids: Sequence[str], val_uids: Sequence[str], labels: pd.DataFrame,
                 decoded_dir: Path | None = None, box_slices: dict[str, np.ndarray] | None = None) -> None:
        check_smoothing(cfg.label_smoothing)
        self.cfg, self.crops_dir, self.run_dir, self.fold = cfg, crops_dir, run_dir, fold
        self.train_uids, self.val_uids = list(train_uids), list(val_uids)
        table = labels.set_index(STUDY_COL)
        self.train_labels = table.loc[self.train_uids, list(TARGETS)].to_numpy(np.float64)
        self.val_labels = table.loc[self.val_uids, list(TARGETS)].to_numpy(np.float64)
        # Missing vertebrae get the training fold's best constant (what an empty input deserves).
        self.prior = best_constant(self.train_labels)[: len(VERTEBRAE)]
        self.decoded_dir = decoded_dir
        self.box_slices = box_slices  # {uid: InstanceNumbers with a fracture box}, or None

    def build_model(self, pretrained_source: bool = True) -> nn.Module:
        return build_model(self.cfg.model, pretrained_source=pretrained_source)

    def _store(self, uids: list[str]) -> CropStore:
        store = CropStore(self.crops_dir, uids, self.cfg.lru_studies, self.decoded_dir)
        if self.cfg.preload_mb > 0 and store.preload(self.cfg.preload_mb * 2**20):
            log.info("decoded %d crop files into memory", len(uids))
        return store

    def datasets(self) -> tuple[VertebraDataset, VertebraDataset]:
        vertebrae = slice(0, len(VERTEBRAE))
        train = VertebraDataset(self._store(self.train_uids), self.train_labels[:, vertebrae], train=True,
                                augment=StackAugmenter(self.cfg.augment),
                                positive_oversampling=self.cfg.positive_oversampling,
                                box_slices=self.box_slices if self.cfg.model.box_head_weight > 0 else None,
                                context=self.cfg.crop.context)
        val = VertebraDataset(self._store(self.val_uids), self.val_labels[:, vertebrae], train=False)
        return train, val

    def loss(self, model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
        return batch_loss(self.cfg, model, batch, device)

    def predict_batch(self, model: nn.Module, batch: dict, device: torch.device) -> dict[str, np.ndarray]:
        logits = predict_logits(model, prepare_images(batch["image"], device), tta=self.cfg.tta)
        return {"prob": torch.sigmoid(logits["vertebra_logit"]).cpu().numpy(),
                "study_index": batch["study_index"].numpy(),
                "vertebra": batch["vertebra"].numpy(),
                "missing": batch["missing"].numpy()}

    def study_table(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """Per-sample outputs -> (N_val, 8) probabilities in TARGETS order."""
        n = len(self.val_uids)
        probs = np.full((n, len(VERTEBRAE)), np.nan)
        missing = np.zeros((n, len(VERTEBRAE)), bool)
        rows, cols = outputs["study_index"].astype(int), outputs["vertebra"].astype(int)
        probs[rows, cols] = outputs["prob"]
        missing[rows, cols] = outputs["missing"].astype(bool)
        if np.isnan(probs).any():
            raise RuntimeError(f"validation left {int(np.isnan(probs).sum())} (study, vertebra) pairs unpredicted")
        return study_probabilities(fill_missing(probs, missing, self.prior), self.cfg.overall)

    def compute_metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        y, p = self.val_labels, self.study_table(outputs)
        yv, pv = y[:, :7], p[:, :7]
        w = label_weights(y)[:, :7]
        bce = -(yv * np.log(pv) + (1 - yv) * np.log(1 - pv))
        return {"score": competition_score(y, p), "calibrated_score": calibrated_validation_score(y, p),
                "pooled_score": pooled_score(y, p),
                "constant_score": constant_score(y, best_constant(y)),
                "auc_vertebra": _auc(yv.ravel(), pv.ravel()), "auc_overall": _auc(y[:, 7], p[:, 7]),
                "val_loss": float((w * bce).sum() / w.sum())}

    def on_best(self, outputs: dict[str, np.ndarray], out_dir: Path) -> None:
        table = pd.DataFrame(self.study_table(outputs), columns=list(TARGETS))
        table.insert(0, STUDY_COL, self.val_uids)
        write_csv_atomic(self.run_dir / f"oof_fold{self.fold}.csv", table[[STUDY_COL, *TARGETS]])


def study_batch_loss(cfg: Stage2Config, model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    """The type-2 loss of one batch of whole studies (the competition metric per study)."""
    images = prepare_images(batch["image"], device)
    missing = batch["missing"].to(device)
    return study_loss(model(images, missing), batch["labels"].to(device), missing, cfg.label_smoothing)


class PatientTask(ClassifierTask):
    """The type-2 task: whole studies in, seven vertebra probabilities and a learned patient_overall out."""

    def datasets(self) -> tuple[StudyDataset, StudyDataset]:
        train = StudyDataset(self._store(self.train_uids), self.train_labels, StackAugmenter(self.cfg.augment),
                             shuffle_p=self.cfg.augment.vertebra_shuffle_p)
        return train, StudyDataset(self._store(self.val_uids), self.val_labels)

    def loss(self, model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
        return study_batch_loss(self.cfg, model, batch, device)

    def predict_batch(self, model: nn.Module, batch: dict, device: torch.device) -> dict[str, np.ndarray]:
        logits = predict_logits(model, prepare_images(batch["image"], device), batch["missing"].to(device),
                                tta=self.cfg.tta)
        return {"prob": torch.sigmoid(logits["vertebra_logit"]).cpu().numpy(),
                "overall": torch.sigmoid(logits["overall_logit"]).cpu().numpy(),
                "study_index": batch["study_index"].numpy(), "missing": batch["missing"].numpy()}

    def study_table(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        """Per-study outputs -> (N_val, 8): vertebrae (the prior where missing), the learned overall."""
        order = np.argsort(outputs["study_index"])
        probs = fill_missing(outputs["prob"][order], outputs["missing"][order].astype(bool), self.prior)
        table = study_probabilities(probs)
        table[:, -1] = np.clip(outputs["overall"][order], *PRED_CLIP)
        return table


def fold_studies(data_dir: Path, work_dir: Path, fold: int) -> tuple[list[str], list[str], pd.DataFrame]:
    """(train UIDs, validation UIDs, train.csv labels) for ``fold``, keeping studies with a crop file."""
    train_uids, val_uids = fold_split(data_dir, work_dir, fold)
    crops_dir = work_dir / "crops"
    train_uids, lack_train = available_crops(crops_dir, train_uids)
    val_uids, lack_val = available_crops(crops_dir, val_uids)
    if lack_train or lack_val:
        log.warning("skipping %d training and %d validation studies without a crop file in %s "
                    "(e.g. %s)", len(lack_train), len(lack_val), crops_dir, (lack_train + lack_val)[:3])
    if not train_uids or not val_uids:
        raise FileNotFoundError(f"fold {fold}: {len(train_uids)} training and {len(val_uids)} validation "
                                f"studies have crops in {crops_dir}; run python -m stage2_cls.crop first")
    return train_uids, val_uids, read_labels_csv(data_dir / "train.csv")


def run(cfg: Stage2Config, data_dir: str | Path, work_dir: str | Path, fold: int,
        resume: bool = False) -> dict[str, Any]:
    """Train one fold; returns the metrics written to ``work/stage2/<run>/fold<k>/metrics.json``."""
    data_dir, work_dir = Path(data_dir), Path(work_dir)
    typed = for_model_type(cfg)
    if typed is not cfg:
        changed = {k: v for k, v in to_dict(typed.train).items() if to_dict(cfg.train)[k] != v}
        log.info("type 2: training settings from the config's type2 block: %s", changed or "none differ")
        cfg = typed
    run_dir = work_dir / "stage2" / cfg.run
    out_dir = run_dir / f"fold{fold}"
    if cfg.tta == "flips" and cfg.augment.flip_p <= 0:
        raise ValueError("tta: flips averages flipped views, but augment.flip_p is 0, so the model never "
                         "sees a flipped stack in training; set tta=none or augment.flip_p > 0")
    if not (resume and (out_dir / "last.pt").exists()):  # a resumed run takes every weight from last.pt
        check_pretrained(cfg.model)  # no ImageNet source: stop now, before folds and crops
    train_uids, val_uids, labels = fold_studies(data_dir, work_dir, fold)
    log.info("stage 2 fold %d: %d training and %d validation studies", fold, len(train_uids), len(val_uids))
    decoded = work_dir / "stage2" / "decoded" if cfg.decoded_cache else None
    task_type = PatientTask if cfg.model.type == 2 else ClassifierTask
    box_slices = None
    if cfg.model.box_head_weight > 0:
        if cfg.model.type == 2:
            log.info("model.box_head_weight applies to the type-1 model only; the type-2 model ignores it")
        else:
            box_slices = read_box_slices(data_dir)
    task = task_type(cfg, work_dir / "crops", run_dir, fold, train_uids, val_uids, labels, decoded, box_slices)
    return fit(task, cfg.train, out_dir, fold=fold, full_config=to_dict(cfg), resume=resume)


def _arguments(parser) -> None:
    add_fold_arguments(parser)
    parser.add_argument("--model-type", type=int, choices=(1, 2), default=None,
                        help="1: one vertebra per sample; 2: whole studies with a learned patient_overall "
                             "(sets model.type; its outputs go to work/stage2/<run>-type2 unless run= is given)")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cmd = parse_command("Train the stage-2 vertebra fracture classifier on one fold.", "stage2.yaml",
                        Stage2Config, argv, _arguments)
    cfg = cmd.cfg
    if cmd.args.model_type is not None:
        named = any(o.split("=", 1)[0].strip() == "run" for o in cmd.args.overrides)
        run_name = cfg.run if named or cmd.args.model_type == 1 else f"{cfg.run}-type2"
        cfg = replace(cfg, **{"model.type": cmd.args.model_type, "run": run_name})
    return run(cfg, cmd.data_dir, cmd.work_dir, cmd.args.fold, cmd.args.resume)


if __name__ == "__main__":
    main()
