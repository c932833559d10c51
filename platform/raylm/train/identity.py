"""A run's identity: what its checkpoints were trained with that a resume must keep.

A checkpoint's manifest records it. A resume that changes any of it would silently reorder the
data (another world size, global batch or data cache) or fail inside DeepSpeed (another ZeRO
stage, LoRA setting or model), so the driver compares the newest checkpoint's identity with the
config before any worker starts, and refuses a difference naming the field and both values.

How a step's rows are cut into micro-batches is not part of it: a rank draws a step's rows at
once (raylm.data.stream), so micro_batch_size x grad_accum_steps may change for the same global
batch.
"""

from __future__ import annotations

from typing import Any, Optional

from raylm.config import RaylmConfig
from raylm.errors import CheckpointError

# key -> what it is, for the refusal (the keys are the config fields that set them)
FIELDS = {
    "train.num_workers": "the world size",
    "train.global_batch_size": "the global batch (micro_batch_size x grad_accum_steps x num_workers)",
    "data": "the data cache's fingerprint (the data settings or the source's files changed)",
    "deepspeed.zero_stage": "the ZeRO stage",
    "train.lora": "the LoRA setting",
    "model.name": "the model",
    "model.overrides": "the model's config overrides",
}


def run_identity(cfg: RaylmConfig, data_fingerprint: Optional[str]) -> dict[str, Any]:
    """The identity of a run of this config on the data cache with this fingerprint."""
    t = cfg.train
    return {"train.num_workers": t.num_workers, "train.global_batch_size": t.effective_global_batch,
            "data": data_fingerprint, "deepspeed.zero_stage": cfg.deepspeed.zero_stage,
            "train.lora": t.lora.model_dump(mode="json") if t.lora else None,
            "model.name": cfg.model.name, "model.overrides": dict(cfg.model.overrides)}


def saved_identity(manifest: dict) -> dict[str, Any]:
    """A checkpoint's identity; a checkpoint written before identities were recorded has only its
    world size and ZeRO stage (the rest is not checked)."""
    if isinstance(manifest.get("identity"), dict):
        return manifest["identity"]
    old = {"world_size": "train.num_workers", "zero_stage": "deepspeed.zero_stage"}
    return {key: manifest[k] for k, key in old.items() if k in manifest}


def check_resume(now: dict[str, Any], manifest: dict, path: str) -> None:
    """Refuse (CheckpointError: exit 2) to resume the checkpoint at `path` with another identity."""
    saved = saved_identity(manifest)
    for key, value in now.items():
        if key in saved and saved[key] != value:
            raise CheckpointError(
                f"{key}: {value!r} now, but the run's newest checkpoint {path} was trained with {saved[key]!r} "
                f"({FIELDS.get(key, key)} must not change on resume). Resuming would silently reorder the data or "
                f"fail inside DeepSpeed: restore {key}, or start a new run (--set train.run_name=<new>). Only the "
                f"cut of the same global batch (train.micro_batch_size x train.grad_accum_steps) may change.")
