"""The recipe behind the demo and the recipe check, end to end on a tiny dataset with type 1 and type 2."""
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from common.constants import STUDY_COL, TARGETS
from common.metric import competition_score, expected_row_ids, validate_submission
from stage2_cls.calibration import apply_calibration
from stage2_cls.config import for_model_type
from tooling import demo, recipe_check
from tooling.recipe import (DatasetSpec, Recipe, check_same_dataset, fit_figures, kind_figures, overall_figures,
                            run_recipe, submission_figures)
from tooling.synth import plan_dataset

# Two steps learn nothing. The layer's flat start (~0.5 everywhere) still gives every phase vertebrae
# to work on; the demo's primed start (probability 0.01) would leave every box missing.
TINY1 = ["preprocess.size=32", "model.decoder_channels=[16,16,8,8,8]", "train.steps=2", "train.eval_every=2",
         "train.warmup_steps=1", "model.prior=0"]
TINY2 = ["crop.size=32", "crop.n_slices=4", "model.lstm_hidden=8", "train.steps=2", "train.eval_every=2",
         "train.warmup_steps=1", "train.val_batch_size=4"]


@pytest.mark.slow
def test_recipe_runs_every_phase_with_both_types_and_resumes(tmp_path):
    spec = DatasetSpec("tiny", n_train=10, n_seg=6, n_test=2, size=48, seed=5)
    recipe = Recipe.demo(TINY1, TINY2, type2=True, oracle=True, fit=True)
    assert [c.run for c in recipe.stage2_runs] == ["demo", "demo-type2"]
    assert recipe.stage2_oracle.crop.stage1_run == "oracle" and recipe.stage2_oracle.model.type == 1
    type2 = for_model_type(recipe.stage2_type2)  # what stage2_cls.train runs it with
    assert type2.model.type == 2 and type2.train.batch_size == 2 and type2.train.val_batch_size == 4
    assert type2.train.steps == recipe.stage2.train.steps == 2  # the demo's type 2 keeps type 1's schedule
    result = run_recipe(tmp_path / "tiny", spec, recipe, stage2_folds=[0, 1])
    work = tmp_path / "tiny" / "work"
    for run in ("demo", "demo-type2"):
        assert {p.parent.name for p in (work / "stage2" / run).glob("fold*/metrics.json")} == {"fold0", "fold1"}
    # Every figure the check prints, each a number in its range.
    assert 0.0 <= result["stage1_dice"] <= 1.0 and 0.0 <= result["box_ziou_ge_0_7"] <= 1.0
    assert set(result["stage2_candidates"]) >= {"type 1", "type 2", "type 2, overall from its vertebrae",
                                                "ensemble (mean)"}
    assert result["stage2_oof_score"] == result["stage2_candidates"][result["stage2_chosen"]]
    assert result["stage2_rule_choice"]["chosen"] == result["stage2_chosen"]
    assert result["overall_learned_ratio"] > 0 and result["overall_vs_type1_ratio"] > 0
    test = pd.read_csv(tmp_path / "tiny" / "data" / "test.csv", dtype=str)
    validate_submission(pd.read_csv(tmp_path / "tiny" / "submission.csv", dtype={"row_id": str}), test["row_id"])
    assert result["n_test_studies"] == 2 and result["submission_ratio"] > 0
    # The oracle run: stage 2 on crops from the true labels, same folds, its own work folder.
    oracle = tmp_path / "tiny" / "oracle"
    assert {p.parent.name for p in (oracle / "stage2" / "demo").glob("fold*/metrics.json")} == {"fold0", "fold1"}
    assert (oracle / "folds.csv").read_text() == (work / "folds.csv").read_text()
    assert result["oracle_stage2_oof_ratio"] > 0
    ensemble = json.loads((work / "stage2" / "ensemble.json").read_text())
    assert ensemble["chosen"] == result["stage2_chosen"]
    # The table names every dataset and marks figures that miss their target.
    table = recipe_check.format_table({"tiny": result})
    assert "| figure | tiny | target |" in table and "type 2's head" in table and "(chosen: " in table
    assert "type 1's noisy-OR" in table
    assert "crops from the true labels" in table
    assert result["calibration_decision"]["use"] == ensemble["calibration"]["use"]
    assert "| calibration: used or not;" in table
    # Stage 2's AUC per fracture kind of the generator, out of fold and in the submission.
    info = json.loads((tmp_path / "tiny" / "data" / "synth_info.json").read_text())
    oof = set(pd.concat([pd.read_csv(f, dtype=str) for f in (work / "stage2" / "demo").glob("oof_fold*.csv")])
              ["StudyInstanceUID"])
    for key, predicted in (("stage2_kind_auc", oof), ("submission_kind_auc", set(test["StudyInstanceUID"]))):
        fractured = sum(sum(r["fractured"]) for r in info["studies"] if r["uid"] in predicted)
        assert sum(v["n"] for v in result[key].values()) == fractured
    assert "by fracture kind, out of fold" in table
    # Stage 1 on its own training studies, and on its validation studies exactly as its validation scored them.
    seg = pd.read_csv(work / "folds.csv", dtype=str).query("seg_fold != '-1'")
    assert result["stage1_fit"]["train_studies"] + result["stage1_fit"]["val_studies"] == len(seg)
    assert result["stage1_fit"]["val_dice"] == pytest.approx(result["stage1_dice"])
    assert 0.0 <= result["stage1_fit"]["train_dice"] <= 1.0
    # Type 1 on its own training studies: with folds 0 and 1 trained, every study trained one of them.
    assert result["stage2_fit"]["folds"] == 2 and 0.0 <= result["stage2_fit"]["train_auc"] <= 1.0
    train_ids = set(pd.read_csv(tmp_path / "tiny" / "data" / "train.csv", dtype=str)["StudyInstanceUID"])
    fractured = sum(sum(r["fractured"]) for r in info["studies"] if r["uid"] in train_ids)
    assert sum(v["n"] for v in result["stage2_train_kind_auc"].values()) == fractured
    assert "its training studies / validation" in table
    # The same fold-0 validation studies scored at their own resolution, in the table and the demo's printout.
    assert result["stage1_dice_study_studies"] == result["stage1_fit"]["val_studies"]
    assert 0.0 <= result["stage1_dice_study"] <= 1.0 and len(result["stage1_dice_study_per_vertebra"]) == 7
    assert "at the studies' own resolution" in table
    assert "at the studies' own resolution" in demo.format_result(result)
    assert "its training studies / out of fold" in table and "training studies (fractured" in table
    # Run again: training phases are skipped, the figures come back the same.
    again = run_recipe(tmp_path / "tiny", spec, recipe, stage2_folds=[0, 1])
    assert not any(k.startswith(("stage 1 training", "stage 2 training", "oracle stage 1", "oracle stage 2 training"))
                   for k in again["seconds"])
    assert again["stage2_oof_score"] == pytest.approx(result["stage2_oof_score"])


