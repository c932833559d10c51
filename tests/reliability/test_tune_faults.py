"""Sweeps under faults: a trial's worker SIGKILLed (retried by its TorchTrainer, or recorded as
failed when it has no restarts left) and a sweep whose driver process is SIGKILLed mid-sweep
(the same sweep run again resumes it without training its finished trials again)."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from reliability_helpers import Background, complete_steps, kill_pid, last_step, read_log, train_workers, wait_for

from raylm.config import load_config
from raylm.tune import run_sweep

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(480)

STEPS = 10


def sweep_overrides(storage: Path, shakespeare: Path, cache_dir: str, name: str, space: str) -> list[str]:
    return [f"train.storage_path={storage}", f"data.source={shakespeare}", f"data.cache_dir={cache_dir}",
            "data.vocab_size=512", "data.seq_len=64", f"tune.sweep_name={name}", f"tune.search_space={space}",
            "tune.num_samples=1", "tune.max_concurrent_trials=1", "tune.scheduler=fifo",
            f"train.max_steps={STEPS}", "train.eval_every_steps=5", "train.checkpoint_every_steps=5",
            "train.log_every_steps=1", "train.micro_batch_size=4", "train.keep_checkpoints=4"]


def trial_logs(sweep_dir: Path) -> dict[str, list[dict]]:
    return {Path(d).name: read_log(d) for d in glob.glob(str(sweep_dir / "trials" / "*"))}


def test_a_trial_whose_worker_dies_is_retried_or_failed_and_the_sweep_finishes(tmp_path, prepared, shakespeare,
                                                                              cache_dir):
    """Two trials, one after the other, one worker SIGKILLed in each after its first checkpoint:
    the trial with train.max_failures=1 restarts its workers from that checkpoint and finishes;
    the one with max_failures=0 is recorded as failed; the sweep ends with a best trial."""
    cfg = load_config(ROOT / "tune_configs" / "tiny_sweep.yaml", sweep_overrides(
        tmp_path, shakespeare, cache_dir, "worker-dies", "{train.max_failures: {grid: [1, 0]}}"))
    sweep_dir = tmp_path / "worker-dies"
    job = Background(lambda: run_sweep(cfg, prepared))
    killed: dict[str, int] = {}

    def kill_next() -> bool:
        for trial, log in trial_logs(sweep_dir).items():
            # a checkpoint counts once every rank's part of it is in storage: the log records it
            # when rank 0 hands it to Ray Train's upload, before rank 1's shard may have landed
            if trial not in killed and complete_steps(sweep_dir / "trials" / trial) and last_step(log) < STEPS:
                workers = train_workers()
                if len(workers) == 2:
                    kill_pid(workers[1].pid)
                    killed[trial] = last_step(log)
        return len(killed) == 2 or not job.alive()

    wait_for(kill_next, 400, "two trials to reach their first checkpoint", interval_s=0.05)
    outcome = job.join(300, "the sweep")
    assert len(killed) == 2, f"killed workers of {killed} only"

    rows = {r.params["train.max_failures"]: r for r in outcome.trials}
    assert set(rows) == {0, 1} and set(killed) == {r.trial_id for r in outcome.trials}
    retried, failed = rows[1], rows[0]
    assert retried.status == "finished" and retried.steps == STEPS, retried
    log = read_log(sweep_dir / "trials" / retried.trial_id)
    resumes = [r for r in log if r.get("event") == "resume"]
    assert len(resumes) == 1 and 5 <= resumes[0]["step"] <= killed[retried.trial_id] + 5
    assert sorted({r["step"] for r in log if "loss" in r}) == list(range(1, STEPS + 1))
    assert failed.status == "failed" and failed.error, failed
    assert outcome.best is not None and outcome.best.trial_id == retried.trial_id
    best = json.loads((sweep_dir / "best.json").read_text())
    assert best["trial_id"] == retried.trial_id and os.path.isdir(best["checkpoint"])
    assert "failed" in (sweep_dir / "trials.md").read_text()


DRIVER = textwrap.dedent("""
    import sys
    from raylm.cluster import init_ray
    from raylm.config import load_config
    from raylm.tune import run_sweep
    cfg = load_config(sys.argv[1], sys.argv[3:])
    init_ray(cfg, address=sys.argv[2])
    run_sweep(cfg)
