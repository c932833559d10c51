"""The OpenAI-compatible Serve application: vLLM through Ray Serve LLM, behind raylm's gate.

Each replica of one deployment, `RaylmServer` (Ray Serve LLM's `LLMServer` with a late-bound
ASGI ingress), runs a vLLM engine (continuous batching, paged KV cache, prefix caching) and
vLLM's own OpenAI server app in the same process, with `gate.Gate` in front of it for keys,
validation and error shape. A request costs one hop: Serve's proxy (or none, with direct
ingress) to the replica that generates it. Replica count, concurrency, queue limit, resources
and engine arguments come from `ServeConfig` (serve/options.py), the same values `raylm k8s`
writes into the RayService.

Entry points: `servable.resolve_checkpoint` (before Ray starts), `build_app` (an `Application`, used by
deployments/openai_app.py for `serve run`/`serve deploy`/KubeRay), `deploy` (start Serve and run
the app; returns the base URL and keys); lifecycle/rollout.py deploys through it and records what
it deployed (`raylm serve`, promote, rollback).
"""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional

from ray import serve
from ray.llm._internal.common.callbacks.base import CallbackBase
from ray.serve.llm import LLMConfig, LLMServer, build_llm_deployment

from raylm import storage
from raylm.chat import DEFAULT_CHAT_TEMPLATE
from raylm.config import RaylmConfig, ServeConfig
from raylm.console import say
from raylm.errors import ServeDeployError
from raylm.serve import autoscale
from raylm.serve.auth import KeySetup, setup_keys
from raylm.serve.edge import (EDGE_DEPLOYMENT, AdapterListing, GateMetrics, RaylmEdge, edge_model_config,
                              gate_settings, json_messages, replica_scope)
from raylm.serve.gate import Gate
from raylm.serve.protocol import APIError
from raylm.serve.options import (CANARY_DEPLOYMENT, ENGINE_ENV, SERVE_MODEL_DEPLOYMENT, backpressure,
                                 bound_serve_config, deployment_info, deployment_options, drain_window,
                                 edge_options, engine_kwargs)
from raylm.servable import adapter_base_mismatch, check_servable

logger = logging.getLogger(__name__)


# ------------------------------------------------------------------ adapters


class AdapterStore(AdapterListing):
    """The adapters under `serve.adapters_path`, served on demand as `<model_id>:<folder>`.

    Loading is Ray Serve's model multiplexing (`serve.multiplexed`: an LRU of
    serve.max_adapters_per_replica per replica, whose ids Serve's router knows) around Ray Serve
    LLM's `engine.resolve_lora`. We do not set Ray Serve LLM's `dynamic_lora_loading_path`: it
    accepts only s3://, gs:// and Azure URIs and downloads with its own client, while raylm's
    storage layer (pyarrow.fs, `storage.cached_copy`) reads local folders and every bucket the
    base checkpoint may come from, with the same credentials."""

    def __init__(self, server: "RaylmServer", s: ServeConfig, served_config: dict):
        super().__init__(s)
        self.server, self.max_lora_rank, self.served_config = server, s.max_lora_rank, served_config
        self.cache_max_bytes = cache_max_bytes(s)
        self._next_id = 1000  # vLLM's LoRA int ids; the static adapters take 1..n

        async def load_adapter(model_id: str) -> Any:  # a plain function: Serve keeps its LRU on it
            return await self._load(model_id)

        self.load_adapter = serve.multiplexed(max_num_models_per_replica=s.max_adapters_per_replica)(load_adapter)

    async def load(self, model: str) -> None:
        await self.load_adapter(model)

    def _fetch(self, model: str, folder: str) -> str:
        """The adapter's checks and its download (blocking storage calls: run in a thread, off the
        event loop of the replica that drives vLLM, whose other requests keep streaming)."""
        if storage.kind(folder) != "dir":  # removed since the edge listed it
            raise APIError(404, f"The model '{model}' does not exist (no adapter folder {folder}).", "model",
                           "model_not_found")
        why = adapter_base_mismatch(folder, self.served_config, self.max_lora_rank)
        if why:
            raise APIError(400, f"adapter {model!r} ({folder}) cannot be served: {why}", "model", "invalid_adapter")
        return storage.cached_copy(folder, max_bytes=self.cache_max_bytes) if storage.is_remote(folder) else folder

    async def _load(self, model: str) -> Any:
        from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig

        folder = storage.join(self.path, model.split(":", 1)[1])
        local = await asyncio.to_thread(self._fetch, model, folder)
        self._next_id += 1
        try:
            await self.server.engine.resolve_lora(DiskMultiplexConfig(
                model_id=model, local_path=local, max_total_tokens=None, lora_assigned_int_id=self._next_id))
        except ValueError as exc:  # vLLM could not load it (shapes of another base, bad weights)
            raise APIError(400, f"adapter {model!r} ({folder}) cannot be served: {exc}", "model",
                           "invalid_adapter") from None
        return model