def test_stage1_only_stops_after_the_boxes_and_gives_stage_1s_figures_with_its_curve(tmp_path):
    """``--stage1-only``: the dataset, stage-1 training and prediction run, nothing of stage 2; the
    figures are stage 1's, with the validation Dice at every evaluation, and the table prints them
    without any stage-2 row."""
    spec = DatasetSpec("tiny", n_train=8, n_seg=6, n_test=2, size=48, seed=6)
    recipe = Recipe.demo([*TINY1, "train.eval_every=1"], TINY2, stage1_only=True)
    result = run_recipe(tmp_path / "tiny", spec, recipe, stage2_folds=[0, 1])
    work = tmp_path / "tiny" / "work"
    assert (work / "stage1" / "demo" / "boxes.csv").is_file()
    assert not (work / "stage2").exists() and not (tmp_path / "tiny" / "submission.csv").exists()
    assert list(result["seconds"]) == ["dataset", "stage 1 training", "stage 1 prediction", "total"]
    assert list(result["stage1_curve"]) == [1, 2]
    assert result["stage1_curve"][2] == pytest.approx(result["stage1_dice"])  # the last evaluation is kept
    assert 0.0 <= result["box_ziou_ge_0_7"] <= 1.0 and 0.0 <= result["stage1_dice_study"] <= 1.0
    assert not any(key.startswith(("stage2", "submission", "overall")) for key in result)
    table = recipe_check.format_table({"tiny": result})
    assert "at each evaluation (step: Dice) | 1: " in table and "z-IoU >= 0.7" in table
    assert "stage-2" not in table and "submission" not in table and "wall time" in table
    # Beside a full run's figures: the stage-2 rows stay, with "-" for the stage-1-only dataset.
    full = {**result, "stage2_oof_score": 0.5, "stage2_oof_constant": 0.6, "stage2_oof_ratio": 0.5 / 0.6}
    del full["stage1_curve"]
    both = recipe_check.format_table({"tiny": result, "full": full})
    assert "| stage-2 OOF score / best constant | - | **0.500 / 0.600 = 0.83x** (miss) | <= 0.7 |" in both
    assert "at each evaluation" not in both  # only where every dataset has it
    # A dataset with type 2 beside one without: "-" for the latter, never "nan".
    typed = {**full, "overall_learned_ratio": 0.95, "overall_vs_type1_ratio": 1.02}
    mixed = recipe_check.format_table({"with": typed, "without": full})
    assert "| patient_overall loss: the same / type 1's noisy-OR | 1.02x | - |  |" in mixed and "nan" not in mixed
    # The candidate submitted, and the best out of fold when it did not win often enough to replace the default.
    chose = {**typed, "stage2_candidates": {"ensemble (vertebrae)": 0.50, "ensemble (mean)": 0.48},
             "stage2_chosen": "ensemble (vertebrae)",
             "stage2_rule_choice": {"best": "ensemble (mean)", "bootstrap_confidence": 0.87}}
    assert ("(chosen: ensemble (vertebrae), the default; best out of fold: ensemble (mean), better in 87% of "
            "resamples)") in recipe_check.format_table({"chose": chose})
    chose["stage2_rule_choice"] = {"best": "ensemble (vertebrae)", "bootstrap_confidence": None}
    assert "(chosen: ensemble (vertebrae)) |" in recipe_check.format_table({"chose": chose})
    for other in ("--type2", "--oracle"):  # both need stage 2
        with pytest.raises(SystemExit):
            recipe_check.main(["--out", str(tmp_path / "x"), "--stage1-only", other])
    assert not (tmp_path / "x").exists()


