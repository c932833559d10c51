"""The OpenAI-compatible API on real Ray Serve + vLLM over real HTTP: the official `openai` client,
streaming, usage, seeds, stop strings, auth, every bad request, continuous batching (a short
request is not held behind a long one) and vLLM's engine metrics. One app for the module: a
vLLM engine takes ~45 s to start."""

from __future__ import annotations

import concurrent.futures as cf
import functools
import json
from pathlib import Path
import threading
import time

import httpx
import openai
import pytest

from raylm.config import InputError
from raylm.serve.auth import add_key_hash, hash_key, revoke_key_hash
from serve_fixtures import (KEYS, MODEL_ID, auth, deploy_app, key_file, serve_config, shutdown_serve, tiny_adapter,
                            wait_until,
                            tiny_checkpoint)

__all__ = ["key_file", "tiny_adapter", "tiny_checkpoint"]  # fixtures used by this module

ADAPTER = "tiny-lora"

pytestmark = pytest.mark.timeout(300)


ORIGIN = "https://app.example"  # serve.cors_origins
LIMITED_KEY = "sk-test-limited"  # in the hashes file (key rotation), with 2 requests per minute
# Keys of the token and concurrency tests alone (each test's counts start from an empty window):
TPM_KEY, STREAM_KEY, CONCURRENT_KEY = "sk-test-tpm-burst", "sk-test-tpm-stream", "sk-test-concurrent"
CORS_KEY = "sk-test-cors"  # 1 request a minute: the CORS test's 429
METRICS_KEY = "sk-test-metrics"  # the metrics test's alone: its per-key counters move by exactly what it sends
TPM = 150  # tokens per minute of TPM_KEY and STREAM_KEY
KEY_LIMITS = {LIMITED_KEY: "{requests_per_minute: 2}", TPM_KEY: f"{{tokens_per_minute: {TPM}}}",
              STREAM_KEY: f"{{tokens_per_minute: {TPM}}}", CONCURRENT_KEY: "{max_concurrent_requests: 2}",
              CORS_KEY: "{requests_per_minute: 1}"}


@pytest.fixture(scope="module")
def key_hashes(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("hashes") / "key_hashes"
    path.write_text("".join(f"{hash_key(key)} limited\n" for key in KEY_LIMITS) + f"{hash_key(METRICS_KEY)} metrics\n")
    return str(path)


@pytest.fixture(scope="module")
def url(ray_cluster, tiny_checkpoint, tiny_adapter, key_file, key_hashes):
    # One replica, so the long and the short request of the continuous-batching test share an engine;
    # a LoRA adapter served beside the base model; a hashes file re-read every second, with one
    # keys with their own limits (requests, tokens per minute, at once); Ray Serve LLM's prefix-aware router
    # behind the edge (it reads each call's prompt or messages: a call it cannot read would fail every request).
    cfg = serve_config(key_file, "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=1",
                       "serve.request_router=prefix_aware",
                       "serve.max_tokens_limit=128", f"serve.lora_adapters={{{ADAPTER}: {tiny_adapter}}}",
                       "serve.max_lora_rank=8", f"serve.api_key_hashes_path={key_hashes}", "serve.api_keys_reload_s=1",
                       f"serve.cors_origins=[{ORIGIN}]",
                       "serve.key_limits.overrides={" + ", ".join(f"{hash_key(key)[:12]}: {limit}"
                                                                  for key, limit in KEY_LIMITS.items()) + "}")
    yield deploy_app(cfg, tiny_checkpoint)
    shutdown_serve()


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEYS[1], max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


def post(url: str, path: str, body, key: str | None = KEYS[0]) -> httpx.Response:
    headers = {"Content-Type": "application/json", **(auth(key) if key else {})}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{url}{path}", content=content, headers=headers, timeout=60)


# ------------------------------------------------------------------ the openai client


def test_health_needs_no_key_and_models_lists_the_served_model(url, client):
    assert httpx.get(f"{url}/health", timeout=10).json() == {"status": "ok"}
    assert sorted(m.id for m in client.models.list().data) == sorted([MODEL_ID, ADAPTER])


def test_a_request_picks_the_base_model_or_a_lora_adapter_by_name(client):
    """vLLM serves the adapter beside the base (multi-LoRA batching); its answer differs from the base's."""
    def greedy(model: str) -> str:
        return client.completions.create(model=model, prompt="The quick brown fox", max_tokens=12, temperature=0,
                                          extra_body={"ignore_eos": True}).choices[0].text

    base, adapted = greedy(MODEL_ID), greedy(ADAPTER)
    assert base != adapted and greedy(ADAPTER) == adapted
    chat = client.chat.completions.create(model=ADAPTER, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert chat.model == ADAPTER and chat.usage.completion_tokens >= 1
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="tiny-lora-2", prompt="x", max_tokens=1)
    assert "tiny-lora-2" in err.value.message and err.value.body["param"] == "model"


def test_completion_usage_and_finish_reason(client, tokenizer):
    prompt = "The quick brown fox"
    out = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=0)
    choice = out.choices[0]
    assert out.object == "text_completion" and isinstance(choice.text, str)
    assert out.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert 1 <= out.usage.completion_tokens <= 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert choice.finish_reason == ("length" if out.usage.completion_tokens == 8 else "stop")


