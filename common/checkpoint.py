"""Checkpoints: atomic saves, ``weights_only`` loads and clear errors.

A checkpoint is a plain dict of tensors and Python primitives (so it loads with
``torch.load(..., weights_only=True)``) holding the model, the optimiser state,
the resolved config, fold, epoch and git commit.
"""
from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

import torch

from common.io import atomic_path

log = logging.getLogger(__name__)

FORMAT = "rsna-csfd-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, or not one of ours."""


def git_commit() -> str:
    """The commit of the code that is running, or ``"unknown"`` outside a checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_checkpoint(path: str | Path, *, stage: str, model_state: dict[str, torch.Tensor],
                    config: dict[str, Any], fold: int, epoch: int, **extra: Any) -> None:
    """Write a checkpoint atomically. ``extra`` holds optimiser/scheduler/etc. states."""
    payload = {
        "format": FORMAT, "version": VERSION, "stage": stage, "model": model_state,
        "config": config, "fold": int(fold), "epoch": int(epoch), "git_commit": git_commit(),
        **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, stage: str | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True``; raise ``CheckpointError`` naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged zip/pickle
        raise CheckpointError(
            f"{path}: cannot be read as a checkpoint (truncated or corrupt file?): "
            f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no '{FORMAT}' marker)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')} "
                              f"is not supported (expected {VERSION})")
    if stage is not None and payload.get("stage") != stage:
        raise CheckpointError(f"{path}: a {payload.get('stage')} checkpoint, expected {stage}")
    return payload


def rebuild_model(path: str | Path, stage: str, schema: type, builder) -> tuple[torch.nn.Module, Any]:
    """A trained model rebuilt from its checkpoint's resolved config with the training builder.

    ``schema`` is the stage's config dataclass and ``builder(cfg.model,
    pretrained_source=False)`` the function training used: the checkpoint holds
    every weight, so the pretrained start it was trained from (hub, cache or
    ``model.weights_file``) is never looked for. Returns ``(model in eval mode on
    CPU, config)``.
    """
    from common.config import from_dict  # config imports io only; keep this module light

    ckpt = load_checkpoint(path, stage=stage)
    cfg = from_dict(schema, ckpt["config"], str(path))
    model = builder(cfg.model, pretrained_source=False)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model its config describes: {exc}") from exc
    return model.eval(), cfg
