"""DPO without Ray: preference records -> pair rows, the loss and reward metrics, and parity with TRL.

The parity test runs TRL's own DPOTrainer._compute_loss (TRL computes the sequence log-probs itself,
through its fused LM head) on a real tiny Llama and compares raylm's loss and reward metrics on the
same inputs: full fine-tuning (a separate reference model) and LoRA (adapters disabled), sigmoid
and ipo.
"""

import contextlib
import math
import types
from collections import defaultdict

import numpy as np
import pytest
import torch

from raylm.config import ConfigError, PreferenceConfig, load_config
from raylm.data import IGNORE, encode_pair, load_tokenizer, pair_rows, preference_messages, train_tokenizer
from raylm.train.batches import concat_pairs
from raylm.train.objectives.dpo import dpo_losses, forward_logps, reward_metrics, reward_sums, sequence_logps

PREF = PreferenceConfig()
CHAT = {"prompt": [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "What is 2+3?"}],
        "chosen": [{"role": "assistant", "content": "5"}], "rejected": [{"role": "assistant", "content": "6"}]}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = ["system: You add numbers.\nuser: What is 2+3?\nassistant: 5\n"] * 50
    return load_tokenizer(train_tokenizer(texts, 300, str(tmp_path_factory.mktemp("tok") / "tok")))


def test_chat_and_plain_records_give_the_same_pair():
    chat, reason = preference_messages(CHAT, PREF)
    assert reason is None
    plain, _ = preference_messages({"prompt": "What is 2+3?", "chosen": "5", "rejected": "6"},
                                   PreferenceConfig(system_prompt="You add numbers."))
    assert chat == plain == (CHAT["prompt"], CHAT["chosen"], CHAT["rejected"])


@pytest.mark.parametrize("record,reason", [
    ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "q", "rejected": "a"}, "missing field 'chosen'"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen identical to rejected"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}, "field 'chosen' not an assistant answer"),
    ([1, 2], "not a JSON object"),
])
def test_bad_records_say_why(record, reason):
    assert preference_messages(record, PREF) == (None, reason)


def test_only_answer_tokens_are_labelled_and_truncation_counts(tok):
    pair, reason, cut = encode_pair(tok, *preference_messages(CHAT, PREF)[0], seq_len=64)
    assert reason is None and not cut
    (ci, cl), (ri, rl) = pair
    assert tok.decode(cl[cl != IGNORE]) == " 5<|endoftext|>" and tok.decode(rl[rl != IGNORE]) == " 6<|endoftext|>"
    n_prompt = len(ci) - 2
    assert np.array_equal(ci[:n_prompt], ri[:n_prompt])  # the same prompt before both answers
    rows = pair_rows([pair], 64, tok.pad_token_id)
    assert rows["chosen_tokens"][0] == len(ci) and (rows["chosen_labels"][0, len(ci):] == IGNORE).all()
    # the answer is the last thing rendered: a seq_len that ends inside the prompt leaves no answer token
    assert encode_pair(tok, *preference_messages(CHAT, PREF)[0], seq_len=n_prompt - 2) == (
        None, f"no answer token within seq_len={n_prompt - 2}", False)


def test_multi_turn_prompt_trains_only_the_final_answer(tok):
    prompt = CHAT["prompt"] + [{"role": "assistant", "content": "5"}, {"role": "user", "content": "And 2+2?"}]
    (c, r), _, _ = encode_pair(tok, prompt, [{"role": "assistant", "content": "4"}],
                               [{"role": "assistant", "content": "3"}], 128)
    assert tok.decode(c[1][c[1] != IGNORE]) == " 4<|endoftext|>"


def test_dpo_rejects_non_preference_data_before_ray():
    with pytest.raises(ConfigError, match="train.objective"):
        load_config(None, ["train.objective=dpo"])
    with pytest.raises(ConfigError, match="train.objective"):
        load_config(None, ["data.format=preference"])
    cfg = load_config(None, ["train.objective=dpo", "data.format=preference", "train.dpo.loss_type=ipo"])
    assert cfg.train.dpo.beta == 0.1 and cfg.train.dpo.loss_type == "ipo"


