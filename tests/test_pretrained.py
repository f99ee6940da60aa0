"""ImageNet starts for both stages: files, the hub cache, clear failures, and rebuilding without them.

"ImageNet" weights here are seeded random timm models saved in the formats timm
reads; nothing is downloaded (conftest sets HF_HUB_OFFLINE=1 for every test).
"""
from __future__ import annotations

import logging
import shutil
import socket
import time
from pathlib import Path

import pandas as pd
import pytest
import safetensors.torch
import timm
import torch
from timm.models import adapt_input_conv

import make_submission
from common import pretrained
from common.checkpoint import load_checkpoint
from common.config import load_config, replace
from common.metric import validate_submission
from common.pretrained import PretrainedError, PretrainedFileNotFound
from common.folds import load_or_make_folds
from tooling.synth import make_dataset
from stage1_seg import train as train1
from stage1_seg.config import ModelConfig as SegModelConfig
from stage1_seg.config import Stage1Config
from stage1_seg.model import build_model as build_seg
from stage2_cls import train as train2
from stage2_cls.config import ModelConfig as ClsModelConfig
from stage2_cls.model import build_model as build_cls
from tests.test_stage2_train import make_crop_data, tiny_config

FORMATS = ("pth", "bin", "safetensors")
SEG_DECODER = (32, 16, 16, 8, 8)


def seeded_state(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The state dict of a seeded 2D timm model as timm's ImageNet files hold it (3 channels, with head)."""
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False).state_dict()


