"""Serve pieces that need no Ray: request validation, the gate in front of vLLM (routes, keys,
limits, error shapes, as a real ASGI app), API keys, checkpoint resolution, the engine arguments
and deployment options derived from the config, the app builder and the Serve config file."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from raylm.config import InputError, ServeConfig, load_config
from raylm.serve import protocol as p
from raylm.serve.auth import ApiKeyError, KeyChecker, hash_key, load_api_keys, setup_keys

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    from raylm.serve.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny"))


# ------------------------------------------------------------------ request validation


def parse_error(model, body) -> p.APIError:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with pytest.raises(p.APIError) as err:
        p.parse_request(model, raw)
    return err.value


@pytest.mark.parametrize("body,param", [
    ({"model": "m"}, "prompt"),
    ({"prompt": "x"}, "model"),
    ({"model": "m", "prompt": 3}, "prompt"),
    ({"model": "m", "prompt": ["a", 2]}, "prompt"),
    ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"model": "m", "prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"model": "m", "prompt": "x", "temperature": 2.01}, "temperature"),
    ({"model": "m", "prompt": "x", "temperature": "1"}, "temperature"),
    ({"model": "m", "prompt": "x", "top_p": 0.0}, "top_p"),
    ({"model": "m", "prompt": "x", "top_p": -1}, "top_p"),
    ({"model": "m", "prompt": "x", "seed": -1}, "seed"),
    ({"model": "m", "prompt": "x", "seed": "7"}, "seed"),
    ({"model": "m", "prompt": "x", "stop": [1]}, "stop"),
    ({"model": "m", "prompt": "x", "stream": "true"}, "stream"),
    ({"model": "m", "prompt": "x", "n": 9}, "n"),
    ({"model": "m", "prompt": "x", "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
])
def test_completion_field_errors_name_the_parameter(body, param):
    err = parse_error(p.CompletionRequest, body)
    assert (err.status, err.param) == (400, param)
    assert err.body()["error"]["type"] == "invalid_request_error" and param in err.message


@pytest.mark.parametrize("raw", [b'{"model": "m", "prompt": "x", "temperature": NaN}',
                                 b'{"model": "m", "prompt": "x", "top_p": Infinity}'])
def test_nan_and_infinity_are_refused(raw):
    assert parse_error(p.CompletionRequest, raw).param in ("temperature", "top_p")


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b'"text"', b"\xff\xfe"])
def test_malformed_json_is_a_400_without_param(raw):
    err = parse_error(p.CompletionRequest, raw)
    assert (err.status, err.param, err.code) == (400, None, "invalid_json")


@pytest.mark.parametrize("body,param", [
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": "hi"}, "messages"),
    ({"model": "m", "messages": [{"role": "king", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": 3}]},
     "messages[1].content"),
    ({"model": "m", "messages": [{"role": "user", "content": "a"}], "max_completion_tokens": -2},
     "max_completion_tokens"),
])
def test_chat_field_errors_name_the_parameter(body, param):
    assert parse_error(p.ChatCompletionRequest, body).param == param


def test_valid_requests_parse_with_openai_defaults():
    req = p.parse_request(p.CompletionRequest, b'{"model": "m", "prompt": ["a", "b"], "stop": "x", "user": "u"}')
    assert (req.temperature, req.top_p, req.max_tokens, req.prompts(), req.stop_list()) == (1.0, 1.0, None, ["a", "b"], ["x"])
    assert p.parse_request(p.CompletionRequest, b'{"model": "m", "prompt": [5, 6]}').prompts() == [[5, 6]]
    chat = p.parse_request(p.ChatCompletionRequest, json.dumps({
        "model": "m", "max_completion_tokens": 7,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
    }).encode())
    assert chat.chat() == [{"role": "user", "content": "ab"}] and chat.requested_max_tokens() == 7
    both = p.parse_request(p.ChatCompletionRequest, b'{"model": "m", "messages": [{"role": "user", "content": "a"}], '
                           b'"max_tokens": 1, "max_completion_tokens": 9}')
    assert both.requested_max_tokens() == 9  # what vLLM generates


def test_check_body_says_the_most_tokens_a_request_may_use():
    from raylm.serve.gate import check_body

    s = gate_settings()
    chat = check_body("chat", json.dumps({"model": "m", "messages": [{"role": "user", "content": "héllo"}],
                                          "max_tokens": 2, "max_completion_tokens": 5, "n": 2}).encode(), s)
    prompt = len("héllo".encode()) + 2 * p.CHAT_TOKENS_PER_MESSAGE
    assert (chat.prompt_tokens, chat.max_tokens, chat.max_tokens_param) == (prompt, prompt + 2 * 5,
                                                                            "max_completion_tokens")
    many = check_body("completions", b'{"model": "m", "prompt": ["ab", "c"]}', s)  # the default max_tokens, per prompt
    assert (many.prompt_tokens, many.max_tokens) == (4 + 3, 4 + 3 + 2 * s.default_max_tokens)
    ids = check_body("completions", b'{"model": "m", "prompt": [1, 2, 3], "max_tokens": 4}', s)
    assert (ids.prompt_tokens, ids.max_tokens, ids.body) == (3, 7, b'{"model": "m", "prompt": [1, 2, 3], "max_tokens": 4}')


def test_stop_lists_are_bounded_and_non_empty():
    with pytest.raises(p.APIError, match="at most"):
        p.parse_request(p.CompletionRequest, b'{"model": "m", "prompt": "x", "stop": ["a","b","c","d","e"]}').stop_list()
    with pytest.raises(p.APIError) as err:
        p.parse_request(p.CompletionRequest, b'{"model": "m", "prompt": "x", "stop": ""}').stop_list()
    assert err.value.param == "stop"


def test_limits_need_the_served_model():
    def req(**kw):
        return p.CompletionRequest(model="m", prompt="x", **kw)

    assert p.check_limits(req(), models=("m",), max_tokens_limit=50) is None  # the server's default applies
    assert p.check_limits(req(max_tokens=50), models=("m",), max_tokens_limit=50) == 50
    assert p.check_limits(p.CompletionRequest(model="lora-a", prompt="x"), models=("m", "lora-a"),
                          max_tokens_limit=50) is None
    for kwargs, model_id, param, status in [({"max_tokens": 51}, "m", "max_tokens", 400),
                                            ({}, "served", "model", 404)]:
        with pytest.raises(p.APIError) as err:
            p.check_limits(req(**kwargs), models=(model_id,), max_tokens_limit=50)
        assert (err.value.param, err.value.status) == (param, status)


# ------------------------------------------------------------------ API keys


def keyed(tmp_path, **kw) -> ServeConfig:
    return ServeConfig(api_key_env="TEST_KEYS", **kw)


def test_keys_come_from_env_and_file(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# comment\nk-file-1\n\n  k-file-2  \nk-env-1\n")
    cfg = keyed(tmp_path, api_key_file=str(f))
    assert load_api_keys(cfg, {"TEST_KEYS": " k-env-1, ,k-env-2"}) == ["k-env-1", "k-env-2", "k-file-1", "k-file-2"]
    setup = setup_keys(cfg, {"TEST_KEYS": "k-env-1"}, generated_path=str(tmp_path / "gen"))
    assert set(setup.hashes) == {hash_key(k) for k in ("k-env-1", "k-file-1", "k-file-2")}
    assert "TEST_KEYS" in setup.source and str(f) in setup.source and setup.generated_file is None
    assert not (tmp_path / "gen").exists()


def test_a_missing_key_file_is_an_input_error_naming_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ApiKeyError, match="nope") as err:
        load_api_keys(keyed(tmp_path, api_key_file=str(missing)), {})
    assert isinstance(err.value, InputError)


def test_no_keys_generates_one_private_file_and_reuses_it(tmp_path, capsys):
    path = tmp_path / "home" / ".raylm" / "api_key"
    first = setup_keys(keyed(tmp_path), {}, generated_path=str(path))
    key = path.read_text().strip()
    assert key.startswith("sk-raylm-") and len(key) > 30
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert first.hashes == (hash_key(key),) and first.generated_file == str(path)
    assert key not in first.source and key not in capsys.readouterr().out
    assert setup_keys(keyed(tmp_path), {}, generated_path=str(path)).hashes == first.hashes  # kept across restarts


def test_open_api_when_keys_are_not_required(tmp_path):
    setup = setup_keys(keyed(tmp_path, require_api_key=False), {}, generated_path=str(tmp_path / "g"))
    assert setup.hashes == () and not (tmp_path / "g").exists()
    assert KeyChecker(setup.hashes, required=False).allows(None)


@pytest.mark.parametrize("header,ok", [("Bearer k1", True), ("bearer k2", True), ("Bearer  k1 ", True),
                                       ("Bearer k3", False), ("k1", False), ("Basic k1", False), ("Bearer ", False),
                                       (None, False), ("", False)])
def test_key_checker_parses_bearer_and_compares_hashes(header, ok):
    checker = KeyChecker([hash_key("k1"), hash_key("k2")])
    assert checker.allows(header) is ok


# ------------------------------------------------------------------ checkpoints


def test_resolve_checkpoint_accepts_a_dir_and_a_best_json(tmp_path, checkpoint):
    from raylm.servable import resolve_checkpoint

    assert resolve_checkpoint(checkpoint) == str(Path(checkpoint).resolve())
    best = Path(checkpoint).parent / "best.json"
    best.write_text(json.dumps({"checkpoint": Path(checkpoint).name, "val_loss": 1.0}))  # relative to the file
    assert resolve_checkpoint(str(best)) == str(Path(checkpoint).resolve())


def test_resolve_checkpoint_errors_name_the_path(tmp_path, checkpoint):
    from raylm.servable import CheckpointError, resolve_checkpoint

    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "nokey.json").write_text('{"best": 1}')
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "gone.json").write_text(json.dumps({"checkpoint": str(tmp_path / "gone")}))
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text(Path(checkpoint, "config.json").read_text())
    cases = {None: "serve.checkpoint", str(tmp_path / "missing"): "missing", str(empty): "empty",
             str(tmp_path / "nokey.json"): "nokey.json", str(tmp_path / "broken.json"): "broken.json",
             str(tmp_path / "gone.json"): "gone", str(noweights): "noweights",
             "unknownfs://bucket/ckpt": "unknownfs://bucket"}  # object storage: tests/integration/test_storage.py
    for path, named in cases.items():
        with pytest.raises(CheckpointError, match=named.replace(".", r"\.")) as err:
            resolve_checkpoint(path)
        assert isinstance(err.value, InputError)


# ------------------------------------------------------------------ the gate (ASGI, in front of vLLM's app)



def gate_settings(**kw):
    from raylm.serve.gate import GateSettings

    base = dict(model_id="m", adapters=("m-lora",), key_hashes=(hash_key("k1"),), require_api_key=True, max_tokens_limit=32,
                default_max_tokens=7, vocab_size=100)
    return GateSettings(**{**base, **kw})


class FakeEngineApp:
    """Stands in for vLLM's app (an ASGI callable): records what reached it and answers as told."""

    def __init__(self, status: int = 200, body: bytes = b'{"ok": true}'):
        self.status, self.body, self.seen = status, body, []

    async def __call__(self, scope, receive, send):
        message = await receive()
        self.seen.append((scope["path"], message.get("body", b"")))
        await send({"type": "http.response.start", "status": self.status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": self.body})


def call_gate(gate, method: str, path: str, body: bytes = b"", key: str | None = "k1", root: str = ""):
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    scope = {"type": "http", "method": method, "path": root + path, "root_path": root, "headers": headers}
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(gate(scope, receive, send))
    status = sent[0]["status"]
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    return status, json.loads(payload) if payload else None


def make_gate(app=None, healthy=True, **kw):
    from raylm.serve.gate import Gate

    async def health():
        if not healthy:
            raise RuntimeError("engine dead")

    counted = []
    gate = Gate(app or FakeEngineApp(), settings=gate_settings(**kw), health=health,
                on_response=lambda route, status: counted.append((route, status)))
    gate.counted = counted
    return gate


def test_gate_lets_a_valid_request_through_and_fills_in_max_tokens():
    app = FakeEngineApp()
    gate = make_gate(app)
    status, body = call_gate(gate, "POST", "/v1/completions", json.dumps({"model": "m", "prompt": "hi"}).encode())
    assert status == 200 and body == {"ok": True}
    (path, forwarded), = app.seen
    assert path == "/v1/completions" and json.loads(forwarded) == {"model": "m", "prompt": "hi", "max_tokens": 7}
    raw = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}).encode()
    assert call_gate(gate, "POST", "/v1/chat/completions", raw)[0] == 200 and app.seen[-1][1] == raw
    # chat without max_tokens: OpenAI's default is the rest of the context; vLLM takes
    # min(max_tokens, context - prompt), so the server's limit is what is filled in
    unset = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert call_gate(gate, "POST", "/v1/chat/completions", json.dumps(unset).encode())[0] == 200
    assert json.loads(app.seen[-1][1]) == {**unset, "max_tokens": 32}
    lora = json.dumps({"model": "m-lora", "prompt": "x", "max_tokens": 2}).encode()
    assert call_gate(gate, "POST", "/v1/completions", lora)[0] == 200 and app.seen[-1][1] == lora
    assert gate.counted == [("completions", 200), ("chat", 200), ("chat", 200), ("completions", 200)]


