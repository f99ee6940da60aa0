"""Stage-2 inference: fold models of type 1 and/or type 2, and how their outputs are combined.

Every model is rebuilt from its checkpoint's config. Within a type, the fold
models are averaged in logit space (the mean log-odds): a plain mean of five
probabilities is less extreme than any one of them, and the out-of-fold
predictions that the calibration and the combination rule are chosen on each
come from a single model. Across types, :func:`combine` applies the rule of
``ensemble.json`` (written by ``stage2_cls.report``):

- C1..C7: the mean log-odds of the types present;
- patient_overall: ``vertebrae`` (from the combined vertebrae, by the type-1
  config's ``overall``: the noisy-OR ``1 - prod(1 - p)`` or the max), ``type2``
  (the learned head of the type-2 models) or ``mean`` (the mean log-odds of both).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from common.checkpoint import rebuild_model
from common.constants import PRED_CLIP
from common.device import amp_available, autocast_context, choose_device
from stage2_cls.config import Stage2Config
from stage2_cls.dataset import prepare_images
from stage2_cls.model import TTA_MODES, build_model, predict_logits

OVERALL_RULES = ("vertebrae", "type2", "mean")


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), *PRED_CLIP)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def mean_logodds(probs: Sequence[np.ndarray]) -> np.ndarray:
    """The probability of the mean log-odds of ``probs`` (same shapes)."""
    return sigmoid(np.mean([logit(p) for p in probs], axis=0))


class Stage2Ensemble:
    """Fold models of one or both types; all must share the crop settings."""

    def __init__(self, checkpoints: Sequence[Path], device: torch.device | None = None, amp: bool = True,
                 tta: str | None = None) -> None:
        """``tta``: the test-time views for every model ("none" or "flips"); None: each model's
        own config's ``tta`` (what its out-of-fold predictions were made with)."""
        if not checkpoints:
            raise FileNotFoundError("no stage-2 checkpoints given")
        if tta is not None and tta not in TTA_MODES:
            raise ValueError(f"unknown stage-2 tta {tta!r}; choose from {TTA_MODES}")
        self.device = device or choose_device()
        self.amp = amp and amp_available(self.device)  # CUDA only: CPU inference stays fp32
        self.models: dict[int, list[torch.nn.Module]] = {1: [], 2: []}
        self.tta: dict[int, list[str]] = {1: [], 2: []}
        configs = []
        for path in checkpoints:
            model, cfg = rebuild_model(path, "stage2", Stage2Config, build_model)
            self.models[cfg.model.type].append(model.to(self.device))
            self.tta[cfg.model.type].append(tta or cfg.tta)
            configs.append(cfg)
        crops = {(c.crop.n_slices, c.crop.context, c.crop.size, c.crop.margin, c.crop.window_center,
                  c.crop.window_width, c.crop.minmax) for c in configs}
        if len(crops) > 1:
            raise ValueError("stage-2 checkpoints were trained on different crop settings; ensemble alike models")
        self.crop = configs[0].crop
        self.overall = configs[0].overall

    @property
    def types(self) -> list[int]:
        return [t for t in (1, 2) if self.models[t]]

    @torch.no_grad()
    def predict(self, stacks: np.ndarray, missing: np.ndarray | None = None,
                n_models: int | None = None, tta: str | None = None) -> dict[str, np.ndarray]:
        """uint8 stacks ``(7, S, 6, H, W)`` of one study -> per-type outputs.

        ``type1`` / ``type2``: (7,) vertebra probabilities, ``overall2``: (1,) the type-2
        head's patient_overall; a type without models is absent. ``n_models`` limits each
        type to its first models and ``tta`` overrides every model's views (the cheaper
        path under a time budget: ``n_models=1, tta="none"``).
        """
        images = prepare_images(torch.from_numpy(np.ascontiguousarray(stacks)), self.device)
        missing_t = torch.as_tensor(np.zeros(len(stacks), bool) if missing is None else missing, device=self.device)
        out: dict[str, np.ndarray] = {}
        per_model: dict[str, list[np.ndarray]] = {"type1": [], "type2": [], "overall2": []}
        for kind in self.types:
            chosen = slice(n_models) if n_models else slice(None)
            for model, views in zip(self.models[kind][chosen], self.tta[kind][chosen]):
                with autocast_context(self.device, self.amp):
                    if kind == 1:
                        logits = predict_logits(model, images, tta=tta or views)
                        per_model["type1"].append(torch.sigmoid(logits["vertebra_logit"]).cpu().numpy())
                    else:
                        logits = predict_logits(model, images[None], missing_t[None], tta=tta or views)
                        per_model["type2"].append(torch.sigmoid(logits["vertebra_logit"][0]).cpu().numpy())
                        per_model["overall2"].append(torch.sigmoid(logits["overall_logit"]).cpu().numpy())
        for key, values in per_model.items():
            if values:
                out[key] = mean_logodds(values)
        return out


def combine(outputs: Mapping[str, np.ndarray], rule: str = "vertebrae", from_vertebrae: str = "noisy_or") -> np.ndarray:
    """Per-type outputs of N studies (``type1``/``type2`` (N, 7), ``overall2`` (N,)) -> (N, 8).

    Vertebrae: the mean log-odds of the types present; patient_overall by ``rule``
    (see the module docstring). Clipped to PRED_CLIP.
    """
    if rule not in OVERALL_RULES:
        raise ValueError(f"unknown patient_overall rule {rule!r}; choose from {OVERALL_RULES}")
    vertebrae = [np.asarray(outputs[k], np.float64) for k in ("type1", "type2") if k in outputs]
    if not vertebrae:
        raise ValueError("no vertebra probabilities to combine")
    p = np.atleast_2d(mean_logodds(vertebrae))
    derived = study_probabilities(p, from_vertebrae)[:, 7]
    if rule != "vertebrae" and "overall2" not in outputs:
        raise ValueError(f"rule {rule!r} needs type-2 models, and none was given")
    learned = np.ravel(outputs["overall2"]) if "overall2" in outputs else None
    overall = {"vertebrae": derived, "type2": learned,
               "mean": None if learned is None else mean_logodds([derived, learned])}[rule]
    return np.clip(np.concatenate([p, np.reshape(overall, (-1, 1))], axis=1), *PRED_CLIP)


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
