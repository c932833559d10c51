"""The gate in front of vLLM's OpenAI server: what raylm adds to every request.

vLLM's own FastAPI app (built by Ray Serve LLM inside each replica) serves the OpenAI routes,
streaming and usage. This ASGI middleware sits in front of it, in the same process, and adds
what an endpoint on the internet needs:

- only the public routes (`/health`, `/v1/models`, `/v1/completions`, `/v1/chat/completions`)
  are reachable; vLLM's admin and internal routes answer 404;
- every route but `/health` needs `Authorization: Bearer <key>`, checked against key hashes (401),
  those of a hashes file re-read while serving included (`auth.ReloadingKeys`);
- a key over its requests or tokens per minute, or its requests at once, gets 429 with Retry-After
  (`limits.KeyLimiter`, per gate instance: `GateSettings.limit_share` splits a limit over the
  replicas); a request reserves the tokens it may use when admitted and settles on its usage;
- a request body is validated before the engine sees it (`protocol.py`): every bad request is a
  400/404 naming the parameter, with this server's limits (`serve.max_tokens_limit`, a default
  max_tokens) applied;
- error bodies vLLM itself produces (a prompt longer than the context, say) are put in OpenAI's
  shape (`type`, `param`, `code`), so clients see one error format;
- every response names the model version that produced it (`x-raylm-model-version`), so a
  client can tell old from new replicas during a rollout;
- the models routes list the base model and its adapters, those on demand under
  `serve.adapters_path` included, and a request for such an adapter loads it first (`Adapters`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Optional, Protocol

from raylm.config.serve import KeyLimitsConfig
from raylm.haproxy_rules import MAX_BODY_BYTES  # the body limit, HAProxy's and the gate's
from raylm.serve.auth import KeyChecker, ReloadingKeys
from raylm.serve.canary import unpin
from raylm.serve.limits import KeyLimiter, Refusal
from raylm.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, check_limits,
                                  error_body, parse_request, prompt_tokens_bound, reject_unsupported)

logger = logging.getLogger(__name__)

ASGIApp = Callable[..., Awaitable[None]]
ROUTES = {("POST", "/v1/completions"): "completions", ("POST", "/v1/chat/completions"): "chat",
          ("GET", "/v1/models"): "models"}
UNSUPPORTED = {
    "completions": {"best_of": (None, 1), "suffix": (None,)},
    "chat": {"tools": (None, []), "functions": (None, [])},
}
CORS_METHODS, CORS_MAX_AGE_S = "GET, POST, OPTIONS", 600
# Response headers a browser's script may read besides the CORS-safelisted ones: when to retry
# (429/503), which model version answered (rollouts), and the request id to quote in a report.
CORS_EXPOSE_HEADERS = b"Retry-After, x-raylm-model-version, x-request-id"
CONTEXT_MARKERS = ("maximum context length", "max_model_len", "context length")
VERSION_HEADER = b"x-raylm-model-version"
EDGE_CHECKED = "raylm.edge"  # a scope key no HTTP request can set: an LLM replica marks edge calls with it
CHECKED = "raylm.checked"  # the scope key under which the gate hands its `Checked` request on (parsed once)
KEY_ID = "raylm.key_id"  # ... the key's id (what a canary's split hashes)
PIN = "raylm.pin"  # ... and the model version the client pinned (`"<model_id>@v3"`), or None


class Adapters(Protocol):
    """The on-demand adapters of a replica (serve.adapters_path): what exists, and loading one."""

    async def names(self) -> tuple[str, ...]:
        """Model ids (`<model_id>:<folder>`) of the adapters under the path, listed recently."""

    async def load(self, model: str) -> None:
        """Make the adapter servable on this replica; raises `APIError` (4xx) naming it when it cannot be."""


@dataclass(frozen=True)
class GateSettings:
    """What the gate checks against; built from `serve:` and the checkpoint in the replica."""

    model_id: str
    adapters: tuple[str, ...]
    key_hashes: tuple[str, ...]
    require_api_key: bool
    max_tokens_limit: int
    default_max_tokens: int
    vocab_size: int
    max_logprobs: int = 5
    cors_origins: tuple[str, ...] = ()
    model_version: str = ""
    max_model_len: Optional[int] = None
    key_hashes_path: Optional[str] = None  # serve.api_key_hashes_path: re-read while serving
    keys_reload_s: float = 10.0
    key_limits: Optional[KeyLimitsConfig] = None  # serve.key_limits; None or all zero: no limits
    limit_share: Optional[float] = None  # this gate's part of each limit; None: 1/key_limits.split_over_replicas

    @classmethod
    def key_options(cls, s: Any) -> dict[str, Any]:
        """The fields a `ServeConfig` sets for keys and limits (rotation, per-key limits), for callers
        building GateSettings: `GateSettings(..., **GateSettings.key_options(serve_config))`."""
        return {"key_hashes_path": s.api_key_hashes_path, "keys_reload_s": s.api_keys_reload_s,
                "key_limits": s.key_limits}

    def allowed_origin(self, origin: Optional[str]) -> Optional[str]:
        """The Access-Control-Allow-Origin value for a browser's Origin, or None (no CORS)."""
        if not origin or not self.cors_origins:
            return None
        if "*" in self.cors_origins:
            return "*"
        return origin if origin in self.cors_origins else None


