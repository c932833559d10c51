"""Per-key limits (requests and tokens per minute, 429 + Retry-After) and key rotation (a hashes
file re-read by running replicas), without Ray: a fake clock moves time, a fake ASGI app stands
in for vLLM's."""

from __future__ import annotations

import asyncio
import hashlib
import json
import textwrap

import pytest

from raylm.cli import main
from raylm.config import ConfigError, KeyLimitsConfig, load_config
from raylm.serve.auth import (ApiKeyError, ReloadingKeys, add_key_hash, hash_key, parse_key_hashes, read_key_hashes,
                              revoke_key_hash, setup_keys)
from raylm.serve.gate import Gate, GateSettings
from raylm.serve.limits import KeyLimiter, Refusal


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def limits(**kw) -> KeyLimitsConfig:
    return KeyLimitsConfig.model_validate(kw)


# ------------------------------------------------------------------ the limiter


def admitted(result) -> bool:
    return not isinstance(result, Refusal)


def test_requests_per_minute_slide_and_retry_after_says_when():
    clock = Clock()
    limiter = KeyLimiter(limits(requests_per_minute=3), clock=clock)
    for step in range(3):
        assert admitted(limiter.admit("a"))
        clock.now += 10  # requests at t=0, 10, 20
    refusal = limiter.admit("a")  # t=30: the one from t=0 leaves the window at t=60
    assert refusal.limit == "requests" and refusal.retry_after_s == pytest.approx(30)
    assert refusal.retry_after_header == "30" and "limit 3" in refusal.message()
    assert admitted(limiter.admit("b"))  # keys have their own windows
    clock.now += 29.5
    assert limiter.admit("a").retry_after_header == "1"  # 0.5 s, rounded up
    clock.now += 0.5
    assert admitted(limiter.admit("a"))  # t=60: one slot free again ...
    assert limiter.admit("a").retry_after_s == pytest.approx(10)  # ... and the next frees at t=70


def test_refused_requests_do_not_count():
    clock = Clock()
    limiter = KeyLimiter(limits(requests_per_minute=1), clock=clock)
    assert admitted(limiter.admit("a"))
    for _ in range(5):
        clock.now += 10
        assert not admitted(limiter.admit("a"))
    clock.now = 1060.0
    assert admitted(limiter.admit("a"))


def test_tokens_are_reserved_at_admission_and_settled_on_the_usage():
    """Concurrent requests cannot go past the limit together: each reserves the most it may use
    before any has finished; settling gives back what a request did not use."""
    clock = Clock()
    limiter = KeyLimiter(limits(tokens_per_minute=100), clock=clock)
    running = [limiter.admit("a", 40) for _ in range(2)]  # 80 reserved, nothing used yet
    assert all(map(admitted, running))
    refusal = limiter.admit("a", 40)  # 80 + 40 > 100: refused while both run
    assert refusal.limit == "tokens" and "used 80" in refusal.message() and refusal.retry_after_s == pytest.approx(60)
    assert admitted(limiter.admit("a", 20))  # 80 + 20 fits exactly
    running[0].settle(10)  # it stopped early: 30 of its 40 come back
    running[0].settle(40)  # settling twice changes nothing
    clock.now += 20
    assert admitted(limiter.admit("a", 30))  # 10 + 40 + 20 + 30 = 100
    refusal = limiter.admit("a", 1)  # 100: full until the ones from t=0 leave, at t=60
    assert refusal.retry_after_s == pytest.approx(40)
    clock.now += 40
    assert admitted(limiter.admit("a", 50))  # only the 30 from t=20 are left
    too_large = limiter.admit("b", 101)  # more than the key's whole minute: never, however long it waits
    assert too_large.too_large and "requested 101" in too_large.message()


def test_a_settled_reservation_that_left_the_window_is_not_taken_off_twice():
    clock = Clock()
    limiter = KeyLimiter(limits(tokens_per_minute=100), clock=clock)
    slow = limiter.admit("a", 60)
    clock.now += 61  # the reservation left the window while the request ran
    fresh = limiter.admit("a", 90)
    slow.settle(0)
    assert admitted(fresh) and limiter._tokens["a"].total == 90
    assert not admitted(limiter.admit("a", 20))


