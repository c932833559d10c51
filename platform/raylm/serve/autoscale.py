"""Autoscaling on what the engines know: `serve.autoscaling.policy: engine`.

Serve's default policy counts ongoing requests per replica. A continuous-batching engine is
better read by its own scheduler: requests *waiting* for a batch slot (or for KV-cache blocks)
mean the replicas are full, whatever the ongoing count; running sequences and KV-cache use say
how much of a replica the load fills.

Two halves, both here so Serve can find them by import path:
- in each replica, `EngineLoad` rides on vLLM's stat-logger hook (the engine reports its
  scheduler's counts after every step, in-process, for free) and `replica_stats` turns it into
  the dict `RaylmServer.record_autoscaling_stats` returns; Serve samples it every
  look_back_period_s / 5, averages it over look_back_period_s and pushes it to the controller;
- in the Serve controller, `EngineSignalPolicy` turns those per-replica averages into a replica
  count. Serve wraps it with up/downscaling_factor and the up/downscale delays, then bounds it
  by min/max_replicas.

No Ray or vLLM import at module level: serve/options.py (which Kubernetes rendering uses without
either) imports this module, Serve imports it again by path where the app is built to pickle the
policy by value, and the controller runs the policy without vLLM.
"""

from __future__ import annotations

import math
from typing import Any, Optional

ENGINE_POLICY = "raylm.serve.autoscale:EngineSignalPolicy"  # what `policy: engine` stands for

# The metric names each replica reports (Serve keys custom metrics by these names).
WAITING = "raylm_engine_waiting"  # requests the engine holds but has not scheduled
RUNNING = "raylm_engine_running"  # sequences in the engine's running batch
KV_CACHE = "raylm_engine_kv_cache_usage"  # share of the KV cache in use, 0..1


class EngineLoad:
    """A vLLM stat logger that keeps the engine scheduler's latest counts (one per data-parallel
    engine) for `replica_stats` to read. vLLM calls `record` after every engine step with the
    scheduler's stats; nothing else here costs anything. Duck-typed to vLLM's aggregate stat
    logger interface, so this module needs no vLLM import."""

    def __init__(self) -> None:
        self.by_engine: dict[int, tuple[int, int, float]] = {}

    def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
               engine_idx: int = 0) -> None:
        if scheduler_stats is not None:
            s = scheduler_stats
            self.by_engine[engine_idx] = (s.num_running_reqs, s.num_waiting_reqs + s.num_skipped_waiting_reqs,
                                          float(s.kv_cache_usage))

    def log(self) -> None:
        pass

    def log_engine_initialized(self) -> None:
        pass

    def record_sleep_state(self, *args: Any) -> None:
        pass

    def record_admission_rejection(self, reason: str) -> None:
        pass


def attach(engine_client: Any) -> Optional[EngineLoad]:
    """Add an `EngineLoad` to a vLLM AsyncLLM's stat loggers (None: the engine keeps no stats;
    raylm's engines do, they export vLLM's metrics). vLLM 0.32 has no public add_logger for
    AsyncLLM; its output loop reads the same StatLoggerManager object, so appending to it works."""
    manager = getattr(engine_client, "logger_manager", None)
    if manager is None:
        return None
    load = EngineLoad()
    manager.stat_loggers.append(load)
    return load


def replica_stats(load: Optional[EngineLoad], unfinished: int) -> dict[str, float]:
    """What one replica reports: running and waiting requests and KV-cache use of its engine(s).

    `unfinished` is the frontend's live count of requests in the engine (vLLM's output processor).
    The scheduler's counts only change when the engine steps, so once the engine goes idle its
    last counts would linger: with nothing unfinished the replica reports zeros, and requests the
    frontend has sent but the scheduler has not yet counted are waiting too."""
    if load is None or unfinished == 0 or not load.by_engine:
        return {RUNNING: 0.0, WAITING: float(unfinished), KV_CACHE: 0.0}
    running = sum(r for r, _, _ in load.by_engine.values())
    waiting = max(sum(w for _, w, _ in load.by_engine.values()), unfinished - running)
    return {RUNNING: float(running), WAITING: float(waiting),
            KV_CACHE: max(kv for _, _, kv in load.by_engine.values())}


class EngineSignalPolicy:
    """Serve custom autoscaling policy (a class: Serve builds it once with `policy_kwargs` and
    calls it every control-loop tick with an `AutoscalingContext`).

    - Scale up when the replicas' engines have more than `waiting_per_replica` requests waiting
      per replica (requests queued at Serve's handles count as waiting too), or the busiest
      replica's KV cache is above `kv_cache_high`: to as many replicas as running + waiting
      requests need at `max_num_seqs` each, and at least one more.
    - Scale down when nothing waits and every replica's KV cache is below `kv_cache_low`: to as
      many replicas as the running sequences fill to `seq_fill` of max_num_seqs (idle: none,
      min_replicas then holds).
    - Otherwise keep the current count.
    The counts are Serve's averages over look_back_period_s."""

    def __init__(self, waiting_per_replica: float = 1.0, kv_cache_high: float = 0.9, kv_cache_low: float = 0.5,
                 max_num_seqs: int = 64, seq_fill: float = 0.75):
        self.waiting_per_replica, self.max_num_seqs, self.seq_fill = waiting_per_replica, max_num_seqs, seq_fill
        self.kv_cache_high, self.kv_cache_low = kv_cache_high, kv_cache_low

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        n = ctx.current_num_replicas
        if n == 0:  # no engine to read; Serve's cold start (0 -> 1 on the first request) applies
            return ctx.target_num_replicas, {}
        metrics = ctx.aggregated_metrics or {}
        running = sum(metrics.get(RUNNING, {}).values())
        waiting = sum(metrics.get(WAITING, {}).values()) + (ctx.total_queued_requests or 0.0)
        kv_cache = max(metrics.get(KV_CACHE, {}).values(), default=0.0)
        desired = self.desired_replicas(n, running, waiting, kv_cache)
        return desired, {"engine_signals": {"running": running, "waiting": waiting, "kv_cache": kv_cache,
                                            "desired": desired}}

    def desired_replicas(self, n: int, running: float, waiting: float, kv_cache: float) -> int:
        """The replica count for `n` replicas whose engines run `running` and hold `waiting`
        requests in all, the busiest at `kv_cache` KV-cache use (before Serve's bounds/delays)."""
        if waiting > self.waiting_per_replica * n or kv_cache > self.kv_cache_high:
            return max(n + 1, math.ceil((running + waiting) / self.max_num_seqs))
        if waiting == 0 and kv_cache < self.kv_cache_low:
            return min(n, math.ceil(running / (self.max_num_seqs * self.seq_fill)))
        return n
