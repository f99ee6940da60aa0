"""The shipped YAML configs (package data), found wherever the package is installed.

``config_path("stage1.yaml")`` or ``config_path("demo/stage2.yaml")`` is the path of a
shipped file; every command's ``--config`` defaults to one of them.
"""
from __future__ import annotations

from importlib.resources import files
from pathlib import Path


def config_path(name: str) -> Path:
    """Path of a shipped config, e.g. ``config_path("demo/stage1.yaml")``; an error names what exists."""
    path = Path(str(files(__name__).joinpath(name)))
    if not path.is_file():
        shipped = sorted(str(p.relative_to(path_root())) for p in path_root().rglob("*.yaml"))
        raise FileNotFoundError(f"no shipped config {name!r}; shipped: {', '.join(shipped)}")
    return path


def path_root() -> Path:
    """The folder the shipped configs live in."""
    return Path(str(files(__name__)))