def test_max_concurrent_requests_frees_a_slot_when_a_request_ends():
    limiter = KeyLimiter(limits(max_concurrent_requests=2, overrides={key_id("vip"): {"max_concurrent_requests": 0}}),
                         clock=Clock())
    first, second = limiter.admit("a"), limiter.admit("a")
    refusal = limiter.admit("a")
    assert refusal.limit == "concurrency" and refusal.retry_after_header == "1"
    assert "concurrent requests: limit 2, used 2" in refusal.message()
    first.settle(5)
    third = limiter.admit("a")
    assert admitted(third) and not admitted(limiter.admit("a"))
    second.settle(0), third.settle(0)
    assert not limiter._running  # no slot is held, none is remembered
    assert all(admitted(limiter.admit(key_id("vip"))) for _ in range(10))  # its override: no limit


def test_the_longest_wait_is_reported_when_both_limits_are_reached():
    clock = Clock()
    limiter = KeyLimiter(limits(requests_per_minute=1, tokens_per_minute=10), clock=clock)
    first = limiter.admit("a", 5)
    clock.now += 30
    first.settle(50)  # it used more than it reserved: requests free at t=60, tokens at t=60 too
    refusal = limiter.admit("a", 5)
    assert refusal.limit in ("tokens", "requests") and refusal.retry_after_s == pytest.approx(30)
    limiter.admit("b", 5).settle(9)
    clock.now += 10
    second = limiter.admit("b", 5)  # 9 + 5 > 10 tokens (until t=60) and 1 request (until t=60)
    assert second.retry_after_s == pytest.approx(50)


def test_overrides_by_key_id_keep_the_defaults_they_leave_out():
    cfg = limits(requests_per_minute=2, tokens_per_minute=500,
                 overrides={key_id("vip"): {"requests_per_minute": 5}, key_id("free"): {"requests_per_minute": 0}})
    cfg = KeyLimitsConfig.model_validate(cfg.model_dump(mode="json"))  # as replicas get it: dumped, validated again
    limiter = KeyLimiter(cfg, clock=Clock())
    assert limiter.allowed(key_id("vip")) == (5, 500)
    assert limiter.allowed(key_id("other")) == (2, 500)
    assert limiter.allowed(key_id("free")) == (0, 500)  # 0: no request limit for that key
    assert sum(admitted(limiter.admit(key_id("vip"))) for _ in range(8)) == 5
    assert sum(admitted(limiter.admit(key_id("other"))) for _ in range(8)) == 2
    assert sum(admitted(limiter.admit(key_id("free"))) for _ in range(50)) == 50


def test_a_share_splits_each_limit_over_replicas():
    cfg = limits(requests_per_minute=10, tokens_per_minute=90, split_over_replicas=3)
    assert KeyLimiter(cfg, clock=Clock()).allowed("a") == (3, pytest.approx(30))  # floor(10/3) requests
    assert KeyLimiter(cfg, share=0.5, clock=Clock()).allowed("a") == (5, pytest.approx(45))  # the caller's share wins
    assert KeyLimiter(limits(requests_per_minute=2), share=0.1, clock=Clock()).allowed("a") == (1, 0)  # never 0
    limiter = KeyLimiter(cfg, clock=Clock())
    assert sum(admitted(limiter.admit("a")) for _ in range(10)) == 3
    with pytest.raises(ValueError, match="share"):
        KeyLimiter(cfg, share=0)


def test_idle_keys_are_forgotten():
    clock = Clock()
    limiter = KeyLimiter(limits(requests_per_minute=5, tokens_per_minute=5), clock=clock)
    for n in range(100):
        limiter.admit(f"k{n}", 2).settle(1)
    clock.now += 61
    limiter.admit("last")
    assert set(limiter._requests) == {"last"} and not limiter._tokens


# ------------------------------------------------------------------ the config


