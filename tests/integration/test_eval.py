"""`raylm eval` on the session's Ray cluster with a real vLLM engine (ray.data.llm): one evaluation
(through the CLI verb) of a tiny checkpoint on SFT chat data, checked against transformers on the
same tokens.

One engine start for the module (the expensive part on CPU). The checkpoint is the serve tests'
tiny one with its final norm scaled up: a random model predicts nearly uniformly, so every token
costs about ln(vocab) and a loss summed over the wrong tokens would look right; scaled, the
per-token losses spread widely and greedy answers have clear winners.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from raylm.evaluate import EVAL_JSON, generation_example, packed_examples
from serve_fixtures import EAGER, repo_root, tiny_checkpoint

__all__ = ["tiny_checkpoint"]  # fixtures used by this module

pytestmark = pytest.mark.timeout(600)

MAX_RECORDS, MAX_NEW_TOKENS = 8, 8


@pytest.fixture(scope="module")
def sharp_checkpoint(tiny_checkpoint, tmp_path_factory) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("eval") / "sharp"
    shutil.copytree(tiny_checkpoint, out)
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(20.0)
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def eval_args(tiny_checkpoint, tmp_path_factory) -> list[str]:
    store = tmp_path_factory.mktemp("eval-store")
    return ["-c", str(repo_root() / "configs" / "chat_sft.yaml"),
            *(x for o in (f"data.tokenizer={tiny_checkpoint}", "data.max_documents=300", f"train.storage_path={store}",
                          f"data.cache_dir={store / 'cache'}", f"eval.max_records={MAX_RECORDS}",
                          f"eval.max_new_tokens={MAX_NEW_TOKENS}", f"eval.num_samples={MAX_RECORDS}", "eval.dtype=float32", EAGER[1])
              for x in ("--set", o))]


@pytest.fixture(scope="module")
def eval_cfg(eval_args):
    from raylm.config import load_config

    return load_config(eval_args[1], eval_args[3::2])


@pytest.fixture(scope="module")
def result(ray_cluster, eval_args, sharp_checkpoint) -> dict:
    """`raylm eval <checkpoint>` (the verb joins the session's Ray); its result is the eval.json it wrote."""
    from raylm.cli import main

    assert main(["eval", sharp_checkpoint, *eval_args]) == 0
    return json.loads((Path(sharp_checkpoint) / EVAL_JSON).read_text())


def _val_rows(cfg) -> list[dict]:
    """The validation split of the data cache, row by row, as training's evaluate() reads it."""
    import pyarrow.parquet as pq

    from raylm.data import cached_data

    prepared = cached_data(cfg.data, cfg.train.storage_path)
    rows = []
    for f in prepared.manifest["val"]["files"]:
        rows += pq.read_table(f"{prepared.uri}/{f['path']}").to_pylist()
    return rows


def _model(path: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_val_loss_is_the_training_loss_transformers_computes(result, eval_cfg, sharp_checkpoint):
    """The invariant: eval's val_loss is training's loss (raylm.train.objectives.lm.token_losses: packed
    rows, prompt-masked labels, summed NLL / label tokens) on the same checkpoint and tokens.

    Tolerance: both run in float32 and differ only in kernels (vLLM's CPU attention and matmuls
    against torch's sdpa) and summation order, which moves a mean of float32 log-softmax values
    by ~1e-6 relative; 1e-4 leaves room for that, while a loss over the wrong tokens (a shifted
    label, a prompt token counted, examples seeing each other) moves it by far more on this sharp
    model. The token count must match exactly."""
    import torch

    from raylm.train.batches import trim
    from raylm.train.objectives.lm import token_losses

    model = _model(sharp_checkpoint)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in _val_rows(eval_cfg):
            batch = {k: torch.tensor([row[k]], dtype=torch.long) for k in ("input_ids", "labels", "position_ids")}
            batch["tokens"] = torch.tensor([row["tokens"]])
            loss, n = token_losses(model, trim(batch))
            total, count = total + float(loss), count + int(n)
    assert result["val_tokens"] == count
    assert result["val_loss"] == pytest.approx(total / count, rel=1e-4), (result["val_loss"], total / count)
    assert result["perplexity"] == pytest.approx(math.exp(result["val_loss"]))
    assert result["val_loss"] > 1.0  # sharp, untrained: confidently wrong, far from a degenerate 0


def test_answers_are_transformers_greedy_answers(result, eval_cfg, sharp_checkpoint):
    """Generation metrics come from vLLM's greedy answers to held-out examples: the same answers
    transformers' greedy generate gives for the same prompt tokens, scored against the reference."""
    import torch
    from transformers import AutoTokenizer

    from raylm.evaluate import contains, exact_match

    assert result["num_generated"] == MAX_RECORDS
    tok = AutoTokenizer.from_pretrained(sharp_checkpoint)
    prompts = {}
    for row in _val_rows(eval_cfg):
        for inputs, labels in packed_examples(row):
            found = generation_example(np.asarray(inputs), np.asarray(labels))
            if found:
                prompts[tok.decode(found[0], skip_special_tokens=True)] = found
    model = _model(sharp_checkpoint)
    # eval.num_samples = eval.max_records: every answer is a sample, so each is checked below and
    # the metrics are their means (not bounds that hold whatever the answers are)
    assert len(result["samples"]) == MAX_RECORDS
    generated_tokens = 0
    for sample in result["samples"]:
        prompt_ids, reference_ids = prompts[sample["prompt"]]
        assert sample["reference"] == tok.decode(reference_ids, skip_special_tokens=True)
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert sample["generated"] == tok.decode(out[0, len(prompt_ids):], skip_special_tokens=True)
        generated_tokens += out.shape[1] - len(prompt_ids)
        assert sample["exact_match"] == exact_match(sample["generated"], sample["reference"])
        assert sample["contains"] == contains(sample["generated"], sample["reference"])
    samples = result["samples"]
    assert result["exact_match"] == pytest.approx(sum(s["exact_match"] for s in samples) / len(samples))
    assert result["contains"] == pytest.approx(sum(s["contains"] for s in samples) / len(samples))
    assert result["generated_tokens"] == generated_tokens, "vLLM generated what transformers generates, token for token"


def test_result_is_written_beside_the_checkpoint_and_fingerprinted(result, eval_cfg, sharp_checkpoint):
    from raylm.data import cached_data
    from raylm.evaluate import eval_set_id

    assert result["checkpoint"] == sharp_checkpoint and result["eval_json"] == str(Path(sharp_checkpoint) / EVAL_JSON)
    fingerprint = cached_data(eval_cfg.data, eval_cfg.train.storage_path).manifest["fingerprint"]
    # the settings this test asked for (eval_args), not the ones the result says it used
    asked = {"max_val_rows": eval_cfg.eval.max_val_rows, "max_records": MAX_RECORDS,
             "max_new_tokens": MAX_NEW_TOKENS, "dtype": "float32"}
    assert result["eval_settings"] == asked
    assert result["eval_set"] == eval_set_id(fingerprint, asked)
    for changed in ({**asked, "max_records": MAX_RECORDS + 1}, {**asked, "dtype": "bfloat16"}):
        assert eval_set_id(fingerprint, changed) != result["eval_set"], "an eval on other settings is another set"
    assert eval_set_id(fingerprint[::-1], asked) != result["eval_set"], "and so is one on other data"
    assert 0 < result["eval_s"] < 600