def test_policy_equal_to_reference_gives_log2_and_zero_rewards():
    logps = torch.tensor([-3.0, -7.5, -1.25])
    losses, chosen, rejected = dpo_losses(logps, logps - 1, logps, logps - 1, beta=0.1, loss_type="sigmoid")
    assert torch.allclose(losses, torch.full_like(losses, math.log(2))) and not chosen.any() and not rejected.any()
    m = reward_metrics(reward_sums(losses, chosen, rejected))
    assert m["rewards/accuracy"] == 0.0 and m["loss"] == pytest.approx(math.log(2))


def test_pair_sums_add_up_across_micro_batches():
    """Means from summed parts equal the mean over all pairs, however the pairs are cut."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(8, generator=g) * 3 for _ in range(4))
    whole = reward_sums(*dpo_losses(pc, pr, rc, rr, 0.5, "sigmoid"))
    parts = [reward_sums(*dpo_losses(pc[i:i + 2], pr[i:i + 2], rc[i:i + 2], rr[i:i + 2], 0.5, "sigmoid"))
             for i in range(0, 8, 2)]
    summed = [sum(p[k] for p in parts) for k in range(6)]
    assert reward_metrics(summed) == pytest.approx(reward_metrics(whole), abs=1e-6)


def test_sequence_logps_match_a_log_softmax_gather():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 5, 11, generator=g)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[:, :2] = IGNORE
    logps, counts = sequence_logps(logits, labels)
    ref = logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(logps, (ref * (labels != IGNORE)).sum(1), atol=1e-5) and counts.tolist() == [3, 3, 3]


# ------------------------------------------------------------------ parity with TRL


def tiny_llama(seed: int, vocab: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.5, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def random_pairs(n: int, seed: int, vocab: int = 64, length: int = 20):
    """Full sequences (prompt + answer, right-padded) and completion masks, TRL's layout [chosen; rejected]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(2 * n, length, dtype=torch.long)
    attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for i in range(n):
        p = int(torch.randint(3, 8, (1,), generator=g))
        prompt = torch.randint(1, vocab, (p,), generator=g)
        for row in (i, n + i):
            a = int(torch.randint(1, length - p + 1, (1,), generator=g))
            ids[row, :p], ids[row, p:p + a] = prompt, torch.randint(1, vocab, (a,), generator=g)
            attention[row, :p + a], completion[row, p:p + a] = 1, 1
    return ids, attention, completion


def trl_trainer(model, ref_model, beta: float, loss_type: str):
    """A DPOTrainer made with object.__new__ holding only what _compute_loss reads: no Trainer set-up,
    so the test runs in a second; the formula stays TRL's."""
    from accelerate import Accelerator
    from peft import PeftModel
    from trl import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
    add_fused_lm_head(model.get_base_model() if isinstance(model, PeftModel) else model, outputs=outputs)
    if ref_model is not None:
        add_fused_lm_head(ref_model)
    t = object.__new__(DPOTrainer)
    t.__dict__.update(model=model, ref_model=ref_model, accelerator=Accelerator(cpu=True), beta=beta,
                      precompute_ref_logps=False, loss_types=[loss_type], loss_weights=[1.0], ld_alpha=None,
                      f_divergence_type="reverse_kl", label_smoothing=0.0, use_weighting=False,
                      aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                      _total_train_tokens=0, _tp_size=1, args=types.SimpleNamespace(gradient_checkpointing_kwargs=None))
    return t


