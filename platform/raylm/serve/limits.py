"""Per-key limits: requests and tokens per minute, over a sliding 60 s window per key.

A gate replica keeps its own windows in memory (no shared store to reach on every request), so
a limit is per replica. `share` splits a limit over N replicas: each one allows `share` (1/N)
of it, which adds up to about the limit when requests of a key are spread evenly; a key whose
requests all land on one replica gets 1/N there. `serve.key_limits.split_over_replicas` sets
it from the config; a caller that knows its replica count may pass its own.

Requests are counted when admitted (a refused one does not count, so a client retrying too early
is not locked out for longer); tokens when the response has reported its usage. A key is refused
while its window holds `requests_per_minute` requests, or `tokens_per_minute` tokens or more: the
request that crosses the token limit is served, the next ones wait until enough of the window
has slid past. The clock is injectable, so tests move time instead of sleeping.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional

from raylm.config.serve import KeyLimitsConfig

WINDOW_S = 60.0


@dataclass(frozen=True)
class Refusal:
    """Why a key's request is refused: which limit, its value on this replica, what the window
    holds, and the seconds until a request would be admitted."""

    limit: str  # "requests" or "tokens"
    allowed: float
    used: float
    retry_after_s: float

    @property
    def retry_after_header(self) -> str:
        """Whole seconds, rounded up, at least 1 (HTTP's Retry-After takes integers)."""
        return str(max(1, math.ceil(self.retry_after_s)))

    def message(self) -> str:
        unit = "requests per minute (RPM)" if self.limit == "requests" else "tokens per minute (TPM)"
        return (f"Rate limit reached for this API key on {unit}: limit {_number(self.allowed)}, used "
                f"{_number(self.used)}. Try again in {self.retry_after_header} s (serve.key_limits).")


class _Window:
    """What a key used within the last WINDOW_S: (time, amount) events, oldest first, and their sum."""

    def __init__(self) -> None:
        self.events: deque[tuple[float, int]] = deque()
        self.total = 0

    def slide(self, now: float) -> None:
        while self.events and self.events[0][0] <= now - WINDOW_S:
            self.total -= self.events.popleft()[1]

    def add(self, now: float, amount: int) -> None:
        self.events.append((now, amount))
        self.total += amount

    def wait_s(self, now: float, limit: float) -> float:
        """Seconds until the sum drops below `limit` (events leave the window oldest first)."""
        left = self.total
        for at, amount in self.events:
            left -= amount
            if left < limit:
                return max(0.0, at + WINDOW_S - now)
        return 0.0


class KeyLimiter:
    """Admits or refuses a key's requests by its limits (`KeyLimitsConfig.for_key`), scaled by `share`."""

    def __init__(self, limits: KeyLimitsConfig, share: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.share = 1.0 / limits.split_over_replicas if share is None else share
        if not 0 < self.share <= 1:
            raise ValueError(f"share={share}: must lie in (0, 1] (this replica's part of each limit)")
        self.clock = clock
        self._requests: dict[str, _Window] = {}
        self._tokens: dict[str, _Window] = {}
        self._next_sweep = clock() + WINDOW_S

    def allowed(self, key_id: str) -> tuple[float, float]:
        """(requests, tokens) per minute this replica allows the key; 0: no limit. At least one
        request, so a small limit split over many replicas does not close the key."""
        rpm, tpm = self.limits.for_key(key_id)
        requests = max(1, math.floor(rpm * self.share)) if rpm else 0
        tokens = max(1.0, tpm * self.share) if tpm else 0.0
        return requests, tokens

    def admit(self, key_id: str) -> Optional[Refusal]:
        """Count a request of the key and return None, or return why it must wait (not counted)."""
        now = self.clock()
        self._sweep(now)
        max_requests, max_tokens = self.allowed(key_id)
        refusals = []
        checks = (("requests", self._requests, max_requests), ("tokens", self._tokens, max_tokens))
        for name, windows, allowed in checks:
            window = self._slid(windows, key_id, now) if allowed else None
            if window is not None and window.total >= allowed:
                refusals.append(Refusal(name, allowed, window.total, window.wait_s(now, allowed)))
        if refusals:  # the longest wait: retrying after it passes both limits
            return max(refusals, key=lambda r: r.retry_after_s)
        if max_requests:
            self._requests.setdefault(key_id, _Window()).add(now, 1)
        return None

    def add_tokens(self, key_id: str, tokens: int) -> None:
        """Count the tokens a response of the key reported (nothing for keys without a token limit)."""
        if tokens > 0 and self.allowed(key_id)[1]:
            now = self.clock()
            self._tokens.setdefault(key_id, _Window()).add(now, tokens)

    @staticmethod
    def _slid(windows: dict[str, _Window], key_id: str, now: float) -> Optional[_Window]:
        """The key's window with what is older than WINDOW_S dropped; None when it has none."""
        window = windows.get(key_id)
        if window is not None:
            window.slide(now)
        return window

    def _sweep(self, now: float) -> None:
        """Once a window's length, forget keys whose windows are empty (memory stays bounded by the
        keys active in the last minute)."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + WINDOW_S
        for windows in (self._requests, self._tokens):
            for key_id in list(windows):
                windows[key_id].slide(now)
                if not windows[key_id].events:
                    del windows[key_id]


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"
