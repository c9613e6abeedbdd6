"""Raw generations on disk, keyed by the full request that produced them.

A ``sample`` or ``verbal`` reading is expensive (N or K completions per item) and its parsing is not: so the
raw completions are what is stored, and distributions are always recomputed from them by the versioned parsers
of :mod:`moralign.readings.parse`. A parser fix raises a version and re-parses; it never regenerates.

The key is the SHA-256 of the canonical JSON of the whole :class:`Request`: the model's identity (base weights,
adapter hash, dtype), the prompt's token ids, the item id, the reading, the number of draws, the seed, the
decoding settings and the constraint (the JSON schema, or none). Anything that can change a completion is in
it; a cache is never keyed by the prompt alone. One JSON file per request (two-character fan-out), written
atomically: a killed run leaves complete entries or none, and a rerun generates only what is missing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from moralign.errors import DataError
from moralign.io import atomic_path

T = TypeVar("T")


def canonical_json(obj: Any) -> str:
    """One text per JSON value: sorted keys, no insignificant whitespace, UTF-8 kept as is."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True)
class Request:
    """Everything that determines one item's raw completions (see the module docstring)."""

    model: dict[str, Any]
    item_id: str
    prompt_ids: tuple[int, ...]
    reading: str
    n_draws: int
    seed: int
    decoding: dict[str, Any]
    constraint: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("a generation request needs the model's identity (base weights, adapter, dtype)")
        if self.n_draws < 1:
            raise ValueError(f"item {self.item_id}: n_draws must be at least 1, not {self.n_draws}")

    def describe(self) -> dict[str, Any]:
        """The request as JSON-able data (what the key is computed from, and what an entry stores)."""
        return {**asdict(self), "prompt_ids": list(self.prompt_ids)}

    @property
    def key(self) -> str:
        """SHA-256 of the canonical JSON of :meth:`describe`."""
        return hashlib.sha256(canonical_json(self.describe()).encode()).hexdigest()


@dataclass(frozen=True)
class Draw:
    """One raw completion: its token ids (the stop token left out), their text, whether a stop token ended it."""

    ids: tuple[int, ...]
    text: str
    stopped: bool

    def describe(self) -> dict[str, Any]:
        """JSON-able form."""
        return {"ids": list(self.ids), "text": self.text, "stopped": self.stopped}


@dataclass(frozen=True)
class ItemDraws:
    """The raw completions of a batch of items: what every reading's frame is parsed from.

    ``rejected`` (per item, per draw: a reason or None) marks draws that are invalid whatever their text says,
    such as an API's content-filter stops (:mod:`moralign.readings.api`); they are never parsed. The local
    engine rejects nothing and leaves it None.
    """

    ids: Sequence[str]
    draws: Sequence[Sequence[Draw]]
    rejected: Sequence[Sequence[str | None]] | None = None

    def __post_init__(self) -> None:
        if len(self.draws) != len(self.ids):
            raise ValueError(f"{len(self.ids)} item ids for the draws of {len(self.draws)} items")
        if self.rejected is not None and [len(r) for r in self.rejected] != [len(d) for d in self.draws]:
            raise ValueError("rejected must give one entry (a reason or None) per draw of each item")

    def parse(self, parser: Callable[[str], T], reject: Callable[[str], T]) -> list[list[T]]:
        """Each item's draws read by ``parser``; a rejected draw is ``reject(reason)``, its text unread."""
        rejected = [[None] * len(d) for d in self.draws] if self.rejected is None else self.rejected
        return [
            [reject(reason) if reason else parser(d.text) for d, reason in zip(item, reasons, strict=True)]
            for item, reasons in zip(self.draws, rejected, strict=True)
        ]

    def generated(self) -> list[int]:
        """Tokens generated per item (its cost): every draw's tokens, the stop token counted where one ended it."""
        return [sum(len(d.ids) + d.stopped for d in item) for item in self.draws]


class GenerationCache:
    """Raw completions of requests, one JSON file per request key."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, request: Request) -> Path:
        """Where the completions of ``request`` live."""
        key = request.key
        return self.root / key[:2] / f"{key}.json"

    def __contains__(self, request: Request) -> bool:
        return self.path(request).exists()

    def get(self, request: Request) -> list[Draw] | None:
        """The cached completions of ``request``, or None; a damaged or foreign entry is an error naming its file."""
        path = self.path(request)
        if not path.exists():
            return None
        try:
            entry = json.loads(path.read_text())
            stored, draws = entry["request"], entry["draws"]
            loaded = [Draw(tuple(d["ids"]), d["text"], bool(d["stopped"])) for d in draws]
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{path}: damaged generation cache entry ({err}); delete it to regenerate") from None
        if stored != request.describe():
            raise DataError(f"{path}: the entry was made for another request; delete it to regenerate")
        if len(loaded) != request.n_draws:
            raise DataError(f"{path}: {len(loaded)} completions stored, the request asks for {request.n_draws}")
        return loaded

    def put(self, request: Request, draws: list[Draw]) -> None:
        """Store the completions of ``request`` atomically."""
        if len(draws) != request.n_draws:
            raise ValueError(f"item {request.item_id}: {len(draws)} completions for a request of {request.n_draws}")
        entry = {"key": request.key, "request": request.describe(), "draws": [d.describe() for d in draws]}
        with atomic_path(self.path(request)) as tmp:
            tmp.write_text(json.dumps(entry, sort_keys=True, ensure_ascii=False))
