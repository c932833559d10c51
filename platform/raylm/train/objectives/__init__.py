"""Training objectives: what a step minimises and what a run reports about it.

Every objective is one `Objective`: the step maths (raylm.train.step) asks it how many units of
loss a micro-batch holds before any forward pass (trained tokens; DPO: pairs), the micro-batch's
summed loss over them, the numbers to add to a log line, and what validation adds up and reports.
The step divides the summed loss by the global batch's units, so an objective never averages
itself. `build_objective` picks one by `train.objective`.

    lm    raylm.train.objectives.lm   pretraining and SFT: cross-entropy per trained token
    dpo   raylm.train.objectives.dpo  preference pairs: the DPO/IPO loss per pair
"""

from __future__ import annotations

from typing import Any, Protocol

from raylm.config import RaylmConfig


class Objective(Protocol):
    """One rank's objective on a DeepSpeed engine (the engine is given when it is built)."""

    def count(self, batch: dict) -> Any:
        """Units of loss in a micro-batch (a 0-d tensor on its device), known before its forward
        pass: the step all-reduces them to weigh every micro-batch of the global batch."""

    def summed_loss(self, batch: dict) -> Any:
        """The micro-batch's loss summed over its units (a tensor the step calls backward on)."""

    def train_metrics(self) -> dict[str, float]:
        """Numbers to add to a log line, over the micro-batches since the last call (may be a
        collective: every rank calls it at the same steps)."""

    def eval_sums(self, batch: dict) -> list[float]:
        """Sums over one validation micro-batch; they add up over batches and ranks."""

    def eval_metrics(self, totals: list[float]) -> dict[str, float]:
        """The validation metrics (`val_loss` among them) from the summed `eval_sums`."""


def build_objective(cfg: RaylmConfig, engine: Any, tokenizer: Any, device: Any) -> Objective:
    """The objective `train.objective` names, on this rank's engine."""
    if cfg.train.objective == "dpo":
        from raylm.train.objectives.dpo import DPO

        return DPO(cfg, engine, tokenizer, device)
    from raylm.train.objectives.lm import NextToken

    return NextToken(engine)
