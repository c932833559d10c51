"""ZeRO-3 host memory, measured as growth (issue 32, item 11): on 2 workers, each worker's peak RSS
minus its RSS before the model is built (the imports are the same in every run), for a 12-layer
model (small-llama, wider MLP: ~0.11B) trained 3 steps:

    zero0               ZeRO-0 as raylm runs it: every rank holds the whole model, its gradients and
                        Adam state (16 bytes a parameter in fp32); glibc's own malloc threshold
    zero0-mmap          the same with train.cpu_mmap_threshold_kib=128 (the allocator zero3 runs with)
    zero3               ZeRO-3 as raylm runs it: built partitioned (`deepspeed.zero.Init`), gathered
                        layers released (deepspeed.stage3_max_live_parameters / _max_reuse_distance /
                        _prefetch_bucket_size), gradient bucket and optimizer piece bounded
                        (stage3_reduce_bucket_size, stage3_sub_group_size), the fp32 master sharing the
                        partition, and freed blocks >= 128 KiB returned (train.cpu_mmap_threshold_kib)
    zero3-glibc         zero3 with glibc's own malloc threshold (train.cpu_mmap_threshold_kib=0)
    zero3-ds-defaults   zero3 with DeepSpeed's defaults for the five limits (1e9 live, 1e9 reuse distance,
                        5e7 prefetch, 5e8 reduce bucket, 1e9 sub group)
    zero3-whole         zero3, but built whole on every rank and partitioned by `deepspeed.initialize`
                        (raylm before issue 21: `_engine_before` below, kept here, not in the platform)

Goals: zero3's growth <= 0.6x zero0's; zero3's <= 0.6x zero3-whole's. Each worker reads its own
kernel high-water mark (VmHWM: nothing a sampler could miss) after the engine is built and after
the last step, and its VmRSS at the start of the worker function.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CORPUS, bench_tokenizer, stage_main  # noqa: E402
from report import ratio  # noqa: E402

MODEL = "small-llama"  # 12 layers, hidden 768
OVERRIDES = {"intermediate_size": 3072}
QUICK_OVERRIDES = {"intermediate_size": 1024, "hidden_size": 384, "num_attention_heads": 6, "num_key_value_heads": 6}
STEPS = 3
GOAL = 0.6
DS_DEFAULTS = {"deepspeed.stage3_max_live_parameters": 10**9, "deepspeed.stage3_max_reuse_distance": 10**9,
               "deepspeed.stage3_prefetch_bucket_size": 5 * 10**7, "deepspeed.stage3_reduce_bucket_size": 5 * 10**8,
               "deepspeed.stage3_sub_group_size": 10**9}
VARIANTS = {"zero0": {"deepspeed.zero_stage": 0},
            "zero0-mmap": {"deepspeed.zero_stage": 0, "train.cpu_mmap_threshold_kib": 128},
            "zero3": {}, "zero3-glibc": {"train.cpu_mmap_threshold_kib": 0},
            "zero3-ds-defaults": DS_DEFAULTS, "zero3-whole": {}}
LABELS = {"zero0": "ZeRO-0 (glibc's malloc threshold, raylm's default under ZeRO-0)",
          "zero0-mmap": "ZeRO-0, cpu_mmap_threshold_kib=128",
          "zero3": "ZeRO-3 as raylm runs it (built partitioned, its limits, mmap threshold 128 KiB)",
          "zero3-glibc": "ZeRO-3, glibc's malloc threshold (cpu_mmap_threshold_kib=0)",
          "zero3-ds-defaults": "ZeRO-3, DeepSpeed's defaults for the five limits",
          "zero3-whole": "ZeRO-3, built whole then partitioned (raylm before issue 21)"}


def bench_config(tokenizer_dir: str, storage: str, overrides: dict, variant: str):
    from raylm.config import load_config

    return load_config(str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"), [
        f"data.source={CORPUS}", f"data.tokenizer={tokenizer_dir}", "data.seq_len=128",
        f"model.name={MODEL}", f"model.overrides={json.dumps(overrides)}",
        "train.num_workers=2", "train.cpus_per_worker=1", "train.micro_batch_size=1", "train.grad_accum_steps=1",
        f"train.max_steps={STEPS}", "train.warmup_steps=1", f"train.storage_path={storage}", "train.max_failures=0",
        f"train.run_name={variant}", "deepspeed.zero_stage=3", *(f"{k}={v}" for k, v in VARIANTS[variant].items()),
    ])


def _engine_before(cfg, tokenizer):
    """raylm's `_engine` before issue 21: every rank builds the whole fp32 model, then
    `deepspeed.initialize` partitions it."""
    import torch

    from raylm.model import build_model
    from raylm.train.deepspeed import cpu_mmap_threshold, deepspeed_config, import_deepspeed, share_fp32_master

    cpu_mmap_threshold(cfg.cpu_mmap_kib)  # as raylm's _engine: only the build path differs
    deepspeed = import_deepspeed()
    from raylm.train.lora import apply_lora

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, len(tokenizer), cfg.data.seq_len, tokenizer)
    if cfg.train.lora:
        model = apply_lora(model, cfg.train.lora)
    deepspeed.init_distributed(dist_backend="gloo")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           config=deepspeed_config(cfg))
    share_fp32_master(engine.optimizer)
    return engine


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def train_fn(config: dict) -> None:
    """Ray Train worker: build the engine as the variant says, train STEPS steps, record RSS."""
    import torch
    import torch.distributed as dist

    from raylm.config import RaylmConfig
    from raylm.data import load_tokenizer
    from raylm.train.loop import _engine
    from raylm.train.step import train_step

    cfg = RaylmConfig.model_validate(config["config"])
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    start_mib = _status_mib("VmRSS")  # torch, DeepSpeed, transformers, Ray imported; no model yet
    t0 = time.perf_counter()
    engine = _engine_before(cfg, tokenizer) if config["variant"] == "zero3-whole" else _engine(cfg, tokenizer)[0]
    build_s, built_mib = time.perf_counter() - t0, _status_mib("VmHWM")
    rank, world = dist.get_rank(), dist.get_world_size()
    blocks = torch.tensor(config["blocks"], dtype=torch.long)[rank::world]
    t0 = time.perf_counter()
    for step in range(cfg.train.max_steps):
        result = train_step(engine, [{"input_ids": blocks[step:step + 1]}])
    peak = _status_mib("VmHWM")
    record = {"rank": rank, "build_s": build_s, "start_mib": start_mib, "built_peak_mib": built_mib, "peak_mib": peak,
              "growth_mib": peak - start_mib, "build_growth_mib": built_mib - start_mib,
              "train_s": time.perf_counter() - t0, "loss": result.loss_sum / max(result.global_tokens, 1)}
    with open(os.path.join(config["out"], f"{config['variant']}-rank{rank}.json"), "w") as f:
        json.dump(record, f)


def _run(cfg, variant: str, blocks: list, out_dir: str, attempts: int = 2) -> list[dict]:
    """One run; run again once if it failed (on a shared machine Ray's memory monitor may kill the
    workers when others fill the memory)."""
    for attempt in range(attempts):
        try:
            return _run_once(cfg, variant, blocks, out_dir)
        except Exception as exc:  # noqa: BLE001 - the last attempt raises
            if attempt == attempts - 1:
                raise
            print(f"{variant}: {type(exc).__name__}: {str(exc)[:300]}; running it again", flush=True)
    raise AssertionError("unreachable")


def _run_once(cfg, variant: str, blocks: list, out_dir: str) -> list[dict]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raylm.cluster import worker_env

    t = cfg.train
    trainer = TorchTrainer(
        train_fn, train_loop_config={"config": cfg.model_dump(mode="json"), "variant": variant, "blocks": blocks,
                                     "out": out_dir},
        scaling_config=ScalingConfig(num_workers=t.num_workers, resources_per_worker={"CPU": t.cpus_per_worker}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=f"{variant}-{t.run_name}", storage_path=t.storage_path,
                             worker_runtime_env={"env_vars": worker_env(False)}))
    result = trainer.fit()
    if result.error:
        raise result.error
    return [json.loads(Path(out_dir, f"{variant}-rank{r}.json").read_text()) for r in range(t.num_workers)]


def _count(cfg, vocab: int) -> int:
    """Parameters of the model (a meta-device build: nothing allocated)."""
    import torch
    from transformers import AutoModelForCausalLM

    from raylm.model import count_params, preset_config

    with torch.device("meta"):
        return count_params(AutoModelForCausalLM.from_config(preset_config(MODEL, vocab, 128, None, cfg.model.overrides)))


def run(args) -> dict:
    import psutil

    from common import start_ray
    from raylm.data import load_tokenizer

    overrides = QUICK_OVERRIDES if args.quick else OVERRIDES
    tokenizer_dir = bench_tokenizer(os.path.join(args.workdir, "tok"))
    tokenizer = load_tokenizer(tokenizer_dir)
    ids = tokenizer(CORPUS.read_text()[:200_000])["input_ids"]
    blocks = [ids[i * 129:(i + 1) * 129] for i in range(2 * STEPS)]  # seq_len + 1 tokens each
    available_gib = psutil.virtual_memory().available / 2**30
    ray = start_ray(num_cpus=4)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    runs: dict[str, list[dict]] = {}
    n_params = 0
    for variant in VARIANTS:
        cfg = bench_config(tokenizer_dir, os.path.join(args.workdir, "runs"), overrides, variant)
        n_params = _count(cfg, len(tokenizer))
        done = [Path(args.workdir, f"{variant}-rank{r}.json") for r in range(cfg.train.num_workers)]
        if all(f.exists() for f in done):  # measured by an earlier run in this --workdir (resumed)
            runs[variant] = [json.loads(f.read_text()) for f in done]
        else:
            runs[variant] = _run(cfg, variant, blocks, args.workdir)
        print(variant, runs[variant], flush=True)
    ray.shutdown()
    return _report(runs, n_params, overrides, len(tokenizer), available_gib)


def _report(runs: dict, n_params: int, overrides: dict, vocab: int, available_gib: float) -> dict:
    """One row per variant; each goal on the larger worker's growth."""
    worst = {v: {k: max(r[k] for r in rs) for k in ("growth_mib", "build_growth_mib", "peak_mib")}
             for v, rs in runs.items()}
    rows = [[LABELS[v], *(", ".join(f"{r[k]:.0f}" for r in rs) for k in ("start_mib", "build_growth_mib", "growth_mib")),
             f"{ratio(worst[v]['growth_mib'], worst['zero0']['growth_mib']):.2f}",
             f"{ratio(worst[v]['growth_mib'], worst['zero3-whole']['growth_mib']):.2f}",
             f"{max(r['build_s'] for r in rs):.0f}", f"{max(r['train_s'] for r in rs):.0f}",
             ", ".join(f"{r['loss']:.4f}" for r in rs)] for v, rs in runs.items()]
    size = f"{n_params / 1e9:.2f}B"
    z3, z0, z0m, glibc, whole, dflt = (worst[v]["growth_mib"] for v in
                                       ("zero3", "zero0", "zero0-mmap", "zero3-glibc", "zero3-whole", "zero3-ds-defaults"))
    per = lambda mib: f"{mib:.0f} MiB ({mib * 2**20 / n_params:.1f} bytes a parameter)"  # noqa: E731
    goals = [{"goal": f"ZeRO-3 growth per worker <= {GOAL}x ZeRO-0's ({size}, 2 workers, each as raylm runs it)",
              "value": f"{ratio(z3, z0):.2f}x (against ZeRO-0 with the same malloc threshold: {ratio(z3, z0m):.2f}x)",
              "met": ratio(z3, z0) <= GOAL},
             {"goal": f"ZeRO-3 built partitioned: growth <= {GOAL}x of building whole",
              "value": f"{ratio(z3, whole):.2f}x", "met": ratio(z3, whole) <= GOAL}]
    findings = [
        f"growth per worker: ZeRO-0 {per(z0)} ({per(z0m)} with the 128 KiB threshold); ZeRO-3 {per(z3)}; with glibc's "
        f"own threshold {per(glibc)}; with DeepSpeed's defaults for the five limits {per(dflt)}",
        f"building whole then partitioning: {per(whole)} (its build alone "
        f"{worst['zero3-whole']['build_growth_mib']:.0f} MiB, against {worst['zero3']['build_growth_mib']:.0f} MiB "
        f"built partitioned): training state, not the load, sets the peak on CPU"]
    return {
        "title": "8. ZeRO-3 host memory: growth per worker, ZeRO-0 vs ZeRO-3 (issue 32)",
        "note": (f"Model: {MODEL} with {json.dumps(overrides)} ({n_params / 1e6:.0f}M parameters, 12 layers), vocab "
                 f"{vocab}, fp32, full fine-tuning; 2 Ray Train workers x 1 thread, seq_len 128, micro-batch 1, "
                 f"{STEPS} steps. Growth: a worker's VmHWM after the last step minus its VmRSS at the start of the "
                 f"worker function (libraries imported, no model); 'build' is VmHWM once the engine is built minus "
                 f"the same start. One number per worker (rank 0, rank 1); ratios on the larger worker. "
                 f"{available_gib:.1f} GiB available at start."),
        "tables": [{"columns": ["run", "start RSS (MiB/worker)", "build growth", "growth (peak - start)",
                                "x ZeRO-0", "x built whole", "build s", f"{STEPS} steps s", "loss, last step"],
                    "rows": rows}],
        "goals": goals,
        "findings": findings,
        "raw": {"runs": runs, "params": n_params, "overrides": overrides, "available_gib_at_start": available_gib},
    }


if __name__ == "__main__":
    stage_main(run)