def test_logprobs_and_echo_reach_the_engine_within_the_limit():
    """What lm-evaluation-harness's local-completions sends to score a continuation."""
    app = FakeEngineApp()
    gate = make_gate(app)
    scoring = json.dumps({"model": "m", "prompt": "2+2=4", "max_tokens": 1, "logprobs": 5, "echo": True,
                          "temperature": 0}).encode()
    assert call_gate(gate, "POST", "/v1/completions", scoring)[0] == 200 and app.seen[-1][1] == scoring
    chat = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                       "logprobs": True, "top_logprobs": 5}).encode()
    assert call_gate(gate, "POST", "/v1/chat/completions", chat)[0] == 200 and app.seen[-1][1] == chat
    assert call_gate(make_gate(app, max_logprobs=0), "POST", "/v1/completions", scoring)[0] == 400


def _preflight(gate, origin: str, path: str = "/v1/chat/completions"):
    sent = []
    scope = {"type": "http", "method": "OPTIONS", "path": path, "root_path": "", "headers": [
        (b"origin", origin.encode()), (b"access-control-request-method", b"POST"),
        (b"access-control-request-headers", b"authorization, content-type")]}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(gate(scope, receive, send))
    return sent[0]["status"], dict(sent[0]["headers"])


def test_cors_preflight_is_answered_for_allowed_origins_only():
    gate = make_gate(cors_origins=("https://app.example",))
    status, headers = _preflight(gate, "https://app.example")
    assert status == 204 and headers[b"access-control-allow-origin"] == b"https://app.example"
    assert b"POST" in headers[b"access-control-allow-methods"] and b"authorization" in headers[b"access-control-allow-headers"]
    assert _preflight(gate, "https://evil.example")[0] == 403
    assert _preflight(make_gate(), "https://app.example")[0] == 403  # no serve.cors_origins: no CORS
    assert _preflight(make_gate(cors_origins=("*",)), "https://any.example")[1][b"access-control-allow-origin"] == b"*"


