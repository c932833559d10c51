"""The data stage: `prepare_data` returns the packed-token cache of a data config, building it once.

    fingerprint (source listing + settings) -> cache complete in storage? reuse it (seconds)
    else: read -> tokenizer (named, or trained on a sample) -> tokenize + pack per batch (Ray Data,
          streamed, never materialized) -> rows routed to train / val by a seeded draw and written
          as Parquet shards by the driver (raylm.data.cache) -> manifest last

Raw text, SFT and preference pairs share all of it; a `Kind` says only how a record becomes rows (the
map_batches UDF) and how a batch's counters are read back. There is no all-to-all shuffle:
training shuffles per epoch when it reads the cache (raylm.data.stream). It is `prepare`, not
`pipeline`, because raylm.pipeline is the end-to-end verb.
"""

from __future__ import annotations

import collections
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from raylm import storage
from raylm.config import DataConfig
from raylm.console import say
from raylm.data import cache
from raylm.data.chat import _record_text, check_template, skipped_summary
from raylm.data.packing import CHUNK_BYTES, COUNTERS, TokenizePack, pack_remainders, render_and_pack
from raylm.data.preference import PAIR_COLUMNS, render_pairs
from raylm.data.prompts import PROMPT_COLUMNS, render_prompts
from raylm.data.reading import _read_documents, file_to_rows, read_files, read_records
from raylm.data.sources import DataError, Source, resolve_source
from raylm.data.tokenizer import _tokenizer_for, load_tokenizer, tokenizer_files
from raylm.errors import StorageError


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
    chat_template: str = ""  # records: which chat template rendered them
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
                + (f"chat template: {self.chat_template}, " if self.chat_template else "")
                + f"vocab {self.vocab_size}, {self.seconds:.1f}s")


@dataclass
class PreparedData:
    """A complete packed-token cache: where it is, its manifest, and how it came to be."""

    uri: str  # <storage>/datasets/<fingerprint>
    manifest: dict
    tokenizer_dir: str  # a local copy of the cache's tokenizer
    stats: DataStats = field(default_factory=DataStats)
    built: bool = True  # False: an existing cache was reused
    build_s: float = 0.0  # what building it took (when reused: what the original build took)

    def dataset(self, split: str) -> Any:
        """The split as a Ray Dataset (for inspection; training streams the files itself)."""
        import ray.data

        files = [storage.join(self.uri, f["path"]) for f in self.manifest[split]["files"]]
        fs, _ = storage.filesystem(self.uri)
        paths = [storage.filesystem(p)[1] for p in files]
        ds = ray.data.read_parquet(paths, filesystem=fs, shuffle=None) if paths else ray.data.from_items([])
        ds.context.execution_options.preserve_order = True
        return ds

    @property
    def train(self) -> Any:
        return self.dataset("train")

    @property
    def val(self) -> Any:
        return self.dataset("val")

    def reuse_line(self) -> str:
        if self.built:
            return f"data cache: built {self.uri} in {self.build_s:.1f}s"
        return (f"data cache: reused {self.uri} ({self.stats.seconds:.1f}s; building it took {self.build_s:.1f}s, "
                f"saved {max(self.build_s - self.stats.seconds, 0.0):.1f}s)")


@dataclass
class Kind:
    """What differs between raw text and SFT: how records are read, and how they become rows."""

    read: Callable[[Source, DataConfig], Any]
    texts: Callable[[Any, Source, DataConfig], Any]  # the rows a trained tokenizer learns from ({"text": ...})
    pack: Callable[[Any, Source, DataConfig, Any, str], Any]  # rows -> packed rows + stats rows (map_batches)
    columns: tuple[str, ...]
    is_stats: Callable[[dict, DataConfig], np.ndarray]  # rows that carry counters, not data


def _whole_files(src: Source, cfg: DataConfig) -> bool:
    """Text and JSON-lines files are read whole and split inside the tokenizing UDF (no Ray row
    per document); data.max_documents needs document rows to count."""
    return src.kind in ("text", "jsonl") and not cfg.max_documents


def _read_raw_text(src: Source, cfg: DataConfig) -> Any:
    if _whole_files(src, cfg):
        return read_files(src)
    docs = _read_documents(src, cfg)
    return docs.filter(lambda r: bool(r["text"])).limit(cfg.max_documents) if cfg.max_documents else docs


def _raw_texts(rows: Any, src: Source, cfg: DataConfig) -> Any:
    if not _whole_files(src, cfg):
        return rows
    return rows.flat_map(file_to_rows, fn_kwargs={"fmt": src.kind, "text_field": cfg.text_field,
                                                   "text_split": cfg.text_split})


