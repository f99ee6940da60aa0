"""make_submission end to end on a tiny synthetic dataset with tiny random-weight models."""
import json
import logging

import numpy as np
import pandas as pd
import pytest
import yaml

import make_submission
from common.metric import validate_submission
from tests.tiny_models import write_tiny_dataset, write_tiny_models


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sub")
    write_tiny_dataset(root / "data")
    paths = write_tiny_models(root / "models", n_folds=2)
    (root / "models" / "submission.yaml").write_text(yaml.safe_dump(paths))
    return root


def _config(root, **changes):
    from common.config import load_config
    return load_config(make_submission.SubmissionConfig, root / "models" / "submission.yaml",
                       [f"{k}={v}" for k, v in changes.items()])


def test_complete_submission_in_test_order(setup, tmp_path):
    out = tmp_path / "submission.csv"
    summary = make_submission.run(_config(setup), setup / "data", setup / "models", out)
    test = pd.read_csv(setup / "data" / "test.csv", dtype=str)
    sub = pd.read_csv(out, dtype={"row_id": str})
    assert list(sub["row_id"]) == list(test["row_id"])
    validate_submission(sub, test["row_id"])
    assert sub["fractured"].between(1e-4, 1 - 1e-4).all()
    assert summary["predicted"] == test["StudyInstanceUID"].nunique() and summary["fallback"] == 0
    assert set(summary["seconds_per_study"]) == {"decode", "wait", "stage1", "crops", "stage2"}
    log = pd.read_csv(tmp_path / "submission_log.csv")
    assert (log["status"] == "ok").all()


def test_missing_folder_and_broken_study_fall_back_to_prior(setup, tmp_path, caplog):
    test = pd.read_csv(setup / "data" / "test.csv", dtype=str)
    uids = list(dict.fromkeys(test["StudyInstanceUID"]))
    broken = tmp_path / "data"
    # a copy of the data whose first test study is corrupted, plus a study with no folder (public quirk)
    import shutil
    shutil.copytree(setup / "data", broken)
    for f in (broken / "test_images" / uids[0]).iterdir():
        f.write_bytes(b"not a dicom file")
    ghost = "1.2.826.0.1.3680043.99999"
    extra = pd.DataFrame({"row_id": [f"{ghost}_{t}" for t in ("C1", "C2", "C3", "C4", "C5", "C6", "C7",
                                                              "patient_overall")],
                          "StudyInstanceUID": ghost,
                          "prediction_type": ["C1", "C2", "C3", "C4", "C5", "C6", "C7", "patient_overall"]})
    pd.concat([test, extra]).to_csv(broken / "test.csv", index=False)
    out = tmp_path / "submission.csv"
    with caplog.at_level(logging.WARNING):
        summary = make_submission.run(_config(setup), broken, setup / "models", out)
    assert summary["fallback"] == 2 and summary["predicted"] == len(uids) - 1
    sub = pd.read_csv(out, dtype={"row_id": str}).set_index("row_id")["fractured"]
    prior = make_submission.load_prior(broken)
    assert sub[f"{ghost}_patient_overall"] == pytest.approx(prior[7], abs=1e-6)
    assert sub[f"{uids[0]}_C1"] == pytest.approx(prior[0], abs=1e-6)
    assert uids[0] in caplog.text
    statuses = pd.read_csv(tmp_path / "submission_log.csv").set_index("StudyInstanceUID")["status"]
    assert statuses[ghost] == "prior: no image folder" and statuses[uids[0]].startswith("prior:")


def test_time_budget_switches_to_prior(setup, tmp_path):
    out = tmp_path / "submission.csv"
    summary = make_submission.run(_config(setup, time_budget_hours=0.0), setup / "data", setup / "models", out)
    assert summary["predicted"] == 0 and summary["statuses"] == {"prior: time budget": summary["studies"]}
    sub = pd.read_csv(out)
    assert np.isfinite(sub["fractured"]).all()


