"""What every step script shares: the --config/--log arguments, logging, and error reporting."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from moralign.config import Config, load_config
from moralign.io import setup_logging


def parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser with the options every step takes."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--config",
        nargs="+",
        required=True,
        type=Path,
        help="config files, merged in order (params.yaml, then overlays)",
    )
    p.add_argument(
        "--sections",
        nargs="*",
        help="the config sections this step may read (dotted keys; the stage table's list). Default: all",
    )
    p.add_argument("--log", type=Path, help="log file (the rule's or stage's log)")
    return p


def start(args: argparse.Namespace) -> Config:
    """Set up logging; load and validate the configuration, cut down to the step's declared sections."""
    setup_logging(args.log)
    cfg = load_config(args.config)
    return cfg if args.sections is None else cfg.restrict(args.sections)


def run(main: Callable[[Sequence[str] | None], None]) -> None:
    """Run a step's main(); a failure is logged with its reason and exits non-zero."""
    try:
        main(None)
    except Exception:
        logging.getLogger("moralign").exception("step failed")
        sys.exit(1)
