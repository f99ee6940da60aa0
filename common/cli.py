"""Command-line plumbing shared by every entry point.

Each command takes ``--data-dir``, ``--work-dir``, ``--config`` and trailing
dotted overrides (``train.steps=3000``). An entry point is two lines: parse with
:func:`parse_command` (which also sets up logging and loads the typed config),
then call the plain ``run(...)`` function that does the work and is what the
tests call.
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from common.config import load_config
from configs import config_path

KAGGLE_DATA_DIR = Path("/kaggle/input/rsna-2022-cervical-spine-fracture-detection")


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
        "`python -m tooling.synth --out DIR` makes a synthetic one"
    )


def base_parser(description: str, default_config: str) -> argparse.ArgumentParser:
    """Parser with the options every command shares; ``default_config`` names a shipped config."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data-dir", default=None,
                        help="RSNA data root (default: $RSNA_DATA_DIR, else the Kaggle input path)")
    parser.add_argument("--work-dir", default="work", help="where outputs go (default: ./work)")
    parser.add_argument("--config", default=None,
                        help=f"YAML config (default: the shipped configs/{default_config})")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="dotted config overrides, e.g. train.steps=3000")
    parser.set_defaults(default_config=default_config)
    return parser


def add_fold_arguments(parser: argparse.ArgumentParser) -> None:
    """``--fold K`` and ``--resume``, shared by the training commands."""
    parser.add_argument("--fold", type=int, required=True, help="validation fold (see work/folds.csv)")
    parser.add_argument("--resume", action="store_true", help="continue from last.pt of this fold")


@dataclass(frozen=True)
class Command:
    """A parsed command line: its arguments, typed config and folders."""

    args: argparse.Namespace
    cfg: Any
    work_dir: Path
    data_dir_arg: str | None

    @property
    def data_dir(self) -> Path:
        """The RSNA data folder (resolved on first use, so commands without data never need one)."""
        return resolve_data_dir(self.data_dir_arg)


def parse_command(description: str, default_config: str, schema: type, argv: Sequence[str] | None,
                  add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> Command:
    """Parse ``argv``, set up logging (ranks > 0 quieter) and load ``schema`` from the config."""
    parser = base_parser(description, default_config)
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose, int(os.environ.get("RANK", "0")))
    config = args.config if args.config is not None else config_path(args.default_config)
    cfg = load_config(schema, config, args.overrides)
    return Command(args=args, cfg=cfg, work_dir=Path(args.work_dir), data_dir_arg=args.data_dir)


def setup_logging(verbose: bool = False, rank: int = 0) -> None:
    """Log to stderr; ranks other than 0 only log warnings."""
    level = logging.DEBUG if verbose else logging.INFO
    if rank != 0:
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", force=True)
