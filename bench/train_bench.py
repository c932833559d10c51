"""Training: tokens/s of `raylm train` (Ray Train + DeepSpeed ZeRO 1/2/3, 2 CPU workers) versus a
plain single-process PyTorch loop, with bare DeepSpeed under Ray Train in between.

Same model (tiny-llama widened via model.overrides), same tokenized blocks, same global batch
(2 workers x micro-batch 8 = 16 sequences of 128 tokens), same threads in total (2).

- plain: one process, `torch.set_num_threads(2)`, AdamW + grad clipping + warm-up/cosine LR,
  batches sliced from an in-memory array. Run before and after the Ray runs (machine drift).
- bare DeepSpeed: a minimal `train_fn` under Ray Train: raylm's model and DeepSpeed dict,
  in-memory tensors, no Ray Data, no metrics, no eval, no checkpoints, one report at the end.
- raylm: `raylm.train.driver.build_trainer(...).fit()` exactly as `raylm train` runs it: Ray Data
  shards, metrics reports, eval and checkpoints (with HF export) every `EVERY` steps.

Throughput is measured the same way on all three: global tokens between the end of step
`WARMUP` and the end of the last step, divided by the wall time between them (for raylm, from
the `time` of its metrics.jsonl records, written after each report, so every eval, checkpoint
and report inside the window is included). Start-up (worker launch, DeepSpeed init, first
steps) is excluded and reported separately as fit wall time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CORPUS, WorkerMemory, bench_tokenizer, own_peak_rss_mib, stage_main  # noqa: E402
from report import ratio  # noqa: E402

MODEL_OVERRIDES = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "num_key_value_heads": 4}
ROUNDS = 2  # full mode: bare DeepSpeed and raylm alternate this many times per ZeRO stage (means compared)
WARMUP = 5  # steps excluded from the measured window (== train.log_every_steps)
REFERENCE_BARE = {1: 1.16, 2: 0.94, 3: 0.90}  # bare DeepSpeed vs plain loop, as measured before (issue 7)
GOALS = {1: 1.0, 2: 1.0, 3: 0.9}


def bench_config(tokenizer_dir: str, storage: str, zero: int, max_steps: int, every: int):
    from raylm.config import load_config

    return load_config(str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"), [
        f"data.source={CORPUS}", f"data.tokenizer={tokenizer_dir}", "data.seq_len=128",
        f"model.overrides={json.dumps(MODEL_OVERRIDES)}",
        "train.num_workers=2", "train.cpus_per_worker=1", "train.micro_batch_size=8", "train.grad_accum_steps=1",
        f"train.max_steps={max_steps}", f"train.log_every_steps={WARMUP}", f"train.eval_every_steps={every}",
        f"train.checkpoint_every_steps={every}", "train.eval_batches=4", "train.keep_checkpoints=2",
        f"train.storage_path={storage}", f"train.run_name=zero{zero}", "train.max_failures=0",
        f"deepspeed.zero_stage={zero}",
    ])


# ------------------------------------------------------------------ plain PyTorch loop (subprocess)


def plain_loop(config: dict, blocks_path: str, threads: int) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from raylm.config import RaylmConfig
    from raylm.model import build_model
    from raylm.train.deepspeed import lr_factor

    config = dict(config)
    vocab = int(config.pop("_vocab"))
    cfg = RaylmConfig.model_validate(config)
    t = cfg.train
    torch.set_num_threads(threads)
    blocks = torch.from_numpy(np.load(blocks_path).astype(np.int64))
    torch.manual_seed(t.seed)
    model = build_model(cfg.model, vocab, cfg.data.seq_len)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8,
                            weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, t))  # raylm's schedule
    gb = t.effective_global_batch
    t_first = None
    t0 = time.perf_counter()
    for step in range(1, t.max_steps + 1):
        i = ((step - 1) * gb) % (len(blocks) - gb)
        batch = blocks[i:i + gb]
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        float(loss)
        if step == WARMUP:
            t_first = time.perf_counter()
    t_last = time.perf_counter()
    tokens = (t.max_steps - WARMUP) * gb * cfg.data.seq_len
    return {"tokens_per_s": tokens / (t_last - t_first), "window_s": t_last - t_first, "total_s": t_last - t0,
            "peak_rss_mib": own_peak_rss_mib(), "threads": threads, "final_loss": float(loss)}


def _run_plain(cfg, vocab: int, blocks_path: str, threads: int) -> dict:
    conf = dict(cfg.model_dump(mode="json"), _vocab=vocab)
    code = ("import json, sys; sys.path.insert(0, 'bench'); from train_bench import plain_loop; "
            f"print('RESULT', json.dumps(plain_loop(json.loads({json.dumps(json.dumps(conf))}), {blocks_path!r}, {threads})))")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parent.parent)
    if out.returncode:
        raise RuntimeError(f"plain loop failed: {out.stderr[-2000:]}")
    return json.loads(next(l for l in out.stdout.splitlines() if l.startswith("RESULT ")).removeprefix("RESULT "))


# ------------------------------------------------------------------ bare DeepSpeed under Ray Train


def bare_train_fn(config: dict) -> None:
    """Ray Train worker: DeepSpeed on raylm's model and config, fed from in-memory tensors."""
    import numpy as np
    import ray.train
    import torch
    import torch.distributed as dist

    from raylm.config import RaylmConfig
    from raylm.model import build_model
    from raylm.train.deepspeed import deepspeed_config, import_deepspeed, lr_scheduler

    deepspeed = import_deepspeed()  # as raylm's loop imports it
    from raylm.train.objectives.lm import token_losses

    cfg = RaylmConfig.model_validate(config["config"])
    t = cfg.train
    torch.set_num_threads(max(1, int(t.cpus_per_worker)))
    torch.manual_seed(t.seed)
    model = build_model(cfg.model, int(config["vocab"]), cfg.data.seq_len)
    deepspeed.init_distributed(dist_backend="gloo")
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                           config=deepspeed_config(cfg), lr_scheduler=lr_scheduler(cfg))
    rank, world = dist.get_rank(), dist.get_world_size()
    blocks = torch.from_numpy(np.asarray(config["blocks"], dtype=np.int64)[rank::world])
    mb = t.micro_batch_size
    t_first = None
    for step in range(1, t.max_steps + 1):
        i = ((step - 1) * mb) % (len(blocks) - mb)
        total, count = token_losses(engine, {"input_ids": blocks[i:i + mb]})
        loss = total / count  # equal-length blocks: the per-token mean, no all-reduce needed
        engine.backward(loss)
        engine.step()
        float(loss.detach())
        if step == WARMUP:
            t_first = time.time()
    t_last = time.time()
    if rank == 0:  # Train V2's Result carries metrics only with a checkpoint: hand them over in a file
        with open(config["out"], "w") as f:
            json.dump({"t_first": t_first, "t_last": t_last, "loss": float(loss.detach())}, f)


