"""Prefix-cache-aware routing (issue 23): a multi-turn chat workload over 2 LLM replicas, routed by
Serve's default router (power of two choices) and by Ray Serve LLM's PrefixCacheAffinityRouter
(`serve.request_router=prefix_aware`), one after the other on one Ray cluster.

Model: the `small-llama` preset (85M, random weights, raylm's 2048-token BPE), float32 (faster than
bf16 on this CPU), so that a prompt's prefill is most of its TTFT. Workload: CONVERSATIONS chats
run at once, each TURNS turns one after the other. Every prompt starts with the same system text
(about 430 tokens), then the conversation so far (each user turn about 110 tokens of its own text,
each answer the ANSWER_TOKENS tokens the model generated), then the new user turn: prompts grow
from about 540 to 1340 tokens over 6 turns, so 16 chats (about 21k tokens) outgrow one engine's
1 GiB KV cache (about 14.5k tokens of this model in float32) but fit in two. vLLM's CPU blocks are
128 tokens, and a prefix hits in whole blocks. A turn is a
streamed completion; TTFT is measured at the client, through the default path (HAProxy, the
edge, the LLM replica). Hit rate: vLLM's own counters (`ray_vllm_prefix_cache_hits_total` over
`ray_vllm_prefix_cache_queries_total`, prompt tokens found in the cache over those looked up),
summed over both replicas, before and after each run; how the prompt tokens split over the two
engines shows whether a router uses both. The goal: mean TTFT <= 0.8x of default
routing, and a higher hit rate.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CORPUS, stage_main, start_ray  # noqa: E402
from report import ratio  # noqa: E402
from serve_bench import KEY, PORT, make_checkpoint, serve_config  # noqa: E402

ANSWER_TOKENS = 48
SYSTEM_CHARS, TURN_CHARS = 1200, 300


def conversation_texts(n: int, turns: int, first: int = 0) -> tuple[str, list[list[str]]]:
    """The shared system text and the user turns of conversations first..first+n-1 (distinct slices
    of the corpus)."""
    text = CORPUS.read_text()
    system = "You are a helpful assistant. Context:\n" + text[:SYSTEM_CHARS]
    start = SYSTEM_CHARS
    users = [[text[start + (c * turns + t) * TURN_CHARS:start + (c * turns + t + 1) * TURN_CHARS]
              for t in range(turns)] for c in range(first, first + n)]
    return system, users


async def chat(session, url: str, system: str, turns: list[str], ttfts: list[tuple[int, float]]) -> None:
    """One conversation: each turn's prompt is everything so far; the answer joins the history."""
    import json

    history = system
    for t, user in enumerate(turns):
        prompt = f"{history}\nUser: {user}\nAssistant:"
        body = {"model": "raylm", "prompt": prompt, "max_tokens": ANSWER_TOKENS, "temperature": 0,
                "ignore_eos": True, "stream": True}
        t0, first, answer = time.perf_counter(), None, []
        async with session.post(f"{url}/v1/completions", json=body,
                                headers={"Authorization": f"Bearer {KEY}"}) as resp:
            assert resp.status == 200, await resp.text()
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    piece = json.loads(line[6:])["choices"][0]["text"]
                    if first is None and piece:
                        first = time.perf_counter() - t0
                    answer.append(piece)
        ttfts.append((t, first or time.perf_counter() - t0))
        history = f"{prompt}{''.join(answer)}"


async def workload(url: str, conversations: int, turns: int, first: int = 0) -> dict:
    import aiohttp

    system, users = conversation_texts(conversations, turns, first)
    ttfts: list[tuple[int, float]] = []
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        await asyncio.gather(*(chat(session, url, system, u, ttfts) for u in users))
    later = [s for t, s in ttfts if t > 0]
    return {"requests": len(ttfts), "wall_s": time.perf_counter() - t0,
            "mean_ttft_ms": 1000 * statistics.mean(s for _, s in ttfts),
            "p50_ttft_ms": 1000 * statistics.median(s for _, s in ttfts),
            "mean_ttft_later_turns_ms": 1000 * statistics.mean(later) if later else None,
            "mean_ttft_first_turn_ms": 1000 * statistics.mean(s for t, s in ttfts if t == 0)}


def engine_counters() -> dict[str, dict[tuple, float]]:
    """vLLM's prefix-cache and prompt-token counters on the cluster, per label set (one per engine)."""
    import urllib.request

    import ray
    from prometheus_client.parser import text_string_to_metric_families

    names = ("ray_vllm_prefix_cache_hits_total", "ray_vllm_prefix_cache_queries_total", "ray_vllm_prompt_tokens_total")
    out: dict[str, dict[tuple, float]] = {n: {} for n in names}
    for node in ray.nodes():
        if node["Alive"]:
            text = urllib.request.urlopen(f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics",
                                          timeout=10).read().decode()
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    if s.name in out:
                        key = tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("Version", "SessionName")))
                        out[s.name][key] = out[s.name].get(key, 0.0) + s.value
    return out


