"""What a spawned worker process imports before it does any work.

The parallel loops (synthetic studies, stage-1 cache, crops) start their workers
with ``spawn`` (common.parallel), and a spawned worker first imports the main
module of the command again. When that module pulls in torch and both stages
(7-9 s on 2 cores), every worker of every pool pays it before its first job.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def loaded_after_import(module: str, watched: tuple[str, ...]) -> set[str]:
    """The ``watched`` top-level packages that importing ``module`` loads, in a fresh interpreter."""
    code = (f"import sys, {module}; "
            f"print(','.join(m for m in {watched!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return {name for name in done.stdout.strip().split(",") if name}


@pytest.mark.parametrize("module", ["tooling.demo", "tooling.recipe_check"])
def test_the_demo_and_recipe_check_entry_modules_import_no_torch(module):
    # their worker functions live in tooling.synth and stage2_cls.crop; the entry module itself
    # must stay light, since each spawned worker imports it again
    assert loaded_after_import(module, ("torch", "timm", "segmentation_models_pytorch_3d", "matplotlib")) == set()


def test_the_crop_workers_need_no_plotting_library():
    # stage2_cls.crop needs torch; the training loop's learning-curve plots are not needed to crop
    assert loaded_after_import("stage2_cls.crop", ("torch", "matplotlib")) == {"torch"}


def test_the_entry_modules_still_offer_what_they_did():
    from tooling import demo, recipe, recipe_check, synth

    assert recipe.DatasetSpec is synth.DatasetSpec is demo.DatasetSpec is recipe_check.DatasetSpec
    assert demo.DEMO.n_train == 48 and set(recipe_check.DATASETS) == {"varied-96", "wide-fov-192", "few-masks",
                                                                      "slices-60"}
