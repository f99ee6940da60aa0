"""Train the stage-1 vertebra segmenter on one fold of the segmented studies.

    python -m stage1_seg.train --fold 0 [--resume] [--data-dir D] [--work-dir W] [key=value ...]
    torchrun --nproc_per_node 2 -m stage1_seg.train --fold 0
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # smp-3d warns about timm internals on import
    from segmentation_models_pytorch_3d.losses import DiceLoss

from common import distributed as D
from common.cli import add_fold_arguments, parse_command
from common.config import to_dict
from common.constants import VERTEBRAE
from common.folds import fold_split
from common.trainer import fit
from stage1_seg.augment import augment_batch, mixup
from stage1_seg.config import Stage1Config
from stage1_seg.data import SegDataset, check_cube_shape, prepare_cache, with_cervical_labels
from stage1_seg.model import as_model_input, build_model, check_pretrained, class_probs

log = logging.getLogger(__name__)
_DICE = DiceLoss(mode="multilabel", from_logits=True, smooth=1.0)
_DICE_PROBS = DiceLoss(mode="multilabel", from_logits=False, smooth=1.0)

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


def seg_loss(logits: torch.Tensor, target: torch.Tensor, bce_weight: float, dice_weight: float,
             head: str = "sigmoid") -> torch.Tensor:
    """``bce_weight`` x cross-entropy + ``dice_weight`` x soft Dice loss; soft targets ``(B, 7, D, H, W)``.

    Sigmoid head (logits ``(B, 7, ...)``): per-class BCE. Softmax head (``(B, 8, ...)``, background
    first): cross-entropy against the target with its background (1 - the vertebrae) added.
    The Dice term is smp's multilabel soft Dice over C1..C7 (per class over the whole batch,
    smoothing 1), the batch-level soft Dice of the winners' stage 1.
    """
    logits = logits.float()
    if head == "softmax":
        background = (1 - target.sum(1, keepdim=True)).clamp(0, 1)
        ce = F.cross_entropy(logits, torch.cat([background, target], dim=1))
        return bce_weight * ce + dice_weight * _DICE_PROBS(class_probs(logits, head), target)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    return bce_weight * bce + dice_weight * _DICE(logits, target)


def dice_counts(probs: torch.Tensor, target: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-sample Dice ingredients at each threshold in ``THRESHOLDS``.

    probs, target: ``(B, 7, D, H, W)``; the target is binarised at 0.5.
    Returns ``inter`` and ``pred`` of shape (B, T, 7) and ``true`` of shape (B, 7).
    """
    truth = target >= 0.5
    inter, pred = [], []
    for t in THRESHOLDS:  # one class list per threshold: never a shared, aliased list
        hit = probs >= t
        inter.append((hit & truth).sum((2, 3, 4)))
        pred.append(hit.sum((2, 3, 4)))
    return {"inter": torch.stack(inter, 1).double().cpu().numpy(),
            "pred": torch.stack(pred, 1).double().cpu().numpy(),
            "true": truth.sum((2, 3, 4)).double().cpu().numpy()}


