"""A real size (issue 32 item 12): a Qwen2-0.5B-shaped model (random init, vocab 151,936, tied
embeddings, 24 layers of hidden 896, GQA 14/2, qkv bias), LoRA and full fine-tuning on 2 CPU
workers, `raylm train` against bare DeepSpeed on the same model.

- The model: `Qwen2ForCausalLM.from_config(...)` saved once to a folder (safetensors) and passed
  to raylm as `model.name=<folder>` (raylm's `from_pretrained` path); the bare side loads the same
  folder. The data's tokenizer is the benches' 2048-token BPE: its ids lie inside the model's
  151,936 rows and raylm does not resize a larger embedding, so every step still computes the
  full 151,936-wide head.
- raylm: `raylm.train.driver.build_trainer(...).fit()` exactly as `raylm train` runs it (Ray Data
  shards, metrics every step, raylm's chunked loss, eval + checkpoint + HF export at the end).
- bare DeepSpeed: a minimal `train_fn` under Ray Train (2 workers x 1 thread, gloo): the same
  folder loaded with `from_pretrained` (under ZeRO-3 inside transformers' HfDeepSpeedConfig, so
  it is built partitioned as raylm builds it), the same peft LoRA config, raylm's own DeepSpeed
  dict (`raylm.train.deepspeed.deepspeed_config`) and lr schedule, random token blocks held in
  memory, the textbook loss (full fp32 logits + `F.cross_entropy`), nothing else.

Same micro-batch (1 x seq_len 256 per worker: 512 tokens a step), same steps: WARMUP steps, then
TIMED timed steps. raylm runs one step more, whose forced eval and final checkpoint fall outside
the window. tokens/s = global tokens of the timed steps / the wall time from the end of step
WARMUP to the end of step WARMUP + TIMED (raylm: the `time` of its metrics.jsonl records, written
after each step's report, so its feed, metrics and reports count; bare: time.time() on rank 0).

Peak RSS per worker: VmHWM of each Ray Train worker process. Bare: each rank reads its own after
the timed steps. raylm: sampled every 0.5 s from outside; reported at the end of the timed window
(training only) and over the whole run (the final eval, checkpoint and HF export included).

Full fine-tuning runs the Qwen2-0.5B shape cut to 12 layers (315M parameters; the embedding,
136M, is whole): at 24 layers (494M) the bare DeepSpeed workers were OOM-killed by Ray's memory
monitor at 9.1 / 9.3 GiB each and still growing (ZeRO-3 in fp32 on CPU: ~31 bytes a parameter per
worker at 12 layers, see bench/RESULTS.md section 18). 12 layers fit two workers (~10 GiB each)
only while little else ran on this 24 GiB machine: section 18's side-by-side full pair used
RAYLM_QWEN05_FULL_LAYERS=4 (196M). ZeRO-3 with CPU offload was not run: on a
CPU-only machine DeepSpeed's "device" memory already is host memory, so it is not expected to lower
the peak (not measured).

    .venv/bin/python bench/qwen05_bench.py --out /tmp/qwen05.json [--quick] [--workdir DIR]
    RAYLM_QWEN05_VARIANTS=lora,full RAYLM_QWEN05_FULL_LAYERS=12 RAYLM_QWEN05_FULL_ZERO=3 RAYLM_QWEN05_ROUNDS=1
    RAYLM_QWEN05_SIDES=bare,raylm,nochunk (the defaults)
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CORPUS, bench_tokenizer, stage_main  # noqa: E402
from report import git_commit, ratio  # noqa: E402

QWEN2_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                 max_position_embeddings=32768, rope_theta=1e6)
QUICK = dict(QWEN2_05B, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1)
SEQ_LEN = 256
WARMUP = 2
TIMED = 3
GOAL = 0.95
LORA = {"r": 16, "alpha": 32}
# which sides run: bare DeepSpeed, raylm (defaults), raylm with train.loss_chunk_tokens=0 (full logits, as bare)
STARTED: dict = {}
SIDES = os.environ.get("RAYLM_QWEN05_SIDES", "bare,raylm,nochunk").split(",")


def variants() -> dict[str, dict]:
    """name -> (layers, ZeRO stage, lora) from the environment (defaults: the brief's two runs)."""
    names = os.environ.get("RAYLM_QWEN05_VARIANTS", "lora,full").split(",")
    full_layers = int(os.environ.get("RAYLM_QWEN05_FULL_LAYERS", "12"))
    table = {"lora": {"layers": 24, "zero": 2, "lora": True},
             "full": {"layers": full_layers, "zero": int(os.environ.get("RAYLM_QWEN05_FULL_ZERO", "3")), "lora": False}}
    return {n: table[n] for n in names if n}


def make_model(out_dir: str, shape: dict, layers: int) -> tuple[str, int]:
    """The random Qwen2 model saved as a folder (cached); returns it and its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**dict(shape, num_hidden_layers=layers))
    path = os.path.join(out_dir, f"qwen2-h{cfg.hidden_size}-l{layers}-v{cfg.vocab_size}")
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.save_pretrained(path, safe_serialization=True)
        del model
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    return path, n


def bench_config(model_dir: str, tokenizer_dir: str, storage: str, run_name: str, v: dict, *extra: str):
    from raylm.config import load_config

    steps = WARMUP + TIMED + 1  # the last step's forced eval + checkpoint stay outside the window
    return load_config(str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"), [
        f"data.source={CORPUS}", f"data.tokenizer={tokenizer_dir}", f"data.seq_len={SEQ_LEN}",
        f"model.name={model_dir}", "train.num_workers=2", "train.cpus_per_worker=1", "train.micro_batch_size=1",
        "train.grad_accum_steps=1", f"train.max_steps={steps}", "train.log_every_steps=1",
        "train.eval_every_steps=1000", "train.checkpoint_every_steps=1000", "train.eval_batches=1",
        "train.keep_checkpoints=1", "train.warmup_steps=1", f"train.storage_path={storage}",
        f"train.run_name={run_name}", "train.max_failures=0", f"deepspeed.zero_stage={v['zero']}",
        *([f"train.lora={json.dumps(LORA)}", "train.lr=1e-3"] if v["lora"] else ["train.lr=1e-4"]), *extra,
    ])


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


# ------------------------------------------------------------------ bare DeepSpeed under Ray Train


def bare_train_fn(config: dict) -> None:
    """Ray Train worker: DeepSpeed on the same folder, raylm's DeepSpeed dict, the textbook loss."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from raylm.config import RaylmConfig
    from raylm.train.deepspeed import deepspeed_config, import_deepspeed, lr_scheduler

    deepspeed = import_deepspeed()  # as raylm's loop imports it (no shm op build, no MLflow import)
    import peft
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    cfg = RaylmConfig.model_validate(config["config"])
    t = cfg.train
    torch.set_num_threads(1)
    start_mib = _status_mib("VmRSS")
    deepspeed.init_distributed(dist_backend="gloo")
    ds = deepspeed_config(cfg)
    torch.manual_seed(t.seed)
    live = HfDeepSpeedConfig(ds) if cfg.deepspeed.zero_stage == 3 else None  # noqa: F841 - zero.Init on load
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name, dtype=torch.float32)
    if t.lora:
        model = peft.get_peft_model(model, peft.LoraConfig(r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
                                                           target_modules=t.lora.target_modules, task_type="CAUSAL_LM"))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           config=ds, lr_scheduler=lr_scheduler(cfg))
    built_mib = _status_mib("VmHWM")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(1000 + rank)
    steps = WARMUP + TIMED
    blocks = torch.randint(0, config["token_ids"], (steps, t.micro_batch_size, cfg.data.seq_len + 1), generator=gen)
    t_first = None
    step_s = []
    for step in range(1, steps + 1):
        t0 = time.time()
        block = blocks[step - 1]
        logits = engine(input_ids=block[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), block[:, 1:].reshape(-1))
        engine.backward(loss)
        engine.step()
        float(loss.detach())
        step_s.append(time.time() - t0)
        if step == WARMUP:
            t_first = time.time()
    t_last = time.time()
    record = {"rank": rank, "t_first": t_first, "t_last": t_last, "loss": float(loss.detach()), "step_s": step_s,
              "start_mib": start_mib, "built_peak_mib": built_mib, "peak_mib": _status_mib("VmHWM")}
    with open(os.path.join(config["out"], f"bare-{t.run_name}-rank{rank}.json"), "w") as f:
        json.dump(record, f)


