"""The whole input surface: every malformed input fails with DataError (or ConfigError) naming where, and
leaves nothing behind; the inputs the real release and real set-ups contain are accepted."""

import gzip
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import save_file

from moralign.config import ConfigError
from moralign.data import DataError, member_name, prepare
from moralign.inputs import check_baseline, check_predictions, check_scores
from moralign.io import write_parquet
from moralign.modelfiles import SOURCE_FILE, base_identity, check_adapter
from moralign.sample import anecdote_record, dilemma_record, write_sample_archive
from moralign.sources import fetch_base_model

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"train": 6, "dev": 4, "test": 4}


# ----------------------------------------------------------------------------------------------- input makers


def _records(archive: str, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    make = anecdote_record if archive == "anecdotes" else dilemma_record
    return [make(rng) for _ in range(n)]


def _tar(path: Path, members: dict[str, bytes], extra: Callable[[tarfile.TarFile], None] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if extra:
            extra(tar)
    return path


def _release(path: Path, archive: str, bad: Callable[[dict], dict | bytes] | None = None, split: str = "dev") -> Path:
    """A small release archive; line 2 of ``split`` is ``bad`` applied to a valid record (a dict or raw bytes)."""
    members = {}
    for k, s in enumerate(("train", "dev", "test")):
        recs = _records(archive, 3, seed=k)
        lines = [json.dumps(r).encode() for r in recs]
        if bad is not None and s == split:
            out = bad(recs[1])
            lines[1] = out if isinstance(out, bytes) else json.dumps(out).encode()
        members[member_name(archive, s)] = b"\n".join(lines) + b"\n"
    return _tar(path, members)


def _sample(path: Path, archive: str = "anecdotes") -> bytes:
    write_sample_archive(archive, path, SIZES, seed=5)
    return path.read_bytes()


def _set(path: str, value) -> Callable[[dict], dict]:
    """A mutation that sets a (dotted, [i]-indexed) field of the record."""

    def mutate(rec: dict) -> dict:
        keys = re.findall(r"[^.\[\]]+", path)
        node = rec
        for key in keys[:-1]:
            node = node[int(key)] if isinstance(node, list) else node[key]
        last = keys[-1]
        if value is _DELETE:
            del node[last]
        elif isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
        return rec

    return mutate


_DELETE = object()


def _raw(fn: Callable[[str], bytes]) -> Callable[[dict], bytes]:
    return lambda rec: fn(json.dumps(rec))


def _with_action(rec: dict) -> dict:
    rec["action"] = {"description": "reading my sister's diary", "pronormative_score": 1, "contranormative_score": 2}
    return rec


def _fake_model(folder: Path, weights=True, tokenizer=True, chat=True, config=True) -> Path:
    folder.mkdir(parents=True)
    if config:
        (folder / "config.json").write_text('{"model_type": "llama"}')
    if weights:
        save_file({"w": np.zeros((4, 4), dtype=np.float32)}, str(folder / "model.safetensors"))
    if tokenizer:
        (folder / "tokenizer.json").write_text("{}")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"} if chat else {}))
    return folder


def _base(folder: Path, hf_id: str = "org/base", revision: str = "a" * 40) -> Path:
    _fake_model(folder)
    (folder / SOURCE_FILE).write_text(json.dumps({"built": None, "hf_id": hf_id, "revision": revision}))
    return folder


def _adapter(folder: Path, weights: str | None = "a" * 40, named: str | None = None, files=("config", "weights")):
    folder.mkdir(parents=True)
    if "config" in files:
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": named}))
    if "weights" in files:
        save_file({"lora_A": np.zeros((2, 2), dtype=np.float32)}, str(folder / "adapter_model.safetensors"))
    if weights is not None:
        base = {"built": None, "hf_id": "org/base", "revision": weights, "weights": weights}
        (folder / "metadata.json").write_text(json.dumps({"base": base}))
    return folder


CHOICES = {"anecdotes": 2, "dilemmas": 2, "anecdotes-5way": 5}


def _predictions(folder: Path, data_dir: Path, dataset: str, splits=("dev", "test"), edit=None, **prov) -> Path:
    """A valid extract output for the prepared ``data_dir``; ``edit(split, frame, provenance)`` damages it."""
    provenance = {"model": "m", "dataset": dataset, "condition": "base", "base": {"weights": "w"}, "template_hash": "t"}
    provenance.update(prov)
    folder.mkdir(parents=True)
    for split in splits:
        ids = pd.read_parquet(data_dir / f"{split}.parquet")["id"].tolist()
        k = CHOICES[dataset]
        p = np.full((len(ids), k), 1.0 / k)
        frame = pd.DataFrame({"id": ids, "logp_choice": list(np.log(p)), "coverage": 0.9, "p": list(p)})
        meta = {**provenance, "split": split}
        if edit:
            frame, meta = edit(split, frame, meta)
        write_parquet(folder / f"{split}.parquet", frame, meta)
    (folder / "summary.json").write_text(json.dumps({"provenance": provenance}))
    return folder


def _scores(folder: Path, cells, refs=("anecdotes", "dilemmas"), split="test", base=None) -> Path:
    for d, m, c, seed in cells:
        path = folder / d / m / (f"{c}.json" if seed is None else f"{c}/seed-{seed}.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        prov = {"dataset": d, "model": m, "base": base or {"built": {"architecture": "llama"}, "weights": "w"}}
        score = {"provenance": prov, "condition": c, "seed": seed, "split": split, "metrics": {}}
        path.write_text(json.dumps(score))
    for d in refs:
        (folder / d).mkdir(parents=True, exist_ok=True)
        (folder / d / "references.json").write_text(json.dumps({"dataset": d, "split": split, "rows": {}}))
    return folder


RUN_CELLS = [(d, "tiny-llama", c, s) for d in ("anecdotes", "dilemmas") for c, s in (("base", None), ("soft", 0))]


# ------------------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One malformed input: ``make(tmp, ctx)`` returns (the step or check to run, its outputs, the location)."""

    id: str
    make: Callable
    reason: str
    error: type = DataError


def prepare_case(archive: str, make_archive: Callable[[Path], Path], dataset: str | None = None):
    def make(tmp, ctx):
        path = make_archive(tmp / f"{archive[0]}.tar.gz")
        out = tmp / "out"
        return (lambda: prepare(dataset or archive, path, out)), [out], str(path)

    return make


def record_case(archive: str, bad, field: str, split: str = "dev"):
    """A record fault on line 2 of ``split``: the location is archive:member:2: field '<field>'."""

    def make(tmp, ctx):
        path = _release(tmp / f"{archive[0]}.tar.gz", archive, bad, split)
        out = tmp / "out"
        where = f"{path}:{member_name(archive, split)}:2: field '{field}'"
        return (lambda: prepare(archive, path, out)), [out], where

    return make


def archive_bytes_case(damage: Callable[[bytes], bytes]):
    def build(path: Path) -> Path:
        data = _sample(path.with_name("good.tar.gz"))
        path.write_bytes(damage(data))
        return path

    return prepare_case("anecdotes", build)


def archive_members_case(edit: Callable[[dict[str, bytes]], dict[str, bytes]], extra=None):
    def build(path: Path) -> Path:
        good = path.with_name("good.tar.gz")
        _sample(good)
        with tarfile.open(good) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        return _tar(path, edit(members), extra)

    return prepare_case("anecdotes", build)


def _drop(name):
    return lambda members: {k: v for k, v in members.items() if k != name}


def _add_link(name, target, kind=tarfile.SYMTYPE):
    def extra(tar):
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, target
        tar.addfile(info)

    return extra


def fetch_case(build_source: Callable[[Path], dict], chat=True):
    """fetch_base_model on a model config made by ``build_source(tmp)``; the location is the source folder/id."""

    def make(tmp, ctx):
        cfg = {"chat_template": chat, **build_source(tmp)}
        out = tmp / "base"
        return (lambda: fetch_base_model(cfg, [], out, cache_dir=tmp / "hf-cache")), [out], cfg["hf_id"]

    return make


def local(edit=None, **model):
    def build(tmp):
        folder = _fake_model(tmp / "src-model", **model)
        if edit:
            edit(folder)
        return {"hf_id": str(folder), "revision": None}

    return build


def hub(**model):
    """A model in the (offline) Hugging Face cache; the location is hf_id@commit, never the cache or a temp folder."""

    def build(tmp):
        _fake_hub_cache(tmp / "hf-cache", "org/cached", _fake_model(tmp / "hub-src", **model), {"main": "4" * 40})
        return {"hf_id": "org/cached", "revision": None}

    return build


def check_case(run: Callable[[Path, dict], tuple[Callable, str]]):
    def make(tmp, ctx):
        action, where = run(tmp, ctx)
        return action, [], where

    return make


def _truncate(folder: Path):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-16])


def _shard_index(folder: Path):
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model.safetensors", "v": "model-00002-of-00002.safetensors"}})
    )


