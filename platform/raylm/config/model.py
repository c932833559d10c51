"""`model:`: the causal LM that trains (a preset or a Hugging Face model)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from raylm.config.base import _Strict


class ModelConfig(_Strict):
    name: str = Field(
        "tiny-llama",
        description="A preset (tiny-llama, tiny-gpt2, small-llama, small-gpt2, base-llama, base-gpt2) "
        "built with from_config, or a Hugging Face model name or local directory (from_pretrained).",
    )
    activation_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Extra fields for the preset's transformers config (e.g. num_hidden_layers)."
    )