def test_key_limits_config_refuses_unknown_fields_and_bad_ids_naming_them(tmp_path):
    def error_of(text: str) -> str:
        path = tmp_path / "c.yaml"
        path.write_text(textwrap.dedent(text))
        with pytest.raises(ConfigError) as info:
            load_config(str(path))
        return str(info.value)

    assert "serve.key_limits.requests_per_min" in error_of("serve:\n  key_limits:\n    requests_per_min: 3\n")
    msg = error_of("serve:\n  key_limits:\n    overrides:\n      sk-raylm-secret: {requests_per_minute: 1}\n")
    assert "serve.key_limits.overrides" in msg and "not a key id" in msg
    assert "serve.key_limits.overrides.abcdefabcdef.rpm" in error_of(
        "serve:\n  key_limits:\n    overrides:\n      abcdefabcdef: {rpm: 1}\n")
    assert "serve.key_limits.tokens_per_minute" in error_of("serve:\n  key_limits:\n    tokens_per_minute: -1\n")
    assert "serve.api_keys_reload_s" in error_of("serve:\n  api_keys_reload_s: 0\n")
    cfg = load_config(None, ["serve.key_limits.requests_per_minute=60", "serve.key_limits.split_over_replicas=2"])
    assert cfg.serve.key_limits.requests_per_minute == 60 and cfg.serve.key_limits.for_key("a" * 12) == (60, 0)


# ------------------------------------------------------------------ the gate


class UsageApp:
    """Stands in for vLLM's app: answers every request with a usage of `tokens`."""

    def __init__(self, tokens: int = 7):
        self.tokens, self.calls = tokens, 0

    async def __call__(self, scope, receive, send):
        await receive()
        self.calls += 1
        body = json.dumps({"choices": [], "usage": {"total_tokens": self.tokens}}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def settings(**kw) -> GateSettings:
    base = dict(model_id="m", adapters=(), key_hashes=(hash_key("k1"), hash_key("k2")), require_api_key=True,
                max_tokens_limit=32, default_max_tokens=7, vocab_size=100)
    return GateSettings(**{**base, **kw})


def post(gate, key: str | None = "k1", path: str = "/v1/completions", body: dict | None = None):
    """(status, headers dict, JSON body) of one request through the gate."""
    body = json.dumps(body or {"model": "m", "prompt": "hi", "max_tokens": 4}).encode()
    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "headers": headers}
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(gate(scope, receive, send))
    payload = b"".join(m.get("body", b"") for m in sent[1:])
    return sent[0]["status"], dict(sent[0]["headers"]), json.loads(payload)


def test_gate_answers_429_in_openai_shape_with_retry_after():
    clock, app, keyed = Clock(), UsageApp(), []
    gate = Gate(app, settings=settings(), health=None, on_key=lambda *row: keyed.append(row),
                limiter=KeyLimiter(limits(requests_per_minute=2), clock=clock))
    assert [post(gate)[0] for _ in range(2)] == [200, 200]
    clock.now += 15
    status, headers, body = post(gate)
    assert status == 429 and headers[b"retry-after"] == b"45"
    assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "requests"
    assert "requests per minute" in body["error"]["message"] and "limit 2" in body["error"]["message"]
    assert app.calls == 2  # the refused request never reached the engine
    assert post(gate, key="k2")[0] == 200  # another key is not affected
    assert keyed[2] == (key_id("k1"), "completions", 429, 0)


def test_the_limit_applies_only_after_a_valid_key():
    gate = Gate(UsageApp(), settings=settings(), health=None,
                limiter=KeyLimiter(limits(requests_per_minute=1), clock=Clock()))
    assert post(gate, key="wrong")[0] == 401
    assert post(gate, key=None)[0] == 401
    assert post(gate, key="k1")[0] == 200  # the bad requests used none of k1's (or anyone's) budget
    assert post(gate, key="wrong")[0] == 401  # a bad key still gets 401, not 429
    assert not set(gate.limiter._requests) - {key_id("k1")}


def test_gate_reserves_a_requests_tokens_and_settles_on_its_usage():
    """post() asks for max_tokens 4 with the prompt 'hi' (2 bytes + 2): 8 tokens reserved; the app
    reports a usage of 40 (more than reserved: what was used counts)."""
    clock, app = Clock(), UsageApp(tokens=40)
    gate = Gate(app, settings=settings(), health=None, limiter=KeyLimiter(limits(tokens_per_minute=100), clock=clock))
    for _ in range(2):  # 0, 40 tokens in the window when admitted
        assert post(gate)[0] == 200
        clock.now += 1
    assert post(gate)[0] == 200  # 80 + 8 fits; its usage makes it 120
    clock.now += 1
    status, headers, body = post(gate)  # 120 + 8 > 100 until the first 40 leaves (t=60)
    assert status == 429 and body["error"]["type"] == "tokens" and headers[b"retry-after"] == b"57"
    assert post(gate, key="k2")[0] == 200
    assert app.calls == 4


