"""The only place the DeepSpeed config dict and the lr schedule are derived from the typed config."""

from __future__ import annotations

import copy
import math
import sys
from types import ModuleType
from typing import Any, Callable

from raylm.config import RaylmConfig
from raylm.config.train import TrainConfig


SHM_COMM_OP = "deepspeed_shm_comm"


def import_deepspeed() -> ModuleType:
    """`import deepspeed`, without the MLflow import DeepSpeed makes on the way.

    DeepSpeed's package import reaches its autotuner (deepspeed.runtime.config ->
    deepspeed.autotuning), which imports MLflow whenever it is installed, as it is for
    `train.tracking.mlflow`: 1.4 of the 1.8 s `import deepspeed` takes on one core, paid by every
    training worker of every run and trial. raylm never runs the autotuner, so the import is made
    with MLflow hidden (the autotuner then records has_mlflow=False); MLflow itself stays importable
    afterwards, and a process that already imported it keeps it.

    DeepSpeed's CPU backend also compiles a shared-memory all-reduce op (`deepspeed_shm_comm`) the
    first time a process group starts on a machine: ~100 s of C++ build on 2 cores, in every fresh
    container or pod. It serves only `inference_all_reduce` (DeepSpeed's tensor-parallel
    inference), which training never calls; its all-reduces go through torch.distributed (gloo).
    So the op is marked unavailable, as DeepSpeed marks it where it cannot build, and never built."""
    hide = "deepspeed" not in sys.modules and "mlflow" not in sys.modules
    if hide:
        sys.modules["mlflow"] = None  # type: ignore[assignment]  # `import mlflow` raises ImportError
    try:
        import deepspeed
    finally:
        if hide and sys.modules.get("mlflow", 0) is None:
            del sys.modules["mlflow"]
    from deepspeed.accelerator import get_accelerator  # also when something imported DeepSpeed first

    if get_accelerator().create_op_builder("ShareMemCommBuilder") is not None:  # CPU only (None on CUDA,
        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False  # where probing all ops would query nvcc)
    return deepspeed


def lr_factor(step: int, t: TrainConfig) -> float:
    """Share of train.lr that optimizer step `step` (0-based) trains with: linear warm-up, then cosine.

    Warm-up as torchtitan has it: step k < warmup_steps runs at (k + 1) / (warmup_steps + 1), so
    the first step already moves (never lr 0) and warm-up ends just below the peak; warmup_steps 0
    starts at the peak. The cosine then falls from lr to min_lr_ratio x lr over the steps left."""
    if step < t.warmup_steps:
        return (step + 1) / (t.warmup_steps + 1)
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr_ratio + (1.0 - t.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_scheduler(cfg: RaylmConfig) -> Callable[[Any], Any]:
    """What deepspeed.initialize(lr_scheduler=...) calls with its optimizer: a torch LambdaLR over
    `lr_factor`. DeepSpeed steps it after each applied optimizer step (not after an fp16 overflow
    skip) and saves / restores its state with every checkpoint, so a resumed run continues the
    schedule where it stopped (`continue_schedule`)."""
    import torch

    t = cfg.train
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, t))


GROUP_HYPERPARAMETERS = ("weight_decay", "betas", "eps")


def group_hyperparameters(engine: Any) -> list[dict[str, Any]]:
    """Each optimizer group's weight decay, betas and eps, as this run's config built them (read
    before a checkpoint load overwrites them: `restore_group_hyperparameters` puts them back)."""
    return [{k: copy.deepcopy(g[k]) for k in GROUP_HYPERPARAMETERS if k in g} for g in engine.optimizer.param_groups]


def restore_group_hyperparameters(engine: Any, built: list[dict[str, Any]]) -> None:
    """After a checkpoint load: each group's weight decay, betas and eps as this run's config built
    them (`group_hyperparameters`, read before the load). DeepSpeed's load restores the saved
    run's (under ZeRO-2 and 3 a run resumed with train.weight_decay 0.3 kept the checkpoint's 0.1),
    so a resumed run follows its config, as it does for the lr (`continue_schedule`); the state
    (Adam's moments, the step) is the checkpoint's."""
    for group, values in zip(engine.optimizer.param_groups, built):
        group.update(values)


def continue_schedule(engine: Any, cfg: RaylmConfig) -> None:
    """After a checkpoint load: the lr of the step the restored schedule has reached, by this
    run's config. The checkpoint restores the step count, but also the optimizer's lr and the
    scheduler's base lr of the run that saved it: without this, a run resumed with a new
    train.max_steps (or train.lr) trains its first step, or all of them, at the old numbers."""
    sched, t = engine.lr_scheduler, cfg.train
    sched.base_lrs = [t.lr for _ in sched.base_lrs]
    lr = t.lr * lr_factor(sched.last_epoch, t)
    for group in sched.optimizer.param_groups:
        group["lr"] = lr
    sched._last_lr = [lr for _ in sched.base_lrs]  # what get_last_lr() says; torch sets it in step()


# Parameter names that never decay, as Hugging Face's Trainer names them (get_decay_parameter_names)
NO_DECAY_NAME_PATTERNS = (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)")


