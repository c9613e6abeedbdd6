"""Where inputs come from: the Scruples release archives and the base models, with provenance.

Release archives (:func:`fetch_archive`): a base URL, a local mirror directory (holding ``<archive>.tar.gz`` or
an unpacked ``<archive>/`` folder), or ``sample`` — the synthetic generator of :mod:`moralign.sample`. This
module sits above both :mod:`moralign.data` (the release format) and :mod:`moralign.sample` (which writes that
format), so neither imports the other's caller.

Base models (:func:`fetch_base_model`), one folder per model that every later step loads with
``from_pretrained``; ``moralign-source.json`` in it records where it came from:

- ``build:`` — a tiny model built locally (:func:`moralign.tinymodels.build_tiny_model` for the causal LMs,
  :func:`moralign.tinyencoders.build_tiny_encoder` for the BERT and RoBERTa encoders);
- ``hf_id`` naming an existing local folder (the transformers rule: an existing directory is a path) — its
  files are hard-linked (copied across file systems) into the output; provenance = the path and the
  weights' fingerprint. A path-like ``hf_id`` (``/``, ``./``, ``~``, more than one ``/``) that does not exist is
  an error, never a Hub lookup;
- a Hugging Face id — resolved through the Hugging Face cache with ``snapshot_download``: online it resolves
  ``revision`` (a branch, tag or commit; null = ``main``) to its commit and downloads into the cache; with
  ``HF_HUB_OFFLINE=1`` it reads ``refs/<revision>`` and ``snapshots/<commit>`` of the cache (the usual set-up
  of cluster compute nodes) without any network call. Either way the provenance records the commit hash
  (the snapshot folder's name), so a branch that moves later cannot pass for the same weights; the
  revision as written in the config is kept as ``requested_revision``.

The fetched folder is checked (:func:`moralign.modelfiles.check_model_folder`: config, weights complete,
tokenizer, chat template when ``chat_template: true``) before it replaces the output, so a broken source fails
here, not in a GPU job.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
import tarfile
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from moralign.archives import reproducible_tar, sha256_file
from moralign.config import ENCODER_ARCHITECTURES, ConfigError
from moralign.data import SPLITS
from moralign.errors import DataError
from moralign.io import atomic_dir, atomic_path, write_json
from moralign.modelfiles import MODEL_FILES, SOURCE_FILE, check_model_folder, fingerprint_files
from moralign.sample import write_sample_archive

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- release archives


def _pack_directory(src: Path, archive: str, dest: Path) -> None:
    """Tar an unpacked release folder ``src/<archive>/`` deterministically (sorted, zeroed times and owners)."""

    def reset(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
        return info

    root = src / archive
    with reproducible_tar(dest) as tar:
        for path in [root, *sorted(root.rglob("*"))]:
            tar.add(path, arcname=str(path.relative_to(src)), recursive=False, filter=reset)


def fetch_archive(
    source: str,
    archive: str,
    dest: str | Path,
    expected_sha256: str | None = None,
    sample: dict[str, int] | None = None,
) -> str:
    """Put release archive ``archive`` at ``dest`` and return its sha256 (also written to ``dest.sha256``).

    ``source`` is a base URL, a local directory holding ``<archive>.tar.gz`` or an unpacked ``<archive>/``
    folder, or ``sample`` (synthetic, see :mod:`moralign.sample`; ``sample`` gives its seed and split sizes).
    A pinned sha256 that does not match stops here, before anything downstream reads the file.
    """
    dest = Path(dest)
    with atomic_path(dest, suffix=".tar.gz") as tmp:
        if source == "sample":
            settings = dict(sample or {})
            seed = settings.pop("seed", 0)
            write_sample_archive(archive, tmp, {s: settings.get(s, 100) for s in SPLITS}, seed)
        elif source.startswith(("http://", "https://")):
            url = f"{source.rstrip('/')}/{archive}.tar.gz"
            log.info("downloading %s", url)
            with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:
                shutil.copyfileobj(resp, out, length=1 << 20)
        else:
            root = Path(source)
            if (root / f"{archive}.tar.gz").is_file():
                shutil.copyfile(root / f"{archive}.tar.gz", tmp)
            elif (root / archive).is_dir():
                _pack_directory(root, archive, tmp)
            else:
                raise DataError(
                    f"data.source {source!r}: neither {root / (archive + '.tar.gz')} nor {root / archive}/ exists "
                    f"(expected a URL, a mirror directory, or 'sample')"
                )
        digest = sha256_file(tmp)
        if expected_sha256 and digest != expected_sha256:
            raise DataError(
                f"{archive}.tar.gz from {source}: sha256 {digest} does not match the pinned {expected_sha256}"
            )
    Path(f"{dest}.sha256").write_text(f"{digest}  {dest.name}\n")
    return digest


# --------------------------------------------------------------------------------------------------- base models


def local_model_path(hf_id: str) -> Path | None:
    """The folder ``hf_id`` names, or None for a Hub id; a path-like ``hf_id`` that does not exist is an error."""
    path = Path(hf_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise DataError(f"{hf_id}: not a folder (hf_id must be a Hugging Face id or a model folder)")
    if hf_id.startswith(("/", "./", "../", "~", ".\\")) or hf_id.count("/") > 1 or "\\" in hf_id:
        raise DataError(f"{hf_id}: model folder does not exist (hf_id is a path, so no Hub lookup is tried)")
    return None


def _matches(rel: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(rel, p) for p in patterns)


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link (or copy, across file systems) the model files of ``src`` into ``dst``.

    Symlinks are followed: a Hugging Face snapshot is symlinks into its blob store.
    """
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src).as_posix()
        if not path.is_file() or rel.startswith(".") or "/." in rel or rel == SOURCE_FILE:
            continue
        if not _matches(rel, MODEL_FILES):
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path.resolve(), target)
        except OSError:
            shutil.copy2(path, target)


