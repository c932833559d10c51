"""The edge: a light ingress deployment that protects the engines.

Without it, every request, with or without a key, with a body of up to 4 MiB, is queued for and
read by the LLM replica, the process that also feeds the engine its tokens: a flood of bad
requests slows every good one, and enough of them fill `max_queued_requests`. The edge is a
second deployment in the same Serve app, in front of the LLM deployment: cheap replicas with no
engine (no CPU reserved, no vLLM import) that run raylm's gate (`gate.Gate`: routes, keys, body
limit, validation, error shape, usage counters) and hand only checked requests to an LLM replica
by deployment handle. That is Ray Serve LLM's own ingress/router pattern, and it lets the LLM
deployment's request router see the prompt (`CompletionCall.prompt`, `ChatCall.messages`), which
prefix-cache-aware routing (`PrefixCacheAffinityRouter`) needs.

A call carries the checked body; the LLM replica runs it through vLLM's own OpenAI app
in-process (`RaylmServer.serve_http`) and streams the ASGI messages back, so responses,
streaming and errors are byte for byte what vLLM's server sends. A client that goes away cancels
the edge's request, Serve cancels the handle call, and the engine aborts the sequence.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ray.serve import metrics

from raylm import storage
from raylm.config import ServeConfig
from raylm.serve.canary import Routes, conversation
from raylm.serve.gate import CHECKED, EDGE_CHECKED, KEY_ID, PIN, Gate, GateSettings, app_path, send_json
from raylm.haproxy_rules import mark_keyed
from raylm.serve.options import EDGE_DEPLOYMENT  # noqa: F401 - the edge's deployment name
from raylm.serve.protocol import error_body
from raylm.serve.refresh import DueRefresh

logger = logging.getLogger(__name__)

HOP_HEADERS = {b"authorization", b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"host",
               b"content-length", b"te", b"trailer", b"proxy-authorization"}


@dataclass
class CompletionCall:
    """A checked /v1/completions request on its way to an LLM replica. `prompt` is what Ray Serve
    LLM's prefix-aware router reads (it looks for a `prompt` or `messages` attribute)."""

    path: str
    body: bytes
    model: str = ""
    headers: list = field(default_factory=list)
    prompt: Any = None


@dataclass
class ChatCall:
    """A checked /v1/chat/completions request; `messages` for the prefix-aware router."""

    path: str
    body: bytes
    model: str = ""
    headers: list = field(default_factory=list)
    messages: Any = None


def edge_call(path: str, body: bytes, headers: list, checked: Any = None) -> Any:
    """The call object for a checked body (valid JSON: the gate parsed it), naming the model asked
    for so the replica need not parse the body again. `checked`: what the gate made of the body
    (`gate.Checked`), so the edge does not parse it a second time; without it the body is read
    here. The key stays at the edge: `authorization` is not passed on."""
    kept = [(k, v) for k, v in headers if k.lower() not in HOP_HEADERS]
    chat = path.endswith("/chat/completions")
    if checked is None:
        parsed = json.loads(body)
        model, text = parsed.get("model", ""), parsed.get("messages" if chat else "prompt")
    else:
        model, text = checked.model, checked.text
    if chat:
        return ChatCall(path, body, model, kept, messages=text)
    return CompletionCall(path, body, model, kept, prompt=text)


def replica_scope(call: Any) -> dict:
    """The ASGI scope an LLM replica runs an edge call under (marked as checked by the edge)."""
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": call.path, "raw_path": call.path.encode(),
            "root_path": "", "query_string": b"", "server": ("edge", 0), "client": ("edge", 0),
            "headers": [*call.headers, (b"content-length", str(len(call.body)).encode())], EDGE_CHECKED: True}


async def _lifespan(receive: Callable, send: Callable) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


