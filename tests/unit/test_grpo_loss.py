"""GRPO's loss against TRL 1.16's own GRPOTrainer._compute_loss, without Ray.

On a fixed batch (left-padded prompts, completions with and without EOS, grouped rewards, old and
engine log-probs), raylm.train.grpo's loss AND its gradient equal TRL's within 1e-5: loss types
grpo, dr_grpo and dapo, full fine-tuning and LoRA, with and without beta, with the engine's
importance-sampling correction. TRL computes its log-probs itself, through its fused LM head at the
sampling temperature; raylm through a plain forward and its own log-softmax. The advantage, the
importance ratio and the truncation mask are checked against TRL's formulas on known values.
"""

import types
from collections import defaultdict

import pytest
import torch

from raylm.config import GRPOConfig
from raylm.train.grpo import (completion_logps, group_advantages, grpo_loss, importance_ratio, loss_metrics,
                              pad_completions, pad_prompts)

VOCAB, EOS, PAD, G = 64, 2, 0, 4
TEMPERATURE = 0.7


def tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.5, tie_word_embeddings=True, pad_token_id=PAD)
    return LlamaForCausalLM(cfg).eval()


def fixed_batch(prompts: int = 3, seed: int = 0):
    """prompts x G completions, some ending in EOS, some cut at max length; rewards with a None."""
    g = torch.Generator().manual_seed(seed)
    prompt_rows, completions = [], []
    for _ in range(prompts):
        p = torch.randint(3, VOCAB, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        for _ in range(G):
            n = int(torch.randint(1, 8, (1,), generator=g))
            c = torch.randint(3, VOCAB, (n,), generator=g).tolist()
            if torch.rand(1, generator=g) < 0.6:
                c[-1] = EOS
            prompt_rows.append(p)
            completions.append(c)
    rewards = torch.rand(prompts * G, generator=g).round(decimals=1)
    rewards[1] = float("nan")
    return prompt_rows, completions, rewards


def trl_trainer(model, g: GRPOConfig, grad_accum: int, use_is: bool):
    """A GRPOTrainer made with object.__new__ holding only what _compute_loss reads: no Trainer set-up,
    so the test runs in seconds; the formula is TRL's."""
    from accelerate import Accelerator
    from peft import PeftModel
    from trl import GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model.get_base_model() if isinstance(model, PeftModel) else model, temperature=TEMPERATURE,
                      outputs=("log_probs", "entropy"))
    t = object.__new__(GRPOTrainer)
    t.__dict__.update(
        model=model, accelerator=Accelerator(cpu=True), aux_loss_enabled=False, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level="token", beta=g.beta, loss_type=g.loss_type,
        epsilon_low=g.epsilon, epsilon_high=g.upper_epsilon, use_vllm=use_is, vllm_importance_sampling_correction=use_is,
        current_gradient_accumulation_steps=grad_accum, max_completion_length=g.max_completion_length,
        _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        args=types.SimpleNamespace(use_bias_correction_kl=True, delta=None, steps_per_generation=grad_accum,
                                   gradient_checkpointing_kwargs=None))
    return t


