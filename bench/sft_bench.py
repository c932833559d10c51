"""Fine-tuning: packed vs unpacked chat SFT, and LoRA vs full fine-tuning, under `raylm train`.

Corpus: the toy arithmetic chat records (scripts/make_toy_chat.py; ~42 tokens each with a BPE of
512 trained on them), seq_len 256. Model: tiny-llama widened to 256 hidden x 4 layers (as in
train_bench). 2 CPU workers, ZeRO-2, micro-batch 8, fp32. Every run is `build_trainer(...).fit()`
exactly as `raylm train` runs it.

- packed: several examples per row of 256 (position_ids restart per example);
- unpacked: one example per row, each batch cut to its longest row (no padding to seq_len);
- LoRA: r=16 on every linear layer, packed, same data and steps.

tokens/s = real (non-padding) tokens per second, the mean of the loop's own per-window values
after the first window (windows exclude evaluation and checkpoint time). Full mode runs the three
ROUNDS times, alternated (the shared 2-core machine drifts), and compares means. Peak memory: the
largest VmHWM of the two Train worker processes.

    python bench/sft_bench.py --out /tmp/sft.json [--quick]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from common import WorkerMemory, stage_main, start_ray  # noqa: E402
from make_toy_chat import records  # noqa: E402

MODEL_OVERRIDES = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "num_key_value_heads": 4}
LOG_EVERY = 5
ROUNDS = 2  # full mode: the three runs alternate this many times


def bench_config(corpus: str, workdir: str, run_name: str, steps: int, **fields):
    from raylm.config import load_config

    over = {"data.source": corpus, "data.format": "chat", "data.vocab_size": 512, "data.seq_len": 256,
            "data.val_fraction": 0.02, "data.cache_dir": f"{workdir}/cache",
            "model.overrides": json.dumps(MODEL_OVERRIDES), "train.num_workers": 2, "train.cpus_per_worker": 1,
            "train.micro_batch_size": 8, "train.max_steps": steps, "train.log_every_steps": LOG_EVERY,
            "train.eval_every_steps": steps, "train.checkpoint_every_steps": steps, "train.eval_batches": 1,
            "train.storage_path": f"{workdir}/runs", "train.run_name": run_name, "deepspeed.zero_stage": 2,
            "train.tracking.tensorboard": False, **fields}
    return load_config(str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"),
                       [f"{k}={v}" for k, v in over.items()])


def run_one(cfg) -> dict:
    from raylm.data import prepare_data
    from raylm.train.driver import build_trainer, check_data_fits

    prepared = prepare_data(cfg.data, verbose=False)
    check_data_fits(cfg, prepared)
    with WorkerMemory() as mem:
        result = build_trainer(cfg, prepared).fit()
    if result.error:
        raise RuntimeError(f"{cfg.train.run_name}: {result.error}")
    log = [json.loads(line) for line in
           Path(cfg.train.storage_path, cfg.train.run_name, "metrics.jsonl").read_text().splitlines()]
    windows = [r["tokens_per_s"] for r in log if "tokens_per_s" in r][1:]
    start = next(r for r in log if r.get("event") == "start")
    return {"tokens_per_s": sum(windows) / len(windows), "windows": [round(w) for w in windows],
            "peak_worker_mib": max(mem.per_worker_mib() or [0.0]), "blocks": prepared.stats.blocks,
            "examples": prepared.stats.documents, "trainable_params": start["trainable_params"],
            "total_params": start["total_params"], "final_loss": [r["loss"] for r in log if "loss" in r][-1]}


def run(args) -> dict:
    corpus = Path(args.workdir, "chat.jsonl")
    corpus.write_text("\n".join(json.dumps(r) for r in records(3000, "chat")) + "\n")
    start_ray(num_cpus=2)
    steps, rounds = (15, 1) if args.quick else (40, ROUNDS)
    variants = {
        "full, packed": {},
        "full, unpacked": {"data.sft.packing": "false"},
        "LoRA r=16, packed": {"train.lora": "{r: 16, alpha: 32}", "train.lr": 1e-2},
    }
    per_round: dict[str, list[dict]] = {name: [] for name in variants}
    for i in range(rounds):
        for j, (name, fields) in enumerate(variants.items()):
            cfg = bench_config(str(corpus), args.workdir, f"run{i}-{j}", steps, **fields)
            per_round[name].append(run_one(cfg))
    out: dict = {}
    for name, results in per_round.items():
        out[name] = {**results[-1], "tokens_per_s": sum(r["tokens_per_s"] for r in results) / len(results),
                     "peak_worker_mib": max(r["peak_worker_mib"] for r in results),
                     "rounds": [round(r["tokens_per_s"]) for r in results]}
    runs = variants
    packed, unpacked, lora = out["full, packed"], out["full, unpacked"], out["LoRA r=16, packed"]
    out["packed_over_unpacked"] = packed["tokens_per_s"] / unpacked["tokens_per_s"]
    out["lora_over_full"] = lora["tokens_per_s"] / packed["tokens_per_s"]
    rows = [[name, out[name]["blocks"], f"{out[name]['trainable_params']:,} / {out[name]['total_params']:,}",
             out[name]["tokens_per_s"], " / ".join(map(str, out[name]["rounds"])), out[name]["peak_worker_mib"],
             out[name]["final_loss"]] for name in runs]
    goals = [{"goal": "packed SFT >= 1.5x unpacked tokens/s (short chat examples)",
              "value": f"{out['packed_over_unpacked']:.2f}x", "met": out["packed_over_unpacked"] >= 1.5}]
    return {"title": "6. Fine-tuning: packed vs unpacked SFT, LoRA vs full", "note": __doc__.split("\n\n", 1)[1]
            .split("\n\n    python")[0].strip(),
            "tables": [{"name": f"{steps} steps each, {rounds} round(s) alternated",
                        "columns": ["run", "rows", "trainable / total params", "tokens/s", "rounds", "peak worker MiB",
                                    "final loss"], "rows": rows}],
            "goals": goals,
            "findings": [f"LoRA (r=16) runs at {out['lora_over_full']:.2f}x the tokens/s of full fine-tuning on the same "
                         f"packed data with {out['LoRA r=16, packed']['trainable_params']:,} of "
                         f"{out['LoRA r=16, packed']['total_params']:,} parameters trainable; at this model size the "
                         "runtime, not optimizer state, dominates worker memory."],
            "raw": out}


if __name__ == "__main__":
    stage_main(run)
