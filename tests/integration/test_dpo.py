"""DPO on a real local Ray with DeepSpeed: the README's example pair, run as shipped, learns what
the preference data tells it.

The SFT base is configs/chat_sft.yaml as shipped (a tiny Llama, 600 steps on the toy arithmetic
chat: the right sums). configs/dpo_lora.yaml and configs/dpo.yaml, as shipped (only their storage,
and model.name pointing at that base), then run DPO on the toy preference corpus
(configs/data/arith_pref.jsonl: chosen the right sum of two digits, rejected a wrong one,
scripts/make_toy_preference.py): each raises the validation reward accuracy from 0 (policy ==
reference) to >= 0.8, the README's promise. The LoRA run's own validation numbers are recomputed by
TRL's DPOTrainer on the same pairs and checkpoint; the full run's tuned model, as transformers loads
it, prefers the chosen answers on held-out pairs more often than the base does. A short full
fine-tune under ZeRO-3 (on a corpus with bad records, which are counted) checks the frozen
reference: at the first step the policy is its reference, so the loss is exactly log 2.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raylm.config import load_config
from raylm.data import IGNORE, prepare_data
from raylm.train.driver import build_trainer, check_data_fits

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests" / "unit"))
from make_toy_preference import records  # noqa: E402

MAX_OPERAND = 4  # the bad-record corpus: sums 0..8, 25 facts
SHIPPED_MAX_OPERAND = 9  # configs/data/arith_pref.jsonl: sums of two digits
BAD = [{"prompt": "What is 1+1?", "chosen": "2"}, {"prompt": "What is 1+1?", "chosen": "2", "rejected": "2"},
       {"prompt": "x " * 200, "chosen": "2", "rejected": "3"}]


def read_log(cfg) -> list[dict]:
    path = Path(cfg.train.storage_path) / cfg.train.run_name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def fit(cfg, prepared):
    check_data_fits(cfg, prepared)
    result = build_trainer(cfg, prepared).fit()
    assert result.error is None, result.error
    return result


def config(tmp: Path, base: str, run_name: str, **fields):
    over = {"data.cache_dir": str(tmp / "cache"), "data.seq_len": 48, "train.storage_path": str(tmp / "runs"),
            "train.run_name": run_name, "train.log_every_steps": 1, "train.warmup_steps": 2, **fields}
    return load_config(ROOT / "configs" / base, [f"{k}={v}" for k, v in over.items()])


@pytest.fixture(scope="module")
def dpo_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dpo")


def shipped(tmp: Path, base: str, **fields):
    """A shipped config as it is, but for where it keeps its files (and the model it starts from)."""
    over = {"data.cache_dir": str(tmp / "cache"), "train.storage_path": str(tmp / "runs"), **fields}
    return load_config(ROOT / "configs" / base, [f"{k}={v}" for k, v in over.items()])


@pytest.fixture(scope="module")
def sft_base(ray_cluster, dpo_root) -> str:
    """The SFT'd base: configs/chat_sft.yaml as shipped (its final step's hf/ export is what the
    shipped DPO configs name)."""
    cfg = shipped(dpo_root, "chat_sft.yaml")
    hf = os.path.join(fit(cfg, prepare_data(cfg.data, verbose=False)).checkpoint.path, "hf")
    dpo_name = load_config(ROOT / "configs" / "dpo.yaml").model.name
    assert dpo_name.endswith(os.path.join(cfg.train.run_name, Path(hf).parent.name, "hf"))  # the step dpo.yaml names
    return hf


@pytest.fixture(scope="module")
def pref_corpus(dpo_root) -> Path:
    path = dpo_root / "pref.jsonl"
    lines = [json.dumps(r) for r in records(900, max_operand=MAX_OPERAND)] + [json.dumps(r) for r in BAD]
    path.write_text("\n".join(lines + ["{not json"]) + "\n")
    return path


@pytest.fixture(scope="module")
def lora_run(sft_base, dpo_root):
    """configs/dpo_lora.yaml as shipped, logging every step (logging changes nothing the run computes)."""
    cfg = shipped(dpo_root, "dpo_lora.yaml", **{"model.name": sft_base, "train.log_every_steps": 1})
    prepared = prepare_data(cfg.data, verbose=False)
    return cfg, prepared, fit(cfg, prepared)


# ------------------------------------------------------------------ measuring a model directly (transformers)


def full_sequences(rows: list[dict]) -> dict:
    """Pair rows (as the data stage wrote them) in TRL's layout: full ids [chosen; rejected], masks."""
    seqs, masks = [], []
    for side in ("chosen", "rejected"):
        for r in rows:
            n = int(r[f"{side}_tokens"])
            labels = np.asarray(r[f"{side}_labels"][:n])
            # the token after the last input: its label, or any id when it is not trained (the template's
            # newline after EOS): causal attention keeps it out of every scored position
            seqs.append(np.append(r[f"{side}_input_ids"][:n], max(int(labels[-1]), 0)))
            masks.append(np.append(0, labels != IGNORE))
    length = max(len(s) for s in seqs)
    ids, attention, completion = (torch.zeros(len(seqs), length, dtype=torch.long) for _ in range(3))
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, :len(s)], attention[i, :len(s)], completion[i, :len(s)] = torch.as_tensor(s), 1, torch.as_tensor(m)
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


