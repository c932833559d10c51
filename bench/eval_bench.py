"""`raylm eval`'s throughput against sending the same prompts through the served endpoint.

The tiny checkpoint (raylm.serve.tiny) on the toy arithmetic chat data. Eval: evaluate_checkpoint
with eval.max_records held-out examples generated greedily (max_new_tokens each) and the loss
part cut to one cache row (eval.max_val_rows=1), so both sides do the same work: the same prompt
token ids, the same greedy answers. Served: deploy() the same checkpoint (one replica, same dtype),
then send those prompts as token-id completions, CONCURRENCY at a time.

tokens/s = (prompt + generated tokens) / seconds. Eval's seconds include its engine start and
reading the data cache (it is a batch job: that is what it costs); the endpoint's are given both
without its deployment (steady state, the engine already up) and with it.

    python bench/eval_bench.py --out /tmp/eval.json [--quick]
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))

from common import REPO, stage_main, start_ray  # noqa: E402

CONCURRENCY = 16
KEY = "sk-bench-eval"


def _config(ckpt: str, workdir: str, records: int, new_tokens: int):
    from raylm.config import load_config

    keys = Path(workdir) / "keys"
    keys.write_text(KEY + "\n")
    return load_config(str(REPO / "configs" / "chat_sft.yaml"), [
        f"data.tokenizer={ckpt}", f"train.storage_path={workdir}/store", f"data.cache_dir={workdir}/cache",
        f"eval.max_records={records}", f"eval.max_new_tokens={new_tokens}", "eval.max_val_rows=1",
        "eval.dtype=float32", "serve.dtype=float32", "serve.port=8125", "serve.host=127.0.0.1",
        f"serve.api_key_file={keys}", "serve.api_key_env=RAYLM_BENCH_NO_SUCH_VAR", "serve.model_id=tiny",
        "serve.kv_cache_memory_gib=0.5", "serve.max_tokens_limit=128",
        "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=1"])


def _prompts(cfg, records: int) -> list[list[int]]:
    """The held-out prompts eval generates for: the first `records` examples of the val split."""
    import numpy as np
    import pyarrow.parquet as pq

    from raylm.data import cached_data
    from raylm.evaluate import generation_example, packed_examples

    prepared = cached_data(cfg.data, cfg.train.storage_path)
    out = []
    for f in prepared.manifest["val"]["files"]:
        for row in pq.read_table(f"{prepared.uri}/{f['path']}").to_pylist():
            for inputs, labels in packed_examples(row):
                found = generation_example(np.asarray(inputs), np.asarray(labels))
                if found and len(out) < records:
                    out.append(found[0])
    return out


def _send(url: str, prompts: list[list[int]], new_tokens: int) -> tuple[float, int, int]:
    import httpx

    def one(client: httpx.Client, prompt: list[int]) -> tuple[int, int]:
        r = client.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                        json={"model": "tiny", "prompt": prompt, "max_tokens": new_tokens, "temperature": 0})
        r.raise_for_status()
        usage = r.json()["usage"]
        return usage["prompt_tokens"], usage["completion_tokens"]

    t0 = time.perf_counter()
    with httpx.Client() as client, cf.ThreadPoolExecutor(CONCURRENCY) as pool:
        done = list(pool.map(lambda p: one(client, p), prompts))
    return time.perf_counter() - t0, sum(p for p, _ in done), sum(c for _, c in done)


def run(args) -> dict:
    from raylm.evaluate import evaluate_checkpoint
    from raylm.serve.app import deploy
    from raylm.serve.tiny import make_tiny_checkpoint

    records, new_tokens = (16, 16) if args.quick else (64, 32)
    ckpt = make_tiny_checkpoint(os.path.join(args.workdir, "ckpt"))
    cfg = _config(ckpt, args.workdir, records, new_tokens)
    start_ray(num_cpus=4)
    from raylm.data import prepare_data

    prepare_data(cfg.data, verbose=False, storage_path=cfg.train.storage_path)  # both sides start from the cache
    result = evaluate_checkpoint(cfg, ckpt, write=False)
    eval_tokens = result["prompt_tokens"] + result["generated_tokens"]

    prompts = _prompts(cfg, records)
    t0 = time.perf_counter()
    url = deploy(cfg, ckpt)[0]
    deploy_s = time.perf_counter() - t0
    _send(url, prompts[:2], new_tokens)  # first requests compile/warm the path; not counted
    requests_s, prompt_tokens, completion_tokens = _send(url, prompts, new_tokens)
    from ray import serve

    serve.shutdown()
    served_tokens = prompt_tokens + completion_tokens
    return {
        "records": records, "max_new_tokens": new_tokens, "concurrency": CONCURRENCY,
        "eval": {"eval_s": result["eval_s"], "prompt_tokens": result["prompt_tokens"],
                 "generated_tokens": result["generated_tokens"], "tokens_per_s": eval_tokens / result["eval_s"],
                 "num_generated": result["num_generated"], "val_tokens": result["val_tokens"]},
        "served": {"deploy_s": deploy_s, "requests_s": requests_s, "prompt_tokens": prompt_tokens,
                   "completion_tokens": completion_tokens, "tokens_per_s_steady": served_tokens / requests_s,
                   "tokens_per_s_with_deploy": served_tokens / (deploy_s + requests_s)},
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


if __name__ == "__main__":
    stage_main(run)
    print(json.dumps(json.load(open(sys.argv[sys.argv.index("--out") + 1])), indent=1))
