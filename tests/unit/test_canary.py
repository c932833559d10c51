"""The canary's pieces (`raylm promote --canary`): the split, the version pin, the edge's routes
and per-version recorder, the numbers merged over edge replicas, the history's running canary
and the rollback decision. test_lifecycle runs them against real engines."""

from __future__ import annotations

import json
import random

import pytest

from raylm.config.serve import CanaryConfig
from raylm.lifecycle.canary import Decision, decide
from raylm.lifecycle.history import running_canary
from raylm.serve.canary import (UNTIMED_FIRST, Routes, VersionRecorder, conversation, merged_summary, pinned_version,
                                split_pin, to_candidate, unpin)
from raylm.serve.protocol import APIError

WORDS = "the a king queen sword river night castle wine bread song storm fool crown letter".split()


def varied_requests(n: int, seed: int = 0) -> list[tuple[str, list, object]]:
    """(key id, headers, prompt or messages): 400 requests as a mixed crowd sends them: a few keys,
    chat and completions, some with a session header, texts of varied length."""
    rng = random.Random(seed)
    keys = [f"{rng.getrandbits(48):012x}" for _ in range(7)]
    out = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30))) + f" #{i}"
        headers = [(b"x-session-id", f"s-{rng.getrandbits(32):x}".encode())] if rng.random() < 0.3 else []
        body = [{"role": "user", "content": text}] if rng.random() < 0.5 else text
        out.append((rng.choice(keys), headers, body))
    return out


@pytest.mark.parametrize("percent", [5, 10, 25, 50, 90])
def test_the_split_gives_pct_within_5_points_over_400_varied_requests(percent):
    """A hash split is a coin per conversation: over 400 requests the share is binomial, σ = 2.5
    points at 50%, so ±5 points holds for ~95% of sets of 400 at 50% (always at 5% or 90%). Checked
    on 20 sets of 400: nearly all within ±5, and the 8,000 together within ±1.5 (an unbiased hash)."""
    shares = []
    for seed in range(20):
        sent = [to_candidate(key, conversation(headers, body), percent) for key, headers, body in varied_requests(400, seed)]
        shares.append(100 * sum(sent) / len(sent))
    within = sum(abs(share - percent) <= 5 for share in shares)
    assert within >= 18, shares
    assert abs(sum(shares) / len(shares) - percent) <= 1.5, shares
    assert not any(to_candidate(k, conversation(h, b), 0) for k, h, b in varied_requests(400))
    assert all(to_candidate(k, conversation(h, b), 100) for k, h, b in varied_requests(400))


def test_a_conversation_stays_on_one_version():
    first = {"role": "user", "content": "Tell me about the storm."}
    turns = [[first], [first, {"role": "assistant", "content": "It rained."}, {"role": "user", "content": "More?"}]]
    ids = {conversation([], messages) for messages in turns}
    assert len(ids) == 1  # later turns repeat the first message
    key = "0123456789ab"
    # every turn lands on the same side, whatever the percentage
    assert all(len({to_candidate(key, i, pct) for i in ids}) == 1 for pct in range(0, 101, 5))
    # content parts count as the text they hold
    assert conversation([], [{"role": "user", "content": [{"type": "text", "text": first["content"]}]}]) in ids
    # the session header wins over the text, and other keys hash elsewhere
    assert conversation([(b"X-Session-Id", b"abc")], [first]) == conversation([(b"x-session-id", b"abc")], "other")
    assert conversation([(b"x-session-id", b"  ")], [first]) in ids  # an empty header is no session
    spread = {to_candidate(f"{k:012x}", next(iter(ids)), 50) for k in range(40)}
    assert spread == {True, False}  # the key is part of the hash


def test_completions_prompts_token_ids_and_batches_have_a_conversation():
    assert conversation([], "once upon") == conversation([], ["once upon", "twice"])
    assert conversation([], [1, 2, 3]) != conversation([], [1, 2, 4])
    assert conversation([], [[1, 2], [3]]) == conversation([], [[1, 2]])


