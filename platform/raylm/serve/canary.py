"""The edge's side of a canary (issue 34, item 3): which version a request goes to, a client's pin
of a version, and what each version's requests did.

NOT WIRED YET: these are the pieces, unit-tested; the edge does not call them and `raylm promote`
has no `--canary` (README, "New models into a live endpoint", says so). The lifecycle's decision
over the recorded numbers is `raylm.lifecycle.canary`.

- The split is a stable hash of the API key and the conversation, so one conversation stays on
  one version for all its turns: the conversation is the `x-session-id` header when the client
  sends one, else the text of the first message (chat) or the prompt (completions), which every
  later turn of a chat repeats.
- A client pins a version with `model: "<model_id>@v3"`; a version not served is a 404 that names
  the served ones.
- Per version: requests, errors and the p95 latency over a window of the latest requests.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from raylm.serve.protocol import APIError

SESSION_HEADER = b"x-session-id"
PIN_SEPARATOR = "@"


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


@dataclass
class VersionStats:
    """One version's requests: how many, how many failed, and the latencies of the latest `window`."""

    window: int = 1000
    requests: int = 0
    errors: int = 0
    latencies_s: deque = field(default_factory=deque)

    def add(self, failed: bool, latency_s: float) -> None:
        self.requests += 1
        self.errors += failed
        self.latencies_s.append(latency_s)
        while len(self.latencies_s) > self.window:
            self.latencies_s.popleft()

    def summary(self) -> dict:
        """requests, errors, error_rate and p95_s (nearest rank; None before the first request)."""
        ordered = sorted(self.latencies_s)
        p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)] if ordered else None
        return {"requests": self.requests, "errors": self.errors,
                "error_rate": self.errors / self.requests if self.requests else 0.0, "p95_s": p95}


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
