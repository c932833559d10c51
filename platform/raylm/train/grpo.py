"""GRPO's math (train.objective grpo), as pure tensor functions checked against TRL 1.16's GRPOTrainer.

    rewards -> advantages   each completion's reward against its group's (the num_generations
                            completions of one prompt): minus the group mean, divided by the group's
                            (or the batch's) std + 1e-4 unless scale_rewards is none; a completion no
                            reward function scored gets advantage 0 (TRL's unscorable rows)
    engine vs trainer       truncated / masked importance sampling between the log-probs the engine
                            sampled with and the trainer's (vllm_importance_sampling_*), per token or
                            per sequence
    per-token loss          -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A), r = exp(logp - old_logp),
                            times the importance weight, plus beta x k3 KL to the reference
                            (exp(ref - logp) - (ref - logp) - 1, times r: TRL's use_bias_correction_kl)
    aggregation             grpo: mean per sequence, mean over sequences, / grad_accum; dr_grpo: sum /
                            (sequences x max_completion_length) / grad_accum; dapo: sum / the completion
                            tokens of the whole generation batch (all ranks) x world

Every formula is TRL's (trl/trainer/grpo_trainer.py: _generate_and_score_completions and
_compute_loss); tests/unit/test_grpo_loss.py holds raylm's loss and gradient to TRL's own
_compute_loss within 1e-5. Log-probs are taken at the sampling temperature (logits / temperature),
as TRL's fused LM head and vLLM's processed log-probs both do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

LOG_PROB_CHUNK_ROWS = 8  # rows of logits turned into log-probs at once (bounds the fp32 copy of the logits)


# ------------------------------------------------------------------ log-probs


def token_logps(logits: Any, ids: Any, temperature: float = 1.0, chunk_rows: int = LOG_PROB_CHUNK_ROWS) -> Any:
    """log p(ids[b, t] | ...) from logits aligned with ids, (B, T) in fp32, a few rows at a time so the
    fp32 log-softmax never holds the whole batch's logits."""
    import torch

    out = []
    for start in range(0, logits.size(0), chunk_rows):
        chunk = logits[start:start + chunk_rows].float() / temperature
        out.append(torch.log_softmax(chunk, dim=-1).gather(-1, ids[start:start + chunk_rows, :, None].long())[..., 0])
    return torch.cat(out) if out else logits.new_zeros(ids.shape, dtype=torch.float32)


def completion_logps(model: Any, prompt_ids: Any, prompt_mask: Any, completion_ids: Any, completion_mask: Any,
                     temperature: float) -> Any:
    """Per-token log-probs of the completions (B, T) under `model`: prompts left-padded, completions
    right-padded, one forward over [prompt; completion] as TRL's trainer makes it."""
    import torch

    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    t = completion_ids.size(1)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, -t - 1:-1]
    return token_logps(logits, completion_ids, temperature)


# ------------------------------------------------------------------ batches


def pad_completions(completions: Sequence[Sequence[int]], eos_ids: Sequence[int], pad_id: int,
                    mask_truncated: bool) -> tuple[Any, Any, Any]:
    """(ids, mask, truncated) right-padded: the mask covers each completion up to its first EOS
    (included); a completion without one was cut at max_completion_length, and with
    mask_truncated_completions its mask is all zero (TRL)."""
    import torch

    t = max((len(c) for c in completions), default=0)
    ids = torch.full((len(completions), max(t, 1)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.int64)
    truncated = torch.zeros(len(completions), dtype=torch.bool)
    eos = set(eos_ids)
    for i, c in enumerate(completions):
        c = list(c)
        end = next((k + 1 for k, tok in enumerate(c) if tok in eos), None)
        truncated[i] = end is None
        ids[i, :len(c)] = torch.tensor(c, dtype=torch.long)
        mask[i, :end if end is not None else len(c)] = 1
    if mask_truncated:
        mask = mask * (~truncated).unsqueeze(1).long()
    return ids, mask, truncated


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Any, Any]:
    """(ids, mask), left-padded: every completion starts right after its prompt."""
    import torch

    n = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), n), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        if len(p):
            ids[i, n - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[i, n - len(p):] = 1
    return ids, mask


# ------------------------------------------------------------------ advantages


def _nanstd(x: Any, dim: Optional[int] = None) -> Any:
    """TRL's nanstd: Bessel-corrected std over the non-NaN values (NaN with fewer than 2)."""
    import torch

    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = var * torch.where(count > 1, count / (count - 1), torch.full_like(var, float("nan")))
    std = var.sqrt()
    return std.squeeze() if dim is None else std.squeeze(dim)


def group_advantages(rewards: Any, num_generations: int, scale_rewards: str) -> tuple[Any, Any]:
    """(advantages, the std each was scaled by) from the weighted rewards, grouped by prompt
    ([p0 x G, p1 x G, ...]); NaN rewards (unscored) are left out of the baselines, advantage 0."""
    import torch

    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    grouped = rewards.view(-1, num_generations)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(num_generations)
    if scale_rewards == "batch":
        std = _nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    else:
        std = _nanstd(grouped, dim=1).repeat_interleave(num_generations)
    adv = rewards - mean
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0), std


