"""`raylm serve --checkpoint s3://.../best.json` with `serve.direct_ingress=true`, run as a user
runs it: its own local Ray cluster (a subprocess), the checkpoint a sweep's best.json in object
storage (moto's S3 API on loopback) that the replica downloads, the banner naming each replica's
own URL, and both that URL and the proxy answering behind the same API keys."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx

from serve_fixtures import KEYS, MODEL_ID, auth, key_file, repo_root, tiny_checkpoint, upload_dir

__all__ = ["key_file", "tiny_checkpoint"]  # fixtures used by this module

PROXY_PORT = 8131


def _wait_for_banner(proc: subprocess.Popen, timeout_s: float) -> list[str]:
    """Lines `raylm serve` printed up to its 'Ctrl-C to stop' line."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line.rstrip())
        if line.startswith("Ctrl-C to stop"):
            return lines
    raise AssertionError("raylm serve did not come up:\n" + "\n".join(lines[-60:]))


def test_serve_a_best_json_in_s3_and_replicas_answer_on_their_own_port(s3_server, tiny_checkpoint, key_file):
    _, client = s3_server
    client.create_bucket(Bucket="raylm-serve")
    upload_dir(client, tiny_checkpoint, "raylm-serve", "sweeps/tiny/trials/t0/hf")
    client.put_object(Bucket="raylm-serve", Key="sweeps/tiny/best.json", Body=b'{"checkpoint": "trials/t0/hf"}')
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # its own cluster, not the session's
    cmd = [sys.executable, "-m", "raylm", "serve", "--checkpoint", "s3://raylm-serve/sweeps/tiny/best.json",
           "--set", "serve.direct_ingress=true", "--set", f"serve.port={PROXY_PORT}",
           "--set", f"serve.api_key_file={key_file}", "--set", "serve.api_key_env=RAYLM_TEST_NO_SUCH_VAR",
           "--set", f"serve.model_id={MODEL_ID}", "--set", "serve.autoscaling.max_replicas=1",
           "--set", "serve.kv_cache_memory_gib=0.25"]
    proc = subprocess.Popen(cmd, cwd=repo_root(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        lines = _wait_for_banner(proc, timeout_s=240)
        direct = [line for line in lines if line.startswith("replicas directly")]
        assert direct, "\n".join(lines[-40:])
        urls = re.findall(r"http://[\d.]+:\d+/v1", direct[0])
        assert len(urls) == 1 and not urls[0].endswith(f":{PROXY_PORT}/v1"), direct[0]
        body = {"model": MODEL_ID, "prompt": "Hello", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
        for base in (urls[0], f"http://127.0.0.1:{PROXY_PORT}/v1"):
            ok = httpx.post(f"{base}/completions", json=body, headers=auth(KEYS[1]), timeout=60)
            assert ok.status_code == 200, (base, ok.text)
            assert ok.json()["usage"]["completion_tokens"] == 3
            denied = httpx.post(f"{base}/completions", json=body, timeout=30)
            assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: raylm deletes the app, then its cluster stops
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
