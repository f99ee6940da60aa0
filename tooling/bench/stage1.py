"""Stage-1 throughput: training samples/s and prediction studies/s, AMP beside fp32.

    python -m tooling.bench.stage1 [--config configs/stage1.yaml] [--steps 10] [--rounds 3] [--batch-size 4]
                                   [--layout both|channels_last|contiguous]
                                   [--depthwise both|fast|library] [key=value ...]

Random weights (the config's ImageNet start is not looked for) and inputs at
the configured cube size (128^3 by default); a training step includes the augmentation, on the
model's device as in training (``stage1_seg.train.training_batch``); the prediction figure includes the
shared preprocessing of a 300 x 512 x 512 study. The built model runs
channels-last 3D (``stage1_seg.model.build_model``); ``--layout both`` (the
default) times it beside the contiguous layout as the baseline, in one run. The built
model's depthwise convolutions train on CPU with ``stage1_seg.depthwise``'s backward;
``--depthwise both`` (the default) also times the library's backward as its baseline
(prediction, which has no backward, is timed once per layout and printed on both rows).
The last two lines time the trainer's weight average (EMA) update beside timm's ModelEmaV2, and
the augmentation's warp on the CPU (in torch's threads) cut into depth slabs beside one batch
item, each with its baseline.
The training variants take turns, ``--rounds`` rounds of ``--steps`` steps, and each one's
median round is printed: on a shared machine the speed drifts between runs by more than the
differences timed.
"""
from __future__ import annotations

import argparse
import time
from functools import partial
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV2

from common.config import load_config
from common.device import autocast_context, choose_device
from common.trainer import WeightAverage, make_scaler, train_step
from configs import config_path
from stage1_seg.augment import warp_volume
from stage1_seg.config import Stage1Config
from stage1_seg.data import cube_shape, preprocess_hu
from stage1_seg.depthwise import use_fast_depthwise
from stage1_seg.model import build_model, class_probs
from stage1_seg.train import supervised_loss, training_batch

LAYOUTS = {"channels_last": torch.channels_last_3d, "contiguous": torch.contiguous_format}
DEPTHWISE = ("fast", "library")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def layout_model(cfg: Stage1Config, device: torch.device, layout: str, depthwise: str = "fast") -> torch.nn.Module:
    """The built model with its weights in ``layout`` (the trainer's is channels-last 3D) and its
    depthwise convolutions' backward ``fast`` (the trainer's) or the ``library``'s."""
    model = build_model(cfg.model, pretrained_source=False)
    use_fast_depthwise(model, enabled=depthwise == "fast")
    return model.to(device, memory_format=LAYOUTS[layout])


def layout_loss(cfg: Stage1Config, layout: str, model: torch.nn.Module, batch: dict,
                device: torch.device) -> torch.Tensor:
    """``stage1_seg.train.batch_loss`` (augmentation and mixup included) with the input in ``layout``
    instead of always channels-last."""
    image, target = training_batch(cfg, batch, device)
    return supervised_loss(model(image.contiguous(memory_format=LAYOUTS[layout])), target, cfg)


def train_stepper(cfg: Stage1Config, device: torch.device, amp: bool, batch: int,
                  layout: str = "channels_last", depthwise: str = "fast") -> Callable[[], None]:
    """One training step of the trainer's own (augmentation on ``device``, forward, loss, backward,
    clipping, AdamW) per call."""
    model = layout_model(cfg, device, layout, depthwise).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = make_scaler(device, amp)
    shape = cube_shape(cfg.preprocess)
    data = {"image": torch.rand(batch, 1, *shape, device=device),   # as loaded: training_batch repeats it
            "target": (torch.rand(batch, 7, *shape, device=device) > 0.95).float()}
    loss_fn = partial(layout_loss, cfg, layout)
    return lambda: train_step(loss_fn, model, data, device, optimizer, scaler, amp, cfg.train.grad_clip)


def train_rates(steppers: dict[str, Callable[[], None]], device: torch.device, batch: int, steps: int,
                rounds: int = 3) -> dict[str, float]:
    """Training samples/s of each stepper: ``rounds`` rounds of ``steps`` steps, the variants taking
    turns within each round (a shared machine's speed drifts by more than the differences timed),
    the median round of each."""
    for step in steppers.values():  # two warm-up steps each
        step(), step()
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for _ in range(rounds):
        for name, step in steppers.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: steps * batch / float(np.median(t)) for name, t in times.items()}


