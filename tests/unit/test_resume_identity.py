"""A resume that would change the run is refused before Ray starts, naming the field and both values;
only the cut of the same global batch into micro-batches may change."""

from __future__ import annotations

import json

import pytest

from raylm.cli import main
from raylm.config import load_config
from raylm.data import fingerprint, resolve_source
from raylm.errors import CheckpointError
from raylm.train.checkpoint import MANIFEST, position, write_manifest
from raylm.train.identity import check_resume, run_identity

BASE = ["train.num_workers=2", "train.micro_batch_size=2", "train.grad_accum_steps=2", "deepspeed.zero_stage=2"]


def identity(*overrides: str, data: str = "abc") -> dict:
    return run_identity(load_config(None, BASE + list(overrides)), data)


SAVED = {"identity": identity()}


@pytest.mark.parametrize("overrides, data, field, now, then", [
    (["train.num_workers=1", "train.grad_accum_steps=4"], "abc", "train.num_workers", "1", "2"),
    (["train.micro_batch_size=4"], "abc", "train.global_batch_size", "16", "8"),
    ([], "def", "data", "'def'", "'abc'"),
    (["deepspeed.zero_stage=3"], "abc", "deepspeed.zero_stage", "3", "2"),
    (["train.lora={r: 4}"], "abc", "train.lora", "{'r': 4", "None"),
    (["model.name=tiny-gpt2"], "abc", "model.name", "'tiny-gpt2'", "'tiny-llama'"),
    (["model.overrides={num_hidden_layers: 3}"], "abc", "model.overrides", "{'num_hidden_layers': 3}", "{}"),
])
def test_a_changed_identity_is_refused_naming_the_field_and_both_values(overrides, data, field, now, then):
    with pytest.raises(CheckpointError) as err:
        check_resume(identity(*overrides, data=data), SAVED, "/runs/r/step_00000004")
    msg = str(err.value)
    assert msg.startswith(f"{field}: {now}") and f"trained with {then}" in msg and "step_00000004" in msg, msg


def test_another_cut_of_the_same_global_batch_resumes():
    for micro, accum in ((1, 4), (4, 1), (2, 2)):
        check_resume(identity(f"train.micro_batch_size={micro}", f"train.grad_accum_steps={accum}"), SAVED, "p")
    check_resume(identity("train.lr=0.5", "train.max_steps=7"), SAVED, "p")  # the schedule is the config's own


def test_a_checkpoint_from_before_identities_checks_what_it_recorded():
    old = {"world_size": 2, "zero_stage": 2, "lora": False}
    check_resume(identity("train.micro_batch_size=4", data="other"), old, "p")  # not recorded: not checked
    with pytest.raises(CheckpointError, match="train.num_workers: 4 now.* trained with 2"):
        check_resume(identity("train.num_workers=4", "train.micro_batch_size=1"), old, "p")


def test_an_old_position_in_micro_batches_reads_as_rows(tmp_path):
    (tmp_path / "raylm_config.yaml").write_text("train:\n  micro_batch_size: 4\n")
    assert position({"step": 6, "tokens": 9, "epoch": 1, "offset": 3}, str(tmp_path)).rows == 12
    assert position({"step": 6, "epoch": 1, "rows": 8}, str(tmp_path)).rows == 8


def test_cli_refuses_a_changed_resume_before_ray(tmp_path, capsys):
    """A run folder whose newest complete checkpoint says 2 workers: `raylm train` with 1 exits 2 before
    Ray starts (tests/unit/conftest.py makes ray.init fail), naming the field and both values."""
    sets = [f"train.storage_path={tmp_path}", "train.run_name=r", *BASE]
    cfg = load_config(None, sets)
    step = tmp_path / "r" / "step_00000004"
    step.mkdir(parents=True)
    saved = run_identity(cfg, fingerprint(cfg.data, resolve_source(cfg.data)))
    write_manifest(str(step), {"step": 4, "identity": saved, "files": {}})
    argv = ["train"] + [a for s in sets for a in ("--set", s)]
    assert main(argv + ["--set", "train.num_workers=1", "--set", "train.grad_accum_steps=4"]) == 2
    err = capsys.readouterr().err
    assert "train.num_workers: 1 now" in err and "trained with 2" in err and str(step) in err, err
    assert main(argv + ["--set", "data.seed=5"]) == 2
    assert "data: " in capsys.readouterr().err
    # the same run with another cut of its global batch passes the check (and reaches Ray, which fails here)
    with pytest.raises(AssertionError, match="must not start Ray"):
        main(argv + ["--set", "train.micro_batch_size=1", "--set", "train.grad_accum_steps=4"])
    assert json.loads((step / MANIFEST).read_text())["identity"] == saved


# ------------------------------------------------------------------ train.resume_universal (issue 32, item 8)

def test_universal_allows_another_world_size_of_the_same_global_batch():
    """2 workers x micro 2 x accum 2 = 8; 1 worker x micro 4 x accum 2 = 8, or 4 x micro 1 x accum 2."""
    for workers, micro in ((1, 4), (4, 1)):
        now = identity(f"train.num_workers={workers}", f"train.micro_batch_size={micro}")
        check_resume(now, SAVED, "p", universal=True)
        with pytest.raises(CheckpointError, match="train.resume_universal=true .*global batch stays 8"):
            check_resume(now, SAVED, "p")  # without the option: refused, and the refusal names it


