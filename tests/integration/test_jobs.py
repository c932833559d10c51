"""`ray job submit --working-dir . -- raylm <verb>` against a real head started with `ray start`.

The head is a separate Ray cluster (its own ports, token authentication on as Ray 2.60 sets it
for a new cluster); jobs are submitted with the `ray` CLI exactly as the README shows, and the
test waits for SUCCEEDED, then reads what the jobs left in storage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_env import clean_env

from raylm.cluster import listen_port
from serve_fixtures import tiny_checkpoint  # noqa: F401 - a session fixture

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(*args: str, env: dict, timeout_s: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head on free ports; yields (env for the `ray` CLI, dashboard address)."""
    env = clean_env()  # a user's shell (the venv's bin first: the job's shell finds `raylm` and `ray`)
    gcs, dash = listen_port(), listen_port()
    temp_dir = tmp_path_factory.mktemp("ray-head")
    run(str(BIN / "ray"), "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1",
        "--include-dashboard=true", "--num-cpus=3", f"--temp-dir={temp_dir}", "--disable-usage-stats",
        f"--dashboard-agent-listen-port={listen_port()}", f"--metrics-export-port={listen_port()}",
        f"--runtime-env-agent-port={listen_port()}", f"--ray-client-server-port={listen_port()}",
        env=env, timeout_s=180)
    address = f"http://127.0.0.1:{dash}"
    # the `ray` CLI sends the cluster token (~/.ray/auth_token) only in token mode
    env.update(RAY_ADDRESS=address, RAY_AUTH_MODE="token")
    try:
        yield env, address
    finally:
        # `ray stop` would stop every Ray on the machine; end only this head's processes
        subprocess.run(["pkill", "-9", "-f", str(temp_dir)], check=False)


def submit(env: dict, *entrypoint: str, working_dir: Path = ROOT) -> str:
    proc = subprocess.run([str(BIN / "ray"), "job", "submit", "--no-wait", "--working-dir", ".", "--", *entrypoint],
                          cwd=working_dir, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"ray job submit exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    ids = [w.strip("'\"") for line in proc.stdout.splitlines() + proc.stderr.splitlines()
           for w in line.split() if w.strip("'\"").startswith("raysubmit_")]
    assert ids, f"no submission id in:\n{proc.stdout}\n{proc.stderr}"
    return ids[0]


def ray_token() -> str:
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    return os.environ.get("RAY_AUTH_TOKEN") or path.read_text().strip()


def wait_job(env: dict, job_id: str, timeout_s: float) -> tuple[str, str]:
    """Poll the job's status until it ends; returns (status, `ray job logs`). Polled over the jobs
    REST API (what `ray job status` calls): each `ray` CLI call costs ~1.6 s of CPU, which every
    3 s took a quarter of the 2 cores the jobs train on."""
    import httpx

    ray_cli = str(BIN / "ray")
    deadline = time.monotonic() + timeout_s
    status = "TIMEOUT"
    headers = {"Authorization": f"Bearer {ray_token()}"}
    while time.monotonic() < deadline:
        reply = httpx.get(f"{env['RAY_ADDRESS']}/api/jobs/{job_id}", headers=headers, timeout=30)
        reply.raise_for_status()
        if reply.json()["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
            status = reply.json()["status"]
            break
        time.sleep(2)
    else:
        run(ray_cli, "job", "stop", job_id, env=env, check=False)
    return status, run(ray_cli, "job", "logs", job_id, env=env, check=False).stdout


def test_token_auth_is_on_for_the_jobs_api(head):
    import urllib.error
    import urllib.request

    _, address = head
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{address}/api/jobs/", timeout=10)
    assert err.value.code in (401, 403)


def test_working_dir_upload_leaves_out_local_state(head):
    env, _ = head
    job = submit(env, "python", "-c", "import json, os; print('LISTING', json.dumps(sorted(os.listdir('.'))))")
    status, logs = wait_job(env, job, timeout_s=120)
    assert status == "SUCCEEDED", logs
    listing = set(json.loads(next(line for line in logs.splitlines() if line.startswith("LISTING")).split(" ", 1)[1]))
    assert {"platform", "configs", "tune_configs", "deployments", "pyproject.toml"} <= listing
    assert not listing & {".venv", ".git", "results", "tests", ".pytest_cache"}


def test_train_and_sweep_jobs_succeed(head, tmp_path):
    """Both submitted at once, as a team shares a cluster: the head's 3 CPUs let one job build its
    data while the other trains, and Ray queues the second job's workers until CPUs free up."""
    env, _ = head
    steps = ["--set=train.max_steps=10", "--set=train.eval_every_steps=5", "--set=train.checkpoint_every_steps=5"]
    train = submit(env, "raylm", "train", "--config", "configs/tiny.yaml", f"--set=train.storage_path={tmp_path}",
                   *steps)
    sweep = submit(env, "raylm", "tune", "--config", "tune_configs/tiny_sweep.yaml",
                   f"--set=train.storage_path={tmp_path / 'sweeps'}", *steps, "--set=tune.num_samples=1",
                   "--set=tune.sweep_name=job-sweep")
    status, logs = wait_job(env, train, timeout_s=480)
    assert status == "SUCCEEDED", logs[-5000:]
    assert "trained: step 10" in logs
    assert (tmp_path / "tiny" / "step_00000010" / "hf" / "model.safetensors").is_file()

    status, logs = wait_job(env, sweep, timeout_s=600)
    assert status == "SUCCEEDED", logs[-5000:]
    best = json.loads((tmp_path / "sweeps" / "job-sweep" / "best.json").read_text())
    assert Path(best["checkpoint"], "config.json").is_file()
    assert "best trial:" in logs


@pytest.mark.skipif(os.environ.get("RAYLM_EXTENDED") != "1", reason="opt-in (RAYLM_EXTENDED=1): ~2 min; the suite's "
                    "GRPO run (grpo_fixtures.py) runs the same code on the local cluster")
def test_a_grpo_job_ships_the_users_reward_file(head, tmp_path, tiny_checkpoint):  # noqa: F811
    """`ray job submit` of a GRPO run from the user's own folder: its reward file (`my_rewards.py`,
    named `my_rewards:short`) reaches the job's driver and the trainer worker through the job's
    working directory, and the run trains, scores with it and checkpoints."""
    import shutil

    from grpo_fixtures import SETS, USER_REWARDS

    env, _ = head
    work = tmp_path / "project"
    shutil.copytree(ROOT / "configs", work / "configs")
    (work / "my_rewards.py").write_text(USER_REWARDS)
    sets = {**SETS, "model.name": tiny_checkpoint, "data.source": "configs/data/arith_prompt.jsonl",
            "data.cache_dir": tmp_path / "cache", "train.storage_path": tmp_path / "runs", "train.max_steps": 2,
            "train.eval_every_steps": 2, "train.checkpoint_every_steps": 2}
    job = submit(env, "raylm", "train", "--config", "configs/grpo.yaml", "--json",
                 *[f"--set={k}={v}" for k, v in sets.items()], working_dir=work)
    status, logs = wait_job(env, job, timeout_s=600)
    assert status == "SUCCEEDED", logs[-5000:]
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    scored = [m for m in metrics if "rewards/short/mean" in m]
    assert scored, f"the user's reward was not logged: {sorted(metrics[-1])}"
    assert (tmp_path / "runs" / "grpo" / "step_00000002" / "hf" / "model.safetensors").is_file()
