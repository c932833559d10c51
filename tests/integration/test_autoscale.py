"""`serve.autoscaling.policy: engine` on a real Serve app over a real vLLM CPU engine: a load that
keeps requests waiting in the engine scales the deployment up to max_replicas, and it scales back
down once the load stops.

The load (6 concurrent clients) is far below Serve's default policy's trigger (the default
target_ongoing_requests is 16 per replica), so a scale-up here comes from the engine's waiting
queue: max_num_seqs=2 leaves about 4 requests waiting in the engine at any time.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from raylm.serve.options import SERVE_MODEL_DEPLOYMENT
from serve_fixtures import (MODEL_ID, auth, deploy_app, key_file, serve_config, shutdown_serve, tiny_checkpoint,
                            wait_until)

__all__ = ["key_file", "tiny_checkpoint"]  # fixtures used by this module

CLIENTS = 6


def llm_replicas(app: str) -> dict[str, int]:
    """Replica states of the app's LLM deployment (`serve.status()`), e.g. {"RUNNING": 1}."""
    from ray import serve

    status = serve.status().applications.get(app)
    deployment = status.deployments.get(SERVE_MODEL_DEPLOYMENT) if status else None
    return dict(deployment.replica_states) if deployment else {}


def running(app: str) -> int:
    return llm_replicas(app).get("RUNNING", 0)


class Load:
    """CLIENTS threads sending 64-token completions back to back until stopped."""

    def __init__(self, url: str):
        self.url, self.ok, self.failures = url, 0, []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CLIENTS)]

    def __enter__(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)

    def _run(self) -> None:
        body = {"model": MODEL_ID, "prompt": "The king", "max_tokens": 64}
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                try:
                    r = client.post(f"{self.url}/v1/completions", json=body, headers=auth())
                    if r.status_code == 200:
                        self.ok += 1
                    else:
                        self.failures.append((r.status_code, r.text[:200]))
                except httpx.HTTPError as exc:
                    self.failures.append((None, repr(exc)))


@pytest.fixture(scope="module")
def app(ray_cluster, tiny_checkpoint, key_file):
    cfg = serve_config(key_file, "serve.autoscaling.policy=engine", "serve.max_num_seqs=2",
                       "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=2",
                       "serve.autoscaling.upscale_delay_s=2", "serve.autoscaling.downscale_delay_s=5",
                       "serve.autoscaling.look_back_period_s=2", "serve.autoscaling.metrics_interval_s=0.5")
    url = deploy_app(cfg, tiny_checkpoint)
    yield cfg.serve.app_name, url
    shutdown_serve()


def test_load_ramp_scales_up_while_requests_wait_and_down_after(app):
    name, url = app
    assert running(name) == 1
    # Idle: nothing waits, the policy holds at min_replicas (several look-back windows and upscale delays).
    assert not wait_until(lambda: sum(llm_replicas(name).values()) > 1, timeout_s=8)

    with Load(url) as load:
        t0 = time.monotonic()
        assert wait_until(lambda: sum(llm_replicas(name).values()) >= 2, timeout_s=60), llm_replicas(name)
        t_decided = time.monotonic()
        assert wait_until(lambda: running(name) == 2, timeout_s=240), llm_replicas(name)
        t_running = time.monotonic()
        ok_before = load.ok
        assert wait_until(lambda: load.ok >= ok_before + 4, timeout_s=60)  # both replicas keep serving
    print(f"\nscale-up decided {t_decided - t0:.1f} s into the load; second replica RUNNING "
          f"{t_running - t_decided:.1f} s later; {load.ok} requests served")
    assert load.failures == [] and load.ok > 0

    t_stop = time.monotonic()
    assert wait_until(lambda: llm_replicas(name) == {"RUNNING": 1}, timeout_s=120), llm_replicas(name)
    print(f"back to 1 replica {time.monotonic() - t_stop:.1f} s after the load stopped")
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL_ID, "prompt": "The", "max_tokens": 4},
                   headers=auth(), timeout=60)
    assert r.status_code == 200  # the replica left still serves
