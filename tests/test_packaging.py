"""What a new user meets first: the README's and the Makefile's commands, and the installed package."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "submissions"))
from build_kaggle_datasets import build_project_wheel  # noqa: E402

_MODULE = re.compile(r"(?:python3?|\$\(PYTHON\)) -m ([A-Za-z_][\w.]*)")
_SCRIPT = re.compile(r"python3? ((?:submissions|tooling)/[\w/]+\.py)")
_NOT_OURS = {"pip", "pytest", "venv"}


def documented_commands() -> list[str]:
    """Every ``python -m MODULE`` and ``python path/script.py`` written in README.md, docs/*.md and the Makefile."""
    pages = [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n".join(page.read_text() for page in pages)
    modules = {m for m in _MODULE.findall(text) if m.split(".")[0] not in _NOT_OURS and not m.startswith("torch")}
    return sorted(f"-m {m}" for m in modules) + sorted(set(_SCRIPT.findall(text)))


def test_the_readme_documents_the_commands_a_user_needs():
    commands = documented_commands()
    for needed in ("stage1_seg.train", "stage1_seg.predict", "stage2_cls.crop", "stage2_cls.train",
                   "make_submission", "tooling.demo", "common.metric"):
        assert f"-m {needed}" in commands, needed


def _env_without_checkout() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["RSNA_DATA_DIR"] = ""
    return env


@pytest.mark.slow
def test_every_documented_command_answers_help_outside_the_checkout(tmp_path):
    """Run from an empty folder: the installed package, not the working directory, must answer."""
    procs = {}
    for command in documented_commands():
        args = command.split() if command.startswith("-m ") else [str(ROOT / command)]
        procs[command] = subprocess.Popen([sys.executable, *args, "--help"], cwd=tmp_path, env=_env_without_checkout(),
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if len(procs) % 2 == 0:  # two at a time on two cores
            for p in list(procs.values())[-2:]:
                p.wait()
    failed = {}
    for command, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        if proc.returncode != 0 or "usage" not in out.lower():
            failed[command] = (proc.returncode, err[-500:])
    assert not failed, failed


@pytest.mark.slow
def test_the_wheel_carries_the_configs_and_runs_from_anywhere(tmp_path):
    wheel = build_project_wheel(tmp_path / "wheel")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    assert shipped and shipped <= names, sorted(shipped - names)
    for module in ("make_submission.py", "tooling/demo.py", "stage1_seg/infer.py", "stage2_cls/calibration.py"):
        assert module in names, module
    assert not [n for n in names if n.startswith("tests/")]
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # Only the unpacked wheel on the path for our packages: the defaults must come from inside it.
    code = ("import configs, stage1_seg.train as t; from common.config import load_config; "
            "from configs import config_path; from stage1_seg.config import Stage1Config; "
            "p = config_path('demo/stage1.yaml'); assert str(p).startswith(%r), p; "
            "print(load_config(Stage1Config, p).run)" % str(site))
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**_env_without_checkout(), "PYTHONPATH": str(site)}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "demo"


def _make_dry_run(folder: Path) -> str:
    done = subprocess.run(["make", "-n", "install", f"PYTHON={sys.executable}"], cwd=folder,
                          capture_output=True, text=True, check=True)
    return done.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="no make")
def test_make_installs_once_per_environment_and_again_when_pyproject_changes(tmp_path):
    (tmp_path / "Makefile").write_text((ROOT / "Makefile").read_text())
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    assert "pip install" in _make_dry_run(tmp_path)  # nothing installed yet
    stamps = subprocess.run(["make", "-n", "-p", "install", f"PYTHON={sys.executable}"], cwd=tmp_path,
                            capture_output=True, text=True).stdout
    stamp = re.search(r"^INSTALLED := (\S+)$", stamps, re.M).group(1)
    assert stamp.startswith(".make/installed-")
    (tmp_path / stamp).parent.mkdir()
    (tmp_path / stamp).touch()
    assert "pip install" not in _make_dry_run(tmp_path)  # the stamp says this environment has it
    later = (tmp_path / stamp).stat().st_mtime + 10
    os.utime(tmp_path / "pyproject.toml", (later, later))
    assert "pip install" in _make_dry_run(tmp_path)  # the dependencies may have changed
