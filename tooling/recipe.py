"""The demo recipe end to end on one synthetic dataset, and the figures that judge it.

Shared by ``tooling.demo`` (one dataset, one stage-2 fold, on a laptop CPU) and
``tooling.recipe_check`` (several independent datasets, every stage-2 fold).
Each phase resumes: run again and finished phases are skipped.

Figures (:func:`evaluate`), all on data the models were not tuned on:

- stage-1 validation mean Dice (fold 0's held-out segmented studies);
- box z-IoU: the predicted slice range of every vertebra against the truth, on
  every study that had no mask (unsegmented training studies and test studies),
  as the fraction of vertebrae with z-IoU >= 0.7 and the mean;
- stage 2: the out-of-fold competition score of the trained folds against the
  best constant fitted on the same labels (of the rule the report chose; with
  type 2 trained too, the score of every candidate: each type alone and the
  ensembles), and patient_overall's loss from type 2's learned head against the
  noisy-OR of its own vertebra probabilities;
- the submission's score on the hidden test labels against the constant train prior;
- per fracture kind of the generator (``synth_info.json``: ring, line, wedge, crack,
  displaced, posterior): the vertebra AUC of that kind's fractured vertebrae against
  every intact vertebra, out of fold (the chosen candidate) and in the submission, to
  tell which fractures stage 2 misses;
- with ``fit``: stage 1's mean Dice on the segmented studies it trained on beside its
  validation Dice, and type 1's vertebra AUC on the studies its fold models trained on
  beside the same models' AUC on their validation studies, overall and per fracture kind:
  low on both is under-fitting, high on the first only over-fitting;
- with ``oracle``: stage 2's out-of-fold score against the best constant once more, on
  crops cut from the true labels (:mod:`tooling.oracle`), i.e. with a perfect stage 1;
- stage 1's validation Dice at every evaluation of its schedule (``stage1_curve``);
- with ``stage1_only``: only the dataset and stage 1 run (training, prediction, boxes) and only
  stage 1's figures are given: a stage-1 setting is judged in about a third of the time.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score
from tqdm.auto import tqdm

import make_submission
from common.config import load_config
from common.constants import STUDY_COL, TARGETS
from common.folds import FOLDS_CSV, list_segmentation_uids, read_folds
from common.metric import align, competition_score, constant_score, evaluate_submission, read_labels_csv
from common.metric import submission_to_wide
from configs import config_path
from stage1_seg import predict as stage1_predict
from stage1_seg import train as stage1_train
from stage1_seg.boxes import read_boxes, z_iou
from stage1_seg.config import Stage1Config
from stage2_cls import crop as stage2_crop
from stage2_cls import report as stage2_report
from stage2_cls import train as stage2_train
from stage2_cls.calibration import invert_calibration
from stage2_cls.config import Stage2Config
from tooling.oracle import ORACLE_RUN, write_oracle_stage1
from tooling.synth import DatasetSpec, make_dataset, plan_dataset  # noqa: F401  (DatasetSpec: re-exported)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """The configs the recipe runs with (the demo configs unless overridden)."""

    stage1: Stage1Config
    stage2: Stage2Config
    submission: make_submission.SubmissionConfig
    stage2_type2: Stage2Config | None = None  # also train the whole-patient model and ensemble it
    # also train stage 2 (type 1, same folds) on crops cut from the true labels (tooling.oracle):
    # what stage 2 scores when stage 1 is perfect, beside what it scores after the real stage 1
    oracle: bool = False
    # also score type 1 on the studies each fold model trained on (:func:`fit_figures`)
    fit: bool = False
    # stop after stage-1 prediction: stage 1's figures only (stage-2 settings and folds are ignored)
    stage1_only: bool = False

    @property
    def stage2_runs(self) -> list[Stage2Config]:
        return [self.stage2] + ([self.stage2_type2] if self.stage2_type2 is not None else [])

    @classmethod
    def demo(cls, overrides1: Sequence[str] = (), overrides2: Sequence[str] = (),
             type2: bool = False, oracle: bool = False, fit: bool = False,
             stage1_only: bool = False) -> "Recipe":
        stage2 = load_config(Stage2Config, config_path("demo/stage2.yaml"), overrides2)
        # Type 2 takes whole studies; its batch sizes are the demo config's type2 block.
        stage2_type2 = load_config(Stage2Config, config_path("demo/stage2.yaml"),
                                   ["model.type=2", f"run={stage2.run}-type2", *overrides2]) if type2 else None
        return cls(load_config(Stage1Config, config_path("demo/stage1.yaml"), ["predict.folds=[0]", *overrides1]),
                   stage2, load_config(make_submission.SubmissionConfig, config_path("demo/submission.yaml")),
                   stage2_type2, oracle, fit, stage1_only)

    @property
    def stage2_oracle(self) -> Stage2Config:
        """Type 1's config reading the oracle stage-1 run."""
        return replace(self.stage2, crop=replace(self.stage2.crop, stage1_run=ORACLE_RUN))


