"""Where the corpus is: `data.source` resolved to a `Source` before anything is read.

A source is local files (one file, a folder, a glob), a remote URI Ray Data reads itself, a
Hugging Face dataset (`hf:name` or a folder saved with save_to_disk), or the embedded corpus
(Python's own help topics). Resolving is pure and runs on the driver, so a missing path, an
empty folder or a mix of formats fails at once, naming `data.source`, before Ray does any work.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from typing import Any

from raylm.config import RECORD_FORMATS, DataConfig, expand
from raylm.errors import DataError

TEXT_EXTS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".json": "jsonl",
             ".parquet": "parquet"}
REMOTE_PREFIXES = ("s3://", "gs://", "gcs://", "abfss://", "az://", "hdfs://", "http://", "https://")


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
    if cfg.format not in ("auto", *RECORD_FORMATS):
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
                       if os.path.isfile(p) and (cfg.format not in ("auto", *RECORD_FORMATS) or os.path.splitext(p.removesuffix(".gz"))[1].lower() in TEXT_EXTS))
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
