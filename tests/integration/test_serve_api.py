"""The OpenAI-compatible API on real Ray Serve over real HTTP: the official `openai` client,
streaming, usage, seeds, stop strings, auth, every bad request, and batching."""

from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import openai
import pytest
from serve_fixtures import (KEYS, MODEL_ID, auth, deploy_app, key_file, serve_config, shutdown_serve, stats,
                            tiny_checkpoint)

__all__ = ["key_file", "tiny_checkpoint"]  # fixtures used by this module

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def url(ray_cluster, tiny_checkpoint, key_file):
    # One replica so /v1/stats sees every request; a 50 ms batch window so a burst shares batches.
    cfg = serve_config(key_file, "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=1",
                       "serve.max_batch_size=8", "serve.batch_wait_timeout_s=0.05", "serve.max_ongoing_requests=16")
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
    assert [m.id for m in client.models.list().data] == [MODEL_ID]


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
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi", "max_tokens": 65}, 400, "max_tokens"),
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
    ("/v1/completions", {"model": MODEL_ID, "prompt": "hi", "echo": True}, 400, "echo"),
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
    for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("GET", "/v1/stats")):
        resp = httpx.request(method, f"{url}{path}", headers=headers, timeout=10,
                             json={"model": MODEL_ID, "prompt": "hi"} if method == "POST" else None)
        assert resp.status_code == 401, (path, resp.text)
        assert resp.json()["error"]["code"] == "invalid_api_key"


def test_wrong_key_with_the_openai_client(url):
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL_ID, prompt="hi", max_tokens=1)


# ------------------------------------------------------------------ batching


def test_concurrent_requests_share_forward_passes(url):
    n, max_tokens = 8, 8
    before = stats(url)

    def one(i: int) -> httpx.Response:
        return post(url, "/v1/completions", {"model": MODEL_ID, "prompt": f"request {i}", "max_tokens": max_tokens,
                                             "temperature": 0})

    with cf.ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(one, range(n)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    after = stats(url)
    requests = after["requests"] - before["requests"]
    forward_passes = after["forward_passes"] - before["forward_passes"]
    batches = after["batches"] - before["batches"]
    tokens = sum(r.json()["usage"]["completion_tokens"] for r in responses)
    assert requests == n
    assert after["completion_tokens"] - before["completion_tokens"] == tokens
    # Unbatched, every request would need its own prefill and decode steps: `tokens` passes.
    assert forward_passes < tokens and batches < n, (forward_passes, batches, tokens)
    assert after["largest_batch"] >= 2
