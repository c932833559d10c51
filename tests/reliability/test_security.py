"""Security: no request without a valid API key reaches the model; the Ray cluster raylm starts
keeps token authentication on (and raylm refuses to turn it off); no secret (API keys, a canary
in RAYLM_API_KEYS, the Ray token) is written to the cluster's logs or to a checkpoint."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from reliability_helpers import (CANARY_KEY, KEYS, MODEL_ID, auth, completes, dashboard_url, replica_actors, run_dir,
                                 session_logs_dir)

ROOT = Path(__file__).resolve().parents[2]
ATTACKER_KEY = "sk-attacker-guess-5b0e11"
pytestmark = pytest.mark.timeout(300)


def engine_requests(app: str) -> float:
    """Requests the app's vLLM engine has processed, from its metrics on Ray's Prometheus endpoint
    (exported every few seconds, so callers wait for it to settle)."""
    import ray

    (replica,) = replica_actors(app)
    replica_id = replica.name.rsplit("#", 1)[-1]
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("ray_vllm_request_prompt_tokens_count{") and f'ReplicaId="{replica_id}"' in line)


def settled_engine_requests(app: str) -> float:
    """The engine's request count once it has stayed the same for two of Ray's metric export
    periods (tests/conftest.py sets the period)."""
    import ray

    quiet_s = 2 * ray._config.metrics_report_interval_ms() / 1000 + 1
    value, since = engine_requests(app), time.monotonic()
    while time.monotonic() - since < quiet_s:
        time.sleep(1)
        now = engine_requests(app)
        if now != value:
            value, since = now, time.monotonic()
    return value


UNAUTHORIZED_HEADERS = [
    {}, {"Authorization": ""}, {"Authorization": "Bearer"}, {"Authorization": f"Bearer {ATTACKER_KEY}"},
    {"Authorization": KEYS[0]}, {"Authorization": f"Basic {KEYS[0]}"}, {"Authorization": f"Token {KEYS[0]}"},
    {"Authorization": f"Bearer {KEYS[0][:-1]}"}, {"Authorization": f"Bearer {KEYS[0]}x"},
    {"Authorization": f"Bearer {KEYS[0].upper()}"}, {"Authorization": f"Bearer {hashlib.sha256(KEYS[0].encode()).hexdigest()}"},
    {"X-API-Key": KEYS[0]}, {"api-key": KEYS[0]}, {"Cookie": f"api_key={KEYS[0]}"},
]


def test_no_request_without_a_valid_key_reaches_the_model(basic_app):
    url = basic_app
    assert completes(url)  # the engine has served at least once, so its metrics exist
    before = settled_engine_requests("basic")
    bodies = {"/v1/completions": {"model": MODEL_ID, "prompt": "secret work", "max_tokens": 4},
              "/v1/chat/completions": {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]}}
    sent = 0
    for headers in UNAUTHORIZED_HEADERS:
        for path, body in bodies.items():
            for stream in (False, True):
                resp = httpx.post(f"{url}{path}", json={**body, "stream": stream}, headers=headers, timeout=30)
                assert resp.status_code == 401, (headers, path, resp.status_code, resp.text[:200])
                assert resp.json()["error"]["code"] == "invalid_api_key"
                sent += 1
        resp = httpx.post(f"{url}/v1/completions?api_key={KEYS[0]}", json=bodies["/v1/completions"], headers=headers,
                          timeout=30)
        assert resp.status_code == 401
        for path in ("/v1/models", "/v1/models/" + MODEL_ID):
            assert httpx.get(f"{url}{path}", headers=headers, timeout=30).status_code == 401
    # one valid request reaches the engine (its counter is live) ...
    ok = httpx.post(f"{url}/v1/completions", json=bodies["/v1/completions"], headers=auth(KEYS[1]), timeout=30)
    assert ok.status_code == 200
    # ... and it is the only one: none of the unauthorized requests sent before it was run
    after = settled_engine_requests("basic")
    assert after == before + 1, f"{sent} unauthorized requests + 1 valid one: the engine ran {after - before}"


def ray_token() -> str:
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    token = os.environ.get("RAY_AUTH_TOKEN") or (path.read_text().strip() if path.is_file() else "")
    assert token, "no Ray auth token found: token authentication is not set up"
    return token


def test_the_ray_cluster_keeps_token_authentication_on(ray_cluster):
    """The dashboard (jobs, state API) of the cluster raylm started refuses requests without the
    token and serves them with it."""
    dash = dashboard_url()
    for path in ("/api/jobs/", "/api/v0/actors", "/api/version"):
        anonymous = httpx.get(f"{dash}{path}", timeout=10)
        assert anonymous.status_code in (401, 403), (path, anonymous.status_code, anonymous.text[:200])
        wrong = httpx.get(f"{dash}{path}", headers={"Authorization": "Bearer not-the-token"}, timeout=10)
        assert wrong.status_code in (401, 403), (path, wrong.status_code)
    assert httpx.get(f"{dash}/api/jobs/", headers={"Authorization": f"Bearer {ray_token()}"}, timeout=10).status_code == 200


def test_raylm_refuses_to_start_ray_with_authentication_disabled(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT / "platform")}
    env.pop("RAYLM_ALLOW_NO_AUTH", None)
    env.pop("RAY_ADDRESS", None)
    code = ("import ray\nfrom raylm.cluster import init_ray\nfrom raylm.config import load_config\n"
            "try:\n    init_ray(load_config(), num_cpus=1)\nexcept RuntimeError as exc:\n    print('REFUSED', exc)\n"
            "print('STARTED' if ray.is_initialized() else 'NOT STARTED')\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "REFUSED RAY_AUTH_MODE=disabled" in proc.stdout and "NOT STARTED" in proc.stdout, proc.stdout + proc.stderr[-2000:]


def files_containing(root: str | Path, secrets: dict[str, str], max_bytes: int = 64 << 20) -> list[str]:
    hits = []
    needles = {name: value.encode() for name, value in secrets.items()}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            try:
                if os.path.islink(path) or os.path.getsize(path) > max_bytes:
                    continue
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            hits += [f"{path}: {what}" for what, needle in needles.items() if needle in data]
    return hits


def test_no_secret_in_the_cluster_logs_or_in_checkpoints(reference_run, basic_app):
    """After training with a canary in RAYLM_API_KEYS, serving with two keys and refusing an
    attacker's guessed key, none of those, nor the Ray token, appears in any file of the
    session's logs or of the run folder (checkpoints, manifests, metrics, configs)."""
    url = basic_app
    assert httpx.post(f"{url}/v1/completions", headers=auth(ATTACKER_KEY), timeout=30,
                      json={"model": MODEL_ID, "prompt": "x"}).status_code == 401
    for key in KEYS:
        assert httpx.get(f"{url}/v1/models", headers=auth(key), timeout=30).status_code == 200
    secrets = {"API key 0": KEYS[0], "API key 1": KEYS[1], "canary RAYLM_API_KEYS": CANARY_KEY,
               "attacker key": ATTACKER_KEY, "Ray token": ray_token()}
    cfg, result = reference_run
    assert os.path.isdir(result.checkpoint.path)
    leaks = files_containing(run_dir(cfg), secrets) + files_containing(session_logs_dir(), secrets)
    assert not leaks, "secrets written to disk:\n" + "\n".join(leaks[:20])