def check_same_dataset(data: Path, spec: DatasetSpec) -> None:
    """Refuse to resume into a folder whose dataset was made otherwise than ``spec`` asks: another
    seed, size or variety, or other studies (counts of training, segmented and test studies, slices
    per study), compared study by study with the plan ``spec`` makes."""
    info_file = data / "synth_info.json"
    if not info_file.is_file():
        return
    info = json.loads(info_file.read_text())
    made = {key: info.get(key) for key in ("seed", "size", "variety")}
    wanted = {"seed": spec.seed, "size": spec.size, "variety": spec.variety}
    advice = "use another --out (or --seed-offset) or remove the folder"
    if made != wanted:
        raise ValueError(f"{info_file}: this folder's dataset was made with {made}, not the {wanted} of "
                         f"'{spec.name}' asked for now; {advice}")
    plan = plan_dataset(spec.n_train, spec.n_seg, spec.n_test, spec.size, spec.seed, spec.n_slices, spec.variety)
    planned = [(s.uid, s.split, s.segmented) for s in plan]
    records = info.get("studies") or []
    found = [(r.get("uid"), r.get("split"), r.get("segmented")) for r in records]
    if found != planned:
        def counts(rows: list[tuple[Any, Any, Any]]) -> str:
            return (f"{sum(r[1] == 'train' for r in rows)} training ({sum(bool(r[2]) for r in rows)} segmented) "
                    f"and {sum(r[1] == 'test' for r in rows)} test studies")
        raise ValueError(f"{info_file}: this folder's dataset holds {counts(found)}, not the {counts(planned)} "
                         f"of '{spec.name}' asked for now (or other studies); {advice}")
    if spec.n_slices is not None:
        other = sorted({r.get("n_slices") for r in records} - {spec.n_slices}, key=str)
        if other:
            raise ValueError(f"{info_file}: this folder's studies have {other} slices, not the {spec.n_slices} of "
                             f"'{spec.name}' asked for now; {advice}")


def run_recipe(root: Path, spec: DatasetSpec, recipe: Recipe, stage2_folds: Sequence[int]) -> dict[str, Any]:
    """Make the dataset under ``root/data``, run every phase into ``root/work``; return the figures."""
    data, work = root / "data", root / "work"
    check_same_dataset(data, spec)
    s1_dir = work / "stage1" / recipe.stage1.run
    phases: list[tuple[str, bool, Callable[[], Any]]] = [
        ("dataset", (data / "vertebra_slices.csv").is_file(),
         lambda: make_dataset(data, spec.n_train, spec.n_seg, spec.n_test, spec.size, spec.seed,
                              spec.n_slices, variety=spec.variety)),
        ("stage 1 training", (s1_dir / "fold0" / "metrics.json").is_file(),
         lambda: stage1_train.run(recipe.stage1, data, work, 0, resume=True)),
        ("stage 1 prediction", False, lambda: stage1_predict.run(recipe.stage1, data, work, ["train", "test"])),
        ("stage 2 crops", False, lambda: stage2_crop.run(recipe.stage2, data, work, "train")),
        *[(f"stage 2 training, {cfg.run}, fold {k}", (work / "stage2" / cfg.run / f"fold{k}" / "metrics.json").is_file(),
           lambda k=k, cfg=cfg: stage2_train.run(cfg, data, work, k, resume=True))
          for cfg in recipe.stage2_runs for k in stage2_folds],
        ("stage 2 report", False,
         lambda: stage2_report.run(recipe.stage2, data, work, runs=[c.run for c in recipe.stage2_runs])),
        ("submission", False, lambda: make_submission.run(recipe.submission, data, work, root / "submission.csv")),
    ]
    if recipe.stage1_only:
        phases = phases[:3]
    elif recipe.oracle:
        phases += oracle_phases(root, spec, recipe, stage2_folds)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    bar = tqdm(phases, desc=f"{spec.name}: phases", unit="phase", dynamic_ncols=True)
    for name, done, action in bar:
        bar.set_postfix_str(name)
        if done:
            log.info("== %s: already done, skipped", name)
            continue
        log.info("== %s", name)
        t = time.perf_counter()
        action()
        seconds[name] = round(time.perf_counter() - t, 1)
        log.info("== %s: %.1f s", name, seconds[name])
    figures = evaluate(root, recipe)
    figures.update(dataset=asdict(spec), seconds={**seconds, "total": round(time.perf_counter() - started, 1)})
    (root / "recipe_result.json").write_text(json.dumps(figures, indent=2, default=str))
    return figures