def _run_bare(cfg, token_ids: int, out_dir: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raylm.cluster import worker_env

    t = cfg.train
    trainer = TorchTrainer(
        bare_train_fn,
        train_loop_config={"config": cfg.model_dump(mode="json"), "token_ids": token_ids, "out": out_dir},
        scaling_config=ScalingConfig(num_workers=t.num_workers, resources_per_worker={"CPU": t.cpus_per_worker}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=RunConfig(name=f"bare-{t.run_name}", storage_path=t.storage_path,
                             worker_runtime_env={"env_vars": worker_env(False)}))
    t0 = time.perf_counter()
    result = trainer.fit()
    fit_s = time.perf_counter() - t0
    if result.error:
        raise result.error
    ranks = [json.loads(Path(out_dir, f"bare-{t.run_name}-rank{r}.json").read_text()) for r in range(t.num_workers)]
    r0 = ranks[0]
    window = r0["t_last"] - r0["t_first"]
    tokens = TIMED * t.effective_global_batch * cfg.data.seq_len
    return {"tokens_per_s": tokens / window, "window_s": window, "fit_s": fit_s, "step_s": r0["step_s"],
            "peak_rss_mib": [round(r["peak_mib"]) for r in ranks],
            "built_peak_mib": [round(r["built_peak_mib"]) for r in ranks],
            "start_mib": [round(r["start_mib"]) for r in ranks], "final_loss": r0["loss"]}


# ------------------------------------------------------------------ raylm train


class HwmSeries:
    """VmHWM of our cluster's Ray Train workers, sampled with the time: the peak up to any moment."""

    def __init__(self, interval_s: float = 0.5):
        self.interval_s = interval_s
        self.samples: list[tuple[float, int, int]] = []  # (time, pid, VmHWM KiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import psutil

        from common import WorkerMemory, _peak_rss_kib

        while not self._stop.is_set():
            for proc in psutil.process_iter(["pid", "cmdline"]):
                try:
                    cmd = " ".join(proc.info["cmdline"] or [])
                except Exception:  # noqa: BLE001
                    continue
                if "RayTrainWorker" in cmd and WorkerMemory._ours(proc):
                    peak = _peak_rss_kib(proc.info["pid"])
                    if peak:
                        self.samples.append((time.time(), proc.info["pid"], peak))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "HwmSeries":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def peaks_mib(self, until: float = float("inf")) -> list[float]:
        out: dict[int, int] = {}
        for ts, pid, kib in self.samples:
            if ts <= until:
                out[pid] = max(kib, out.get(pid, 0))
        return sorted((round(v / 1024) for v in out.values()), reverse=True)


def _run_raylm(cfg, prepared) -> dict:
    from raylm.train.driver import build_trainer, check_data_fits

    check_data_fits(cfg, prepared)
    with HwmSeries() as mem:
        t0 = time.perf_counter()
        result = build_trainer(cfg, prepared).fit()
        fit_s = time.perf_counter() - t0
    if result.error:
        raise result.error
    path = Path(cfg.train.storage_path, cfg.train.run_name, "metrics.jsonl")
    log = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = {r["step"]: r for r in log if "step" in r and "time" in r and "loss" in r}
    first, last = records[WARMUP], records[WARMUP + TIMED]
    t = cfg.train
    tokens = TIMED * t.effective_global_batch * cfg.data.seq_len
    window = last["time"] - first["time"]
    step_only = sum(t.effective_global_batch * cfg.data.seq_len / records[s]["tokens_per_s"]
                    for s in range(WARMUP + 1, WARMUP + TIMED + 1))
    start = next(r for r in log if r.get("event") == "start")
    final = records[max(records)]
    return {"tokens_per_s": tokens / window, "window_s": window, "fit_s": fit_s,
            "step_only_tokens_per_s": tokens / step_only, "non_step_s": window - step_only,
            "step_s": [round(t.effective_global_batch * cfg.data.seq_len / records[s]["tokens_per_s"], 3)
                       for s in sorted(records)],
            "peak_rss_mib": mem.peaks_mib(until=last["time"]), "peak_rss_mib_whole_run": mem.peaks_mib(),
            "trainable_params": start.get("trainable_params"), "total_params": start.get("total_params"),
            "final_loss": final.get("loss"), "save_s": final.get("save_s")}


# ------------------------------------------------------------------ the stage


def run(args) -> dict:
    import psutil

    from common import start_ray
    from raylm.data import load_tokenizer, prepare_data

    # the code measured: the commit when the run starts (the platform is imported by each worker as it starts)
    STARTED.update(commit=git_commit(), date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    shape = QUICK if args.quick else QWEN2_05B
    rounds = int(os.environ.get("RAYLM_QWEN05_ROUNDS", "1"))
    storage = os.path.join(args.workdir, "runs")
    tokenizer_dir = bench_tokenizer(os.path.join(args.workdir, "tok"))
    token_ids = len(load_tokenizer(tokenizer_dir))
    available_gib = psutil.virtual_memory().available / 2**30
    os.environ["RAYLM_JOIN_RUNNING_RAY"] = "0"  # a private cluster: never another user's on this machine
    os.environ.pop("RAY_ADDRESS", None)
    ray = start_ray(num_cpus=4)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # which raylm the cluster's workers import (PYTHONPATH may point this run at another copy of it)
    STARTED["worker_raylm"] = ray.get(ray.remote(lambda: __import__("raylm").__file__).remote())
    STARTED["tag"] = os.environ.get("RAYLM_QWEN05_TAG", "")
    print("workers import", STARTED["worker_raylm"], flush=True)
    results: dict[str, dict] = {}
    for name, v in variants().items():
        model_dir, n_params = make_model(os.path.join(args.workdir, "models"), shape, v["layers"])
        base = bench_config(model_dir, tokenizer_dir, storage, f"{name}", v)
        prepared = prepare_data(base.data, verbose=False)
        bare, mine, unchunked = [], [], []
        for i in range(rounds):  # alternated: this shared machine drifts
            run_cfg = bench_config(model_dir, tokenizer_dir, storage, f"{name}-{i}-{int(time.time())}", v)
            print(f"== {name} round {i}: bare DeepSpeed ({psutil.virtual_memory().available / 2**30:.1f} GiB available)",
                  flush=True)
            if "bare" in SIDES:
                bare.append(_run_bare(run_cfg, token_ids, args.workdir))
                print(f"{name} bare:", bare[-1], flush=True)
            print(f"== {name} round {i}: raylm ({psutil.virtual_memory().available / 2**30:.1f} GiB available)",
                  flush=True)
            if "raylm" in SIDES:
                mine.append(_run_raylm(run_cfg, prepared))
                print(f"{name} raylm:", mine[-1], flush=True)
            if "nochunk" in SIDES:  # where the gap comes from: raylm with its chunked loss off (full logits, as bare)
                nochunk_cfg = bench_config(model_dir, tokenizer_dir, storage, f"{name}-{i}-nochunk-{int(time.time())}", v,
                                           "train.loss_chunk_tokens=0")
                print(f"== {name} round {i}: raylm, loss_chunk_tokens=0", flush=True)
                unchunked.append(_run_raylm(nochunk_cfg, prepared))
                print(f"{name} raylm nochunk:", unchunked[-1], flush=True)
        results[name] = {"variant": v, "params": n_params, "model_dir": model_dir, "bare": bare, "raylm": mine,
                         "raylm_nochunk": unchunked,
                         "load_avg_after": os.getloadavg()}
    ray.shutdown()
    Path(args.out + ".raw").write_text(json.dumps({**STARTED, "results": results}, indent=2, default=str))
    return _report(results, shape, token_ids, available_gib, rounds)


def _median(values: list[float]) -> float:
    s = sorted(values)
    return (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2


def _mean(runs: list[dict], key: str) -> float:
    return sum(r[key] for r in runs) / len(runs)


def _report(results: dict, shape: dict, token_ids: int, available_gib: float, rounds: int) -> dict:
    rows, goals, findings = [], [], []

    def peaks(runs: list[dict], key: str = "peak_rss_mib") -> str:
        return "; ".join(", ".join(str(m) for m in run[key]) for run in runs)

    for name, r in results.items():
        v, b, y, u = r["variant"], r["bare"], r["raylm"], r.get("raylm_nochunk") or []
        if not (b and y):  # a run of one side (RAYLM_QWEN05_SIDES): its numbers are in raw, compared elsewhere
            continue
        bt, yt = _mean(b, "tokens_per_s"), _mean(y, "tokens_per_s")
        x = ratio(yt, bt)
        label = (f"LoRA r={LORA['r']} (all linear), ZeRO-{v['zero']}" if v["lora"]
                 else f"full fine-tuning, ZeRO-{v['zero']}") + f", {v['layers']} layers"
        size, trainable = f"{r['params'] / 1e6:.0f}M", f"{y[-1]['trainable_params'] / 1e6:.2f}M"
        rows.append([f"{label}: raylm train (defaults: chunked loss, 512 tokens)", size, trainable, yt, bt, x,
                     peaks(y), peaks(b), peaks(y, "peak_rss_mib_whole_run")])
        if u:
            ut = _mean(u, "tokens_per_s")
            rows.append([f"{label}: raylm train, train.loss_chunk_tokens=0 (full logits, as bare)", size, trainable,
                         ut, bt, ratio(ut, bt), peaks(u), peaks(b), peaks(u, "peak_rss_mib_whole_run")])
        goals.append({"goal": f"raylm train, Qwen2-0.5B shape ({size}), {label}: tokens/s >= "
                              f"{GOAL}x bare DeepSpeed (2 CPU workers; raylm's defaults)",
                      "value": f"{x:.2f}x ({yt:.1f} vs {bt:.1f})" + (
                          f"; with train.loss_chunk_tokens=0 {ratio(ut, bt):.2f}x" if u else ""),
                      "met": x >= GOAL})
        # steady-state step time, robust to one slow step on this shared machine: the median timed step
        med_b = _median([s for run in b for s in run["step_s"][WARMUP:]])
        med_y = _median([s for run in y for s in run["step_s"][WARMUP:WARMUP + TIMED]])
        r["median_step_s"] = {"bare": med_b, "raylm": med_y}
        findings.append(f"{name}: median timed step {med_y:.2f} s (raylm) vs {med_b:.2f} s (bare): "
                        f"{med_b / med_y:.2f}x by step time")
        findings.append(f"{name}: raylm's steps alone (its loop's own per-step timing) ran at "
                        f"{_mean(y, 'step_only_tokens_per_s'):.1f} tokens/s; {_mean(y, 'non_step_s'):.1f}s of its "
                        f"{_mean(y, 'window_s'):.1f}s window went to the feed, metrics and reports; step times (s): "
                        f"bare {[round(s, 2) for s in b[-1]['step_s']]}, raylm {y[-1]['step_s']}"
                        + (f", raylm unchunked {u[-1]['step_s']}" if u else ""))
    return {
        "title": "18. A real size: Qwen2-0.5B shape, LoRA and full SFT on 2 CPU workers (issue 32 item 12)",
        "note": (f"Model: Qwen2 shape {json.dumps(shape)}, random init, fp32, saved as a folder and loaded by both "
                 f"sides; data ids < {token_ids} (the benches' BPE), the head still 151,936 wide. 2 Ray Train workers "
                 f"x 1 thread, micro-batch 1 x seq_len {SEQ_LEN} per worker (512 tokens a step), {WARMUP} warm-up "
                 f"steps then {TIMED} timed; {rounds} round(s), bare then raylm. {available_gib:.1f} GiB available at "
                 f"start."),
        "tables": [{"columns": ["variant", "params", "trainable", "raylm tok/s", "bare DeepSpeed tok/s",
                                f"ratio (goal {GOAL})", "raylm peak RSS/worker, training (MiB)",
                                "bare peak RSS/worker (MiB)", "raylm peak RSS/worker, whole run incl. final ckpt"],
                    "rows": rows}],
        "goals": goals,
        "findings": findings,
        "raw": {**STARTED, "sides": SIDES,
                "results": results, "shape": shape, "seq_len": SEQ_LEN, "warmup": WARMUP, "timed": TIMED,
                "available_gib_at_start": available_gib},
    }


if __name__ == "__main__":
    stage_main(run)
