"""Streaming the packed-token cache to Ray Train workers: per-rank row groups, shuffled per epoch.

Each rank reads only its own part of the cache, straight from storage (pyarrow.fs), a row group
at a time, so no worker and no object store ever holds the corpus:

    train  the split's units (row groups, cut finer when a tiny corpus has fewer than 8 per
           rank) are permuted from (data.seed, epoch) and dealt round-robin to the ranks; a
           bounded shuffle buffer (data.shuffle_buffer_rows) mixes rows within a rank, drawn
           from (seed, epoch, rank). A rank draws a whole optimizer step's rows at once
           (micro_batch_size x grad_accum_steps) and only then cuts them into micro-batches, so
           the rows a step trains on do not depend on how its batch is cut. Every rank's epoch
           has the same number of steps (the smallest rank's), so one position, (epoch, rows
           taken), is true on every rank.
    val    each rank a contiguous range of rows in file order (all of it, when there are fewer
           rows than ranks); every rank yields the same number of batches (unequal counts mean
           unequal collectives, which hang under ZeRO-3).

The stream is a pure function of (manifest, seed, world size, rows per step, epoch): a resumed run
replays its epoch up to the rows it had taken and continues with exactly the next step, also
when it resumes with another cut of the same step (micro_batch_size x grad_accum_steps).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterator, Optional

import numpy as np

from raylm import storage
from raylm.data.cache import from_arrow

MIN_UNITS_PER_RANK = 8


def _units(manifest: dict, split: str, world: int) -> list[tuple[int, int, int, int]]:
    """(file index, row group, start, stop) slices covering the split, in file order."""
    groups = [(fi, gi, n) for fi, f in enumerate(manifest[split]["files"]) for gi, n in enumerate(f["row_groups"])]
    total = sum(n for _, _, n in groups)
    if not total:
        return []
    size = max(1, min(max(n for _, _, n in groups), total // (world * MIN_UNITS_PER_RANK) or 1))
    return [(fi, gi, at, min(at + size, n)) for fi, gi, n in groups for at in range(0, n, size)]


class CacheStream:
    """One rank's view of a cache's split. `manifest` and `uri` come from raylm.data.PreparedData."""

    def __init__(self, uri: str, manifest: dict, split: str, rank: int, world: int, columns: Optional[list] = None):
        self.uri, self.manifest, self.split, self.rank, self.world = uri, manifest, split, rank, world
        self.columns = columns or manifest["columns"]
        self.units = _units(manifest, split, world)

    @functools.lru_cache(maxsize=4)
    def _file(self, fi: int) -> Any:
        import pyarrow.parquet as pq

        fs, path = storage.filesystem(storage.join(self.uri, self.manifest[self.split]["files"][fi]["path"]))
        return pq.ParquetFile(fs.open_input_file(path))

    def read(self, unit: tuple[int, int, int, int]) -> dict[str, np.ndarray]:
        fi, gi, start, stop = unit
        table = self._file(fi).read_row_group(gi, columns=self.columns).slice(start, stop - start)
        return {c: from_arrow(table.column(c)) for c in self.columns}

    # ------------------------------------------------------------------ train

    def epoch_units(self, seed: int, epoch: int) -> list[list]:
        order = np.random.default_rng([seed, epoch]).permutation(len(self.units))
        return [[self.units[i] for i in order[r::self.world]] for r in range(self.world)]

    def epoch_batches(self, seed: int, epoch: int, batch_size: int) -> int:
        """Draws of `batch_size` rows every rank makes in this epoch: the smallest rank's full ones."""
        return min(sum(u[3] - u[2] for u in mine) for mine in self.epoch_units(seed, epoch)) // batch_size

    def train_batches(self, seed: int, epoch: int, batch_size: int, buffer_rows: int) -> Iterator[dict]:
        """This rank's draws of `batch_size` rows (TrainStream: a step's rows) of one epoch,
        shuffled from (seed, epoch, rank)."""
        n_batches = self.epoch_batches(seed, epoch, batch_size)
        buf = ShuffleBuffer(np.random.default_rng([seed, epoch, self.rank]))
        units = iter(self.epoch_units(seed, epoch)[self.rank])
        for _ in range(n_batches):
            while buf.rows < buffer_rows + batch_size:
                unit = next(units, None)
                if unit is None:
                    break
                buf.push(self.read(unit))
            yield buf.pop(batch_size)

    # ------------------------------------------------------------------ val

    def _val_range(self, r: int) -> tuple[int, int]:
        total = self.manifest[self.split]["rows"]
        if total < self.world:
            return 0, total
        return r * total // self.world, (r + 1) * total // self.world

    def val_batches(self, batch_size: int) -> Iterator[dict]:
        """This rank's rows in file order, in batches; as many batches on every rank."""
        n = min(math.ceil((b - a) / batch_size) for a, b in map(self._val_range, range(self.world)))
        start, stop = self._val_range(self.rank)
        buf: dict[str, list] = {c: [] for c in self.columns}
        at, have, done = 0, 0, 0
        for unit in self.units:
            u_lo, u_hi = at, at + unit[3] - unit[2]
            at = u_hi
            if u_hi <= start or u_lo >= stop:
                continue
            cols = self.read(unit)
            a, b = max(start, u_lo) - u_lo, min(stop, u_hi) - u_lo
            for c in self.columns:
                buf[c].append(cols[c][a:b])
            have += b - a
            while have >= batch_size and done < n:
                yield self._take(buf, batch_size)
                have -= batch_size
                done += 1
        while have > 0 and done < n:
            k = min(have, batch_size)
            yield self._take(buf, k)
            have -= k
            done += 1

    @staticmethod
    def _take(buf: dict[str, list], k: int) -> dict:
        out = {}
        for c, parts in buf.items():
            whole = np.concatenate(parts)
            out[c], buf[c] = whole[:k], [whole[k:]]
        return out

    def iter_torch_batches(self, batch_size: int, dtypes: Any = None, device: Any = None, **_: Any) -> Iterator[dict]:
        """Validation batches as torch tensors (the shape of Ray Data's method of the same name)."""
        for batch in self.val_batches(batch_size):
            yield to_torch(batch, device)