def oracle_phases(root: Path, spec: DatasetSpec, recipe: Recipe, stage2_folds: Sequence[int]
                  ) -> list[tuple[str, bool, Callable[[], Any]]]:
    """Stage 2 again, in ``root/oracle``, on crops cut from the true labels (same folds)."""
    data, work, owork = root / "data", root / "work", root / "oracle"
    cfg = recipe.stage2_oracle

    def oracle_stage1() -> None:
        owork.mkdir(parents=True, exist_ok=True)
        for name in ("folds.csv", "folds.json"):  # the same split as the real run's
            if (work / name).is_file():
                shutil.copyfile(work / name, owork / name)
        write_oracle_stage1(data, owork, recipe.stage1, spec.n_train, spec.n_test, spec.size, spec.seed,
                            spec.n_slices, spec.variety)

    return [("oracle stage 1", (owork / "stage1" / ORACLE_RUN / "boxes.csv").is_file(), oracle_stage1),
            ("oracle crops", False, lambda: stage2_crop.run(cfg, data, owork, "train")),
            *[(f"oracle stage 2 training, fold {k}", (owork / "stage2" / cfg.run / f"fold{k}" / "metrics.json").is_file(),
               lambda k=k: stage2_train.run(cfg, data, owork, k, resume=True)) for k in stage2_folds],
            ("oracle stage 2 report", False, lambda: stage2_report.run(cfg, data, owork))]


def evaluate(root: Path, recipe: Recipe) -> dict[str, Any]:
    """The recipe's figures from what the phases wrote (see the module docstring)."""
    data, work = root / "data", root / "work"
    if recipe.stage1_only:
        return stage1_figures(data, work, recipe)
    report = json.loads((work / "stage2" / "report" / "cv_report.json").read_text())
    return {**stage1_figures(data, work, recipe),
            "stage2_oof_score": report["score"], "stage2_oof_constant": report["constant_score"],
            "stage2_oof_ratio": report["score"] / report["constant_score"], "stage2_folds": report["folds"],
            "stage2_auc": {r["label"]: r[f"{report['chosen']} auc"] for r in report["per_label"]},
            "stage2_candidates": report["candidates"], "stage2_chosen": report["chosen"],
            "stage2_rule_choice": report.get("rule_choice"),
            **overall_figures(report),
            "calibration": report["calibration"]["reason"],
            "calibration_decision": calibration_decision(report["calibration"]),
            **submission_figures(data, root / "submission.csv", report["calibration"]),
            **kind_figures(data, {"stage2_kind_auc": chosen_oof(work, recipe, report["chosen"]),
                                  "submission_kind_auc": submission_vertebrae(root / "submission.csv")}),
            **(oracle_figures(root / "oracle") if recipe.oracle else {}),
            **(fit_figures(data, work, recipe.stage2) if recipe.fit else {})}


def stage1_figures(data: Path, work: Path, recipe: Recipe) -> dict[str, Any]:
    """Stage 1's figures, alone with ``stage1_only`` and the first of a full run's: validation Dice
    (final and at every evaluation), Dice at the studies' own resolution, boxes, and with ``fit``
    the Dice on its training studies."""
    run_dir = work / "stage1" / recipe.stage1.run
    s1 = json.loads((run_dir / "fold0" / "metrics.json").read_text())
    curve = pd.read_csv(run_dir / "fold0" / "log.csv")
    return {"stage1_dice": s1["mean_dice"], "stage1_dice_per_vertebra": {f"C{c}": s1[f"dice_C{c}"] for c in range(1, 8)},
            "stage1_curve": {int(step): float(dice) for step, dice in zip(curve["step"], curve["mean_dice"])},
            **study_dice_figures(work, recipe.stage1.run),
            **box_figures(data, run_dir / "boxes.csv"),
            **(stage1_fit_figures(data, work, recipe.stage1) if recipe.fit else {})}


