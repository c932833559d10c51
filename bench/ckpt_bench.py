"""Checkpoints: the same run checkpointing to S3 (moto on loopback) and to a local folder, with
Ray Train's upload in the step (`train.checkpoint_upload: sync`) and in a background thread
(`async`, the default).

Corpus: tinyshakespeare, BPE vocab 2048, seq_len 128. Model: tiny-llama widened to 512 hidden x 4
layers (8 heads, 13.7M parameters, fp32); 2 CPU workers, ZeRO-2, micro-batch 4. A checkpoint is the
DeepSpeed state of both ranks (weights + Adam) and the HF export. S3 is moto's server on
127.0.0.1 in its own process (signatures not checked), so it spends this machine's CPU while it
receives an upload, as a remote store would not. Every run is `build_trainer(...).fit()` exactly
as `raylm train` runs it, with a checkpoint every 10 steps (keep 2), a log record every step and
one evaluation at the end; the four variants alternate ROUNDS times (the shared VM drifts).

Per run, from rank 0's metrics.jsonl (read back from the bucket for S3): step time = the median
interval between consecutive records of steps that neither checkpoint nor follow a checkpoint;
save_s = DeepSpeed state + HF export to a local folder; report_s = time inside
ray.train.report (sync: the upload; async: a barrier, the upload then runs in Ray Train's thread);
blocked per checkpoint = (interval of the checkpoint step + of the step after it, which uploads
metrics.jsonl to object storage) - 2 x step time; extra per checkpoint = (wall time of the window
- its steps x step time) / checkpoints in it, which also counts steps slowed by a background
upload sharing the 2 cores. The last step (final checkpoint + evaluation, and the wait for
pending uploads) and step 1 are outside the window. Share at the default interval (50 steps) =
extra / (50 x step time + extra). The log's tokens_per_s times a step's own compute only, so the
rest of the interval after a checkpoint step is the metrics.jsonl write and upload.

Export cost (part "export"): a larger model (EXPORT_OVERRIDES of tiny-llama, ~0.1B parameters,
fp32, ZeRO-3, 2 CPU workers, micro-batch 1), 4 steps with a checkpoint every 2, once with
`train.export: every` (before: every checkpoint also consolidates the ZeRO-3 shards and writes
the HF export) and once with `final_and_best` (after: the periodic checkpoint is the DeepSpeed
state only). save_s of the periodic checkpoint (step 2) and of the final one (step 4, exported in
both) from metrics.jsonl; peak RSS = the largest sum of the two Train workers' resident memory,
sampled every 0.2 s.

    python bench/ckpt_bench.py --out /tmp/ckpt.json [--quick]     # CKPT_BENCH_PARTS=storage,export
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CORPUS, stage_main, start_ray  # noqa: E402

MODEL_OVERRIDES = {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4,
                   "num_attention_heads": 8, "num_key_value_heads": 8}
EXPORT_OVERRIDES = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
                    "num_attention_heads": 16, "num_key_value_heads": 16}  # ~0.1B parameters (RAM-bound, see RESULTS)
EXPORT_MODES = ("every", "final_and_best")  # train.export before / after
# CKPT_BENCH_LORA=1: the same with LoRA adapters (r 8, every linear layer): the periodic state is the
# adapter's, the export rebuilds the base and merges
LORA = {"train.lora": "{r: 8, alpha: 16}"} if os.environ.get("CKPT_BENCH_LORA") == "1" else {}
EVERY = 10  # checkpoint interval of the benchmark runs
AROUND = 6  # intervals after each checkpoint profiled (the checkpoint step and the 5 after it)
DEFAULT_EVERY = 50  # train.checkpoint_every_steps' default: the interval the share is given for
ROUNDS = 2  # full mode: the four variants alternate this many times
BUCKET = "raylm-bench"
VARIANTS = {  # name -> (storage, train.checkpoint_upload)
    "local, sync": ("local", "sync"),
    "local, async": ("local", "async"),
    "s3, sync": ("s3", "sync"),
    "s3, async": ("s3", "async"),
}


def moto_server(workdir: str):
    """moto's S3 API on a free loopback port, the AWS_* environment naming it (set before Ray
    starts, so the workers inherit it), and the benchmark's bucket. Returns (process, boto3 client)."""
    import boto3
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(os.path.join(workdir, "moto.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(endpoint, timeout=1)
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"moto server did not start (see {log.name})")
            time.sleep(0.2)
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_ENDPOINT_URL": endpoint,
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"})
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    return proc, client


def bench_config(workdir: str, storage_path: str, run_name: str, steps: int, upload: str, **extra):
    from raylm.config import load_config

    over = {"data.source": str(CORPUS), "data.cache_dir": f"{workdir}/cache", "data.val_fraction": 0.02,
            "model.overrides": json.dumps(MODEL_OVERRIDES), "train.num_workers": 2, "train.cpus_per_worker": 1,
            "train.micro_batch_size": 4, "train.max_steps": steps, "train.log_every_steps": 1,
            "train.eval_every_steps": steps, "train.eval_batches": 1, "train.checkpoint_every_steps": EVERY,
            "train.keep_checkpoints": 2, "train.checkpoint_upload": upload, "train.storage_path": storage_path,
            "train.run_name": run_name, "deepspeed.zero_stage": 2, "train.tracking.tensorboard": False, **extra}
    return load_config(str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"),
                       [f"{k}={v}" for k, v in over.items()])


def analyse(log: list[dict], steps: int) -> dict:
    """Step time, checkpoint stall and extra time per checkpoint from one run's metrics.jsonl."""
    at = {r["step"]: r for r in log if "step" in r and "time" in r and not r.get("event")}
    missing = [s for s in range(1, steps + 1) if s not in at]
    if missing:
        raise RuntimeError(f"metrics.jsonl lacks steps {missing[:5]}")
    interval = {s: at[s]["time"] - at[s - 1]["time"] for s in range(2, steps + 1)}
    ckpts = [s for s in range(EVERY, steps, EVERY)]  # in the window (the last step is outside it)
    plain = [interval[s] for s in range(2, steps) if s not in ckpts and s - 1 not in ckpts]
    step_s = statistics.median(plain)
    blocked = [interval[c] + interval[c + 1] - 2 * step_s for c in ckpts]
    window = at[steps - 1]["time"] - at[1]["time"]
    extra = (window - (steps - 2) * step_s) / len(ckpts)
    # where the time goes: each interval from the checkpoint step on, over the median step
    around = [statistics.mean(interval[c + k] - step_s for c in ckpts) for k in range(AROUND)]
    # time outside a step's own compute window (tokens_per_s times only the step: the loop restarts
    # its clock after writing, and uploading, the log): after a checkpoint, the metrics.jsonl upload
    outside = {s: interval[s] - (at[s]["tokens"] - at[s - 1]["tokens"]) / at[s]["tokens_per_s"] for s in interval}
    base = statistics.median(outside[s] for s in range(2, steps) if s not in ckpts and s - 1 not in ckpts)
    return {"step_s": step_s, "blocked_s": statistics.mean(blocked), "extra_s": extra,
            "around_s": [round(a, 3) for a in around],
            "log_upload_s": statistics.mean(outside[c + 1] - base for c in ckpts),
            "save_s": statistics.mean(at[c]["save_s"] for c in ckpts),
            "report_s": statistics.mean(at[c]["report_s"] for c in ckpts),
            "final_save_s": at[steps].get("save_s"), "final_report_s": at[steps].get("report_s"),
            "blocked_each": [round(b, 2) for b in blocked], "checkpoints": len(ckpts)}


def run_one(cfg, prepared, steps: int, client, moto) -> dict:
    import psutil

    from raylm import storage
    from raylm.train.driver import build_trainer, check_data_fits

    check_data_fits(cfg, prepared)
    moto_cpu = psutil.Process(moto.pid).cpu_times()
    t0 = time.perf_counter()
    result = build_trainer(cfg, prepared).fit()
    fit_s = time.perf_counter() - t0
    if result.error:
        raise RuntimeError(f"{cfg.train.run_name}: {result.error}")
    moto_cpu_s = sum(psutil.Process(moto.pid).cpu_times()[:2]) - sum(moto_cpu[:2])
    run = storage.run_dir(cfg.train.storage_path, cfg.train.run_name)
    log = [json.loads(line) for line in storage.read_bytes(storage.join(run, storage.METRICS_FILE)).decode().splitlines()]
    size = sum(storage.list_files(storage.join(run, storage.step_name(steps))).values())
    stats = analyse(log, steps)
    out = {**stats, "checkpoint_mb": size / 1e6, "fit_s": fit_s,
           "moto_cpu_s_per_ckpt": moto_cpu_s / (stats["checkpoints"] + 1),  # + the final one
           "params": next(r for r in log if r.get("event") == "start")["total_params"]}
    if storage.is_remote(run):  # moto keeps every object in memory: free it for the next run
        prefix = run.split(f"s3://{BUCKET}/", 1)[1] + "/"
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys})
    else:
        shutil.rmtree(run, ignore_errors=True)
    return out


