"""`raylm train -c configs/grpo.yaml` end to end, as a user runs it from a second shell (a clean
environment joining the session's cluster by RAY_ADDRESS), with a reward function from the user's
own file in the working directory (shipped to the workers by the runtime env).

One DeepSpeed worker and one vLLM rollout engine, the tiny serving checkpoint as the starting model,
4 steps of 4 prompts x 4 completions. Checked from the run's metrics.jsonl: val_rewards/mean (and
per function) at step 0 and at the end; every step's rewards/mean the weighted sum of the
functions' means, the weight sync measured, the rollouts of the step's own weights (staleness 0).
One run: 100-115 s on the shared 2-core machine, mostly the data stage's build and the engine's and
the workers' start.

Opt-in (RAYLM_SOAK=1, another 55 s: the data cache is reused): a run holding only that run's step-2 checkpoint resumes there;
steps 3 and 4 are generated again from the same prompts, seeds and weights, so they log the same
rewards, completion lengths and loss.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_env import clean_env
from serve_fixtures import tiny_checkpoint  # noqa: F401 - the shared tiny checkpoint

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[2]

USER_REWARDS = '''
def short(prompts, completions, **columns):
    """1 for an answer of at most 3 characters (the user's own reward, in TRL's convention)."""
    return [1.0 if len(c[0]["content"].strip()) <= 3 else 0.0 for c in completions]
'''


def raylm_train(cwd: Path, sets: dict) -> subprocess.CompletedProcess:
    import ray

    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    return subprocess.run([sys.executable, "-m", "raylm", "train", "-c", str(ROOT / "configs" / "grpo.yaml"), "--json",
                           *args], cwd=cwd, env=clean_env(RAY_ADDRESS=ray.get_runtime_context().gcs_address),
                          capture_output=True, text=True, timeout=480)


SETS = {"data.source": ROOT / "configs" / "data" / "arith_prompt.jsonl", "train.run_name": "grpo",
        "train.grpo.reward_funcs": "[raylm.rewards:exact_match, my_rewards:short]",
        "train.grpo.reward_weights": "[1.0, 0.5]", "train.grpo.num_generations": 4,
        "train.micro_batch_size": 4, "train.max_steps": 4, "train.log_every_steps": 1,
        "train.eval_every_steps": 4, "train.eval_batches": 1, "train.checkpoint_every_steps": 2,
        "train.warmup_steps": 1, "train.lr": 1e-3, "serve.kv_cache_memory_gib": 0.05,
        "serve.engine_kwargs": "{enforce_eager: true}"}  # no torch.compile of a model run for 4 steps


@pytest.fixture(scope="module")
def grpo_run(ray_cluster, tiny_checkpoint, tmp_path_factory):  # noqa: F811
    """(working directory, settings, the run's metrics.jsonl lines) of one `raylm train` GRPO run."""
    cwd = tmp_path_factory.mktemp("grpo-train")
    (cwd / "my_rewards.py").write_text(USER_REWARDS)
    sets = {**SETS, "model.name": tiny_checkpoint, "data.cache_dir": cwd / "cache", "train.storage_path": cwd / "runs"}
    done = raylm_train(cwd, sets)
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd, sets, [json.loads(s) for s in (cwd / "runs" / "grpo" / "metrics.jsonl").read_text().splitlines()]


def test_grpo_logs_rewards_sync_and_validation_from_step_0(grpo_run):
    _, _, lines = grpo_run
    evals = {r["step"]: r for r in lines if "val_rewards/mean" in r}
    assert set(evals) == {0, 4}, evals
    for r in evals.values():
        assert r["val_rewards/mean"] == pytest.approx(r["val_rewards/exact_match/mean"]
                                                      + 0.5 * r["val_rewards/short/mean"], abs=1e-6)
    steps = {r["step"]: r for r in lines if "rewards/mean" in r}
    assert sorted(steps) == [1, 2, 3, 4]
    for r in steps.values():
        assert r["rewards/mean"] == pytest.approx(r["rewards/exact_match/mean"] + 0.5 * r["rewards/short/mean"],
                                                  abs=1e-5)
        assert r["sync_s"] > 0 and r["rollout_tokens_per_s"] > 0 and r["staleness"] == 0
        assert 0 < r["completion_length"] <= 6 and r["kl"] >= 0 and 0 <= r["clip_ratio"] <= 1


@pytest.mark.slow
def test_grpo_resume_generates_the_same_completions(grpo_run):
    cwd, sets, lines = grpo_run
    steps = {r["step"]: r for r in lines if "rewards/mean" in r}
    # a run holding the step-2 checkpoint only resumes there and trains steps 3 and 4 again
    shutil.copytree(cwd / "runs" / "grpo" / "step_00000002", cwd / "runs" / "again" / "step_00000002")
    again = raylm_train(cwd, {**sets, "train.run_name": "again"})
    assert again.returncode == 0, again.stderr[-3000:]
    lines = [json.loads(s) for s in (cwd / "runs" / "again" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r.get("event") == "resume"] == [2]
    redone = [r for r in lines if "rewards/mean" in r]
    assert [r["step"] for r in redone] == [3, 4]
    for r in redone:
        for key in ("rewards/mean", "rewards/short/mean", "completion_length", "loss"):
            assert r[key] == pytest.approx(steps[r["step"]][key], rel=1e-5, abs=1e-6), (key, r["step"])
