"""Training objectives: what a step minimises and what a run reports about it.

Every objective is one `Objective`: the step maths (raylm.train.step) asks it how many units of
loss a micro-batch holds before any forward pass (trained tokens; DPO: pairs), the micro-batch's
summed loss over them, the numbers to add to a log line, and what validation adds up and reports.
The step divides the summed loss by the global batch's units, so an objective never averages
itself. `build_objective` picks one by `train.objective`; `prepare_model` makes what the objective needs of
the model before DeepSpeed wraps it (DPO: dropout off), and `headline` gives the figures a finished
run's summary line shows (lm: validation loss and perplexity; dpo: its loss, reward accuracy and
margins).

    lm    raylm.train.objectives.lm   pretraining and SFT: cross-entropy per trained token
    dpo   raylm.train.objectives.dpo  preference pairs: the DPO/IPO loss per pair
    grpo  raylm.train.objectives.grpo completions the rollout engines sampled: the GRPO loss; it
                                      validates by generating (`evaluate`: val_rewards/*)

All take their log-probs from raylm.train.objectives.logprobs (chunked over tokens).
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

    @staticmethod
    def headline(metrics: dict) -> list[str]:
        """The figures of a finished run's summary line, from its final metrics."""


def objective_class(name: str) -> Any:
    """The class of the objective `train.objective` names (imported only when asked for)."""
    if name == "dpo":
        from raylm.train.objectives.dpo import DPO

        return DPO
    if name == "grpo":
        from raylm.train.objectives.grpo import GRPO

        return GRPO
    from raylm.train.objectives.lm import NextToken

    return NextToken


def prepare_model(cfg: RaylmConfig, model: Any) -> Any:
    """The model as the objective trains it, before deepspeed.initialize: DPO with
    train.dpo.disable_dropout gets every dropout layer set to 0 (TRL's disable_dropout_in_model),
    which covers the LoRA reference too (the same model, adapters disabled)."""
    if cfg.train.objective == "dpo" and cfg.train.dpo.disable_dropout:
        disable_dropout(model)
    return model


def disable_dropout(model: Any) -> None:
    """Every torch Dropout layer of `model` (peft's LoRA dropout among them) drops nothing."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def headline(objective: str, metrics: dict) -> list[str]:
    """The summary line's figures of a run of `train.objective` `objective`."""
    return objective_class(objective).headline(metrics)


def build_objective(cfg: RaylmConfig, engine: Any, tokenizer: Any, device: Any) -> Objective:
    """The objective `train.objective` names, on this rank's engine."""
    if cfg.train.objective in ("dpo", "grpo"):  # GRPO's rollout pool is attached by raylm.train.grpo_loop
        return objective_class(cfg.train.objective)(cfg, engine, tokenizer, device)
    return objective_class("lm")(engine, cfg.train.loss_chunk_tokens)