def _mean(results: list[dict], key: str) -> float:
    return statistics.mean(r[key] for r in results)


def run(args) -> dict:
    parts = os.environ.get("CKPT_BENCH_PARTS", "storage,export").split(",")
    moto, client = moto_server(args.workdir)  # before Ray: the workers inherit AWS_*
    try:
        start_ray(num_cpus=2)
        from raylm.data import prepare_data

        steps, rounds = (30, 1) if args.quick else (40, ROUNDS)
        # one data stage for every run (same data config; the materialized datasets are reused)
        prepared = prepare_data(bench_config(args.workdir, "/tmp", "data", steps, "sync").data, verbose=False)
        exported = export_part(args, prepared) if "export" in parts else None
        stored = storage_part(args, prepared, client, moto, steps, rounds) if "storage" in parts else None
    finally:
        moto.kill()
    return merge(stored, exported)


def merge(stored: Optional[dict], exported: Optional[dict]) -> dict:
    """One stage report: the storage comparison, then the export table, goal and finding."""
    out = stored or {"title": "7. Checkpoints", "note": __doc__.split("\n\n", 1)[1].split("\n\n    python")[0].strip(),
                     "tables": [], "goals": [], "findings": [], "raw": {}}
    if exported:
        out["tables"].append({"name": exported["title"], "columns": exported["columns"], "rows": exported["rows"]})
        out["goals"].append(exported["goal"])
        out["findings"].append(exported["finding"])
        out["raw"]["export"] = exported["raw"]
    return out


