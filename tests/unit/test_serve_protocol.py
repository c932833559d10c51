"""Serve pieces that need no Ray: request validation, response shapes (checked against the
`openai` client's own types), API keys, checkpoint resolution, the engine's stop/stream logic
and health probe, the app builder and the Serve config file."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import openai.types as oai
import openai.types.chat as oai_chat
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from raylm.config import InputError, ServeConfig, load_config
from raylm.serve import protocol as p
from raylm.serve.auth import ApiKeyError, KeyChecker, hash_key, load_api_keys, setup_keys

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    from raylm.serve.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny"))


@pytest.fixture(scope="module")
def engine(checkpoint):
    from raylm.serve.engine import load_engine

    return load_engine(checkpoint, num_gpus=0, num_threads=1)


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
    ({"model": "m", "prompt": "x", "n": 2}, "n"),
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


def test_stop_lists_are_bounded_and_non_empty():
    with pytest.raises(p.APIError, match="at most"):
        p.parse_request(p.CompletionRequest, b'{"model": "m", "prompt": "x", "stop": ["a","b","c","d","e"]}').stop_list()
    with pytest.raises(p.APIError) as err:
        p.parse_request(p.CompletionRequest, b'{"model": "m", "prompt": "x", "stop": ""}').stop_list()
    assert err.value.param == "stop"


def limits(req, prompt_tokens, **kw):
    args = dict(model_id="m", context_len=100, max_tokens_limit=50, default_max_tokens=16, prompt_param="prompt")
    return p.check_limits(req, prompt_tokens, **{**args, **kw})


def test_limits_need_the_served_model():
    def req(**kw):
        return p.CompletionRequest(model="m", prompt="x", **kw)

    assert limits(req(), 10) == 16
    assert limits(req(), 95) == 5  # the default shrinks to what the context leaves
    assert limits(req(max_tokens=50), 50) == 50
    for kwargs, tokens, param, status in [({"max_tokens": 51}, 1, "max_tokens", 400),
                                          ({"max_tokens": 50}, 51, "prompt", 400),
                                          ({"model": "other"}, 1, "model", 404)]:
        with pytest.raises(p.APIError) as err:
            limits(req(**{k: v for k, v in kwargs.items() if k != "model"}), tokens,
                   **({"model_id": "served"} if "model" in kwargs else {}))
        assert (err.value.param, err.value.status) == (param, status)


# ------------------------------------------------------------------ response shapes


def test_responses_parse_as_the_openai_clients_types():
    c = oai.Completion.model_validate(p.completion_response("cmpl-1", "m", [("hi", "length")], 3, 2))
    assert c.usage.total_tokens == 5 and c.choices[0].finish_reason == "length"
    chat = oai_chat.ChatCompletion.model_validate(p.chat_response("c-1", "m", "yo", "stop", 4, 1))
    assert chat.choices[0].message.content == "yo"
    chunk = oai_chat.ChatCompletionChunk.model_validate(p.chat_chunk("c-1", "m", 1, {"content": "a"}, None))
    assert chunk.choices[0].delta.content == "a"
    oai.Completion.model_validate(p.completion_chunk("c", "m", 1, "t", "stop"))
    usage = oai_chat.ChatCompletionChunk.model_validate(p.usage_chunk("c", "m", 1, "chat.completion.chunk", 2, 3))
    assert usage.usage.completion_tokens == 3 and usage.choices == []
    assert oai.Model.model_validate(p.models_response("m", 1)["data"][0]).id == "m"


def test_sse_framing():
    assert p.sse({"a": 1}) == 'data: {"a":1}\n\n' and p.SSE_DONE == "data: [DONE]\n\n"


def test_chat_fallback_renders_roles():
    assert p.render_chat_fallback([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]) == \
        "system: s\nuser: u\nassistant:"


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
    from raylm.serve.app import resolve_checkpoint

    assert resolve_checkpoint(checkpoint) == str(Path(checkpoint).resolve())
    best = Path(checkpoint).parent / "best.json"
    best.write_text(json.dumps({"checkpoint": Path(checkpoint).name, "val_loss": 1.0}))  # relative to the file
    assert resolve_checkpoint(str(best)) == str(Path(checkpoint).resolve())


def test_resolve_checkpoint_errors_name_the_path(tmp_path, checkpoint):
    from raylm.serve.app import CheckpointError, resolve_checkpoint

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
             str(tmp_path / "gone.json"): "gone", str(noweights): "noweights", "s3://bucket/ckpt": "s3://bucket"}
    for path, named in cases.items():
        with pytest.raises(CheckpointError, match=named.replace(".", r"\.")) as err:
            resolve_checkpoint(path)
        assert isinstance(err.value, InputError)


# ------------------------------------------------------------------ engine


def test_stop_holdback_and_find_stop():
    from raylm.serve.engine import find_stop, stop_holdback

    assert stop_holdback("hello wor", ("world",)) == 3
    assert stop_holdback("hello", ("xyz",)) == 0
    assert stop_holdback("ab", ("abc", "b!")) == 2
    assert find_stop("one two three", ("three", "two")) == 4 and find_stop("abc", ("z",)) == -1


def test_top_p_keeps_only_the_nucleus():
    import torch

    from raylm.serve.engine import row_generator, sample_token

    logits = torch.log(torch.tensor([0.6, 0.3, 0.05, 0.05]))
    picks = {sample_token(logits, 1.0, 0.5, row_generator(s)) for s in range(50)}
    assert picks == {0}
    picks = {sample_token(logits, 1.0, 0.85, row_generator(s)) for s in range(200)}
    assert picks == {0, 1}
    assert sample_token(logits, 0.0, 1.0, row_generator(0)) == 0


def run_batch(engine, reqs):
    from raylm.serve.engine import RowEvent

    async def go():
        outs = [[] for _ in reqs]
        async for events in engine.generate_batch(reqs):
            for i, ev in enumerate(events):
                if isinstance(ev, RowEvent):
                    outs[i].append(ev)
        return outs

    return asyncio.run(go())


def test_batched_rows_match_single_rows_and_stop_early(engine):
    from raylm.serve.engine import GenRequest

    prompts = [engine.encode(t) for t in ("short", "a considerably longer prompt than the first one")]
    reqs = [GenRequest(tuple(ids), max_tokens=m, temperature=0) for ids, m in zip(prompts, (3, 9))]
    before = engine.stats.forward_passes
    together = run_batch(engine, reqs)
    assert engine.stats.forward_passes - before == 9  # one prefill + 8 decode steps for both rows
    alone = [run_batch(engine, [r])[0] for r in reqs]
    for batched, single, req in zip(together, alone, reqs):
        assert "".join(e.text for e in batched) == "".join(e.text for e in single)
        assert batched[-1].completion_tokens == req.max_tokens and batched[-1].finish_reason == "length"


@settings(max_examples=40, deadline=None)
@given(tokens=st.lists(st.integers(min_value=2, max_value=383), min_size=1, max_size=24),
       stops=st.lists(st.text(alphabet="abcde \n", min_size=1, max_size=3), max_size=2))
def test_streamed_deltas_reassemble_the_final_text(engine, tokens, stops):
    """Whatever the tokens and stop strings: the deltas add up to the decoded text cut at the
    first stop string, and no delta ever contains a stop string."""
    from raylm.serve.engine import GenRequest, _Row, row_generator

    row = _Row(GenRequest((0,), max_tokens=len(tokens), stop=tuple(stops)), row_generator(0))
    deltas = []
    for tok in tokens:
        ev = engine._row_event(row, tok)
        deltas.append(ev.text)
        if ev.finish_reason:
            break
    full = engine.decode(row.ids)
    cut = min([i for i in (full.find(s) for s in stops) if i >= 0], default=len(full))
    assert "".join(deltas) == full[:cut]
    assert ev.finish_reason == ("stop" if cut < len(full) else "length")


def test_health_probe_fails_on_a_broken_model(checkpoint):
    import torch

    from raylm.serve.engine import ModelFault, load_engine

    eng = load_engine(checkpoint, num_gpus=0, num_threads=1)
    asyncio.run(eng.check(timeout_s=10))  # healthy
    with torch.no_grad():
        next(eng.model.parameters()).fill_(float("nan"))
    with pytest.raises(ModelFault):
        asyncio.run(eng.check(timeout_s=10))
    assert eng.fatal_error
    with pytest.raises(ModelFault):  # remembered: Serve keeps seeing it until it replaces the replica
        asyncio.run(eng.check(timeout_s=10))


# ------------------------------------------------------------------ app building


def test_deployment_options_follow_the_config():
    from raylm.k8s import serve_autoscaling
    from raylm.serve.app import deployment_options

    cfg = load_config(REPO / "configs" / "small.yaml", ["serve.max_queued_requests=5", "serve.retry_after_s=3"])
    opts = deployment_options(cfg.serve)
    assert opts["autoscaling_config"] == serve_autoscaling(cfg.serve)
    assert opts["ray_actor_options"] == {"num_cpus": cfg.serve.num_cpus_per_replica, "num_gpus": 1}
    assert (opts["max_queued_requests"], opts["backpressure_config"]["retry_after_s"]) == (5, 3)


def test_app_builder_builds_the_deployment_the_serve_configs_name(checkpoint, tmp_path, monkeypatch):
    from deployments.openai_app import app_builder
    from raylm.k8s import SERVE_MODEL_DEPLOYMENT

    monkeypatch.setenv("RAYLM_API_KEYS", "k-builder")
    app = app_builder({"config": str(REPO / "configs" / "tiny.yaml"), "checkpoint": checkpoint,
                       "set": ["serve.max_batch_size=3"]})
    dep = app._bound_deployment
    assert dep.name == SERVE_MODEL_DEPLOYMENT
    serve_cfg, ckpt, hashes = dep.init_args
    assert serve_cfg["max_batch_size"] == 3 and ckpt == str(Path(checkpoint).resolve())
    assert hashes == [hash_key("k-builder")] and "k-builder" not in json.dumps(dep.init_args)
    with pytest.raises(InputError, match="confg: Extra inputs are not permitted"):
        app_builder({"checkpoint": checkpoint, "confg": "typo.yaml"})


def test_serve_tiny_yaml_is_a_valid_serve_config_matching_configs_tiny():
    from ray.serve.schema import ServeDeploySchema

    from raylm.serve.app import deployment_options

    raw = yaml.safe_load((REPO / "deployments" / "serve_tiny.yaml").read_text())
    ServeDeploySchema.model_validate(raw)
    (app,) = raw["applications"]
    assert app["import_path"] == "deployments.openai_app:app_builder"
    cfg = load_config(REPO / app["args"]["config"])
    (dep,) = app["deployments"]
    expected = deployment_options(cfg.serve)
    for key in ("autoscaling_config", "max_ongoing_requests", "max_queued_requests", "ray_actor_options"):
        assert dep[key] == expected[key], key
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
    assert "replicas directly" not in text and "direct_ingress" not in text
    direct_cfg = RaylmConfig.model_validate({"serve": {"direct_ingress": True}})
    direct_text = banner("http://h:1", setup, direct_cfg, ("http://h:30000", "http://h:30001"))
    assert "replicas directly (no proxy hop): http://h:30000/v1, http://h:30001/v1" in direct_text
    assert "not started with RAY_SERVE_ENABLE_DIRECT_INGRESS=1" in banner("http://h:1", setup, direct_cfg)


def test_unexpected_errors_become_openai_500s():
    from raylm.serve.app import _server_error

    resp = asyncio.run(_server_error(None, RuntimeError("boom")))
    body = json.loads(resp.body)
    assert resp.status_code == 500 and body["error"]["type"] == "server_error" and "boom" not in resp.body.decode()
