"""SFT data without Ray: record checks, prompt masking, truncation, packing and its isolation."""

import json

import numpy as np
import pytest
import torch

from raylm.config import ModelConfig, SFTConfig
from raylm.data import load_tokenizer, train_tokenizer, tokenizer_files
from raylm.model import build_model
from raylm.data import (IGNORE, chat_messages, instruction_messages, pack_examples, packed_logits, render,
                       render_and_pack,
                       skipped_summary, to_example)

CHAT = [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4+4?"},
        {"role": "assistant", "content": "8"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = ["system: You add numbers.\nuser: What is 2+3?\nassistant: 5\n"] * 50
    return load_tokenizer(train_tokenizer(texts, 300, str(tmp_path_factory.mktemp("tok") / "tok")))


def test_masking_trains_only_assistant_tokens(tok):
    ids, mask = render(tok, CHAT, "assistant")
    trained = tok.decode(ids[mask])
    assert trained == " 5<|endoftext|> 8<|endoftext|>"  # both answers, each with EOS to learn stopping
    prompt = tok.decode(ids[~mask])
    assert "You add numbers." in prompt and "What is 2+3?" in prompt and "And 4+4?" in prompt
    (inputs, labels), reason, cut = to_example(ids, mask, seq_len=512, too_long="truncate")
    assert reason is None and not cut
    assert np.array_equal(inputs, ids[:-1])
    # a label is the next token where that token is the assistant's, -100 on system/user tokens
    assert np.array_equal(labels[mask[1:]], ids[1:][mask[1:]]) and (labels[~mask[1:]] == IGNORE).all()
    assert tok.decode(labels[labels != IGNORE]) == trained
    _, all_mask = render(tok, CHAT, "all")
    assert all_mask.all()


def test_too_long_records_truncate_or_skip(tok):
    ids, mask = render(tok, CHAT, "assistant")
    first_answer = int(np.argmax(mask))  # position first_answer - 1 predicts the answer's first token
    (inputs, labels), reason, cut = to_example(ids, mask, seq_len=first_answer, too_long="truncate")
    assert cut and reason is None and len(inputs) == first_answer and (labels != IGNORE).sum() == 1
    assert to_example(ids, mask, seq_len=first_answer - 1, too_long="truncate")[1].startswith("no trained token")
    assert to_example(ids, mask, seq_len=10, too_long="skip")[1] == "longer than seq_len=10"


def test_bad_records_have_reasons():
    sft = SFTConfig()
    assert chat_messages({"messages": CHAT}, sft) == (CHAT, None)
    assert chat_messages({"text": "x"}, sft) == (None, "missing field 'messages'")
    assert chat_messages({"messages": []}, sft) == (None, "empty messages")
    assert chat_messages({"messages": [{"role": "robot", "content": "x"}]}, sft) == (None, "unknown role")
    assert chat_messages({"messages": CHAT[:2]}, sft) == (None, "no assistant turn")
    custom = SFTConfig(messages_field="conv", role_field="from", content_field="value")
    assert chat_messages({"conv": [{"from": "assistant", "value": "hi"}]}, custom)[0] == [
        {"role": "assistant", "content": "hi"}]
    msgs, _ = instruction_messages({"instruction": "Add.", "input": "2+3", "output": "5"}, SFTConfig(system_prompt="S"))
    assert msgs == [{"role": "system", "content": "S"}, {"role": "user", "content": "Add.\n\n2+3"},
                    {"role": "assistant", "content": "5"}]
    assert instruction_messages({"instruction": "Add."}, sft) == (None, "missing field 'output'")
    assert skipped_summary({"skip:empty messages": 1, "skip:missing field 'messages'": 1, "examples": 3}) == \
        "skipped 2 records: 1 empty messages, 1 missing field 'messages'"


def test_render_and_pack_counts_every_record(tok, tmp_path):
    tok.save_pretrained(tmp_path / "t")
    lines = [json.dumps({"messages": CHAT}), json.dumps({"messages": []}), "{broken", json.dumps({"text": "x"}),
             json.dumps({"messages": CHAT[:3]})]
    out = render_and_pack({"record": np.array(lines, dtype=object)}, "chat", SFTConfig().model_dump_json(), 64,
                          tokenizer_files(str(tmp_path / "t")), "k1")
    counts = json.loads(out["counts"][-1])
    assert counts["examples"] == 2 and counts["skip:empty messages"] == 1 and counts["skip:not JSON"] == 1
    assert counts["skip:missing field 'messages'"] == 1
    assert out["tokens"][-1] == 0 and out["tokens"][:-1].sum() == counts["tokens"]
    assert len(out["tokens"]) == 2  # both examples share one packed row, plus the stats row


def test_pack_examples_layout():
    a = (np.arange(1, 4, dtype=np.int32), np.array([IGNORE, 5, 6], dtype=np.int32))
    b = (np.arange(10, 15, dtype=np.int32), np.array([IGNORE] * 4 + [9], dtype=np.int32))
    c = (np.arange(20, 27, dtype=np.int32), np.arange(7, dtype=np.int32))
    packed = pack_examples([a, b, c], seq_len=8, pad_id=0, packing=True)
    assert packed["tokens"].tolist() == [8, 7]  # a + b fill row 0, c goes to row 1
    assert packed["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert packed["position_ids"][1].tolist() == [0, 1, 2, 3, 4, 5, 6, 0]
    assert packed["labels"][1, 7] == IGNORE and packed["input_ids"][1, 7] == 0
    unpacked = pack_examples([a, b, c], seq_len=8, pad_id=0, packing=False)
    assert unpacked["tokens"].tolist() == [3, 5, 7]


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2"])
def test_packed_examples_do_not_see_each_other(preset):
    """An example's logits are the same alone (padded) and packed after another example."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=preset), 300, 64).eval()
    rng = np.random.default_rng(0)
    first = (rng.integers(3, 300, 11).astype(np.int32), np.zeros(11, dtype=np.int32))
    second = (rng.integers(3, 300, 9).astype(np.int32), np.zeros(9, dtype=np.int32))
    alone = pack_examples([second], 32, pad_id=1, packing=True)
    packed = pack_examples([first, second], 32, pad_id=1, packing=True)
    assert packed["tokens"].tolist() == [20]

    def logits(rows):  # the forward the train loop runs
        with torch.no_grad():
            return packed_logits(model, torch.as_tensor(rows["input_ids"], dtype=torch.long),
                                 torch.as_tensor(rows["position_ids"], dtype=torch.long))[0]

    alone_logits, beside_logits = logits(alone)[:9], logits(packed)[11:20]
    torch.testing.assert_close(beside_logits, alone_logits, rtol=1e-4, atol=1e-4)
    # the check can fail: with a KV cache (the default) transformers ignores the restarts and the
    # second example attends to the first
    with torch.no_grad():
        leaky = model(input_ids=torch.as_tensor(packed["input_ids"], dtype=torch.long),
                      position_ids=torch.as_tensor(packed["position_ids"], dtype=torch.long)).logits[0, 11:20]
    assert not torch.allclose(leaky, alone_logits, atol=1e-3)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_trains_only_adapters(checkpointing):
    """Only the adapters require grad and get one, with activation checkpointing too."""
    from raylm.config import LoraConfig
    from raylm.train.lora import apply_lora, param_counts

    torch.manual_seed(0)
    base = build_model(ModelConfig(name="tiny-llama", activation_checkpointing=checkpointing), 300, 32)
    model = apply_lora(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    trainable, total = param_counts(model)
    assert trainable == 2 * 2 * 4 * (64 + 64)  # 2 layers x (q, v) x r x (in + out)
    ids = torch.randint(3, 300, (2, 16))
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(grads[n] is not None and grads[n].abs().sum() > 0 for n in grads if "lora_B" in n)
    assert all(grads[n] is None for n, p in model.named_parameters() if not p.requires_grad)


def test_config_fine_tune_fields(tmp_path):
    from raylm.config import ConfigError, load_config

    (tmp_path / "tokenizer_config.json").write_text("{}")
    cfg = load_config(overrides=[f"model.name={tmp_path}", "data.format=chat", "train.lora={r: 4}"])
    assert cfg.data.tokenizer == str(tmp_path)  # a model dir's own tokenizer, not a newly trained one
    assert cfg.data.is_sft and cfg.train.lora.r == 4 and cfg.train.lora.target_modules == "all-linear"
    assert load_config(overrides=[f"model.name={tmp_path}", "data.tokenizer=gpt2"]).data.tokenizer == "gpt2"
    with pytest.raises(ConfigError, match=r"train.lora.rank"):
        load_config(overrides=["train.lora={rank: 4}"])
    with pytest.raises(ConfigError, match=r"data.sft.too_long"):
        load_config(overrides=["data.sft.too_long=drop"])
