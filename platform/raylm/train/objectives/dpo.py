"""DPO (train.objective dpo): preference tuning on the same Ray Train + DeepSpeed loop.

    pair rows -> batch   a micro-batch of B pairs becomes 2B sequences, [chosen; rejected] (as TRL
                         batches them), cut to the longest real sequence (train.batches.concat_pairs)
    logits -> log-probs  the summed log-probability of each sequence's labelled (answer) tokens
    losses               sigmoid (DPO): -log sigmoid(beta * (chosen log-ratio - rejected log-ratio));
                         ipo: ((chosen - rejected log-ratio, each averaged per answer token) - 1/(2 beta))^2
    rewards              beta * log-ratio of each answer; margins, accuracy (chosen > rejected)

The reference model is the starting policy:
- LoRA: the same engine with its adapters disabled (`disable_adapter()`), no second copy.
- Full fine-tuning: a frozen copy built as the policy was (same model.name, same train.seed, so the
  same initial weights) and never stepped. Under ZeRO-3 it is a DeepSpeed engine without an
  optimizer, partitioned like the policy; otherwise a plain module in the run's precision.
  Chosen over log-probs precomputed by a data pass: it needs no cache to keep in step with the data
  order, shuffle and shards, and a restarted run rebuilds it exactly (a precomputed cache would have
  to be written, found and trusted again on resume). It costs one more forward per micro-batch,
  which LoRA pays too, and one more copy of the weights (1/N per rank under ZeRO-3).

The loss is the mean over all pairs of the optimizer step (all micro-batches, all ranks), as the
token-weighted LM loss is over tokens: `DPO` is an objective of train.step.train_step, which counts
the step's pairs (`count`) before any forward pass and scales each micro-batch's summed pair loss
(`summed_loss`) by world size / global pairs, undoing DeepSpeed's averaging over ranks.
"""

from __future__ import annotations

from typing import Any, Iterable

from raylm.config import RaylmConfig
from raylm.train.collectives import all_reduced

REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy")


# ------------------------------------------------------------------ pure tensor functions (unit-tested)


def sequence_logps(logits: Any, labels: Any) -> tuple[Any, Any]:
    """(summed log-prob of each row's labelled tokens, how many) from logits aligned with labels
    (labels[i] is the token after position i; IGNORE is left out). In fp32, whatever the model's dtype."""
    from raylm.data import IGNORE
    from raylm.train.objectives.logprobs import logps_from_logits

    return logps_from_logits(logits, labels).sum(dim=1), (labels != IGNORE).sum(dim=1)


def forward_logps(model: Any, batch: dict, chunk_tokens: int = 0) -> tuple[Any, Any]:
    """Sequence log-probs and answer-token counts of a concatenated pair batch under `model`
    (the same values as sequence_logps over its logits; computed in chunks: objectives.logprobs)."""
    from raylm.data import IGNORE
    from raylm.train.objectives.logprobs import token_logps

    labels = batch["labels"]
    return token_logps(model, batch["input_ids"], labels, chunk_tokens=chunk_tokens).sum(dim=1), \
        (labels != IGNORE).sum(dim=1)


def dpo_losses(policy_chosen: Any, policy_rejected: Any, ref_chosen: Any, ref_rejected: Any, beta: float,
               loss_type: str, chosen_tokens: Any = None, rejected_tokens: Any = None) -> tuple[Any, Any, Any]:
    """(per-pair loss, chosen reward, rejected reward). IPO averages each log-ratio over its answer's
    tokens (`*_tokens`), as TRL does, so beta means the same whatever the answers' lengths."""
    import torch.nn.functional as F

    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "ipo":
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"train.dpo.loss_type: unknown {loss_type!r} (sigmoid or ipo)")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def reward_sums(losses: Any, chosen_rewards: Any, rejected_rewards: Any) -> list[float]:
    """[loss, chosen, rejected, margin, correct, pairs] summed over a micro-batch: summed, not averaged,
    so micro-batches and ranks add up before one division by the global pair count."""
    margins = chosen_rewards - rejected_rewards
    return [float(losses.detach().sum()), float(chosen_rewards.sum()), float(rejected_rewards.sum()),
            float(margins.sum()), float((margins > 0).sum()), float(len(margins))]


