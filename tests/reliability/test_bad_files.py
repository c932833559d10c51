"""Bad files: corrupted or half-written checkpoints are named and the previous one is used; a
truncated corpus file is reported (counted, and what is readable of it kept), not fatal."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time
from pathlib import Path

import pytest
from reliability_helpers import (REFERENCE_STEPS, fit, read_log, reference_overrides, run_dir, train_config,
                                 worker_logs_containing)

from raylm.config import load_config
from raylm.data import prepare_data
from raylm.train.checkpoint import MANIFEST, CheckpointError, verify_checkpoint

pytestmark = pytest.mark.timeout(300)


def copy_run(reference_run, storage: Path) -> Path:
    cfg, _ = reference_run
    dst = storage / cfg.train.run_name
    shutil.copytree(run_dir(cfg), dst)
    return dst


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage", ["no manifest", "garbage manifest", "missing file", "truncated weights",
                                    "truncated optimizer shard", "manifest lists a directory"])
def test_a_damaged_checkpoint_is_refused_with_an_error_naming_it(reference_run, tmp_path, damage):
    ckpt = copy_run(reference_run, tmp_path) / f"step_{REFERENCE_STEPS:08d}"
    verify_checkpoint(str(ckpt))  # intact before the damage
    optim = next((ckpt / "deepspeed" / "state").glob("*optim_states.pt"))
    culprit = {"no manifest": ckpt / MANIFEST, "garbage manifest": ckpt / MANIFEST, "missing file": optim,
               "truncated weights": ckpt / "hf" / "model.safetensors", "truncated optimizer shard": optim,
               "manifest lists a directory": ckpt / MANIFEST}[damage]
    if damage == "no manifest":
        culprit.unlink()
    elif damage == "garbage manifest":
        culprit.write_bytes(b'{"files": {"hf/model.safe')
    elif damage == "missing file":
        culprit.unlink()
    elif damage == "manifest lists a directory":
        manifest = json.loads(culprit.read_text())
        manifest["files"]["hf"] = 1
        culprit.write_text(json.dumps(manifest))
    else:
        truncate(culprit)
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(str(ckpt))
    message = str(err.value)
    assert str(ckpt) in message, message
    if damage not in ("no manifest", "manifest lists a directory"):
        assert culprit.name in message, message


def test_resume_skips_a_half_written_and_a_corrupted_checkpoint_naming_both(reference_run, prepared, tmp_path):
    """The newest checkpoint lost its manifest and an optimizer shard (its write was cut off),
    the one before has truncated model states (what resume loads; a periodic checkpoint has no
    hf/ export): the resumed run names both, starts from the one before them, and finishes."""
    run = copy_run(reference_run, tmp_path)
    newest, previous = run / f"step_{REFERENCE_STEPS:08d}", run / f"step_{REFERENCE_STEPS - 10:08d}"
    (newest / MANIFEST).unlink()
    next((newest / "deepspeed" / "state").glob("*optim_states.pt")).unlink()
    weights = previous / "deepspeed" / "state" / "mp_rank_00_model_states.pt"
    truncate(weights)
    good = REFERENCE_STEPS - 20
    started = time.time()
    cfg = train_config(tmp_path, run.name, **{**reference_overrides(), "train.max_steps": REFERENCE_STEPS + 10})
    result = fit(cfg, prepared)

    assert result.error is None and result.metrics["step"] == REFERENCE_STEPS + 10
    assert result.metrics["resumed_from_step"] == good
    resumes = [r for r in read_log(run) if r.get("event") == "resume"]
    assert [(r["step"], Path(r["from"]).name) for r in resumes] == [(good, f"step_{good:08d}")]
    skipped = worker_logs_containing("raylm: skipping checkpoint", since=started)
    assert any(str(newest) in line and "incomplete" in line for line in skipped), skipped
    assert any(str(weights) in line and "corrupted" in line for line in skipped), skipped
    # the damaged folders were replaced by complete checkpoints of the resumed run
    assert verify_checkpoint(str(newest))["step"] == REFERENCE_STEPS
    assert verify_checkpoint(str(run / f"step_{REFERENCE_STEPS + 10:08d}"))["step"] == REFERENCE_STEPS + 10


def test_truncated_corpus_files_are_reported_not_fatal(prepared, tmp_path, shakespeare, cache_dir):
    """A .txt cut inside a UTF-8 character, a .txt.gz cut mid-stream and a .jsonl cut mid-record:
    the data stage finishes, counts each damage, and keeps everything readable."""
    text = shakespeare.read_text()[:200_000]
    corpus = tmp_path / "text"
    corpus.mkdir()
    (corpus / "a_whole.txt").write_text(text[:100_000])
    (corpus / "b_cut.txt").write_bytes((text[100_000:150_000] + "é").encode()[:-1])  # half of a 2-byte character
    gz = gzip.compress(text[150_000:].encode())
    (corpus / "c_cut.txt.gz").write_bytes(gz[: len(gz) // 2])
    base = [f"data.cache_dir={cache_dir}", f"data.tokenizer={prepared.tokenizer_dir}", "data.seq_len=64"]
    data = prepare_data(load_config(None, [f"data.source={corpus}", *base]).data, verbose=False)
    s = data.stats
    assert s.files == 3 and s.truncated_files == 1 and s.replaced == 1, s
    assert s.blocks > 0 and s.train_blocks + s.val_blocks == s.blocks
    assert "1 truncated file(s)" in s.summary()
    whole_tokens = prepare_data(load_config(None, [f"data.source={corpus / 'a_whole.txt'}", *base]).data,
                                verbose=False).stats.tokens
    assert s.tokens > whole_tokens * 1.4  # the readable parts of the cut files were kept

    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    lines = [json.dumps({"text": p}) for p in text.split("\n\n") if p.strip()]
    blob = ("\n".join(lines) + "\n").encode()
    (jsonl / "cut.jsonl").write_bytes(blob[: len(blob) - len(lines[-1]) // 2 - 1])  # the last record cut in half
    data = prepare_data(load_config(None, [f"data.source={jsonl}", *base]).data, verbose=False)
    assert data.stats.documents == len(lines) - 1 and data.stats.skipped_records == 1, data.stats
