"""Chat / instruction rendering: one record -> messages -> token ids + trained-token mask -> example.

    record -> messages    chat: a list of {role, content}; instruction: Alpaca fields turned into
                          a user turn (and data.sft.system_prompt); a bad record gives a reason
    messages -> ids, mask the tokenizer's chat template; the mask marks the assistant's tokens
                          (its `{% generation %}` blocks, or, for the many templates without them,
                          what each assistant turn adds to the rendering of the turns before it:
                          content and end-of-turn token), or every token with train_on=all
    ids, mask -> example  (inputs, labels) shifted for next-token prediction; labels are IGNORE
                          (-100) off the trained tokens; past seq_len cut or skipped (too_long)

Pure (no Ray) and unit-tested: `packing.render_and_pack` applies it per batch. A bad record is
skipped and counted by reason, never fatal (`skipped_summary`). The default chat template lives
in raylm/chat.py, not here, because serving renders prompts with it too.
"""

from __future__ import annotations

import json
import os
import re
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


GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


class RenderError(ValueError):
    """A conversation the chat template cannot render, or cannot be masked from (the reason says which)."""


class NotPrefixPreserving(RenderError):
    """The template renders earlier turns differently once later turns follow: no mask can be
    derived from its renderings of prefixes."""


def _apply(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja's raise_exception (a role the template refuses), a template bug
        raise RenderError(f"the chat template refuses it: {exc}") from None


def assistant_spans(tokenizer: Any, messages: list[dict], from_turn: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns (from `from_turn`
    on), for templates without `{% generation %}` blocks.

    An assistant turn i is what rendering messages[:i+1] adds to rendering messages[:i] with the
    generation prompt: its content and its end-of-turn token. It ends where the rendering of a
    conversation that stops after it and of one that goes on part (a template may close a finished
    conversation with EOS, as Phi-3's does); `render` leaves out the whitespace tokens after its
    end-of-turn token (Qwen's and Gemma's newline: never generated, the model stops before it). Each
    prefix must render as a prefix of the whole, or the template is refused."""
    whole = _apply(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < from_turn:
            continue
        before = _apply(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        ended = _apply(tokenizer, messages[:i + 1])
        if not (whole.startswith(before) and ended.startswith(before)):
            raise NotPrefixPreserving(f"the chat template renders turn {i} differently once later turns follow")
        if i + 1 < len(messages):
            goes_on = whole
        else:
            try:
                goes_on = _apply(tokenizer, messages + [{"role": "user", "content": "."}])
            except RenderError:
                goes_on = ended
        end = len(os.path.commonprefix([ended, goes_on]))  # may fall inside a token: `render` snaps it
        if end <= len(before) or not whole.startswith(ended[:end]):
            raise NotPrefixPreserving(f"the chat template renders turn {i} differently once later turns follow")
        spans.append((len(before), end))
    return whole, spans


def render(tokenizer: Any, messages: list[dict], train_on: str, from_turn: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and the trained-token mask (the assistant turns from `from_turn` on), from the
    tokenizer's chat template: its `{% generation %}` blocks where it has them, else the
    renderings of the conversation's prefixes (`assistant_spans`). Raises RenderError."""
    if train_on == "all" or GENERATION_BLOCK.search(tokenizer.chat_template or ""):
        try:
            out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=train_on != "all")
        except Exception as exc:
            raise RenderError(f"the chat template refuses it: {exc}") from None
        ids = np.asarray(out["input_ids"], dtype=np.int32)
        if train_on == "all":
            return ids, np.ones_like(ids, dtype=bool)
        mask = np.asarray(out["assistant_masks"], dtype=bool)
        if from_turn:
            prompt = _apply(tokenizer, messages[:from_turn], add_generation_prompt=True)
            mask[:len(tokenizer(prompt, add_special_tokens=False)["input_ids"])] = False
        return ids, mask
    return derived_mask(tokenizer, messages, from_turn)


def derived_mask(tokenizer: Any, messages: list[dict], from_turn: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and the assistant turns' mask from the renderings of prefixes (`assistant_spans`)."""
    text, spans = assistant_spans(tokenizer, messages, from_turn)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(ids), dtype=bool)
    for start, end in spans:  # the tokens that end within the turn, less whitespace tokens at its end
        inside = np.flatnonzero((offsets[:, 1] > start) & (offsets[:, 1] <= end))
        while len(inside) and not text[offsets[inside[-1], 0]:offsets[inside[-1], 1]].strip():
            inside = inside[:-1]
        mask[inside] = True
    return ids, mask


def check_template(tokenizer: Any, name: str) -> None:
    """Refuse (DataError, naming the template) a template whose assistant turns cannot be found:
    one without `{% generation %}` blocks that does not render prefixes as prefixes."""
    from raylm.data.sources import DataError

    probe = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"},
             {"role": "user", "content": "And 3 + 3?"}, {"role": "assistant", "content": "6"}]
    try:
        ids, mask = render(tokenizer, probe, "assistant")
    except NotPrefixPreserving as exc:
        raise DataError(f"{name}: {exc}, so the tokens of an assistant turn cannot be found; give a template that "
                        f"renders each prefix of a conversation as a prefix of the whole, or one with "
                        f"{{% generation %}} blocks, in data.chat_template") from None
    except RenderError:
        return  # a template that refuses this conversation: its records say why, one by one
    if not mask.any():
        raise DataError(f"{name}: no assistant token found in a rendered conversation; set data.chat_template")


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
