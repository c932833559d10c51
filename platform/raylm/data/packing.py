"""Packing: tokens -> fixed-shape rows, inside Ray Data map_batches (one UDF per kind of corpus).

    raw text  tokenize_and_pack  documents (each + EOS) concatenated and cut into blocks of
                                 seq_len + 1; the batch's leftover tokens go to one tail row,
                                 and the driver packs all leftovers (pack_remainders)
    SFT       render_and_pack    records rendered (raylm.data.chat) and placed first-fit into
                                 rows of seq_len (pack_examples), position_ids restarting at 0
                                 per example; the row's padding is one more all-IGNORE example

Why position_ids and no mask: transformers (5.x) derives a block-diagonal causal mask from
position_ids that restart at 0 when no attention_mask and no KV cache is passed
(`find_packed_sequence_indices`), for eager, sdpa and flash attention alike, so packed examples
never attend to each other, provided the model is called as `packed_logits` calls it.

Counters ride on one extra row per batch (the tail row; an SFT stats row, column `counts`), so
the driver needs no aggregation pass. Tokenizers are rebuilt once per Ray worker process.
"""

from __future__ import annotations

import collections
import functools
import json
import os
import tempfile
from typing import Any, Iterator

import numpy as np

from raylm.config import SFTConfig
from raylm.data.chat import IGNORE, RenderError, record_messages, render, to_example
from raylm.data.reading import file_to_rows
from raylm.data.tokenizer import load_tokenizer, write_tokenizer_files

# Largest piece of packed rows a tokenizing actor hands Ray Data at once (see TokenizePack.__call__).
CHUNK_BYTES = 4 << 20

COUNTERS = ("documents", "tokens", "replaced", "skipped", "files", "truncated")


# ------------------------------------------------------------------ raw text -> blocks


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(tokenizer_json: str):
    """Parse a tokenizer once per Ray worker process (tasks reuse their process)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def pack_batch(docs_ids: list[np.ndarray], block_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate documents' tokens; cut into full blocks [n, block_len] and a short tail (< block_len)."""
    flat = np.concatenate(docs_ids) if docs_ids else np.zeros(0, dtype=np.int32)
    n_full = len(flat) // block_len
    return flat[: n_full * block_len].reshape(n_full, block_len), flat[n_full * block_len:]


def tokenize_and_pack(batch: dict[str, np.ndarray], tokenizer_json: str, eos_id: int,
                      block_len: int) -> dict[str, np.ndarray]:
    """map_batches UDF: tokenize a batch of documents (each + EOS) and pack them into blocks.

    Output rows are the batch's full blocks, then one tail row: the leftover tokens (< block_len,
    zero-padded; `length` says how many are real) and the batch's counters (documents, tokens,
    and the read stage's replaced/skipped/files/truncated). The driver takes only the tail rows,
    so counting needs no aggregation pass, and full blocks are fixed-shape tensors (cheap in
    Arrow, unlike ragged per-document token lists)."""
    texts = [t for t in batch["text"].tolist() if t]
    encs = _cached_tokenizer(tokenizer_json).encode_batch(texts, add_special_tokens=False) if texts else []
    ids = [np.asarray(e.ids + [eos_id], dtype=np.int32) for e in encs]
    full, tail = pack_batch(ids, block_len)
    rows = len(full) + 1
    input_ids = np.zeros((rows, block_len), dtype=np.int32)
    input_ids[:-1] = full
    input_ids[-1, : len(tail)] = tail
    length = np.full(rows, block_len, dtype=np.int32)
    length[-1] = len(tail)
    counts = {"documents": len(ids), "tokens": sum(len(x) for x in ids),
              **{name: int(np.asarray(batch[name]).sum()) for name in COUNTERS[2:]}}
    out: dict[str, np.ndarray] = {"input_ids": input_ids, "length": length}
    for name in COUNTERS:
        out[name] = np.zeros(rows, dtype=np.int64)
        out[name][-1] = counts[name]
    return out


def files_to_documents(batch: dict[str, np.ndarray], fmt: str, text_field: str, text_split: str) -> dict:
    """Whole files -> the document columns `tokenize_and_pack` reads, inside the same UDF call:
    no Ray row per document (reading.file_to_rows does the decoding, splitting and counting)."""
    rows = [r for path, raw in zip(batch["path"], batch["bytes"])
            for r in file_to_rows({"path": path, "bytes": raw}, fmt, text_field, text_split)]
    return {"text": np.array([r["text"] for r in rows], dtype=object),
            **{k: np.array([r[k] for r in rows], dtype=np.int64) for k in COUNTERS[2:]}}


