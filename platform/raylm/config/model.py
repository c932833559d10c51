"""`model:`: the causal LM that trains (a preset or a Hugging Face model)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from raylm.config.base import _Strict


PRESET_NAMES = ("tiny-llama", "small-llama", "base-llama", "tiny-gpt2", "small-gpt2", "base-gpt2")  # raylm.model.PRESETS


class ModelConfig(_Strict):
    name: str = Field(
        "tiny-llama",
        description="A preset (tiny-llama, tiny-gpt2, small-llama, small-gpt2, base-llama, base-gpt2) "
        "built with from_config, or a Hugging Face model name or local directory (from_pretrained), whose own "
        "tokenizer and chat template the data stage then uses.",
    )
    activation_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    @property
    def pretrained(self) -> bool:
        """A Hub id or a local folder, not a preset: it comes with its own vocabulary."""
        return self.name not in PRESET_NAMES

    overrides: dict[str, Any] = Field(
        default_factory=dict, description="Extra fields for the preset's transformers config (e.g. num_hidden_layers)."
    )
