"""The suite's one `raylm train` GRPO run (configs/grpo.yaml from the tiny serving checkpoint, a
reward function from the user's own file), shared by test_grpo_train and test_lifecycle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli_env import clean_env
from serve_fixtures import tiny_checkpoint  # noqa: F401 - the shared tiny checkpoint

ROOT = Path(__file__).resolve().parents[2]

USER_REWARDS = '''
def short(prompts, completions, **columns):
    """Shorter answers score higher, 1 for an empty one (the user's own reward, in TRL's convention):
    graded, so the random starting model's completions differ in reward and every step learns."""
    return [max(0.0, 1.0 - len(c[0]["content"].strip()) / 40) for c in completions]
'''


LOGP_DIFF_MAX = 1e-3  # |trainer - engine| log-prob of a sampled token after a sync (fp32 both sides)


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


@pytest.fixture(scope="session")
def grpo_run(ray_cluster, tiny_checkpoint, tmp_path_factory):  # noqa: F811
    """(working directory, settings, the run's metrics.jsonl lines) of one `raylm train` GRPO run:
    test_grpo_train reads it, and test_lifecycle promotes its step-4 export into a live endpoint."""
    cwd = tmp_path_factory.mktemp("grpo-train")
    (cwd / "my_rewards.py").write_text(USER_REWARDS)
    sets = {**SETS, "model.name": tiny_checkpoint, "data.cache_dir": cwd / "cache", "train.storage_path": cwd / "runs"}
    done = raylm_train(cwd, sets)
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd, sets, [json.loads(s) for s in (cwd / "runs" / "grpo" / "metrics.jsonl").read_text().splitlines()]


def grpo_export(run) -> str:
    """The run's final (step 4) Hugging Face export."""
    return str(run[0] / "runs" / "grpo" / "step_00000004" / "hf")
