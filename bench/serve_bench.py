"""Serving on vLLM: raylm's endpoint (Ray Serve LLM + raylm's gate, one replica) against vLLM's
engine used bare in one process and against plain transformers `generate`, same model, one run.

Model: the `small-llama` preset (hidden 768, 12 layers, 12 heads: 85M parameters with raylm's
2048-token BPE trained on tinyshakespeare), random weights, saved as a Hugging Face checkpoint.
Engine settings are raylm's defaults (bf16, prefix caching, max_num_seqs 64, 1 GiB KV cache,
max_model_len 512) for both raylm and bare vLLM (`AsyncLLM` built from the same engine
arguments, `raylm.serve.options.engine_kwargs`). The three run one after the other (bare vLLM,
transformers, vLLM's own OpenAI server, raylm), each alone on the machine. raylm is measured by each way in (`raylm_http`), from an aiohttp client on the same machine.

- TTFT: time from sending a streamed request to its first generated token, concurrency 1.
  Everything else is sent unstreamed (the whole completion in one response).
- Head of line: latency of a 1-token request sent while a 120-token generation is running,
  divided by the same request's latency alone (medians of several rounds).
- Throughput: 32 concurrent requests of 32 generated tokens each (EOS ignored), generated
  tokens / wall time; transformers runs them as one static batch of 32 (`generate`, bf16).
- Engine start: bare = `AsyncLLM` construction; raylm = `deploy` until the endpoint answers.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_tokenizer, stage_main  # noqa: E402
from report import ratio  # noqa: E402

PORT = 8311
KEY = "sk-bench-local"
PROMPT = "First Citizen: Before we proceed any further, hear me speak."
CONCURRENCY, TOKENS, LONG_TOKENS = 32, 32, 120
SERVE_SETTINGS = ["serve.max_model_len=512", f"serve.max_tokens_limit={LONG_TOKENS + 8}"]


def make_checkpoint(workdir: str) -> str:
    """small-llama (85M) with random weights and raylm's BPE, as a Hugging Face directory."""
    import torch

    from raylm.config import ModelConfig
    from raylm.data import load_tokenizer
    from raylm.model import build_model, count_params

    out = os.path.join(workdir, "small-llama")
    if not os.path.isfile(os.path.join(out, "config.json")):
        tok = load_tokenizer(bench_tokenizer(os.path.join(workdir, "tok")))
        torch.manual_seed(0)
        model = build_model(ModelConfig(name="small-llama"), len(tok), 512, tok)
        print(f"small-llama: {count_params(model) / 1e6:.1f}M parameters", flush=True)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return out


def serve_config(extra: list[str] = ()):
    from raylm.config import load_config

    return load_config(None, SERVE_SETTINGS + list(extra))


# ------------------------------------------------------------------ bare vLLM in this process


async def _bare(ckpt: str, rounds: int) -> dict:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from raylm.serve.options import engine_kwargs

    t0 = time.perf_counter()
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=ckpt, **engine_kwargs(serve_config().serve)))
    start_s = time.perf_counter() - t0

    async def gen(max_tokens: int, stamp_first: bool = False) -> tuple[float, float, int]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        t = time.perf_counter()
        first, tokens = None, 0
        async for out in engine.generate(PROMPT, params, request_id=uuid.uuid4().hex):
            first = first or time.perf_counter() - t
            tokens = len(out.outputs[0].token_ids)
        return first, time.perf_counter() - t, tokens

    try:
        for _ in range(3):
            await gen(4)  # warm-up
        ttft = [(await gen(16))[0] for _ in range(rounds * 4)]
        alone = [(await gen(1))[1] for _ in range(rounds)]
        behind = []
        for _ in range(rounds):
            long = asyncio.create_task(gen(LONG_TOKENS))
            await asyncio.sleep(0.2)  # the long generation is decoding
            behind.append((await gen(1))[1])
            await long
        t = time.perf_counter()
        outs = await asyncio.gather(*(gen(TOKENS) for _ in range(CONCURRENCY)))
        wall = time.perf_counter() - t
    finally:
        engine.shutdown()
    return {"start_s": start_s, "ttft_ms": 1000 * statistics.median(ttft),
            "one_token_alone_ms": 1000 * statistics.median(alone), "one_token_behind_ms": 1000 * statistics.median(behind),
            "c32_tokens_per_s": sum(o[2] for o in outs) / wall}


# ------------------------------------------------------------------ plain transformers generate


