"""The one training loop, shared by both stages.

A stage supplies a :class:`Task` (model builder, datasets, batch-to-loss step,
batch-to-outputs step and the metric); :func:`fit` does the rest: device and
AMP, DDP under ``torchrun``, AdamW with warm-up and cosine decay, gradient
clipping, atomic ``last.pt``/``best.pt`` every epoch, ``--resume``, ``log.csv``,
``metrics.json`` and learning-curve PNGs.
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm.auto import tqdm

from common import distributed as D
from common.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint
from common.io import write_csv_atomic, write_json_atomic
from common.plots import plot_learning_curves

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 2
    val_batch_size: int = 2
    lr: float = 3e-3
    weight_decay: float = 1e-2
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0          # max gradient norm; 0 turns clipping off
    amp: bool = True                # only takes effect on CUDA
    num_workers: int = 2
    seed: int = 42
    val_every: int = 1              # validate every N epochs (and always on the last)


class Task(Protocol):
    """What a stage gives the loop. Batches are dicts of tensors."""

    stage: str            # "stage1" / "stage2": stamped into checkpoints
    metric: str           # key of compute_metrics() used to pick best.pt
    metric_mode: str      # "max" or "min"

    def build_model(self, pretrained_source: bool = True) -> nn.Module: ...  # False: weights come from last.pt
    def datasets(self) -> tuple[Dataset, Dataset]: ...
    def loss(self, model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor: ...
    def predict_batch(self, model: nn.Module, batch: dict, device: torch.device) -> dict[str, np.ndarray]: ...
    def compute_metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, float]: ...
    def on_best(self, outputs: dict[str, np.ndarray], out_dir: Path) -> None: ...


def autocast_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA where supported, fp16 otherwise; nothing on CPU."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float):
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio``."""
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def _worker_init(worker_id: int) -> None:
    # torch seeds each worker from the loader's base seed; give NumPy the same stream.
    np.random.seed(torch.initial_seed() % 2**32)


def param_checksum(model: nn.Module) -> float:
    """A float fingerprint of the weights (used to check DDP ranks stay in sync)."""
    with torch.no_grad():
        return float(sum(p.double().sum().item() * (i + 1) for i, p in enumerate(model.parameters())))


