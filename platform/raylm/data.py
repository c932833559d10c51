"""Data stage: read a corpus with Ray Data, tokenize, pack into fixed blocks, split.

    read (files | URI | HF datasets | embedded) -> documents {text, replaced, skipped}
    tokenize + pack (map_batches, parallel)      -> full blocks of seq_len + 1 tokens, one tail
                                                    row per batch (leftover tokens + counters)
    remainders of every batch, packed on driver  -> more full blocks; one final partial is dropped
    deterministic shuffle + split                -> train / val datasets

Workers get disjoint shards of the train set through `ShardedDataConfig` (no rows dropped,
unlike `streaming_split(equal=True)`).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional

import numpy as np

from raylm.config import DataConfig, InputError, expand
from raylm.chat import ensure_chat_template

if TYPE_CHECKING:  # Ray is imported lazily: unit tests and config errors never start it.
    import ray.data

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
TEXT_EXTS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".json": "jsonl",
             ".parquet": "parquet"}
REMOTE_PREFIXES = ("s3://", "gs://", "gcs://", "abfss://", "az://", "hdfs://", "http://", "https://")


class DataError(InputError):
    """A corpus that cannot be read. The message names the file or setting."""


# ------------------------------------------------------------------ sources


@dataclass(frozen=True)
class Source:
    kind: str  # "embedded" | "text" | "jsonl" | "parquet" | "hf"
    paths: tuple[str, ...] = ()
    name: str = ""  # HF dataset name or the embedded corpus name

    def fingerprint(self) -> str:
        """Stable id of the corpus content (paths + sizes + mtimes), for caching tokenizers."""
        h = hashlib.sha256(f"{self.kind}|{self.name}".encode())
        for p in self.paths:
            h.update(p.encode())
            if os.path.exists(p):
                st = os.stat(p)
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]


def _format_of(path: str, cfg: DataConfig) -> str:
    """The file format: data.format when it names one, else (auto, chat, instruction) the extension."""
    if cfg.format not in ("auto", "chat", "instruction"):
        return cfg.format
    name = path[:-3] if path.endswith(".gz") else path
    fmt = TEXT_EXTS.get(os.path.splitext(name)[1].lower())
    if fmt is None:
        raise DataError(f"{path}: cannot tell the format from the extension; set data.format")
    return fmt


def resolve_source(cfg: DataConfig) -> Source:
    """Turn `data.source` into a concrete list of files (or a dataset name). Fails on a missing path."""
    src = cfg.source.strip()
    if src == "embedded":
        return Source("embedded", name="python-help-topics")
    if src.startswith("hf:") or cfg.format == "hf":
        name = src.removeprefix("hf:")
        return Source("hf", paths=(expand(name),) if os.path.isdir(os.path.expanduser(name)) else (), name=name)
    if src.startswith(REMOTE_PREFIXES):  # Ray Data reads these itself (pyarrow filesystems)
        return Source(_format_of(src, cfg), paths=(src,))
    path = expand(src)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(os.path.join(path, "dataset_dict.json")):
            return Source("hf", paths=(path,), name=path)
        files = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                       if os.path.isfile(p) and (cfg.format not in ("auto", "chat", "instruction") or os.path.splitext(p.removesuffix(".gz"))[1].lower() in TEXT_EXTS))
        if not files:
            raise DataError(f"data.source={src}: folder has no .txt, .jsonl or .parquet files")
    elif any(c in src for c in "*?["):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not files:
            raise DataError(f"data.source={src}: glob matches no files")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise DataError(f"data.source={src}: no such file or folder")
    kinds = {_format_of(p, cfg) for p in files}
    if len(kinds) > 1:
        raise DataError(f"data.source={src}: mixes formats {sorted(kinds)}; point it at one kind or set data.format")
    return Source(kinds.pop(), paths=tuple(files))


def embedded_documents() -> list[str]:
    """The default corpus: Python's own English help topics (ships with CPython, ~460 KB)."""
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics) if topics[k].strip()]


# ------------------------------------------------------------------ parsing (pure, unit-tested)


