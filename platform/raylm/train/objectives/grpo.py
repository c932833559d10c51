"""The GRPO objective (train.objective grpo) on the Objective protocol of raylm.train.step.

    prompt rows -> rollouts   every prompt of the step's micro-batches sent to the rollout engines
                              at once (RolloutPool.generate: num_generations samples each, with the
                              engine's log-probs), seeded by (train.seed, step, rank, row)
    rollouts -> rewards       raylm.rewards.score over every completion, weighted sum (nansum),
                              group advantages (raylm.train.grpo.group_advantages)
    -> micro-batches          per micro-batch of prompts: [prompt; completion] rows right-padded
                              (no attention mask needed), the completion tokens' positions, their
                              mask (mask_truncated_completions), advantages, engine log-probs

The step weighs micro-batches by `count` (dapo: completion tokens; grpo and dr_grpo: completions)
and scales each `summed_loss` by world / the global count, which is TRL's normalisation for dapo
exactly and for grpo / dr_grpo with equal micro-batches (TRL averages per micro-batch, then over
accumulation steps and ranks). The loss itself is raylm.train.grpo.grpo_loss, the function held to
TRL's _compute_loss. With num_iterations 1 the policy before the update is the policy now, so the
"old" log-probs are this forward's, detached, and the engine correction compares them with the
engine's sampling log-probs (TRL computes them with an extra no-grad forward: the same numbers).

The loop's wiring (a step drawing prompt rows, the pool made beside the trainer, the weight sync
after each optimizer step) is not here yet: see the README's GRPO section for what runs.
"""

from __future__ import annotations

import zlib
from typing import Any, Optional, Sequence

import numpy as np

from raylm.config import RaylmConfig
from raylm.rewards import combine, load_rewards, reward_name, score
from raylm.train.collectives import all_reduced
from raylm.train.grpo import LossStats, group_advantages, grpo_loss, importance_ratio, loss_metrics, pad_completions
from raylm.train.grpo import token_logps as logits_token_logps


def rollout_seed(seed: int, step: int, rank: int, row: int) -> int:
    """A request's sampling seed: the same run, step, rank and row give the same completions."""
    return zlib.crc32(f"{seed}/{step}/{rank}/{row}".encode()) & 0x7FFFFFFF


