"""GPU (only when CUDA is available; otherwise recorded as skipped).

1. MFU of a training step for the ~125M (small-llama) and ~1B (base-llama) presets, ZeRO-2,
   bf16, one GPU per worker, through `raylm train` (the platform's own loop computes it):

       MFU = flops_per_token x tokens/s / (peak bf16 FLOP/s per GPU x GPUs)
       flops_per_token = 6 N + 12 L H S   (N parameters, L layers, H hidden size, S seq_len:
                                            forward + backward of the dense weights, plus attention)

   tokens/s is the loop's step throughput (`tokens_per_s` in metrics.jsonl, the median over
   the logged windows after the first); peak per GPU from raylm.train.metrics.PEAK_BF16_FLOPS.
2. Generated tokens/s of a serving replica on the GPU at concurrency 1 and 32 (the small-llama
   checkpoint from step 1, served by `raylm.serve.app.deploy`).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CORPUS, stage_main  # noqa: E402

PRESETS = {"small-llama (~125M)": ("small-llama", 8, 1024), "base-llama (~1B)": ("base-llama", 4, 1024)}


def run(args) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"title": "5. GPU: MFU and serving tokens/s", "skipped": "no CUDA device", "tables": [],
                "goals": [{"goal": "MFU > 40% (125M and 1B, ZeRO-2, bf16)", "value": "skipped: no CUDA device",
                           "met": None}]}
    from common import start_ray
    from raylm.config import load_config
    from raylm.train.driver import run_training

    gpus = torch.cuda.device_count()
    device = torch.cuda.get_device_name(0)
    start_ray()
    storage = os.path.join(args.workdir, "runs")
    steps = 20 if args.quick else 40
    rows, goals, hf = [], [], None
    for label, (preset, micro, seq) in PRESETS.items():
        cfg = load_config(None, [
            f"data.source={CORPUS}", "data.tokenizer=train", "data.vocab_size=32000", f"data.seq_len={seq}",
            f"model.name={preset}", f"train.num_workers={gpus}", "train.use_gpu=true", "train.cpus_per_worker=2",
            f"train.micro_batch_size={micro}", f"train.max_steps={steps}", "train.log_every_steps=5",
            f"train.eval_every_steps={steps}", f"train.checkpoint_every_steps={steps}",
            f"train.storage_path={storage}", f"train.run_name={preset}", "deepspeed.zero_stage=2",
            "deepspeed.precision=bf16"])
        try:
            outcome = run_training(cfg)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory for the 1B preset
            rows.append([label, device, gpus, "-", "-", f"failed: {type(exc).__name__}: {exc}"[:200]])
            goals.append({"goal": f"MFU > 40% {label}", "value": "failed", "met": False})
            continue
        records = [json.loads(l) for l in Path(outcome.run_dir, "metrics.jsonl").read_text().splitlines()]
        mfu = [r["mfu"] for r in records if "mfu" in r][1:]
        tps = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]
        m = statistics.median(mfu) if mfu else None
        rows.append([label, device, gpus, statistics.median(tps) if tps else None, m, ""])
        goals.append({"goal": f"MFU > 40% {label}", "value": f"{100 * m:.1f}%" if m else "-", "met": bool(m and m > 0.4)})
        if preset == "small-llama":
            hf = outcome.hf_checkpoint
    tables = [{"name": "training step MFU (ZeRO-2, bf16)",
               "columns": ["preset", "device", "GPUs", "tokens/s", "MFU", "note"], "rows": rows}]
    if hf:
        tables.append(_serve_table(hf, args))
    import ray

    ray.shutdown()
    return {"title": "5. GPU: MFU and serving tokens/s", "note": __doc__.split("\n\n", 1)[1].strip(),
            "tables": tables, "goals": goals, "raw": {"device": device}}


def _serve_table(checkpoint: str, args) -> dict:
    """The trained small-llama behind raylm's endpoint on one GPU (vLLM, bf16): 128-token requests."""
    import asyncio

    from ray import serve

    from raylm.config import load_config
    from raylm.serve.app import deploy
    import httpx

    from serve_bench import KEY, PORT, PROMPT

    key_file = os.path.join(args.workdir, "keys")
    Path(key_file).write_text(KEY + "\n")
    cfg = load_config(None, [f"serve.port={PORT}", "serve.host=127.0.0.1", f"serve.api_key_file={key_file}",
                             "serve.api_key_env=RAYLM_BENCH_NO_SUCH_VAR", "serve.use_gpu=true",
                             "serve.gpu_memory_utilization=0.5", "serve.max_num_seqs=64",
                             "serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=1",
                             "serve.max_tokens_limit=128"])
    url = deploy(cfg, checkpoint)[0] + "/v1/completions"
    body = {"model": "raylm", "prompt": PROMPT, "max_tokens": 128, "temperature": 0, "ignore_eos": True}

    async def burst(c: int) -> tuple[int, float, int]:
        async with httpx.AsyncClient(timeout=300, headers={"Authorization": f"Bearer {KEY}"}) as client:
            t = time.perf_counter()
            outs = await asyncio.gather(*(client.post(url, json=body) for _ in range(c)))
            wall = time.perf_counter() - t
        return c, wall, sum(o.json()["usage"]["completion_tokens"] for o in outs)

    asyncio.run(burst(4))  # warm-up
    rows = [[c, round(wall, 2), tokens / wall] for c, wall, tokens in (asyncio.run(burst(c)) for c in (1, 32))]
    serve.shutdown()
    return {"name": "serving replica on the GPU (vLLM, small-llama, 128-token requests)",
            "columns": ["concurrency", "wall s", "generated tokens/s"], "rows": rows}


if __name__ == "__main__":
    stage_main(run)
