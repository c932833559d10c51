"""The step maths: one optimizer step over this rank's micro-batches (the loss per unit of the
global batch: trained tokens, or DPO pairs), and validation over every rank."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

from raylm.config import RaylmConfig
from raylm.train.batches import trim
from raylm.train.collectives import all_reduced
from raylm.train.objectives.lm import NextToken


def steps(stream: Any, device: Any) -> Iterator[list[dict]]:
    """Endless optimizer steps of this rank's share of the data cache (a raylm.data.TrainStream),
    epoch after epoch, each epoch shuffled from data.seed and its number: each step is its
    grad_accum_steps micro-batches, cut from one draw of the step's rows (so the rows do not depend
    on the cut). The stream knows its position (epoch, rows taken), which the checkpoint records;
    started there, it continues with exactly the next step. A micro-batch is a dict: `input_ids`
    blocks of seq_len + 1 (raw text), or input_ids / labels / position_ids / tokens (SFT)."""
    from raylm.data.stream import to_torch

    for step in stream:
        yield [trim(to_torch(batch, device)) for batch in step]


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
    ranks (each reads its val shard, all of them the same number of micro-batches: a step's rows of
    a rank, micro_batch_size x grad_accum_steps, eval_batches times, fewer only if a shard runs out).
    So the rows evaluated, and the val_loss that picks the best checkpoint, do not depend on how a
    step is cut into micro-batches, as the rows trained on do not."""
    import torch

    objective = objective or NextToken(engine)
    engine.eval()
    totals: list[float] = []
    batches = 0
    rows = iter(shard.iter_torch_batches(batch_size=cfg.train.micro_batch_size, dtypes=torch.long, device=device))
    with torch.no_grad():
        while batches < cfg.train.eval_micro_batches:
            batch = next(rows, None)
            if not all_have(batch is not None, device):
                break
            sums = objective.eval_sums(trim(batch))
            totals, batches = [a + b for a, b in zip(totals, sums)] if totals else sums, batches + 1
    engine.train()
    if batches == 0:  # check_data_fits makes this unreachable from the CLI; never report a val_loss of 0
        raise RuntimeError("a validation shard is empty: raise data.val_fraction")
    return objective.eval_metrics(all_reduced(totals, device))


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
        # an objective that validates its own way (GRPO: by generating) has `evaluate`
        own = getattr(self.objective, "evaluate", None)
        measured = own(self.shard) if own else evaluate(self.engine, self.shard, self.cfg, self.device, self.objective)
        # `evals` counts evaluations by step, so it survives restarts: Tune forwards each once
        self.last = {**measured, "evals": step // every + (1 if step % every else 0)}
        self.seconds = time.perf_counter() - t0
        return True