# ------------------------------------------------------------------ the replica


class LocalCheckpoint(CallbackBase):
    """Ray Serve LLM's start-up hook, set to skip its per-node download task when the engine's
    placement group sits on the replica's own node: `RaylmServer` has already brought the
    checkpoint to that node's disk (`storage.cached_copy`), and the task, a fresh worker process
    that imports torch and transformers only to find the files present, cost 13 s of a 62 s
    replica start on 2 idle cores (31 s under load). Engines spread over other nodes keep it."""

    async def on_before_node_init(self) -> None:
        import ray

        bundles = ray.util.placement_group_table(self.ctx.placement_group).get("bundles_to_node_id", {})
        here = ray.get_runtime_context().get_node_id()
        self.ctx.run_init_node = not bundles or any(node != here for node in bundles.values())


def engine_class() -> type:
    """Ray Serve LLM's vLLM engine, with one process less on a single-device engine.

    Ray Serve LLM runs every CPU engine with vLLM's multiprocess executor: the engine-core
    process spawns one more process for its single worker, and each spawned process imports
    vllm (12 s on one of 2 cores). With one device there is nothing to coordinate, so the
    engine core runs the model itself (vLLM's `uni` executor, as `vllm serve` does for one GPU)."""
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine

    class SingleProcessEngine(VLLMEngine):
        def _prepare_engine_config(self, callback_ctx):  # noqa: ANN001, ANN202 - Ray's signature
            args, frontend, config = super()._prepare_engine_config(callback_ctx)
            if config.parallel_config.world_size == 1 and config.device_config.device_type == "cpu":
                config.parallel_config.distributed_executor_backend = "uni"
                args.distributed_executor_backend = "uni"
            return args, frontend, config

    return SingleProcessEngine


ENGINE_WATCH_INTERVAL_S = 0.5
ITL_PROBE_TOKENS = 16  # tokens of the deploy's probe generation (RaylmServer.probe_itl)


async def exit_when_engine_dies(engine: Any, interval_s: float = ENGINE_WATCH_INTERVAL_S,
                                exit_process: Callable[[int], Any] = os._exit) -> None:
    """End the replica's process as soon as its vLLM engine is dead, as `vllm serve` does.

    A dead engine cannot come back inside the replica, yet Serve only replaces a replica after 3
    failed health checks 10 s apart: ~30 s in which every request routed to it fails. Once the
    process is gone, Serve's controller sees the actor die and starts a replacement at once."""
    client = getattr(engine, "_engine_client", None)  # Ray Serve LLM's VLLMEngine: vLLM's AsyncLLM
    resources = getattr(getattr(client, "engine_core", None), "resources", None)
    if resources is None:
        return
    # vLLM's monitor thread sets engine_dead when an engine-core process exits unexpectedly (not on
    # a deliberate shutdown, as when Serve stops this replica)
    while not resources.engine_dead:
        await asyncio.sleep(interval_s)
    logger.error("raylm: the vLLM engine of this replica died; exiting so that Serve replaces the replica now")
    logging.shutdown()
    exit_process(1)


