"""The stage-1 throughput benchmark times both memory layouts and both depthwise backwards side by side
(python -m tooling.bench.stage1)."""
from __future__ import annotations

import re
import time

import torch

from common.config import load_config
from configs import config_path
from stage1_seg.config import Stage1Config
from stage1_seg.depthwise import FastDepthwiseConv3d
from tooling.bench import stage1 as bench

SMALL = ["preprocess.size=32", "train.batch_size=2"]


def test_layout_model_and_loss_run_in_the_asked_layout():
    cfg = load_config(Stage1Config, config_path("demo/stage1.yaml"), SMALL)
    for layout, fmt in bench.LAYOUTS.items():
        model = bench.layout_model(cfg, torch.device("cpu"), layout)
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d) and m.kernel_size != (1, 1, 1)]
        assert all(c.weight.is_contiguous(memory_format=fmt) for c in convs)
        outputs = []  # a one-channel input is both layouts at once: look at what the convolutions give
        hook = convs[1].register_forward_hook(lambda m, i, o: outputs.append(o))
        batch = {"image": torch.rand(2, 1, 32, 32, 32), "target": torch.zeros(2, 7, 32, 32, 32)}
        loss = bench.layout_loss(cfg, layout, model, batch, torch.device("cpu"))
        hook.remove()
        assert torch.isfinite(loss) and outputs[0].shape[1] > 1
        assert outputs[0].is_contiguous(memory_format=fmt)
        other = torch.contiguous_format if fmt == torch.channels_last_3d else torch.channels_last_3d
        assert not outputs[0].is_contiguous(memory_format=other)


def test_main_prints_both_layouts_both_depthwise_backwards_and_their_ratios(capsys):
    bench.main(["--config", str(config_path("demo/stage1.yaml")), "--steps", "1", "--rounds", "1", "--studies", "1",
                "--study-shape", "40", "64", "64", *SMALL])
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[1]: line.split()[2:] for line in lines[2:-2]}
    variants = {f"{layout}/{dw}" for layout in bench.LAYOUTS for dw in bench.DEPTHWISE}
    assert set(rows) == variants | {"ratio:layout", "ratio:depthwise"}
    for variant in variants:
        assert all(float(v) > 0 for v in rows[variant])
    for ratio, (a, b) in {"ratio:layout": ("channels_last/fast", "contiguous/fast"),
                          "ratio:depthwise": ("channels_last/fast", "channels_last/library")}.items():
        for got, x, y in zip(rows[ratio], rows[a], rows[b]):
            assert abs(float(got.rstrip("x")) / (float(x) / float(y)) - 1) < 0.05  # printed rates are rounded
    # the weight average's update beside timm's, then the augmentation's warp beside one batch item
    average = re.fullmatch(r"weight average \(EMA\) update, ms a step: foreach ([\d.]+), "
                           r"timm's ModelEmaV2 ([\d.]+), ratio ([\d.]+)x", lines[-2])
    assert average, lines[-2]
    ours, timms, ratio = map(float, average.groups())
    assert ours > 0 and timms > 0 and abs(ratio / (timms / ours) - 1) < 0.1
    # the last line: the augmentation's warp in depth slabs beside one batch item, and their ratio
    warp = re.fullmatch(r"augmentation warp on the CPU, image \+ 7 target channels, samples/s: depth slabs ([\d.]+), "
                        r"one batch item ([\d.]+), ratio ([\d.]+)x", lines[-1])
    assert warp, lines[-1]
    slabs, one, ratio = map(float, warp.groups())
    assert slabs > 0 and one > 0 and abs(ratio / (slabs / one) - 1) < 0.1


def test_depthwise_baseline_model_has_the_library_convolutions():
    cfg = load_config(Stage1Config, config_path("demo/stage1.yaml"), SMALL)
    fast = bench.layout_model(cfg, torch.device("cpu"), "channels_last", "fast")
    library = bench.layout_model(cfg, torch.device("cpu"), "channels_last", "library")
    assert sum(isinstance(m, FastDepthwiseConv3d) for m in fast.modules()) > 0
    assert not any(isinstance(m, FastDepthwiseConv3d) for m in library.modules())


def test_train_rates_take_turns_and_report_each_variants_median_round():
    calls = []

    def stepper(name, seconds):
        def step():
            calls.append(name)
            time.sleep(seconds)
        return step

    rates = bench.train_rates({"a": stepper("a", 0.002), "b": stepper("b", 0.01)}, torch.device("cpu"),
                              batch=2, steps=3, rounds=2)
    assert calls == ["a", "a", "b", "b"] + (["a"] * 3 + ["b"] * 3) * 2  # warm-up, then turns
    assert rates["b"] <= 2 / 0.01 and rates["a"] > rates["b"]