def _run_bare(cfg, vocab: int, blocks) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raylm.cluster import worker_env

    t = cfg.train
    out = os.path.join(t.storage_path, f"bare-{t.run_name}.json")
    trainer = TorchTrainer(
        bare_train_fn,
        train_loop_config={"config": cfg.model_dump(mode="json"), "vocab": vocab, "blocks": blocks, "out": out},
        scaling_config=ScalingConfig(num_workers=t.num_workers, resources_per_worker={"CPU": t.cpus_per_worker}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=f"bare-{t.run_name}", storage_path=t.storage_path,
                             worker_runtime_env={"env_vars": worker_env(False)}),
    )
    with WorkerMemory() as mem:
        t0 = time.perf_counter()
        result = trainer.fit()
        fit_s = time.perf_counter() - t0
    if result.error:
        raise result.error
    with open(out) as f:
        m = json.load(f)
    tokens = (t.max_steps - WARMUP) * t.effective_global_batch * cfg.data.seq_len
    return {"tokens_per_s": tokens / (m["t_last"] - m["t_first"]), "window_s": m["t_last"] - m["t_first"],
            "fit_s": fit_s, "peak_rss_mib": mem.per_worker_mib(), "final_loss": m["loss"]}


# ------------------------------------------------------------------ raylm train


