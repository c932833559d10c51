"""The GRPO objective (train/objectives/grpo.py) without Ray: rollouts scored into micro-batches,
and its summed loss, weighed as train.step weighs it, equal to raylm.train.grpo.grpo_loss (the
function held to TRL) on the same completions laid out as TRL lays them out (left-padded prompts
with an attention mask; here [prompt; completion] right-padded, no mask). The rollouts are given
(the real engines are tests/integration/test_grpo_rollouts.py)."""

import math

import pytest
import torch

from raylm.config import load_config
from raylm.data import load_tokenizer, train_tokenizer
from raylm.train.grpo import completion_logps, grpo_loss, importance_ratio, pad_completions, pad_prompts
from raylm.train.objectives.grpo import GRPO, rollout_seed
from raylm.train.rollouts import Rollout, RolloutBatch


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory):
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg') / 'store'}",
                                rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = ["system: You add numbers.\nuser: What is 2+3?\nassistant: 5\n", "1 2 3 4 5 6 7 8 9 10 11 12"] * 50
    return load_tokenizer(train_tokenizer(texts, 300, str(tmp_path_factory.mktemp("tok") / "tok")))


class GivenRollouts:
    """Stands in for RolloutPool.generate: fixed completions with fixed engine log-probs."""

    def __init__(self, rollouts):
        self.rollouts, self.calls = rollouts, []

    def generate(self, prompt_ids, seeds, greedy=False):
        self.calls.append((prompt_ids, seeds))
        return RolloutBatch(rollouts=self.rollouts[:len(prompt_ids)])


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_summed_loss_weighed_by_count_is_the_trl_loss(loss_type, tok, single_rank):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = load_config(None, ["train.objective=grpo", "data.format=prompt", "train.grpo.num_generations=3",
                             "train.grpo.reward_funcs=[raylm.rewards:exact_match, raylm.rewards:length]",
                             "train.grpo.reward_weights=[1.0, -0.1]", f"train.grpo.loss_type={loss_type}",
                             "train.grpo.temperature=0.7", "train.grpo.max_completion_length=6",
                             "train.grpo.vllm_importance_sampling_mode=token_truncate"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
                                         initializer_range=0.3)).train()
    eos = tok.eos_token_id
    five, six = tok(" 5")["input_ids"], tok(" 6")["input_ids"]
    answers = [[five + [eos], six + [eos], five + [7, 8, 9, 10, 11, 12][:6 - len(five)]],
               [six + [eos], six + [eos], five + [eos]]]
    g = torch.Generator().manual_seed(1)
    rollouts = [Rollout(a, [(-torch.rand(len(c), generator=g)).tolist() for c in a], [c[-1] == eos for c in a])
                for a in answers]
    pool = GivenRollouts(rollouts)
    obj = GRPO(cfg, model, tok, torch.device("cpu"), pool=pool)
    prompts = ["What is 2+3?", [{"role": "user", "content": "What is 3+3?"}]]
    from raylm.data.prompts import encode_prompt, prompt_messages

    ids = [encode_prompt(tok, prompt_messages({"prompt": p}, cfg.data.prompt)[0]).tolist() for p in prompts]
    import json

    import numpy as np

    rows = {"prompt_ids": np.array([i + [0] * (20 - len(i)) for i in ids]), "prompt_tokens": np.array([len(i) for i in ids]),
            "record": np.array([json.dumps({"prompt": prompts[0], "answer": "5"}),
                                json.dumps({"prompt": prompts[1], "answer": "6"})], dtype=object)}
    (batch,) = obj.rollout_micro_batches([rows], step=3)
    assert pool.calls[0][1] == [rollout_seed(0, 3, 0, 0), rollout_seed(0, 3, 0, 1)]
    # exact_match 1/0/1 and 1/1/0, minus 0.1 x tokens; the third of prompt one cut at 6 tokens (no EOS)
    assert batch["completion_mask"].sum(1).tolist() == [len(c) for a in answers for c in a]
    count = obj.count(batch)
    model.zero_grad()
    ours = obj.summed_loss(batch) / count  # what train.step's scale (world / global count) makes of it
    ours.backward()
    our_grads = [p.grad.clone() for p in model.parameters()]

    # the same completions as TRL lays them out, through the TRL-held function
    flat = [c for a in answers for c in a]
    p_ids, p_mask = pad_prompts([ids[0]] * 3 + [ids[1]] * 3, tok.pad_token_id)
    c_ids, c_mask, _ = pad_completions(flat, [eos], tok.pad_token_id, False)
    logps = completion_logps(model, p_ids, p_mask, c_ids, c_mask, 0.7)
    is_ratio = importance_ratio(logps.detach(), batch["sampling_logps"], c_mask, "token_truncate", None, 3.0)
    theirs, _ = grpo_loss(logps, None, None, batch["advantages"], c_mask, cfg.train.grpo, is_ratio=is_ratio,
                          num_items=c_mask.sum())
    model.zero_grad()
    theirs.backward()  # on-policy the loss is ~0 (advantages sum to 0 per group); the gradient is not
    assert float(ours) == pytest.approx(float(theirs), abs=1e-6)
    largest = max(float(p.grad.abs().max()) for p in model.parameters())
    diff = max(float((a - p.grad).abs().max()) for a, p in zip(our_grads, model.parameters()))
    assert largest > 1e-5 and diff < 1e-3 * largest, (largest, diff)

    metrics = obj.train_metrics()
    totals = [[1.0 - 0.1 * len(c) for c in a] for a in answers]
    totals[0][1] = 0.0 - 0.1 * len(answers[0][1])
    totals[1][2] = 0.0 - 0.1 * len(answers[1][2])
    flat_totals = [x for t in totals for x in t]
    assert metrics["rewards/mean"] == pytest.approx(sum(flat_totals) / 6, abs=1e-5)
    assert metrics["rewards/exact_match/mean"] == pytest.approx(4 / 6)
    assert metrics["rewards/exact_match/std"] == pytest.approx(float(torch.tensor([1., 0, 1, 1, 1, 0]).std()), abs=1e-6)
    assert metrics["completion_length"] == pytest.approx(sum(len(c) for c in flat) / 6)
    assert 0 <= metrics["clip_ratio"] <= 1 and not math.isnan(metrics["rewards/length/mean"])


