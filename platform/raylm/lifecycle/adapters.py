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
    if not s.adapters_path:
        raise InputError("serve.adapters_path is not set: adapters join a live endpoint from there")
    if not name or "/" in name or ":" in name or name.startswith("."):
        raise InputError(f"--adapter {name!r}: a folder name without '/', ':' or a leading '.'")
    _, live = require_live(cfg)
    source = adapter_dir if storage.is_remote(adapter_dir) else os.path.abspath(os.path.expanduser(adapter_dir))
    if storage.kind(source) != "dir":
        raise CheckpointError(f"adapter not found: {source}")
    served = storage.read_json(storage.join(live["checkpoint"], "config.json"))
    why = adapter_base_mismatch(source, served, s.max_lora_rank)
    if why:
        raise CheckpointError(f"adapter {source} cannot be served on {live['version']} ({live['checkpoint']}): {why}")
    target = storage.join(s.adapters_path if storage.is_remote(s.adapters_path)
                          else os.path.abspath(os.path.expanduser(s.adapters_path)), name)
    if storage.kind(target) != "missing":
        raise InputError(f"{target} exists: adapters are immutable once served (replicas cache them); pick another name")
    with tempfile.TemporaryDirectory() as tmp:
        local = storage.download(source, tmp) if storage.is_remote(source) else source
        storage.upload(local, target)
    say(f"adapter {name} is servable as model {s.model_id}:{name} ({target})", event="adapter",
        model=f"{s.model_id}:{name}", path=target)
    return record(cfg, action="adapter", name=name, model=f"{s.model_id}:{name}", source=source, path=target,
                  on_version=live["version"])