def raylm_side(policy, reference, ids, completion, beta, loss_type):
    """raylm's path: the rows its data stage writes (inputs, shifted labels) through concat_pairs."""
    n = ids.size(0) // 2
    labels = torch.where(completion[:, 1:].bool(), ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE))
    tokens = completion.sum(1) + (completion.cumsum(1) == 0).sum(1)  # prompt + answer length
    batch = concat_pairs({"chosen_input_ids": ids[:n, :-1], "rejected_input_ids": ids[n:, :-1],
                          "chosen_labels": labels[:n], "rejected_labels": labels[n:],
                          "chosen_tokens": tokens[:n], "rejected_tokens": tokens[n:]})
    with torch.no_grad():
        with reference() as ref_model:
            ref = forward_logps(ref_model, batch)[0]
        logps, counts = forward_logps(policy, batch)
    (pc, pr), (rc, rr), (nc, nr) = logps.chunk(2), ref.chunk(2), counts.chunk(2)
    return reward_metrics(reward_sums(*dpo_losses(pc, pr, rc, rr, beta, loss_type, nc, nr)))


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
@pytest.mark.parametrize("lora", [False, True])
def test_loss_and_rewards_equal_trl(loss_type, lora):
    pytest.importorskip("trl")
    import peft

    beta = 0.3
    ids, attention, completion = random_pairs(6, seed=2)
    if lora:
        policy = peft.get_peft_model(tiny_llama(0), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                     init_lora_weights=False))
        ref_model = None

        @contextlib.contextmanager
        def reference():  # as raylm.train.objectives.dpo.DPO does under LoRA: the policy, adapters off
            with policy.disable_adapter():
                yield policy
    else:
        policy, ref_model = tiny_llama(0), tiny_llama(1)
        reference = lambda: contextlib.nullcontext(ref_model)  # noqa: E731
    ours = raylm_side(policy, reference, ids, completion, beta, loss_type)
    trainer = trl_trainer(policy, ref_model, beta, loss_type)
    with torch.no_grad():
        loss = trainer._compute_loss(policy, {"input_ids": ids, "attention_mask": attention,
                                               "completion_mask": completion}, return_outputs=False)
    theirs = {k: v[-1] for k, v in trainer._metrics["train" if policy.training else "eval"].items()}
    assert ours["rewards/margins"] != 0  # the policy and its reference differ: the comparison means something
    assert float(loss) == pytest.approx(ours["loss"], abs=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert theirs[key] == pytest.approx(ours[key], abs=1e-5), key
    assert theirs["rewards/accuracies"] == pytest.approx(ours["rewards/accuracy"], abs=1e-6)


@pytest.mark.parametrize("disable", [True, False])
def test_dropout_off_makes_a_gpt2_lora_policy_its_own_reference(disable):
    """train.dpo.disable_dropout (the default): prepare_model turns every dropout layer off, so a
    GPT-2 (dropout 0.1) in train mode under fresh LoRA adapters gives log 2 and zero rewards against
    itself with the adapters disabled; with dropout on it does not (the test can fail)."""
    import peft

    from raylm.model import build_model
    from raylm.train.objectives import prepare_model

    cfg = load_config(None, ["train.objective=dpo", "data.format=preference", "model.name=tiny-gpt2",
                             f"train.dpo.disable_dropout={str(disable).lower()}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 300, 48)
    assert model.config.resid_pdrop == 0.1
    model = prepare_model(cfg, peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_attn"],
                                                                          lora_dropout=0.1))).train()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 300, (4, 20), generator=g)
    labels = torch.where(torch.arange(20) < 8, IGNORE, torch.randint(0, 300, (4, 20), generator=g))
    batch = {"input_ids": ids, "labels": labels}
    with model.disable_adapter():
        ref = forward_logps(model, batch)[0]
    logps = forward_logps(model, batch)[0]
    losses, chosen, rejected = dpo_losses(*logps.chunk(2), *ref.chunk(2), beta=0.1, loss_type="sigmoid")
    zero = bool(not chosen.any() and not rejected.any())
    assert (float(losses.detach().mean()) == pytest.approx(math.log(2), abs=1e-6) and zero) is disable


def test_a_dpo_run_summary_shows_rewards_not_perplexity():
    from raylm.train.driver import TrainOutcome

    m = {"step": 60, "val_loss": 0.61, "val_rewards/accuracy": 0.85, "val_rewards/margins": 0.42, "perplexity": 1.8}
    line = TrainOutcome("run", "ckpt", "hf", m, objective="dpo").summary().splitlines()[0]
    assert line == "trained: step 60, val_loss 0.6100, reward accuracy 0.850, margins 0.420"
    assert "perplexity 1.80" in TrainOutcome("run", "ckpt", "hf", m).summary()
