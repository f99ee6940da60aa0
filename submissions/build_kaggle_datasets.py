"""Build the two folders to upload as Kaggle datasets for the offline notebook.

    python submissions/build_kaggle_datasets.py wheels --out kaggle/wheels [--python 3.10]
    python submissions/build_kaggle_datasets.py models --work-dir work --out kaggle/models \
        [--stage1-run default] [--stage2-run default]

``wheels``: the project's own wheel plus wheels of the dependencies a Kaggle
image lacks, for the notebook's ``pip install --no-index --find-links``.
Needs the package index (run it where there is internet, not on Kaggle).
``models``: the fold checkpoints and ensemble.json in the layout make_submission
reads, plus a ``submission.yaml`` pointing at them.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# What the Kaggle GPU image lacks (torch, torchvision, numpy, pandas, scikit-learn,
# opencv, matplotlib, tqdm, PyYAML and albumentations are there).
MISSING_ON_KAGGLE = [
    "segmentation-models-pytorch-3d==1.0.2", "timm==0.9.7", "timm-3d==1.0.1", "efficientnet-pytorch==0.7.1",
    "pretrainedmodels==0.7.4", "munch", "pydicom>=3.0", "pylibjpeg>=2.0", "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg", "pylibjpeg-rle", "python-gdcm", "dicomsdl", "imagecodecs", "nibabel", "iterative-stratification",
]


def build_project_wheel(out: Path) -> Path:
    """``pip wheel --no-deps`` of this repository into ``out``; returns the wheel."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(ROOT)], check=True)
    wheels = sorted(out.glob("rsna_csfd-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip wheel produced no rsna_csfd wheel in {out}")
    return wheels[-1]


def download_dependencies(out: Path, python: str) -> None:
    """Binary wheels for the Kaggle Python; source-only packages are built into wheels here."""
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(out)]
    target = ["--only-binary=:all:", "--python-version", python, "--platform", "manylinux2014_x86_64",
              "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux_2_28_x86_64", "--platform", "any"]
    for requirement in MISSING_ON_KAGGLE:
        try:
            subprocess.run(base + target + [requirement], check=True)
        except subprocess.CalledProcessError:  # sdist only (e.g. efficientnet-pytorch): build a wheel
            subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), requirement],
                           check=True)


def copy_models(work_dir: Path, out: Path, stage1_run: str, stage2_run: str) -> dict:
    """Copy best.pt of every fold of the stage-1 run (and its ``box_offsets.json``) and of the
    stage-2 runs, ``ensemble.json``, and write submission.yaml.

    The stage-2 runs are those ``work/stage2/ensemble.json`` (written by stage2_cls.report)
    names, or ``stage2_run`` when there is none.
    """
    ensemble = work_dir / "stage2" / "ensemble.json"
    runs = json.loads(ensemble.read_text())["runs"] if ensemble.is_file() else [stage2_run]
    copied: dict[str, list[str]] = {"stage1": [], "stage2": []}
    for stage, run in [("stage1", stage1_run)] + [("stage2", r) for r in runs]:
        found = sorted((work_dir / stage / run).glob("fold*/best.pt"))
        if not found:
            raise FileNotFoundError(f"no {stage} checkpoints under {work_dir / stage / run}/fold*/best.pt")
        for ckpt in found:
            target = out / stage / run / ckpt.parent.name / "best.pt"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ckpt, target)
            copied[stage].append(str(target.relative_to(out)))
    offsets = work_dir / "stage1" / stage1_run / "box_offsets.json"   # stage1_seg.predict's, if fitted
    if offsets.is_file():
        shutil.copy2(offsets, out / "stage1" / stage1_run / offsets.name)
        copied["stage1"].append(f"stage1/{stage1_run}/{offsets.name}")
    config = {"stage1_checkpoints": f"stage1/{stage1_run}/fold*/best.pt",
              "stage2_checkpoints": f"stage2/{runs[0]}/fold*/best.pt"}
    if ensemble.is_file():
        shutil.copy2(ensemble, out / "stage2" / "ensemble.json")
        config["ensemble"] = "stage2/ensemble.json"
    (out / "submission.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return copied


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    wheels = sub.add_parser("wheels", help="the wheel folder")
    wheels.add_argument("--out", type=Path, required=True)
    wheels.add_argument("--python", default="3.10", help="the Kaggle image's Python version")
    wheels.add_argument("--project-only", action="store_true", help="only this project's wheel (offline)")
    models = sub.add_parser("models", help="the models folder")
    models.add_argument("--work-dir", type=Path, default=Path("work"))
    models.add_argument("--out", type=Path, required=True)
    models.add_argument("--stage1-run", default="default")
    models.add_argument("--stage2-run", default="default")
    args = parser.parse_args(argv)
    if args.what == "wheels":
        print(build_project_wheel(args.out))
        if not args.project_only:
            download_dependencies(args.out, args.python)
        print("\n".join(sorted(p.name for p in args.out.glob("*.whl"))))
    else:
        print(yaml.safe_dump(copy_models(args.work_dir, args.out, args.stage1_run, args.stage2_run)))


if __name__ == "__main__":
    main()
