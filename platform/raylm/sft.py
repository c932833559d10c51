"""Supervised fine-tuning data: chat / instruction records -> masked, packed examples.

    read (jsonl | parquet | HF dataset)   -> one row per record {"record": its JSON text}
    render (map_batches)                  -> the tokenizer's chat template gives token ids and the
                                             assistant mask; labels are -100 off the trained tokens
    pack (same map_batches)               -> rows of seq_len tokens holding one or several examples,
                                             position_ids restarting at 0 per example
    split                                 -> train / val, as for raw text (data.split_blocks)

Why position_ids and no mask: transformers (5.x) derives a block-diagonal causal mask from
position_ids that restart at 0 when no attention_mask and no KV cache is passed
(`find_packed_sequence_indices`), for eager, sdpa and flash attention alike, so packed examples
never attend to each other (see `packed_logits`). The
padding at the end of a row is one more "example" whose labels are all -100.

Records stay JSON text through Ray Data: chat records are ragged and their fields optional, which
Arrow schemas handle badly; each batch parses its own. A bad record is skipped and counted by
reason; the counts ride on one stats row per batch (column `counts`), like the raw-text stage.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import os
import tempfile
import time
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from raylm.config import DataConfig, SFTConfig

if TYPE_CHECKING:
    import ray.data

ROLES = ("system", "user", "assistant")
IGNORE = -100


# ------------------------------------------------------------------ records -> messages (pure)


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


# ------------------------------------------------------------------ messages -> example (pure)


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


def skipped_summary(counts: dict[str, int]) -> str:
    """e.g. 'skipped 2 records: 1 empty messages, 1 missing field 'messages''."""
    reasons = {k.removeprefix("skip:"): v for k, v in counts.items() if k.startswith("skip:") and v}
    total = sum(reasons.values())
    if not total:
        return "skipped 0 records"
    return f"skipped {total} record{'s' if total != 1 else ''}: " + ", ".join(
        f"{v} {k}" for k, v in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))


def packed_logits(model: Any, input_ids: Any, position_ids: Any) -> Any:
    """Logits of packed rows, each example seeing only itself.

    use_cache=False matters: with a KV cache (the default, even in training) transformers skips
    its packed-sequence detection and the examples of a row attend to each other."""
    return model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


# ------------------------------------------------------------------ Ray Data UDFs


@functools.lru_cache(maxsize=4)
def _tokenizer_from(files_key: str, files: tuple) -> Any:
    """The HF tokenizer rebuilt from its files, once per Ray worker process."""
    from raylm.data import load_tokenizer, write_tokenizer_files

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
        ids, mask = render(tok, messages, sft.train_on)
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


def jsonl_lines(row: dict) -> list[dict]:
    """One .jsonl file -> one row per non-blank line (JSON parsing happens in render_and_pack)."""
    from raylm.data import _maybe_gunzip, decode_counting

    raw, _ = _maybe_gunzip(row["bytes"], str(row.get("path", "")))
    text, _ = decode_counting(raw)
    return [{"record": line} for line in text.splitlines() if line.strip()]


def rows_to_records(df) -> Any:
    """Parquet / HF rows (nested columns arrive as numpy arrays) -> {"record": JSON text}."""
    import pandas as pd

    def plain(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            return [plain(x) for x in v.tolist()]
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, np.generic):
            return v.item()
        return None if v is None or (isinstance(v, float) and np.isnan(v)) else v

    records = [json.dumps({k: plain(v) for k, v in r.items() if plain(v) is not None}) for r in df.to_dict("records")]
    return pd.DataFrame({"record": records})


def read_records(src: Any, cfg: DataConfig) -> "ray.data.Dataset":
    import ray.data

    from raylm.data import DataError, load_hf_split

    if src.kind == "hf":
        return ray.data.from_huggingface(load_hf_split(src, cfg)).map_batches(rows_to_records, batch_format="pandas")
    if src.kind == "parquet":
        return ray.data.read_parquet(list(src.paths)).map_batches(rows_to_records, batch_format="pandas")
    if src.kind != "jsonl":
        raise DataError(f"data.source={cfg.source}: data.format={cfg.format} reads .jsonl, .parquet or a "
                        f"Hugging Face dataset, not {src.kind}")
    return ray.data.read_binary_files(list(src.paths), include_paths=True).flat_map(jsonl_lines)


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


def prepare_sft(cfg: DataConfig, verbose: bool = True):
    """The data stage for data.format chat / instruction. Ray must be initialised."""
    import ray.data
    from ray.data.expressions import col

    from raylm.data import (DataError, DataStats, PreparedData, _tokenizer_for, load_tokenizer, resolve_source,
                            split_blocks, tokenizer_files)

    t0 = time.perf_counter()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = verbose
    src = resolve_source(cfg)
    records = read_records(src, cfg)
    if cfg.max_documents:
        records = records.limit(cfg.max_documents)
    tokenizer_dir = _tokenizer_for(src, cfg, records.map(_record_text))
    hf_tok = load_tokenizer(tokenizer_dir)
    files = tokenizer_files(tokenizer_dir)
    files_key = hashlib.sha256(b"".join(k.encode() + v for k, v in sorted(files.items()))).hexdigest()[:16]
    packed = records.map_batches(
        render_and_pack, batch_size=512, batch_format="numpy",
        fn_kwargs={"fmt": cfg.format, "sft_json": cfg.sft.model_dump_json(), "seq_len": cfg.seq_len,
                   "tokenizer_files": files, "files_key": files_key}).materialize()
    counts: collections.Counter = collections.Counter()
    for row in packed.filter(expr=col("tokens") == 0).take_all():
        if row["counts"]:
            counts.update(json.loads(row["counts"]))
    summary = skipped_summary(counts)
    stats = DataStats(documents=counts["examples"], tokens=counts["tokens"], files=len(src.paths),
                      skipped_records=sum(v for k, v in counts.items() if k.startswith("skip:")),
                      vocab_size=len(hf_tok))
    stats.trained_tokens, stats.truncated_records, stats.skipped_reasons = (
        counts["trained_tokens"], counts["truncated"], summary if stats.skipped_records else "")
    if verbose or stats.skipped_records:
        print(f"raylm: {summary}" + (f"; {counts['truncated']} truncated to seq_len={cfg.seq_len}"
                                     if counts["truncated"] else ""), flush=True)
    if stats.documents == 0:
        where = ", ".join(src.paths) or cfg.source
        raise DataError(f"{where}: no usable {cfg.format} record ({summary}); check data.sft field names")
    blocks = packed.filter(expr=col("tokens") > 0).select_columns(["input_ids", "labels", "position_ids", "tokens"])
    blocks = blocks.random_shuffle(seed=cfg.seed).materialize()
    train, val = split_blocks(blocks, cfg, stats)
    stats.seconds = time.perf_counter() - t0
    return PreparedData(train=train, val=val, tokenizer_dir=tokenizer_dir, stats=stats)
