"""Serving: latency (p50, p99) and throughput through the HTTP endpoint at concurrency 1, 8, 32,
versus calling generate in-process; raylm with batching on and off; a bare Ray Serve + FastAPI
deployment of the same model beside it.

All apps run on one Ray cluster started with `serve.direct_ingress` on (Ray Serve's direct
ingress), so each is reached two ways side by side: through Serve's HTTP proxy (127.0.0.1:8311,
one route prefix each; the default way in) and straight at its replica's own port ("direct").
One replica each (autoscaling pinned), the same tiny checkpoint
(`raylm.serve.tiny.make_tiny_checkpoint`), greedy decoding, the same prompt. Apps:

- raylm: `raylm.serve.app.deploy` with the config defaults (max_batch_size 8, batch wait 10 ms).
- raylm, batch wait 0: the same app with `serve.batch_wait_timeout_s=0` (a config value).
- raylm, batching off: the same app with `serve.max_batch_size=1`.
- bare: a FastAPI ingress deployment that parses the JSON body, tokenizes, and runs the same
  engine (`Engine.generate_batch` with one request: the same model work, no auth, no request
  validation, no serve.batch, no metrics). It isolates what Serve + FastAPI cost.
- in-process: `Engine.generate_batch([request])` called directly in this process.

Load generator: httpx.AsyncClient with N concurrent workers, each sending requests back to back,
bounded by a request count and a time limit, against 127.0.0.1 only. Latency = client-side time
from send to full response. "added" = HTTP p50 minus in-process p50 for the same request. The
1-token latencies of all paths are taken interleaved (5 rounds, every path in each) and pooled.
"""

# no `from __future__ import annotations`: FastAPI must see the real `Request` type (as in app.py)

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fastapi import FastAPI, Request  # noqa: E402
from ray import serve  # noqa: E402

from common import stage_main  # noqa: E402
from report import percentile, ratio  # noqa: E402

PORT = 8311
KEY = "sk-bench-local"
PROMPT = "The meaning of"
LATENCY_ROUNDS = 5  # the 1-token latency paths are measured interleaved, in this many rounds
TOKENS = 16  # max_tokens of the throughput requests (greedy; tiny random model rarely stops early)

bare_api = FastAPI()


@serve.deployment(name="BareServer", max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.5})
@serve.ingress(bare_api)
class BareServer:
    """What a user might write without raylm: FastAPI on Ray Serve around the same engine."""

    def __init__(self, checkpoint: str):
        from raylm.serve.engine import load_engine

        self.engine = load_engine(checkpoint, 0, 1)

    @bare_api.post("/v1/completions")
    async def completions(self, request: Request) -> dict:
        from raylm.serve.engine import GenRequest

        body = await request.json()
        gen = GenRequest(tuple(self.engine.encode(body["prompt"])), int(body.get("max_tokens", 16)), 0.0)
        parts, tokens = [], 0
        async for events in self.engine.generate_batch([gen]):
            ev = events[0]
            if ev is StopAsyncIteration:
                break
            parts.append(ev.text)
            tokens = ev.completion_tokens
        return {"choices": [{"text": "".join(parts)}], "usage": {"completion_tokens": tokens}}


# ------------------------------------------------------------------ load generator


async def _load(url: str, body: dict, concurrency: int, count: int, time_limit_s: float) -> dict:
    import httpx

    latencies: list[float] = []
    tokens, errors = 0, 0
    sent = 0
    deadline = time.perf_counter() + time_limit_s
    headers = {"Authorization": f"Bearer {KEY}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=60.0, trust_env=False) as client:
        async def worker() -> None:
            nonlocal sent, tokens, errors
            while sent < count and time.perf_counter() < deadline:
                sent += 1
                t0 = time.perf_counter()
                resp = await client.post(url, json=body, headers=headers)
                dt = time.perf_counter() - t0
                if resp.status_code == 200:
                    latencies.append(dt)
                    tokens += resp.json().get("usage", {}).get("completion_tokens", 0)
                else:
                    errors += 1

        t_start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t_start
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors, "wall_s": wall,
            "p50_ms": 1000 * percentile(latencies, 50), "p99_ms": 1000 * percentile(latencies, 99),
            "req_per_s": len(latencies) / wall, "tokens_per_s": tokens / wall, "latencies": latencies}


def load(url: str, body: dict, concurrency: int, count: int, time_limit_s: float) -> dict:
    return asyncio.run(_load(url, body, concurrency, count, time_limit_s))


