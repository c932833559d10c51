"""The edge when the LLM replica behind a stream stops mid-generation (a rollout past its drain,
a scale-down, a dead replica): the client gets an SSE error event, never a silent cut, and a
request that had not started yet gets a 503. The handle is a stand-in (no Ray): what is tested is
the edge's own forwarding of ASGI messages."""

from __future__ import annotations

import asyncio
import json

import pytest

from raylm.serve.canary import Routes
from raylm.serve.edge import Forward

SSE = [(b"content-type", b"text/event-stream; charset=utf-8")]


class Responses:
    """What `handle.serve_http.remote(call)` returns: batches of ASGI messages, then a failure."""

    def __init__(self, batches: list[list[dict]], fail: BaseException | None):
        self.batches, self.fail, self.cancelled = batches, fail, False

    def __aiter__(self):
        return self._run()

    async def _run(self):
        for batch in self.batches:
            yield batch
        if self.fail is not None:
            raise self.fail

    def cancel(self) -> None:
        self.cancelled = True


class Handle:
    def __init__(self, responses: Responses):
        self.responses = responses
        self.serve_http = self

    def options(self, **_):
        return self

    def remote(self, call):
        return self.responses


async def no_adapters():
    return ()


def forward(batches: list[list[dict]], fail: BaseException | None = RuntimeError("ActorDiedError: replica stopped"),
            ) -> list[dict]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": json.dumps({"model": "m", "prompt": "hi", "stream": True}).encode(),
                "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "path": "/v1/completions", "headers": []}
    live = Handle(Responses(batches, fail))
    app = Forward(Routes(live, lambda name: live), no_adapters, 2.0)
    asyncio.run(app(scope, receive, send))
    return sent


def test_a_stream_cut_mid_generation_ends_with_an_error_event():
    sent = forward([[{"type": "http.response.start", "status": 200, "headers": SSE}],
                    [{"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True}]])
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body", "http.response.body"]
    last = sent[-1]
    assert last["more_body"] is False and last["body"].startswith(b"data: ") and last["body"].endswith(b"\n\n")
    error = json.loads(last["body"][len(b"data: "):])["error"]
    assert error["code"] == "stream_interrupted" and "rollout" in error["message"]


def test_a_request_whose_replica_fails_before_answering_gets_a_503():
    sent = forward([])
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 503
    assert json.loads(sent[1]["body"])["error"]["code"] == "unavailable"


@pytest.mark.parametrize("headers", [[(b"content-type", b"application/json")], []])
def test_a_non_stream_response_cut_after_its_start_gets_no_sse_event(headers):
    sent = forward([[{"type": "http.response.start", "status": 200, "headers": headers}]])
    assert [m["type"] for m in sent] == ["http.response.start"]  # the server closes the connection


START = [{"type": "http.response.start", "status": 200, "headers": SSE}]
CHUNK = {"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True}


def test_a_replica_call_that_ends_cleanly_mid_stream_still_ends_with_the_error_event():
    """The replica's generator closed without an error (its call cancelled at shutdown) before the
    app sent the stream's last body: the stream is incomplete, so the client gets the event."""
    sent = forward([START, [CHUNK]], fail=None)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body", "http.response.body"]
    error = json.loads(sent[-1]["body"][len(b"data: "):])["error"]
    assert sent[-1]["more_body"] is False and error["code"] == "stream_interrupted" and "rollout" in error["message"]


@pytest.mark.parametrize("fail", [None, RuntimeError("replica gone after the last byte")])
def test_a_complete_stream_gets_nothing_after_its_end(fail):
    end = {"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False}
    sent = forward([START, [CHUNK, end]], fail=fail)
    assert sent[-1] is end and len(sent) == 3