def moved(before: dict, after: dict, name: str) -> dict[tuple, float]:
    """Per-engine growth of a counter between two reads (engines new since `before` count from 0)."""
    return {k: v - before[name].get(k, 0.0) for k, v in after[name].items() if v - before[name].get(k, 0.0) > 0}


def settled_counters(wait_s: float = 12.0) -> dict[str, dict[tuple, float]]:
    """The counters once the engines' last report has been exported (Ray exports every few s)."""
    time.sleep(wait_s)
    return engine_counters()


def run(args) -> dict:
    from ray import serve

    from raylm.serve.app import deploy

    conversations, turns = (8, 6) if args.quick else (16, 6)
    # extra prefix-aware runs at other load thresholds, e.g. RAYLM_BENCH_PREFIX_THRESHOLDS=1,2
    extra = [f"prefix_aware@{t}" for t in os.environ.get("RAYLM_BENCH_PREFIX_THRESHOLDS", "").split(",") if t]

    ckpt = make_checkpoint(args.workdir)
    key_file = os.path.join(args.workdir, "keys")
    Path(key_file).write_text(KEY + "\n")
    start_ray(num_cpus=4)
    res: dict = {}
    for variant in ("default", "prefix_aware", *extra):
        router, _, threshold = variant.partition("@")
        settings = [f"serve.prefix_router.imbalanced_threshold={threshold}"] if threshold else []
        cfg = serve_config([*settings, f"serve.port={PORT}", f"serve.api_key_file={key_file}", "serve.dtype=float32",
                            "serve.api_key_env=RAYLM_BENCH_NO_SUCH_VAR", "serve.autoscaling.min_replicas=2",
                            "serve.autoscaling.max_replicas=2", f"serve.request_router={router}",
                            "serve.max_model_len=2048", f"serve.app_name=chat-{len(res)}"])
        url = deploy(cfg, ckpt)[0]
        asyncio.run(workload(url, 4, 1, first=100))  # warm-up (other conversations): the engines compiled
        before = settled_counters()
        out = asyncio.run(workload(url, conversations, turns))
        after = settled_counters()
        hits = sum(moved(before, after, "ray_vllm_prefix_cache_hits_total").values())
        queries = sum(moved(before, after, "ray_vllm_prefix_cache_queries_total").values())
        out["prefix_hit_rate"] = hits / max(1.0, queries)
        out["prefix_cache_queries"] = queries
        # how the prompt tokens split over the engines: does the router use both replicas?
        per_engine = sorted(moved(before, after, "ray_vllm_prompt_tokens_total").values(), reverse=True)
        out["prompt_tokens_per_engine"] = per_engine
        res[variant] = out
        print(variant, out, flush=True)
        serve.delete(cfg.serve.app_name)
    serve.shutdown()

    d, p = res["default"], res["prefix_aware"]
    goals = [
        {"goal": "multi-turn chat over 2 replicas: mean TTFT with prefix-aware routing <= 0.8x default routing",
         "value": f"{ratio(p['mean_ttft_ms'], d['mean_ttft_ms']):.2f}x ({p['mean_ttft_ms']:.0f} vs "
                  f"{d['mean_ttft_ms']:.0f} ms)",
         "met": ratio(p["mean_ttft_ms"], d["mean_ttft_ms"]) <= 0.8},
        {"goal": "prefix-cache hit rate (vLLM's counters) higher with prefix-aware routing",
         "value": f"{p['prefix_hit_rate']:.1%} vs {d['prefix_hit_rate']:.1%}",
         "met": p["prefix_hit_rate"] > d["prefix_hit_rate"]},
    ]
    columns = ["requests", "mean_ttft_ms", "p50_ttft_ms", "mean_ttft_first_turn_ms", "mean_ttft_later_turns_ms",
               "wall_s", "prefix_hit_rate", "prompt_tokens_per_engine"]
    return {
        "title": "14. Prefix-cache-aware routing: multi-turn chat over 2 replicas (issue 23)",
        "note": __doc__.split("\n\n", 1)[1].strip(),
        "tables": [{"name": f"{conversations} conversations x {turns} turns at once, {ANSWER_TOKENS}-token answers",
                    "columns": ["router", *columns],
                    "rows": [[r, *(res[r][c] for c in columns)] for r in res]}],
        "goals": goals,
        "raw": res,
    }


if __name__ == "__main__":
    stage_main(run)
