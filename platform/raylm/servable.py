"""What can be served: a Hugging Face checkpoint (or a sweep's best.json naming one) and peft
adapters, checked before vLLM sees them (in a replica, where the error would be buried in its
logs). Used by serve/ and by evaluate.py, without importing Ray Serve LLM."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from raylm import storage
from raylm.config import ServeConfig
from raylm.errors import CheckpointError, ConfigError


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
MIN_CPU_HEAD_DIM = 32  # vLLM's CPU attention kernels


# ------------------------------------------------------------------ checkpoint


def checkpoint_version(checkpoint: str) -> str:
    """A model version naming the checkpoint a best.json resolved to (`ckpt-` and a hash of its
    path): a RayService app rebuilt over a best.json rewritten since says so in every response."""
    return "ckpt-" + hashlib.sha256(checkpoint.encode()).hexdigest()[:10]


def checkpoint_from_best_json(path: str) -> str:
    """The checkpoint a sweep's best.json points at: a URI, an absolute path, or a path relative to
    the best.json's folder (local or remote)."""
    try:
        best = storage.read_json(path)
    except storage.StorageError as exc:
        raise CheckpointError(f"{path}: not a readable best.json: {exc}") from None
    target = best.get("checkpoint") if isinstance(best, dict) else None
    if not isinstance(target, str) or not target:
        raise CheckpointError(f"{path}: best.json has no \"checkpoint\" path")
    if storage.is_remote(target):
        return target
    target = os.path.expanduser(target)
    return target if os.path.isabs(target) else storage.join(storage.parent(path), target)


SAFETENSORS_MAX_HEADER = 100 * 2**20


def check_safetensors(uri: str) -> None:
    """A safetensors file is whole: its JSON header parses and the tensors it lists end exactly
    at the end of the file. A copy cut short or overwritten is refused here, naming the file,
    instead of failing inside a replica's engine."""
    import struct

    head, size = storage.read_head(uri, 8)
    if len(head) < 8:
        raise CheckpointError(f"{uri}: corrupt safetensors file ({size} bytes)")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > min(size - 8, SAFETENSORS_MAX_HEADER):
        raise CheckpointError(f"{uri}: corrupt safetensors file (header of {header_len} bytes in a {size}-byte file)")
    try:
        header = json.loads(storage.read_head(uri, 8 + header_len)[0][8:])
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise CheckpointError(f"{uri}: corrupt safetensors header ({exc})") from None
    if 8 + header_len + end != size:
        raise CheckpointError(f"{uri}: corrupt safetensors file: its header lists {8 + header_len + end} bytes, "
                              f"the file has {size} (cut short or overwritten?)")


