"""The edge's side of a canary (`raylm promote --canary PCT`): which version a request goes to,
a client's pin of a version, and what each version's requests did.

During a canary the app has two LLM deployments: the live one (`LLMServer`) and the candidate's
(`LLMServerCanary`). The edge learns of them through its `user_config` (`Routes.configure`: Serve
reconfigures the edge's replicas in place, so starting, finishing or aborting a canary restarts
no edge), sends each request to one of them (`Routes.pick`) and counts what each version did,
written to storage every few seconds (one file per edge replica), where the promoting command
(`raylm.lifecycle.canary`) reads it to decide.

- The split is a stable hash of the API key and the conversation, so one conversation stays on
  one version for all its turns: the conversation is the `x-session-id` header when the client
  sends one, else the text of the first message (chat) or the prompt (completions), which every
  later turn of a chat repeats.
- A client pins a version with `model: "<model_id>@v3"`; a version not served is a 404 that names
  the served ones.
- Per version: requests, errors and the p95 latency over a window of the latest requests, leaving
  out each version's first UNTIMED_FIRST requests at each edge replica (counted, errors included,
  but not timed): a freshly started engine answers its first requests slower than a warm one, and
  on a small canary those few decided the p95 (a healthy candidate was rolled back on 62 vs 33 ms
  over 19 requests).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from raylm.serve.protocol import APIError

logger = logging.getLogger(__name__)

SESSION_HEADER = b"x-session-id"
PIN_SEPARATOR = "@"
STATS_INTERVAL_S = 2.0  # how often an edge replica writes its per-version numbers during a canary
UNTIMED_FIRST = 5  # each version's first requests at an edge replica: counted, not timed (a cold engine)


def conversation(headers: Iterable[tuple[bytes, bytes]], text: Any) -> str:
    """What identifies the conversation a request belongs to: the `x-session-id` header, else the
    first message's text (chat: `text` is the messages) or the prompt (completions)."""
    for name, value in headers:
        if name.lower() == SESSION_HEADER and value.strip():
            return "session:" + value.strip().decode("latin-1")
    if isinstance(text, list) and text and isinstance(text[0], dict):  # chat messages
        return "text:" + message_text(text[0].get("content"))
    if isinstance(text, list) and text and not all(isinstance(t, int) for t in text):  # a batch: its first prompt
        first = text[0]
        return "text:" + (first if isinstance(first, str) else json.dumps(first))
    return "text:" + (text if isinstance(text, str) else json.dumps(text))


def message_text(content: Any) -> str:
    """A message's text: a string, or the text parts of OpenAI's content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return json.dumps(content)


def bucket(key_id: str, conversation_id: str) -> float:
    """A stable point in [0, 100) for the key and conversation (SHA-256: the same in every edge
    replica and after restarts, unlike Python's salted `hash`)."""
    digest = hashlib.sha256(f"{key_id}\0{conversation_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 * 100


def to_candidate(key_id: str, conversation_id: str, percent: float) -> bool:
    """Whether the request goes to the canary's candidate, which serves `percent`% of conversations."""
    return bucket(key_id, conversation_id) < percent


def split_pin(model: str) -> tuple[str, Optional[str]]:
    """`"<model_id>@v3"` -> (`<model_id>`, `"v3"`); a model without a pin -> (model, None)."""
    base, sep, version = model.rpartition(PIN_SEPARATOR)
    return (base, version) if sep and base and version else (model, None)


def pinned_version(model: str, served: Iterable[str]) -> tuple[str, Optional[str]]:
    """(the model asked for without its pin, the pinned version or None). A version not served is
    a 404 naming the served ones, as an unknown model is."""
    base, version = split_pin(model)
    served = sorted(served)
    if version is not None and version not in served:
        raise APIError(404, f"The model '{model}' does not exist: version {version} is not served; served versions: "
                       f"{', '.join(served) or 'none'} (ask for '{base}{PIN_SEPARATOR}{served[0] if served else 'vN'}', "
                       f"or '{base}' for any)", "model", "model_not_found")
    return base, version


def unpin(raw: bytes, served: Iterable[str]) -> tuple[bytes, Optional[str]]:
    """A request body whose model carries a pin (`"<model_id>@v3"`) -> (the body with the bare
    model, the version); any other body is returned as it is (the gate's checks report a bad
    one). A version not served is a 404 naming the served ones."""
    if PIN_SEPARATOR.encode() not in raw:  # nearly every request: no parse
        return raw, None
    try:
        fields = json.loads(raw)
    except ValueError:
        return raw, None
    model = fields.get("model") if isinstance(fields, dict) else None
    if not isinstance(model, str):
        return raw, None
    base, version = pinned_version(model, served)
    if version is None:
        return raw, None
    return json.dumps({**fields, "model": base}).encode(), version


@dataclass
class VersionStats:
    """One version's requests: how many, how many failed, and the latencies of the latest `window`
    (not of the first `untimed_first`: a cold engine's)."""

    window: int = 1000
    requests: int = 0
    errors: int = 0
    latencies_s: deque = field(default_factory=deque)
    untimed_first: int = UNTIMED_FIRST

    def add(self, failed: bool, latency_s: float) -> None:
        self.requests += 1
        self.errors += failed
        if self.requests <= self.untimed_first:
            return
        self.latencies_s.append(latency_s)
        while len(self.latencies_s) > self.window:
            self.latencies_s.popleft()

    def summary(self) -> dict:
        """requests, errors, error_rate and p95_s (nearest rank; None before the first request)."""
        ordered = sorted(self.latencies_s)
        p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)] if ordered else None
        return {"requests": self.requests, "errors": self.errors,
                "error_rate": self.errors / self.requests if self.requests else 0.0, "p95_s": p95}

    def to_json(self) -> dict:
        return {"requests": self.requests, "errors": self.errors, "latencies_s": list(self.latencies_s)}


