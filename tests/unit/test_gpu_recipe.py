"""The GPU GRPO recipe (bench/gpu/grpo_gsm8k_qwen05.yaml: Qwen2.5-0.5B-Instruct on GSM8K, LoRA)
without Ray, a GPU or the Hub: it validates with raylm's config loader, its reward function
imports, its rollout engine gets the prompt + completion room, and prepare_gsm8k.py's records are
what the data stage and raylm.rewards:gsm8k read."""

import importlib.util
from pathlib import Path

from raylm.config import PromptConfig, load_config
from raylm.data.prompts import prompt_messages, reward_columns
from raylm.rewards import gsm8k, load_rewards, reward_modules
from raylm.train.rollouts import rollout_engine_kwargs

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "bench" / "gpu" / "grpo_gsm8k_qwen05.yaml"
GSM8K_ROW = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
                         "in May. How many clips did Natalia sell altogether in April and May?",
             "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                       "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"}


def _prepare():
    spec = importlib.util.spec_from_file_location("prepare_gsm8k", ROOT / "bench" / "gpu" / "prepare_gsm8k.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_recipe_validates_with_the_config_loader():
    cfg = load_config(str(RECIPE))
    assert cfg.model.name == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.train.objective == "grpo"
    assert cfg.train.use_gpu and cfg.serve.use_gpu and cfg.precision == "bf16"
    assert cfg.train.lora is not None and cfg.train.lora.r == 32
    g = cfg.train.grpo
    assert g.reward_funcs == ["raylm.rewards:gsm8k"] and g.num_generations == 5 and g.max_completion_length == 1024
    assert cfg.data.format == "prompt" and cfg.data.seq_len == 512
    assert cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.train.num_workers == 64  # prompts a step
    assert load_rewards(g.reward_funcs) == [gsm8k] and reward_modules(g.reward_funcs) == []  # a built-in: nothing to ship
    kwargs = rollout_engine_kwargs(cfg)
    assert kwargs["max_model_len"] == 512 + 1024 and kwargs["dtype"] == "bfloat16"
    assert "gpu_memory_utilization" in kwargs and kwargs["max_num_seqs"] >= 64 * 5


def test_recipe_is_not_a_cpu_example():
    """configs/*.yaml run on 2 CPU cores in minutes and are run by the tests; this one needs GPUs."""
    assert not (ROOT / "configs" / RECIPE.name).exists()


def test_prepared_records_feed_the_data_stage_and_the_reward():
    prepare = _prepare()
    record = next(prepare.gsm8k_records([GSM8K_ROW]))
    assert record["prompt"] == [{"role": "user", "content": GSM8K_ROW["question"] + " " + prepare.INSTRUCTION}]
    messages, reason = prompt_messages(record, PromptConfig())
    assert reason is None and messages == record["prompt"]
    prompt, columns = reward_columns(record, PromptConfig())
    done = [[{"role": "assistant", "content": c}] for c in
            ("48 / 2 = 24 in May, 48 + 24 = 72 in all.\n#### 72", "She sold 72 clips.", "#### 24")]
    assert gsm8k([prompt] * 3, done, **{k: [v] * 3 for k, v in columns.items()}) == [1.0, 0.0, 0.0]


def test_eval_script_scores_greedy_answers(tmp_path, monkeypatch):
    """eval_gsm8k.py end to end with a stand-in for vllm's LLM (the real engine is the GPU's)."""
    import json
    import sys
    import types

    rows = [{"question": f"What is {a}+{b}?", "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}"}
            for a, b in [(2, 3), (10, 5), (7, 8), (20, 22)]]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _prepare().gsm8k_records(rows)))
    said = {"What is 2+3?": "2 + 3 = 5\n#### 5", "What is 10+5?": "It is 15.", "What is 7+8?": "#### 16",
            "What is 20+22?": "#### 42"}
    seen = {}

    class FakeLLM:
        def __init__(self, model, **kwargs):
            seen["model"], seen["kwargs"] = model, kwargs

        def chat(self, conversations, params, use_tqdm=False):
            seen["params"] = params
            answer = [said[c[-1]["content"].split("?")[0] + "?"] for c in conversations]
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=t)]) for t in answer]

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = FakeLLM, lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake)
    spec = importlib.util.spec_from_file_location("eval_gsm8k", ROOT / "bench" / "gpu" / "eval_gsm8k.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "eval.json"
    result = module.main(["Qwen/Qwen2.5-0.5B-Instruct", "--data", str(data), "--out", str(out)])
    assert seen["model"] == "Qwen/Qwen2.5-0.5B-Instruct" and seen["params"] == {"temperature": 0.0, "max_tokens": 1024}
    assert result["records"] == 4 and result["strict"] == 0.5 and result["flexible"] == 0.75
    assert json.loads(out.read_text())["answers"][1] == {"answer": rows[1]["answer"], "completion": "It is 15.",
                                                         "strict": 0.0}