def cache_max_bytes(s: ServeConfig) -> Optional[int]:
    """serve.remote_cache_max_gib in bytes (None: the node cache is not limited)."""
    return None if s.remote_cache_max_gib is None else int(s.remote_cache_max_gib * 2**30)


def bring_sources_here(llm_config: LLMConfig, max_bytes: Optional[int] = None) -> None:
    """Point the replica's engine at a copy on its own node of a checkpoint (and adapters) in
    object storage, downloaded once per node (`storage.cached_copy`); local paths stay as they are.

    Ray Serve LLM caches the engine config on the LLMConfig when the driver computes the
    deployment's options (`build_llm_deployment`), and ships it to the replica: for an s3:// model
    it names the model id with the bucket as a mirror, which vLLM would look up on the Hugging Face
    Hub. Dropped here, it is derived again from the local copy."""
    loading = llm_config.model_loading_config
    loading.model_source = storage.cached_copy(loading.model_source, max_bytes=max_bytes)
    for lora in llm_config.engine_kwargs.get("lora_modules", []):
        lora.path = storage.cached_copy(lora.path, max_bytes=max_bytes)
    llm_config._engine_config = None  # no public reset in 2.60


class RaylmServer(LLMServer):
    """A Ray Serve LLM server whose HTTP app is vLLM's own OpenAI server behind raylm's gate.

    Serve builds the app after the engine has started (`__serve_build_asgi_app__`), so no route
    answers before the model can generate. Behind the edge, requests arrive by handle instead
    (`serve_http`), already checked."""

    async def __init__(self, llm_config: LLMConfig, *, serve_config: dict, key_hashes: list[str],
                       model_config: dict, model_version: str = ""):
        s = ServeConfig.model_validate(serve_config)
        for name, value in ENGINE_ENV.items():  # the engine process inherits them (a runtime_env would
            os.environ.setdefault(name, value)  # need a fresh worker process for every replica)
        await asyncio.to_thread(bring_sources_here, llm_config, cache_max_bytes(s))  # a download: off the loop
        self.gate_settings = gate_settings(s, key_hashes, model_config, model_version, checks_keys=not s.edge.enabled)
        self.adapters = AdapterStore(self, s, model_config) if s.adapters_path else None
        self.gate_metrics = None if s.edge.enabled else GateMetrics()  # behind the edge, the edge counts
        await super().__init__(llm_config)
        # Behind the edge this deployment is no HTTP ingress (Serve allows one per app): edge calls
        # run through the same app, built here once the engine is up.
        self._edge_app = await self.__serve_build_asgi_app__() if s.edge.enabled else None
        self._engine_watch = asyncio.get_running_loop().create_task(exit_when_engine_dies(self.engine))

    def _get_default_engine_class(self) -> type:
        return engine_class()

    async def __serve_build_asgi_app__(self) -> Any:
        app = await super().__serve_build_asgi_app__()
        app.middleware_stack = None  # vLLM built its stack eagerly; let Starlette rebuild it with the gate
        counters = self.gate_metrics or GateMetrics()
        app.add_middleware(Gate, settings=self.gate_settings, health=self.check_health, on_response=counters.count,
                           adapters=self.adapters, on_key=counters.count_key)
        return app

    async def probe_itl(self, tokens: int = ITL_PROBE_TOKENS) -> float:
        """The engine's inter-token latency in seconds, measured on one generation of `tokens`
        tokens (EOS ignored) from this replica's engine: the decode time after the first token
        over the tokens after it. The deploy sizes the drain window on it (options.drain_window)."""
        import uuid

        from vllm import SamplingParams

        client = self.engine._engine_client  # Ray Serve LLM's VLLMEngine: vLLM's AsyncLLM
        params = SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0.0)
        first, n_first, last, n = None, 0, 0.0, 0
        async for out in client.generate("The", params, f"raylm-itl-probe-{uuid.uuid4().hex[:8]}"):
            n, last = len(out.outputs[0].token_ids), time.monotonic()
            if first is None:
                first, n_first = last, n
        if first is None or n <= n_first:
            raise RuntimeError(f"the probe generated {n} token(s): no inter-token gap to measure")
        return (last - first) / (n - n_first)

    async def edge_health(self) -> None:
        """The engine's health, for the edge's /health (raises when it is dead)."""
        await self.check_health()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom-metrics hook, sampled every look_back_period_s / 5 while autoscaling is
        on: the engine's running and waiting requests and KV-cache use, read in-process from
        vLLM's per-step scheduler stats (`policy: engine` scales on them; serve/autoscale.py)."""
        client = getattr(self.engine, "_engine_client", None)  # Ray Serve LLM's VLLMEngine: vLLM's AsyncLLM
        if client is None:
            return {}
        if not hasattr(self, "_engine_load"):
            self._engine_load = autoscale.attach(client)
        return autoscale.replica_stats(self._engine_load, client.output_processor.get_num_unfinished_requests())

    async def serve_http(self, call: Any) -> AsyncIterator[list[dict]]:
        """Run an edge call (`edge.CompletionCall` / `ChatCall`: checked by the edge) through vLLM's
        OpenAI app in this process and stream back its ASGI messages, in lists. An adapter from
        serve.adapters_path is loaded first: the edge found it in its listing and routed the call
        here by its multiplexed id. That id, not this replica's own listing, decides: the two
        listings refresh at different moments, and a replica that had not yet seen a new adapter
        answered 404 for a model the edge had just listed. When the edge cancels (its client went
        away), the app sees a disconnect and vLLM aborts the sequence."""
        if self.adapters and call.model and call.model == serve.get_multiplexed_model_id():
            try:
                await self.adapters.load(call.model)
            except APIError as exc:
                yield json_messages(exc.status, exc.body())
                return
        queue: asyncio.Queue = asyncio.Queue()
        finished = asyncio.Event()
        body = [{"type": "http.request", "body": call.body, "more_body": False}]

        async def receive() -> dict:
            if body:
                return body.pop()
            await finished.wait()
            return {"type": "http.disconnect"}

        async def run() -> None:
            try:
                await self._edge_app(replica_scope(call), receive, queue.put)
            finally:
                queue.put_nowait(None)

        task = asyncio.create_task(run(), context=_without_multiplexed_id())
        try:
            while True:  # what has piled up goes in one item: fewer hops through Ray's stream under load
                batch = [await queue.get()]
                while not queue.empty() and batch[-1] is not None:
                    batch.append(queue.get_nowait())
                done = batch[-1] is None
                if batch := [m for m in batch if m is not None]:
                    yield batch
                if done:
                    break
            task.result()  # the app's own exception, if it failed before answering
        finally:
            finished.set()
            if not task.done():
                task.cancel()


