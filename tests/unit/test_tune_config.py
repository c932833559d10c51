"""Sweep validation happens before Ray: every error names the search-space entry at fault."""

from __future__ import annotations

from pathlib import Path

import pytest

from raylm.cli import main
from raylm.config import ConfigError, load_config
from raylm.tune import data_combinations, data_key, evals_per_trial, trial_config, validate_sweep

ROOT = Path(__file__).resolve().parents[2]
SWEEP = ROOT / "tune_configs" / "tiny_sweep.yaml"


def sweep(*overrides: str):
    return load_config(SWEEP, list(overrides))


def test_committed_sweeps_validate():
    for path in sorted((ROOT / "tune_configs").glob("*.yaml")):
        validate_sweep(load_config(path))


@pytest.mark.parametrize("space, fragment", [
    ("{}", "tune.search_space: empty"),
    ("{train.learning_rate: {loguniform: [1.0e-4, 1.0e-2]}}", "tune.search_space.train.learning_rate: no such config field"),
    ("{train.lr: {loguniform: [0, 1.0e-2]}}", "tune.search_space.train.lr: loguniform needs low > 0"),
    ("{train.lr: {uniform: [0.1, 0.01]}}", "tune.search_space.train.lr: uniform needs [low, high]"),
    ("{train.lr: {normal: [0, 1]}}", "tune.search_space.train.lr: expected one of"),
    ("{train.micro_batch_size: {choice: []}}", "tune.search_space.train.micro_batch_size: choice needs a non-empty list"),
    ("{train.micro_batch_size: {choice: [4, 0]}}", "tune.search_space.train.micro_batch_size: value 0 is invalid"),
    ("{deepspeed.zero_stage: {choice: [2, 5]}}", "tune.search_space.deepspeed.zero_stage: value 5 is invalid"),
    ("{train.run_name: {choice: [a, b]}}", "tune.search_space.train.run_name: cannot be swept"),
    ("{train: {choice: [1]}}", "tune.search_space.train: no such config field"),
    ("{data.seq_len: {uniform: [32, 64]}}", "tune.search_space.data.seq_len: a data setting needs a list of values"),
    ("{data.seq_len: {choice: [32, 4]}}", "tune.search_space.data.seq_len: value 4 is invalid"),
    ("{data.source: {choice: [embedded, /no/such/corpus.txt]}}", "tune.search_space.data.source: data.source=/no/such"),
])
def test_bad_search_space_names_the_entry(space, fragment):
    with pytest.raises(ConfigError) as err:
        validate_sweep(sweep(f"tune.search_space={space}"))
    assert fragment in str(err.value)


def test_other_sweep_errors_name_their_field():
    with pytest.raises(ConfigError, match="tune.metric"):
        validate_sweep(sweep("tune.metric=accuracy"))
    with pytest.raises(ConfigError, match="tune.search_alg=optuna: grid"):
        validate_sweep(sweep("tune.search_alg=optuna", "tune.search_space={train.lr: {grid: [0.1, 0.2]}}"))
    cfg = sweep("tune.asha.grace_period=50")
    with pytest.raises(ConfigError, match=rf"tune.asha.grace_period=50: a trial only evaluates {evals_per_trial(cfg)} times"):
        validate_sweep(cfg)


@pytest.mark.parametrize("metric, mode", [
    ("val_loss", "min"), ("loss", "min"), ("perplexity", "min"), ("val_rewards/accuracy", "max"),
    ("val_rewards/margins", "max"), ("rewards/accuracy", "max"), ("exact_match", "max"), ("contains", "max"),
])
def test_tune_mode_follows_the_metric(metric, mode):
    derived = load_config(None, [f"tune.metric={metric}"])  # the defaults set no tune.mode
    assert derived.tune.mode == mode
    assert load_config(None, [f"tune.metric={metric}", f"tune.mode={mode}"]).tune.mode == mode  # said again: fine
    other = "max" if mode == "min" else "min"
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"tune.metric={metric}", f"tune.mode={other}"])
    assert f"tune.mode: '{other}' contradicts tune.metric='{metric}'" in str(err.value)
    # a trial re-validates the dumped config: the derived mode travels and still agrees
    assert trial_config(derived.model_dump(mode="json"), {}, "/tmp", "t").tune.mode == mode


