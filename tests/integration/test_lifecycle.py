"""New models into a live endpoint, against real vLLM engines on the session's Ray cluster:
a promotion rolls out under load with no failed request, a checkpoint that cannot load is rolled
back with the old model serving throughout, a corrupt one is refused before anything is asked of
Ray, adapters join without a redeploy, `raylm rollback` from another process joins the running
cluster (it does not start a second Ray) and brings the previous model back, and a canary splits
requests by conversation, is finished from a second shell, or is rolled back by itself.

One served app for the module: v1 (tiny checkpoint A) -> v2 (B, the suite's GRPO run's export,
promoted) -> a failed rollout of a checkpoint vLLM cannot load (v2 keeps serving) -> rollback to
v1 -> a canary of B (v3) finished -> a canary of a broken candidate rolled back (v3 serves) -> (on
a cluster made full) a refused promote of A, then one with --allow-gap.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from cli_env import clean_env
from raylm.cluster import token_path
from raylm.config import dump_config
from grpo_fixtures import grpo_export  # grpo_run: conftest.py
from serve_fixtures import (MODEL_ID, auth, key_file, repo_root, serve_config, shutdown_serve, tiny_adapter,
                            tiny_checkpoint, wait_until)

__all__ = ["key_file", "tiny_adapter", "tiny_checkpoint"]  # fixtures used by this module

VERSION = "x-raylm-model-version"


class Load:
    """A client that keeps streaming and non-streaming completions going until stopped; it
    records every response's version and every failure (a non-200, or a stream cut before [DONE])."""

    def __init__(self, url: str):
        self.url, self.results, self.failures = url, [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Load":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _one(self, client: httpx.Client, stream: bool) -> None:
        body = {"model": MODEL_ID, "prompt": "The king", "max_tokens": 8, "stream": stream}
        t0 = time.monotonic()
        try:
            if not stream:
                r = client.post(f"{self.url}/v1/completions", json=body, headers=auth())
                ok = r.status_code == 200 and r.json()["choices"][0]["text"] is not None
                version, detail = r.headers.get(VERSION), r.text[:200]
            else:
                with client.stream("POST", f"{self.url}/v1/completions", json=body, headers=auth()) as r:
                    lines = [line for line in r.iter_lines() if line]
                ok = r.status_code == 200 and lines[-1:] == ["data: [DONE]"]
                version, detail = r.headers.get(VERSION), (lines or [""])[-1][:200]
        except httpx.HTTPError as exc:
            ok, version, detail = False, None, repr(exc)
        (self.results if ok else self.failures).append((t0, time.monotonic(), stream, version, detail))

    def _run(self) -> None:
        with httpx.Client(timeout=120) as client:
            stream = False
            while not self._stop.is_set():
                self._one(client, stream)
                stream = not stream

    def versions_after(self, t: float) -> set:
        return {v for start, _, _, v, _ in self.results if start > t}


class LongStreams:
    """Clients that keep streams of serve.max_tokens_limit tokens (EOS ignored) going until stopped,
    each ending recorded as (start, end, version, how): "done" (`data: [DONE]`), "cut" (the edge's
    error event naming the rollout) or "silent" (anything else: the cut this must never be)."""

    def __init__(self, url: str, max_tokens: int, clients: int = 2, n: int = 1):
        self.url, self.max_tokens, self.n, self.endings = url, max_tokens, n, []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def __enter__(self) -> "LongStreams":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def _one(self, client: httpx.Client) -> None:
        body = {"model": MODEL_ID, "prompt": "The king", "max_tokens": self.max_tokens, "ignore_eos": True,
                "n": self.n, "stream": True}
        t0, version, lines = time.monotonic(), None, []
        try:
            with client.stream("POST", f"{self.url}/v1/completions", json=body, headers=auth()) as r:
                version = r.headers.get(VERSION)
                lines = [line for line in r.iter_lines() if line] if r.status_code == 200 else [f"HTTP {r.status_code}"]
        except httpx.HTTPError as exc:
            lines.append(repr(exc))
        last = lines[-1] if lines else ""
        how = "silent"
        if last == "data: [DONE]":
            how = "done"
        elif last.startswith("data: {"):
            try:
                error = json.loads(last[len("data: "):]).get("error") or {}
            except ValueError:  # a line cut short: silent
                error = {}
            if error.get("code") == "stream_interrupted" and "rollout" in error.get("message", ""):
                how = "cut"
        self.endings.append((t0, time.monotonic(), version, how, len(lines), last[:300]))

    def _run(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                self._one(client)

    def summary(self) -> str:
        took = sorted(end - start for start, end, *_ in self.endings)
        counts = ", ".join(f"{how} {len(self.ended(how))}" for how in ("done", "cut", "silent"))
        times = f"; median {took[len(took) // 2]:.2f} s, longest {took[-1]:.2f} s" if took else ""
        return f"{len(self.endings)} streams, {counts}{times}"

    def ended(self, how: str) -> list:
        return [e for e in self.endings if e[3] == how]


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, grpo_run, tmp_path_factory) -> dict[str, str]:
    """A (the tiny checkpoint), B (the suite's GRPO run's final export, trained from A: a GRPO result
    is what the promotions below roll out, in this process and from a second shell), cannot_load
    (config asks for a layer the weights lack: only vLLM finds out), corrupt (weights cut short) and worse (A with its final norm
    scaled up: confidently wrong, so its validation loss is far above A's near-uniform ln(vocab))."""
    import torch
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lifecycle")
    b = grpo_export(grpo_run)
    cannot_load = shutil.copytree(tiny_checkpoint, root / "cannot_load")
    config = json.loads((cannot_load / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (cannot_load / "config.json").write_text(json.dumps(config))
    corrupt = shutil.copytree(tiny_checkpoint, root / "corrupt")
    weights = corrupt / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 64)
    worse = shutil.copytree(tiny_checkpoint, root / "worse")
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(20.0)
    model.save_pretrained(worse)
    return {"a": tiny_checkpoint, "b": b, "cannot_load": str(cannot_load), "corrupt": str(corrupt),
            "worse": str(worse)}


ENV_KEY = "k1"  # the serving shell's $RAYLM_API_KEYS; no promoting process has it
SERVED_SETS = ["serve.autoscaling.max_replicas=3"]  # the serving command's --set; no promoting command gives it


def live_max_replicas(cfg) -> int:
    from ray.serve.context import _get_global_client

    from raylm.serve.options import SERVE_MODEL_DEPLOYMENT

    info, _ = _get_global_client().get_deployment_info(SERVE_MODEL_DEPLOYMENT, cfg.serve.app_name)
    return info.deployment_config.autoscaling_config.max_replicas


def assert_deployed_as_served(url: str, cfg) -> None:
    """What `raylm serve` was given and a promoting process lacks is still what serves."""
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL_ID, "prompt": "x", "max_tokens": 2},
                   headers=auth(ENV_KEY))
    assert r.status_code == 200, ("the serving shell's $RAYLM_API_KEYS key still works", r.status_code, r.text[:200])
    assert live_max_replicas(cfg) == 3, "the serving command's --set serve.autoscaling.max_replicas=3 is kept"


