"""Preference tuning: DPO vs SFT tokens/s and peak worker memory, full and LoRA, under `raylm train`.

Same model as the SFT stage (tiny-llama widened to 256 hidden x 4 layers), 2 CPU workers, ZeRO-2,
fp32, seq_len 64. Same data size: SFT reads the toy arithmetic chat records (prompt + right answer,
scripts/make_toy_preference.py's pairs as chat), one example per row, micro-batch 8 sequences; DPO
reads the pairs, micro-batch 4 pairs = 8 sequences (chosen + rejected). A DPO step runs the reference
forward (LoRA: adapters disabled; full: the frozen copy) and the policy forward + backward on both
answers, so per real token it does about 4/3 of SFT's work; the full run also holds a second model.

tokens/s = real (non-padding) tokens per second (DPO: chosen and rejected both), the mean of the
loop's own per-window values after the first window. Full mode alternates the four runs ROUNDS
times (the shared 2-core machine drifts). Peak memory: the largest VmHWM of the two Train workers.

    python bench/dpo_bench.py --out /tmp/dpo.json [--quick]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from common import stage_main, start_ray  # noqa: E402
from make_toy_preference import records  # noqa: E402
from sft_bench import MODEL_OVERRIDES, run_one  # noqa: E402

LOG_EVERY = 5
ROUNDS = 2
LORA = {"train.lora": "{r: 16, alpha: 32}", "train.lr": 1e-2}


def bench_config(corpus: str, workdir: str, run_name: str, steps: int, **fields):
    from raylm.config import load_config

    over = {"data.source": corpus, "data.vocab_size": 512, "data.seq_len": 64, "data.val_fraction": 0.02,
            "data.cache_dir": f"{workdir}/cache", "model.overrides": json.dumps(MODEL_OVERRIDES),
            "train.num_workers": 2, "train.cpus_per_worker": 1, "train.max_steps": steps,
            "train.log_every_steps": LOG_EVERY, "train.eval_every_steps": steps,
            "train.checkpoint_every_steps": steps, "train.eval_batches": 1, "train.storage_path": f"{workdir}/runs",
            "train.run_name": run_name, "deepspeed.zero_stage": 2, "train.tracking.tensorboard": False, **fields}
    return load_config(str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"),
                       [f"{k}={v}" for k, v in over.items()])


def run(args) -> dict:
    pairs = records(3000)
    pref = Path(args.workdir, "pref.jsonl")
    pref.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    chat = Path(args.workdir, "chat.jsonl")
    chat.write_text("".join(json.dumps({"messages": r["prompt"] + r["chosen"]}) + "\n" for r in pairs))
    start_ray(num_cpus=2)
    steps, rounds = (15, 1) if args.quick else (30, ROUNDS)
    sft = {"data.source": str(chat), "data.format": "chat", "data.sft.packing": "false", "train.micro_batch_size": 8}
    dpo = {"data.source": str(pref), "data.format": "preference", "train.objective": "dpo",
           "train.micro_batch_size": 4, "train.lr": 1e-4}
    variants = {"SFT full": sft, "DPO full": dpo, "SFT LoRA r=16": {**sft, **LORA}, "DPO LoRA r=16": {**dpo, **LORA}}
    per_round: dict[str, list[dict]] = {name: [] for name in variants}
    for i in range(rounds):
        for j, (name, fields) in enumerate(variants.items()):
            per_round[name].append(run_one(bench_config(str(pref), args.workdir, f"run{i}-{j}", steps, **fields)))
    out: dict = {}
    for name, results in per_round.items():
        out[name] = {**results[-1], "tokens_per_s": sum(r["tokens_per_s"] for r in results) / len(results),
                     "peak_worker_mib": max(r["peak_worker_mib"] for r in results),
                     "rounds": [round(r["tokens_per_s"]) for r in results]}
    ratios = {kind: (out[f"DPO {kind}"]["tokens_per_s"] / out[f"SFT {kind}"]["tokens_per_s"],
                     out[f"DPO {kind}"]["peak_worker_mib"] / out[f"SFT {kind}"]["peak_worker_mib"])
              for kind in ("full", "LoRA r=16")}
    out["dpo_over_sft"] = ratios
    rows = [[name, f"{out[name]['trainable_params']:,} / {out[name]['total_params']:,}", out[name]["tokens_per_s"],
             " / ".join(map(str, out[name]["rounds"])), out[name]["peak_worker_mib"], out[name]["final_loss"]]
            for name in variants]
    return {"title": "8. Preference tuning: DPO vs SFT, full and LoRA",
            "note": __doc__.split("\n\n", 1)[1].split("\n\n    python")[0].strip(),
            "tables": [{"name": f"{steps} steps each, {rounds} round(s) alternated",
                        "columns": ["run", "trainable / total params", "tokens/s", "rounds", "peak worker MiB",
                                    "final loss"], "rows": rows}],
            "goals": [],
            "findings": [f"DPO {kind}: {tps:.2f}x SFT's tokens/s, {mem:.2f}x its peak worker memory"
                         for kind, (tps, mem) in ratios.items()],
            "raw": out}


if __name__ == "__main__":
    stage_main(run)