def test_overall_figures_compare_the_best_learned_with_both_noisy_ors():
    """patient_overall's loss: the best of type 2's head and the ensembles, against type 2's own
    vertebrae's noisy-OR (the issue's target) and against type 1's (which type 2 cannot move)."""
    losses = {"type 1": 0.55, "type 2": 0.76, "type 2, overall from its vertebrae": 0.64,
              "ensemble (vertebrae)": 0.52, "ensemble (type2)": 0.76}
    report = {"candidates": {name: 0.5 for name in losses},
              "per_label": [{"label": "C1", **{f"{k} wlogloss": 9.0 for k in losses}},
                            {"label": "patient_overall", **{f"{k} wlogloss": v for k, v in losses.items()}}]}
    figures = overall_figures(report)
    assert figures["overall_wlogloss"] == losses
    assert figures["overall_learned_ratio"] == pytest.approx(0.52 / 0.64)
    assert figures["overall_vs_type1_ratio"] == pytest.approx(0.52 / 0.55)
    del losses["type 1"], report["candidates"]["type 1"]
    assert "overall_vs_type1_ratio" not in overall_figures(report)   # type 2 alone


def test_kind_figures_rank_each_fracture_kind_against_every_intact_vertebra(tmp_path):
    """AUC per fracture kind: a kind the model scores above every intact vertebra gets 1, one it
    scores below them 0; studies the generator did not record and datasets without a record are left out."""
    studies = [
        {"uid": "a", "fractured": [1, 0, 0, 0, 0, 0, 0], "kinds": {"C1": "ring"}},
        {"uid": "b", "fractured": [0, 0, 1, 0, 1, 0, 0], "kinds": {"C3": "posterior", "C5": "line"}},
        {"uid": "c", "fractured": [0] * 7, "kinds": {}},
    ]
    (tmp_path / "synth_info.json").write_text(json.dumps({"studies": studies}))
    columns = [f"C{c}" for c in range(1, 8)]
    p = pd.DataFrame(0.3, index=["a", "b", "c", "unknown"], columns=columns)
    p.loc["a", "C1"] = 0.35       # ring: above every intact vertebra
    p.loc["b", "C3"] = 0.1        # posterior: below every intact vertebra
    p.loc["b", "C5"] = 0.9        # line
    p.loc["c", "C2"] = 0.5        # one intact vertebra above the ring
    p.loc["unknown", :] = 1.0     # not in the record: ignored
    figures = kind_figures(tmp_path, {"oof": p})["oof"]
    assert list(figures) == ["line", "posterior", "ring"]
    assert figures["line"] == {"n": 1, "auc": 1.0}
    assert figures["posterior"] == {"n": 1, "auc": 0.0}
    assert figures["ring"]["n"] == 1 and figures["ring"]["auc"] == pytest.approx(17 / 18)  # 18 intact vertebrae
    assert kind_figures(tmp_path / "elsewhere", {"oof": p}) == {}
    table = recipe_check.format_kinds(figures)
    assert table == "line 1.00 (1); posterior 0.00 (1); ring 0.94 (1)"


