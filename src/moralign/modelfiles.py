"""Model folders: what a base model or adapter folder must hold, and where its weights came from.

Checked before anything is loaded, so a broken folder fails in the step's first second with one clear line
(:class:`moralign.errors.DataError` naming the folder and what is wrong), not deep inside ``from_pretrained``:

- :func:`check_model_folder` — config, complete safetensors weights, tokenizer files, and a chat template when
  the model is configured with ``chat_template: true``;
- :func:`check_adapter` — a LoRA adapter folder, and that it was trained on the base model it is about to be put
  on (the adapter's ``metadata.json`` ``base`` against :func:`base_identity` of the base folder);
- :func:`base_identity` — the provenance ``fetch_model`` wrote (``moralign-source.json``) plus ``weights``: the Hub
  commit, or a fingerprint of the files.

This module reads files only (no torch), so the steps that check folders do not depend on the loading code.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from moralign.errors import DataError
from moralign.io import read_json

SOURCE_FILE = "moralign-source.json"
# What a model folder needs from a Hub repository or a local folder: configs, safetensors weights, tokenizer files
# and chat templates. Not *.bin/*.pt/*.msgpack/*.h5 duplicates of the weights in other formats.
MODEL_FILES = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.jinja", "merges.txt")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tekken.json", "vocab.json", "*.tiktoken")


def _read_json(path: Path, shown: str | None = None) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{shown or path}: not valid JSON ({err})") from err


def _read_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; a missing file says what it should have been."""
    if not path.is_file():
        raise DataError(f"{path}: missing ({what})")
    value = _read_json(path)
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object ({what})")
    return value


