"""Stage-1 cubes with more slices head to feet than across (``preprocess.depth``)."""
import hashlib
import json
from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest

from common.config import from_dict, load_config, to_dict
from stage1_seg import predict, train
from stage1_seg.config import PreprocessConfig, Stage1Config
from stage1_seg.data import cache_dir, check_cube_shape, cube_shape, preprocess_hu
from tooling.synth import make_dataset

TINY = ["run=deep", "preprocess.size=32", "preprocess.depth=64", "model.encoder=efficientnet-b0",
        "model.pretrained=false", "model.decoder_channels=[16,16,8,8,8]", "train.batch_size=2",
        "train.val_batch_size=2", "train.num_workers=0", "train.eval_every=2", "train.warmup_steps=1",
        "predict.folds=[0]"]


def test_cube_shape_and_checks():
    assert cube_shape(PreprocessConfig(size=64)) == (64, 64, 64)
    assert cube_shape(PreprocessConfig(size=64, depth=96)) == (96, 64, 64)
    for bad in (PreprocessConfig(size=64, depth=80), PreprocessConfig(size=64, depth=-32),
                PreprocessConfig(size=48), PreprocessConfig(size=0)):
        with pytest.raises(ValueError, match="multiple of 32"):
            check_cube_shape(bad)


def test_cache_folder_of_a_cubic_cube_is_unchanged_and_a_deeper_one_differs(tmp_path):
    cfg = PreprocessConfig(size=64)
    before = {k: v for k, v in asdict(cfg).items() if k != "depth"}  # the settings before depth existed
    key = hashlib.sha1(json.dumps(before, sort_keys=True).encode()).hexdigest()[:10]
    assert cache_dir(tmp_path, cfg).name == f"size64-{key}"
    assert cache_dir(tmp_path, PreprocessConfig(size=64, depth=96)).name.startswith("size64x96-")


def test_a_config_saved_before_depth_existed_reads_as_a_cubic_cube():
    saved = to_dict(load_config(Stage1Config, None, ["preprocess.size=64"]))
    del saved["preprocess"]["depth"]  # what checkpoints and config.yaml files of earlier runs hold
    cfg = from_dict(Stage1Config, saved)
    assert cfg.preprocess.depth == 0 and cube_shape(cfg.preprocess) == (64, 64, 64)


def test_preprocess_gives_the_deeper_cube():
    hu = np.random.default_rng(0).integers(-1000, 1500, size=(50, 40, 40)).astype(np.int16)
    cube, region = preprocess_hu(hu, (1.0, 0.5, 0.5), PreprocessConfig(size=32, depth=64, crop_mm=0))
    assert cube.shape == (64, 32, 32) and cube.dtype == np.float32
    assert region.tolist() == [0, 50, 0, 40, 0, 40]


@pytest.mark.slow
def test_train_and_predict_with_a_deeper_cube(tmp_path):
    data = tmp_path / "data"
    make_dataset(data, n_train=6, n_seg=5, n_test=1, size=48, seed=5, workers=1)
    cfg = load_config(Stage1Config, None, [*TINY, "train.steps=2"])
    metrics = train.run(cfg, data, tmp_path / "work", fold=0)
    assert 0.0 <= metrics["mean_dice"] <= 1.0
    folder = next((tmp_path / "work" / "cache" / "stage1").iterdir())
    assert folder.name.startswith("size32x64-")
    with np.load(next(folder.glob("*.npz"))) as npz:
        assert npz["image"].shape == (64, 32, 32) and npz["target"].shape == (7, 64, 32, 32)
    summary = predict.run(cfg, data, tmp_path / "work", splits=["train", "test"])
    assert summary["failed"] == [] and summary["studies"] == 7
    run_dir = tmp_path / "work" / "stage1" / "deep"
    boxes = pd.read_csv(run_dir / "boxes.csv", dtype={"StudyInstanceUID": str})
    with_dice = 0
    for path in (run_dir / "masks").glob("*.npz"):
        with np.load(path) as npz:
            assert npz["probs"].shape == (7, 64, 32, 32)
            n_slices = int(npz["shape"][0])
            if "dice" in npz.files:  # the studies with masks: Dice at their own resolution
                with_dice += 1
                assert npz["dice"].shape == (7,) and ((npz["dice"] >= 0) & (npz["dice"] <= 1)).all()
        found = boxes[(boxes["StudyInstanceUID"] == path.stem) & (boxes["status"] != "missing")]
        assert ((found["z0"] >= 0) & (found["z1"] < n_slices) & (found["z0"] <= found["z1"])).all()
    assert with_dice == 5
