"""Throughput of the stage-2 classifier: training and inference samples per second.

    python -m tooling.bench.stage2_model [--configs demo real] [--types 1 2] [--iters N] [--batch B]
                                         [--device cpu|cuda] [key=value ...]

Type 1 (``model.type: 1``): one sample is one vertebra stack (n_slices x 6 x size x size,
from the config's ``crop`` section). Type 2 (``--types 2``): one sample is a whole study,
seven such stacks (batch 2 unless ``--batch``), timed without and with checkpointed
backbone chunks (``model.checkpoint_chunk``, one vertebra's slices a chunk); its rows also
give vertebra stacks/s, to compare with type 1. Training = the trainer's own step (forward,
the stage's loss, backward, clipping, AdamW); inference = what validation and the
submission run under ``torch.no_grad``: ``predict_logits`` with the config's test-time views
(``tta: flips``, the default, is four forward passes a batch; ``tta=none`` times one). Each configuration is timed beside a baseline in the same run: on
CUDA fp32 versus autocast (bf16 where supported), on CPU the default memory layout versus
channels_last; on CUDA the peak memory of each row is printed. Random inputs and weights (the
config's ImageNet start is not looked for); nothing is read from disk.
"""
from __future__ import annotations

import argparse
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch

from common.config import load_config
from common.device import autocast_context
from common.trainer import make_scaler, train_step
from configs import config_path
from stage2_cls.config import Stage2Config
from stage2_cls.dataset import prepare_images
from stage2_cls.model import build_model, count_parameters, predict_logits
from stage2_cls.train import batch_loss, study_batch_loss

log = logging.getLogger(__name__)

CONFIGS = {"demo": "demo/stage2.yaml", "real": "stage2.yaml"}


def _variants(device: torch.device, model_type: int, n_slices: int) -> list[tuple[str, bool, bool, int]]:
    """(name, autocast, channels_last, checkpoint_chunk); the first is the baseline.

    Type 2 always runs its backbone channels_last (``PatientClassifier`` does); its variants
    are with and without checkpointed chunks of ``n_slices`` slice images."""
    amp = device.type == "cuda"
    prefix = "amp" if amp else "fp32"
    if model_type == 2:
        return [(prefix, amp, False, 0), (f"{prefix}+checkpoint {n_slices}", amp, False, n_slices)]
    if device.type == "cuda":
        return [("fp32", False, False, 0), ("amp", True, False, 0), ("amp+channels_last", True, True, 0)]
    return [("fp32", False, False, 0), ("fp32+channels_last", False, True, 0)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_model(cfg: Stage2Config, device: torch.device, batch: int, iters: int, warmup: int,
               amp: bool, channels_last: bool) -> dict[str, float]:
    """Samples/s for training steps and inference batches of random stacks (type 2: studies)."""
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained_source=False).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    stack = (cfg.crop.n_slices, cfg.model.in_chans, cfg.crop.size, cfg.crop.size)
    type2 = cfg.model.type == 2
    if type2:
        labels = (torch.rand(batch, 8) < 0.2).float()
        data = {"image": torch.randint(0, 256, (batch, 7, *stack), dtype=torch.uint8), "labels": labels,
                "missing": torch.zeros(batch, 7, dtype=torch.bool)}
        loss_fn, extra = partial(study_batch_loss, cfg), (data["missing"].to(device),)
    else:
        label = (torch.rand(batch) < 0.3).float()
        data = {"image": torch.randint(0, 256, (batch, *stack), dtype=torch.uint8), "label": label,
                "weight": 1.0 + label}
        loss_fn, extra = partial(batch_loss, cfg), ()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = make_scaler(device, amp)

    def one_train_step() -> None:
        train_step(loss_fn, model, data, device, optimizer, scaler, amp, cfg.train.grad_clip)

    @torch.no_grad()
    def infer_step() -> None:
        with autocast_context(device, amp):
            predict_logits(model, prepare_images(data["image"], device), *extra, tta=cfg.tta)

    result: dict[str, float] = {"params_m": count_parameters(model) / 1e6}
    for name, step, mode in (("train", one_train_step, True), ("infer", infer_step, False)):
        model.train(mode)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):
            step()
        _sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            step()
        _sync(device)
        result[f"{name}_samples_s"] = batch * iters / (time.perf_counter() - start)
        result[f"{name}_stacks_s"] = result[f"{name}_samples_s"] * (7 if type2 else 1)
        if device.type == "cuda":
            result[f"{name}_peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    del model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def run(configs: Sequence[str], device: torch.device, iters: int | None, batch: int | None,
        types: Sequence[int] = (1,), overrides: Sequence[str] = (),
        warmup: int | None = None) -> list[dict[str, Any]]:
    """Time every named config, model type and variant; one row per (config, type, variant).

    ``warmup`` untimed iterations before each timing (default: 3, 1 for 224 px on CPU)."""
    rows = []
    for name in configs:
        path = config_path(CONFIGS[name]) if name in CONFIGS else Path(name)
        for model_type in types:
            base = load_config(Stage2Config, path, [*overrides, f"model.type={model_type}"])
            big = base.crop.size >= 160
            slow_cpu = device.type == "cpu" and big
            b = batch or (2 if slow_cpu or model_type == 2 else base.train.batch_size)
            n = iters or (2 if slow_cpu else 10 if device.type == "cpu" else 20)
            for variant, amp, channels_last, chunk in _variants(device, model_type, base.crop.n_slices):
                cfg = load_config(Stage2Config, path,
                                  [*overrides, f"model.type={model_type}", f"model.checkpoint_chunk={chunk}"])
                warm = (1 if slow_cpu else 3) if warmup is None else warmup
                timing = time_model(cfg, device, b, n, warmup=warm, amp=amp, channels_last=channels_last)
                rows.append({"config": name, "type": model_type, "backbone": cfg.model.backbone,
                             "size": cfg.crop.size, "slices": cfg.crop.n_slices, "batch": b, "iters": n,
                             "device": str(device), "variant": variant, "tta": cfg.tta, **timing})
                log.info("%s", rows[-1])
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown; samples are vertebra stacks (type 1) or studies (type 2, with its stacks/s beside)."""
    head = ("| config | type | backbone | size x slices | batch | device | variant | train samples/s "
            "(stacks/s) | infer samples/s (stacks/s), test-time views | peak GB train / infer |")
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        peak = (f"{r['train_peak_gb']:.1f} / {r['infer_peak_gb']:.1f}" if "train_peak_gb" in r else "-")
        lines.append(f"| {r['config']} | {r['type']} | {r['backbone']} | {r['size']} x {r['slices']} | {r['batch']} | "
                     f"{r['device']} | {r['variant']} | {r['train_samples_s']:.1f} ({r['train_stacks_s']:.1f}) | "
                     f"{r['infer_samples_s']:.1f} ({r['infer_stacks_s']:.1f}), {r['tta']} | {peak} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["demo", "real"],
                        help="'demo', 'real' or YAML paths (default: demo real)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default: by size/device)")
    parser.add_argument("--batch", type=int, default=None,
                        help="batch size (default: the config's; 2 for type 2 and for 224 px on CPU)")
    parser.add_argument("--types", type=int, nargs="+", choices=[1, 2], default=[1],
                        help="model types to time (default: 1)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every row")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        log.warning("CPU run with %d threads", torch.get_num_threads())
    rows = run(args.configs, device, args.iters, args.batch, args.types, args.overrides)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
