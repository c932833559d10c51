"""`raylm train -c configs/grpo.yaml` end to end, as a user runs it from a second shell (a clean
environment joining the session's cluster by RAY_ADDRESS), with a reward function from the user's
own file in the working directory (shipped to the workers by the runtime env).

One DeepSpeed worker and one vLLM rollout engine, the tiny serving checkpoint as the starting model,
4 steps of 4 prompts x 4 completions. Checked from the run's metrics.jsonl: val_rewards/mean (and
per function) at step 0 and at the end; every step's rewards/mean the weighted sum of the
functions' means, the weight sync measured, the rollouts of the step's own weights (staleness 0, and
the engine's log-probs of the sampled tokens within 1e-3 of the trainer's).
One run: 100-115 s on the shared 2-core machine, mostly the data stage's build and the engine's and
the workers' start.

Opt-in (RAYLM_SOAK=1, another 55 s: the data cache is reused): a run holding only that run's step-2 checkpoint resumes there;
steps 3 and 4 are generated again from the same prompts, seeds and weights, so they log the same
rewards, completion lengths and loss. Opt-in (RAYLM_EXTENDED=1): LoRA under ZeRO-3, the gathered and
merged weights synced every step.
"""

from __future__ import annotations

import json
import shutil

import pytest

from grpo_fixtures import LOGP_DIFF_MAX, SETS, USER_REWARDS, raylm_train  # grpo_run: conftest.py
from serve_fixtures import tiny_checkpoint

__all__ = ["tiny_checkpoint"]  # fixtures used by this module

pytestmark = pytest.mark.timeout(600)

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
        # the engine sampled with the weights being trained (fp32 on both sides): a sync that failed or
        # sent the wrong tensors leaves the engine's log-probs where the trainer's were steps ago
        assert r["sampling/sampling_logp_difference/max"] < LOGP_DIFF_MAX, (r["step"], r)
    # ... and those weights moved: the rewards differ within groups (advantages not all 0), and by
    # step 4 the policy is off the reference
    assert all(r["rewards/std"] > 0 for r in steps.values()) and steps[4]["kl"] > 0, steps


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


@pytest.mark.extended
def test_grpo_with_lora_under_zero3_samples_from_the_weights_it_trains(ray_cluster, tiny_checkpoint,  # noqa: F811
                                                                        tmp_path_factory):
    """LoRA under ZeRO-3: every step the partitioned parameters are gathered, each adapted layer is
    merged (W + scale B A) and sent to the engine, so the engine samples from the weights being
    trained. lr 1e-2 moves the adapters far enough in a step that a sync that sent the base (or
    nothing) would show in the log-prob difference."""
    cwd = tmp_path_factory.mktemp("grpo-z3-lora")
    (cwd / "my_rewards.py").write_text(USER_REWARDS)
    sets = {**SETS, "model.name": tiny_checkpoint, "data.cache_dir": cwd / "cache", "train.storage_path": cwd / "runs",
            "deepspeed.zero_stage": 3, "train.lora": "{r: 8, alpha: 16, target_modules: all-linear}",
            "train.lr": 1e-2}
    done = raylm_train(cwd, sets)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(s) for s in (cwd / "runs" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in lines if "rewards/mean" in r}
    assert sorted(steps) == [1, 2, 3, 4]
    for r in steps.values():
        assert r["sync_s"] > 0 and r["sampling/sampling_logp_difference/max"] < LOGP_DIFF_MAX, (r["step"], r)
    assert steps[4]["kl"] > 0  # the adapters moved the policy off the base (the reference)
    assert (cwd / "runs" / "grpo" / "step_00000004" / "adapter" / "adapter_config.json").exists()
