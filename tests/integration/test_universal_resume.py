"""Resume on another number of workers (issue 32, item 8), end to end through `raylm train`, as a user
runs it: a run trained on 2 workers to its step-3 checkpoint is resumed on 1 worker with
train.resume_universal (DeepSpeed's universal checkpoint: ds_to_universal, then
checkpoint.load_universal) and the same global batch (micro 2 x 2 workers, then micro 4 x 1).

The invariant: its steps 4-6 log the losses of a 2-worker run never interrupted, within rel 1e-5
(fp32, CPU). Step 4's loss is computed with the restored weights; steps 5 and 6 also with the
updates made from the restored Adam moments and step count and the restored lr schedule: a fresh
Adam moves every weight by about lr at its first step (m / sqrt(v) = +-1), which shifts the next
loss by far more than 1e-5. The two world sizes reduce the same gradients in another order, which
in fp32 moves a loss by ~1e-7 relative per step; 1e-5 leaves two orders of margin.

A world size deals the cache's rows to its ranks in its own order (raylm.data.stream), so the rows
of a step differ between 2 and 1 workers; the corpus here is one chat record repeated (unpacked: a
row is a record), so every row is the same and a step's loss does not depend on which rows it drew:
the losses isolate what the checkpoint restored. The data position is checked apart: the resumed
run starts 3 steps into the epoch, 3 x 4 rows on its one rank.

Without train.resume_universal the same resume is refused before Ray starts, exit 2, naming the
field, both values and the option. Opt-in (RAYLM_EXTENDED=1): three `raylm train` runs and two refusals,
238 s on the 2-core machine (over CI's ~40 s for a suite test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raylm.config import load_config
from raylm.data import prepare_data
from test_cut_invariance import finish, raylm_train  # `raylm train` in a clean environment, and its end

ROOT = Path(__file__).resolve().parents[2]
RECORD = {"messages": [{"role": "user", "content": "Tell me about the cat."},
                       {"role": "assistant", "content": "the cat sat on a mat and then ran to see my dog who was "
                                                        "not at home so we all went out"}]}


def settings(storage: Path, corpus: Path, run: str, workers: int, micro: int, steps: int, **more) -> dict:
    """Warm-up then a constant lr (min_lr_ratio 1): a step's lr does not depend on max_steps."""
    return {"data.format": "chat", "data.source": corpus, "data.vocab_size": 300, "data.seq_len": 64,
            "data.val_fraction": 0.1, "data.sft.packing": False, "data.cache_dir": storage / "cache",
            "train.storage_path": storage, "train.run_name": run, "train.num_workers": workers,
            "train.micro_batch_size": micro, "train.grad_accum_steps": 1, "train.max_steps": steps,
            "train.log_every_steps": 1, "train.eval_every_steps": 100, "train.eval_batches": 1,
            "train.checkpoint_every_steps": 3, "train.warmup_steps": 2, "train.min_lr_ratio": 1.0,
            "train.lr": 3e-3, **more}




def log(storage: Path, run: str) -> list[dict]:
    return [json.loads(line) for line in (storage / run / "metrics.jsonl").read_text().splitlines()]


def losses(storage: Path, run: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in log(storage, run) if "loss" in r}


@pytest.mark.extended
def test_a_run_resumes_on_another_number_of_workers_with_its_optimizer_state(ray_cluster, tmp_path):
    corpus = tmp_path / "same.jsonl"
    corpus.write_text((json.dumps(RECORD) + "\n") * 200)
    prepare_data(load_config(ROOT / "configs" / "tiny.yaml", [f"{k}={v}" for k, v in settings(  # the runs read it
        tmp_path, corpus, "prep", 2, 2, 6).items()]).data, storage_path=str(tmp_path), verbose=False)
    ref = raylm_train(settings(tmp_path, corpus, "ref", 2, 2, 6))
    first = raylm_train(settings(tmp_path, corpus, "u", 2, 2, 3))
    finish(ref), finish(first)

    # without the option: refused before Ray starts, naming the field, both values and the option
    err = finish(raylm_train(settings(tmp_path, corpus, "u", 1, 4, 6)), code=2)
    assert "train.num_workers: 1 now" in err and "trained with 2" in err and "train.resume_universal=true" in err, err
    # with it but another global batch: refused, naming what the cut must be
    err = finish(raylm_train(settings(tmp_path, corpus, "u", 1, 2, 6, **{"train.resume_universal": True})), code=2)
    assert "train.global_batch_size: 2 now" in err and "micro_batch_size x train.grad_accum_steps = 4" in err, err

    finish(raylm_train(settings(tmp_path, corpus, "u", 1, 4, 6, **{"train.resume_universal": True})))
    resumed = [r for r in log(tmp_path, "u") if r.get("event") == "resume"]
    assert [(r["step"], r["epoch"], r["rows"], r["universal_from_world_size"]) for r in resumed] == [(3, 0, 12, 2)]
    assert (tmp_path / "u" / "step_00000003" / "deepspeed" / "universal" / "raylm_universal.json").is_file()
    want, got = losses(tmp_path, "ref"), losses(tmp_path, "u")
    assert sorted(want) == sorted(got) == list(range(1, 7))
    assert [got[s] for s in (4, 5, 6)] == pytest.approx([want[s] for s in (4, 5, 6)], rel=1e-5), (want, got)
    assert len({round(want[s], 5) for s in (3, 4, 5, 6)}) == 4  # the steps really move the loss
    # the resumed run's own checkpoints are 1-worker ones: its next resume needs no conversion
    final = json.loads((tmp_path / "u" / "step_00000006" / "raylm_checkpoint.json").read_text())
    assert final["world_size"] == 1 and final["identity"]["train.num_workers"] == 1