def route_of(method: str, path: str) -> Optional[str]:
    """The public route a request is for, or None (404/405)."""
    if method == "GET" and path.startswith("/v1/models/"):
        return "models"
    return ROUTES.get((method, path))


def app_path(scope: dict) -> str:
    """The path below the app's route prefix (Serve mounts the app under it)."""
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def model_card(model_id: str, parent: Optional[str], s: GateSettings) -> dict:
    """An OpenAI model object (with vLLM's `parent` for adapters and `max_model_len`)."""
    return {"id": model_id, "object": "model", "created": 0, "owned_by": "raylm", "root": model_id,
            "parent": parent, "max_model_len": s.max_model_len}


@dataclass(frozen=True)
class Checked:
    """A request the gate let through: the body for the engine, the model asked for, and the
    tokens it may use at most (what a per-key token limit reserves), with its prompts' part."""

    body: bytes
    model: str
    max_tokens: int = 0
    prompt_tokens: int = 0
    max_tokens_param: str = "max_tokens"  # the parameter a client lowers to ask for fewer
    per_choice: int = 0  # max_tokens: what a choice that ends for its length has generated
    text: Any = None  # the prompt, or the messages as role/content dicts: what a prefix-aware router reads


def check_body(route: str, raw: bytes, s: GateSettings, dynamic: tuple[str, ...] = ()) -> Checked:
    """Validate a completions/chat body and apply this server's limits; returns the body to hand to
    the engine (with max_tokens filled in when the request left it out: OpenAI's 16 for completions,
    for chat the rest of the context, which vLLM takes as min(max_tokens, context - prompt), capped
    by `serve.max_tokens_limit`), the model asked for and the tokens the request may use at most.
    `dynamic`: the on-demand adapters' model ids. Raises `APIError`."""
    model = CompletionRequest if route == "completions" else ChatCompletionRequest
    req = parse_request(model, raw)
    reject_unsupported(req, UNSUPPORTED[route])
    if route == "completions":
        for prompt in req.prompts():
            if not isinstance(prompt, str) and any(not 0 <= t < s.vocab_size for t in prompt):
                raise APIError(400, f"prompt: token ids must lie in [0, {s.vocab_size})", "prompt", "invalid_value")
    req.stop_list()
    asked = check_limits(req, models=(s.model_id, *s.adapters, *dynamic), max_tokens_limit=s.max_tokens_limit,
                         max_logprobs=s.max_logprobs)
    body = raw
    if asked is None:
        asked = s.default_max_tokens if route == "completions" else s.max_tokens_limit
        fields = json.loads(raw)
        fields["max_tokens"] = asked
        body = json.dumps(fields).encode()
    param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
    text = req.chat() if route == "chat" else req.prompt
    return Checked(body, req.model, *_most_tokens(prompt_tokens_bound(req), asked, req.n, s.max_model_len), param,
                   asked, text)