def hub_snapshot(hf_id: str, revision: str | None, cache_dir: str | Path | None = None) -> Path:
    """The Hugging Face cache's snapshot folder of ``hf_id`` at ``revision`` (its name is the commit hash).

    Online: resolves ``revision`` and downloads what is missing into the cache. With ``HF_HUB_OFFLINE=1``: reads
    the cache only. Every failure becomes a :class:`DataError` that says what to do.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{hf_id}@{revision or 'main'}"
    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    try:
        folder = snapshot_download(hf_id, revision=revision, cache_dir=cache_dir, allow_patterns=list(MODEL_FILES))
    except HFValidationError as err:
        raise DataError(f"hf_id {hf_id!r}: neither an existing folder nor a valid Hugging Face id ({err})") from err
    except RevisionNotFoundError as err:
        raise DataError(f"{where}: the Hub has no revision {revision!r} of {hf_id}") from err
    except RepositoryNotFoundError as err:
        raise DataError(
            f"{hf_id}: not on the Hugging Face Hub, or gated/private (log in and accept its licence first)"
        ) from err
    except LocalEntryNotFoundError as err:
        state = "incomplete in" if "incomplete" in str(err) else "not in"
        raise DataError(
            f"{where}: {state} the Hugging Face cache {cache} and the Hub cannot be reached "
            f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}): fetch it once where there is network, "
            "with the same HF_HOME, or set hf_id to a local model folder"
        ) from err
    return Path(folder)


def fetch_base_model(
    model_cfg: dict[str, Any], archives: Iterable[str | Path], out: str | Path, cache_dir: str | Path | None = None
) -> dict[str, Any]:
    """Put one base model in ``out`` (see the module docstring) and return its provenance.

    ``model_cfg`` is the config's ``models.<name>``; ``archives`` are the sample archives a ``build:`` model's
    tokenizer is trained on; ``cache_dir`` overrides the Hugging Face cache (default: ``HF_HUB_CACHE``).
    The provenance is also written to ``out/moralign-source.json``. ``out`` is replaced only once the model
    folder has passed :func:`check_model_folder`.
    """
    chat = bool(model_cfg.get("chat_template", True))
    with atomic_dir(out) as tmp:
        if "build" in model_cfg and model_cfg["build"]["architecture"] in ENCODER_ARCHITECTURES:
            from moralign.tinyencoders import build_tiny_encoder

            build_tiny_encoder(model_cfg["build"], archives, tmp)
            source: dict[str, Any] = {"built": model_cfg["build"], "hf_id": None, "revision": None}
        elif "build" in model_cfg:
            from moralign.tinymodels import build_tiny_model

            build_tiny_model(model_cfg["build"], archives, tmp)
            source = {"built": model_cfg["build"], "hf_id": None, "revision": None}
        else:
            hf_id, revision = model_cfg["hf_id"], model_cfg.get("revision")
            local = local_model_path(hf_id)
            if local is not None:
                if revision:
                    raise ConfigError(
                        f"model {hf_id!r} is a local folder, so revision {revision!r} cannot apply; set revision: null"
                    )
                check_model_folder(local, chat)
                _link_tree(local, tmp)
                source = {
                    "built": None,
                    "hf_id": hf_id,
                    "revision": None,
                    "local_path": str(local.resolve()),
                    "fingerprint": fingerprint_files(tmp),
                }
            else:
                log.info("fetching %s@%s through the Hugging Face cache", hf_id, revision or "main")
                snapshot = hub_snapshot(hf_id, revision, cache_dir)
                _link_tree(snapshot, tmp)
                source = {"built": None, "hf_id": hf_id, "revision": snapshot.name, "requested_revision": revision}
        # what later steps will load, named as the user knows it (never the temporary folder)
        label = source.get("local_path") or (f"{source['hf_id']}@{source['revision']}" if source["hf_id"] else str(out))
        check_model_folder(tmp, chat, label)
        write_json(tmp / SOURCE_FILE, source)
    log.info("base model ready in %s: %s", out, {k: v for k, v in source.items() if k != "built"})
    return source
