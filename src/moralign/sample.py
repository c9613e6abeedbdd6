"""A seeded synthetic Scruples sample in the exact release format, with learnable signal.

The demo and the tests cannot download Scruples, so this module writes ``anecdotes.tar.gz`` and
``dilemmas.tar.gz`` with the release's layout, file names and record fields, and the same unpack/parse code
runs on them. All text is written here from small phrase lists.

How the human votes depend on the text (the planted signal a fine-tuned model can learn and a random one
cannot):

* Every action phrase has a fixed *wrongness* w (listed below, from -2.5 to +2.5). An anecdote's wrongness is
  the action's w plus +1.2 if an aggravating clause is present, -1.2 if a mitigating clause is present.
  P(author in the wrong) = sigmoid(wrongness).
* Five-way labels: of the "wrong" mass, a share of 0.25 goes to EVERYBODY (0.6 when the story says the other
  person was also rude); of the "right" mass a share of 0.15 goes to NOBODY (0.6 when the story says it was a
  misunderstanding); INFO gets 0.03 (0.35 when the story says details are missing).
* Annotators disagree: each item's vote distribution is drawn from a Dirichlet centred on those shares with
  concentration 12, so even a perfect model cannot predict the votes exactly (like the real data).
* Vote totals are heavy-tailed like the real dev split: 1 + floor(lognormal(ln 7, 1.25)), capped at 3,500
  (median about 8, mean about 18, a long tail of posts with hundreds of votes).
* Dilemmas: P(action 1 judged less ethical) = sigmoid(1.5 (w1 - w2)); exactly 5 gold annotators.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from moralign.archives import reproducible_tar
from moralign.data import ANECDOTE_LABELS, member_name

# (phrase, wrongness): positive = the narrator is in the wrong.
ACTIONS: tuple[tuple[str, float], ...] = (
    ("reading my sister's diary", 2.5),
    ("taking money from my roommate's wallet", 2.5),
    ("lying to my boss about being sick", 1.5),
    ("skipping my best friend's wedding", 1.5),
    ("yelling at a waiter over cold soup", 2.0),
    ("selling my brother's guitar", 2.0),
    ("eating my coworker's lunch", 1.0),
    ("forgetting my mom's birthday", 0.5),
    ("not inviting my cousin to dinner", 0.5),
    ("asking my neighbor to move his car", -0.5),
    ("leaving a party early", -1.0),
    ("refusing to lend my car", -1.0),
    ("keeping the last slice of pizza", 0.0),
    ("telling my friend the truth about her haircut", -1.5),
    ("not paying for my sister's phone", -2.0),
    ("asking my roommate to clean the kitchen", -2.0),
    ("saying no to extra work on weekends", -2.5),
    ("returning a gift I did not like", -0.5),
    ("moving out of my parents' house", -2.5),
    ("wanting a quiet birthday", -2.0),
)
AGGRAVATE = "I also laughed at them when they got upset."
MITIGATE = "I apologized right away and tried to make it right."
ALSO_RUDE = "To be fair, they were rude to me first."
MISUNDERSTAND = "Looking back, it was all a misunderstanding."
MISSING = "I cannot share more details here."
OPENERS = (
    "So this happened last week.",
    "Throwaway account for obvious reasons.",
    "Long time reader, first post.",
    "This has been bugging me for days.",
    "Some background first.",
)
FILLERS = (
    "We have known each other for years.",
    "Everyone at home has an opinion about it.",
    "It was a busy day and we were all tired.",
    "My partner thinks I should just let it go.",
    "Now nobody is talking to me.",
    "It started a big argument in the group chat.",
)
RELEASE_README = "Synthetic sample written by moralign in the Scruples v1.0 release layout. Not real data.\n"


def _sigmoid(x: np.ndarray | float) -> np.ndarray | float:
    return 1.0 / (1.0 + np.exp(-x))


def _ident(rng: np.random.Generator, n: int = 20) -> str:
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789"))
    return "".join(rng.choice(alphabet, size=n))


def vote_total(rng: np.random.Generator) -> int:
    """A heavy-tailed number of votes (median ~8, long tail), like Scruples' anecdotes."""
    return int(min(3500, 1 + np.floor(rng.lognormal(np.log(7.0), 1.25))))