def _pack_raw(rows: Any, src: Source, cfg: DataConfig, hf_tok: Any, tokenizer_dir: str) -> Any:
    """One fused UDF (split, encode_batch, pack) in a pool of single-threaded actors. Whole files:
    one actor per CPU (no more than files), all started at once, since reading a whole file is I/O
    and holds no CPU (reading.READ_CPUS), so every CPU tokenizes. Other sources (documents from
    Parquet, Hugging Face, ...) read in tasks that hold a CPU: the pool grows from one actor and
    leaves them one CPU, or it would starve its own input. Processes rather than the tokenizer's
    threads give the parallelism, so the Python around encode_batch (splitting, packing) runs in
    parallel too. One batch in flight per actor: a whole file's packed rows are one block, and
    queued ones would sit in the object store."""
    import ray
    import ray.data

    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    whole = _whole_files(src, cfg)
    actors = min(cpus, len(src.paths)) if whole else max(1, cpus - 1)
    kwargs = {"tokenizer_json": hf_tok.backend_tokenizer.to_str(), "eos_id": hf_tok.eos_token_id,
              "block_len": cfg.seq_len + 1, "threads": 1, "fmt": src.kind, "text_field": cfg.text_field,
              "text_split": cfg.text_split}
    return rows.map_batches(TokenizePack, fn_constructor_kwargs=kwargs, batch_format="numpy", num_cpus=1,
                            batch_size=1 if whole else 1024,
                            compute=ray.data.ActorPoolStrategy(min_size=actors if whole else 1, max_size=actors,
                                                               max_tasks_in_flight_per_actor=1))


def _tokenizer_kwargs(tokenizer_dir: str) -> dict[str, Any]:
    """What a record UDF needs to rebuild the tokenizer in its worker: the files, and a key naming
    their content (the worker caches one copy per key)."""
    files = tokenizer_files(tokenizer_dir)
    key = hashlib.sha256(b"".join(k.encode() + v for k, v in sorted(files.items()))).hexdigest()[:16]
    return {"tokenizer_files": files, "files_key": key}


def _pack_sft(rows: Any, src: Source, cfg: DataConfig, hf_tok: Any, tokenizer_dir: str) -> Any:
    return rows.map_batches(render_and_pack, batch_size=512, batch_format="numpy",
                            fn_kwargs={"fmt": cfg.format, "sft_json": cfg.sft.model_dump_json(), "seq_len": cfg.seq_len,
                                       **_tokenizer_kwargs(tokenizer_dir)})


def _pack_pairs(rows: Any, src: Source, cfg: DataConfig, hf_tok: Any, tokenizer_dir: str) -> Any:
    """Preference records -> one row per (chosen, rejected) pair, never packed (raylm.data.preference)."""
    return rows.map_batches(render_pairs, batch_size=512, batch_format="numpy",
                            fn_kwargs={"pref_json": cfg.preference.model_dump_json(), "seq_len": cfg.seq_len,
                                       **_tokenizer_kwargs(tokenizer_dir)})


def _pack_prompts(rows: Any, src: Source, cfg: DataConfig, hf_tok: Any, tokenizer_dir: str) -> Any:
    """Prompt records -> one row per prompt, never packed (raylm.data.prompts)."""
    return rows.map_batches(render_prompts, batch_size=512, batch_format="numpy",
                            fn_kwargs={"prompt_json": cfg.prompt.model_dump_json(), "seq_len": cfg.seq_len,
                                       **_tokenizer_kwargs(tokenizer_dir)})


def _read_sft(src: Source, cfg: DataConfig) -> Any:
    records = read_records(src, cfg)
    return records.limit(cfg.max_documents) if cfg.max_documents else records


RAW = Kind(read=_read_raw_text, texts=_raw_texts, pack=_pack_raw, columns=("input_ids",),
           is_stats=lambda b, cfg: b["length"] < cfg.seq_len + 1)
SFT = Kind(read=_read_sft, texts=lambda records, src, cfg: records.map(_record_text), pack=_pack_sft,
           columns=("input_ids", "labels", "position_ids", "tokens"), is_stats=lambda b, cfg: b["tokens"] == 0)
PREFERENCE = Kind(read=_read_sft, texts=SFT.texts, pack=_pack_pairs, columns=PAIR_COLUMNS,
                  is_stats=lambda b, cfg: b["chosen_tokens"] == 0)
PROMPT = Kind(read=_read_sft, texts=SFT.texts, pack=_pack_prompts, columns=PROMPT_COLUMNS,
              is_stats=lambda b, cfg: b["prompt_tokens"] == 0)
