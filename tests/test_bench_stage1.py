"""The stage-1 throughput benchmark times both memory layouts side by side (python -m tooling.bench.stage1)."""
from __future__ import annotations

import torch

from common.config import load_config
from configs import config_path
from stage1_seg.config import Stage1Config
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


def test_main_prints_both_layouts_and_their_ratio(capsys):
    bench.main(["--config", str(config_path("demo/stage1.yaml")), "--steps", "1", "--studies", "1",
                "--study-shape", "40", "64", "64", *SMALL])
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[1]: line.split()[2:] for line in lines[2:]}
    assert set(rows) == {"channels_last", "contiguous", "ratio"}
    for layout in ("channels_last", "contiguous"):
        assert all(float(v) > 0 for v in rows[layout])
    for got, cl, co in zip(rows["ratio"], rows["channels_last"], rows["contiguous"]):
        assert abs(float(got.rstrip("x")) / (float(cl) / float(co)) - 1) < 0.05  # printed rates are rounded
