"""The data stage: `prepare_data` runs it on the connected Ray cluster and returns `PreparedData`.

    raw text            read documents -> tokenizer (named, or trained on a sample) ->
                        tokenize_and_pack -> leftovers packed on the driver (one final partial
                        block dropped)
    chat / instruction  (prepare_sft) read records -> tokenizer -> render_and_pack
    preference          (prepare_preference) read records -> tokenizer -> render_pairs (one row per pair)
    both                deterministic shuffle (data.seed) -> split_blocks -> train / val

This module only orchestrates and counts (`DataStats`); each step lives in the module named
after it. It is `prepare`, not `pipeline`, because raylm.pipeline is the end-to-end verb.
"""

from __future__ import annotations

import collections
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from raylm.config import DataConfig
from raylm.data.chat import _record_text, skipped_summary
from raylm.data.packing import COUNTERS, pack_remainders, render_and_pack, tokenize_and_pack
from raylm.data.preference import PAIR_COLUMNS, render_pairs
from raylm.data.reading import _read_documents, read_records
from raylm.data.sources import DataError, resolve_source
from raylm.data.tokenizer import _tokenizer_for, load_tokenizer, tokenizer_files

if TYPE_CHECKING:  # Ray is imported lazily: unit tests and config errors never start it.
    import ray.data


@dataclass
class DataStats:
    files: int = 0
    documents: int = 0
    tokens: int = 0
    blocks: int = 0
    train_blocks: int = 0
    val_blocks: int = 0
    dropped_tokens: int = 0
    replaced: int = 0
    skipped_records: int = 0
    truncated_files: int = 0  # cut-off archives: what decompressed was kept
    trained_tokens: int = 0  # SFT: tokens the loss is computed on (assistant tokens by default)
    truncated_records: int = 0  # SFT: examples cut to seq_len
    skipped_reasons: str = ""  # SFT: "skipped N records: ..." by reason
    vocab_size: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"{self.documents} documents in {self.files} file(s), {self.tokens} tokens -> {self.blocks} blocks "
                f"({self.train_blocks} train / {self.val_blocks} val), {self.dropped_tokens} tokens dropped "
                f"(final partial block), {self.replaced} undecodable byte sequences replaced, "
                f"{self.skipped_records} records skipped, "
                + (f"{self.truncated_files} truncated file(s) read as far as they go, " if self.truncated_files else "")
                + (f"{self.trained_tokens} trained tokens, " if self.trained_tokens else "")
                + (f"{self.truncated_records} records truncated to seq_len, " if self.truncated_records else "")
                + (f"{self.skipped_reasons}, " if self.skipped_reasons else "")
                + f"vocab {self.vocab_size}, {self.seconds:.1f}s")


@dataclass
class PreparedData:
    train: Any  # ray.data.Dataset of {"input_ids": int32[seq_len + 1]}
    val: Any
    tokenizer_dir: str
    stats: DataStats = field(default_factory=DataStats)


def prepare_data(cfg: DataConfig, verbose: bool = True) -> PreparedData:
    """Run the whole data stage on the connected Ray cluster. Ray must be initialised.

    One streaming pass (read -> tokenize + pack per batch) is materialized; a trained tokenizer
    that is not cached yet reads a sample first. Counters ride on each batch's tail row.
    data.format chat / instruction goes to the SFT stage (prepare_sft, below) instead, preference to
    prepare_preference."""
    if cfg.format == "preference":
        return prepare_preference(cfg, verbose)
    if cfg.is_sft:
        return prepare_sft(cfg, verbose)
    import ray.data
    from ray.data.expressions import col

    t0 = time.perf_counter()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic block order -> deterministic split
    ctx.enable_progress_bars = verbose
    src = resolve_source(cfg)
    docs = _read_documents(src, cfg)
    if cfg.max_documents:
        docs = docs.filter(lambda r: bool(r["text"])).limit(cfg.max_documents)

    tokenizer_dir = _tokenizer_for(src, cfg, docs)
    hf_tok = load_tokenizer(tokenizer_dir)
    block_len = cfg.seq_len + 1
    packed = docs.map_batches(
        tokenize_and_pack, batch_size=1024, batch_format="numpy",
        fn_kwargs={"tokenizer_json": hf_tok.backend_tokenizer.to_str(), "eos_id": hf_tok.eos_token_id,
                   "block_len": block_len}).materialize()
    tails = packed.filter(expr=col("length") < block_len).take_all()
    total = {name: sum(int(r[name]) for r in tails) for name in COUNTERS}
    stats = DataStats(documents=total["documents"], tokens=total["tokens"], replaced=total["replaced"],
                      skipped_records=total["skipped"], files=total["files"], truncated_files=total["truncated"],
                      vocab_size=len(hf_tok))
    if stats.documents == 0:
        raise DataError(f"data.source={cfg.source}: the corpus is empty (no non-blank documents)")
    leftovers = [np.asarray(r["input_ids"][: int(r["length"])], dtype=np.int32) for r in tails]
    extra, stats.dropped_tokens = pack_remainders(leftovers, block_len)
    blocks = packed.filter(expr=col("length") == block_len).select_columns(["input_ids"])
    if extra:
        blocks = blocks.union(ray.data.from_items([{"input_ids": b} for b in extra]))
    blocks = blocks.random_shuffle(seed=cfg.seed).materialize()
    stats.blocks = blocks.count()
    if stats.blocks == 0:
        raise DataError(f"data.source={cfg.source}: {stats.tokens} tokens are fewer than one block of "
                        f"data.seq_len+1={block_len}; lower data.seq_len or add text")
    train, val = split_blocks(blocks, cfg, stats)
    stats.seconds = time.perf_counter() - t0
    return PreparedData(train=train, val=val, tokenizer_dir=tokenizer_dir, stats=stats)


