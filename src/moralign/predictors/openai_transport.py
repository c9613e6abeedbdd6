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

Synchronous mode sends the uncached requests concurrently through the official ``openai`` client. Faults are
retried here, not by the client (its own retries are off), so that every kind of transient fault draws on ONE
budget of ``max_retries`` retries per request: HTTP 408, 409, 429 and 5xx; a dropped connection or a body cut
off in transit; no answer within ``timeout_s``; and an HTTP 200 whose body is not a chat completion (cut short,
not JSON, a gateway's HTML error page, JSON without ``choices``), which proxies and gateways do send. A wait
follows ``Retry-After`` / ``retry-after-ms`` when the server gives one (up to two minutes; a longer one stops the
run at once rather than hold it for hours), else backs off exponentially from ``BACKOFF_S`` with jitter, as the
client would. Other statuses (400, 401, 404, ...) are not transient and stop at once. When the budget is spent,
the run stops with one line (:class:`ServerFaultError`) naming the model, the item and the last thing that came
back. Only a chat completion is ever cached, so a malformed body can never become a prediction. Each response is
cached as it arrives, so a killed run loses at most the requests in flight.

Batch mode writes the uncached requests as Batch API JSONL (``custom_id`` = cache key, ``method``, ``url``,
``body``), uploads it (purpose ``batch``), creates the batch (24 h window), polls it, and fills the same cache from
the output file (whose lines come back in any order; they are matched by ``custom_id``). The batch id is kept in
``<cache_dir>/batches/`` until the batch ends, so a killed run resumes polling instead of paying twice.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import hashlib
import json
import logging
import math
import os
import random
import re
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from moralign.errors import DataError
from moralign.io import atomic_path

log = logging.getLogger(__name__)

ENDPOINT = "/chat/completions"
# Batch API limits: 50,000 requests (and 200 MB) per input file.
MAX_BATCH_REQUESTS = 50_000
BATCH_TERMINAL = ("completed", "failed", "expired", "cancelled")
# Retries (module docstring): the statuses worth asking again, and the waits between tries (as the openai client's).
RETRY_STATUS = frozenset({408, 409, 429})  # and every 5xx
BACKOFF_S = 0.5  # first wait without Retry-After; doubles per retry, minus up to 25 % jitter
MAX_BACKOFF_S = 8.0
MAX_RETRY_AFTER_S = 120.0  # a server asking for a longer wait (a spent daily quota) stops the run instead
SHOWN_CHARS = 200  # how much of a faulty body an error line quotes


class RequestLimitError(RuntimeError):
    """A run would send more requests than the model's ``max_requests`` allows."""


class ServerFaultError(DataError):
    """The server kept answering a request with faults, or with an error that is not transient.

    A :class:`DataError` so that the step prints it as one line (the model, the item, what came back): the fix
    is the user's (retry later, raise ``max_retries``, check the server), not a bug of moralign.
    """


def pause(seconds: float) -> None:
    """Wait between tries (a function of its own so that tests need not wait)."""
    time.sleep(seconds)


def shown(text: str) -> str:
    """A body as an error line quotes it: whitespace collapsed to single spaces, cut to ``SHOWN_CHARS``."""
    flat = re.sub(r"\s+", " ", text).strip()
    return repr(flat if len(flat) <= SHOWN_CHARS else flat[:SHOWN_CHARS] + "...")


def retry_after(headers: Any) -> float | None:
    """Seconds the server asks to wait (``retry-after-ms``, else ``Retry-After`` in seconds or as a date), or None."""
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            continue
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    value = headers.get("retry-after")
    date = email.utils.parsedate_tz(value) if value else None
    return None if date is None else max(0.0, email.utils.mktime_tz(date) - time.time())


def backoff(retry: int) -> float:
    """The wait before retry number ``retry`` (0-based) when the server names none."""
    return min(BACKOFF_S * 2.0**retry, MAX_BACKOFF_S) * (1 - 0.25 * random.random())


@dataclass(frozen=True)
class Attempt:
    """What one try of a request gave: a chat completion, or a fault described in a few words."""

    response: dict[str, Any] | None
    fault: str = ""
    transient: bool = True
    wait: float | None = None  # what the server asked for (Retry-After)


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
    _chat: Any = field(default=None, init=False, repr=False)

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

    def fetch(self, bodies: Sequence[dict[str, Any]], labels: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """The raw response of every body, in order; uncached ones are requested first (sync or batch).

        ``labels`` name the bodies' items in error lines (``item <id>``); without them a request is named by its key.
        """
        named = {self.key(b): label for b, label in zip(bodies, labels, strict=True)} if labels is not None else {}
        todo = self.missing(bodies)
        if todo:
            self.check_limit(len(todo))
            log.info("%d of %d requests not cached; sending them (%s mode)", len(todo), len(bodies), self.mode)
            if self.mode == "batch":
                self._send_batch(todo)
            else:
                self._send_sync(todo, named)
        out = []
        for body in bodies:
            key = self.key(body)
            response = self.cache.get(key)
            if response is None:  # only reachable when a batch returned errors for some lines
                raise ServerFaultError(
                    f"model {body.get('model')!r} at {self.base_url}, {named.get(key, f'request {key[:12]}')}: "
                    f"the batch returned no chat completion for it (see the errors above); rerun to retry"
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

    def chat_client(self) -> Any:
        """The client for chat completions, without retries of its own.

        :meth:`_send_one` retries every kind of fault on one budget; the Files and Batches calls of batch mode keep
        the client's retries.
        """
        if self._chat is None:
            self._chat = self.client().with_options(max_retries=0)
        return self._chat

    # -- synchronous -------------------------------------------------------------------------------------------

    def _attempt(self, body: dict[str, Any]) -> Attempt:
        """One try of one request, every outcome turned into an :class:`Attempt` (nothing raised, nothing cached)."""
        import openai

        try:
            raw = self.chat_client().chat.completions.with_raw_response.create(**body)
        except openai.APITimeoutError:
            return Attempt(None, f"no answer within timeout_s = {self.timeout_s:g} s")
        except openai.APIConnectionError as err:
            cause = err.__cause__ or err
            return Attempt(None, f"connection failed ({type(cause).__name__}: {shown(str(cause))})")
        except openai.APIStatusError as err:
            status, headers = err.status_code, err.response.headers
            transient = status in RETRY_STATUS or status >= 500
            # a server may say explicitly whether a retry can help (the openai client obeys the same header)
            transient = {"true": True, "false": False}.get(headers.get("x-should-retry", ""), transient)
            return Attempt(None, f"HTTP {status}: {shown(err.response.text)}", transient, retry_after(headers))
        text = raw.text
        try:
            response = json.loads(text)
        except ValueError:
            return Attempt(None, f"HTTP {raw.status_code} and a body not JSON ({len(text)} chars): {shown(text)}")
        if not is_success(response):
            return Attempt(None, f"HTTP {raw.status_code} with JSON that is not a chat completion: {shown(text)}")
        return Attempt(response)

    def _send_one(self, key: str, body: dict[str, Any], label: str) -> None:
        """Ask until a chat completion comes back (then cache it) or the retries are spent (then stop, one line)."""
        where = f"model {body.get('model')!r} at {self.base_url}, {label}"
        for retry in range(self.max_retries + 1):
            attempt = self._attempt(body)
            if attempt.response is not None:
                self.cache.put(key, self.base_url, ENDPOINT, body, attempt.response, via="sync")
                return
            if not attempt.transient:
                raise ServerFaultError(f"{where}: not a transient fault, not retried; the answer was {attempt.fault}")
            if retry == self.max_retries:
                break
            wait = backoff(retry) if attempt.wait is None else attempt.wait
            if wait > MAX_RETRY_AFTER_S:
                raise ServerFaultError(
                    f"{where}: the server asks to wait {wait:.0f} s (more than {MAX_RETRY_AFTER_S:.0f} s) after "
                    f"{attempt.fault}; rerun later (cached responses are kept)"
                )
            log.warning("%s: %s; retry %d of %d in %.2f s", where, attempt.fault, retry + 1, self.max_retries, wait)
            pause(wait)
        raise ServerFaultError(
            f"{where}: no chat completion after {self.max_retries + 1} tries (max_retries = {self.max_retries}); "
            f"the last answer was {attempt.fault}; rerun to retry (cached responses are kept)"
        )

    def _send_sync(self, todo: dict[str, dict[str, Any]], labels: dict[str, str]) -> None:
        items = list(todo.items())
        self.chat_client()  # created once, before the worker threads share it
        self.sent += len(items)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = [
                pool.submit(self._send_one, key, body, labels.get(key, f"request {key[:12]}")) for key, body in items
            ]
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
    """The objects of a JSONL file; a line that is not a JSON object is logged and skipped (never cached)."""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            obj = None
        if isinstance(obj, dict):
            yield obj
        else:
            log.warning("batch file line %d is not a JSON object, skipped: %s", number, shown(line))
