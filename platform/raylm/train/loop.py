"""`train_fn_per_worker`: what every Ray Train worker runs (one DeepSpeed rank each)."""

from __future__ import annotations

import tempfile
import time
from typing import Any, Optional

from raylm import storage
from raylm.config import RaylmConfig
from raylm.train.metrics import MetricsLog, Reporter, StepMeter
from raylm.train.objectives import build_objective, prepare_model
from raylm.train.policy import Checkpointer
from raylm.train.step import Evaluator, steps, train_step


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


def _engine(cfg: RaylmConfig, tokenizer: Any, load_universal: bool = False) -> tuple[Any, dict]:
    """The DeepSpeed engine (LoRA-wrapped when train.lora is set) and its trainable/total params.

    Under ZeRO-3 the model is built partitioned (`deepspeed.zero.Init`): no rank ever holds the
    whole fp32 model, which is what makes ZeRO-3 save host memory at load (bench/RESULTS.md)."""
    import torch
    import torch.distributed as dist

    from raylm.model import build_model
    from raylm.train.deepspeed import (cpu_mmap_threshold, deepspeed_config, import_deepspeed, lr_scheduler,
                                       optimizer_groups, share_fp32_master)
    from raylm.train.lora import apply_lora, param_counts

    cpu_mmap_threshold(cfg.cpu_mmap_kib)  # CPU: before the model is built, so freed blocks go back
    deepspeed = import_deepspeed()
    deepspeed.init_distributed(dist_backend="nccl" if cfg.train.use_gpu else "gloo")  # reuses Ray's group
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank (ZeRO-3: rank 0's, broadcast)
    model = build_model(cfg.model, len(tokenizer), cfg.data.seq_len, tokenizer, ds_config=deepspeed_config(cfg))
    if cfg.train.lora:
        torch.manual_seed(cfg.train.seed)  # ZeRO-3 initialised on rank 0 only: the adapters start equal anyway
        model = apply_lora(model, cfg.train.lora)
    model = prepare_model(cfg, model)  # after LoRA: its adapters' dropout too
    trainable, total = param_counts(model)
    if dist.get_rank() == 0:
        print(f"raylm: {cfg.model.name}{' + LoRA r=%d' % cfg.train.lora.r if cfg.train.lora else ''}: "
              f"{trainable:,} trainable of {total:,} parameters ({100.0 * trainable / total:.2f}%)", flush=True)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=optimizer_groups(model, cfg.train.weight_decay),
                                           config=deepspeed_config(cfg, load_universal), lr_scheduler=lr_scheduler(cfg))
    if cfg.deepspeed.zero_stage == 3:
        share_fp32_master(engine.optimizer)
    return engine, {"trainable_params": trainable, "total_params": total}


def _newest_checkpoint(cfg: RaylmConfig, identity: dict) -> Optional[tuple[str, dict]]:
    """(path, manifest) of the newest complete checkpoint of this run (local or object storage), if
    any; refused if it was trained as another run (the driver checked before; a worker-group restart
    comes here again).

    Every `step_*` folder of the run is a candidate, verified against its manifest: one persisted
    just before a worker died may be newer than the one Ray Train registered last."""
    import ray.train

    from raylm.train.checkpoint import pick_resume_checkpoint
    from raylm.train.identity import check_resume

    latest = ray.train.get_checkpoint()
    run_dir = storage.run_dir(cfg.train.storage_path, cfg.train.run_name)
    picked = pick_resume_checkpoint(run_dir, log=print)
    if picked is None and latest is not None:
        raise RuntimeError(f"no usable checkpoint in {run_dir} (Ray Train registered {latest.path})")
    if picked is not None:
        check_resume(identity, picked[1], picked[0], universal=cfg.train.resume_universal)
    return picked


def _universal(cfg: RaylmConfig, picked: Optional[tuple[str, dict]]) -> bool:
    """The picked checkpoint was written by another world size (allowed: train.resume_universal):
    it is loaded from its universal conversion."""
    from raylm.train.identity import saved_world

    return picked is not None and saved_world(picked[1]) != cfg.train.num_workers


