"""Stage-1 throughput: training samples/s and prediction studies/s, AMP beside fp32.

    python -m tooling.bench.stage1 [--config configs/stage1.yaml] [--steps 10] [--batch-size 4]
                                   [--layout both|channels_last|contiguous] [key=value ...]

Random weights (the config's ImageNet start is not looked for) and inputs at
the configured cube size (128^3 by default); the prediction figure includes the
shared preprocessing of a 300 x 512 x 512 study. The built model runs
channels-last 3D (``stage1_seg.model.build_model``); ``--layout both`` (the
default) times it beside the contiguous layout as the baseline, in one run.
"""
from __future__ import annotations

import argparse
import time
from functools import partial
from typing import Sequence

import numpy as np
import torch

from common.config import load_config
from common.device import autocast_context, choose_device
from common.trainer import make_scaler, train_step
from configs import config_path
from stage1_seg.augment import mixup
from stage1_seg.config import Stage1Config
from stage1_seg.data import cube_shape, preprocess_hu
from stage1_seg.model import build_model, class_probs
from stage1_seg.train import supervised_loss

LAYOUTS = {"channels_last": torch.channels_last_3d, "contiguous": torch.contiguous_format}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def layout_model(cfg: Stage1Config, device: torch.device, layout: str) -> torch.nn.Module:
    """The built model with its weights in ``layout`` (the trainer's is channels-last 3D)."""
    return build_model(cfg.model, pretrained_source=False).to(device, memory_format=LAYOUTS[layout])


def layout_loss(cfg: Stage1Config, layout: str, model: torch.nn.Module, batch: dict,
                device: torch.device) -> torch.Tensor:
    """``stage1_seg.train.batch_loss`` with the input in ``layout`` instead of always channels-last."""
    image, target = mixup(batch["image"].to(device), batch["target"].to(device), cfg.augment.mixup_p)
    return supervised_loss(model(image.contiguous(memory_format=LAYOUTS[layout])), target, cfg)


def train_rate(cfg: Stage1Config, device: torch.device, amp: bool, batch: int, steps: int,
               layout: str = "channels_last") -> float:
    """Training samples/s of the trainer's own step (forward, loss, backward, clipping, AdamW)."""
    model = layout_model(cfg, device, layout).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = make_scaler(device, amp)
    shape = cube_shape(cfg.preprocess)
    data = {"image": torch.rand(batch, cfg.model.in_channels, *shape, device=device),
            "target": (torch.rand(batch, 7, *shape, device=device) > 0.95).float()}
    loss_fn = partial(layout_loss, cfg, layout)
    for i in range(steps + 2):  # two warm-up steps
        if i == 2:
            _sync(device)
            start = time.perf_counter()
        train_step(loss_fn, model, data, device, optimizer, scaler, amp, cfg.train.grad_clip)
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


@torch.no_grad()
def predict_rate(cfg: Stage1Config, device: torch.device, amp: bool, studies: int,
                 shape: tuple[int, int, int], layout: str = "channels_last") -> tuple[float, float]:
    """(studies/s including preprocessing, studies/s of the network alone)."""
    model = layout_model(cfg, device, layout).eval()
    fmt = LAYOUTS[layout]
    hu = np.random.default_rng(0).integers(-1000, 1500, size=shape, dtype=np.int16)
    spacing = (1.0, 0.5, 0.5)
    cube = torch.from_numpy(preprocess_hu(hu, spacing, cfg.preprocess)[0]).to(device)[None, None]
    cube = cube.contiguous(memory_format=fmt)
    with autocast_context(device, amp):
        model(cube)  # warm-up
    _sync(device)
    start = time.perf_counter()
    net = 0.0
    for _ in range(studies):
        x = torch.from_numpy(preprocess_hu(hu, spacing, cfg.preprocess)[0]).to(device)[None, None]
        x = x.contiguous(memory_format=fmt)
        _sync(device)
        t = time.perf_counter()
        with autocast_context(device, amp):
            class_probs(model(x), cfg.model.head).cpu()
        _sync(device)
        net += time.perf_counter() - t
    return studies / (time.perf_counter() - start), studies / net


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(config_path("stage1.yaml")))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--studies", type=int, default=5)
    parser.add_argument("--study-shape", type=int, nargs=3, default=(300, 512, 512))
    parser.add_argument("--layout", choices=("both", *LAYOUTS), default="both",
                        help="memory layout of weights and inputs; both: channels-last beside the "
                             "contiguous baseline")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(Stage1Config, args.config, args.overrides)
    device = choose_device()
    batch = args.batch_size or cfg.train.batch_size
    torch.manual_seed(0)
    cube = "x".join(map(str, cube_shape(cfg.preprocess)))
    print(f"device {device}  encoder {cfg.model.encoder}  cube {cube}  batch {batch}  "
          f"torch threads {torch.get_num_threads()}")
    modes = [("fp32", False), ("amp", True)] if device.type == "cuda" else [("fp32", False)]
    layouts = list(LAYOUTS) if args.layout == "both" else [args.layout]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    print(f"{'mode':6} {'layout':14} {'train samples/s':>16} {'predict studies/s':>18} {'network only':>13}")
    for name, amp in modes:
        rates = {}
        for layout in layouts:
            train = train_rate(cfg, device, amp, batch, args.steps, layout)
            full, net = predict_rate(cfg, device, amp, args.studies, tuple(args.study_shape), layout)
            rates[layout] = (train, full, net)
            print(f"{name:6} {layout:14} {train:16.2f} {full:18.2f} {net:13.2f}")
        if len(rates) == 2:
            ratio = [a / b for a, b in zip(rates["channels_last"], rates["contiguous"])]
            print(f"{name:6} {'ratio':14} {ratio[0]:15.2f}x {ratio[1]:17.2f}x {ratio[2]:12.2f}x")


if __name__ == "__main__":
    main()
