"""`raylm train -c configs/grpo.yaml` end to end, as a user runs it from a second shell (a clean
environment joining the session's cluster by RAY_ADDRESS), with a reward function from the user's
own file in the working directory (shipped to the workers by the runtime env).

One DeepSpeed worker and one vLLM rollout engine, the tiny serving checkpoint as the starting model,
4 steps of 4 prompts x 4 completions. Checked from the run's metrics.jsonl: val_rewards/mean (and
per function) at step 0 and at the end; every step's rewards/mean the weighted sum of the
functions' means, the weight sync measured, the rollouts of the step's own weights (staleness 0).
Then the newest checkpoint is removed and the same command resumes from step 2: steps 3 and 4 are
generated again from the same prompts, seeds and weights, so they log the same rewards and loss
(the completions are the same). About a minute and a half, mostly two engine starts.
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


def test_grpo_trains_validates_and_resumes_the_same_completions(ray_cluster, tiny_checkpoint, tmp_path):  # noqa: F811
    (tmp_path / "my_rewards.py").write_text(USER_REWARDS)
    sets = {"model.name": tiny_checkpoint, "data.source": ROOT / "configs" / "data" / "arith_prompt.jsonl",
            "data.cache_dir": tmp_path / "cache", "train.storage_path": tmp_path / "runs", "train.run_name": "grpo",
            "train.grpo.reward_funcs": "[raylm.rewards:exact_match, my_rewards:short]",
            "train.grpo.reward_weights": "[1.0, 0.5]", "train.grpo.num_generations": 4,
            "train.micro_batch_size": 4, "train.max_steps": 4, "train.log_every_steps": 1,
            "train.eval_every_steps": 4, "train.eval_batches": 1, "train.checkpoint_every_steps": 2,
            "train.warmup_steps": 1, "train.lr": 1e-3, "serve.kv_cache_memory_gib": 0.05}
    done = raylm_train(tmp_path, sets)
    assert done.returncode == 0, done.stderr[-3000:]
    run = tmp_path / "runs" / "grpo"
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
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

    shutil.rmtree(run / "step_00000004")  # the run resumes from step 2 and trains steps 3 and 4 again
    again = raylm_train(tmp_path, sets)
    assert again.returncode == 0, again.stderr[-3000:]
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r.get("event") == "resume"] == [2]
    redone = [r for r in lines[lines.index(next(r for r in lines if r.get("event") == "resume")):] if "rewards/mean" in r]
    assert [r["step"] for r in redone] == [3, 4]
    for r in redone:
        for key in ("rewards/mean", "rewards/short/mean", "completion_length", "loss"):
            assert r[key] == pytest.approx(steps[r["step"]][key], rel=1e-5, abs=1e-6), (key, r["step"])
