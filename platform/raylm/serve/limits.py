"""Per-key limits: requests and tokens per minute, over a sliding 60 s window per key, and
requests running at once.

A gate replica keeps its own windows in memory (no shared store to reach on every request), so
a limit is per replica. `share` splits a limit over N replicas: each one allows `share` (1/N)
of it, which adds up to about the limit when requests of a key are spread evenly; a key whose
requests all land on one replica gets 1/N there. `serve.key_limits.split_over_replicas` sets
it from the config; a caller that knows its replica count may pass its own.

Requests are counted when admitted (a refused one does not count, so a client retrying too early
is not locked out for longer). Tokens are reserved when admitted (the most the request can use:
its prompt and max_tokens per choice) and settled to its usage when it ends, so a burst of
concurrent requests cannot go past `tokens_per_minute` together: a request is refused when its
reservation does not fit in what the window has left, or when the key already runs
`max_concurrent_requests`. The clock is injectable, so tests move time instead of sleeping.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional, Union

from raylm.config.serve import KeyLimitsConfig

WINDOW_S = 60.0


@dataclass(frozen=True)
class Refusal:
    """Why a key's request is refused: which limit, its value on this replica, what the key uses
    of it, and the seconds until a request would be admitted. `requested`: the tokens the request
    reserves, when that alone is more than the key's limit (it can never be admitted as it is)."""

    limit: str  # "requests", "tokens" or "concurrency"
    allowed: float
    used: float
    retry_after_s: float
    requested: int = 0

    @property
    def too_large(self) -> bool:
        return self.requested > self.allowed

    @property
    def retry_after_header(self) -> str:
        """Whole seconds, rounded up, at least 1 (HTTP's Retry-After takes integers)."""
        return str(max(1, math.ceil(self.retry_after_s)))

    def message(self) -> str:
        if self.too_large:
            return (f"Request too large for this API key on tokens per minute (TPM): limit {_number(self.allowed)}, "
                    f"requested {self.requested} (the prompt plus max_tokens for every choice); lower max_tokens "
                    "(serve.key_limits).")
        unit = {"requests": "requests per minute (RPM)", "tokens": "tokens per minute (TPM)",
                "concurrency": "concurrent requests"}[self.limit]
        return (f"Rate limit reached for this API key on {unit}: limit {_number(self.allowed)}, used "
                f"{_number(self.used)}. Try again in {self.retry_after_header} s (serve.key_limits).")


class _Event:
    """An amount counted at a time; `alive` until it leaves the window (a settled reservation
    that already left must not be taken off the window's sum again)."""

    __slots__ = ("at", "amount", "alive")

    def __init__(self, at: float, amount: int):
        self.at, self.amount, self.alive = at, amount, True


class _Window:
    """What a key used within the last WINDOW_S: events, oldest first, and their sum."""

    def __init__(self) -> None:
        self.events: deque[_Event] = deque()
        self.total = 0

    def slide(self, now: float) -> None:
        while self.events and self.events[0].at <= now - WINDOW_S:
            event = self.events.popleft()
            event.alive = False
            self.total -= event.amount

    def add(self, now: float, amount: int) -> _Event:
        event = _Event(now, amount)
        self.events.append(event)
        self.total += amount
        return event

    def settle(self, event: _Event, amount: int) -> None:
        """Replace what an event (a reservation) counts by what was used, while it is in the window."""
        if event.alive:
            self.total += amount - event.amount
            event.amount = amount

    def wait_s(self, now: float, cap: float) -> float:
        """Seconds until the sum is at most `cap` (events leave the window oldest first)."""
        left = self.total
        for event in self.events:
            if left <= cap:
                break
            left -= event.amount
            if left <= cap:
                return max(0.0, event.at + WINDOW_S - now)
        return 0.0


class Admission:
    """An admitted request: the tokens it reserved (settled on its usage) and its slot among the key's
    concurrent requests. `settle` once, when the response has ended (however it ended)."""

    def __init__(self, limiter: "KeyLimiter", key_id: str, tokens: Optional[_Event], slot: bool):
        self.limiter, self.key_id, self._tokens, self._slot, self._done = limiter, key_id, tokens, slot, False

    @property
    def reserved(self) -> int:
        return self._tokens.amount if self._tokens else 0

    def settle(self, used_tokens: int) -> None:
        if self._done:
            return
        self._done = True
        self.limiter._settle(self.key_id, self._tokens, used_tokens, self._slot)