@pytest.fixture(scope="module")
def endpoint(ray_cluster, checkpoints, key_file, tmp_path_factory):
    """v1 serving checkpoint A, deployed and recorded the way `raylm serve -c serve.yaml --set
    serve.autoscaling.max_replicas=3` does it in a shell with RAYLM_API_KEYS=k1. Yields the config
    a promoting process has: the file, without the --set, and an environment without the key."""
    from raylm.config import load_config
    from raylm.lifecycle import rollout

    root = tmp_path_factory.mktemp("lifecycle-storage")
    cfg = serve_config(key_file, f"train.storage_path={root}", "serve.replica_start_attempts=1",
                       "serve.api_key_env=RAYLM_API_KEYS",
                       "serve.graceful_shutdown_timeout_s=20", f"serve.adapters_path={root / 'adapters'}",
                       "serve.max_lora_rank=8", "serve.max_adapters_per_replica=2",
                       # the eval set of the promotion gate: the embedded corpus in the checkpoints' tokenizer
                       f"data.tokenizer={checkpoints['a']}", "data.max_documents=200", "data.seq_len=64",
                       "eval.max_val_rows=16", "eval.dtype=float32")
    config_file = root / "serve.yaml"
    config_file.write_text(dump_config(cfg))
    assert "RAYLM_API_KEYS" not in os.environ
    os.environ["RAYLM_API_KEYS"] = ENV_KEY
    try:
        url, _ = rollout.deploy_recorded(load_config(config_file, SERVED_SETS), checkpoints["a"], SERVED_SETS)
    finally:
        del os.environ["RAYLM_API_KEYS"]
    yield cfg, url, config_file
    shutdown_serve()


