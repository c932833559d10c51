"""Reading raylm's artifacts wherever they live: local paths (a laptop, or a shared volume mounted
on every pod) and object storage (`s3://`, `gs://`), all through `pyarrow.fs`, the filesystem
layer Ray Train itself writes checkpoints with.

Credentials and endpoints come from the standard environment (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL` for S3-compatible stores, `GOOGLE_APPLICATION_CREDENTIALS`
for GCS). A missing bucket, object or credential is a `StorageError` naming the URI.

`cached_copy` brings a remote directory (a checkpoint) to a node-local cache once: it downloads
into a temporary folder and renames it into place, so a half-downloaded copy is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

from raylm.config import InputError

DEFAULT_CACHE = "~/.cache/raylm/remote"


class StorageError(InputError):
    """A storage URI that cannot be read (missing, unreachable, no credentials); names the URI."""


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


def read_json(uri: str) -> Any:
    try:
        return json.loads(read_bytes(uri))
    except ValueError as exc:
        raise StorageError(f"{uri}: not valid JSON: {exc}") from None


def cached_copy(uri: str, cache_dir: str = DEFAULT_CACHE) -> str:
    """A local directory holding the remote directory `uri` (downloaded once per node); a local
    path is returned as it is. The cache is keyed by the URI and the listing of its files (name,
    size, modification time), so a directory written again under the same URI is fetched again."""
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
    return dest
