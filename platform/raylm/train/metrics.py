"""What a run tells: the step's numbers (loss, tokens/s, MFU), the run's metrics.jsonl and trackers,
and Ray Train reports."""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any, Optional

from raylm import storage
from raylm.config import RaylmConfig
from raylm.train.collectives import all_reduced
from raylm.train.policy import CHECKPOINT_SCORE, Checkpointer
from raylm.train.step import Evaluator, StepResult, real_tokens

# Ray Train V2 hands each report to the controller through a queue of one, which the controller
# drains on its health-check poll (2 s by default): reporting more often than that blocks the
# training loop. Metrics-only reports are therefore sent at most once per poll; every step's
# numbers still go to metrics.jsonl, and eval/checkpoint reports are always sent.
REPORT_MIN_INTERVAL_S = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0"))


# Dense bf16 peak FLOP/s per GPU, for model FLOPs utilisation (MFU).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


def flops_per_token(model: Any, seq_len: int) -> float:
    """6N for the dense weights (forward + backward) plus attention: 12 * layers * hidden * seq_len.

    N is the unpartitioned count: under ZeRO-3 a parameter holds only this rank's shard (numel 0
    outside a gather) and DeepSpeed keeps the full size in `ds_numel`."""
    n_params = sum(getattr(p, "ds_numel", None) or p.numel() for p in model.parameters())
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
    behind Ray Train's checkpoint upload: bench/RESULTS.md, section 7), and at the end.

    `tracking`: what the resumed checkpoint recorded of the trackers (its MLflow run id), so that a
    restarted run logs to the same MLflow run."""

    def __init__(self, cfg: RaylmConfig, rank: int, tracking: Optional[dict] = None):
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
        self.trackers = Trackers(cfg, local_dir if self.remote else storage.root(cfg.train.storage_path), local_dir,
                                 mlflow_run_id=(tracking or {}).get("mlflow_run_id"))

    def tracking_ids(self) -> dict:
        """What a checkpoint keeps of the trackers (rank 0; empty elsewhere)."""
        return self.trackers.ids() if self.trackers else {}

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


class StepMeter:
    """Loss, tokens and time since the last log line; `maybe_log` turns them into the step's
    numbers with one all-reduce (the loss per trained token over every global batch since the last
    line, tokens/s, and the time since the last Ray report, agreed across ranks so that every rank
    makes the same reporting decision)."""

    def __init__(self, cfg: RaylmConfig, engine: Any, device: Any):
        self.cfg, self.engine, self.device = cfg, engine, device
        self.fpt, self.peak = flops_per_token(engine.module, cfg.data.seq_len), peak_flops(device)
        self.last_report_t = time.monotonic()
        self.since_report_s = 0.0
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.trained, self.tokens, self.t0 = 0.0, 0, 0, time.perf_counter()
        self.lr = 0.0

    def add(self, result: StepResult, micro: list[dict]) -> None:
        self.loss_sum += result.loss_sum
        self.trained += result.global_tokens  # already global: every rank holds the same count
        self.tokens += sum(real_tokens(b) for b in micro)
        self.lr = result.lr

    def maybe_log(self, step: int, force: bool) -> dict[str, float]:
        """The step's training numbers when a log line is due (every train.log_every_steps), else {}."""
        if not (step % self.cfg.train.log_every_steps == 0 or force):
            return {}
        import torch.distributed as dist

        elapsed = time.perf_counter() - self.t0
        loss_sum, since_report_s, tokens = all_reduced(
            [self.loss_sum, time.monotonic() - self.last_report_t, self.tokens], self.device)
        self.since_report_s = since_report_s / dist.get_world_size()
        tps = tokens / max(elapsed, 1e-9)  # real tokens (SFT: no padding), all ranks
        grad_norm = self.engine.get_global_grad_norm()
        out = {"loss": loss_sum / max(self.trained, 1), "lr": self.lr, "tokens_per_s": tps,
               "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
               # fp16: steps whose gradients overflowed and that DeepSpeed skipped (no update)
               "skipped_steps": int(self.engine.skipped_steps)}
        if self.peak:
            out["mfu"] = self.fpt * tps / (self.peak * dist.get_world_size())
        return out


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
        # validation numbers only in the report of the step that measured them: repeated in every
        # report they drew staircases in TensorBoard and MLflow
        metrics = {"step": pos.step, "tokens": pos.tokens, "resumed_from_step": self.resumed_step,
                   **logged, **(evaluator.last if evaluated else {})}
        spent = {**({"eval_s": evaluator.seconds} if evaluated else {}),  # where time goes
                 **({"save_s": checkpointer.seconds, "exported": checkpointer.exported} if checkpoint_dir else {})}
        t0 = time.perf_counter()
        # async: Ray Train uploads in its one background thread and deletes the local copy after.
        # Ray Train delivers a worker's reports in order, so a metrics report made in the step would
        # wait there for the checkpoint upload before it: it goes through the same thread instead.
        mode = CheckpointUploadMode.ASYNC if self.cfg.train.checkpoint_upload == "async" else CheckpointUploadMode.SYNC
        if checkpoint_dir:
            score = {} if checkpointer.score is None else {CHECKPOINT_SCORE: checkpointer.score}
            ray.train.report({**metrics, **score}, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                             checkpoint_dir_name=storage.step_name(pos.step), delete_local_checkpoint_after_upload=True,
                             checkpoint_upload_mode=mode)
            self.meter.last_report_t = time.monotonic()
        elif evaluated or self.meter.since_report_s >= REPORT_MIN_INTERVAL_S:  # logged holds when not evaluated
            ray.train.report(metrics, checkpoint_upload_mode=mode)
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
