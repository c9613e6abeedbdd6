"""prepare: parse and validate one dataset's release archive into per-split Parquet tables."""

from __future__ import annotations

import logging
from pathlib import Path

from moralign import data
from moralign.config import Config

log = logging.getLogger(__name__)


def run(cfg: Config, dataset: str, archive: Path, out_dir: Path) -> None:
    """Write ``out_dir/<split>.parquet`` and ``stats.json`` from the release archive ``archive``."""
    stats = data.prepare(dataset, archive, out_dir)
    for split, counts in stats["splits"].items():
        log.info("%s/%s: %s", dataset, split, counts)
