"""The OpenAI-compatible Serve application, built from the typed config.

One deployment, `LLMServer`: the FastAPI ingress and the model live in the same replica, so a
request costs no extra actor hop. Concurrent requests meet in `@serve.batch` (sized from
`serve.max_batch_size` / `serve.batch_wait_timeout_s`) and share forward passes (engine.py).
Replica count, concurrency, queue limit and resources all come from `ServeConfig`
(`deployment_options`), and the same options are what `raylm k8s` writes into the RayService.

Entry points: `resolve_checkpoint` (before Ray starts), `build_app` (an `Application`, used by
deployments/openai_app.py for `serve run`/`serve deploy`/KubeRay), `deploy` (start Serve and run
the app; returns the base URL) and `run_serve` (the `raylm serve` verb).
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` type on the
# route methods, which Serve re-wraps outside this module.
import asyncio
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve import metrics
from starlette.exceptions import HTTPException as StarletteHTTPException

from raylm.config import InputError, RaylmConfig, ServeConfig
from raylm.k8s import SERVE_MODEL_DEPLOYMENT, serve_autoscaling
from raylm.serve.auth import KeyChecker, KeySetup, setup_keys
from raylm.serve.engine import GenRequest, load_engine
from raylm.serve.protocol import (
    SSE_DONE,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    api_error_from_validation,
    chat_chunk,
    chat_response,
    check_limits,
    completion_chunk,
    completion_response,
    error_body,
    models_response,
    new_id,
    parse_request,
    render_chat_fallback,
    sse,
    usage_chunk,
)

logger = logging.getLogger(__name__)

HEALTH_PROBE_TIMEOUT_S = 10.0  # a one-token forward pass that takes longer means a stuck device
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class CheckpointError(InputError):
    """A checkpoint (or best.json) that is missing or cannot be served; names the path."""


class ServeDeployError(InputError):
    """The app could not be deployed (bad checkpoint contents, no resources); names the app."""


# ------------------------------------------------------------------ checkpoint


def _checkpoint_from_best_json(path: Path) -> Path:
    try:
        best = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable best.json: {exc}") from None
    target = best.get("checkpoint") if isinstance(best, dict) else None
    if not isinstance(target, str) or not target:
        raise CheckpointError(f"{path}: best.json has no \"checkpoint\" path")
    target_path = Path(target).expanduser()
    return target_path if target_path.is_absolute() else path.parent / target_path


def _check_hf_dir(path: Path, via: str) -> None:
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}{via}")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}{via}: not a Hugging Face checkpoint (config.json: {exc})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(f"{path}{via}: config.json has no model_type")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise CheckpointError(f"{path}{via}: no weights ({', '.join(WEIGHT_FILES)})")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{path}{via}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")


def resolve_checkpoint(path: Optional[str]) -> str:
    """The absolute Hugging Face checkpoint directory to serve, from a directory or a sweep's
    best.json (`{"checkpoint": <dir>}`, relative paths are relative to the file). Raises
    `CheckpointError` naming the path when it is unset, missing or not a servable checkpoint."""
    if not path:
        raise CheckpointError("serve.checkpoint is not set: pass --checkpoint <HF dir or best.json> "
                              "or --set serve.checkpoint=<path>")
    if "://" in path:
        raise CheckpointError(f"checkpoint {path}: remote URIs are not served directly; copy it to "
                              "storage the replicas mount (e.g. the shared volume) and pass that path")
    given = Path(path).expanduser().absolute()
    via = ""
    if given.is_file():
        via = f" (from {given})"
        given = _checkpoint_from_best_json(given)
    elif not given.exists():
        raise CheckpointError(f"checkpoint not found: {given}")
    _check_hf_dir(given, via)
    return str(given.resolve())


# ------------------------------------------------------------------ FastAPI app

api = FastAPI(title="raylm", description="OpenAI-compatible completions over a raylm checkpoint",
              docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    err = api_error_from_validation(list(exc.errors()))
    return JSONResponse(err.body(), status_code=err.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(str(exc.detail), None, None, "invalid_request_error"),
                        status_code=exc.status_code, headers=getattr(exc, "headers", None))


@api.exception_handler(Exception)
async def _server_error(_: Request, exc: Exception) -> JSONResponse:
    """A failed generation is a 500 in OpenAI's format (the client retries those), not a text page."""
    logger.error("request failed: %s: %s", type(exc).__name__, exc)
    return JSONResponse(error_body(f"The server failed to process the request ({type(exc).__name__}).",
                                   None, "internal_error", "server_error"), status_code=500)


