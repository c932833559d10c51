"""Chat / instruction rendering: one record -> messages -> token ids + trained-token mask -> example.

    record -> messages    chat: a list of {role, content}; instruction: Alpaca fields turned into
                          a user turn (and data.sft.system_prompt); a bad record gives a reason
    messages -> ids, mask the tokenizer's chat template; the mask marks the assistant's tokens
                          (its `{% generation %}` blocks), or every token with train_on=all
    ids, mask -> example  (inputs, labels) shifted for next-token prediction; labels are IGNORE
                          (-100) off the trained tokens; past seq_len cut or skipped (too_long)

Pure (no Ray) and unit-tested: `packing.render_and_pack` applies it per batch. A bad record is
skipped and counted by reason, never fatal (`skipped_summary`). The default chat template lives
in raylm/chat.py, not here, because serving renders prompts with it too.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import numpy as np

from raylm.config import SFTConfig

ROLES = ("system", "user", "assistant")
IGNORE = -100


# ------------------------------------------------------------------ records -> messages


def chat_messages(record: Any, sft: SFTConfig) -> tuple[Optional[list[dict]], Optional[str]]:
    """(messages, None) for a usable chat record, else (None, the reason it is skipped)."""
    if not isinstance(record, dict) or sft.messages_field not in record:
        return None, f"missing field '{sft.messages_field}'"
    raw = record[sft.messages_field]
    if not isinstance(raw, list) or not raw:
        return None, "empty messages"
    messages = []
    for m in raw:
        if not isinstance(m, dict) or sft.role_field not in m or sft.content_field not in m:
            return None, f"missing field '{sft.role_field}' or '{sft.content_field}'"
        if m[sft.role_field] not in ROLES:
            return None, "unknown role"
        if not isinstance(m[sft.content_field], str):
            return None, "content not text"
        messages.append({"role": m[sft.role_field], "content": m[sft.content_field]})
    if not any(m["role"] == "assistant" for m in messages):
        return None, "no assistant turn"
    return messages, None


def instruction_messages(record: Any, sft: SFTConfig) -> tuple[Optional[list[dict]], Optional[str]]:
    """An Alpaca record as a user turn (instruction, then input if any) and an assistant turn."""
    for name in (sft.instruction_field, sft.output_field):
        if not isinstance(record, dict) or not isinstance(record.get(name), str):
            return None, f"missing field '{name}'"
    if not record[sft.output_field].strip():
        return None, "no assistant turn"
    prompt = record[sft.instruction_field]
    extra = record.get(sft.input_field)
    if isinstance(extra, str) and extra.strip():
        prompt = f"{prompt}\n\n{extra}"
    system = [{"role": "system", "content": sft.system_prompt}] if sft.system_prompt else []
    return system + [{"role": "user", "content": prompt}, {"role": "assistant", "content": record[sft.output_field]}], None


def record_messages(line: str, fmt: str, sft: SFTConfig) -> tuple[Optional[list[dict]], Optional[str]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None, "not JSON"
    return (chat_messages if fmt == "chat" else instruction_messages)(record, sft)


# ------------------------------------------------------------------ messages -> example


def render(tokenizer: Any, messages: list[dict], train_on: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and the trained-token mask, from the tokenizer's chat template."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids = np.asarray(out["input_ids"], dtype=np.int32)
    mask = np.ones_like(ids, dtype=bool) if train_on == "all" else np.asarray(out["assistant_masks"], dtype=bool)
    return ids, mask


def to_example(ids: np.ndarray, mask: np.ndarray, seq_len: int, too_long: str
               ) -> tuple[Optional[tuple[np.ndarray, np.ndarray]], Optional[str], bool]:
    """(inputs, labels) shifted for next-token prediction, the skip reason, and whether it was cut.

    labels[i] is the token after inputs[i] when that token is trained, else -100."""
    inputs, labels = ids[:-1], np.where(mask[1:], ids[1:], IGNORE).astype(np.int32)
    cut = len(inputs) > seq_len
    if cut:
        if too_long == "skip":
            return None, f"longer than seq_len={seq_len}", False
        inputs, labels = inputs[:seq_len], labels[:seq_len]
    if not (labels != IGNORE).any():
        return None, (f"no trained token within seq_len={seq_len}" if cut else "no assistant turn"), False
    return (inputs, labels), None, cut


def skipped_summary(counts: dict[str, int]) -> str:
    """e.g. 'skipped 2 records: 1 empty messages, 1 missing field 'messages''."""
    reasons = {k.removeprefix("skip:"): v for k, v in counts.items() if k.startswith("skip:") and v}
    total = sum(reasons.values())
    if not total:
        return "skipped 0 records"
    return f"skipped {total} record{'s' if total != 1 else ''}: " + ", ".join(
        f"{v} {k}" for k, v in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))


def _record_text(row: dict) -> dict:
    """All string values of a record, for training a tokenizer on an SFT corpus."""
    def strings(v: Any) -> list[str]:
        if isinstance(v, str):
            return [v]
        if isinstance(v, dict):
            return [s for x in v.values() for s in strings(x)]
        if isinstance(v, list):
            return [s for x in v for s in strings(x)]
        return []

    try:
        return {"text": "\n".join(strings(json.loads(row["record"])))}
    except json.JSONDecodeError:
        return {"text": ""}
