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


@pytest.mark.parametrize("candidate, exit_code", [(2.0, 0), (2.5, 3)])
def test_eval_against_is_the_gate_alone_with_its_exit_code(monkeypatch, capsys, candidate, exit_code):
    """`raylm eval CANDIDATE --against SERVED` (the RayJob of `raylm k8s promote`): the gate's
    verdict as the exit code, both numbers on the terminal."""
    from raylm.cli import eval_gate_verdict

    evals = {"cand": {"val_loss": candidate, "eval_set": "s"}, "live": {"val_loss": 2.1, "eval_set": "s"}}
    monkeypatch.setattr(eval_gate, "eval_results", lambda cfg, ours, theirs: (evals[ours], evals[theirs]))
    assert eval_gate_verdict(load_config(None), "cand", "live") == exit_code
    out, err = capsys.readouterr()
    assert f"{candidate:.4f}" in out + err and "2.1000" in out + err
    assert ("gate passed" in out) is (exit_code == 0) and ("gate refused cand" in err) is (exit_code == 3)


def test_eval_against_takes_no_adapter(tmp_path, capsys):
    from raylm.cli import main

    assert main(["eval", str(tmp_path), "--against", str(tmp_path), "--adapter", str(tmp_path)]) == 2
    assert "takes no --adapter" in capsys.readouterr().err


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
    # --remove-adapter: the folder goes (the edge stops listing it), the history says so
    with pytest.raises(InputError, match="no adapter folder"):
        adapters.remove_adapter(cfg, "never")
    removed = adapters.remove_adapter(cfg, "good")
    assert removed["action"] == "adapter_removed" and not (tmp_path / "adapters" / "good").exists()
    assert history.read_history(cfg)[-1] == removed and history.live_entry(history.read_history(cfg))["version"] == "v1"


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


def test_promote_deploys_the_record_with_only_the_model_changed(tmp_path):
    """`raylm serve --set serve.autoscaling.max_replicas=3` with keys from $RAYLM_API_KEYS, then a
    promote from a shell with neither: the record's config and key hashes, not the promoter's."""
    from raylm.lifecycle import record
    from raylm.serve.auth import KeySetup, hash_key

    base = [f"train.storage_path={tmp_path}"]
    served = load_config(None, [*base, "serve.autoscaling.max_replicas=3", "serve.checkpoint=/a"])
    record.write_record(served, "/a", "v1", KeySetup((hash_key("k1"),), "env $RAYLM_API_KEYS"),
                        record.set_paths(["serve.autoscaling.max_replicas=3"]))
    saved = (tmp_path / "serve" / "raylm" / "deployment.json").read_text()
    assert "k1" not in saved.replace(hash_key("k1"), ""), "hashes, never keys"
    assert json.loads(saved)["config"]["serve"]["checkpoint"] is None, "the checkpoint travels beside the config"

    promoter = load_config(None, base)
    assert promoter.serve.autoscaling.max_replicas != 3
    target, keys, kept = record.deployment(promoter)
    assert target.serve.autoscaling.max_replicas == 3 and keys.hashes == (hash_key("k1"),)
    assert kept == ["serve.autoscaling.max_replicas"] and target.serve.checkpoint is None


def test_a_promote_whose_serve_settings_differ_names_them_and_needs_reconfigure(tmp_path):
    from raylm.lifecycle import record
    from raylm.serve.auth import KeySetup, hash_key

    base = [f"train.storage_path={tmp_path}"]
    record.write_record(load_config(None, [*base, "serve.autoscaling.max_replicas=3"]), "/a", "v1",
                        KeySetup((hash_key("k1"),), "env"), ["serve.autoscaling.max_replicas"])
    mine = [*base, "serve.max_tokens_limit=64"]
    with pytest.raises(InputError, match=r"serve\.max_tokens_limit; pass --reconfigure") as err:
        record.deployment(load_config(None, mine), mine)
    assert "max_replicas" not in str(err.value), "a field only the serving command set is not this one's"
    target, keys, kept = record.deployment(load_config(None, mine), mine, reconfigure=True)
    assert target.serve.max_tokens_limit == 64 and target.serve.autoscaling.max_replicas == 3
    assert keys.hashes == (hash_key("k1"),), "keys are read again only when a key field changes"
    assert kept == ["serve.autoscaling.max_replicas", "serve.max_tokens_limit"]
    # this promote's own --set of the field the serving command set is its choice: named too
    again = [*base, "serve.autoscaling.max_replicas=4"]
    with pytest.raises(InputError, match="serve.autoscaling.max_replicas"):
        record.deployment(load_config(None, again), again)


