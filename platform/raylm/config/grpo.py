"""`train.grpo:`: Group Relative Policy Optimization with vLLM rollouts (train.objective grpo).

The names are TRL 1.16's `GRPOConfig` names (trl/trainer/grpo_config.py), so a user's TRL settings
carry over as they are; only `rollout_engines` and `max_staleness` are raylm's own (where rollouts
run, and how far generation may run ahead of training). The defaults are TRL's but for
`max_completion_length` (TRL: 512; raylm's CPU presets generate short answers)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from raylm.config.base import _Strict


class GRPOConfig(_Strict):
    num_generations: int = Field(
        8, ge=2, description="Completions sampled per prompt (a group); the advantage of each is its reward against "
        "its group's. At least 2: a group of one has no baseline.")
    max_completion_length: int = Field(64, ge=1, description="Most tokens a completion may have (vLLM max_tokens).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts (and of the log-probs "
                               "the loss sees: logits are divided by it, as TRL does).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts; 1 considers every token.")
    beta: float = Field(0.0, ge=0, description="KL coefficient against the reference (the starting model); 0 holds "
                        "no reference model.")
    epsilon: float = Field(0.2, gt=0, lt=1, description="Lower clipping bound of the ratio: 1 - epsilon.")
    epsilon_high: Optional[float] = Field(
        None, gt=0, description="Upper clipping bound: 1 + epsilon_high; None: epsilon (DAPO recommends 0.28).")
    loss_type: Literal["grpo", "dr_grpo", "dapo"] = Field(
        "dapo", description="How per-token losses aggregate: 'grpo' a mean per sequence then over sequences; "
        "'dr_grpo' a sum over the batch divided by sequences x max_completion_length; 'dapo' a sum divided by the "
        "completion tokens of the whole optimizer step (TRL's default).")
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Advantages divided by the reward std of the group, of the batch, or not at all "
                             "(Dr. GRPO). TRL's true / false mean 'group' / 'none'.")
    num_iterations: int = Field(1, ge=1, description="Optimizer passes over each generated batch (mu).")
    mask_truncated_completions: bool = Field(
        False, description="Completions cut at max_completion_length (no EOS) are left out of the loss.")
    reward_funcs: list[str] = Field(
        default_factory=list, description="Reward functions as 'module:function' (TRL's convention: fn(prompts, "
        "completions, **columns) -> list[float | None]), importable from the working directory; built-ins "
        "raylm.rewards:exact_match, raylm.rewards:format_regex, raylm.rewards:length.")
    reward_weights: Optional[list[float]] = Field(
        None, description="One weight per reward function (the reward is their weighted sum); None: all 1.")
    rollout_engines: int = Field(1, ge=1, description="vLLM engines generating rollouts, each a Ray actor.")
    max_staleness: int = Field(
        0, ge=0, description="Optimizer steps a rollout's weights may lag the trainer's: 0 generates each step's "
        "batch with that step's weights; k >= 1 lets generation for step t+1 overlap training of step t.")
    vllm_importance_sampling_correction: bool = Field(
        True, description="Correct the mismatch between the engine's sampling log-probs and the trainer's with an "
        "importance weight (truncated or masked, see vllm_importance_sampling_mode).")
    vllm_importance_sampling_mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = (
        Field("sequence_mask", description="Per token or per sequence ratio; ratios outside [clip_min, clip_max] "
              "clipped to the bounds (truncate) or zeroed (mask)."))
    vllm_importance_sampling_clip_max: Optional[float] = Field(3.0, gt=0, description="C_max of the ratio.")
    vllm_importance_sampling_clip_min: Optional[float] = Field(None, ge=0, description="C_min of the ratio.")
    vllm_importance_sampling_cap: Optional[float] = Field(
        None, gt=0, description="Deprecated in TRL: vllm_importance_sampling_clip_max (it overrides it).")

    @field_validator("scale_rewards", mode="before")
    @classmethod
    def _bool_scale(cls, v: object) -> object:
        return {True: "group", False: "none"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("reward_funcs")
    @classmethod
    def _names(cls, v: list[str]) -> list[str]:
        for name in v:
            module, _, fn = name.partition(":")
            if not module or not fn or not all(p.isidentifier() for p in module.split(".")) or not fn.isidentifier():
                raise ValueError(f"{name!r} is not 'module:function' (e.g. raylm.rewards:exact_match, "
                                 f"my_rewards:correct)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "GRPOConfig":
        if self.vllm_importance_sampling_cap is not None:
            self.__dict__["vllm_importance_sampling_clip_max"] = self.vllm_importance_sampling_cap
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights: {len(self.reward_weights)} weights for {len(self.reward_funcs)} "
                             f"reward_funcs (one each)")
        lo, hi = self.vllm_importance_sampling_clip_min, self.vllm_importance_sampling_clip_max
        if lo is not None and hi is not None and lo >= hi:
            raise ValueError(f"vllm_importance_sampling_clip_min: {lo} must be below "
                             f"vllm_importance_sampling_clip_max ({hi})")
        if (self.vllm_importance_sampling_correction and self.vllm_importance_sampling_mode.endswith("_truncate")
                and lo is None and hi is None):
            raise ValueError("vllm_importance_sampling_clip_max: a *_truncate mode needs clip_min or clip_max")
        return self

    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    @property
    def upper_epsilon(self) -> float:
        """TRL's epsilon_high after its default (epsilon)."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def weights(self) -> list[float]:
        return list(self.reward_weights) if self.reward_weights is not None else [1.0] * len(self.reward_funcs)