def _check_hf_dir(path: str, via: str) -> None:
    if storage.kind(path) != "dir":
        raise CheckpointError(f"checkpoint not found: {path}{via}")
    try:
        config = storage.read_json(storage.join(path, "config.json"))
    except storage.StorageError as exc:
        raise CheckpointError(f"{path}{via}: not a Hugging Face checkpoint ({exc})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(f"{path}{via}: config.json has no model_type")
    if not any(storage.kind(storage.join(path, name)) == "file" for name in WEIGHT_FILES):
        raise CheckpointError(f"{path}{via}: no weights ({', '.join(WEIGHT_FILES)})")
    if storage.kind(storage.join(path, "model.safetensors")) == "file":
        check_safetensors(storage.join(path, "model.safetensors"))
    if not any(storage.kind(storage.join(path, name)) == "file" for name in TOKENIZER_FILES):
        raise CheckpointError(f"{path}{via}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")


def resolve_checkpoint(path: Optional[str]) -> str:
    """The Hugging Face checkpoint directory to serve, from a directory or a sweep's best.json
    (`{"checkpoint": <dir>}`), local or in object storage (s3://, gs://: each replica downloads it
    to its node's cache). Raises `CheckpointError` naming the path when it is unset, missing or not
    a servable checkpoint."""
    if not path:
        raise CheckpointError("serve.checkpoint is not set: pass --checkpoint <HF dir or best.json> "
                              "or --set serve.checkpoint=<path>")
    given = path if storage.is_remote(path) else str(Path(path).expanduser().absolute())
    via = ""
    try:
        found = storage.kind(given)
        if found == "file":
            via = f" (from {given})"
            given = checkpoint_from_best_json(given)
        elif found == "missing":
            raise CheckpointError(f"checkpoint not found: {given}")
        _check_hf_dir(given, via)
    except storage.StorageError as exc:
        raise CheckpointError(f"checkpoint {path}: {exc}") from None
    return given if storage.is_remote(given) else str(Path(given).resolve())


def _head_dim(config: dict) -> Optional[int]:
    if isinstance(config.get("head_dim"), int):
        return config["head_dim"]
    hidden = config.get("hidden_size", config.get("n_embd"))
    heads = config.get("num_attention_heads", config.get("n_head"))
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None


def check_engine_kwargs(kwargs: dict, field: str = "serve.engine_kwargs") -> None:
    """`serve.engine_kwargs` (or `eval.engine_kwargs`) names only arguments vLLM has (its engine's or
    its OpenAI server's): Ray Serve LLM would otherwise fail inside each replica as it starts."""
    import dataclasses

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    known = {f.name for cls in (AsyncEngineArgs, FrontendArgs) for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(f"{field}: {', '.join(unknown)} {'is not a' if len(unknown) == 1 else 'are not'} "
                          "vLLM engine argument(s) (see `vllm serve --help`, names with _ for -)")


def check_servable(checkpoint: str, s: ServeConfig) -> dict:
    """The checkpoint's config.json, after the checks vLLM would otherwise fail on inside a replica
    (where the error is buried in replica logs): the CPU attention needs head_dim >= 32, and every
    LoRA adapter is a peft adapter directory with a rank the engine was sized for, trained on a
    base of the served model's shape (`adapter_base_mismatch`, shared with on-demand adapters)."""
    config = storage.read_json(storage.join(checkpoint, "config.json"))
    for name, path in s.lora_adapters.items():
        why = adapter_base_mismatch(os.path.expanduser(path), config, s.max_lora_rank)
        if why:
            raise CheckpointError(f"serve.lora_adapters.{name}={path}: {why}")
    check_engine_kwargs(s.engine_kwargs)
    head_dim = _head_dim(config)
    if not s.use_gpu and head_dim is not None and head_dim < MIN_CPU_HEAD_DIM:
        raise CheckpointError(f"{checkpoint}: head_dim {head_dim} < {MIN_CPU_HEAD_DIM}: vLLM's CPU attention cannot "
                              "serve it (serve.use_gpu=false); train a model with fewer, wider heads")
    return config


# ------------------------------------------------------------------ adapters

BASE_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def adapter_base_mismatch(adapter_dir: str, served_config: dict, max_lora_rank: int) -> Optional[str]:
    """Why the peft adapter in `adapter_dir` cannot run on the served model, or None. The base it
    was trained on is read from the adapter's `base_model_name_or_path` when that folder is
    reachable (its config.json must agree with the served model's shape), and its rank must fit
    the engine's LoRA kernels."""
    try:
        adapter = storage.read_json(storage.join(adapter_dir, "adapter_config.json"))
    except storage.StorageError as exc:
        return f"not a peft adapter directory (adapter_config.json: {exc})"
    if not isinstance(adapter, dict) or not isinstance(adapter.get("r"), int):
        return "adapter_config.json has no rank r"
    if adapter["r"] > max_lora_rank:
        return f"rank {adapter['r']} > serve.max_lora_rank={max_lora_rank}"
    base = adapter.get("base_model_name_or_path")
    try:
        base_config = storage.read_json(storage.join(os.path.expanduser(base), "config.json")) if base else None
    except storage.StorageError:
        base_config = None  # a hub name or a folder that is gone: the engine checks the shapes when it loads
    if isinstance(base_config, dict):
        differ = [f"{k} {base_config.get(k)} != {served_config.get(k)}" for k in BASE_KEYS
                  if base_config.get(k) != served_config.get(k)]
        if differ:
            return f"trained on base {base} whose {', '.join(differ)} (the served model's)"
    return None