KINDS = {"preference": PREFERENCE, "prompt": PROMPT}


class Tally:
    """The counters riding on the stats rows, and the raw-text leftovers the driver packs last."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.counts: collections.Counter = collections.Counter()
        self.leftovers: list[np.ndarray] = []

    def add(self, rows: dict) -> None:
        if self.cfg.is_records:
            for c in rows["counts"]:
                if c:
                    self.counts.update(json.loads(c))
            return
        for name in COUNTERS:
            self.counts[name] += int(rows[name].sum())
        self.leftovers += [np.asarray(r[:n], dtype=np.int32) for r, n in zip(rows["input_ids"], rows["length"])]

    def stats(self, src: Source, vocab: int) -> DataStats:
        c, cfg = self.counts, self.cfg
        if not cfg.is_records:
            return DataStats(documents=c["documents"], tokens=c["tokens"], replaced=c["replaced"],
                             skipped_records=c["skipped"], files=c["files"], truncated_files=c["truncated"],
                             vocab_size=vocab)
        skipped = sum(v for k, v in c.items() if k.startswith("skip:"))
        return DataStats(documents=c["examples"], tokens=c["tokens"], files=len(src.paths), skipped_records=skipped,
                         vocab_size=vocab, trained_tokens=c["trained_tokens"], truncated_records=c["truncated"],
                         skipped_reasons=skipped_summary(c) if skipped else "")


class Router:
    """Each packed row goes to train or val by a seeded draw, in the stream's (deterministic) order.
    The stream's last row is held back so that a corpus asked for validation always gets a row."""

    def __init__(self, uri: str, cfg: DataConfig):
        self.cfg = cfg
        self.rng = np.random.default_rng([cfg.seed, 20])
        self.out = {"train": cache.SplitWriter(uri, "train"), "val": cache.SplitWriter(uri, "val")}
        self.carry: Optional[dict] = None

    def add(self, rows: dict) -> None:
        n = len(next(iter(rows.values())))
        if n == 0:
            return
        if self.carry is not None:
            rows = {k: np.concatenate([self.carry[k], rows[k]]) for k in rows}
            n += 1
        self._route({k: a[:n - 1] for k, a in rows.items()})
        self.carry = {k: a[n - 1:] for k, a in rows.items()}

    def _route(self, rows: dict, force_val: bool = False) -> None:
        n = len(next(iter(rows.values())))
        to_val = np.ones(n, bool) if force_val else self.rng.random(n) < self.cfg.val_fraction
        self.out["val"].add({k: a[to_val] for k, a in rows.items()})
        self.out["train"].add({k: a[~to_val] for k, a in rows.items()})

    def close(self) -> dict:
        if self.carry is not None:
            wants_val = self.cfg.val_fraction > 0 and self.out["val"].rows == 0 and self.out["train"].rows > 0
            self._route(self.carry, force_val=wants_val)
        return {split: {"rows": w.rows, "files": w.close()} for split, w in self.out.items()}


def prepare_data(cfg: DataConfig, verbose: bool = True, storage_path: Optional[str] = None) -> PreparedData:
    """The packed-token cache of `cfg`: reused when complete, else built (and the rebuild said).
    Ray must be initialised for a build. `storage_path` is train.storage_path (the cache lives in
    `<storage>/datasets/`); without it, under data.cache_dir."""
    t0 = time.perf_counter()
    found = cached_data(cfg, storage_path)
    if found is not None:
        return found
    src = resolve_source(cfg)
    uri = cache.cache_uri(cfg, src, storage_path)
    _, why = cache.open_cache(uri)
    if why:
        say(f"raylm: data cache {uri}: {why}; rebuilding it", event="data_cache_rebuild", uri=uri, why=why)
    try:
        return _build(cfg, src, uri, verbose, t0)
    except OSError as exc:  # storage that fails or fills up mid-build: the next run rebuilds
        raise StorageError(f"{uri}: cannot write the data cache ({exc}); the next run rebuilds it") from None


def cached_data(cfg: DataConfig, storage_path: Optional[str] = None) -> Optional[PreparedData]:
    """The complete cache of `cfg` if there is one (no Ray needed), else None."""
    t0 = time.perf_counter()
    uri = cache.cache_uri(cfg, resolve_source(cfg), storage_path)
    manifest, _ = cache.open_cache(uri)
    if manifest is None:
        return None
    stats = DataStats(**{**manifest["stats"], "seconds": time.perf_counter() - t0})
    return PreparedData(uri=uri, manifest=manifest, tokenizer_dir=_local_tokenizer(uri), stats=stats, built=False,
                        build_s=float(manifest["build_s"]))