def _most_tokens(prompts: list[int], max_tokens: int, n: int, context: Optional[int]) -> tuple[int, int]:
    """(prompt + completion tokens, prompt tokens) a request may use at most: each prompt once and
    max_tokens for each of its n choices, neither more than the context holds."""
    cap = context or max(max(prompts), max_tokens)
    prompt = sum(min(p, cap) for p in prompts)
    return prompt + len(prompts) * n * min(max_tokens, cap), prompt


def normalize_error(status: int, raw: bytes, route: Optional[str]) -> bytes:
    """An error body from the engine in OpenAI's shape: `type` is invalid_request_error (4xx) or
    server_error (5xx), `code` a string, and a context-length error names the prompt parameter."""
    try:
        err = json.loads(raw)["error"]
        message = str(err.get("message") or err)
        param, code = err.get("param"), err.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        message, param, code = (raw.decode("utf-8", "replace").strip() or f"HTTP {status}"), None, None
    if status < 500 and any(m in message for m in CONTEXT_MARKERS):  # vLLM's param is its own 'input_tokens'
        param, code = ("messages" if route == "chat" else "prompt"), "context_length_exceeded"
    kind = "invalid_request_error" if status < 500 else "server_error"
    return json.dumps(error_body(message, param, code if isinstance(code, str) else None, kind)).encode()


class RateLimited(APIError):
    """429 for a key over one of its limits, with the seconds to wait in `Retry-After` (none for a
    request that asks for more tokens than the key's whole limit: waiting would not help; its body
    names the parameter to lower)."""

    def __init__(self, refusal: Refusal, max_tokens_param: Optional[str] = None):
        super().__init__(429, refusal.message(), max_tokens_param if refusal.too_large else None,
                         "rate_limit_exceeded", refusal.limit)
        self.headers = () if refusal.too_large else ((b"retry-after", refusal.retry_after_header.encode()),)


async def send_json(send: Callable, status: int, body: dict, headers: tuple = ()) -> None:
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": payload})


async def read_body(receive: Callable) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("client disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes", None, "request_too_large")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)


def replay(body: bytes, receive: Callable) -> Callable:
    """A `receive` that hands the (checked) body over once, then waits on the client as usual."""
    sent = False

    async def _receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return _receive


