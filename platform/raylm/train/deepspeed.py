"""The only place the DeepSpeed config dict is derived from the typed config."""

from __future__ import annotations

from typing import Any

from raylm.config import RaylmConfig


def deepspeed_config(cfg: RaylmConfig) -> dict[str, Any]:
    """DeepSpeed JSON for this run: ZeRO stage, offload, batch sizes, AdamW, warm-up + cosine."""
    t, ds = cfg.train, cfg.deepspeed
    precision = cfg.precision
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 2:
        zero.update(overlap_comm=t.use_gpu, contiguous_gradients=True, reduce_scatter=True)
    if ds.zero_stage == 3:
        # ZeRO-3 shards parameters; gathering them on save lets rank 0 write a HF model.
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_param_persistence_threshold=0)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": t.use_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": t.use_gpu}
    return {
        "train_batch_size": t.effective_global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": 1e-8, "weight_decay": t.weight_decay,
                       # CPU without offload: plain torch AdamW (the fused kernels are CUDA-only).
                       **({"torch_adam": True} if not t.use_gpu and not ds.offload_optimizer else {})},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {"total_num_steps": t.max_steps, "warmup_num_steps": min(t.warmup_steps, t.max_steps - 1),
                       "warmup_min_ratio": 0.0, "cos_min_ratio": t.min_lr_ratio, "warmup_type": "linear"},
        },
        "steps_per_print": 10**9,  # raylm reports its own metrics
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