def test_one_promotion_at_a_time_and_a_stale_lock_expires_with_a_message(tmp_path, capsys):
    import os
    import socket
    import subprocess
    import sys

    from raylm.lifecycle import lock

    cfg = load_config(None, [f"train.storage_path={tmp_path}"])
    uri = lock.lock_uri(cfg)
    with lock.promotion_lock(cfg, "promote"):
        with pytest.raises(lock.PromotionBusy, match=rf"promote by pid {os.getpid()} on"):
            with lock.promotion_lock(cfg, "rollback"):
                pass
        assert os.path.exists(uri)
    assert not os.path.exists(uri), "released"

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = {"token": "t", "action": "promote", "pid": int(gone.stdout), "host": socket.gethostname(), "at": "then",
            "expires": 4e9}
    os.makedirs(os.path.dirname(uri), exist_ok=True)
    with open(uri, "w") as f:
        json.dump(dead, f)
    with lock.promotion_lock(cfg, "promote") as me:
        assert json.load(open(uri))["token"] == me["token"]
    assert f"process {dead['pid']} on this host is gone" in capsys.readouterr().out

    elsewhere = {**dead, "host": "another-machine", "expires": 1.0}
    with open(uri, "w") as f:
        json.dump(elsewhere, f)
    with lock.promotion_lock(cfg, "promote"):
        pass
    assert "it expired" in capsys.readouterr().out
    with open(uri, "w") as f:
        json.dump({**elsewhere, "expires": 4e9}, f)
    with pytest.raises(lock.PromotionBusy, match="another-machine"):
        with lock.promotion_lock(cfg, "promote"):
            pass


def test_the_live_model_and_versions_count_only_finished_changes():
    h = [{"action": "deploy", "state": "done", "version": "v1", "checkpoint": "/a", "id": "0"},
         {"action": "promote", "state": "intent", "version": "v2", "checkpoint": "/b", "id": "1"},
         {"action": "promote", "state": "failed", "version": "v2", "checkpoint": "/b", "id": "1"},
         {"action": "promote", "state": "intent", "version": "v2", "checkpoint": "/c", "id": "2"},
         {"action": "promote", "state": "interrupted", "version": "v2", "checkpoint": "/c", "id": "2"}]
    assert history.live_entry(h)["version"] == "v1" and history.next_version(h) == "v2"
    assert history.unfinished(h) is None
    h.append({"action": "promote", "state": "intent", "version": "v2", "checkpoint": "/d", "id": "3"})
    assert history.unfinished(h)["checkpoint"] == "/d" and history.live_entry(h)["version"] == "v1"
    h.append({"action": "promote", "state": "done", "version": "v2", "checkpoint": "/d", "id": "3"})
    assert history.live_entry(h)["checkpoint"] == "/d" and history.next_version(h) == "v3"


def test_the_gate_and_the_rollout_deadline_are_the_promoting_commands_own(tmp_path):
    from raylm.lifecycle import record
    from raylm.serve.auth import KeySetup

    base = [f"train.storage_path={tmp_path}"]
    record.write_record(load_config(None, base), "/a", "v1", KeySetup((), "none"), [])
    mine = [*base, "serve.promote.tolerance=0.5", "serve.rollout_timeout_s=60"]
    target, _, _ = record.deployment(load_config(None, mine), mine)  # not refused: nothing deployed changes
    assert target.serve.rollout_timeout_s == 900.0, "the deployed config stays the record's (the edge is untouched)"
