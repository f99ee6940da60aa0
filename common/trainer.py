"""The one training loop, shared by both stages.

A stage supplies a :class:`Task` (model builder, datasets, batch-to-loss step,
batch-to-outputs step and the metric); :func:`fit` does the rest: device and
AMP, DDP under ``torchrun``, AdamW with warm-up and cosine decay, gradient
clipping, an optional exponential moving average (EMA) of the weights,
atomic ``last.pt``/``best.pt``, ``--resume``, ``log.csv``, ``metrics.json``,
``config.yaml`` and learning-curve PNGs.

The schedule is counted in optimiser steps, not passes over the data: a run is
``train.steps`` batches drawn from the training set (consecutive shuffles, so
every sample is seen about equally often), validated every ``train.eval_every``
steps. A 10-study dataset thus gets as many updates as an 80-study one.

Randomness: each period between validations ("chunk") is seeded from
``(train.seed, chunk, rank)``. Data-loader workers derive their seeds from it
and reseed NumPy, Python ``random`` and the dataset's own generators (a dataset
may define ``reseed(seed)``, e.g. for albumentations), so augmentation differs
between workers and chunks, and a resumed run replays the same draws.

Model selection (``train.select``): ``last`` keeps the final weights (the EMA
when enabled): a fixed schedule, immune to the noise of a few validation
studies; ``best`` keeps the weights with the best validation metric. Either
way ``best.pt`` holds the selected weights as of the latest validation, and
``Task.on_best`` receives that validation's outputs.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Protocol

import numpy as np
import pandas as pd
import torch
import yaml
from timm.utils import ModelEmaV2
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info
from tqdm.auto import tqdm

from common import distributed as D
from common.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from common.device import amp_available, amp_dtype, autocast_context
from common.io import remove_stale_temporaries, write_csv_atomic, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000               # optimiser steps in the whole run (the schedule's length)
    eval_every: int = 250           # validate, log and checkpoint every N steps (and at the end)
    batch_size: int = 2
    val_batch_size: int = 2
    lr: float = 3e-3
    weight_decay: float = 1e-2
    warmup_steps: int = 50
    min_lr_ratio: float = 0.01      # the cosine ends at lr * min_lr_ratio
    grad_clip: float = 1.0          # max gradient norm; 0 turns clipping off
    amp: bool = True                # mixed precision on CUDA (common.device)
    cpu_bf16: bool = False          # bf16 autocast on CPUs that run it natively: faster, not bit-reproducible
    num_workers: int = 2
    seed: int = 42
    ema_decay: float = 0.0          # EMA of the weights used for validation and inference; 0: off
    select: Literal["last", "best"] = "last"


class Task(Protocol):
    """What a stage gives the loop. Batches are dicts of tensors."""

    stage: str            # "stage1" / "stage2": stamped into checkpoints
    metric: str           # key of compute_metrics() used by select="best"
    metric_mode: str      # "max" or "min"

    def build_model(self, pretrained_source: bool = True) -> nn.Module: ...  # False: weights come from last.pt
    def datasets(self) -> tuple[Dataset, Dataset]: ...
    def loss(self, model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor: ...
    def predict_batch(self, model: nn.Module, batch: dict, device: torch.device) -> dict[str, np.ndarray]: ...
    def compute_metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, float]: ...
    def on_best(self, outputs: dict[str, np.ndarray], out_dir: Path) -> None: ...


class WeightAverage(ModelEmaV2):
    """timm's ModelEmaV2 (the average in ``.module``) with its update in two foreach calls.

    timm 0.9.7 (pinned by segmentation-models-pytorch-3d) updates tensor by tensor in Python:
    for the demo's stage-1 model (466 tensors) 23.9 ms a step against 13.3 ms here on 2 CPU cores
    (``python -m tooling.bench.stage1``; 29 against 5 ms in a quieter moment), for stage 2's 12.4
    against 1.5 ms (newer timm's ModelEmaV3 also updates with foreach calls). The same
    average up to float rounding; integer buffers (BatchNorm's batch count) are copied, where
    timm's update truncated them to their first value.
    """

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        averages, values = [], []
        for average, value in zip(self.module.state_dict().values(), model.state_dict().values()):
            if average.is_floating_point():
                averages.append(average)
                values.append(value)
            else:
                average.copy_(value)
        torch._foreach_mul_(averages, self.decay)
        torch._foreach_add_(averages, values, alpha=1.0 - self.decay)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def chunk_seed(seed: int, chunk: int, rank: int) -> int:
    """A well-mixed seed for one period between validations of one rank."""
    return int(np.random.SeedSequence([seed, chunk, rank]).generate_state(1)[0])


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float):
    """LR multiplier: linear warm-up to 1, then cosine decay to ``min_ratio``."""
    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class StepSampler(Sampler[int]):
    """``n_samples`` indices from consecutive seeded shuffles of ``range(length)``.

    With ``weights`` (length,), indices are drawn with replacement in proportion to
    them instead (a dataset oversampling a rare class exposes ``sample_weights``).
    """

    def __init__(self, length: int, n_samples: int, seed: int, weights: np.ndarray | None = None) -> None:
        if length < 1:
            raise ValueError("the training set is empty")
        self.length, self.n_samples, self.seed = length, n_samples, seed
        self.weights = None if weights is None else np.asarray(weights, np.float64) / np.sum(weights)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng(self.seed)
        if self.weights is not None:
            return iter(rng.choice(self.length, size=self.n_samples, p=self.weights).tolist())
        passes = -(-self.n_samples // self.length)
        order = np.concatenate([rng.permutation(self.length) for _ in range(passes)])
        return iter(order[: self.n_samples].tolist())

    def __len__(self) -> int:
        return self.n_samples


def reseed_dataset(dataset: Dataset, seed: int) -> None:
    """Seed NumPy and Python ``random`` and the dataset's own generators (``reseed``) from ``seed``."""
    np.random.seed(seed % 2**32)
    random.seed(seed)
    if hasattr(dataset, "reseed"):
        dataset.reseed(seed)


def _worker_init(worker_id: int) -> None:
    # torch seeds each worker with base_seed + worker_id, base_seed drawn from the loader's
    # seeded generator: derive every other generator of the worker from it.
    info = get_worker_info()
    reseed_dataset(info.dataset, torch.initial_seed() % 2**32)


LossFn = Callable[[nn.Module, dict, torch.device], torch.Tensor]


def training_loader(dataset: Dataset, cfg: TrainConfig, n_steps: int, seed: int,
                    pin_memory: bool = False) -> DataLoader:
    """``n_steps`` batches of ``dataset`` for one chunk, every random source seeded from ``seed``.

    Seeds this process (the worker when ``num_workers`` is 0) and the loader's
    generator, from which each worker's seed derives (see ``_worker_init``).
    """
    seed_everything(seed)
    reseed_dataset(dataset, seed)
    return DataLoader(dataset, batch_size=cfg.batch_size, drop_last=True,
                      sampler=StepSampler(len(dataset), n_steps * cfg.batch_size, seed,
                                          getattr(dataset, "sample_weights", None)),
                      num_workers=cfg.num_workers, pin_memory=pin_memory,
                      worker_init_fn=_worker_init, generator=torch.Generator().manual_seed(seed))


def train_step(loss_fn: LossFn, net: nn.Module, batch: dict, device: torch.device,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, amp: bool,
               grad_clip: float) -> torch.Tensor:
    """One optimiser step of ``loss_fn(net, batch, device)``; returns the detached loss.

    The loop and the throughput benchmarks both call this, so what is timed is what trains.
    """
    with autocast_context(device, amp):
        loss = loss_fn(net, batch, device)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"the training loss became {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def make_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler:
    """A gradient scaler that is active only for fp16 autocast (bf16 and fp32 need none)."""
    fp16 = amp and device.type == "cuda" and amp_dtype() == torch.float16
    return torch.amp.GradScaler("cuda", enabled=fp16)


def param_checksum(model: nn.Module) -> float:
    """A float fingerprint of the weights (used to check DDP ranks stay in sync)."""
    with torch.no_grad():
        return float(sum(p.double().sum().item() * (i + 1) for i, p in enumerate(model.parameters())))


class _Loop:
    """State of one training run; :func:`fit` is the public entry point."""

    def __init__(self, task: Task, cfg: TrainConfig, out_dir: Path, fold: int,
                 full_config: dict[str, Any], resume: bool = False) -> None:
        if cfg.steps < 1 or cfg.eval_every < 1:
            raise ValueError(f"train.steps and train.eval_every must be positive, got {cfg.steps}, {cfg.eval_every}")
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
        self.val_loader = DataLoader(self.val_set, batch_size=cfg.val_batch_size, num_workers=cfg.num_workers,
                                     sampler=D.ShardSampler(len(self.val_set), self.dist.rank, self.dist.world_size),
                                     pin_memory=self.device.type == "cuda", worker_init_fn=_worker_init)
        self.net = self.model
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio))
        self.amp = cfg.amp and amp_available(self.device, cfg.cpu_bf16)
        self.scaler = make_scaler(self.device, self.amp)
        self.ema = None
        if cfg.ema_decay > 0:
            self.ema = WeightAverage(self.model, decay=cfg.ema_decay)
        self.history: list[dict[str, float]] = []
        self.best: float | None = None
        self.step = 0

    @property
    def inference_model(self) -> nn.Module:
        """The weights that are validated and saved for inference (the EMA when enabled)."""
        return self.ema.module if self.ema is not None else self.model

    # ---- checkpoints -------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        state = dict(model_state=self.inference_model.state_dict(), config=self.full_config, fold=self.fold,
                     epoch=len(self.history), step=self.step, optimizer=self.optimizer.state_dict(),
                     scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
                     history=self.history, best=self.best, metric=self.task.metric)
        if self.ema is not None:
            state["train_model"] = self.model.state_dict()
        return state

    def resume(self) -> None:
        path = self.out_dir / "last.pt"
        if not path.exists():
            log.info("no %s yet: starting from scratch", path)
            return
        ckpt = load_checkpoint(path, stage=self.task.stage, map_location=self.device)
        if ckpt["config"] != self.full_config:
            raise CheckpointError(f"{path}: was written with a different config; "
                                  "resume with the same config or use a new work dir")
        selected_on = ckpt.get("metric", self.task.metric)
        if self.cfg.select == "best" and selected_on != self.task.metric:
            # The earlier validations have no figure for this metric: they cannot be compared.
            raise CheckpointError(f"{path}: its validations were selected on {selected_on!r}, and this version "
                                  f"selects on {self.task.metric!r}; finish the run with the version that "
                                  "started it, or start again in a new work dir")
        self.model.load_state_dict(ckpt["train_model"] if self.ema is not None else ckpt["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.history, self.best, self.step = list(ckpt["history"]), ckpt["best"], int(ckpt["step"])
        log.info("resumed from %s at step %d", path, self.step)

    # ---- training between two validations ----------------------------------------
    def _ema_update(self) -> None:
        if self.ema is not None:
            # The decay ramps up so the average forgets the random initial weights early on.
            self.ema.decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
            self.ema.update(self.model)

    def train_chunk(self, n_steps: int) -> float:
        seed = chunk_seed(self.cfg.seed, len(self.history), self.dist.rank)
        loader = training_loader(self.train_set, self.cfg, n_steps, seed, pin_memory=self.device.type == "cuda")
        self.net.train()
        total, count = torch.zeros((), device=self.device), 0
        bar = tqdm(loader, desc=f"{self.task.stage} fold {self.fold} steps {self.step + 1}-{self.step + n_steps}"
                   f"/{self.cfg.steps}", disable=not self.dist.is_main, leave=False, dynamic_ncols=True)
        for batch in bar:
            loss = train_step(self.task.loss, self.net, batch, self.device, self.optimizer, self.scaler,
                              self.amp, self.cfg.grad_clip)
            self.scheduler.step()
            self.step += 1
            self._ema_update()
            total += loss
            count += 1
            if count % 10 == 0:
                bar.set_postfix(loss=f"{float(total) / count:.4f}")
        return D.all_reduce_mean(float(total) / max(count, 1), self.device)

    @torch.no_grad()
    def validate(self) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        model = self.inference_model.eval()
        parts: list[dict[str, np.ndarray]] = []
        for batch in tqdm(self.val_loader, desc="validate", disable=not self.dist.is_main, leave=False):
            with autocast_context(self.device, self.amp):
                parts.append(self.task.predict_batch(model, batch, self.device))
        local = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}
        gathered = D.all_gather_objects((self.val_loader.sampler.indices, local))
        outputs = _merge_in_dataset_order(gathered)
        metrics = self.task.compute_metrics(outputs) if self.dist.is_main else {}
        return D.broadcast_object(metrics), outputs

    # ---- the run -----------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, task = self.cfg, self.task
        while self.step < cfg.steps:
            started = time.time()
            train_loss = self.train_chunk(min(cfg.eval_every, cfg.steps - self.step))
            row: dict[str, float] = {"step": self.step, "train_loss": train_loss,
                                     "lr": self.optimizer.param_groups[0]["lr"]}
            metrics, outputs = self.validate()
            row.update(metrics)
            value = metrics[task.metric]
            improved = cfg.select == "last" or self.best is None or \
                (value > self.best if task.metric_mode == "max" else value < self.best)
            if improved:
                self.best = value
                if self.dist.is_main:
                    task.on_best(outputs, self.out_dir)
            row["seconds"] = time.time() - started
            self.history.append(row)
            if self.dist.is_main:
                self._write(improved)
            D.barrier()
        return self._finish()

    def _write(self, improved: bool) -> None:
        row = self.history[-1]
        shown = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step" and isinstance(v, float))
        log.info("step %d/%d: %s%s", self.step, self.cfg.steps, shown,
                 " (selected)" if improved and self.cfg.select == "best" else "")
        state = self._state()
        # best.pt first: last.pt records the best score, so it must never name weights not yet on disk.
        if improved:
            save_checkpoint(self.out_dir / "best.pt", stage=self.task.stage, **state)
        save_checkpoint(self.out_dir / "last.pt", stage=self.task.stage, **state)
        write_csv_atomic(self.out_dir / "log.csv", pd.DataFrame(self.history))
        from common.plots import plot_learning_curves  # here: config modules import this one, workers among them

        plot_learning_curves(self.history, self.out_dir / "learning_curves.png", self.task.metric,
                             title=f"{self.task.stage} fold {self.fold}")

    def _finish(self) -> dict[str, Any]:
        checksums = D.all_gather_objects(param_checksum(self.model))
        if not self.history:
            raise RuntimeError("training ran no validation: nothing to report")
        if self.cfg.select == "last":
            chosen = self.history[-1]
        else:
            pick = max if self.task.metric_mode == "max" else min
            chosen = pick(self.history, key=lambda r: r[self.task.metric])
        result = {**{k: v for k, v in chosen.items() if k not in ("lr", "seconds")},
                  "selected_step": chosen["step"], "select": self.cfg.select, "steps": self.cfg.steps,
                  "fold": self.fold, "last": dict(self.history[-1]),
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
    """Train ``task`` and return the metrics written to ``out_dir/metrics.json``.

    ``full_config`` (the resolved config as a dict) goes into every checkpoint and,
    once a resume has been accepted, into ``out_dir/config.yaml``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    loop = _Loop(task, cfg, out_dir, fold, full_config, resume)
    try:
        if resume:
            loop.resume()  # refuses another config before anything is written
        if loop.dist.is_main:
            write_text_atomic(out_dir / "config.yaml", yaml.safe_dump(full_config, sort_keys=False))
        return loop.run()
    finally:
        D.shutdown_distributed()
