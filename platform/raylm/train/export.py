"""`raylm export`: the consolidated Hugging Face model (hf/, and with LoRA adapter/) of a checkpoint
that training saved without it (train.export: final_and_best), built from its DeepSpeed state with
DeepSpeed's own ZeRO-to-fp32 conversion, without an engine or a cluster.

The export is written beside the checkpoint, then listed in its manifest: locally hf/ appears in
one rename; in object storage config.json is uploaded last (serving looks for it first) and the
manifest after it."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import yaml

from raylm import storage
from raylm.config import RaylmConfig, validate_tree
from raylm.errors import CheckpointError
from raylm.train.checkpoint import (ADAPTER_DIR, CONFIG_FILE, DS_DIR, DS_TAG, HF_DIR, MANIFEST, TOKENIZER_DIR,
                                    is_exported, local_copy, verify_checkpoint, write_manifest)


def fp32_state_dict(ds_dir: str, zero_stage: int, adapter_only: bool) -> dict:
    """The full-precision weights of a DeepSpeed checkpoint, merged from every rank's shard
    (ZeRO 1-3: deepspeed.utils.zero_to_fp32; stage 0 keeps the whole module in one file)."""
    import torch

    if zero_stage == 0:
        path = os.path.join(ds_dir, DS_TAG, "mp_rank_00_model_states.pt")
        return {k: v.float() for k, v in torch.load(path, map_location="cpu", weights_only=False)["module"].items()}
    from raylm.train.deepspeed import import_deepspeed

    import_deepspeed()  # the package first, without the MLflow import it would make
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(ds_dir, tag=DS_TAG, exclude_frozen_parameters=adapter_only)


def build_export(local: str, manifest: dict, out: str) -> list[str]:
    """Write hf/ (and adapter/) of the checkpoint folder `local` into `out`; returns the folders written."""
    from transformers import AutoTokenizer

    from raylm.model import build_model, export_hf

    with open(os.path.join(local, CONFIG_FILE)) as f:
        cfg: RaylmConfig = validate_tree(yaml.safe_load(f), source=os.path.join(local, CONFIG_FILE))
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(local, TOKENIZER_DIR))
    lora = bool(cfg.train.lora)
    state = fp32_state_dict(os.path.join(local, DS_DIR), int(manifest["zero_stage"]), adapter_only=lora)
    if lora:
        from raylm.train.lora import export_lora

        export_lora(state, tokenizer, cfg, os.path.join(out, ADAPTER_DIR), os.path.join(out, HF_DIR), adapter_only=True)
        return [ADAPTER_DIR, HF_DIR]
    model = build_model(cfg.model, len(tokenizer), cfg.data.seq_len, tokenizer)
    check_fits(model, state)
    export_hf(model, state, tokenizer, cfg, os.path.join(out, HF_DIR))
    return [HF_DIR]


def check_fits(model: Any, state: dict) -> None:
    """The merged weights name exactly the model's (a tied output head may be left out)."""
    names = set(model.state_dict())
    tied = {n for n in names if n.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
    missing, unexpected = names - set(state) - tied, set(state) - names
    if missing or unexpected:
        raise CheckpointError(f"export: the DeepSpeed state does not fit the model (missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]})")


def export_checkpoint(path: str, log: Any = print) -> str:
    """Add hf/ to the checkpoint at `path` (a local folder or a URI) unless it has one; returns
    the hf/ location, which `raylm serve --checkpoint` takes."""
    manifest = verify_checkpoint(path)  # a cut-off or corrupted checkpoint is named, not exported
    hf = storage.join(path, HF_DIR)
    if is_exported(manifest):
        log(f"{path}: already exported")
        return hf
    if CONFIG_FILE not in manifest["files"]:
        raise CheckpointError(f"{path}: saved by an older raylm without {CONFIG_FILE}; it cannot be exported")
    with local_copy(path) as local, tempfile.TemporaryDirectory(prefix="raylm-export-",
                                                                dir=None if storage.is_remote(path) else path) as out:
        written = build_export(local, manifest, out)
        files = dict(manifest["files"])
        for sub in written:
            files.update({f"{sub}/{rel}": size for rel, size in storage.list_files(os.path.join(out, sub)).items()})
        publish(path, out, written)
        manifest = {**manifest, "exported": True, "files": files}
        if storage.is_remote(path):
            storage.write_json(storage.join(path, MANIFEST), manifest)
        else:
            write_manifest(path, manifest)
    log(f"exported {hf}")
    return hf


def publish(path: str, out: str, written: list[str]) -> None:
    """Move the finished export next to the checkpoint's other folders."""
    for sub in written:
        if not storage.is_remote(path):
            shutil.rmtree(os.path.join(path, sub), ignore_errors=True)  # a previous export cut off midway
            os.replace(os.path.join(out, sub), os.path.join(path, sub))
            continue
        src = os.path.join(out, sub)
        config = os.path.join(src, "config.json")
        held = None
        if os.path.exists(config):  # serving finds a model by its config.json: that goes last
            held = os.path.join(out, "config.json.last")
            os.replace(config, held)
        storage.upload(src, storage.join(path, sub))
        if held:
            storage.upload(held, storage.join(path, sub, "config.json"))