# ------------------------------------------------------------------ engine vs trainer


def importance_ratio(trainer_logps: Any, sampling_logps: Any, mask: Any, mode: str, clip_min: Optional[float],
                     clip_max: Optional[float]) -> Any:
    """TRL's vllm_importance_sampling_*: exp(trainer - engine log-probs) per token (B, T) or per
    sequence (B, 1, summed over the completion), clipped into [clip_min, clip_max] (*_truncate)
    or zeroed outside it (*_mask). A token without an engine log-prob (NaN) counts as ratio 1."""
    import torch

    diff = torch.nan_to_num((trainer_logps - sampling_logps) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("_truncate"):
        return torch.clamp(ratio, min=clip_min, max=clip_max)
    lo = clip_min if clip_min is not None else -math.inf
    hi = clip_max if clip_max is not None else math.inf
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


# ------------------------------------------------------------------ the loss


@dataclass
class LossStats:
    """Sums for the step's metrics (summed over micro-batches and ranks, then divided)."""

    tokens: float = 0.0
    kl: float = 0.0  # masked sum of the per-token KL (0 when beta is 0)
    clip_low: float = 0.0  # tokens clipped at 1 - epsilon with a negative advantage
    clip_high: float = 0.0  # tokens clipped at 1 + epsilon_high with a positive advantage

    def as_list(self) -> list[float]:
        return [self.tokens, self.kl, self.clip_low, self.clip_high]


def grpo_loss(logps: Any, old_logps: Optional[Any], ref_logps: Optional[Any], advantages: Any, mask: Any, g: Any,
              is_ratio: Optional[Any] = None, num_items: Optional[float] = None, grad_accum: int = 1,
              world: int = 1, steps_per_generation: Optional[int] = None) -> tuple[Any, LossStats]:
    """The micro-batch's loss, as TRL's _compute_loss returns it (already divided for gradient
    accumulation), and its metric sums.

    logps (B, T): the trainer's, with grad; old_logps: the policy's before this generation batch's
    updates (None: logps detached, num_iterations 1); ref_logps: the reference's (beta > 0);
    advantages (B,); mask (B, T) completion tokens; g: train.grpo (GRPOConfig); is_ratio: the
    engine correction (importance_ratio) or None; num_items: completion tokens of the generation
    batch on all ranks (dapo)."""
    import torch

    mask = mask.to(logps.dtype)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    old = logps.detach() if old_logps is None else old_logps
    coef_1 = torch.exp(logps - old)
    eps_low, eps_high = g.epsilon, (g.epsilon if g.epsilon_high is None else g.epsilon_high)
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(coef_1 * adv, coef_2 * adv)
    if is_ratio is not None:
        per_token = per_token * is_ratio
    kl = None
    if g.beta != 0.0:
        delta = ref_logps - logps
        kl = (torch.exp(delta) - delta - 1) * coef_1  # TRL's use_bias_correction_kl
        per_token = per_token + g.beta * kl
    if g.loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / grad_accum
    elif g.loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.size(0) * g.max_completion_length) / grad_accum
    elif g.loss_type == "dapo":
        spg = grad_accum if steps_per_generation is None else steps_per_generation
        normalizer = max(float(num_items if num_items is not None else mask.sum()), 1.0) / world * grad_accum / spg
        loss = (per_token * mask).sum() / normalizer
    else:
        raise ValueError(f"train.grpo.loss_type: unknown {g.loss_type!r}")
    with torch.no_grad():
        stats = LossStats(tokens=float(mask.sum()), kl=float((kl * mask).sum()) if kl is not None else 0.0,
                          clip_low=float((((coef_1 < 1 - eps_low) & (adv < 0)) * mask).sum()),
                          clip_high=float((((coef_1 > 1 + eps_high) & (adv > 0)) * mask).sum()))
    return loss, stats


def loss_metrics(sums: Sequence[float], beta: float) -> dict[str, float]:
    """kl and clip_ratio (TRL's clip_ratio/region_mean and its two sides) from summed LossStats."""
    tokens, kl, low, high = sums
    n = max(tokens, 1.0)
    out = {"clip_ratio": (low + high) / n, "clip_ratio/low_mean": low / n, "clip_ratio/high_mean": high / n}
    if beta != 0.0:
        out["kl"] = kl / n
    return out
