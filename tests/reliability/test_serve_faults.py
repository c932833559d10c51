"""Serving under load on real Ray Serve over loopback HTTP (port 8223).

1. A replica is SIGKILLed during a bounded burst: the deployment returns to its replica count
   and the share of requests that failed (after client retries on 503 only) is measured.
2. Overload past the queue limit: 503s come fast with Retry-After, nothing hangs, the replica's
   and the proxy's memory stay flat over repeated bursts, and service is normal afterwards.
"""

from __future__ import annotations

import concurrent.futures as cf
import statistics
import threading
import time

import httpx
import pytest
from reliability_helpers import (MODEL_ID, auth, completes, deploy, healthy, kill_pid, list_actors, proc_rss_mb,
                                 replica_actors, running_replicas, serve_config, wait_for)

pytestmark = pytest.mark.timeout(300)

BURST_S, CLIENTS, KILL_AT_S = 20.0, 6, 6.0
MAX_FAILED_SHARE = 0.01


def request(client: httpx.Client, url: str, max_tokens: int, retries_on_503: int = 0) -> tuple[int, float]:
    """(final status, seconds); a transport error is status 0. Retries only on 503 (Retry-After)."""
    t0 = time.monotonic()
    for attempt in range(retries_on_503 + 1):
        try:
            resp = client.post(f"{url}/v1/completions", headers=auth(), timeout=30,
                               json={"model": MODEL_ID, "prompt": "load test", "max_tokens": max_tokens,
                                     "temperature": 0})
        except httpx.HTTPError:
            return 0, time.monotonic() - t0
        if resp.status_code != 503 or attempt == retries_on_503:
            return resp.status_code, time.monotonic() - t0
        time.sleep(min(float(resp.headers.get("retry-after", "1")), 2.0))
    raise AssertionError("unreachable")


def test_killing_a_replica_under_load_recovers_with_few_failed_requests(serve_up, tiny_checkpoint, key_file):
    from ray import serve

    app = "killrep"
    cfg = serve_config(key_file, app, "serve.autoscaling.min_replicas=2", "serve.autoscaling.max_replicas=2",
                       "serve.max_batch_size=8", "serve.batch_wait_timeout_s=0.01", "serve.max_ongoing_requests=8",
                       "serve.max_queued_requests=64", "serve.retry_after_s=1")
    url = deploy(cfg, tiny_checkpoint)
    before = replica_actors(app)
    assert running_replicas(app) == 2 and len(before) == 2
    stop = threading.Event()
    statuses: list[int] = []

    def client_loop() -> None:
        with httpx.Client() as client:
            while not stop.is_set():
                statuses.append(request(client, url, max_tokens=8, retries_on_503=3)[0])

    victim = before[0]
    with cf.ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(client_loop) for _ in range(CLIENTS)]
        time.sleep(KILL_AT_S)
        kill_pid(victim.pid)
        time.sleep(BURST_S - KILL_AT_S)
        stop.set()
        for f in futures:
            f.result(timeout=60)
    failed = [s for s in statuses if s != 200]
    share = len(failed) / max(len(statuses), 1)
    print(f"replica kill: {len(statuses)} requests, {len(failed)} failed ({share:.2%}), codes {sorted(set(failed))}")

    # the deployment recovers to 2 running replicas, one of them new
    wait_for(lambda: running_replicas(app) == 2 and victim.actor_id not in {a.actor_id for a in replica_actors(app)}
             and len(replica_actors(app)) == 2, 120, "the deployment to return to 2 replicas", interval_s=1)
    assert healthy(url) and completes(url)
    assert len(statuses) >= 50, f"the burst served only {len(statuses)} requests"
    assert share < MAX_FAILED_SHARE, f"{share:.2%} of requests failed: {failed}"
    serve.delete(app)


def test_overload_gives_fast_503s_no_hang_stable_memory_and_recovers(serve_up, tiny_checkpoint, key_file):
    from ray import serve

    app = "overload"
    cfg = serve_config(key_file, app, "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=1",
                       "serve.max_ongoing_requests=1", "serve.max_queued_requests=2", "serve.max_batch_size=1",
                       "serve.retry_after_s=1")
    url = deploy(cfg, tiny_checkpoint)
    replica = replica_actors(app)[0]
    proxy = next(a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000) if a.class_name == "ProxyActor")
    assert completes(url)
    rss0 = {"replica": proc_rss_mb(replica.pid), "proxy": proc_rss_mb(proxy.pid)}

    rounds, per_round = 4, 48
    refused_latencies, codes = [], []
    for _ in range(rounds):
        t0 = time.monotonic()
        with httpx.Client(limits=httpx.Limits(max_connections=per_round)) as client, \
                cf.ThreadPoolExecutor(per_round) as pool:
            results = list(pool.map(lambda _: request(client, url, max_tokens=48), range(per_round)))
        elapsed = time.monotonic() - t0
        assert elapsed < 60, f"a burst of {per_round} took {elapsed:.0f}s"
        codes += [c for c, _ in results]
        refused_latencies += [s for c, s in results if c == 503]
    rss1 = {"replica": proc_rss_mb(replica.pid), "proxy": proc_rss_mb(proxy.pid)}

    refused = codes.count(503)
    p50 = statistics.median(refused_latencies) if refused_latencies else float("nan")
    p99 = sorted(refused_latencies)[int(0.99 * (len(refused_latencies) - 1))] if refused_latencies else float("nan")
    print(f"overload: {len(codes)} requests, {codes.count(200)} served, {refused} refused with 503 "
          f"(p50 {p50 * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max {max(refused_latencies) * 1000:.0f} ms); "
          f"RSS MB before {rss0} after {rss1}")
    assert set(codes) <= {200, 503}, sorted(set(codes))
    assert refused >= len(codes) // 2 and codes.count(200) >= rounds
    assert p99 < 2.0, f"503s are not fast: p99 {p99:.2f}s"
    for name in rss0:
        assert rss1[name] - rss0[name] < 64, f"{name} RSS grew {rss0[name]:.0f} -> {rss1[name]:.0f} MB"
    # normal service after the burst, on the same replica (it did not die)
    assert healthy(url) and completes(url, max_tokens=8)
    assert [a.actor_id for a in replica_actors(app)] == [replica.actor_id]
    serve.delete(app)
