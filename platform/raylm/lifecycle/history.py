"""The promotion history: `<storage>/serve/<app_name>/promotions.json`, a list of entries (newest
last) written whole, so no reader sees half of it. The live model is the newest entry that
deployed one (`deploy`, `promote`, `rollback`); `adapter` entries record adapters put under
serve.adapters_path. A canary (lifecycle/canary.py) is a `canary` entry, then either the `promote`
that finished it or a `canary_abort`, each naming it (`canary: <id>`)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Optional

from raylm import storage
from raylm.config import RaylmConfig
from raylm.errors import InputError

HISTORY_FILE = "promotions.json"
MODEL_ACTIONS = ("deploy", "promote", "rollback")
# A model change is written twice: an `intent` entry before the rollout, then its outcome
# (`done`: the full entry; `failed`; `interrupted`: SIGINT/SIGTERM during the rollout), joined by
# `id`. Entries from before states are done ones.
STATES = ("intent", "done", "failed", "interrupted")


def history_uri(cfg: RaylmConfig) -> str:
    return storage.join(storage.root(cfg.train.storage_path), "serve", cfg.serve.app_name, HISTORY_FILE)


def read_history(cfg: RaylmConfig) -> list[dict]:
    uri = history_uri(cfg)
    if storage.kind(uri) != "file":
        return []
    history = storage.read_json(uri)
    if not isinstance(history, list):
        raise InputError(f"{uri}: not a promotion history (a JSON list)")
    return history


def record(cfg: RaylmConfig, **entry: Any) -> dict:
    """Append one entry (with its time) to the history and return it. Read-modify-write: callers
    that change the model hold the app's promotion lock (lifecycle/lock.py)."""
    history = read_history(cfg)
    entry = {"at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **entry}
    storage.write_json(history_uri(cfg), [*history, entry])
    return entry


def is_done(entry: dict) -> bool:
    return entry.get("state", "done") == "done"


def live_entry(history: list[dict]) -> Optional[dict]:
    """The entry of the model the endpoint serves: the newest done one that deployed a model."""
    return next((e for e in reversed(history) if e.get("action") in MODEL_ACTIONS and is_done(e)), None)


def unfinished(history: list[dict]) -> Optional[dict]:
    """The newest intent entry with no outcome after it (its command was killed outright), or None."""
    closed = {e.get("id") for e in history if e.get("state") in ("done", "failed", "interrupted")}
    return next((e for e in reversed(history) if e.get("state") == "intent" and e.get("id") not in closed), None)


def next_version(history: list[dict]) -> str:
    """v1, v2, ...: one per deploy or promotion that went live (a rollback reuses the version it
    returns to; a failed or interrupted one's number is used again)."""
    return f"v{1 + sum(e.get('action') in ('deploy', 'promote') and is_done(e) for e in history)}"


def running_canary(history: list[dict]) -> Optional[dict]:
    """The done `canary` entry of the canary now running (no promote or abort names it), or None."""
    closed = {e.get("canary") for e in history if e.get("canary")}
    return next((e for e in reversed(history) if e.get("action") == "canary" and e.get("state") == "done"
                 and e.get("id") not in closed), None)


def refuse_while_running(cfg: RaylmConfig, history: list[dict], verb: str) -> None:
    """A promote or rollback while a canary runs would leave it orphaned: refused, naming it."""
    canary = running_canary(history)
    if canary is not None:
        raise InputError(f"a canary of {canary['version']} ({canary['checkpoint']}) serves {canary['percent']:g}% of "
                         f"requests beside {canary['from_version']} (since {canary['at']}, {history_uri(cfg)}): "
                         f"`raylm promote --finish` or `--abort` it before a {verb}")