def _without_multiplexed_id() -> contextvars.Context:
    """A copy of the request's context whose Serve multiplexed model id is cleared, to run an edge
    call's app in: the adapter is already loaded (AdapterStore), and Ray Serve LLM's own LoRA
    middleware would otherwise try to load it again with its own loader, which raylm does not
    configure (dynamic_lora_loading_path). Serve has no public setter for that id."""
    from dataclasses import replace

    from ray.serve.context import _get_serve_request_context, _serve_request_context

    context = contextvars.copy_context()
    context.run(_serve_request_context.set, replace(_get_serve_request_context(), multiplexed_model_id=""))
    return context


# ------------------------------------------------------------------ building and deploying


def llm_config(s: ServeConfig, checkpoint: str, has_chat_template: bool, drain_s: Optional[float] = None) -> LLMConfig:
    """Ray Serve LLM's config for the checkpoint: vLLM engine arguments, CPU or GPU placement and
    the Serve deployment options, all from `serve:`."""
    kwargs = engine_kwargs(s)
    if s.lora_adapters:
        from vllm.entrypoints.openai.models.protocol import LoRAModulePath

        kwargs["lora_modules"] = [LoRAModulePath(name=name, path=path, base_model_name=s.model_id)
                                  for name, path in s.lora_adapters.items()]
    if not has_chat_template:  # a checkpoint exported before raylm attached its default template
        kwargs.setdefault("chat_template", DEFAULT_CHAT_TEMPLATE)
    return LLMConfig(
        model_loading_config={"model_id": s.model_id, "model_source": checkpoint},
        accelerator_config={"kind": "gpu" if s.use_gpu else "cpu"},
        engine_kwargs=kwargs,
        deployment_config=deployment_options(s, drain_s),
        callback_config={"callback_class": LocalCheckpoint},
        log_engine_metrics=True,  # TTFT, time per output token, running/waiting, KV-cache usage -> Ray's metrics
    )