""")


def experiment_statuses(tune_dir: Path) -> dict[str, str]:
    """trial_id -> status as Tune last persisted it (what a restore reads)."""
    out = {}
    for path in glob.glob(str(tune_dir / "experiment_state-*.json")):
        try:
            state = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        for entry in state.get("trial_data", []):
            trial = json.loads(entry[0]) if isinstance(entry, list) else entry
            if isinstance(trial, str):
                trial = json.loads(trial)
            out[trial.get("trial_id")] = trial.get("status")
    return out


def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path, ray_cluster, shakespeare,
                                                                       cache_dir, prepared):
    """A sweep driver (its own process, connected to this cluster) is SIGKILLed while its second
    trial trains. Running the sweep again resumes it: the finished trial's files are untouched
    and it is not trained again; the interrupted trial is completed; both appear in the results."""
    # the suite's prepared corpus: the sweep driver finds its cache built
    overrides = sweep_overrides(tmp_path, shakespeare, cache_dir, "interrupted", "{train.lr: {grid: [3.0e-3, 1.0e-3]}}")
    sweep_dir = tmp_path / "interrupted"
    gcs = ray_cluster._private.worker._global_node.gcs_address
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform")}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(ROOT / "tune_configs" / "tiny_sweep.yaml"), gcs,
                             *overrides], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        def second_trial_training() -> bool:
            assert proc.poll() is None, f"the sweep driver exited early:\n{proc.stdout.read()[-3000:]}"
            logs = trial_logs(sweep_dir)
            done = [t for t, log in logs.items() if last_step(log) == STEPS]
            running = [t for t, log in logs.items() if 0 < last_step(log) < STEPS]
            return done and running and experiment_statuses(sweep_dir / "tune").get(done[0]) == "TERMINATED"

        wait_for(second_trial_training, 300, "the first trial to finish and the second to train", interval_s=0.2)
        finished = next(t for t, log in trial_logs(sweep_dir).items() if last_step(log) == STEPS)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver (and anything it forked) dies at once
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # the killed driver's job ends: its trial's workers go away
    wait_for(lambda: not train_workers(), 60, "the interrupted trial's workers to exit", interval_s=0.5)
    snapshot = {p: os.path.getmtime(p) for p in glob.glob(str(sweep_dir / "trials" / finished / "**"), recursive=True)}
    finished_log = (sweep_dir / "trials" / finished / "metrics.jsonl").read_text()

    cfg = load_config(ROOT / "tune_configs" / "tiny_sweep.yaml", overrides)
    outcome = run_sweep(cfg)

    assert (sweep_dir / "trials" / finished / "metrics.jsonl").read_text() == finished_log  # not trained again
    assert {p: os.path.getmtime(p) for p in snapshot if os.path.exists(p)} == snapshot
    assert sorted(r.params["train.lr"] for r in outcome.trials) == [1.0e-3, 3.0e-3]
    assert all(r.status == "finished" and r.steps == STEPS for r in outcome.trials), outcome.trials
    other = next(r for r in outcome.trials if r.trial_id != finished)
    assert last_step(read_log(sweep_dir / "trials" / other.trial_id)) == STEPS
    # best.json names the trial whose best exported checkpoint has the lowest val_loss, read here from
    # the checkpoints' own manifests (the resumed trial's included)
    exported = {r.trial_id: exported_values(sweep_dir / "trials" / r.trial_id) for r in outcome.trials}
    assert all(exported.values()), exported
    expected = min(exported, key=lambda t: min(exported[t].values()))
    best = json.loads((sweep_dir / "best.json").read_text())
    assert best["trial_id"] == expected and best["mode"] == "min", (best, exported)
    assert best["value"] == min(exported[expected].values())
    assert Path(best["checkpoint"]).parent.name == min(exported[expected], key=exported[expected].get)


def exported_values(run_dir: Path) -> dict[str, float]:
    """step folder -> val_loss measured at its step, of each complete checkpoint with an HF export."""
    out = {}
    for manifest in glob.glob(str(run_dir / "step_*" / "raylm_checkpoint.json")):
        m = json.loads(Path(manifest).read_text())
        if "hf/config.json" in m["files"] and "val_loss" in m.get("eval", {}):
            out[Path(manifest).parent.name] = m["eval"]["val_loss"]
    return out