class Draws:
    """A TrainStream stand-in: step draws that move its data position (epoch, rows)."""

    def __init__(self):
        self.epoch, self.rows = 0, 0

    def __iter__(self):
        while True:
            self.rows += 1
            yield [{"step_rows": self.rows}]


class Echo:
    """The objective and pool sides the loop drives, recording what was submitted when."""

    def __init__(self):
        self.submitted = []

    def step_prompts(self, micro_rows, step, rank):
        from raylm.train.objectives.grpo import StepPrompts

        return StepPrompts(micro_rows, ids=[[1]], seeds=[step])

    def submit(self, ids, seeds, greedy=False):
        self.submitted.append(seeds[0])
        return seeds[0]

    def collect(self, pending):
        return pending

    def scored_micro_batches(self, prompts, batch, staleness=0):
        return {"step": batch, "staleness": staleness}


@pytest.mark.parametrize("k", [0, 1, 2])
def test_rollouts_run_ahead_by_max_staleness_and_the_position_is_the_trained_steps(k):
    from raylm.train.grpo_loop import RolloutLoop

    loop = RolloutLoop.__new__(RolloutLoop)
    echo = Echo()
    loop.cfg = load_config(None, ["train.objective=grpo", "data.format=prompt", f"train.grpo.max_staleness={k}",
                                  "train.grpo.reward_funcs=[raylm.rewards:length]"])
    loop.objective = loop.pool = echo
    loop.rank, loop.version, loop.start_step, loop.position = 0, 5, 5, (0, 0)  # resumed at step 5
    steps = loop.steps(Draws())
    for step in range(6, 12):
        got = next(steps)
        assert got["step"] == step and loop.position == (0, step - 5)  # the checkpoint records the trained step's
        assert echo.submitted == list(range(6, step + k + 1))  # generation runs k steps ahead
        # rollouts of the first steps after a resume come from its weights; later ones are k steps old
        assert got["staleness"] == min(k, step - 6)
        loop.version = step  # the optimizer step was taken and synced