def warp_rates(cfg: Stage1Config, steps: int, rounds: int = 3) -> dict[str, float]:
    """Samples/s of the augmentation's warp (image and its 7 target channels at the cube's size):
    depth slabs, one per thread (``stage1_seg.augment``'s), beside one batch item (the baseline)."""
    shape = cube_shape(cfg.preprocess)
    volume = torch.rand(1 + 7, *shape)   # the window is augmented before it is repeated to in_channels
    theta = torch.tensor([[0.95, -0.2, 0.0, 0.05], [0.2, 0.95, 0.0, -0.05], [0.0, 0.0, 1.05, 0.1]])
    grid = F.affine_grid(theta[None], [1, 1, *shape], align_corners=False)
    steppers = {"slabs": partial(warp_volume, volume, grid), "one item": partial(warp_volume, volume, grid, 1)}
    return train_rates(steppers, torch.device("cpu"), 1, steps, rounds)


def average_update_ms(cfg: Stage1Config, device: torch.device, steps: int, rounds: int = 3) -> dict[str, float]:
    """Milliseconds per update of the trainer's weight average (``common.trainer.WeightAverage``)
    beside timm's ModelEmaV2 (the baseline), on the built model."""
    model = layout_model(cfg, device, "channels_last")
    averages = {"foreach": WeightAverage(model, decay=0.99), "timm": ModelEmaV2(model, decay=0.99)}
    rates = train_rates({name: partial(average.update, model) for name, average in averages.items()},
                        device, 1, steps, rounds)
    return {name: 1000.0 / rate for name, rate in rates.items()}


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
    parser.add_argument("--steps", type=int, default=10, help="training steps a round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="training rounds, the variants taking turns; the median round is printed")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--studies", type=int, default=5)
    parser.add_argument("--study-shape", type=int, nargs=3, default=(300, 512, 512))
    parser.add_argument("--layout", choices=("both", *LAYOUTS), default="both",
                        help="memory layout of weights and inputs; both: channels-last beside the "
                             "contiguous baseline")
    parser.add_argument("--depthwise", choices=("both", *DEPTHWISE), default="both",
                        help="backward of the depthwise convolutions on CPU; both: the fast one "
                             "beside the library's")
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
    depthwise = list(DEPTHWISE) if args.depthwise == "both" else [args.depthwise]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    print(f"{'mode':6} {'layout/depthwise':24} {'train samples/s':>16} {'predict studies/s':>18} {'network only':>13}")
    variants = [(layout, dw) for layout in layouts for dw in depthwise]
    for name, amp in modes:
        train = train_rates({f"{layout}/{dw}": train_stepper(cfg, device, amp, batch, layout, dw)
                             for layout, dw in variants}, device, batch, args.steps, args.rounds)
        # Prediction runs without gradients, so never the fast backward: timed once per layout.
        predict = {layout: predict_rate(cfg, device, amp, args.studies, tuple(args.study_shape), layout)
                   for layout in layouts}
        rates = {}
        for layout, dw in variants:
            key = f"{layout}/{dw}"
            full, net = predict[layout]
            rates[key] = (train[key], full, net)
            print(f"{name:6} {key:24} {train[key]:16.2f} {full:18.2f} {net:13.2f}")
        for label, (a, b) in {"ratio:layout": ("channels_last/fast", "contiguous/fast"),
                              "ratio:depthwise": ("channels_last/fast", "channels_last/library")}.items():
            if a in rates and b in rates:
                ratio = [x / y for x, y in zip(rates[a], rates[b])]
                print(f"{name:6} {label:24} {ratio[0]:15.2f}x {ratio[1]:17.2f}x {ratio[2]:12.2f}x")
    average = average_update_ms(cfg, device, args.steps, args.rounds)
    print(f"weight average (EMA) update, ms a step: foreach {average['foreach']:.1f}, "
          f"timm's ModelEmaV2 {average['timm']:.1f}, ratio {average['timm'] / average['foreach']:.2f}x")
    # Where training runs on the CPU, the warp's depth slabs share it among the threads.
    warp = warp_rates(cfg, args.steps, args.rounds)
    print(f"augmentation warp on the CPU, image + 7 target channels, samples/s: depth slabs {warp['slabs']:.1f}, "
          f"one batch item {warp['one item']:.1f}, ratio {warp['slabs'] / warp['one item']:.2f}x")


if __name__ == "__main__":
    main()
