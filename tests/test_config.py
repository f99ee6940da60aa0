"""Config loading: typed dataclasses, dotted overrides, unknown keys rejected, round trip."""
import dataclasses

import pytest
import yaml

from common.cli import DataDirError, resolve_data_dir
from common.config import ConfigError, load_config, replace, save_config, to_dict
from configs import config_path, path_root
from make_submission import SubmissionConfig
from stage1_seg.config import Stage1Config
from stage2_cls.config import Stage2Config, for_model_type

SCHEMAS = {"stage1.yaml": Stage1Config, "stage2.yaml": Stage2Config, "submission.yaml": SubmissionConfig}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_shipped_configs_load_and_round_trip(name, tmp_path):
    for path in (config_path(name), config_path(f"demo/{name}")):
        cfg = load_config(SCHEMAS[name], path)
        save_config(cfg, tmp_path / "resolved.yaml")
        assert load_config(SCHEMAS[name], tmp_path / "resolved.yaml") == cfg


def _leaves(raw, prefix=""):
    for key, value in (raw or {}).items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("path", sorted(path_root().rglob("*.yaml")), ids=lambda p: p.relative_to(path_root()).as_posix())
def test_shipped_yaml_holds_only_differences_from_the_defaults(path):
    defaults = to_dict(load_config(SCHEMAS[path.name], None))
    for key, value in _leaves(yaml.safe_load(path.read_text())):
        node = defaults
        for part in key.split("."):
            node = node[part]
        assert node != (list(value) if isinstance(value, (list, tuple)) else value), \
            f"{path.name}: {key}: {value!r} is already the default"


def test_config_path_names_what_is_shipped():
    assert config_path("demo/stage1.yaml").is_file()
    with pytest.raises(FileNotFoundError, match="stage1.yaml"):
        config_path("stage3.yaml")


def test_overrides_are_typed():
    cfg = load_config(Stage1Config, config_path("stage1.yaml"),
                      ["train.steps=3", "train.lr=1e-4", "model.encoder=efficientnet-b0",
                       "model.decoder_channels=[32,16,8,8,8]", "predict.flip_tta=true"])
    assert cfg.train.steps == 3 and cfg.train.lr == pytest.approx(1e-4)
    assert cfg.model.encoder == "efficientnet-b0" and cfg.model.decoder_channels == (32, 16, 8, 8, 8)
    assert cfg.predict.flip_tta is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.steps = 5  # frozen


def test_partial_section_keeps_the_schema_defaults():
    # Stage2Config gives its train section its own defaults (lr 2.3e-4, batch 8):
    # overriding one key must not fall back to the generic TrainConfig ones.
    cfg = load_config(Stage2Config, None, ["train.steps=2"])
    assert cfg.train.steps == 2 and cfg.train.lr == pytest.approx(2.3e-4) and cfg.train.batch_size == 8


@pytest.mark.parametrize("override,message", [
    ("train.step=3", "unknown key"),
    ("nosuch.key=1", "unknown key"),
    ("train.steps=three", "expected an integer"),
    ("train.amp=maybe", "expected true/false"),
    ("model.pooling=max", "is not one of"),
    ("train", "not of the form"),
])
def test_bad_overrides_are_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Stage2Config, None, [override])


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(Stage1Config, bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Stage1Config, tmp_path / "missing.yaml")


def test_replace_and_to_dict():
    cfg = load_config(Stage1Config)
    other = replace(cfg, **{"train.steps": 7, "preprocess.size": 64})
    assert other.train.steps == 7 and other.preprocess.size == 64 and cfg.train.steps != 7
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


def test_type2_runs_take_the_type2_schedule_and_type1_runs_do_not():
    real = load_config(Stage2Config, config_path("stage2.yaml"))
    assert for_model_type(real) is real                                  # type 1: train as written
    whole = for_model_type(replace(real, **{"model.type": 2}))
    assert whole.train.steps == real.type2.steps > 0 and whole.train.eval_every == real.type2.eval_every > 0
    assert whole.train.steps < real.train.steps                          # a step is 7 vertebra stacks
    assert (whole.train.batch_size, whole.train.lr, whole.train.select) == \
        (real.train.batch_size, real.train.lr, real.train.select)          # 0 in type2: train's value
    # An epoch of the real data is ~1,412 type-1 batches of 8 and ~201 type-2 batches: both
    # schedules give many passes, and the best of the fold's validation checks is kept.
    assert real.train.steps / 1412 > 50 and whole.train.steps / 201 > 40 and real.train.select == "best"
    demo = load_config(Stage2Config, config_path("demo/stage2.yaml"), ["model.type=2", "train.steps=7"])
    demo2 = for_model_type(demo)
    assert (demo2.train.steps, demo2.train.batch_size, demo2.train.val_batch_size) == (7, 2, 4)
    assert demo2.train.eval_every == demo.train.eval_every and demo.train.select == "last"
