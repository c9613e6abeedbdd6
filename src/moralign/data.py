"""Scruples data: parse and validate every record of a release archive, build the task tables.

Release layout (v1.0): ``anecdotes.tar.gz`` holds ``anecdotes/{train,dev,test}.scruples-anecdotes.jsonl``,
``dilemmas.tar.gz`` holds ``dilemmas/{train,train-extra,dev,test}.scruples-dilemmas.jsonl`` (each with a
README). ``train-extra`` is not used: it is the extra training data annotated during qualification. Fetching
an archive (URL, mirror, synthetic sample) lives in :mod:`moralign.sources`; checking the archive itself (its gzip
stream and members) before a record is read, in :mod:`moralign.archives`.

Validate everything, then write: :func:`prepare` checks the gzip stream end to end, the archive's members and
every record of every split before it writes anything, and then writes all splits and ``stats.json`` into one
folder that replaces the output folder in one step. A fault anywhere leaves no split behind.

Every fault raises :class:`DataError` and says where, in the user's terms:
``<archive>:<member>:<line>: field '<field>': <reason>`` for a record, ``<archive>: <reason>`` for the
archive (the archive path as given and the member inside it; records are read straight from the tarball, no
temporary folder is ever named).

What is rejected and what is counted — decided from what the real release contains. Evidence: the release
READMEs, and the code that built them (allenai/scruples ``src/scruples/data/{post,action,label_scores}.py``,
``scripts/make/corpus.py``, ``scripts/make/resource/{proposals,dataset}.py``):

==============================================  ==================  ==============================================
Input                                           Decision            Why
==============================================  ==================  ==============================================
anecdote ``action: null``                       kept, counted       the builder writes null when no action could be
                                                (``no_action``)     extracted from the title; ``action`` column = ""
empty / blank action description                rejected            extraction drops descriptions < 10 characters or
                                                                    < 2 words (``Action`` post-filters)
empty / blank ``title``                         rejected            every real title carries the post type (AITA /
                                                                    WIBTA) the builder extracts ``post_type`` from
empty / blank ``text``                          kept, counted       the builder accepts an empty automoderator copy as
                                                (``empty_text``)    the original text (``Post.original_text``);
                                                                    the title still states the case
empty / blank ``id``                            rejected            ids are generated, never empty
identical dilemma actions (same action ``id``)  rejected            a pair is two different anecdotes' actions
dilemma actions with the same description       kept, counted       pairs are de-duplicated by anecdote id, not by
(different ids)                                 (``same_`           text: two posts can word an action alike
                                                ``description``)
``gold_label`` != argmax ``gold_annotations``   rejected            the builder sets it to the argmax; the only
                                                                    independent guard on the count orientation
``gold_label`` with tied ``gold_annotations``   accepted            a tie carries no orientation (the builder's
                                                                    ``max`` picks index 0); 5 annotators never tie
                                                                    in the release; the item is a tie (``ties``)
``label`` / ``binarized_label`` not among the   rejected            the builder writes the argmax of the same scores
top-voted labels (checked when present)                             (unique in the release: ``LabelScores.is_good``)
``binarized_label_scores`` != sums of           rejected            RIGHT = OTHER + NOBODY, WRONG = AUTHOR + EVERYBODY
``label_scores``                                                    (release README)
anecdote votes > 100,000 per post               rejected            real dev max is 3,498; above 100,000 is damage
dilemma annotators > 1,000 per pair             rejected            the release has exactly 5 (re-annotations with
                                                                    more are accepted up to 1,000)
zero votes on the task's choices                dropped, counted    design rule (``dropped_zero_votes``)
JSON ``NaN`` / ``Infinity`` anywhere            rejected            not JSON; Python's parser accepts them
a key twice in one object                       rejected            JSON keeps the last copy silently
invalid UTF-8, lone surrogate escapes           rejected            not text; Parquet cannot store them
CRLF line endings, a UTF-8 BOM, blank lines     accepted            hand-edited copies; the content is unchanged
==============================================  ==================  ==============================================
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

from moralign.archives import open_release
from moralign.errors import DataError
from moralign.io import atomic_dir, write_json, write_parquet

__all__ = [
    "ANECDOTE_LABELS",
    "ARCHIVES",
    "LABEL_COUNTS",
    "MAX_ANNOTATORS",
    "MAX_VOTES",
    "SPLITS",
    "TASKS",
    "DataError",
    "Task",
    "counts_matrix",
    "member_name",
    "prepare",
    "read_release",
    "task_table",
]

log = logging.getLogger(__name__)

RELEASE_URL = "https://storage.googleapis.com/ai2-mosaic-public/projects/scruples/v1.0/data"
ARCHIVES = ("anecdotes", "dilemmas")
SPLITS = ("train", "dev", "test")
ANECDOTE_LABELS = ("AUTHOR", "OTHER", "EVERYBODY", "NOBODY", "INFO")
POST_TYPES = ("HISTORICAL", "HYPOTHETICAL")
# Plausibility bounds on vote counts (see the table above): far above anything real, far below int64 trouble.
MAX_VOTES = 100_000
MAX_ANNOTATORS = 1_000
# The binary anecdotes table also keeps each item's five-way votes (AUTHOR, OTHER, EVERYBODY, NOBODY, INFO): the
# encoder baseline trains Scruples' five-way head on them and collapses it to (WRONG, RIGHT) (moralign.encoder_heads).
LABEL_COUNTS = "label_counts"


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
    # `action` is the release's action description ("" where the release has `action: null`).
    "anecdotes": Task("anecdotes", "anecdotes", ("WRONG", "RIGHT"), ("title", "text", "action")),
    # Scruples' own five-way task.
    "anecdotes-5way": Task("anecdotes-5way", "anecdotes", ANECDOTE_LABELS, ("title", "text", "action")),
    # Which of two actions is less ethical; counts = gold_annotations (5 annotators).
    "dilemmas": Task("dilemmas", "dilemmas", ("ACTION1", "ACTION2"), ("action1", "action2"), ("action1", "action2")),
}


def member_name(archive: str, split: str) -> str:
    """Path of a split's JSONL file inside its release archive."""
    return f"{archive}/{split}.scruples-{archive}.jsonl"


