"""The promotion gate, the promotion history and the adapter checks, without Ray."""

from __future__ import annotations

import json

import pytest

from raylm.config import load_config
from raylm.errors import CheckpointError, InputError
from raylm.lifecycle import adapters, eval_gate, history, rollout


@pytest.mark.parametrize("metric,candidate,served,tolerance,passes", [
    ("val_loss", 2.0, 2.1, 0.0, True),
    ("val_loss", 2.1, 2.1, 0.0, True),        # at least as good
    ("val_loss", 2.15, 2.1, 0.0, False),
    ("val_loss", 2.15, 2.1, 0.1, True),       # within the tolerance
    ("perplexity", 9.0, 8.0, 0.5, False),
    ("exact_match", 0.30, 0.25, 0.0, True),   # higher is better
    ("exact_match", 0.20, 0.25, 0.0, False),
    ("contains", 0.20, 0.25, 0.05, True),
])
def test_gate_compares_in_the_metrics_direction_within_the_tolerance(metric, candidate, served, tolerance, passes):
    ok, line = eval_gate.compare(metric, tolerance, {metric: candidate}, {metric: served})
    assert ok is passes
    assert f"{candidate:.4f}" in line and f"{served:.4f}" in line, "the message gives both numbers"


def test_gate_names_a_metric_the_eval_does_not_have():
    with pytest.raises(InputError, match="exact_match"):
        eval_gate.compare("exact_match", 0.0, {"val_loss": 2.0}, {"val_loss": 2.1})


def test_evals_on_different_sets_are_not_compared():
    with pytest.raises(InputError, match="same eval set"):
        eval_gate.same_eval_set({"eval_set": "a", "checkpoint": "x"}, {"eval_set": "b", "checkpoint": "y"})


def test_history_records_versions_and_the_live_model(tmp_path):
    cfg = load_config(None, [f"train.storage_path={tmp_path}"])
    assert history.read_history(cfg) == [] and history.next_version([]) == "v1"
    history.record(cfg, action="deploy", version="v1", checkpoint="/a")
    history.record(cfg, action="promote", version="v2", checkpoint="/b", from_version="v1", from_checkpoint="/a")
    history.record(cfg, action="adapter", name="ft", model="raylm:ft")
    history.record(cfg, action="rollback", version="v1", checkpoint="/a", from_version="v2", from_checkpoint="/b")
    entries = history.read_history(cfg)
    assert [e["action"] for e in entries] == ["deploy", "promote", "adapter", "rollback"]
    assert history.live_entry(entries)["checkpoint"] == "/a"
    assert history.next_version(entries) == "v3", "a rollback reuses the version it returns to"
    assert json.loads((tmp_path / "serve" / "raylm" / "promotions.json").read_text()) == entries


def test_promote_and_rollback_need_a_served_model_first(tmp_path):
    cfg = load_config(None, [f"train.storage_path={tmp_path}"])
    with pytest.raises(InputError, match="raylm serve"):
        rollout.require_live(cfg)


def _adapter(path, base: str, r: int = 8):
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": r, "base_model_name_or_path": base}))
    return path


def test_add_adapter_refuses_another_base_or_a_too_large_rank_naming_why(tmp_path):
    served, other = tmp_path / "served", tmp_path / "other"
    for folder, hidden in ((served, 64), (other, 128)):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": hidden,
                                                        "num_hidden_layers": 2, "num_attention_heads": 2,
                                                        "vocab_size": 384}))
    cfg = load_config(None, [f"train.storage_path={tmp_path}", f"serve.adapters_path={tmp_path / 'adapters'}",
                             "serve.max_lora_rank=8"])
    history.record(cfg, action="deploy", version="v1", checkpoint=str(served))
    with pytest.raises(CheckpointError, match="hidden_size 128 != 64"):
        adapters.add_adapter(cfg, "x", str(_adapter(tmp_path / "a1", str(other))))
    with pytest.raises(CheckpointError, match="rank 16 > serve.max_lora_rank=8"):
        adapters.add_adapter(cfg, "x", str(_adapter(tmp_path / "a2", str(served), r=16)))
    with pytest.raises(InputError, match="--adapter"):
        adapters.add_adapter(cfg, "a/b", str(_adapter(tmp_path / "a3", str(served))))
    entry = adapters.add_adapter(cfg, "good", str(tmp_path / "a3"))
    assert entry["model"] == "raylm:good" and (tmp_path / "adapters" / "good" / "adapter_config.json").is_file()
    with pytest.raises(InputError, match="immutable"):
        adapters.add_adapter(cfg, "good", str(tmp_path / "a3"))


@pytest.mark.parametrize("found,latest,expect", [
    ([], None, None),                                   # nothing running: start a new cluster
    (["10.0.0.1:6379"], None, "10.0.0.1:6379"),         # the one running: join it
    (["10.0.0.1:6379", "10.0.0.2:6379"], "10.0.0.2:6379", "10.0.0.2:6379"),  # several: the newest `ray start`'s
    (["10.0.0.1:6379", "10.0.0.2:6379"], None, InputError),                  # several, none known: refuse
])
def test_a_command_joins_the_cluster_running_on_the_machine(monkeypatch, found, latest, expect):
    from ray._private import services

    from raylm.cluster import running_cluster

    monkeypatch.setenv("RAYLM_JOIN_RUNNING_RAY", "1")
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: found)
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir: latest)
    if expect is InputError:
        with pytest.raises(InputError, match="--address"):
            running_cluster()
    else:
        assert running_cluster() == expect
    monkeypatch.setenv("RAYLM_JOIN_RUNNING_RAY", "0")
    assert running_cluster() is None
