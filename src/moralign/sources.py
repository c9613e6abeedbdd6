"""Where base models come from: a Hugging Face Hub snapshot (pinned revision) or a tiny model built locally.

Every later step loads the model from the folder written here, so compute nodes need no network and DVC can
track the exact weights; ``moralign-source.json`` in that folder records where they came from.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from moralign.io import atomic_dir, read_json, write_json

log = logging.getLogger(__name__)
SOURCE_FILE = "moralign-source.json"


def fetch_base_model(mcfg: dict[str, Any], archives: list[Path], out: Path) -> dict[str, Any]:
    """Put the base model of config entry ``mcfg`` in ``out``; returns the provenance written beside it."""
    with atomic_dir(out) as tmp:
        if "build" in mcfg:
            from moralign.tinymodels import build_tiny_model

            build_tiny_model(mcfg["build"], archives, tmp)
            source = {"built": mcfg["build"], "hf_id": None, "revision": None}
        else:
            from huggingface_hub import model_info, snapshot_download

            log.info("downloading %s@%s", mcfg["hf_id"], mcfg["revision"] or "main")
            snapshot_download(
                mcfg["hf_id"],
                revision=mcfg["revision"],
                local_dir=tmp,
                allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.jinja"],
            )
            commit = mcfg["revision"] or model_info(mcfg["hf_id"]).sha
            source = {"built": None, "hf_id": mcfg["hf_id"], "revision": commit}
        write_json(tmp / SOURCE_FILE, source)
    return source


def base_identity(base_dir: Path) -> dict[str, Any]:
    """Where a base model came from: hub id and commit, or the build spec and a hash of the built files."""
    from moralign.modeling import fingerprint_files

    source = read_json(Path(base_dir) / SOURCE_FILE)
    return {**source, "weights": source["revision"] or fingerprint_files(base_dir)}
