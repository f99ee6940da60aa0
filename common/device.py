"""Where and how models run: the device, and mixed precision.

Used alike by training (``common.trainer``) and inference (the stage ensembles,
``make_submission``), so both pick the same device and autocast. Mixed precision
(``amp``) is bf16 on GPUs that have it (fp16 with a gradient scaler otherwise).

On a CPU it is opt-in (``cpu_bf16``), and only where oneDNN runs bf16 natively
(AVX512-BF16 / AMX): measured on 2 such cores, a stage-1 step 1.2x and a stage-2
step 1.45-1.7x faster, but the bf16 kernels are not bit-reproducible (two
identical stage-1 runs differ after 2 steps, so a killed-and-resumed run drifts
from an uninterrupted one) and a tiny stage-1 run once ended in a NaN loss.
By default a CPU stays in fp32, where results repeat exactly.
"""
from __future__ import annotations

import contextlib

import torch


def choose_device(local_rank: int = 0) -> torch.device:
    """CUDA when available (one GPU per local rank), else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def amp_available(device: torch.device, cpu_bf16: bool = False) -> bool:
    """Whether mixed precision is used on ``device``: always on CUDA; on CPU if asked and native."""
    if device.type == "cuda":
        return True
    if device.type == "cpu" and cpu_bf16:
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # an older or a oneDNN-less build
            return False
    return False


def autocast_context(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """Mixed precision when ``enabled`` (decided with :func:`amp_available`) and native here; else nothing."""
    if not enabled or not amp_available(device, cpu_bf16=True):
        return contextlib.nullcontext()
    if device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast("cuda", dtype=amp_dtype())


def amp_dtype() -> torch.dtype:
    """The autocast dtype on this GPU (fp16 needs a gradient scaler, bf16 does not)."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
