"""`train_fn_per_worker`: what every Ray Train worker runs (one DeepSpeed rank each)."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any, Iterator, Optional

from raylm import storage
from raylm.config import RaylmConfig

# Ray Train V2 hands each report to the controller through a queue of one, which the controller
# drains on its health-check poll (2 s by default): reporting more often than that blocks the
# training loop. Metrics-only reports are therefore sent at most once per poll; every step's
# numbers still go to metrics.jsonl, and eval/checkpoint reports are always sent.
REPORT_MIN_INTERVAL_S = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0"))

# Dense bf16 peak FLOP/s per GPU, for model FLOPs utilisation (MFU).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


SFT_COLUMNS = ("input_ids", "labels", "position_ids")


def trim(batch: dict) -> dict:
    """An SFT batch cut to its longest row (rows are left-aligned, `tokens` real each): padding
    beyond it is never computed, so unpacked batches cost what their longest example costs."""
    if "tokens" not in batch:
        return batch
    n = max(int(batch["tokens"].max()), 1)
    return {**{k: batch[k][:, :n] for k in SFT_COLUMNS}, "tokens": batch["tokens"]}


def micro_batches(stream: Any, device: Any) -> Iterator[dict]:
    """Endless micro-batches of this rank's share of the data cache (a raylm.data.TrainStream),
    epoch after epoch, each epoch shuffled from data.seed and its number. The stream knows its
    position (epoch, offset), which the checkpoint records; started there, it continues with
    exactly the next batch. A batch is a dict: `input_ids` blocks of seq_len + 1 (raw text), or
    input_ids / labels / position_ids / tokens (SFT)."""
    from raylm.data.stream import to_torch

    for batch in stream:
        yield trim(to_torch(batch, device))


def token_losses(engine: Any, batch: dict) -> tuple[Any, Any]:
    """(summed cross-entropy, number of trained tokens) of a micro-batch.

    Raw text: a (B, seq_len + 1) block predicts every next token. SFT: each position predicts its
    label; -100 (prompt, padding) is left out, and packed examples do not see each other."""
    import torch.nn.functional as F

    from raylm.data import IGNORE, packed_logits

    if "labels" in batch:
        logits, labels = packed_logits(engine, batch["input_ids"], batch["position_ids"]), batch["labels"]
    else:
        block = batch["input_ids"]
        logits, labels = engine(input_ids=block[:, :-1]).logits, block[:, 1:]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss, (labels != IGNORE).sum()


def lm_loss(engine: Any, batch: Any) -> Any:
    """Mean next-token loss over the trained tokens of a micro-batch (a dict, or a raw-text block tensor)."""
    total, count = token_losses(engine, batch if isinstance(batch, dict) else {"input_ids": batch})
    return total / count.clamp(min=1)


def real_tokens(batch: dict) -> int:
    """Tokens actually computed (not padding): what tokens/s counts."""
    return int(batch["tokens"].sum()) if "tokens" in batch else batch["input_ids"][:, :-1].numel()


def all_mean(values: list[float], device: Any) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def evaluate(engine: Any, shard: Any, cfg: RaylmConfig, device: Any) -> dict[str, float]:
    """Validation loss and perplexity per trained token, over all ranks (each reads its val shard)."""
    import torch

    engine.eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(shard.iter_torch_batches(batch_size=cfg.train.micro_batch_size, dtypes=torch.long,
                                                           device=device)):
            if i >= cfg.train.eval_batches:
                break
            loss_sum, count = token_losses(engine, trim(batch))  # SFT: the same (assistant) tokens as training
            total, n = total + float(loss_sum), n + int(count)
    engine.train()
    loss_sum, count = all_mean([total, float(n)], device)
    val_loss = loss_sum / max(count, 1e-9)
    return {"val_loss": val_loss, "perplexity": math.exp(min(val_loss, 50.0))}


def flops_per_token(model: Any, seq_len: int) -> float:
    """6N for the dense weights (forward + backward) plus attention: 12 * layers * hidden * seq_len."""
    n_params = sum(p.numel() for p in model.parameters())
    c = model.config
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", 0)
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd", 0)
    return 6.0 * n_params + 12.0 * layers * hidden * seq_len


def peak_flops(device: Any) -> Optional[float]:
    import torch

    if getattr(device, "type", "cpu") != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class MetricsLog:
    """Rank 0 appends one JSON line per report to <run>/metrics.jsonl and hands the same record to
    the trackers (TensorBoard, MLflow).

    Object storage cannot append, so there the log and the TensorBoard files are kept in a local
    folder (seeded from the run's earlier metrics.jsonl on resume) and uploaded after every
    checkpoint, in a background thread (in the training thread it waited ~2 s per checkpoint
    behind Ray Train's checkpoint upload: bench/RESULTS.md, section 7), and at the end."""

    def __init__(self, cfg: RaylmConfig, rank: int):
        from raylm.train.tracking import Trackers

        self.run_dir = storage.run_dir(cfg.train.storage_path, cfg.train.run_name)
        self.remote = storage.is_remote(self.run_dir)
        self.path: Optional[str] = None
        self.trackers = None
        self._uploads: Any = None  # a one-thread pool for the background upload
        self._pending: Any = None  # the upload in flight
        if rank != 0:
            return
        local_dir = tempfile.mkdtemp(prefix="raylm-run-") if self.remote else self.run_dir
        os.makedirs(local_dir, exist_ok=True)
        self.path = os.path.join(local_dir, storage.METRICS_FILE)
        if self.remote and storage.METRICS_FILE in storage.list_dir(self.run_dir):
            with open(self.path, "wb") as f:
                f.write(storage.read_bytes(storage.join(self.run_dir, storage.METRICS_FILE)))
        self.trackers = Trackers(cfg, local_dir if self.remote else storage.root(cfg.train.storage_path), local_dir)

    def write(self, record: dict) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.trackers:
            self.trackers.log(record)

    def sync(self, wait: bool = False) -> None:
        """Object storage: upload the log and the tracker files (a local run folder is live). In
        the background unless `wait`; while one upload is in flight the next is skipped (the
        following checkpoint, or the end, brings storage up to date)."""
        if not (self.path and self.remote):
            return
        if wait:
            if self._pending is not None:
                self._pending.exception()  # let it finish; the upload below supersedes it
            storage.upload(os.path.dirname(self.path), self.run_dir)
            return
        if self._pending is not None and not self._pending.done():
            return
        if self._uploads is None:
            from concurrent.futures import ThreadPoolExecutor

            self._uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raylm-log-upload")
        self._pending = self._uploads.submit(storage.upload, os.path.dirname(self.path), self.run_dir)

    def close(self) -> None:
        if self.trackers:
            self.trackers.close()
        self.sync(wait=True)


def _setup(loop_config: dict) -> tuple[RaylmConfig, Any, Any]:
    import torch

    from raylm.data import load_tokenizer, write_tokenizer_files

    cfg = RaylmConfig.model_validate(loop_config["config"])
    tok_dir = tempfile.mkdtemp(prefix="raylm-tok-")
    write_tokenizer_files(loop_config["tokenizer_files"], tok_dir)
    if cfg.train.use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    return cfg, load_tokenizer(tok_dir), device


def _engine(cfg: RaylmConfig, tokenizer: Any) -> tuple[Any, dict]:
    """The DeepSpeed engine (LoRA-wrapped when train.lora is set) and its trainable/total params."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from raylm.model import build_model
    from raylm.train.deepspeed import deepspeed_config
    from raylm.train.lora import apply_lora, param_counts

    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    model = build_model(cfg.model, len(tokenizer), cfg.data.seq_len, tokenizer)
    if cfg.train.lora:
        model = apply_lora(model, cfg.train.lora)
    trainable, total = param_counts(model)
    deepspeed.init_distributed(dist_backend="nccl" if cfg.train.use_gpu else "gloo")  # reuses Ray's group
    if dist.get_rank() == 0:
        print(f"raylm: {cfg.model.name}{' + LoRA r=%d' % cfg.train.lora.r if cfg.train.lora else ''}: "
              f"{trainable:,} trainable of {total:,} parameters ({100.0 * trainable / total:.2f}%)", flush=True)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           config=deepspeed_config(cfg))
    return engine, {"trainable_params": trainable, "total_params": total}


def _resume(cfg: RaylmConfig, engine: Any, log: MetricsLog) -> tuple[Any, Optional[str]]:
    """Load the newest complete checkpoint of this run (local or object storage), if any.

    Every `step_*` folder of the run is a candidate, verified against its manifest: one persisted
    just before a worker died may be newer than the one Ray Train registered last."""
    import ray.train

    from raylm.train.checkpoint import Position, load_checkpoint, pick_resume_checkpoint

    latest = ray.train.get_checkpoint()
    run_dir = storage.run_dir(cfg.train.storage_path, cfg.train.run_name)
    picked = pick_resume_checkpoint(run_dir, log=print)
    if picked is None:
        if latest is not None:
            raise RuntimeError(f"no usable checkpoint in {run_dir} (Ray Train registered {latest.path})")
        return Position(), None
    path, _ = picked
    pos = load_checkpoint(engine, path, adapter_only=bool(cfg.train.lora))
    log.write({"event": "resume", "from": path, "step": pos.step, "epoch": pos.epoch, "offset": pos.offset,
               "time": time.time()})
    return pos, path


class StepMeter:
    """Loss, tokens and time since the last log line; `maybe_log` turns them into the step's
    numbers with one all-reduce (mean loss, tokens/s, and the time since the last Ray report,
    agreed across ranks so that every rank makes the same reporting decision)."""

    def __init__(self, cfg: RaylmConfig, engine: Any, device: Any):
        self.cfg, self.engine, self.device = cfg, engine, device
        self.fpt, self.peak = flops_per_token(engine.module, cfg.data.seq_len), peak_flops(device)
        self.last_report_t = time.monotonic()
        self.since_report_s = 0.0
        self.reset()

    def reset(self) -> None:
        self.loss, self.steps, self.tokens, self.t0 = 0.0, 0, 0, time.perf_counter()

    def add(self, loss: Any, batch: dict) -> None:
        self.loss += float(loss.detach()) / self.cfg.train.grad_accum_steps
        self.tokens += real_tokens(batch)

    def maybe_log(self, step: int, force: bool) -> dict[str, float]:
        """The step's training numbers when a log line is due (every train.log_every_steps), else {}."""
        self.steps += 1
        if not (step % self.cfg.train.log_every_steps == 0 or force):
            return {}
        import torch.distributed as dist

        elapsed = time.perf_counter() - self.t0
        loss, self.since_report_s, tokens = all_mean(
            [self.loss / self.steps, time.monotonic() - self.last_report_t, self.tokens], self.device)
        tps = tokens * dist.get_world_size() / max(elapsed, 1e-9)  # real tokens (SFT: no padding)
        grad_norm = self.engine.get_global_grad_norm()
        out = {"loss": loss, "lr": self.engine.get_lr()[0], "tokens_per_s": tps,
               "grad_norm": float(grad_norm) if grad_norm is not None else float("nan")}
        if self.peak:
            out["mfu"] = self.fpt * tps / (self.peak * dist.get_world_size())
        return out


class Evaluator:
    """Validation every train.eval_every_steps (and at the end); keeps the newest result."""

    def __init__(self, cfg: RaylmConfig, engine: Any, shard: Any, device: Any):
        self.cfg, self.engine, self.shard, self.device = cfg, engine, shard, device
        self.last: dict[str, float] = {}
        self.seconds = 0.0

    def maybe_eval(self, step: int, force: bool) -> bool:
        every = self.cfg.train.eval_every_steps
        if not (step % every == 0 or force):
            return False
        t0 = time.perf_counter()
        # `evals` counts evaluations by step, so it survives restarts: Tune forwards each once
        self.last = {**evaluate(self.engine, self.shard, self.cfg, self.device),
                     "evals": step // every + (1 if step % every else 0)}
        self.seconds = time.perf_counter() - t0
        return True


class Checkpointer:
    """A resumable checkpoint every train.checkpoint_every_steps (and at the end), into a local
    folder that the next Ray Train report uploads (`train.checkpoint_upload`)."""

    def __init__(self, cfg: RaylmConfig, engine: Any, tokenizer: Any):
        self.cfg, self.engine, self.tokenizer = cfg, engine, tokenizer
        self.seconds = 0.0

    def maybe_save(self, pos: Any, force: bool) -> Optional[str]:
        from raylm.train.checkpoint import save_checkpoint

        if not (pos.step % self.cfg.train.checkpoint_every_steps == 0 or force):
            return None
        t0 = time.perf_counter()
        local = save_checkpoint(self.engine, self.tokenizer, self.cfg, pos)
        self.seconds = time.perf_counter() - t0
        return local


class Reporter:
    """Ray Train reports and the run's log: a checkpoint is always reported (with the step's
    metrics), an evaluation too; metrics alone at most once per REPORT_MIN_INTERVAL_S."""

    def __init__(self, cfg: RaylmConfig, log: MetricsLog, meter: StepMeter, resumed_step: int,
                 progress: Any, rank: int):
        self.cfg, self.log, self.meter, self.resumed_step = cfg, log, meter, resumed_step
        self.progress = progress if rank == 0 else None

    def maybe_report(self, pos: Any, logged: dict, evaluator: Evaluator, evaluated: bool,
                     checkpointer: Checkpointer, checkpoint_dir: Optional[str]) -> None:
        import ray.train
        from ray.train import CheckpointUploadMode

        if not (logged or evaluated or checkpoint_dir):
            return
        metrics = {"step": pos.step, "tokens": pos.tokens, "resumed_from_step": self.resumed_step,
                   **logged, **evaluator.last}
        spent = {**({"eval_s": evaluator.seconds} if evaluated else {}),  # where time goes
                 **({"save_s": checkpointer.seconds} if checkpoint_dir else {})}
        t0 = time.perf_counter()
        if checkpoint_dir:
            # async: Ray Train uploads in a background thread and deletes the local copy after
            async_upload = self.cfg.train.checkpoint_upload == "async"
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                             checkpoint_dir_name=storage.step_name(pos.step), delete_local_checkpoint_after_upload=True,
                             checkpoint_upload_mode=CheckpointUploadMode.ASYNC if async_upload else CheckpointUploadMode.SYNC)
            self.meter.last_report_t = time.monotonic()
        elif evaluated or self.meter.since_report_s >= REPORT_MIN_INTERVAL_S:  # logged holds when not evaluated
            ray.train.report(metrics)
            self.meter.last_report_t = time.monotonic()
        spent["report_s"] = time.perf_counter() - t0
        self.log.write({**metrics, **spent, "time": time.time(), "checkpoint": bool(checkpoint_dir)})  # persisted
        if self.progress is not None:
            tell(self.progress, metrics)
        if checkpoint_dir:
            self.log.sync()
        self.meter.reset()


def tell(queue: Any, metrics: dict) -> None:
    """Hand a report to the driver's progress bar; never wait for it (a full queue drops it)."""
    try:
        queue.put_nowait(metrics)
    except Exception:  # noqa: BLE001 - the bar is a nicety: training never stops for it
        pass


def _data_streams(data: dict, cfg: RaylmConfig, pos: Any) -> tuple[Any, Any]:
    """This rank's train stream (started at the checkpoint's data position) and val stream."""
    import torch.distributed as dist

    from raylm.data.stream import CacheStream, TrainStream

    rank, world = dist.get_rank(), dist.get_world_size()
    train = TrainStream(CacheStream(data["uri"], data["manifest"], "train", rank, world), cfg.data.seed,
                        cfg.train.micro_batch_size, cfg.data.shuffle_buffer_rows, pos.epoch, pos.offset)
    return train, CacheStream(data["uri"], data["manifest"], "val", rank, world)


def train_fn_per_worker(loop_config: dict) -> None:
    """Train until `train.max_steps`; the components decide when they act (log, evaluate,
    checkpoint, report), so this reads as the loop it is."""
    import torch.distributed as dist

    cfg, tokenizer, device = _setup(loop_config)
    t = cfg.train
    engine, params = _engine(cfg, tokenizer)
    log = MetricsLog(cfg, dist.get_rank())
    log.write({"event": "start", **params, "lora": bool(t.lora), "data": loop_config["data"]["uri"], "time": time.time()})
    pos, _ = _resume(cfg, engine, log)
    train_data, val_data = _data_streams(loop_config["data"], cfg, pos)
    batches = micro_batches(train_data, device)
    meter = StepMeter(cfg, engine, device)
    evaluator = Evaluator(cfg, engine, val_data, device)
    checkpointer = Checkpointer(cfg, engine, tokenizer)
    reporter = Reporter(cfg, log, meter, pos.step, loop_config.get("progress"), dist.get_rank())
    tokens_per_step = t.effective_global_batch * cfg.data.seq_len
    while pos.step < t.max_steps:
        for _ in range(t.grad_accum_steps):
            batch = next(batches)
            loss = lm_loss(engine, batch)
            engine.backward(loss)
            engine.step()
            meter.add(loss, batch)
        pos.step += 1
        pos.tokens += tokens_per_step
        pos.epoch, pos.offset = train_data.epoch, train_data.offset
        last = pos.step == t.max_steps
        logged = meter.maybe_log(pos.step, force=last)
        evaluated = evaluator.maybe_eval(pos.step, force=last)
        checkpoint_dir = checkpointer.maybe_save(pos, force=last)
        reporter.maybe_report(pos, logged, evaluator, evaluated, checkpointer, checkpoint_dir)
    log.close()
