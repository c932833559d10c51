"""The training stage on a real local Ray: DeepSpeed ZeRO 1/2/3 over 2 CPU workers (gloo).

Each run trains the tiny Llama preset on tinyshakespeare. What is asserted is read back from
what the run left behind (metrics.jsonl, checkpoints, the Ray Train result), not from the code.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from raylm.config import load_config
from raylm.data import CacheStream, prepare_data
from raylm.train.checkpoint import verify_checkpoint
from raylm.train.driver import build_trainer, check_data_fits

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def shakespeare_prepared(ray_cluster, shakespeare, cache_dir):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.source={shakespeare}", f"data.cache_dir={cache_dir}",
                                                       "data.vocab_size=512", "data.seq_len=64"])
    return prepare_data(cfg.data, verbose=False)


def train_config(tmp_path: Path, run_name: str, **fields):
    """configs/tiny.yaml on tinyshakespeare with every metric logged; `fields` are dotted overrides."""
    over = {"data.vocab_size": 512, "data.seq_len": 64, "train.storage_path": str(tmp_path),
            "train.run_name": run_name, "train.log_every_steps": 1, "train.warmup_steps": 5, **fields}
    return load_config(ROOT / "configs" / "tiny.yaml", [f"{k}={v}" for k, v in over.items()])


def read_log(cfg) -> list[dict]:
    path = Path(cfg.train.storage_path) / cfg.train.run_name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def fit(cfg, prepared):
    check_data_fits(cfg, prepared)
    return build_trainer(cfg, prepared).fit()


_runs: dict[int, tuple] = {}


def zero_run(stage: int, tmp_path_factory, prepared):
    """One 60-step run per ZeRO stage, shared by the tests that read it."""
    if stage not in _runs:
        cfg = train_config(tmp_path_factory.mktemp(f"zero{stage}"), f"zero{stage}", **{
            "deepspeed.zero_stage": stage, "train.max_steps": 60, "train.eval_every_steps": 30,
            "train.checkpoint_every_steps": 30})
        _runs[stage] = (cfg, fit(cfg, prepared))
    return _runs[stage]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_and_loss_falls(stage, tmp_path_factory, shakespeare_prepared):
    cfg, result = zero_run(stage, tmp_path_factory, shakespeare_prepared)
    assert result.error is None
    log = [r for r in read_log(cfg) if "loss" in r]
    assert [r["step"] for r in log] == list(range(1, 61))  # every step logged, none twice
    first, last = log[0]["loss"], np.mean([r["loss"] for r in log[-5:]])
    assert abs(first - np.log(512)) < 0.5  # starts near uniform over the vocabulary
    assert last < first - 1.0, f"ZeRO-{stage}: loss {first:.3f} -> {last:.3f}"
    assert result.metrics["step"] == 60 and result.metrics["val_loss"] < first - 1.0
    assert result.metrics["perplexity"] == pytest.approx(np.exp(result.metrics["val_loss"]), rel=1e-6)
    assert all(r["tokens_per_s"] > 0 and np.isfinite(r["grad_norm"]) and r["lr"] >= 0 for r in log)
    # keep_checkpoints=2: steps 30 and 60, each complete (manifest verifies)
    run_dir = Path(cfg.train.storage_path) / cfg.train.run_name
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_00000030", "step_00000060"]
    manifest = verify_checkpoint(result.checkpoint.path)
    assert (manifest["step"], manifest["zero_stage"], manifest["world_size"]) == (60, stage, 2)


def test_zero3_export_reproduces_trained_model(tmp_path_factory, shakespeare_prepared):
    """After ZeRO-3 (parameters sharded over both ranks) the exported HF model is the trained one:

    1. its validation loss on the blocks the workers evaluated equals the val_loss they reported;
    2. its logits equal those of a model rebuilt from DeepSpeed's own fp32 consolidation of the
       sharded state (deepspeed.utils.zero_to_fp32), an independent path to the same weights.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg, result = zero_run(3, tmp_path_factory, shakespeare_prepared)
    ckpt = result.checkpoint.path
    hf = AutoModelForCausalLM.from_pretrained(os.path.join(ckpt, "hf")).eval()
    assert AutoTokenizer.from_pretrained(os.path.join(ckpt, "hf")).eos_token_id is not None
    assert (Path(ckpt) / "hf" / "model.safetensors").is_file() and (Path(ckpt) / "hf" / "raylm_config.yaml").is_file()

    # 1. the workers' final val_loss: each rank's first eval_batches micro-batches of its val stream
    t = cfg.train
    losses, count = 0.0, 0
    with torch.no_grad():
        for rank in range(t.num_workers):
            val = CacheStream(shakespeare_prepared.uri, shakespeare_prepared.manifest, "val", rank, t.num_workers)
            for _, batch in zip(range(t.eval_batches), val.val_batches(t.micro_batch_size)):
                block = torch.tensor(batch["input_ids"], dtype=torch.long)
                logits = hf(input_ids=block[:, :-1]).logits
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), block[:, 1:].reshape(-1))
                losses += float(loss) * len(block)
                count += len(block)
    assert losses / count == pytest.approx(result.metrics["val_loss"], abs=1e-4)

    # 2. DeepSpeed's consolidation of the ZeRO-3 shards gives the same logits
    state = get_fp32_state_dict_from_zero_checkpoint(os.path.join(ckpt, "deepspeed"), tag="state")
    rebuilt = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(os.path.join(ckpt, "hf")))
    missing, unexpected = rebuilt.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to the embedding
    rebuilt.tie_weights()
    rebuilt.eval()
    probe = torch.tensor(np.stack([np.asarray(r["input_ids"][:-1]) for r in shakespeare_prepared.val.take(4)]), dtype=torch.long)
    with torch.no_grad():
        a, b = hf(input_ids=probe).logits, rebuilt(input_ids=probe).logits
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # and the training moved the weights: a fresh init gives different logits
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(os.path.join(ckpt, "hf"))).eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(input_ids=probe).logits, a, atol=1e-2)


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def test_killed_worker_resumes_from_checkpoint_and_finishes(tmp_path, shakespeare_prepared):
    from ray.util.state import list_actors

    cfg = train_config(tmp_path, "killed", **{"train.max_steps": 300, "train.checkpoint_every_steps": 20,
                                               "train.eval_every_steps": 100, "train.max_failures": 2})
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(result=fit(cfg, shakespeare_prepared)), daemon=True)
    runner.start()
    ckpt_step = wait_for(lambda: max((r["step"] for r in read_log(cfg) if r.get("checkpoint")), default=0),
                         timeout_s=400, what="the first checkpoint")
    workers = [a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]
    assert len(workers) == 2
    os.kill(workers[1].pid, signal.SIGKILL)
    killed_at = max(r["step"] for r in read_log(cfg) if "step" in r)
    runner.join(timeout=600)
    assert not runner.is_alive(), "training did not finish after the worker was killed"
    result = outcome["result"]
    assert result.error is None
    assert killed_at < 300, "the run had already finished when the worker was killed"
    assert result.metrics["step"] == 300
    resumed = result.metrics["resumed_from_step"]
    assert resumed >= ckpt_step and resumed % 20 == 0 and resumed <= killed_at
    events = [r for r in read_log(cfg) if r.get("event") == "resume"]
    assert [e["step"] for e in events] == [resumed]
    # after the resume the step count continued from the checkpoint, not from zero
    steps_after = [r["step"] for r in read_log(cfg) if "loss" in r][-(300 - resumed):]
    assert steps_after == list(range(resumed + 1, 301))