def oracle_figures(owork: Path) -> dict[str, float]:
    """Stage 2's out-of-fold score on crops cut from the true labels, against the best constant."""
    report = json.loads((owork / "stage2" / "report" / "cv_report.json").read_text())
    return {"oracle_stage2_oof_score": report["score"], "oracle_stage2_oof_constant": report["constant_score"],
            "oracle_stage2_oof_ratio": report["score"] / report["constant_score"],
            "oracle_stage2_auc": {r["label"]: r[f"{report['chosen']} auc"] for r in report["per_label"]}}


def overall_figures(report: dict[str, Any]) -> dict[str, float]:
    """patient_overall's weighted log loss: type 2's learned head (and the ensemble) against the
    noisy-OR of the same type-2 run's vertebra probabilities, where type 2 was trained."""
    rows = {r["label"]: r for r in report["per_label"]}.get(TARGETS[7], {})
    figures = {name: rows[f"{name} wlogloss"] for name in report["candidates"] if f"{name} wlogloss" in rows}
    out = {"overall_wlogloss": figures}
    base = figures.get(stage2_report.TYPE2_FROM_VERTEBRAE)
    if base is not None:
        learned = [v for k, v in figures.items() if k == "type 2" or k.startswith("ensemble")]
        out["overall_learned_ratio"] = min(learned) / base if learned else float("nan")
        # The same best against type 1's noisy-OR: a type 2 whose own vertebrae got worse lowers the
        # ratio above without anything submitted getting better; this one does not move with them.
        if learned and "type 1" in figures:
            out["overall_vs_type1_ratio"] = min(learned) / figures["type 1"]
    return out


def study_dice_figures(work: Path, run: str) -> dict[str, Any]:
    """Stage 1's mean Dice at the studies' own resolution on fold 0's validation studies (those
    its model did not train on), from the ``dice`` that prediction saved for studies with masks:
    ``stage1_dice_study`` and ``stage1_dice_study_per_vertebra``. Empty when none has it."""
    folds = read_folds(work / FOLDS_CSV)
    rows = []
    for uid in folds.loc[folds["seg_fold"] == 0, STUDY_COL]:
        path = work / "stage1" / run / "masks" / f"{uid}.npz"
        if path.is_file():
            with np.load(path) as npz:
                if "dice" in npz.files and (npz["true_z"][:, 0] >= 0).any():
                    rows.append(npz["dice"])
    if not rows:
        return {}
    mean = np.mean(rows, axis=0)
    return {"stage1_dice_study": float(mean.mean()), "stage1_dice_study_studies": len(rows),
            "stage1_dice_study_per_vertebra": {f"C{c + 1}": float(v) for c, v in enumerate(mean)}}


def box_figures(data: Path, boxes_csv: Path) -> dict[str, float]:
    """z-IoU of predicted vertebra slice ranges on every study that had no mask."""
    truth = pd.read_csv(data / "vertebra_slices.csv", dtype={STUDY_COL: str})
    boxes = read_boxes(boxes_csv)
    unseen = set(truth[STUDY_COL]) - set(list_segmentation_uids(data / "segmentations"))
    merged = truth[truth[STUDY_COL].isin(unseen) & (truth["z0"] >= 0)].merge(
        boxes, on=[STUDY_COL, "vertebra"], how="left", suffixes=("", "_pred"))
    ious = np.array([0.0 if not (r.z0_pred >= 0) else z_iou((r.z0_pred, r.z1_pred), (r.z0, r.z1))
                     for r in merged.itertuples()])
    return {"box_studies": int(merged[STUDY_COL].nunique()), "box_vertebrae": int(len(ious)),
            "box_ziou_ge_0_7": float((ious >= 0.7).mean()) if len(ious) else float("nan"),
            "box_ziou_mean": float(ious.mean()) if len(ious) else float("nan")}


def calibration_decision(calibration: dict[str, Any]) -> dict[str, Any]:
    """What the report decided about the calibration, and on what evidence (the figures it has)."""
    evidence = calibration.get("evidence", {})
    return {"use": bool(calibration.get("use")), "n_studies": evidence.get("n_studies"),
            **{key: evidence[key] for key in ("raw_score", "cross_validated_score", "bootstrap_confidence")
               if key in evidence}}


