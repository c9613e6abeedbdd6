"""Scruples data: fetch the release, unpack it safely, parse and validate it, build the task tables.

Release layout (v1.0): ``anecdotes.tar.gz`` holds ``anecdotes/{train,dev,test}.scruples-anecdotes.jsonl``,
``dilemmas.tar.gz`` holds ``dilemmas/{train,train-extra,dev,test}.scruples-dilemmas.jsonl`` (each with a
README). ``train-extra`` is not used: it is the extra unannotated-by-gold training data of the release.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import shutil
import tarfile
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moralign.io import atomic_path, write_json, write_parquet

log = logging.getLogger(__name__)

RELEASE_URL = "https://storage.googleapis.com/ai2-mosaic-public/projects/scruples/v1.0/data"
ARCHIVES = ("anecdotes", "dilemmas")
SPLITS = ("train", "dev", "test")
ANECDOTE_LABELS = ("AUTHOR", "OTHER", "EVERYBODY", "NOBODY", "INFO")
POST_TYPES = ("HISTORICAL", "HYPOTHETICAL")


@dataclass(frozen=True)
class Task:
    """A dataset of the DAG: which archive it comes from, its choices (fixed order) and its text fields."""

    name: str
    archive: str
    choices: tuple[str, ...]
    fields: tuple[str, ...]
    # The text fields that present the choices in order, when the prompt shows them (swappable for debiasing).
    option_fields: tuple[str, str] | None = None


TASKS: dict[str, Task] = {
    # Binary, as in the paper: WRONG = AUTHOR + EVERYBODY, RIGHT = OTHER + NOBODY (INFO dropped).
    "anecdotes": Task("anecdotes", "anecdotes", ("WRONG", "RIGHT"), ("title", "text")),
    # Scruples' own five-way task.
    "anecdotes-5way": Task("anecdotes-5way", "anecdotes", ANECDOTE_LABELS, ("title", "text")),
    # Which of two actions is less ethical; counts = gold_annotations (5 annotators).
    "dilemmas": Task("dilemmas", "dilemmas", ("ACTION1", "ACTION2"), ("action1", "action2"), ("action1", "action2")),
}


class DataError(ValueError):
    """Malformed input; the message names the file, line, field and reason."""


def member_name(archive: str, split: str) -> str:
    """Path of a split's JSONL file inside its release archive."""
    return f"{archive}/{split}.scruples-{archive}.jsonl"


