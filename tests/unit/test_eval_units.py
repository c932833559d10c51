"""raylm.evaluate without Ray or vLLM: cache rows -> examples, the loss sum, the answer metrics,
the eval-set fingerprint, where eval.json goes, the eval: config and the CLI's early exit."""

import math

import numpy as np
import pytest

from raylm.data import IGNORE, pack_examples, to_example
from raylm.evaluate import (contains, eval_json_path, eval_set_id, exact_match, generation_example,
                            generation_metrics, loss_example, loss_metrics, normalize, packed_examples,
                            raw_loss_example, sequence_nll)


def _example(prompt: list[int], answer: list[int], seq_len: int = 64):
    """(inputs, labels) as the data stage makes them: the answer's tokens are the trained ones."""
    ids = np.array(prompt + answer, dtype=np.int32)
    mask = np.array([False] * len(prompt) + [True] * len(answer))
    example, reason, _ = to_example(ids, mask, seq_len, "truncate")
    assert reason is None
    return example


def test_packed_examples_are_the_examples_the_data_stage_packed():
    examples = [_example([5, 6, 7], [8, 9]), _example([10, 11], [12, 13, 14]), _example([3, 4, 5, 6], [7])]
    row = {k: v[0] for k, v in pack_examples(examples, seq_len=32, pad_id=0, packing=True).items()}
    got = packed_examples(row)
    assert len(got) == 3
    for (gi, gl), (ei, el) in zip(got, examples):
        assert gi.tolist() == ei.tolist() and gl.tolist() == el.tolist()


def test_loss_example_scores_exactly_the_label_tokens():
    inputs, labels = _example([5, 6, 7], [8, 9, 2])
    ids, score = loss_example(inputs, labels)
    assert ids == [5, 6, 7, 8, 9, 2]  # the last label (EOS) is appended: it is trained
    assert sum(score) == int((labels != IGNORE).sum()) == 3
    for j, counted in enumerate(score):  # a scored prompt token is the label training predicts there
        if counted:
            assert ids[j] == labels[j - 1]


def test_loss_example_without_a_trained_last_token_adds_nothing():
    inputs = np.array([1, 2, 3, 4])
    labels = np.array([IGNORE, 3, IGNORE, IGNORE])
    ids, score = loss_example(inputs, labels)
    assert ids == [1, 2, 3, 4] and score == [0, 0, 1, 0]


def test_raw_block_scores_every_token_after_the_first():
    ids, score = raw_loss_example(np.arange(9))
    assert ids == list(range(9)) and score == [0] + [1] * 8


def test_generation_example_is_prompt_then_first_answer():
    # system/user turn, answer [8, 9, EOS=2], a second user turn, a second answer
    ids = np.array([5, 6, 7, 8, 9, 2, 20, 21, 30, 2])
    mask = np.array([0, 0, 0, 1, 1, 1, 0, 0, 1, 1], dtype=bool)
    inputs, labels = ids[:-1], np.where(mask[1:], ids[1:], IGNORE)
    prompt, reference = generation_example(inputs, labels)
    assert prompt == [5, 6, 7] and reference == [8, 9, 2]
    assert generation_example(np.array([1, 2]), np.array([IGNORE, IGNORE])) is None


def test_sequence_nll_sums_the_scored_prompt_logprobs():
    ids, score = [4, 5, 6], [0, 1, 1]
    prompt_logprobs = [None, {5: {"logprob": -1.5}, 9: {"logprob": -0.1}}, {"6": {"logprob": -0.25}}]
    assert sequence_nll(prompt_logprobs, ids, score) == (1.75, 2)
    with pytest.raises(RuntimeError):
        sequence_nll([None, {9: {"logprob": -0.1}}, None], [4, 5, 6], [0, 1, 0])


def test_loss_metrics_are_per_token():
    m = loss_metrics(6.0, 3)
    assert m["val_loss"] == 2.0 and m["perplexity"] == pytest.approx(math.exp(2.0)) and m["val_tokens"] == 3
    with pytest.raises(RuntimeError):
        loss_metrics(0.0, 0)


def test_answer_metrics():
    assert normalize("  72\n") == "72" and normalize("Hello   World") == "hello world"
    assert exact_match(" 72", "72") and not exact_match("72 apples", "72")
    assert contains("72 apples", "72") and not contains("7", "72") and not contains("anything", " ")
    m = generation_metrics([(" 72", "72"), ("it is 28", "28"), ("5", "6"), ("", "1")])
    assert m == {"num_generated": 4, "exact_match": 0.25, "contains": 0.5}
    assert generation_metrics([]) == {"num_generated": 0, "exact_match": None, "contains": None}