def submission_figures(data: Path, submission: Path, calibration: dict[str, Any] | None = None
                       ) -> dict[str, float]:
    """The submission's score on the hidden test labels, beside the constant train prior's; with a
    calibration that was used, also the score of the same submission without it (undone)."""
    labels = read_labels_csv(data / "test_labels.csv")
    sub = pd.read_csv(submission, dtype={"row_id": str})
    evaluation = evaluate_submission(labels, sub)
    prior = constant_score(labels[list(TARGETS)].to_numpy(np.float64), make_submission.load_prior(data))
    figures = {"submission_score": evaluation["score"], "submission_constant": prior,
               "submission_ratio": evaluation["score"] / prior, "n_test_studies": len(labels)}
    if calibration and calibration.get("use"):
        y, p = align(labels, submission_to_wide(sub))
        score = competition_score(y, invert_calibration(p, calibration))
        figures.update(submission_uncalibrated_score=score, submission_uncalibrated_ratio=score / prior)
    return figures


def chosen_oof(work: Path, recipe: Recipe, chosen: str) -> pd.DataFrame:
    """The report's chosen candidate's out-of-fold vertebra probabilities (index: study, columns C1..C7)."""
    oof, outputs, from_vertebrae, _ = stage2_report.load_runs(work / "stage2", [c.run for c in recipe.stage2_runs])
    _, p = stage2_report.candidates(outputs, from_vertebrae)[chosen]
    return pd.DataFrame(p[:, :7], index=oof[STUDY_COL].to_numpy(), columns=list(TARGETS[:7]))


def submission_vertebrae(submission: Path) -> pd.DataFrame:
    """A submission's vertebra probabilities (index: study, columns C1..C7)."""
    return submission_to_wide(pd.read_csv(submission, dtype={"row_id": str})).set_index(STUDY_COL)[list(TARGETS[:7])]


def kind_figures(data: Path, predictions: dict[str, pd.DataFrame]) -> dict[str, Any]:
    """Vertebra AUC per fracture kind, for each named prediction frame (index: study, columns C1..C7).

    The kinds are the generator's (``data/synth_info.json``; a dataset without it gives no figures).
    For each kind: the fractured vertebrae of that kind among the predicted studies against every
    intact vertebra of the same studies; ``{"n": count, "auc": AUC or NaN without both classes}``.
    """
    info_path = data / "synth_info.json"
    if not info_path.is_file():
        return {}
    records = {r["uid"]: r for r in json.loads(info_path.read_text())["studies"]}
    out: dict[str, Any] = {}
    for name, frame in predictions.items():
        known = [uid for uid in frame.index if uid in records]
        intact, by_kind = [], {}
        for uid in known:
            record = records[uid]
            for c, vertebra in enumerate(TARGETS[:7]):
                p = float(frame.at[uid, vertebra])
                if record["fractured"][c]:
                    by_kind.setdefault(record["kinds"].get(vertebra, "unknown"), []).append(p)
                else:
                    intact.append(p)
        figures = {}
        for kind, positives in sorted(by_kind.items()):
            auc = float("nan")
            if intact:
                y = np.r_[np.ones(len(positives)), np.zeros(len(intact))]
                auc = float(roc_auc_score(y, np.r_[positives, intact]))
            figures[kind] = {"n": len(positives), "auc": auc}
        out[name] = figures
    return out