def _resume(cfg: RaylmConfig, engine: Any, log: MetricsLog, picked: Optional[tuple[str, dict]]) -> Any:
    """Load the picked checkpoint into the engine: the Position it recorded (a fresh one without)."""
    from raylm.train.checkpoint import Position, load_checkpoint
    from raylm.train.deepspeed import continue_schedule, group_hyperparameters, restore_group_hyperparameters

    from raylm.train.identity import saved_world, universal_rows

    if picked is None:
        return Position()
    universal = _universal(cfg, picked)
    built = group_hyperparameters(engine)  # this config's; the load brings back the saved run's
    pos = load_checkpoint(engine, picked[0], adapter_only=bool(cfg.train.lora), universal=universal)
    if universal:  # the same rows consumed from the epoch, as this world size's rows per rank
        pos.rows = universal_rows(pos.rows, saved_world(picked[1]), cfg.train.num_workers,
                                  cfg.train.effective_global_batch)
    restore_group_hyperparameters(engine, built)
    continue_schedule(engine, cfg)
    log.write({"event": "resume", "from": picked[0], "step": pos.step, "epoch": pos.epoch, "rows": pos.rows,
               "time": time.time(), **({"universal_from_world_size": saved_world(picked[1])} if universal else {})})
    return pos


def _data_streams(data: dict, cfg: RaylmConfig, pos: Any) -> tuple[Any, Any]:
    """This rank's train stream (started at the checkpoint's data position) and val stream."""
    import torch.distributed as dist

    from raylm.data.stream import CacheStream, TrainStream

    rank, world = dist.get_rank(), dist.get_world_size()
    train = TrainStream(CacheStream(data["uri"], data["manifest"], "train", rank, world), cfg.data.seed,
                        cfg.train.micro_batch_size, cfg.train.grad_accum_steps, cfg.data.shuffle_buffer_rows,
                        pos.epoch, pos.rows)
    return train, CacheStream(data["uri"], data["manifest"], "val", rank, world)


def train_fn_per_worker(loop_config: dict) -> None:
    """Train until `train.max_steps`; the components decide when they act (log, evaluate,
    checkpoint, report), so this reads as the loop it is."""
    import torch.distributed as dist

    cfg, tokenizer, device = _setup(loop_config)
    t = cfg.train
    identity = loop_config["identity"]  # what the checkpoints record and a resume must keep (driver.py)
    picked = _newest_checkpoint(cfg, identity)  # first: another world size's is loaded as a universal checkpoint
    engine, params = _engine(cfg, tokenizer, load_universal=_universal(cfg, picked))
    objective = build_objective(cfg, engine, tokenizer, device)
    log = MetricsLog(cfg, dist.get_rank(), tracking=picked[1].get("tracking") if picked else None)
    log.write({"event": "start", **params, "lora": bool(t.lora), "data": loop_config["data"]["uri"], "time": time.time()})
    pos = _resume(cfg, engine, log, picked)
    train_data, val_data = _data_streams(loop_config["data"], cfg, pos)
    rollouts = None
    if t.objective == "grpo":  # the rollout engines beside the trainer, holding its weights
        from raylm.train.grpo_loop import RolloutLoop

        rollouts = RolloutLoop(cfg, engine, objective, loop_config["tokenizer_files"], pos.step)
        step_batches = rollouts.steps(train_data)
    else:
        step_batches = steps(train_data, device)
    meter = StepMeter(cfg, engine, device)
    evaluator = Evaluator(cfg, engine, val_data, device, objective)
    checkpointer = Checkpointer(cfg, engine, tokenizer, picked[0] if picked else None,
                                keep_best=bool(loop_config.get("keep_best")), identity=identity,
                                tracking=log.tracking_ids())
    reporter = Reporter(cfg, log, meter, pos.step, loop_config.get("progress"), dist.get_rank())
    if rollouts is not None and pos.step == 0 and evaluator.maybe_eval(0, force=True):  # GRPO: the start's val_rewards
        reporter.maybe_report(pos, {}, evaluator, True, checkpointer, None)
    tokens_per_step = t.effective_global_batch * cfg.data.seq_len
    while pos.step < t.max_steps:
        micro = next(step_batches)  # the step's rows, drawn first: their tokens weigh the loss
        meter.add(train_step(engine, micro, objective), micro)
        pos.step += 1
        pos.tokens += tokens_per_step
        pos.epoch, pos.rows = rollouts.position if rollouts else (train_data.epoch, train_data.rows)
        if rollouts is not None:
            rollouts.after_step(pos.step)  # the engines get this step's weights (sync_s)
        last = pos.step == t.max_steps
        logged = meter.maybe_log(pos.step, force=last)
        if logged:
            logged.update(objective.train_metrics())  # DPO: rewards/* over the pairs since the last line
        evaluated = evaluator.maybe_eval(pos.step, force=last)
        measured = {**logged, **(evaluator.last if evaluated else {})}  # this step's numbers (tune.metric may be loss)
        checkpoint_dir = checkpointer.maybe_save(pos, force=last, evaluation=measured)
        reporter.maybe_report(pos, logged, evaluator, evaluated, checkpointer, checkpoint_dir)
    if rollouts is not None:
        rollouts.shutdown()
    log.close()
