"""How the openai backend obtains responses: a response cache in front of synchronous or Batch API requests.

Nothing here changes a prediction (moralign.predictors.openai decides what is asked and what the answers mean);
this module decides only whether a response comes from disk or from the server, and how it gets there.

The cache. Each request is keyed by the SHA-256 of its canonical JSON: ``{"base_url", "endpoint", "body"}`` with
sorted keys, where the body is exactly what is sent (model, messages, temperature, seed, max_tokens, logprobs,
top_logprobs) — so the key changes with the model snapshot, the prompt template, the shots and every sampling
setting, never with the prompt alone. One file per response, ``<cache_dir>/<key[:2]>/<key>.json``, written
atomically, holding the key, base URL, endpoint, request body, the raw response JSON, how it came (``sync`` or
``batch``) and when (UTC). Only successful responses (HTTP 200 with ``choices``) are written; an error is never
cached, so a rerun asks again. The API key is never part of a key, a file or a log line: it is read from the
environment variable the config names, only when a request must actually be sent.

Synchronous mode sends the uncached requests concurrently through the official ``openai`` client, whose own
retries back off exponentially on 408, 409, 429 and 5xx and honour ``Retry-After`` / ``retry-after-ms`` (up to
two minutes). Each response is cached as it arrives, so a killed run loses at most the requests in flight.

Batch mode writes the uncached requests as Batch API JSONL (``custom_id`` = cache key, ``method``, ``url``,
``body``), uploads it (purpose ``batch``), creates the batch (24 h window), polls it, and fills the same cache from
the output file (whose lines come back in any order; they are matched by ``custom_id``). The batch id is kept in
``<cache_dir>/batches/`` until the batch ends, so a killed run resumes polling instead of paying twice.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from moralign.io import atomic_path

log = logging.getLogger(__name__)

ENDPOINT = "/chat/completions"
# Batch API limits: 50,000 requests (and 200 MB) per input file.
MAX_BATCH_REQUESTS = 50_000
BATCH_TERMINAL = ("completed", "failed", "expired", "cancelled")


class RequestLimitError(RuntimeError):
    """A run would send more requests than the model's ``max_requests`` allows."""


