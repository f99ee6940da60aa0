"""The stage-1 network: a 3D U-Net with an EfficientNet encoder (segmentation-models-pytorch-3d)."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from stage1_seg.config import ModelConfig

log = logging.getLogger(__name__)

N_CLASSES = 7


def build_model(cfg: ModelConfig) -> nn.Module:
    """``(B, in_channels, D, H, W)`` -> logits ``(B, 7, D, H, W)``; D, H, W multiples of 32.

    Encoder weights are never downloaded: ``cfg.weights_file`` may name a local
    state dict, either of the whole model or of its encoder alone.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # smp-3d warns about timm internals on import
        import segmentation_models_pytorch_3d as smp

    model = smp.Unet(encoder_name=cfg.encoder, encoder_weights=None, in_channels=cfg.in_channels,
                     classes=N_CLASSES, decoder_channels=tuple(cfg.decoder_channels),
                     encoder_depth=len(cfg.decoder_channels))
    # The classification head of the efficientnet-b* encoders is never run by the U-Net;
    # dropping it keeps DDP from waiting for gradients that never come.
    for name in ("_conv_head", "_bn1"):
        if isinstance(getattr(model.encoder, name, None), nn.Module):
            delattr(model.encoder, name)
    if cfg.weights_file:
        load_weights(model, Path(cfg.weights_file))
    return model


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a local state dict into the whole model, or failing that into its encoder."""
    if not path.is_file():
        raise FileNotFoundError(f"model.weights_file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # one of our checkpoints
    for target, name in ((model, "model"), (model.encoder, "encoder")):
        try:
            target.load_state_dict(state, strict=True)
            log.info("loaded %s weights from %s", name, path)
            return
        except RuntimeError:
            continue
    missing = model.encoder.load_state_dict(state, strict=False)
    if len(missing.missing_keys) == len(model.encoder.state_dict()):
        raise ValueError(f"{path}: none of its tensors fit the {type(model.encoder).__name__} encoder")
    log.warning("loaded encoder weights from %s partially (%d keys missing)", path, len(missing.missing_keys))
