"""Checkpoints: resumable DeepSpeed state of every rank, and for the checkpoints someone will serve
a consolidated Hugging Face model.

Layout of one checkpoint (Ray Train merges the ranks' directories into one in storage; where
it sits: raylm.storage):

    step_00000040/
      deepspeed/state/...        engine.save_checkpoint (each rank writes its ZeRO shard)
      deepspeed/universal/...    only after a resume on another world size (train.resume_universal):
                                 DeepSpeed's universal checkpoint of state/, marker file written last
      tokenizer/                 the run's tokenizer, and raylm_config.yaml: what `raylm export`
      raylm_config.yaml          needs beside the DeepSpeed state to build hf/ later
      hf/                        exported checkpoints only (train.export): config.json,
                                 model.safetensors, tokenizer, raylm_config.yaml (with train.lora:
                                 the base with the adapter merged in)
      adapter/                   exported, train.lora only: the peft adapter, tokenizer, raylm_config.yaml
      raylm_checkpoint.json      step, tokens, data position, the run's identity (raylm.train.identity),
                                 the evaluation at this step, whether hf/ is there, the MLflow
                                 run it logs to, and the size of every file of every rank

The manifest is written last, by rank 0, after all ranks have listed their files. A checkpoint
without it, or whose files do not match it, was cut off or corrupted and is never resumed from.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Optional

import yaml

from raylm import storage
from raylm.config import RaylmConfig
from raylm.errors import CheckpointError
from raylm.model import export_hf

MANIFEST = "raylm_checkpoint.json"
DS_DIR, DS_TAG, HF_DIR, ADAPTER_DIR = "deepspeed", "state", "hf", "adapter"
UNIVERSAL_TAG, UNIVERSAL_DONE = "universal", "raylm_universal.json"  # deepspeed/universal/, its marker last
TOKENIZER_DIR, CONFIG_FILE = "tokenizer", "raylm_config.yaml"


@dataclass
class Position:
    """Where training stands: optimizer steps done, tokens consumed (global), and the data
    position: the epoch and the rows each rank has taken from it (a whole number of steps, equal
    on every rank: raylm.data.stream), so a resumed run reads exactly the step that would have
    come next, however it cuts the same global batch into micro-batches."""

    step: int = 0
    tokens: int = 0
    epoch: int = 0
    rows: int = 0


def consolidated_state_dict(engine: Any, zero_stage: int) -> Optional[dict]:
    """Full model weights on rank 0 (a collective under ZeRO-3, where every rank holds a shard)."""
    import torch.distributed as dist

    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict() if dist.get_rank() == 0 else None


@dataclass
class SaveRecord:
    """What the manifest says about a checkpoint beyond its files: whether it carries the HF export,
    the evaluation made at its own step (none when the newest evaluation is older: that model was
    never measured), and the best exported value of the run so far (carried across resumes)."""

    export: bool = False
    evaluation: dict = field(default_factory=dict)
    best: Optional[float] = None
    identity: dict = field(default_factory=dict)  # what a resume must keep (raylm.train.identity)
    tracking: dict = field(default_factory=dict)  # {"mlflow_run_id": ...}: a resumed run logs to the same run


def save_checkpoint(engine: Any, tokenizer: Any, cfg: RaylmConfig, pos: Position, record: SaveRecord) -> str:
    """Every rank writes its part into a fresh local folder and returns it; Ray Train's report
    uploads the folders into one `step_*` checkpoint in storage. The HF export (a collective under
    ZeRO-3, then rank 0 writes, with LoRA after a merge) only when `record.export`."""
    import torch.distributed as dist

    rank = dist.get_rank()
    local = tempfile.mkdtemp(prefix=f"raylm-ckpt-{pos.step}-r{rank}-")
    # LoRA: the frozen base is not saved (it is rebuilt from model.name on resume)
    engine.save_checkpoint(os.path.join(local, DS_DIR), tag=DS_TAG, exclude_frozen_parameters=bool(cfg.train.lora),
                           client_state=asdict(pos), save_latest=False)
    if rank == 0:
        tokenizer.save_pretrained(os.path.join(local, TOKENIZER_DIR))
        with open(os.path.join(local, CONFIG_FILE), "w") as f:
            yaml.safe_dump(cfg.model_dump(mode="json"), f, sort_keys=False)
    if record.export:
        _export_from_engine(engine, tokenizer, cfg, local, rank)
    files_per_rank: list = [None] * dist.get_world_size()
    dist.all_gather_object(files_per_rank, storage.list_files(local))
    if rank == 0:
        files: dict[str, int] = {}
        for part in files_per_rank:
            files.update(part)
        manifest = {**asdict(pos), "world_size": dist.get_world_size(),
                    "zero_stage": cfg.deepspeed.zero_stage, "lora": bool(cfg.train.lora), "exported": record.export,
                    "eval": record.evaluation, "best": record.best, "identity": record.identity,
                    "tracking": record.tracking, "files": files}
        write_manifest(local, manifest)
    return local


def _export_from_engine(engine: Any, tokenizer: Any, cfg: RaylmConfig, local: str, rank: int) -> None:
    """hf/ (and adapter/) from the live engine's weights."""
    state_dict = consolidated_state_dict(engine, cfg.deepspeed.zero_stage)
    if rank == 0 and cfg.train.lora:
        from raylm.train.lora import export_lora

        export_lora(state_dict, tokenizer, cfg, os.path.join(local, ADAPTER_DIR), os.path.join(local, HF_DIR))
    elif rank == 0:
        export_hf(engine.module, state_dict, tokenizer, cfg, os.path.join(local, HF_DIR))