# ---------------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class _NonFinite:
    """What ``json`` makes of ``NaN``/``Infinity``: kept as a marker, so the fault can be reported with its field."""

    token: str


def _fail(where: str, field: str, reason: str) -> DataError:
    return DataError(f"{where}: field '{field}': {reason}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _find_non_finite(value: Any, path: str) -> tuple[str, str] | None:
    if isinstance(value, _NonFinite):
        return path or "(record)", value.token
    if isinstance(value, dict):
        items: Iterable[tuple[str, Any]] = ((f"{path}.{k}" if path else k, v) for k, v in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for sub, v in items:
        found = _find_non_finite(v, sub)
        if found:
            return found
    return None


def load_record(raw: bytes, where: str) -> dict[str, Any]:
    """Decode and parse one JSONL line into an object; every encoding or JSON fault names ``where``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        reason = f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})"
        raise _fail(where, "(record)", reason) from err
    repeated: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in items:
            if key in obj:
                repeated.append(key)
            obj[key] = value
        return obj

    try:
        rec = json.loads(text.removeprefix("\ufeff"), object_pairs_hook=pairs, parse_constant=_NonFinite)
    except json.JSONDecodeError as err:
        raise _fail(where, "(record)", f"not valid JSON: {err.msg} (column {err.colno})") from err
    except RecursionError as err:
        raise _fail(where, "(record)", "nested too deeply to be a Scruples record") from err
    if not isinstance(rec, dict):
        raise _fail(where, "(record)", f"expected a JSON object, got {type(rec).__name__}")
    if repeated:
        raise _fail(where, repeated[0], "appears twice in one object (JSON would keep the last copy silently)")
    found = _find_non_finite(rec, "")
    if found:
        raise _fail(where, found[0], f"non-finite number {found[1]} (not JSON, though Python's parser accepts it)")
    return rec


def _text(obj: dict[str, Any], key: str, where: str, field: str | None = None, blank_ok: bool = False) -> str:
    field = field or key
    if key not in obj:
        raise _fail(where, field, "missing")
    value = obj[key]
    if not isinstance(value, str):
        raise _fail(where, field, f"expected a string, got {_show(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise _fail(where, field, "holds a lone surrogate escape (\\ud800-\\udfff), which is not text") from err
    if not blank_ok and not value.strip():
        raise _fail(where, field, "is empty" if not value else "holds only whitespace")
    return value


def _count(obj: dict[str, Any], key: str, where: str, field: str, limit: int) -> int:
    if key not in obj:
        raise _fail(where, field, "missing")
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(where, field, f"expected a vote count (integer), got {_show(value)}")
    if value < 0:
        raise _fail(where, field, f"vote count is negative ({value})")
    if value > limit:
        raise _fail(where, field, f"vote count {value} is beyond any plausible size (limit {limit:,})")
    return value


def _total(counts: list[int], where: str, field: str, limit: int) -> None:
    if sum(counts) > limit:
        raise _fail(where, field, f"{sum(counts)} votes in all is beyond any plausible size (limit {limit:,})")


def _check_label(label: Any, names: tuple[str, ...], counts: list[int], where: str, field: str) -> None:
    """A stored majority label must be one of the top-voted labels (any of them when tied; unchecked at zero)."""
    if label is None:
        return
    if label not in names:
        raise _fail(where, field, f"expected one of {names}, got {_show(label)}")
    top = max(counts)
    if top > 0 and counts[names.index(label)] != top:
        best = [n for n, c in zip(names, counts, strict=True) if c == top]
        raise _fail(
            where,
            field,
            f"{label!r} has {counts[names.index(label)]} votes but {'/'.join(best)} has {top}: the label contradicts "
            "the vote counts (relabelled by hand, or counts in the wrong order?)",
        )


def parse_anecdote(rec: dict[str, Any], where: str) -> tuple[dict[str, Any], set[str]]:
    """Validate one anecdote record; return the fields the tasks use and the counted notes (``empty_text``...)."""
    notes: set[str] = set()
    out: dict[str, Any] = {"id": _text(rec, "id", where), "title": _text(rec, "title", where)}
    out["text"] = _text(rec, "text", where, blank_ok=True)
    if not out["text"].strip():
        notes.add("empty_text")
    if rec.get("post_type") not in POST_TYPES:
        raise _fail(where, "post_type", f"expected one of {POST_TYPES}, got {_show(rec.get('post_type'))}")
    if "action" not in rec:
        raise _fail(where, "action", "missing (the release writes null where no action was extracted)")
    action = rec["action"]
    if action is None:
        out["action"] = ""
        notes.add("no_action")
    elif isinstance(action, dict):
        out["action"] = _text(action, "description", where, "action.description")
        for key in ("pronormative_score", "contranormative_score"):
            _count(action, key, where, f"action.{key}", MAX_VOTES)
    else:
        raise _fail(where, "action", f"expected an object or null, got {_show(action)}")

    scores = rec.get("label_scores")
    if not isinstance(scores, dict) or set(scores) != set(ANECDOTE_LABELS):
        raise _fail(where, "label_scores", f"expected counts for exactly {ANECDOTE_LABELS}, got {_show(scores)}")
    counts5 = [_count(scores, k, where, f"label_scores.{k}", MAX_VOTES) for k in ANECDOTE_LABELS]
    _total(counts5, where, "label_scores", MAX_VOTES)
    binarized = rec.get("binarized_label_scores")
    if not isinstance(binarized, dict) or set(binarized) != {"RIGHT", "WRONG"}:
        raise _fail(where, "binarized_label_scores", f"expected RIGHT and WRONG counts, got {_show(binarized)}")
    wrong = _count(binarized, "WRONG", where, "binarized_label_scores.WRONG", MAX_VOTES)
    right = _count(binarized, "RIGHT", where, "binarized_label_scores.RIGHT", MAX_VOTES)
    a, o, e, n, _ = counts5
    if (wrong, right) != (a + e, o + n):
        raise _fail(
            where,
            "binarized_label_scores",
            f"WRONG={wrong}, RIGHT={right} disagree with label_scores (AUTHOR+EVERYBODY={a + e}, OTHER+NOBODY={o + n})",
        )
    _check_label(rec.get("label"), ANECDOTE_LABELS, counts5, where, "label")
    _check_label(rec.get("binarized_label"), ("WRONG", "RIGHT"), [wrong, right], where, "binarized_label")
    out["counts5"] = counts5
    out["counts2"] = [wrong, right]
    return out, notes


def parse_dilemma(rec: dict[str, Any], where: str) -> tuple[dict[str, Any], set[str]]:
    """Validate one dilemma record; return the fields the task uses and the counted notes."""
    notes: set[str] = set()
    out: dict[str, Any] = {"id": _text(rec, "id", where)}
    actions = rec.get("actions")
    if not isinstance(actions, list) or len(actions) != 2:
        raise _fail(where, "actions", f"expected a list of 2 actions, got {_show(actions)}")
    ids = []
    for k, action in enumerate(actions):
        if not isinstance(action, dict):
            raise _fail(where, f"actions[{k}]", f"expected an object with id and description, got {_show(action)}")
        ids.append(_text(action, "id", where, f"actions[{k}].id"))
        out[f"action{k + 1}"] = _text(action, "description", where, f"actions[{k}].description")
    if ids[0] == ids[1]:
        raise _fail(where, "actions[1].id", f"both actions are the same action ({ids[0]!r}): nothing to compare")
    if out["action1"].strip().casefold() == out["action2"].strip().casefold():
        notes.add("same_description")
    gold = rec.get("gold_annotations")
    # gold_annotations is a COUNT vector (annotators calling action k the less ethical one), not a list of votes.
    if not isinstance(gold, list) or len(gold) != 2:
        raise _fail(where, "gold_annotations", f"expected 2 counts, got {_show(gold)}")
    counts = [_count({"n": g}, "n", where, f"gold_annotations[{k}]", MAX_ANNOTATORS) for k, g in enumerate(gold)]
    _total(counts, where, "gold_annotations", MAX_ANNOTATORS)
    label = rec.get("gold_label")
    if isinstance(label, bool) or label not in (0, 1):
        raise _fail(where, "gold_label", f"expected 0 or 1, got {_show(label)}")
    # The release's gold_label is the argmax of gold_annotations: the one independent check that the counts are
    # in action order. A tie (impossible with the release's 5 annotators) says nothing about order: accepted.
    if counts[0] != counts[1] and label != int(np.argmax(counts)):
        raise _fail(
            where,
            "gold_label",
            f"{label} contradicts gold_annotations {counts} (action {int(np.argmax(counts))} has more votes as the "
            "less ethical one): relabelled by hand, or counts in the wrong order?",
        )
    out["counts2"] = counts
    return out, notes


NOTES = {"anecdotes": ("empty_text", "no_action"), "dilemmas": ("same_description",)}


def read_member(
    lines: Iterable[bytes], where: str, parse: Callable[[dict[str, Any], str], tuple[dict[str, Any], set[str]]]
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Parse every record of one JSONL member (``where`` = ``<archive>:<member>``); duplicate ids are an error."""
    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    notes: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        at = f"{where}:{number}"
        row, flags = parse(load_record(raw, at), at)
        if row["id"] in seen:
            raise _fail(at, "id", f"duplicate id {row['id']!r} (first on line {seen[row['id']]})")
        seen[row["id"]] = number
        rows.append(row)
        for flag in flags:
            notes[flag] = notes.get(flag, 0) + 1
    if not rows:
        raise DataError(f"{where}: no records")
    return rows, notes


def read_release(
    archive_path: str | Path, archive: str, splits: Iterable[str] = SPLITS
) -> dict[str, tuple[list[dict[str, Any]], dict[str, int]]]:
    """Check a release archive and parse every record of ``splits``; per split: the rows and the counted notes."""
    parse = parse_anecdote if archive == "anecdotes" else parse_dilemma
    out = {}
    with open_release(archive_path) as (tar, members):
        for split in splits:
            name = member_name(archive, split)
            member = members.get(name)
            if member is None:
                held = ", ".join(sorted(n for n, m in members.items() if m.isfile())[:6]) or "no files"
                raise DataError(f"{archive_path}: missing member {name} (the archive holds {held})")
            if not member.isfile():
                raise DataError(f"{archive_path}: member {name} is not a regular file")
            fh: IO[bytes] | None = tar.extractfile(member)
            assert fh is not None  # a regular file always has a reader
            with fh:
                rows, notes = read_member(fh, f"{archive_path}:{name}", parse)
            out[split] = (rows, {key: notes.get(key, 0) for key in NOTES[archive]})
    return out


# ------------------------------------------------------------------------------------------------------ tables


def task_table(task: Task, rows: list[dict[str, Any]]) -> tuple[pd.DataFrame, dict[str, int]]:
    """Build the processed table of ``task``; returns it with the counts of what was dropped and why."""
    key = "counts5" if len(task.choices) == 5 else "counts2"
    counts = np.array([r[key] for r in rows], dtype=np.int64).reshape(len(rows), len(task.choices))
    n_votes = counts.sum(axis=1)
    keep = n_votes > 0
    frame = pd.DataFrame({"id": [r["id"] for r in rows]})
    for field in task.fields:
        frame[field] = [r[field] for r in rows]
    if task.archive == "anecdotes" and key != "counts5":
        frame[LABEL_COUNTS] = list(np.array([r["counts5"] for r in rows], dtype=np.int64).reshape(len(rows), 5))
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
    """Validate ``archive_path`` whole, then write ``<out_dir>/<split>.parquet`` for every split and ``stats.json``.

    Nothing is written until every split has parsed; the splits then appear together (one folder rename), so a
    failure at any point leaves ``out_dir`` as it was.
    """
    task = TASKS[task_name]
    release = read_release(archive_path, task.archive, SPLITS)
    stats: dict[str, Any] = {"task": task.name, "choices": list(task.choices), "splits": {}}
    frames = {}
    for split, (rows, notes) in release.items():
        frame, counts = task_table(task, rows)
        stats["splits"][split] = {**counts, "items_out": len(frame), **notes}
        frames[split] = frame
        log.info("%s/%s: %s", task.name, split, stats["splits"][split])
    with atomic_dir(out_dir) as tmp:
        for split, frame in frames.items():
            write_parquet(tmp / f"{split}.parquet", frame, {"task": task.name, "choices": list(task.choices)})
        write_json(tmp / "stats.json", stats)
    return stats


def counts_matrix(frame: pd.DataFrame) -> np.ndarray:
    """The ``counts`` column as an (items, choices) int64 matrix."""
    return np.stack(frame["counts"].to_numpy()).astype(np.int64)


def evaluated_items(frame: pd.DataFrame, max_items: int | None) -> pd.DataFrame:
    """The items of a split that are evaluated: the first ``extract.max_items`` (all when it is null).

    The one rule every step that scores or references a split applies, so every row covers the same items.
    """
    return frame.head(max_items) if max_items else frame