def sequence_rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], pad_id: int
                  ) -> tuple[Any, Any, Any]:
    """(input_ids (N, S) = [prompt; completion] right-padded, labels (N, S) with each completion
    token at the position that predicts it and IGNORE elsewhere, positions (N, T) of those
    predicting positions, for gathering per completion token)."""
    import torch

    from raylm.data import IGNORE

    s = max(len(p) + len(c) for p, c in zip(prompts, completions))
    t = max(max(len(c) for c in completions), 1)
    ids = torch.full((len(prompts), s), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    positions = torch.zeros((len(prompts), t), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, :len(p) + len(c)] = torch.tensor(list(p) + list(c), dtype=torch.long)
        where = torch.arange(len(p) - 1, len(p) - 1 + len(c))
        labels[i, where] = torch.tensor(list(c), dtype=torch.long)
        positions[i, :len(c)] = where
    return ids, labels, positions


def policy_logps(model: Any, batch: dict, temperature: float, chunk_tokens: int) -> Any:
    """(N, T) log-probs of each completion token at the sampling temperature. At temperature 1 the
    output head runs a chunk of completion tokens at a time (objectives.logprobs); otherwise over
    the full logits, divided by the temperature (the chunked helper takes no temperature yet)."""
    from raylm.train.objectives.logprobs import token_logps

    if temperature == 1.0:
        per_position = token_logps(model, batch["input_ids"], batch["labels"], chunk_tokens=chunk_tokens)
    else:
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        per_position = logits_token_logps(logits, batch["labels"].clamp(min=0), temperature)
    return per_position.gather(1, batch["positions"])


class GRPO:
    """One rank's GRPO objective. `pool` is the rollout pool (raylm.train.rollouts.RolloutPool)."""

    def __init__(self, cfg: RaylmConfig, engine: Any, tokenizer: Any, device: Any, pool: Any = None):
        self.cfg, self.engine, self.device, self.pool, self.tokenizer = cfg, engine, device, pool, tokenizer
        self.g = cfg.train.grpo
        self.eos, self.pad = [tokenizer.eos_token_id], tokenizer.pad_token_id
        self.funcs = load_rewards(self.g.reward_funcs)
        self.reference = None
        if self.g.beta and not cfg.train.lora:
            from raylm.train.objectives.dpo import frozen_reference

            self.reference = frozen_reference(cfg, tokenizer, device)
        self._reset()

    def _reset(self) -> None:
        self.loss_sums = [0.0] * 4
        self.reward_sums: list[list[float]] = []  # per completion: [total, per function...]
        self.lengths: list[int] = []

    # ---------------------------------------------------------------- rollouts -> micro-batches

    def rollout_micro_batches(self, micro_rows: Sequence[dict], step: int, rank: int = 0) -> list[dict]:
        """The step's micro-batches of prompt rows -> micro-batches of scored completions (one
        generation call for all of them: the engines batch every prompt together)."""
        from raylm.data.prompts import prompt_batch

        parts = [prompt_batch(rows, self.cfg.data.prompt) for rows in micro_rows]
        ids = [p for part in parts for p in part[0]]
        seeds = [rollout_seed(self.cfg.train.seed, step, rank, i) for i in range(len(ids))]
        rollouts = self.pool.generate(ids, seeds).rollouts
        out, at = [], 0
        for prompt_ids, prompts, columns in parts:
            out.append(self.scored_batch(prompt_ids, prompts, columns, rollouts[at:at + len(prompt_ids)]))
            at += len(prompt_ids)
        return out

    def scored_batch(self, prompt_ids: list, prompts: list, columns: dict, rollouts: list) -> dict:
        """Rewards, advantages and the training tensors of one micro-batch of prompts' rollouts."""
        import torch

        g = self.g
        rep = lambda xs: [x for x in xs for _ in range(g.num_generations)]  # noqa: E731 - as TRL repeats inputs
        completions_ids = [c for r in rollouts for c in r.completion_ids]
        texts = self.decode(completions_ids)
        completions = [t if isinstance(p, str) else [{"role": "assistant", "content": t}]
                       for p, t in zip(rep(prompts), texts)]
        per_func = score(g.reward_funcs, self.funcs, rep(prompts), completions, completions_ids,
                         {k: rep(v) for k, v in columns.items()})
        total = combine(per_func, g.weights)
        advantages, _ = group_advantages(torch.from_numpy(total), g.num_generations, g.scale_rewards)
        ids, labels, positions = sequence_rows(rep(prompt_ids), completions_ids, self.pad)
        _, mask, _ = pad_completions(completions_ids, self.eos, self.pad, g.mask_truncated_completions)
        sampling = torch.zeros(mask.shape)
        for i, lp in enumerate(lp for r in rollouts for lp in r.logprobs):
            sampling[i, :len(lp)] = torch.tensor(lp)
        self.reward_sums += np.concatenate([total[:, None], per_func], axis=1).tolist()
        self.lengths += [len(c) for c in completions_ids]
        dev = self.device
        return {"input_ids": ids.to(dev), "labels": labels.to(dev), "positions": positions[:, :mask.size(1)].to(dev),
                "completion_mask": mask.to(dev), "advantages": advantages.to(dev), "sampling_logps": sampling.to(dev)}

    def decode(self, completions_ids: list) -> list[str]:
        """Completion texts for the reward functions: EOS dropped, as TRL decodes them."""
        return self.tokenizer.batch_decode([[i for i in c if i not in self.eos] for c in completions_ids],
                                           skip_special_tokens=True)

    # ---------------------------------------------------------------- the protocol of train.step

    def count(self, batch: dict) -> Any:
        """dapo: completion tokens; grpo, dr_grpo: completions (known before the forward pass)."""
        import torch

        if self.g.loss_type == "dapo":
            return batch["completion_mask"].sum()
        return torch.tensor(batch["completion_mask"].size(0), device=batch["completion_mask"].device)

    def reference_logps(self, batch: dict) -> Optional[Any]:
        import torch

        if not self.g.beta:
            return None
        with torch.no_grad():
            if self.cfg.train.lora:  # the base under the adapters is the starting model
                with self.engine.module.disable_adapter():
                    return policy_logps(self.engine, batch, self.g.temperature, self.cfg.train.loss_chunk_tokens)
            return policy_logps(self.reference, batch, self.g.temperature, self.cfg.train.loss_chunk_tokens)

    def summed_loss(self, batch: dict) -> Any:
        """The micro-batch's loss summed over its units (train.step divides by the global count)."""
        g = self.g
        ref = self.reference_logps(batch)
        logps = policy_logps(self.engine, batch, g.temperature, self.cfg.train.loss_chunk_tokens)
        mask = batch["completion_mask"]
        is_ratio = None
        if g.vllm_importance_sampling_correction:
            is_ratio = importance_ratio(logps.detach(), batch["sampling_logps"], mask, g.vllm_importance_sampling_mode,
                                        g.vllm_importance_sampling_clip_min, g.vllm_importance_sampling_clip_max)
        loss, stats = grpo_loss(logps, None, ref, batch["advantages"], mask, g, is_ratio=is_ratio, num_items=1.0)
        self.loss_sums = [a + b for a, b in zip(self.loss_sums, stats.as_list())]
        return loss if g.loss_type == "dapo" else loss * mask.size(0)

    def train_metrics(self) -> dict[str, float]:
        """rewards/mean and rewards/std (overall and per function), kl, clip_ratio and
        completion_length since the last call, over every rank (a collective)."""
        r = np.asarray(self.reward_sums, dtype=np.float64).reshape(-1, 1 + len(self.funcs))
        sums = []
        for j in range(r.shape[1]):
            col = r[:, j][~np.isnan(r[:, j])]
            sums += [float(col.sum()), float((col ** 2).sum()), float(len(col))]
        totals = all_reduced(self.loss_sums + sums + [float(sum(self.lengths)), float(len(self.lengths))],
                             self.device)
        out = loss_metrics(totals[:4], self.g.beta)
        names = ["rewards"] + [f"rewards/{reward_name(n)}" for n in self.g.reward_funcs]
        for j, name in enumerate(names):
            s, s2, n = totals[4 + 3 * j:7 + 3 * j]
            mean = s / max(n, 1.0)
            out[f"{name}/mean"] = mean
            out[f"{name}/std"] = float(np.sqrt(max(s2 / max(n, 1.0) - mean ** 2, 0.0) * n / max(n - 1, 1.0)))
        out["completion_length"] = totals[-2] / max(totals[-1], 1.0)
        self._reset()
        return out

    def eval_sums(self, batch: dict) -> list[float]:
        raise NotImplementedError("GRPO validation (val_rewards/mean, greedy) is not wired yet")

    def eval_metrics(self, totals: list[float]) -> dict[str, float]:
        raise NotImplementedError("GRPO validation (val_rewards/mean, greedy) is not wired yet")

    @staticmethod
    def headline(metrics: dict) -> list[str]:
        nan = float("nan")
        return [f"rewards/mean {metrics.get('rewards/mean', nan):.3f}",
                f"val_rewards/mean {metrics.get('val_rewards/mean', nan):.3f}"]


__all__ = ["GRPO", "LossStats", "policy_logps", "rollout_seed", "sequence_rows"]
