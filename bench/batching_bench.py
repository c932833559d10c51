"""Continuous batching where it matters (issue 23, item 9): a mixed-length workload through raylm's
served endpoint against transformers `generate` in static batches of the same requests.

Workload: one fixed seeded list of requests, prompt length (tokens) and max_tokens each drawn
uniformly from 1..256, EOS ignored, greedy. Prompts are windows of tinyshakespeare tokenized with
the checkpoint's tokenizer (seeded offsets), sent as token ids so both sides see the same tokens.
Model: the serve stage's `small-llama` checkpoint (85M, hidden 768, 12 layers, head_dim 64, random
weights, raylm's 2048-token BPE), max_model_len 512, the same dtype on both sides: bfloat16 where
the CPU has AVX-512 BF16, else float32 (on an AVX2-only CPU torch's bf16 matmuls are several times
slower than fp32, which would flatter the comparison).

- raylm: `deploy()` (one replica, raylm's engine defaults: max_num_seqs 64, prefix caching; KV cache
  1 GiB in bf16, 2 GiB in fp32: the same number of tokens), every request sent through Serve's HTTP proxy (the path users take) by an aiohttp
  client, at most 64 in flight (CONCURRENCY): the engine admits and retires sequences at every step.
- transformers: `AutoModelForCausalLM.generate` on the same checkpoint in static batches taken in
  arrival order, left padding; a batch runs to its longest max_tokens (min_new_tokens = max_new_tokens,
  so EOS cannot end it early), and only the tokens each request asked for count as useful output.
- tokens/s = useful generated tokens (sum of max_tokens) / wall time of the whole workload, warm
  (one small warm-up pass first on each side, not counted). Request completion = time from the
  workload's start to that request's answer (all requests arrive at time 0).
- Threads: vLLM's CPU engine binds its OpenMP threads to one core (it reserves the other for its
  scheduler; the proxy, the replica and the client share that one), so transformers runs every
  batch size with 1 thread (torch.set_num_threads(1)): the goal compares equal compute threads. Its
  best batch size is then run again with torch's default (all cores) when the machine is idle
  enough (load average below the core count); on a busy machine OpenMP threads spin against the
  other processes (seen here at load average 13: 32 decode steps took 87 s at 2 threads, 5 s at 1),
  so that row is skipped.

    python bench/batching_bench.py --out bench/results/batching-<stamp>.json [--quick]
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))

from common import CORPUS, stage_main  # noqa: E402
from report import ratio  # noqa: E402

PORT = 8312
KEY = "sk-bench-batching"
MAX_LEN = 256  # prompt tokens and max_tokens are drawn from 1..MAX_LEN
CONCURRENCY = 64  # requests in flight against raylm (= the engine's default max_num_seqs)
SEED = 0
GOAL = 2.0


def bench_dtype() -> str:
    """bfloat16 where the CPU computes it natively (AVX-512 BF16 / AMX), else float32."""
    import torch

    return "bfloat16" if torch.cuda.is_available() or torch.cpu._is_avx512_bf16_supported() else "float32"


def mixed_workload(n: int, seed: int = SEED, max_len: int = MAX_LEN) -> list[tuple[int, int]]:
    """`n` requests as (prompt_tokens, max_tokens), each drawn uniformly from 1..max_len with a
    seeded generator: the same list on every run and for every side of the comparison."""
    rng = random.Random(seed)
    return [(rng.randint(1, max_len), rng.randint(1, max_len)) for _ in range(n)]


def prompt_ids(workload: list[tuple[int, int]], corpus_ids: list[int], seed: int = SEED) -> list[list[int]]:
    """One prompt per request: a window of the tokenized corpus of the request's length, at a
    seeded offset (real text, so the tokens are ordinary ones, never special tokens)."""
    rng = random.Random(seed + 1)
    out = []
    for length, _ in workload:
        start = rng.randrange(0, len(corpus_ids) - length)
        out.append(corpus_ids[start:start + length])
    return out


# ------------------------------------------------------------------ transformers, static batches


def _static_pass(model: Any, prompts: list[list[int]], max_tokens: list[int], batch_size: int, pad_id: int) -> dict:
    """The workload in arrival-order batches of `batch_size`; returns wall time and per-request
    completion times (each request completes when its batch does)."""
    import torch

    done_s, padded_tokens = [], 0
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch, wanted = prompts[i:i + batch_size], max_tokens[i:i + batch_size]
        width, new = max(len(p) for p in batch), max(wanted)
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=pad_id)
        assert out.shape[1] - width == new, (out.shape, width, new)
        padded_tokens += new * len(batch)
        done_s += [time.perf_counter() - t0] * len(batch)
    wall = time.perf_counter() - t0
    useful = sum(max_tokens)
    return {"batch_size": batch_size, "threads": torch.get_num_threads(), "wall_s": wall, "load_avg_1m": os.getloadavg()[0],
            "useful_tokens": useful, "generated_tokens": padded_tokens, "tokens_per_s": useful / wall,
            "mean_completion_s": statistics.mean(done_s)}


def transformers_static(ckpt: str, prompts: list[list[int]], max_tokens: list[int], batch_sizes: list[int],
                        dtype: str) -> tuple[list[dict], str]:
    """Every batch size at 1 thread, then the best one at torch's default thread count if the
    machine is idle enough; returns the runs and why the default-thread run was skipped ('' if not)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=getattr(torch, dtype)).eval()
    default_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runs, skipped = [], ""
    try:
        _static_pass(model, prompts[:4], [4] * 4, 4, pad_id)  # warm-up
        for bs in batch_sizes:
            runs.append(_static_pass(model, prompts, max_tokens, bs, pad_id))
            print("transformers:", runs[-1], flush=True)
        best = max(runs, key=lambda r: r["tokens_per_s"])
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if default_threads <= 1:
            skipped = "torch's default is 1 thread here"
        elif load >= cores:
            skipped = f"load average {load:.1f} on {cores} cores"
        else:
            torch.set_num_threads(default_threads)
            runs.append(_static_pass(model, prompts, max_tokens, best["batch_size"], pad_id))
            print("transformers:", runs[-1], flush=True)
    finally:
        torch.set_num_threads(default_threads)
    del model
    return runs, skipped