def _run_raylm(cfg, prepared) -> dict:
    from raylm.train.driver import build_trainer, check_data_fits

    check_data_fits(cfg, prepared)
    with WorkerMemory() as mem:
        t0 = time.perf_counter()
        result = build_trainer(cfg, prepared).fit()
        fit_s = time.perf_counter() - t0
    if result.error:
        raise result.error
    path = Path(cfg.train.storage_path, cfg.train.run_name, "metrics.jsonl")
    records = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    records = [r for r in records if "step" in r and "time" in r]
    first = next(r for r in records if r["step"] == WARMUP)
    last = records[-1]
    t = cfg.train
    tokens = (last["step"] - first["step"]) * t.effective_global_batch * cfg.data.seq_len
    window = last["time"] - first["time"]
    # time inside the window spent on steps (the loop's own tokens_per_s covers only steps)
    step_s = sum(t.log_every_steps * t.effective_global_batch * cfg.data.seq_len / r["tokens_per_s"]
                 for r in records if r["step"] > WARMUP and r.get("tokens_per_s"))
    # evaluation is work the plain loop and bare DeepSpeed do not do: timed by the loop, taken out
    eval_s = sum(r.get("eval_s", 0.0) for r in records if r["step"] > WARMUP)
    return {"tokens_per_s": tokens / window, "window_s": window, "fit_s": fit_s,
            "tokens_per_s_no_eval": tokens / (window - eval_s), "eval_s": eval_s,
            "save_s": sum(r.get("save_s", 0.0) for r in records if r["step"] > WARMUP),
            "step_only_tokens_per_s": tokens / step_s if step_s else None,
            "non_step_s": window - step_s, "peak_rss_mib": mem.per_worker_mib(),
            "checkpoints": sum(1 for r in records if r.get("checkpoint")), "final_loss": last.get("loss"),
            "val_loss": last.get("val_loss")}


