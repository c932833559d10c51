"""The driver side of training: data stage, then one `TorchTrainer` running `train_fn_per_worker`.

No Ray Dataset is handed to the trainer: each worker streams its share of the packed-token cache
(raylm.data.stream), located by the cache's URI and manifest in the loop config."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from raylm import console, storage
from raylm.config import InputError, RaylmConfig
from raylm.console import Progress, say
from raylm.data import PreparedData, prepare_data, tokenizer_files
from raylm.train.checkpoint import hf_dir
from raylm.train.identity import check_resume, run_identity


@dataclass
class TrainOutcome:
    run_dir: str
    checkpoint: Optional[str]  # the newest checkpoint folder (DeepSpeed state; the final one also hf/)
    hf_checkpoint: Optional[str]  # loadable with AutoModelForCausalLM.from_pretrained
    metrics: dict = field(default_factory=dict)
    objective: str = "lm"  # train.objective: what the summary line reports

    def summary(self) -> str:
        from raylm.train.objectives import headline

        m = self.metrics
        parts = [f"step {m.get('step')}", *headline(self.objective, m)]
        if "resumed_from_step" in m and m["resumed_from_step"]:
            parts.append(f"resumed from step {m['resumed_from_step']}")
        return f"trained: {', '.join(parts)}\nrun: {self.run_dir}\nHF checkpoint: {self.hf_checkpoint}"


def check_data_fits(cfg: RaylmConfig, prepared: PreparedData) -> None:
    """Every worker's shard must hold at least one step's rows (a rank draws a step's rows at once,
    then cuts them into micro-batches); fail before asking for workers."""
    t = cfg.train
    per_worker = prepared.stats.train_blocks // t.num_workers
    if per_worker < t.micro_batch_size * t.grad_accum_steps:
        raise InputError(f"train.micro_batch_size={t.micro_batch_size} x train.grad_accum_steps={t.grad_accum_steps}: "
                         f"each of train.num_workers={t.num_workers} workers gets only {per_worker} training blocks; "
                         f"lower the micro-batch, the accumulation or data.seq_len, or add data")
    # Ray Train splits the val set equally over the workers: fewer blocks than workers leaves some
    # rank an empty shard, and every rank must evaluate the same batches (eval_batches_agreed)
    if prepared.stats.val_blocks < cfg.train.num_workers:
        raise InputError(f"data.val_fraction={cfg.data.val_fraction}: the corpus yields {prepared.stats.val_blocks} "
                         f"validation blocks of {prepared.stats.blocks}, fewer than train.num_workers="
                         f"{cfg.train.num_workers} (one each); raise data.val_fraction or add data")


def check_objective_runs(cfg: RaylmConfig) -> None:
    """What an objective's config allows but its loop does not run yet, refused before Ray starts
    (exit 2, naming the field) rather than trained as something else: GRPO generates once per
    optimizer step, so TRL's num_iterations > 1 (several optimizer passes over one generation
    batch, against the old policy's log-probs) is not run."""
    from raylm.errors import ConfigError

    g = cfg.train.grpo
    if cfg.train.objective == "grpo" and g.num_iterations != 1:
        raise ConfigError(f"train.grpo.num_iterations: {g.num_iterations}; raylm's GRPO loop takes one optimizer "
                          f"step per generation batch (num_iterations 1) for now", fields=["train.grpo.num_iterations"])


def build_trainer(cfg: RaylmConfig, prepared: PreparedData, callbacks: Optional[list] = None,
                  storage_path: Optional[str] = None, held_cpu: float = 0.0, progress: Any = None,
                  keep_best: bool = False) -> Any:
    """A TorchTrainer for this config; `storage_path`/`callbacks` let Tune place and observe trials.

    `keep_best` (a sweep trial): Ray Train keeps the train.keep_checkpoints best checkpoints by
    tune.metric (and always the newest, which resume needs), and the workers export the best.

    `held_cpu` is what the caller itself holds (a Tune trial function's sliver): it is taken out
    of the workers' request, so a trial needs exactly num_workers x cpus_per_worker CPUs. Without
    this, 2 workers x 1 CPU plus a 0.01-CPU trial never fit on a 2-CPU machine (a silent hang).
    """
    check_objective_runs(cfg)
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from raylm.cluster import worker_env
    from raylm.train.loop import train_fn_per_worker

    # the workers write metrics and find checkpoints under the storage actually used
    root = storage.root(storage_path or cfg.train.storage_path)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"storage_path": root})})
    t = cfg.train
    identity = run_identity(cfg, (prepared.manifest or {}).get("fingerprint"))
    check_resumable(cfg, identity, prepared)  # a resume that changed the run: refused before any worker starts
    resources = {"CPU": t.cpus_per_worker - held_cpu / t.num_workers, **({"GPU": 1} if t.use_gpu else {})}
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "progress": progress, "keep_best": keep_best,
                           "tokenizer_files": tokenizer_files(prepared.tokenizer_dir), "identity": identity,
                           "data": {"uri": prepared.uri, "manifest": prepared.manifest}},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu, resources_per_worker=resources,
                                     placement_strategy=t.placement_strategy,
                                     label_selector=dict(t.worker_node_labels) or None),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        run_config=RunConfig(
            name=t.run_name,
            storage_path=root,
            checkpoint_config=checkpoint_config(cfg, keep_best),
            failure_config=FailureConfig(max_failures=t.max_failures),
            callbacks=callbacks or [],
            worker_runtime_env={"env_vars": worker_env(t.use_gpu)},
        ),
    )