def test_eval_set_changes_with_data_and_settings_only():
    base = eval_set_id("abc", {"max_records": 8, "dtype": "float32"})
    assert base == eval_set_id("abc", {"dtype": "float32", "max_records": 8})
    assert base != eval_set_id("abd", {"max_records": 8, "dtype": "float32"})
    assert base != eval_set_id("abc", {"max_records": 9, "dtype": "float32"})


def test_eval_json_sits_next_to_hf_or_adapter():
    assert eval_json_path("/runs/r/step_00000020/hf") == "/runs/r/step_00000020/eval.json"
    assert eval_json_path("/models/tiny") == "/models/tiny/eval.json"
    assert eval_json_path("s3://b/r/step_00000020/hf/") == "s3://b/r/step_00000020/eval.json"
    assert eval_json_path("/base/hf", "/runs/r/step_00000020/adapter") == "/runs/r/step_00000020/eval.json"


def test_eval_config_is_typed_and_strict():
    from raylm.config import ConfigError, load_config

    cfg = load_config(None, ["eval.max_records=3", "eval.dtype=bfloat16"])
    assert cfg.eval.max_records == 3 and cfg.eval.engine_dtype == "bfloat16"
    assert load_config(None, []).eval.engine_dtype == "float32"  # auto on CPU
    assert load_config(None, ["eval.use_gpu=true"]).eval.engine_dtype == "bfloat16"
    for bad in ("eval.max_records=-1", "eval.bogus=1", "eval.max_new_tokens=0"):
        with pytest.raises(ConfigError) as exc:
            load_config(None, [bad])
        assert bad.split("=")[0] in str(exc.value)