def dice_metrics(outputs: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean over studies of per-class Dice; empty-vs-empty counts as 1."""
    inter, pred, true = outputs["inter"], outputs["pred"], outputs["true"][:, None, :]
    denom = pred + true
    dice = np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0).mean(0)  # (T, 7)
    best = int(np.argmax(dice.mean(1)))
    at_half = dice[THRESHOLDS.index(0.5)]
    metrics = {"mean_dice": float(at_half.mean())}
    metrics.update({f"dice_{name}": float(at_half[c]) for c, name in enumerate(VERTEBRAE)})
    metrics.update({f"mean_dice@{t}": float(dice[i].mean()) for i, t in enumerate(THRESHOLDS)})
    metrics["best_threshold"] = float(THRESHOLDS[best])
    if "loss" in outputs:
        metrics["val_loss"] = float(outputs["loss"].mean())
    return metrics


def supervised_loss(output: torch.Tensor | tuple, target: torch.Tensor, cfg: Stage1Config) -> torch.Tensor:
    """:func:`seg_loss` of the model's output; with deep supervision (``(logits, [coarser, ...])``)
    the coarser logits are scored against the target averaged down to their size, weights
    1, 1/2, 1/4, ... normalised to sum 1. Logits smaller than the target (``model.loss_at_head``)
    are scored the same way."""
    def loss(logits, truth):
        if logits.shape[2:] != truth.shape[2:]:
            truth = F.adaptive_avg_pool3d(truth, logits.shape[2:])
        return seg_loss(logits, truth, cfg.loss.bce_weight, cfg.loss.dice_weight, cfg.model.head)

    if not isinstance(output, tuple):
        return loss(output, target)
    logits, coarse = output
    weights = [0.5 ** i for i in range(len(coarse) + 1)]
    total = weights[0] * loss(logits, target)
    for weight, aux in zip(weights[1:], coarse):
        total = total + weight * loss(aux, target)
    return total / sum(weights)


def training_batch(cfg: Stage1Config, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A loaded training batch (``image`` (B, 1, D, H, W), ``target`` (B, 7, D, H, W)) augmented on
    ``device``, mixed up, and its image repeated to ``model.in_channels``."""
    image, target = batch["image"].to(device, non_blocking=True), batch["target"].to(device, non_blocking=True)
    image, target = augment_batch(image, target, cfg.augment)
    image, target = mixup(image, target, cfg.augment.mixup_p)
    return image.expand(-1, cfg.model.in_channels, -1, -1, -1), target


def batch_loss(cfg: Stage1Config, model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    """The training loss of one loaded batch (:func:`training_batch`)."""
    image, target = training_batch(cfg, batch, device)
    return supervised_loss(model(as_model_input(image)), target, cfg)


class SegTask:
    stage = "stage1"
    metric = "mean_dice"
    metric_mode = "max"

    def __init__(self, cfg: Stage1Config, data_dir: Path, work_dir: Path, train_uids: Sequence[str],
                 val_uids: Sequence[str]) -> None:
        self.cfg, self.data_dir, self.work_dir = cfg, data_dir, work_dir
        self.train_uids, self.val_uids = list(train_uids), list(val_uids)

    def build_model(self, pretrained_source: bool = True) -> nn.Module:
        return build_model(self.cfg.model, pretrained_source=pretrained_source)

    def datasets(self):
        info = D.init_distributed()
        cache = None
        if info.is_main:
            cache = prepare_cache(self.train_uids + self.val_uids, self.data_dir, self.work_dir,
                                  self.cfg.preprocess, workers=max(1, self.cfg.train.num_workers))
        cache = D.broadcast_object(cache)
        channels = self.cfg.model.in_channels
        train, val = (with_cervical_labels(uids, cache) for uids in (self.train_uids, self.val_uids))
        # The training set gives one channel: batch_loss augments it, then repeats it to in_channels.
        return SegDataset(train, cache), SegDataset(val, cache, channels)

    def loss(self, model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
        return batch_loss(self.cfg, model, batch, device)

    def predict_batch(self, model: nn.Module, batch: dict, device: torch.device) -> dict[str, np.ndarray]:
        image, target = batch["image"].to(device), batch["target"].to(device)
        logits = model(as_model_input(image)).float()
        head = self.cfg.model.head
        out = dice_counts(class_probs(logits, head), target)
        losses = [seg_loss(logits[i:i + 1], target[i:i + 1], self.cfg.loss.bce_weight, self.cfg.loss.dice_weight,
                           head) for i in range(len(logits))]
        out["loss"] = torch.stack(losses).cpu().numpy()
        return out

    def compute_metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        return dice_metrics(outputs)

    def on_best(self, outputs: dict[str, np.ndarray], out_dir: Path) -> None:
        pass


def run(cfg: Stage1Config, data_dir: Path, work_dir: Path, fold: int, resume: bool = False) -> dict[str, Any]:
    """Train one fold; returns the metrics written to ``work/stage1/<run>/fold<k>/metrics.json``."""
    check_cube_shape(cfg.preprocess)
    out_dir = Path(work_dir) / "stage1" / cfg.run / f"fold{fold}"
    if not (resume and (out_dir / "last.pt").exists()):  # a resumed run takes every weight from last.pt
        check_pretrained(cfg.model)  # no ImageNet source: stop now, before folds and the cache
    train_uids, val_uids = fold_split(data_dir, work_dir, fold, "seg_fold")
    log.info("stage 1 fold %d: %d training and %d validation studies", fold, len(train_uids), len(val_uids))
    task = SegTask(cfg, Path(data_dir), Path(work_dir), train_uids, val_uids)
    return fit(task, cfg.train, out_dir, fold=fold, full_config=to_dict(cfg), resume=resume)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    cmd = parse_command("Train the stage-1 C1-C7 segmenter on one fold.", "stage1.yaml", Stage1Config,
                        argv, add_fold_arguments)
    return run(cmd.cfg, cmd.data_dir, cmd.work_dir, cmd.args.fold, cmd.args.resume)


if __name__ == "__main__":
    main()
