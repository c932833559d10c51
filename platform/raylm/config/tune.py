"""`tune:`: the Ray Tune sweep over a search space of config fields."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field

from raylm.config.base import _Strict


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
    mode: Literal["min", "max"] = "min"
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