def test_universal_keeps_the_global_batch_and_every_other_field():
    with pytest.raises(CheckpointError) as err:  # 1 worker x 2 x 2 = 4, not 8
        check_resume(identity("train.num_workers=1"), SAVED, "/runs/r/step_00000004", universal=True)
    msg = str(err.value)
    assert msg.startswith("train.global_batch_size: 4 now") and "trained with 8" in msg, msg
    assert "train.micro_batch_size x train.grad_accum_steps = 8" in msg, msg
    with pytest.raises(CheckpointError, match="world size that divides 8"):
        check_resume(identity("train.num_workers=3", "train.micro_batch_size=1"), SAVED, "p", universal=True)
    with pytest.raises(CheckpointError, match="^deepspeed.zero_stage: 3 now"):
        check_resume(identity("train.num_workers=1", "train.micro_batch_size=4", "deepspeed.zero_stage=3"),
                     SAVED, "p", universal=True)
    with pytest.raises(CheckpointError, match="^data: 'def' now"):
        check_resume(identity("train.num_workers=1", "train.micro_batch_size=4", data="def"), SAVED, "p",
                     universal=True)


def test_universal_rows_keep_the_rows_consumed_from_the_epoch():
    from raylm.train.identity import universal_rows

    # 3 steps of a global batch of 8: 3 x 4 rows on each of 2 ranks, 3 x 8 on one, 3 x 2 on each of 4
    assert universal_rows(12, 2, 1, 8) == 24 and universal_rows(12, 2, 4, 8) == 6 and universal_rows(24, 1, 2, 8) == 12
    assert universal_rows(0, 2, 1, 8) == 0
    with pytest.raises(CheckpointError, match="not a whole number of steps"):
        universal_rows(6, 2, 1, 8)


@pytest.mark.parametrize("overrides, field", [
    (["deepspeed.zero_stage=0"], "train.resume_universal: needs deepspeed.zero_stage 1 or 2, not 0"),
    (["deepspeed.zero_stage=3"], "train.resume_universal: needs deepspeed.zero_stage 1 or 2, not 3"),
    (["train.lora={r: 4}"], "train.resume_universal: not with train.lora"),
])
def test_universal_refuses_what_it_does_not_convert_before_ray(tmp_path, capsys, overrides, field):
    argv = ["train", "--set", f"train.storage_path={tmp_path}", "--set", "train.resume_universal=true"]
    assert main(argv + [a for o in overrides for a in ("--set", o)]) == 2
    assert field in capsys.readouterr().err


def test_universal_asks_deepspeed_to_load_a_universal_checkpoint():
    from raylm.train.deepspeed import deepspeed_config

    cfg = load_config(None, BASE + ["train.resume_universal=true"])
    assert deepspeed_config(cfg, load_universal=True)["checkpoint"] == {"load_universal": True}
    assert "checkpoint" not in deepspeed_config(cfg)


def test_universal_refuses_a_position_the_new_world_size_cannot_reach():
    """The driver's check: the same steps into the epoch must exist on the new world size."""
    from types import SimpleNamespace

    from raylm.train.driver import check_universal_position

    manifest = {"columns": ["input_ids"], "train": {"files": [{"path": "a", "row_groups": [40]}], "rows": 40}}
    prepared = SimpleNamespace(uri="mem://x", manifest=manifest)
    cfg = load_config(None, BASE[1:] + ["train.num_workers=1", "train.micro_batch_size=4",
                                         "train.resume_universal=true"])
    check_universal_position(cfg, {"world_size": 2, "epoch": 0, "rows": 16}, "p", prepared)  # 4 of 5 steps
    check_universal_position(cfg, {"world_size": 2, "epoch": 0, "rows": 20}, "p", prepared)  # 5: the epoch's end
    with pytest.raises(CheckpointError, match="train.num_workers: 1 now.* 6 steps into epoch 0.* only 5 steps"):
        check_universal_position(cfg, {"world_size": 2, "epoch": 0, "rows": 24}, "p", prepared)


def test_cli_with_universal_lets_another_world_size_through_to_ray(tmp_path):
    """The pre-Ray check passes a world-size change under the option (the conversion waits for the data
    stage, after Ray starts)."""
    sets = [f"train.storage_path={tmp_path}", "train.run_name=r", *BASE]
    cfg = load_config(None, sets)
    step = tmp_path / "r" / "step_00000004"
    step.mkdir(parents=True)
    write_manifest(str(step), {"step": 4, "world_size": 2, "files": {},
                               "identity": run_identity(cfg, fingerprint(cfg.data, resolve_source(cfg.data)))})
    argv = ["train"] + [a for s in sets for a in ("--set", s)]
    with pytest.raises(AssertionError, match="must not start Ray"):
        main(argv + ["--set", "train.num_workers=1", "--set", "train.micro_batch_size=4",
                     "--set", "train.resume_universal=true"])
    assert not (step / "deepspeed").exists()
