"""Opt-in (RAYLM_MULTINODE=1): a whole Ray node is lost in the middle of a run.

Each test runs tests/reliability/multinode_run.py in a subprocess with its own Ray cluster on
this machine (a head with 3 CPUs and two worker nodes with 1 CPU each, separate Ray processes
with node labels), no RAY_* variables from the session's. The run's 2 workers are placed with
train.placement_strategy=SPREAD; after its first checkpoint, the worker node hosting one of them
is lost (every process of it SIGKILLed at once). Recovery is Ray Train's fixed-size restart on
the nodes left (head + surviving node: 4 CPUs for 2 one-CPU workers and a whole CPU free for Ray
Data to rebuild the blocks lost with the node), not elastic and without the node coming back: see
the script's docstring.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raylm.train.checkpoint import verify_checkpoint

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "reliability" / "multinode_run.py"
pytestmark = [pytest.mark.multinode, pytest.mark.timeout(900)]

TRAIN_STEPS, TRIAL_STEPS, CKPT_EVERY, SAMPLES = 60, 40, 10, 3


def multinode_run(mode: str, tmp_path: Path, cache_dir: str, *args: str) -> dict:
    out = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.run([sys.executable, str(SCRIPT), mode, "--storage", str(tmp_path / "storage"), "--out", str(out),
                           "--cache-dir", cache_dir, "--checkpoint-every", str(CKPT_EVERY), *args],
                          cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=720)
    assert out.exists(), f"no result (exit {proc.returncode}):\n{proc.stdout[-6000:]}"
    result = json.loads(out.read_text())
    print(f"multinode {mode}: wall {result['wall_s']} s, killed {result.get('killed_node')} at step "
          f"{result.get('step_at_kill')}, resumed {result.get('resume_after_s')} s after the kill")
    assert proc.returncode == 0 and not result.get("error"), f"{result.get('error')}\n{proc.stdout[-6000:]}"
    return result


def check_node_loss(result: dict, log: list[dict], max_steps: int) -> int:
    """The placement, the single resume and the steps around it; returns the resume step."""
    before, killed = result["workers_before_kill"], result["killed_node"]
    # SPREAD: the two workers were on different nodes, so the loss took half of the group
    assert len(before) == 2 and len(set(before)) == 2, before
    assert killed in before and killed not in result["controllers"]
    # the restarted group: same size, on what is left
    after = result["workers_after_resume"]
    assert len(after) == 2 and killed not in after, after

    resumes = [i for i, r in enumerate(log) if r.get("event") == "resume"]
    assert len(resumes) == 1, [r for r in log if "event" in r]
    resume = log[resumes[0]]
    ran_before = [r["step"] for r in log[:resumes[0]] if "loss" in r]
    ran_after = [r["step"] for r in log[resumes[0]:] if "loss" in r]
    resumed = resume["step"]
    # no step lost past the last checkpoint: the run went on from the newest checkpoint that was
    # complete when the node died (the kill comes after the first one, before the next)...
    at_kill = max(result["checkpoints_at_kill"])
    newest = max(c for c in result["checkpoints_at_resume"] if c <= max(ran_before))
    assert resumed == newest >= at_kill, (resumed, newest, result["checkpoints_at_kill"])
    assert resumed % CKPT_EVERY == 0 and resumed <= result["step_at_kill"] <= max(ran_before)
    assert os.path.basename(resume["from"]) == f"step_{resumed:08d}"
    assert verify_checkpoint(resume["from"])["step"] == resumed
    # ... and every step ran: 1..K before the loss, then the steps after the checkpoint
    # (those between it and the loss once more) up to the end, in order
    assert ran_before == list(range(1, len(ran_before) + 1)), ran_before
    assert ran_after == list(range(resumed + 1, max_steps + 1)), ran_after
    return resumed


def test_training_loses_a_node_and_finishes_from_its_last_checkpoint(tmp_path, cache_dir):
    result = multinode_run("train", tmp_path, cache_dir, "--max-steps", str(TRAIN_STEPS))
    resumed = check_node_loss(result, result["log"], TRAIN_STEPS)
    metrics = result["final_metrics"]
    assert metrics["step"] == TRAIN_STEPS and metrics["resumed_from_step"] == resumed
    assert verify_checkpoint(result["checkpoint"])["step"] == TRAIN_STEPS


def test_sweep_loses_a_node_and_completes(tmp_path, cache_dir):
    result = multinode_run("tune", tmp_path, cache_dir, "--max-steps", str(TRIAL_STEPS), "--samples", str(SAMPLES))
    trials = {t["trial_id"]: t for t in result["trials"]}
    assert len(trials) == SAMPLES
    assert all(t["status"] in ("finished", "stopped early") for t in trials.values()), trials
    assert result["best_trial"] in trials and Path(result["best_json"]).is_file()
    best = json.loads(Path(result["best_json"]).read_text())
    assert best["trial_id"] == result["best_trial"] and verify_checkpoint(best["train_checkpoint"])

    # the trial whose worker was on the lost node restarted its workers from its checkpoint and
    # finished (it ran first, so ASHA had nothing to stop it for); the others never saw a failure
    victim = trials[result["killed_trial"]]
    check_node_loss(result, victim["log"], TRIAL_STEPS)
    assert victim["status"] == "finished" and victim["steps"] == TRIAL_STEPS
    for trial_id, t in trials.items():
        if trial_id != result["killed_trial"]:
            assert not [r for r in t["log"] if r.get("event") == "resume"], trial_id