def adapter_case(**adapter):
    def run(tmp, ctx):
        base = _base(tmp / "base")
        folder = _adapter(tmp / "adapter", **adapter)
        return (lambda: check_adapter(folder, base)), str(folder)

    return check_case(run)


def predictions_case(where, pred_data="dilemmas", check_data="dilemmas", splits=("dev", "test"), **kw):
    """check_predictions for dilemmas on predictions made from ``pred_data`` against the ``check_data`` tables."""

    def run(tmp, ctx):
        pred = _predictions(tmp / "pred", ctx["processed"][pred_data], pred_data, **kw)
        data_dir = ctx["processed"][check_data]
        target = {"summary": pred / "summary.json", "gold": data_dir / "dev.parquet"}.get(where, pred / where)
        return (lambda: check_predictions(pred, data_dir, "dilemmas", splits, "m", "base")), str(target)

    return check_case(run)


def _edit_split(split_name, fn):
    return lambda split, frame, meta: fn(frame, meta) if split == split_name else (frame, meta)


def scores_case(cells=RUN_CELLS, where=None, model_configs=None, **kw):
    def run(tmp, ctx):
        folder = _scores(tmp / "scores", cells, **kw)
        action = lambda: check_scores([folder], RUN_CELLS, "test", model_configs)  # noqa: E731
        return action, str(folder / where) if where else str(folder)

    return check_case(run)