def _unauthorized() -> APIError:
    return APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                    None, "invalid_api_key", "invalid_request_error")


def _reject_unsupported(req: Any, defaults: dict[str, tuple]) -> None:
    """Options we do not implement are refused by name rather than silently ignored."""
    extra = req.model_extra or {}
    for name, allowed in defaults.items():
        if name in extra and extra[name] not in allowed:
            raise APIError(400, f"{name}: not supported by this server", name, "unsupported_parameter")


# Serve pickles the ingress class when it is defined: module-level helpers it uses must come first.
@serve.ingress(api)
class LLMServer:
    """Ingress and model in one replica: routes, auth and batched generation."""

    def __init__(self, serve_config: dict, checkpoint: str, key_hashes: list[str]):
        self.cfg = ServeConfig.model_validate(serve_config)
        self.engine = load_engine(checkpoint, self.cfg.num_gpus_per_replica,
                                  math.ceil(self.cfg.num_cpus_per_replica))
        self.keys = KeyChecker(key_hashes, required=self.cfg.require_api_key)
        # Built here (not as a decorator) so the batch size and wait come from the config.
        self._batcher = serve.batch(max_batch_size=self.cfg.max_batch_size,
                                    batch_wait_timeout_s=self.cfg.batch_wait_timeout_s)(self.engine.generate_batch)
        self._in_flight = 0
        self.created = int(time.time())
        self.requests_total = metrics.Counter(
            "raylm_requests", description="Completion requests answered, by endpoint and HTTP status.",
            tag_keys=("endpoint", "status"))
        self.tokens_total = metrics.Counter(
            "raylm_generated_tokens", description="Tokens generated, by endpoint.", tag_keys=("endpoint",))

    # ---- routes

    @api.get("/health")
    async def health(self) -> Response:
        """Liveness for load balancers (no key, so no details): 503 once the model hit a fatal error."""
        if self.engine.fatal_error:
            return JSONResponse(error_body("model unavailable", None, "unhealthy", "server_error"), 503)
        return JSONResponse({"status": "ok"})

    @api.get("/v1/models")
    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse(models_response(self.cfg.model_id, self.created))

    @api.get("/v1/stats")
    async def stats(self, request: Request) -> Response:
        """This replica's counters (forward passes vs requests shows the batching at work)."""
        self._authorize(request)
        replica = serve.get_replica_context().replica_tag
        return JSONResponse({"replica": replica, "max_batch_size": self.cfg.max_batch_size,
                             "fatal_error": self.engine.fatal_error, **self.engine.stats.as_dict()})

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        try:
            return await self._completions(request)
        except APIError as exc:
            self._count("completions", exc.status, 0)
            raise

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        try:
            return await self._chat_completions(request)
        except APIError as exc:
            self._count("chat", exc.status, 0)
            raise

    async def _completions(self, request: Request) -> Response:
        self._authorize(request)
        req = parse_request(CompletionRequest, await request.body())
        _reject_unsupported(req, {"echo": (False, None), "logprobs": (None,), "best_of": (None, 1), "suffix": (None,)})
        prompts = req.prompts()
        if req.stream and len(prompts) > 1:
            raise APIError(400, "prompt: streaming supports a single prompt", "prompt")
        gens = [self._gen_request(req, self._prompt_ids(p), "prompt") for p in prompts]
        rid, created = new_id("cmpl"), int(time.time())
        if req.stream:
            return self._stream(self._completion_events(rid, created, gens[0], req.include_usage()), "completions")
        results = await asyncio.gather(*(self._collect(g) for g in gens))
        completion_tokens = sum(r[2] for r in results)
        self._count("completions", 200, completion_tokens)
        return JSONResponse(completion_response(rid, self.cfg.model_id, [(t, f) for t, f, _ in results],
                                                sum(len(g.prompt_ids) for g in gens), completion_tokens, created))

    async def _chat_completions(self, request: Request) -> Response:
        self._authorize(request)
        req = parse_request(ChatCompletionRequest, await request.body())
        _reject_unsupported(req, {"logprobs": (None, False), "tools": (None, []), "functions": (None, []),
                                  "top_logprobs": (None, 0)})
        messages = req.chat()
        text = self.engine.render_chat(messages)
        gen = self._gen_request(req, self.engine.encode(text if text is not None else render_chat_fallback(messages)),
                                "messages")
        rid, created = new_id("chatcmpl"), int(time.time())
        if req.stream:
            return self._stream(self._chat_events(rid, created, gen, req.include_usage()), "chat")
        out, finish, completion_tokens = await self._collect(gen)
        self._count("chat", 200, completion_tokens)
        return JSONResponse(chat_response(rid, self.cfg.model_id, out, finish, len(gen.prompt_ids),
                                          completion_tokens, created))

    # ---- Serve hooks

    async def check_health(self) -> None:
        """Serve calls this periodically; raising makes Serve replace the replica."""
        await self.engine.check(HEALTH_PROBE_TIMEOUT_S)

    # ---- helpers

    def _authorize(self, request: Request) -> None:
        if not self.keys.allows(request.headers.get("authorization")):
            raise _unauthorized()

    def _count(self, endpoint: str, status: int, tokens: int) -> None:
        self.requests_total.inc(tags={"endpoint": endpoint, "status": str(status)})
        if tokens:
            self.tokens_total.inc(tokens, tags={"endpoint": endpoint})

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, str):
            return self.engine.encode(prompt)
        vocab = len(self.engine.tokenizer)
        if any(not 0 <= t < vocab for t in prompt):
            raise APIError(400, f"prompt: token ids must lie in [0, {vocab})", "prompt", "invalid_value")
        return list(prompt)

    def _gen_request(self, req: Any, prompt_ids: list[int], prompt_param: str) -> GenRequest:
        max_tokens = check_limits(req, len(prompt_ids), model_id=self.cfg.model_id,
                                  context_len=self.engine.context_len, max_tokens_limit=self.cfg.max_tokens_limit,
                                  default_max_tokens=self.cfg.default_max_tokens, prompt_param=prompt_param)
        return GenRequest(tuple(prompt_ids), max_tokens, req.temperature, req.top_p, req.seed, tuple(req.stop_list()))

    async def _generate(self, gen: GenRequest) -> AsyncIterator[Any]:
        """Batched generation. The batch wait only applies while other requests are in flight
        (then it fills the batch); a request that finds the replica idle starts at once, so a
        lone request does not pay `batch_wait_timeout_s` (measured: +10 ms p50 at concurrency 1)."""
        self._batcher.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s if self._in_flight else 0.0)
        self._in_flight += 1
        try:
            async for event in self._batcher(gen):
                yield event
        finally:
            self._in_flight -= 1

    async def _collect(self, gen: GenRequest) -> tuple[str, str, int]:
        """Run one request to the end: (text, finish_reason, completion_tokens)."""
        parts, finish, tokens = [], "length", 0
        async for event in self._generate(gen):
            parts.append(event.text)
            finish, tokens = event.finish_reason or finish, event.completion_tokens
        return "".join(parts), finish, tokens

    def _stream(self, events: AsyncIterator[str], endpoint: str) -> StreamingResponse:
        self._count(endpoint, 200, 0)
        return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)

    async def _completion_events(self, rid: str, created: int, gen: GenRequest, include_usage: bool) -> AsyncIterator[str]:
        model, tokens = self.cfg.model_id, 0
        try:
            async for ev in self._generate(gen):
                tokens = ev.completion_tokens
                if ev.text or ev.finish_reason:
                    yield sse(completion_chunk(rid, model, created, ev.text, ev.finish_reason))
            if include_usage:
                yield sse(usage_chunk(rid, model, created, "text_completion", len(gen.prompt_ids), tokens))
        except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
            yield sse(self._stream_error(exc))
        if tokens:
            self.tokens_total.inc(tokens, tags={"endpoint": "completions"})
        yield SSE_DONE

    async def _chat_events(self, rid: str, created: int, gen: GenRequest, include_usage: bool) -> AsyncIterator[str]:
        model, tokens = self.cfg.model_id, 0
        try:
            yield sse(chat_chunk(rid, model, created, {"role": "assistant", "content": ""}, None))
            async for ev in self._generate(gen):
                tokens = ev.completion_tokens
                if ev.text:
                    yield sse(chat_chunk(rid, model, created, {"content": ev.text}, None))
                if ev.finish_reason:
                    yield sse(chat_chunk(rid, model, created, {}, ev.finish_reason))
            if include_usage:
                yield sse(usage_chunk(rid, model, created, "chat.completion.chunk", len(gen.prompt_ids), tokens))
        except Exception as exc:  # noqa: BLE001
            yield sse(self._stream_error(exc))
        if tokens:
            self.tokens_total.inc(tokens, tags={"endpoint": "chat"})
        yield SSE_DONE

    def _stream_error(self, exc: Exception) -> dict:
        logger.exception("generation failed mid-stream")
        return error_body(f"generation failed: {type(exc).__name__}", None, "generation_failed", "server_error")


