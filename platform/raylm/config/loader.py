"""Loading a config: YAML files with `base:` inheritance, `--set` overrides, and pydantic's errors
turned into messages that name the dotted field."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Optional

import yaml
from pydantic import ValidationError

from raylm.config.root import RaylmConfig
from raylm.errors import ConfigError



def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "search_space":
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml_tree(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config, following `base:` (a path relative to the file) to inherit from."""
    path = Path(path).expanduser().resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a path string")
    return _deep_merge(read_yaml_tree(path.parent / base, _seen + (path,)), raw)


def apply_override(tree: dict, assignment: str) -> dict:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (so 3, true, [1,2] work)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected dotted.key=value")
    key, _, text = assignment.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment!r}: empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    tree = copy.deepcopy(tree)
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value
    return tree


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `raylm config` prints every field)"
        # Cross-field checks raise at their section; their message starts with the field name.
        lines.append(f"  {field}.{msg}" if field and ": " in msg and not msg.startswith(" ") and "." not in msg.split(":")[0]
                     else f"  {field}: {msg}" if field else f"  {msg}")
    return "\n".join(lines)


def validate_tree(tree: dict, source: str = "<dict>") -> RaylmConfig:
    try:
        return RaylmConfig.model_validate(tree)
    except ValidationError as err:
        fields = [".".join(str(p) for p in e["loc"]) for e in err.errors()]
        raise ConfigError(_format_errors(err, source), fields=fields) from None


def load_config(path: Optional[str | os.PathLike] = None, overrides: list[str] | tuple[str, ...] = ()) -> RaylmConfig:
    """Load a config from YAML (or the defaults when path is None) and apply `--set` overrides."""
    tree = read_yaml_tree(path) if path else {}
    for assignment in overrides:
        tree = apply_override(tree, assignment)
    return validate_tree(tree, str(path) if path else "defaults")


def dump_config(cfg: RaylmConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
