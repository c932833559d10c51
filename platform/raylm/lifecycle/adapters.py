"""Adapters into a live endpoint: `raylm promote --adapter NAME DIR`."""

from __future__ import annotations

import os
import tempfile

from raylm import storage
from raylm.config import RaylmConfig
from raylm.console import say
from raylm.errors import CheckpointError, InputError
from raylm.lifecycle.history import record
from raylm.lifecycle.rollout import require_live


def add_adapter(cfg: RaylmConfig, name: str, adapter_dir: str) -> dict:
    """`raylm promote --adapter NAME DIR`: check the peft adapter against the served model and put
    it under serve.adapters_path/NAME, where every replica finds it at its next request for
    `<model_id>:NAME` (no redeploy, no Ray needed here)."""
    from raylm.servable import adapter_base_mismatch

    s = cfg.serve
    _check_name(cfg, "--adapter", name)
    _, live = require_live(cfg)
    source = adapter_dir if storage.is_remote(adapter_dir) else os.path.abspath(os.path.expanduser(adapter_dir))
    if storage.kind(source) != "dir":
        raise CheckpointError(f"adapter not found: {source}")
    served = storage.read_json(storage.join(live["checkpoint"], "config.json"))
    why = adapter_base_mismatch(source, served, s.max_lora_rank)
    if why:
        raise CheckpointError(f"adapter {source} cannot be served on {live['version']} ({live['checkpoint']}): {why}")
    target = _folder(cfg, name)
    if storage.kind(target) != "missing":
        raise InputError(f"{target} exists: adapters are immutable once served (replicas cache them); pick another name")
    with tempfile.TemporaryDirectory() as tmp:
        local = storage.download(source, tmp) if storage.is_remote(source) else source
        storage.upload(local, target)
    say(f"adapter {name} is servable as model {s.model_id}:{name} ({target})", event="adapter",
        model=f"{s.model_id}:{name}", path=target)
    return record(cfg, action="adapter", name=name, model=f"{s.model_id}:{name}", source=source, path=target,
                  on_version=live["version"])


def _check_name(cfg: RaylmConfig, flag: str, name: str) -> None:
    if not cfg.serve.adapters_path:
        raise InputError("serve.adapters_path is not set: adapters join a live endpoint from there")
    if not name or "/" in name or ":" in name or name.startswith("."):
        raise InputError(f"{flag} {name!r}: a folder name without '/', ':' or a leading '.'")


def _folder(cfg: RaylmConfig, name: str) -> str:
    path = cfg.serve.adapters_path or ""
    return storage.join(path if storage.is_remote(path) else os.path.abspath(os.path.expanduser(path)), name)


def remove_adapter(cfg: RaylmConfig, name: str) -> dict:
    """`raylm promote --remove-adapter NAME`: delete serve.adapters_path/NAME. The edge stops listing
    `<model_id>:NAME` at its next listing (within seconds; requests for it are then a 404 naming
    the model) and no replica loads it again; no redeploy, no Ray needed here."""
    _check_name(cfg, "--remove-adapter", name)
    target = _folder(cfg, name)
    if storage.kind(target) != "dir":
        raise InputError(f"--remove-adapter {name}: no adapter folder {target}")
    fs, path = storage.filesystem(target)
    try:
        fs.delete_dir(path)
    except OSError as exc:
        raise storage.StorageError(f"{target}: cannot delete it: {exc}") from None
    model = f"{cfg.serve.model_id}:{name}"
    say(f"adapter {name} removed: model {model} is no longer served ({target})", event="adapter_removed",
        model=model, path=target)
    return record(cfg, action="adapter_removed", name=name, model=model, path=target)
