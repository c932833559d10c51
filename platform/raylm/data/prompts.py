"""Prompt data (data.format prompt, for train.objective grpo): record -> prompt messages -> one row.

    record -> messages   `prompt` a list of chat messages, or a string (a user turn, after
                         data.prompt.system_prompt); every other key is a column for the rewards
    messages -> ids      the chat template with its generation prompt (the assistant's turn opened),
                         so the engine continues where the answer starts, as TRL renders prompts
    row                  prompt_ids (padded to seq_len), prompt_tokens (the real length) and
                         record (the record's JSON: the prompt as written and the reward columns)

The engines generate from the ids (no second rendering that could differ from the trainer's); the
reward functions get the prompt as the record wrote it and the other columns by name, as TRL's
GRPOTrainer hands them over. Bad records are skipped and counted by reason (not JSON, missing or
malformed prompt, prompt longer than seq_len), never fatal. Reading, tokenizer choice, split and
shuffle are the SFT stage's (raylm.data.reading, raylm.data.prepare).
"""

from __future__ import annotations

import collections
import json
from typing import Any, Optional

import numpy as np

from raylm.config import PromptConfig
from raylm.data.packing import _tokenizer_from
from raylm.data.preference import _turns, json_records

PROMPT_COLUMNS = ("prompt_ids", "prompt_tokens", "record")


def prompt_messages(record: Any, cfg: PromptConfig) -> tuple[Optional[list[dict]], Optional[str]]:
    """(messages ending in a user or system turn, None) for a usable record, else (None, the reason)."""
    if not isinstance(record, dict):
        return None, "not a JSON object"
    value = record.get(cfg.prompt_field)
    if value in (None, "", []):
        return None, f"missing field '{cfg.prompt_field}'"
    messages = _turns(value, "user")
    if messages is None:
        return None, f"field '{cfg.prompt_field}' not text or messages"
    if messages[-1]["role"] == "assistant":
        return None, f"field '{cfg.prompt_field}' ends with an assistant turn"
    if isinstance(value, str) and cfg.system_prompt:
        messages = [{"role": "system", "content": cfg.system_prompt}] + messages
    return messages, None


def encode_prompt(tokenizer: Any, messages: list[dict]) -> np.ndarray:
    """The prompt's token ids, the assistant's turn opened (add_generation_prompt)."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
    return np.asarray(out["input_ids"], dtype=np.int32)


def reward_columns(record: dict, cfg: PromptConfig) -> tuple[Any, dict]:
    """(the prompt as written, the other columns): what reward functions receive."""
    return record[cfg.prompt_field], {k: v for k, v in record.items() if k != cfg.prompt_field}


def render_prompts(batch: dict[str, np.ndarray], prompt_json: str, seq_len: int, tokenizer_files: dict[str, bytes],
                   files_key: str) -> dict[str, np.ndarray]:
    """map_batches UDF: records -> prompt rows, plus one stats row (prompt_tokens=0) holding the counts."""
    cfg = PromptConfig.model_validate_json(prompt_json)
    tok = _tokenizer_from(files_key, tuple(sorted(tokenizer_files.items())))
    counts: collections.Counter = collections.Counter()
    ids_rows, lines = [], []
    for record in json_records(batch, counts):
        messages, reason = prompt_messages(record, cfg)
        ids = None if messages is None else encode_prompt(tok, messages)
        if ids is not None and len(ids) > seq_len:
            ids, reason = None, f"prompt longer than seq_len={seq_len}"
        if ids is None:
            counts[f"skip:{reason}"] += 1
            continue
        counts["examples"] += 1
        counts["tokens"] += len(ids)
        ids_rows.append(ids)
        lines.append(json.dumps(record, sort_keys=True))
    n = len(ids_rows)
    out = {"prompt_ids": np.full((n + 1, seq_len), tok.pad_token_id, dtype=np.int32),
           "prompt_tokens": np.zeros(n + 1, dtype=np.int32),
           "record": np.array(lines + [""], dtype=object)}
    for r, ids in enumerate(ids_rows):
        out["prompt_ids"][r, :len(ids)] = ids
        out["prompt_tokens"][r] = len(ids)
    out["counts"] = np.array([""] * n + [json.dumps(counts)], dtype=object)
    return out


def prompt_batch(rows: dict[str, np.ndarray], cfg: PromptConfig) -> tuple[list[list[int]], list[Any], dict[str, list]]:
    """Cache rows -> (prompt token ids, prompts as written, reward columns by name): what a GRPO step
    generates from and scores with. A column some records lack is None for them."""
    ids = [r[:n].tolist() for r, n in zip(rows["prompt_ids"], rows["prompt_tokens"])]
    records = [json.loads(s) for s in rows["record"]]
    prompts, cols = zip(*(reward_columns(r, cfg) for r in records)) if records else ((), ())
    names = sorted({k for c in cols for k in c})
    return ids, list(prompts), {k: [c.get(k) for c in cols] for k in names}
