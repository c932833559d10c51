"""The cut does not change the run (issue 32, item 7), end to end through `raylm train`: for the same
global batch and workers, micro 2 x accum 1 and micro 1 x accum 2 train on the same rows, so their
per-step losses agree (fp32, CPU), packed and unpacked, on SFT with very uneven answers (one token
beside 30 to 60). Before each rank drew a step's rows at once, they differed by up to 4e-2.

A resume with another cut of the same global batch is allowed; one with another global batch is
refused, exit 2, naming the field and both values, before any worker starts.

Each `raylm train` runs as a user's second shell would (PATH, HOME, and RAY_ADDRESS with
RAY_AUTH_MODE=token as the README says), joining the
session's cluster; the data caches are built once beforehand, so the runs only read them."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from raylm.config import load_config
from raylm.data import prepare_data

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STEPS = 8
WORDS = "the cat sat on a mat and then ran to see my dog who was not at home so we all went out".split()
CUTS = ((2, 1), (1, 2))  # (micro_batch_size, grad_accum_steps); 2 workers: a global batch of 4 either way


def records(n: int) -> list[dict]:
    """Chat records: every other answer one word (one token), the rest 30 to 60 words."""
    rng = random.Random(0)
    out = []
    for i in range(n):
        words = 1 if i % 2 else rng.randint(30, 60)
        out.append({"messages": [{"role": "user", "content": f"Tell me about item {i}."},
                                 {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(words))}]})
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cut") / "uneven.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records(240)) + "\n")
    return path


def settings(storage: Path, corpus: Path, run: str, packing: bool, micro: int, accum: int, **more) -> dict:
    """A constant lr (no warm-up, no decay): a run's steps do not depend on its max_steps either."""
    return {"data.format": "chat", "data.source": corpus, "data.vocab_size": 300, "data.seq_len": 128,
            "data.val_fraction": 0.1, "data.sft.packing": packing, "data.cache_dir": storage / "cache",
            "train.storage_path": storage, "train.run_name": run, "train.micro_batch_size": micro,
            "train.grad_accum_steps": accum, "train.max_steps": STEPS, "train.log_every_steps": 1,
            "train.eval_every_steps": 100, "train.eval_batches": 1, "train.checkpoint_every_steps": 100,
            "train.warmup_steps": 0, "train.min_lr_ratio": 1.0, "train.lr": 3e-3, **more}


def raylm_train(sets: dict) -> subprocess.Popen:
    """`raylm train` in a clean environment, joining the session's cluster (RAY_ADDRESS)."""
    import ray

    env = {"PATH": f"{BIN}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": os.environ["HOME"],
           "RAY_ADDRESS": ray.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token"}  # as the README says
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    return subprocess.Popen([str(BIN / "raylm"), "train", "-c", "configs/tiny.yaml", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, code: int = 0) -> str:
    """Wait for a `raylm train`; its stderr."""
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == code, err[-3000:]
    return err


def losses(storage: Path, run: str) -> dict[int, float]:
    lines = (storage / run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


# Unpacked, a step draws the same rows as packed (tests/unit/test_stream_cut.py: the stream does not
# know the layout) and padding to each micro-batch's longest row leaves the step's loss and gradient
# alone (test_loss_weighting.py, ZeRO 0-3); this end-to-end run of it is opt-in (RAYLM_EXTENDED=1),
# within CI's time budget.
@pytest.mark.parametrize("packing", [True, pytest.param(False, marks=pytest.mark.extended)], ids=["packed", "unpacked"])
def test_the_cut_of_the_global_batch_does_not_change_the_losses(ray_cluster, corpus, tmp_path, packing):
    """micro 2 x accum 1 (run a, 2 steps further) and micro 1 x accum 2 (run b), side by side: the same
    losses over 8 steps. Packed, b is then resumed from its step-8 checkpoint with a's cut: its steps 9
    and 10 are a's (the data position counts rows), and a resume with another global batch exits 2."""
    (a_micro, a_accum), (b_micro, b_accum) = CUTS
    prepare_data(load_config(ROOT / "configs" / "tiny.yaml", [f"{k}={v}" for k, v in settings(  # the runs read it
        tmp_path, corpus, "prep", packing, 1, 1).items()]).data, storage_path=str(tmp_path), verbose=False)
    a = raylm_train(settings(tmp_path, corpus, "a", packing, a_micro, a_accum, **{"train.max_steps": STEPS + 2}))
    b = raylm_train(settings(tmp_path, corpus, "b", packing, b_micro, b_accum))
    finish(a), finish(b)
    ref, cut = losses(tmp_path, "a"), losses(tmp_path, "b")
    assert sorted(ref) == list(range(1, STEPS + 3)) and sorted(cut) == list(range(1, STEPS + 1))
    assert [cut[s] for s in cut] == pytest.approx([ref[s] for s in cut], rel=1e-5), (ref, cut)
    assert len({round(v, 4) for v in ref.values()}) == STEPS + 2  # the steps really differ (uneven rows)
    if not packing:
        return
    finish(raylm_train(settings(tmp_path, corpus, "b", packing, a_micro, a_accum, **{"train.max_steps": STEPS + 2})))
    log = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r.get("event") == "resume"] == [STEPS]
    resumed = losses(tmp_path, "b")
    assert [resumed[s] for s in (9, 10)] == pytest.approx([ref[s] for s in (9, 10)], rel=1e-5), (ref, resumed)
    # another global batch: refused before any worker starts, exit 2, naming the field and both values
    err = finish(raylm_train(settings(tmp_path, corpus, "b", packing, 2, 2, **{"train.max_steps": STEPS + 4})), code=2)
    assert "train.global_batch_size: 8 now" in err and "trained with 4" in err, err
