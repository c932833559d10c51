"""The tokenizer: load a named one, or train a byte-level BPE on the corpus; carry it to workers.

`load_tokenizer` guarantees what the rest of raylm relies on: an EOS token (the document
separator), a pad token, and a chat template (`raylm.chat`), which every checkpoint and export
then carries. A trained tokenizer is cached under data.cache_dir by corpus fingerprint and
settings (`_tokenizer_for`), a named one (a folder or a Hub id) by its files' bytes, with the chat
template it renders with (data.chat_template overrides the tokenizer's own); each is written in a
private folder renamed into place, so a half-written one is never loaded and a changed one is a new
folder. A pretrained model's embeddings must cover the tokenizer's ids (`check_tokenizer_fits`).
`tokenizer_files` / `write_tokenizer_files` turn its directory into bytes and back: it travels
with the config to workers on other nodes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

from raylm.chat import DEFAULT_CHAT_TEMPLATE, chat_template_text, ensure_chat_template
from raylm.config import DataConfig, expand
from raylm.data.sources import DataError, Source
from raylm.errors import ModelError

if TYPE_CHECKING:  # Ray is imported lazily: unit tests and config errors never start it.
    import ray.data

    from raylm.config import RaylmConfig

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


def load_tokenizer(name_or_dir: str, chat_template: Optional[str] = None):
    """A Hugging Face tokenizer with an EOS token (used as document separator), a pad token and a
    chat template: `chat_template` (data.chat_template: a built-in's name or a file) if given, else
    its own, else raylm's default."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(expand(name_or_dir) if os.path.exists(os.path.expanduser(name_or_dir)) else name_or_dir)
    except (OSError, ValueError) as exc:
        raise DataError(f"data.tokenizer={name_or_dir}: cannot load tokenizer: {exc}") from None
    if tok.eos_token_id is None:
        raise DataError(f"data.tokenizer={name_or_dir}: has no EOS token to separate documents")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if chat_template:
        tok.chat_template = chat_template_text(chat_template)
    return ensure_chat_template(tok)


def template_source(cfg: DataConfig, own: bool) -> str:
    """Which chat template renders the records, for the data stage's summary line."""
    if cfg.chat_template:
        return f"data.chat_template={cfg.chat_template}"
    return "the tokenizer's own" if own else "raylm's default (the tokenizer has no chat template of its own)"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
                   "chat_template.json")


def tokenizer_folder(name: str) -> Optional[str]:
    """The local folder holding a named tokenizer: the folder itself, or a Hub id's snapshot in the
    Hugging Face cache (None when it is not there: not downloaded yet)."""
    if os.path.isdir(os.path.expanduser(name)):
        return expand(name)
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(name, "tokenizer_config.json")
    except ValueError:  # not a valid repo id
        return None
    return os.path.dirname(found) if isinstance(found, str) else None


def tokenizer_digest(folder: str) -> str:
    """A tokenizer folder keyed by its tokenizer files' bytes (never the model's weights beside them)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if (name in TOKENIZER_FILES or name.startswith("tokenizer")) and os.path.isfile(path):
            h.update(name.encode() + b"\0" + Path(path).read_bytes())
    return h.hexdigest()


def model_vocab_size(name: str) -> Optional[int]:
    """The vocabulary a pretrained model's embeddings cover (config.json vocab_size), read without
    loading it: a folder's, or a Hub id's from the HF cache (or the Hub when online)."""
    import json

    local = os.path.expanduser(name)
    path: Optional[str] = os.path.join(local, "config.json") if os.path.isdir(local) else None
    if path is None:
        from huggingface_hub import hf_hub_download

        try:
            path = hf_hub_download(name, "config.json")
        except Exception as exc:  # noqa: BLE001  offline and not cached, no such repo, no network
            raise ModelError(f"model.name={name}: not a preset, a folder, or a Hugging Face model found "
                             f"(HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}): {exc}") from None
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"model.name={name}: cannot read {path}: {exc}") from None
    vocab = doc.get("vocab_size") or (doc.get("text_config") or {}).get("vocab_size")
    return int(vocab) if vocab else None


def check_tokenizer_fits(cfg: "RaylmConfig") -> None:
    """Before Ray starts: a pretrained model's embeddings must cover every id of the data's tokenizer."""
    if not cfg.model.pretrained:
        return
    vocab = model_vocab_size(cfg.model.name)
    if vocab is None:
        return
    tok = load_tokenizer(cfg.data.tokenizer, cfg.data.chat_template)
    if len(tok) > vocab:
        raise DataError(f"data.tokenizer={cfg.data.tokenizer}: {len(tok)} tokens, but model.name={cfg.model.name} "
                        f"has embeddings for {vocab}; its ids would index past them. Leave data.tokenizer unset "
                        f"to use the model's own tokenizer")


def tokenizer_files(tokenizer_dir: str) -> dict[str, bytes]:
    """The tokenizer directory as bytes, so it travels to workers on other nodes with the config."""
    return {p.name: p.read_bytes() for p in Path(tokenizer_dir).iterdir() if p.is_file()}


def write_tokenizer_files(files: dict[str, bytes], out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    for name, blob in files.items():
        Path(out_dir, name).write_bytes(blob)


def _publish(tok, root: str, key_extra: str = "") -> str:
    """Save a tokenizer under `root`/<digest of its files> (a private folder renamed into place), so
    a changed tokenizer is a new folder, never a stale copy, and a half-written one is never read."""
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tok-", dir=root)
    try:
        tok.save_pretrained(tmp)
        out = os.path.join(root, hashlib.sha256((tokenizer_digest(tmp) + key_extra).encode()).hexdigest()[:16])
        if os.path.isdir(out):
            return out
        try:
            os.rename(tmp, out)
        except OSError:  # another run published the same tokenizer first
            pass
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tokenizer_for(src: Source, cfg: DataConfig, docs: "ray.data.Dataset") -> tuple[str, str]:
    """A local tokenizer folder with the chat template the records render with (a trained one, cached
    by corpus + settings, or the named one, keyed by its files), and which template that is."""
    root = os.path.join(expand(cfg.cache_dir), "tokenizers")
    if cfg.tokenizer != "train":
        tok = load_tokenizer(cfg.tokenizer)
        own = bool(getattr(tok, "chat_template", None)) and tok.chat_template != DEFAULT_CHAT_TEMPLATE
        if cfg.chat_template:
            tok.chat_template = chat_template_text(cfg.chat_template)
        return _publish(tok, root), template_source(cfg, own)
    sft = f"|{cfg.format}" if cfg.is_records else ""  # a records corpus trains on its records' strings
    key = hashlib.sha256(f"{src.fingerprint()}|{cfg.vocab_size}|{cfg.text_field}|{cfg.text_split}|{cfg.max_documents}{sft}".encode()).hexdigest()[:16]
    out = os.path.join(root, f"bpe-{key}")
    if not os.path.isdir(out):
        os.makedirs(root, exist_ok=True)
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

        train_tokenizer(sample(), cfg.vocab_size, out)
    if cfg.chat_template:
        return _publish(load_tokenizer(out, cfg.chat_template), root), template_source(cfg, False)
    return out, template_source(cfg, False)
