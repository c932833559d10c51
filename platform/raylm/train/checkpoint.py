"""Checkpoints: resumable DeepSpeed state of every rank + a consolidated Hugging Face model.

Layout of one checkpoint (Ray Train merges the ranks' directories into one in storage):

    step_00000040/
      deepspeed/state/...        engine.save_checkpoint (each rank writes its ZeRO shard)
      hf/                        config.json, model.safetensors, tokenizer, raylm_config.yaml
                                 (with train.lora: the base with the adapter merged in)
      adapter/                   train.lora only: the peft adapter, tokenizer, raylm_config.yaml
      raylm_checkpoint.json      step, tokens, and the size of every file of every rank

The manifest is written last, by rank 0, after all ranks have listed their files. A checkpoint
without it, or whose files do not match it, was cut off or corrupted and is never resumed from.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

import yaml

from raylm.config import InputError, RaylmConfig

MANIFEST = "raylm_checkpoint.json"
DS_DIR, DS_TAG, HF_DIR, ADAPTER_DIR = "deepspeed", "state", "hf", "adapter"


class CheckpointError(InputError):
    """A checkpoint that cannot be used; the message names its path and what is wrong."""


@dataclass
class Position:
    """Where training stands: optimizer steps done and tokens consumed (global)."""

    step: int = 0
    tokens: int = 0


def list_files(root: str) -> dict[str, int]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = os.path.getsize(path)
    return out


def export_hf(model: Any, state_dict: Optional[dict], tokenizer: Any, cfg: RaylmConfig, out_dir: str) -> None:
    """Write a directory `AutoModelForCausalLM.from_pretrained` loads, with its tokenizer and config."""
    model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "raylm_config.yaml"), "w") as f:
        yaml.safe_dump(cfg.model_dump(mode="json"), f, sort_keys=False)


def consolidated_state_dict(engine: Any, zero_stage: int) -> Optional[dict]:
    """Full model weights on rank 0 (a collective under ZeRO-3, where every rank holds a shard)."""
    import torch.distributed as dist

    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict() if dist.get_rank() == 0 else None


def save_checkpoint(engine: Any, tokenizer: Any, cfg: RaylmConfig, pos: Position) -> str:
    """Every rank writes its part into a fresh local folder and returns it (to report to Ray Train)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    local = tempfile.mkdtemp(prefix=f"raylm-ckpt-{pos.step}-r{rank}-")
    # LoRA: the frozen base is not saved (it is rebuilt from model.name on resume)
    engine.save_checkpoint(os.path.join(local, DS_DIR), tag=DS_TAG, exclude_frozen_parameters=bool(cfg.train.lora),
                           client_state={"step": pos.step, "tokens": pos.tokens}, save_latest=False)
    state_dict = consolidated_state_dict(engine, cfg.deepspeed.zero_stage)
    if rank == 0 and cfg.train.lora:
        from raylm.train.lora import export_lora

        export_lora(state_dict, tokenizer, cfg, os.path.join(local, ADAPTER_DIR), os.path.join(local, HF_DIR))
    elif rank == 0:
        export_hf(engine.module, state_dict, tokenizer, cfg, os.path.join(local, HF_DIR))
    files_per_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(files_per_rank, list_files(local))
    if rank == 0:
        files: dict[str, int] = {}
        for part in files_per_rank:
            files.update(part)
        manifest = {"step": pos.step, "tokens": pos.tokens, "world_size": dist.get_world_size(),
                    "zero_stage": cfg.deepspeed.zero_stage, "files": files}
        tmp = os.path.join(local, MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f)
        os.replace(tmp, os.path.join(local, MANIFEST))
    return local


def verify_checkpoint(path: str) -> dict:
    """Return the manifest of a complete checkpoint, or raise CheckpointError naming what is wrong."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MANIFEST}; the write was cut off)")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{manifest_path}: corrupted manifest ({exc})") from None
    for rel, size in files.items():
        full = os.path.join(path, rel)
        if not os.path.isfile(full):
            raise CheckpointError(f"{path}: missing file {rel}")
        if os.path.getsize(full) != size:
            raise CheckpointError(f"{full}: corrupted (size {os.path.getsize(full)}, expected {size})")
    return manifest


def candidate_checkpoints(latest_path: Optional[str], run_dir: Optional[str] = None) -> list[str]:
    """Every `step_*` folder of the run, newest step first, after `latest_path` if it lies elsewhere.

    The run folder is `run_dir` when given, else the folder holding `latest_path`. A newer
    complete checkpoint than the one Ray Train registered (persisted just before a crash) wins.
    """
    parent = run_dir or (os.path.dirname(latest_path.rstrip("/")) if latest_path else None)
    names = sorted((d for d in os.listdir(parent) if d.startswith("step_")), reverse=True) \
        if parent and os.path.isdir(parent) else []
    paths = [os.path.join(parent, d) for d in names]
    if latest_path and os.path.realpath(latest_path) not in {os.path.realpath(p) for p in paths}:
        paths.insert(0, latest_path)
    return paths


def pick_resume_checkpoint(latest_path: Optional[str], log: Any = print,
                           run_dir: Optional[str] = None) -> Optional[tuple[str, dict]]:
    """The newest checkpoint that verifies; corrupted ones are reported by name and skipped."""
    for path in candidate_checkpoints(latest_path, run_dir):
        try:
            return path, verify_checkpoint(path)
        except CheckpointError as exc:
            log(f"raylm: skipping checkpoint: {exc}")
    return None


def load_checkpoint(engine: Any, path: str, adapter_only: bool = False) -> Position:
    """Restore model, optimizer and LR schedule of this rank from a verified checkpoint.

    `adapter_only`: the checkpoint holds only the trainable (LoRA) weights; the frozen base the
    engine was built with stays as it is."""
    load_path, client = engine.load_checkpoint(os.path.join(path, DS_DIR), tag=DS_TAG,
                                               load_module_strict=not adapter_only,
                                               load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"{path}: DeepSpeed could not load {DS_DIR}/{DS_TAG}")
    return Position(step=int(client["step"]), tokens=int(client["tokens"]))


def hf_dir(checkpoint_path: str) -> str:
    return os.path.join(checkpoint_path, HF_DIR)


def cleanup(local: str) -> None:
    shutil.rmtree(local, ignore_errors=True)