def _build(cfg: DataConfig, src: Source, uri: str, verbose: bool, t0: float) -> PreparedData:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # deterministic row order -> deterministic split
    # blocks of about two tokenizer pieces (packing.CHUNK_BYTES), not Ray Data's 128 MiB: the store
    # holds a few blocks per operator, and a corpus may be streamed through a store of 80 MiB
    ctx.target_max_block_size = 2 * CHUNK_BYTES
    ctx.enable_progress_bars = verbose
    kind = KINDS.get(cfg.format) or (SFT if cfg.is_sft else RAW)
    rows = kind.read(src, cfg)
    tokenizer_dir, template = _tokenizer_for(src, cfg, kind.texts(rows, src, cfg))
    hf_tok = load_tokenizer(tokenizer_dir)
    if cfg.is_records and (cfg.format == "preference" or cfg.sft.train_on == "assistant"):
        check_template(hf_tok, f"data.chat_template={cfg.chat_template}" if cfg.chat_template
                       else f"the chat template of data.tokenizer={cfg.tokenizer}")
    packed = kind.pack(rows, src, cfg, hf_tok, tokenizer_dir)
    final, uri = uri, cache.private_uri(uri)  # build privately, publish whole (cache.publish)
    tally, router = Tally(cfg), Router(uri, cfg)
    for batch in packed.iter_batches(batch_size=None, batch_format="numpy"):  # streamed, never materialized
        stats_rows = kind.is_stats(batch, cfg)
        tally.add({k: v[stats_rows] for k, v in batch.items()})
        router.add({k: batch[k][~stats_rows] for k in kind.columns})
    stats = tally.stats(src, len(hf_tok))
    stats.chat_template = template if cfg.is_records else ""
    _check_not_empty(cfg, src, stats, tally, verbose)
    if not cfg.is_records:
        extra, stats.dropped_tokens = pack_remainders(tally.leftovers, cfg.seq_len + 1)
        if extra:
            router.add({"input_ids": np.stack(extra)})
    splits = router.close()
    stats.train_blocks, stats.val_blocks = splits["train"]["rows"], splits["val"]["rows"]
    stats.blocks = stats.train_blocks + stats.val_blocks
    if stats.blocks == 0:
        raise DataError(f"data.source={cfg.source}: {stats.tokens} tokens are fewer than one block of "
                        f"data.seq_len+1={cfg.seq_len + 1}; lower data.seq_len or add text")
    tok_uri = storage.join(uri, "tokenizer")
    storage.upload(tokenizer_dir, tok_uri)
    stats.seconds = time.perf_counter() - t0
    manifest = {"version": cache.CACHE_VERSION, "fingerprint": final.rstrip("/").rsplit("/", 1)[-1],
                "settings": cache.settings(cfg), "columns": list(kind.columns), "stats": asdict(stats),
                "build_s": stats.seconds, "tokenizer": {f"tokenizer/{k}": v for k, v in storage.list_files(tok_uri).items()},
                **splits}
    cache.write_manifest(uri, manifest)
    if not cache.publish(uri, final):  # another run of this config published first: read that one
        manifest = cache.open_cache(final)[0] or manifest
    return PreparedData(uri=final, manifest=manifest, tokenizer_dir=tokenizer_dir, stats=stats, built=True,
                        build_s=stats.seconds)


def _check_not_empty(cfg: DataConfig, src: Source, stats: DataStats, tally: Tally, verbose: bool) -> None:
    if cfg.is_records:
        summary = skipped_summary(tally.counts)
        truncated = tally.counts["truncated"]
        if verbose or stats.skipped_records:
            say(f"raylm: {summary}" + (f"; {truncated} truncated to seq_len={cfg.seq_len}" if truncated else ""),
                event="data_records", summary=summary, truncated=truncated)
        if stats.documents == 0:
            where = ", ".join(src.paths) or cfg.source
            section = f"data.{cfg.format}" if cfg.format in KINDS else "data.sft"
            raise DataError(f"{where}: no usable {cfg.format} record ({summary}); check {section} field names")
    elif stats.documents == 0:
        raise DataError(f"data.source={cfg.source}: the corpus is empty (no non-blank documents)")


def _local_tokenizer(uri: str) -> str:
    """The cache's tokenizer as a local folder (object storage: downloaded once per node)."""
    return storage.cached_copy(storage.join(uri, "tokenizer")) if storage.is_remote(uri) else storage.join(uri, "tokenizer")


def stats_dict(stats: DataStats) -> dict:
    return asdict(stats)