def to_torch(batch: dict, device: Any) -> dict:
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)).long().to(device) for k, v in batch.items()}


class ShuffleBuffer:
    """A bounded pool of rows; `pop` draws a random batch from it (no all-to-all shuffle)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.cols: dict[str, np.ndarray] = {}
        self.rows = 0

    def push(self, cols: dict[str, np.ndarray]) -> None:
        self.cols = {k: np.concatenate([self.cols[k], v]) if self.cols else v for k, v in cols.items()}
        self.rows += len(next(iter(cols.values())))

    def pop(self, k: int) -> dict[str, np.ndarray]:
        pick = np.zeros(self.rows, dtype=bool)
        pick[self.rng.choice(self.rows, size=k, replace=False)] = True
        out = {c: a[pick] for c, a in self.cols.items()}
        self.cols = {c: a[~pick] for c, a in self.cols.items()}
        self.rows -= k
        return out


class TrainStream:
    """Endless optimizer steps of one rank, epoch after epoch, that knows its position.

    Each step is a list of grad_accum_steps micro-batches of micro_batch_size rows, cut from one
    draw of the step's rows: the rows a step trains on depend on the rows per step, not on the
    cut. `epoch` / `rows` (the rows this rank took from that epoch: a whole number of steps) are
    the data position a checkpoint records; a stream started at them yields exactly the step that
    would have come next, whichever cut of the same step it uses."""

    def __init__(self, stream: CacheStream, seed: int, micro_batch_size: int, grad_accum_steps: int,
                 buffer_rows: int, epoch: int = 0, rows: int = 0):
        self.stream, self.seed, self.buffer_rows = stream, seed, buffer_rows
        self.micro_batch_size, self.grad_accum_steps = micro_batch_size, grad_accum_steps
        self.step_rows = micro_batch_size * grad_accum_steps
        if rows % self.step_rows:
            raise ValueError(f"data position: {rows} rows taken is not a whole number of steps of {self.step_rows} "
                             f"rows (micro_batch_size x grad_accum_steps): the global batch changed")
        self.epoch, self.rows = epoch, rows

    def cut(self, drawn: dict) -> list[dict]:
        """A step's rows as its micro-batches, in the order they were drawn."""
        m = self.micro_batch_size
        return [{c: a[i * m:(i + 1) * m] for c, a in drawn.items()} for i in range(self.grad_accum_steps)]

    def __iter__(self) -> Iterator[list[dict]]:
        while True:
            if self.stream.epoch_batches(self.seed, self.epoch, self.step_rows) == 0:
                raise RuntimeError(f"a rank's share of the training data holds fewer than micro_batch_size x "
                                   f"grad_accum_steps = {self.step_rows} blocks")
            skip = self.rows // self.step_rows
            for i, drawn in enumerate(self.stream.train_batches(self.seed, self.epoch, self.step_rows,
                                                                self.buffer_rows)):
                if i < skip:  # resuming: replay the epoch up to where the checkpoint was
                    continue
                self.rows = (i + 1) * self.step_rows
                yield self.cut(drawn)
            self.epoch, self.rows = self.epoch + 1, 0
