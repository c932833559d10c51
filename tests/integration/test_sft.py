"""Fine-tuning on a real local Ray with DeepSpeed: chat SFT with LoRA on a model raylm trained
itself, instruction SFT with full fine-tuning under ZeRO-3 (interrupted mid-run and resumed
exactly in a new process), the exports.

Kept small (tiny models, a few dozen steps): the point is the wiring, read back from what the
runs leave behind (metrics.jsonl, TensorBoard event files, checkpoints, exports).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raylm.config import load_config
from raylm.data import DataError, prepare_data
from raylm.train.driver import build_trainer, check_data_fits

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from make_toy_chat import records  # noqa: E402

BAD_CHAT = [{"messages": []}, {"text": "no messages here"}, {"messages": [{"role": "wizard", "content": "x"}]},
            {"messages": [{"role": "user", "content": "only a question?"}]}]


def read_log(cfg) -> list[dict]:
    path = Path(cfg.train.storage_path) / cfg.train.run_name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def fit(cfg, prepared):
    check_data_fits(cfg, prepared)
    result = build_trainer(cfg, prepared).fit()
    assert result.error is None, result.error
    return result


def config(tmp: Path, run_name: str, **fields):
    over = {"data.cache_dir": str(tmp / "cache"), "data.seq_len": 128, "train.storage_path": str(tmp / "runs"),
            "train.run_name": run_name, "train.log_every_steps": 1, "train.warmup_steps": 2,
            "train.eval_batches": 2, **fields}
    return load_config(ROOT / "configs" / "tiny.yaml", [f"{k}={v}" for k, v in over.items()])


@pytest.fixture(scope="module")
def sft_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sft")


@pytest.fixture(scope="module")
def base_model(ray_cluster, shakespeare, sft_root) -> str:
    """A tiny Llama that raylm pretrains on Shakespeare first: the base the LoRA run adapts.

    A wider init than the default 0.02: LoRA leaves the (tied) embeddings frozen, and embeddings
    that small cap the logits of a 64-wide model near uniform, whatever the adapters learn."""
    cfg = config(sft_root, "base", **{"data.source": shakespeare, "data.vocab_size": 512, "train.max_steps": 10,
                                      "data.seq_len": 64, "model.overrides": "{initializer_range: 0.2}",
                                      "train.eval_every_steps": 10, "train.checkpoint_every_steps": 10})
    result = fit(cfg, prepare_data(cfg.data, verbose=False))
    return os.path.join(result.checkpoint.path, "hf")


@pytest.fixture(scope="module")
def chat_corpus(sft_root) -> Path:
    path = sft_root / "chat.jsonl"
    lines = [json.dumps(r) for r in records(600, "chat")] + [json.dumps(r) for r in BAD_CHAT] + ["{not json"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def lora_run(base_model, chat_corpus, sft_root):
    cfg = config(sft_root, "lora", **{
        "model.name": base_model, "data.format": "chat", "data.source": chat_corpus, "data.val_fraction": 0.1,
        "train.lora": "{r: 8, alpha: 16, target_modules: all-linear}", "train.lr": 1e-2, "train.max_steps": 40,
        "train.eval_every_steps": 20, "train.checkpoint_every_steps": 20, "deepspeed.zero_stage": 2})
    prepared = prepare_data(cfg.data, verbose=False)
    return cfg, prepared, fit(cfg, prepared)


def test_chat_lora_on_own_base_learns_and_counts_bad_records(lora_run, base_model):
    cfg, prepared, result = lora_run
    assert cfg.data.tokenizer == base_model  # the base's own tokenizer, not a new one
    s = prepared.stats
    assert s.documents == 600 and s.skipped_records == 5
    assert s.skipped_reasons == ("skipped 5 records: 1 empty messages, 1 missing field 'messages', 1 no assistant "
                                 "turn, 1 not JSON, 1 unknown role")
    assert s.trained_tokens < s.tokens / 4  # the prompt (system + user) is masked out
    assert s.blocks <= s.documents / 2  # short examples (~42 tokens) share blocks of 128
    log = read_log(cfg)
    start = next(r for r in log if r.get("event") == "start")
    assert start["lora"] and 0 < start["trainable_params"] < start["total_params"] / 5
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 40 and np.mean(losses[-5:]) < losses[0] - 2.0, losses
    assert result.metrics["val_loss"] < losses[0] - 2.0  # on the held-out records' assistant tokens
    assert result.metrics["perplexity"] == pytest.approx(np.exp(result.metrics["val_loss"]), rel=1e-6)


def test_lora_checkpoint_holds_only_the_adapter(lora_run):
    cfg, _, result = lora_run
    ckpt = Path(result.checkpoint.path)
    ds_bytes = sum(p.stat().st_size for p in (ckpt / "deepspeed").rglob("*") if p.is_file())
    hf_bytes = (ckpt / "hf" / "model.safetensors").stat().st_size
    adapter_bytes = (ckpt / "adapter" / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < hf_bytes / 3
    # model + Adam moments for the adapter only: less than one fp32 copy of the base
    assert ds_bytes < hf_bytes, (ds_bytes, hf_bytes)
    module = torch.load(ckpt / "deepspeed" / "state" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    frozen = [k for k in module if ".lora_" not in k]
    # the one frozen weight DeepSpeed keeps is the tied embedding / output head (a shared parameter)
    assert len(module) > len(frozen) and len(frozen) <= 1 and all(
        k.endswith(("embed_tokens.weight", "lm_head.weight")) for k in frozen), frozen


def test_exports_merged_and_adapter_agree(lora_run, base_model):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, _, result = lora_run
    ckpt = Path(result.checkpoint.path)
    assert not (ckpt / "hf" / "adapter_config.json").exists()  # a plain transformers model
    merged = AutoModelForCausalLM.from_pretrained(ckpt / "hf").eval()
    assert type(merged).__name__ == "LlamaForCausalLM"
    base = AutoModelForCausalLM.from_pretrained(base_model).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), ckpt / "adapter").eval()
    tok = AutoTokenizer.from_pretrained(ckpt / "hf")
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 12+7?"}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        m, a, b = merged(input_ids=ids).logits, adapted(input_ids=ids).logits, base(input_ids=ids).logits
    torch.testing.assert_close(m, a, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(m, b, atol=1e-2)  # the adapter changed the model
    assert tok.chat_template == AutoTokenizer.from_pretrained(base_model).chat_template


def test_tensorboard_events_hold_the_metrics(lora_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, _, _ = lora_run
    acc = EventAccumulator(str(Path(cfg.train.storage_path) / cfg.train.run_name / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/grad_norm", "val/val_loss", "val/perplexity"} <= tags
    logged = {r["step"]: r["loss"] for r in read_log(cfg) if "loss" in r}
    events = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert sorted(events) == list(range(1, 41))
    assert all(events[s] == pytest.approx(logged[s], rel=1e-6) for s in events)
    # validation only at its own steps (eval_every_steps 20), with the values measured there: no staircase
    evals = {r["step"]: r for r in read_log(cfg) if "eval_s" in r}
    assert sorted(evals) == [20, 40] and evals[40]["val_loss"] != evals[20]["val_loss"]
    for key, tag in (("val_loss", "val/val_loss"), ("perplexity", "val/perplexity")):
        assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars(tag)] == \
            [(s, evals[s][key]) for s in (20, 40)], tag
    assert all("val_loss" not in r for r in read_log(cfg) if "step" in r and "eval_s" not in r)


def test_corpus_without_usable_records_fails_naming_the_file(ray_cluster, sft_root):
    path = sft_root / "bad.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in BAD_CHAT) + "\n")
    cfg = config(sft_root, "bad", **{"data.format": "chat", "data.source": path})
    with pytest.raises(DataError, match=f"{path}: no usable chat record .*skipped 4 records"):
        prepare_data(cfg.data, verbose=False)


def test_lora_zero3_resumes_and_exports(base_model, chat_corpus, sft_root):
    """LoRA under ZeRO-3 (base and adapters sharded over both ranks), stopped and resumed: the
    adapter-only checkpoint restores onto the rebuilt base, and the merged export is consistent."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fields = {"model.name": base_model, "data.format": "chat", "data.source": chat_corpus,
              "train.lora": "{r: 8, alpha: 16, target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]}",
              "train.lr": 2e-2, "train.warmup_steps": 1, "deepspeed.zero_stage": 3,
              "train.checkpoint_every_steps": 6, "train.eval_every_steps": 6}
    first_cfg = config(sft_root, "lora3", **fields, **{"train.max_steps": 6})
    prepared = prepare_data(first_cfg.data, verbose=False)
    fit(first_cfg, prepared)
    second_cfg = config(sft_root, "lora3", **fields, **{"train.max_steps": 9})
    second = fit(second_cfg, prepared)
    assert second.metrics["step"] == 9 and second.metrics["resumed_from_step"] == 6
    log = read_log(second_cfg)
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 10))
    by_step = {r["step"]: r["loss"] for r in log if "loss" in r}
    # the adapter came back: a fresh (zero) adapter on the unchanged base would start at step 1's loss
    assert by_step[7] < by_step[1] - 1.0, by_step
    ckpt = Path(second.checkpoint.path)
    merged = AutoModelForCausalLM.from_pretrained(ckpt / "hf").eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_model), ckpt / "adapter").eval()
    ids = torch.tensor([list(range(5, 40))])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_parquet_and_hf_dataset_read_like_jsonl(ray_cluster, sft_root, base_model):
    """The same chat records from .jsonl, .parquet and a saved Hugging Face dataset (a nested
    `conversation` column, field names set in data.sft) give the same examples."""
    import datasets

    rows = [{"conversation": [{"from": m["role"], "value": m["content"]} for m in r["messages"]]}
            for r in records(120, "chat", seed=3)]
    (sft_root / "conv.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(sft_root / "conv.parquet"))
    ds.save_to_disk(str(sft_root / "conv_hf"))
    stats = {}
    for name in ("conv.jsonl", "conv.parquet", "conv_hf"):
        cfg = config(sft_root, "read", **{"data.format": "chat", "data.source": sft_root / name,
                                          "data.tokenizer": base_model, "data.sft.messages_field": "conversation",
                                          "data.sft.role_field": "from", "data.sft.content_field": "value"})
        s = prepare_data(cfg.data, verbose=False).stats
        stats[name] = (s.documents, s.tokens, s.trained_tokens, s.skipped_records)
    assert stats["conv.jsonl"][0] == 120 and stats["conv.jsonl"][3] == 0
    assert stats["conv.parquet"] == stats["conv.jsonl"] == stats["conv_hf"]


def test_lora_periodic_checkpoint_holds_the_adapter_state_and_raylm_export_merges_it(lora_run, tmp_path):
    """train.export: final_and_best: step 20 holds only DeepSpeed's adapter state; `raylm export`
    rebuilds the base from model.name, loads the adapter from DeepSpeed's fp32 merge and writes the
    same adapter/ and merged hf/ as training did at the final step."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_train import assert_same_weights, strip_export

    from raylm.cli import main
    from raylm.train.checkpoint import verify_checkpoint

    cfg, _, result = lora_run
    periodic = Path(cfg.train.storage_path) / cfg.train.run_name / "step_00000020"
    assert not verify_checkpoint(str(periodic))["exported"] and not (periodic / "adapter").exists()
    copy = strip_export(result.checkpoint.path, tmp_path / "step_00000040")
    assert main(["export", str(copy)]) == 0
    ckpt = Path(result.checkpoint.path)
    assert_same_weights(copy / "hf" / "model.safetensors", ckpt / "hf" / "model.safetensors")
    assert_same_weights(copy / "adapter" / "adapter_model.safetensors", ckpt / "adapter" / "adapter_model.safetensors")
    assert "adapter/adapter_config.json" in verify_checkpoint(str(copy))["files"]


def test_interrupted_instruction_sft_zero3_resumes_exactly_in_a_new_process(ray_cluster, sft_root, tmp_path):
    """Instruction SFT, full fine-tuning under ZeRO-3 (weights and optimizer state sharded over 2
    workers): `raylm train` interrupted (SIGINT) after a checkpoint and run again logs the per-step
    losses of an uninterrupted run after that checkpoint (the sharded weights and optimizer state
    came back exactly)."""
    from resume_helpers import interrupt_after_checkpoint, losses, run_to_end

    path = sft_root / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records(400, "instruction")) + "\n")
    fields = {"data.format": "instruction", "data.source": path, "data.vocab_size": 300,
              "data.sft.system_prompt": "Be exact.", "deepspeed.zero_stage": 3, "train.lr": 3e-3,
              "train.max_steps": 24, "train.checkpoint_every_steps": 4, "train.eval_every_steps": 24,
              "train.eval_batches": 1}
    whole = config(sft_root, "sft-whole", **fields)
    prepared = prepare_data(whole.data, verbose=False)
    assert prepared.stats.documents == 400 and prepared.stats.skipped_records == 0
    fit(whole, prepared)
    start = next(r for r in read_log(whole) if r.get("event") == "start")
    assert not start["lora"] and start["trainable_params"] == start["total_params"]
    sets = {"data.cache_dir": sft_root / "cache", "data.seq_len": 128, "train.storage_path": tmp_path,
            "train.run_name": "cut", "train.log_every_steps": 1, "train.warmup_steps": 2, **fields}
    interrupt_after_checkpoint(sets, tmp_path / "cut", step=4)
    assert max(losses(tmp_path / "cut")) < 24  # really interrupted
    run_to_end(sets)
    cut, ref = losses(tmp_path / "cut"), losses(Path(whole.train.storage_path) / "sft-whole")
    resumed = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
               if '"resume"' in line]
    assert len(resumed) == 1 and 4 <= resumed[0]["step"] < 24
    assert sorted(cut) == sorted(ref) == list(range(1, 25))
    after = range(resumed[0]["step"] + 1, 25)
    assert [cut[s] for s in after] == pytest.approx([ref[s] for s in after], rel=1e-5, abs=1e-6)
    assert ref[24] < ref[1]  # and the run learns
