"""What every step script shares: the --config/--log arguments, logging, and error reporting."""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from moralign.config import Config, ConfigError, load_config
from moralign.errors import DataError
from moralign.io import setup_logging

T = TypeVar("T")
# The arguments every step takes (parser), used by start() rather than passed to the step
OWN = ("config", "sections", "log")


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


def training_parser(doc: str | None, seeds: str) -> argparse.ArgumentParser:
    """:func:`parser` plus what every training step takes: the cell (model, dataset, seed), its data and base."""
    p = parser(doc)
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--seed", type=int, default=0, help=f"training seed (one of {seeds})")
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument(
        "--base", required=True, type=Path, dest="base_dir", help="folder of the base model (fetch_model's output)"
    )
    p.add_argument("--out", required=True, type=Path, dest="out_dir")
    return p


def cell_parser(doc: str | None) -> argparse.ArgumentParser:
    """:func:`parser` plus what every step that reads one cell's model takes (extract, read).

    The cell (model, dataset, condition), its data and output folder, and where its model comes from: the base
    folder and adapter of a local model, or the response cache of an API model.
    """
    p = parser(doc)
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--condition", required=True)
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("--base", type=Path, help="folder of the base model (fetch_model's output; local models)")
    p.add_argument("--adapter", type=Path, help="adapter folder (fine-tuned conditions)")
    p.add_argument(
        "--base-quantization",
        choices=["none", "4bit"],
        help="the base weights an adapter was trained on, as planned (an adapter trained otherwise is an error)",
    )
    p.add_argument(
        "--cache-dir", type=Path, help="response (API) or generation cache, outside the step's declared outputs"
    )
    return p


def start(args: argparse.Namespace) -> Config:
    """Set up logging; load and validate the configuration, cut down to the step's declared sections."""
    setup_logging(args.log)
    cfg = load_config(args.config)
    return cfg if args.sections is None else cfg.restrict(args.sections)


def take(args: argparse.Namespace, *names: str) -> list[Any]:
    """The values of ``names``, removed from ``args``: the script hands them to the step in another form."""
    return [vars(args).pop(name) for name in names]


def call(step: Callable[..., T], args: argparse.Namespace, **extra: Any) -> T:
    """``step(config, **arguments)``: the configuration (:func:`start`), then every parsed argument by its name.

    By name, not position, so an argument cannot land in another's parameter; one the step does not take is an
    error rather than silently unused. ``extra``: what the script built from arguments it took (:func:`take`).
    """
    given = {k: v for k, v in vars(args).items() if k not in OWN} | extra
    unknown = sorted(set(given) - set(inspect.signature(step).parameters))
    if unknown:
        raise TypeError(f"{step.__module__}.{step.__name__} takes no argument {', '.join(unknown)}")
    return step(start(args), **given)


def run(main: Callable[[Sequence[str] | None], None]) -> None:
    """Run a step's main(); a failure is logged with its reason and exits non-zero.

    Bad input (:class:`DataError`, :class:`ConfigError`) is the user's to fix, so it is printed as ONE line on
    stderr (``<step>: error: <where>: <reason>``) with no traceback; the traceback still goes to the log file.
    Anything else is a bug and is logged with its traceback everywhere.
    """
    try:
        main(None)
    except (DataError, ConfigError) as err:
        logger = logging.getLogger("moralign")
        files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
        if files:
            record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "step failed", (), sys.exc_info())
            for handler in files:
                handler.handle(record)
        message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
        log_note = f" (traceback in {files[0].baseFilename})" if files else ""
        print(f"{Path(sys.argv[0]).stem}: error: {message}{log_note}", file=sys.stderr)
        sys.exit(1)
    except Exception:
        logging.getLogger("moralign").exception("step failed")
        sys.exit(1)
