"""Throughput of the stage-2 classifier: training and inference samples per second.

    python -m tooling.bench.stage2_model [--configs demo real] [--iters N] [--batch B] [--device cpu|cuda]

One sample is one vertebra stack (n_slices x 6 x size x size, from the config's
``crop`` section). Training = the trainer's own step (forward, weighted loss, backward, clipping, AdamW);
inference = forward + vertebra probability under ``torch.no_grad``. Each
configuration is timed beside a baseline in the same run: on CUDA fp32 versus
autocast (bf16 where supported), on CPU the default memory layout versus
channels_last. Random inputs and weights (the config's ImageNet start is not
looked for); nothing is read from disk.
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
from stage2_cls.model import build_model, count_parameters, vertebra_probability
from stage2_cls.train import batch_loss

log = logging.getLogger(__name__)

CONFIGS = {"demo": "demo/stage2.yaml", "real": "stage2.yaml"}


def _variants(device: torch.device) -> list[tuple[str, bool, bool]]:
    """(name, autocast, channels_last); the first is the baseline."""
    if device.type == "cuda":
        return [("fp32", False, False), ("amp", True, False), ("amp+channels_last", True, True)]
    return [("fp32", False, False), ("fp32+channels_last", False, True)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_model(cfg: Stage2Config, device: torch.device, batch: int, iters: int, warmup: int,
               amp: bool, channels_last: bool) -> dict[str, float]:
    """Samples/s for training steps and inference batches of random stacks."""
    torch.manual_seed(0)
    model = build_model(cfg.model, pretrained_source=False).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    shape = (batch, cfg.crop.n_slices, cfg.model.in_chans, cfg.crop.size, cfg.crop.size)
    label = (torch.rand(batch) < 0.3).float()
    data = {"image": torch.randint(0, 256, shape, dtype=torch.uint8), "label": label, "weight": 1.0 + label}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = make_scaler(device, amp)

    def one_train_step() -> None:
        train_step(partial(batch_loss, cfg), model, data, device, optimizer, scaler, amp, cfg.train.grad_clip)

    @torch.no_grad()
    def infer_step() -> None:
        with autocast_context(device, amp):
            vertebra_probability(model(prepare_images(data["image"], device)))

    result: dict[str, float] = {"params_m": count_parameters(model) / 1e6}
    for name, step, mode in (("train", one_train_step, True), ("infer", infer_step, False)):
        model.train(mode)
        for _ in range(warmup):
            step()
        _sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            step()
        _sync(device)
        result[f"{name}_samples_s"] = batch * iters / (time.perf_counter() - start)
    if device.type == "cuda":
        result["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return result


def run(configs: Sequence[str], device: torch.device, iters: int | None, batch: int | None) -> list[dict[str, Any]]:
    """Time every named config in every variant; returns one row per (config, variant)."""
    rows = []
    for name in configs:
        cfg = load_config(Stage2Config, config_path(CONFIGS[name]) if name in CONFIGS else Path(name))
        big = cfg.crop.size >= 160
        slow_cpu = device.type == "cpu" and big
        b = batch or (2 if slow_cpu else cfg.train.batch_size)
        n = iters or (2 if slow_cpu else 10 if device.type == "cpu" else 20)
        for variant, amp, channels_last in _variants(device):
            timing = time_model(cfg, device, b, n, warmup=1 if slow_cpu else 3, amp=amp, channels_last=channels_last)
            rows.append({"config": name, "backbone": cfg.model.backbone, "size": cfg.crop.size,
                         "slices": cfg.crop.n_slices, "batch": b, "iters": n, "device": str(device),
                         "variant": variant, **timing})
            log.info("%s", rows[-1])
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    head = "| config | backbone | size x slices | batch | device | variant | train samples/s | infer samples/s |"
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['backbone']} | {r['size']} x {r['slices']} | {r['batch']} | "
                     f"{r['device']} | {r['variant']} | {r['train_samples_s']:.1f} | {r['infer_samples_s']:.1f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["demo", "real"],
                        help="'demo', 'real' or YAML paths (default: demo real)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (default: by size/device)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default: the config's, 2 for 224 on CPU)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        log.warning("CPU run with %d threads", torch.get_num_threads())
    rows = run(args.configs, device, args.iters, args.batch)
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main()
