"""GRPO's side of the training loop (train.objective grpo): the rollout engines beside the trainer,
the steps they generate, and the trainer's weights pushed into them after every optimizer step.

    RolloutLoop(...)      rank 0 starts train.grpo.rollout_engines vLLM engines (Ray actors,
                          raylm.train.rollouts) from the model's config and tokenizer with random
                          weights, hands their handles to the other ranks, and syncs the trainer's
                          weights into them before the first rollout (a resumed run: the
                          checkpoint's), so every rollout comes from the trainer's weights
    loop.steps(stream)    endless optimizer steps: each rank draws its step's prompt rows, submits
                          them (num_generations samples each, seeded by (train.seed, step, rank,
                          row): a resumed run regenerates the same completions), then collects and
                          scores them into micro-batches (raylm.train.objectives.grpo)
    loop.sync()           after every optimizer step: the weights (gathered under ZeRO-3, LoRA
                          merged) into every engine through the object store; sync_s noted

max_staleness k: generation for steps t+1 .. t+k is submitted before step t trains, so the engines
sample while the trainer computes; a step's rollouts are then up to k optimizer steps old (the
engine-vs-trainer importance weight corrects for it, and `staleness` logs it). k = 0 is synchronous:
every step's rollouts come from that step's weights. A resume is exact for k = 0; with k >= 1 the
first k steps after a resume sample from the checkpoint's weights.
"""

from __future__ import annotations

import collections
import json
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

from raylm.config import RaylmConfig


def model_files(module: Any, tokenizer_files: dict[str, bytes]) -> dict[str, bytes]:
    """config.json (its architecture named, as save_pretrained writes it) and the tokenizer's
    files: what a rollout engine needs besides the weights the first sync brings."""
    from peft import PeftModel

    base = module.get_base_model() if isinstance(module, PeftModel) else module
    config = json.loads(base.config.to_json_string(use_diff=False))
    config["architectures"] = [type(base).__name__]
    return {**tokenizer_files, "config.json": json.dumps(config).encode()}


@contextmanager
def full_weights(engine: Any, cfg: RaylmConfig, rank: int) -> Iterator[Any]:
    """The trainer's whole model as Hugging Face (name, tensor) pairs on rank 0 (None elsewhere);
    under ZeRO-3 every rank joins the gather of the partitioned parameters."""
    from raylm.train.rollouts import trainer_weights

    gathered = nullcontext()
    if cfg.deepspeed.zero_stage == 3:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    with gathered:
        yield trainer_weights(engine.module) if rank == 0 else None


class RolloutLoop:
    """The rollout pool of one training run, as seen from one rank."""

    def __init__(self, cfg: RaylmConfig, engine: Any, objective: Any, tokenizer_files: dict[str, bytes],
                 start_step: int):
        import torch.distributed as dist

        from raylm.train.rollouts import RolloutPool

        self.cfg, self.engine, self.objective = cfg, engine, objective
        self.rank = dist.get_rank()
        self.version = start_step  # the optimizer step whose weights the engines hold
        self.start_step = start_step
        self.position: tuple[int, int] = (0, 0)  # (epoch, rows) of the newest step handed out
        pool = RolloutPool(cfg, model_files(engine.module, tokenizer_files)) if self.rank == 0 else None
        if pool is not None:  # the engines' start is not a sync: sync_s measures weight transfer only
            print(f"raylm: {len(pool.engines)} rollout engine(s) started in {pool.wait_ready():.1f}s", flush=True)
        handles = [pool.engines if pool else None]
        dist.broadcast_object_list(handles, src=0)
        self.pool = pool or RolloutPool(cfg, {}, handles=handles[0])
        objective.pool = self.pool
        self.sync()

    def sync(self) -> None:
        """The trainer's weights into every engine (rank 0; every rank waits for it, so no rank
        submits rollouts to engines still holding the previous weights)."""
        import torch.distributed as dist

        with full_weights(self.engine, self.cfg, self.rank) as weights:
            if weights is not None:
                self.objective.note_sync(self.pool.sync(weights))
        dist.barrier()

    def after_step(self, step: int) -> None:
        """An optimizer step was taken: the engines get its weights."""
        self.sync()
        self.version = step

    def steps(self, stream: Any) -> Iterator[list[dict]]:
        """Scored micro-batches of every following step (see the module's docstring); `position`
        is the data position (epoch, rows) after the step last handed out, which a checkpoint
        records (the stream itself may have been drawn ahead)."""
        k = self.cfg.train.grpo.max_staleness
        draws = iter(stream)
        queue: collections.deque = collections.deque()
        step = self.start_step
        while True:
            while len(queue) < k + 1:
                step += 1
                prompts = self.objective.step_prompts(next(draws), step, self.rank)
                queue.append((prompts, self.pool.submit(prompts.ids, prompts.seeds), self.version,
                              (stream.epoch, stream.rows)))
            prompts, pending, version, self.position = queue.popleft()
            batch = self.pool.collect(pending)
            yield self.objective.scored_micro_batches(prompts, batch, staleness=self.version - version)

    def shutdown(self) -> None:
        """Rank 0 ends the engines once every rank is done with them."""
        import torch.distributed as dist

        dist.barrier()
        if self.rank == 0:
            self.pool.shutdown()
