"""LoRA through peft: wrap the model, count what trains, export the adapter and a merged model."""

from __future__ import annotations

import os
from typing import Any

from raylm.config import LoraConfig, RaylmConfig


def apply_lora(model: Any, lora: LoraConfig) -> Any:
    """The model with LoRA adapters on `target_modules`; every other weight frozen (requires_grad False),
    so DeepSpeed keeps gradients and optimizer state for the adapters only."""
    import peft

    if getattr(model, "is_gradient_checkpointing", False):
        # reentrant checkpointing needs an input that requires grad, or no gradient reaches the
        # adapters (the embedding that would provide it is frozen); harmless otherwise
        model.enable_input_require_grads()
    return peft.get_peft_model(model, peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        task_type="CAUSAL_LM"))


def param_counts(model: Any) -> tuple[int, int]:
    """(trainable, total) parameters, whole also when ZeRO-3 has partitioned them (`ds_numel`)."""
    from raylm.model import numel

    params = list(model.parameters())
    return sum(numel(p) for p in params if p.requires_grad), sum(numel(p) for p in params)


def export_lora(state_dict: dict, tokenizer: Any, cfg: RaylmConfig, adapter_dir: str, hf_dir: str,
                adapter_only: bool = False) -> None:
    """From the state of the peft model: `adapter_dir` (PeftModel.from_pretrained loads it onto the
    base) and `hf_dir`, the merged model that plain transformers loads. The state is the full
    (consolidated) one, or with `adapter_only` the trainable weights alone (a DeepSpeed checkpoint
    saved without its frozen base, which is rebuilt from model.name as on resume).

    A fresh CPU copy is built and loaded from the state dict: under ZeRO-3 the engine's own
    module holds only a shard, and merging in place would spoil the model still training."""
    from raylm.model import build_model
    from raylm.model import export_hf

    model = apply_lora(build_model(cfg.model, len(tokenizer), cfg.data.seq_len, tokenizer), cfg.train.lora)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
    needed = {n for n, p in model.named_parameters() if p.requires_grad} if adapter_only else set(missing)
    if unexpected or (set(missing) & needed) - tied:
        raise RuntimeError(f"LoRA export: state dict does not fit the model (missing "
                           f"{sorted((set(missing) & needed) - tied)[:5]}, unexpected {sorted(unexpected)[:5]})")
    model.save_pretrained(adapter_dir)  # the adapter weights and adapter_config.json only
    tokenizer.save_pretrained(adapter_dir)
    export_hf(model.merge_and_unload(), None, tokenizer, cfg, hf_dir)
    with open(os.path.join(adapter_dir, "raylm_config.yaml"), "w") as f, \
            open(os.path.join(hf_dir, "raylm_config.yaml")) as src:
        f.write(src.read())