def test_cors_responses_from_an_allowed_origin_carry_the_header_errors_too():
    from raylm.serve.gate import Gate

    sent = []
    gate = make_gate(cors_origins=("https://app.example",))
    assert isinstance(gate, Gate)
    for key in ("k1", None):  # a 200 and a 401: the browser may read both
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "root_path": "",
                 "headers": [(b"origin", b"https://app.example"),
                             *([(b"authorization", f"Bearer {key}".encode())] if key else [])]}

        async def receive():
            return {"type": "http.request", "body": json.dumps({"model": "m", "prompt": "x"}).encode(),
                    "more_body": False}

        async def send(message):
            sent.append(message)

        asyncio.run(gate(scope, receive, send))
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert [m["status"] for m in starts] == [200, 401]
    assert all(dict(m["headers"])[b"access-control-allow-origin"] == b"https://app.example" for m in starts)
    exposed = {h.strip().lower() for h in dict(starts[0]["headers"])[b"access-control-expose-headers"].split(b",")}
    assert exposed == {b"retry-after", b"x-raylm-model-version", b"x-request-id"}  # what a browser's script may read


@pytest.mark.parametrize("method,path,body,key,status,param,code", [
    ("POST", "/v1/completions", {"model": "m", "prompt": "hi"}, None, 401, None, "invalid_api_key"),
    ("POST", "/v1/completions", {"model": "m", "prompt": "hi"}, "wrong", 401, None, "invalid_api_key"),
    ("GET", "/v1/models", None, None, 401, None, "invalid_api_key"),
    ("POST", "/v1/completions", {"model": "other", "prompt": "hi"}, "k1", 404, "model", "model_not_found"),
    ("POST", "/v1/completions", {"model": "m-lora2", "prompt": "hi"}, "k1", 404, "model", "model_not_found"),
    ("POST", "/v1/completions", {"model": "m", "prompt": "hi", "max_tokens": 33}, "k1", 400, "max_tokens", "invalid_value"),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                      "max_completion_tokens": 99}, "k1", 400, "max_completion_tokens", "invalid_value"),
    # vLLM generates max_completion_tokens when both are set: a small max_tokens must not hide it
    ("POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1,
                                      "max_completion_tokens": 300, "ignore_eos": True}, "k1", 400,
     "max_completion_tokens", "invalid_value"),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 300,
                                      "max_completion_tokens": 1}, "k1", 400, "max_tokens", "invalid_value"),
    ("POST", "/v1/completions", {"model": "m", "prompt": [5, 100]}, "k1", 400, "prompt", "invalid_value"),
    ("POST", "/v1/completions", {"model": "m", "prompt": "hi", "suffix": "x"}, "k1", 400, "suffix", "unsupported_parameter"),
    ("POST", "/v1/completions", {"model": "m", "prompt": "hi", "logprobs": 6}, "k1", 400, "logprobs", "invalid_value"),
    ("POST", "/v1/completions", {"model": "m", "prompt": "hi", "echo": "yes"}, "k1", 400, "echo", "invalid_value"),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True,
                                      "top_logprobs": 6}, "k1", 400, "top_logprobs", "invalid_value"),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                      "top_logprobs": 2}, "k1", 400, "top_logprobs", "invalid_value"),
    ("POST", "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}],
                                      "tools": [{"type": "function"}]}, "k1", 400, "tools", "unsupported_parameter"),
    ("POST", "/v1/completions", {"model": "m", "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "k1", 400, "stop", None),
    ("POST", "/tokenize", {"prompt": "x"}, "k1", 404, None, "not_found"),
    ("GET", "/metrics", None, "k1", 404, None, "not_found"),
    ("GET", "/v1/completions", None, "k1", 405, None, "method_not_allowed"),
])
def test_gate_refuses_by_name_and_nothing_reaches_the_engine(method, path, body, key, status, param, code):
    app = FakeEngineApp()
    got, err = call_gate(make_gate(app), method, path, json.dumps(body).encode() if body else b"", key)
    assert got == status and err["error"]["param"] == param and err["error"]["code"] == code
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["message"]
    assert app.seen == []