class Gate:
    """ASGI middleware: routes, auth, validation and error shape in front of vLLM's app."""

    def __init__(self, app: ASGIApp, *, settings: GateSettings, health: Callable[[], Awaitable[None]],
                 on_response: Callable[[str, int], None] = lambda route, status: None,
                 adapters: Optional[Adapters] = None,
                 on_key: Callable[[str, str, int, int], None] = lambda key_id, route, status, tokens: None,
                 keys: Optional[ReloadingKeys] = None, limiter: Optional[KeyLimiter] = None,
                 versions: Optional[Callable[[], list[str]]] = None):
        """`keys` and `limiter` default to what `settings` describes (tests pass their own, with a fake clock).
        `versions`: the model versions a client may pin (the edge's; None: no pins)."""
        self.app, self.settings, self.health, self.on_response = app, settings, health, on_response
        self.adapters, self.on_key, self.versions = adapters, on_key, versions
        self.keys = keys or ReloadingKeys(settings.key_hashes, settings.key_hashes_path, settings.keys_reload_s,
                                          required=settings.require_api_key)
        limits = settings.key_limits
        limited = limits is not None and (limits.requests_per_minute or limits.tokens_per_minute or limits.overrides)
        self.limiter = limiter or (KeyLimiter(limits, share=settings.limit_share) if limited else None)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.settings.model_version:
            send = _with_header(send, VERSION_HEADER, self.settings.model_version)
        if scope.get(EDGE_CHECKED):  # built by this replica for a request the edge already checked
            return await self.app(scope, receive, send)
        method, path = scope["method"], app_path(scope)
        origin = self.settings.allowed_origin(_header(scope, b"origin"))
        if method == "OPTIONS" and _header(scope, b"access-control-request-method"):
            return await self._preflight(scope, send, origin)
        if origin:
            send = _with_cors(send, origin)
        if path == "/health" and method in ("GET", "HEAD"):
            return await self._health(send)
        route = route_of(method, path)
        try:
            if route is None:
                known = path in {p for _, p in ROUTES} or path == "/health"
                raise APIError(405 if known else 404, f"{'Method not allowed' if known else 'Unknown route'}: "
                               f"{method} {path}", None, "method_not_allowed" if known else "not_found")
            checker = await self.keys.current()
            if not checker.allows(_header(scope, b"authorization")):
                raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                               None, "invalid_api_key")
            key_id = KeyChecker.key_id(_header(scope, b"authorization"))
            dynamic = await self.adapters.names() if self.adapters else ()
            if route == "models":
                self._admit(key_id, route, Checked(b"", "")).settle(0)
                self.on_response(route, 200)
                return await send_json(send, 200, self._models(path, dynamic))
            try:
                raw, pin = await read_body(receive), None
                if self.versions is not None:
                    raw, pin = unpin(raw, self.versions())
                checked = check_body(route, raw, self.settings, dynamic)
                if checked.model in dynamic:
                    await self.adapters.load(checked.model)
            except APIError as exc:
                self.on_key(key_id, route, exc.status, 0)
                raise
            admission = self._admit(key_id, route, checked)
            scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k != b"content-length"]
                     + [(b"content-length", str(len(checked.body)).encode())], CHECKED: checked, KEY_ID: key_id,
                     PIN: pin}
            receive = replay(checked.body, receive)
        except APIError as exc:
            self.on_response(route or "other", exc.status)
            return await send_json(send, exc.status, exc.body(), getattr(exc, "headers", ()))
        except ConnectionError:
            return None
        tally = UsageTally()
        try:
            await self.app(scope, receive, self._normalizing(send, route, tally))
        finally:
            tokens = tally.finish(checked.prompt_tokens, checked.per_choice)
            admission.settle(tokens)
            self.on_key(key_id, route, tally.status, tokens)

    def _admit(self, key_id: str, route: str, checked: Checked) -> Any:
        """Count the request against the key's limits (reserving the tokens it may use); a refusal
        is counted and raised as a 429."""
        if self.limiter is None:
            return _NO_LIMITS
        admitted = self.limiter.admit(key_id, checked.max_tokens)
        if isinstance(admitted, Refusal):
            self.on_key(key_id, route, 429, 0)
            raise RateLimited(admitted, checked.max_tokens_param)
        return admitted

    def _models(self, path: str, dynamic: tuple[str, ...]) -> dict:
        """`GET /v1/models` (the base, its adapters and the on-demand ones) or `/v1/models/<id>`."""
        s = self.settings
        cards = {s.model_id: model_card(s.model_id, None, s),
                 **{m: model_card(m, s.model_id, s) for m in (*s.adapters, *dynamic)}}
        if path == "/v1/models":
            return {"object": "list", "data": list(cards.values())}
        wanted = path[len("/v1/models/"):]
        if wanted not in cards:
            raise APIError(404, f"The model '{wanted}' does not exist; this server serves "
                           f"{', '.join(repr(m) for m in cards)}.", "model", "model_not_found")
        return cards[wanted]

    async def _preflight(self, scope: dict, send: Callable, origin: Optional[str]) -> None:
        """A browser's CORS preflight (no key: browsers send none): allowed origins get 204 and what
        they may send; others 403. Without serve.cors_origins there is no CORS at all (403 too)."""
        if origin is None:
            self.on_response("preflight", 403)
            return await send_json(send, 403, error_body("CORS: origin not allowed (serve.cors_origins)", None,
                                                         "cors_origin_not_allowed"))
        asked = _header(scope, b"access-control-request-headers") or "authorization, content-type"
        self.on_response("preflight", 204)
        await send({"type": "http.response.start", "status": 204, "headers": [
            (b"access-control-allow-origin", origin.encode()), (b"vary", b"Origin"),
            (b"access-control-allow-methods", CORS_METHODS.encode()),
            (b"access-control-allow-headers", asked.encode("latin-1")),
            (b"access-control-max-age", str(CORS_MAX_AGE_S).encode())]})
        await send({"type": "http.response.body", "body": b""})

    async def _health(self, send: Callable) -> None:
        """Liveness for load balancers (no key, so no details): 503 when the engine is dead."""
        try:
            await self.health()
        except Exception as exc:  # noqa: BLE001 - any failure means: do not send traffic here
            logger.error("health check failed: %s: %s", type(exc).__name__, exc)
            return await send_json(send, 503, error_body("model unavailable", None, "unhealthy", "server_error"))
        await send_json(send, 200, {"status": "ok"})

    def _normalizing(self, send: Callable, route: str, tally: "UsageTally") -> Callable:
        """A `send` that counts responses (and the tokens they report using), and rewrites error
        bodies into OpenAI's shape."""
        state: dict[str, Any] = {}

        async def _send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.on_response(route, message["status"])
                tally.status = message["status"]
                if message["status"] < 400:
                    return await send(message)
                state["start"], state["body"] = message, []
                return None
            if "start" not in state or message["type"] != "http.response.body":
                if message["type"] == "http.response.body" and route != "models":
                    tally.feed(message.get("body", b""))
                return await send(message)
            state["body"].append(message.get("body", b""))
            if message.get("more_body"):
                return None
            start = state.pop("start")
            payload = normalize_error(start["status"], b"".join(state.pop("body")), route)
            headers = [(k, v) for k, v in start.get("headers", []) if k not in (b"content-length", b"content-type")]
            await send({**start, "headers": headers + [(b"content-type", b"application/json"),
                                                       (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})

        return _send


class _Unlimited:
    """The admission of a gate without limits: nothing to settle."""

    def settle(self, used_tokens: int) -> None:
        pass


_NO_LIMITS = _Unlimited()


class UsageTally:
    """Tokens a response used, read from the body as it passes: the usage a JSON response reports
    (`usage.total_tokens`), or the SSE chunk carrying usage when a streaming client asked for it
    (`stream_options.include_usage`). A stream without it is counted from its chunks: vLLM sends a
    chunk per generated token of a choice (its stream_interval of 1, though the detokenizer may
    merge two), and a choice that ends for its length has generated max_tokens; a chat's first,
    role-only chunk is not counted. Only complete lines are looked at, with a few substring
    searches, and only the line holding the usage is parsed."""

    MARK, MAX_LINE_BYTES = b'"total_tokens"', 4 * 2**20
    DATA, NO_CHOICES, ROLE_ONLY = b"data: {", b'"choices":[]', b'"role":"assistant","content":""'
    AT_LENGTH = b'"finish_reason":"length"'

    def __init__(self) -> None:
        self.status, self.tokens, self.chunks, self.at_length, self._rest = 0, 0, 0, 0, b""

    def feed(self, chunk: bytes) -> None:
        *lines, rest = (self._rest + chunk).split(b"\n")
        self._rest = rest if len(rest) <= self.MAX_LINE_BYTES else b""
        for line in lines:
            self._read(line)

    def finish(self, prompt_tokens: int = 0, per_choice: int = 0) -> int:
        """The tokens used: the reported usage, else the prompt's (as estimated) and one per chunk
        streamed, or `per_choice` for each choice that ended for its length when that is more;
        0 for a response that streamed nothing (an error)."""
        self._read(self._rest)
        self._rest = b""
        if self.tokens or not self.chunks:
            return self.tokens
        return prompt_tokens + max(self.chunks, self.at_length * per_choice)

    def _read(self, line: bytes) -> None:
        if self.MARK not in line:
            if line.startswith(self.DATA) and self.NO_CHOICES not in line and self.ROLE_ONLY not in line:
                self.chunks += 1
                self.at_length += self.AT_LENGTH in line
            return
        try:
            usage = json.loads(line.removeprefix(b"data: ")).get("usage") or {}
            self.tokens = max(self.tokens, int(usage.get("total_tokens") or 0))
        except (ValueError, AttributeError, TypeError):
            pass


def _with_cors(send: Callable, origin: str) -> Callable:
    """A `send` that lets the browser read the response (errors too) from an allowed origin."""

    async def _send(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (b"access-control-allow-origin",
                                                                            origin.encode()), (b"vary", b"Origin"),
                                              (b"access-control-expose-headers", CORS_EXPOSE_HEADERS)]}
        await send(message)

    return _send


def _with_header(send: Callable, name: bytes, value: str) -> Callable:
    """A `send` that adds one header to the response."""

    async def _send(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (name, value.encode())]}
        await send(message)

    return _send


def _header(scope: dict, name: bytes) -> Optional[str]:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None
