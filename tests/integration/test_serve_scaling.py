"""Load behaviour on real Ray Serve: a burst scales the deployment up and it returns to
min_replicas afterwards; beyond max_queued_requests requests are refused fast with 503 and
Retry-After, and the service is normal once the burst is over. The overload app is built by
`deployments.openai_app:app_builder`, the path `serve run` and the RayService take."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time

import httpx
import pytest
from serve_fixtures import (MODEL_ID, PORT, auth, deploy_app, key_file, running_replicas, serve_config,
                            shutdown_serve, tiny_checkpoint, wait_until)

__all__ = ["key_file", "tiny_checkpoint"]

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def _serve_down_after(ray_cluster):
    yield
    shutdown_serve()


def complete(url: str, max_tokens: int, timeout_s: float = 60) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", headers=auth(), timeout=timeout_s,
                      json={"model": MODEL_ID, "prompt": "load", "max_tokens": max_tokens, "temperature": 0})


def test_burst_scales_up_and_back_down(ray_cluster, tiny_checkpoint, key_file):
    from ray import serve

    cfg = serve_config(key_file, "serve.app_name=scaling", "serve.autoscaling.min_replicas=1",
                       "serve.autoscaling.max_replicas=2", "serve.autoscaling.target_ongoing_requests=1",
                       "serve.autoscaling.upscale_delay_s=1", "serve.autoscaling.downscale_delay_s=2",
                       "serve.max_batch_size=2", "serve.max_ongoing_requests=4", "serve.max_queued_requests=-1")
    url = deploy_app(cfg, tiny_checkpoint)
    assert running_replicas("scaling") == 1
    stop, errors = threading.Event(), []

    def client() -> int:
        done = 0
        while not stop.is_set():
            resp = complete(url, max_tokens=48)
            if resp.status_code != 200:
                errors.append(resp.text)
            done += 1
        return done

    started = time.monotonic()
    with cf.ThreadPoolExecutor(6) as pool:
        clients = [pool.submit(client) for _ in range(6)]
        try:
            scaled_up = wait_until(lambda: running_replicas("scaling") >= 2, timeout_s=75)
        finally:
            stop.set()
        served = sum(c.result() for c in clients)
    up_s = time.monotonic() - started
    assert scaled_up, f"still {running_replicas('scaling')} replica(s) after {up_s:.0f}s of load ({served} requests)"
    assert not errors, errors[:3]
    assert wait_until(lambda: running_replicas("scaling") == 1, timeout_s=90), "did not return to min_replicas"
    assert complete(url, max_tokens=2).status_code == 200
    serve.delete("scaling")


def test_overload_is_refused_fast_with_503_and_retry_after(ray_cluster, tiny_checkpoint, key_file):
    from ray import serve

    from deployments.openai_app import app_builder

    overrides = [f"serve.port={PORT}", "serve.host=127.0.0.1", f"serve.api_key_file={key_file}",
                 "serve.api_key_env=RAYLM_TEST_NO_SUCH_VAR", f"serve.model_id={MODEL_ID}", "serve.app_name=overload",
                 "serve.num_cpus_per_replica=0.25", "serve.max_tokens_limit=64", "serve.autoscaling.min_replicas=1",
                 "serve.autoscaling.max_replicas=1", "serve.max_ongoing_requests=1", "serve.max_queued_requests=1",
                 "serve.max_batch_size=1", "serve.retry_after_s=2"]
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    serve.run(app_builder({"checkpoint": tiny_checkpoint, "set": overrides}), name="overload", route_prefix="/")
    url = f"http://127.0.0.1:{PORT}"

    def timed(_: int) -> tuple[int, float, str | None]:
        t0 = time.monotonic()
        resp = complete(url, max_tokens=64)
        return resp.status_code, time.monotonic() - t0, resp.headers.get("retry-after")

    with cf.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(timed, range(12)))
    refused = [r for r in results if r[0] == 503]
    assert {code for code, _, _ in results} <= {200, 503}, results
    assert refused and len(refused) < len(results), results
    assert all(elapsed < 5.0 and retry == "2" for _, elapsed, retry in refused), refused
    assert complete(url, max_tokens=4).status_code == 200
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    serve.delete("overload")
