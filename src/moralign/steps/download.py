"""download: fetch one release archive (URL, mirror or synthetic sample) and record its sha256."""

from __future__ import annotations

import logging
from pathlib import Path

from moralign.config import Config
from moralign.sources import fetch_archive

log = logging.getLogger(__name__)


def run(cfg: Config, archive: str, out: Path) -> None:
    """Put release archive ``archive`` at ``out``."""
    src = cfg["data"]
    digest = fetch_archive(src["source"], archive, out, src["sha256"].get(archive), src["sample"])
    log.info("%s: sha256 %s", out, digest)