def test_a_corrupt_or_missing_checkpoint_is_refused_naming_it(endpoint, checkpoints, capsys):
    from raylm.cli import main

    _, url, config_file = endpoint
    for bad, named in ((checkpoints["corrupt"], "model.safetensors"), ("/no/such/checkpoint", "/no/such/checkpoint")):
        assert main(["promote", "-c", str(config_file), "--force", bad]) == 2
        assert named in capsys.readouterr().err
    # serve settings of the promote's own that differ from the deployed ones: named, before any rollout
    assert main(["promote", "-c", str(config_file), "--set", "serve.max_tokens_limit=32", "--force",
                 checkpoints["b"]]) == 2
    assert "serve.max_tokens_limit; pass --reconfigure" in capsys.readouterr().err
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL_ID, "prompt": "x", "max_tokens": 2}, headers=auth())
    assert r.status_code == 200 and r.headers[VERSION] == "v1"


def test_promotion_rolls_out_under_load_with_no_failed_request(endpoint, checkpoints):
    from raylm.lifecycle import rollout

    cfg, url, _ = endpoint
    with Load(url) as load, LongStreams(url, cfg.serve.max_tokens_limit) as long:
        time.sleep(2)
        entry = rollout.promote(cfg, checkpoints["b"], force=True)
        done = time.monotonic()
        time.sleep(3)
    print(f"long streams across the promotion: {long.summary()}")
    assert load.failures == [], load.failures[:3]
    # streams in flight on the old replicas finish within the drain window v1 was deployed with
    assert long.ended("done") and len(long.ended("done")) == len(long.endings), long.endings
    # the first request v2 answered, from any client: a long stream on v1 in flight at the switch ends
    # after it unless every client's v1 request happened to end before any client started another
    first_v2 = min([start for start, _, _, v, _ in load.results if v == "v2"] +
                   [start for start, _, v, *_ in long.endings if v == "v2"])
    assert any(v == "v1" and end > first_v2 for _, end, v, *_ in long.endings), \
        ("a v1 stream was still running once v2 took requests (its replica draining)", long.endings)
    assert entry["version"] == "v2" and entry["from_version"] == "v1"
    seen = [v for *_, v, _ in load.results]
    assert set(seen) == {"v1", "v2"} and seen[0] == "v1", "the load ran before and through the rollout"
    assert load.versions_after(done + 1) == {"v2"}, "once the rollout returned, every response is v2's"
    assert_deployed_as_served(url, cfg)
    assert any(stream for _, _, stream, _, _ in load.results) and any(not s for _, _, s, _, _ in load.results)


def test_a_checkpoint_vllm_cannot_load_is_rolled_back_while_the_old_model_serves(endpoint, checkpoints):
    from raylm.errors import ServeDeployError
    from raylm.lifecycle import history, rollout

    cfg, url, _ = endpoint
    with Load(url) as load:
        with pytest.raises(ServeDeployError) as err:
            rollout.promote(cfg, checkpoints["cannot_load"], force=True)
        time.sleep(2)
    assert checkpoints["cannot_load"] in str(err.value) and "v2" in str(err.value)
    assert load.failures == [], load.failures[:3]
    assert {v for *_, v, _ in load.results} == {"v2"}
    entries = history.read_history(cfg)
    assert history.live_entry(entries)["version"] == "v2", "a failed rollout does not change the live model"
    assert [e["state"] for e in entries[-2:]] == ["intent", "failed"] and entries[-1]["checkpoint"] == checkpoints["cannot_load"]