def test_a_metric_of_unknown_direction_keeps_an_explicit_mode():
    assert load_config(None, ["tune.metric=my_score", "tune.mode=max"]).tune.mode == "max"


def test_cli_refuses_a_mode_against_the_metric_before_ray(capsys):
    # tests/unit/conftest.py makes ray.init fail: exit 2 proves nothing was started
    assert main(["tune", "-c", str(ROOT / "tune_configs" / "dpo_sweep.yaml"), "--set", "tune.mode=min"]) == 2
    err = capsys.readouterr().err
    assert "tune.mode: 'min' contradicts tune.metric='val_rewards/accuracy'" in err, err
    assert main(["train", "--set", "tune.metric=perplexity", "--set", "tune.mode=max"]) == 2
    assert "tune.mode: 'max' contradicts tune.metric='perplexity'" in capsys.readouterr().err


def test_evals_per_trial_counts_the_final_evaluation():
    assert evals_per_trial(sweep("train.max_steps=40", "train.eval_every_steps=10")) == 4
    assert evals_per_trial(sweep("train.max_steps=45", "train.eval_every_steps=10")) == 5


def test_trial_config_applies_params_and_places_the_run(tmp_path):
    cfg = sweep()
    trial = trial_config(cfg.model_dump(mode="json"), {"train.lr": 0.005, "train.micro_batch_size": 4},
                         str(tmp_path), "abc_00001")
    assert (trial.train.lr, trial.train.micro_batch_size) == (0.005, 4)
    assert (trial.train.storage_path, trial.train.run_name) == (str(tmp_path), "abc_00001")
    assert trial.model == cfg.model and trial.data == cfg.data


def test_cli_rejects_a_bad_sweep_before_ray(capsys):
    # tests/unit/conftest.py makes ray.init fail: exit 2 proves nothing was started
    code = main(["tune", "-c", str(SWEEP), "--set", "tune.search_space={train.lr: {loguniform: [-1, 1]}}"])
    assert code == 2
    assert "tune.search_space.train.lr" in capsys.readouterr().err


def test_data_entries_build_each_distinct_data_config_once():
    cfg = sweep("tune.search_space={data.seq_len: {grid: [32, 64]}, data.seed: {choice: [0, 1]}, train.lr: {grid: [0.1, 0.2]}}")
    validate_sweep(cfg)
    combos = data_combinations(cfg)
    assert len(combos) == 4 and {c["data.seq_len"] for c in combos} == {32, 64}
    # a trial finds its data by its data.* values alone (train.lr does not matter)
    assert data_key({"train.lr": 0.1, "data.seed": 1, "data.seq_len": 32}) == data_key({"data.seq_len": 32, "data.seed": 1})
    assert data_combinations(sweep()) == [{}]


def test_cli_rejects_a_data_entry_that_cannot_work_before_ray(capsys):
    code = main(["tune", "-c", str(SWEEP), "--set", "tune.search_space={data.seq_len: {loguniform: [16, 64]}}"])
    assert code == 2
    assert "tune.search_space.data.seq_len" in capsys.readouterr().err


