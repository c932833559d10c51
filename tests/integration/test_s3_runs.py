"""Runs, sweeps and the pipeline in object storage, as a KubeRay user has them: `raylm train` /
`pipeline` / `status` / `export` / `serve` run as subprocesses (each with its own local Ray
cluster, the AWS_* environment naming moto's S3 API on loopback, request signatures checked). What
is asserted is read back from the bucket.

- a run trains to s3://, a later checkpoint's upload is cut off, the same `raylm train` asked for
  more steps resumes from the newest complete one (its step count, lr schedule and optimizer state
  go on) and keep-K pruning deletes the old objects
- the README's first command, `raylm pipeline`, shrunk to one short trial: a short story on the
  terminal, a real completion through the endpoint, its sweep's trial checkpoints and best.json in
  the bucket; `raylm status` lists the run and the sweep
- `raylm serve` serves that best.json (replicas download the checkpoint; with direct ingress each
  answers on its own port)
- a missing bucket, a wrong secret key and an unreachable endpoint exit 2 before Ray starts,
  naming the URI, and write nothing
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cli_env import clean_env
from serve_fixtures import KEYS, MODEL_ID, auth, key_file, repo_root

from raylm.cluster import listen_port
from raylm.config import load_config
from raylm.train.checkpoint import verify_checkpoint
from raylm.train.deepspeed import lr_factor

__all__ = ["key_file"]  # fixtures used by this module

BUCKET = "raylm-results"
RUNS = f"s3://{BUCKET}/runs"
PROXY_PORT = 8131


def raylm(*args: str, timeout_s: float = 600, **env_over: str) -> subprocess.CompletedProcess:
    """`python -m raylm ...` from a user's shell (AWS_* exported); verbs that start Ray get
    `--address local` (each test has its own cluster); stdout and stderr together."""
    local = ["--address", "local"] if args and args[0] in ("pipeline", "serve", "train", "tune", "data", "eval") else []
    return subprocess.run([sys.executable, "-m", "raylm", *args, *local], cwd=repo_root(), env=clean_env(**env_over),
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout_s)


def sets(**fields) -> list[str]:
    return [a for k, v in fields.items() for a in ("--set", f"{k.replace('__', '.')}={v}")]


def keys_under(client, prefix: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out.update({o["Key"][len(prefix):]: o["Size"] for o in page.get("Contents", [])})
    return out


def read_log(client, run_prefix: str) -> list[dict]:
    body = client.get_object(Bucket=BUCKET, Key=f"{run_prefix}/metrics.jsonl")["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines()]


@pytest.fixture(scope="module")
def bucket(s3_server):
    _, client = s3_server
    client.create_bucket(Bucket=BUCKET)
    return client


def train_args(cache_dir: str, max_steps: int) -> list[str]:
    return ["train", "-v", "-c", "configs/tiny.yaml", *sets(
        data__cache_dir=cache_dir, train__storage_path=RUNS, train__run_name="s3run", train__max_steps=max_steps,
        train__checkpoint_every_steps=5, train__eval_every_steps=5, train__log_every_steps=1,
        train__keep_checkpoints=2)]


@pytest.fixture(scope="module")
def resumed_run(bucket, cache_dir):
    """10 steps to s3://, then step 15's upload cut off (its manifest and half its files made it),
    then the same command asked for 20 steps."""
    first = raylm(*train_args(cache_dir, 10))
    assert first.returncode == 0, first.stdout[-3000:]
    src, cut = "runs/s3run/step_00000010/", "runs/s3run/step_00000015/"
    for i, key in enumerate(sorted(keys_under(bucket, src))):
        if key.endswith("raylm_checkpoint.json") or i % 2 == 0:  # every other file never arrived
            bucket.copy_object(Bucket=BUCKET, Key=cut + key, CopySource={"Bucket": BUCKET, "Key": src + key})
    second = raylm(*train_args(cache_dir, 20))
    assert second.returncode == 0, second.stdout[-3000:]
    return first, second


def test_a_run_in_s3_resumes_from_its_newest_complete_checkpoint(bucket, resumed_run):
    first, second = resumed_run
    assert f"run: {RUNS}/s3run" in first.stdout and f"HF checkpoint: {RUNS}/s3run/step_00000010/hf" in first.stdout
    # the cut-off upload was named and passed over: the run went on from step 10, not 15 or 0
    assert re.search(rf"skipping checkpoint: {RUNS}/s3run/step_00000015: missing file", second.stdout), \
        second.stdout[-3000:]
    assert "trained: step 20" in second.stdout and "resumed from step 10" in second.stdout
    log = read_log(bucket, "runs/s3run")
    resumes = [r for r in log if r.get("event") == "resume"]
    assert [(r["step"], r["from"]) for r in resumes] == [(10, f"{RUNS}/s3run/step_00000010")]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 21))  # the first run's log was kept and continued
    tokens_per_step = steps[0]["tokens"]
    assert all(r["tokens"] == r["step"] * tokens_per_step for r in steps)
    # the run asked to go further continued its lr schedule: steps 11..20 train at the lr of an
    # uninterrupted 20-step run (a function of the step and the config; the checkpoint restores the step)
    longer = load_config(repo_root() / "configs" / "tiny.yaml", ["train.max_steps=20"]).train
    assert [r["lr"] for r in steps[10:]] == pytest.approx([longer.lr * lr_factor(s - 1, longer) for s in range(11, 21)])
    # ... and its optimizer state: the loss goes on from where it was, not from the start
    assert steps[10]["loss"] < steps[0]["loss"] - 0.5, [r["loss"] for r in steps]
    # keep-K (2) pruned the old checkpoints' objects; the rewritten step 15 is complete again
    # the newest checkpoint's manifest lists both ranks' DeepSpeed shards with their sizes
    files = verify_checkpoint(f"{RUNS}/s3run/step_00000020")["files"]
    assert {f for f in files if "optim_states" in f} == {
        f"deepspeed/state/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
    assert "hf/model.safetensors" in files and "hf/raylm_config.yaml" in files
    names = {k.split("/")[0] for k in keys_under(bucket, "runs/s3run/")}
    assert {n for n in names if n.startswith("step_")} == {"step_00000015", "step_00000020"}
    assert "tensorboard" in names


def test_raylm_export_adds_hf_to_a_periodic_checkpoint_in_s3(bucket, resumed_run):
    """Step 15 is periodic (train.export: final_and_best): DeepSpeed state only, until `raylm
    export` builds hf/ from it and lists it in the manifest in the bucket."""
    uri = f"{RUNS}/s3run/step_00000015"
    before = verify_checkpoint(uri)
    assert not before["exported"] and not any(k.startswith("hf/") for k in before["files"])
    done = raylm("export", uri, timeout_s=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert f"raylm serve --checkpoint {uri}/hf" in done.stdout
    found = keys_under(bucket, "runs/s3run/step_00000015/")
    assert {"hf/config.json", "hf/model.safetensors", "hf/tokenizer.json"} <= set(found)
    manifest = json.loads(bucket.get_object(Bucket=BUCKET, Key="runs/s3run/step_00000015/raylm_checkpoint.json")
                          ["Body"].read())
    assert manifest["exported"] and manifest["files"]["hf/model.safetensors"] == found["hf/model.safetensors"]
    assert verify_checkpoint(uri)["step"] == 15


@pytest.mark.parametrize("what,storage_path,env", [
    ("missing bucket", "s3://no-such-bucket/runs", {}),
    ("wrong secret key", f"s3://{BUCKET}/bad-creds", {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}),
    ("unreachable endpoint", f"s3://{BUCKET}/unreachable", {"AWS_ENDPOINT_URL": "closed", "AWS_MAX_ATTEMPTS": "1"}),
])
def test_bad_storage_exits_2_before_ray_naming_the_uri(bucket, cache_dir, what, storage_path, env):
    verbs = (("train", "configs/tiny.yaml"), ("tune", "tune_configs/tiny_sweep.yaml"))
    if env.get("AWS_ENDPOINT_URL") == "closed":
        env = {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{listen_port()}"}
        verbs = verbs[:1]  # the same probe as the others (cli.py), and pyarrow retries it for 12 s a verb
    for verb, config in verbs:
        t0 = time.monotonic()
        proc = raylm(verb, "-c", config, *sets(train__storage_path=storage_path, data__cache_dir=cache_dir),
                     timeout_s=120, **env)
        assert proc.returncode == 2, (what, proc.stdout[-2000:])
        assert f"error: train.storage_path={storage_path}: cannot write there" in proc.stdout, proc.stdout
        assert "Started a local Ray instance" not in proc.stdout and time.monotonic() - t0 < 60
    prefix = storage_path.removeprefix(f"s3://{BUCKET}/")
    assert not storage_path.startswith(f"s3://{BUCKET}/") or keys_under(bucket, prefix) == {}  # nothing written


# ------------------------------------------------------------------ the pipeline in s3, then serving its best


PIPELINE_KEY = "sk-raylm-pipeline-test"


@pytest.fixture(scope="module")
def pipeline_in_s3(bucket, cache_dir, tmp_path_factory):
    """The README's first command, `raylm pipeline`, as a user runs it (its own local Ray),
    shrunk by `--set` to one short trial, its results in s3."""
    key_file = tmp_path_factory.mktemp("pipeline") / "keys"
    key_file.write_text(PIPELINE_KEY + "\n")
    args = sets(data__cache_dir=cache_dir, train__storage_path=RUNS, tune__sweep_name="s3sweep", tune__num_samples=1,
                train__max_steps=10, train__eval_every_steps=5, train__checkpoint_every_steps=5, serve__port=listen_port(),
                serve__api_key_file=key_file)
    proc = subprocess.run([str(Path(sys.executable).parent / "raylm"), "pipeline", "--address", "local", *args],
                          cwd=repo_root(), env=clean_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc, str(key_file)


def test_the_pipeline_tells_a_short_story_and_serves_a_real_completion(pipeline_in_s3):
    proc, key_file = pipeline_in_s3
    out = proc.stdout
    for n in range(1, 5):
        assert f"=== [{n}/4]" in out  # every stage announced, in order
    assert out.index("=== [1/4]") < out.index("=== [2/4]") < out.index("=== [3/4]") < out.index("=== [4/4]")
    # a short story, not the libraries' logs: no worker output, no warnings, under 60 lines
    lines = out.splitlines()
    assert len(lines) < 60, out
    assert not [ln for ln in lines if re.search(r"[Ww]arning|\(pid=|Trial status|INFO|DEBUG|Traceback", ln)], out
    assert re.search(r"^tune: s3sweep: 1/1 trials", out, re.M), out
    # a real completion came back through the endpoint, with usage, for a prompt taken from the corpus
    from raylm.data import embedded_documents

    first_words = " ".join(embedded_documents()[0].split("\n")[0].split()[:3])
    reply = re.search(r"prompt: '(.+)' -> '(.*)'  \(usage (\{.*\})\)", out)
    assert reply, out[-3000:]
    assert reply.group(1) == first_words and "'completion_tokens': " in reply.group(3)
    # the user is told where the endpoint and key are, never the key itself
    assert re.search(r"serving raylm at http://127\.0\.0\.1:\d+/v1", out)
    assert key_file in out and PIPELINE_KEY not in out + proc.stderr
    assert "curl " in out and "openai.OpenAI(" in out
    assert f"best pointer for `raylm serve --checkpoint`: {RUNS}/s3sweep/best.json" in out


def read_best(client) -> dict:
    return json.loads(client.get_object(Bucket=BUCKET, Key="runs/s3sweep/best.json")["Body"].read())


def test_the_pipelines_sweep_checkpoints_its_trials_and_writes_best_json_in_s3(bucket, pipeline_in_s3):
    best = read_best(bucket)
    assert best["checkpoint"] == f"{best['train_checkpoint']}/hf"
    assert best["checkpoint"].startswith(f"{RUNS}/s3sweep/trials/{best['trial_id']}/step_")
    found = keys_under(bucket, "runs/s3sweep/")
    trial_prefix = best["train_checkpoint"].removeprefix(f"{RUNS}/s3sweep/") + "/"
    assert f"{trial_prefix}hf/model.safetensors" in found and f"{trial_prefix}raylm_checkpoint.json" in found
    assert {"trials.md", "val_loss.png"} <= set(found) and any(k.startswith("tune/") for k in found)


def test_status_lists_the_run_and_the_sweep_in_s3(bucket, resumed_run, pipeline_in_s3):
    status = raylm("status", *sets(train__storage_path=RUNS), timeout_s=120)
    assert status.returncode == 0, status.stdout
    assert f"storage: {RUNS}" in status.stdout
    assert re.search(rf"s3run: step 20, val_loss [\d.]+, resumed 1x, checkpoint {RUNS}/s3run/step_00000020",
                     status.stdout), status.stdout
    best = read_best(bucket)
    assert re.search(rf"s3sweep: 1 trial\(s\), best {best['trial_id']} val_loss=", status.stdout), status.stdout
    assert "\nserving:\n  " in status.stdout


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


def test_serve_the_pipelines_best_json_in_s3_with_replicas_on_their_own_port(pipeline_in_s3, key_file):
    # a replica answering on its own port stays reachable 30 s after Ctrl-C, for load balancers to
    # deregister it (Ray's default); this test has none, so Ctrl-C returns in ~10 s
    env = clean_env(RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="5")  # a speed knob (see above)
    cmd = [sys.executable, "-m", "raylm", "serve", "--address", "local", "--checkpoint", f"{RUNS}/s3sweep/best.json", *sets(
        serve__ingress="direct", serve__port=PROXY_PORT, serve__api_key_file=key_file,
        serve__api_key_env="RAYLM_TEST_NO_SUCH_VAR", serve__model_id=MODEL_ID, serve__autoscaling__max_replicas=1,
        serve__kv_cache_memory_gib=0.25, serve__engine_kwargs="{enforce_eager: true}")]  # the pipeline served compiled
    proc = subprocess.Popen(cmd, cwd=repo_root(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        lines = _wait_for_banner(proc, timeout_s=240)
        direct = [line for line in lines if line.startswith("replicas directly")]
        assert direct, "\n".join(lines[-40:])
        urls = re.findall(r"http://[\d.]+:\d+/v1", direct[0])
        assert len(urls) == 1 and not urls[0].endswith(f":{PROXY_PORT}/v1"), direct[0]
        body = {"model": MODEL_ID, "prompt": "ROMEO:", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
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
