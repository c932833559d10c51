"""GRPO rollout throughput (issue 33 item 10): raylm's rollout path against transformers `generate`,
side by side in one run, on the same model, prompts and sampling settings.

- Model: the GRPO example's base, the chat SFT export of the tiny preset (`configs/chat_sft.yaml`,
  600 steps: tiny-llama, hidden 64, 2 layers, vocab 512), found at $RAYLM_BENCH_GRPO_BASE or in the
  parity bench's work dir; without one, the serving stage's random tiny checkpoint
  (raylm.serve.tiny, the same architecture). fp32 on both sides (the trainer's precision on CPU,
  which the rollout engines take).
- Prompts: the first 16 records of configs/data/arith_prompt.jsonl, tokenized as raylm's data stage
  does (chat template, assistant turn opened), x num_generations 8 = 128 completions a round.
- Sampling, both sides: temperature 1, top_p 1, no top_k, exactly 64 new tokens per completion
  (max_completion_length 64, EOS ignored: vLLM's `ignore_eos`, transformers' `min_new_tokens` 64),
  so both generate 128 x 64 = 8192 tokens a round.
- raylm: `RolloutPool` (raylm.train.rollouts) built from `configs/grpo.yaml` with
  max_completion_length 64: the engine the GRPO loop uses (one `RolloutEngine` Ray actor, a vLLM
  `LLM` with the serving stage's engine settings, per-request seeds, the sampled tokens' log-probs
  returned), `pool.generate(prompt_ids, seeds)` as the loop calls it. Timed at the caller, around
  the whole call (Ray round trip and the results' transfer included); the engine's own seconds (what
  the loop's `rollout_tokens_per_s` metric divides by) are reported beside it. Two engine settings:
  configs/grpo.yaml's as it is (the serving default max_num_seqs 64: the 128 completions run in two
  waves of 64) and serve.max_num_seqs 128 (all at once); both engines live through the whole run.
- transformers: `model.generate(do_sample=True, num_return_sequences=8)` on the same folder, prompts
  left-padded, in batches of 1, 4 and 16 prompts (8, 32, 128 sequences), at the engine's compute
  thread count (vLLM's CPU engine binds its OpenMP threads to one core of the actor's CPU; read back
  from the actor); torch's default thread count is run as well when the machine is idle enough
  (load average below the core count), else skipped (OpenMP threads spin against other processes).
- Diagnostics (the tiny model; not raylm's path, to say where the engine's time goes): the
  max_num_seqs 128 engine's own `LLM.generate` called inside its actor, the same requests without
  per-request seeds (vLLM samples seeded requests one by one in a Python loop; the GRPO loop seeds
  every request so a resumed run regenerates the same completions), and without seeds or log-probs.
- Rounds: one warm-up round on each side, then 5 rounds (3 with --quick), the sides alternating
  within each round (they see the same load); tokens/s = 8192 / the round's seconds; median over
  rounds. The goal's ratio divides raylm's (configs/grpo.yaml's engine) by transformers' best.
- Then (not with --quick) the same on small-llama (85M, hidden 768, 12 layers, random weights, the
  serving benches' checkpoint; 3 rounds, batches of 4 and 16 prompts, KV cache 1.5 GiB): a model
  whose decode steps are compute-bound, where the tiny one's are per-step overhead.

    python bench/grpo_rollout_bench.py --out bench/results/grpo-rollout-<date>.json [--quick]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))

from common import REPO, stage_main  # noqa: E402
from report import ratio  # noqa: E402

PROMPTS, GENERATIONS, MAX_COMPLETION = 16, 8, 64
GOAL = 2.0
PARITY_BASE = Path("/tmp/raylm-grpoparity/home/raylm_results/chat-sft600/step_00000600/hf")


def base_model(workdir: str) -> tuple[str, str]:
    """(folder, what it is): the chat SFT export when one is at hand, else a random tiny checkpoint."""
    for path in (os.environ.get("RAYLM_BENCH_GRPO_BASE"), PARITY_BASE):
        if path and (Path(path) / "config.json").exists():
            return str(path), f"chat SFT export of the tiny preset (600 steps), {path}"
    from raylm.serve.tiny import make_tiny_checkpoint

    out = os.path.join(workdir, "tiny")
    if not (Path(out) / "config.json").exists():
        make_tiny_checkpoint(out)
    return out, "random tiny-llama checkpoint (raylm.serve.tiny)"


def prompt_ids(folder: str) -> list[list[int]]:
    """The first PROMPTS records of the GRPO example's data, tokenized as the data stage does."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    lines = (REPO / "configs" / "data" / "arith_prompt.jsonl").read_text().splitlines()[:PROMPTS]
    out = []
    for record in map(json.loads, lines):
        if tok.chat_template:
            out.append(list(tok.apply_chat_template(record["prompt"], tokenize=True, add_generation_prompt=True,
                                                    return_dict=True)["input_ids"]))
        else:  # a checkpoint without a chat template: the user's turn as text
            out.append(tok(record["prompt"][-1]["content"])["input_ids"])
    return out


