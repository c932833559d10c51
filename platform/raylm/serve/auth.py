"""API keys: where they come from (env var, key file, or a generated one), and how they are checked.

Keys are gathered on the driver (or in Serve's app-build task) and only their SHA-256 hashes
travel to the replicas as init args: replicas may run on other nodes that have neither the env
var nor the file, and a replica's memory or a pickled deployment never holds a usable key.
A presented key is hashed and compared with every stored hash in constant time.

Keys can also be rotated on a running endpoint: `serve.api_key_hashes_path` is a file of hashes
only (local, s3://, gs://) that every replica re-reads every `serve.api_keys_reload_s`
(`ReloadingKeys`); `raylm keys new` / `raylm keys revoke` edit it. A read that fails keeps the
last good set: storage that is briefly unreachable must neither open the API nor lock clients out.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

from raylm import storage
from raylm.config import ServeConfig
from raylm.errors import ApiKeyError, StorageError
from raylm.serve.refresh import DueRefresh

logger = logging.getLogger(__name__)

GENERATED_KEY_FILE = "~/.raylm/api_key"
KEY_PREFIX = "sk-raylm-"


@dataclass(frozen=True)
class KeySetup:
    """The hashes replicas check against, and a user-facing line saying where the keys are."""

    hashes: tuple[str, ...]
    source: str
    generated_file: Optional[str] = None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_id_of_hash(digest: str) -> str:
    """A key's id (metrics label, per-key limit overrides): the first 12 hex digits of its SHA-256."""
    return digest[:12]


def parse_key_hashes(text: str, source: str) -> dict[str, str]:
    """`<sha256 hex> [name ...]` per line, blank lines and '#' comments ignored -> {hash: name}.
    Any other line makes the whole file invalid (naming the line): half of an edited file must
    never be taken for the new set."""
    hashes: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split(None, 1)
        if not fields:
            continue
        digest = fields[0].lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ApiKeyError(f"serve.api_key_hashes_path={source}: line {number} is not a SHA-256 hex digest "
                              f"(64 hex digits, then an optional name); it holds hashes, never keys")
        hashes[digest] = fields[1].strip() if len(fields) > 1 else ""
    return hashes


def read_key_hashes(uri: str) -> dict[str, str]:
    """The hashes file (local or object storage) as {hash: name}; ApiKeyError naming it when it
    cannot be read or holds something else."""
    try:
        raw = storage.read_bytes(uri)
    except StorageError as exc:
        raise ApiKeyError(f"serve.api_key_hashes_path={uri}: {exc}") from None
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise ApiKeyError(f"serve.api_key_hashes_path={uri}: not UTF-8 text") from None
    return parse_key_hashes(text, uri)


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def add_key_hash(uri: str, key: str, name: str = "") -> str:
    """Append a key's hash (and name) to the hashes file, creating it; returns the key id. The file
    is rewritten whole (an object store has no append), so running replicas read all or nothing."""
    if any(c in name for c in "#\n\r"):
        raise ApiKeyError(f"--name {name!r}: a key name must not hold '#' or line breaks")
    text = _hashes_text(uri)
    parse_key_hashes(text, uri)  # refuse to add to a file that is invalid already
    digest = hash_key(key)
    line = f"{digest} {name}".rstrip()
    storage.write_bytes(uri, (text + ("" if not text or text.endswith("\n") else "\n") + line + "\n").encode())
    return key_id_of_hash(digest)


