"""Models by Hub id, each stand-in family through its cheapest full path: LoRA chat SFT of
`model.name=ORG/NAME` (resolved offline from the session's HF cache, with its own tokenizer and
chat template) -> the merged export -> served by vLLM behind raylm's API -> one chat completion whose
prompt is the family template's own rendering, token for token (usage.prompt_tokens).

Two families run in the suite (Qwen2: ChatML, tied embeddings, grouped-query attention; Gemma-2:
soft-capping, sliding window, a template that refuses system turns); RAYLM_ALL_FAMILIES=1 runs all
six (Llama-3, Mistral, Phi-3, GPT-2 too)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest

from hub_standins import FAMILIES
from raylm.config import load_config
from raylm.data import prepare_data
from raylm.train.driver import build_trainer, check_data_fits
from serve_fixtures import MODEL_ID, auth, deploy_app, key_file, serve_config, shutdown_serve

__all__ = ["key_file"]

ROOT = Path(__file__).resolve().parents[2]
SUITE = ("qwen2", "gemma2")
ALL = os.environ.get("RAYLM_ALL_FAMILIES") == "1"

pytestmark = pytest.mark.timeout(600)
# vLLM's compiled default (what users run) serves the first family; the others start eager (~15 s
# less per engine start here), as compilation is covered by the first and by the README's pipeline.
COMPILED, EAGER = {SUITE[0]: "{}"}, "{enforce_eager: true}"


def families():
    return [pytest.param(f, marks=[] if f in SUITE or ALL else [pytest.mark.skip(
        reason="all six families: RAYLM_ALL_FAMILIES=1")]) for f in FAMILIES]


@pytest.fixture(scope="module")
def chat_corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hub-chat") / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {a}+{b}?"},
                                                     {"role": "assistant", "content": str(a + b)}]}) + "\n"
                            for a in range(8) for b in range(8)))
    return path


@pytest.mark.parametrize("family", families())
def test_hub_model_lora_sft_export_serve(family, hub_standins, ray_cluster, chat_corpus, key_file, tmp_path):
    from transformers import AutoTokenizer

    repo, fam = hub_standins[family], FAMILIES[family]
    over = {"model.name": repo, "data.format": "chat", "data.source": chat_corpus, "data.seq_len": 128,
            "data.val_fraction": 0.1, "data.cache_dir": tmp_path / "cache", "train.storage_path": tmp_path / "runs",
            "train.run_name": family, "train.num_workers": 1, "train.max_steps": 2, "train.eval_batches": 1,
            "train.eval_every_steps": 2, "train.checkpoint_every_steps": 2, "train.log_every_steps": 1,
            "train.lora": "{r: 4, alpha: 8, target_modules: all-linear}", "deepspeed.zero_stage": 1}
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"{k}={v}" for k, v in over.items()])
    assert cfg.data.tokenizer == repo  # the model's own tokenizer, with no flag
    prepared = prepare_data(cfg.data, verbose=False)
    own = AutoTokenizer.from_pretrained(repo)
    assert prepared.stats.vocab_size == len(own) and prepared.stats.documents == 64
    assert prepared.stats.chat_template == ("the tokenizer's own" if fam.template else
                                            "raylm's default (the tokenizer has no chat template of its own)")
    # the trained tokens: each answer (a number) and the family's end-of-turn token (EOS for GPT-2's default)
    eot = fam.end_of_turn or own.eos_token
    assert prepared.stats.trained_tokens >= 64 * 2 and prepared.stats.trained_tokens <= 64 * 3
    check_data_fits(cfg, prepared)
    result = build_trainer(cfg, prepared).fit()
    assert result.error is None, result.error
    hf = os.path.join(result.checkpoint.path, "hf")
    exported = AutoTokenizer.from_pretrained(hf)
    assert exported.chat_template == (fam.template or exported.chat_template) and exported.get_vocab() == own.get_vocab()
    assert eot in exported.get_vocab()

    messages = [{"role": "user", "content": "What is 3+4?"}]
    if fam.system:
        messages.insert(0, {"role": "system", "content": "You add numbers."})
    rendered = exported.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    url = deploy_app(serve_config(key_file, "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=1",
                                  "serve.max_model_len=512", "serve.max_tokens_limit=16",
                                  f"serve.engine_kwargs={COMPILED.get(family, EAGER)}"), hf)
    try:
        r = httpx.post(f"{url}/v1/chat/completions", headers=auth(), timeout=120,
                       json={"model": MODEL_ID, "messages": messages, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(rendered["input_ids"])
    finally:
        shutdown_serve()
