"""Config loading: typed dataclasses, dotted overrides, unknown keys rejected, round trip."""
from pathlib import Path

import pytest

from common.cli import DataDirError, resolve_data_dir
from common.config import ConfigError, load_config, replace, save_config, to_dict
from stage1_seg.config import Stage1Config
from stage2_cls.config import Stage2Config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("schema,name", [(Stage1Config, "stage1.yaml"), (Stage2Config, "stage2.yaml")])
def test_shipped_configs_load_and_round_trip(schema, name, tmp_path):
    for path in (ROOT / "configs" / name, ROOT / "configs" / "demo" / name):
        cfg = load_config(schema, path)
        save_config(cfg, tmp_path / "resolved.yaml")
        assert load_config(schema, tmp_path / "resolved.yaml") == cfg


def test_overrides_are_typed():
    cfg = load_config(Stage1Config, ROOT / "configs" / "stage1.yaml",
                      ["train.epochs=3", "train.lr=1e-4", "model.encoder=efficientnet-b0",
                       "model.decoder_channels=[32,16,8,8,8]", "predict.flip_tta=true"])
    assert cfg.train.epochs == 3 and cfg.train.lr == pytest.approx(1e-4)
    assert cfg.model.encoder == "efficientnet-b0" and cfg.model.decoder_channels == (32, 16, 8, 8, 8)
    assert cfg.predict.flip_tta is True
    with pytest.raises(Exception):
        cfg.train.epochs = 5  # frozen


def test_partial_section_keeps_the_schema_defaults():
    # Stage2Config gives its train section its own defaults (lr 2e-4, batch 8):
    # overriding one key must not fall back to the generic TrainConfig ones.
    cfg = load_config(Stage2Config, None, ["train.epochs=2"])
    assert cfg.train.epochs == 2 and cfg.train.lr == pytest.approx(2e-4) and cfg.train.batch_size == 8


@pytest.mark.parametrize("override,message", [
    ("train.epoch=3", "unknown key"),
    ("nosuch.key=1", "unknown key"),
    ("train.epochs=three", "expected an integer"),
    ("train.amp=maybe", "expected true/false"),
    ("model.pooling=max", "is not one of"),
    ("train", "not of the form"),
])
def test_bad_overrides_are_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Stage2Config, None, [override])


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(Stage1Config, bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Stage1Config, tmp_path / "missing.yaml")


def test_replace_and_to_dict():
    cfg = load_config(Stage1Config)
    other = replace(cfg, **{"train.epochs": 7, "preprocess.size": 64})
    assert other.train.epochs == 7 and other.preprocess.size == 64 and cfg.train.epochs != 7
    assert to_dict(other)["model"]["decoder_channels"] == list(cfg.model.decoder_channels)


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("RSNA_DATA_DIR", raising=False)
    assert resolve_data_dir(tmp_path) == tmp_path
    monkeypatch.setenv("RSNA_DATA_DIR", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path
    with pytest.raises(DataDirError, match="not a folder"):
        resolve_data_dir(tmp_path / "nope")
    monkeypatch.delenv("RSNA_DATA_DIR")
    monkeypatch.setattr("common.cli.KAGGLE_DATA_DIR", tmp_path / "absent")
    with pytest.raises(DataDirError, match="--data-dir"):
        resolve_data_dir(None)