def test_a_pinned_version_is_parsed_and_an_unserved_one_is_a_404_naming_the_served():
    assert split_pin("tiny@v3") == ("tiny", "v3")
    assert split_pin("tiny:sql@v2") == ("tiny:sql", "v2")
    assert split_pin("tiny") == ("tiny", None) and split_pin("tiny@") == ("tiny@", None) and split_pin("@v1") == ("@v1", None)
    assert pinned_version("tiny@v3", ["v2", "v3"]) == ("tiny", "v3")
    assert pinned_version("tiny", ["v2", "v3"]) == ("tiny", None)
    with pytest.raises(APIError) as err:
        pinned_version("tiny@v1", ["v3", "v2"])
    assert err.value.status == 404 and err.value.code == "model_not_found" and err.value.param == "model"
    assert "version v1 is not served; served versions: v2, v3" in err.value.message


def test_the_recorder_counts_requests_errors_and_p95_per_version():
    rec = VersionRecorder(window=100)
    for _ in range(UNTIMED_FIRST):  # a cold engine's first answers: counted, not timed
        rec.record("v2", 200, 9.0)
    for i in range(1, 101):
        rec.record("v2", 200, i / 1000)  # 1..100 ms
    for i in range(UNTIMED_FIRST + 10):
        rec.record("v3", 400 if i < 3 else 200, 0.5)
    summary = rec.summary()
    assert summary["v2"] == {"requests": 105, "errors": 0, "error_rate": 0.0, "p95_s": 0.095}
    assert summary["v3"] == {"requests": 15, "errors": 3, "error_rate": 0.2, "p95_s": 0.5}
    for _ in range(100):  # the window keeps the latest latencies; the counts keep everything
        rec.record("v2", 503, 2.0)
    assert rec.summary()["v2"] == {"requests": 205, "errors": 100, "error_rate": 100 / 205, "p95_s": 2.0}


def test_a_cold_candidate_is_not_rolled_back_on_its_first_answers():
    """What happened: a healthy candidate's first answers came from a just-started engine (62 ms
    p95 over 19 requests against the warm live version's 33 ms) and serve.canary.auto rolled it
    back. Its first UNTIMED_FIRST requests are counted but not timed."""
    rec = VersionRecorder()
    for _ in range(200):
        rec.record("v2", 200, 0.033)
    for i in range(20):
        rec.record("v3", 200, 0.062 if i < UNTIMED_FIRST else 0.034)
    summary = rec.summary()
    assert summary["v3"]["requests"] == 20 and summary["v3"]["p95_s"] == 0.034
    assert decide(summary["v2"], summary["v3"], CanaryConfig()).action == "wait"
    slow = VersionRecorder()  # slow after its warm-up too: still rolled back
    for i in range(20):
        slow.record("v3", 200, 0.062)
    assert decide(summary["v2"], slow.summary()["v3"], CanaryConfig()).action == "rollback"


def stats(requests: int, error_rate: float = 0.0, p95_s: float = 0.1) -> dict:
    return {"requests": requests, "errors": round(requests * error_rate), "error_rate": error_rate, "p95_s": p95_s}


@pytest.mark.parametrize("live, candidate, action, words", [
    (stats(500), stats(10, 1.0), "wait", "10 of the 20"),                  # too few to judge, even all failing
    (stats(500), stats(20, 1.0), "rollback", "error rate 100.0%"),         # a candidate failing every request
    (stats(500, 0.01), stats(100, 0.02), "wait", "no worse so far"),       # within the 2-point margin
    (stats(500, 0.01), stats(100, 0.04), "rollback", "vs live 1.0%"),
    (stats(500, p95_s=0.2), stats(100, p95_s=0.29), "wait", "no worse"),    # within 1.5x
    (stats(500, p95_s=0.2), stats(100, p95_s=0.31), "rollback", "p95 310 ms vs live 200 ms"),
    (stats(5, p95_s=0.2), stats(100, p95_s=0.9), "wait", "no worse"),       # too few live requests to time
    (stats(500), stats(200), "finish", "within 1.5x"),
    (stats(5), stats(200), "finish", "p95 not compared"),
    (stats(0), stats(200, 0.02), "finish", "live 0.0%"),
])
def test_the_decision_rolls_back_when_worse_by_the_margin_and_finishes_after_n(live, candidate, action, words):
    decision = decide(live, candidate, CanaryConfig())
    assert isinstance(decision, Decision) and decision.action == action, decision
    assert words in decision.reason


