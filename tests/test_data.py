import io
import json
import tarfile

import numpy as np
import pandas as pd
import pytest

from moralign.archives import safe_extract, sha256_file
from moralign.data import (
    ANECDOTE_LABELS,
    DataError,
    member_name,
    prepare,
)
from moralign.sample import anecdote_record, dilemma_record, write_sample_archive
from moralign.sources import fetch_archive

SIZES = {"train": 30, "dev": 10, "test": 10}
ANECDOTE_FIELDS = {
    "id",
    "post_id",
    "action",
    "title",
    "text",
    "post_type",
    "label_scores",
    "label",
    "binarized_label_scores",
    "binarized_label",
}
DILEMMA_FIELDS = {
    "id",
    "actions",
    "gold_annotations",
    "gold_label",
    "human_perf_annotations",
    "human_perf_label",
    "controversial",
}


def test_sample_is_deterministic_and_in_release_layout(tmp_path):
    for archive in ("anecdotes", "dilemmas"):
        a, b = tmp_path / f"a-{archive}.tar.gz", tmp_path / f"b-{archive}.tar.gz"
        write_sample_archive(archive, a, SIZES, seed=7)
        write_sample_archive(archive, b, SIZES, seed=7)
        assert sha256_file(a) == sha256_file(b)
        with tarfile.open(a) as tar:
            names = set(tar.getnames())
            for split in SIZES:
                assert member_name(archive, split) in names
            assert f"{archive}/README" in names
            rec = json.loads(tar.extractfile(member_name(archive, "dev")).readline())
        assert set(rec) == (ANECDOTE_FIELDS if archive == "anecdotes" else DILEMMA_FIELDS)
    write_sample_archive("anecdotes", tmp_path / "c.tar.gz", SIZES, seed=8)
    assert sha256_file(tmp_path / "c.tar.gz") != sha256_file(tmp_path / "a-anecdotes.tar.gz")


def test_sample_votes_are_heavy_tailed_and_follow_the_text():
    rng = np.random.default_rng(0)
    recs = [anecdote_record(rng) for _ in range(3000)]
    totals = np.array([sum(r["label_scores"].values()) for r in recs])
    assert 5 <= np.median(totals) <= 12 and totals.max() > 200 and totals.mean() > 1.5 * np.median(totals)

    # the planted signal: the worst actions get far more WRONG votes than the most benign ones
    def wrong_share(phrase):
        w = [r["binarized_label_scores"]["WRONG"] for r in recs if phrase in r["text"]]
        n = [sum(r["binarized_label_scores"].values()) for r in recs if phrase in r["text"]]
        return sum(w) / sum(n)

    assert wrong_share("reading my sister's diary") > 0.75 > 0.25 > wrong_share("moving out of my parents' house")
    dilemmas = [dilemma_record(rng) for _ in range(200)]
    assert all(sum(d["gold_annotations"]) == 5 for d in dilemmas)


def test_prepare_builds_task_tables(processed):
    dev = pd.read_parquet(processed["anecdotes"] / "dev.parquet")
    counts = np.stack(dev["counts"].to_numpy())
    assert counts.shape[1] == 2 and (counts.sum(1) == dev["n_votes"]).all() and (dev["n_votes"] > 0).all()
    assert np.allclose(np.stack(dev["human_probs"].to_numpy()), counts / counts.sum(1, keepdims=True))
    assert ((dev["majority"] == -1) == dev["tie"]).all()
    five = pd.read_parquet(processed["anecdotes-5way"] / "dev.parquet")
    assert np.stack(five["counts"].to_numpy()).shape[1] == len(ANECDOTE_LABELS)
    dil = pd.read_parquet(processed["dilemmas"] / "dev.parquet")
    assert (np.stack(dil["counts"].to_numpy()).sum(1) == 5).all()
    assert {"action1", "action2"} <= set(dil.columns)
    # the anecdote's action description is kept; "" where the release has `action: null` (counted)
    stats = json.loads((processed["anecdotes-5way"] / "stats.json").read_text())["splits"]["dev"]
    assert stats["items_out"] == stats["items_in"] and stats["no_action"] == (five["action"] == "").sum() > 0
    assert (five["action"] != "").sum() > 0 and five["action"].map(lambda a: isinstance(a, str)).all()


