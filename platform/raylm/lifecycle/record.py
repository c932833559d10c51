"""The deployment record: what `raylm serve` deployed, beside the promotion history
(`<storage>/serve/<app_name>/deployment.json`): the resolved config, the `--set` paths it was
given, the key source (hashes and where the keys were read from; never a key), the checkpoint and
the version.

Promote and rollback deploy from the record and change only the model and its version: a
second shell, a CI runner or a laptop has neither the serving shell's `$RAYLM_API_KEYS` nor its
`--set` overrides, and redeploying from its own would replace the edge's key hashes (every client
a 401) or drop the autoscaling it was given. A promote whose own serve config differs from the
record in a field it chose (its config file or its `--set`) names the fields and needs
`--reconfigure`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Iterable, Optional

from raylm import storage
from raylm.config import RaylmConfig, ServeConfig
from raylm.errors import InputError
from raylm.lifecycle.history import history_uri
from raylm.serve.auth import KeySetup, setup_keys
from raylm.serve.options import PROMOTE_TIME_FIELDS

RECORD_FILE = "deployment.json"
# Serve fields that say where keys come from: a reconfigure that changes one reads the keys again.
KEY_FIELDS = ("serve.api_key_env", "serve.api_key_file", "serve.api_key_hashes_path", "serve.require_api_key")
# Settings of the promoting command, not of what is deployed (the gate; how long a rollout may
# take): taken from its own config, never compared with the record.
PROMOTE_TIME = tuple(f"serve.{f}" for f in PROMOTE_TIME_FIELDS)


def record_uri(cfg: RaylmConfig) -> str:
    return storage.join(storage.parent(history_uri(cfg)), RECORD_FILE)


def read_record(cfg: RaylmConfig) -> Optional[dict]:
    uri = record_uri(cfg)
    if storage.kind(uri) != "file":
        return None
    rec = storage.read_json(uri)
    if not isinstance(rec, dict) or not isinstance(rec.get("config"), dict):
        raise InputError(f"{uri}: not a deployment record (a JSON object with the deployed config)")
    return rec


def set_paths(overrides: Iterable[str]) -> list[str]:
    """The serve paths `--set KEY=VALUE` names (only serve settings are redeployed)."""
    return sorted({p for p in (o.split("=", 1)[0].strip() for o in overrides) if p.startswith("serve.")})


def without_checkpoint(cfg: RaylmConfig) -> RaylmConfig:
    """The config a deploy is made from: the checkpoint travels beside it (serve.checkpoint in the
    bound config would change the edge's pinned version at every promotion and restart it)."""
    return cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"checkpoint": None})})


def write_record(cfg: RaylmConfig, checkpoint: str, version: str, keys: KeySetup,
                 serve_overrides: Iterable[str]) -> dict:
    rec = {"at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "checkpoint": checkpoint,
           "version": version, "config": without_checkpoint(cfg).model_dump(mode="json"),
           "serve_overrides": sorted(set(serve_overrides)),
           "keys": {"hashes": list(keys.hashes), "source": keys.source, "generated_file": keys.generated_file}}
    storage.write_json(record_uri(cfg), rec)
    return rec


def keys_of(rec: dict) -> KeySetup:
    k = rec.get("keys") or {}
    return KeySetup(tuple(k.get("hashes") or ()), str(k.get("source") or "the deployment record"),
                    k.get("generated_file"))


def _flat(tree: Any, prefix: str) -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}.{key}").items()}
    return {prefix: tree}


def changed_fields(rec: dict, cfg: RaylmConfig, overrides: Iterable[str] = ()) -> list[str]:
    """The serve fields where this command's config differs from the record's, leaving out the
    ones only the serving command's `--set` gave (this one did not choose otherwise)."""
    theirs = _flat(rec["config"].get("serve", {}), "serve")
    ours = _flat(without_checkpoint(cfg).serve.model_dump(mode="json"), "serve")
    ours_set = set(set_paths(overrides))
    only_served = {p for p in rec.get("serve_overrides", ()) if p not in ours_set}
    return sorted(p for p in theirs.keys() | ours.keys() if theirs.get(p) != ours.get(p)
                  and not any(p == o or p.startswith(o + ".") for o in (*only_served, *PROMOTE_TIME)))


def deployment(cfg: RaylmConfig, overrides: Iterable[str] = (), reconfigure: bool = False,
               check: bool = True) -> tuple[RaylmConfig, Optional[KeySetup], list[str]]:
    """The config and keys a promote or rollback deploys with, and the serve paths given by
    `--set` that the record keeps: the record's, with only the model changing. `check`: refuse a
    config of this command's that differs from the record (naming the fields) unless
    `reconfigure`, which deploys this command's serve config (and reads the keys again when a key
    field changed). Without a record (an app served before records), this command's config."""
    rec = read_record(cfg)
    if rec is None:
        return without_checkpoint(cfg), None, set_paths(overrides)
    recorded = cfg.model_copy(update={"serve": ServeConfig.model_validate(rec["config"]["serve"])})
    changed = changed_fields(rec, cfg, overrides) if check else []
    if not changed:
        return without_checkpoint(recorded), keys_of(rec), list(rec.get("serve_overrides", ()))
    if not reconfigure:
        raise InputError(f"this config's serve settings differ from what is deployed ({record_uri(cfg)}): "
                         f"{', '.join(changed)}; pass --reconfigure to deploy them with the new model, or drop them")
    merged = without_checkpoint(_merge(recorded, cfg, changed))
    keys = setup_keys(merged.serve) if any(p in KEY_FIELDS for p in changed) else keys_of(rec)
    kept = [p for p in rec.get("serve_overrides", ()) if p not in changed]
    return merged, keys, sorted({*kept, *set_paths(overrides)})


def _merge(recorded: RaylmConfig, ours: RaylmConfig, changed: list[str]) -> RaylmConfig:
    """The record's serve config with the `changed` paths taken from ours."""
    tree = recorded.serve.model_dump(mode="json")
    mine = ours.serve.model_dump(mode="json")
    for path in changed:
        parts = path.split(".")[1:]
        src, dst = mine, tree
        for part in parts[:-1]:
            src, dst = src.get(part, {}), dst.setdefault(part, {})
        if parts[-1] in src:
            dst[parts[-1]] = src[parts[-1]]
        else:
            dst.pop(parts[-1], None)
    return recorded.model_copy(update={"serve": ServeConfig.model_validate(tree)})