def _mean_of(runs: list[dict]) -> dict:
    """Repeated runs of one kind as one: float fields averaged, each run's tokens/s kept."""
    out = dict(runs[-1])
    for key, value in runs[-1].items():
        if isinstance(value, float):
            out[key] = sum(r[key] for r in runs) / len(runs)
    out["rounds_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
    return out


def _rounds(r: dict) -> str:
    return " / ".join(f"{x:.0f}" for x in r["rounds_tokens_per_s"])


def _findings(runs: dict) -> list[str]:
    out = []
    for zero, r in runs.items():
        y, b = r["raylm"], r["bare"]
        line = (f"ZeRO-{zero}: raylm's training steps alone ran at {y['step_only_tokens_per_s']:.0f} tokens/s"
                + (f" (bare DeepSpeed {b['tokens_per_s']:.0f})" if b else "")
                + f"; {y['non_step_s']:.1f}s of its {y['window_s']:.1f}s window went to evaluations "
                f"({y['eval_s']:.1f}s), {y['checkpoints']} checkpoint save(s) ({y['save_s']:.1f}s: DeepSpeed state "
                f"of every rank + HF export) and reports (the rest, checkpoint copies to storage included)")
        out.append(line)
    return out


def run(args) -> dict:
    import numpy as np

    from common import start_ray

    max_steps, every = (30, 15) if args.quick else (60, 20)
    storage = os.path.join(args.workdir, "runs")
    tokenizer_dir = bench_tokenizer(os.path.join(args.workdir, "tok"))
    ray = start_ray(num_cpus=4)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    from raylm.data import load_tokenizer, prepare_data

    base = bench_config(tokenizer_dir, storage, 2, max_steps, every)
    prepared = prepare_data(base.data, verbose=False)
    vocab = len(load_tokenizer(tokenizer_dir))
    need = max_steps * base.train.effective_global_batch + base.train.effective_global_batch
    blocks = np.stack([np.asarray(r["input_ids"], dtype=np.int32) for r in prepared.train.take(need)])
    blocks_path = os.path.join(args.workdir, "blocks.npy")
    np.save(blocks_path, blocks)

    plain = [_run_plain(base, vocab, blocks_path, threads=2)]
    print("plain:", plain[-1], flush=True)
    runs: dict[int, dict] = {}
    for zero in (1, 2, 3):
        cfg = bench_config(tokenizer_dir, storage, zero, max_steps, every)
        # --quick: one raylm run, no bare DeepSpeed; full: bare and raylm alternate ROUNDS times
        bare, mine = [], []
        for i in range(1 if args.quick else ROUNDS):
            # a fresh run name each round: the same name would resume the previous round's checkpoint
            run = cfg.model_copy(update={"train": cfg.train.model_copy(update={"run_name": f"zero{zero}-{i}"})})
            if not args.quick:
                bare.append(_run_bare(run, vocab, blocks))
            mine.append(_run_raylm(run, prepared))
        runs[zero] = {"bare": _mean_of(bare) if bare else None, "raylm": _mean_of(mine)}
        print(f"zero{zero}:", runs[zero], flush=True)
    plain.append(_run_plain(base, vocab, blocks_path, threads=2))
    print("plain:", plain[-1], flush=True)
    ray.shutdown()

    plain_tps = sum(p["tokens_per_s"] for p in plain) / len(plain)
    rows, mem_rows, goals = [], [], []
    rows.append(["plain PyTorch loop (1 process, 2 threads)", "-", plain_tps, 1.0, "-",
                 " / ".join(f"{p['tokens_per_s']:.0f}" for p in plain)])
    for zero, r in runs.items():
        b, y = r["bare"], r["raylm"]
        if b:
            rows.append([f"bare DeepSpeed under Ray Train, ZeRO-{zero}", zero, b["tokens_per_s"],
                         ratio(b["tokens_per_s"], plain_tps), f"{REFERENCE_BARE[zero]:.2f}x (issue)",
                         f"fit {b['fit_s']:.0f}s; rounds {_rounds(b)}"])
        rows.append([f"raylm train, ZeRO-{zero}", zero, y["tokens_per_s"], ratio(y["tokens_per_s"], plain_tps),
                     f"{ratio(y['tokens_per_s'], b['tokens_per_s']):.2f}x of bare" if b else "-",
                     f"fit {y['fit_s']:.0f}s; steps only {y['step_only_tokens_per_s']:.0f} tok/s; "
                     f"eval+ckpt+reports {y['non_step_s']:.1f}s of {y['window_s']:.1f}s; rounds {_rounds(y)}"])
        no_eval = y["tokens_per_s_no_eval"]
        rows.append([f"raylm train, ZeRO-{zero}, evaluation time taken out", zero, no_eval, ratio(no_eval, plain_tps),
                     f"{ratio(no_eval, b['tokens_per_s']):.2f}x of bare" if b else "-",
                     f"Ray Data feed, metrics, {y['checkpoints']} checkpoints and reports kept"])
        mem_rows.append([f"ZeRO-{zero}", ", ".join(f"{m:.0f}" for m in y["peak_rss_mib"]),
                         ", ".join(f"{m:.0f}" for m in b["peak_rss_mib"]) if b else "-",
                         f"{plain[0]['peak_rss_mib']:.0f}"])
        value = ratio(y["tokens_per_s_no_eval"], plain_tps)
        goals.append({"goal": f"raylm train ZeRO-{zero} (feed, metrics, checkpoints; no eval) >= {GOALS[zero]:.1f}x "
                              f"plain loop", "value": f"{value:.2f}x", "met": value >= GOALS[zero]})
        if b:
            value = ratio(y["tokens_per_s_no_eval"], b["tokens_per_s"])
            goals.append({"goal": f"raylm train ZeRO-{zero} (no eval) adds nothing to bare DeepSpeed (>= 0.95x of it; "
                                  f"the checkpoints are the work it adds)", "value": f"{value:.2f}x", "met": value >= 0.95})
    t = base.train
    return {
        "title": "2. Training: raylm train vs plain PyTorch",
        "note": (f"Model: tiny-llama widened to {MODEL_OVERRIDES['hidden_size']} hidden x "
                 f"{MODEL_OVERRIDES['num_hidden_layers']} layers ({vocab} vocab, fp32); seq_len 128, global batch "
                 f"{t.effective_global_batch} (2 workers x 8, 1 thread each; plain: 16 in one process with 2 threads); "
                 f"{max_steps} steps, eval ({t.eval_batches} batches) and checkpoint (DeepSpeed state + HF export) "
                 f"every {every} steps in the raylm runs. Full mode alternates bare and raylm {ROUNDS} times per "
                 f"ZeRO stage and compares their means (this VM drifts by several % within minutes). tokens/s = global tokens from the end of step {WARMUP} to "
                 f"the end of step {max_steps} / wall time between them (raylm: metrics.jsonl timestamps, so evals, "
                 f"checkpoints and reports inside the window count). The plain loop and bare DeepSpeed evaluate "
                 f"nothing, so a second raylm row takes the evaluation time (timed by raylm's loop, `eval_s` in "
                 f"metrics.jsonl) out of the window; the goals use that row. Ratio = tokens/s / plain tokens/s "
                 f"(mean of the plain runs before and after)."),
        "tables": [
            {"columns": ["run", "ZeRO", "tokens/s", "x plain", "vs", "detail"], "rows": rows},
            {"name": "peak resident memory per worker (MiB, VmHWM of each Ray Train worker process)",
             "columns": ["ZeRO", "raylm workers", "bare DeepSpeed workers", "plain loop process"], "rows": mem_rows},
        ],
        "goals": goals,
        "findings": _findings(runs),
        "raw": {"plain": plain, "runs": runs, "max_steps": max_steps, "every": every, "model": MODEL_OVERRIDES},
    }


if __name__ == "__main__":
    stage_main(run)
