"""The stage-2 throughput benchmark's rows for both model types (python -m tooling.bench.stage2_model)."""
from __future__ import annotations

import torch

from tooling.bench import stage2_model as bench


def test_type1_and_type2_rows_on_cpu(monkeypatch):
    chunks = []
    original = bench.build_model

    def spy(cfg, pretrained_source=True):
        chunks.append((cfg.type, cfg.checkpoint_chunk))
        return original(cfg, pretrained_source)

    monkeypatch.setattr(bench, "build_model", spy)
    rows = bench.run(["demo"], torch.device("cpu"), iters=1, batch=2, types=[1, 2], warmup=0,
                     overrides=["crop.size=32", "crop.n_slices=4"])
    assert [(r["type"], r["variant"]) for r in rows] == [
        (1, "fp32"), (1, "fp32+channels_last"), (2, "fp32"), (2, "fp32+checkpoint 4")]
    assert chunks == [(1, 0), (1, 0), (2, 0), (2, 4)]  # the checkpoint row builds a checkpointed model
    for r in rows:
        assert r["train_samples_s"] > 0 and r["infer_samples_s"] > 0
        per_sample = 7 if r["type"] == 2 else 1  # a type-2 sample is a whole study: seven stacks
        assert abs(r["train_stacks_s"] - per_sample * r["train_samples_s"]) < 1e-6
        assert "train_peak_gb" not in r  # memory is read on CUDA only
    table = bench.format_table(rows)
    assert len(table.splitlines()) == 2 + len(rows) and "fp32+checkpoint 4" in table


def test_inference_is_timed_with_the_configs_test_time_views(monkeypatch):
    """The infer column times what validation and make_submission run: four flipped views with
    tta: flips (the default), one with tta=none."""
    views = []
    original = bench.predict_logits

    def spy(model, images, *args, tta="none"):
        views.append(tta)
        return original(model, images, *args, tta=tta)

    monkeypatch.setattr(bench, "predict_logits", spy)
    small = ["crop.size=32", "crop.n_slices=4"]
    for tta in ("flips", "none"):
        views.clear()
        rows = bench.run(["demo"], torch.device("cpu"), iters=1, batch=2, types=[1], warmup=0,
                         overrides=[*small, f"tta={tta}"])
        assert views == [tta] * len(rows) and {r["tta"] for r in rows} == {tta}
        assert f", {tta} |" in bench.format_table(rows)