def test_streamed_completion_equals_the_unstreamed_one(client):
    kwargs = dict(model=MODEL_ID, prompt="Hello there", max_tokens=12, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_chat_completion_streamed_and_not(client):
    kwargs = dict(model=MODEL_ID, messages=[{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "What is Python?"}],
                  max_tokens=10, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_raw_stream_is_openai_sse_ending_with_done(url):
    resp = post(url, "/v1/completions", {"model": MODEL_ID, "prompt": "Hi", "max_tokens": 3, "stream": True})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = [e for e in resp.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_seed_makes_sampling_reproducible(client):
    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=16,
                                         temperature=1.0, top_p=0.95, seed=seed).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(seed) != first for seed in (1, 2, 3))


def test_greedy_is_deterministic(client):
    outs = {client.completions.create(model=MODEL_ID, prompt="abc", max_tokens=8, temperature=0).choices[0].text
            for _ in range(2)}
    assert len(outs) == 1


def test_stop_string_ends_the_completion_before_it(client):
    kwargs = dict(model=MODEL_ID, prompt="The meaning of life is", max_tokens=32, temperature=1.0, seed=7)
    full = client.completions.create(**kwargs).choices[0].text
    # An ASCII character from the second half of the text: its first occurrence is where the
    # stopped completion must end.
    stop = next((ch for ch in full[len(full) // 2:] if ch.isascii() and ch.isalnum()), None)
    assert stop is not None, f"no ASCII letter in the sampled text {full!r}"
    out = client.completions.create(**kwargs, stop=[stop, "\x00never"])
    assert out.choices[0].text == full[:full.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    streamed = client.completions.create(**kwargs, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == full[:full.index(stop)]


# ------------------------------------------------------------------ bad requests and auth


LONG_PROMPT = " ".join(f"word{i}" for i in range(600))

BAD_REQUESTS = [
    ("/v1/completions", b'{"model": "tiny-test", "prompt": ', 400, None),
    ("/v1/completions", b'[1, 2]', 400, None),
    ("/v1/completions", {"model": MODEL_ID}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi"}, 400, "model"),
    ("/v1/chat/completions", {"model": MODEL_ID}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": LONG_PROMPT, "max_tokens": 8}, 400, "prompt"),
    ("/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "user", "content": LONG_PROMPT}]}, 400,
     "messages"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi", "max_tokens": 129}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi", "max_tokens": "8"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi", "temperature": 2.5}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi", "temperature": -0.1}, 400, "temperature"),
    ("/v1/completions", b'{"model": "tiny-test", "prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi", "stop": 3}, 400, "stop"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi", "seed": -5}, 400, "seed"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi", "echo": "yes"}, 400, "echo"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi", "logprobs": 6}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL_ID, "prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
]


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS,
                         ids=[f"{p}:{q or 'json'}:{i}" for i, (p, _, _, q) in enumerate(BAD_REQUESTS)])
def test_bad_request_names_the_parameter(url, path, body, status, param):
    resp = post(url, path, body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


def test_service_is_normal_after_bad_requests(url, client):
    for path, body, _, _ in BAD_REQUESTS:
        post(url, path, body)
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    assert client.completions.create(model=MODEL_ID, prompt="ok", max_tokens=2).usage.completion_tokens >= 1


def test_the_openai_client_sees_bad_requests_as_errors(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_ID, prompt="hi", max_tokens=1000)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": KEYS[0]},
                                     {"Authorization": "Basic " + KEYS[0]}])
def test_missing_or_wrong_key_is_401(url, headers):
    for method, path in (("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
        resp = httpx.request(method, f"{url}{path}", headers=headers, timeout=10,
                             json={"model": MODEL_ID, "prompt": "hi"} if method == "POST" else None)
        assert resp.status_code == 401, (path, resp.text)
        assert resp.json()["error"]["code"] == "invalid_api_key"


def test_a_key_over_its_limit_gets_429_and_keys_rotate_without_a_redeploy(url, key_hashes):
    body = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 1}
    assert [post(url, "/v1/completions", body, key=LIMITED_KEY).status_code for _ in range(2)] == [200, 200]
    refused = post(url, "/v1/completions", body, key=LIMITED_KEY)
    assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert post(url, "/v1/completions", body).status_code == 200  # other keys are not limited
    rotated = "sk-test-rotated"
    assert post(url, "/v1/completions", body, key=rotated).status_code == 401
    add_key_hash(key_hashes, rotated, "rotated")  # no redeploy: the replica re-reads the file
    assert wait_until(lambda: post(url, "/v1/completions", body, key=rotated).status_code == 200, timeout_s=60)
    revoke_key_hash(key_hashes, hash_key(rotated)[:12])
    assert wait_until(lambda: post(url, "/v1/completions", body, key=rotated).status_code == 401, timeout_s=60)
    assert post(url, "/v1/completions", body).status_code == 200


def test_max_completion_tokens_cannot_bypass_the_servers_cap(url):
    """vLLM generates max_completion_tokens when both are set: a small max_tokens beside it must not
    get a 300-token answer past serve.max_tokens_limit (128 here)."""
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
            "max_completion_tokens": 300, "ignore_eos": True}
    resp = post(url, "/v1/chat/completions", body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == "max_completion_tokens" and "128" in error["message"]
    body["max_completion_tokens"] = 5  # within the cap: it is what vLLM generates, not max_tokens
    assert post(url, "/v1/chat/completions", body).json()["usage"]["completion_tokens"] == 5


def _burst(url: str, key: str, body: dict, count: int) -> list[tuple[httpx.Response, float]]:
    """`count` identical requests sent at once; each response with the time it ended."""
    start = threading.Barrier(count)

    def one(_) -> tuple[httpx.Response, float]:
        start.wait()
        resp = post(url, "/v1/completions", body, key=key)
        return resp, time.monotonic()

    with cf.ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def _rate_limited(resp: httpx.Response) -> bool:
    error = resp.json()["error"] if resp.status_code == 429 else {}
    return error.get("code") == "rate_limit_exceeded" and 1 <= int(resp.headers.get("retry-after", 0)) <= 60


def test_a_burst_of_concurrent_requests_stays_within_the_keys_tokens_per_minute(url):
    """Ten concurrent 32-token completions on a key with 150 tokens a minute: each reserves its
    prompt and max_tokens when admitted, so together they cannot use more than the limit (counted
    on completion they all got through: 353 tokens)."""
    body = {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 32, "ignore_eos": True, "temperature": 0}
    answers = [resp for resp, _ in _burst(url, TPM_KEY, body, 10)]
    served = [r for r in answers if r.status_code == 200]
    assert served and all(_rate_limited(r) for r in answers if r.status_code != 200), \
        [(r.status_code, r.text[:200]) for r in answers]
    used = sum(r.json()["usage"]["total_tokens"] for r in served)
    assert used <= TPM and all(r.json()["usage"]["completion_tokens"] == 32 for r in served), used


def test_a_stream_without_include_usage_counts_against_tokens_per_minute(url):
    """Streams that never report their usage are counted from their chunks: 3 streams of 40
    tokens (+ the prompt) leave less than another one's reservation in the key's minute."""
    body = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 40, "ignore_eos": True, "stream": True}
    for _ in range(3):
        streamed = post(url, "/v1/completions", body, key=STREAM_KEY)
        assert streamed.status_code == 200 and '"finish_reason":"length"' in streamed.text
    refused = post(url, "/v1/completions", body, key=STREAM_KEY)
    assert _rate_limited(refused), refused.text
    assert "tokens per minute" in refused.json()["error"]["message"]


def test_a_key_never_runs_more_than_its_max_concurrent_requests(url):
    """Six long requests at once on a key allowed 2 at a time: 2 run, the others get 429 while they
    run (each refusal is answered before the first served one ends, so it was decided while 2 ran)."""
    body = {"model": MODEL_ID, "prompt": "concurrent", "max_tokens": 100, "n": 8, "ignore_eos": True}
    answers = _burst(url, CONCURRENT_KEY, body, 6)
    served = [(r, at) for r, at in answers if r.status_code == 200]
    refused = [(r, at) for r, at in answers if r.status_code != 200]
    assert all(_rate_limited(r) for r, _ in refused), [(r.status_code, r.text[:200]) for r, _ in refused]
    assert max(at for _, at in refused) < min(at for _, at in served), "a refusal came after a served request ended"
    assert len(served) == 2 and "concurrent requests" in refused[0][0].json()["error"]["message"]
    assert post(url, "/v1/completions", {**body, "n": 1, "max_tokens": 1}, key=CONCURRENT_KEY).status_code == 200


def test_wrong_key_with_the_openai_client(url):
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL_ID, prompt="hi", max_tokens=1)


def test_engine_internal_routes_are_not_reachable(url):
    """vLLM's app has admin and internal routes; only the public API is let through."""
    for method, path in (("POST", "/tokenize"), ("GET", "/metrics"), ("POST", "/scale_elastic_ep"),
                         ("POST", "/inference/v1/generate"), ("GET", "/docs")):
        resp = httpx.request(method, f"{url}{path}", headers=auth(), timeout=10)
        assert resp.status_code == 404, (path, resp.status_code)
        assert resp.json()["error"]["type"] == "invalid_request_error"


# ------------------------------------------------------------------ continuous batching and metrics


def test_a_short_request_finishes_while_a_long_generation_runs(url):
    """Continuous batching: a 1-token request sent after a 120-token generation has started joins the
    running batch and completes before the long one does (a static batch would hold it back)."""
    events: list[str] = []
    long_started = threading.Event()

    def long_generation() -> int:
        body = {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 120, "temperature": 0,
                "ignore_eos": True, "stream": True}
        tokens = 0
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=auth(), timeout=120) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    tokens += 1
                    long_started.set()
        events.append("long done")
        return tokens

    with cf.ThreadPoolExecutor(1) as pool:
        long_future = pool.submit(long_generation)
        assert long_started.wait(60), "the long generation did not start streaming"
        short = post(url, "/v1/completions", {"model": MODEL_ID, "prompt": "Hi", "max_tokens": 1, "temperature": 0})
        events.append("short done")
        assert long_future.result(timeout=120) >= 100
    assert short.status_code == 200 and short.json()["usage"]["completion_tokens"] == 1
    assert events == ["short done", "long done"], events


def _metrics_text() -> str:
    import ray

    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


@functools.lru_cache(maxsize=4)
def _parsed(text: str) -> tuple:
    """Every sample of a scrape, parsed once: late in the suite a scrape is megabytes, and parsing it
    again for each counter a test compares (twice: now and before) took over a minute a test."""
    from prometheus_client.parser import text_string_to_metric_families

    return tuple(s for family in text_string_to_metric_families(text) for s in family.samples)


def _samples(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels` (0 when none is exported yet)."""
    return sum(s.value for s in _parsed(text) if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def _has(text: str, name: str) -> bool:
    return f"\n{name}{{" in text or f"\n{name} " in text


ENGINE_METRICS = ("ray_vllm_time_to_first_token_seconds_count", "ray_vllm_num_requests_running",
                  "ray_vllm_num_requests_waiting", "ray_vllm_kv_cache_usage_perc")


def test_engine_and_serve_metrics_reach_the_prometheus_endpoint_and_count_these_requests(url):
    """vLLM's engine metrics (as Ray exports them: `ray_vllm_*`, the names the README and the
    dashboard use) and raylm's request counters are on Ray's Prometheus endpoint. The per-key
    counters of a key no other test uses move by exactly what this test sent (a request counted
    twice fails); the shared counters, which other tests' requests also move, by at least that."""
    import hashlib

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=METRICS_KEY, max_retries=0, timeout=60)
    counted = ("ray_raylm_requests_total", (("endpoint", "completions"), ("status", "200")))
    generated = ("ray_vllm_generation_tokens_total", ())
    ttft = ("ray_vllm_time_to_first_token_seconds_count", ())
    key_id = hashlib.sha256(METRICS_KEY.encode()).hexdigest()[:12]
    per_key = ("ray_raylm_key_requests_total", (("key_id", key_id), ("endpoint", "completions"), ("status", "200")))
    key_tokens = ("ray_raylm_key_tokens_total", (("key_id", key_id), ("endpoint", "completions")))
    key_any = ("ray_raylm_key_requests_total", (("key_id", key_id),))  # every endpoint and status of the key
    before = _metrics_text()
    sent = [client.completions.create(model=MODEL_ID, prompt=f"metrics {i}", max_tokens=4, temperature=0)
            for i in range(3)]
    tokens = sum(r.usage.completion_tokens for r in sent)
    exact = {per_key: 3.0, key_any: 3.0, key_tokens: float(sum(r.usage.total_tokens for r in sent))}
    at_least = {counted: 3.0, generated: float(tokens), ttft: 3.0}
    # Ray drops a gauge from the endpoint two export periods after its last update (vLLM updates the
    # engine's gauges as it steps): each name must show in some scrape, not necessarily the last
    deadline, moved, seen = time.monotonic() + 90, {}, set()
    while time.monotonic() < deadline:
        text = _metrics_text()
        assert all(key not in text for key in (*KEYS, METRICS_KEY)), "metrics carry key ids, never keys"
        seen |= {name for name in (*ENGINE_METRICS, "ray_vllm_inter_token_latency_seconds_count",
                                   "ray_vllm_time_per_output_token_seconds_count") if _has(text, name)}
        moved = {k: _samples(text, k[0], **dict(k[1])) - _samples(before, k[0], **dict(k[1]))
                 for k in (*exact, *at_least)}
        if all(moved[k] >= v for k, v in {**exact, **at_least}.items()) and set(ENGINE_METRICS) <= seen:
            break
        time.sleep(1)
    time.sleep(3)  # one more export period (tests/conftest.py: 2 s): a late second count would show now
    text = _metrics_text()
    moved.update({k: _samples(text, k[0], **dict(k[1])) - _samples(before, k[0], **dict(k[1])) for k in exact})
    assert {k: moved[k] for k in exact} == exact, f"this test's key moved {moved}, expected exactly {exact}"
    assert all(moved[k] >= v for k, v in at_least.items()), f"moved {moved}, expected at least {at_least}"
    assert set(ENGINE_METRICS) <= seen, f"engine metrics never exported: {set(ENGINE_METRICS) - seen}"
    assert {"ray_vllm_inter_token_latency_seconds_count", "ray_vllm_time_per_output_token_seconds_count"} & seen


def test_a_client_that_disconnects_mid_stream_aborts_its_sequences_in_the_engine(url):
    """A streaming client that goes away (its connection closed after the first chunk) must not
    leave the engine generating for nobody: the cancel travels proxy -> edge -> handle call -> the
    LLM replica's vLLM app, and vLLM aborts the request. Seen from the engine's own counters: the
    request ran (tokens were generated), nothing is left running, and far fewer tokens were
    generated than the request asked for, also well after it would have finished."""
    generated = "ray_vllm_generation_tokens_total"
    before = _metrics_text()
    asked = 8 * 128  # n=8 sequences of 128 tokens (EOS ignored): seconds of work on the tiny model
    body = {"model": MODEL_ID, "prompt": "disconnect", "max_tokens": 128, "n": 8, "ignore_eos": True,
            "stream": True, "temperature": 1.0}
    with httpx.Client(timeout=60) as client, client.stream(
            "POST", f"{url}/v1/completions", json=body, headers=auth()) as resp:
        assert resp.status_code == 200
        next(resp.iter_lines())  # the first chunk: the sequences are running; then the connection closes

    def state() -> tuple[float, float]:
        text = _metrics_text()
        return (_samples(text, generated) - _samples(before, generated),
                _samples(text, "ray_vllm_num_requests_running"))

    deadline, (moved, running) = time.monotonic() + 90, (0.0, 1.0)
    while time.monotonic() < deadline and not (moved >= 1 and running == 0):
        time.sleep(2)
        moved, running = state()
    assert moved >= 1 and running == 0, f"generated {moved} tokens, {running} requests still running"
    # the full request would have finished (~3 s) and been exported (every 2 s, tests/conftest.py) by now
    time.sleep(8)
    moved, running = state()
    assert moved < asked / 2 and running == 0, f"{moved} of {asked} tokens generated after the client left"


def test_logprobs_and_echo_are_served_for_evaluation_harnesses(url, tokenizer):
    """What lm-evaluation-harness's local-completions sends to score a continuation: the prompt's own
    tokens come back with their log-probabilities (echo) and the top-k alternatives (logprobs)."""
    prompt = "the cat sat"
    r = post(url, "/v1/completions", {"model": MODEL_ID, "prompt": prompt, "max_tokens": 1, "logprobs": 2,
                                      "echo": True, "temperature": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"].startswith(prompt)
    lp = choice["logprobs"]
    n_prompt = len(tokenizer(prompt)["input_ids"])
    assert len(lp["tokens"]) == n_prompt + 1 and len(lp["token_logprobs"]) == n_prompt + 1
    assert all(v is None or v <= 0 for v in lp["token_logprobs"])
    assert all(len(top) <= 3 for top in lp["top_logprobs"][1:] if top)  # k=2 plus the chosen token
    chat = post(url, "/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 3, "logprobs": True, "top_logprobs": 2})
    assert chat.status_code == 200, chat.text
    content = chat.json()["choices"][0]["logprobs"]["content"]
    assert content and all(len(t["top_logprobs"]) == 2 for t in content)
    assert post(url, "/v1/completions", {"model": MODEL_ID, "prompt": "x", "logprobs": 6}).status_code == 400


def test_chat_without_max_tokens_is_not_cut_at_the_completions_default(url):
    """OpenAI's chat default is the rest of the context (here capped by serve.max_tokens_limit=128),
    not the 16 tokens completions default to: with EOS ignored the answer runs to the cap."""
    r = post(url, "/v1/chat/completions", {"model": MODEL_ID, "messages": [{"role": "user", "content": "go"}],
                                           "ignore_eos": True, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 128


def test_a_browser_may_read_retry_after_the_model_version_and_the_request_id(url):
    """From an allowed origin, the response says which headers a page's script may read: the 429's
    Retry-After, the model version of a rollout, and the request id."""
    body = {"model": MODEL_ID, "prompt": "hi", "max_tokens": 1}
    headers = {"Origin": ORIGIN, "Content-Type": "application/json", **auth()}
    resp = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
    assert resp.status_code == 200 and resp.headers["access-control-allow-origin"] == ORIGIN
    exposed = {h.strip().lower() for h in resp.headers["access-control-expose-headers"].split(",")}
    assert {"retry-after", "x-raylm-model-version", "x-request-id"} <= exposed and "x-request-id" in resp.headers
    limited = {**headers, **auth(CORS_KEY)}
    assert httpx.post(f"{url}/v1/completions", json=body, headers=limited, timeout=60).status_code == 200
    refused = httpx.post(f"{url}/v1/completions", json=body, headers=limited, timeout=60)  # 1 request a minute
    assert refused.status_code == 429 and refused.headers["access-control-allow-origin"] == ORIGIN
    assert "retry-after" in refused.headers and "retry-after" in refused.headers["access-control-expose-headers"].lower()


def _listener(conn, proc, env: dict, seen_rpc: set) -> str:
    """The README's name (Security) for a socket listening beyond loopback, by its process and port.
    A Ray worker's first port is its RPC server; a Serve replica's second one, Serve's
    inter-deployment gRPC server (the edge's calls to the LLM replica)."""
    name, port = proc.name(), conn.laddr.port
    if name == "haproxy":
        if str(port) == env.get("RAY_SERVE_HAPROXY_METRICS_PORT"):
            return "haproxy metrics"
        return f"haproxy port {port}"
    if name in ("gcs_server", "raylet"):
        return f"ray {'gcs' if name == 'gcs_server' else 'raylet'}"
    title = " ".join(proc.cmdline())
    for marker, listener in (("ray::DashboardAgent", "ray dashboard agent"),
                             ("ray::RuntimeEnvAgent", "ray runtime env agent"),
                             ("ray/dashboard/dashboard.py", "ray dashboard head"),
                             ("ray/autoscaler/_private/monitor.py", "ray autoscaler monitor")):
        if marker in title:
            return listener
    if title.startswith("ray::ServeReplica") and 30000 <= port < 31000:
        return "serve replica ingress"
    if proc.pid in seen_rpc and title.startswith("ray::ServeReplica"):
        return "serve replica rpc"
    seen_rpc.add(proc.pid)
    return "ray worker rpc"


def test_what_a_served_app_listens_on_beyond_loopback_is_the_documented_list(url):
    """Every socket the cluster's processes listen on at a non-loopback address is one the README
    lists (Security), and a worker opens one RPC port, no more. HAProxy's statistics page, which
    lists backends and replicas' ports to anyone, is on 127.0.0.1 (raylm's HAProxy wrapper)."""
    import collections
    import os
    import re

    import psutil

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    documented = set(re.findall(r"^\| ([a-z][a-z ]+) \| ", readme.split("## Security", 1)[1], re.M)) - {"listener"}
    env = {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}
    procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
    found, stats, per_worker, seen_rpc, where = collections.Counter(), [], collections.Counter(), set(), {}
    for proc in procs:
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        for conn in conns:
            if conn.status != psutil.CONN_LISTEN:
                continue
            if str(conn.laddr.port) == env.get("RAY_SERVE_HAPROXY_STATS_PORT"):
                stats.append(conn.laddr.ip)
            if conn.laddr.ip.startswith("127.") or conn.laddr.ip == "::1":
                continue
            role = _listener(conn, proc, env, seen_rpc)
            found[role] += 1
            where.setdefault(role, []).append(f"{' '.join(proc.cmdline())[:50]} {conn.laddr.ip}:{conn.laddr.port}")
            if role in ("ray worker rpc", "serve replica rpc"):
                per_worker[proc.pid, role] += 1
    assert found, "no listening socket found among this session's processes"
    undocumented = {role: where[role] for role in set(found) - documented}
    assert not undocumented, f"undocumented listeners: {undocumented} (README lists {documented})"
    assert stats and all(ip.startswith("127.") for ip in stats), f"HAProxy's statistics page listens on {stats}"
    assert found["haproxy metrics"] == 1 and max(per_worker.values()) == 1, (found, per_worker, where)
    assert found["serve replica rpc"] >= 2, where  # the edge and the LLM replica


# ------------------------------------------------------------------ the app builder (serve run / deploy)


def test_app_builder_builds_the_deployment_the_serve_configs_name(ray_cluster, tiny_checkpoint, monkeypatch):
    """`serve run` / `serve deploy` / the RayService build the app with deployments.openai_app, which
    must name the deployments the Serve config files set options on, and never pass a key on: the
    edge (the ingress) holds key hashes, the LLM replicas behind it none."""
    from deployments.openai_app import app_builder
    from raylm.serve.options import EDGE_DEPLOYMENT, SERVE_MODEL_DEPLOYMENT

    monkeypatch.setenv("RAYLM_API_KEYS", "k-builder")
    config = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    app = app_builder({"config": str(config), "checkpoint": tiny_checkpoint,
                       "set": ["serve.max_num_seqs=3", "serve.max_queued_requests=7"]})
    edge = app._bound_deployment
    (llm,) = edge.init_args
    dep = llm._bound_deployment
    assert (edge.name, dep.name) == (EDGE_DEPLOYMENT, SERVE_MODEL_DEPLOYMENT)
    assert dep._deployment_config.max_queued_requests == 7
    llm_config = dep.init_kwargs["llm_config"]
    assert llm_config.engine_kwargs["max_num_seqs"] == 3
    assert llm_config.model_loading_config.model_source == str(Path(tiny_checkpoint).resolve())
    assert edge.init_kwargs["key_hashes"] == [hash_key("k-builder")] and dep.init_kwargs["key_hashes"] == []
    assert "k-builder" not in json.dumps(edge.init_kwargs["key_hashes"]) + json.dumps(dep.init_kwargs["serve_config"])
    with pytest.raises(InputError, match="confg: Extra inputs are not permitted"):
        app_builder({"checkpoint": tiny_checkpoint, "confg": "typo.yaml"})