def transformers_static(ckpt: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    batch = tok([PROMPT] * CONCURRENCY, return_tensors="pt")
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
        t = time.perf_counter()
        out = model.generate(**batch, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        wall = time.perf_counter() - t
    generated = (out.shape[1] - batch["input_ids"].shape[1]) * CONCURRENCY
    return {"c32_tokens_per_s": generated / wall}


# ------------------------------------------------------------------ raylm over HTTP


async def _http(url: str, rounds: int) -> dict:
    """The same measurements as `_bare`, over HTTP (aiohttp: the load generator shares the cores).
    Only TTFT streams; the other requests return whole, as a batch client would ask."""
    import json

    import aiohttp

    headers = {"Authorization": f"Bearer {KEY}"}

    async def gen(session, max_tokens: int, stream: bool = False) -> tuple[float, float, int]:
        body = {"model": "raylm", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": stream}
        t = time.perf_counter()
        async with session.post(f"{url}/v1/completions", json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            if not stream:
                return 0.0, time.perf_counter() - t, (await resp.json())["usage"]["completion_tokens"]
            first = None
            async for line in resp.content:
                if first is None and line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    first = time.perf_counter() - t
        return first or 0.0, time.perf_counter() - t, max_tokens

    connector = aiohttp.TCPConnector(limit=CONCURRENCY * 2)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        for _ in range(3):
            await gen(session, 4)
        ttft = [(await gen(session, 16, stream=True))[0] for _ in range(rounds * 4)]
        alone = [(await gen(session, 1))[1] for _ in range(rounds)]
        behind = []
        for _ in range(rounds):
            long = asyncio.create_task(gen(session, LONG_TOKENS))
            await asyncio.sleep(0.2)
            behind.append((await gen(session, 1))[1])
            await long
        t = time.perf_counter()
        outs = await asyncio.gather(*(gen(session, TOKENS) for _ in range(CONCURRENCY)))
        wall = time.perf_counter() - t
    return {"ttft_ms": 1000 * statistics.median(ttft), "one_token_alone_ms": 1000 * statistics.median(alone),
            "one_token_behind_ms": 1000 * statistics.median(behind),
            "c32_tokens_per_s": sum(o[2] for o in outs) / wall}


def vllm_server_http(ckpt: str, rounds: int) -> dict:
    """vLLM's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`), same engine
    arguments, no Ray: what the HTTP + OpenAI layer costs before raylm and Ray add anything."""
    import subprocess
    import urllib.request

    from raylm.serve.options import engine_kwargs

    args = []
    for key, value in engine_kwargs(serve_config().serve).items():
        flag = "--" + key.replace("_", "-")
        args += ([flag] if value is True else [f"--no-{flag[2:]}"] if value is False else [flag, str(value)])
    port = PORT + 1
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", ckpt,
                             "--served-model-name", "raylm", "--host", "127.0.0.1", "--port", str(port),
                             "--disable-uvicorn-access-log", *args], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - t0 > 300:
                    raise RuntimeError("vLLM's api_server did not start")
                time.sleep(1)
        out = {"start_s": time.perf_counter() - t0, **asyncio.run(_http(f"http://127.0.0.1:{port}", rounds))}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return out


WAYS = ("HAProxy", "Python proxy", "own port")  # the first is raylm's default path (serve.ingress=haproxy)


def raylm_http(ckpt: str, workdir: str, rounds: int) -> dict:
    """raylm's endpoint (the edge in front of one LLM replica) by each way in: Ray Serve's HAProxy
    ingress on serve.port (the default), Serve's Python proxy (HAProxy's fallback, on its own
    port: the default path before issue 23) and the edge replica's own port."""
    from ray import serve

    from common import start_ray
    from raylm.serve.app import deploy, direct_urls

    key_file = os.path.join(workdir, "keys")
    Path(key_file).write_text(KEY + "\n")
    start_ray(num_cpus=4)
    cfg = serve_config([f"serve.port={PORT}", f"serve.api_key_file={key_file}",
                        "serve.api_key_env=RAYLM_BENCH_NO_SUCH_VAR", "serve.autoscaling.min_replicas=1",
                        "serve.autoscaling.max_replicas=1"])
    t0 = time.perf_counter()
    url = deploy(cfg, ckpt)[0]
    start_s = time.perf_counter() - t0
    (own,) = direct_urls(cfg.serve)
    python_proxy = url.replace(f":{PORT}", f":{os.environ['RAY_SERVE_FALLBACK_PROXY_HTTP_PORT']}")
    out = {"start_s": start_s}
    for name, u in zip(WAYS, (url, python_proxy, own)):
        out[name] = asyncio.run(_http(u, rounds))
        print(name, out[name], flush=True)
    serve.shutdown()
    import ray

    ray.shutdown()
    return out


# ------------------------------------------------------------------ the stage


# RAYLM_BENCH_SERVE_MODEL=tiny: raylm's tiny test model instead, where the engine's time no longer
# hides the request path's (on a CPU without AVX-512 the 85M model in bf16 is engine-bound).
MODEL = os.environ.get("RAYLM_BENCH_SERVE_MODEL", "small-llama")


def run(args) -> dict:
    rounds = 3 if args.quick else 7
    if MODEL == "tiny":
        from raylm.serve.tiny import make_tiny_checkpoint

        ckpt = make_tiny_checkpoint(os.path.join(args.workdir, "tiny"))
    else:
        ckpt = make_checkpoint(args.workdir)
    bare = asyncio.run(_bare(ckpt, rounds))
    print("bare vLLM:", bare, flush=True)
    hf = transformers_static(ckpt)
    print("transformers:", hf, flush=True)
    api = vllm_server_http(ckpt, rounds)
    print("vLLM api_server:", api, flush=True)
    ray_ = raylm_http(ckpt, args.workdir, rounds)

    def hol(r: dict) -> float:
        return r["one_token_behind_ms"] / r["one_token_alone_ms"]

    rows = [["bare vLLM AsyncLLM (in process)", bare["ttft_ms"], bare["one_token_alone_ms"], bare["one_token_behind_ms"],
             hol(bare), bare["c32_tokens_per_s"], 1.0]]
    for name, r in [("vLLM's OpenAI api_server (HTTP, no Ray)", api),
                    *((f"raylm, {way}", ray_[way]) for way in WAYS)]:
        rows.append([name, r["ttft_ms"], r["one_token_alone_ms"], r["one_token_behind_ms"], hol(r),
                     r["c32_tokens_per_s"], ratio(r["c32_tokens_per_s"], bare["c32_tokens_per_s"])])
    rows.append(["transformers generate, static batch of 32", None, None, None, None, hf["c32_tokens_per_s"],
                 ratio(hf["c32_tokens_per_s"], bare["c32_tokens_per_s"])])
    default = ray_[WAYS[0]]
    goals = [
        {"goal": "head of line: a 1-token request behind a 120-token generation <= 2x its latency alone (raylm)",
         "value": ", ".join(f"{hol(ray_[w]):.2f}x ({w})" for w in WAYS),
         "met": hol(default) <= 2.0},
        {"goal": "throughput at c=32 x 32 tokens >= 0.9x bare vLLM, on the default path (HAProxy ingress)",
         "value": f"{ratio(default['c32_tokens_per_s'], bare['c32_tokens_per_s']):.2f}x ("
                  + ", ".join(f"{w} {ratio(ray_[w]['c32_tokens_per_s'], bare['c32_tokens_per_s']):.2f}x"
                              for w in WAYS[1:]) + ")",
         "met": ratio(default["c32_tokens_per_s"], bare["c32_tokens_per_s"]) >= 0.9},
        {"goal": "throughput at c=32 >= 5x transformers generate (static batch of 32)",
         "value": f"{ratio(default['c32_tokens_per_s'], hf['c32_tokens_per_s']):.2f}x",
         "met": ratio(default["c32_tokens_per_s"], hf["c32_tokens_per_s"]) >= 5.0},
        {"goal": "TTFT at c=1 <= 1.3x bare vLLM, on the default path (HAProxy ingress)",
         "value": f"{ratio(default['ttft_ms'], bare['ttft_ms']):.2f}x ({default['ttft_ms']:.1f} vs "
                  f"{bare['ttft_ms']:.1f} ms; " + ", ".join(f"{w} {ray_[w]['ttft_ms']:.1f} ms" for w in WAYS[1:]) + ")",
         "met": ratio(default["ttft_ms"], bare["ttft_ms"]) <= 1.3},
    ]
    return {
        "title": "3. Serving on vLLM: raylm vs bare vLLM vs transformers",
        "note": __doc__.split("\n\n", 1)[1].strip(),
        "tables": [
            {"name": f"{'tiny-llama' if MODEL == 'tiny' else 'small-llama (85M)'}, bf16; {CONCURRENCY} x {TOKENS}-token "
                     "requests for throughput",
             "columns": ["path", "TTFT c=1 ms", "1-token alone ms", "1-token behind 120-token ms", "head of line",
                         "c=32 tokens/s", "vs bare vLLM"],
             "rows": rows},
            {"name": "engine start (s)", "columns": ["what", "seconds"],
             "rows": [["bare AsyncLLM", bare["start_s"]], ["vLLM api_server (process start to /health)", api["start_s"]],
                      ["raylm deploy (replica + engine + app)", ray_["start_s"]]]},
        ],
        "goals": goals,
        "findings": [
            f"Where the time goes at c=1 (TTFT): bare AsyncLLM {bare['ttft_ms']:.1f} ms; vLLM's own HTTP server "
            f"{api['ttft_ms']:.1f} ms (+{api['ttft_ms'] - bare['ttft_ms']:.1f} ms: HTTP, request parsing, "
            f"tokenization in its thread pool, SSE); raylm on the edge replica's own port "
            f"{ray_['own port']['ttft_ms']:.1f} ms (+{ray_['own port']['ttft_ms'] - api['ttft_ms']:.1f} ms over "
            f"vLLM's server: Serve's replica wrapper, raylm's gate and the handle call to the LLM replica), through "
            f"HAProxy {default['ttft_ms']:.1f} ms, through Serve's Python proxy {ray_['Python proxy']['ttft_ms']:.1f} ms.",
            f"Throughput at c=32: vLLM's own server reaches {ratio(api['c32_tokens_per_s'], bare['c32_tokens_per_s']):.2f}x "
            f"of bare AsyncLLM and raylm {ratio(default['c32_tokens_per_s'], api['c32_tokens_per_s']):.2f}x of vLLM's "
            f"server (HAProxy); the engine process is pinned to one core, and the HTTP servers, Ray's own processes "
            f"and the load generator share the other.",
        ],
        "raw": {"bare": bare, "transformers": hf, "vllm_api_server": api, "raylm": ray_},
    }


if __name__ == "__main__":
    stage_main(run)