def test_restarting_a_run_continues_its_step_count(tmp_path, shakespeare_prepared):
    first_cfg = train_config(tmp_path, "restart", **{"train.max_steps": 20, "train.checkpoint_every_steps": 10,
                                                      "train.eval_every_steps": 10})
    first = fit(first_cfg, shakespeare_prepared)
    assert first.metrics["step"] == 20 and first.metrics["resumed_from_step"] == 0
    # the same run (name, storage) asked to go further: it resumes at step 20, not 0
    second_cfg = train_config(tmp_path, "restart", **{"train.max_steps": 30, "train.checkpoint_every_steps": 10,
                                                       "train.eval_every_steps": 10})
    second = fit(second_cfg, shakespeare_prepared)
    assert second.metrics["step"] == 30 and second.metrics["resumed_from_step"] == 20
    log = read_log(second_cfg)
    steps = [r["step"] for r in log if "loss" in r]
    assert steps == list(range(1, 31))  # 1..20, then 21..30: nothing repeated, nothing skipped
    resumed = [r for r in log if r.get("event") == "resume"]
    assert len(resumed) == 1 and resumed[0]["step"] == 20
    # the optimizer state came back too: the loss continues from where it was, not from the start
    by_step = {r["step"]: r for r in log if "loss" in r}
    assert by_step[21]["loss"] < by_step[1]["loss"] - 0.5
    # the newest checkpoint's manifest lists both ranks' DeepSpeed shards with their sizes
    files = verify_checkpoint(second.checkpoint.path)["files"]
    assert {f for f in files if "optim_states" in f} == {
        f"deepspeed/state/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
    assert "hf/model.safetensors" in files and "hf/raylm_config.yaml" in files


@pytest.mark.parametrize("workers", [1, 3])
def test_one_and_three_workers_train(workers, tmp_path, shakespeare_prepared):
    """A single-GPU user runs one worker; an odd count too: every rank gets data, every step runs.
    (Two workers is what every other test here trains with.)"""
    cfg = train_config(tmp_path, f"w{workers}", **{"train.num_workers": workers, "train.max_steps": 4,
                                                    "train.eval_every_steps": 4, "train.checkpoint_every_steps": 4,
                                                    "train.eval_batches": 1})
    result = fit(cfg, shakespeare_prepared)
    assert result.error is None
    log = [r for r in read_log(cfg) if "loss" in r]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in log)
    t = cfg.train
    assert result.metrics["tokens"] == 4 * t.micro_batch_size * workers * cfg.data.seq_len
    assert np.isfinite(result.metrics["val_loss"])
    assert verify_checkpoint(result.checkpoint.path)["world_size"] == workers


