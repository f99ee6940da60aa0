"""Stage-1 inference: the fold ensemble, rebuilt from its checkpoints' configs.

Used by ``stage1_seg.predict`` (every study, to disk) and ``make_submission``
(study by study, in memory).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from common.checkpoint import rebuild_model
from common.device import amp_available, autocast_context, choose_device
from stage1_seg.config import PreprocessConfig, Stage1Config
from stage1_seg.data import preprocess_hu
from stage1_seg.model import as_model_input, build_model, class_probs


def find_checkpoints(run_dir: Path, folds: Sequence[int], name: str = "best.pt") -> list[Path]:
    """The fold checkpoints that exist under ``run_dir``; an error when there are none."""
    found = [run_dir / f"fold{k}" / name for k in folds if (run_dir / f"fold{k}" / name).is_file()]
    if not found:
        raise FileNotFoundError(f"no stage-1 checkpoints ({name}) for folds {list(folds)} under {run_dir}; "
                                "train with `python -m stage1_seg.train --fold K` first")
    return found


class Stage1Ensemble:
    """Fold models rebuilt from their saved configs; mean of their C1..C7 probabilities, optional flip TTA."""

    def __init__(self, checkpoints: Sequence[Path], device: torch.device | None = None,
                 flip_tta: bool = False, amp: bool = True) -> None:
        self.device = device or choose_device()
        self.flip_tta = flip_tta
        self.amp = amp and amp_available(self.device)  # CUDA only: CPU inference stays fp32
        self.models, configs = [], []
        for path in checkpoints:
            model, cfg = rebuild_model(path, "stage1", Stage1Config, build_model)
            self.models.append(model.to(self.device))
            configs.append(cfg)
        self.heads = [c.model.head for c in configs]
        self.config: Stage1Config = configs[0]
        self.preprocess: PreprocessConfig = configs[0].preprocess
        self.in_channels = configs[0].model.in_channels
        if any(c.preprocess != self.preprocess or c.model.in_channels != self.in_channels for c in configs):
            raise ValueError("stage-1 checkpoints disagree on preprocessing; ensemble models trained alike")

    @torch.no_grad()
    def predict_cube(self, cube: np.ndarray, n_models: int | None = None) -> np.ndarray:
        """Preprocessed cube ``(D, H, W)`` -> mean probabilities ``(7, D, H, W)`` float32.

        ``n_models`` limits the ensemble to its first models (a cheaper path under a time budget).
        """
        x = as_model_input(torch.from_numpy(cube).to(self.device)[None, None].expand(1, self.in_channels, -1, -1, -1))
        total = torch.zeros((7, *cube.shape), device=self.device)
        count = 0
        chosen = slice(0, n_models) if n_models else slice(None)
        for model, head in zip(self.models[chosen], self.heads[chosen]):
            views = [False, True] if self.flip_tta else [False]
            for flip in views:
                inp = x.flip(-1) if flip else x
                with autocast_context(self.device, self.amp):
                    probs = class_probs(model(inp), head)[0]
                total += probs.flip(-1) if flip else probs
                count += 1
        return (total / count).cpu().numpy()

    def predict_hu(self, hu: np.ndarray, spacing: Sequence[float],
                   n_models: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """HU volume ``(S, H, W)`` with ``spacing`` (z, y, x) mm -> (probabilities ``(7, d, h, w)`` as
        uint8 (x255), the region (6,) of the study they cover; see ``common.volume``)."""
        cube, region = preprocess_hu(hu, spacing, self.preprocess)
        return np.round(self.predict_cube(cube, n_models) * 255).astype(np.uint8), region