def write_manifest(folder: str, manifest: dict) -> None:
    """The manifest of a local checkpoint folder, replaced in one rename (never half a manifest)."""
    tmp = os.path.join(folder, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f)
    os.replace(tmp, os.path.join(folder, MANIFEST))


def is_exported(manifest: dict) -> bool:
    """The checkpoint holds a complete hf/ (listed in its manifest, so verified with it)."""
    return f"{HF_DIR}/config.json" in manifest.get("files", {})


def verify_checkpoint(path: str) -> dict:
    """Return the manifest of a complete checkpoint (a local path or a URI), or raise
    CheckpointError naming what is wrong.

    In object storage every file is one atomic PUT, so a checkpoint whose upload was cut off lacks
    files (or the manifest) but never holds a half-written one: the size check catches both."""
    manifest_path = storage.join(path, MANIFEST)
    try:
        found = storage.list_files(path)
    except storage.StorageError as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc})") from None
    # outside the parsing below: CheckpointError is a ValueError, which would be re-labelled a corrupted manifest
    if not found:
        raise CheckpointError(f"checkpoint not found: {path} (no files there)")
    if MANIFEST not in found:
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MANIFEST}; the write was cut off)")
    try:
        manifest = json.loads(storage.read_bytes(manifest_path))
        files = manifest["files"]
        items = list(files.items())
    except storage.StorageError as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{manifest_path}: corrupted manifest ({exc})") from None
    for rel, size in items:
        if rel not in found:
            raise CheckpointError(f"{path}: missing file {rel}")
        if found[rel] != size:
            raise CheckpointError(f"{storage.join(path, rel)}: corrupted (size {found[rel]}, expected {size})")
    return manifest


def verified_checkpoints(run_dir: str, log: Any = print) -> Iterator[tuple[str, dict]]:
    """(path, manifest) of each complete checkpoint of a run, newest first; corrupted and cut-off
    ones are reported by name and skipped."""
    for path in storage.step_dirs(run_dir):
        try:
            yield path, verify_checkpoint(path)
        except CheckpointError as exc:
            log(f"raylm: skipping checkpoint: {exc}")


def pick_resume_checkpoint(run_dir: str, log: Any = print) -> Optional[tuple[str, dict]]:
    """The newest checkpoint of the run (local path or URI) that verifies.

    Every `step_*` folder is a candidate, not only the one Ray Train registered last: a checkpoint
    persisted just before a worker died may not have reached the controller."""
    return next(verified_checkpoints(run_dir, log), None)



