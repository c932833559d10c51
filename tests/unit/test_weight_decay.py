"""Weight decay groups (train.weight_decay): biases, norms and embeddings never decay, the rest
does; listed for a tiny Llama (untied head, RMSNorm by name) and a tiny GPT-2 (LayerNorm by type,
position embeddings, a head tied to the token embedding), each also under LoRA; and a resumed run
trains with its config's weight decay, not the checkpoint's (real DeepSpeed on one gloo rank)."""

from __future__ import annotations

import re

import pytest
import torch

from raylm.train.deepspeed import optimizer_groups


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2))


def groups(model, wd: float = 0.1) -> tuple[list[str], list[str]]:
    """(decayed, not decayed) parameter names, layer numbers folded to N; checks the two groups'
    weight_decay and that together they hold each trainable parameter once."""
    names = {id(p): n for n, p in model.named_parameters()}
    found = optimizer_groups(model, wd)
    assert len({g["weight_decay"] for g in found}) == len(found) and {g["weight_decay"] for g in found} <= {wd, 0.0}
    listed = [id(p) for g in found for p in g["params"]]
    assert sorted(listed) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    by_decay = {g["weight_decay"]: sorted({re.sub(r"\.\d+\.", ".N.", names[id(p)]) for p in g["params"]}) for g in found}
    return by_decay.get(wd, []), by_decay.get(0.0, [])


def test_llama_groups():
    decay, no_decay = groups(llama())
    assert decay == sorted(["lm_head.weight"] + [f"model.layers.N.{m}.weight" for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")])
    assert no_decay == ["model.embed_tokens.weight", "model.layers.N.input_layernorm.weight",
                        "model.layers.N.post_attention_layernorm.weight", "model.norm.weight"]


def test_gpt2_groups():
    decay, no_decay = groups(gpt2())
    assert decay == [f"transformer.h.N.{m}.weight" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert no_decay == sorted(
        ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"]
        + [f"transformer.h.N.{m}" for m in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_attn.bias",
                                            "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias")])


def test_lora_decays_its_adapters_and_leaves_the_frozen_base_out():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    decay, no_decay = groups(model, wd=0.01)
    assert no_decay == []  # the frozen base is in no group
    assert decay == sorted(f"base_model.model.model.layers.N.self_attn.{m}.lora_{ab}.default.weight"
                           for m in ("q_proj", "v_proj") for ab in "AB")


def test_torch_adamw_applies_the_groups():
    """Decay moves a decayed weight with a zero gradient; an embedding stays where it was."""
    model = gpt2()
    opt = torch.optim.AdamW(optimizer_groups(model, 0.5), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    after = dict(model.named_parameters())
    assert torch.equal(after["transformer.wte.weight"], before["transformer.wte.weight"])
    assert torch.equal(after["transformer.h.0.ln_1.bias"], before["transformer.h.0.ln_1.bias"])
    assert not torch.equal(after["transformer.h.0.mlp.c_fc.weight"], before["transformer.h.0.mlp.c_fc.weight"])


def _engine(stage: int, weight_decay: float):
    import deepspeed

    from raylm.config import load_config
    from raylm.train.deepspeed import deepspeed_config

    cfg = load_config(None, [f"deepspeed.zero_stage={stage}", "train.num_workers=1", "train.micro_batch_size=2",
                             "train.grad_accum_steps=1", f"train.weight_decay={weight_decay}"])
    torch.manual_seed(0)
    model = llama()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=optimizer_groups(model, weight_decay),
                                           config=deepspeed_config(cfg))
    return engine, cfg


@pytest.mark.parametrize("stage", [2, 3])
def test_a_resumed_run_takes_weight_decay_from_its_config_and_the_state_from_the_checkpoint(stage, single_rank,
                                                                                            tmp_path):
    from raylm.train.deepspeed import group_hyperparameters, restore_group_hyperparameters

    first, _ = _engine(stage, 0.1)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        first.backward(first(input_ids=ids, labels=ids).loss)
        first.step()
    first.save_checkpoint(str(tmp_path), tag="t")
    decays = lambda engine: [g["weight_decay"] for g in engine.optimizer.param_groups]  # noqa: E731

    as_saved, _ = _engine(stage, 0.3)
    as_saved.load_checkpoint(str(tmp_path), tag="t")
    assert decays(as_saved) == [0.1, 0.0]  # DeepSpeed's load alone: the saved run's weight decay

    resumed, _ = _engine(stage, 0.3)
    built = group_hyperparameters(resumed)
    resumed.load_checkpoint(str(tmp_path), tag="t")
    restore_group_hyperparameters(resumed, built)  # as raylm's resume does (train/loop.py _resume)
    assert decays(resumed) == [0.3, 0.0]  # the config's, and norms and embeddings still undecayed
    assert resumed.global_steps == first.global_steps == 2
    # the Adam moments are the checkpoint's: the next step is the first run's next step
    first.backward(first(input_ids=ids, labels=ids).loss)
    resumed.backward(resumed(input_ids=ids, labels=ids).loss)
    for engine in (first, resumed):
        for group in engine.optimizer.param_groups:
            group["weight_decay"] = 0.0  # the same update on both sides: only the state differs
        engine.step()
    after = [torch.cat([p.ds_tensor.flatten() if stage == 3 else p.detach().flatten()
                        for p in e.module.parameters()]) for e in (first, resumed)]
    torch.testing.assert_close(after[0], after[1])