class Forward:
    """The edge's inner ASGI app (behind the gate): a checked request goes to an LLM replica by
    handle and its response streams back. Serve's back-pressure on the LLM deployment (its queue
    full) becomes a 503 with Retry-After, as it does without the edge. `routes` picks the LLM
    deployment (the live one, or during a canary the candidate's: serve/canary.py) and counts
    what each version answered."""

    def __init__(self, routes: Routes, dynamic_adapters: Callable[[], Any], retry_after_s: float):
        self.routes, self.dynamic_adapters, self.retry_after_s = routes, dynamic_adapters, retry_after_s

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            return await _lifespan(receive, send)
        from ray.serve.exceptions import BackPressureError, RequestCancelledError

        chunks = []
        while True:  # the gate replays the checked body in one message
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        call = edge_call(app_path(scope), b"".join(chunks), scope.get("headers", []), scope.get(CHECKED))
        text = call.messages if isinstance(call, ChatCall) else call.prompt
        handle, version = self.routes.pick(scope.get(PIN), scope.get(KEY_ID) or "",
                                           lambda: conversation(call.headers, text))
        if call.model in await self.dynamic_adapters():  # Serve routes it to a replica that has the adapter loaded
            handle = handle.options(multiplexed_model_id=call.model)
        started, finished, sse, complete, status, t0 = False, False, False, False, 0, time.monotonic()
        responses = handle.serve_http.remote(call)
        try:
            async for batch in responses:
                for message in batch:
                    if message["type"] == "http.response.start":
                        started, status = True, message["status"]
                        sse = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                  for k, v in message.get("headers", []))
                    elif message["type"] == "http.response.body" and not message.get("more_body", False):
                        complete = True
                    await send(message)
            finished = True
            if started and not complete:  # the replica's call ended cleanly, its response did not
                raise ResponseCut("the LLM replica's call ended before its response did")
        except BackPressureError:
            finished, status = True, 503
            for message in json_messages(503, error_body(
                    "the model's request queue is full; retry after the delay in Retry-After", None, "overloaded",
                    "server_error"), [(b"retry-after", str(max(1, math.ceil(self.retry_after_s))).encode())]):
                await send(message)
        except RequestCancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a replica that died mid-request: the client gets a 503
            finished, status = True, 503 if not started else 500
            logger.warning("LLM replica failed a request: %s: %s", type(exc).__name__, exc)
            if not started:
                await send_json(send, 503, error_body("model unavailable, retry", None, "unavailable", "server_error"))
            elif sse and not complete:  # never a silent cut: the stream ends with an error event the client can act on
                await send({"type": "http.response.body", "body": stream_cut_event(exc), "more_body": False})
        finally:
            if finished:
                self.routes.record(version, status, time.monotonic() - t0)
            else:  # the client went away: cancel the call, and the engine aborts the sequence
                try:
                    responses.cancel()
                except Exception:  # noqa: BLE001 - it failed or finished meanwhile: nothing left to cancel
                    pass


class ResponseCut(Exception):
    """An LLM replica's call that ended (without an error) before the response it relays did."""


def stream_cut_event(exc: BaseException) -> bytes:
    """The SSE event that ends a stream whose LLM replica stopped mid-generation: a replica
    replaced by a rollout (raylm promote / rollback) whose drain window ran out (its
    graceful_shutdown_timeout_s, sized when its version was deployed), scaled down, or dead.
    OpenAI's streaming clients raise on an `error` event, so the client learns the answer is cut
    instead of reading a short one as complete."""
    body = error_body("the model replica serving this stream stopped before it finished: a rollout (raylm "
                      "promote / rollback) or a scale-down replaced it and its drain window ran out, or it failed "
                      f"({type(exc).__name__}); retry the request", None, "stream_interrupted", "server_error")
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def json_messages(status: int, body: dict, headers: tuple = ()) -> list[dict]:
    """The ASGI messages of a JSON response."""
    payload = json.dumps(body).encode()
    return [{"type": "http.response.start", "status": status, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()), *headers]},
            {"type": "http.response.body", "body": payload}]