def test_interrupted_raylm_train_resumes_exactly_in_a_new_process(tmp_path, shakespeare, cache_dir, shakespeare_prepared):
    """SIGINT to `raylm train` after a checkpoint, then the same command again: the steps after
    the checkpoint log the losses of a run never interrupted (same data, same order, same state)."""
    from resume_helpers import interrupt_after_checkpoint, losses, run_to_end

    fields = {"train.max_steps": 40, "train.checkpoint_every_steps": 4, "train.eval_every_steps": 40,
              "train.eval_batches": 1}
    whole = train_config(tmp_path, "whole", **fields)
    fit(whole, shakespeare_prepared)
    sets = {"data.source": shakespeare, "data.cache_dir": cache_dir, "data.vocab_size": 512, "data.seq_len": 64,
            "train.storage_path": tmp_path, "train.run_name": "cut", "train.log_every_steps": 1,
            "train.warmup_steps": 5, **fields}
    interrupt_after_checkpoint(sets, tmp_path / "cut", step=4)
    assert max(losses(tmp_path / "cut")) < 40  # really interrupted
    run_to_end(sets)
    resumed = [r for r in read_log(whole.model_copy(update={"train": whole.train.model_copy(
        update={"run_name": "cut"})})) if r.get("event") == "resume"]
    assert len(resumed) == 1 and resumed[0]["step"] >= 4 and "offset" in resumed[0]
    cut, ref = losses(tmp_path / "cut"), losses(tmp_path / "whole")
    assert sorted(cut) == sorted(ref) == list(range(1, 41))
    after = range(resumed[0]["step"] + 1, 41)
    assert [cut[s] for s in after] == pytest.approx([ref[s] for s in after], rel=1e-5, abs=1e-6)