# ------------------------------------------------------------------ building and deploying


def deployment_options(s: ServeConfig) -> dict:
    """Serve deployment options from the config (the same values the RayService carries)."""
    return {"autoscaling_config": serve_autoscaling(s), "max_ongoing_requests": s.max_ongoing_requests,
            "max_queued_requests": s.max_queued_requests,
            "backpressure_config": {"status_code": 503, "retry_after_s": s.retry_after_s},
            "ray_actor_options": {"num_cpus": s.num_cpus_per_replica, "num_gpus": s.num_gpus_per_replica}}


def build_app(cfg: RaylmConfig, checkpoint: str, keys: Optional[KeySetup] = None,
              deployment_name: str = SERVE_MODEL_DEPLOYMENT) -> serve.Application:
    """The Serve application: `LLMServer` with options from `cfg.serve`, bound to the checkpoint
    and the API key hashes (never the keys: replicas may sit on other nodes)."""
    keys = keys or setup_keys(cfg.serve)
    deployment = serve.deployment(LLMServer, name=deployment_name, **deployment_options(cfg.serve))
    return deployment.bind(cfg.serve.model_dump(mode="json"), checkpoint, list(keys.hashes))


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
    """Base URLs of the app's replicas under Serve's direct ingress (each replica serves HTTP on its
    own port); empty when the cluster runs without it, where the proxy is the only way in."""
    from ray.serve.context import _get_global_client

    import ray

    host, proxy_port = _proxy_address(s)  # replicas bind where the proxy does
    groups = ray.get(_get_global_client()._controller.get_target_groups.remote(app_name=s.app_name))
    return [f"http://{host}:{t.port}{g.route_prefix.rstrip('/')}" for g in groups
            if g.protocol == "HTTP" for t in g.targets if t.port != proxy_port]