GATE_MODEL_KEYS = ("vocab_size", "max_position_embeddings")  # what gate_settings reads of config.json


def edge_model_config(model_config: dict) -> dict:
    """The part of the checkpoint's config.json the edge is built from. The edge's version is pinned
    on its inputs, so a promotion that changes anything else (layers, widths) leaves the edge
    replicas running instead of replacing them (each replaced one drains behind HAProxy for its
    window: 30 s by Ray's default, 5 s on a cluster raylm starts)."""
    return {k: model_config[k] for k in GATE_MODEL_KEYS if k in model_config}


def gate_settings(s: ServeConfig, key_hashes: list[str], model_config: dict, model_version: str = "",
                  checks_keys: bool = True) -> GateSettings:
    """What the gate checks against, from `serve:` and the checkpoint's config.json. Only the gate
    that checks keys (the edge's, or each replica's without one) reloads key hashes and counts limits."""
    return GateSettings(model_id=s.model_id, adapters=tuple(s.lora_adapters), key_hashes=tuple(key_hashes),
                        require_api_key=s.require_api_key, max_tokens_limit=s.max_tokens_limit,
                        default_max_tokens=s.default_max_tokens, vocab_size=model_config["vocab_size"],
                        max_logprobs=s.max_logprobs, cors_origins=tuple(s.cors_origins), model_version=model_version,
                        max_model_len=s.max_model_len or model_config.get("max_position_embeddings"),
                        **(GateSettings.key_options(s) if checks_keys else {}))


class GateMetrics:
    """The gate's Prometheus counters (Ray's metrics API: exported as `ray_raylm_*`), kept by
    whichever deployment runs the gate."""

    def __init__(self) -> None:
        self.requests_total = metrics.Counter(
            "raylm_requests", description="Requests answered, by endpoint and HTTP status.",
            tag_keys=("endpoint", "status"))
        self.key_requests = metrics.Counter(
            "raylm_key_requests", description="Authenticated requests per API key (key_id: the first 12 hex digits of "
            "the key's SHA-256, never the key), by endpoint and HTTP status.", tag_keys=("key_id", "endpoint", "status"))
        self.key_tokens = metrics.Counter(
            "raylm_key_tokens", description="Tokens (prompt + completion, from the response's usage) per API key.",
            tag_keys=("key_id", "endpoint"))

    def count(self, endpoint: str, status: int) -> None:
        self.requests_total.inc(tags={"endpoint": endpoint, "status": str(status)})

    def count_key(self, key_id: str, endpoint: str, status: int, tokens: int) -> None:
        self.key_requests.inc(tags={"key_id": key_id, "endpoint": endpoint, "status": str(status)})
        if tokens:
            self.key_tokens.inc(tokens, tags={"key_id": key_id, "endpoint": endpoint})