def test_submission_figures_score_the_submission_with_and_without_its_calibration(tmp_path):
    """A used calibration is undone on the submitted probabilities to give the raw submission's
    score beside the calibrated one; an unused one adds nothing."""
    rng = np.random.default_rng(0)
    uids = [f"7.7.{i}" for i in range(8)]
    y = (rng.random((8, 8)) < 0.3).astype(int)
    y[:, 7] = y[:, :7].max(1)
    for name, rows in (("test_labels.csv", uids), ("train.csv", [f"6.6.{i}" for i in range(8)])):
        frame = pd.DataFrame(y, columns=list(TARGETS))
        frame.insert(0, STUDY_COL, rows)
        frame.to_csv(tmp_path / name, index=False)
    raw = rng.uniform(0.05, 0.95, (8, 8))
    calib = {"use": True, "vertebra": {"temperature": 2.0, "bias": 0.5}, "overall": {"temperature": 0.5, "bias": -1.0}}
    submitted = apply_calibration(raw, calib)
    sub = pd.DataFrame({"row_id": expected_row_ids(uids), "fractured": submitted.reshape(-1)})
    sub.to_csv(tmp_path / "submission.csv", index=False)
    figures = submission_figures(tmp_path, tmp_path / "submission.csv", calib)
    assert figures["submission_score"] == pytest.approx(competition_score(y, submitted), rel=1e-9)
    assert figures["submission_uncalibrated_score"] == pytest.approx(competition_score(y, raw), rel=1e-9)
    assert abs(figures["submission_uncalibrated_score"] - figures["submission_score"]) > 0.01
    assert figures["submission_uncalibrated_ratio"] == pytest.approx(
        figures["submission_uncalibrated_score"] / figures["submission_constant"])
    for unused in (None, {**calib, "use": False}):
        assert "submission_uncalibrated_score" not in submission_figures(tmp_path, tmp_path / "submission.csv", unused)
    table = recipe_check.format_table({"a": {**figures, "seconds": {"total": 60}},
                                       "b": {**submission_figures(tmp_path, tmp_path / "submission.csv"),
                                             "seconds": {"total": 60}}})
    row = next(line for line in table.splitlines() if "without the calibration" in line)
    assert f"= {figures['submission_uncalibrated_ratio']:.2f}x | - |" in row


def test_the_table_says_whether_the_calibration_was_used_and_on_what_evidence():
    from stage2_cls.calibration import choose_calibration
    from tooling.recipe import calibration_decision

    rng = np.random.default_rng(1)
    n = 200
    y = (rng.random((n, 8)) < 0.2).astype(float)
    y[:, 7] = y[:, :7].max(1)
    z = (2 * y - 1) + rng.normal(scale=1.0, size=y.shape)
    used = calibration_decision(choose_calibration(y, 1 / (1 + np.exp(-3.0 * z)), np.arange(n) % 5))
    few = calibration_decision(choose_calibration(y[:10], np.full((10, 8), 0.3), np.arange(10) % 2))
    assert used["use"] and used["bootstrap_confidence"] >= 0.95 and not few["use"]
    doubtful = {"use": False, "n_studies": 48, "raw_score": 0.5099, "cross_validated_score": 0.5029,
                "bootstrap_confidence": 0.84}
    results = {name: {"calibration_decision": d, "seconds": {"total": 60}}
               for name, d in (("a", used), ("b", doubtful), ("c", few))}
    row = next(line for line in recipe_check.format_table(results).splitlines() if line.startswith("| calibration"))
    cells = [c.strip() for c in row.split("|")[2:5]]
    assert cells[0] == (f"used: {used['raw_score']:.3f} -> {used['cross_validated_score']:.3f} "
                        f"({used['bootstrap_confidence']:.0%})")
    assert cells[1] == "refused: 0.510 -> 0.503 (84%)"
    assert cells[2] == "refused: 10 OOF studies, too few to fit"