def test_an_adapter_joins_the_live_endpoint_without_a_redeploy(endpoint, tiny_adapter, checkpoints, tmp_path, capsys):
    from raylm.cli import main

    cfg, url, config_file = endpoint
    name = f"{MODEL_ID}:ft1"
    before = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 1}, headers=auth())
    assert before.status_code == 404 and before.json()["error"]["param"] == "model"

    assert main(["promote", "-c", str(config_file), "--adapter", "ft1", tiny_adapter]) == 0
    def listed() -> set[str]:  # the edge lists serve.adapters_path at most every few seconds
        return {m["id"] for m in httpx.get(f"{url}/v1/models", headers=auth()).json()["data"]}

    assert wait_until(lambda: listed() == {MODEL_ID, name}, timeout_s=15), listed()
    card = httpx.get(f"{url}/v1/models/{name}", headers=auth())
    assert card.status_code == 200 and card.json()["parent"] == MODEL_ID
    body = {"prompt": "The king", "max_tokens": 12, "temperature": 0}
    tuned = httpx.post(f"{url}/v1/completions", json={**body, "model": name}, headers=auth(), timeout=60)
    base = httpx.post(f"{url}/v1/completions", json={**body, "model": MODEL_ID}, headers=auth(), timeout=60)
    assert tuned.status_code == base.status_code == 200
    assert tuned.json()["choices"][0]["text"] != base.json()["choices"][0]["text"], "the adapter changes the output"

    # an adapter trained on another base: its base's config.json says a different shape
    other_base = shutil.copytree(checkpoints["a"], tmp_path / "other-base")
    config = json.loads((other_base / "config.json").read_text())
    (other_base / "config.json").write_text(json.dumps({**config, "hidden_size": config["hidden_size"] * 2}))
    alien = shutil.copytree(tiny_adapter, tmp_path / "alien")
    adapter_config = json.loads((alien / "adapter_config.json").read_text())
    (alien / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": str(other_base)}))
    assert main(["promote", "-c", str(config_file), "--adapter", "alien", str(alien)]) == 2
    assert "hidden_size" in capsys.readouterr().err
    shutil.copytree(alien, Path(cfg.serve.adapters_path) / "alien")  # put there by hand, past the CLI's check
    assert wait_until(lambda: f"{MODEL_ID}:alien" in listed(), timeout_s=15), listed()
    r = httpx.post(f"{url}/v1/completions", json={**body, "model": f"{MODEL_ID}:alien"}, headers=auth(), timeout=60)
    assert r.status_code == 400 and "alien" in r.json()["error"]["message"] and "hidden_size" in r.json()["error"]["message"]


def test_rollback_from_another_process_joins_the_running_cluster(endpoint, checkpoints):
    import ray

    from raylm.lifecycle import history

    from raylm.lifecycle import record
    from raylm.serve.app import deploy, live_drain_s

    cfg, url, config_file = endpoint
    # v2's replicas get no drain window (the same inputs: updated in place, no restart), so the
    # rollback below cuts the streams in flight on them. 4 clients of 4 choices keep v2's engine busy
    # with streams of ~1 s (a stream of 64 tokens takes ~0.4 s alone here): 2 clients of 2 choices
    # (~0.5 s streams) ended all 250 of theirs before v2's replica stopped in one run of the suite.
    live = history.live_entry(history.read_history(cfg))
    target, keys, _ = record.deployment(cfg, check=False)
    t0 = time.monotonic()
    deploy(target, live["checkpoint"], live["version"], keys, drain_s=0.0)
    assert live_drain_s(cfg.serve) == 0.0 and time.monotonic() - t0 < 30, "updated in place (no replica restart)"
    # a user's second shell: HOME and nothing else (no RAY_AUTH_MODE, no RAY_ADDRESS)
    with LongStreams(url, cfg.serve.max_tokens_limit, clients=4, n=4) as long:
        out = subprocess.run([sys.executable, "-m", "raylm", "rollback", "-c", str(config_file), "--json"],
                             cwd=repo_root(), env=clean_env(), capture_output=True, text=True, timeout=600)
        time.sleep(2)
    print(f"long streams across the rollback: {long.summary()}")
    assert out.returncode == 0, out.stderr[-2000:]
    # a stream cut by its replica's stop ends with the error event naming the rollout, never silently
    assert not long.ended("silent"), long.ended("silent")[:3]
    assert long.ended("cut") and {e[2] for e in long.ended("cut")} == {"v2"}, long.endings
    events = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    drains = [e for e in events if e.get("event") == "drain"]
    assert drains and drains[-1]["drain_s"] >= cfg.serve.graceful_shutdown_timeout_s and drains[-1]["itl_s"] > 0, drains
    joined = [e for e in events if e.get("event") == "ray"]
    assert joined and joined[0]["address"] == ray.get_runtime_context().gcs_address
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL_ID, "prompt": "x", "max_tokens": 2}, headers=auth())
    assert r.status_code == 200 and r.headers[VERSION] == "v1"
    entries = history.read_history(cfg)
    assert [(e["action"], e["version"]) for e in entries if e["action"] != "adapter" and e.get("state") == "done"] == \
        [("deploy", "v1"), ("promote", "v2"), ("rollback", "v1")]
    assert_deployed_as_served(url, cfg)
    # `raylm status` from that shell reads the live app and agrees with the history
    status = subprocess.run([sys.executable, "-m", "raylm", "status", "-c", str(config_file)], cwd=repo_root(),
                            env=clean_env(), capture_output=True, text=True, timeout=300)
    assert status.returncode == 0, status.stderr[-2000:]
    assert f"{cfg.serve.app_name}: RUNNING" in status.stdout and "Serve not running" not in status.stdout, status.stdout
    assert "model version v1: Serve and the promotion history agree" in status.stdout, status.stdout
    # the token of the cluster raylm started (init_ray, as `raylm serve` starts it), and joined with
    token = token_path()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and stat.S_IMODE(token.parent.stat().st_mode) == 0o700