def _has_chat_template(checkpoint: str) -> bool:
    if storage.kind(storage.join(checkpoint, "chat_template.jinja")) == "file":
        return True
    try:
        return bool(storage.read_json(storage.join(checkpoint, "tokenizer_config.json")).get("chat_template"))
    except storage.StorageError:
        return False


@dataclass(frozen=True)
class CanarySpec:
    """A canary's candidate, deployed beside the live model as its own LLM deployment
    (`CANARY_DEPLOYMENT`). `routed`: the edge sends it `percent`% of conversations (False while a
    canary is being finished or aborted: the deployment stays, unchanged, and takes no new
    requests, so nothing is sent to replicas about to stop). `stats_uri`: where the edge
    replicas write what each version answered."""

    checkpoint: str
    version: str
    percent: float
    id: str
    stats_uri: str
    routed: bool = True

    def edge_config(self) -> Optional[dict]:
        return {"id": self.id, "version": self.version, "percent": self.percent,
                "deployment": CANARY_DEPLOYMENT, "stats_uri": self.stats_uri} if self.routed else None


def build_app(cfg: RaylmConfig, checkpoint: str, keys: Optional[KeySetup] = None,
              deployment_name: str = SERVE_MODEL_DEPLOYMENT, model_version: str = "",
              canary: Optional[CanarySpec] = None, drain_s: Optional[float] = None,
              max_surge_percent: Optional[int] = None,
              runtime_envs: Optional[dict[str, dict]] = None) -> serve.Application:
    """The Serve application: `RaylmServer` over the checkpoint with options from `cfg.serve`,
    bound to the API key hashes (never the keys: replicas may sit on other nodes) and the model
    version its responses name; with `canary`, a second LLM deployment over the candidate beside
    it, which the edge sends a share of requests to.

    The deployment's code version is a hash of everything the replicas are built from, so
    deploying the same inputs again leaves running replicas alone (Serve would otherwise give a
    Python-built app a random version and restart them): a rollout that fails can be undone by
    deploying the previous inputs, at no cost to the replicas still serving them. The edge's
    routing (live version, canary) is its `user_config`: changing it reconfigures the edge's
    replicas in place. `drain_s`: the replicas' drain window (serve/options.py `drain_window`);
    `max_surge_percent`: the live deployment's rollout surge instead of serve/options.py's
    (lifecycle/fit.py). Neither is part of that version, so changing one alone updates running
    replicas in place. `runtime_envs`: each deployment's Ray runtime env by deployment name
    (`live_runtime_envs`), instead of the deploying process's (which Serve and Ray Serve LLM give
    a deployment by default): a promote from another shell has another environment, and a runtime
    env that differs restarts the replicas it was meant to leave alone."""
    s = cfg.serve
    if canary is not None and not s.edge.enabled:
        raise ServeDeployError("a canary needs serve.edge.enabled=true: the edge splits the requests between versions")
    keys = keys or setup_keys(s)
    envs = runtime_envs or {}
    app, model_config = _llm_app(cfg, checkpoint, keys, deployment_name, model_version, drain_s, max_surge_percent)
    _pin_runtime_env(app, envs.get(deployment_name))
    if not s.edge.enabled:
        return app
    edge_bind = {"serve_config": bound_serve_config(s), "key_hashes": list(keys.hashes),
                 "model_config": edge_model_config(model_config)}
    routing = {"live_version": model_version, "canary": canary.edge_config() if canary else None}
    edge = serve.deployment(serve.ingress()(RaylmEdge)).options(name=EDGE_DEPLOYMENT, user_config=routing,
                                                                 **edge_options(s, drain_s))
    extra = {}
    if canary:
        extra["canary"] = _llm_app(cfg, canary.checkpoint, keys, CANARY_DEPLOYMENT, canary.version, drain_s)[0]
        # a new canary runs in the model deployment's runtime env
        _pin_runtime_env(extra["canary"], envs.get(CANARY_DEPLOYMENT) or envs.get(SERVE_MODEL_DEPLOYMENT))
    edge_app = edge.bind(app, **edge_bind, **extra)
    _pin_version(edge_app, edge_bind)
    _pin_runtime_env(edge_app, envs.get(EDGE_DEPLOYMENT))
    return edge_app