def test_gate_health_needs_no_key_and_reports_a_dead_engine():
    assert call_gate(make_gate(), "GET", "/health", key=None) == (200, {"status": "ok"})
    status, body = call_gate(make_gate(healthy=False), "GET", "/health", key=None)
    assert status == 503 and body["error"]["type"] == "server_error" and "dead" not in json.dumps(body)


def test_gate_works_under_a_route_prefix_and_without_keys_when_not_required():
    app = FakeEngineApp()
    gate = make_gate(app, require_api_key=False)
    assert call_gate(gate, "GET", "/v1/models", key=None, root="/myapp")[0] == 200
    assert call_gate(gate, "GET", "/v1/models/m", key=None, root="/myapp")[0] == 200


def test_engine_errors_are_put_in_openai_shape():
    vllm_context = json.dumps({"error": {"message": "This model's maximum context length is 512 tokens. However, "
                                         "your prompt contains at least 513 input tokens (parameter=input_tokens)",
                                         "type": "BadRequestError", "param": "input_tokens", "code": 400}}).encode()
    for path, param in (("/v1/completions", "prompt"), ("/v1/chat/completions", "messages")):
        body = {"model": "m", "prompt": "x"} if "chat" not in path else {"model": "m", "messages": [
            {"role": "user", "content": "x"}]}
        status, err = call_gate(make_gate(FakeEngineApp(400, vllm_context)), "POST", path, json.dumps(body).encode())
        assert status == 400 and err["error"] == {"message": json.loads(vllm_context)["error"]["message"],
                                                  "type": "invalid_request_error", "param": param,
                                                  "code": "context_length_exceeded"}
    status, err = call_gate(make_gate(FakeEngineApp(500, b"Internal Server Error")), "POST", "/v1/completions",
                            json.dumps({"model": "m", "prompt": "x"}).encode())
    assert status == 500 and err["error"]["type"] == "server_error" and err["error"]["message"]


def test_a_huge_body_is_refused_before_it_is_parsed():
    from raylm.serve.gate import MAX_BODY_BYTES

    status, err = call_gate(make_gate(), "POST", "/v1/completions", b"x" * (MAX_BODY_BYTES + 1))
    assert status == 413 and err["error"]["code"] == "request_too_large"


# ------------------------------------------------------------------ engine arguments and deployment options


def test_engine_kwargs_follow_the_config():
    from raylm.serve.options import engine_kwargs

    cpu = engine_kwargs(ServeConfig(max_model_len=256, max_num_seqs=8, seed=3))
    assert cpu == {"dtype": "bfloat16", "max_num_seqs": 8, "enable_prefix_caching": True, "seed": 3,
                   "tensor_parallel_size": 1, "max_model_len": 256, "kv_cache_memory_bytes": 2**30,
                   "max_logprobs": 5}
    gpu = engine_kwargs(ServeConfig(use_gpu=True, tensor_parallel_size=2, gpu_memory_utilization=0.8,
                                    enable_prefix_caching=False, engine_kwargs={"enforce_eager": True}))
    assert gpu["gpu_memory_utilization"] == 0.8 and "kv_cache_memory_bytes" not in gpu
    assert gpu["tensor_parallel_size"] == 2 and gpu["enforce_eager"] and not gpu["enable_prefix_caching"]
    assert engine_kwargs(ServeConfig(kv_cache_memory_gib=0.5))["kv_cache_memory_bytes"] == 2**29
    lora = engine_kwargs(ServeConfig(lora_adapters={"a": "/x", "b": "/y"}, max_lora_rank=8))
    assert (lora["enable_lora"], lora["max_lora_rank"], lora["max_loras"]) == (True, 8, 2)
    assert "enable_lora" not in cpu


@pytest.mark.parametrize("overrides,field", [
    (["serve.tensor_parallel_size=2"], "serve.tensor_parallel_size"),
    (["serve.engine_kwargs={api_key: sk-plain}"], "serve.engine_kwargs.api_key"),
    (["serve.tls_cert_file=/etc/cert.pem"], "serve.tls_cert_file"),
    (["serve.tls_cert_file=/c.pem", "serve.tls_key_file=/k.pem", "serve.ingress=haproxy"], "serve.ingress"),
    (["serve.ingress=nginx"], "serve.ingress"),
    (["serve.max_logprobs=21"], "serve.max_logprobs"),
    (["serve.max_model_len=64", "serve.max_tokens_limit=64", "serve.default_max_tokens=16"], "serve.max_tokens_limit"),
    (["serve.dtype=int4"], "serve.dtype"),
    (["serve.max_num_seqs=0"], "serve.max_num_seqs"),
    (["serve.kv_cache_memory_gib=0"], "serve.kv_cache_memory_gib"),
    (["serve.gpu_memory_utilization=1.5"], "serve.gpu_memory_utilization"),
    (["serve.lora_adapters={raylm: /x}"], "serve.lora_adapters"),
    (["serve.max_lora_rank=12"], "serve.max_lora_rank"),
])
def test_bad_engine_settings_are_config_errors_naming_the_field(overrides, field):
    from raylm.config import ConfigError

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


