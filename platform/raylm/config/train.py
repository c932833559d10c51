"""`train:` and `deepspeed:`: the Ray Train run and the DeepSpeed engine of each worker.

No Ray Serve import here (nor anywhere under it): a training worker validates its config without it."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field

from raylm.config.base import _Strict
from raylm.config.grpo import GRPOConfig


class LoraConfig(_Strict):
    """LoRA adapters through peft: only these low-rank matrices train; the base stays frozen."""

    r: int = Field(8, ge=1, description="Rank of the adapter matrices.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator (the update is scaled by alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | str = Field(
        "all-linear", description="Module names to adapt (e.g. [q_proj, v_proj]; GPT-2: [c_attn]) or "
        "'all-linear' (every linear layer but the output head).")


class TrackingConfig(_Strict):
    """Experiment tracking, written by rank 0 beside metrics.jsonl."""

    tensorboard: bool = Field(True, description="TensorBoard event files in <storage>/<run>/tensorboard/.")
    mlflow: bool = Field(False, description="Also log params and metrics to MLflow.")
    mlflow_uri: Optional[str] = Field(
        None, description="MLflow tracking URI; None: a local file store <storage>/mlruns.")
    mlflow_experiment: str = Field("raylm", description="MLflow experiment the runs go to.")


class DPOConfig(_Strict):
    """Direct Preference Optimization (train.objective dpo): the policy learns to prefer chosen over
    rejected answers relative to a frozen reference (the starting model)."""

    beta: float = Field(0.1, gt=0, description="Strength of the pull towards the reference (DPO's beta; IPO's tau).")
    loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="'sigmoid': DPO's -log sigmoid(beta * margin); 'ipo': IPO's squared loss on "
        "per-token-averaged log-ratios (as TRL computes it).")
    disable_dropout: bool = Field(
        True, description="Dropout off in the policy and the reference (TRL's DPOConfig.disable_dropout): with it "
        "on, the two differ by their dropout masks alone, and the rewards measure noise (GPT-2 has dropout 0.1).")


class TrainConfig(_Strict):
    num_workers: int = Field(2, ge=1, description="Ray Train worker actors (one DeepSpeed rank each).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL and bf16; otherwise CPU, gloo and fp32.")
    cpu_mmap_threshold_kib: Optional[int] = Field(
        None, ge=0, description="CPU training: each worker's glibc malloc serves blocks of at least this many KiB "
        "with their own mappings, returned to the system when freed (mallopt M_MMAP_THRESHOLD). Unset: 128 under "
        "ZeRO-3, glibc's own otherwise; 0: glibc's own, whose threshold rises to 32 MiB and then keeps freed "
        "gathered layers and activations in the heap (ZeRO-3 at 0.11B: ~0.7 GiB more per worker, but steps ~1.5x "
        "faster; bench/RESULTS.md section 8).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each worker actor reserves.")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per worker per forward pass.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    global_batch_size: Optional[int] = Field(
        None, ge=1, description="If set, must equal micro_batch_size * grad_accum_steps * num_workers."
    )
    max_steps: int = Field(100, ge=1, description="Optimizer steps in the run.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine schedule floor, as a share of lr.")
    warmup_steps: int = Field(
        10, ge=0, description="Linear warm-up steps before the cosine decay; the first runs at lr / (warmup_steps + 1), "
        "not 0. 0: no warm-up (the first step at lr).")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay of the weights; biases, norms and "
                                "embeddings (a tied output head with them) never decay, as in Hugging Face's Trainer.")
    beta1: float = Field(0.9, gt=0, lt=1)
    beta2: float = Field(0.95, gt=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="Gradient norm clipping; 0 turns it off.")
    loss_chunk_tokens: int = Field(
        512, ge=0, description="Tokens whose logits (vocab wide, fp32) are computed at once for the loss and "
        "log-probs; backward recomputes them a chunk at a time, so the full (batch, seq, vocab) logits never "
        "exist. 0: all at once.")
    log_every_steps: int = Field(10, ge=1, description="Report training metrics every N steps.")
    eval_every_steps: int = Field(50, ge=1, description="Validation loss / perplexity every N steps.")
    eval_batches: int = Field(8, ge=1, description="Validation batches per evaluation (per worker), each a step's "
                              "rows of a worker (micro_batch_size x grad_accum_steps): the same rows however the "
                              "step is cut into micro-batches.")
    checkpoint_every_steps: int = Field(50, ge=1, description="Save a resumable checkpoint every N steps.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept: the newest K (in a sweep trial, the K "
                                  "best by tune.metric, and always the newest for resume).")
    export: Literal["every", "final_and_best"] = Field(
        "final_and_best", description="Which checkpoints also get the consolidated Hugging Face export (hf/; with "
        "train.lora also adapter/ and the merge) that serving loads. 'final_and_best': the run's final checkpoint and, "
        "in a sweep trial, each checkpoint whose tune.metric is the trial's best so far; the others hold only the "
        "resumable DeepSpeed state (`raylm export <checkpoint>` adds hf/ to any of them). 'every': every checkpoint "
        "(the consolidation costs most of a checkpoint's time at 1B+ parameters).")
    checkpoint_upload: Literal["async", "sync"] = Field(
        "async", description="How Ray Train persists a checkpoint to train.storage_path: 'async' uploads it "
        "in a background thread while training goes on (object storage: the upload no longer stalls the step), "
        "'sync' waits for it inside the step. Either way a checkpoint counts only once its manifest and every "
        "file it lists are in storage.")
    max_failures: int = Field(2, ge=0, description="Worker-group restarts from the last checkpoint before giving up.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="How the workers' placement group lays them on nodes (Ray Train's "
        "ScalingConfig.placement_strategy). PACK fills as few nodes as it can (fast gloo/NCCL between ranks); "
        "SPREAD puts workers on different nodes, so losing one node loses part of the group, not all of it, "
        "and the restarted group fits on the nodes left. STRICT_* fail instead of falling back."
    )
    worker_node_labels: dict[str, str] = Field(
        default_factory=dict, description="Ray node labels a worker's node must carry (Ray Train's "
        "ScalingConfig.label_selector), e.g. {raylm.io/pool: train}; empty: any node."
    )
    seed: int = Field(0)
    storage_path: str = Field("~/raylm_results", description="Root for runs, sweeps and checkpoints (local or s3://, gs://).")
    run_name: str = Field("raylm-train", description="Runs with the same name resume each other.")
    resume_universal: bool = Field(
        False, description="Allow resuming the run's newest checkpoint on another train.num_workers (world size): "
        "the checkpoint is converted once with DeepSpeed's universal-checkpoint tool (deepspeed.checkpoint."
        "ds_to_universal, written beside it as deepspeed/universal/) and loaded with DeepSpeed's "
        "checkpoint.load_universal. The global batch must stay the same (set micro_batch_size x grad_accum_steps "
        "for the new worker count): the data position and the lr schedule count whole steps of it. ZeRO stages "
        "1 and 2 only; not with train.lora or the grpo objective. Off: a resume on another world size is refused.")
    lora: Optional[LoraConfig] = Field(
        None, description="Train LoRA adapters (peft) instead of every weight; absent: full fine-tuning.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="TensorBoard / MLflow.")
    objective: Literal["lm", "dpo", "grpo"] = Field(
        "lm", description="'lm': next-token loss (pre-training, SFT); 'dpo': preference tuning on data.format "
        "preference pairs (see train.dpo); 'grpo': online RL on data.format prompt records, completions "
        "generated by vLLM engines and scored by reward functions (see train.grpo).")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="DPO settings (train.objective dpo).")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="GRPO settings (train.objective grpo).")

    @property
    def effective_global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.num_workers

    @property
    def eval_micro_batches(self) -> int:
        """Validation micro-batches per worker: eval_batches steps' rows, whatever their cut."""
        return self.eval_batches * self.grad_accum_steps