def _llm_app(cfg: RaylmConfig, checkpoint: str, keys: KeySetup, deployment_name: str, model_version: str,
             drain_s: Optional[float] = None,
             max_surge_percent: Optional[int] = None) -> tuple[serve.Application, dict]:
    """One LLM deployment over `checkpoint` (its version pinned on its inputs), and the
    checkpoint's config.json."""
    s = cfg.serve
    model_config = check_servable(checkpoint, s)
    # Behind the edge the LLM replicas never see a key: rotating keys restarts no engine.
    bind = {"serve_config": bound_serve_config(s), "key_hashes": [] if s.edge.enabled else list(keys.hashes),
            "model_config": model_config, "model_version": model_version}
    app = build_llm_deployment(
        llm_config(s, checkpoint, _has_chat_template(checkpoint), drain_s),
        deployment_cls=RaylmServer if s.edge.enabled else serve.ingress()(RaylmServer),
        bind_kwargs=bind,
        override_serve_options={"name": deployment_name, "backpressure_config": backpressure(s),
                                "max_constructor_retry_count": s.replica_start_attempts,
                                **({} if max_surge_percent is None else {"max_surge_percent": max_surge_percent})},
    )
    _pin_version(app, {"checkpoint": checkpoint, **bind})
    return app, model_config


def _pin_version(app: serve.Application, inputs: dict) -> None:
    """The deployment's code version: a hash of what its replicas are built from."""
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:16]
    app._bound_deployment._version = digest  # no public setter in 2.60


def _pin_runtime_env(app: serve.Application, env: Optional[dict]) -> None:
    """Give the app's deployment the runtime env `env` exactly (None: leave the default, the
    deploying process's). Set on the built deployment: Ray Serve LLM merges the deploying job's
    runtime env under any runtime env it is given, so keys only that job has would still differ."""
    if env is None:
        return
    replica = app._bound_deployment._replica_config  # no public setter in 2.60
    replica.update({**replica.ray_actor_options, "runtime_env": env}, replica.placement_group_bundles,
                   replica.placement_group_strategy, replica.placement_group_bundle_label_selector,
                   replica.placement_group_fallback_strategy, replica.max_replicas_per_node)


def live_runtime_envs(s: ServeConfig) -> dict[str, dict]:
    """The runtime env each deployment of the running app was deployed with, by deployment name
    (empty when the app does not run). A promote, rollback or canary deploys with these, so the
    replicas it leaves alone see the same inputs from any shell."""
    envs: dict[str, dict] = {}
    for name in (SERVE_MODEL_DEPLOYMENT, CANARY_DEPLOYMENT, EDGE_DEPLOYMENT):
        info = deployment_info(s, name)
        env = (info.replica_config.ray_actor_options or {}).get("runtime_env") if info is not None else None
        if env is not None:
            envs[name] = env
    return envs