def save_state(state: dict[str, torch.Tensor], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:  # .pth and .bin (pytorch_model.bin) are both torch.save files
        torch.save(state, path)
    return path


def cls_cfg(**changes) -> ClsModelConfig:
    return ClsModelConfig(**{"backbone": "convnext_atto", "lstm_hidden": 8, "lstm_layers": 1, "drop_path": 0.0,
                             **changes})


def seg_cfg(**changes) -> SegModelConfig:
    return SegModelConfig(**{"encoder": "tu-tf_efficientnetv2_b0", "decoder_channels": SEG_DECODER, **changes})


def assert_backbone_is_file(backbone_state: dict[str, torch.Tensor], file_state: dict[str, torch.Tensor],
                            in_chans: int, stem: str = "stem.0.weight") -> None:
    """Every backbone tensor equals the file's; the stem equals timm's adapt_input_conv of the file's."""
    for key, value in backbone_state.items():
        expected = adapt_input_conv(in_chans, file_state[key]) if key == stem else file_state[key]
        assert torch.equal(value, expected), key


def fill_hub_cache(cache: Path, repo_id: str, state: dict[str, torch.Tensor]) -> Path:
    """Lay a file out as huggingface_hub caches a download (refs/main -> snapshots/<commit>/)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return save_state(state, snapshot / "model.safetensors")


@pytest.fixture
def empty_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt to download fails the test."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args}")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


# ---- stage 2 ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_stage2_file_loads_through_timm_in_every_format(fmt, tmp_path, caplog, no_download):
    state = seeded_state("convnext_atto")
    path = save_state(state, tmp_path / f"atto.{fmt}")
    with caplog.at_level(logging.INFO):
        model = build_cls(cls_cfg(weights_file=str(path)))
    assert_backbone_is_file(model.backbone.state_dict(), state, in_chans=6)
    assert f"all {len(model.backbone.state_dict())} tensors loaded from the file {path}" in caplog.text


@pytest.mark.parametrize("fmt", FORMATS)
def test_stage2_training_at_lr0_keeps_the_file_weights(fmt, tmp_path):
    state = seeded_state("convnext_atto", seed=3)
    path = save_state(state, tmp_path / f"atto.{fmt}")
    data, work, _ = make_crop_data(tmp_path / "run", n_studies=4)
    cfg = tiny_config(**{"model.backbone": "convnext_atto", "model.pretrained": True, "model.weights_file": str(path),
                         "model.drop_path": 0.0, "train.lr": 0.0, "train.steps": 2, "train.eval_every": 2,
                         "train.batch_size": 16, "train.ema_decay": 0.0})  # an EMA's d*w + (1-d)*w rounds
    train2.run(cfg, data, work, fold=0)
    trained = load_checkpoint(work / "stage2" / cfg.run / "fold0" / "last.pt")["model"]
    backbone = {k.removeprefix("backbone."): v for k, v in trained.items() if k.startswith("backbone.")}
    assert_backbone_is_file(backbone, state, in_chans=6)


def test_stage2_file_for_another_architecture_fails_at_build(tmp_path):
    path = save_state(seeded_state("resnet18"), tmp_path / "resnet18.safetensors")
    with pytest.raises(PretrainedError, match=r"resnet18\.safetensors.*timm model 'convnext_atto'.*another"):
        build_cls(cls_cfg(weights_file=str(path)))
    bigger = save_state(seeded_state("convnext_femto"), tmp_path / "femto.pth")  # same keys, other shapes
    with pytest.raises(PretrainedError, match=r"femto\.pth: its tensors do not fit timm model 'convnext_atto'"):
        build_cls(cls_cfg(weights_file=str(bigger)))
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a state dict")
    with pytest.raises(PretrainedError, match=r"garbage\.bin: cannot be read as a state dict"):
        build_cls(cls_cfg(weights_file=str(garbage)))


# ---- stage 1 ------------------------------------------------------------------------------

@pytest.mark.parametrize("in_channels", [1, 3])
def test_stage1_inflates_every_2d_kernel(in_channels, tmp_path, caplog, no_download):
    state = seeded_state("tf_efficientnetv2_b0")
    path = save_state(state, tmp_path / "effv2_b0.safetensors")
    with caplog.at_level(logging.INFO):
        model = build_seg(seg_cfg(in_channels=in_channels, weights_file=str(path)))
    encoder = model.encoder.model.state_dict()
    kernels = 0
    for key, value in encoder.items():
        source = state[key]
        if key == "conv_stem.weight":
            source = adapt_input_conv(in_channels, source)  # timm adapts the stem before inflation
        if value.ndim == 5:
            kernels += 1
            depth = value.shape[2]
            assert source.ndim == 4 and value.shape[3:] == source.shape[2:], key
            # repeated along depth (dim 2 of (O, I, D, H, W)) and divided by depth: sums back to the 2D kernel
            assert torch.allclose(value, source.unsqueeze(2).expand_as(value) / depth), key
            assert torch.allclose(value.sum(2), source, atol=1e-6), key
        else:
            assert torch.equal(value, source), key
    weights = sum(not k.endswith("num_batches_tracked") for k in encoder)
    assert kernels == 90 and weights == 354
    assert (f"{weights} of {weights} weight tensors loaded from the file {path} ({kernels} 2D kernels "
            f"inflated to 3D along depth") in caplog.text
    assert "0 left at initial values" in caplog.text


def test_stage1_loading_too_few_tensors_is_an_error(tmp_path, monkeypatch):
    # A 2D model whose shapes mostly differ from the encoder's (b1 for a b0 encoder) loads < 95%.
    from stage1_seg import model as seg_model

    def other_model(source, **kwargs):
        torch.manual_seed(0)
        return timm.create_model("tf_efficientnetv2_b2", in_chans=kwargs.get("in_chans", 3))
    monkeypatch.setattr(seg_model, "create_pretrained", other_model)
    path = save_state(seeded_state("tf_efficientnetv2_b0"), tmp_path / "b0.pth")
    with pytest.raises(PretrainedError, match=r"b0\.pth: only \d+ of the 354 weight tensors .* at least 95% needed"):
        build_seg(seg_cfg(weights_file=str(path)))


def test_stage1_file_for_another_architecture_fails_at_build(tmp_path):
    path = save_state(seeded_state("convnext_atto"), tmp_path / "atto.pth")
    with pytest.raises(PretrainedError, match=r"atto\.pth.*timm model 'tf_efficientnetv2_b0'.*another architecture"):
        build_seg(seg_cfg(weights_file=str(path)))


def test_stage1_only_timm_encoders_can_be_inflated(tmp_path):
    path = save_state(seeded_state("tf_efficientnetv2_b0"), tmp_path / "b0.pth")
    with pytest.raises(PretrainedError, match="'efficientnet-b0' cannot start from ImageNet.*tu-tf_efficientnetv2_s"):
        build_seg(seg_cfg(encoder="efficientnet-b0", weights_file=str(path)))


# ---- failing at start, fast, with the way out -----------------------------------------------

def _stage1_cfg(**model) -> Stage1Config:
    return load_config(Stage1Config, None, ["run=pre", "preprocess.size=32", "model.encoder=tu-tf_efficientnetv2_b0",
                                            "model.decoder_channels=[16,16,8,8,8]",
                                            *[f"model.{k}={v}" for k, v in model.items()]])


def _stage2_cfg(**model):
    return tiny_config(**{"model.backbone": "convnext_atto", **{f"model.{k}": v for k, v in model.items()}})


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_missing_weights_file_stops_training_at_start(stage, tmp_path):
    missing = tmp_path / "nowhere" / "weights.safetensors"
    cfg = _stage1_cfg(weights_file=missing) if stage == "stage1" else _stage2_cfg(weights_file=str(missing))
    run = train1.run if stage == "stage1" else train2.run
    # the data folder does not exist either: the weights are checked first, before any data work
    with pytest.raises(PretrainedFileNotFound, match=r"model.weights_file not found: .*weights\.safetensors") as err:
        run(cfg, tmp_path / "no-data", tmp_path / "work", fold=0)
    assert "python -m common.pretrained fetch" in str(err.value)
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_pretrained_without_hub_or_cache_stops_training_at_start(stage, tmp_path, empty_cache, no_download):
    cfg = _stage1_cfg(pretrained="true") if stage == "stage1" else _stage2_cfg(pretrained=True)
    run = train1.run if stage == "stage1" else train2.run
    started = time.perf_counter()
    with pytest.raises(PretrainedError) as err:
        run(cfg, tmp_path / "no-data", tmp_path / "work", fold=0)
    assert time.perf_counter() - started < 5
    message = str(err.value)
    assert "HF_HUB_OFFLINE is set" in message and str(empty_cache) in message
    for way in ("model.weights_file=PATH", "python -m common.pretrained fetch", "HF_HUB_OFFLINE=1",
                "model.pretrained=false"):
        assert way in message
    assert not (tmp_path / "work").exists()


def test_unreachable_hub_fails_fast_without_retries(monkeypatch, empty_cache, no_download):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    probed = []

    def no_network(address, timeout=None, *args, **kwargs):
        probed.append((address, timeout))
        raise OSError("network unreachable (test)")
    monkeypatch.setattr(socket, "create_connection", no_network)
    started = time.perf_counter()
    with pytest.raises(PretrainedError, match=r"hub \(https://huggingface.co\) cannot be reached"):
        build_cls(cls_cfg(pretrained=True))
    assert time.perf_counter() - started < 5
    assert probed == [(("huggingface.co", 443), pretrained.HUB_PROBE_SECONDS)]


class _Connection:
    def close(self) -> None:
        pass


def test_online_hub_downloads_into_the_cache_safetensors_first(monkeypatch, empty_cache):
    """The download path, with huggingface_hub's download faked: nothing leaves this machine."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(socket, "create_connection", lambda *args, **kwargs: _Connection())
    state = seeded_state("convnext_atto", seed=7)
    asked = []

    def fake_download(repo_id, filename, revision=None, cache_dir=None, **kwargs):
        asked.append((repo_id, filename, cache_dir))
        if filename.endswith(".safetensors"):
            raise EntryNotFoundError(f"{repo_id} has no {filename} (test)")
        return str(save_state(state, Path(cache_dir) / "downloaded" / filename))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model = build_cls(cls_cfg(pretrained=True))
    repo = "timm/convnext_atto.d2_in1k"
    assert asked == [(repo, "model.safetensors", str(empty_cache)), (repo, "pytorch_model.bin", str(empty_cache))]
    assert_backbone_is_file(model.backbone.state_dict(), state, in_chans=6)

    def broken_network(repo_id, filename, **kwargs):
        raise ConnectionError("connection reset (test)")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", broken_network)
    with pytest.raises(PretrainedError,
                       match=r"(?s)could not download .*'convnext_atto'.*ConnectionError.*model.weights_file"):
        build_cls(cls_cfg(pretrained=True))


def test_hub_cache_is_used_offline_and_fetch_writes_files(tmp_path, empty_cache, caplog, no_download):
    state = seeded_state("convnext_atto", seed=5)
    repo_id = timm.models.get_pretrained_cfg("convnext_atto").hf_hub_id
    cached = fill_hub_cache(empty_cache, repo_id, state)
    with caplog.at_level(logging.INFO):
        model = build_cls(cls_cfg(pretrained=True))
    assert_backbone_is_file(model.backbone.state_dict(), state, in_chans=6)
    assert f"from the Hugging Face cache {cached}" in caplog.text

    written = pretrained.main(["fetch", "--out", str(tmp_path / "weights"), "--arch", "convnext_atto"])
    assert written == {"convnext_atto": tmp_path / "weights" / "convnext_atto.safetensors"}
    from_file = build_cls(cls_cfg(weights_file=str(written["convnext_atto"])))
    assert_backbone_is_file(from_file.backbone.state_dict(), state, in_chans=6)


# ---- rebuilding never needs the pretrained source --------------------------------------------

@pytest.mark.slow
def test_trained_with_weights_files_then_deleted_submission_and_resume_work(tmp_path, monkeypatch):
    """Both stages train from weights files; the files go; make_submission and --resume still run."""
    files = {"stage1": save_state(seeded_state("tf_efficientnetv2_b0"), tmp_path / "w" / "b0.safetensors"),
             "stage2": save_state(seeded_state("convnext_atto"), tmp_path / "w" / "atto.pth")}
    data = tmp_path / "data"
    make_dataset(data, n_train=5, n_seg=4, n_test=2, size=48, seed=3, workers=1)
    models = tmp_path / "models"
    load_or_make_folds(data, models, n_folds=2)
    cfg1 = load_config(Stage1Config, None, [
        "run=pre", "preprocess.size=32", "model.encoder=tu-tf_efficientnetv2_b0",
        "model.decoder_channels=[16,16,8,8,8]", "model.pretrained=true", f"model.weights_file={files['stage1']}",
        "train.steps=2", "train.eval_every=2", "train.batch_size=2", "train.val_batch_size=2", "train.num_workers=0",
        "predict.threshold=0.5"])
    train1.run(cfg1, data, models, fold=0)
    crop_data, crop_work, _ = make_crop_data(tmp_path / "crops", n_studies=4, n_slices=4, size=32)
    cfg2 = replace(_stage2_cfg(pretrained=True, weights_file=str(files["stage2"])),
                   **{"run": "pre", "crop.n_slices": 4, "crop.size": 32, "train.steps": 4, "train.eval_every": 2})
    train2.run(cfg2, crop_data, crop_work, fold=0)
    shutil.copytree(crop_work / "stage2" / "pre", models / "stage2" / "pre")
    for path in files.values():
        path.unlink()
    # from here on nothing may even look for a pretrained source
    from stage1_seg import model as seg_model
    from stage2_cls import model as cls_model

    def refuse(*args, **kwargs):
        raise AssertionError("a pretrained source was looked for")
    for module in (pretrained, seg_model, cls_model):
        monkeypatch.setattr(module, "resolve_source", refuse)

    out = tmp_path / "submission.csv"
    cfg = make_submission.SubmissionConfig(stage1_checkpoints="stage1/pre/fold*/best.pt",
                                           stage2_checkpoints="stage2/pre/fold*/best.pt",
                                           time_budget_hours=1.0)
    summary = make_submission.run(cfg, data, models, out)
    test = pd.read_csv(data / "test.csv", dtype=str)
    validate_submission(pd.read_csv(out, dtype={"row_id": str}), test["row_id"])
    assert summary["fallback"] == 0 and summary["predicted"] == test["StudyInstanceUID"].nunique()

    # --resume rebuilds from last.pt (same config, weights file still named in it, and gone)
    metrics = train2.run(cfg2, crop_data, crop_work, fold=0, resume=True)
    assert metrics["steps"] == 4 and metrics["last"]["step"] == 4