def test_a_checkpoint_the_cpu_engine_cannot_run_is_refused_naming_it(tmp_path):
    from raylm.servable import CheckpointError, check_servable

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64,
                                                      "num_attention_heads": 4}))
    with pytest.raises(CheckpointError, match=f"{tmp_path}.*head_dim 16"):
        check_servable(str(tmp_path), ServeConfig())
    assert check_servable(str(tmp_path), ServeConfig(use_gpu=True))["hidden_size"] == 64


def test_a_lora_adapter_that_is_missing_or_too_wide_is_refused_naming_it(tmp_path):
    from raylm.servable import CheckpointError, check_servable

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64,
                                                      "num_attention_heads": 2}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    with pytest.raises(CheckpointError, match=r"serve\.lora_adapters\.sql=.*adapter_config\.json"):
        check_servable(str(tmp_path), ServeConfig(lora_adapters={"sql": str(adapter)}))
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 32}))
    with pytest.raises(CheckpointError, match=r"rank 32 > serve\.max_lora_rank=16"):
        check_servable(str(tmp_path), ServeConfig(lora_adapters={"sql": str(adapter)}))
    check_servable(str(tmp_path), ServeConfig(lora_adapters={"sql": str(adapter)}, max_lora_rank=32))


def test_unknown_engine_arguments_fail_before_ray_naming_the_field(tmp_path, capsys, checkpoint):
    from raylm.cli import main

    code = main(["serve", "--checkpoint", checkpoint,
                 "--set", "serve.engine_kwargs={enforce_eager: true, max_num_sequences: 4}"])
    assert code == 2 and "serve.engine_kwargs: max_num_sequences is not a vLLM engine argument" in capsys.readouterr().err


def test_every_model_preset_can_be_served_on_cpu():
    from raylm.model import PRESETS, preset_config
    from raylm.servable import MIN_CPU_HEAD_DIM, _head_dim

    for name in PRESETS:
        assert _head_dim(preset_config(name, 256, 64).to_dict()) >= MIN_CPU_HEAD_DIM, name


# ------------------------------------------------------------------ app building


def test_deployment_options_follow_the_config():
    from raylm.serve.options import backpressure, deployment_options, serve_autoscaling

    cfg = load_config(REPO / "configs" / "small.yaml", ["serve.max_queued_requests=5", "serve.retry_after_s=3"])
    opts = deployment_options(cfg.serve)
    assert opts["autoscaling_config"] == serve_autoscaling(cfg.serve) == {
        "min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16.0, "upscale_delay_s": 5.0,
        "downscale_delay_s": 30.0}
    assert opts["ray_actor_options"] == {"num_cpus": cfg.serve.num_cpus_per_replica}
    assert (opts["max_queued_requests"], backpressure(cfg.serve)["retry_after_s"]) == (5, 3)


def test_serve_tiny_yaml_is_a_valid_serve_config_matching_configs_tiny():
    from ray.serve.schema import ServeDeploySchema

    from raylm.serve.options import EDGE_DEPLOYMENT, SERVE_MODEL_DEPLOYMENT, deployment_options, edge_options

    raw = yaml.safe_load((REPO / "deployments" / "serve_tiny.yaml").read_text())
    ServeDeploySchema.model_validate(raw)
    (app,) = raw["applications"]
    assert app["import_path"] == "deployments.openai_app:app_builder"
    cfg = load_config(REPO / app["args"]["config"])
    dep, edge = app["deployments"]
    expected = deployment_options(cfg.serve)
    for key in ("autoscaling_config", "max_ongoing_requests", "max_queued_requests", "ray_actor_options",
                "max_surge_percent", "graceful_shutdown_timeout_s"):
        assert dep[key] == expected[key], key
    assert (dep["name"], edge["name"]) == (SERVE_MODEL_DEPLOYMENT, EDGE_DEPLOYMENT)
    assert {k: v for k, v in edge.items() if k != "name"} == edge_options(cfg.serve)
    assert raw["http_options"]["port"] == cfg.serve.port


# ------------------------------------------------------------------ user-facing entry points


def test_cli_serve_refuses_a_missing_checkpoint_before_ray(tmp_path, capsys):
    from raylm.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "no-such-ckpt")]) == 2
    assert "no-such-ckpt" in capsys.readouterr().err


def test_banner_names_the_key_file_never_the_key(tmp_path):
    from raylm.config import RaylmConfig
    from raylm.serve.app import banner

    path = tmp_path / "api_key"
    cfg = RaylmConfig()
    setup = setup_keys(cfg.serve, {}, generated_path=str(path))
    text = banner("http://127.0.0.1:8000", setup, cfg)
    assert str(path) in text and path.read_text().strip() not in text
    assert "http://127.0.0.1:8000/v1/completions" in text and "openai.OpenAI(base_url='http://127.0.0.1:8000/v1'" in text
    env_setup = setup_keys(cfg.serve, {"RAYLM_API_KEYS": "sk-secret-1,sk-secret-2"}, generated_path=str(path))
    env_text = banner("http://h:1", env_setup, cfg)
    assert "RAYLM_API_KEYS" in env_text and "sk-secret" not in env_text
    assert "replicas directly" not in text and "ingress" not in text
    direct_cfg = RaylmConfig.model_validate({"serve": {"ingress": "direct"}})
    direct_text = banner("http://h:1", setup, direct_cfg, ("http://h:30000", "http://h:30001"))
    assert "replicas directly (no proxy hop): http://h:30000/v1, http://h:30001/v1" in direct_text
    assert "not started with RAY_SERVE_ENABLE_DIRECT_INGRESS=1" in banner("http://h:1", setup, direct_cfg)


def test_tls_files_become_serves_https_options(tmp_path):
    cfg = load_config(None, [f"serve.tls_cert_file={tmp_path}/c.pem", f"serve.tls_key_file={tmp_path}/k.pem"])
    assert cfg.serve.http_options() == {"host": "127.0.0.1", "port": 8000, "ssl_certfile": f"{tmp_path}/c.pem",
                                        "ssl_keyfile": f"{tmp_path}/k.pem"}
    assert "ssl_certfile" not in load_config(None).serve.http_options()