def revoke_key_hash(uri: str, key_id: str) -> list[str]:
    """Remove the lines whose hash starts with `key_id` (12+ hex digits) from the hashes file;
    returns the removed lines. ApiKeyError when no key has that id."""
    key_id = key_id.strip().lower()
    if len(key_id) < 12 or any(c not in "0123456789abcdef" for c in key_id):
        raise ApiKeyError(f"{key_id!r}: not a key id (at least the first 12 hex digits of the key's SHA-256)")
    text = _hashes_text(uri, must_exist=True)
    parse_key_hashes(text, uri)  # refuse to rewrite a file that is invalid already
    kept, removed = [], []
    for line in text.splitlines():
        (removed if line.split("#", 1)[0].strip().lower().startswith(key_id) else kept).append(line)
    if not removed:
        raise ApiKeyError(f"no key with id {key_id} in {uri}")
    storage.write_bytes(uri, "".join(line + "\n" for line in kept).encode())
    return removed


def _hashes_text(uri: str, must_exist: bool = False) -> str:
    if storage.kind(uri) == "missing" and not must_exist:
        return ""
    try:
        return storage.read_bytes(uri).decode()
    except (StorageError, UnicodeDecodeError) as exc:
        raise ApiKeyError(f"serve.api_key_hashes_path={uri}: {exc}") from None


def keys_from_env(var: str, environ: Mapping[str, str]) -> list[str]:
    """Comma-separated keys from an env var; blanks are ignored."""
    return [k.strip() for k in environ.get(var, "").split(",") if k.strip()]


