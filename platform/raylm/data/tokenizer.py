"""The tokenizer: load a named one, or train a byte-level BPE on the corpus; carry it to workers.

`load_tokenizer` guarantees what the rest of raylm relies on: an EOS token (the document
separator), a pad token, and a chat template (`raylm.chat`), which every checkpoint and export
then carries. A trained tokenizer is cached under data.cache_dir by corpus fingerprint and
settings (`_tokenizer_for`) and published atomically, so a half-written one is never loaded.
`tokenizer_files` / `write_tokenizer_files` turn its directory into bytes and back: it travels
with the config to workers on other nodes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from raylm.chat import ensure_chat_template
from raylm.config import DataConfig, expand
from raylm.data.sources import DataError, Source

if TYPE_CHECKING:  # Ray is imported lazily: unit tests and config errors never start it.
    import ray.data

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str) -> str:
    """Train a byte-level BPE tokenizer and save it as a Hugging Face tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                                   unk_token=None, pad_token=PAD_TOKEN)
    tmp = out_dir + f".tmp{os.getpid()}"
    fast.save_pretrained(tmp)
    try:
        os.rename(tmp, out_dir)  # atomic publish: a half-written tokenizer is never picked up
    except OSError:  # another process published the same tokenizer first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_tokenizer(name_or_dir: str):
    """A Hugging Face tokenizer with an EOS token (used as document separator) and a pad token."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(expand(name_or_dir) if os.path.exists(os.path.expanduser(name_or_dir)) else name_or_dir)
    except (OSError, ValueError) as exc:
        raise DataError(f"data.tokenizer={name_or_dir}: cannot load tokenizer: {exc}") from None
    if tok.eos_token_id is None:
        raise DataError(f"data.tokenizer={name_or_dir}: has no EOS token to separate documents")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return ensure_chat_template(tok)


def tokenizer_files(tokenizer_dir: str) -> dict[str, bytes]:
    """The tokenizer directory as bytes, so it travels to workers on other nodes with the config."""
    return {p.name: p.read_bytes() for p in Path(tokenizer_dir).iterdir() if p.is_file()}


def write_tokenizer_files(files: dict[str, bytes], out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    for name, blob in files.items():
        Path(out_dir, name).write_bytes(blob)


def _tokenizer_for(src: Source, cfg: DataConfig, docs: "ray.data.Dataset") -> str:
    """Return a local tokenizer directory: a trained one (cached by corpus + settings) or the named one."""
    if cfg.tokenizer != "train":
        tok = load_tokenizer(cfg.tokenizer)
        out = os.path.join(expand(cfg.cache_dir), "tokenizers", hashlib.sha256(cfg.tokenizer.encode()).hexdigest()[:16])
        if not os.path.isdir(out):
            tok.save_pretrained(out)
        return out
    sft = f"|{cfg.format}" if cfg.is_records else ""  # a records corpus trains on its records' strings
    key = hashlib.sha256(f"{src.fingerprint()}|{cfg.vocab_size}|{cfg.text_field}|{cfg.text_split}|{cfg.max_documents}{sft}".encode()).hexdigest()[:16]
    out = os.path.join(expand(cfg.cache_dir), "tokenizers", f"bpe-{key}")
    if os.path.isdir(out):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    budget = 64 << 20  # train on at most 64 MB of text: enough for a small BPE vocab

    def sample() -> Iterable[str]:
        seen = 0
        for batch in docs.iter_batches(batch_size=1024, batch_format="numpy"):
            for t in batch["text"]:
                if t:
                    seen += len(t)
                    yield str(t)
            if seen > budget:
                return

    return train_tokenizer(sample(), cfg.vocab_size, out)
