"""The training step's arithmetic without Ray or DeepSpeed: the lr schedule, the DeepSpeed dict's
precision, trained-token counts, and the FLOPs MFU counts under ZeRO-3."""

from __future__ import annotations

import pytest
import torch

from raylm.config import load_config
from raylm.data import IGNORE
from raylm.train.deepspeed import deepspeed_config, lr_factor, lr_scheduler
from raylm.train.loop import flops_per_token, trained_tokens


def schedule(*sets: str) -> tuple:
    cfg = load_config(None, ["train.max_steps=20", "train.min_lr_ratio=0.1", *sets])
    return cfg.train, [lr_factor(k, cfg.train) for k in range(cfg.train.max_steps)]


def test_warmup_starts_above_zero_and_reaches_the_peak():
    t, f = schedule("train.warmup_steps=4")
    assert f[0] == pytest.approx(1 / 5)  # torchtitan: lr / (warmup + 1), not 0
    assert f[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # linear, then the cosine starts at the peak
    assert all(a >= b for a, b in zip(f[4:], f[5:]))  # then only falls
    assert t.min_lr_ratio < f[-1] < f[4]


def test_no_warmup_starts_at_the_peak():
    _, f = schedule("train.warmup_steps=0")
    assert f[0] == 1.0 and all(0.1 <= x <= 1.0 for x in f)


def test_warmup_longer_than_the_run_never_reaches_the_peak():
    _, f = schedule("train.warmup_steps=50")
    assert f[-1] == pytest.approx(20 / 51) and f == sorted(f)


def test_lr_scheduler_is_the_schedule_deepspeed_steps():
    cfg = load_config(None, ["train.max_steps=10", "train.warmup_steps=3", "train.lr=0.5"])
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.train.lr)
    sched = lr_scheduler(cfg)(opt)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.5 * lr_factor(k, cfg.train) for k in range(10)])
    # its state is what DeepSpeed checkpoints: a fresh scheduler loaded from it continues there
    again = lr_scheduler(cfg)(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=cfg.train.lr))
    again.load_state_dict(sched.state_dict())
    assert again.get_last_lr()[0] == pytest.approx(0.5 * lr_factor(10, cfg.train))


def test_deepspeed_dict_bf16_accumulates_in_fp32_and_has_no_scheduler_section():
    bf16 = deepspeed_config(load_config(None, ["deepspeed.precision=bf16", "deepspeed.zero_stage=2"]))
    assert bf16["bf16"]["enabled"] and bf16["data_types"] == {"grad_accum_dtype": "fp32"}
    fp32 = deepspeed_config(load_config(None, ["train.warmup_steps=0"]))
    assert "data_types" not in fp32 and "scheduler" not in fp32  # the schedule is raylm's LambdaLR


def test_trained_tokens_counts_labels_or_next_tokens():
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6], [IGNORE, 7, IGNORE, IGNORE]])
    assert int(trained_tokens({"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": labels})) == 3
    assert int(trained_tokens({"input_ids": torch.zeros(3, 9, dtype=torch.long)})) == 3 * 8  # seq_len + 1 blocks


class _Config:
    num_hidden_layers, hidden_size = 2, 8


class _Model:
    """What flops_per_token reads: parameters and a config. Under ZeRO-3 a parameter's tensor is
    this rank's shard (numel 0 outside a gather); DeepSpeed keeps the full size in ds_numel."""

    config = _Config()

    def __init__(self, partitioned: bool):
        self.params = [torch.nn.Parameter(torch.zeros(10, 10)), torch.nn.Parameter(torch.zeros(5))]
        if partitioned:
            for p in self.params:
                p.ds_numel = p.numel()
                p.data = torch.empty(0)

    def parameters(self):
        return iter(self.params)


def test_mfu_counts_unpartitioned_parameters_under_zero3():
    full = flops_per_token(_Model(partitioned=False), seq_len=16)
    assert full == 6.0 * 105 + 12.0 * 2 * 8 * 16
    assert flops_per_token(_Model(partitioned=True), seq_len=16) == full