def _check_safetensors(path: Path, shown: str) -> None:
    """A safetensors file must hold its whole header and every tensor it declares (a truncated download fails)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise DataError(f"{shown}: empty or truncated weights file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise DataError(f"{shown}: not a safetensors file (header length {n} in a {size}-byte file)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{shown}: not a safetensors file (unreadable header)") from err
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise DataError(f"{shown}: truncated weights file ({size} of {expected} bytes: an interrupted download?)")


def has_chat_template(folder: str | Path) -> bool:
    """Whether a saved tokenizer carries a chat template (chat_template.jinja/.json or tokenizer_config.json)."""
    folder = Path(folder)
    jinja = folder / "chat_template.jinja"
    if jinja.is_file() and jinja.read_text(encoding="utf-8").strip():
        return True
    if any((folder / "additional_chat_templates").glob("*.jinja")):
        return True
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = folder / name
        if path.is_file() and _read_json(path).get("chat_template"):
            return True
    return False


def check_model_folder(path: str | Path, chat_template: bool, label: str | None = None) -> None:
    """Check that ``from_pretrained`` can load ``path`` and that it holds what the config promises.

    config.json, complete safetensors weights, tokenizer files, and a chat template when ``chat_template`` is
    true. Raises :class:`DataError` naming the folder (or ``label``, the name the user knows it by) and what is
    missing.
    """
    path = Path(path)
    name = label or str(path)
    if not path.exists():
        raise DataError(f"{name}: model folder does not exist")
    if not path.is_dir():
        raise DataError(f"{name}: not a folder (expected a model folder with config.json, weights and tokenizer)")
    if not (path / "config.json").is_file():
        raise DataError(f"{name}: no config.json: not a Hugging Face model folder")
    _read_json(path / "config.json", f"{name}/config.json")
    for index in sorted(path.glob("*.index.json")):
        shards = sorted(set(_read_json(index, f"{name}/{index.name}").get("weight_map", {}).values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise DataError(
                f"{name}: weight shards listed in {index.name} are missing: {missing[:3]} (an interrupted download?)"
            )
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        other = sorted(p.name for p in path.glob("*.bin"))[:2]
        hint = f" ({', '.join(other)} found: convert to safetensors first)" if other else ""
        raise DataError(f"{name}: no weights (*.safetensors){hint}")
    for file in weights:
        _check_safetensors(file, f"{name}/{file.name}")
    if not any(any(path.glob(pattern)) for pattern in _TOKENIZER_FILES):
        raise DataError(f"{name}: no tokenizer files (one of {', '.join(_TOKENIZER_FILES)})")
    if chat_template and not has_chat_template(path):
        raise DataError(
            f"{name}: the tokenizer has no chat template, but the model is configured with chat_template: true "
            "(use the instruct/chat version of the model, or set chat_template: false to feed raw text)"
        )


def base_identity(base_dir: str | Path) -> dict[str, Any]:
    """Where a base model came from, plus ``weights``: the Hub commit, or the fingerprint of the weights.

    A local folder's fingerprint was taken when it was fetched; a built model's is computed from its files.
    """
    path = Path(base_dir) / SOURCE_FILE
    if not path.is_file():
        raise DataError(f"{base_dir}: no {SOURCE_FILE}: not a base model folder written by fetch_model")
    source = read_json(path)
    weights = source.get("revision") or source.get("fingerprint")
    if not weights:
        weights = fingerprint_files(base_dir)
    return {**source, "weights": weights}


def describe_base(identity: dict[str, Any]) -> str:
    """A short human name for a base identity, for messages."""
    if identity.get("built"):
        spec = identity["built"]
        name = f"a tiny built {spec.get('architecture')} (seed {spec.get('seed')})"
    elif identity.get("local_path"):
        name = identity["local_path"]
    else:
        name = f"{identity.get('hf_id')}@{identity.get('revision')}"
        if identity.get("weights") in (None, identity.get("revision")):
            return name
    return f"{name}, weights {identity.get('weights')}"


def check_adapter(adapter_dir: str | Path, base_dir: str | Path) -> None:
    """A PEFT adapter folder with weights, trained on the base model in ``base_dir``.

    The decisive check is the adapter's ``metadata.json`` ``base`` (written by finetune) against
    :func:`base_identity` of ``base_dir``: the Hub commit, or the fingerprint of the weights.
    An adapter from elsewhere (no metadata.json) is checked by ``adapter_config.json``'s
    ``base_model_name_or_path`` against the base's Hub id or folder.
    """
    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    if not adapter_dir.is_dir():
        raise DataError(f"{adapter_dir}: adapter folder does not exist")
    config = _read_object(adapter_dir / "adapter_config.json", "a PEFT adapter folder has adapter_config.json")
    weights = [p for p in (adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin") if p.is_file()]
    if not weights:
        raise DataError(f"{adapter_dir}: no adapter weights (adapter_model.safetensors)")
    if not base_dir.is_dir():
        raise DataError(f"{base_dir}: base model folder does not exist")
    base = base_identity(base_dir)
    meta_path = adapter_dir / "metadata.json"
    if meta_path.is_file():
        trained = _read_object(meta_path, "adapter metadata").get("base")
        if not isinstance(trained, dict) or "weights" not in trained:
            raise DataError(f"{meta_path}: no 'base' identity (not written by finetune?)")
        if trained["weights"] != base["weights"]:
            raise DataError(
                f"{adapter_dir}: trained on {describe_base(trained)}, but {base_dir} holds {describe_base(base)}: "
                "pass the base model it was trained on"
            )
        return
    named = config.get("base_model_name_or_path")
    if not named:
        return  # nothing to compare: PEFT leaves it empty for models built in memory
    known = {base.get("hf_id"), base.get("local_path")} - {None}
    if named in known or Path(named).expanduser().resolve() == base_dir.resolve():
        return
    raise DataError(
        f"{adapter_dir}: adapter_config.json says it was trained on {named!r}, but {base_dir} holds "
        f"{describe_base(base)}: pass the base model it was trained on"
    )


# Written by a training step next to the weights it trained: hyperparameters, logs and timings.
TRAINING_LOG = "metadata.json"
# peft writes these adapter_config.json entries in the order of a Python set, which changes from process to
# process (hash randomisation): the same adapter would not be the same bytes.
_SET_VALUED = ("target_modules", "exclude_modules")


def canonicalize_adapter_config(adapter_dir: str | Path) -> None:
    """Rewrite an adapter's ``adapter_config.json`` with its set-valued entries sorted (same adapter, same bytes)."""
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text())
    for key in _SET_VALUED:
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def trained_identity(folder: str | Path) -> str:
    """Fingerprint of trained weights (an adapter or a trained encoder): its weights and configuration files only.

    Not its ``metadata.json``, which logs training times: two runs that train the same weights must give
    predictions with the same provenance, byte for byte.
    """
    folder = Path(folder)
    files = sorted(p for p in folder.glob("*") if p.suffix in (".safetensors", ".json") and p.name != TRAINING_LOG)
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def fingerprint_files(folder: str | Path, patterns: tuple[str, ...] = ("*.safetensors", "*.json")) -> str:
    """sha256 over a folder's weight and config files (names and contents), for provenance."""
    h = hashlib.sha256()
    folder = Path(folder)
    for pattern in patterns:
        for path in sorted(folder.glob(pattern)):
            h.update(path.name.encode())
            with open(path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]