def _proxy_address(s: ServeConfig) -> tuple[str, int]:
    """Host and port clients reach the proxy at; the running proxy's win over the config (Serve
    fixes them once per cluster)."""
    host, port = s.host, s.port
    try:
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        host, port = http.host, http.port
    except Exception:  # noqa: BLE001 - fall back to the configured address
        pass
    return ("127.0.0.1" if host in ("0.0.0.0", "::", "") else host), port


def _base_url(s: ServeConfig) -> str:
    """The URL clients use (the proxy's)."""
    host, port = _proxy_address(s)
    return f"http://{host}:{port}{s.route_prefix.rstrip('/')}"


def direct_urls(s: ServeConfig) -> list[str]:
    """Base URLs of the app's ingress replicas on their own ports (Serve's direct ingress, which
    HAProxy ingress forwards to); empty when the cluster runs without it, where the proxy is the
    only way in."""
    from ray.serve.context import _get_global_client

    import ray

    host, proxy_port = _proxy_address(s)  # replicas bind where the proxy does
    groups = ray.get(_get_global_client()._controller.get_target_groups.remote(app_name=s.app_name,
                                                                            from_proxy_manager=True))
    return [f"http://{host}:{t.port}{g.route_prefix.rstrip('/')}" for g in groups
            if g.protocol == "HTTP" for t in g.targets
            if t.port != proxy_port and not t.name.startswith("SERVE_PROXY_ACTOR")]


def deploy(cfg: RaylmConfig, checkpoint: str, version: str = "", keys: Optional[KeySetup] = None,
           timeout_s: Optional[float] = None, canary: Optional[CanarySpec] = None,
           drain_s: Optional[float] = None, max_surge_percent: Optional[int] = None,
           fresh_env: bool = False) -> tuple[str, KeySetup]:
    """Serve's one deploy entry point: start Serve (HTTP on serve.host:serve.port) and run the app
    over the checkpoint as model `version`; returns the base URL once the replicas are up (clients
    use `<url>/v1`) and the keys it was bound to (`keys`, else read from the config and this
    process's environment). `timeout_s`: ServeDeployError when the app is not running by then
    (the caller reverts; Serve keeps trying until it deploys something else). `max_surge_percent`:
    the rollout's surge (lifecycle/fit.py; default serve/options.py's). Ray must be
    initialised. `raylm serve`, promote and rollback deploy through lifecycle/rollout.py, which
    records what was deployed and deploys from the record.

    Once the replicas run, the drain window is sized on them (`size_drain`), unless `drain_s` gives it.
    Into a running app, each deployment keeps the runtime env it runs with (`live_runtime_envs`);
    `fresh_env` (`raylm serve`) gives them this process's instead."""
    s = cfg.serve
    keys = keys or setup_keys(s)
    serve.start(http_options=s.http_options())
    options = {"model_version": version, "canary": canary, "max_surge_percent": max_surge_percent,
               "runtime_envs": {} if fresh_env else live_runtime_envs(s)}
    _run(build_app(cfg, checkpoint, keys, drain_s=drain_s, **options), s, checkpoint, timeout_s)
    if drain_s is None:
        drain_s = size_drain(s)
        if drain_s > s.graceful_shutdown_timeout_s:  # the same version with a longer window: updated in place
            _run(build_app(cfg, checkpoint, keys, drain_s=drain_s, **options), s, checkpoint, timeout_s)
    return _base_url(s), keys