def preference_accuracy(model, rows: list[dict]) -> float:
    """Share of pairs whose chosen answer the model finds likelier than the rejected one."""
    from raylm.train.batches import concat_pairs
    from raylm.train.objectives.dpo import forward_logps

    batch = concat_pairs({k: torch.as_tensor(np.stack([r[k] for r in rows])).long() for k in rows[0]})
    with torch.no_grad():
        chosen, rejected = forward_logps(model, batch)[0].chunk(2)
    return float((chosen > rejected).float().mean())


def exact_match(model, tok, prompts: list[tuple[list[dict], str]]) -> float:
    """Greedy answers equal to the right sum, as a served model would answer."""
    hits = 0
    for messages, answer in prompts:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        hits += tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == answer
    return hits / len(prompts)


def mean_margin(model, rows: list[dict]) -> float:
    """Mean over pairs of log p(chosen) - log p(rejected) under `model`: what DPO raises relative
    to the reference (the run's rewards/margins are beta x the tuned model's minus the base's)."""
    from raylm.train.batches import concat_pairs
    from raylm.train.objectives.dpo import forward_logps

    batch = concat_pairs({k: torch.as_tensor(np.stack([r[k] for r in rows])).long() for k in rows[0]})
    with torch.no_grad():
        chosen, rejected = forward_logps(model, batch)[0].chunk(2)
    return float((chosen - rejected).mean())