def test_cli_eval_of_a_missing_checkpoint_exits_2_before_ray(tmp_path, capsys):
    from raylm.cli import main

    assert main(["eval", str(tmp_path / "no-such-checkpoint")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not a best.json")
    assert main(["eval", str(tmp_path / "notes.txt")]) == 2


def test_an_adapter_must_be_a_peft_lora_folder(tmp_path):
    import json

    from raylm.errors import CheckpointError
    from raylm.evaluate import check_adapter

    with pytest.raises(CheckpointError, match="not a peft adapter folder"):
        check_adapter(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(CheckpointError, match="not a LoRA adapter"):
        check_adapter(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    assert check_adapter(str(tmp_path)) == str(tmp_path)


def test_status_shows_the_newest_evaluation_of_a_run_and_of_a_sweeps_best(tmp_path):
    import json

    from raylm.status import eval_line, find, sweep_evaluation

    result = {"checkpoint": "x", "val_loss": 1.25, "perplexity": 3.49, "val_tokens": 40, "exact_match": 0.5,
              "contains": 0.75, "num_generated": 8, "eval_set": "abc123", "created": "2026-12-04T19:00:00Z"}
    run = tmp_path / "run"
    for step, loss in (("step_00000010", 9.0), ("step_00000020", 1.25), ("step_00000030", None)):
        (run / step / "hf").mkdir(parents=True)
        if loss is not None:
            (run / step / "eval.json").write_text(json.dumps({**result, "val_loss": loss}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 30, "val_loss": 2.0}) + "\n")
    (tmp_path / "serve.yaml").write_text("serve: {}\n")  # a file beside the runs is not a run
    runs, _ = find(str(tmp_path))
    assert [r.name for r in runs] == ["run"]
    assert runs[0].evaluation["val_loss"] == 1.25  # step 20's: the newest evaluated step
    line = eval_line(runs[0].evaluation)
    assert "val_loss 1.2500" in line and "exact_match 0.500" in line and "eval_set abc123" in line
    assert sweep_evaluation({"checkpoint": str(run / "step_00000010" / "hf")})["val_loss"] == 9.0
    assert sweep_evaluation({"checkpoint": "/nowhere/hf", "eval": result}) == result
    assert sweep_evaluation({"checkpoint": "/nowhere/hf"}) is None


def test_evaluate_best_records_the_result_in_best_json_with_the_trials_data(tmp_path):
    """tune.evaluate_best's bookkeeping (the evaluation itself is test_eval's): the best trial's
    data.* values choose the eval data, and best.json gains `eval` in one write."""
    import json
    from types import SimpleNamespace

    from raylm.config import load_config
    from raylm.evaluate import evaluate_sweep_best

    best_json = tmp_path / "best.json"
    best_json.write_text(json.dumps({"checkpoint": "trials/t1/step_00000020/hf", "value": 1.0}))
    seen = {}

    def fake_evaluate(cfg, checkpoint):
        seen.update(seq_len=cfg.data.seq_len, checkpoint=checkpoint)
        return {"val_loss": 1.5, "perplexity": 4.48, "val_tokens": 10, "eval_set": "e1"}

    cfg = load_config(None, ["tune.evaluate_best=true"])
    outcome = SimpleNamespace(best_json=str(best_json), best=SimpleNamespace(trial_id="t1", params={
        "data.seq_len": 64, "train.lr": 0.1}))
    evaluate_sweep_best(cfg, outcome, evaluate=fake_evaluate)
    assert seen == {"seq_len": 64, "checkpoint": str(best_json)}
    written = json.loads(best_json.read_text())
    assert written["value"] == 1.0 and written["eval"]["eval_set"] == "e1" and "trial_evals" not in written


def test_evaluate_trials_evaluates_every_trials_best_checkpoint_on_its_own_data(tmp_path):
    import json
    from types import SimpleNamespace

    from raylm.config import load_config
    from raylm.evaluate import evaluate_sweep_best

    best_json = tmp_path / "best.json"
    best_json.write_text(json.dumps({"checkpoint": "trials/t1/step_00000020/hf", "value": 1.0}))
    seen = []

    def fake_evaluate(cfg, checkpoint):
        seen.append((cfg.data.seq_len, checkpoint))
        return {"checkpoint": checkpoint, "val_loss": 1.0 + len(seen), "perplexity": 2.0, "val_tokens": 9,
                "eval_set": f"e{cfg.data.seq_len}"}

    trial = lambda t, seq, ckpt: SimpleNamespace(trial_id=t, params={"data.seq_len": seq}, checkpoint=ckpt)  # noqa: E731
    best = trial("t1", 64, "trials/t1/step_00000020")
    outcome = SimpleNamespace(best_json=str(best_json), best=best,
                              trials=[best, trial("t2", 32, "trials/t2/step_00000010"), trial("t3", 64, None)])
    evaluate_sweep_best(load_config(None, ["tune.evaluate_trials=true"]), outcome, evaluate=fake_evaluate)
    assert seen == [(64, str(best_json)), (32, "trials/t2/step_00000010")], "a trial without a checkpoint is skipped"
    written = json.loads(best_json.read_text())
    assert set(written["trial_evals"]) == {"t1", "t2"} and written["trial_evals"]["t2"]["eval_set"] == "e32"


def test_a_merged_adapter_computes_what_peft_computes(tmp_path, monkeypatch):
    """Base + adapter is evaluated as one merged model (vLLM gives no prompt log-probabilities
    under LoRA): the merged weights must give peft's logits."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from raylm.evaluate import merged_checkpoint
    from raylm.serve.tiny import make_tiny_checkpoint

    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the merged model is cached in the temp folder
    base = make_tiny_checkpoint(str(tmp_path / "base"), documents=10)
    torch.manual_seed(1)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)  # peft starts B at 0: the adapter would change nothing
    lora.save_pretrained(tmp_path / "adapter")
    merged = merged_checkpoint(base, str(tmp_path / "adapter"), "float32")
    assert merged.startswith(str(tmp_path))
    assert merged_checkpoint(base, str(tmp_path / "adapter"), "float32") == merged  # merged once
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 129, 200]])
    with torch.no_grad():
        want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter")(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged)(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base)(ids).logits
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(got, plain, atol=1e-2)


def test_eval_engine_kwargs_must_be_vllm_arguments(tmp_path):
    """eval.engine_kwargs is checked like serve.engine_kwargs, before any engine starts: a misspelt
    name is a config error naming the field, and a real one passes."""
    import json

    from raylm.config import load_config
    from raylm.errors import ConfigError
    from raylm.evaluate import _check_engine_can_run

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64,
                                                      "num_attention_heads": 2}))
    bad = load_config(None, ["eval.engine_kwargs={enforce_eagre: true}"])
    with pytest.raises(ConfigError, match="eval.engine_kwargs: enforce_eagre is not a vLLM engine argument"):
        _check_engine_can_run(str(tmp_path), bad)
    assert _check_engine_can_run(str(tmp_path), load_config(None, ["eval.engine_kwargs={enforce_eager: true}"]))