def test_calibration_is_applied_only_when_marked_for_use(setup, tmp_path):
    import shutil

    calib = {"use": True, "vertebra": {"temperature": 1.0, "bias": -3.0}, "overall": {"temperature": 1.0, "bias": 3.0}}
    models = tmp_path / "models"
    shutil.copytree(setup / "models", models)
    ensemble = {"runs": ["tiny"], "overall": "vertebrae", "calibration": calib}
    (models / "stage2" / "ensemble.json").write_text(json.dumps(ensemble))
    raw = make_submission.run(_config(setup), setup / "data", setup / "models", tmp_path / "raw.csv")
    cal = make_submission.run(_config(setup), setup / "data", models, tmp_path / "cal.csv")
    assert raw["predicted"] == cal["predicted"]
    a = pd.read_csv(tmp_path / "raw.csv").set_index("row_id")["fractured"]
    b = pd.read_csv(tmp_path / "cal.csv").set_index("row_id")["fractured"]
    vert = [r for r in a.index if not r.endswith("patient_overall")]
    overall = [r for r in a.index if r.endswith("patient_overall")]
    assert (b[vert] < a[vert]).all() and (b[overall] > a[overall]).all()
    # A calibration the report refused (use: false) leaves the raw probabilities.
    ensemble["calibration"] = {**calib, "use": False}
    (models / "stage2" / "ensemble.json").write_text(json.dumps(ensemble))
    make_submission.run(_config(setup), setup / "data", models, tmp_path / "unused.csv")
    c = pd.read_csv(tmp_path / "unused.csv").set_index("row_id")["fractured"]
    assert np.allclose(c.to_numpy(), a.to_numpy())


def test_missing_models_give_a_clear_error(setup, tmp_path):
    with pytest.raises(FileNotFoundError, match="stage-1 checkpoints"):
        make_submission.run(_config(setup), setup / "data", tmp_path, tmp_path / "s.csv")


def test_type1_and_type2_ensemble_follows_the_recorded_rule(setup, tmp_path):
    """ensemble.json names the runs and the patient_overall rule; make_submission follows it."""
    import shutil

    from common.config import load_config
    from stage1_seg.config import Stage1Config
    from stage2_cls.config import Stage2Config
    from tests.tiny_models import STAGE1_OVERRIDES, STAGE2_OVERRIDES
    from tooling.bench.pipeline import write_models

    models = tmp_path / "models"
    shutil.copytree(setup / "models", models)
    write_models(tmp_path / "type2", 2, load_config(Stage1Config, None, STAGE1_OVERRIDES),
                 load_config(Stage2Config, None, [*STAGE2_OVERRIDES, "run=tiny-type2", "model.type=2"]))
    shutil.copytree(tmp_path / "type2" / "stage2" / "tiny-type2", models / "stage2" / "tiny-type2")
    results = {}
    for rule in ("vertebrae", "type2"):
        (models / "stage2" / "ensemble.json").write_text(json.dumps(
            {"runs": ["tiny", "tiny-type2"], "overall": rule, "calibration": None}))
        out = tmp_path / f"{rule}.csv"
        summary = make_submission.run(_config(setup), setup / "data", models, out)
        assert summary["fallback"] == 0
        results[rule] = pd.read_csv(out, dtype={"row_id": str}).set_index("row_id")["fractured"]
    vertebrae = [r for r in results["vertebrae"].index if not r.endswith("patient_overall")]
    overall = [r for r in results["vertebrae"].index if r.endswith("patient_overall")]
    assert np.allclose(results["vertebrae"][vertebrae], results["type2"][vertebrae])  # same vertebrae
    assert not np.allclose(results["vertebrae"][overall], results["type2"][overall])  # the rule decides
    (models / "stage2" / "ensemble.json").write_text("{not json")
    with pytest.raises(ValueError, match="ensemble.json"):
        make_submission.run(_config(setup), setup / "data", models, tmp_path / "bad.csv")