class _Loop:
    """State of one training run; :func:`fit` is the public entry point."""

    def __init__(self, task: Task, cfg: TrainConfig, out_dir: Path, fold: int,
                 full_config: dict[str, Any], resume: bool = False) -> None:
        self.task, self.cfg, self.out_dir, self.fold, self.full_config = task, cfg, out_dir, fold, full_config
        self.dist = D.init_distributed()
        self.device = self.dist.device
        seed_everything(cfg.seed)  # identical initial weights on every rank
        # Built first, before any data work, so a missing pretrained source stops the run at once;
        # a resumed run takes every weight from last.pt and never needs that source.
        resuming = resume and (out_dir / "last.pt").exists()
        self.model = task.build_model(pretrained_source=not resuming).to(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.train_set, self.val_set = task.datasets()
        self.sampler = DistributedSampler(self.train_set, num_replicas=self.dist.world_size,
                                          rank=self.dist.rank, shuffle=True, seed=cfg.seed)
        pin = self.device.type == "cuda"
        self.train_loader = DataLoader(self.train_set, batch_size=cfg.batch_size, sampler=self.sampler,
                                       num_workers=cfg.num_workers, pin_memory=pin,
                                       # a lone last sample would break BatchNorm at a 1-voxel bottleneck
                                       drop_last=len(self.sampler) > cfg.batch_size,
                                       worker_init_fn=_worker_init)
        self.val_loader = DataLoader(self.val_set, batch_size=cfg.val_batch_size, num_workers=cfg.num_workers,
                                     sampler=D.ShardSampler(len(self.val_set), self.dist.rank, self.dist.world_size),
                                     pin_memory=pin, worker_init_fn=_worker_init)
        self.net = self.model
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = max(1, len(self.train_loader))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(cfg.epochs * steps, int(cfg.warmup_epochs * steps), cfg.min_lr_ratio))
        self.amp = cfg.amp and self.device.type == "cuda"
        fp16 = self.amp and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.history: list[dict[str, float]] = []
        self.best: float | None = None
        self.start_epoch = 0

    # ---- checkpoints -------------------------------------------------------------
    def _state(self, epoch: int) -> dict[str, Any]:
        return dict(model_state=self.model.state_dict(), config=self.full_config, fold=self.fold,
                    epoch=epoch, optimizer=self.optimizer.state_dict(),
                    scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
                    rng=rng_state(), history=self.history, best=self.best,
                    metric=self.task.metric)

    def resume(self) -> None:
        path = self.out_dir / "last.pt"
        if not path.exists():
            log.info("no %s yet: starting from scratch", path)
            return
        ckpt = load_checkpoint(path, stage=self.task.stage, map_location=self.device)
        if ckpt["config"] != self.full_config:
            raise CheckpointError(f"{path}: was written with a different config; "
                                  "resume with the same config or use a new work dir")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.history, self.best = list(ckpt["history"]), ckpt["best"]
        self.start_epoch = ckpt["epoch"] + 1
        log.info("resumed from %s at epoch %d", path, self.start_epoch)

    # ---- one epoch ---------------------------------------------------------------
    def train_epoch(self, epoch: int) -> float:
        # Reseed from (seed, epoch, rank) so a resumed run replays exactly the same epochs.
        seed_everything(self.cfg.seed * 1000 + epoch * 16 + self.dist.rank)
        self.sampler.set_epoch(epoch)
        self.net.train()
        total, count = 0.0, 0
        bar = tqdm(self.train_loader, desc=f"{self.task.stage} fold {self.fold} epoch {epoch + 1}/{self.cfg.epochs}",
                   disable=not self.dist.is_main, leave=False, dynamic_ncols=True)
        for batch in bar:
            with autocast_context(self.device, self.amp):
                loss = self.task.loss(self.net, batch, self.device)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at epoch {epoch + 1}")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.cfg.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            size = len(next(iter(batch.values())))
            total += float(loss.detach()) * size
            count += size
            bar.set_postfix(loss=f"{total / max(count, 1):.4f}")
        return D.all_reduce_mean(total / max(count, 1), self.device)

    @torch.no_grad()
    def validate(self) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        self.model.eval()
        parts: list[dict[str, np.ndarray]] = []
        for batch in tqdm(self.val_loader, desc="validate", disable=not self.dist.is_main, leave=False):
            with autocast_context(self.device, self.amp):
                parts.append(self.task.predict_batch(self.model, batch, self.device))
        local = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
        gathered = D.all_gather_objects((self.val_loader.sampler.indices, local))
        outputs = _merge_in_dataset_order(gathered)
        metrics = self.task.compute_metrics(outputs) if self.dist.is_main else {}
        return D.broadcast_object(metrics), outputs

    # ---- the run -----------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, task = self.cfg, self.task
        metrics: dict[str, float] = {}
        for epoch in range(self.start_epoch, cfg.epochs):
            started = time.time()
            train_loss = self.train_epoch(epoch)
            row: dict[str, float] = {"epoch": epoch + 1, "train_loss": train_loss,
                                     "lr": self.optimizer.param_groups[0]["lr"]}
            improved = False
            if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
                metrics, outputs = self.validate()
                row.update(metrics)
                value = metrics[task.metric]
                improved = self.best is None or (value > self.best if task.metric_mode == "max" else value < self.best)
                if improved:
                    self.best = value
                    if self.dist.is_main:
                        task.on_best(outputs, self.out_dir)
            row["seconds"] = time.time() - started
            self.history.append(row)
            if self.dist.is_main:
                self._write_epoch(epoch, improved)
            D.barrier()
        return self._finish()

    def _write_epoch(self, epoch: int, improved: bool) -> None:
        row = self.history[-1]
        shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch",) and isinstance(v, float))
        log.info("epoch %d/%d: %s%s", epoch + 1, self.cfg.epochs, shown, " (best)" if improved else "")
        state = self._state(epoch)
        save_checkpoint(self.out_dir / "last.pt", stage=self.task.stage, **state)
        if improved:
            save_checkpoint(self.out_dir / "best.pt", stage=self.task.stage, **state)
        write_csv_atomic(self.out_dir / "log.csv", pd.DataFrame(self.history))
        plot_learning_curves(self.history, self.out_dir / "learning_curves.png", self.task.metric,
                             title=f"{self.task.stage} fold {self.fold}")

    def _finish(self) -> dict[str, Any]:
        checksums = D.all_gather_objects(param_checksum(self.model))
        scored = [r for r in self.history if self.task.metric in r]
        if not scored:
            raise RuntimeError("training ran no validation: nothing to report")
        pick = max if self.task.metric_mode == "max" else min
        best_row = pick(scored, key=lambda r: r[self.task.metric])
        result = {**{k: v for k, v in best_row.items() if k not in ("lr", "seconds")},
                  "best_epoch": best_row["epoch"], "epochs": self.cfg.epochs, "fold": self.fold,
                  "last": {k: v for k, v in self.history[-1].items()},
                  "world_size": self.dist.world_size, "rank_weight_checksums": checksums,
                  "train_seconds": float(sum(r["seconds"] for r in self.history))}
        if self.dist.is_main:
            write_json_atomic(self.out_dir / "metrics.json", result)
        return result


def _merge_in_dataset_order(gathered: list[tuple[list[int], dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """Concatenate per-rank outputs and sort them back into dataset order."""
    indices = np.concatenate([np.asarray(idx, dtype=np.int64) for idx, _ in gathered])
    keys = next((out.keys() for _, out in gathered if out), [])
    order = np.argsort(indices, kind="stable")
    return {k: np.concatenate([out[k] for _, out in gathered if out])[order] for k in keys}


def fit(task: Task, cfg: TrainConfig, out_dir: str | Path, *, fold: int,
        full_config: dict[str, Any], resume: bool = False) -> dict[str, Any]:
    """Train ``task`` and return the metrics written to ``out_dir/metrics.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loop = _Loop(task, cfg, out_dir, fold, full_config, resume)
    try:
        if resume:
            loop.resume()
        return loop.run()
    finally:
        D.shutdown_distributed()
