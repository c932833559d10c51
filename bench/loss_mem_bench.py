"""Loss memory at a real vocabulary (issue 32, item 6): peak resident memory of one training step
with the loss computed from the full fp32 logits (`train.loss_chunk_tokens: 0`, raylm before
issue 32) against the chunked log-probs (raylm.train.objectives.logprobs) at a few chunk sizes.

One process per variant (a fresh allocator and peak), the same model and batch in each: a
Qwen2-shaped model (vocab 151,936, tied embeddings, 2 layers of hidden 256, fp32, random init),
micro-batch 2 x seq 1024 of raw text, AdamW, 1 thread. The step is raylm's own loss path
(objectives.lm.token_losses), forward, backward and the optimizer step. One warm-up step first
(Adam's state exists), then the kernel's peak RSS (VmHWM) is reset (/proc/self/clear_refs) and one
step measured: `step peak` is that peak, `growth` the peak minus the RSS just before the step.

    .venv/bin/python bench/loss_mem_bench.py [--out results/loss_mem.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

VOCAB, SEQ, MICRO = 151_936, 1024, 2
VARIANTS = (0, 1024, 512, 256)  # train.loss_chunk_tokens; 0: the full logits (before)


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def one_variant(chunk: int) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from raylm.train.objectives.lm import token_losses

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                         max_position_embeddings=SEQ + 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    block = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=torch.Generator().manual_seed(1))

    def step() -> float:
        loss, count = token_losses(model, {"input_ids": block}, chunk_tokens=chunk)
        (loss / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss / count)

    step()  # warm-up: Adam's state, the allocator
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _kib("VmRSS")
    t0 = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - t0
    peak = _kib("VmHWM")
    return {"loss_chunk_tokens": chunk, "rss_before_mib": before / 1024, "step_peak_mib": peak / 1024,
            "growth_mib": (peak - before) / 1024, "step_s": seconds, "loss": loss,
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument("--variant", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant is not None:
        print(json.dumps(one_variant(args.variant)))
        return
    rows = []
    for chunk in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--variant", str(chunk)], check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"vocab {VOCAB}, seq {SEQ}, micro-batch {MICRO}, fp32, {base['params']:,} parameters, 1 thread")
    print("| loss_chunk_tokens | RSS before step (MiB) | step peak RSS (MiB) | growth (MiB) | peak vs full | growth vs full | step s | loss |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['loss_chunk_tokens'] or '0 (full logits, before)'} | {r['rss_before_mib']:.0f} | {r['step_peak_mib']:.0f} | "
              f"{r['growth_mib']:.0f} | {r['step_peak_mib'] / base['step_peak_mib']:.2f}x | "
              f"{r['growth_mib'] / base['growth_mib']:.2f}x | {r['step_s']:.2f} | {r['loss']:.6f} |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "vocab": VOCAB, "seq": SEQ, "micro": MICRO, "time": time.time()}, f, indent=2)


if __name__ == "__main__":
    main()
