"""GRPO's config and prompt data without Ray: train.grpo.* named as TRL's GRPOConfig, validation
naming the field, and prompt records -> prompt rows (bad records counted by reason)."""

import json

import numpy as np
import pytest

from raylm.config import ConfigError, PromptConfig, load_config
from raylm.data import load_tokenizer, prompt_batch, prompt_messages, render_prompts, tokenizer_files, train_tokenizer
from raylm.data.prepare import _tokenizer_kwargs

GRPO = ["train.objective=grpo", "data.format=prompt", "train.grpo.reward_funcs=[raylm.rewards:exact_match]"]


def test_grpo_names_and_defaults_are_trls():
    from trl import GRPOConfig as TRLConfig

    cfg = load_config(None, GRPO).train.grpo
    trl = TRLConfig(output_dir="/tmp/unused", report_to=[], use_cpu=True)
    for name in ("num_generations", "temperature", "top_p", "beta", "epsilon", "epsilon_high", "loss_type",
                 "scale_rewards", "num_iterations", "mask_truncated_completions", "reward_weights",
                 "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
                 "vllm_importance_sampling_clip_max", "vllm_importance_sampling_clip_min",
                 "vllm_importance_sampling_cap"):
        assert getattr(cfg, name) == getattr(trl, name), name
    assert cfg.max_completion_length == 64 and cfg.rollout_engines == 1 and cfg.max_staleness == 0


@pytest.mark.parametrize("overrides,field", [
    (["train.objective=grpo"], "train.objective"),
    (["data.format=prompt"], "train.objective"),
    (["train.objective=grpo", "data.format=prompt"], "train.grpo.reward_funcs"),
    (GRPO + ["train.grpo.num_generations=1"], "num_generations"),
    (GRPO + ["train.grpo.loss_type=bnpo"], "loss_type"),
    (GRPO + ["train.grpo.scale_rewards=std"], "scale_rewards"),
    (GRPO + ["train.grpo.reward_weights=[1.0, 2.0]"], "reward_weights"),
    (GRPO + ["train.grpo.reward_funcs=[not a name]"], "reward_funcs"),
    (GRPO + ["train.grpo.top_p=1.5"], "top_p"),
    (GRPO + ["train.grpo.vllm_importance_sampling_clip_min=4"], "vllm_importance_sampling_clip_min"),
    (GRPO + ["train.grpo.vllm_importance_sampling_mode=token_truncate",
             "train.grpo.vllm_importance_sampling_clip_max=null"], "vllm_importance_sampling_clip_max"),
    (GRPO + ["train.grpo.typo=1"], "typo"),
])
def test_bad_grpo_settings_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config(None, overrides)


def test_trl_spellings_carry_over():
    cfg = load_config(None, GRPO + ["train.grpo.scale_rewards=false", "train.grpo.vllm_importance_sampling_cap=2.0",
                                    "train.grpo.epsilon_high=0.28"]).train.grpo
    assert cfg.scale_rewards == "none" and cfg.vllm_importance_sampling_clip_max == 2.0 and cfg.upper_epsilon == 0.28
    assert load_config(None, GRPO).train.grpo.weights == [1.0]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = ["system: You add numbers.\nuser: What is 2+3?\nassistant: 5\n"] * 50
    return train_tokenizer(texts, 300, str(tmp_path_factory.mktemp("tok") / "tok"))


@pytest.mark.parametrize("record,reason", [
    ({"answer": "5"}, "missing field 'prompt'"),
    ({"prompt": 3}, "field 'prompt' not text or messages"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
     "field 'prompt' ends with an assistant turn"),
    ([1], "not a JSON object"),
])
def test_bad_prompt_records_say_why(record, reason):
    assert prompt_messages(record, PromptConfig()) == (None, reason)


def test_prompt_rows_open_the_assistant_turn_and_keep_the_reward_columns(tok):
    chat = {"prompt": [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "What is 2+3?"}],
            "answer": "5"}
    plain = {"prompt": "What is 2+3?", "answer": "5", "level": 1}
    lines = [json.dumps(chat), json.dumps(plain), "not json", json.dumps({"answer": "1"}),
             json.dumps({"prompt": "What is 2+3? " * 40})]
    cfg = PromptConfig(system_prompt="You add numbers.")
    out = render_prompts({"record": np.array(lines, dtype=object)}, cfg.model_dump_json(), 32,
                         **_tokenizer_kwargs(tok))
    real = out["prompt_tokens"] > 0
    counts = json.loads(out["counts"][-1])
    assert real.sum() == 2 and counts["examples"] == 2
    assert counts["skip:not JSON"] == 1 and counts["skip:missing field 'prompt'"] == 1
    assert counts["skip:prompt longer than seq_len=32"] == 1
    hf = load_tokenizer(tok)
    ids, prompts, cols = prompt_batch({k: v[real] for k, v in out.items()}, cfg)
    assert ids[0] == ids[1]  # a string prompt after system_prompt renders as the chat form does
    assert hf.decode(ids[0]) == "system: You add numbers.\nuser: What is 2+3?\nassistant:"
    assert prompts == [chat["prompt"], "What is 2+3?"]
    assert cols == {"answer": ["5", "5"], "level": [None, 1]}


def test_raylm_train_refuses_what_the_grpo_loop_does_not_run():
    from raylm.train.driver import check_objective_runs

    with pytest.raises(ConfigError, match="train.grpo.num_iterations: 2"):
        check_objective_runs(load_config(None, GRPO + ["train.grpo.num_iterations=2"]))
    check_objective_runs(load_config(None, GRPO))
    check_objective_runs(load_config(None, []))


def test_rollout_engines_take_the_serving_settings_in_the_trainers_precision():
    from raylm.serve.options import engine_kwargs
    from raylm.train.rollouts import rollout_engine_kwargs

    cfg = load_config(None, GRPO + ["serve.max_num_seqs=48", "serve.enable_prefix_caching=true", "data.seq_len=40",
                                    "train.grpo.max_completion_length=24", "serve.lora_adapters={a: /x}"])
    kw = rollout_engine_kwargs(cfg)
    served = engine_kwargs(cfg.serve)
    assert kw["max_num_seqs"] == served["max_num_seqs"] == 48 and kw["enable_prefix_caching"]
    assert kw["kv_cache_memory_bytes"] == served["kv_cache_memory_bytes"]
    assert kw["dtype"] == "float32" and served["dtype"] == "bfloat16"  # CPU trains in fp32: the engine too
    assert kw["max_model_len"] == 64 and kw["logprobs_mode"] == "processed_logprobs"
    assert "enable_lora" not in kw and kw["distributed_executor_backend"] == "uni"
