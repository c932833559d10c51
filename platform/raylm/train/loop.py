"""`train_fn_per_worker`: what every Ray Train worker runs (one DeepSpeed rank each)."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from raylm import storage
from raylm.config import RaylmConfig
from raylm.train.collectives import all_reduced

# Ray Train V2 hands each report to the controller through a queue of one, which the controller
# drains on its health-check poll (2 s by default): reporting more often than that blocks the
# training loop. Metrics-only reports are therefore sent at most once per poll; every step's
# numbers still go to metrics.jsonl, and eval/checkpoint reports are always sent.
REPORT_MIN_INTERVAL_S = float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0"))

# What Ray Train ranks a sweep trial's checkpoints by (CheckpointConfig.checkpoint_score_attribute):
# tune.metric measured at the checkpoint's own step, the worst value when it was not measured.
CHECKPOINT_SCORE = "checkpoint_score"

# Dense bf16 peak FLOP/s per GPU, for model FLOPs utilisation (MFU).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


SFT_COLUMNS = ("input_ids", "labels", "position_ids")


def trim(batch: dict) -> dict:
    """An SFT batch cut to its longest row (rows are left-aligned, `tokens` real each): padding
    beyond it is never computed, so unpacked batches cost what their longest example costs.
    Preference pairs become [chosen; rejected] rows the same way (raylm.train.dpo.concat_pairs)."""
    if "chosen_tokens" in batch:
        from raylm.train.dpo import concat_pairs

        return concat_pairs(batch)
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


def trained_tokens(batch: dict) -> Any:
    """Tokens the loss is computed on, known before any forward pass (a 0-d tensor on the batch's
    device): SFT labels other than IGNORE; raw text every next token of its blocks."""
    import torch

    from raylm.data import IGNORE

    if "labels" in batch:
        return (batch["labels"] != IGNORE).sum()
    block = batch["input_ids"]
    return torch.tensor(block[:, 1:].numel(), device=block.device)


class NextToken:
    """The language-modelling objective (pretraining, SFT): the loss is per trained token. An
    objective says how many units of loss a micro-batch holds (known before its forward pass), the
    summed loss over them, and what validation adds up; DPO (raylm.train.dpo) is the other one, per
    preference pair."""

    def __init__(self, engine: Any):
        self.engine = engine

    def count(self, batch: dict) -> Any:
        return trained_tokens(batch)

    def summed_loss(self, batch: dict) -> Any:
        return token_losses(self.engine, batch)[0]

    def eval_sums(self, batch: dict) -> list[float]:
        loss_sum, count = token_losses(self.engine, batch)  # SFT: the same (assistant) tokens as training
        return [float(loss_sum), float(count)]

    def eval_metrics(self, totals: list[float]) -> dict[str, float]:
        val_loss = totals[0] / max(totals[1], 1.0)
        return {"val_loss": val_loss, "perplexity": math.exp(min(val_loss, 50.0))}

    def train_metrics(self) -> dict[str, float]:
        return {}


@dataclass
class StepResult:
    """What one optimizer step did: this rank's summed loss, the global batch's units of loss
    (trained tokens; DPO: pairs) and the lr the step trained with."""

    loss_sum: float
    global_tokens: int
    lr: float


def backward_global_batch(engine: Any, micro: list[dict], objective: Any = None) -> tuple[float, int]:
    """Forward and backward of this rank's micro-batches (grad_accum_steps of them), leaving the
    gradient of (summed token loss over the global batch) / (its trained tokens) reduced over the
    ranks; returns (this rank's summed token loss, the global trained-token count). DPO: pairs
    instead of tokens (the mean over the step's pairs).

    The global token count is all-reduced once, before any backward. DeepSpeed then averages
    gradients over the data-parallel ranks (its gradient all-reduce divides by the world size), and
    engine.backward would divide by gradient_accumulation_steps, which scale_wrt_gas=False turns
    off: each micro-batch's summed loss x world / count therefore sums to exactly that gradient,
    however the global batch is cut into ranks and micro-batches (a micro-batch of one short answer
    weighs by its tokens, not as much as one of four long ones). The caller's engine.step() then
    applies it (tests read the gradient before)."""
    import torch
    import torch.distributed as dist

    objective = objective or NextToken(engine)
    count = torch.stack([torch.as_tensor(objective.count(b)) for b in micro]).sum()
    dist.all_reduce(count)
    global_tokens = int(count)
    scale = dist.get_world_size() / max(global_tokens, 1)
    loss_sum = 0.0
    for i, batch in enumerate(micro):
        if i:
            engine.step()  # closes the previous micro-batch: inside the accumulation window, no update
        summed = objective.summed_loss(batch)
        engine.backward(summed * scale, scale_wrt_gas=False)
        loss_sum += float(summed.detach())
    return loss_sum, global_tokens


def train_step(engine: Any, micro: list[dict], objective: Any = None) -> StepResult:
    """One optimizer step over this rank's micro-batches (see backward_global_batch)."""
    lr = engine.get_lr()[0]  # the lr this step trains with (the scheduler moves on in step())
    loss_sum, global_tokens = backward_global_batch(engine, micro, objective)
    engine.step()  # the accumulation boundary: the optimizer steps (an fp16 overflow: skipped_steps + 1)
    return StepResult(loss_sum, global_tokens, lr)


def real_tokens(batch: dict) -> int:
    """Tokens actually computed (not padding): what tokens/s counts."""
    return int(batch["tokens"].sum()) if "tokens" in batch else batch["input_ids"][:, :-1].numel()


def all_have(has_batch: bool, device: Any) -> bool:
    """Whether every rank has its next eval batch. Ranks must run the same number of forward
    passes: under ZeRO-3 each one all-gathers the parameters, and a rank that stops early leaves
    the others waiting in an all-gather forever."""
    return all_reduced([1.0 if has_batch else 0.0], device, op="MIN")[0] > 0


def evaluate(engine: Any, shard: Any, cfg: RaylmConfig, device: Any, objective: Any = None) -> dict[str, float]:
    """Validation loss and perplexity per trained token (DPO: loss and rewards per pair), over all
    ranks (each reads its val shard, all of them the same number of batches: up to eval_batches,
    fewer only if a shard runs out)."""
    import torch

    objective = objective or NextToken(engine)
    engine.eval()
    totals: list[float] = []
    batches = 0
    rows = iter(shard.iter_torch_batches(batch_size=cfg.train.micro_batch_size, dtypes=torch.long, device=device))
    with torch.no_grad():
        while batches < cfg.train.eval_batches:
            batch = next(rows, None)
            if not all_have(batch is not None, device):
                break
            sums = objective.eval_sums(trim(batch))
            totals, batches = [a + b for a, b in zip(totals, sums)] if totals else sums, batches + 1
    engine.train()
    if batches == 0:  # check_data_fits makes this unreachable from the CLI; never report a val_loss of 0
        raise RuntimeError("a validation shard is empty: raise data.val_fraction")
    return objective.eval_metrics(all_reduced(totals, device))


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
    """The DeepSpeed engine (LoRA-wrapped when train.lora is set) and its trainable/total params.

    Under ZeRO-3 the model is built partitioned (`deepspeed.zero.Init`): no rank ever holds the
    whole fp32 model, which is what makes ZeRO-3 save host memory at load (bench/RESULTS.md)."""
    import torch
    import torch.distributed as dist

    from raylm.model import build_model
    from raylm.train.deepspeed import deepspeed_config, import_deepspeed, lr_scheduler
    from raylm.train.lora import apply_lora, param_counts

    deepspeed = import_deepspeed()
    deepspeed.init_distributed(dist_backend="nccl" if cfg.train.use_gpu else "gloo")  # reuses Ray's group
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank (ZeRO-3: rank 0's, broadcast)
    model = build_model(cfg.model, len(tokenizer), cfg.data.seq_len, tokenizer, ds_config=deepspeed_config(cfg))
    if cfg.train.lora:
        torch.manual_seed(cfg.train.seed)  # ZeRO-3 initialised on rank 0 only: the adapters start equal anyway
        model = apply_lora(model, cfg.train.lora)
    trainable, total = param_counts(model)
    if dist.get_rank() == 0:
        print(f"raylm: {cfg.model.name}{' + LoRA r=%d' % cfg.train.lora.r if cfg.train.lora else ''}: "
              f"{trainable:,} trainable of {total:,} parameters ({100.0 * trainable / total:.2f}%)", flush=True)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                           config=deepspeed_config(cfg), lr_scheduler=lr_scheduler(cfg))
    return engine, {"trainable_params": trainable, "total_params": total}


def _resume(cfg: RaylmConfig, engine: Any, log: MetricsLog) -> tuple[Any, Optional[str]]:
    """Load the newest complete checkpoint of this run (local or object storage), if any.

    Every `step_*` folder of the run is a candidate, verified against its manifest: one persisted
    just before a worker died may be newer than the one Ray Train registered last."""
    import ray.train

    from raylm.train.checkpoint import Position, load_checkpoint, pick_resume_checkpoint
    from raylm.train.deepspeed import continue_schedule

    latest = ray.train.get_checkpoint()
    run_dir = storage.run_dir(cfg.train.storage_path, cfg.train.run_name)
    picked = pick_resume_checkpoint(run_dir, log=print)
    if picked is None:
        if latest is not None:
            raise RuntimeError(f"no usable checkpoint in {run_dir} (Ray Train registered {latest.path})")
        return Position(), None
    path, _ = picked
    pos = load_checkpoint(engine, path, adapter_only=bool(cfg.train.lora))
    continue_schedule(engine, cfg)
    log.write({"event": "resume", "from": path, "step": pos.step, "epoch": pos.epoch, "offset": pos.offset,
               "time": time.time()})
    return pos, path


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


class Evaluator:
    """Validation every train.eval_every_steps (and at the end); keeps the newest result."""

    def __init__(self, cfg: RaylmConfig, engine: Any, shard: Any, device: Any, objective: Any):
        self.cfg, self.engine, self.shard, self.device, self.objective = cfg, engine, shard, device, objective
        self.last: dict[str, float] = {}
        self.seconds = 0.0

    def maybe_eval(self, step: int, force: bool) -> bool:
        every = self.cfg.train.eval_every_steps
        if not (step % every == 0 or force):
            return False
        t0 = time.perf_counter()
        # `evals` counts evaluations by step, so it survives restarts: Tune forwards each once
        self.last = {**evaluate(self.engine, self.shard, self.cfg, self.device, self.objective),
                     "evals": step // every + (1 if step % every else 0)}
        self.seconds = time.perf_counter() - t0
        return True


class Checkpointer:
    """A resumable checkpoint every train.checkpoint_every_steps (and at the end), into a local
    folder that the next Ray Train report uploads (`train.checkpoint_upload`).

    The consolidated HF export (train.export) goes with the final checkpoint, with every one under
    'every', and in a sweep trial (`keep_best`) with each checkpoint whose tune.metric, measured at
    its own step, is the best of the run so far: the one Ray Train keeps by score and best.json
    serves. `score` is what that checkpoint is ranked by (a checkpoint whose model was never
    evaluated ranks last: it cannot be the best one)."""

    def __init__(self, cfg: RaylmConfig, engine: Any, tokenizer: Any, resumed_from: Optional[str] = None,
                 keep_best: bool = False):
        self.cfg, self.engine, self.tokenizer, self.keep_best = cfg, engine, tokenizer, keep_best
        self.seconds = 0.0
        self.exported = False
        self.score: Optional[float] = None
        self.best: Optional[float] = None  # the best exported tune.metric so far, carried by the manifests
        if resumed_from:
            from raylm.train.checkpoint import MANIFEST

            self.best = storage.read_json(storage.join(resumed_from, MANIFEST)).get("best")

    def _better(self, value: float, than: Optional[float]) -> bool:
        return than is None or (value <= than if self.cfg.tune.mode == "min" else value >= than)

    def plan(self, force: bool, evaluation: dict) -> bool:
        """Whether this checkpoint gets the HF export; sets `score` and carries `best` forward."""
        value = evaluation.get(self.cfg.tune.metric)
        best_so_far = self.keep_best and value is not None and self._better(value, self.best)
        self.exported = force or self.cfg.train.export == "every" or best_so_far
        if self.exported and value is not None and self._better(value, self.best):
            self.best = value
        worst = float("inf") if self.cfg.tune.mode == "min" else float("-inf")
        self.score = (worst if value is None else value) if self.keep_best else None
        return self.exported

    def maybe_save(self, pos: Any, force: bool, evaluation: Optional[dict] = None) -> Optional[str]:
        """`evaluation`: the numbers measured at this very step (an evaluation's, the logged loss)."""
        from raylm.train.checkpoint import SaveRecord, save_checkpoint

        if not (pos.step % self.cfg.train.checkpoint_every_steps == 0 or force):
            return None
        evaluation = {k: v for k, v in (evaluation or {}).items() if isinstance(v, (int, float))}
        export = self.plan(force, evaluation)
        t0 = time.perf_counter()
        local = save_checkpoint(self.engine, self.tokenizer, self.cfg, pos,
                                SaveRecord(export=export, evaluation=evaluation, best=self.best))
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
    objective = NextToken(engine)
    if t.objective == "dpo":
        from raylm.train.dpo import DPO

        objective = DPO(cfg, engine, tokenizer, device)
    log = MetricsLog(cfg, dist.get_rank())
    log.write({"event": "start", **params, "lora": bool(t.lora), "data": loop_config["data"]["uri"], "time": time.time()})
    pos, resumed_from = _resume(cfg, engine, log)
    train_data, val_data = _data_streams(loop_config["data"], cfg, pos)
    batches = micro_batches(train_data, device)
    meter = StepMeter(cfg, engine, device)
    evaluator = Evaluator(cfg, engine, val_data, device, objective)
    checkpointer = Checkpointer(cfg, engine, tokenizer, resumed_from, keep_best=bool(loop_config.get("keep_best")))
    reporter = Reporter(cfg, log, meter, pos.step, loop_config.get("progress"), dist.get_rank())
    tokens_per_step = t.effective_global_batch * cfg.data.seq_len
    while pos.step < t.max_steps:
        micro = [next(batches) for _ in range(t.grad_accum_steps)]  # drawn first: their tokens weigh the loss
        meter.add(train_step(engine, micro, objective), micro)
        pos.step += 1
        pos.tokens += tokens_per_step
        pos.epoch, pos.offset = train_data.epoch, train_data.offset
        last = pos.step == t.max_steps
        logged = meter.maybe_log(pos.step, force=last)
        if logged:
            logged.update(objective.train_metrics())  # DPO: rewards/* over the pairs since the last line
        evaluated = evaluator.maybe_eval(pos.step, force=last)
        measured = {**logged, **(evaluator.last if evaluated else {})}  # this step's numbers (tune.metric may be loss)
        checkpoint_dir = checkpointer.maybe_save(pos, force=last, evaluation=measured)
        reporter.maybe_report(pos, logged, evaluator, evaluated, checkpointer, checkpoint_dir)
    log.close()
