"""Collation: a micro-batch as the data stream hands it over becomes the tensors a forward pass
takes, cut to its longest real row (SFT rows; preference pairs as [chosen; rejected] rows)."""

from __future__ import annotations

SFT_COLUMNS = ("input_ids", "labels", "position_ids")


def trim(batch: dict) -> dict:
    """An SFT batch cut to its longest row (rows are left-aligned, `tokens` real each): padding
    beyond it is never computed, so unpacked batches cost what their longest example costs.
    Preference pairs become [chosen; rejected] rows the same way (concat_pairs)."""
    if "chosen_tokens" in batch:
        return concat_pairs(batch)
    if "tokens" not in batch:
        return batch
    n = max(int(batch["tokens"].max()), 1)
    return {**{k: batch[k][:, :n] for k in SFT_COLUMNS}, "tokens": batch["tokens"]}


def concat_pairs(batch: dict) -> dict:
    """A batch of pair rows -> {input_ids, labels: [chosen; rejected] (2B, n), tokens (2B,)}, cut to
    the longest real sequence n. Padding sits after each sequence, so a causal model needs no mask."""
    import torch

    tokens = torch.cat([batch["chosen_tokens"], batch["rejected_tokens"]])
    n = max(int(tokens.max()), 1)
    return {"input_ids": torch.cat([batch["chosen_input_ids"][:, :n], batch["rejected_input_ids"][:, :n]]),
            "labels": torch.cat([batch["chosen_labels"][:, :n], batch["rejected_labels"][:, :n]]),
            "tokens": tokens}