@contextmanager
def local_copy(path: str, subdir: str = "") -> Iterator[str]:
    """`path` itself when local; else a temporary download of `path/subdir`, removed afterwards."""
    if not storage.is_remote(path):
        yield path
        return
    tmp = tempfile.mkdtemp(prefix="raylm-resume-")
    try:
        storage.download(storage.join(path, subdir) if subdir else path, os.path.join(tmp, subdir))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def has_universal(path: str) -> bool:
    """The checkpoint at `path` holds a complete universal conversion (its marker is written last)."""
    try:
        return UNIVERSAL_DONE in storage.list_files(storage.join(path, DS_DIR, UNIVERSAL_TAG))
    except storage.StorageError:
        return False


def ensure_universal(path: str, log: Any = print) -> str:
    """Convert the DeepSpeed state of the checkpoint at `path` into DeepSpeed's universal checkpoint
    (deepspeed.checkpoint.ds_to_universal, DeepSpeed's own converter, run as a library) beside it in
    deepspeed/universal/, unless a complete one is there; returns its location. Runs once, on the
    driver, before any worker starts: every rank of any world size then loads it with
    checkpoint.load_universal. The marker file is written after the rest, so a cut-off conversion
    is never loaded (the next resume converts again)."""
    import argparse
    import contextlib
    import sys

    target = storage.join(path, DS_DIR, UNIVERSAL_TAG)
    if has_universal(path):
        return target
    from raylm.train.deepspeed import import_deepspeed

    import_deepspeed()
    from deepspeed.checkpoint import ds_to_universal

    log(f"raylm: converting {storage.join(path, DS_DIR, DS_TAG)} to DeepSpeed's universal checkpoint")
    tmp = tempfile.mkdtemp(prefix="raylm-universal-")
    try:
        with local_copy(path, f"{DS_DIR}/{DS_TAG}") as local:
            out = os.path.join(tmp, UNIVERSAL_TAG)
            args = argparse.Namespace(input_folder=os.path.join(local, DS_DIR, DS_TAG), output_folder=out,
                                      num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                      strict=True, inject_missing_state=True)
            with contextlib.redirect_stdout(sys.stderr):  # its progress lines; stdout carries --json
                ds_to_universal.main(args)
        if not storage.is_remote(target):
            shutil.rmtree(target, ignore_errors=True)  # a cut-off earlier conversion
        storage.upload(out, target)
        storage.write_json(storage.join(target, UNIVERSAL_DONE), {"from": DS_TAG, "files": storage.list_files(out)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_checkpoint(engine: Any, path: str, adapter_only: bool = False, universal: bool = False) -> Position:
    """Restore model, optimizer and LR schedule of this rank from a verified checkpoint (local, or
    in object storage: its DeepSpeed state is downloaded first and the copy removed after).

    `adapter_only`: the checkpoint holds only the trainable (LoRA) weights; the frozen base the
    engine was built with stays as it is. `universal`: load deepspeed/universal/ (ensure_universal)
    into an engine built with checkpoint.load_universal, on any world size."""
    tag = UNIVERSAL_TAG if universal else DS_TAG
    if universal and not has_universal(path):
        raise CheckpointError(f"{path}: no complete {DS_DIR}/{UNIVERSAL_TAG} (the driver converts it before the "
                              f"workers start)")
    with local_copy(path, f"{DS_DIR}/{tag}") as local:
        load_path, client = engine.load_checkpoint(os.path.join(local, DS_DIR), tag=tag,
                                                   load_module_strict=not adapter_only,
                                                   load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"{path}: DeepSpeed could not load {DS_DIR}/{DS_TAG}")
    return position(client, path)


def position(client: dict, path: str) -> Position:
    """The Position a checkpoint recorded. One written before positions counted rows holds
    `offset`, the micro-batches each rank took: that many x its own micro_batch_size rows (the
    data continues from the same count of rows, not in exactly the order it would have)."""
    pos = Position(**{k: int(client.get(k, 0)) for k in asdict(Position())})
    if "rows" not in client and client.get("offset"):
        saved = yaml.safe_load(storage.read_bytes(storage.join(path, CONFIG_FILE)))
        pos.rows = int(client["offset"]) * int(saved["train"]["micro_batch_size"])
    return pos


def hf_dir(checkpoint_path: str) -> str:
    return storage.join(checkpoint_path, HF_DIR)
