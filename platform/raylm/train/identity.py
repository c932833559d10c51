"""A run's identity: what its checkpoints were trained with that a resume must keep.

A checkpoint's manifest records it. A resume that changes any of it would silently reorder the
data (another world size, global batch or data cache) or fail inside DeepSpeed (another ZeRO
stage, LoRA setting or model), so the driver compares the newest checkpoint's identity with the
config before any worker starts, and refuses a difference naming the field and both values.

How a step's rows are cut into micro-batches is not part of it: a rank draws a step's rows at
once (raylm.data.stream), so micro_batch_size x grad_accum_steps may change for the same global
batch.

The world size may change too where the run asks for it (train.resume_universal): DeepSpeed's
universal checkpoint (deepspeed.checkpoint.ds_to_universal) re-partitions the ZeRO state for the
new number of ranks. The global batch must still match: the data position (rows each rank took
from the epoch, a whole number of steps), the lr schedule and the loss per token of the global
batch all count steps of it, and only with the same global batch does "k steps into the epoch"
mean the same rows consumed on any world size (`universal_rows`).
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


UNIVERSAL = "train.resume_universal"
WORLD, BATCH = "train.num_workers", "train.global_batch_size"


def check_resume(now: dict[str, Any], manifest: dict, path: str, universal: bool = False) -> None:
    """Refuse (CheckpointError: exit 2) to resume the checkpoint at `path` with another identity.
    `universal` (train.resume_universal): another world size is allowed, the same global batch is not
    optional."""
    saved = saved_identity(manifest)
    for key, value in now.items():
        if key not in saved or saved[key] == value or (key == WORLD and universal):
            continue
        if key == BATCH and universal and saved.get(WORLD) != now.get(WORLD):
            per_worker, left = divmod(saved[key], now[WORLD])
            cut = (f"train.micro_batch_size x train.grad_accum_steps = {per_worker}" if not left else
                   f"a world size that divides {saved[key]}")
            raise CheckpointError(
                f"{key}: {value!r} now, but the run's newest checkpoint {path} was trained with {saved[key]!r}. "
                f"{UNIVERSAL} changes the world size, not the global batch: the data position and the lr "
                f"schedule count steps of it. With {WORLD}={now[WORLD]}, set {cut}.")
        hint = (f" To resume on another number of workers, set {UNIVERSAL}=true (DeepSpeed's universal checkpoint; "
                f"the global batch stays {saved.get(BATCH, 'the same')})." if key == WORLD else "")
        raise CheckpointError(
            f"{key}: {value!r} now, but the run's newest checkpoint {path} was trained with {saved[key]!r} "
            f"({FIELDS.get(key, key)} must not change on resume). Resuming would silently reorder the data or "
            f"fail inside DeepSpeed: restore {key}, or start a new run (--set train.run_name=<new>). Only the "
            f"cut of the same global batch (train.micro_batch_size x train.grad_accum_steps) may change.{hint}")


def saved_world(manifest: dict) -> int:
    """The world size a checkpoint was written by."""
    return int(manifest.get("world_size") or saved_identity(manifest)[WORLD])


def universal_rows(rows: int, saved_world: int, world: int, global_batch: int) -> int:
    """The data position `rows` (what each of `saved_world` ranks took from its epoch) as the rows
    each of `world` ranks takes for the same number of steps of the same global batch: the rows
    consumed from the epoch (steps x global batch) stay exactly the same. CheckpointError where
    `rows` is not a whole number of steps."""
    old_step, new_step = global_batch // saved_world, global_batch // world
    if global_batch % saved_world or global_batch % world or rows % old_step:
        raise CheckpointError(f"data position: {rows} rows per rank on {saved_world} ranks is not a whole number of "
                              f"steps of the global batch {global_batch}; it cannot be carried to {world} ranks")
    return rows // old_step * new_step