def storage_part(args, prepared, client, moto, steps: int, rounds: int) -> dict:
    """CKPT_BENCH_VARIANTS ("local, sync;s3, async") limits the variants run (a short session)."""
    chosen = os.environ.get("CKPT_BENCH_VARIANTS")
    variants = {k: v for k, v in VARIANTS.items() if not chosen or k in chosen.split(";")}
    per_round: dict[str, list[dict]] = {name: [] for name in variants}
    for i in range(rounds):
        for j, (name, (where, upload)) in enumerate(variants.items()):
            root = f"s3://{BUCKET}/runs" if where == "s3" else os.path.join(args.workdir, "runs")
            cfg = bench_config(args.workdir, root, f"ckpt{i}-{j}", steps, upload)
            per_round[name].append(run_one(cfg, prepared, steps, client, moto))
            print(f"ckpt bench: {name} round {i}: {json.dumps(per_round[name][-1])}", flush=True)
    return summarise(per_round, steps, rounds)


class WorkerMemory:
    """The largest sum of the Train workers' resident memory while a run goes (a background sampler)."""

    def __init__(self):
        import threading

        self.peak_bytes, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil
        from ray.util.state import list_actors

        pids: list[int] = []
        while not self._stop.wait(0.2):
            if len(pids) < 2:
                pids = [a.pid for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"),
                                                            ("state", "=", "ALIVE")])]
            total = 0
            for pid in pids:
                try:
                    total += psutil.Process(pid).memory_info().rss
                except psutil.Error:
                    pass
            self.peak_bytes = max(self.peak_bytes, total)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def export_part(args, prepared) -> dict:
    """save_s of a periodic and of the final checkpoint, train.export: every vs final_and_best."""
    from raylm import storage
    from raylm.train.driver import build_trainer, check_data_fits

    results = {}
    for mode in EXPORT_MODES:
        cfg = bench_config(args.workdir, os.path.join(args.workdir, "runs"), f"export-{mode}", 4, "sync", **{
            "model.overrides": json.dumps(EXPORT_OVERRIDES), "train.micro_batch_size": 1,
            "train.checkpoint_every_steps": 2, "train.eval_every_steps": 4, "deepspeed.zero_stage": 3,
            "train.export": mode, **LORA})
        check_data_fits(cfg, prepared)
        t0 = time.perf_counter()
        with WorkerMemory() as memory:
            result = build_trainer(cfg, prepared).fit()
        if result.error:
            raise RuntimeError(f"export {mode}: {result.error}")
        run = storage.run_dir(cfg.train.storage_path, cfg.train.run_name)
        log = [json.loads(line) for line in open(os.path.join(run, storage.METRICS_FILE))]
        at = {r["step"]: r for r in log if r.get("checkpoint")}
        results[mode] = {"params": next(r for r in log if r.get("event") == "start")["total_params"],
                         "periodic_save_s": at[2]["save_s"], "final_save_s": at[4]["save_s"],
                         "periodic_report_s": at[2]["report_s"], "exported": [at[2]["exported"], at[4]["exported"]],
                         "periodic_mb": sum(storage.list_files(os.path.join(run, "step_00000002")).values()) / 1e6,
                         "peak_worker_rss_gib": memory.peak_bytes / 2**30, "fit_s": time.perf_counter() - t0}
        shutil.rmtree(run, ignore_errors=True)
        print(f"ckpt bench: export={mode}: {json.dumps(results[mode])}", flush=True)
    before, after = results["every"], results["final_and_best"]
    ratio = after["periodic_save_s"] / before["periodic_save_s"]
    params = f"{before['params'] / 1e9:.2f}B"
    lora = ", LoRA" if LORA else ""
    return {"title": f"checkpoint cost at {params} parameters (ZeRO-3{lora}, 2 workers): train.export every (before) vs "
                     "final_and_best (after)", "raw": results,
            "columns": ["train.export", "params", "periodic save_s", "periodic MB", "final save_s (exported)",
                        "peak RSS of the 2 workers (GiB)"],
            "rows": [[mode, r["params"], r["periodic_save_s"], r["periodic_mb"], r["final_save_s"],
                      r["peak_worker_rss_gib"]] for mode, r in results.items()],
            "goal": {"goal": f"periodic checkpoint of a {params} model{lora}: final_and_best vs export every (save_s)",
                     "value": f"{ratio:.2f}x ({after['periodic_save_s']:.1f} vs {before['periodic_save_s']:.1f} s)",
                     "met": ratio < 1.0},
            "finding": f"At {params} parameters a periodic checkpoint takes {before['periodic_save_s']:.1f} s when it "
                       f"also writes the HF export (consolidating the ZeRO-3 shards on rank 0) and "
                       f"{after['periodic_save_s']:.1f} s as the DeepSpeed state alone ({ratio:.2f}x; "
                       f"{before['periodic_mb']:.0f} vs {after['periodic_mb']:.0f} MB); the final checkpoint is "
                       f"exported either way ({before['final_save_s']:.1f} / {after['final_save_s']:.1f} s). Peak "
                       f"resident memory of the two workers: {before['peak_worker_rss_gib']:.1f} / "
                       f"{after['peak_worker_rss_gib']:.1f} GiB."}