def grads(model):
    return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_loss_and_gradient_equal_trl(loss_type, lora, beta):
    pytest.importorskip("trl")
    import peft

    g = GRPOConfig(loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=0.28, max_completion_length=8,
                   num_generations=G, reward_funcs=["raylm.rewards:length"],
                   mask_truncated_completions=loss_type == "dapo")
    use_is = beta == 0.0  # the engine correction on in half the cases
    prompt_rows, completions, rewards = fixed_batch()
    prompt_ids, prompt_mask = pad_prompts(prompt_rows, PAD)
    completion_ids, completion_mask, truncated = pad_completions(completions, [EOS], PAD,
                                                                 g.mask_truncated_completions)
    advantages, _ = group_advantages(rewards, G, g.scale_rewards)
    if lora:
        model = peft.get_peft_model(tiny_llama(0), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                    init_lora_weights=False))
    else:
        model = tiny_llama(0)
    ref = tiny_llama(0)  # the starting model, a few updates back
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    with torch.no_grad():
        now = completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, TEMPERATURE)
        if lora:
            with model.disable_adapter():
                ref_logps = completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                                             TEMPERATURE)
        else:
            ref_logps = completion_logps(ref, prompt_ids, prompt_mask, completion_ids, completion_mask, TEMPERATURE)
    noise = torch.Generator().manual_seed(3)
    old = now + 0.3 * torch.randn(now.shape, generator=noise)  # a policy some updates back: ratios get clipped
    engine = old + 0.2 * torch.randn(now.shape, generator=noise)
    is_ratio = importance_ratio(old, engine, completion_mask, "token_truncate", None, 2.0) if use_is else None
    num_items = completion_mask.sum()
    grad_accum = 2

    inputs = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old,
              "num_items_in_batch": num_items}
    if beta:
        inputs["ref_per_token_logps"] = ref_logps
    if use_is:
        inputs["importance_sampling_ratio"] = is_ratio
    model.train()  # TRL divides for gradient accumulation in training mode only (no dropout in this model)
    trainer = trl_trainer(model, g, grad_accum, use_is)
    model.zero_grad()
    theirs = trainer._compute_loss(model, inputs)
    theirs.backward()
    theirs = theirs.detach()
    their_grads = grads(model)

    model.zero_grad()
    logps = completion_logps(model, prompt_ids, prompt_mask, completion_ids, completion_mask, TEMPERATURE)
    ours, stats = grpo_loss(logps, old, ref_logps if beta else None, advantages, completion_mask, g,
                            is_ratio=is_ratio, num_items=num_items, grad_accum=grad_accum)
    ours.backward()
    our_grads = grads(model)

    assert truncated.any() and (~truncated).any() and abs(float(theirs)) > 1e-4
    assert float(ours) == pytest.approx(float(theirs), abs=1e-5)
    assert len(our_grads) == len(their_grads) > 0
    assert max(float((a - b).abs().max()) for a, b in zip(our_grads, their_grads)) < 1e-5
    assert max(float(b.abs().max()) for b in their_grads) > 1e-4  # a gradient that means something
    metrics = loss_metrics(stats.as_list(), beta)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    assert metrics["clip_ratio"] == pytest.approx(logged["clip_ratio/region_mean"], abs=1e-6)
    assert metrics["clip_ratio"] > 0
    if beta:
        assert metrics["kl"] == pytest.approx(logged["kl"], rel=1e-5) and metrics["kl"] > 1e-3


def test_advantages_as_trl_groups_them():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    adv, std = group_advantages(r, 4, "group")
    s = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # Bessel-corrected, as TRL's nanstd
    assert torch.allclose(adv[:4], (r[:4] - 0.5) / (s + 1e-4)) and torch.equal(adv[4:], torch.zeros(4))
    assert torch.allclose(group_advantages(r, 4, "none")[0][:4], r[:4] - 0.5)
    assert torch.allclose(group_advantages(r, 4, "batch")[0], (r - r.view(2, 4).mean(1).repeat_interleave(4))
                          / (r.std() + 1e-4))
    nan = torch.tensor([1.0, float("nan"), 0.0, 0.0])  # unscored: out of the baseline, advantage 0
    adv, _ = group_advantages(nan, 4, "none")
    assert adv[1] == 0 and torch.allclose(adv[[0, 2, 3]], torch.tensor([2 / 3, -1 / 3, -1 / 3]))


def test_importance_ratio_truncates_or_masks():
    trainer = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    engine = torch.tensor([[-2.0, 0.0, 5.0], [0.5, float("nan"), 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    tok = importance_ratio(trainer, engine, mask, "token_truncate", None, 3.0)
    assert torch.allclose(tok, torch.tensor([[3.0, 1.0, 1.0], [torch.exp(torch.tensor(-0.5)), 1.0, 1.0]]))
    seq = importance_ratio(trainer, engine, mask, "sequence_mask", None, 3.0)
    assert seq.shape == (2, 1) and seq[0, 0] == 0.0 and torch.isclose(seq[1, 0], torch.exp(torch.tensor(-0.5)))


def test_truncated_completions_masked_on_request():
    ids, mask, cut = pad_completions([[5, 2, 7], [5, 6]], [2], 0, mask_truncated=False)
    assert mask.tolist() == [[1, 1, 0], [1, 1, 0]] and cut.tolist() == [False, True]
    assert pad_completions([[5, 2, 7], [5, 6]], [2], 0, mask_truncated=True)[1].tolist() == [[1, 1, 0], [0, 0, 0]]