class Transformers:
    """transformers `generate` on the same folder, sampling as the engine does."""

    def __init__(self, folder: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id

    def round(self, prompts: list[list[int]], per_batch: int, threads: int) -> tuple[int, float]:
        """Every prompt's GENERATIONS completions, `per_batch` prompts a generate call; returns
        (generated tokens, seconds)."""
        import torch

        torch.set_num_threads(threads)
        tokens, t0 = 0, time.perf_counter()
        for i in range(0, len(prompts), per_batch):
            chunk = prompts[i:i + per_batch]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[self.pad] * (width - len(p)) + list(p) for p in chunk])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
            with torch.no_grad():
                out = self.model.generate(ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                          top_k=0, num_return_sequences=GENERATIONS, max_new_tokens=MAX_COMPLETION,
                                          min_new_tokens=MAX_COMPLETION, pad_token_id=self.pad,
                                          eos_token_id=self.tok.eos_token_id)
            assert out.shape == (len(chunk) * GENERATIONS, width + MAX_COMPLETION), out.shape
            tokens += out.shape[0] * MAX_COMPLETION
        return tokens, time.perf_counter() - t0


def _direct_generate(engine, prompt_ids: list[list[int]], n: int, max_tokens: int, seeds, logprobs: bool
                     ) -> tuple[int, float]:
    """Run inside a RolloutEngine actor (`__ray_call__`): its vLLM `LLM` called directly, as
    RolloutEngine.generate calls it but with the seeds and log-probs optional (the diagnostics)."""
    from vllm import SamplingParams, TokensPrompt

    t0 = time.perf_counter()
    params = [SamplingParams(n=n, temperature=1.0, top_p=1.0, max_tokens=max_tokens, ignore_eos=True,
                             logprobs=0 if logprobs else None, seed=s) for s in seeds]
    outs = engine.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], sampling_params=params,
                               use_tqdm=False)
    return sum(len(c.token_ids) for o in outs for c in o.outputs), time.perf_counter() - t0


DIAGNOSTICS = {"no per-request seeds": dict(seeded=False, logprobs=True),
               "no per-request seeds, no log-probs": dict(seeded=False, logprobs=False)}


