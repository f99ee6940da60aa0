"""Stage-2 inference: the fold ensemble rebuilt from its checkpoints' configs."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from common.checkpoint import rebuild_model
from common.constants import PRED_CLIP
from common.device import autocast_context, choose_device
from stage2_cls.config import Stage2Config
from stage2_cls.dataset import prepare_images
from stage2_cls.model import build_model, vertebra_probability


class Stage2Ensemble:
    """Mean vertebra probability over fold models. Models must share crop settings."""

    def __init__(self, checkpoints: Sequence[Path], device: torch.device | None = None, amp: bool = True) -> None:
        if not checkpoints:
            raise FileNotFoundError("no stage-2 checkpoints given")
        self.device = device or choose_device()
        self.amp = amp
        self.models, self.configs = [], []
        for path in checkpoints:
            model, cfg = rebuild_model(path, "stage2", Stage2Config, build_model)
            self.models.append(model.to(self.device))
            self.configs.append(cfg)
        crops = {(c.crop.n_slices, c.crop.context, c.crop.size, c.crop.margin, c.crop.window_center,
                  c.crop.window_width, c.crop.minmax) for c in self.configs}
        if len(crops) > 1:
            raise ValueError("stage-2 checkpoints were trained on different crop settings; ensemble alike models")
        self.crop = self.configs[0].crop
        self.overall = self.configs[0].overall

    @torch.no_grad()
    def predict(self, stacks: np.ndarray, n_models: int | None = None) -> np.ndarray:
        """uint8 stacks ``(V, S, 6, H, W)`` -> vertebra probabilities ``(V,)`` (mean over models)."""
        images = prepare_images(torch.from_numpy(np.ascontiguousarray(stacks)), self.device)
        total = torch.zeros(images.shape[0], device=self.device)
        models = self.models[:n_models] if n_models else self.models
        for model in models:
            with autocast_context(self.device, self.amp):
                total += vertebra_probability(model(images)).float()
        return (total / len(models)).cpu().numpy()


def study_probabilities(vertebra_probs: np.ndarray, overall: str = "noisy_or") -> np.ndarray:
    """(N, 7) vertebra probabilities -> (N, 8) in TARGETS order, clipped to PRED_CLIP.

    patient_overall is the noisy-OR ``1 - prod(1 - p)`` (fracture anywhere, if
    the vertebrae were independent) or the max over vertebrae.
    """
    p = np.clip(np.asarray(vertebra_probs, np.float64), 0.0, 1.0)
    if overall == "noisy_or":
        any_fracture = 1.0 - np.prod(1.0 - p, axis=1)
    elif overall == "max":
        any_fracture = p.max(axis=1)
    else:
        raise ValueError(f"overall must be 'noisy_or' or 'max', got {overall!r}")
    return np.clip(np.concatenate([p, any_fracture[:, None]], axis=1), *PRED_CLIP)
