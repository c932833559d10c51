"""GRPO on a real local Ray cluster: prompt data through the data stage's cache, and the rollout
engines and weight sync on real vLLM engines (CPU).

Prompt data: records built from the addition corpus (configs/data/arith_chat.jsonl: the prompt
without its answer, the answer as a column) plus bad lines go through prepare_data (Ray Data) into
the cache and back out of a rank's stream as prompt ids, prompts and reward columns; bad records
are counted by reason; a second call reuses the cache. Seconds.

After a sync of perturbed weights (full) or of a LoRA adapter's merged layers, the log-probs the
engine reports for the tokens it sampled equal the trainer's (a transformers forward in fp32 at the
same temperature) within 1e-4; before the sync they do not (the check can fail). One engine, the
tiny serving checkpoint, a few short prompts: about a minute, mostly the engine's start.
"""

import pytest
import torch

from raylm.config import load_config
from raylm.train.grpo import completion_logps, pad_completions, pad_prompts
from raylm.train.rollouts import RolloutPool, trainer_weights

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from raylm.serve.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("grpo") / "ckpt"))


def test_prompt_data_is_cached_streamed_and_counted(ray_cluster, tmp_path):
    import json
    import re
    from pathlib import Path

    from raylm.config import DataConfig
    from raylm.data import CacheStream, prepare_data, prompt_batch

    chats = [json.loads(line) for line in Path("configs/data/arith_chat.jsonl").read_text().splitlines()[:60]]
    lines = [json.dumps({"prompt": c["messages"][:-1], "answer": c["messages"][-1]["content"]}) for c in chats]
    lines += ["{not json", json.dumps({"answer": "3"}), json.dumps({"prompt": "What is 1+2? " * 30, "answer": "3"})]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(source=str(tmp_path / "prompts.jsonl"), format="prompt", vocab_size=300, seq_len=48,
                     val_fraction=0.1, cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(cfg, verbose=False)
    s = prepared.stats
    assert s.documents == 60 and s.skipped_records == 3 and s.train_blocks + s.val_blocks == 60
    for reason in ("1 not JSON", "1 missing field 'prompt'", "1 prompt longer than seq_len=48"):
        assert reason in s.skipped_reasons
    stream = CacheStream(prepared.uri, prepared.manifest, "train", 0, 1)
    seen = 0
    for batch in stream.train_batches(seed=0, epoch=0, batch_size=8, buffer_rows=16):
        ids, prompts, cols = prompt_batch(batch, cfg.prompt)
        for p, answer in zip(prompts, cols["answer"]):
            a, b = map(int, re.findall(r"\d+", p[-1]["content"]))
            assert int(answer) == a + b  # each prompt still carries its own answer column
        assert all(len(i) <= 48 for i in ids)
        seen += len(ids)
    assert seen == stream.epoch_batches(0, 0, 8) * 8 > 0
    assert not prepare_data(cfg, verbose=False).built  # cached like the other kinds


def engine_vs_trainer(pool, model, prompts, temperature, tok):
    """Largest |engine log-prob - trainer log-prob| over every sampled token, and how many tokens."""
    batch = pool.generate(prompts, seeds=list(range(len(prompts))))
    flat = [(p, c, lp) for p, r in zip(prompts, batch.rollouts) for c, lp in zip(r.completion_ids, r.logprobs)]
    prompt_ids, prompt_mask = pad_prompts([p for p, _, _ in flat], tok.pad_token_id)
    ids, mask, _ = pad_completions([c for _, c, _ in flat], [tok.eos_token_id], tok.pad_token_id, False)
    full_mask = torch.zeros_like(mask)
    engine = torch.zeros(mask.shape)
    for i, (_, c, lp) in enumerate(flat):
        full_mask[i, :len(c)] = 1
        engine[i, :len(lp)] = torch.tensor(lp)
    with torch.no_grad():
        ours = completion_logps(model, prompt_ids, prompt_mask, ids, full_mask, temperature)
    return float(((ours - engine).abs() * full_mask).max()), int(full_mask.sum()), batch


def test_engine_logprobs_equal_trainer_after_sync(ray_cluster, tiny_dir):
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    temperature = 0.8
    cfg = load_config(None, ["train.objective=grpo", "data.format=prompt", "data.seq_len=32",
                             "train.grpo.reward_funcs=[raylm.rewards:length]", "train.grpo.num_generations=3",
                             "train.grpo.max_completion_length=8", f"train.grpo.temperature={temperature}",
                             "serve.kv_cache_memory_gib=0.05"])
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    prompts = [tok("the quick brown")["input_ids"], tok("Python is")["input_ids"]]
    pool = RolloutPool(cfg, tiny_dir)
    try:
        # LoRA on the base the engine holds: the adapted layers merged
        torch.manual_seed(0)
        lora = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32),
                                   peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                   init_lora_weights=False)).eval()
        before, _, _ = engine_vs_trainer(pool, lora, prompts, temperature, tok)
        weights = trainer_weights(lora)
        assert not any("lora" in k or "base_layer" in k for k in weights) and "model.norm.weight" in weights
        lora_sync_s = pool.sync(weights)
        after, tokens, batch = engine_vs_trainer(pool, lora, prompts, temperature, tok)
        print(f"LoRA: before sync {before:.3g}, after {after:.2e} over {tokens} tokens, sync_s {lora_sync_s:.3f}, "
              f"{batch.tokens_per_s:.0f} rollout tokens/s")
        assert before > 1e-2 and after < 1e-4

        # full weights, every one perturbed
        full = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            for p in full.parameters():
                p.add_(0.05 * torch.randn_like(p))
        before, _, _ = engine_vs_trainer(pool, full, prompts, temperature, tok)
        sync_s = pool.sync(trainer_weights(full))
        after, tokens, batch = engine_vs_trainer(pool, full, prompts, temperature, tok)
        print(f"full: before sync {before:.3g}, after {after:.2e} over {tokens} tokens, sync_s {sync_s:.3f}")
        assert before > 1e-2 and after < 1e-4
        assert len(batch.rollouts) == 2 and all(len(r.completion_ids) == 3 for r in batch.rollouts)
        again = pool.generate(prompts, seeds=[0, 1])  # same prompts and seeds: the same completions
        assert [r.completion_ids for r in again.rollouts] == [r.completion_ids for r in batch.rollouts]
    finally:
        pool.shutdown()
