"""Where and how models run: the device, and mixed precision on CUDA.

Used alike by training (``common.trainer``) and inference (the stage ensembles,
``make_submission``), so both pick the same device and autocast.
"""
from __future__ import annotations

import contextlib

import torch


def choose_device(local_rank: int = 0) -> torch.device:
    """CUDA when available (one GPU per local rank), else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def autocast_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA where supported, fp16 otherwise; nothing on CPU."""
    if not enabled or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=amp_dtype())


def amp_dtype() -> torch.dtype:
    """The autocast dtype on this GPU (fp16 needs a gradient scaler, bf16 does not)."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
