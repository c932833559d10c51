"""The packed-token cache: the data stage's output, written once into storage and read by every run.

    <train.storage_path>/datasets/<fingerprint>/
      train/part-00000.parquet ...   packed rows (raw text: input_ids of seq_len + 1; SFT:
      val/part-00000.parquet ...     input_ids, labels, position_ids, tokens), small row groups
      tokenizer/                     the tokenizer the rows were made with
      raylm_dataset.json             fingerprint, stats, every file's size and row groups: last

The fingerprint covers everything that changes the rows: the source's listing (paths, sizes,
modification times; not ETags, see `_listing`), format, SFT and text settings, tokenizer, seq_len, val_fraction and seed. A
changed source file is a new fingerprint, never a silent reuse. As with checkpoints, the
manifest is written last: a cache without it (a build that was killed) or whose files do not
match it is never read; it is rebuilt, and the rebuild is said. A build writes into a private
folder beside the cache and publishes it whole (`publish`): two runs of one config at once both
succeed and leave one valid cache; neither ever deletes what the other is writing. Everything goes through
raylm.storage (pyarrow.fs), so the cache works alike on a local disk, a shared volume or s3://.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

import numpy as np

from raylm import storage
from raylm.config import DataConfig, expand
from raylm.data.sources import Source
from raylm.data.tokenizer import tokenizer_digest, tokenizer_folder
from raylm.errors import StorageError

CACHE_VERSION = 1  # bump when the layout or the packing changes: old caches are then never read
MANIFEST = "raylm_dataset.json"
ROW_GROUP_BYTES = 256 << 10  # small row groups: the unit of per-rank assignment and shuffling
FILE_BYTES = 64 << 20


def _listing(src: Source, cfg: DataConfig) -> list:
    """(path, size, mtime) of every file the source reads; what makes a changed file a new cache.

    No ETags: pyarrow.fs's FileInfo (pyarrow 26) has only path, type, size and mtime; an object's
    ETag is only in an opened file's metadata (one HEAD request per object), too slow for a
    corpus of thousands of objects on every run. On s3:// and gs:// the mtime is the object's
    Last-Modified, which every overwrite sets; what this misses is an overwrite with the same
    size within the same second (Last-Modified's resolution)."""
    if src.kind == "embedded":
        from pydoc_data import topics

        paths: tuple[str, ...] = (topics.__file__,)
    elif src.kind == "hf" and not src.paths:
        return [["hf", src.name, cfg.hf_split]]  # a hub dataset by name: the name is all we know
    else:
        paths = src.paths
    out = []
    for p in paths:
        fs, path = storage.filesystem(p)
        try:
            import pyarrow.fs as pafs

            info = fs.get_file_info(path)
            infos = (fs.get_file_info(pafs.FileSelector(path, recursive=True))
                     if info.type == pafs.FileType.Directory else [info])
        except OSError as exc:
            raise StorageError(f"{p}: cannot list it: {exc}") from None
        out += sorted([i.path, i.size, str(i.mtime)] for i in infos if i.type == pafs.FileType.File)
    return out


def _tokenizer_key(cfg: DataConfig) -> Any:
    """A named tokenizer (a folder, or a Hub id in the HF cache) is keyed by its files' contents, so a
    new revision is a new cache; a Hub id not downloaded yet by its name."""
    if cfg.tokenizer != "train":
        folder = tokenizer_folder(cfg.tokenizer)
        return tokenizer_digest(folder) if folder else [cfg.tokenizer, None]
    return [cfg.tokenizer, cfg.vocab_size]


def settings(cfg: DataConfig) -> dict:
    """The data settings that change the rows (what the fingerprint hashes besides the listing)."""
    keep = ("format", "text_field", "text_split", "hf_split", "seq_len", "val_fraction", "seed", "max_documents")
    out = {k: getattr(cfg, k) for k in keep}
    if cfg.is_sft:
        out["sft"] = cfg.sft.model_dump(mode="json")
    if cfg.format == "preference":
        out["preference"] = cfg.preference.model_dump(mode="json")
    if cfg.format == "prompt":
        out["prompt"] = cfg.prompt.model_dump(mode="json")
    if cfg.is_records and cfg.chat_template:  # the template's text: an edited file is a new cache
        from raylm.chat import chat_template_text

        out["chat_template"] = hashlib.sha256(chat_template_text(cfg.chat_template).encode()).hexdigest()
    return out


def fingerprint(cfg: DataConfig, src: Source) -> str:
    doc = {"version": CACHE_VERSION, "source": [src.kind, src.name], "listing": _listing(src, cfg),
           "tokenizer": _tokenizer_key(cfg), "settings": settings(cfg)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_uri(cfg: DataConfig, src: Source, storage_path: Optional[str]) -> str:
    """`<storage>/datasets/<fingerprint>`; without a storage path, under data.cache_dir."""
    root = storage.root(storage_path) if storage_path else expand(cfg.cache_dir)
    return storage.join(root, "datasets", fingerprint(cfg, src))


def open_cache(uri: str) -> tuple[Optional[dict], str]:
    """(manifest, "") for a complete cache; (None, why) when it is missing, cut off or corrupted."""
    try:
        found = storage.list_files(uri)
    except StorageError as exc:
        return None, f"cannot list it ({exc})"
    if not found:
        return None, ""
    if MANIFEST not in found:
        return None, f"incomplete (no {MANIFEST}: a build was cut off)"
    try:
        manifest = json.loads(storage.read_bytes(storage.join(uri, MANIFEST)))
        files = [f for split in ("train", "val") for f in manifest[split]["files"]]
        bad = next((f["path"] for f in files if found.get(f["path"]) != f["bytes"]), None)
        bad = bad or next((p for p in manifest["tokenizer"] if found.get(p) != manifest["tokenizer"][p]), None)
    except (StorageError, ValueError, KeyError, TypeError) as exc:
        return None, f"corrupted manifest ({exc})"
    if manifest.get("version") != CACHE_VERSION or not uri.rstrip("/").endswith(str(manifest.get("fingerprint"))):
        return None, "written by another version of raylm"
    if bad:
        return None, f"{bad} is missing or does not match the manifest"
    return manifest, ""


def rows_per_group(row_bytes: int) -> int:
    return int(np.clip(ROW_GROUP_BYTES // max(row_bytes, 1), 1, 4096))


class SplitWriter:
    """Rows of one split into Parquet shards of small row groups, through pyarrow.fs."""

    def __init__(self, uri: str, split: str):
        self.uri, self.split = uri, split
        self.files: list[dict] = []
        self.rows = 0
        self._pending: dict[str, list[np.ndarray]] = {}
        self._pending_rows = 0
        self._writer: Any = None
        self._stream: Any = None
        self._group_rows = 0
        self._file_groups: list[int] = []

    def add(self, cols: dict[str, np.ndarray]) -> None:
        n = len(next(iter(cols.values())))
        if n == 0:
            return
        if not self._group_rows:
            self._group_rows = rows_per_group(sum(_row_bytes(a) for a in cols.values()))
        for k, a in cols.items():
            self._pending.setdefault(k, []).append(a)
        self._pending_rows += n
        self.rows += n
        if self._pending_rows >= self._group_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self._pending_rows:
            return
        cols = {k: np.concatenate(v) for k, v in self._pending.items()}
        n_full = self._pending_rows if final else self._pending_rows // self._group_rows * self._group_rows
        for at in range(0, n_full, self._group_rows):
            self._write_group({k: a[at:min(at + self._group_rows, n_full)] for k, a in cols.items()})
        self._pending = {k: [a[n_full:]] for k, a in cols.items()} if n_full < self._pending_rows else {}
        self._pending_rows -= n_full

    def _write_group(self, cols: dict[str, np.ndarray]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({k: _to_arrow(a) for k, a in cols.items()})
        if self._writer is None:
            rel = f"{self.split}/part-{len(self.files):05d}.parquet"
            fs, path = storage.filesystem(storage.join(self.uri, rel))
            fs.create_dir(os.path.dirname(path), recursive=True)
            self._stream = fs.open_output_stream(path)
            self._writer = pq.ParquetWriter(self._stream, table.schema, compression="zstd")
            self.files.append({"path": rel, "row_groups": []})
        self._writer.write_table(table, row_group_size=len(table))
        self.files[-1]["row_groups"].append(len(table))
        if sum(self.files[-1]["row_groups"]) * table.nbytes / len(table) >= FILE_BYTES:
            self._close_file()

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._stream.close()
            self._writer = self._stream = None

    def close(self) -> list[dict]:
        self._flush(final=True)
        self._close_file()
        sizes = storage.list_files(storage.join(self.uri, self.split)) if self.files else {}
        for f in self.files:
            f["bytes"] = sizes[f["path"].split("/", 1)[1]]
        return self.files


def _row_bytes(a: np.ndarray) -> int:
    """One row's size; a string column (prompt records) by its first row's length."""
    return len(str(a[0]).encode()) if a.dtype == object else a[0].nbytes


def _to_arrow(a: np.ndarray) -> Any:
    import pyarrow as pa

    if a.ndim == 1:
        return pa.array(a)
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(a).reshape(-1)), a.shape[1])


def from_arrow(column: Any) -> np.ndarray:
    """A fixed-size-list column back to a 2-D array (a plain column to 1-D), without a Python row."""
    import pyarrow as pa

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_fixed_size_list(column.type):
        return column.values.to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)
    return column.to_numpy(zero_copy_only=False)


def private_uri(uri: str) -> str:
    """Where one build writes, beside the cache it builds: no other run reads or deletes it."""
    import uuid

    return f"{uri.rstrip('/')}.build-{uuid.uuid4().hex[:12]}"


def _remove(uri: str) -> None:
    fs, path = storage.filesystem(uri)
    try:
        fs.delete_dir(path)
    except (OSError, FileNotFoundError):
        pass


def publish(private: str, uri: str) -> bool:
    """Move a finished build (manifest written last) from its private folder to `uri`; False when
    another run published a complete cache first (then this build is dropped, and that one is read).

    A local folder is renamed into place (atomic; a cut-off build there is moved aside first). An
    object store has no rename: the files are copied, the manifest last, so `uri` never reads as
    complete before it is; two runs copying at once copy the same rows (a build is deterministic)."""
    if open_cache(uri)[0] is not None:
        _remove(private)
        return False
    fs, path = storage.filesystem(uri)
    if not storage.is_remote(uri):
        if os.path.isdir(path):  # a cut-off build's leftovers: aside, then gone
            aside = private_uri(uri) + ".stale"
            try:
                os.rename(path, aside)
                _remove(aside)
            except OSError:
                pass
        try:
            os.rename(storage.filesystem(private)[1], path)
            return True
        except OSError:  # another run renamed its build into place between the two renames
            _remove(private)
            return False
    files = storage.list_files(private)
    for rel in sorted(files, key=lambda r: r == MANIFEST):  # the manifest last
        src_path = storage.filesystem(storage.join(private, rel))[1]
        dst_path = storage.filesystem(storage.join(uri, rel))[1]
        fs.copy_file(src_path, dst_path)
    _remove(private)
    return True


def write_manifest(uri: str, manifest: dict) -> None:
    """Last: the cache becomes readable only once every shard and the tokenizer are in place."""
    storage.write_json(storage.join(uri, MANIFEST), manifest)
