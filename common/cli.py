"""Command-line plumbing shared by every entry point.

Each command takes ``--data-dir``, ``--work-dir``, ``--config`` and trailing
dotted overrides (``train.epochs=3``); entry points only parse and then call a
plain ``run(...)`` function.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

KAGGLE_DATA_DIR = Path("/kaggle/input/rsna-2022-cervical-spine-fracture-detection")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class DataDirError(FileNotFoundError):
    """No RSNA data folder could be found."""


def resolve_data_dir(arg: str | os.PathLike | None) -> Path:
    """``--data-dir``, else ``$RSNA_DATA_DIR``, else the Kaggle input path, else an error."""
    for candidate, origin in ((arg, "--data-dir"), (os.environ.get("RSNA_DATA_DIR"), "RSNA_DATA_DIR")):
        if candidate:
            path = Path(candidate).expanduser()
            if not path.is_dir():
                raise DataDirError(f"{origin} points to {path}, which is not a folder")
            return path
    if KAGGLE_DATA_DIR.is_dir():
        return KAGGLE_DATA_DIR
    raise DataDirError(
        "no data folder: pass --data-dir DIR or set RSNA_DATA_DIR to the RSNA competition data "
        "(the folder holding train.csv, train_images/, segmentations/); "
        "`python -m common.synth --out DIR` makes a synthetic one"
    )


def base_parser(description: str, default_config: str) -> argparse.ArgumentParser:
    """Parser with the options every command shares; ``default_config`` is relative to configs/."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data-dir", default=None,
                        help="RSNA data root (default: $RSNA_DATA_DIR, else the Kaggle input path)")
    parser.add_argument("--work-dir", default="work", help="where outputs go (default: ./work)")
    parser.add_argument("--config", default=str(CONFIG_DIR / default_config),
                        help=f"YAML config (default: configs/{default_config})")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="dotted config overrides, e.g. train.epochs=3")
    return parser


def setup_logging(verbose: bool = False, rank: int = 0) -> None:
    """Log to stderr; ranks other than 0 only log warnings."""
    level = logging.DEBUG if verbose else logging.INFO
    if rank != 0:
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)