def decay_parameter_names(model: Any) -> set[str]:
    """Names of the parameters `train.weight_decay` applies to: not biases, not norms (by layer type
    or name, as Hugging Face's Trainer decides), and not embeddings (token and position tables; a
    tied output head is the embedding's parameter, so it does not decay either)."""
    import torch
    from transformers.trainer_pt_utils import get_parameter_names

    return set(get_parameter_names(model, [torch.nn.LayerNorm, torch.nn.Embedding], list(NO_DECAY_NAME_PATTERNS)))


def optimizer_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """deepspeed.initialize's `model_parameters`: the trainable parameters in two groups, with
    train.weight_decay and without (the optimizer's own weight_decay applies to neither)."""
    decay = decay_parameter_names(model)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for name, p in trainable if name in decay], "weight_decay": weight_decay},
              {"params": [p for name, p in trainable if name not in decay], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def deepspeed_config(cfg: RaylmConfig, load_universal: bool = False) -> dict[str, Any]:
    """DeepSpeed JSON for this run: ZeRO stage, offload, batch sizes, precision, AdamW (the lr
    schedule is `lr_scheduler`, handed to deepspeed.initialize beside this dict). `load_universal`:
    the engine will load a universal checkpoint (a resume on another world size, train.resume_universal)."""
    t, ds = cfg.train, cfg.deepspeed
    precision = cfg.precision
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 2:
        zero.update(overlap_comm=t.use_gpu, contiguous_gradients=True, reduce_scatter=True)
    if ds.zero_stage == 3:
        # ZeRO-3 shards parameters; gathering them on save lets rank 0 write a HF model.
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_param_persistence_threshold=0,
                    # what a rank holds gathered beside its shard: bounded, so that layers are released
                    stage3_max_live_parameters=ds.stage3_max_live_parameters,
                    stage3_max_reuse_distance=ds.stage3_max_reuse_distance,
                    stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
                    # and what it holds beside them at once: the gradient bucket, the optimizer's piece
                    reduce_bucket_size=ds.stage3_reduce_bucket_size, sub_group_size=ds.stage3_sub_group_size)
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
        # bf16 weights, gradients accumulated over micro-batches in fp32:
        # DeepSpeed 0.19.8 honours this from ZeRO-1 on (ZeRO-0 refuses it; the config check says so)
        **({"data_types": {"grad_accum_dtype": "fp32"}} if precision == "bf16" else {}),
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": 1e-8, "weight_decay": t.weight_decay,
                       # CPU without offload: plain torch AdamW (the fused kernels are CUDA-only).
                       **({"torch_adam": True} if not t.use_gpu and not ds.offload_optimizer else {})},
        },
        "steps_per_print": 10**9,  # raylm reports its own metrics
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        **({"checkpoint": {"load_universal": True}} if load_universal else {}),
    }


def share_fp32_master(optimizer: Any) -> int:
    """ZeRO-3 without offload: point each fp32 master partition at the rank's own parameter partition
    when that already is fp32 on the same device, as DeepSpeed means to (stage3.py,
    `_create_fp32_partitions`: "we don't need another copy of the weights"). DeepSpeed 0.19.8 compares
    `tensor.device == self.device` with `self.device` a string ('cpu'), which a torch.device never
    equals, so it clones: a second copy of the partition, 4 bytes a parameter / world on every rank
    (219 MiB a worker at 0.11B on 2 workers; bench/RESULTS.md section 8). After this the optimizer
    updates the partition in place and DeepSpeed's copy back (fp32 -> partition) copies it onto itself.

    The master tensors stay the same objects (the optimizer's param groups and Adam state key on
    them); only their storage changes. Returns the bytes freed."""
    lows = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    masters = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    if not lows or not masters or getattr(optimizer, "offload_optimizer", False):
        return 0
    freed = 0
    for low, master in zip(lows, masters):
        if (low is None or master.numel() == 0 or master.numel() != low.numel() or master.dtype != low.dtype
                or master.device != low.device or master.data_ptr() == low.data_ptr()):
            continue
        freed += master.numel() * master.element_size()
        master.data = low.data
    return freed


def cpu_mmap_threshold(kib: int) -> bool:
    """glibc malloc: blocks of at least `kib` KiB get their own mapping, returned to the system when
    freed (mallopt M_MMAP_THRESHOLD, this process only; later allocations). glibc's own threshold
    starts at 128 KiB but rises to the largest block freed, up to 32 MiB, after which freed gathered
    layers, gradients and activations stay in the heap (measured: bench/RESULTS.md section 8).
    False where it is not glibc or kib is 0."""
    import ctypes

    if kib <= 0:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-3, kib * 1024))  # M_MMAP_THRESHOLD


def inference_config(cfg: RaylmConfig) -> dict[str, Any]:
    """DeepSpeed JSON for a frozen model sharded beside the policy (DPO's full-fine-tuning reference
    under ZeRO-3): the run's own ZeRO settings (the live-parameter and prefetch limits that release
    gathered layers included), without an optimizer or gradient settings it never uses."""
    ds = deepspeed_config(cfg)
    for key in ("optimizer", "gradient_clipping", "zero_allow_untested_optimizer", "data_types"):
        ds.pop(key, None)
    zero = ds["zero_optimization"]
    for key in ("offload_optimizer", "overlap_comm", "contiguous_gradients", "reduce_scatter"):
        zero.pop(key, None)
    return ds