@pytest.mark.parametrize("search_alg", ["optuna", "hyperopt"])
def test_model_based_searchers_suggest_values_inside_the_space(search_alg):
    """The searcher raylm hands Tune, asked directly (no Ray cluster): every suggestion lies in
    tune.search_space, successive trials get different values, and it takes each finished trial's
    metric. tests/integration/test_tune.py runs an optuna sweep end to end."""
    from raylm.tune import _search_alg, param_space

    cfg = sweep(f"tune.search_alg={search_alg}", "tune.search_space={train.lr: {loguniform: [1.0e-3, 3.0e-2]}, "
                "train.micro_batch_size: {choice: [4, 8]}}")
    searcher = _search_alg(cfg, 1)
    assert searcher.set_search_properties(cfg.tune.metric, cfg.tune.mode, param_space(cfg))
    suggested = []
    for n in range(4):
        params = searcher.suggest(f"t{n}")
        assert 1e-3 <= params["train.lr"] <= 3e-2 and params["train.micro_batch_size"] in (4, 8), params
        suggested.append(params["train.lr"])
        searcher.on_trial_complete(f"t{n}", result={cfg.tune.metric: 5.0 + params["train.lr"],
                                                     "training_iteration": 1})
    assert len(set(suggested)) == 4, suggested


def test_a_trial_row_shows_the_evaluations_made_after_tune_stopped_recording(tmp_path):
    """ASHA stops a trial at a rung; Tune records nothing after that, but the run trains on until
    the stop reaches its workers and may checkpoint (best.json can pick those steps). The row's
    curve, steps and best come from the run's own log (its repeated val_loss on non-evaluation
    records and a resumed step's older record ignored); its status from Tune's decision."""
    import json
    from types import SimpleNamespace

    import pandas as pd

    from raylm.tune import _trial_row

    cfg = load_config(ROOT / "tune_configs" / "tiny_sweep.yaml", ["train.max_steps=40"])
    run = tmp_path / "trials" / "t1"
    run.mkdir(parents=True)
    records = [{"event": "start"}, {"step": 10, "val_loss": 7.0, "eval_s": 1}, {"step": 15, "val_loss": 7.0},
               {"step": 20, "val_loss": 6.9, "eval_s": 1},  # ASHA's rung: the last result Tune records
               {"step": 30, "val_loss": 6.5, "eval_s": 1}, {"event": "resume", "step": 20},
               {"step": 30, "val_loss": 6.4, "eval_s": 1}, {"step": 40, "val_loss": 6.3, "eval_s": 1}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4')
    told = pd.DataFrame({"step": [10, 20], "val_loss": [7.0, 6.9]})
    result = SimpleNamespace(metrics_dataframe=told, metrics={"trial_id": "t1"}, path=str(tmp_path / "tune" / "x_t1"),
                             filesystem=None, config={"train.lr": 1e-6}, error=None)
    row = _trial_row(result, cfg, str(tmp_path / "trials"))
    assert row.curve == [(10, 7.0), (20, 6.9), (30, 6.4), (40, 6.3)] and row.steps == 40
    assert (row.best_value, row.last_value, row.status) == (6.3, 6.3, "stopped early")
    (run / "metrics.jsonl").unlink()  # no log (an object-storage run that never uploaded one): Tune's record
    row = _trial_row(result, cfg, str(tmp_path / "trials"))
    assert (row.curve, row.steps, row.status) == ([(10, 7.0), (20, 6.9)], 20, "stopped early")


def test_grpo_sweep_ranks_trials_by_validation_reward():
    cfg = load_config(ROOT / "tune_configs" / "grpo_sweep.yaml")
    validate_sweep(cfg)
    assert cfg.train.objective == "grpo" and (cfg.tune.metric, cfg.tune.mode, cfg.tune.scheduler) == (
        "val_rewards/mean", "max", "asha")
    assert set(cfg.tune.search_space) == {"train.lr", "train.grpo.beta"}
    with pytest.raises(ConfigError, match=r"tune.metric: 'val_loss' is not reported with train.objective=grpo "
                                          r"\(val_rewards/mean, loss\)"):
        validate_sweep(load_config(ROOT / "tune_configs" / "grpo_sweep.yaml", ["tune.metric=val_loss", "tune.mode=min"]))
    with pytest.raises(ConfigError, match="tune.search_space.train.grpo.beta: value -1"):
        validate_sweep(load_config(ROOT / "tune_configs" / "grpo_sweep.yaml",
                                   ["tune.search_space={train.grpo.beta: {choice: [0.1, -1]}}"]))