def canonical_json(obj: Any) -> str:
    """One text per JSON value: sorted keys, no insignificant whitespace, UTF-8 kept as is."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_key(base_url: str, endpoint: str, body: dict[str, Any]) -> str:
    """The cache key of one request: SHA-256 of the canonical JSON of where it goes and what it sends."""
    text = canonical_json({"base_url": base_url.rstrip("/"), "endpoint": endpoint, "body": body})
    return hashlib.sha256(text.encode()).hexdigest()


class ResponseCache:
    """Raw successful responses on disk, one JSON file per request key (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        """Where the response of ``key`` lives (two-character fan-out keeps folders small)."""
        return self.root / key[:2] / f"{key}.json"

    def __contains__(self, key: str) -> bool:
        return self.path(key).exists()

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached raw response of ``key``, or None."""
        path = self.path(key)
        if not path.exists():
            return None
        return json.loads(path.read_text())["response"]

    def put(self, key: str, base_url: str, endpoint: str, body: dict[str, Any], response: dict[str, Any], via: str):
        """Store a successful response atomically (a killed writer leaves no partial entry)."""
        entry = {
            "key": key,
            "base_url": base_url,
            "endpoint": endpoint,
            "request": body,
            "response": response,
            "via": via,
            "cached_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        with atomic_path(self.path(key)) as tmp:
            tmp.write_text(json.dumps(entry, sort_keys=True, ensure_ascii=False))


def is_success(response: Any) -> bool:
    """Whether a response body is a chat completion worth caching (errors never are)."""
    return isinstance(response, dict) and isinstance(response.get("choices"), list) and bool(response["choices"])


@dataclass
class Transport:
    """Responses for request bodies: from the cache, else from the server; every success is cached before use."""

    base_url: str
    api_key_env: str | None
    cache: ResponseCache
    concurrency: int
    max_retries: int
    timeout_s: float
    mode: str  # sync | batch
    batch_poll_s: float
    max_requests: int | None
    sent: int = 0  # requests this process sent over the wire (each batch line counts as one)
    _client: Any = field(default=None, init=False, repr=False)

    def key(self, body: dict[str, Any]) -> str:
        """The cache key of ``body`` sent to this transport's endpoint."""
        return request_key(self.base_url, ENDPOINT, body)

    def missing(self, bodies: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """The distinct uncached requests among ``bodies``, by key."""
        todo: dict[str, dict[str, Any]] = {}
        for body in bodies:
            key = self.key(body)
            if key not in todo and key not in self.cache:
                todo[key] = body
        return todo

    def fetch(self, bodies: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The raw response of every body, in order; uncached ones are requested first (sync or batch)."""
        todo = self.missing(bodies)
        if todo:
            self.check_limit(len(todo))
            log.info("%d of %d requests not cached; sending them (%s mode)", len(todo), len(bodies), self.mode)
            if self.mode == "batch":
                self._send_batch(todo)
            else:
                self._send_sync(todo)
        out = []
        for body in bodies:
            response = self.cache.get(self.key(body))
            if response is None:  # only reachable when a batch returned errors for some lines
                raise RuntimeError(
                    f"no response for a request of {self.base_url} (see the errors above); rerun to retry"
                )
            out.append(response)
        return out

    def check_limit(self, n: int) -> None:
        """Refuse to send ``n`` more requests when that would pass ``max_requests``."""
        if self.max_requests is not None and self.sent + n > self.max_requests:
            raise RequestLimitError(
                f"sending {n} more requests (after {self.sent}) would exceed max_requests = {self.max_requests}; "
                f"raise the model's openai.max_requests or lower extract.max_items"
            )

    def client(self) -> Any:
        """The ``openai`` client, created on first need (a fully cached run needs no key and no network)."""
        if self._client is None:
            import openai

            if self.api_key_env is None:
                key = "none"  # a self-hosted server without authentication ignores the header
            else:
                key = os.environ.get(self.api_key_env)
                if not key:
                    raise RuntimeError(
                        f"environment variable {self.api_key_env} is not set; it must hold the API key for "
                        f"{self.base_url} (or set the model's openai.api_key_env to null for a server without keys)"
                    )
            self._client = openai.OpenAI(
                base_url=self.base_url, api_key=key, max_retries=self.max_retries, timeout=self.timeout_s
            )
        return self._client

    # -- synchronous -------------------------------------------------------------------------------------------

    def _send_one(self, key: str, body: dict[str, Any]) -> None:
        raw = self.client().chat.completions.with_raw_response.create(**body)
        response = json.loads(raw.text)
        if not is_success(response):
            raise RuntimeError(f"{self.base_url}{ENDPOINT} answered without choices: {raw.text[:300]}")
        self.cache.put(key, self.base_url, ENDPOINT, body, response, via="sync")

    def _send_sync(self, todo: dict[str, dict[str, Any]]) -> None:
        items = list(todo.items())
        self.client()  # created once, before the worker threads share it
        self.sent += len(items)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = [pool.submit(self._send_one, key, body) for key, body in items]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for future in pending:
                future.cancel()
            for future in done:
                future.result()  # re-raise the first failure (after the client's own retries)

    # -- batch -------------------------------------------------------------------------------------------------

    @property
    def batch_url(self) -> str:
        """The endpoint as the Batch API names it: the base URL's path + the endpoint (``/v1/chat/completions``)."""
        return urlparse(self.base_url).path.rstrip("/") + ENDPOINT

    def _state_path(self, keys: Sequence[str]) -> Path:
        # the same set of requests finds the batch that a killed run submitted for it
        return self.cache.root / "batches" / f"{hashlib.sha256(''.join(sorted(keys)).encode()).hexdigest()[:32]}.json"

    def _submit(self, chunk: dict[str, dict[str, Any]]) -> str:
        state = self._state_path(list(chunk))
        if state.exists():
            batch_id = json.loads(state.read_text())["batch_id"]
            log.info("resuming batch %s (%d requests), submitted by an earlier run", batch_id, len(chunk))
            return batch_id
        lines = [
            canonical_json({"custom_id": key, "method": "POST", "url": self.batch_url, "body": body})
            for key, body in chunk.items()
        ]
        client = self.client()
        upload = client.files.create(file=("moralign-batch.jsonl", ("\n".join(lines) + "\n").encode()), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint=self.batch_url, completion_window="24h")
        self.sent += len(chunk)
        with atomic_path(state) as tmp:
            tmp.write_text(json.dumps({"batch_id": batch.id, "input_file_id": upload.id, "requests": len(chunk)}))
        log.info("submitted batch %s: %d requests (input file %s)", batch.id, len(chunk), upload.id)
        return batch.id

    def _poll(self, batch_id: str) -> Any:
        last = None
        while True:
            batch = self.client().batches.retrieve(batch_id)
            counts = batch.request_counts
            progress = f"{counts.completed}/{counts.total} done, {counts.failed} failed" if counts else ""
            if (batch.status, progress) != last:
                log.info("batch %s: %s %s", batch_id, batch.status, progress)
                last = (batch.status, progress)
            if batch.status in BATCH_TERMINAL:
                return batch
            time.sleep(self.batch_poll_s)

    def _collect(self, batch: Any, chunk: dict[str, dict[str, Any]]) -> int:
        """Cache every successful line of the batch's output file; log its error lines. Returns lines cached."""
        stored = 0
        if batch.output_file_id:
            for line in _jsonl(self.client().files.content(batch.output_file_id).text):
                key, response = line.get("custom_id"), line.get("response") or {}
                if key in chunk and response.get("status_code") == 200 and is_success(response.get("body")):
                    self.cache.put(key, self.base_url, ENDPOINT, chunk[key], response["body"], via="batch")
                    stored += 1
                elif key in chunk:
                    log.warning("batch %s: request %s failed: %s", batch.id, key[:12], line.get("error") or response)
        if batch.error_file_id:
            errors = list(_jsonl(self.client().files.content(batch.error_file_id).text))
            for line in errors[:5]:
                log.warning("batch %s: request %s failed: %s", batch.id, str(line.get("custom_id"))[:12], line)
            if errors:
                log.warning("batch %s: %d requests failed (errors are never cached)", batch.id, len(errors))
        return stored

    def _send_batch(self, todo: dict[str, dict[str, Any]]) -> None:
        items = list(todo.items())
        chunks = [dict(items[i : i + MAX_BATCH_REQUESTS]) for i in range(0, len(items), MAX_BATCH_REQUESTS)]
        submitted = [(self._submit(chunk), chunk) for chunk in chunks]
        for batch_id, chunk in submitted:
            batch = self._poll(batch_id)
            stored = self._collect(batch, chunk)
            self._state_path(list(chunk)).unlink(missing_ok=True)
            log.info("batch %s %s: %d of %d responses cached", batch_id, batch.status, stored, len(chunk))
            if batch.status != "completed":
                raise RuntimeError(
                    f"batch {batch_id} ended '{batch.status}' ({batch.errors}); its {stored} successful responses "
                    f"are cached, a rerun resubmits the rest"
                )


def _jsonl(text: str) -> Iterator[dict[str, Any]]:
    for line in text.splitlines():
        if line.strip():
            yield json.loads(line)
