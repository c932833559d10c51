"""The Tune stage on a real local Ray: trials are real TorchTrainers (DeepSpeed, 2 CPU workers)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from raylm.config import load_config
from raylm.data import prepare_data
from raylm.tune import run_sweep

ROOT = Path(__file__).resolve().parents[2]
GOOD_LRS, BAD_LRS = (3e-3, 1e-2), (1e-6,)


@pytest.fixture(scope="module")
def embedded_prepared(ray_cluster, cache_dir):
    cfg = load_config(ROOT / "tune_configs" / "tiny_sweep.yaml", [f"data.cache_dir={cache_dir}"])
    return prepare_data(cfg.data, verbose=False)


def sweep_config(tmp_path: Path, cache_dir: str, *overrides: str):
    return load_config(ROOT / "tune_configs" / "tiny_sweep.yaml",
                       [f"train.storage_path={tmp_path}", f"data.cache_dir={cache_dir}", *overrides])


def test_asha_stops_bad_learning_rates_and_best_checkpoint_loads(tmp_path, cache_dir, embedded_prepared):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # a good learning rate first (grid order), so ASHA has a rung to compare the bad one against;
    # 20 steps evaluated every 5: the 4 rungs of the committed sweep's 40 steps every 10, in half the steps
    # keep 1: Ray Train keeps each trial's best checkpoint by its own evaluation beside the newest
    cfg = sweep_config(tmp_path, cache_dir, "tune.search_space={train.lr: {grid: [3.0e-3, 1.0e-6]}}",
                       "tune.num_samples=1", "tune.max_concurrent_trials=1", "tune.sweep_name=asha",
                       "train.max_steps=20", "train.eval_every_steps=5", "train.checkpoint_every_steps=5",
                       "train.keep_checkpoints=1")
    outcome = run_sweep(cfg, embedded_prepared)

    assert len(outcome.trials) == 2 and all(r.status != "failed" for r in outcome.trials)
    stopped = [r for r in outcome.trials if r.status == "stopped early"]
    assert stopped, f"ASHA stopped nothing: {[(r.params, r.steps) for r in outcome.trials]}"
    assert all(r.params["train.lr"] in BAD_LRS for r in stopped)
    assert outcome.best.params["train.lr"] in GOOD_LRS
    good_losses = [r.last_value for r in outcome.trials if r.params["train.lr"] in GOOD_LRS]
    bad_losses = [r.last_value for r in outcome.trials if r.params["train.lr"] in BAD_LRS]
    assert max(good_losses) < min(bad_losses)

    # best.json points at a Hugging Face checkpoint that loads as-is
    best = json.loads((tmp_path / "asha" / "best.json").read_text())
    assert best["trial_id"] == outcome.best.trial_id and best["params"]["train.lr"] in GOOD_LRS
    # ... the best exported checkpoint over all trials, by the val_loss measured at its own step
    exported = [(m["eval"]["val_loss"], r.trial_id, step) for r in outcome.trials
                 for step, m in manifests(tmp_path / "asha" / "trials" / r.trial_id, complete_only=True).items()
                 if m["exported"] and "val_loss" in m["eval"]]
    value, trial_id, step = min(exported)
    assert (best["value"], best["trial_id"], best["step"]) == (pytest.approx(value), trial_id, step)
    # ... and the table and curves show every evaluation the trials made, those after ASHA's stop included
    for r in outcome.trials:
        for at, m in manifests(tmp_path / "asha" / "trials" / r.trial_id, complete_only=True).items():
            if "val_loss" in m["eval"]:
                assert dict(r.curve)[at] == pytest.approx(m["eval"]["val_loss"]) and r.steps >= at
    # keep 1 kept each trial's best checkpoint by score and its newest (for resume), the rest deleted;
    # only the best and the final one carry hf/
    # (a trial ASHA stopped can be killed between a new checkpoint and the deletion of an old one)
    for r in outcome.trials:
        kept = manifests(tmp_path / "asha" / "trials" / r.trial_id, complete_only=True)
        scored = {s: m["eval"]["val_loss"] for s, m in kept.items() if "val_loss" in m["eval"]}
        best_step = min(scored, key=lambda s: (scored[s], -s))
        assert kept[best_step]["exported"], (r.trial_id, best_step, sorted(kept))
        if r.status == "finished":
            assert set(kept) == {best_step, 20} and kept[20]["exported"], (r.trial_id, sorted(kept))
    model = AutoModelForCausalLM.from_pretrained(best["checkpoint"])
    tok = AutoTokenizer.from_pretrained(best["checkpoint"])
    assert model.config.vocab_size >= len(tok) and best["checkpoint"].endswith(f"step_{step:08d}/hf")
    # the reports: a table with every trial, a PNG of the curves
    table = (tmp_path / "asha" / "trials.md").read_text()
    assert all(r.trial_id in table for r in outcome.trials) and "stopped early" in table
    assert (tmp_path / "asha" / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_impossible_trial_fails_alone_and_a_rerun_resumes_without_retraining(tmp_path, cache_dir, embedded_prepared,
                                                                              capsys):
    """Also a sweep over a data setting: each data.seq_len is built once, into its own cache, and
    the trials with that value (the possible one and the impossible one) train on it."""
    cfg = sweep_config(tmp_path, cache_dir, "tune.search_space={train.micro_batch_size: {grid: [4, 100000]}, "
                       "data.seq_len: {grid: [64, 128]}}",
                       "tune.num_samples=1", "tune.scheduler=fifo", "tune.sweep_name=impossible",
                       "train.max_steps=10", "train.eval_every_steps=5", "train.checkpoint_every_steps=5")
    outcome = run_sweep(cfg, embedded_prepared)
    out = capsys.readouterr().out
    assert out.count("sweep data data.seq_len=") == 2 and out.count("data cache: built") == 2
    assert "sweep data: 2 data cache(s), prepared once before the trials" in out  # 4 trials, 2 builds
    assert len(os.listdir(tmp_path / "datasets")) == 2  # two data configs, four trials: two caches
    trials = {(r.params["train.micro_batch_size"], r.params["data.seq_len"]): r for r in outcome.trials}
    for seq_len in (64, 128):
        assert trials[100000, seq_len].status == "failed" and "micro_batch_size" in trials[100000, seq_len].error
        ok = trials[4, seq_len]
        assert ok.status == "finished" and ok.steps == 10
        logged = [json.loads(line) for line in (Path(ok.checkpoint).parent / "metrics.jsonl").read_text().splitlines()]
        start = next(r for r in logged if r.get("event") == "start")  # the cache the trial trained on
        assert json.loads((Path(start["data"]) / "raylm_dataset.json").read_text())["settings"]["seq_len"] == seq_len
    by_batch = {r.params["train.micro_batch_size"]: r for r in outcome.trials if r.params["data.seq_len"] == 64}
    assert outcome.best.trial_id in {trials[4, 64].trial_id, trials[4, 128].trial_id}
    assert "failed" in (tmp_path / "impossible" / "trials.md").read_text()

    # the same command again resumes the sweep: the finished trial is not trained again
    log = Path(by_batch[4].checkpoint).parent / "metrics.jsonl"
    before = log.read_text()
    again = run_sweep(cfg, embedded_prepared)
    assert log.read_text() == before and capsys.readouterr().out.count("data cache: reused") == 2
    assert [(r.trial_id, r.status, r.params) for r in again.trials] == [(r.trial_id, r.status, r.params) for r in outcome.trials]
    assert again.best.trial_id == outcome.best.trial_id
    assert os.path.isdir(json.loads((tmp_path / "impossible" / "best.json").read_text())["checkpoint"])


def manifests(trial_dir: Path, complete_only: bool = False) -> dict[int, dict]:
    """The trial's checkpoint manifests by step. `complete_only`: skip a step folder without one,
    as resume and best.json do; a trial Tune stops can be killed while it writes a checkpoint."""
    return {int(p.name.split("_")[1]): json.loads((p / "raylm_checkpoint.json").read_text())
            for p in sorted(trial_dir.glob("step_*"))
            if not complete_only or (p / "raylm_checkpoint.json").is_file()}


# The searchers raylm hands Tune are asked directly in tests/unit/test_tune_config.py (optuna and
# hyperopt: suggestions inside the space, each trial's metric taken), and the ASHA sweep above checks
# keep-best and best.json; this end-to-end optuna sweep is opt-in (RAYLM_EXTENDED=1), within CI's time.
@pytest.mark.extended
def test_model_based_search_runs_trials_and_best_json_names_the_best_checkpoint(tmp_path, cache_dir,
                                                                                embedded_prepared):
    """optuna suggests each trial's values (inside the space, different per trial; hyperopt is
    asked the same in tests/unit/test_tune_config.py); Ray Train keeps each trial's best checkpoint
    by its own evaluation beside the newest (keep 1), only those carry hf/, and best.json names the
    best of them over all trials, not a trial's newest."""
    search_alg = "optuna"
    cfg = sweep_config(tmp_path, cache_dir, f"tune.search_alg={search_alg}", "tune.num_samples=2",
                       "tune.scheduler=fifo", "tune.max_concurrent_trials=null", f"tune.sweep_name={search_alg}",
                       "tune.search_space={train.lr: {loguniform: [1.0e-3, 3.0e-2]}}", "train.max_steps=6",
                       "train.eval_every_steps=3", "train.checkpoint_every_steps=3", "train.keep_checkpoints=1")
    outcome = run_sweep(cfg, embedded_prepared)
    assert [r.status for r in outcome.trials] == ["finished", "finished"]
    lrs = [r.params["train.lr"] for r in outcome.trials]
    assert lrs[0] != lrs[1] and all(1e-3 <= lr <= 3e-2 for lr in lrs)

    best_of_trials = []
    for r in outcome.trials:
        kept = manifests(tmp_path / search_alg / "trials" / r.trial_id)
        scored = {step: m["eval"]["val_loss"] for step, m in kept.items() if "val_loss" in m["eval"]}
        best_step = min(scored, key=lambda s: (scored[s], -s))
        assert set(kept) == {best_step, 6}  # the best by score and the newest (for resume); the rest deleted
        assert kept[best_step]["exported"] and kept[6]["exported"]  # the best, and the final one
        best_of_trials.append((scored[best_step], r.trial_id, best_step))
    value, trial_id, step = min(best_of_trials)
    best = json.loads((tmp_path / search_alg / "best.json").read_text())
    assert (best["value"], best["trial_id"], best["step"]) == (pytest.approx(value), trial_id, step)
    assert best["checkpoint"].endswith(f"step_{step:08d}/hf") and os.path.isfile(Path(best["checkpoint"]) / "config.json")
