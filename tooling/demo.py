"""The whole pipeline on a synthetic RSNA-format dataset, on a laptop CPU.

    python -m tooling.demo --out demo        (make demo)

Makes a dataset of varied synthetic neck CTs (``tooling.anatomy`` preset
``varied``), trains stage 1 and stage 2 (fold 0 each, demo configs, augmentation
on), predicts masks and boxes, cuts the crops, writes ``submission.csv`` for the
synthetic test studies and scores it against their hidden labels beside the
constant prior (the recipe of ``tooling.recipe``). Every phase resumes: run it
again and finished phases are skipped. The figures land in ``<out>/report/``;
``python -m tooling.recipe_check`` runs the same recipe on several datasets and
all stage-2 folds.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from common.cli import setup_logging
from tooling.synth import DatasetSpec

if TYPE_CHECKING:
    from tooling.recipe import Recipe

# tooling.recipe (torch, both stages) is imported where it is used: the worker processes of the
# dataset and crop phases are spawned, and a spawned worker imports this module again first.
log = logging.getLogger("demo")

DEMO = DatasetSpec("demo", n_train=48, n_seg=24, n_test=24, size=96, seed=0)


def run(out: Path, spec: DatasetSpec = DEMO, recipe: "Recipe | None" = None) -> dict[str, Any]:
    from tooling.recipe import Recipe, run_recipe

    recipe = recipe or Recipe.demo()
    result = run_recipe(out, spec, recipe, stage2_folds=[0])
    try:
        from tooling.demo_report import write_report

        result["figures"] = write_report(out, out / "data", out / "work", recipe.stage1, recipe.stage2, fold=0)
    except Exception as exc:  # the figures are a bonus: never lose the scores over them
        log.warning("figures not written: %s", exc)
    (out / "demo_result.json").write_text(json.dumps(result, indent=2, default=str))
    print(format_result(result))
    return result


def format_result(r: dict[str, Any]) -> str:
    """The demo's scores, each beside what it is compared with."""
    per_vertebra = ", ".join(f"{k} {v:.2f}" for k, v in r["stage1_dice_per_vertebra"].items())
    seconds = r["seconds"]
    return "\n".join([
        "",
        f"stage 1 validation mean Dice        {r['stage1_dice']:.3f} ({per_vertebra})",
        *([f"  at the studies' own resolution    {r['stage1_dice_study']:.3f} "
           f"({r['stage1_dice_study_studies']} validation studies; the cube's grid above)"]
          if "stage1_dice_study" in r else []),
        f"boxes, studies without a mask       {r['box_ziou_ge_0_7']:.1%} of {r['box_vertebrae']} vertebrae "
        f"with z-IoU >= 0.7 (mean {r['box_ziou_mean']:.2f})",
        f"stage 2 validation score (fold 0)   {r['stage2_oof_score']:.4f} vs best constant "
        f"{r['stage2_oof_constant']:.4f} ({r['stage2_oof_ratio']:.2f}x)",
        f"submission, {r['n_test_studies']} hidden test labels  {r['submission_score']:.4f} vs constant prior "
        f"{r['submission_constant']:.4f} ({r['submission_ratio']:.2f}x)",
        f"calibration                         {r['calibration']}",
        f"wall time                           {seconds['total'] / 60:.1f} min ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items() if k != "total") + ")",
    ])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo", help="folder for the data, models and report")
    parser.add_argument("--n-train", type=int, default=DEMO.n_train)
    parser.add_argument("--n-seg", type=int, default=DEMO.n_seg)
    parser.add_argument("--n-test", type=int, default=DEMO.n_test)
    parser.add_argument("--size", type=int, default=DEMO.size)
    parser.add_argument("--seed", type=int, default=DEMO.seed)
    parser.add_argument("--variety", default=DEMO.variety, help="a preset of tooling.anatomy.PRESETS")
    parser.add_argument("--stage1", nargs="*", default=[], metavar="key=value", help="stage-1 overrides")
    parser.add_argument("--stage2", nargs="*", default=[], metavar="key=value", help="stage-2 overrides")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    spec = DatasetSpec("demo", n_train=args.n_train, n_seg=args.n_seg, n_test=args.n_test, size=args.size,
                       seed=args.seed, variety=args.variety)
    from tooling.recipe import Recipe

    return run(Path(args.out), spec, Recipe.demo(args.stage1, args.stage2))


if __name__ == "__main__":
    main()
