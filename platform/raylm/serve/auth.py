"""API keys: where they come from (env var, key file, or a generated one), and how they are checked.

Keys are gathered on the driver (or in Serve's app-build task) and only their SHA-256 hashes
travel to the replicas as init args: replicas may run on other nodes that have neither the env
var nor the file, and a replica's memory or a pickled deployment never holds a usable key.
A presented key is hashed and compared with every stored hash in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

from raylm.config import ServeConfig
from raylm.errors import ApiKeyError

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
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    write_private(full, key + "\n")
    return key, str(full)


def setup_keys(cfg: ServeConfig, environ: Optional[Mapping[str, str]] = None,
               generated_path: str = GENERATED_KEY_FILE) -> KeySetup:
    """The key hashes for the replicas. With `require_api_key` and nothing configured, a key is
    generated into ~/.raylm/api_key; `source` names where keys live (never the key itself)."""
    keys = load_api_keys(cfg, environ)
    places = [f"env ${cfg.api_key_env}"] if keys_from_env(cfg.api_key_env, os.environ if environ is None else environ) else []
    if cfg.api_key_file:
        places.append(f"file {Path(cfg.api_key_file).expanduser()}")
    if keys:
        return KeySetup(tuple(hash_key(k) for k in keys), " and ".join(places))
    if not cfg.require_api_key:
        return KeySetup((), "none (serve.require_api_key=false: the API is open)")
    key, path = generated_key(generated_path)
    return KeySetup((hash_key(key),), f"file {path} (generated)", generated_file=path)


class KeyChecker:
    """Checks `Authorization: Bearer <key>` against stored SHA-256 hashes in constant time."""

    def __init__(self, hashes: tuple[str, ...] | list[str], required: bool = True):
        self._hashes = [bytes.fromhex(h) for h in hashes]
        self.required = required

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