def prepare_sft(cfg: DataConfig, verbose: bool = True):
    """The data stage for data.format chat / instruction. Ray must be initialised."""
    import ray.data
    from ray.data.expressions import col

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


def prepare_preference(cfg: DataConfig, verbose: bool = True):
    """The data stage for data.format preference: records -> pair rows -> shuffle -> train / val."""
    import ray.data
    from ray.data.expressions import col

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
    rows = records.map_batches(
        render_pairs, batch_size=512, batch_format="numpy",
        fn_kwargs={"pref_json": cfg.preference.model_dump_json(), "seq_len": cfg.seq_len,
                   "tokenizer_files": files, "files_key": files_key}).materialize()
    counts: collections.Counter = collections.Counter()
    for row in rows.filter(expr=col("chosen_tokens") == 0).take_all():
        if row["counts"]:
            counts.update(json.loads(row["counts"]))
    summary = skipped_summary(counts)
    stats = DataStats(documents=counts["examples"], tokens=counts["tokens"], files=len(src.paths),
                      skipped_records=sum(v for k, v in counts.items() if k.startswith("skip:")),
                      vocab_size=len(hf_tok), trained_tokens=counts["trained_tokens"],
                      truncated_records=counts["truncated"])
    stats.skipped_reasons = summary if stats.skipped_records else ""
    if verbose or stats.skipped_records:
        print(f"raylm: {counts['examples']} preference pairs; {summary}"
              + (f"; {counts['truncated']} truncated to seq_len={cfg.seq_len}" if counts["truncated"] else ""), flush=True)
    if stats.documents == 0:
        where = ", ".join(src.paths) or cfg.source
        raise DataError(f"{where}: no usable preference record ({summary}); check data.preference field names")
    pairs = rows.filter(expr=col("chosen_tokens") > 0).select_columns(list(PAIR_COLUMNS))
    pairs = pairs.random_shuffle(seed=cfg.seed).materialize()
    train, val = split_blocks(pairs, cfg, stats)
    stats.seconds = time.perf_counter() - t0
    return PreparedData(train=train, val=val, tokenizer_dir=tokenizer_dir, stats=stats)


def split_blocks(blocks: "ray.data.Dataset", cfg: DataConfig, stats: DataStats) -> tuple:
    """Cut shuffled, materialized blocks into train / val (at least one val block when asked for)."""
    stats.blocks = blocks.count()
    n_val = int(round(stats.blocks * cfg.val_fraction))
    if cfg.val_fraction > 0 and stats.blocks >= 2:
        n_val = max(1, n_val)
    train, val = blocks.split_at_indices([stats.blocks - n_val])
    for ds in (train, val):  # a Dataset keeps the context it was made with: Train workers iterating
        ds.context.enable_progress_bars = False  # their shards would draw bars into the driver's log
    stats.train_blocks, stats.val_blocks = stats.blocks - n_val, n_val
    return train, val


def stats_dict(stats: DataStats) -> dict:
    return asdict(stats)