def baseline_case(edit_base=None, **prov):
    def run(tmp, ctx):
        data = ctx["processed"]["dilemmas"]
        tuned = _predictions(tmp / "tuned", data, "dilemmas", condition="soft")
        base = _predictions(tmp / "basepred", data, "dilemmas", edit=edit_base, **prov)
        return (lambda: check_baseline(tuned, base, ["dev", "test"])), str(base)

    return check_case(run)


def _reverse(frame, meta):
    return frame.iloc[::-1].reset_index(drop=True), meta


CASES = [
    # --- archives: the archive path, and what is wrong with it
    Case("archive-empty-file", prepare_case("anecdotes", lambda p: (p.write_bytes(b""), p)[1]), "empty file"),
    Case("archive-html-page", archive_bytes_case(lambda b: b"<html>Access denied</html>"), "not a gzip file"),
    Case("archive-truncated", archive_bytes_case(lambda b: b[: len(b) // 2]), "truncated gzip stream"),
    Case("archive-no-gzip-trailer", archive_bytes_case(lambda b: b[:-8]), "truncated gzip stream"),
    Case(
        "archive-flipped-byte",
        archive_bytes_case(lambda b: b[: len(b) // 2] + bytes([b[len(b) // 2] ^ 0xFF]) + b[len(b) // 2 + 1 :]),
        "corrupt gzip stream|truncated gzip stream",
    ),
    Case(
        "archive-gzip-not-tar", archive_bytes_case(lambda b: gzip.compress(b"just text\n" * 100)), "not a tar archive"
    ),
    Case(
        "archive-missing-member",
        archive_members_case(_drop(member_name("anecdotes", "test"))),
        "missing member anecdotes/test.scruples-anecdotes.jsonl",
    ),
    Case(
        "archive-member-escapes",
        archive_members_case(lambda m: {**m, "../evil.txt": b"x"}),
        "would be written outside the target folder",
    ),
    Case(
        "archive-link-escapes",
        archive_members_case(lambda m: m, _add_link("anecdotes/evil", "../../etc/passwd")),
        "points outside the target folder",
    ),
    Case(
        "archive-split-is-a-link",
        archive_members_case(
            _drop(member_name("anecdotes", "dev")),
            _add_link(member_name("anecdotes", "dev"), "train.scruples-anecdotes.jsonl"),
        ),
        "is not a regular file",
    ),
    Case(
        "archive-member-twice",
        archive_members_case(
            lambda m: m,
            lambda tar: tar.addfile(
                tarfile.TarInfo(member_name("anecdotes", "dev")),
                io.BytesIO(b""),
            ),
        ),
        "appears twice",
    ),
    Case(
        "archive-split-without-records",
        archive_members_case(lambda m: {**m, member_name("anecdotes", "dev"): b"\n\n"}),
        "dev.scruples-anecdotes.jsonl: no records",
    ),
    # --- records: archive:member:line: field 'x': reason
    Case(
        "record-invalid-utf8",
        record_case(
            "anecdotes",
            _raw(lambda s: s.replace('"text": "', '"text": "\udcff', 1).encode("utf-8", "surrogateescape")),
            "(record)",
        ),
        "not valid UTF-8",
    ),
    Case("record-not-json", record_case("anecdotes", lambda r: b'{"id": "x", ', "(record)"), "not valid JSON"),
    Case("record-not-object", record_case("anecdotes", lambda r: b"[1, 2]", "(record)"), "expected a JSON object"),
    Case(
        "record-nan-vote",
        record_case("anecdotes", _set("label_scores.AUTHOR", float("nan")), "label_scores.AUTHOR"),
        "non-finite number NaN",
    ),
    Case(
        "record-infinite-action-score",
        record_case(
            "anecdotes",
            lambda r: _set("action.pronormative_score", float("inf"))(_with_action(r)),
            "action.pronormative_score",
        ),
        "non-finite number Infinity",
    ),
    Case(
        "record-key-twice",
        record_case("anecdotes", _raw(lambda s: s.replace("{", '{"title": "AITA for x?", ', 1).encode()), "title"),
        "appears twice",
    ),
    Case("record-empty-title", record_case("anecdotes", _set("title", ""), "title"), "is empty"),
    Case("record-blank-title", record_case("anecdotes", _set("title", " \t\n"), "title"), "only whitespace"),
    Case(
        "record-empty-action",
        record_case("anecdotes", lambda r: _set("action.description", "  ")(_with_action(r)), "action.description"),
        "only whitespace",
    ),
    Case("record-action-not-object", record_case("anecdotes", _set("action", "diary"), "action"), "object or null"),
    Case("record-action-missing", record_case("anecdotes", _set("action", _DELETE), "action"), "missing"),
    Case("record-lone-surrogate", record_case("anecdotes", _set("text", "ok \ud800"), "text"), "lone surrogate"),
    Case(
        "record-implausible-votes",
        record_case("anecdotes", _set("label_scores.AUTHOR", 10**15), "label_scores.AUTHOR"),
        "beyond any plausible size",
    ),
    Case(
        "record-float-votes",
        record_case("anecdotes", _set("label_scores.OTHER", 3.0), "label_scores.OTHER"),
        "expected a vote count",
    ),
    Case(
        "record-label-contradicts-scores",
        record_case(
            "anecdotes",
            lambda r: {**r, "label_scores": {**r["label_scores"], "INFO": 9999}, "label": "AUTHOR"},
            "label",
        ),
        "contradicts the vote counts",
    ),
    Case("record-empty-id", record_case("anecdotes", _set("id", ""), "id"), "is empty"),
    Case("record-id-not-text", record_case("anecdotes", _set("id", 17), "id"), "expected a string"),
    Case("record-post-type", record_case("anecdotes", _set("post_type", "META"), "post_type"), "expected one of"),
    Case(
        "record-fault-in-last-split",
        record_case("anecdotes", _set("text", None), "text", split="test"),
        "expected a string",
    ),
    Case(
        "dilemma-identical-actions",
        record_case("dilemmas", lambda r: {**r, "actions": [r["actions"][0], dict(r["actions"][0])]}, "actions[1].id"),
        "same action",
    ),
    Case(
        "dilemma-empty-action",
        record_case("dilemmas", _set("actions[0].description", ""), "actions[0].description"),
        "is empty",
    ),
    Case(
        "dilemma-gold-label-contradicts",
        record_case("dilemmas", lambda r: {**r, "gold_annotations": [4, 1], "gold_label": 1}, "gold_label"),
        "contradicts gold_annotations",
    ),
    Case(
        "dilemma-implausible-annotators",
        record_case("dilemmas", _set("gold_annotations[0]", 10**9), "gold_annotations[0]"),
        "beyond any plausible size",
    ),
    Case("dilemma-bool-label", record_case("dilemmas", _set("gold_label", True), "gold_label"), "expected 0 or 1"),
    Case(
        "dilemma-nan-annotation",
        record_case("dilemmas", _set("gold_annotations[1]", float("nan")), "gold_annotations[1]"),
        "non-finite",
    ),
    # --- config and models: the folder or id, and what is missing
    Case(
        "model-folder-missing",
        fetch_case(lambda tmp: {"hf_id": str(tmp / "no-such-model"), "revision": None}),
        "model folder does not exist",
    ),
    Case("model-without-config", fetch_case(local(config=False)), "no config.json"),
    Case("model-without-weights", fetch_case(local(weights=False)), "no weights"),
    Case("model-truncated-weights", fetch_case(local(_truncate)), "truncated weights file"),
    Case("model-missing-shard", fetch_case(local(_shard_index)), "weight shards .* are missing"),
    Case("model-without-tokenizer", fetch_case(local(tokenizer=False)), "no tokenizer files"),
    Case("model-without-chat-template", fetch_case(local(chat=False)), "no chat template"),
    Case(
        "model-config-not-json",
        fetch_case(local(lambda f: (f / "config.json").write_text("{oops"))),
        "not valid JSON",
    ),
    Case(
        "model-not-in-offline-cache",
        fetch_case(lambda tmp: {"hf_id": "org/not-cached", "revision": None}),
        "not in the Hugging Face cache",
    ),
    Case("model-cached-without-tokenizer", fetch_case(hub(tokenizer=False)), "org/cached@4{40}: no tokenizer files"),
    Case("model-cached-without-weights", fetch_case(hub(weights=False)), "org/cached@4{40}: no weights"),
    Case(
        "model-local-with-revision",
        fetch_case(lambda tmp: {**local()(tmp), "revision": "main"}),
        "cannot apply",
        ConfigError,
    ),
    # --- adapters
    Case(
        "adapter-of-another-base",
        adapter_case(weights="b" * 40),
        "trained on org/base@b{40}, but .*base holds org/base@a{40}",
    ),
    Case(
        "adapter-named-for-another-base",
        adapter_case(weights=None, named="mistralai/Mistral-7B-v0.1"),
        "trained on 'mistralai/Mistral-7B-v0.1'",
    ),
    Case("adapter-without-weights", adapter_case(files=("config",)), "no adapter weights"),
    Case("adapter-without-config", adapter_case(files=("weights",)), "adapter_config.json"),
    # --- intermediate files fed to score and summarise
    Case(
        "predictions-of-another-dataset",
        predictions_case("summary", pred_data="anecdotes"),
        "made for dataset 'anecdotes', but this step expects 'dilemmas'",
    ),
    Case(
        "predictions-data-dir-of-another-dataset", predictions_case("gold", check_data="anecdotes"), "not of 'dilemmas'"
    ),
    Case(
        "predictions-of-another-item-set",
        predictions_case("test.parquet", edit=_edit_split("test", lambda f, m: (f.assign(id=f["id"] + "x"), m))),
        "not items of",
    ),
    Case(
        "predictions-duplicate-ids",
        predictions_case("dev.parquet", edit=_edit_split("dev", lambda f, m: (f.assign(id=f["id"].iloc[0]), m))),
        "predicted more than once",
    ),
    Case(
        "predictions-wrong-choice-count",
        predictions_case(
            "dev.parquet", edit=_edit_split("dev", lambda f, m: (f.assign(p=[[0.2, 0.3, 0.5]] * len(f)), m))
        ),
        "task has 2 choices",
    ),
    Case(
        "predictions-not-a-distribution",
        predictions_case(
            "dev.parquet", edit=_edit_split("dev", lambda f, m: (f.assign(p=[[np.nan, 0.5]] * len(f)), m))
        ),
        "is not a distribution",
    ),
    Case("predictions-missing-split", predictions_case("train.parquet", splits=("dev", "test", "train")), "missing"),
    Case(
        "predictions-wrong-split",
        predictions_case("dev.parquet", edit=_edit_split("dev", lambda f, m: (f, {**m, "split": "test"}))),
        "made for split 'test'",
    ),
    Case("baseline-of-another-model", baseline_case(model="other"), "model 'other' differs"),
    Case("baseline-items-in-another-order", baseline_case(edit_base=lambda s, f, m: _reverse(f, m)), "same items"),
    Case(
        "scores-of-another-run",
        scores_case(cells=[(d, "llama-3.1-8b", c, s) for d, _, c, s in RUN_CELLS]),
        "no score for 4 cell",
    ),
    Case("scores-on-another-split", scores_case(split="dev", where="anecdotes/references.json"), "eval_split"),
    Case("scores-without-references", scores_case(refs=("anecdotes",)), "no reference file"),
    Case(
        "scores-of-a-same-named-model",
        scores_case(
            where="anecdotes/tiny-llama/base.json",
            model_configs={"tiny-llama": {"build": {"architecture": "mistral"}, "chat_template": True}},
        ),
        "another run",
    ),
]


@pytest.fixture
def ctx(processed):
    return {"processed": processed}


def _tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_input_fails_with_its_location_and_leaves_nothing(case, tmp_path, ctx):
    action, outputs, where = case.make(tmp_path, ctx)
    before = _tree(tmp_path)
    with pytest.raises(case.error) as info:
        action()
    message = str(info.value)
    assert where in message, message
    assert re.search(case.reason, message), message
    assert "moralign-unpack" not in message and "\n" not in message
    for out in outputs:
        assert not out.exists(), f"{out} left behind"
    assert _tree(tmp_path) == before, "the failed step wrote files"


def test_there_are_at_least_30_cases_across_the_input_surface():
    kinds = {c.id.split("-")[0] for c in CASES}
    assert len(CASES) >= 30 and {"archive", "record", "dilemma", "model", "adapter", "predictions", "scores"} <= kinds


# ----------------------------------------------------------------------------------------------- accepted inputs


def _rewrite_members(src: Path, dest: Path, edit: Callable[[bytes], bytes]) -> Path:
    with tarfile.open(src) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    return _tar(dest, {k: edit(v) if k.endswith(".jsonl") else v for k, v in members.items()})


@pytest.mark.parametrize("archive", ["anecdotes", "dilemmas"])
def test_crlf_bom_and_blank_lines_are_accepted(tmp_path, archive):
    good = tmp_path / "good.tar.gz"
    _sample(good, archive)
    edited = _rewrite_members(
        good, tmp_path / "edited.tar.gz", lambda b: b"\xef\xbb\xbf" + b.replace(b"\n", b"\r\n\r\n")
    )
    a, b = prepare(archive, good, tmp_path / "a"), prepare(archive, edited, tmp_path / "b")
    assert a == b
    for split in ("train", "dev", "test"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "a" / f"{split}.parquet"), pd.read_parquet(tmp_path / "b" / f"{split}.parquet")
        )


def test_what_the_real_release_contains_is_accepted_and_counted(tmp_path):
    recs = _records("anecdotes", 4, seed=9)
    recs[0]["action"] = None  # real: no action could be extracted from the title
    recs[1]["text"] = ""  # real: the builder accepts an empty automoderator copy as the text
    recs[1]["action"] = {
        "description": "telling my friend the truth",
        "pronormative_score": 1,
        "contranormative_score": 0,
    }
    recs[2]["label"] = recs[2]["binarized_label"] = None  # not needed by the tasks: checked only when present
    members = {member_name("anecdotes", s): "\n".join(map(json.dumps, recs)).encode() for s in ("train", "dev", "test")}
    stats = prepare("anecdotes-5way", _tar(tmp_path / "a.tar.gz", members), tmp_path / "a")["splits"]["dev"]
    assert stats["no_action"] == 1 + sum(r["action"] is None for r in recs[2:]) and stats["empty_text"] == 1
    table = pd.read_parquet(tmp_path / "a" / "dev.parquet").set_index("id")
    assert (
        table.loc[recs[0]["id"], "action"] == "" and table.loc[recs[1]["id"], "action"] == "telling my friend the truth"
    )
    assert table.loc[recs[1]["id"], "text"] == ""

    dil = _records("dilemmas", 3, seed=9)
    dil[0]["actions"][1]["description"] = dil[0]["actions"][0]["description"].upper() + " "  # two posts, one wording
    dil[1].update(gold_annotations=[2, 2], gold_label=1)  # a tie says nothing about order: either label
    dil[2].update(human_perf_annotations=[0, 0], human_perf_label=0)  # train has no human-performance votes
    members = {member_name("dilemmas", s): "\n".join(map(json.dumps, dil)).encode() for s in ("train", "dev", "test")}
    stats = prepare("dilemmas", _tar(tmp_path / "d.tar.gz", members), tmp_path / "d")["splits"]["dev"]
    assert stats["same_description"] == 1 and stats["ties"] >= 1 and stats["items_out"] == 3


def test_a_failed_prepare_leaves_the_previous_output_as_it_was(tmp_path):
    good = tmp_path / "good.tar.gz"
    _sample(good)
    prepare("anecdotes", good, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    bad = _release(tmp_path / "bad.tar.gz", "anecdotes", _set("title", ""), split="test")
    with pytest.raises(DataError):
        prepare("anecdotes", bad, tmp_path / "out")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar.gz", "good.tar.gz", "out"]


def test_prepare_script_prints_one_line_and_writes_no_split(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _release(raw / "anecdotes.tar.gz", "anecdotes", _set("text", "\ud800"), split="dev")
    out, log = tmp_path / "processed" / "anecdotes", tmp_path / "prepare.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    archive = raw / "anecdotes.tar.gz"
    args = ["--config", ROOT / "config/demo.yaml", "--dataset", "anecdotes", "--archive", archive, "--out-dir", out]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "workflow/scripts/prepare.py"), *map(str, [*args, "--log", log])],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(
        f"prepare: error: {raw / 'anecdotes.tar.gz'}:anecdotes/dev.scruples-anecdotes.jsonl:2: field 'text': "
    )
    assert "Traceback" not in proc.stderr and "Traceback" in log.read_text()
    assert not out.exists() and not list(tmp_path.rglob("*.parquet"))


def test_data_does_not_import_the_sample_generator():
    code = "import sys, moralign.data; assert 'moralign.sample' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# ------------------------------------------------------------------------------------------------ model sources


def test_local_model_folder_is_linked_with_path_and_fingerprint(tiny_models, tmp_path):
    from moralign.modelfiles import fingerprint_files

    src = tiny_models["llama"]
    source = fetch_base_model({"hf_id": str(src), "revision": None, "chat_template": True}, [], tmp_path / "base")
    assert source["local_path"] == str(src.resolve()) and source["fingerprint"] == fingerprint_files(src)
    assert base_identity(tmp_path / "base")["weights"] == source["fingerprint"]
    # hard-linked, not copied, on the same file system
    assert (tmp_path / "base/model.safetensors").stat().st_ino == (src / "model.safetensors").stat().st_ino
    assert json.loads((tmp_path / "base" / SOURCE_FILE).read_text()) == source


def _fake_hub_cache(cache: Path, repo: str, model: Path, refs: dict[str, str]) -> None:
    """The Hugging Face cache layout: blobs/<hash>, snapshots/<commit>/<file> -> ../../blobs/<hash>, refs/<name>."""
    import hashlib

    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    for commit in set(refs.values()):
        for file in model.iterdir():
            data = file.read_bytes()
            blob = root / "blobs" / hashlib.sha256(data).hexdigest()
            blob.write_bytes(data)
            link = root / "snapshots" / commit / file.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    for name, commit in refs.items():
        (root / "refs" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "refs" / name).write_text(commit)


def test_hub_model_is_fetched_offline_from_the_cache_and_pinned_to_its_commit(tiny_models, tmp_path):
    cache, old, new = tmp_path / "hub", "1" * 40, "2" * 40
    _fake_hub_cache(cache, "org/tiny", tiny_models["llama"], {"main": new, "v1.0": old})
    for revision, commit in ((None, new), ("v1.0", old), (old, old)):
        out = tmp_path / f"base-{revision}"
        cfg = {"hf_id": "org/tiny", "revision": revision, "chat_template": True}
        source = fetch_base_model(cfg, [], out, cache_dir=cache)
        assert source == {"built": None, "hf_id": "org/tiny", "revision": commit, "requested_revision": revision}
        assert base_identity(out)["weights"] == commit
        assert not (out / "model.safetensors").is_symlink()
        assert (out / "model.safetensors").read_bytes() == (tiny_models["llama"] / "model.safetensors").read_bytes()


def test_offline_fetch_through_the_environment_like_a_compute_node(tiny_models, tmp_path):
    cache, commit = tmp_path / "hf" / "hub", "3" * 40
    _fake_hub_cache(cache, "org/tiny", tiny_models["llama"], {"main": commit})
    code = (
        "import sys; from moralign.sources import fetch_base_model; "
        "print(fetch_base_model({'hf_id': 'org/tiny', 'revision': None, 'chat_template': True}, [], sys.argv[1]))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "base")], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "base" / SOURCE_FILE).read_text())["revision"] == commit


def test_built_model_keeps_its_identity(raw_dir, tmp_path):
    from moralign.modelfiles import fingerprint_files
    from tests.conftest import TINY

    spec = TINY["llama"]
    source = fetch_base_model({"build": spec, "chat_template": True}, [raw_dir / "anecdotes.tar.gz"], tmp_path / "b")
    assert source == {"built": spec, "hf_id": None, "revision": None}
    # as before the move out of steps.py: a built model is identified by the hash of its files
    assert base_identity(tmp_path / "b")["weights"] == fingerprint_files(tmp_path / "b")


# ----------------------------------------------------------------------------------------- accepted intermediates


def test_matching_adapter_predictions_and_scores_pass(tmp_path, processed):
    base = _base(tmp_path / "base", hf_id="org/base", revision="a" * 40)
    check_adapter(_adapter(tmp_path / "ours", weights="a" * 40), base)
    check_adapter(_adapter(tmp_path / "hub-adapter", weights=None, named="org/base"), base)
    check_adapter(_adapter(tmp_path / "by-path", weights=None, named=str(base)), base)

    data = processed["dilemmas"]
    head = lambda split, frame, meta: (frame.head(5), meta)  # noqa: E731  (extract.max_items: a prefix)
    pred = _predictions(tmp_path / "pred", data, "dilemmas", edit=head)
    check_predictions(pred, data, "dilemmas", ["dev", "test"], "m", "base")
    tuned = _predictions(tmp_path / "tuned", data, "dilemmas", edit=head, condition="soft")
    check_predictions(tuned, data, "dilemmas", ["dev", "test"], "m", "soft")
    check_baseline(tuned, pred, ["dev", "test"])

    # cells outside the run (an old model) are ignored, as the summary ignores them
    scores = _scores(tmp_path / "scores", [*RUN_CELLS, ("dilemmas", "old-model", "base", None)])
    cfg = {"tiny-llama": {"build": {"architecture": "llama"}, "chat_template": True}}
    check_scores([scores], RUN_CELLS, "test", cfg)
    files = sorted(scores.rglob("*.json"))
    check_scores(files, RUN_CELLS, "test")


def test_a_config_error_is_one_line_too(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text((ROOT / "config/demo.yaml").read_text() + "\nextrac: {}\n")
    args = [
        "--config",
        config,
        "--dataset",
        "anecdotes",
        "--archive",
        tmp_path / "anecdotes.tar.gz",
        "--out-dir",
        tmp_path / "out",
    ]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "workflow/scripts/prepare.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "extrac" in lines[0] and "Traceback" not in proc.stderr, lines


def test_trained_identity_is_its_weights_and_config_not_its_training_log(tmp_path):
    from moralign.modelfiles import canonicalize_adapter_config, trained_identity

    folder = _adapter(tmp_path / "a", weights="a" * 40)
    first = trained_identity(folder)
    (folder / "metadata.json").write_text(json.dumps({"wall_seconds": 12.5}))  # another run's timings
    assert trained_identity(folder) == first
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["v_proj", "q_proj"]}))
    changed = trained_identity(folder)
    assert changed != first
    # peft writes target_modules in a set's order, which differs between processes: one canonical order
    canonicalize_adapter_config(folder)
    again = trained_identity(folder)
    (folder / "adapter_config.json").write_text(json.dumps({"target_modules": ["q_proj", "v_proj"], "r": 8}))
    canonicalize_adapter_config(folder)
    assert trained_identity(folder) == again


def test_a_tuned_cell_is_compared_with_the_base_it_was_trained_on(tmp_path, processed):
    """A QLoRA cell (scored on the 4-bit base) is paired with base-4bit, never with the bf16 base."""
    data = processed["dilemmas"]
    bf16 = _predictions(tmp_path / "base", data, "dilemmas", quantization="none", dtype="bfloat16")
    nf4 = _predictions(tmp_path / "base-4bit", data, "dilemmas", condition="base-4bit", quantization="4bit")
    tuned = _predictions(tmp_path / "soft", data, "dilemmas", condition="soft", quantization="4bit")
    check_baseline(tuned, nf4, ["dev", "test"])
    with pytest.raises(DataError, match=r"base: quantization 'none' differs from .*soft's '4bit'"):
        check_baseline(tuned, bf16, ["dev", "test"])


def test_an_adapter_is_scored_on_the_base_weights_it_was_trained_on(tmp_path):
    from moralign.predictors.hf import base_quantization

    adapter = _adapter(tmp_path / "adapter")
    meta = json.loads((adapter / "metadata.json").read_text())
    (adapter / "metadata.json").write_text(json.dumps({**meta, "hyperparameters": {"quantization": "4bit"}}))
    extract = {"quantization": "none"}
    assert base_quantization(extract, "soft", adapter) == "4bit"  # whatever extract.quantization says
    assert base_quantization(extract, "base-4bit", None) == "4bit"
    assert base_quantization(extract, "base", None) == "none"
    with pytest.raises(DataError, match="no training log"):
        base_quantization(extract, "soft", _adapter(tmp_path / "foreign", weights=None))