# ------------------------------------------------------------------ raylm over HTTP


async def _send_all(url: str, prompts: list[list[int]], max_tokens: list[int], concurrency: int) -> dict:
    """Every request at once, at most `concurrency` in flight; checks each got all its tokens."""
    import aiohttp

    gate = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {KEY}"}
    t0 = time.perf_counter()

    async def one(session: aiohttp.ClientSession, prompt: list[int], n: int) -> tuple[int, float]:
        body = {"model": "raylm", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
        async with gate, session.post(f"{url}/v1/completions", json=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            got = (await resp.json())["usage"]["completion_tokens"]
        assert got == n, f"asked for {n} tokens, got {got}"
        return got, time.perf_counter() - t0

    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=1800)) as session:
        outs = await asyncio.gather(*(one(session, p, n) for p, n in zip(prompts, max_tokens)))
    wall = time.perf_counter() - t0
    useful = sum(o[0] for o in outs)
    return {"concurrency": concurrency, "wall_s": wall, "useful_tokens": useful, "tokens_per_s": useful / wall,
            "mean_completion_s": statistics.mean(o[1] for o in outs)}


def raylm_http(ckpt: str, workdir: str, prompts: list[list[int]], max_tokens: list[int], dtype: str) -> dict:
    from ray import serve

    from common import start_ray
    from raylm.config import load_config
    from raylm.serve.app import deploy

    key_file = os.path.join(workdir, "keys")
    Path(key_file).write_text(KEY + "\n")
    start_ray(num_cpus=4)
    cfg = load_config(None, ["serve.max_model_len=512", f"serve.max_tokens_limit={MAX_LEN}", f"serve.port={PORT}",
                             f"serve.api_key_file={key_file}", "serve.api_key_env=RAYLM_BENCH_NO_SUCH_VAR",
                             "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=1", f"serve.dtype={dtype}",
                             # the default 1 GiB holds bf16 KV for 64 sequences of ~256 tokens; fp32 needs twice it
                             f"serve.kv_cache_memory_gib={1 if dtype == 'bfloat16' else 2}"])
    t0 = time.perf_counter()
    url = deploy(cfg, ckpt)[0]
    deploy_s = time.perf_counter() - t0
    try:
        warm = list(range(0, len(prompts), max(1, len(prompts) // 8)))[:8]  # a few mixed lengths, few tokens
        asyncio.run(_send_all(url, [prompts[i] for i in warm], [4] * len(warm), CONCURRENCY))
        out = asyncio.run(_send_all(url, prompts, max_tokens, CONCURRENCY))
    finally:
        serve.shutdown()
        import ray

        ray.shutdown()
    return {"deploy_s": deploy_s, "engine": {"max_num_seqs": cfg.serve.max_num_seqs, "dtype": cfg.serve.dtype},
            "load_avg_1m": os.getloadavg()[0], **out}


# ------------------------------------------------------------------ the stage


def _corpus_ids(ckpt: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt)(CORPUS.read_text())["input_ids"]


def run(args) -> dict:
    from serve_bench import make_checkpoint

    # batch 8 was transformers' best here (1: 19.6, 4: 23.7, 8: 26.5, 32: 16.2 tokens/s at 1 thread)
    n, batch_sizes = (32, [4, 8, 32]) if args.quick else (64, [1, 4, 8, 16, 32])
    dtype = bench_dtype()
    ckpt = make_checkpoint(args.workdir)
    workload = mixed_workload(n)
    prompts, max_tokens = prompt_ids(workload, _corpus_ids(ckpt)), [m for _, m in workload]
    t_start = time.perf_counter()
    hf, default_skipped = transformers_static(ckpt, prompts, max_tokens, batch_sizes, dtype)
    ray_ = raylm_http(ckpt, args.workdir, prompts, max_tokens, dtype)
    print("raylm:", ray_, flush=True)
    best = max(hf, key=lambda r: r["tokens_per_s"])
    rows = [[f"raylm endpoint (HTTP via Serve's proxy, {CONCURRENCY} in flight)", "1 (engine)", ray_["wall_s"],
             ray_["useful_tokens"], ray_["useful_tokens"], ray_["tokens_per_s"], ray_["mean_completion_s"], 1.0]]
    rows += [[f"transformers generate, static batches of {r['batch_size']}", r["threads"], r["wall_s"],
              r["generated_tokens"], r["useful_tokens"], r["tokens_per_s"], r["mean_completion_s"],
              ratio(ray_["tokens_per_s"], r["tokens_per_s"])] for r in hf]
    speedup = ratio(ray_["tokens_per_s"], best["tokens_per_s"])
    goals = [{"goal": f"mixed lengths (1..{MAX_LEN} prompt and max_tokens, EOS ignored): useful tokens/s >= "
                      f"{GOAL:g}x transformers generate in static batches (its best batch size and thread count)",
              "value": f"{speedup:.2f}x ({ray_['tokens_per_s']:.0f} vs {best['tokens_per_s']:.0f} tokens/s, "
                       f"batch {best['batch_size']}, {best['threads']} thread(s))",
              "met": speedup >= GOAL}]
    return {
        "title": "12. Continuous batching: mixed-length requests, raylm vs transformers static batches (issue 23)",
        "note": __doc__.split("\n\n", 1)[1].rsplit("\n\n", 1)[0].strip(),
        "tables": [{"name": f"small-llama (85M), {dtype}; {n} requests, prompt and max_tokens 1..{MAX_LEN} "
                            f"(seed {SEED}), {sum(max_tokens)} useful tokens",
                    "columns": ["path", "compute threads", "wall s", "generated tokens", "useful tokens",
                                "useful tokens/s", "mean completion s", "raylm / this"],
                    "rows": rows,
                    "note": f"transformers at torch's default threads: skipped ({default_skipped})." if default_skipped
                    else ""}],
        "goals": goals,
        "raw": {"requests": n, "seed": SEED, "prompt_tokens": sum(len(p) for p in prompts),
                "useful_tokens": sum(max_tokens), "transformers": hf, "raylm": ray_,
                "transformers_default_threads_skipped": default_skipped, "dtype": dtype, "seconds": time.perf_counter() - t_start,
                "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
    }


if __name__ == "__main__":
    stage_main(run)