# --------------------------------------------------------------------------------------------------- fetching


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def reproducible_tar(dest: str | Path) -> Iterator[tarfile.TarFile]:
    """A ``.tar.gz`` writer whose bytes depend only on what is added (no gzip time stamp or file name)."""
    with open(dest, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            yield tar


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
            from moralign.sample import write_sample_archive

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


def safe_extract(archive_path: str | Path, dest: str | Path) -> None:
    """Unpack a tarball, rejecting members that would land outside ``dest`` (absolute paths, ``..``, links)."""
    dest = Path(dest).resolve()
    with tarfile.open(archive_path) as tar:
        for member in tar.getmembers():
            target = (dest / member.name).resolve()
            if member.name.startswith("/") or not target.is_relative_to(dest):
                raise DataError(f"{archive_path}: member {member.name!r} would be written outside the target folder")
            if member.issym() or member.islnk():
                link = (target.parent / member.linkname) if member.issym() else (dest / member.linkname)
                if member.linkname.startswith("/") or not link.resolve().is_relative_to(dest):
                    raise DataError(
                        f"{archive_path}: link {member.name!r} -> {member.linkname!r} points outside the target folder"
                    )
            if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
                raise DataError(f"{archive_path}: member {member.name!r} is not a regular file or folder")
        # The 'data' filter re-checks all of the above in the standard library (Python >= 3.11.4).
        tar.extractall(dest, filter="data")


# ---------------------------------------------------------------------------------------------------- parsing


def _fail(path: Path, line: int, field: str, reason: str) -> DataError:
    return DataError(f"{path}:{line}: field '{field}': {reason}")


def _count(rec: dict[str, Any], key: str, path: Path, line: int) -> int:
    value = rec.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(path, line, key, f"expected a vote count (integer), got {value!r}")
    if value < 0:
        raise _fail(path, line, key, f"vote count is negative ({value})")
    return value


def _text(rec: dict[str, Any], key: str, path: Path, line: int, where: str | None = None) -> str:
    value = rec.get(key)
    if not isinstance(value, str):
        raise _fail(path, line, where or key, f"expected a string, got {value!r}")
    return value


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record); blank lines are skipped, anything else must be a JSON object."""
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise _fail(path, number, "(record)", f"not valid JSON: {err.msg}") from err
            if not isinstance(rec, dict):
                raise _fail(path, number, "(record)", "expected a JSON object")
            yield number, rec


def parse_anecdote(rec: dict[str, Any], path: Path, line: int) -> dict[str, Any]:
    """Validate one anecdote record and return the fields the tasks use."""
    out: dict[str, Any] = {"id": _text(rec, "id", path, line)}
    out["title"] = _text(rec, "title", path, line)
    out["text"] = _text(rec, "text", path, line)
    if rec.get("post_type") not in POST_TYPES:
        raise _fail(path, line, "post_type", f"expected one of {POST_TYPES}, got {rec.get('post_type')!r}")
    scores = rec.get("label_scores")
    if not isinstance(scores, dict) or set(scores) != set(ANECDOTE_LABELS):
        raise _fail(path, line, "label_scores", f"expected counts for exactly {ANECDOTE_LABELS}, got {scores!r}")
    counts5 = [_count(scores, k, path, line) for k in ANECDOTE_LABELS]
    binarized = rec.get("binarized_label_scores")
    if not isinstance(binarized, dict) or set(binarized) != {"RIGHT", "WRONG"}:
        raise _fail(path, line, "binarized_label_scores", f"expected RIGHT and WRONG counts, got {binarized!r}")
    wrong, right = _count(binarized, "WRONG", path, line), _count(binarized, "RIGHT", path, line)
    a, o, e, n, _ = counts5
    if (wrong, right) != (a + e, o + n):
        raise _fail(
            path,
            line,
            "binarized_label_scores",
            f"WRONG={wrong}, RIGHT={right} disagree with label_scores (AUTHOR+EVERYBODY={a + e}, OTHER+NOBODY={o + n})",
        )
    out["counts5"] = counts5
    out["counts2"] = [wrong, right]
    return out


def parse_dilemma(rec: dict[str, Any], path: Path, line: int) -> dict[str, Any]:
    """Validate one dilemma record and return the fields the task uses."""
    out: dict[str, Any] = {"id": _text(rec, "id", path, line)}
    actions = rec.get("actions")
    if not isinstance(actions, list) or len(actions) != 2:
        raise _fail(path, line, "actions", f"expected a list of 2 actions, got {actions!r}")
    for k, action in enumerate(actions):
        if not isinstance(action, dict):
            raise _fail(path, line, f"actions[{k}]", "expected an object with id and description")
        out[f"action{k + 1}"] = _text(action, "description", path, line, where=f"actions[{k}].description")
    gold = rec.get("gold_annotations")
    # gold_annotations is a COUNT vector (annotators calling action k the less ethical one), not a list of votes.
    if not isinstance(gold, list) or len(gold) != 2:
        raise _fail(path, line, "gold_annotations", f"expected 2 counts, got {gold!r}")
    out["counts2"] = [_count({"gold_annotations": g}, "gold_annotations", path, line) for g in gold]
    label = rec.get("gold_label")
    if label not in (0, 1):
        raise _fail(path, line, "gold_label", f"expected 0 or 1, got {label!r}")
    return out


def read_split(folder: Path, archive: str, split: str) -> list[dict[str, Any]]:
    """Parse and validate every record of one split; duplicate ids are an error."""
    path = folder / member_name(archive, split)
    if not path.is_file():
        raise DataError(f"{path}: missing from the release archive")
    parse = parse_anecdote if archive == "anecdotes" else parse_dilemma
    rows, seen = [], {}
    for line, rec in iter_jsonl(path):
        row = parse(rec, path, line)
        if row["id"] in seen:
            raise _fail(path, line, "id", f"duplicate id {row['id']!r} (first on line {seen[row['id']]})")
        seen[row["id"]] = line
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no records")
    return rows


def task_table(task: Task, rows: list[dict[str, Any]]) -> tuple[pd.DataFrame, dict[str, int]]:
    """Build the processed table of ``task``; returns it with the counts of what was dropped and why."""
    key = "counts5" if len(task.choices) == 5 else "counts2"
    counts = np.array([r[key] for r in rows], dtype=np.int64).reshape(len(rows), len(task.choices))
    n_votes = counts.sum(axis=1)
    keep = n_votes > 0
    frame = pd.DataFrame({"id": [r["id"] for r in rows]})
    for field in task.fields:
        frame[field] = [r[field] for r in rows]
    frame = frame[keep].reset_index(drop=True)
    counts, n_votes = counts[keep], n_votes[keep]
    top = counts.max(axis=1, keepdims=True)
    tie = (counts == top).sum(axis=1) > 1
    frame["counts"] = list(counts)
    frame["n_votes"] = n_votes
    frame["human_probs"] = list(counts / n_votes[:, None])
    # Ties are recorded (majority = -1, tie = True), never broken silently: label metrics exclude them.
    frame["majority"] = np.where(tie, -1, counts.argmax(axis=1))
    frame["tie"] = tie
    return frame, {"items_in": len(rows), "dropped_zero_votes": int((~keep).sum()), "ties": int(tie.sum())}


def prepare(task_name: str, archive_path: str | Path, out_dir: str | Path) -> dict:
    """Unpack ``archive_path`` and write ``<out_dir>/<split>.parquet`` for every split plus ``stats.json``."""
    task = TASKS[task_name]
    out_dir = Path(out_dir)
    stats: dict[str, Any] = {"task": task.name, "choices": list(task.choices), "splits": {}}
    with tempfile.TemporaryDirectory(prefix="moralign-unpack-") as tmp:
        safe_extract(archive_path, tmp)
        for split in SPLITS:
            rows = read_split(Path(tmp), task.archive, split)
            frame, counts = task_table(task, rows)
            counts["items_out"] = len(frame)
            stats["splits"][split] = counts
            if counts["dropped_zero_votes"]:
                log.info(
                    "%s/%s: dropped %d items with no votes on the task's choices",
                    task.name,
                    split,
                    counts["dropped_zero_votes"],
                )
            write_parquet(out_dir / f"{split}.parquet", frame, {"task": task.name, "choices": list(task.choices)})
    write_json(out_dir / "stats.json", stats)
    return stats


def counts_matrix(frame: pd.DataFrame) -> np.ndarray:
    """The ``counts`` column as an (items, choices) int64 matrix."""
    return np.stack(frame["counts"].to_numpy()).astype(np.int64)
