"""The canary's decision (issue 34, item 3): from the per-version numbers the edge records
(`raylm.serve.canary.VersionRecorder.summary`), finish the canary, roll it back, or wait.

NOT WIRED YET: `raylm promote --canary PCT/--finish/--abort` and `serve.canary.auto` do not exist
yet; this is the rule they are to apply, unit-tested.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class CanaryPolicy:
    """When to judge and by how much the candidate may be worse than the live version.

    min_requests: the candidate's (and, for p95, the live version's) requests before any judgement.
    finish_after_requests: the candidate's requests after which a canary not rolled back completes.
    error_rate_margin: how far (absolute, 0.02 = 2 points) the candidate's error rate may exceed the
      live version's.
    p95_ratio: how many times the live version's p95 latency the candidate's may be."""

    min_requests: int = 20
    finish_after_requests: int = 200
    error_rate_margin: float = 0.02
    p95_ratio: float = 1.5

    def __post_init__(self) -> None:
        if not 1 <= self.min_requests <= self.finish_after_requests:
            raise ValueError(f"CanaryPolicy: need 1 <= min_requests ({self.min_requests}) <= finish_after_requests "
                             f"({self.finish_after_requests})")
        if not 0 <= self.error_rate_margin < 1 or self.p95_ratio < 1:
            raise ValueError(f"CanaryPolicy: error_rate_margin {self.error_rate_margin} must be in [0, 1) and "
                             f"p95_ratio {self.p95_ratio} at least 1")


@dataclass(frozen=True)
class Decision:
    action: Literal["wait", "finish", "rollback"]
    reason: str


def decide(live: dict, candidate: dict, policy: CanaryPolicy = CanaryPolicy()) -> Decision:
    """Roll back when the candidate's error rate exceeds the live version's by more than the margin,
    or its p95 latency is more than `p95_ratio` times the live one's; finish once it has answered
    `finish_after_requests` without either; else wait. `live`, `candidate`: summaries with
    requests, error_rate and p95_s."""
    n = candidate["requests"]
    if n < policy.min_requests:
        return Decision("wait", f"candidate has {n} of the {policy.min_requests} requests needed to judge it")
    ours, theirs = candidate["error_rate"], live["error_rate"] if live["requests"] else 0.0
    if ours > theirs + policy.error_rate_margin:
        return Decision("rollback", f"candidate error rate {ours:.1%} over {n} requests vs live {theirs:.1%} "
                        f"(margin {policy.error_rate_margin:.1%})")
    timed = live["requests"] >= policy.min_requests and bool(live["p95_s"]) and candidate["p95_s"] is not None
    if timed and candidate["p95_s"] > live["p95_s"] * policy.p95_ratio:
        return Decision("rollback", f"candidate p95 {candidate['p95_s'] * 1000:.0f} ms vs live "
                        f"{live['p95_s'] * 1000:.0f} ms (more than {policy.p95_ratio:g}x)")
    if n >= policy.finish_after_requests:
        latency = f"p95 within {policy.p95_ratio:g}x of live" if timed else \
            f"p95 not compared (live answered {live['requests']} requests)"
        return Decision("finish", f"candidate answered {n} requests: error rate {ours:.1%} (live {theirs:.1%}), "
                        f"{latency}")
    return Decision("wait", f"candidate has {n} of {policy.finish_after_requests} requests; no worse so far")