class AdapterListing:
    """The adapters under `serve.adapters_path` as model ids `<model_id>:<folder>`. The edge uses the
    listing alone: the LLM replica a request is routed to loads the adapter (`AdapterStore`).

    The listing is a blocking storage call, so it runs in a thread, at most every LIST_TTL_S, when a
    request finds it due; the event loop (every other request of the replica, and on an LLM replica
    the engine's streams) never waits on storage. A request waits for a due listing up to
    `max_wait_s` (the first listing up to FIRST_WAIT_S: adapters there at start-up are found), then
    goes on with the last good set. A listing that fails keeps the last good set, as key reloading
    does (`auth.ReloadingKeys`): storage that is briefly unreachable must not turn every adapter
    into a 404. The failure is logged once, and again when the listing works again."""

    LIST_TTL_S = 2.0
    FIRST_WAIT_S = 30.0

    def __init__(self, s: ServeConfig, *, clock: Callable[[], float] = time.monotonic, max_wait_s: float = 1.0):
        self.path, self.model_id = s.adapters_path or "", s.model_id
        self.max_wait_s = max_wait_s
        self.listed: tuple[str, ...] = ()
        self.tried, self.failing = False, False  # tried: one listing has ended (listed or failed)
        self._refresh = DueRefresh(self._list, self.LIST_TTL_S, clock)

    def list_now(self) -> tuple[str, ...]:
        """One listing of the path (blocking: called in a thread). A missing folder has no adapters."""
        folders = storage.list_dir(self.path) if storage.kind(self.path) == "dir" else []
        return tuple(f"{self.model_id}:{f}" for f in sorted(folders) if not f.startswith("."))

    async def names(self) -> tuple[str, ...]:
        await self._refresh.wait(self.max_wait_s if self.tried else self.FIRST_WAIT_S)  # still listing: the last set
        return self.listed

    async def _list(self) -> None:
        try:
            listed = await asyncio.to_thread(self.list_now)
        except Exception as exc:  # noqa: BLE001 - whatever the storage raises, keep serving the last good set
            if not self.failing:
                logger.warning("serve.adapters_path=%s: cannot list it (%s); keeping the last good set of %d "
                               "adapter(s) until it can be listed", self.path, exc, len(self.listed))
            self.failing = True
        else:
            if self.failing:
                logger.warning("serve.adapters_path=%s: listed again (%d adapter(s))", self.path, len(listed))
            self.listed, self.failing = listed, False
        finally:
            self.tried = True

    async def load(self, model: str) -> None:
        """Nothing to do where no engine runs (the edge)."""


class RaylmEdge:
    """The edge deployment (the module docstring says why): raylm's gate in a cheap replica with no engine,
    forwarding checked requests to the LLM deployment by handle."""

    def __init__(self, llm: Any, *, serve_config: dict, key_hashes: list[str], model_config: dict,
                 canary: Any = None):
        """`canary`: the candidate's deployment during a canary, bound only so that Serve deploys it
        (the edge's version is pinned without it: a canary restarts no edge); the edge finds it by
        the name its user_config gives (`reconfigure`)."""
        s = ServeConfig.model_validate(serve_config)
        self.llm, self.retry_after_s = llm, s.retry_after_s
        self.settings = gate_settings(s, key_hashes, model_config)  # the version header comes from the replicas
        mark_keyed(s.require_api_key)  # HAProxy refuses keyless completions from their headers (raylm/haproxy_rules.py)
        self.adapters = AdapterListing(s) if s.adapters_path else None
        self.gate_metrics = GateMetrics()
        self.routes = Routes(llm.options(stream=True), _deployment_handle, _replica_name())
        self._flush: Any = None

    async def reconfigure(self, config: dict) -> None:
        """Serve's in-place update (`user_config`): the live version, and the canary if one runs."""
        self.routes.configure(config)
        if self._flush is None:
            self._flush = asyncio.get_running_loop().create_task(self.routes.flush_forever())

    async def __serve_build_asgi_app__(self) -> Any:
        async def no_adapters() -> tuple[str, ...]:
            return ()

        forward = Forward(self.routes, self.adapters.names if self.adapters else no_adapters, self.retry_after_s)
        return Gate(forward, settings=self.settings, health=self._health, on_response=self.gate_metrics.count,
                    adapters=self.adapters, on_key=self.gate_metrics.count_key, versions=self.routes.served)

    async def _health(self) -> None:
        await asyncio.wait_for(self.llm.edge_health.remote(), EDGE_HEALTH_TIMEOUT_S)


EDGE_HEALTH_TIMEOUT_S = 10.0


def _deployment_handle(name: str) -> Any:
    """A streaming handle to another deployment of this edge's app (the canary's candidate)."""
    from ray import serve

    return serve.get_deployment_handle(name, serve.get_replica_context().app_name).options(stream=True)


def _replica_name() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a replica (tests)
        return "edge"
