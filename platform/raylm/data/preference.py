"""Preference data (data.format preference): record -> (prompt, chosen, rejected) -> one row per pair.

    record -> messages   chat form: prompt a list of messages, chosen / rejected the assistant's
                         message(s) (the Hugging Face preference datasets' layout); plain form:
                         three strings, the prompt a user turn (after data.preference.system_prompt)
    messages -> ids      prompt + each answer rendered with the chat template (raylm.data.chat.render),
                         the answer's tokens marked as SFT marks an assistant turn (the template's
                         `{% generation %}` blocks, or its renderings of prefixes); cut to seq_len
    pair -> row          chosen_input_ids / chosen_labels / rejected_input_ids / rejected_labels,
                         each padded to seq_len, and chosen_tokens / rejected_tokens (real lengths)

A pair stays together: one row holds both answers, so every micro-batch holds whole pairs and the
DPO step concatenates them ([chosen; rejected], as TRL batches them). No packing: a pair's two
sequences must stay aligned row by row. Bad records are skipped and counted by reason (missing
field, chosen identical to rejected, no answer token left within seq_len), never fatal.

Reading (jsonl, parquet, remote URIs, HF datasets), tokenizer choice, shuffle and split are the SFT
stage's own (raylm.data.reading, the cache of raylm.data.prepare); only rendering differs.
"""

from __future__ import annotations

import collections
import json
from typing import Any, Iterator, Optional

import numpy as np

from raylm.config import PreferenceConfig
from raylm.data.chat import IGNORE, ROLES, RenderError, render, to_example
from raylm.data.packing import _tokenizer_from

PAIR_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels",
                "chosen_tokens", "rejected_tokens")


# ------------------------------------------------------------------ record -> messages (pure)


def _turns(value: Any, role: Optional[str]) -> Optional[list[dict]]:
    """A string as one `role` turn, or a list of {role, content} messages; None when neither."""
    if isinstance(value, str):
        return [{"role": role or "user", "content": value}] if value.strip() else None
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    return None


def preference_messages(record: Any, pref: PreferenceConfig
                        ) -> tuple[Optional[tuple[list[dict], list[dict], list[dict]]], Optional[str]]:
    """((prompt, chosen, rejected) as message lists, None) for a usable record, else (None, the reason)."""
    if not isinstance(record, dict):
        return None, "not a JSON object"
    for name in (pref.prompt_field, pref.chosen_field, pref.rejected_field):
        if record.get(name) in (None, "", []):
            return None, f"missing field '{name}'"
    prompt = _turns(record[pref.prompt_field], "user")
    if prompt is None:
        return None, f"field '{pref.prompt_field}' not text or messages"
    if isinstance(record[pref.prompt_field], str) and pref.system_prompt:
        prompt = [{"role": "system", "content": pref.system_prompt}] + prompt
    answers = []
    for name in (pref.chosen_field, pref.rejected_field):
        turns = _turns(record[name], "assistant")
        if turns is None or turns[-1]["role"] != "assistant":
            return None, f"field '{name}' not an assistant answer"
        answers.append(turns)
    if answers[0] == answers[1]:
        return None, "chosen identical to rejected"
    return (prompt, answers[0], answers[1]), None


# ------------------------------------------------------------------ messages -> row (pure)


def encode_pair(tokenizer: Any, prompt: list[dict], chosen: list[dict], rejected: list[dict], seq_len: int
                ) -> tuple[Optional[list[tuple[np.ndarray, np.ndarray]]], Optional[str], bool]:
    """[(inputs, labels) of chosen, of rejected], the skip reason, and whether either was cut.

    Only the answer's tokens are labelled, with the masks SFT uses (`render`): the prompt's own
    assistant turns (a multi-turn chat prompt) are context, so only turns after the prompt count."""
    out, cut_any = [], False
    for answer in (chosen, rejected):
        try:
            ids, mask = render(tokenizer, prompt + answer, "assistant", from_turn=len(prompt))
        except RenderError as exc:
            return None, str(exc), False
        example, reason, cut = to_example(ids, mask, seq_len, "truncate")
        if example is None:  # an answer always has a token (its EOS at least): it was cut off
            return None, f"no answer token within seq_len={seq_len}", False
        out.append(example)
        cut_any |= cut
    return out, None, cut_any


def pair_rows(pairs: list[list[tuple[np.ndarray, np.ndarray]]], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Fixed-shape rows, one per pair: both answers left-aligned and padded to seq_len."""
    n = len(pairs)
    out = {f"{side}_{col}": np.full((n, seq_len), pad_id if col == "input_ids" else IGNORE, dtype=np.int32)
           for side in ("chosen", "rejected") for col in ("input_ids", "labels")}
    out.update(chosen_tokens=np.zeros(n, dtype=np.int32), rejected_tokens=np.zeros(n, dtype=np.int32))
    for r, pair in enumerate(pairs):
        for side, (inputs, labels) in zip(("chosen", "rejected"), pair):
            out[f"{side}_input_ids"][r, :len(inputs)] = inputs
            out[f"{side}_labels"][r, :len(labels)] = labels
            out[f"{side}_tokens"][r] = len(inputs)
    return out


def json_records(batch: dict[str, np.ndarray], counts: collections.Counter) -> Iterator[Any]:
    """The parsed records of a map_batches batch of JSON lines; a line that is not JSON is counted
    (skip:not JSON) and left out, an empty one skipped."""
    for line in batch["record"].tolist():
        if not line:
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError:
            counts["skip:not JSON"] += 1


def render_pairs(batch: dict[str, np.ndarray], pref_json: str, seq_len: int, tokenizer_files: dict[str, bytes],
                 files_key: str) -> dict[str, np.ndarray]:
    """map_batches UDF: records -> pair rows, plus one stats row (chosen_tokens=0) holding the counts."""
    pref = PreferenceConfig.model_validate_json(pref_json)
    tok = _tokenizer_from(files_key, tuple(sorted(tokenizer_files.items())))
    counts: collections.Counter = collections.Counter()
    pairs = []
    for record in json_records(batch, counts):
        messages, reason = preference_messages(record, pref)
        pair, reason, cut = (None, reason, False) if messages is None else encode_pair(tok, *messages, seq_len)
        if pair is None:
            counts[f"skip:{reason}"] += 1
            continue
        counts["examples"] += 1
        counts["truncated"] += int(cut)
        counts["tokens"] += sum(len(x) for x, _ in pair)
        counts["trained_tokens"] += sum(int((y != IGNORE).sum()) for _, y in pair)
        pairs.append(pair)
    out = pair_rows(pairs, seq_len, tok.pad_token_id)
    n = len(pairs)
    for key in out:  # append the stats row
        out[key] = np.concatenate([out[key], np.zeros((1,) + out[key].shape[1:], dtype=out[key].dtype)])
    out["counts"] = np.array([""] * n + [json.dumps(counts)], dtype=object)
    return out