class KeyLimiter:
    """Admits or refuses a key's requests by its limits (`KeyLimitsConfig.for_key`), scaled by `share`.

    Tokens are reserved when a request is admitted (its prompt and max_tokens for every choice: the
    most it can use) and settled to what it used when it ends, so concurrent requests cannot
    together go past the limit; a request is refused when its reservation does not fit in what is
    left of the key's window. The check and the counting happen in one call with no await in
    between, so two requests of one event loop cannot both take the last room."""

    def __init__(self, limits: KeyLimitsConfig, share: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic):
        self.limits = limits
        self.share = 1.0 / limits.split_over_replicas if share is None else share
        if not 0 < self.share <= 1:
            raise ValueError(f"share={share}: must lie in (0, 1] (this replica's part of each limit)")
        self.clock = clock
        self._requests: dict[str, _Window] = {}
        self._tokens: dict[str, _Window] = {}
        self._running: dict[str, int] = {}
        self._next_sweep = clock() + WINDOW_S

    def allowed(self, key_id: str) -> tuple[float, float]:
        """(requests, tokens) per minute this replica allows the key; 0: no limit. At least one
        request, so a small limit split over many replicas does not close the key."""
        rpm, tpm = self.limits.for_key(key_id)
        requests = max(1, math.floor(rpm * self.share)) if rpm else 0
        tokens = max(1.0, tpm * self.share) if tpm else 0.0
        return requests, tokens

    def concurrency(self, key_id: str) -> int:
        """Requests of the key this replica runs at once; 0: no limit (at least 1 when limited)."""
        limit = self.limits.concurrency_for_key(key_id)
        return max(1, math.floor(limit * self.share)) if limit else 0

    def admit(self, key_id: str, tokens: int = 0) -> Union[Admission, Refusal]:
        """Count a request of the key that may use up to `tokens` tokens and return its `Admission`,
        or return why it must wait (nothing counted)."""
        now = self.clock()
        self._sweep(now)
        max_requests, max_tokens = self.allowed(key_id)
        max_running = self.concurrency(key_id)
        need = max(1, tokens)
        if max_tokens and need > max_tokens:
            return Refusal("tokens", max_tokens, 0, WINDOW_S, requested=need)
        refusals = []
        for name, windows, allowed, amount in (("requests", self._requests, max_requests, 1),
                                               ("tokens", self._tokens, max_tokens, need)):
            window = self._slid(windows, key_id, now) if allowed else None
            if window is not None and window.total + amount > allowed:
                refusals.append(Refusal(name, allowed, window.total, window.wait_s(now, allowed - amount)))
        running = self._running.get(key_id, 0)
        if max_running and running >= max_running:
            refusals.append(Refusal("concurrency", max_running, running, CONCURRENCY_RETRY_S))
        if refusals:  # the longest wait: retrying after it passes every limit
            return max(refusals, key=lambda r: r.retry_after_s)
        if max_requests:
            self._requests.setdefault(key_id, _Window()).add(now, 1)
        reserved = self._tokens.setdefault(key_id, _Window()).add(now, tokens) if max_tokens and tokens else None
        if max_running:
            self._running[key_id] = running + 1
        return Admission(self, key_id, reserved, bool(max_running))

    def _settle(self, key_id: str, reserved: Optional[_Event], used: int, slot: bool) -> None:
        if reserved is not None:
            window = self._tokens.get(key_id)
            if window is not None:
                window.settle(reserved, max(0, used))
        if slot:
            left = self._running.get(key_id, 1) - 1
            if left > 0:
                self._running[key_id] = left
            else:
                self._running.pop(key_id, None)

    @staticmethod
    def _slid(windows: dict[str, _Window], key_id: str, now: float) -> Optional[_Window]:
        """The key's window with what is older than WINDOW_S dropped; None when it has none."""
        window = windows.get(key_id)
        if window is not None:
            window.slide(now)
        return window

    def _sweep(self, now: float) -> None:
        """Once a window's length, forget keys whose windows are empty (memory stays bounded by the
        keys active in the last minute). A window with a reservation still running is not empty:
        the reservation stays in it until it is settled or slides out."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + WINDOW_S
        for windows in (self._requests, self._tokens):
            for key_id in list(windows):
                windows[key_id].slide(now)
                if not windows[key_id].events:
                    del windows[key_id]


CONCURRENCY_RETRY_S = 1.0  # a concurrency slot frees when a running request ends: no window says when


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"