def in_process(engine, max_tokens: int, n: int) -> dict:
    from raylm.serve.engine import GenRequest

    async def one() -> float:
        gen = GenRequest(tuple(engine.encode(PROMPT)), max_tokens, 0.0)
        t0 = time.perf_counter()
        async for _ in engine.generate_batch([gen]):
            pass
        return time.perf_counter() - t0

    async def many() -> list[float]:
        await one()
        return [await one() for _ in range(n)]

    lat = asyncio.run(many())
    return {"p50_ms": 1000 * percentile(lat, 50), "p99_ms": 1000 * percentile(lat, 99), "requests": n,
            "req_per_s": n / sum(lat), "tokens_per_s": n * max_tokens / sum(lat)}


# ------------------------------------------------------------------ the stage


def _one(urls: list[str], app: str) -> str:
    if len(urls) != 1:
        raise RuntimeError(f"app {app}: expected one direct-ingress replica URL, got {urls}")
    return urls[0]


def run(args) -> dict:
    import torch

    from common import start_ray
    from raylm.config import load_config
    from raylm.serve.app import deploy, direct_urls
    from raylm.serve.engine import load_engine
    from raylm.serve.tiny import make_tiny_checkpoint

    quick = args.quick
    n_lat, counts, limit_s = (60, {1: 30, 8: 80, 32: 160}, 12.0) if quick else (200, {1: 60, 8: 200, 32: 400}, 25.0)
    ckpt = make_tiny_checkpoint(os.path.join(args.workdir, "ckpt"))
    key_file = os.path.join(args.workdir, "keys")
    Path(key_file).write_text(KEY + "\n")

    # in-process reference, one thread like a replica
    torch.set_num_threads(1)
    engine = load_engine(ckpt, 0, 1)
    inproc = {1: in_process(engine, 1, n_lat), TOKENS: in_process(engine, TOKENS, max(20, n_lat // 4))}
    print("in-process:", inproc, flush=True)
    del engine

    start_ray(num_cpus=4, **{"serve.direct_ingress": "true"})
    common = [f"serve.port={PORT}", "serve.host=127.0.0.1", f"serve.api_key_file={key_file}", "serve.direct_ingress=true",
              "serve.api_key_env=RAYLM_BENCH_NO_SUCH_VAR", "serve.num_cpus_per_replica=0.5",
              "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=1",
              "serve.max_ongoing_requests=32", f"serve.max_tokens_limit={max(TOKENS, 16)}"]
    apps = {
        "raylm": [],
        "raylm, batch wait 0": ["serve.batch_wait_timeout_s=0"],
        "raylm, batching off": ["serve.max_batch_size=1"],
    }
    urls: dict[str, str] = {}
    for i, (name, extra) in enumerate(apps.items()):
        cfg = load_config(None, common + [f"serve.app_name=bench{i}", f"serve.route_prefix=/r{i}", *extra])
        urls[name] = deploy(cfg, ckpt) + "/v1/completions"
        urls[f"{name}, direct ingress"] = _one(direct_urls(cfg.serve), name) + "/v1/completions"
    serve.run(BareServer.bind(ckpt), name="bare", route_prefix="/bare")
    urls["bare Serve + FastAPI"] = f"http://127.0.0.1:{PORT}/bare/v1/completions"
    bare_cfg = load_config(None, common + ["serve.app_name=bare", "serve.route_prefix=/bare"])
    urls["bare Serve + FastAPI, direct ingress"] = _one(direct_urls(bare_cfg.serve), "bare") + "/v1/completions"

    def body(tokens: int) -> dict:
        return {"model": "raylm", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0}

    for url in urls.values():
        load(url, body(1), 4, 20, 10.0)  # warm-up: connections, code paths
    # 1-token latency: every path in turn, LATENCY_ROUNDS times, samples pooled, so drift of this
    # shared machine during the run lands on all paths alike
    one_token: dict[str, list[float]] = {name: [] for name in urls}
    for _ in range(LATENCY_ROUNDS):
        for name, url in urls.items():
            one_token[name] += load(url, body(1), 1, n_lat // LATENCY_ROUNDS, limit_s)["latencies"]
    results: dict[str, dict] = {}
    for name, url in urls.items():
        lat = one_token[name]
        r = {"one_token_c1": {"requests": len(lat), "p50_ms": 1000 * percentile(lat, 50),
                              "p99_ms": 1000 * percentile(lat, 99)}}
        for c in (1, 8, 32):
            r[f"c{c}"] = load(url, body(TOKENS), c, counts[c], limit_s)
            del r[f"c{c}"]["latencies"]
        results[name] = r
        print(name, r, flush=True)
    serve.shutdown()
    import ray

    ray.shutdown()

    bare1 = results["bare Serve + FastAPI"]["one_token_c1"]["p50_ms"]
    bare_direct1 = results["bare Serve + FastAPI, direct ingress"]["one_token_c1"]["p50_ms"]
    in1 = inproc[1]["p50_ms"]
    lat_rows = [["in-process Engine.generate_batch", inproc[1]["p50_ms"], inproc[1]["p99_ms"], 0.0, "-"]]
    for name, r in results.items():
        o = r["one_token_c1"]
        bare_same_path = bare_direct1 if "direct" in name else bare1
        lat_rows.append([name, o["p50_ms"], o["p99_ms"], o["p50_ms"] - in1, o["p50_ms"] - bare_same_path])
    rows = [[f"in-process ({TOKENS} tokens, one at a time)", 1, inproc[TOKENS]["requests"], 0,
             inproc[TOKENS]["p50_ms"], inproc[TOKENS]["p99_ms"], inproc[TOKENS]["req_per_s"],
             inproc[TOKENS]["tokens_per_s"]]]
    for name, r in results.items():
        for c in (1, 8, 32):
            x = r[f"c{c}"]
            rows.append([name, c, x["requests"], x["errors"], x["p50_ms"], x["p99_ms"], x["req_per_s"],
                         x["tokens_per_s"]])
    raylm_added = results["raylm"]["one_token_c1"]["p50_ms"] - bare1
    raylm_added_direct = results["raylm, direct ingress"]["one_token_c1"]["p50_ms"] - bare_direct1
    best_name = min((n for n in results if n.startswith("raylm")), key=lambda n: results[n]["one_token_c1"]["p50_ms"])
    best_abs = results[best_name]["one_token_c1"]["p50_ms"] - in1
    tput_on = results["raylm, direct ingress"]["c32"]["req_per_s"]
    tput_off = results["raylm, batching off, direct ingress"]["c32"]["req_per_s"]
    proxy_on, proxy_off = results["raylm"]["c32"]["req_per_s"], results["raylm, batching off"]["c32"]["req_per_s"]
    goals = [
        {"goal": "raylm adds <= 2 ms p50 over bare Serve + FastAPI (1 token, c=1; default config)",
         "value": f"{raylm_added:+.1f} ms", "met": raylm_added <= 2.0},
        {"goal": "raylm adds <= 2 ms p50 over bare Serve + FastAPI, both by direct ingress (1 token, c=1)",
         "value": f"{raylm_added_direct:+.1f} ms", "met": raylm_added_direct <= 2.0},
        {"goal": "added latency of a 1-token request < 10 ms (HTTP p50 - in-process p50)",
         "value": f"{best_abs:.1f} ms ({best_name})", "met": best_abs < 10.0},
        {"goal": "batching on >= 3x batching off throughput at c=32 (direct ingress: the model is the bottleneck)",
         "value": f"{ratio(tput_on, tput_off):.2f}x", "met": ratio(tput_on, tput_off) >= 3.0},
    ]
    return {
        "title": "3. Serving: HTTP endpoint vs in-process",
        "note": __doc__.split("\n\n", 1)[1].strip(),
        "tables": [
            {"name": "1-token request, concurrency 1 (ms)",
             "columns": ["path", "p50", "p99", "added vs in-process (p50)", "vs bare, same way in (p50)"],
             "rows": lat_rows},
            {"name": f"{TOKENS}-token requests",
             "columns": ["path", "concurrency", "requests", "errors", "p50 ms", "p99 ms", "requests/s", "tokens/s"],
             "rows": rows},
        ],
        "goals": goals,
        "findings": [
            f"raylm waits serve.batch_wait_timeout_s (10 ms) for a partial batch only while other requests are "
            f"in flight: a lone request starts at once (1 token, c=1: {results['raylm']['one_token_c1']['p50_ms']:.1f} ms "
            f"p50, bare {bare1:.1f} ms), while under load the wait fills batches (c=32: "
            f"{results['raylm']['c32']['req_per_s']:.1f} req/s with it, "
            f"{results['raylm, batch wait 0']['c32']['req_per_s']:.1f} with the wait at 0).",
            f"Serve's HTTP proxy + FastAPI hop costs {bare1 - in1:.1f} ms p50 for a 1-token request on this machine "
            f"(bare minus in-process), the load generator sharing the same 2 cores; by direct ingress (no proxy "
            f"actor in the path) it costs {bare_direct1 - in1:.1f} ms, and raylm by direct ingress adds "
            f"{results['raylm, direct ingress']['one_token_c1']['p50_ms'] - in1:.1f} ms in all.",
            f"Through the proxy, throughput at c=32 is capped by the proxy actor sharing the 2 cores: raylm "
            f"{proxy_on:.1f} req/s with batching, {proxy_off:.1f} without ({ratio(proxy_on, proxy_off):.2f}x), "
            f"against {tput_on:.1f} and {tput_off:.1f} req/s by direct ingress ({ratio(tput_on, tput_off):.2f}x).",
        ],
        "raw": {"in_process": inproc, "http": results},
    }


if __name__ == "__main__":
    stage_main(run)