def anecdote_record(rng: np.random.Generator) -> dict[str, Any]:
    """One anecdote in the release's record format."""
    phrase, w = ACTIONS[rng.integers(len(ACTIONS))]
    clauses, wrongness = [], w
    modifier = rng.random()
    if modifier < 0.25:
        clauses.append(AGGRAVATE)
        wrongness += 1.2
    elif modifier < 0.5:
        clauses.append(MITIGATE)
        wrongness -= 1.2
    also_rude, misunderstanding, missing = rng.random(3) < (0.25, 0.2, 0.1)
    clauses += [c for c, on in ((ALSO_RUDE, also_rude), (MISUNDERSTAND, misunderstanding), (MISSING, missing)) if on]
    p_wrong = float(_sigmoid(wrongness))
    e, n, info = (0.6 if also_rude else 0.25), (0.6 if misunderstanding else 0.15), (0.35 if missing else 0.03)
    mean = np.array([p_wrong * (1 - e), (1 - p_wrong) * (1 - n), p_wrong * e, (1 - p_wrong) * n]) * (1 - info)
    mean = np.append(mean, info)
    probs = rng.dirichlet(12.0 * mean + 1e-3)
    counts = rng.multinomial(vote_total(rng), probs)
    scores = dict(zip(ANECDOTE_LABELS, (int(c) for c in counts), strict=True))
    binarized = {"RIGHT": scores["OTHER"] + scores["NOBODY"], "WRONG": scores["AUTHOR"] + scores["EVERYBODY"]}
    opener, filler = OPENERS[rng.integers(len(OPENERS))], FILLERS[rng.integers(len(FILLERS))]
    text = " ".join([opener, f"It was about {phrase}.", *clauses, filler])
    hypothetical = rng.random() < 0.1
    return {
        "id": _ident(rng),
        "post_id": _ident(rng, 6),
        "action": {
            "description": phrase,
            "pronormative_score": int(rng.integers(0, 5)),
            "contranormative_score": int(rng.integers(0, 5)),
        }
        if rng.random() < 0.8
        else None,
        "title": f"{'WIBTA' if hypothetical else 'AITA'} for {phrase}?",
        "text": text,
        "post_type": "HYPOTHETICAL" if hypothetical else "HISTORICAL",
        "label_scores": scores,
        "label": max(scores, key=scores.get),
        "binarized_label_scores": binarized,
        "binarized_label": "RIGHT" if binarized["RIGHT"] >= binarized["WRONG"] else "WRONG",
    }


def dilemma_record(rng: np.random.Generator) -> dict[str, Any]:
    """One dilemma in the release's record format."""
    i, j = rng.choice(len(ACTIONS), size=2, replace=False)
    (a1, w1), (a2, w2) = ACTIONS[i], ACTIONS[j]
    p1 = float(_sigmoid(1.5 * (w1 - w2)))
    gold1 = int(rng.binomial(5, p1))
    perf1 = int(rng.binomial(5, p1))
    return {
        "id": _ident(rng),
        "actions": [{"id": _ident(rng), "description": a1}, {"id": _ident(rng), "description": a2}],
        "gold_annotations": [gold1, 5 - gold1],
        "gold_label": 0 if gold1 > 5 - gold1 else 1,
        "human_perf_annotations": [perf1, 5 - perf1],
        "human_perf_label": 0 if perf1 > 5 - perf1 else 1,
        "controversial": min(gold1, 5 - gold1) >= 2,
    }


def _add_text(tar: tarfile.TarFile, name: str, text: str) -> None:
    data = text.encode()
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_sample_archive(archive: str, dest: str | Path, sizes: dict[str, int], seed: int) -> None:
    """Write ``<archive>.tar.gz`` (anecdotes or dilemmas) with the release layout to ``dest``."""
    make = anecdote_record if archive == "anecdotes" else dilemma_record
    # One independent stream per (archive, split): changing one split's size leaves the others unchanged.
    offset = {"anecdotes": 0, "dilemmas": 1}[archive]
    splits = dict(sizes)
    if archive == "dilemmas":
        splits["train-extra"] = max(1, sizes["train"] // 10)
    with reproducible_tar(dest) as tar:
        folder = tarfile.TarInfo(archive)
        folder.type, folder.mode, folder.mtime = tarfile.DIRTYPE, 0o755, 0
        tar.addfile(folder)
        _add_text(tar, f"{archive}/README", RELEASE_README)
        for k, (split, n) in enumerate(splits.items()):
            rng = np.random.default_rng([seed, offset, k])
            lines = [json.dumps(make(rng)) for _ in range(n)]
            _add_text(tar, member_name(archive, split), "\n".join(lines) + "\n")