def test_one_promotion_at_a_time_and_ctrl_c_during_a_rollout_is_recorded(endpoint, checkpoints):
    """`raylm promote` from a second shell (HOME only) holds the app's lock through its rollout: a
    promote started meanwhile is refused, naming it. Ctrl-C during the rollout deploys the live
    model again and is recorded; Serve, the history, `raylm status` and the version header agree."""
    from raylm.lifecycle import history, lock, rollout

    cfg, url, config_file = endpoint
    before = len(history.read_history(cfg))
    live = history.live_entry(history.read_history(cfg))["version"]
    proc = subprocess.Popen([sys.executable, "-m", "raylm", "promote", "-c", str(config_file), "--force", "--json",
                             checkpoints["b"]], cwd=repo_root(), env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_until(lambda: any(e.get("state") == "intent" for e in history.read_history(cfg)[before:]),
                          timeout_s=180), "the second shell's promote never started its rollout"
        with pytest.raises(lock.PromotionBusy, match=f"promote by pid {proc.pid} on"):
            rollout.promote(cfg, checkpoints["a"], force=True)
        time.sleep(3)  # into the rollout: Serve is starting the new version's replica
        assert proc.poll() is None, "the rollout ended before Ctrl-C: nothing interrupted"
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    new = history.read_history(cfg)[before:]
    assert [e["state"] for e in new] == ["intent", "interrupted"] and new[1]["restored"], new
    assert history.live_entry(history.read_history(cfg))["version"] == live
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL_ID, "prompt": "x", "max_tokens": 2}, headers=auth())
    assert r.status_code == 200 and r.headers[VERSION] == live == rollout.served_version(cfg)
    assert rollout.version_check(cfg).endswith("agree")
    assert_deployed_as_served(url, cfg)