def base_vs_tuned(sft_base: str, tuned_dir: Path, val_rows: list[dict],
                  max_operand: int = SHIPPED_MAX_OPERAND) -> tuple[float, float, float, float]:
    """(preference accuracy on the validation pairs, exact match on 60 held-out records) of the SFT
    base and of the tuned model, as transformers loads them; printed, for the test log."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    held = records(200, seed=11, max_operand=max_operand)  # another draw of the same facts (the toy task has no others)
    tok = AutoTokenizer.from_pretrained(sft_base)
    base = AutoModelForCausalLM.from_pretrained(sft_base).eval()
    tuned = AutoModelForCausalLM.from_pretrained(tuned_dir).eval()
    before, after = preference_accuracy(base, val_rows), preference_accuracy(tuned, val_rows)
    prompts = [(r["prompt"], r["chosen"][0]["content"]) for r in held[:60]]
    em_before, em_after = exact_match(base, tok, prompts), exact_match(tuned, tok, prompts)
    print(f"held-out preference accuracy {before:.2f} -> {after:.2f}, exact match {em_before:.2f} -> {em_after:.2f}")
    return before, after, em_before, em_after


# ------------------------------------------------------------------ tests


def test_lora_dpo_learns_the_preference(lora_run, sft_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, prepared, result = lora_run
    assert cfg.data.tokenizer == sft_base  # the SFT base's own tokenizer and chat template
    assert prepared.stats.documents == 1000 and prepared.stats.skipped_records == 0
    log = read_log(cfg)
    steps = [r for r in log if "loss" in r]
    assert len(steps) == cfg.train.max_steps and steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # adapters start at 0
    assert steps[0]["rewards/accuracy"] == 0.0  # policy == reference: every reward is 0, no pair is won
    for r in steps:
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-5)
    final = result.metrics
    print(f"train loss {steps[-1]['loss']:.3f}, val loss {final['val_loss']:.3f}, val reward accuracy "
          f"{final['val_rewards/accuracy']:.3f}, margin {final['val_rewards/margins']:.3f}")
    assert np.mean([r["loss"] for r in steps[-5:]]) < 0.5 and final["val_loss"] < math.log(2) - 0.1
    assert final["val_rewards/accuracy"] >= 0.8 and final["val_rewards/margins"] > 0  # the README's figure

    val_rows = prepared.val.take_all()
    assert len(val_rows) <= cfg.train.eval_batches * cfg.train.grad_accum_steps * cfg.train.micro_batch_size * cfg.train.num_workers  # the run evaluated them all
    before, after, em_before, em_after = base_vs_tuned(sft_base, Path(result.checkpoint.path) / "hf", val_rows)
    # The improvement, measured on the exported model as transformers loads it: its mean log-prob
    # margin of chosen over rejected rose from the base's, by exactly what the run's own validation
    # reported (rewards/margins = beta x the rise). The absolute preference accuracy and exact match
    # (measured for 120 steps of this config: 0.78 -> 0.87, 0.27 -> 0.23) are printed above, and
    # asserted for the full fine-tune below (test_full_dpo_learns_what_it_is_told).
    from transformers import AutoModelForCausalLM as Auto

    base_margin = mean_margin(Auto.from_pretrained(sft_base).eval(), val_rows)
    tuned_margin = mean_margin(Auto.from_pretrained(Path(result.checkpoint.path) / "hf").eval(), val_rows)
    print(f"mean log-prob margin {base_margin:.3f} -> {tuned_margin:.3f}")
    assert tuned_margin > base_margin
    assert cfg.train.dpo.beta * (tuned_margin - base_margin) == pytest.approx(final["val_rewards/margins"], abs=1e-3)
    # the adapter export: base + adapter/ is the merged hf/
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft_base),
                                        Path(result.checkpoint.path) / "adapter").eval()
    assert preference_accuracy(adapted, val_rows) == pytest.approx(after, abs=0.03)


def test_run_metrics_equal_trl_on_the_same_pairs(lora_run, sft_base):
    """TRL's DPOTrainer recomputes the run's final validation loss and rewards on every val pair,
    from the checkpoint's adapter (policy) and the adapter disabled (reference)."""
    pytest.importorskip("trl")
    from peft import PeftModel
    from test_dpo_units import trl_trainer
    from transformers import AutoModelForCausalLM

    cfg, prepared, result = lora_run
    rows = prepared.val.take_all()
    assert len(rows) <= cfg.train.eval_batches * cfg.train.grad_accum_steps * cfg.train.micro_batch_size * cfg.train.num_workers  # the run evaluated them all
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft_base),
                                       Path(result.checkpoint.path) / "adapter").eval()
    trainer = trl_trainer(policy, None, cfg.train.dpo.beta, cfg.train.dpo.loss_type)
    with torch.no_grad():
        loss = trainer._compute_loss(policy, full_sequences(rows), return_outputs=False)
    theirs = {k: v[-1] for k, v in trainer._metrics["train" if policy.training else "eval"].items()}
    m = result.metrics
    assert float(loss) == pytest.approx(m["val_loss"], abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert theirs[key] == pytest.approx(m[f"val_{key}"], abs=1e-5), key
    assert theirs["rewards/accuracies"] == pytest.approx(m["val_rewards/accuracy"], abs=1e-6)  # float32 mean


def test_tensorboard_holds_reward_metrics(lora_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, _, _ = lora_run
    acc = EventAccumulator(str(Path(cfg.train.storage_path) / cfg.train.run_name / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/rewards/accuracy", "train/rewards/margins", "train/rewards/chosen", "train/rewards/rejected",
            "val/rewards/accuracy", "val/rewards/margins", "val/val_loss"} <= tags
    # each value at the step that measured it: training rewards at every log line, validation only at evaluations
    log = read_log(cfg)
    logged = {r["step"]: r for r in log if "rewards/accuracy" in r}
    evals = {r["step"]: r for r in log if "eval_s" in r}
    assert evals and len(evals) < len(logged)
    for key, tag, at in (("rewards/margins", "train/rewards/margins", logged), ("val_loss", "val/val_loss", evals),
                         ("val_rewards/accuracy", "val/rewards/accuracy", evals),
                         ("val_rewards/margins", "val/rewards/margins", evals)):
        assert [(e.step, pytest.approx(e.value, rel=1e-6, abs=1e-7)) for e in acc.Scalars(tag)] == \
            [(s, at[s][key]) for s in sorted(at)], tag


# tests/unit/test_dpo_units.py checks the same on a GPT-2 with LoRA, through prepare_model (which every
# run builds its model with); this end-to-end run of it is opt-in (RAYLM_EXTENDED=1), within CI's time.
@pytest.mark.extended
def test_gpt2_dpo_trains_without_dropout(ray_cluster, pref_corpus, dpo_root):
    """A GPT-2-family model (dropout 0.1) under LoRA: the reference is the policy with its adapters
    off, so with dropout off (train.dpo.disable_dropout, the default) step 1's policy equals its
    reference: the loss is log 2 and every reward 0. With dropout on, the two forward passes draw
    different masks and neither holds."""
    cfg = config(dpo_root, "dpo_lora.yaml", "dpo-gpt2", **{
        "model.name": "tiny-gpt2", "data.tokenizer": "train", "data.vocab_size": 300, "data.source": pref_corpus,
        "train.max_steps": 1, "train.micro_batch_size": 4, "train.eval_every_steps": 1,
        "train.checkpoint_every_steps": 1, "train.eval_batches": 1})
    assert cfg.train.dpo.disable_dropout
    fit(cfg, prepare_data(cfg.data, verbose=False))
    (step,) = [r for r in read_log(cfg) if "loss" in r]
    assert step["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy"):
        assert step[key] == 0.0, key


def test_full_dpo_zero3_reference_is_the_starting_model(sft_base, pref_corpus, dpo_root):
    """Full fine-tuning under ZeRO-3: the frozen reference is a partitioned DeepSpeed engine holding the
    starting weights, so step 1's loss is log 2 exactly; then the loss falls and hf/ exports. Its
    corpus holds bad records: each is skipped and counted by reason."""
    from transformers import AutoModelForCausalLM

    cfg = config(dpo_root, "dpo.yaml", "dpo-full", **{
        "model.name": sft_base, "data.source": pref_corpus, "train.max_steps": 6, "train.lr": 3e-3,
        "train.micro_batch_size": 4, "train.grad_accum_steps": 2, "train.eval_every_steps": 6,
        "train.checkpoint_every_steps": 6, "train.eval_batches": 2, "deepspeed.zero_stage": 3})
    prepared = prepare_data(cfg.data, verbose=False)
    s = prepared.stats
    assert cfg.data.tokenizer == sft_base
    assert s.documents == 900 and s.skipped_records == 4
    assert s.skipped_reasons == ("skipped 4 records: 1 chosen identical to rejected, 1 missing field 'rejected', "
                                 "1 no answer token within seq_len=48, 1 not JSON")
    result = fit(cfg, prepared)
    steps = [r for r in read_log(cfg) if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[-1]["loss"] < steps[0]["loss"] and steps[-1]["rewards/margins"] > 0
    model = AutoModelForCausalLM.from_pretrained(Path(result.checkpoint.path) / "hf")
    assert type(model).__name__ == "LlamaForCausalLM"


def test_full_dpo_learns_what_it_is_told(sft_base, dpo_root):
    """Issue 24 item 5, issue 32 item 4: from the shipped SFT base, configs/dpo.yaml as shipped raises the
    validation reward accuracy to >= 0.8 (the README's figure), and the tuned model, as transformers
    loads it, prefers the chosen answer of held-out pairs more often than the base does."""
    cfg = shipped(dpo_root, "dpo.yaml", **{"model.name": sft_base})
    prepared = prepare_data(cfg.data, verbose=False)
    result = fit(cfg, prepared)
    evals = [r for r in read_log(cfg) if "val_rewards/accuracy" in r]
    print("val reward accuracy by step:", [(r["step"], round(r["val_rewards/accuracy"], 3)) for r in evals])
    assert result.metrics["val_rewards/accuracy"] >= 0.8 and result.metrics["val_rewards/margins"] > 0

    val_rows = prepared.val.take_all()
    assert len(val_rows) <= cfg.train.eval_batches * cfg.train.grad_accum_steps * cfg.train.micro_batch_size * cfg.train.num_workers
    before, after, em_before, em_after = base_vs_tuned(sft_base, Path(result.checkpoint.path) / "hf", val_rows)
    assert after > before  # measured 0.78 -> 0.88
    # greedy exact match is not what DPO optimises: on 60 held-out prompts it moved by a prompt or
    # two either way between runs (measured 0.27 -> 0.30 and 0.27 -> 0.25; the LoRA run 0.27 -> 0.23).
    # What holds is that DPO, held to the base by its KL term, keeps what SFT taught: a policy that
    # drifted off (degenerate answers) falls to ~0.
    assert em_after >= em_before - 0.1 and em_after > 0.15, (em_before, em_after)
