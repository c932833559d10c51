"""One promotion at a time per app: a lock beside the promotion history
(`<storage>/serve/<app_name>/promotion.lock`), held from reading the live model to recording the
outcome. Two promotes at once took the same version number, and a failure path redeployed a stale
"previous" over the other's model.

Locally the lock is created with O_EXCL, so exactly one process gets it. On object storage pyarrow
has no conditional write (pyarrow.fs's output streams expose no `If-None-Match: *`), so the lock is
written when absent and read back: two writers within the same moment can both believe they hold
it. Promotions from one CI job at a time are safe there; racing ones need a local or NFS
storage_path, or a conditional PUT through the cloud's own client (not done here).

A lock whose holder is gone is taken over, with a message: its process no longer runs on this host,
or its `stale_after_s` ran out (a holder on another machine that died).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import time
import uuid
from contextlib import contextmanager
from typing import Iterator, Optional

from raylm import storage
from raylm.config import RaylmConfig
from raylm.console import say
from raylm.errors import InputError
from raylm.lifecycle.history import history_uri

LOCK_FILE = "promotion.lock"
STALE_AFTER_S = 3600.0  # longer than any gate's evaluation plus a rollout


class PromotionBusy(InputError):
    """Another promotion, rollback or deploy of the app holds its lock."""


def lock_uri(cfg: RaylmConfig) -> str:
    return storage.join(storage.parent(history_uri(cfg)), LOCK_FILE)


def _create(uri: str, holder: dict) -> bool:
    text = json.dumps(holder)
    if not storage.is_remote(uri):
        _, path = storage.filesystem(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    if storage.kind(uri) != "missing":
        return False
    storage.write_bytes(uri, text.encode())
    return (_read(uri) or {}).get("token") == holder["token"]


def _read(uri: str) -> Optional[dict]:
    try:
        data = json.loads(storage.read_bytes(uri).decode())
    except (storage.StorageError, OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _remove(uri: str) -> None:
    fs, path = storage.filesystem(uri)
    try:
        fs.delete_file(path)
    except (OSError, FileNotFoundError):
        pass


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def stale_reason(holder: dict, now: Optional[float] = None) -> Optional[str]:
    """Why a lock's holder no longer holds it, or None while it does."""
    now = time.time() if now is None else now
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int) \
            and _process_gone(holder["pid"]):
        return f"its process {holder['pid']} on this host is gone"
    if now > float(holder.get("expires", 0)):
        return f"it expired (held over {holder.get('stale_after_s', STALE_AFTER_S):g} s since {holder.get('at')})"
    return None


def describe(holder: dict) -> str:
    return (f"{holder.get('action', '?')} by pid {holder.get('pid')} on {holder.get('host')} since {holder.get('at')}")


@contextmanager
def promotion_lock(cfg: RaylmConfig, action: str, stale_after_s: float = STALE_AFTER_S) -> Iterator[dict]:
    """Hold the app's promotion lock for `action`; PromotionBusy (exit 2) naming the holder when
    another live process holds it."""
    uri = lock_uri(cfg)
    now = time.time()
    me = {"token": uuid.uuid4().hex, "action": action, "pid": os.getpid(), "host": socket.gethostname(),
          "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "expires": now + stale_after_s,
          "stale_after_s": stale_after_s}
    for _ in range(3):
        if _create(uri, me):
            break
        holder = _read(uri)
        if holder is None:  # released (or half-written) between our tries
            time.sleep(0.2)
            continue
        reason = stale_reason(holder)
        if reason is None:
            raise PromotionBusy(f"app {cfg.serve.app_name!r} is being changed by another command ({describe(holder)}; "
                                f"lock {uri}): one promotion at a time, run this one after it finishes")
        say(f"taking over the promotion lock {uri} ({describe(holder)}): {reason}", event="lock_expired",
            holder=holder)
        if (_read(uri) or {}).get("token") == holder.get("token"):
            _remove(uri)
    else:
        raise PromotionBusy(f"could not take the promotion lock {uri}: it keeps changing hands")
    try:
        yield me
    finally:
        if (_read(uri) or {}).get("token") == me["token"]:
            _remove(uri)
