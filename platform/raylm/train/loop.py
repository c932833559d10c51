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


def micro_batches(shard: Any, batch_size: int, skip: int, device: Any) -> Iterator[dict]:
    """Endless micro-batches from this worker's shard, epoch after epoch, in a fixed order.

    `skip` micro-batches are passed over first: that is how a resumed run continues at the
    data position it had reached instead of seeing the first batches again. A batch is a dict:
    `input_ids` blocks of seq_len + 1 (raw text), or input_ids / labels / position_ids / tokens (SFT).
    """
    import torch

    epoch = 0
    while True:
        seen = 0
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, dtypes=torch.long,
                                              device=device, prefetch_batches=2):
            seen += 1
            if skip > 0:
                skip -= 1
                continue
            yield trim(batch)
        if seen == 0:
            raise RuntimeError(f"train shard holds fewer than micro_batch_size={batch_size} blocks")
        skip %= seen  # later epochs: skip only within one epoch
        epoch += 1


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
    folder (seeded from the run's earlier metrics.jsonl on resume) and uploaded at every checkpoint
    and at the end: what is in storage is never older than the newest checkpoint."""

    def __init__(self, cfg: RaylmConfig, rank: int):
        from raylm.train.tracking import Trackers

        self.run_dir = storage.run_dir(cfg.train.storage_path, cfg.train.run_name)
        self.remote = storage.is_remote(self.run_dir)
        self.path: Optional[str] = None
        self.trackers = None
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

    def sync(self) -> None:
        """Object storage: upload the log and the tracker files (a local run folder is live)."""
        if self.path and self.remote:
            storage.upload(os.path.dirname(self.path), self.run_dir)

    def close(self) -> None:
        if self.trackers:
            self.trackers.close()
        self.sync()


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
    log.write({"event": "resume", "from": path, "step": pos.step, "time": time.time()})
    return pos, path


def tell(queue: Any, metrics: dict) -> None:
    """Hand a report to the driver's progress bar; never wait for it (a full queue drops it)."""
    try:
        queue.put_nowait(metrics)
    except Exception:  # noqa: BLE001 - the bar is a nicety: training never stops for it
        pass


def train_fn_per_worker(loop_config: dict) -> None:
    """Train until `train.max_steps`, reporting metrics and checkpoints to Ray Train."""
    import ray.train
    import torch.distributed as dist
    from ray.train import CheckpointUploadMode

    from raylm.train.checkpoint import save_checkpoint

    cfg, tokenizer, device = _setup(loop_config)
    progress = loop_config.get("progress")  # a quiet CLI's progress bar (a Ray queue), else None
    t = cfg.train
    engine, params = _engine(cfg, tokenizer)
    rank = dist.get_rank()
    log = MetricsLog(cfg, rank)
    log.write({"event": "start", **params, "lora": bool(t.lora), "time": time.time()})
    pos, resumed_from = _resume(cfg, engine, log)
    resumed_step = pos.step
    batches = micro_batches(ray.train.get_dataset_shard("train"), t.micro_batch_size, pos.step * t.grad_accum_steps, device)
    val_shard = ray.train.get_dataset_shard("val")
    tokens_per_step = t.effective_global_batch * cfg.data.seq_len
    fpt, peak = flops_per_token(engine.module, cfg.data.seq_len), peak_flops(device)
    window_loss, window_steps, window_tokens, window_t0 = 0.0, 0, 0, time.perf_counter()
    last_eval: dict[str, float] = {}
    last_report_t = time.monotonic()
    while pos.step < t.max_steps:
        for _ in range(t.grad_accum_steps):
            batch = next(batches)
            loss = lm_loss(engine, batch)
            window_tokens += real_tokens(batch)
            engine.backward(loss)
            engine.step()
            window_loss += float(loss) / t.grad_accum_steps
        pos.step += 1
        pos.tokens += tokens_per_step
        window_steps += 1
        is_last = pos.step == t.max_steps
        do_log = pos.step % t.log_every_steps == 0 or is_last
        do_eval = pos.step % t.eval_every_steps == 0 or is_last
        do_ckpt = pos.step % t.checkpoint_every_steps == 0 or is_last
        if not (do_log or do_eval or do_ckpt):
            continue
        metrics: dict[str, Any] = {"step": pos.step, "tokens": pos.tokens, "resumed_from_step": resumed_step}
        if do_log:
            elapsed = time.perf_counter() - window_t0
            # one all-reduce: the mean loss, and rank-agreed time since the last Ray report
            loss_mean, since_report_s, tokens_mean = all_mean(
                [window_loss / window_steps, time.monotonic() - last_report_t, window_tokens], device)
            tps = tokens_mean * dist.get_world_size() / max(elapsed, 1e-9)  # real tokens (SFT: no padding)
            grad_norm = engine.get_global_grad_norm()
            metrics.update(loss=loss_mean, lr=engine.get_lr()[0], tokens_per_s=tps,
                           grad_norm=float(grad_norm) if grad_norm is not None else float("nan"))
            if peak:
                metrics["mfu"] = fpt * tps / (peak * dist.get_world_size())
        clock = time.perf_counter()
        spent: dict[str, float] = {}  # seconds outside training steps, in the log: where time goes
        if do_eval:
            # `evals` counts evaluations by step, so it survives restarts: Tune forwards each once
            last_eval = {**evaluate(engine, val_shard, cfg, device),
                         "evals": pos.step // t.eval_every_steps + (1 if pos.step % t.eval_every_steps else 0)}
            spent["eval_s"], clock = time.perf_counter() - clock, time.perf_counter()
        metrics.update(last_eval)
        checkpoint_dir = save_checkpoint(engine, tokenizer, cfg, pos) if do_ckpt else None
        if checkpoint_dir:
            spent["save_s"], clock = time.perf_counter() - clock, time.perf_counter()
            # async: Ray Train uploads in a background thread and deletes the local copy after
            mode = CheckpointUploadMode.ASYNC if t.checkpoint_upload == "async" else CheckpointUploadMode.SYNC
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                             checkpoint_dir_name=storage.step_name(pos.step), checkpoint_upload_mode=mode,
                             delete_local_checkpoint_after_upload=True)
            last_report_t = time.monotonic()
        elif do_eval or since_report_s >= REPORT_MIN_INTERVAL_S:  # do_log holds when not do_eval
            ray.train.report(metrics)
            last_report_t = time.monotonic()
        spent["report_s"] = time.perf_counter() - clock
        log.write({**metrics, **spent, "time": time.time(), "checkpoint": bool(checkpoint_dir)})  # after the report: persisted
        if progress is not None and rank == 0:
            tell(progress, metrics)
        if checkpoint_dir:
            log.sync()
        window_loss, window_steps, window_tokens, window_t0 = 0.0, 0, 0, time.perf_counter()
    log.close()