def test_a_policy_that_could_never_judge_is_refused():
    with pytest.raises(ValueError, match="min_requests"):
        CanaryConfig(min_requests=300, finish_after_requests=200)
    with pytest.raises(ValueError, match="p95_ratio"):
        CanaryConfig(p95_ratio=0.5)
    assert decide(stats(100), stats(5), CanaryConfig(min_requests=5, finish_after_requests=5)).action == "finish"


def test_a_pinned_body_is_unpinned_and_others_pass_untouched():
    raw = json.dumps({"model": "tiny@v3", "prompt": "x", "max_tokens": 2}).encode()
    body, pin = unpin(raw, ["v2", "v3"])
    assert pin == "v3" and json.loads(body) == {"model": "tiny", "prompt": "x", "max_tokens": 2}
    plain = json.dumps({"model": "tiny", "prompt": "mail me at a@b.c"}).encode()
    assert unpin(plain, ["v2"]) == (plain, None)  # an @ in the text is no pin
    assert unpin(b"{not json @", ["v2"]) == (b"{not json @", None)  # the gate's checks report it
    with pytest.raises(APIError) as err:
        unpin(json.dumps({"model": "tiny@v1", "prompt": "x"}).encode(), ["v2", "v3"])
    assert err.value.status == 404 and "served versions: v2, v3" in err.value.message


class Handle:
    def __init__(self, name: str):
        self.name = name


def test_routes_follow_the_edge_config_pins_and_split_and_count_only_during_a_canary():
    routes = Routes(Handle("live"), Handle)
    routes.configure({"live_version": "v2", "canary": None})
    assert routes.served() == ["v2"]
    assert routes.pick(None, "k", lambda: "c")[1] == "v2" and routes.pick("v2", "k", lambda: "c")[1] == "v2"
    routes.record("v2", 200, 0.1)
    assert routes.recorder.summary() == {}, "nothing is counted without a canary"

    canary = {"id": "c1", "version": "v3", "percent": 30.0, "deployment": "LLMServerCanary", "stats_uri": "/x"}
    routes.configure({"live_version": "v2", "canary": canary})
    assert routes.served() == ["v2", "v3"] and routes.candidate.name == "LLMServerCanary"
    picks = [routes.pick(None, "k", lambda i=i: f"conversation {i}") for i in range(400)]
    share = sum(v == "v3" for _, v in picks) / 4
    assert abs(share - 30) <= 5, share
    assert all(h.name == ("LLMServerCanary" if v == "v3" else "live") for h, v in picks)
    assert {routes.pick("v3", "k", lambda: "conversation 0")[1], routes.pick("v2", "k", lambda: "x")[1]} == {"v2", "v3"}
    routes.record("v3", 400, 0.2)
    routes.configure({"live_version": "v2", "canary": canary})  # the same canary again: its counts stay
    assert routes.recorder.summary()["v3"]["errors"] == 1
    routes.configure({"live_version": "v3", "canary": None})  # finished
    assert routes.served() == ["v3"] and routes.candidate is None
    assert routes.pick(None, "k", lambda: "conversation 1")[1] == "v3"


def test_numbers_merge_over_edge_replicas():
    a, b = VersionRecorder(), VersionRecorder()
    for i in range(50):
        a.record("v2", 200, 0.01)
        b.record("v2", 500 if i < 5 else 200, 1.0)
    b.record("v3", 200, 0.5)
    merged = merged_summary([a.to_json(), json.loads(json.dumps(b.to_json()))])
    assert merged["v2"] == {"requests": 100, "errors": 5, "error_rate": 0.05, "p95_s": 1.0}
    assert merged["v3"]["requests"] == 1


def test_the_running_canary_is_the_last_one_no_promote_or_abort_names():
    started = {"action": "canary", "state": "done", "id": "c1", "version": "v3"}
    assert running_canary([{"action": "deploy", "state": "done"}, started]) == started
    assert running_canary([started, {"action": "promote", "state": "done", "canary": "c1"}]) is None
    assert running_canary([started, {"action": "canary_abort", "state": "done", "canary": "c1"}]) is None
    assert running_canary([{**started, "state": "failed"}]) is None
    assert running_canary([{**started, "state": "intent"}]) is None