def reward_metrics(sums: Iterable[float], prefix: str = "") -> dict[str, float]:
    """Means over pairs from `reward_sums` totals: the loss and the four reward metrics."""
    loss, chosen, rejected, margin, correct, pairs = sums
    pairs = max(pairs, 1e-9)
    return {f"{prefix}loss": loss / pairs,
            **{prefix + k: v / pairs for k, v in zip(REWARD_KEYS, (chosen, rejected, margin, correct))}}


# ------------------------------------------------------------------ the objective on a DeepSpeed engine


def frozen_reference(cfg: RaylmConfig, tokenizer: Any, device: Any) -> Any:
    """Full fine-tuning's reference: the starting weights, frozen (see the module docstring)."""
    import torch

    from raylm.model import build_model
    from raylm.train.deepspeed import import_deepspeed, inference_config

    deepspeed = import_deepspeed()

    torch.manual_seed(cfg.train.seed)  # as train.loop._engine seeds the policy: the same initial weights
    model = build_model(cfg.model, len(tokenizer), cfg.data.seq_len, tokenizer).requires_grad_(False).eval()
    precision = cfg.precision
    if cfg.deepspeed.zero_stage == 3:
        engine, *_ = deepspeed.initialize(model=model, config=inference_config(cfg))
        engine.eval()  # DeepSpeedEngine.eval returns None, not the engine
        return engine
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return model.to(device=device, dtype=dtype)


class DPO:
    """The DPO objective of one rank for train.step (train_step, evaluate): `count` and `summed_loss`
    of a micro-batch, `train_metrics()` when a log line is due, `eval_sums`/`eval_metrics` on
    validation pairs."""

    def __init__(self, cfg: RaylmConfig, engine: Any, tokenizer: Any, device: Any):
        self.cfg, self.engine, self.device = cfg, engine, device
        self.beta, self.loss_type = cfg.train.dpo.beta, cfg.train.dpo.loss_type
        self.chunk_tokens = cfg.train.loss_chunk_tokens
        self.reference = None if cfg.train.lora else frozen_reference(cfg, tokenizer, device)
        self.sums = [0.0] * 6

    def reference_logps(self, batch: dict) -> Any:
        import torch

        with torch.no_grad():
            if self.cfg.train.lora:  # the base under the adapters is the starting model
                with self.engine.module.disable_adapter():
                    return forward_logps(self.engine, batch, self.chunk_tokens)[0]
            return forward_logps(self.reference, batch, self.chunk_tokens)[0]

    def pair_losses(self, batch: dict) -> tuple[Any, Any, Any]:
        ref = self.reference_logps(batch)
        logps, counts = forward_logps(self.engine, batch, self.chunk_tokens)
        (pc, pr), (rc, rr), (nc, nr) = logps.chunk(2), ref.chunk(2), counts.chunk(2)
        return dpo_losses(pc, pr, rc, rr, self.beta, self.loss_type, nc, nr)

    def count(self, batch: dict) -> Any:
        """Pairs in a micro-batch ([chosen; rejected] rows: half of them), before any forward pass."""
        import torch

        return torch.tensor(batch["input_ids"].shape[0] // 2, device=batch["input_ids"].device)

    def summed_loss(self, batch: dict) -> Any:
        """The micro-batch's summed pair losses (train_step scales it to the step's mean)."""
        losses, chosen, rejected = self.pair_losses(batch)
        self.sums = [a + b for a, b in zip(self.sums, reward_sums(losses, chosen, rejected))]
        return losses.sum()

    def train_metrics(self) -> dict[str, float]:
        """Reward metrics over every pair since the last call, all ranks (a collective: call on all)."""
        totals = all_reduced(self.sums, self.device)
        self.sums = [0.0] * 6
        out = reward_metrics(totals)
        out.pop("loss")  # the loop logs the loss itself
        return out

    def eval_sums(self, batch: dict) -> list[float]:
        return reward_sums(*self.pair_losses(batch))

    def eval_metrics(self, totals: list[float]) -> dict[str, float]:
        """val_loss (the DPO loss) and val_rewards/* per pair."""
        return reward_metrics(totals, prefix="val_")

    @staticmethod
    def headline(metrics: dict) -> list[str]:
        """The validation DPO loss (log 2 = no preference learnt), reward accuracy and margins."""
        nan = float("nan")
        return [f"val_loss {metrics.get('val_loss', nan):.4f}",
                f"reward accuracy {metrics.get('val_rewards/accuracy', nan):.3f}",
                f"margins {metrics.get('val_rewards/margins', nan):.3f}"]
