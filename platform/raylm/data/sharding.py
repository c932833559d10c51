"""Sharding for Ray Train: each worker gets a disjoint, contiguous shard of a prepared dataset.

Unlike Ray's default `streaming_split(equal=True)`, no row is dropped. Separate from the data
stage because the train driver uses it (`make_data_config`), on datasets already materialized.
"""

from __future__ import annotations

from typing import Optional


def make_data_config(datasets: Optional[dict] = None, world_size: Optional[int] = None):
    """A Ray Train DataConfig that splits every dataset into disjoint shards, dropping nothing.

    Ray's default `streaming_split(equal=True)` may drop rows to equalise shards, and
    `split(equal=False)` cuts at Ray block boundaries (one block -> one busy worker). Our blocks
    are materialized, so we cut at row indices: shard sizes differ by at most one row. Each
    worker then iterates its own shard, epoch after epoch, without a cross-worker barrier. A
    dataset with fewer rows than workers (a tiny validation set) is given whole to every worker.

    Pass `datasets` and `world_size` to cut on the driver, before training starts: Ray Train V2
    calls `configure` lazily from an actor once the workers hold every CPU, and the split tasks
    would then wait forever on a small machine (seen on 2 cores with 2 workers).
    """
    from ray.train import DataConfig as RayDataConfig

    pre_cut = {name: shard_indices(ds, world_size) for name, ds in (datasets or {}).items()}

    class ShardedDataConfig(RayDataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out: list[dict] = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                cut = pre_cut.get(name)
                shards = cut if cut is not None and len(cut) == world_size else shard_indices(ds, world_size)
                for rank, shard in enumerate(shards):
                    out[rank][name] = shard.iterator()
            return out

    return ShardedDataConfig()


def shard_indices(ds, world_size: int) -> list:
    """Split a materialized dataset into `world_size` contiguous row ranges of near-equal size."""
    n = ds.count()
    if n < world_size or world_size == 1:  # one worker: the whole dataset (split_at_indices([]) raises)
        return [ds] * world_size
    cuts = [round(i * n / world_size) for i in range(1, world_size)]
    return ds.split_at_indices(cuts)