def test_fit_figures_score_each_fold_model_on_the_studies_it_trained_on(tmp_path, monkeypatch):
    """A stand-in model that knows the labels of the studies it trained on and gets its own fold's
    backwards: AUC 1 on the training studies, 0 out of fold; studies without a crop file are skipped."""
    import stage2_cls.infer

    data, work = tmp_path / "data", tmp_path / "work"
    data.mkdir()
    uids = [f"s{i}" for i in range(6)]
    y = np.zeros((6, 7), int)
    y[[0, 1, 2, 3, 5], [1, 6, 2, 4, 0]] = 1
    pd.DataFrame(y, columns=[f"C{c}" for c in range(1, 8)]).assign(StudyInstanceUID=uids).to_csv(
        data / "train.csv", index=False)
    folds = pd.DataFrame({"StudyInstanceUID": uids, "fold": [0, 1, 0, 1, 0, 1], "seg_fold": -1})
    (work / "crops").mkdir(parents=True)
    folds.to_csv(work / "folds.csv", index=False)
    for i, uid in enumerate(uids[:-1]):  # s5 has no crop file
        np.savez(work / "crops" / f"{uid}.npz", stacks=np.full((7, 2, 6, 4, 4), i, np.uint8), missing=np.zeros(7, bool))
    for k in (0, 1):
        (work / "stage2" / "demo" / f"fold{k}").mkdir(parents=True)
        (work / "stage2" / "demo" / f"fold{k}" / "best.pt").write_bytes(b"")
    studies = [{"uid": u, "fractured": list(y[i]), "kinds": {f"C{c + 1}": "line" for c in np.flatnonzero(y[i])}}
               for i, u in enumerate(uids)]
    (data / "synth_info.json").write_text(json.dumps({"studies": studies}, default=int))

    class Known:
        def __init__(self, checkpoints):
            self.fold = int(checkpoints[0].parent.name[4:])

        def predict(self, stacks, missing):
            i = int(stacks[0, 0, 0, 0, 0])
            truth = y[i].astype(float)
            own = folds["fold"][i] == self.fold
            return {"type1": 0.2 + 0.6 * ((1 - truth) if own else truth)}

    monkeypatch.setattr(stage2_cls.infer, "Stage2Ensemble", Known)
    cfg = Recipe.demo().stage2
    out = fit_figures(data, work, cfg)
    assert out["stage2_fit"] == {"folds": 2, "train_auc": 1.0, "val_auc": 0.0}
    # s0..s4 each trained the other fold's model; s5 has no crop: its fracture is not counted
    assert out["stage2_train_kind_auc"] == {"line": {"n": 4, "auc": 1.0}}
    # No fold model: no figures.
    assert fit_figures(data, tmp_path / "elsewhere", cfg) == {}


def test_the_many_studies_dataset_is_named_not_default_and_differs_only_in_training_studies(monkeypatch, tmp_path):
    """``--datasets many-studies`` runs varied-96's settings with four times the training studies and
    the same number of masks; the default check stays the four datasets the targets are read on."""
    many, varied = recipe_check.EXTRA_DATASETS["many-studies"], recipe_check.DATASETS["varied-96"]
    assert "many-studies" not in recipe_check.DATASETS
    assert many.n_train == 4 * varied.n_train and many.n_seg == varied.n_seg
    assert (many.size, many.variety, many.n_slices) == (varied.size, varied.variety, varied.n_slices)
    assert many.seed not in {s.seed for s in recipe_check.DATASETS.values()}
    ran = {}
    monkeypatch.setattr(recipe_check, "run",
                        lambda out, names, recipe, folds, offset: ran.setdefault("names", names) and {})
    monkeypatch.setattr(recipe_check, "format_table", lambda results: "")
    recipe_check.main(["--out", str(tmp_path), "--datasets", "many-studies", "--no-fit"])
    assert ran["names"] == ["many-studies"]