def _deploy(cfg: RaylmConfig, checkpoint: str) -> tuple[str, KeySetup]:
    s = cfg.serve
    keys = setup_keys(s)
    serve.start(http_options={"host": s.host, "port": s.port})
    try:
        serve.run(build_app(cfg, checkpoint, keys), name=s.app_name, route_prefix=s.route_prefix)
    except RuntimeError as exc:
        raise ServeDeployError(f"serve app {s.app_name!r} over {checkpoint} failed to deploy: {exc}") from None
    return _base_url(s), keys


def deploy(cfg: RaylmConfig, checkpoint: str) -> str:
    """Start Serve (HTTP on serve.host:serve.port) and run the app; returns the base URL once
    the replicas are up (clients use `<url>/v1`). Ray must be initialised."""
    return _deploy(cfg, checkpoint)[0]


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
        *([f"serve.direct_ingress: this cluster was not started with RAY_SERVE_ENABLE_DIRECT_INGRESS=1; "
           f"serving through the proxy only"] if s.direct_ingress and not direct else []),
        f"API keys: {keys.source}",
        "try:",
        f"  curl {url}/v1/completions -H 'Content-Type: application/json' "
        f"-H \"Authorization: Bearer {key_expr}\" -d '{{\"model\": \"{s.model_id}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'",
        f"  python -c \"import openai; c = openai.OpenAI(base_url='{url}/v1', api_key='<key>'); "
        f"print(c.completions.create(model='{s.model_id}', prompt='Hello', max_tokens=16).choices[0].text)\"",
    ])


def run_serve(cfg: RaylmConfig, checkpoint: str, blocking: bool) -> int:
    """`raylm serve`: deploy, print the URL/key location/examples; block until Ctrl-C if asked."""
    url, keys = _deploy(cfg, checkpoint)
    direct = tuple(direct_urls(cfg.serve)) if cfg.serve.direct_ingress else ()
    print(banner(url, keys, cfg, direct), flush=True)
    if blocking:
        serve_until_interrupted(cfg)
    return 0


def serve_until_interrupted(cfg: RaylmConfig) -> None:
    """Keep the app up until Ctrl-C, then delete it."""
    print("Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print(f"\nstopping {cfg.serve.app_name}", flush=True)
        serve.delete(cfg.serve.app_name)
