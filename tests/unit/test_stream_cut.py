"""The rows an optimizer step trains on depend on the rows per step, not on how they are cut into
micro-batches (a rank draws a step's rows, then cuts them); a resumed stream continues with the next
step, whatever its cut. On a small cache written here with pyarrow (no Ray)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raylm.data.stream import CacheStream, TrainStream

ROWS, WIDTH, WORLD, SEED, BUFFER = 203, 3, 2, 7, 16


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> tuple[str, dict]:
    """One train file of ROWS rows (row i holds i, i, i) in row groups of 10."""
    root = tmp_path_factory.mktemp("cache")
    ids = np.repeat(np.arange(ROWS), WIDTH).astype(np.int32)
    table = pa.table({"input_ids": pa.FixedSizeListArray.from_arrays(pa.array(ids), WIDTH)})
    pq.write_table(table, root / "train-0.parquet", row_group_size=10)
    groups = [10] * (ROWS // 10) + ([ROWS % 10] if ROWS % 10 else [])
    manifest = {"columns": ["input_ids"], "train": {"rows": ROWS, "files": [{"path": "train-0.parquet",
                                                                              "row_groups": groups}]}}
    return str(root), manifest


def steps(cache, rank: int, micro: int, accum: int, n: int, epoch: int = 0, rows: int = 0) -> tuple[list, TrainStream]:
    """The first n steps of one rank: each a list of micro-batches' row ids."""
    stream = TrainStream(CacheStream(*cache, "train", rank, WORLD), SEED, micro, accum, BUFFER, epoch, rows)
    it = iter(stream)
    out = [[m["input_ids"][:, 0].tolist() for m in next(it)] for _ in range(n)]
    return out, stream


@pytest.mark.parametrize("rank", range(WORLD))
def test_a_step_trains_on_the_same_rows_however_it_is_cut(cache, rank):
    per_cut = {}
    for micro, accum in ((4, 1), (2, 2), (1, 4)):
        got, _ = steps(cache, rank, micro, accum, 30)  # more than an epoch: the same epoch boundary too
        assert all(len(s) == accum and all(len(m) == micro for m in s) for s in got)
        per_cut[micro, accum] = [sum(s, []) for s in got]
    assert per_cut[4, 1] == per_cut[2, 2] == per_cut[1, 4]
    first_epoch = per_cut[4, 1][:10]
    assert len({r for s in first_epoch for r in s}) == 40  # no row twice in an epoch


def test_a_resumed_stream_continues_with_the_next_step_in_another_cut(cache):
    whole, stream = steps(cache, 1, 2, 2, 30)
    n = stream.stream.epoch_batches(SEED, 0, 4)
    assert (stream.epoch, stream.rows) == (30 // n, (30 % n) * 4)
    for k in (3, n, n + 2):
        epoch, done = divmod(k, n)
        for micro, accum in ((2, 2), (1, 4), (4, 1)):
            resumed, _ = steps(cache, 1, micro, accum, 1, epoch, done * 4)
            assert sum(resumed[0], []) == sum(whole[k], []), (k, micro, accum)


def test_a_position_that_is_not_whole_steps_is_refused(cache):
    with pytest.raises(ValueError, match="6 rows taken is not a whole number of steps of 4 rows"):
        TrainStream(CacheStream(*cache, "train", 0, WORLD), SEED, 2, 2, BUFFER, 0, 6)
