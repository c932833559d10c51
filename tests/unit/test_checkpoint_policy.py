"""Which checkpoints get the Hugging Face export, how many trials a sweep runs at once, and a
sweep folder refusing an edited search space: decided before (or without) Ray and DeepSpeed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raylm.cli import main
from raylm.config import load_config
from raylm.train.policy import Checkpointer
from raylm.tune import SPACE_FILE, grown_capacity, max_concurrency

ROOT = Path(__file__).resolve().parents[2]


def checkpointer(*overrides: str, keep_best: bool = False) -> Checkpointer:
    return Checkpointer(load_config(ROOT / "configs" / "tiny.yaml", list(overrides)), engine=None, tokenizer=None,
                        keep_best=keep_best)


def exports(c: Checkpointer, evaluations: list) -> list[bool]:
    """plan() over checkpoints with these evaluations (None: not evaluated at that step); the last is final."""
    return [c.plan(force=i == len(evaluations) - 1, evaluation={} if v is None else {"val_loss": v})
            for i, v in enumerate(evaluations)]


def test_a_plain_run_exports_only_its_final_checkpoint_unless_every():
    assert exports(checkpointer(), [3.0, 2.0, None, 1.0]) == [False, False, False, True]
    assert exports(checkpointer("train.export=every"), [3.0, 2.0, None, 1.0]) == [True, True, True, True]


def test_a_trial_exports_each_best_so_far_and_ranks_unmeasured_checkpoints_last():
    c = checkpointer(keep_best=True)
    plans, scores = [], []
    for i, v in enumerate([3.0, None, 2.0, 2.5, 2.0, 2.8]):
        plans.append(c.plan(force=i == 5, evaluation={} if v is None else {"val_loss": v}))
        scores.append(c.score)
    # a tie with the best exports too: Ray Train keeps the later of equal scores
    assert plans == [True, False, True, False, True, True]
    assert scores == [3.0, float("inf"), 2.0, 2.5, 2.0, 2.8]
    assert c.best == 2.0  # the worse final checkpoint is exported but is not the best


def test_mode_max_and_a_resumed_best():
    c = checkpointer("tune.metric=val_rewards/accuracy", keep_best=True)  # tune.mode follows it: max
    c.best = 0.5  # as read back from the resumed checkpoint's manifest
    assert [c.plan(False, {"val_rewards/accuracy": v}) for v in (0.4, 0.6)] == [False, True]
    assert c.best == 0.6 and c.score == 0.6
    assert c.plan(False, {}) is False and c.score == float("-inf")


def test_concurrency_counts_what_the_cluster_can_grow_to():
    cfg = load_config(ROOT / "tune_configs" / "tiny_sweep.yaml",
                      ["tune.max_concurrent_trials=null", "tune.num_samples=8", "cluster.worker_max_replicas=3",
                       "cluster.worker_cpus=8", "cluster.head_cpus=2"])
    # KubeRay with no worker pod up yet: 2 head CPUs now, 2 + 3 x 8 once scaled (2 CPUs per trial)
    assert max_concurrency(cfg, grown_capacity(cfg, {"CPU": 2.0}, {}, on_kuberay=False)) == 1
    assert max_concurrency(cfg, grown_capacity(cfg, {"CPU": 2.0}, {}, on_kuberay=True)) == 8  # num_samples bounds it
    assert grown_capacity(cfg, {"CPU": 2.0}, {}, on_kuberay=True)["CPU"] == 26
    # the autoscaler's own limit (its node groups' max counts), on any cluster
    assert max_concurrency(cfg, grown_capacity(cfg, {"CPU": 2.0}, {"CPU": 10}, on_kuberay=False)) == 5
    limited = load_config(ROOT / "tune_configs" / "tiny_sweep.yaml", ["tune.max_concurrent_trials=2"])
    assert max_concurrency(limited, {"CPU": 64.0}) == 2


def test_rerunning_a_sweep_with_an_edited_search_space_exits_2_before_ray(tmp_path, capsys, monkeypatch):
    sweep = tmp_path / "same"
    sweep.mkdir()
    (sweep / SPACE_FILE).write_text(json.dumps({"search_space": {"train.lr": {"loguniform": [1e-4, 3e-2]}}}))
    args = ["tune", "-c", str(ROOT / "tune_configs" / "tiny_sweep.yaml"), "--set", f"train.storage_path={tmp_path}",
            "--set", "tune.sweep_name=same", "--set", "tune.search_space={train.lr: {loguniform: [1.0e-4, 1.0e-2]}}"]
    import raylm.cluster

    def no_ray(*args, **kwargs):  # ray.init is refused by conftest, but a session that already runs Ray
        raise AssertionError("the edited search space must be refused before Ray is joined or started")

    monkeypatch.setattr(raylm.cluster, "init_ray", no_ray)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "tune.search_space" in err and str(sweep) in err and "train.lr" in err and "tune.sweep_name" in err, err
    # the stored space itself passes the check (the sweep would resume)
    from raylm.tune import check_sweep_folder

    same = load_config(ROOT / "tune_configs" / "tiny_sweep.yaml", [
        f"train.storage_path={tmp_path}", "tune.sweep_name=same",
        "tune.search_space={train.lr: {loguniform: [1.0e-4, 3.0e-2]}}"])
    check_sweep_folder(same)
    check_sweep_folder(same.model_copy(update={"tune": same.tune.model_copy(update={"sweep_name": "new"})}))
