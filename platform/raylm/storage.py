"""Reading raylm's artifacts wherever they live: local paths (a laptop, or a shared volume mounted
on every pod) and object storage (`s3://`, `gs://`), all through `pyarrow.fs`, the filesystem
layer Ray Train itself writes checkpoints with.

Credentials and endpoints come from the standard environment (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL` for S3-compatible stores, `GOOGLE_APPLICATION_CREDENTIALS`
for GCS). A missing bucket, object or credential is a `StorageError` naming the URI.

This module owns the layout of runs, sweeps and checkpoints (below) and every read and write of
it: train, tune, status, serve and the k8s renderer build their paths here.

`cached_copy` brings a remote directory (a checkpoint) to a node-local cache once: it downloads
into a temporary folder and renames it into place, so a half-downloaded copy is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from typing import Any, Optional

from raylm.errors import StorageError

DEFAULT_CACHE = "~/.cache/raylm/remote"


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str):
    """(pyarrow filesystem, path within it) for a local path or a URI."""
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
    try:
        return pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise StorageError(f"{uri}: cannot open this storage: {exc}") from None


def join(base: str, *parts: str) -> str:
    """`base/part/...` for a local path or a URI."""
    if not is_remote(base):
        return os.path.join(base, *parts)
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0] if is_remote(uri) else os.path.dirname(os.path.abspath(uri))


def kind(uri: str) -> str:
    """'file', 'dir' or 'missing'."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    try:
        info = fs.get_file_info(path)
    except OSError as exc:
        raise StorageError(f"{uri}: cannot reach it: {exc}") from None
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(info.type, "missing")


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"{uri}: not found") from None
    except OSError as exc:
        raise StorageError(f"{uri}: cannot read it: {exc}") from None


def read_head(uri: str, length: int) -> tuple[bytes, int]:
    """The first `length` bytes of a file and its size, without reading the rest (a checkpoint's
    weights may be GBs in a bucket)."""
    fs, path = filesystem(uri)
    try:
        with fs.open_input_file(path) as f:
            return f.read(length), f.size()
    except FileNotFoundError:
        raise StorageError(f"{uri}: not found") from None
    except OSError as exc:
        raise StorageError(f"{uri}: cannot read it: {exc}") from None


def read_json(uri: str) -> Any:
    try:
        return json.loads(read_bytes(uri))
    except ValueError as exc:
        raise StorageError(f"{uri}: not valid JSON: {exc}") from None


def cached_copy(uri: str, cache_dir: str = DEFAULT_CACHE, max_bytes: Optional[int] = None) -> str:
    """A local directory holding the remote directory `uri` (downloaded once per node); a local
    path is returned as it is. The cache is keyed by the URI and the listing of its files (name,
    size, modification time), so a directory written again under the same URI is fetched again.
    With `max_bytes` the cache is an LRU by size (`prune_cache`); every use marks a copy recent."""
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return os.path.abspath(os.path.expanduser(uri))
    fs, path = filesystem(uri)
    try:
        listing = sorted((i.path, i.size, str(i.mtime)) for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)))
    except (OSError, FileNotFoundError) as exc:
        raise StorageError(f"{uri}: cannot list it: {exc}") from None
    if not listing:
        raise StorageError(f"{uri}: no files there")
    key = hashlib.sha256(json.dumps([uri, listing]).encode()).hexdigest()[:20]
    dest = os.path.join(os.path.expanduser(cache_dir), key)
    if os.path.isdir(dest):
        os.utime(dest)  # recently used
        prune_cache(cache_dir, max_bytes, keep=dest)
        return dest
    tmp = f"{dest}.tmp{os.getpid()}"
    os.makedirs(tmp, exist_ok=True)
    try:
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        os.rename(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.isdir(dest):  # another replica on this node finished the same download first
            return dest
        raise StorageError(f"{uri}: cannot download it: {exc}") from None
    prune_cache(cache_dir, max_bytes, keep=dest)
    return dest


def _tree_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files
               if not os.path.islink(os.path.join(d, f)))


def prune_cache(cache_dir: str, max_bytes: Optional[int], keep: str = "") -> list[str]:
    """Delete the least recently used copies (by their folder's mtime, which `cached_copy` sets at
    each use) until the cache holds at most `max_bytes`; never `keep` (the copy just handed out)
    nor a download in progress. Returns the deleted folders. An engine that loaded a deleted copy
    keeps its weights (in memory, and open files outlive their names)."""
    root = os.path.expanduser(cache_dir)
    if max_bytes is None or not os.path.isdir(root):
        return []
    entries = [os.path.join(root, name) for name in os.listdir(root) if ".tmp" not in name]
    entries = [(os.path.getmtime(p), p, _tree_bytes(p)) for p in entries if os.path.isdir(p)]
    total, deleted = sum(size for *_, size in entries), []
    for _, path, size in sorted(entries):
        if total <= max_bytes:
            break
        if os.path.abspath(path) == os.path.abspath(keep):
            continue
        shutil.rmtree(path, ignore_errors=True)
        total -= size
        deleted.append(path)
    return deleted