class TokenizePack:
    """The raw-text UDF as a Ray Data actor (one fused call per batch: split files into documents,
    encode_batch, pack). The tokenizer is parsed once per actor and runs on the actor's CPUs:
    Ray's workers set TOKENIZERS_PARALLELISM=false, which would keep it on one thread."""

    def __init__(self, tokenizer_json: str, eos_id: int, block_len: int, threads: int, fmt: str = "",
                 text_field: str = "text", text_split: str = "paragraph"):
        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        os.environ["RAYON_NUM_THREADS"] = str(threads)  # read when the tokenizer's thread pool starts
        self.tokenizer_json, self.eos_id, self.block_len = tokenizer_json, eos_id, block_len
        self.fmt, self.text_field, self.text_split = fmt, text_field, text_split
        _cached_tokenizer(tokenizer_json)

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """The packed rows in pieces of at most CHUNK_BYTES, in order (the stats row last): a whole
        file packs to tens of MB, and one block that size per actor (plus the one the driver reads)
        would outgrow a small object store. Pieces let Ray Data stream them out as they are made."""
        if "bytes" in batch:
            batch = files_to_documents(batch, self.fmt, self.text_field, self.text_split)
        out = tokenize_and_pack(batch, self.tokenizer_json, self.eos_id, self.block_len)
        step = max(1, CHUNK_BYTES // (out["input_ids"].itemsize * self.block_len))
        for start in range(0, len(out["length"]), step):
            yield {k: v[start:start + step] for k, v in out.items()}


def pack_remainders(remainders: list[np.ndarray], block_len: int) -> tuple[list[np.ndarray], int]:
    """Pack the short leftovers of all blocks; return full blocks and the tokens dropped (< block_len)."""
    if not remainders:
        return [], 0
    flat = np.concatenate(remainders)
    n_full = len(flat) // block_len
    return [flat[i * block_len:(i + 1) * block_len] for i in range(n_full)], len(flat) - n_full * block_len


# ------------------------------------------------------------------ SFT examples -> rows


def pack_examples(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int,
                  packing: bool) -> dict[str, np.ndarray]:
    """Rows of seq_len: examples placed first-fit (or one per row), position_ids restart per example.

    `tokens` is how many leading positions of a row are real (the rest is padding), so a batch can
    be cut to its longest row and tokens/s counts real tokens only."""
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    free: list[int] = []
    for ex in examples:
        n = len(ex[0])
        slot = next((i for i, f in enumerate(free) if f >= n), None) if packing else None
        if slot is None:
            rows.append([ex])
            free.append(seq_len - n)
        else:
            rows[slot].append(ex)
            free[slot] -= n
    out = {"input_ids": np.full((len(rows), seq_len), pad_id, dtype=np.int32),
           "labels": np.full((len(rows), seq_len), IGNORE, dtype=np.int32),
           "position_ids": np.zeros((len(rows), seq_len), dtype=np.int32),
           "tokens": np.zeros(len(rows), dtype=np.int32)}
    for r, row in enumerate(rows):
        at = 0
        for inputs, labels in row:
            n = len(inputs)
            out["input_ids"][r, at:at + n] = inputs
            out["labels"][r, at:at + n] = labels
            out["position_ids"][r, at:at + n] = np.arange(n)
            at += n
        out["position_ids"][r, at:] = np.arange(seq_len - at)  # padding: its own segment
        out["tokens"][r] = at
    return out


def packed_logits(model: Any, input_ids: Any, position_ids: Any) -> Any:
    """Logits of packed rows, each example seeing only itself.

    use_cache=False matters: with a KV cache (the default, even in training) transformers skips
    its packed-sequence detection and the examples of a row attend to each other."""
    return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


@functools.lru_cache(maxsize=4)
def _tokenizer_from(files_key: str, files: tuple) -> Any:
    """The HF tokenizer rebuilt from its files, once per Ray worker process."""
    out = os.path.join(tempfile.gettempdir(), f"raylm-sft-tok-{files_key}")
    if not os.path.isdir(out):
        tmp = tempfile.mkdtemp(prefix="raylm-sft-tok-")
        write_tokenizer_files(dict(files), tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            pass  # another process wrote it first
    return load_tokenizer(out)


def render_and_pack(batch: dict[str, np.ndarray], fmt: str, sft_json: str, seq_len: int,
                    tokenizer_files: dict[str, bytes], files_key: str) -> dict[str, np.ndarray]:
    """map_batches UDF: records -> packed rows, plus one stats row (tokens=0) holding the counts."""
    sft = SFTConfig.model_validate_json(sft_json)
    tok = _tokenizer_from(files_key, tuple(sorted(tokenizer_files.items())))
    counts: collections.Counter = collections.Counter()
    examples = []
    for line in batch["record"].tolist():
        if not line:
            continue
        messages, reason = record_messages(line, fmt, sft)
        if messages is None:
            counts[f"skip:{reason}"] += 1
            continue
        try:
            ids, mask = render(tok, messages, sft.train_on)
        except RenderError as exc:  # a role the template refuses (Gemma's system turn), ...
            counts[f"skip:{exc}"] += 1
            continue
        example, reason, cut = to_example(ids, mask, seq_len, sft.too_long)
        if example is None:
            counts[f"skip:{reason}"] += 1
            continue
        counts["examples"] += 1
        counts["truncated"] += int(cut)
        counts["tokens"] += len(example[0])
        counts["trained_tokens"] += int((example[1] != IGNORE).sum())
        examples.append(example)
    out = pack_examples(examples, seq_len, tok.pad_token_id, sft.packing)
    n = len(out["tokens"])
    for key in out:  # append the stats row
        out[key] = np.concatenate([out[key], np.zeros((1,) + out[key].shape[1:], dtype=out[key].dtype)])
    out["counts"] = np.array([""] * n + [json.dumps(counts)], dtype=object)
    return out
