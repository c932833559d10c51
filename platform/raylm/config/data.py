"""`data:`: what is read and how it becomes training examples."""

from __future__ import annotations

import os
from typing import Literal, Optional

from pydantic import Field, field_validator

from raylm.config.base import _Strict


RECORD_FORMATS = ("chat", "instruction", "preference", "prompt")
BUILTIN_CHAT_TEMPLATES = ("raylm", "chatml")  # their texts: raylm.chat


class SFTConfig(_Strict):
    """How chat / instruction records become supervised examples (data.format chat or instruction)."""

    messages_field: str = Field("messages", description="Chat records: the key holding the list of messages.")
    role_field: str = Field("role", description="Chat records: the key of a message's role (system, user, assistant).")
    content_field: str = Field("content", description="Chat records: the key of a message's text.")
    instruction_field: str = Field("instruction", description="Instruction records: the task (the user turn).")
    input_field: str = Field("input", description="Instruction records: optional context appended to the task.")
    output_field: str = Field("output", description="Instruction records: the answer (the assistant turn).")
    system_prompt: Optional[str] = Field(None, description="Instruction records: a system turn put before each.")
    train_on: Literal["assistant", "all"] = Field(
        "assistant", description="Tokens the loss is computed on: the assistant's only (prompt masked), or all.")
    packing: bool = Field(
        True, description="Pack several examples per block of seq_len (each sees only itself: position_ids restart "
        "per example); false: one example per row, batches padded to their longest.")
    too_long: Literal["truncate", "skip"] = Field(
        "truncate", description="A record longer than seq_len: cut to seq_len (skipped if no trained token is "
        "left), or skipped. Either way it is counted.")


class PreferenceConfig(_Strict):
    """How preference records become (chosen, rejected) pairs (data.format preference).

    Chat form (the common Hugging Face preference datasets): `prompt` a list of messages, `chosen` and
    `rejected` each a list holding the assistant's message. Plain form: three strings (the prompt
    becomes a user turn). Both answers are rendered after the prompt with the chat template; only
    the answers' tokens count."""

    prompt_field: str = Field("prompt", description="The prompt: messages, or a string (a user turn).")
    chosen_field: str = Field("chosen", description="The preferred answer: assistant message(s), or a string.")
    rejected_field: str = Field("rejected", description="The dispreferred answer: assistant message(s), or a string.")
    system_prompt: Optional[str] = Field(None, description="Plain-form prompts: a system turn put before each.")


class PromptConfig(_Strict):
    """How prompt records become rollout prompts (data.format prompt, for train.objective grpo).

    A record holds the prompt (a list of chat messages, or a string: a user turn) and any other
    columns (e.g. `answer`); those are handed to the reward functions by name, as TRL does. The
    prompt is rendered with the chat template and its generation prompt (the assistant's turn
    opened); one longer than data.seq_len tokens is skipped and counted."""

    prompt_field: str = Field("prompt", description="The prompt: messages, or a string (a user turn).")
    system_prompt: Optional[str] = Field(None, description="String prompts: a system turn put before each.")


class DataConfig(_Strict):
    source: str = Field(
        "embedded",
        description="What to read: 'embedded' (English help text shipped with every Python, no "
        "download), a local file, folder or glob, a remote URI Ray Data reads (s3://, gs://), "
        "or 'hf:<name>' / a saved Hugging Face datasets folder.",
    )
    format: Literal["auto", "text", "jsonl", "parquet", "hf", "chat", "instruction", "preference", "prompt"] = Field(
        "auto", description="File format of raw text ('auto' picks it from the file extension), or a supervised "
        "fine-tuning corpus: 'chat' (OpenAI-style messages records) or 'instruction' (Alpaca-style records), "
        "read from .jsonl / .parquet files or a Hugging Face dataset; see data.sft. 'preference': prompt / chosen / "
        "rejected records for train.objective dpo; see data.preference. 'prompt': prompt records (and the columns "
        "reward functions read) for train.objective grpo; see data.prompt.",
    )
    text_field: str = Field("text", description="Column / JSON key that holds the text.")
    text_split: Literal["file", "paragraph", "line"] = Field(
        "paragraph", description="How a .txt file is cut into documents (blank lines by default)."
    )
    hf_split: str = Field("train", description="Split of a Hugging Face dataset to read.")
    tokenizer: str = Field(
        "train",
        description="'train' trains a byte-level BPE tokenizer on the corpus; anything else is a "
        "Hugging Face tokenizer name or directory. Unset with a pretrained model.name (a Hub id or a "
        "folder): that model's own tokenizer.",
    )
    chat_template: Optional[str] = Field(
        None, description="Chat / instruction / preference data: a Jinja chat template file, or a built-in "
        f"({', '.join(BUILTIN_CHAT_TEMPLATES)}), used instead of the tokenizer's own; it is saved with the "
        "tokenizer, so checkpoints and serving render alike. Unset: the tokenizer's template, or raylm's "
        "when it has none.")
    vocab_size: int = Field(2048, ge=260, description="Vocabulary size of a trained tokenizer.")
    seq_len: int = Field(128, ge=8, description="Tokens a training example predicts (blocks hold seq_len + 1).")
    val_fraction: float = Field(
        0.05, gt=0.0, lt=1.0, description="Share of packed blocks held out for validation (every evaluation, "
        "the final val_loss and Tune's metric read them; each worker needs at least one).")
    seed: int = Field(0, description="Seed of the train / val split and of each epoch's shuffle (files, row groups "
                      "and the shuffle buffer, drawn from seed and epoch).")
    shuffle_buffer_rows: int = Field(
        1024, ge=0, description="Rows each worker holds to shuffle within (bounded memory; no all-to-all shuffle). "
        "Not part of the cache's fingerprint: it changes the order of reading, not the cache.")
    max_documents: Optional[int] = Field(None, ge=1, description="Read at most this many documents (smoke runs).")
    cache_dir: str = Field(
        "~/.cache/raylm", description="Where trained tokenizers are kept, keyed by corpus and settings."
    )
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Chat / instruction fine-tuning data.")
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig, description="Preference (DPO) data.")
    prompt: PromptConfig = Field(default_factory=PromptConfig, description="Prompt (GRPO) data.")

    @field_validator("chat_template")
    @classmethod
    def _template_exists(cls, v: Optional[str]) -> Optional[str]:
        if v is None or v in BUILTIN_CHAT_TEMPLATES:
            return v
        if not os.path.isfile(os.path.expanduser(v)):
            raise ValueError(f"{v!r} is neither a file nor a built-in template ({', '.join(BUILTIN_CHAT_TEMPLATES)})")
        return os.path.abspath(os.path.expanduser(v))

    @property
    def is_sft(self) -> bool:
        return self.format in ("chat", "instruction")

    @property
    def is_records(self) -> bool:
        """A corpus of JSON records (chat, instruction, preference, prompt), not raw text."""
        return self.format in RECORD_FORMATS