def measure(folder: str, model_note: str, engines: dict[str, list[str]], batch_prompts: list[int], repeats: int,
            diagnostics: str | None = None) -> dict:
    """One model: a RolloutPool per engine variant (configs/grpo.yaml plus its overrides) and
    transformers at each batch size, alternating within every round; medians over the rounds."""
    import ray
    import torch

    from raylm.cluster import init_ray
    from raylm.config import load_config
    from raylm.train.rollouts import RolloutPool, rollout_engine_kwargs

    prompts = prompt_ids(folder)
    base = [f"model.name={folder}", f"train.grpo.max_completion_length={MAX_COMPLETION}", "train.grpo.temperature=1.0",
            "train.grpo.top_p=1.0", f"train.grpo.num_generations={GENERATIONS}",
            f"data.seq_len={max(48, max(len(p) for p in prompts))}"]  # configs/grpo.yaml's 48, or the longest prompt
    cfgs = {name: load_config(str(REPO / "configs" / "grpo.yaml"), base + extra) for name, extra in engines.items()}
    assert all(max(len(p) for p in prompts) <= c.data.seq_len for c in cfgs.values())
    init_ray(next(iter(cfgs.values())), address="local", num_cpus=max(2, len(cfgs)))  # a private cluster
    pools, start_s = {}, {}
    for name, cfg in cfgs.items():  # one engine starting at a time
        pools[name] = RolloutPool(cfg, folder)  # the folder's weights (the loop: config + tokenizer, then a sync)
        start_s[name] = pools[name].wait_ready()
    first = next(iter(pools.values()))
    engine_threads = ray.get(first.engines[0].__ray_call__.remote(lambda self: __import__("torch").get_num_threads()))
    hf = Transformers(folder)
    cores = os.cpu_count() or 1
    default_threads = torch.get_num_threads() if torch.get_num_threads() != engine_threads else None

    def raylm_round(pool, r: int) -> dict:
        seeds = [r * 1000 + i for i in range(len(prompts))]
        t = time.perf_counter()
        batch = pool.generate(prompts, seeds, ignore_eos=True)
        wall = time.perf_counter() - t
        assert all(len(c) == MAX_COMPLETION for ro in batch.rollouts for c in ro.completion_ids)
        return {"tokens": batch.tokens, "wall_s": wall, "engine_s": batch.seconds, "load_1m": os.getloadavg()[0]}

    for pool in pools.values():  # warm-up
        raylm_round(pool, -1)
    for per in batch_prompts:
        hf.round(prompts[:per], per, engine_threads)
    def diagnostic_round(r: int, seeded: bool, logprobs: bool) -> dict:
        seeds = [r * 1000 + i for i in range(len(prompts))] if seeded else [None] * len(prompts)
        tokens, seconds = ray.get(pools[diagnostics].engines[0].__ray_call__.remote(
            _direct_generate, prompts, GENERATIONS, MAX_COMPLETION, seeds, logprobs))
        assert tokens == len(prompts) * GENERATIONS * MAX_COMPLETION
        return {"tokens": tokens, "wall_s": seconds, "load_1m": os.getloadavg()[0]}

    if diagnostics:
        for how in DIAGNOSTICS.values():
            diagnostic_round(-1, **how)
    rounds: dict[str, list] = {f"raylm {name}": [] for name in pools}
    skipped_default = None
    for r in range(repeats):
        for name, pool in pools.items():
            rounds[f"raylm {name}"].append(raylm_round(pool, r))
        for label, how in (DIAGNOSTICS.items() if diagnostics else ()):
            rounds.setdefault(f"diagnostic {label}", []).append(diagnostic_round(r, **how))
        for per in batch_prompts:
            for threads in [engine_threads] + ([default_threads] if default_threads else []):
                if threads != engine_threads:
                    load = os.getloadavg()[0]
                    if load >= cores:
                        skipped_default = f"load average {load:.1f} >= {cores} cores"
                        continue
                tokens, seconds = hf.round(prompts, per, threads)
                rounds.setdefault(f"transformers b{per} t{threads}", []).append(
                    {"tokens": tokens, "wall_s": seconds, "load_1m": os.getloadavg()[0]})
        print(f"round {r}:", {k: round(v[-1]["tokens"] / v[-1]["wall_s"]) for k, v in rounds.items() if v}, flush=True)
    kwargs = {name: {k: str(v) for k, v in rollout_engine_kwargs(cfg).items()} for name, cfg in cfgs.items()}
    for pool in pools.values():
        pool.shutdown()
    ray.shutdown()

    def median_tps(key: str, field: str = "wall_s") -> float:
        return statistics.median(x["tokens"] / x[field] for x in rounds[key])

    def median_s(key: str, field: str = "wall_s") -> float:
        return statistics.median(x[field] for x in rounds[key])

    hf_keys = [k for k in rounds if k.startswith("transformers") and len(rounds[k]) >= repeats // 2 + 1]
    best = max(hf_keys, key=median_tps)
    main = f"raylm {next(iter(pools))}"
    rows = []
    for name in pools:
        key = f"raylm {name}"
        rows.append([f"raylm RolloutPool.generate, {name}", f"{engine_threads} (engine)", median_s(key),
                     median_tps(key), ratio(median_tps(key), median_tps(best))])
        rows.append(["  the same, engine's own seconds (the loop's rollout_tokens_per_s)", f"{engine_threads} (engine)",
                     median_s(key, "engine_s"), median_tps(key, "engine_s"), ratio(median_tps(key, "engine_s"),
                                                                                 median_tps(best))])
    for label in (DIAGNOSTICS if diagnostics else ()):
        key = f"diagnostic {label}"
        rows.append([f"diagnostic, not raylm's path: the {diagnostics} engine's LLM.generate, {label} "
                     "(engine's own seconds)", f"{engine_threads} (engine)", median_s(key), median_tps(key),
                     ratio(median_tps(key), median_tps(best))])
    for key in hf_keys:
        per, threads = key.split()[1][1:], key.split()[2][1:]
        rows.append([f"transformers generate, {per} prompt(s) x {GENERATIONS} a call", threads, median_s(key),
                     median_tps(key), ratio(median_tps(key), median_tps(best))])
    return {"model": model_note, "folder": folder, "rows": rows, "best_transformers": best, "main": main,
            "speedup": ratio(median_tps(main), median_tps(best)),
            "best_raylm": max((f"raylm {n}" for n in pools), key=median_tps),
            "tps": {k: median_tps(k) for k in rounds if len(rounds[k]) >= repeats // 2 + 1},
            "prompt_tokens": [len(p) for p in prompts], "engine_threads": engine_threads, "engine_start_s": start_s,
            "engine_kwargs": kwargs, "rounds": rounds, "transformers_default_threads_skipped": skipped_default,
            "cores": cores}


DEFAULT_ENGINE = "configs/grpo.yaml's engine (max_num_seqs 64: two waves of 64)"
WIDE_ENGINE = "serve.max_num_seqs 128 (all 128 at once)"


def run(args) -> dict:
    from serve_bench import make_checkpoint

    repeats = 3 if args.quick else 5
    folder, note = base_model(args.workdir)
    engines = {DEFAULT_ENGINE: [], WIDE_ENGINE: ["serve.max_num_seqs=128"]}
    models = [measure(folder, note, engines, [4, 16] if args.quick else [1, 4, 16], repeats, WIDE_ENGINE)]
    if not args.quick:  # a compute-bound model: small-llama, 85M, random weights (the serving benches')
        small = make_checkpoint(args.workdir)
        # its fp32 KV is 72 KiB a token: 128 x 112 tokens need ~1 GiB (configs/grpo.yaml's 0.1 GiB is the tiny model's)
        models.append(measure(small, "small-llama (85M, random weights, raylm's 2048-token BPE)",
                              {k: v + ["serve.kv_cache_memory_gib=1.5"] for k, v in engines.items()}, [4, 16],
                              max(3, repeats - 2)))
    goal_model = models[0]
    tables, goals = [], []
    for m in models:
        tables.append({"name": f"{m['model']}; {PROMPTS} prompts x {GENERATIONS}, {MAX_COMPLETION} new tokens each "
                               f"({PROMPTS * GENERATIONS * MAX_COMPLETION} a round), median of "
                               f"{len(m['rounds'][m['main']])} rounds",
                       "columns": ["path", "compute threads", "round s", "tokens/s", "this / transformers' best"],
                       "rows": m["rows"],
                       "note": f"transformers at torch's default threads: skipped "
                               f"({m['transformers_default_threads_skipped']})."
                       if m["transformers_default_threads_skipped"] else ""})
    for m in models:
        best, main = m["best_transformers"], m["main"]
        per, threads = best.split()[1][1:], best.split()[2][1:]
        goals.append({"goal": f"rollout tokens/s at max_completion_length {MAX_COMPLETION} >= {GOAL:g}x transformers "
                              f"generate, same prompts and sampling (its best batch size); {m['model'].split(' (')[0]}",
                      "value": f"{m['speedup']:.2f}x ({m['tps'][main]:.0f} vs {m['tps'][best]:.0f} tokens/s, "
                               f"{per} prompts x {GENERATIONS} a call, {threads} thread(s)); with "
                               f"{WIDE_ENGINE}: {ratio(m['tps']['raylm ' + WIDE_ENGINE], m['tps'][best]):.2f}x",
                      "met": m["speedup"] >= GOAL})
    return {
        "title": "GRPO rollout tokens/s: raylm's rollout engine vs transformers generate (issue 33 item 10)",
        "note": __doc__.split("\n\n", 1)[1].split("\n\n    python")[0].strip(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "tables": tables, "goals": goals,
        "raw": {"models": models, "goal_model": goal_model["model"], "load_avg_end": os.getloadavg()},
    }


if __name__ == "__main__":
    stage_main(run)
