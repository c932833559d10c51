"""Serving under load and faults on real Ray Serve + vLLM over loopback HTTP (port 8223), one app
for the module, built by `deployments.openai_app:app_builder` (the path `serve run` and the
RayService take). A vLLM engine takes ~45 s to start, so the tests run in order on that app:

1. idle, the app holds at min_replicas; a burst scales the deployment from 1 to 2 replicas on
   raylm's engine policy (`serve.autoscaling.policy: engine`): 6 clients against max_num_seqs 2
   keep requests waiting in the engine, while max_ongoing_requests 4 keeps every replica far below
   Serve's default trigger (16 ongoing per replica), so the scale-up can only come from the
   engine's waiting queue; a replica SIGKILLed under a stream of requests is replaced by Serve,
   and fewer than 1% of the requests fail (client retries on 503 only);
2. the vLLM engine process killed inside a live replica: the replica exits at once (raylm's engine
   watcher), /health turns 503 (the edge finds no healthy replica), Serve replaces the replica, and
   the endpoint serves again (22 s here, against 85 s when Serve's health checks found the replica);
3. past max_ongoing_requests + max_queued_requests, requests are refused fast with 503 and
   Retry-After, nothing hangs, no replica dies, the edge's memory stays flat;
4. once the load is gone the engine policy returns the deployment to min_replicas (nothing
   waits, the KV caches are empty) and it serves normally.

The engine is killed before the overload: the overload also scales the deployment up, and the kill
needs one replica, so after it the test waited ~40 s for that replica to start and go again.
"""

from __future__ import annotations

import concurrent.futures as cf
import statistics
import threading
import time

import httpx
import pytest
from reliability_helpers import (MODEL_ID, PORT, auth, drop_edge_replicas, kill_pid, list_actors, proc_rss_mb,
                                 replica_actors, running_replicas, serve_overrides, wait_for)

pytestmark = pytest.mark.timeout(400)

APP = "load"
BURST_S, CLIENTS, KILL_AFTER_S = 20.0, 6, 6.0
MAX_FAILED_SHARE = 0.01


@pytest.fixture(scope="module")
def url(serve_up, tiny_checkpoint, key_file):
    from ray import serve

    from deployments.openai_app import app_builder

    overrides = serve_overrides(
        key_file, APP, "serve.max_num_seqs=2", "serve.autoscaling.policy=engine", "serve.autoscaling.min_replicas=1",
        "serve.autoscaling.max_replicas=2", "serve.autoscaling.upscale_delay_s=1",
        "serve.autoscaling.downscale_delay_s=5", "serve.autoscaling.look_back_period_s=2",
        "serve.autoscaling.metrics_interval_s=0.5", "serve.max_ongoing_requests=4", "serve.max_queued_requests=8",
        "serve.retry_after_s=2")
    serve.run(app_builder({"checkpoint": tiny_checkpoint, "set": overrides}), name=APP, route_prefix=f"/{APP}")
    yield f"http://127.0.0.1:{PORT}/{APP}"
    drop_edge_replicas(APP)
    serve.delete(APP)


def complete(client: httpx.Client, url: str, max_tokens: int,
             retries_on_503: int = 0) -> tuple[int, float, httpx.Response | None]:
    """(final status, seconds, response); a transport error is status 0. Retries only on 503."""
    t0 = time.monotonic()
    for attempt in range(retries_on_503 + 1):
        try:
            resp = client.post(f"{url}/v1/completions", headers=auth(), timeout=60,
                               json={"model": MODEL_ID, "prompt": "load test", "max_tokens": max_tokens,
                                     "temperature": 0})
        except httpx.HTTPError:
            return 0, time.monotonic() - t0, None
        if resp.status_code != 503 or attempt == retries_on_503:
            return resp.status_code, time.monotonic() - t0, resp
        time.sleep(min(float(resp.headers.get("retry-after", "1")), 2.0))
    raise AssertionError("unreachable")


