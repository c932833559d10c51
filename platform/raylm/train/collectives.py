"""Reductions over the ranks of a training run (torch.distributed, one all-reduce each)."""

from __future__ import annotations

from typing import Any


def all_reduced(values: list[float], device: Any, op: str = "SUM") -> list[float]:
    """`values` reduced over all ranks (one all-reduce), element by element (op SUM, MIN or MAX)."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t.tolist()