def test_gate_refuses_a_request_larger_than_the_keys_minute_naming_the_parameter():
    gate = Gate(UsageApp(), settings=settings(), health=None,
                limiter=KeyLimiter(limits(tokens_per_minute=20), clock=Clock()))
    status, headers, body = post(gate, path="/v1/chat/completions", body={
        "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 30})
    assert status == 429 and b"retry-after" not in headers  # waiting would not help
    assert body["error"]["param"] == "max_completion_tokens" and "requested" in body["error"]["message"]


def test_gate_builds_its_limiter_from_the_settings():
    cfg = load_config(None, ["serve.key_limits.requests_per_minute=4", "serve.key_limits.split_over_replicas=2"]).serve
    gate = Gate(UsageApp(), settings=settings(**GateSettings.key_options(cfg)), health=None)
    assert gate.limiter.allowed("x") == (2, 0)
    assert Gate(UsageApp(), settings=settings(**GateSettings.key_options(cfg), limit_share=1.0),
                health=None).limiter.allowed("x") == (4, 0)
    assert Gate(UsageApp(), settings=settings(**GateSettings.key_options(load_config().serve)),
                health=None).limiter is None  # no limits configured: nothing counted


# ------------------------------------------------------------------ key rotation


HASH_A, HASH_B = hash_key("sk-a"), hash_key("sk-b")


def test_hashes_file_lines_have_a_name_and_comments():
    text = f"# keys\n{HASH_A} alice's laptop  # rotated in May\n\n{HASH_B.upper()}\n"
    assert parse_key_hashes(text, "f") == {HASH_A: "alice's laptop", HASH_B: ""}
    with pytest.raises(ApiKeyError, match="f: line 2"):
        parse_key_hashes(f"{HASH_A}\nsk-raylm-a-plain-key\n", "f")


def check(keys: ReloadingKeys, key: str) -> bool:
    async def run():
        return (await keys.current()).allows(f"Bearer {key}")

    return asyncio.run(run())


def test_file_changes_are_picked_up_on_the_next_reload(tmp_path):
    path, clock = tmp_path / "hashes", Clock()
    path.write_text(f"{HASH_A} a\n")
    keys = ReloadingKeys([hash_key("deployed")], str(path), reload_s=10, clock=clock)
    assert check(keys, "sk-a") and check(keys, "deployed") and not check(keys, "sk-b")
    path.write_text(f"{HASH_B} b\n")  # a rotated out, b in
    clock.now += 9
    assert check(keys, "sk-a") and not check(keys, "sk-b")  # not due yet
    clock.now += 1
    assert check(keys, "sk-b") and not check(keys, "sk-a") and check(keys, "deployed")
    path.write_text("")  # everything in the file revoked: only the deployed keys remain
    clock.now += 10
    assert not check(keys, "sk-b") and check(keys, "deployed")


@pytest.mark.parametrize("breakage", ["missing", "malformed", "unreadable"])
def test_an_unreadable_file_keeps_the_last_good_set(tmp_path, caplog, breakage):
    path, clock = tmp_path / "hashes", Clock()
    path.write_text(f"{HASH_A}\n")
    keys = ReloadingKeys([], str(path), reload_s=10, clock=clock)
    assert check(keys, "sk-a")
    if breakage == "missing":
        path.unlink()
    elif breakage == "malformed":  # a half-written edit: never taken as the new (empty or partial) set
        path.write_text(f"{HASH_B}\n{HASH_A[:30]}")
    else:
        path.write_bytes(b"\xff\xfe")
    clock.now += 10
    assert check(keys, "sk-a") and not check(keys, "sk-b") and not check(keys, "nothing")
    assert "keeping 1 key(s) from the last good read" in caplog.text
    path.write_text(f"{HASH_B}\n")
    clock.now += 10
    assert check(keys, "sk-b") and not check(keys, "sk-a")


def test_a_replica_that_cannot_read_the_file_at_start_accepts_the_deployed_keys_only(tmp_path):
    clock = Clock()
    keys = ReloadingKeys([hash_key("deployed")], str(tmp_path / "missing"), reload_s=10, clock=clock)
    assert check(keys, "deployed") and not check(keys, "sk-a") and not keys.loaded
    (tmp_path / "missing").write_text(f"{HASH_A}\n")
    clock.now += 10
    assert check(keys, "sk-a")


def test_a_slow_read_does_not_hold_requests_beyond_max_wait(tmp_path):
    import threading

    release, reads = threading.Event(), []

    def slow_read(uri):
        reads.append(uri)
        if len(reads) > 1:
            release.wait(5)
        return {HASH_B: ""} if len(reads) > 1 else {HASH_A: ""}

    clock = Clock()
    keys = ReloadingKeys([], "somewhere", reload_s=10, clock=clock, read=slow_read, max_wait_s=0.05)
    assert check(keys, "sk-a")
    clock.now += 10

    async def during_and_after():
        first = (await keys.current()).allows("Bearer sk-a")  # the read is still running: the last good set
        release.set()
        await asyncio.sleep(0.2)
        return first, (await keys.current()).allows("Bearer sk-b")

    assert asyncio.run(during_and_after()) == (True, True)


def test_gate_accepts_keys_added_to_the_hashes_file_while_running(tmp_path):
    path, clock = tmp_path / "hashes", Clock()
    path.write_text("")
    s = settings(key_hashes_path=str(path), keys_reload_s=5)
    gate = Gate(UsageApp(), settings=s, health=None,
                keys=ReloadingKeys(s.key_hashes, s.key_hashes_path, s.keys_reload_s, clock=clock))
    assert post(gate, key="sk-a")[0] == 401 and post(gate, key="k1")[0] == 200
    add_key_hash(str(path), "sk-a", "a")
    clock.now += 5
    assert post(gate, key="sk-a")[0] == 200


def test_setup_keys_reads_the_hashes_file_at_deploy(tmp_path):
    path = tmp_path / "hashes"
    cfg = load_config(None, [f"serve.api_key_hashes_path={path}", "serve.api_key_env=RAYLM_TEST_NONE"]).serve
    with pytest.raises(ApiKeyError, match="serve.api_key_hashes_path"):
        setup_keys(cfg, environ={})
    path.write_text("")  # an empty file (every key revoked) closes the API; no key is generated
    keys = setup_keys(cfg, environ={}, generated_path=str(tmp_path / "gen"))
    assert keys.hashes == () and keys.generated_file is None and "hashes file" in keys.source
    assert not (tmp_path / "gen").exists()


def test_add_and_revoke_keep_other_lines(tmp_path):
    path = str(tmp_path / "sub" / "hashes")
    id_a, id_b = add_key_hash(path, "sk-a", "alice"), add_key_hash(path, "sk-b")
    assert read_key_hashes(path) == {HASH_A: "alice", HASH_B: ""} and id_a == key_id("sk-a")
    assert revoke_key_hash(path, id_a) == [f"{HASH_A} alice"]
    assert read_key_hashes(path) == {HASH_B: ""}
    with pytest.raises(ApiKeyError, match="no key with id"):
        revoke_key_hash(path, id_a)
    with pytest.raises(ApiKeyError, match="not a key id"):
        revoke_key_hash(path, "sk-b")  # a key is never an id
    assert id_b == key_id("sk-b")


def test_cli_keys_new_prints_the_key_once_and_stores_only_its_hash(tmp_path, capsys):
    path = tmp_path / "hashes"
    assert main(["keys", "new", "--name", "ci", "--set", f"serve.api_key_hashes_path={path}"]) == 0
    key = capsys.readouterr().out.splitlines()[0]
    assert key.startswith("sk-raylm-") and key not in path.read_text()
    assert read_key_hashes(str(path)) == {hash_key(key): "ci"}
    assert main(["keys", "list", "--set", f"serve.api_key_hashes_path={path}"]) == 0
    assert capsys.readouterr().out.split() == [key_id(key), "ci"]
    assert main(["keys", "revoke", key_id(key), "--set", f"serve.api_key_hashes_path={path}"]) == 0
    assert read_key_hashes(str(path)) == {}
    assert main(["keys", "revoke", key_id(key), "--set", f"serve.api_key_hashes_path={path}"]) == 2
    assert main(["keys", "new"]) == 2  # no hashes file configured
    assert "serve.api_key_hashes_path" in capsys.readouterr().err