def summarise(per_round: dict[str, list[dict]], steps: int, rounds: int) -> dict:
    out: dict = {}
    for name, results in per_round.items():
        agg = {k: _mean(results, k) for k in ("step_s", "blocked_s", "extra_s", "save_s", "report_s", "checkpoint_mb",
                                               "fit_s", "moto_cpu_s_per_ckpt", "log_upload_s")}
        agg["around_s"] = [round(statistics.mean(r["around_s"][k] for r in results), 3) for k in range(AROUND)]
        agg["share"] = agg["extra_s"] / (DEFAULT_EVERY * agg["step_s"] + agg["extra_s"])
        agg["blocked_share"] = agg["blocked_s"] / (DEFAULT_EVERY * agg["step_s"] + agg["blocked_s"])
        out[name] = {**agg, "params": results[-1]["params"], "rounds": results}
    rows = [[name, o["checkpoint_mb"], o["step_s"], o["save_s"], o["report_s"], o["blocked_s"], o["extra_s"],
             f"{100 * o['share']:.1f}%", " / ".join(f"{r['blocked_s']:.2f}" for r in o["rounds"])]
            for name, o in out.items() if name in VARIANTS]
    local_sync, s3_async = out["local, sync"], out["s3, async"]
    n_ckpts = out["local, sync"]["rounds"][0]["checkpoints"] * rounds
    goal_value = s3_async["blocked_s"] / local_sync["blocked_s"] if local_sync["blocked_s"] > 0 else float("inf")
    goals = [
        {"goal": "s3, async upload: training blocked per checkpoint <= 1.1x a local sync save (blocked = the "
                 "checkpoint step + the step after, over the median step)",
         "value": f"{goal_value:.2f}x ({s3_async['blocked_s']:.2f} vs {local_sync['blocked_s']:.2f} s)",
         "met": goal_value <= 1.1},
    ]
    tables = [{"name": f"{steps} steps each, checkpoint every {EVERY} ({n_ckpts} per variant measured), "
                       f"{rounds} round(s) alternated; seconds are means over the checkpoints",
               "columns": ["storage, upload", "checkpoint MB", "step s (median)", "save_s", "report_s",
                           "blocked s / ckpt", "extra s / ckpt", f"share at every {DEFAULT_EVERY}",
                           "blocked, per round"], "rows": rows},
              {"name": "where a checkpoint's time goes: each step interval from the checkpoint step on, "
                       "minus the median step (s), and moto's CPU time per checkpoint",
               "columns": ["storage, upload", *[f"step c{'+%d' % k if k else ''}" for k in range(AROUND)],
                           "log write + upload after c (s)", "moto CPU s / ckpt"],
               "rows": [[name, *o["around_s"], o["log_upload_s"], o["moto_cpu_s_per_ckpt"]] for name, o in out.items()]}]
    note = __doc__.split("\n\n", 1)[1].split("\n\n    python")[0].strip()
    if set(out) != set(VARIANTS):  # a short run (CKPT_BENCH_VARIANTS): the goal's two variants only
        return {"title": "7. Checkpoints: object storage vs local", "note": note, "tables": tables, "goals": goals,
                "findings": [], "raw": out}
    s3_sync, local_async = out["s3, sync"], out["local, async"]
    upload_s = s3_sync["report_s"]
    lag, after = s3_async["log_upload_s"], s3_async["around_s"][1]
    findings = [
        f"A checkpoint is {local_sync['checkpoint_mb']:.0f} MB for {local_sync['params']:,} parameters (DeepSpeed "
        f"fp32 weights + Adam state of both ranks; the final one also the HF export); writing it to a local folder (save_s) takes "
        f"{local_sync['save_s']:.2f} s, whatever the store.",
        f"Uploading it to S3 (moto on loopback; report_s with sync upload) takes {upload_s:.2f} s "
        f"({local_sync['checkpoint_mb'] / max(upload_s, 1e-9):.0f} MB/s), against {local_sync['report_s']:.2f} s "
        "to move it into the local storage folder; moto's server used "
        f"{s3_sync['moto_cpu_s_per_ckpt']:.1f} CPU-s per checkpoint of this machine's 2 cores (a real S3 endpoint "
        "would not).",
        f"Async upload: ray.train.report returns in {s3_async['report_s']:.3f} s (S3) and {local_async['report_s']:.3f}"
        f" s (local) instead of {upload_s:.2f} / {local_sync['report_s']:.2f} s, yet training is blocked "
        f"{s3_async['blocked_s']:.2f} s per S3 checkpoint vs {s3_sync['blocked_s']:.2f} s with sync upload. The wait "
        f"moves to the step after the checkpoint (+{after:.2f} s over the median step): {lag:.2f} s of it is outside "
        "that step's compute, i.e. raylm's metrics.jsonl upload (MetricsLog.sync, in rank 0's training thread) waiting "
        f"behind the checkpoint upload in flight in the same process; the other {after - lag:.2f} s is the step's own "
        "compute, slowed while the upload (client side, and moto's "
        f"{s3_async['moto_cpu_s_per_ckpt']:.1f} CPU-s per checkpoint) shares the 2 cores with the 2 workers. "
        "With a remote store and spare cores the second part shrinks; the first stays until the log upload leaves "
        "the training thread (or stops following each checkpoint).",
        f"Local storage: async upload blocks {local_async['blocked_s']:.2f} s per checkpoint vs "
        f"{local_sync['blocked_s']:.2f} s sync (report_s {local_async['report_s']:.3f} vs "
        f"{local_sync['report_s']:.2f} s: the move into the storage folder leaves the step).",
        f"At the default interval ({DEFAULT_EVERY} steps, {local_sync['step_s']:.2f} s each here) checkpoints take "
        + ", ".join(f"{100 * o['share']:.1f}% ({name})" for name, o in out.items())
        + " of training time (from extra s / ckpt). A step's compute grows with the tokens per step and a "
          "checkpoint does not, so with real batch sizes the share is smaller.",
    ]
    return {"title": "7. Checkpoints: object storage vs local", "note": note, "tables": tables, "goals": goals,
            "findings": findings, "raw": out}


if __name__ == "__main__":
    stage_main(run)