def test_study_reader_decodes_ahead_and_keeps_errors_with_their_study(tmp_path):
    from common.dicom import DicomReadError
    from tooling.dicom_writer import write_ct_series

    hu = np.arange(4 * 8 * 8, dtype=np.int16).reshape(4, 8, 8)
    folders = [tmp_path / name for name in ("a", "b", "c", "d")]
    for k, folder in enumerate(folders):
        write_ct_series(folder, hu + k)
    for path in folders[1].iterdir():
        path.write_bytes(b"broken")
    reader = make_submission.StudyReader(folders, depth=1)
    try:
        study, seconds = reader.get(folders[0])
        assert study.hu[0, 0, 0] == 0 and seconds > 0
        assert folders[1] in reader.pending  # the next study is being decoded already
        with pytest.raises(DicomReadError, match="b"):
            reader.get(folders[1])
        reader.skip(folders[2])
        assert reader.get(folders[3])[0].hu[0, 0, 0] == 3
    finally:
        reader.close()


def test_box_offsets_beside_the_stage1_checkpoints_move_the_boxes(setup, tmp_path, monkeypatch):
    """make_submission applies the slice-range offsets stage1_seg.predict fitted for its checkpoints."""
    import shutil

    from stage1_seg.boxes import apply_box_offsets, cube_slices, write_box_offsets
    models = tmp_path / "models"
    shutil.copytree(setup / "models", models)
    seen = []
    original = make_submission.build_stacks

    def spy(hu, probs, boxes, cfg, region):
        seen.append((boxes.copy(), cube_slices(region, probs.shape[1]), hu.shape[0]))
        return original(hu, probs, boxes, cfg, region)

    monkeypatch.setattr(make_submission, "build_stacks", spy)
    cfg = _config(setup)
    make_submission.run(cfg, setup / "data", models, tmp_path / "plain.csv")
    plain = seen[:]
    (run_dir,) = {p.parent.parent for p in models.glob("stage1/*/fold*/best.pt")}
    offsets = np.array([[-1.0, -1.5]] * 7)  # ranges moved one to 1.5 cube voxels towards the feet
    write_box_offsets(run_dir / "box_offsets.json", offsets, studies=5)
    seen.clear()
    make_submission.run(cfg, setup / "data", models, tmp_path / "shifted.csv")
    changed = 0
    for (before, vox, n), (after, _, _) in zip(plain, seen):
        expected = apply_box_offsets(before, offsets, vox, n)
        assert after[["z0", "z1"]].to_numpy().tolist() == expected[["z0", "z1"]].to_numpy().tolist()
        changed += int((after[["z0", "z1"]].to_numpy() != before[["z0", "z1"]].to_numpy()).any())
    assert changed > 0
    (run_dir / "box_offsets.json").write_text("{broken")
    with pytest.raises(ValueError, match="box_offsets.json"):
        make_submission.run(cfg, setup / "data", models, tmp_path / "broken.csv")


def test_stage2_tta_defaults_to_the_checkpoints_and_can_be_overridden(setup, tmp_path):
    runs = {}
    for name, changes in {"default": {}, "none": {"stage2_tta": "none"}, "flips": {"stage2_tta": "flips"}}.items():
        out = tmp_path / f"{name}.csv"
        make_submission.run(_config(setup, **changes), setup / "data", setup / "models", out)
        runs[name] = pd.read_csv(out)["fractured"].to_numpy()
    assert np.array_equal(runs["default"], runs["flips"])  # the tiny checkpoints were trained with tta: flips
    assert not np.allclose(runs["default"], runs["none"], atol=1e-6)
    with pytest.raises(ValueError, match="unknown stage-2 tta"):
        make_submission.run(_config(setup, stage2_tta="rot90"), setup / "data", setup / "models", tmp_path / "x.csv")