def decode_counting(raw: bytes) -> tuple[str, int]:
    """Decode UTF-8, replacing undecodable byte sequences with U+FFFD; return text and how many."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        return text, text.count("\ufffd") - raw.count("\xef\xbf\xbd".encode("latin-1"))


def split_text(text: str, mode: str) -> list[str]:
    if mode == "file":
        parts = [text]
    elif mode == "line":
        parts = text.splitlines()
    else:
        parts = text.replace("\r\n", "\n").split("\n\n")
    return [p.strip() for p in parts if p.strip()]


def parse_jsonl(text: str, field_name: str) -> tuple[list[str], int]:
    """Documents from JSON lines; a line that is not JSON, or lacks the field, is skipped and counted."""
    docs, skipped = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            continue
        doc = value.get(field_name) if isinstance(value, dict) else None
        if isinstance(doc, str) and doc.strip():
            docs.append(doc)
        else:
            skipped += 1
    return docs, skipped


def _maybe_gunzip(raw: bytes, path: str) -> tuple[bytes, bool]:
    """(the file's bytes, whether it was cut off): a truncated or damaged .gz keeps what
    decompresses and is reported (DataStats.truncated_files), not fatal."""
    if path.endswith(".gz") and raw[:2] == b"\x1f\x8b":  # not yet decompressed (Arrow may have)
        import gzip
        import zlib

        try:
            return gzip.decompress(raw), False
        except (EOFError, OSError, zlib.error):
            try:
                return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(raw), True
            except zlib.error:
                return b"", True
    return raw, False


def file_to_rows(row: dict, fmt: str, text_field: str, text_split: str) -> list[dict]:
    """One file's bytes -> document rows. Counters ride on the first row so they are summed once."""
    path = str(row.get("path", "?"))
    raw, truncated = _maybe_gunzip(row["bytes"], path)
    if truncated:
        print(f"raylm: {path}: truncated or damaged archive; kept the {len(raw)} bytes that decompress", flush=True)
    text, replaced = decode_counting(raw)
    if fmt == "jsonl":
        docs, skipped = parse_jsonl(text, text_field)
    else:
        docs, skipped = split_text(text, text_split), 0
    rows = [{"text": d, "replaced": 0, "skipped": 0, "files": 0, "truncated": 0} for d in docs]
    stats = {"text": "", "replaced": replaced, "skipped": skipped, "files": 1, "truncated": int(truncated)}
    return rows + [stats]


# ------------------------------------------------------------------ tokenizer


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


# ------------------------------------------------------------------ Ray Data stages


def load_hf_split(src: Source, cfg: DataConfig) -> Any:
    """The `data.hf_split` split of a Hugging Face dataset (by name, or saved with save_to_disk)."""
    import datasets

    try:
        hf = datasets.load_from_disk(src.paths[0]) if src.paths else datasets.load_dataset(src.name, split=cfg.hf_split)
    except Exception as exc:  # noqa: BLE001 - any load failure is a data error naming the source
        raise DataError(f"data.source={cfg.source}: cannot load Hugging Face dataset: {exc}") from None
    if isinstance(hf, datasets.DatasetDict):
        if cfg.hf_split not in hf:
            raise DataError(f"data.hf_split={cfg.hf_split}: not in {list(hf)}")
        hf = hf[cfg.hf_split]
    return hf


def _read_documents(src: Source, cfg: DataConfig) -> "ray.data.Dataset":
    import ray.data

    if src.kind == "embedded":
        docs = embedded_documents()
        rows = [{"text": d, "replaced": 0, "skipped": 0, "files": 0, "truncated": 0} for d in docs]
        rows.append({"text": "", "replaced": 0, "skipped": 0, "files": 1, "truncated": 0})
        return ray.data.from_items(rows, override_num_blocks=8)
    if src.kind == "hf":
        hf = load_hf_split(src, cfg)
        if cfg.text_field not in hf.column_names:
            raise DataError(f"data.text_field={cfg.text_field}: not a column of {cfg.source} ({hf.column_names})")
        hf = hf.select_columns([cfg.text_field])
        ds = ray.data.from_huggingface(hf).rename_columns({cfg.text_field: "text"})
        return ds.map_batches(_add_zero_counters, batch_format="pandas")
    if src.kind == "parquet":
        _check_parquet_column(src.paths, cfg.text_field)
        ds = ray.data.read_parquet(list(src.paths), columns=[cfg.text_field]).rename_columns({cfg.text_field: "text"})
        return ds.map_batches(_add_zero_counters, batch_format="pandas")
    if any(p.endswith(".gz") for p in src.paths) and not any("://" in p for p in src.paths):
        # Arrow gunzips .gz itself (by extension) and fails the whole read on a truncated
        # archive; local files are read raw instead, so `_maybe_gunzip` keeps what it can.
        ds = ray.data.from_items([{"path": p} for p in src.paths], override_num_blocks=min(len(src.paths), 64))
        ds = ds.map(_read_raw)
    else:
        ds = ray.data.read_binary_files(list(src.paths), include_paths=True)
    return ds.flat_map(file_to_rows, fn_kwargs={"fmt": src.kind, "text_field": cfg.text_field,
                                                 "text_split": cfg.text_split})


def _read_raw(row: dict) -> dict:
    with open(row["path"], "rb") as f:
        return {"path": row["path"], "bytes": f.read()}


def _check_parquet_column(paths: tuple[str, ...], column: str) -> None:
    """Fail before execution, naming the file, when a local parquet file lacks the text column."""
    import pyarrow.parquet as pq

    for path in paths:
        if "://" in path:
            continue  # remote schemas are checked by Ray Data when it reads them
        try:
            names = pq.read_schema(path).names
        except Exception as exc:  # noqa: BLE001 - a corrupt file is a data error naming it
            raise DataError(f"{path}: not a readable parquet file: {exc}") from None
        if column not in names:
            raise DataError(f"{path}: no column data.text_field={column!r} (columns: {names})")


def _add_zero_counters(df):
    df = df[["text"]].copy()
    df["text"] = df["text"].fillna("").astype(str)
    df["replaced"] = 0
    df["skipped"] = (df["text"].str.strip() == "").astype(int)
    df["files"] = 0
    df["truncated"] = 0
    return df


COUNTERS = ("documents", "tokens", "replaced", "skipped", "files", "truncated")


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


def pack_remainders(remainders: list[np.ndarray], block_len: int) -> tuple[list[np.ndarray], int]:
    """Pack the short leftovers of all blocks; return full blocks and the tokens dropped (< block_len)."""
    if not remainders:
        return [], 0
    flat = np.concatenate(remainders)
    n_full = len(flat) // block_len
    return [flat[i * block_len:(i + 1) * block_len] for i in range(n_full)], len(flat) - n_full * block_len


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


def _tokenizer_for(src: Source, cfg: DataConfig, docs: "ray.data.Dataset") -> str:
    """Return a local tokenizer directory: a trained one (cached by corpus + settings) or the named one."""
    if cfg.tokenizer != "train":
        tok = load_tokenizer(cfg.tokenizer)
        out = os.path.join(expand(cfg.cache_dir), "tokenizers", hashlib.sha256(cfg.tokenizer.encode()).hexdigest()[:16])
        if not os.path.isdir(out):
            tok.save_pretrained(out)
        return out
    sft = f"|{cfg.format}" if cfg.is_sft else ""  # an SFT corpus trains on its records' strings
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


def prepare_data(cfg: DataConfig, verbose: bool = True) -> PreparedData:
    """Run the whole data stage on the connected Ray cluster. Ray must be initialised.

    One streaming pass (read -> tokenize + pack per batch) is materialized; a trained tokenizer
    that is not cached yet reads a sample first. Counters ride on each batch's tail row.
    data.format chat / instruction goes to the SFT stage (raylm.sft) instead."""
    if cfg.is_sft:
        from raylm.sft import prepare_sft

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


# ------------------------------------------------------------------ sharding for Ray Train


def make_data_config(datasets: Optional[dict] = None, world_size: Optional[int] = None):
    """A Ray Train DataConfig that splits every dataset into disjoint shards, dropping nothing.

    Ray's default `streaming_split(equal=True)` may drop rows to equalise shards, and
    `split(equal=False)` cuts at Ray block boundaries (one block -> one busy worker). Our blocks
    are materialized, so we cut at row indices: shard sizes differ by at most one row. Each
    worker then iterates its own shard, epoch after epoch, without a cross-worker barrier. A
    dataset with fewer rows than workers (a tiny validation set) is given whole to every worker.

    Pass `datasets` and `world_size` to cut on the driver, before training starts: Ray Train V2
    calls `configure` lazily from an actor once the workers hold every CPU, and the split tasks
    would then wait forever on a small machine (seen on 2 cores with 2 workers).
    """
    from ray.train import DataConfig as RayDataConfig

    pre_cut = {name: shard_indices(ds, world_size) for name, ds in (datasets or {}).items()}

    class ShardedDataConfig(RayDataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out: list[dict] = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                cut = pre_cut.get(name)
                shards = cut if cut is not None and len(cut) == world_size else shard_indices(ds, world_size)
                for rank, shard in enumerate(shards):
                    out[rank][name] = shard.iterator()
            return out

    return ShardedDataConfig()


def shard_indices(ds, world_size: int) -> list:
    """Split a materialized dataset into `world_size` contiguous row ranges of near-equal size."""
    n = ds.count()
    if n < world_size:
        return [ds] * world_size
    cuts = [round(i * n / world_size) for i in range(1, world_size)]
    return ds.split_at_indices(cuts)
