"""The rows a validation pass evaluates depend on a step's rows per worker (micro_batch_size x
grad_accum_steps), not on how that step is cut: the val_loss that picks the best checkpoint is the
same for micro 2 x accum 1 and micro 1 x accum 2 (one gloo rank here, no Ray)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from raylm.config import load_config
from raylm.train.step import evaluate

ROWS = 40


class Shard:
    """What Ray Train hands a rank: batches of val rows (row i holds i)."""

    def iter_torch_batches(self, batch_size: int, dtypes, device):
        for i in range(0, ROWS, batch_size):
            ids = torch.arange(i, min(i + batch_size, ROWS)).unsqueeze(1).repeat(1, 3)
            yield {"input_ids": ids, "labels": ids.clone()}  # packed rows: no per-row token count


class Seen:
    """An objective that records the rows it evaluates and sums them as its 'loss'."""

    def __init__(self):
        self.rows: list[int] = []

    def eval_sums(self, batch):
        self.rows += batch["input_ids"][:, 0].tolist()
        return [float(batch["input_ids"][:, 0].sum()), float(len(batch["input_ids"]))]

    def eval_metrics(self, totals):
        return {"val_loss": totals[0] / totals[1]}


class Engine:
    def eval(self):
        pass

    def train(self):
        pass


@pytest.fixture(scope="module", autouse=True)
def one_rank(tmp_path_factory):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path_factory.mktemp('pg')}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_the_rows_evaluated_do_not_depend_on_the_cut():
    seen = {}
    for micro, accum in ((4, 1), (2, 2), (1, 4)):
        cfg = load_config(None, [f"train.micro_batch_size={micro}", f"train.grad_accum_steps={accum}",
                                 "train.eval_batches=3", "train.num_workers=1"])
        objective = Seen()
        metrics = evaluate(Engine(), Shard(), cfg, torch.device("cpu"), objective)
        seen[micro, accum] = (objective.rows, metrics["val_loss"])
    assert seen[4, 1] == seen[2, 2] == seen[1, 4]
    assert seen[4, 1][0] == list(range(12))  # eval_batches x a step's rows of the worker
