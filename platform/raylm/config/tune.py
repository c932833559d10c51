"""`tune:`: the Ray Tune sweep over a search space of config fields."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from raylm.config.base import _Strict

# Which way a metric improves, by the last part of its name (val_rewards/accuracy -> accuracy): losses
# and perplexity fall; accuracies, rewards and exact match rise.
LOWER_IS_BETTER = {"loss": True, "val_loss": True, "perplexity": True, "accuracy": False, "margins": False,
                   "chosen": False, "exact_match": False, "contains": False, "reward": False, "rewards": False}


def metric_mode(metric: str) -> Optional[str]:
    """'min' or 'max' for a metric whose direction is known (see LOWER_IS_BETTER), else None."""
    lower = LOWER_IS_BETTER.get(metric.rsplit("/", 1)[-1])
    if lower is None and metric.endswith("loss"):
        lower = True
    return None if lower is None else ("min" if lower else "max")


class AshaConfig(_Strict):
    grace_period: int = Field(1, ge=1, description="Reports (evaluations) a trial always gets.")
    reduction_factor: float = Field(2.0, gt=1)


class TuneConfig(_Strict):
    search_space: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted config path -> {loguniform: [lo, hi]} | {uniform: [lo, hi]} | "
        "{choice: [...]} | {grid: [...]} | a constant.",
    )
    metric: str = Field("val_loss", description="Reported metric the sweep optimises.")
    mode: Optional[Literal["min", "max"]] = Field(
        None, description="Whether tune.metric is better lower ('min') or higher ('max'); left out, it follows the "
        "metric: min for losses and perplexity, max for accuracy, rewards and exact match. A mode that contradicts "
        "the metric is refused (it would pick the worst trial).")
    num_samples: int = Field(4, ge=1, description="Trials sampled from the search space.")
    max_trial_failures: int = Field(
        0, ge=0, description="Times Tune re-runs a trial whose trial function died (say with its node); the "
        "retry resumes from the trial's newest checkpoint. Tune retries any error, so a trial that cannot run "
        "(a batch the data cannot fill) is retried too: 0 records it as failed at once. Workers lost with a "
        "node are handled by train.max_failures inside the trial.")
    max_concurrent_trials: Optional[int] = Field(
        None, ge=1, description="Upper bound on parallel trials; also bounded by the CPUs the workers need."
    )
    scheduler: Literal["asha", "fifo"] = "asha"
    asha: AshaConfig = Field(default_factory=AshaConfig)
    search_alg: Literal["random", "optuna", "hyperopt"] = "random"
    seed: int = 0
    sweep_name: str = Field("raylm-sweep", description="Sweeps with the same name resume each other.")
    evaluate_best: bool = Field(
        False, description="After the sweep, evaluate its best checkpoint (raylm eval, settings from eval:) and "
        "record the result in best.json (`eval`) and in eval.json beside the checkpoint. Costs one vLLM engine start.")
    evaluate_trials: bool = Field(
        False, description="After the sweep, evaluate every trial's best checkpoint as well (one vLLM engine start "
        "each): eval.json beside each, and best.json's `trial_evals` compares them on one eval set.")


    @model_validator(mode="before")
    @classmethod
    def _mode_follows_metric(cls, data: Any) -> Any:
        """Fill tune.mode from tune.metric, or refuse a mode that contradicts it (a 'before' check:
        the config validates assignments, so setting it after validation would validate again)."""
        if not isinstance(data, dict):
            return data
        metric = data.get("metric", cls.model_fields["metric"].default)
        mode, derived = data.get("mode"), metric_mode(metric) if isinstance(metric, str) else None
        if mode is None:  # a metric training does not report keeps 'min'; `raylm tune` refuses it by name
            return {**data, "mode": derived or "min"}
        if derived is not None and mode != derived:
            raise ValueError(f"mode: {mode!r} contradicts tune.metric={metric!r}, which is better "
                             f"{'lower' if derived == 'min' else 'higher'} (mode {derived!r}); a sweep with "
                             f"{mode!r} would pick the worst trial. Drop tune.mode or set it to {derived!r}")
        return data