def fit_figures(data: Path, work: Path, cfg: Stage2Config) -> dict[str, Any]:
    """How well type 1 fits its own training studies, beside its validation studies.

    Each fold model (``best.pt``, with its config's test-time views) predicts every study
    of the fold split that has a crop file: its own fold's studies are validation, the
    others training. Returns ``stage2_fit``: ``{"folds", "train_auc", "val_auc"}``, the
    vertebra AUC over C1..C7 on each model's training studies (the mean over the fold
    models) and on the validation studies (pooled over folds, as out of fold); and, where
    the generator recorded fracture kinds, ``stage2_train_kind_auc``: per kind the mean
    over the fold models of its training AUC (:func:`kind_figures`), with ``n`` the
    fractured vertebrae of that kind that any of them trained on.
    """
    from stage2_cls.dataset import crop_path
    from stage2_cls.infer import Stage2Ensemble

    run_dir = work / "stage2" / cfg.run
    trained = sorted(int(p.parent.name[4:]) for p in run_dir.glob("fold*/best.pt"))
    if not trained:
        return {}
    folds = read_folds(work / FOLDS_CSV)
    labels = pd.read_csv(data / "train.csv", dtype={STUDY_COL: str}).set_index(STUDY_COL)[list(TARGETS[:7])]
    folds = folds[folds[STUDY_COL].isin(labels.index)]
    folds = folds[[crop_path(work / "crops", uid).is_file() for uid in folds[STUDY_COL]]]

    def frame(preds: dict[str, np.ndarray]) -> pd.DataFrame:
        return pd.DataFrame(np.stack(list(preds.values())), index=list(preds), columns=list(TARGETS[:7]))

    def auc(preds: pd.DataFrame) -> float:
        y = labels.loc[preds.index].to_numpy().ravel()
        return float(roc_auc_score(y, preds.to_numpy().ravel())) if 0 < y.sum() < y.size else float("nan")

    models = {k: Stage2Ensemble([run_dir / f"fold{k}" / "best.pt"]) for k in trained}
    val: dict[str, np.ndarray] = {}
    train: dict[int, dict[str, np.ndarray]] = {k: {} for k in trained}
    for uid, fold in tqdm(list(zip(folds[STUDY_COL], folds["fold"])), desc="fit check", unit="study",
                          leave=False, dynamic_ncols=True):
        with np.load(crop_path(work / "crops", uid)) as crop:  # each crop file decoded once
            stacks, missing = crop["stacks"], crop["missing"]
        for k, model in models.items():
            p = model.predict(stacks, missing)["type1"]
            if fold == k:
                val[uid] = p
            else:
                train[k][uid] = p
    train_frames = {f"fold{k}": frame(preds) for k, preds in train.items() if preds}
    if not train_frames:
        return {}
    train_aucs = [auc(f) for f in train_frames.values()]
    out: dict[str, Any] = {"stage2_fit": {"folds": len(trained), "train_auc": float(np.nanmean(train_aucs)),
                                          "val_auc": auc(frame(val)) if val else float("nan")}}
    seen = {uid: p for preds in train.values() for uid, p in preds.items()}
    # One call (one read of the generator's kinds): each fold model's training studies, and
    # their union for the counts.
    by_frame = kind_figures(data, {**train_frames, "all": frame(seen)})
    if by_frame:
        kinds = [by_frame[name] for name in train_frames]
        out["stage2_train_kind_auc"] = {
            kind: {"n": v["n"], "auc": float(np.nanmean([f[kind]["auc"] for f in kinds if kind in f]))}
            for kind, v in by_frame["all"].items()}
    return out


def stage1_fit_figures(data: Path, work: Path, cfg: Stage1Config) -> dict[str, Any]:
    """Stage 1's fold-0 model (``best.pt``) on the segmented studies it trained on and on its
    validation studies, without augmentation, as its validation scores them: ``stage1_fit``:
    ``{"train_dice", "val_dice", "train_studies", "val_studies"}`` (mean Dice at 0.5)."""
    import torch

    from common.checkpoint import rebuild_model
    from stage1_seg.data import SegDataset, cache_dir, with_cervical_labels
    from stage1_seg.model import as_model_input, build_model, class_probs

    checkpoint = work / "stage1" / cfg.run / "fold0" / "best.pt"
    if not checkpoint.is_file():
        return {}
    model, trained_cfg = rebuild_model(checkpoint, "stage1", Stage1Config, build_model)
    model.eval()
    folds = read_folds(work / FOLDS_CSV)
    cache = cache_dir(work, trained_cfg.preprocess)
    out: dict[str, Any] = {}
    for name, fold_of in (("train", folds["seg_fold"] > 0), ("val", folds["seg_fold"] == 0)):
        uids = with_cervical_labels([u for u in folds.loc[fold_of, STUDY_COL] if (cache / f"{u}.npz").is_file()], cache)
        dataset = SegDataset(uids, cache, trained_cfg.model.in_channels)
        counts = []
        with torch.no_grad():
            for i in tqdm(range(len(dataset)), desc=f"stage-1 fit check, {name}", unit="study", leave=False,
                          dynamic_ncols=True):
                item = dataset[i]
                logits = model(as_model_input(item["image"][None])).float()
                counts.append(stage1_train.dice_counts(class_probs(logits, trained_cfg.model.head), item["target"][None]))
        if counts:
            merged = {k: np.concatenate([c[k] for c in counts]) for k in counts[0]}
            out[f"{name}_dice"] = stage1_train.dice_metrics(merged)["mean_dice"]
        out[f"{name}_studies"] = len(uids)
    return {"stage1_fit": out} if "train_dice" in out else {}