def test_a_seed_offset_makes_new_datasets_of_the_same_kinds_and_a_folder_keeps_its_own(monkeypatch, tmp_path):
    """``--seed-offset N`` moves every dataset's seed and nothing else; resuming a folder made with
    another seed is refused, naming the file, instead of scoring the old data under the new name."""
    for name, spec in recipe_check.DATASETS.items():
        moved = recipe_check.dataset_spec(name, 1000)
        assert moved.seed == spec.seed + 1000
        assert replace(moved, seed=spec.seed) == spec
        assert recipe_check.dataset_spec(name) == spec
    ran = {}
    monkeypatch.setattr(recipe_check, "run",
                        lambda out, names, recipe, folds, offset: ran.update(names=names, offset=offset) or {})
    monkeypatch.setattr(recipe_check, "format_table", lambda results: "")
    recipe_check.main(["--out", str(tmp_path), "--datasets", "slices-60", "--seed-offset", "7", "--no-fit"])
    assert ran == {"names": ["slices-60"], "offset": 7}

    spec = recipe_check.dataset_spec("varied-96")
    data = tmp_path / "varied-96" / "data"
    data.mkdir(parents=True)
    def write_info(spec, n_slices=None):
        plan = plan_dataset(spec.n_train, spec.n_seg, spec.n_test, spec.size, spec.seed, spec.n_slices,
                            spec.variety)
        studies = [{"uid": s.uid, "split": s.split, "segmented": s.segmented, "n_slices": n_slices or s.n_slices or 90}
                   for s in plan]
        info = {"seed": spec.seed, "size": spec.size, "variety": spec.variety, "studies": studies}
        (data / "synth_info.json").write_text(json.dumps(info))

    write_info(spec)
    check_same_dataset(data, spec)  # the same dataset: resumes
    with pytest.raises(ValueError, match="synth_info.json.*seed"):
        check_same_dataset(data, recipe_check.dataset_spec("varied-96", 1000))
    # the same seed, size and variety with other study counts (an older --datasets definition)
    fewer = replace(spec, n_train=24, n_seg=12)
    write_info(fewer)
    with pytest.raises(ValueError, match=r"synth_info.json: .*holds 24 training \(12 segmented\) and 24 test "
                                         r"studies, not the 48 training \(24 segmented\)"):
        check_same_dataset(data, spec)
    check_same_dataset(data, fewer)
    # and with studies of another length
    sixty = recipe_check.dataset_spec("slices-60")
    write_info(sixty, n_slices=72)
    with pytest.raises(ValueError, match=r"synth_info.json: .*\[72\] slices, not the 60"):
        check_same_dataset(data, sixty)
    write_info(sixty)
    check_same_dataset(data, sixty)


def test_a_call_naming_some_datasets_keeps_the_folders_others_in_the_summary(monkeypatch, tmp_path):
    """``--type2 --datasets A`` on a finished folder rewrites the summary with A's new figures and
    every other dataset's figures from its own result file, in the check's order; a broken result
    file is named, not skipped."""
    import tooling.recipe

    for name, ratio in (("wide-fov-192", 0.9), ("slices-60", 0.7)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "recipe_result.json").write_text(json.dumps({"stage2_oof_ratio": ratio}))
    (tmp_path / "not-a-dataset").mkdir()
    (tmp_path / "not-a-dataset" / "recipe_result.json").write_text("{}")
    monkeypatch.setattr(tooling.recipe, "run_recipe", lambda root, spec, recipe, folds: {"stage2_oof_ratio": 0.5})
    monkeypatch.setattr(recipe_check, "format_table",
                        lambda results: " ".join(f"{k}={r['stage2_oof_ratio']}" for k, r in results.items()))
    results = recipe_check.run(tmp_path, ["varied-96"], None, [0])
    assert list(results) == ["varied-96", "wide-fov-192", "slices-60"]
    assert [r["stage2_oof_ratio"] for r in results.values()] == [0.5, 0.9, 0.7]
    assert json.loads((tmp_path / "recipe_check.json").read_text()) == results
    assert (tmp_path / "recipe_check.md").read_text() == "varied-96=0.5 wide-fov-192=0.9 slices-60=0.7\n"

    (tmp_path / "slices-60" / "recipe_result.json").write_text('{"stage2_oof')
    with pytest.raises(ValueError, match="slices-60.*recipe_result.json"):
        recipe_check.run(tmp_path, ["varied-96"], None, [0])