def _archive(path, archive, lines, split="dev"):
    """An archive whose ``split`` file holds ``lines``; the other splits hold one valid record."""
    rng = np.random.default_rng(0)
    make = anecdote_record if archive == "anecdotes" else dilemma_record
    with tarfile.open(path, "w:gz") as tar:
        for s in ("train", "dev", "test"):
            body = "\n".join(lines) if s == split else json.dumps(make(rng))
            data = body.encode()
            info = tarfile.TarInfo(member_name(archive, s))
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_zero_vote_items_are_dropped_and_counted(tmp_path):
    rng = np.random.default_rng(1)
    rec = anecdote_record(rng)
    only_info = dict(
        rec,
        id="info-only",
        label_scores={k: 0 for k in ANECDOTE_LABELS} | {"INFO": 3},
        label="INFO",
        binarized_label_scores={"RIGHT": 0, "WRONG": 0},
    )
    path = _archive(tmp_path / "a.tar.gz", "anecdotes", [json.dumps(rec), json.dumps(only_info)])
    stats = prepare("anecdotes", path, tmp_path / "out")
    assert stats["splits"]["dev"] == {
        "items_in": 2,
        "dropped_zero_votes": 1,
        "ties": stats["splits"]["dev"]["ties"],
        "items_out": 1,
        "empty_text": 0,
        "no_action": int(rec["action"] is None) + int(only_info["action"] is None),
    }
    # the five-way task keeps it (INFO is one of its choices)
    assert prepare("anecdotes-5way", path, tmp_path / "out5")["splits"]["dev"]["dropped_zero_votes"] == 0


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.update(binarized_label_scores={"RIGHT": 999, "WRONG": 0}), "binarized_label_scores"),
        (lambda r: r["label_scores"].update(AUTHOR=-1), "AUTHOR"),
        (lambda r: r.update(post_type="RANT"), "post_type"),
        (lambda r: r.pop("title"), "title"),
        (lambda r: r["label_scores"].update(AUTHOR="3"), "AUTHOR"),
    ],
)
def test_malformed_anecdotes_name_file_line_and_field(tmp_path, mutate, field):
    rng = np.random.default_rng(2)
    good, bad = anecdote_record(rng), anecdote_record(rng)
    mutate(bad)
    path = _archive(tmp_path / "a.tar.gz", "anecdotes", [json.dumps(good), json.dumps(bad)])
    with pytest.raises(DataError, match=rf"a\.tar\.gz:anecdotes/dev\.scruples-anecdotes\.jsonl:2: field '[^']*{field}"):
        prepare("anecdotes", path, tmp_path / "out")
    # validate everything, then write: the valid train split before the bad dev split is not written either
    assert not (tmp_path / "out").exists()


def test_malformed_dilemmas_and_json(tmp_path):
    rng = np.random.default_rng(3)
    bad = dilemma_record(rng)
    bad["gold_annotations"] = [1, 2, 2]
    path = _archive(tmp_path / "d.tar.gz", "dilemmas", [json.dumps(dilemma_record(rng)), "", json.dumps(bad)])
    with pytest.raises(DataError, match=r"dev\.scruples-dilemmas\.jsonl:3: field 'gold_annotations'"):
        prepare("dilemmas", path, tmp_path / "out")
    path = _archive(tmp_path / "j.tar.gz", "dilemmas", ["{not json"])
    with pytest.raises(DataError, match=r":1: field '\(record\)': not valid JSON"):
        prepare("dilemmas", path, tmp_path / "out")
    dup = dilemma_record(rng)
    path = _archive(tmp_path / "dup.tar.gz", "dilemmas", [json.dumps(dup), json.dumps(dup)])
    with pytest.raises(DataError, match=r":2: field 'id': duplicate id .* \(first on line 1\)"):
        prepare("dilemmas", path, tmp_path / "out")


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink"])
def test_safe_extract_rejects_escaping_members(tmp_path, kind):
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo({"dotdot": "../evil.txt", "absolute": "/tmp/evil.txt"}.get(kind, "anecdotes/link"))
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "../../etc/passwd"
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "/etc/passwd"
        else:
            info.size = 4
        tar.addfile(info, io.BytesIO(b"evil") if info.size else None)
    with pytest.raises(DataError, match="outside the target folder"):
        safe_extract(path, tmp_path / "dest")
    assert not (tmp_path / "evil.txt").exists()


def test_fetch_from_mirror_directory_tarball_and_sha(tmp_path, raw_dir):
    # a mirror holding the tarball
    digest = fetch_archive(str(raw_dir), "dilemmas", tmp_path / "d.tar.gz")
    assert digest == sha256_file(raw_dir / "dilemmas.tar.gz")
    assert (tmp_path / "d.tar.gz.sha256").read_text().split()[0] == digest
    # a mirror holding the unpacked folder
    unpacked = tmp_path / "mirror"
    safe_extract(raw_dir / "anecdotes.tar.gz", unpacked)
    fetch_archive(str(unpacked), "anecdotes", tmp_path / "a.tar.gz")
    stats = prepare("anecdotes", tmp_path / "a.tar.gz", tmp_path / "out")
    assert stats["splits"]["dev"]["items_in"] == 60
    # a pinned sha256 that does not match stops, and leaves nothing behind
    with pytest.raises(DataError, match="does not match the pinned"):
        fetch_archive(str(raw_dir), "dilemmas", tmp_path / "x.tar.gz", expected_sha256="0" * 64)
    assert not (tmp_path / "x.tar.gz").exists()
    with pytest.raises(DataError, match="neither"):
        fetch_archive(str(tmp_path / "nowhere"), "dilemmas", tmp_path / "y.tar.gz")
