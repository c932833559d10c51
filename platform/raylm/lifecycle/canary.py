"""Canary rollouts: `raylm promote --canary PCT`, `--finish` and `--abort`, and the rule that
judges a canary from what each version answered (`serve.canary`).

A canary deploys the candidate as a second LLM deployment beside the live one (the live replicas
are untouched: their inputs are the same) and has the edge send it PCT% of conversations
(serve/canary.py). The edge replicas write per-version counts (requests, errors, latencies) to
`<storage>/serve/<app>/canary/<id>/`; `decide` reads them. Finishing rolls the candidate's
checkpoint into the model deployment as a promotion does (surge, drain), with the canary
deployment kept but no longer routed to, then removes it; aborting stops routing to it and
removes it. Each step is recorded in the promotion history: a `canary` entry (intent, then done,
failed or interrupted), then either a `promote` entry naming it (`canary: <id>`) or a
`canary_abort` entry. While a canary runs no other promote or rollback starts.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Literal, Optional

from raylm import storage
from raylm.config import RaylmConfig
from raylm.config.serve import CanaryConfig
from raylm.console import say
from raylm.errors import InputError, ServeDeployError
from raylm.lifecycle.history import history_uri, next_version, record, refuse_while_running, running_canary
from raylm.lifecycle.lock import promotion_lock
from raylm.lifecycle.record import deployment, write_record
from raylm.serve.canary import EMPTY_SUMMARY, merged_summary

POLL_S = 2.0  # how often `serve.canary.auto` reads the edge's numbers


@dataclass(frozen=True)
class Decision:
    action: Literal["wait", "finish", "rollback"]
    reason: str


def decide(live: dict, candidate: dict, policy: CanaryConfig) -> Decision:
    """Roll back when the candidate's error rate exceeds the live version's by more than
    `error_rate_margin`, or its p95 latency is more than `p95_ratio` times the live one's (judged
    once each has `min_requests`); finish once it has answered `finish_after_requests` without
    either; else wait. `live`, `candidate`: summaries with requests, error_rate and p95_s."""
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


# ------------------------------------------------------------------ state in the history


def stats_uri(cfg: RaylmConfig, canary_id: str) -> str:
    return storage.join(storage.parent(history_uri(cfg)), "canary", canary_id)


def read_stats(cfg: RaylmConfig, canary: dict) -> dict[str, dict]:
    """Per-version summaries (requests, errors, error_rate, p95_s) over every edge replica's file,
    with both versions present."""
    uri = stats_uri(cfg, canary["id"])
    parts = []
    if storage.kind(uri) == "dir":
        for name in storage.list_dir(uri):
            try:
                part = storage.read_json(storage.join(uri, name))
            except storage.StorageError:
                continue  # being written: the next read has it
            if isinstance(part, dict) and part.get("canary") == canary["id"]:
                parts.append(part.get("versions") or {})
    merged = merged_summary(parts)
    return {v: merged.get(v, EMPTY_SUMMARY) for v in (canary["from_version"], canary["version"])}


def describe_stats(stats: dict[str, dict]) -> str:
    """`v2: 130 requests, 0.0% errors, p95 41 ms; v3: ...`"""
    def p95(s: dict) -> str:
        return "-" if s["p95_s"] is None else f"{s['p95_s'] * 1000:.0f} ms"

    return "; ".join(f"{v}: {s['requests']} requests, {s['error_rate']:.1%} errors, p95 {p95(s)}"
                     for v, s in stats.items())


# ------------------------------------------------------------------ the verbs


def start(cfg: RaylmConfig, candidate: str, percent: float, force: bool = False, overrides: Any = (),
          reconfigure: bool = False) -> dict:
    """`raylm promote --canary PCT`: gate the candidate (unless `force`), deploy it beside the
    live model with PCT% of conversations, and record it. With `serve.canary.auto`, watch it and
    finish or roll it back (`watch`)."""
    from raylm.lifecycle.rollout import gated

    if not 0 < percent < 100:
        raise InputError(f"--canary {percent:g}: the candidate's share of requests, in percent, must lie in (0, 100)")
    if not deployment(cfg, overrides, reconfigure)[0].serve.edge.enabled:  # before the gate's evaluations
        raise InputError("--canary needs serve.edge.enabled=true: the edge splits the requests between versions")
    with promotion_lock(cfg, "canary"):
        history, live, (target, keys, _), metrics = gated(cfg, candidate, force, overrides, reconfigure, "new canary")
        entry = _deploy_canary(cfg, target, keys, candidate, next_version(history), percent, live, metrics, force)
    if cfg.serve.canary.auto:
        return watch(cfg, entry)
    say(f"canary {entry['version']} serves {percent:g}% of conversations beside {live['version']}; "
        "`raylm promote --finish` puts it live, `--abort` removes it (`raylm status` shows both versions' numbers)",
        event="canary", entry=entry)
    return entry


def _deploy_canary(cfg: RaylmConfig, target: RaylmConfig, keys: Any, candidate: str, version: str, percent: float,
                   live: dict, metrics: dict, forced: bool) -> dict:
    from raylm.lifecycle.rollout import _first_line, _restore, _terminate_as_interrupt
    from raylm.serve.app import CanarySpec, deploy, live_drain_s

    op = uuid.uuid4().hex[:12]
    move = {"action": "canary", "id": op, "version": version, "checkpoint": candidate, "percent": percent,
            "from_version": live["version"], "from_checkpoint": live["checkpoint"]}
    spec = CanarySpec(candidate, version, percent, op, stats_uri(cfg, op))
    say(f"starting canary {version} ({candidate}) with {percent:g}% of conversations beside {live['version']}",
        event="canary_start", version=version)
    record(cfg, state="intent", **move)
    try:
        with _terminate_as_interrupt():
            # the candidate's replicas first, taking no requests: the edge routes to them only once
            # they are up (routed at once, its share of requests queued ~30 s for the engine to start)
            deploy(target, live["checkpoint"], live["version"], keys, cfg.serve.rollout_timeout_s,
                   canary=replace(spec, routed=False))
            deploy(target, live["checkpoint"], live["version"], keys, cfg.serve.rollout_timeout_s, canary=spec,
                   drain_s=live_drain_s(target.serve))  # only the edge's routing changed: sized just now
    except KeyboardInterrupt as exc:
        restored = _restore(target, keys, live)
        record(cfg, state="interrupted", signal=str(exc) or "SIGINT", restored=restored is None, **move)
        raise
    except Exception as exc:  # noqa: BLE001 - the live model's replicas never stopped: drop the candidate's
        restored = _restore(target, keys, live)
        error = f"canary of {candidate} failed: {_first_line(exc)}; " + (
            f"{live['version']} keeps serving" if restored is None else f"removing it failed too: {restored}")
        record(cfg, state="failed", error=error, **move)
        raise ServeDeployError(error) from None
    return record(cfg, state="done", **move, metrics=metrics, forced=forced)


def _current(cfg: RaylmConfig) -> tuple[dict, dict]:
    from raylm.lifecycle.rollout import require_live

    history, live = require_live(cfg)
    canary = running_canary(history)
    if canary is None:
        raise InputError(f"no canary is running ({history_uri(cfg)}): start one with `raylm promote --canary PCT CKPT`")
    return canary, live


def _unrouted(cfg: RaylmConfig, canary: dict) -> Any:
    """The running canary's deployment, kept while the edge sends it nothing (finish, abort)."""
    from raylm.serve.app import CanarySpec

    return CanarySpec(canary["checkpoint"], canary["version"], canary["percent"], canary["id"],
                      stats_uri(cfg, canary["id"]), routed=False)


