"""The oracle stage 1 (true labels in stage 1's output format) of a synthetic dataset."""
import numpy as np
import pandas as pd
import pytest

from common.config import load_config
from configs import config_path
from stage1_seg.boxes import read_boxes, z_iou
from stage1_seg.config import Stage1Config
from tooling.oracle import write_oracle_stage1
from tooling.synth import make_dataset

ARGS = dict(n_train=4, n_test=1, size=48, seed=11, n_slices=None, variety="varied")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    data = tmp_path_factory.mktemp("oracle") / "data"
    make_dataset(data, ARGS["n_train"], 1, ARGS["n_test"], ARGS["size"], ARGS["seed"], None, variety="varied")
    return data


def test_oracle_ranges_match_the_truth_on_every_training_study(dataset, tmp_path):
    cfg = load_config(Stage1Config, config_path("demo/stage1.yaml"))
    run_dir = write_oracle_stage1(dataset, tmp_path, cfg, **ARGS)
    boxes = read_boxes(run_dir / "boxes.csv")
    truth = pd.read_csv(dataset / "vertebra_slices.csv", dtype={"StudyInstanceUID": str})
    train = set(pd.read_csv(dataset / "train.csv", dtype=str)["StudyInstanceUID"])
    # every training study, with or without a mask written, and only those
    assert set(boxes["StudyInstanceUID"]) == train and len(boxes) == 7 * len(train)
    merged = truth[truth["StudyInstanceUID"].isin(train)].merge(boxes, on=["StudyInstanceUID", "vertebra"],
                                                                suffixes=("", "_o"))
    present = merged[merged["z0"] >= 0]
    assert len(present) > 0 and (present["status"] != "missing").all()
    ious = np.array([z_iou((r.z0_o, r.z1_o), (r.z0, r.z1)) for r in present.itertuples()])
    assert ious.min() >= 0.7 and ious.mean() >= 0.85, ious
    with np.load(next((run_dir / "masks").glob("*.npz"))) as npz:
        assert npz["probs"].shape == (7,) + (cfg.preprocess.size,) * 3 and npz["probs"].dtype == np.uint8


def test_oracle_refuses_a_dataset_made_with_other_arguments(dataset, tmp_path):
    cfg = load_config(Stage1Config, config_path("demo/stage1.yaml"))
    with pytest.raises((ValueError, FileNotFoundError), match="other arguments"):
        write_oracle_stage1(dataset, tmp_path, cfg, **{**ARGS, "seed": 12})