def keys_from_file(path: str) -> list[str]:
    """One key per line; blank lines and '#' comments are ignored. A missing file is an error:
    a configured key file that is not there must not silently open (or close) the API."""
    full = Path(path).expanduser()
    try:
        lines = full.read_text().splitlines()
    except OSError as exc:
        raise ApiKeyError(f"serve.api_key_file={path}: cannot read {full}: {exc.strerror or exc}") from None
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def load_api_keys(cfg: ServeConfig, environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """All configured keys: the env var named by `serve.api_key_env`, then `serve.api_key_file`."""
    environ = os.environ if environ is None else environ
    keys = keys_from_env(cfg.api_key_env, environ)
    if cfg.api_key_file:
        keys += keys_from_file(cfg.api_key_file)
    return list(dict.fromkeys(keys))


def write_private(path: Path, text: str) -> None:
    """Create/replace a file readable by its owner only (0600), never briefly world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def generated_key(path: str = GENERATED_KEY_FILE) -> tuple[str, str]:
    """The key in ~/.raylm/api_key, created (random, 0600) when absent; kept across restarts so
    clients keep working. Returns (key, file path)."""
    full = Path(path).expanduser()
    if full.is_file():
        existing = [line.strip() for line in full.read_text().splitlines() if line.strip()]
        if existing:
            return existing[0], str(full)
    key = new_key()
    write_private(full, key + "\n")
    return key, str(full)


def setup_keys(cfg: ServeConfig, environ: Optional[Mapping[str, str]] = None,
               generated_path: str = GENERATED_KEY_FILE) -> KeySetup:
    """The key hashes for the replicas. With `require_api_key` and nothing configured, a key is
    generated into ~/.raylm/api_key; `source` names where keys live (never the key itself).
    A hashes file (serve.api_key_hashes_path) is read here once, so a path that cannot be read
    fails the deploy; the replicas read it themselves (its hashes are not in `hashes`)."""
    keys = load_api_keys(cfg, environ)
    places = [f"env ${cfg.api_key_env}"] if keys_from_env(cfg.api_key_env, os.environ if environ is None else environ) else []
    if cfg.api_key_file:
        places.append(f"file {Path(cfg.api_key_file).expanduser()}")
    if cfg.api_key_hashes_path:
        listed = read_key_hashes(cfg.api_key_hashes_path)
        places.append(f"hashes file {cfg.api_key_hashes_path} ({len(listed)} key(s), re-read every "
                      f"{cfg.api_keys_reload_s:g} s)")
    if keys or cfg.api_key_hashes_path:  # a hashes file, even empty (all revoked), is the keys' source
        return KeySetup(tuple(hash_key(k) for k in keys), " and ".join(places))
    if not cfg.require_api_key:
        return KeySetup((), "none (serve.require_api_key=false: the API is open)")
    key, path = generated_key(generated_path)
    return KeySetup((hash_key(key),), f"file {path} (generated)", generated_file=path)


class KeyChecker:
    """Checks `Authorization: Bearer <key>` against stored SHA-256 hashes in constant time."""

    def __init__(self, hashes: tuple[str, ...] | list[str], required: bool = True):
        self.hashes = tuple(hashes)
        self._hashes = [bytes.fromhex(h) for h in hashes]
        self.required = required

    def __len__(self) -> int:
        return len(self._hashes)

    @staticmethod
    def bearer(header: Optional[str]) -> Optional[str]:
        if not header:
            return None
        scheme, _, token = header.strip().partition(" ")
        return (token.strip() or None) if scheme.lower() == "bearer" else None

    @classmethod
    def key_id(cls, header: Optional[str]) -> str:
        """The label per-key metrics use: the first 12 hex digits of the presented key's SHA-256
        (what replicas hold anyway; the key cannot be recovered from it), "none" without a key."""
        token = cls.bearer(header)
        return hashlib.sha256(token.encode()).hexdigest()[:12] if token else "none"

    def allows(self, header: Optional[str]) -> bool:
        if not self.required:
            return True
        token = self.bearer(header)
        if token is None:
            return False
        digest = hashlib.sha256(token.encode()).digest()
        ok = False
        for stored in self._hashes:  # no early exit: time does not depend on which key matched
            ok |= hmac.compare_digest(digest, stored)
        return ok


class ReloadingKeys:
    """The keys a replica accepts: the fixed hashes it was deployed with (env var, key file) plus
    those in the hashes file, re-read at most every `reload_s`.

    The re-read runs in a thread when a request finds the set due, so the event loop is never
    blocked by storage; requests wait for it up to `max_wait_s` (so a revoked key is refused from
    the first request after the reload is due, when storage answers in time), then go on with the
    last good set. A read that fails (missing, unreadable, malformed) keeps the last good set and
    logs a warning; before the first good read only the fixed hashes are accepted."""

    FIRST_WAIT_S = 30.0

    def __init__(self, hashes: Iterable[str], path: Optional[str] = None, reload_s: float = 10.0,
                 required: bool = True, clock: Callable[[], float] = time.monotonic,
                 read: Callable[[str], dict[str, str]] = read_key_hashes, max_wait_s: float = 2.0):
        self.fixed, self.path, self.reload_s, self.required = tuple(hashes), path, reload_s, required
        self.clock, self.read, self.max_wait_s = clock, read, max_wait_s
        self.checker = KeyChecker(self.fixed, required=required)
        self.loaded = False
        self._refresh = DueRefresh(self._reload, reload_s, clock)

    async def current(self) -> "KeyChecker":
        """The checker to use now, reloading the file first when it is due."""
        if not self.path or not self.required:
            return self.checker
        if not await self._refresh.wait(self.max_wait_s if self.loaded else self.FIRST_WAIT_S):
            logger.warning("serve.api_key_hashes_path=%s: still reading it; using the last good set of keys",
                           self.path)
        return self.checker

    async def _reload(self) -> None:
        try:
            listed = await asyncio.to_thread(self.read, self.path)
        except Exception as exc:  # noqa: BLE001 - whatever the storage raises, keep serving the last good set
            kept = f"{len(self.checker)} key(s) from the last good read" if self.loaded else \
                f"only the {len(self.fixed)} deployed key(s) until it can be read"
            logger.warning("API keys not reloaded (%s); keeping %s", exc, kept)
        else:
            hashes = tuple(dict.fromkeys((*self.fixed, *listed)))
            if not self.loaded or set(hashes) != set(self.checker.hashes):
                logger.info("API keys: %d from %s, %d deployed", len(listed), self.path, len(self.fixed))
            self.checker, self.loaded = KeyChecker(hashes, required=self.required), True