def test_a_burst_scales_up_and_a_replica_killed_under_load_is_replaced(url):
    assert running_replicas(APP) == 1
    # idle: nothing waits, so the engine policy holds at min_replicas over several look-back windows
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        assert len(replica_actors(APP)) == 1 and running_replicas(APP) == 1, "scaled up with no load"
        time.sleep(0.5)
    stop = threading.Event()
    statuses: list[int] = []

    def client_loop() -> None:
        with httpx.Client() as client:
            while not stop.is_set():
                statuses.append(complete(client, url, max_tokens=24, retries_on_503=3)[0])

    with cf.ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(client_loop) for _ in range(CLIENTS)]
        try:
            t0 = time.monotonic()
            wait_for(lambda: running_replicas(APP) >= 2, 240, "the burst to scale the deployment to 2 replicas",
                     interval_s=1)
            print(f"\nsecond replica RUNNING {time.monotonic() - t0:.1f} s into the burst")
            before, served_before = replica_actors(APP), len(statuses)
            assert len(before) == 2 and set(statuses) <= {200}, sorted(set(statuses))
            time.sleep(KILL_AFTER_S)
            victim = before[0]
            kill_pid(victim.pid)
            time.sleep(BURST_S - KILL_AFTER_S)
        finally:
            stop.set()
            for f in futures:
                f.result(timeout=120)
    burst = statuses[served_before:]
    failed = [s for s in burst if s != 200]
    share = len(failed) / max(len(burst), 1)
    print(f"replica kill: {len(burst)} requests, {len(failed)} failed ({share:.2%}), codes {sorted(set(failed))}")
    assert len(burst) >= 50, f"the burst served only {len(burst)} requests"
    assert share < MAX_FAILED_SHARE, f"{share:.2%} of requests failed: {failed}"
    wait_for(lambda: victim.actor_id not in {a.actor_id for a in replica_actors(APP)} and running_replicas(APP) >= 1,
             150, "Serve to replace the killed replica", interval_s=1)
    with httpx.Client() as client:
        assert complete(client, url, max_tokens=4)[0] == 200


def test_an_engine_killed_inside_a_live_replica_turns_health_503_and_the_replica_is_replaced(url):
    import psutil

    # the replica scaled down after the burst may still be finishing its graceful shutdown
    wait_for(lambda: len(replica_actors(APP)) == 1, 120, "one LLM replica process", interval_s=1)
    (replica,) = replica_actors(APP)
    engines = [p for p in psutil.Process(replica.pid).children(recursive=True) if "python" in p.name().lower()
               or "VLLM" in p.name() or "Engine" in p.name()]
    assert engines, "no engine process under the replica"
    for proc in engines:
        kill_pid(proc.pid)
    wait_for(lambda: httpx.get(f"{url}/health", timeout=30).status_code == 503, 60,
             "/health to report the dead engine (503)", interval_s=0.5)
    wait_for(lambda: replica.actor_id not in {a.actor_id for a in replica_actors(APP)} and running_replicas(APP) >= 1,
             240, "Serve to replace the replica whose engine died", interval_s=1)
    wait_for(lambda: httpx.get(f"{url}/health", timeout=30).status_code == 200, 120, "/health 200 again", interval_s=1)
    with httpx.Client() as client:
        assert complete(client, url, max_tokens=4)[0] == 200


def test_overload_is_refused_fast_with_503_and_retry_after(url):
    # the process every request of the burst goes through (HAProxy forwards to the edge replica)
    edge = next(a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
                if a.class_name == f"ServeReplica:{APP}:RaylmEdge")
    alive = {a.actor_id for a in replica_actors(APP)}
    rss0 = proc_rss_mb(edge.pid)
    rounds, per_round = 3, 48
    codes, refused_s, retry_after = [], [], set()
    for _ in range(rounds):
        t0 = time.monotonic()
        with httpx.Client(limits=httpx.Limits(max_connections=per_round)) as client, \
                cf.ThreadPoolExecutor(per_round) as pool:
            results = list(pool.map(lambda _: complete(client, url, max_tokens=48), range(per_round)))
        assert time.monotonic() - t0 < 90, "a burst hung"
        codes += [c for c, _, _ in results]
        refused_s += [s for c, s, _ in results if c == 503]
        retry_after |= {r.headers.get("retry-after") for c, _, r in results if c == 503}
    p99 = sorted(refused_s)[int(0.99 * (len(refused_s) - 1))] if refused_s else float("nan")
    rss1 = proc_rss_mb(edge.pid)
    print(f"overload: {len(codes)} requests, {codes.count(200)} served, {codes.count(503)} refused "
          f"(p50 {statistics.median(refused_s or [0]) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms); "
          f"edge RSS {rss0:.0f} -> {rss1:.0f} MB")
    assert set(codes) <= {200, 503}, sorted(set(codes))
    assert codes.count(503) >= len(codes) // 3 and codes.count(200) >= rounds
    assert retry_after == {"2"} and p99 < 2.0, (retry_after, p99)
    assert rss1 - rss0 < 64, f"edge RSS grew {rss0:.0f} -> {rss1:.0f} MB"
    assert alive <= {a.actor_id for a in replica_actors(APP)}, "a replica died under overload"
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


def test_back_to_min_replicas_after_the_load(url):
    wait_for(lambda: running_replicas(APP) == 1, 120, "the deployment to return to min_replicas", interval_s=1)
    with httpx.Client() as client:
        assert complete(client, url, max_tokens=4)[0] == 200
