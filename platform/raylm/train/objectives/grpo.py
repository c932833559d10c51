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

The loop's side (the pool made beside the trainer, each step's prompts submitted, the weight sync
after every optimizer step, max_staleness) is raylm.train.grpo_loop; validation (`evaluate`) answers
the val prompts greedily and scores them with the same reward functions (val_rewards/*).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
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


def dist_world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


@dataclass
class StepPrompts:
    """One step's prompts on this rank: per micro-batch (prompt ids, prompts as written, reward
    columns), every prompt's ids in order, and its sampling seed."""

    parts: list
    ids: list
    seeds: list


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
        # rollouts since the last log line: [tokens, engine seconds, staleness sum, samples, sync_s sum, syncs]
        self.rollout_sums = [0.0] * 6
        # |trainer - engine| log-prob of the sampled tokens: [sum, tokens] and the largest (TRL's
        # sampling/sampling_logp_difference/*): ~0 when the engines hold the weights being trained
        self.logp_diff, self.logp_diff_max = [0.0, 0.0], 0.0

    # ---------------------------------------------------------------- rollouts -> micro-batches

    def step_prompts(self, micro_rows: Sequence[dict], step: int, rank: int = 0) -> StepPrompts:
        """The step's micro-batches of prompt rows, and each prompt's sampling seed."""
        from raylm.data.prompts import prompt_batch

        parts = [prompt_batch(rows, self.cfg.data.prompt) for rows in micro_rows]
        ids = [p for part in parts for p in part[0]]
        return StepPrompts(parts, ids, [rollout_seed(self.cfg.train.seed, step, rank, i) for i in range(len(ids))])

    def rollout_micro_batches(self, micro_rows: Sequence[dict], step: int, rank: int = 0) -> list[dict]:
        """The step's micro-batches of prompt rows -> micro-batches of scored completions (one
        generation call for all of them: the engines batch every prompt together)."""
        prompts = self.step_prompts(micro_rows, step, rank)
        return self.scored_micro_batches(prompts, self.pool.generate(prompts.ids, prompts.seeds))

    def scored_micro_batches(self, prompts: StepPrompts, batch: Any, staleness: int = 0) -> list[dict]:
        """A step's rollouts (a RolloutBatch for prompts.ids) scored into its micro-batches;
        `staleness`: optimizer steps between the weights that sampled them and the trainer's."""
        rollouts = batch.rollouts
        samples = sum(len(r.completion_ids) for r in rollouts)
        self.rollout_sums[:4] = [a + b for a, b in zip(self.rollout_sums[:4],
                                                       [batch.tokens, batch.seconds, staleness * samples, samples])]
        out, at = [], 0
        for prompt_ids, texts, columns in prompts.parts:
            out.append(self.scored_batch(prompt_ids, texts, columns, rollouts[at:at + len(prompt_ids)]))
            at += len(prompt_ids)
        return out

    def note_sync(self, seconds: float) -> None:
        """A weight sync into the engines took `seconds` (the rank that syncs notes it)."""
        self.rollout_sums[4] += seconds
        self.rollout_sums[5] += 1

    def rewards(self, prompts: list, columns: dict, completions_ids: list) -> tuple[np.ndarray, np.ndarray]:
        """(per function (N, F), weighted total (N,)) of completions, each prompt and its columns
        given once per completion; the completions in the prompts' form (chat or text), as TRL."""
        texts = self.decode(completions_ids)
        completions = [t if isinstance(p, str) else [{"role": "assistant", "content": t}]
                       for p, t in zip(prompts, texts)]
        per_func = score(self.g.reward_funcs, self.funcs, prompts, completions, completions_ids, columns)
        return per_func, combine(per_func, self.g.weights)

    def scored_batch(self, prompt_ids: list, prompts: list, columns: dict, rollouts: list) -> dict:
        """Rewards, advantages and the training tensors of one micro-batch of prompts' rollouts."""
        import torch

        g = self.g
        rep = lambda xs: [x for x in xs for _ in range(g.num_generations)]  # noqa: E731 - as TRL repeats inputs
        completions_ids = [c for r in rollouts for c in r.completion_ids]
        per_func, total = self.rewards(rep(prompts), {k: rep(v) for k, v in columns.items()}, completions_ids)
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
        self._note_logp_diff(logps.detach(), batch["sampling_logps"], mask)
        is_ratio = None
        if g.vllm_importance_sampling_correction:
            is_ratio = importance_ratio(logps.detach(), batch["sampling_logps"], mask, g.vllm_importance_sampling_mode,
                                        g.vllm_importance_sampling_clip_min, g.vllm_importance_sampling_clip_max)
        loss, stats = grpo_loss(logps, None, ref, batch["advantages"], mask, g, is_ratio=is_ratio, num_items=1.0)
        self.loss_sums = [a + b for a, b in zip(self.loss_sums, stats.as_list())]
        return loss if g.loss_type == "dapo" else loss * mask.size(0)

    def _note_logp_diff(self, logps: Any, sampling: Any, mask: Any) -> None:
        """How far the engine's log-probs of the sampled tokens are from the trainer's: tokens the
        engine could not score (NaN) are left out, as TRL leaves them out."""
        import torch

        delta = (logps - sampling).abs()[mask.bool()]
        delta = delta[~torch.isnan(delta)]
        if delta.numel():
            self.logp_diff = [self.logp_diff[0] + float(delta.sum()), self.logp_diff[1] + delta.numel()]
            self.logp_diff_max = max(self.logp_diff_max, float(delta.max()))

    def train_metrics(self) -> dict[str, float]:
        """rewards/mean and rewards/std (overall and per function), kl, clip_ratio and
        completion_length since the last call, over every rank (a collective)."""
        r = np.asarray(self.reward_sums, dtype=np.float64).reshape(-1, 1 + len(self.funcs))
        sums = []
        for j in range(r.shape[1]):
            col = r[:, j][~np.isnan(r[:, j])]
            sums += [float(col.sum()), float((col ** 2).sum()), float(len(col))]
        totals = all_reduced(self.loss_sums + sums + [float(sum(self.lengths)), float(len(self.lengths))]
                             + self.logp_diff, self.device)
        diff_sum, diff_n = totals[-2:]
        totals = totals[:-2]
        out = loss_metrics(totals[:4], self.g.beta)
        names = ["rewards"] + [f"rewards/{reward_name(n)}" for n in self.g.reward_funcs]
        for j, name in enumerate(names):
            s, s2, n = totals[4 + 3 * j:7 + 3 * j]
            mean = s / max(n, 1.0)
            out[f"{name}/mean"] = mean
            out[f"{name}/std"] = float(np.sqrt(max(s2 / max(n, 1.0) - mean ** 2, 0.0) * n / max(n - 1, 1.0)))
        out["completion_length"] = totals[-2] / max(totals[-1], 1.0)
        tokens, seconds, stale, samples, sync_s, syncs = all_reduced(self.rollout_sums, self.device)
        world = dist_world()
        if samples:
            # every rank generates its own prompts at once: the engines' seconds are concurrent
            out["rollout_tokens_per_s"] = tokens / max(seconds / world, 1e-9)
            out["staleness"] = stale / samples
        if syncs:
            out["sync_s"] = sync_s / syncs
        diff_max = all_reduced([self.logp_diff_max], self.device, op="MAX")[0]
        if diff_n:
            out["sampling/sampling_logp_difference/mean"] = diff_sum / diff_n
            out["sampling/sampling_logp_difference/max"] = diff_max
        self._reset()
        return out

    # ---------------------------------------------------------------- validation

    def evaluate(self, shard: Any) -> dict[str, float]:
        """val_rewards/mean (and per function): each val prompt answered greedily by the engines
        (which hold the trainer's current weights), scored by the reward functions; up to
        train.eval_micro_batches per rank (eval_batches steps' prompts, whatever their cut), as many on
        every rank (CacheStream.val_batches)."""
        from raylm.data.prompts import prompt_batch

        t = self.cfg.train
        k = 1 + len(self.funcs)
        sums, counts = np.zeros(k), np.zeros(k)
        for i, rows in enumerate(shard.val_batches(t.micro_batch_size)):
            if i >= t.eval_micro_batches:
                break
            ids, prompts, columns = prompt_batch(rows, self.cfg.data.prompt)
            batch = self.pool.generate(ids, [0] * len(ids), greedy=True)
            per_func, total = self.rewards(prompts, columns, [r.completion_ids[0] for r in batch.rollouts])
            table = np.concatenate([total[:, None], per_func], axis=1)
            sums += np.nansum(table, axis=0)
            counts += (~np.isnan(table)).sum(axis=0)
        totals = all_reduced(sums.tolist() + counts.tolist(), self.device)
        if totals[k] == 0:  # check_data_fits makes this unreachable from the CLI
            raise RuntimeError("no validation prompt was scored: raise data.val_fraction")
        names = ["val_rewards"] + [f"val_rewards/{reward_name(n)}" for n in self.g.reward_funcs]
        return {f"{name}/mean": totals[j] / max(totals[k + j], 1.0) for j, name in enumerate(names)}

    def eval_sums(self, batch: dict) -> list[float]:
        raise NotImplementedError("GRPO validates by generation: GRPO.evaluate")

    def eval_metrics(self, totals: list[float]) -> dict[str, float]:
        raise NotImplementedError("GRPO validates by generation: GRPO.evaluate")

    @staticmethod
    def headline(metrics: dict) -> list[str]:
        nan = float("nan")
        return [f"rewards/mean {metrics.get('rewards/mean', nan):.3f}",
                f"val_rewards/mean {metrics.get('val_rewards/mean', nan):.3f}"]


__all__ = ["GRPO", "LossStats", "StepPrompts", "policy_logps", "rollout_seed", "sequence_rows"]
