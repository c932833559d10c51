"""Reading: a resolved `Source` -> Ray Data rows, for both kinds of corpus.

    raw text (txt | jsonl | parquet | HF | embedded) -> documents {text, replaced, skipped,
                                                        files, truncated}
    chat / instruction (jsonl | parquet | HF)        -> records {record: the record's JSON text}

The parsing helpers (decode, split, JSON lines, gunzip) are pure and unit-tested; the Ray Data
readers apply them per file. Counters (undecodable bytes replaced, records skipped, files read,
truncated archives) ride on one extra row per file, so the data stage sums them without an
aggregation pass. Records stay JSON text: chat records are ragged and their fields optional,
which Arrow schemas handle badly; each batch parses its own (`packing.render_and_pack`).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

from raylm.config import DataConfig
from raylm.data.sources import DataError, Source, embedded_documents, load_hf_split

# Reading a file whole is I/O: its task holds no CPU, so the tokenizing actors can hold them all
# (raylm.data.prepare._pack_raw). Nothing then bounds how many reads run at once, and Ray Data's
# object store budget is enforced only on what it has already seen: at most one read per CPU
# in flight keeps a corpus several times the store from filling it (and spilling).
READ_CPUS = 0

if TYPE_CHECKING:  # Ray is imported lazily: unit tests and config errors never start it.
    import ray.data


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


# ------------------------------------------------------------------ raw text -> documents (Ray Data)


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
    return read_files(src).flat_map(file_to_rows, fn_kwargs={"fmt": src.kind, "text_field": cfg.text_field,
                                                              "text_split": cfg.text_split})


def read_files(src: Source) -> "ray.data.Dataset":
    """A text / jsonl source as one row per file: {path, bytes}."""
    import ray.data

    if any(p.endswith(".gz") for p in src.paths) and not any("://" in p for p in src.paths):
        # Arrow gunzips .gz itself (by extension) and fails the whole read on a truncated
        # archive; local files are read raw instead, so `_maybe_gunzip` keeps what it can.
        ds = ray.data.from_items([{"path": p} for p in src.paths], override_num_blocks=min(len(src.paths), 64))
        return ds.map(_read_raw, num_cpus=READ_CPUS, concurrency=_read_concurrency())
    return ray.data.read_binary_files(list(src.paths), include_paths=True, num_cpus=READ_CPUS,
                                      concurrency=_read_concurrency())


def _read_concurrency() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


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


# ------------------------------------------------------------------ chat / instruction -> records (Ray Data)


def jsonl_lines(row: dict) -> list[dict]:
    """One .jsonl file -> one row per non-blank line (JSON parsing happens in render_and_pack)."""
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

    if src.kind == "hf":
        return ray.data.from_huggingface(load_hf_split(src, cfg)).map_batches(rows_to_records, batch_format="pandas")
    if src.kind == "parquet":
        return ray.data.read_parquet(list(src.paths)).map_batches(rows_to_records, batch_format="pandas")
    if src.kind != "jsonl":
        raise DataError(f"data.source={cfg.source}: data.format={cfg.format} reads .jsonl, .parquet or a "
                        f"Hugging Face dataset, not {src.kind}")
    return ray.data.read_binary_files(list(src.paths), include_paths=True).flat_map(jsonl_lines)