def test_the_gate_refuses_a_worse_model_with_both_numbers_and_keeps_serving(endpoint, checkpoints, capsys):
    """`raylm promote` without --force evaluates the candidate and the served model (v1, A) on the
    same eval set with vLLM over Ray Data and refuses a candidate with a higher validation loss."""
    from raylm.cli import main
    from raylm.evaluate import EVAL_JSON
    from raylm.lifecycle import eval_gate, history

    cfg, url, config_file = endpoint
    before = history.read_history(cfg)
    assert main(["promote", "-c", str(config_file), checkpoints["worse"]]) == eval_gate.EXIT_REFUSED
    err = capsys.readouterr().err
    worse = json.loads((Path(checkpoints["worse"]) / EVAL_JSON).read_text())
    served = json.loads((Path(checkpoints["a"]) / EVAL_JSON).read_text())
    assert worse["eval_set"] == served["eval_set"] and worse["val_loss"] > served["val_loss"]
    assert "not promoted" in err and f"{worse['val_loss']:.4f}" in err and f"{served['val_loss']:.4f}" in err
    assert history.read_history(cfg) == before, "a refused candidate is not recorded"
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL_ID, "prompt": "x", "max_tokens": 2}, headers=auth())
    assert r.status_code == 200 and r.headers[VERSION] == "v1"


def test_a_rollout_the_cluster_cannot_hold_is_reverted_at_its_deadline(endpoint, checkpoints):
    """A rollout starts the new version's replicas beside the old ones; on a cluster without room
    for them (here: replicas asking for more CPUs than it has, deployed with --reconfigure) it
    used to wait forever. After serve.rollout_timeout_s the live model is deployed again (with
    the record's config and keys, so its replicas are untouched), the failure names the field and
    the history records it."""
    from raylm.config import load_config
    from raylm.errors import ServeDeployError
    from raylm.lifecycle import history, rollout

    cfg, url, config_file = endpoint
    live = history.live_entry(history.read_history(cfg))["version"]
    sets = ["serve.num_cpus_per_replica=64", "serve.rollout_timeout_s=8"]
    t0 = time.monotonic()
    with pytest.raises(ServeDeployError, match=r"serve.rollout_timeout_s=8 s.*keeps serving"):
        rollout.promote(load_config(config_file, sets), checkpoints["b"], force=True, overrides=sets, reconfigure=True)
    assert time.monotonic() - t0 < 120
    assert history.read_history(cfg)[-1]["state"] == "failed"
    assert history.live_entry(history.read_history(cfg))["version"] == live == rollout.served_version(cfg)
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL_ID, "prompt": "x", "max_tokens": 2}, headers=auth())
    assert r.status_code == 200 and r.headers[VERSION] == live
    assert_deployed_as_served(url, cfg)


def ask(url: str, prompt: str, model: str = MODEL_ID, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 1},
                      headers={**auth(), **(headers or {})}, timeout=60)


def canary_deployed(cfg) -> bool:
    from ray import serve

    from raylm.serve.options import CANARY_DEPLOYMENT

    return CANARY_DEPLOYMENT in serve.status().applications[cfg.serve.app_name].deployments