def finish(cfg: RaylmConfig, reason: str = "by hand") -> dict:
    """`raylm promote --finish`: the candidate goes live as a promotion (recorded as `promote`,
    naming the canary), with the canary's numbers."""
    from raylm.lifecycle.rollout import require_serving
    from raylm.serve.app import deploy, live_drain_s

    with promotion_lock(cfg, "canary finish"):
        canary, live = _current(cfg)
        require_serving(cfg)
        target, keys, kept = deployment(cfg, check=False)
        stats = read_stats(cfg, canary)
        spec = _unrouted(cfg, canary)
        say(f"finishing canary {canary['version']} ({reason}): rolling it out in place of {live['version']} "
            f"({describe_stats(stats)})", event="canary_finish", version=canary["version"])
        op = uuid.uuid4().hex[:12]
        move = {"action": "promote", "id": op, "version": canary["version"], "checkpoint": canary["checkpoint"],
                "from_version": live["version"], "from_checkpoint": live["checkpoint"]}
        record(cfg, state="intent", **move)
        try:
            # the model deployment rolls to the candidate (surge, drain); the canary stays, unrouted ...
            deploy(target, canary["checkpoint"], canary["version"], keys, cfg.serve.rollout_timeout_s, canary=spec)
        except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - put the canary back as it was
            try:
                deploy(target, live["checkpoint"], live["version"], keys, canary=replace(spec, routed=True))
            finally:
                record(cfg, state="failed" if isinstance(exc, Exception) else "interrupted",
                       error=f"finishing the canary failed: {exc}", **move)
            raise
        deploy(target, canary["checkpoint"], canary["version"], keys,  # ... and goes once no edge sends it anything
               drain_s=live_drain_s(target.serve))  # the candidate's replicas, sized by the deploy above
        write_record(target, canary["checkpoint"], canary["version"], keys, kept)
        return record(cfg, state="done", **move, canary=canary["id"], canary_stats=stats, canary_end=reason,
                      metrics=canary.get("metrics", {}), forced=canary.get("forced", False))