def test_ingress_defaults_to_haproxy_and_to_the_python_proxy_for_tls(tmp_path, monkeypatch):
    """The default path is Ray Serve's HAProxy ingress; TLS needs Serve's Python proxy. What a
    cluster raylm starts gets: HAProxy on (with direct ingress, which it forwards to) and its side
    ports free ones, or both off for the proxy; a port already in the environment is kept."""
    from raylm.cluster import LISTEN_PORT_RANGE, serve_ingress_env

    assert load_config(None).serve.ingress_mode == "haproxy"
    tls = load_config(None, [f"serve.tls_cert_file={tmp_path}/c.pem", f"serve.tls_key_file={tmp_path}/k.pem"])
    assert tls.serve.ingress_mode == "proxy"
    assert load_config(None, ["serve.ingress=direct"]).serve.ingress_mode == "direct"
    monkeypatch.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")
    env = serve_ingress_env("haproxy")
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"
    ports = [int(env[k]) for k in ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
                                   "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT")]
    assert 9101 not in ports and 8500 not in ports
    # HAProxy binds them when Serve starts, minutes later: from the kernel's ephemeral range an
    # outgoing connection took one in between (CI: "cannot bind socket ... for frontend prometheus")
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert all(LISTEN_PORT_RANGE[0] <= p < min(LISTEN_PORT_RANGE[1], ephemeral_low) for p in ports), ports
    # behind its own HAProxy a stopping replica stays reachable 5 s (Ray's 30 s is for outside load
    # balancers); direct ingress, which has none in front, keeps Ray's window
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "5"
    assert "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S" not in serve_ingress_env("direct")
    monkeypatch.setenv("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "30")
    assert serve_ingress_env("haproxy")["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "30"
    assert serve_ingress_env("proxy") == {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
    assert serve_ingress_env("direct")["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"


def test_per_key_usage_is_counted_by_key_id_never_the_key():
    from raylm.serve.gate import Gate

    keyed = []
    usage = json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
    gate = Gate(FakeEngineApp(body=usage.encode()), settings=gate_settings(), health=None,
                on_key=lambda *row: keyed.append(row))
    body = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 4}).encode()
    assert call_gate(gate, "POST", "/v1/completions", body)[0] == 200
    assert call_gate(gate, "POST", "/v1/completions", json.dumps({"model": "m", "prompt": "hi",
                                                                  "max_tokens": 99}).encode())[0] == 400
    assert call_gate(gate, "POST", "/v1/completions", body, key="wrong")[0] == 401  # no key id: not a key
    key_id = hashlib.sha256(b"k1").hexdigest()[:12]
    assert keyed == [(key_id, "completions", 200, 7), (key_id, "completions", 400, 0)]
    assert all("k1" not in str(row) for row in keyed)


def test_usage_is_read_from_a_stream_and_from_bodies_split_across_chunks():
    from raylm.serve.gate import UsageTally

    sse = (b'data: {"choices":[{"text":"a"}],"usage":null}\n\n'
           b'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":5,"total_tokens":7}}\n\n'
           b'data: [DONE]\n\n')
    tally = UsageTally()
    for i in range(0, len(sse), 9):  # cut anywhere, even inside the marker
        tally.feed(sse[i:i + 9])
    assert tally.tokens == 7
    body = json.dumps({"id": "x", "usage": {"total_tokens": 11}}).encode()
    tally = UsageTally()
    tally.feed(body[:20])
    tally.feed(body[20:])
    tally.finish()  # a JSON body has no newline: it is read when the response ends
    assert tally.tokens == 11


def test_a_stream_without_usage_is_counted_from_its_chunks():
    """vLLM streams a chunk per token of a choice; a chat's first chunk only names the role."""
    from raylm.serve.gate import UsageTally

    chat = (b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
            + b''.join(b'data: {"id":"c","choices":[{"index":%d,"delta":{"content":"t"}}]}\n\n' % (i % 2)
                       for i in range(6))
            + b'data: [DONE]\n\n')
    tally = UsageTally()
    for i in range(0, len(chat), 7):
        tally.feed(chat[i:i + 7])
    assert tally.finish(prompt_tokens=10) == 16
    merged = (b'data: {"choices":[{"index":0,"text":"ab","finish_reason":null}]}\n\n'
              b'data: {"choices":[{"index":0,"text":"c","finish_reason":"length"}]}\n\ndata: [DONE]\n\n')
    tally = UsageTally()
    tally.feed(merged)
    assert tally.finish(prompt_tokens=1, per_choice=3) == 4  # two chunks, but it ran to its max_tokens of 3
    assert UsageTally().finish(prompt_tokens=10) == 0  # nothing streamed (an error): nothing used


def test_prefix_aware_routing_is_ray_serve_llms_router_and_needs_the_edge():
    from ray.serve.config import RequestRouterConfig

    from raylm.config import ConfigError
    from raylm.serve.options import deployment_options

    cfg = load_config(None, ["serve.request_router=prefix_aware"])
    router = RequestRouterConfig(**deployment_options(cfg.serve)["request_router_config"])
    assert router.get_request_router_class().__name__ == "PrefixCacheAffinityRouter"
    # load still counts (Ray's default threshold is no limit), and the prefix tree is trimmed
    assert router.request_router_kwargs["imbalanced_threshold"] == 1.0 and router.request_router_kwargs["do_eviction"]
    tuned = load_config(None, ["serve.request_router=prefix_aware", "serve.prefix_router.imbalanced_threshold=2"])
    assert deployment_options(tuned.serve)["request_router_config"]["request_router_kwargs"]["imbalanced_threshold"] == 2
    assert "request_router_config" not in deployment_options(load_config(None).serve)
    with pytest.raises(ConfigError, match="serve.request_router: prefix_aware needs serve.edge.enabled"):
        load_config(None, ["serve.request_router=prefix_aware", "serve.edge.enabled=false"])


def test_edge_calls_carry_what_the_prefix_aware_router_reads_and_never_the_key():
    from raylm.serve.edge import edge_call

    headers = [(b"authorization", b"Bearer sk-secret"), (b"content-type", b"application/json"), (b"x-request-id", b"r1")]
    chat = edge_call("/v1/chat/completions", json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode(), headers)
    assert chat.model == "m" and chat.messages == [{"role": "user", "content": "hi"}] and not hasattr(chat, "prompt")
    completion = edge_call("/v1/completions", b'{"model": "m", "prompt": "once upon"}', headers)
    assert completion.prompt == "once upon" and not hasattr(completion, "messages")
    assert all(k != b"authorization" for k, _ in chat.headers + completion.headers)
    assert (b"x-request-id", b"r1") in completion.headers
    # what the gate made of the body is handed on, so the edge does not parse it again
    from raylm.serve.gate import check_body

    raw = json.dumps({"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                      "max_tokens": 2}).encode()
    checked = check_body("chat", raw, gate_settings())
    handed = edge_call("/v1/chat/completions", checked.body, headers, checked)
    assert handed.messages == [{"role": "user", "content": "hi"}] and handed.model == "m" and handed.body == raw


def test_the_edge_is_built_from_what_its_gate_reads_of_the_model_config():
    """A promotion to a model that differs only in what the gate never reads (layers, widths) gives
    the edge the same inputs, so Serve keeps its replicas; vocabulary or context changes do not."""
    from raylm.serve.edge import edge_model_config, gate_settings

    s = ServeConfig()
    base = {"vocab_size": 300, "max_position_embeddings": 256, "num_hidden_layers": 2, "hidden_size": 64}
    assert gate_settings(s, [], edge_model_config(base)) == gate_settings(s, [], base)
    assert edge_model_config(base) == edge_model_config({**base, "num_hidden_layers": 3, "hidden_size": 128})
    assert edge_model_config(base) != edge_model_config({**base, "vocab_size": 301})
    assert edge_model_config(base) != edge_model_config({**base, "max_position_embeddings": 512})


@pytest.mark.timeout(30)
def test_ctrl_c_stops_the_endpoint_after_a_sweep_left_its_sigint_handler(monkeypatch):
    """Ray Tune leaves its SIGINT handler installed after a sweep; `raylm pipeline --keep-serving`
    must still stop (and delete its app) at the first Ctrl-C."""
    import signal
    import threading

    import raylm.serve.app as app

    deleted: list[str] = []
    monkeypatch.setattr(app.serve, "delete", deleted.append)
    previous = signal.signal(signal.SIGINT, lambda *_: None)  # what a finished sweep leaves behind
    try:
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
        app.serve_until_interrupted(load_config())
    finally:
        signal.signal(signal.SIGINT, previous)
    assert deleted == ["raylm"]


def test_a_replica_exits_once_its_engine_is_found_dead_and_not_before():
    """The watcher ends the replica's process (so Serve replaces it at once) when vLLM's monitor
    marks the engine dead, and leaves a replica without a vLLM client alone."""
    from types import SimpleNamespace

    from raylm.serve.app import exit_when_engine_dies

    resources = SimpleNamespace(engine_dead=False)
    engine = SimpleNamespace(_engine_client=SimpleNamespace(engine_core=SimpleNamespace(resources=resources)))
    exits: list[int] = []

    async def scenario() -> None:
        watch = asyncio.create_task(exit_when_engine_dies(engine, interval_s=0.01, exit_process=exits.append))
        await asyncio.sleep(0.1)
        assert exits == [] and not watch.done()
        resources.engine_dead = True
        await asyncio.wait_for(watch, 1)
        await exit_when_engine_dies(SimpleNamespace(), interval_s=0.01, exit_process=exits.append)

    asyncio.run(scenario())
    assert exits == [1]


def test_a_replica_serves_its_local_copy_of_a_checkpoint_in_object_storage(tmp_path, monkeypatch):
    """The driver's deployment options cache Ray Serve LLM's engine config on the LLMConfig (an
    s3:// model becomes the model id with a bucket mirror) and the replica receives it pickled;
    once the replica has its local copy, the engine must be pointed at that copy, not at the model
    id (vLLM would look that up on the Hugging Face Hub)."""
    import pickle

    from raylm.serve import app

    cfg = load_config(None, ["serve.model_id=tiny-test", "serve.lora_adapters={ft: s3://bucket/adapter}"])
    driver_side = app.llm_config(cfg.serve, "s3://bucket/ckpt", has_chat_template=True)
    # LLMServer.get_deployment_options (build_llm_deployment, on the driver) caches it so
    assert driver_side.get_engine_config().mirror_config.bucket_uri == "s3://bucket/ckpt"
    replica_side = pickle.loads(pickle.dumps(driver_side))
    copies = {uri: str(tmp_path / uri.rsplit("/", 1)[1]) for uri in ("s3://bucket/ckpt", "s3://bucket/adapter")}
    monkeypatch.setattr(app.storage, "cached_copy", lambda uri, max_bytes=None: copies[uri])
    app.bring_sources_here(replica_side)
    engine = replica_side.get_engine_config()
    assert engine.actual_hf_model_id == copies["s3://bucket/ckpt"] and engine.mirror_config is None
    assert [m.path for m in replica_side.engine_kwargs["lora_modules"]] == [copies["s3://bucket/adapter"]]


def test_a_replica_loads_the_adapter_the_edge_routed_to_it_though_its_own_listing_is_older():
    """The edge and each LLM replica list serve.adapters_path on their own clocks. A call the edge
    routed by an adapter's multiplexed id loads that adapter on the replica, whatever the replica
    last listed (it answered 404 for a just-promoted adapter in CI); a call for the base does not."""
    from dataclasses import replace
    from types import SimpleNamespace

    from ray.serve.context import _get_serve_request_context, _serve_request_context

    from raylm.serve.app import RaylmServer
    from raylm.serve.edge import CompletionCall

    loaded: list[str] = []

    async def stale_listing() -> tuple[str, ...]:
        return ()

    async def load(model: str) -> None:
        loaded.append(model)

    async def engine_app(scope: dict, receive: object, send: object) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    replica = SimpleNamespace(adapters=SimpleNamespace(names=stale_listing, load=load), _edge_app=engine_app)

    async def call(model: str, routed_as: str) -> list[dict]:
        _serve_request_context.set(replace(_get_serve_request_context(), multiplexed_model_id=routed_as))
        call = CompletionCall(path="/v1/completions", body=b"{}", model=model)
        return [m async for batch in RaylmServer.serve_http(replica, call) for m in batch]

    new = "tiny-test:ft1"
    assert asyncio.run(call(new, routed_as=new))[0]["status"] == 200 and loaded == [new]
    assert asyncio.run(call("tiny-test", routed_as=""))[0]["status"] == 200 and loaded == [new]


def test_an_adapter_removed_since_the_edge_listed_it_is_a_404_naming_it(tmp_path):
    from raylm.serve.app import AdapterStore

    s = ServeConfig(model_id="tiny-test", adapters_path=str(tmp_path))
    with pytest.raises(p.APIError) as err:
        asyncio.run(AdapterStore(None, s, {})._load("tiny-test:gone"))
    assert (err.value.status, err.value.param, err.value.code) == (404, "model", "model_not_found")
    assert str(tmp_path / "gone") in err.value.message


def test_adapter_checks_and_downloads_run_off_the_replicas_event_loop(tmp_path, monkeypatch):
    """Storage calls (listing a folder, reading adapter_config.json, downloading) block: on the
    event loop of the replica that drives vLLM they would stall every stream it serves."""
    import time

    from raylm import storage
    from raylm.serve.app import AdapterStore

    def slow_kind(uri):
        time.sleep(0.5)
        return "missing"

    monkeypatch.setattr(storage, "kind", slow_kind)
    s = ServeConfig(model_id="tiny-test", adapters_path=str(tmp_path))

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        task = asyncio.create_task(ticker())
        with pytest.raises(p.APIError):
            await AdapterStore(None, s, {})._load("tiny-test:slow")
        task.cancel()
        return ticks

    assert asyncio.run(main()) >= 5, "the loop kept running while the adapter's storage was read"


def test_the_node_cache_is_an_lru_by_size(tmp_path):
    import os
    import time

    from raylm import storage

    for i, name in enumerate(("old", "mid", "new")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "w.bin").write_bytes(b"x" * 1000)
        os.utime(tmp_path / name, (time.time() - 100 + i, time.time() - 100 + i))
    (tmp_path / "dl.tmp123").mkdir()  # a download in progress: never pruned
    (tmp_path / "dl.tmp123" / "w.bin").write_bytes(b"x" * 5000)
    assert storage.prune_cache(str(tmp_path), None) == []
    deleted = storage.prune_cache(str(tmp_path), 2000, keep=str(tmp_path / "old"))
    assert deleted == [str(tmp_path / "mid")], "the least recently used, but never the copy just handed out"
    assert sorted(os.listdir(tmp_path)) == ["dl.tmp123", "new", "old"]
    assert storage.prune_cache(str(tmp_path), 0, keep=str(tmp_path / "new")) == [str(tmp_path / "old")]


def test_the_serve_run_and_rayservice_app_names_its_model_version(monkeypatch):
    """deployments/openai_app.py (serve run, KubeRay's RayService) binds a model version, so its
    responses carry x-raylm-model-version like `raylm serve`'s: `version:` when given, else one
    naming the checkpoint a best.json resolved to (a best.json rewritten since shows)."""
    import importlib
    import sys

    sys.path.insert(0, str(REPO))
    try:
        openai_app = importlib.import_module("deployments.openai_app")
    finally:
        sys.path.remove(str(REPO))
    built = []
    monkeypatch.setattr(openai_app, "resolve_checkpoint", lambda path: f"/resolved/{path}")
    monkeypatch.setattr(openai_app, "build_app", lambda cfg, ckpt, model_version="": built.append((ckpt, model_version)))
    openai_app.app_builder({"checkpoint": "a", "version": "v7"})
    openai_app.app_builder({"checkpoint": "a"})
    openai_app.app_builder({"checkpoint": "b"})
    assert built[0] == ("/resolved/a", "v7")
    assert built[1][1].startswith("ckpt-") and built[1][1] != built[2][1]


RAY_RENDERED_HAPROXY = """global
    nbthread 2
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend prometheus
    bind :{metrics}
    mode http
    http-request use-service prometheus-exporter if {{ path /metrics }}
frontend http_frontend
    bind 127.0.0.1:{http}
    default_backend be
backend be
    server s1 127.0.0.1:{backend}
listen stats
  bind *:{stats}
  stats enable
  stats uri /stats
"""


def test_raylms_haproxy_wrapper_binds_the_stats_page_to_loopback_and_refuses_from_the_headers(tmp_path, monkeypatch):
    """Ray renders `listen stats` on every interface and offers no rules hook; the wrapper raylm names
    as Ray's HAProxy binary edits the rendered config (HAProxy itself checks the result, in -c mode)
    and adds the keyless-request rule only once an app that requires keys has marked the folder."""
    import subprocess

    from raylm.cluster import serve_ingress_env
    from raylm.haproxy_rules import RULES_ENV, mark_keyed

    monkeypatch.delenv("RAY_SERVE_HAPROXY_BINARY_PATH", raising=False)
    env = serve_ingress_env("haproxy")
    wrapper, rules = env["RAY_SERVE_HAPROXY_BINARY_PATH"], env[RULES_ENV]
    assert "RAY_SERVE_HAPROXY_BINARY_PATH" not in serve_ingress_env("proxy")
    config = tmp_path / "haproxy.cfg"

    def rendered(keyed: bool) -> str:
        config.write_text(RAY_RENDERED_HAPROXY.format(metrics=29201, http=29200, backend=29202, stats=29204))
        monkeypatch.setenv(RULES_ENV, rules)
        mark_keyed(keyed)
        done = subprocess.run([wrapper, "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stdout + done.stderr  # HAProxy's own check of the edited config
        return config.read_text()

    text = rendered(keyed=False)
    assert "bind 127.0.0.1:29204" in text and "bind *:" not in text
    assert "req.hdr_val(content-length) gt 4194304" in text and "authorization" not in text
    text = rendered(keyed=True)
    assert "!{ req.hdr(authorization) -m found }" in text
    assert json.loads(Path(rules, "401.json").read_text())["error"]["code"] == "invalid_api_key"
    assert rendered(keyed=False).count("raylm edge rules") == 1 and "authorization" not in config.read_text()
