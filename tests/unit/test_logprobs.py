"""Chunked token log-probs (raylm.train.objectives.logprobs): the loss and every gradient equal
the unchunked computation's (full logits, fp32) within 1e-6, for the architectures raylm trains:
Llama (untied and tied head), GPT-2 (tied), Gemma-2 (soft-capped logits), each also LoRA-wrapped,
and packed rows (position_ids)."""

from __future__ import annotations

import pytest
import torch

from raylm.data import IGNORE
from raylm.train.objectives.dpo import forward_logps
from raylm.train.objectives.lm import token_losses

VOCAB = 97


def tiny(family: str, tied: bool = False):
    from transformers import (Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)

    torch.manual_seed(0)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    if family == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                              final_logit_softcapping=3.0, attn_implementation="eager"))
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied))


def lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():  # adapters start at B = 0: make them matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def sft_batch(packed: bool) -> dict:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (3, 20), generator=g)
    labels = torch.randint(0, VOCAB, (3, 20), generator=g)
    labels[:, :5] = IGNORE  # prompts
    labels[2, 15:] = IGNORE  # padding
    pos = torch.arange(20).repeat(3, 1)
    if packed:
        pos[0, 10:] = torch.arange(10)  # two examples in row 0
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def loss_and_grads(model, batch: dict, chunk: int) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss, count = token_losses(model, batch, chunk_tokens=chunk)
    (loss / count).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,tied,packed", [("llama", False, False), ("llama", False, True), ("llama", True, False),
                                                ("gpt2", True, False), ("gemma2", True, False)])
@pytest.mark.parametrize("with_lora", [False, True])
def test_chunked_loss_and_gradients_equal_the_unchunked(family, tied, packed, with_lora):
    model = tiny(family, tied)
    model = lora(model) if with_lora else model
    batch = sft_batch(packed)
    ref_loss, ref_grads = loss_and_grads(model, batch, chunk=0)
    for chunk in (7, 1000):  # uneven chunks, and one chunk holding every token
        loss, grads = loss_and_grads(model, batch, chunk=chunk)
        assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=1e-6), (chunk, loss, ref_loss)
        assert grads.keys() == ref_grads.keys() and ref_grads
        for name, g in grads.items():
            assert torch.allclose(g, ref_grads[name], rtol=1e-6, atol=1e-6), (chunk, name, (g - ref_grads[name]).abs().max())


def test_raw_text_blocks_and_dpo_sequence_logps_equal_the_unchunked():
    model = tiny("llama")
    block = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(3))
    full, n = token_losses(model, {"input_ids": block})
    chunked, m = token_losses(model, {"input_ids": block}, chunk_tokens=9)
    assert int(n) == int(m) == 40 and torch.allclose(full, chunked, rtol=1e-6)
    pairs = sft_batch(False)
    (a, na), (b, nb) = forward_logps(model, pairs), forward_logps(model, pairs, chunk_tokens=5)
    assert torch.equal(na, nb) and torch.allclose(a, b, rtol=1e-6, atol=1e-6)


def test_the_full_logits_are_never_computed_when_chunked():
    """The head sees at most chunk_tokens rows at a time, and only labelled positions."""
    model = tiny("llama")
    seen = []
    model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[:-1].numel()))
    batch = sft_batch(False)
    loss, _ = token_losses(model, batch, chunk_tokens=8)
    loss.backward()  # backward recomputes each chunk but the last: still at most 8 rows each
    trained = int((batch["labels"] != IGNORE).sum())
    last = trained - 8 * ((trained - 1) // 8)  # the last chunk's rows: kept from forward, not recomputed
    # the model's own call runs the head on no position; then each chunk forward, and again in backward
    assert seen[0] == 0 and max(seen) <= 8 and sum(seen) == 2 * trained - last and len(seen) == 2 * -(-trained // 8)