class DeepSpeedConfig(_Strict):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage: 0 (plain DDP) to 3 (params sharded).")
    offload_optimizer: bool = Field(False, description="Keep optimizer state on CPU (ZeRO >= 1).")
    offload_params: bool = Field(False, description="Keep parameters on CPU (ZeRO-3 only).")
    stage3_max_live_parameters: int = Field(
        2 * 10**7, ge=0, description="ZeRO-3: at most this many parameters gathered at once by prefetching "
        "(DeepSpeed's stage3_max_live_parameters; its default 1e9 is a whole 1B model). 2e7 (about two layers of a "
        "0.11B model): 1e8 kept ~0.47 GiB more gathered per worker at 0.11B for ~5% faster CPU steps (bench/RESULTS.md "
        "section 8); on GPUs a larger value lets more prefetching overlap compute.")
    stage3_max_reuse_distance: int = Field(
        10**7, ge=0, description="ZeRO-3: a gathered parameter is kept only when it is used again within this many "
        "parameters' worth of modules; otherwise it is released after use and gathered again in backward "
        "(DeepSpeed's stage3_max_reuse_distance; its default 1e9 keeps every layer of a model under 1B gathered "
        "from its forward to its backward: the whole model again on each rank).")
    stage3_prefetch_bucket_size: int = Field(
        10**7, ge=0, description="ZeRO-3: parameters fetched ahead of use (DeepSpeed's stage3_prefetch_bucket_size).")
    stage3_reduce_bucket_size: int = Field(
        10**7, ge=1, description="ZeRO-3: gradients are reduce-scattered in buckets of this many elements (DeepSpeed's "
        "reduce_bucket_size). Its default 5e8 is larger than most models: the bucket then holds every full-size "
        "gradient until the backward ends and the reduce-scatter flattens a second copy (bench/RESULTS.md, section 8).")
    stage3_sub_group_size: int = Field(
        10**7, ge=1, description="ZeRO-3: the optimizer steps a rank's partition in pieces of this many elements "
        "(DeepSpeed's sub_group_size). Its default 1e9 steps the whole partition at once: a flat copy of its "
        "gradients and Adam's temporaries, each the size of the partition (bench/RESULTS.md, section 8).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="'auto': bf16 on GPU, fp32 on CPU. bf16 accumulates gradients in fp32 (from "
        "zero_stage 1 on); fp16 (GPU) skips the steps whose gradients overflow (metric skipped_steps)."
    )
