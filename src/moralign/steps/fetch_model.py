"""fetch_model: put a base model in its folder (hub snapshot or tiny local build), with its provenance."""

from __future__ import annotations

import logging
from pathlib import Path

from moralign.config import Config
from moralign.sources import fetch_base_model

log = logging.getLogger(__name__)


def run(cfg: Config, model: str, archives: list[Path], out: Path) -> None:
    """Fetch or build model ``model`` into ``out``."""
    source = fetch_base_model(cfg.model(model), archives, out)
    log.info("%s ready in %s: %s", model, out, source)