def size_drain(s: ServeConfig) -> float:
    """The drain window for the replicas just deployed (serve/options.py `drain_window`), from
    their engine's inter-token latency measured by a probe generation; printed with where it came
    from. A replica drains with the window its version was deployed with, so each deploy sizes
    its own. A probe that fails leaves serve.graceful_shutdown_timeout_s, saying why."""
    itl, why = None, ""
    try:
        llm = serve.get_deployment_handle(SERVE_MODEL_DEPLOYMENT, s.app_name)
        itl = llm.probe_itl.remote().result(timeout_s=ITL_PROBE_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - whatever failed, the configured window stands
        first = str(exc).strip().splitlines()[:1]
        why = f"the probe failed: {type(exc).__name__}: {first[0][:200] if first else ''}"
    window = drain_window(s, itl, why)
    say(window.line(s), event="drain", drain_s=window.seconds, needed_s=window.needed_s, itl_s=itl,
        max_tokens_limit=s.max_tokens_limit)
    return window.seconds


ITL_PROBE_TIMEOUT_S = 60.0


def live_drain_s(s: ServeConfig) -> Optional[float]:
    """The drain window the app's running LLM replicas were deployed with (None: no such app)."""
    info = deployment_info(s)
    return None if info is None else info.deployment_config.graceful_shutdown_timeout_s


def _run(app: serve.Application, s: ServeConfig, checkpoint: str, timeout_s: Optional[float]) -> None:
    """Run the app; with `timeout_s`, ServeDeployError when it is not running by then."""
    from ray.serve.context import _get_global_client

    try:
        if timeout_s is None:
            serve.run(app, name=s.app_name, route_prefix=s.route_prefix)
        else:
            serve._run(app, _blocking=False, name=s.app_name, route_prefix=s.route_prefix)
            _get_global_client()._wait_for_application_running(s.app_name, timeout_s=timeout_s)
    except TimeoutError:
        raise ServeDeployError(f"serve app {s.app_name!r} over {checkpoint} was not running after "
                               f"serve.rollout_timeout_s={timeout_s:g} s (no room on the cluster for the new "
                               "version's replicas beside the old ones?)") from None
    except RuntimeError as exc:
        raise ServeDeployError(f"serve app {s.app_name!r} over {checkpoint} failed to deploy: {exc}") from None


def banner(url: str, keys: KeySetup, cfg: RaylmConfig, direct: tuple[str, ...] = ()) -> str:
    """What `raylm serve` prints: where to send requests and where the key is (never the key).
    `direct` lists the replicas' own URLs when the app runs with direct ingress."""
    s = cfg.serve
    if keys.generated_file:
        key_expr = f"$(cat {keys.generated_file})"
    elif s.require_api_key and keys.hashes and not s.api_key_file:
        key_expr = f"${{{s.api_key_env}%%,*}}"
    else:
        key_expr = "<your key>"
    return "\n".join([
        f"serving {s.model_id} at {url}/v1  (app {s.app_name}, health: {url}/health)",
        *([f"replicas directly (no proxy hop): {', '.join(u + '/v1' for u in direct)}"] if direct else []),
        *([f"serve.ingress=direct: this cluster was not started with RAY_SERVE_ENABLE_DIRECT_INGRESS=1; "
           f"serving through the proxy only"] if s.ingress_mode == "direct" and not direct else []),
        f"API keys: {keys.source}",
        "try:",
        f"  curl {url}/v1/completions -H 'Content-Type: application/json' "
        f"-H \"Authorization: Bearer {key_expr}\" -d '{{\"model\": \"{s.model_id}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'",
        f"  python -c \"import openai; c = openai.OpenAI(base_url='{url}/v1', api_key='<key>'); "
        f"print(c.completions.create(model='{s.model_id}', prompt='Hello', max_tokens=16).choices[0].text)\"",
    ])


def serve_until_interrupted(cfg: RaylmConfig) -> None:
    """Keep the app up until Ctrl-C, then delete it.

    Ray Tune (and Train) install their own SIGINT handlers for a run and leave them installed after
    it: after `raylm pipeline --keep-serving`'s sweep, the first Ctrl-C went to the finished sweep's
    handler and the endpoint kept serving. Python's own handler is put back first."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
    say("Ctrl-C to stop", event="ready")
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print(f"\nstopping {cfg.serve.app_name}", flush=True)
        serve.delete(cfg.serve.app_name)