class VersionRecorder:
    """Per-version request count, error rate and p95 latency, kept where requests are answered.
    A request counts as failed when its status is 400 or more: the gate's own refusals (keys,
    limits, bad bodies) are answered before a version is chosen and are never recorded here, so
    what is left is what the version did with a request it accepted (a 400 from a candidate whose
    template fails every request included). A cancelled request is not recorded."""

    def __init__(self, window: int = 1000):
        self.window = window
        self.versions: dict[str, VersionStats] = {}

    def record(self, version: str, status: int, latency_s: float) -> None:
        self.versions.setdefault(version, VersionStats(self.window)).add(status >= 400, latency_s)

    def summary(self) -> dict[str, dict]:
        return {v: stats.summary() for v, stats in sorted(self.versions.items())}

    def to_json(self) -> dict[str, dict]:
        return {v: stats.to_json() for v, stats in sorted(self.versions.items())}


def merged_summary(parts: Iterable[dict[str, dict]], window: int = 1000) -> dict[str, dict]:
    """The per-version summary over several edge replicas' `VersionRecorder.to_json()`: counts
    summed, p95 over their latency windows together."""
    versions: dict[str, VersionStats] = {}
    for part in parts:
        for version, got in part.items():
            stats = versions.setdefault(version, VersionStats(window * 64))
            stats.requests += int(got.get("requests", 0))
            stats.errors += int(got.get("errors", 0))
            stats.latencies_s.extend(float(x) for x in got.get("latencies_s", ()))
    return {v: stats.summary() for v, stats in sorted(versions.items())}


EMPTY_SUMMARY = {"requests": 0, "errors": 0, "error_rate": 0.0, "p95_s": None}


class Routes:
    """Which LLM deployment an edge replica sends a request to, as its `user_config` says:
    `{"live_version": "v2", "canary": {"id", "version", "percent", "deployment", "stats_uri"} or
    null}`. A request pinned to a version goes to that version's deployment; otherwise, during a
    canary, `to_candidate` over its key and conversation decides. Each answered request is
    counted per version while a canary runs (`flush_forever` writes the counts to
    `<stats_uri>/<replica>.json`)."""

    def __init__(self, live: Any, handle_for: Callable[[str], Any], replica: str = "edge"):
        self.live, self.handle_for, self.replica = live, handle_for, replica
        self.live_version = ""
        self.canary: Optional[dict] = None
        self.candidate: Any = None
        self.recorder = VersionRecorder()
        self._dirty = False

    def configure(self, config: Optional[dict]) -> None:
        config = config or {}
        canary = config.get("canary") or None
        if (canary or {}).get("id") != (self.canary or {}).get("id"):
            self.recorder, self._dirty = VersionRecorder(), bool(canary)  # a new canary counts from zero
        self.candidate = self.handle_for(canary["deployment"]) if canary else None
        self.live_version, self.canary = str(config.get("live_version") or ""), canary

    def served(self) -> list[str]:
        """The versions a request may pin."""
        return [v for v in (self.live_version, (self.canary or {}).get("version")) if v]

    def pick(self, pin: Optional[str], key_id: str, conversation_id: Callable[[], str]) -> tuple[Any, str]:
        """(the handle to send the request to, the version it serves)."""
        canary = self.canary
        if canary is not None:
            if pin == canary["version"] or (pin is None and to_candidate(key_id, conversation_id(),
                                                                         float(canary["percent"]))):
                return self.candidate, canary["version"]
        return self.live, self.live_version

    def record(self, version: str, status: int, latency_s: float) -> None:
        if self.canary is not None:
            self.recorder.record(version or "live", status, latency_s)
            self._dirty = True

    async def flush_forever(self, interval_s: float = STATS_INTERVAL_S) -> None:
        """While a canary runs, write this replica's counts to storage when they changed (in a
        thread: a slow bucket must not stall requests). A failed write is logged and retried."""
        from raylm import storage

        while True:
            await asyncio.sleep(interval_s)
            canary = self.canary
            if canary is None or not self._dirty or not canary.get("stats_uri"):
                continue
            self._dirty = False
            uri = storage.join(canary["stats_uri"], f"{self.replica}.json")
            try:
                await asyncio.to_thread(storage.write_json, uri, {"canary": canary["id"],
                                                                  "versions": self.recorder.to_json()})
            except Exception as exc:  # noqa: BLE001 - keep counting; the next write may work
                self._dirty = True
                logger.warning("canary %s: cannot write %s: %s", canary["id"], uri, exc)
