"""The language-modelling objective (pretraining, SFT): cross-entropy per trained token."""

from __future__ import annotations

import math
from typing import Any


def token_losses(engine: Any, batch: dict, chunk_tokens: int = 0) -> tuple[Any, Any]:
    """(summed cross-entropy, number of trained tokens) of a micro-batch.

    Raw text: a (B, seq_len + 1) block predicts every next token. SFT: each position predicts its
    label; -100 (prompt, padding) is left out, and packed examples do not see each other.
    `chunk_tokens`: the head's output is computed that many tokens at a time (objectives.logprobs)."""
    from raylm.data import IGNORE
    from raylm.train.objectives.logprobs import token_logps

    if "labels" in batch:
        labels = batch["labels"]
        logps = token_logps(engine, batch["input_ids"], labels, batch["position_ids"], chunk_tokens=chunk_tokens)
    else:
        block = batch["input_ids"]
        labels = block[:, 1:]
        logps = token_logps(engine, block[:, :-1], labels, chunk_tokens=chunk_tokens)
    return -logps.sum(), (labels != IGNORE).sum()


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
    summed loss over them, and what validation adds up; DPO (raylm.train.objectives.dpo) is the other one, per
    preference pair."""

    def __init__(self, engine: Any, chunk_tokens: int = 0):
        self.engine, self.chunk_tokens = engine, chunk_tokens

    def count(self, batch: dict) -> Any:
        return trained_tokens(batch)

    def summed_loss(self, batch: dict) -> Any:
        return token_losses(self.engine, batch, self.chunk_tokens)[0]

    def eval_sums(self, batch: dict) -> list[float]:
        loss_sum, count = token_losses(self.engine, batch, self.chunk_tokens)  # SFT: the same (assistant) tokens as training
        return [float(loss_sum), float(count)]

    def eval_metrics(self, totals: list[float]) -> dict[str, float]:
        val_loss = totals[0] / max(totals[1], 1.0)
        return {"val_loss": val_loss, "perplexity": math.exp(min(val_loss, 50.0))}

    def train_metrics(self) -> dict[str, float]:
        return {}

    @staticmethod
    def headline(metrics: dict) -> list[str]:
        return [f"val_loss {metrics.get('val_loss', float('nan')):.4f}",
                f"perplexity {metrics.get('perplexity', float('nan')):.2f}"]