# ------------------------------------------------------------------ the layout
#
#   <train.storage_path>/
#     <train.run_name>/                 one training run (Ray Train's experiment folder)
#       step_00000040/                  a checkpoint (see train/checkpoint.py), manifest last
#       metrics.jsonl, tensorboard/     rank 0's log (object storage: uploaded at each checkpoint)
#     <tune.sweep_name>/                one sweep
#       tune/                           Ray Tune's experiment (restorable)
#       trials/<trial_id>/              each trial's run, laid out as above
#       best.json, trials.md, <metric>.png

STEP_PREFIX = "step_"
METRICS_FILE = "metrics.jsonl"
BEST_JSON = "best.json"


def read_run_log(run_dir: str) -> list[dict]:
    """The records of a run's metrics.jsonl, oldest first; [] when it has none (yet). A line cut
    off by a crash is skipped."""
    names = list_dir(run_dir)
    if METRICS_FILE not in names:
        return []
    records = []
    for line in read_bytes(join(run_dir, METRICS_FILE)).decode().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def root(storage_path: str) -> str:
    """`train.storage_path` as a URI or an absolute local path (~ expanded)."""
    return storage_path if is_remote(storage_path) else os.path.abspath(os.path.expanduser(storage_path.removeprefix("file://")))


def run_dir(storage_path: str, run_name: str) -> str:
    return join(root(storage_path), run_name)


def sweep_dir(storage_path: str, sweep_name: str) -> str:
    return join(root(storage_path), sweep_name)


def trials_dir(sweep: str) -> str:
    return join(sweep, "trials")


def tune_dir(sweep: str) -> str:
    return join(sweep, "tune")


def best_json(sweep: str) -> str:
    return join(sweep, BEST_JSON)


def step_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def step_dirs(run: str) -> list[str]:
    """The run's `step_*` folders, newest step first (none when the run does not exist yet)."""
    return [join(run, name) for name in sorted((n for n in list_dir(run) if n.startswith(STEP_PREFIX)), reverse=True)]


def from_ray(path: str, fs: Any) -> str:
    """A URI for a path Ray hands out with its pyarrow filesystem (`Checkpoint.path`,
    `Result.path` lose the scheme: "bucket/runs/x" on S3)."""
    name = getattr(fs, "type_name", "local")
    if name in ("local", "mock") or path.startswith("/"):
        return path
    return f"{'gs' if name == 'gcs' else name}://{path}"


# ------------------------------------------------------------------ reading and writing


def list_dir(uri: str, folders_only: bool = False) -> list[str]:
    """Names directly under `uri` (files and folders, or only folders); [] when it does not exist."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as exc:
        raise StorageError(f"{uri}: cannot list it: {exc}") from None
    return sorted(i.base_name for i in infos if not folders_only or i.type == pafs.FileType.Directory)


def list_files(uri: str) -> dict[str, int]:
    """Every file under `uri`, by path relative to it, with its size in bytes."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except OSError as exc:
        raise StorageError(f"{uri}: cannot list it: {exc}") from None
    base = path.rstrip("/") + "/"
    return {i.path[len(base):]: i.size for i in infos if i.type == pafs.FileType.File}


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file so no reader sees part of it: a local file is written beside and
    renamed; an object store PUT is atomic already."""
    fs, path = filesystem(uri)
    try:
        if not is_remote(uri):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
            return
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as exc:
        raise StorageError(f"{uri}: cannot write it: {exc}") from None


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2).encode())


def upload(local_path: str, uri: str) -> None:
    """Copy a local file or folder to `uri` (object storage), or into place (local)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    try:
        if os.path.isdir(local_path):
            fs.create_dir(path, recursive=True)
            pafs.copy_files(local_path, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        else:
            with open(local_path, "rb") as f:
                write_bytes(uri, f.read())
    except OSError as exc:
        raise StorageError(f"{uri}: cannot upload {local_path} there: {exc}") from None


def download(uri: str, local_dir: str) -> str:
    """Copy the remote folder `uri` into `local_dir` (created) and return it."""
    import pyarrow.fs as pafs

    fs, path = filesystem(uri)
    os.makedirs(local_dir, exist_ok=True)
    try:
        pafs.copy_files(path, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except OSError as exc:
        raise StorageError(f"{uri}: cannot download it: {exc}") from None
    return local_dir


def check_writable(uri: str) -> None:
    """Fail before any cluster resource is asked for when `uri` cannot be written: a missing
    bucket, missing or wrong credentials, an unreachable endpoint. Writes and deletes a probe."""
    try:
        fs, path = filesystem(uri)
    except StorageError as exc:
        raise StorageError(f"train.storage_path={exc}") from None
    probe = f"{path.rstrip('/')}/.raylm-probe-{uuid.uuid4().hex[:12]}"
    try:
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"raylm")
        fs.delete_file(probe)
    except OSError as exc:
        raise StorageError(f"train.storage_path={uri}: cannot write there ({exc})") from None