def check_resumable(cfg: RaylmConfig, identity: dict, prepared: Optional[PreparedData] = None) -> None:
    """The run's newest complete checkpoint, if any, must have been trained with this identity; with
    train.resume_universal another world size is allowed: its data position must carry over exactly
    (`check_universal_position`), and its DeepSpeed state is converted to a universal checkpoint here,
    once, before any worker starts (given the prepared data: the trainer's check, not the CLI's early one)."""
    from raylm.train.checkpoint import ensure_universal, pick_resume_checkpoint
    from raylm.train.identity import saved_world

    picked = pick_resume_checkpoint(storage.run_dir(cfg.train.storage_path, cfg.train.run_name), log=lambda _: None)
    if picked is None:
        return
    check_resume(identity, picked[1], picked[0], universal=cfg.train.resume_universal)
    if saved_world(picked[1]) != cfg.train.num_workers and prepared is not None:  # (the CLI's check before Ray
        check_universal_position(cfg, picked[1], picked[0], prepared)              # has no data stage yet)
        ensure_universal(picked[0], log=say)


def check_universal_position(cfg: RaylmConfig, manifest: dict, path: str, prepared: PreparedData) -> None:
    """A checkpoint k steps into its epoch resumes on another world size k steps into the same epoch
    (the same rows consumed: k x the global batch; identity.universal_rows). The new world size deals
    the cache's units to its ranks differently, so its epoch may hold fewer whole steps (the smallest
    rank's share): refused (exit 2) when it holds fewer than k, rather than skip into the next epoch."""
    from raylm.data.stream import CacheStream
    from raylm.errors import CheckpointError
    from raylm.train.identity import saved_world, universal_rows

    t, world = cfg.train, cfg.train.num_workers
    rows = universal_rows(int(manifest.get("rows", 0)), saved_world(manifest), world, t.effective_global_batch)
    step_rows = t.micro_batch_size * t.grad_accum_steps
    epoch = int(manifest.get("epoch", 0))
    steps = CacheStream(prepared.uri, prepared.manifest, "train", 0, world).epoch_batches(cfg.data.seed, epoch, step_rows)
    if rows // step_rows > steps:
        raise CheckpointError(f"train.num_workers: {world} now; the checkpoint {path} stands {rows // step_rows} steps "
                              f"into epoch {epoch}, but on {world} workers that epoch holds only {steps} steps of the "
                              f"global batch {t.effective_global_batch}: the data position cannot carry over exactly. "
                              f"Resume on {saved_world(manifest)} workers, or start a new run.")


def checkpoint_config(cfg: RaylmConfig, keep_best: bool) -> Any:
    """Which checkpoints Ray Train keeps: the newest K of a run; a trial's K best by its
    evaluation score. Ray Train never deletes the newest one either way (resume starts there)."""
    from ray.train import CheckpointConfig

    from raylm.train.policy import CHECKPOINT_SCORE

    if not keep_best:
        return CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)
    return CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints, checkpoint_score_attribute=CHECKPOINT_SCORE,
                            checkpoint_score_order=cfg.tune.mode)


@contextmanager
def training_progress(cfg: RaylmConfig) -> Iterator[Any]:
    """A progress bar of the run's steps (loss, tokens/s) fed by rank 0 through a Ray queue: the
    workers' own output is not forwarded to a quiet CLI. Yields the queue (None when not quiet)."""
    if not console.quiet():
        yield None
        return
    import ray
    from ray.util.queue import Empty, Queue

    queue = Queue(maxsize=256, actor_options={"num_cpus": 0})
    bar = Progress(f"train: {cfg.train.run_name}", total=cfg.train.max_steps, unit="steps")
    done = threading.Event()

    shown: dict = {}

    def show(rec: dict) -> None:  # val_loss comes only with evaluations: the bar keeps the newest
        shown.update({k: rec[k] for k in ("loss", "val_loss", "tokens_per_s") if k in rec})
        bar.update(int(rec.get("step", bar.n)), **shown)

    def drain() -> None:
        while not done.is_set():
            try:
                show(queue.get(timeout=0.5))
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - the queue actor went away with the cluster
                return

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        done.set()
        thread.join(timeout=5)
        try:
            while True:  # what rank 0 sent after the last poll: the bar ends at the run's last step
                show(queue.get_nowait())
        except Exception:  # noqa: BLE001 - Empty, or the queue actor is gone
            pass
        bar.close()
        try:
            ray.kill(queue.actor)
        except Exception:  # noqa: BLE001 - already gone
            pass


def run_training(cfg: RaylmConfig, prepared: Optional[PreparedData] = None) -> TrainOutcome:
    """Prepare data (unless given), train, and return where the result lives. Ray must be up."""
    if prepared is None:
        prepared = prepare_data(cfg.data, storage_path=cfg.train.storage_path)
        say(prepared.stats.summary())
        say(prepared.reuse_line())
    check_data_fits(cfg, prepared)
    with training_progress(cfg) as queue:
        result = build_trainer(cfg, prepared, progress=queue).fit()
    run_dir = storage.run_dir(cfg.train.storage_path, cfg.train.run_name)
    checkpoint = storage.join(run_dir, os.path.basename(result.checkpoint.path)) if result.checkpoint else None
    return TrainOutcome(run_dir=run_dir, checkpoint=checkpoint, hf_checkpoint=hf_dir(checkpoint) if checkpoint else None,
                        metrics=dict(result.metrics or {}), objective=cfg.train.objective)