def test_a_canary_splits_by_conversation_pins_and_finishes_from_a_second_shell_under_load(endpoint, checkpoints):
    """`raylm promote --canary 30` serves B beside the live model: 200 conversations split within
    ±7 points of 30%, a session stays on one version, a client pins either served version (an
    unserved one is a 404 naming the served), the edge's per-version numbers reach storage, and no
    other promote starts meanwhile. `raylm promote --finish` from a second shell (HOME only) puts B
    live under load with no failed request, records it and removes the canary's deployment."""
    from concurrent.futures import ThreadPoolExecutor

    from raylm.errors import InputError
    from raylm.lifecycle import canary, history, rollout
    from raylm.status import canary_line

    cfg, url, config_file = endpoint
    live = history.live_entry(history.read_history(cfg))
    entry = canary.start(cfg, checkpoints["b"], 30.0, force=True)
    old, new = live["version"], entry["version"]
    assert entry["state"] == "done" and entry["from_version"] == old and new != old and canary_deployed(cfg)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: ask(url, f"conversation {i}: the king said"), range(200)))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200][:2]
    versions = [r.headers[VERSION] for r in answers]
    share = 100 * versions.count(new) / len(versions)
    # the hash's spread is checked on 8,000 conversations in tests/unit/test_canary.py; here, that
    # the live edge applies it (200 conversations: a standard deviation of 3.2 points at 30%)
    assert set(versions) == {old, new} and abs(share - 30) <= 7, share
    for session in ("s-1", "s-2", "s-3", "s-4"):  # whatever the text, a session stays on its version
        seen = {ask(url, f"turn {t} of {session}", headers={"x-session-id": session}).headers[VERSION] for t in range(5)}
        assert len(seen) == 1, (session, seen)
    for version in (old, new):
        r = ask(url, "pinned", model=f"{MODEL_ID}@{version}")
        assert r.status_code == 200 and r.headers[VERSION] == version
    r = ask(url, "pinned", model=f"{MODEL_ID}@v99")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert f"served versions: {', '.join(sorted([old, new]))}" in r.json()["error"]["message"], r.text
    with pytest.raises(InputError, match=f"a canary of {new}"):
        rollout.promote(cfg, checkpoints["a"], force=True)
    assert wait_until(lambda: canary.read_stats(cfg, entry)[new]["requests"] >= versions.count(new), timeout_s=15)
    stats = canary.read_stats(cfg, entry)
    assert stats[old]["requests"] >= versions.count(old) and stats[old]["errors"] == stats[new]["errors"] == 0, stats
    line = canary_line(cfg)  # what `raylm status` prints (from storage; its second-shell run is tested above)
    assert line.startswith(f"canary: {new} ({checkpoints['b']}) serves 30% of conversations beside {old}"), line
    assert all(re.search(rf"{v}: \d+ requests, 0\.0% errors, p95 \d+ ms", line) for v in (old, new)), line

    with Load(url) as load:
        time.sleep(2)
        out = subprocess.run([sys.executable, "-m", "raylm", "promote", "-c", str(config_file), "--finish", "--json"],
                             cwd=repo_root(), env=clean_env(), capture_output=True, text=True, timeout=600)
        done = time.monotonic()
        time.sleep(3)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert load.failures == [], load.failures[:3]
    assert load.versions_after(done + 1) == {new}
    entries = history.read_history(cfg)
    assert (entries[-1]["action"], entries[-1]["state"], entries[-1]["canary"]) == ("promote", "done", entry["id"])
    assert history.live_entry(entries)["version"] == new == rollout.served_version(cfg)
    assert history.running_canary(entries) is None and not canary_deployed(cfg)
    assert_deployed_as_served(url, cfg)


