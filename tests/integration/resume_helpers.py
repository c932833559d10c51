"""Exact resume in a new process, as a user meets it: `raylm train` interrupted with SIGINT after
a checkpoint, run again, must log the same per-step losses as a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cli_env import clean_env
from raylm.train.checkpoint import verify_checkpoint


def raylm_train(sets: dict) -> subprocess.Popen:
    """`raylm train` in its own process, joining the session's Ray cluster as it joins a cluster it
    is submitted to (RAY_ADDRESS): the driver and its Train controller are new, the cluster is not."""
    import ray

    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    env = clean_env(RAY_ADDRESS=ray.get_runtime_context().gcs_address)  # a second shell, as the README says
    return subprocess.Popen([sys.executable, "-m", "raylm", "train", "-c", "configs/tiny.yaml", "--json", *args],
                            cwd=Path(__file__).resolve().parents[2], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def losses(run_dir: Path) -> dict[int, float]:
    """The last logged loss of every step (a resumed run logs the steps after its checkpoint again)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def train_worker_pids() -> list[int]:
    """This machine's Ray Train worker processes (Ray titles an actor's process `ray::<class>`), read
    from /proc: the state API (reliability_helpers.train_workers) takes a few hundred ms, in which a
    tiny model trains several steps."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                pids.append(int(proc.name))
        except OSError:  # exited meanwhile
            continue
    return pids


def interrupt_after_checkpoint(sets: dict, run_dir: Path, step: int, timeout_s: float = 600) -> None:
    """Start `raylm train`; once the checkpoint of `step` verifies, freeze its workers (SIGSTOP),
    SIGINT it, kill the frozen workers and wait for it to exit.

    Freezing first makes the cut certain: a tiny model trains a step in ~60 ms, so in the second
    or so between a SIGINT and Ray killing the workers, they could finish the whole run. Where the
    cut lands after `step` varies; the resume must work from any point."""
    proc = raylm_train(sets)
    ckpt = run_dir / f"step_{step:08d}"
    deadline = time.monotonic() + timeout_s
    frozen: list[int] = []
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                verify_checkpoint(str(ckpt))
                break
            except Exception:  # noqa: BLE001 - not there (or not complete) yet
                time.sleep(0.02)
        frozen = train_worker_pids()
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        assert proc.poll() is None and frozen, f"the run ended before it was interrupted:\n{proc.stderr.read()[-3000:]}"
        os.kill(proc.pid, signal.SIGINT)
        # Ray Train's SIGINT handler asks its controller to abort at once; a second later the frozen
        # workers are killed, as Ray would kill them (shutting them down politely, the abort would
        # wait ~7 s on workers that cannot answer)
        time.sleep(1)
        kill_all(frozen)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kill_all(frozen)


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_to_end(sets: dict, timeout_s: float = 600) -> dict:
    proc = raylm_train(sets)
    out, err = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, err[-3000:]
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return next(e for e in events if e.get("event") == "trained")
