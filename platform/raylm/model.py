"""Models: presets built with `from_config` (random init) or a Hugging Face model by name/path."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import yaml

from raylm.config import ModelConfig, RaylmConfig
from raylm.config.model import PRESET_NAMES
from raylm.errors import ModelError

# Llama-style and GPT-2-style families. Sizes are approximate parameter counts at vocab 32k / 50k.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    # head_dim = hidden / heads >= 32 in every preset: vLLM's CPU attention needs it to serve them.
    "tiny-llama": ("llama", dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512)),
    "small-llama": ("llama", dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,  # ~125M
                                  num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048)),
    "base-llama": ("llama", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,  # ~1.1B
                                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)),
    "tiny-gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=2, n_positions=512)),
    "small-gpt2": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024)),  # ~124M
    "base-gpt2": ("gpt2", dict(n_embd=1280, n_layer=36, n_head=20, n_positions=1024)),  # ~774M
}

assert tuple(PRESETS) == PRESET_NAMES, "raylm.config.model.PRESET_NAMES must list raylm.model.PRESETS"


def preset_config(name: str, vocab_size: int, seq_len: int, tokenizer: Any = None, overrides: dict | None = None):
    """The transformers config of a preset, sized for this vocabulary and sequence length."""
    from transformers import GPT2Config, LlamaConfig

    family, kwargs = PRESETS[name]
    kwargs = dict(kwargs, **(overrides or {}))
    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_token_id or tokenizer.eos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if family == "llama":
        kwargs["max_position_embeddings"] = max(kwargs["max_position_embeddings"], seq_len)
        return LlamaConfig(vocab_size=vocab_size, tie_word_embeddings=True, **ids, **kwargs)
    kwargs["n_positions"] = max(kwargs["n_positions"], seq_len)
    return GPT2Config(vocab_size=vocab_size, **ids, **kwargs)


def max_context(model_config: Any) -> int:
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model_config, attr, None)
        if isinstance(value, int):
            return value
    return 2048


@contextmanager
def zero3_init(ds_config: Optional[dict]) -> Iterator[None]:
    """Inside: transformers builds models partitioned, under `deepspeed.zero.Init`, when `ds_config`
    is a ZeRO-3 DeepSpeed dict (its HfDeepSpeedConfig path: a live HfDeepSpeedConfig is what
    `from_config`/`from_pretrained`/`resize_token_embeddings` look for). Each rank then only ever
    holds its 1/world shard instead of a full fp32 copy. Scoped, not kept alive: a model built
    later on one rank alone (the LoRA export) must not start a collective.

    A collective: every rank of the DeepSpeed group (initialised first) enters it together."""
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    live = HfDeepSpeedConfig(ds_config)  # transformers keeps only a weak reference: this one holds it
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del live


def build_model(cfg: ModelConfig, vocab_size: int, seq_len: int, tokenizer: Any = None, dtype: Any = None,
                ds_config: Optional[dict] = None):
    """A causal LM: a preset with random weights, or `from_pretrained` of a name or directory.

    `ds_config` (the run's DeepSpeed dict): with ZeRO-3 the model is built already partitioned
    across the DeepSpeed group (see `zero3_init`); every rank must call this together then."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = dtype or torch.float32
    with zero3_init(ds_config):
        if cfg.name in PRESETS:
            torch_cfg = preset_config(cfg.name, vocab_size, seq_len, tokenizer, cfg.overrides)
            model = AutoModelForCausalLM.from_config(torch_cfg, dtype=dtype)
        else:
            source = os.path.expanduser(cfg.name) if os.path.exists(os.path.expanduser(cfg.name)) else cfg.name
            try:
                model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **cfg.overrides)
            except (OSError, ValueError) as exc:
                raise ModelError(f"model.name={cfg.name}: not a preset ({', '.join(PRESETS)}) and not loadable: {exc}") from None
            if model.get_input_embeddings().num_embeddings < vocab_size:
                model.resize_token_embeddings(vocab_size)  # gathers the partitioned embedding under ZeRO-3
    if max_context(model.config) < seq_len:
        raise ModelError(f"data.seq_len={seq_len} exceeds the context of model.name={cfg.name} ({max_context(model.config)})")
    if cfg.activation_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model


def numel(param: Any) -> int:
    """Elements of a parameter, whole: a ZeRO-3 partitioned one holds an empty tensor locally and
    its full size in `ds_numel`."""
    return getattr(param, "ds_numel", None) or param.numel()


def count_params(model: Any) -> int:
    return sum(numel(p) for p in model.parameters())


def export_hf(model: Any, state_dict: Optional[dict], tokenizer: Any, cfg: RaylmConfig, out_dir: str) -> None:
    """Write a directory `AutoModelForCausalLM.from_pretrained` loads, with its tokenizer and config."""
    model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    with open(os.path.join(out_dir, "raylm_config.yaml"), "w") as f:
        yaml.safe_dump(cfg.model_dump(mode="json"), f, sort_keys=False)