def test_a_canary_that_fails_its_requests_is_rolled_back_by_serve_canary_auto(endpoint, checkpoints, tmp_path):
    """A candidate that loads but fails every request (a context of 4 tokens: vLLM refuses each
    prompt with a 400) is judged by `serve.canary.auto` from the edge's numbers and rolled back;
    the live version answered every request it was sent, and serves all of them afterwards."""
    from concurrent.futures import ThreadPoolExecutor

    from raylm.config import load_config
    from raylm.lifecycle import canary, history

    cfg, url, config_file = endpoint
    short = shutil.copytree(checkpoints["a"], tmp_path / "short-context")
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4}))
    sets = ["serve.canary.auto=true", "serve.canary.min_requests=10", "serve.canary.finish_after_requests=10000"]
    live = history.live_entry(history.read_history(cfg))["version"]
    result: dict = {}

    def run() -> None:
        try:
            result["entry"] = canary.start(load_config(config_file, sets), str(short), 50.0, force=True, overrides=sets)
        except BaseException as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    watcher = threading.Thread(target=run, daemon=True)
    watcher.start()
    answers: list = []
    with ThreadPoolExecutor(4) as pool:
        i = 0
        while watcher.is_alive() and i < 5000:
            answers += pool.map(lambda j: ask(url, f"question {j}: where is the king"), range(i, i + 20))
            i += 20
            time.sleep(0.2)
    watcher.join(timeout=300)
    assert "error" not in result, result.get("error")
    entry = result["entry"]
    assert entry["action"] == "canary_abort" and "serve.canary.auto: candidate error rate 100.0%" in entry["reason"]
    cand = entry["version"]
    by_version = {v: [r.status_code for r in answers if r.headers.get(VERSION) == v] for v in (live, cand)}
    assert by_version[cand] and set(by_version[cand]) == {400}, "the candidate failed every request it was sent"
    assert by_version[live] and set(by_version[live]) == {200}, "the live version answered every request"
    assert entry["canary_stats"][cand]["errors"] >= 10
    after = [ask(url, f"after {j}").headers[VERSION] for j in range(20)]
    assert set(after) == {live} and not canary_deployed(cfg)
    assert history.live_entry(history.read_history(cfg))["version"] == live


def llm_replicas(cfg) -> int:
    from ray import serve

    from raylm.serve.options import SERVE_MODEL_DEPLOYMENT

    app = serve.status().applications[cfg.serve.app_name]
    return app.deployments[SERVE_MODEL_DEPLOYMENT].replica_states.get("RUNNING", 0)


def test_one_replica_without_room_for_a_second_copy_rolls_out_only_with_allow_gap(endpoint, checkpoints, capsys):
    """On a cluster without room for a second copy of the endpoint's one replica (here: a placement
    group holding every free CPU), `raylm promote` is refused before anything changes, naming the
    gap and --allow-gap; with --allow-gap the live replica stops, the new version's starts in its
    place and serves (one replica start: the cheapest real check of lifecycle/fit.py's plans)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from raylm.cli import main
    from raylm.lifecycle import history

    cfg, url, config_file = endpoint
    # quiet: one replica, and nothing else holding CPUs (the last canary's replica gone)
    quiet = lambda: llm_replicas(cfg) == 1 and ray.available_resources().get("CPU", 0) >= ray.cluster_resources()["CPU"] - 1  # noqa: E731
    assert wait_until(quiet, timeout_s=120), (llm_replicas(cfg), ray.available_resources())
    before = history.read_history(cfg)
    live = history.live_entry(before)["version"]
    full = placement_group([{"CPU": ray.available_resources()["CPU"]}])
    ray.get(full.ready(), timeout=60)
    try:
        assert main(["promote", "-c", str(config_file), "--force", checkpoints["a"]]) == 2
        err = capsys.readouterr().err
        assert "no room for a second copy of the one replica" in err and "--allow-gap" in err, err
        assert "a replica reserves 1 CPU" in err and "free now: 0 CPU" in err, err
        assert history.read_history(cfg) == before, "refused before anything was recorded or deployed"
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL_ID, "prompt": "x", "max_tokens": 2},
                       headers=auth())
        assert r.status_code == 200 and r.headers[VERSION] == live

        assert main(["promote", "-c", str(config_file), "--force", "--allow-gap", checkpoints["a"]]) == 0
        assert "rollout with a gap (--allow-gap, max_surge_percent 0)" in capsys.readouterr().out
    finally:
        remove_placement_group(full)
    entry = history.live_entry(history.read_history(cfg))
    assert entry["checkpoint"] == checkpoints["a"] and entry["rollout_mode"] == "gap" and entry["version"] != live
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL_ID, "prompt": "x", "max_tokens": 2}, headers=auth())
    assert r.status_code == 200 and r.headers[VERSION] == entry["version"]
