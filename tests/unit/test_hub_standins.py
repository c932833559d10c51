"""The Hub stand-ins resolve by id, offline, as a download would: model, tokenizer, template."""

import os

import pytest

from hub_standins import FAMILIES


@pytest.mark.parametrize("family", list(FAMILIES))
def test_standin_loads_by_hub_id_offline(hub_standins, family):
    from huggingface_hub import snapshot_download
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert os.environ["HF_HUB_OFFLINE"] == "1"
    fam, repo = FAMILIES[family], hub_standins[family]
    folder = snapshot_download(repo, local_files_only=True)
    assert f"models--{repo.replace('/', '--')}" in folder and "/snapshots/" in folder
    model = AutoModelForCausalLM.from_pretrained(repo)
    tok = AutoTokenizer.from_pretrained(repo)
    assert len(tok) <= model.config.vocab_size
    assert model.config.hidden_size // model.config.num_attention_heads >= 32  # vLLM CPU attention
    for name, token in fam.special.items():
        assert getattr(tok, name) == token
    assert tok.chat_template == fam.template
    if fam.end_of_turn:
        msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        assert fam.end_of_turn in tok.apply_chat_template(msgs, tokenize=False)
    if family == "qwen2":
        assert model.config.tie_word_embeddings and model.config.num_key_value_heads < model.config.num_attention_heads
    if family == "gpt2":
        assert model.config.resid_pdrop == model.config.embd_pdrop == model.config.attn_pdrop == 0.1