def abort(cfg: RaylmConfig, reason: str = "by hand") -> dict:
    """`raylm promote --abort`: the edge stops sending requests to the candidate, then its
    deployment is removed; the live model never stopped. Recorded as `canary_abort`."""
    from raylm.lifecycle.rollout import require_serving
    from raylm.serve.app import deploy, live_drain_s

    with promotion_lock(cfg, "canary abort"):
        canary, live = _current(cfg)
        require_serving(cfg)
        target, keys, _ = deployment(cfg, check=False)
        stats = read_stats(cfg, canary)
        say(f"aborting canary {canary['version']} ({reason}); {live['version']} serves every request "
            f"({describe_stats(stats)})", event="canary_abort", version=canary["version"])
        drain_s = live_drain_s(target.serve)  # the live replicas' window stays as it was sized
        deploy(target, live["checkpoint"], live["version"], keys, canary=_unrouted(cfg, canary),
               drain_s=drain_s)  # edges stop routing to it ...
        deploy(target, live["checkpoint"], live["version"], keys, drain_s=drain_s)  # ... then it goes
        return record(cfg, action="canary_abort", state="done", canary=canary["id"], version=canary["version"],
                      checkpoint=canary["checkpoint"], live_version=live["version"], reason=reason,
                      canary_stats=stats)


def watch(cfg: RaylmConfig, canary: dict) -> dict:
    """`serve.canary.auto`: read the edge's numbers every POLL_S and finish or roll back the canary
    by `decide`; after `serve.canary.watch_timeout_s` stop watching and leave it running."""
    policy = cfg.serve.canary
    deadline = time.monotonic() + policy.watch_timeout_s
    said = ""
    while time.monotonic() < deadline:
        stats = read_stats(cfg, canary)
        decision = decide(stats[canary["from_version"]], stats[canary["version"]], policy)
        if decision.action == "finish":
            return finish(cfg, reason=f"serve.canary.auto: {decision.reason}")
        if decision.action == "rollback":
            return abort(cfg, reason=f"serve.canary.auto: {decision.reason}")
        if decision.reason != said:
            say(f"canary {canary['version']}: {decision.reason}", event="canary_wait", stats=stats)
            said = decision.reason
        time.sleep(POLL_S)
    say(f"serve.canary.watch_timeout_s={policy.watch_timeout_s:g} s passed: canary {canary['version']} keeps "
        "running; `raylm promote --finish` or `--abort` ends it", event="canary_watch_timeout")
    return canary
