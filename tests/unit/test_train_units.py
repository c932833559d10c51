"""The training step's arithmetic without Ray or DeepSpeed: the lr schedule, the DeepSpeed dict's
precision, trained-token counts, and the FLOPs MFU counts under ZeRO-3."""

from __future__ import annotations

import pytest
import torch

from raylm.config import load_config
from raylm.data import IGNORE
from raylm.train.deepspeed import deepspeed_config, lr_factor, lr_scheduler
from raylm.train.metrics import flops_per_token
from raylm.train.objectives.lm import trained_tokens


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


def test_zero3_dict_bounds_what_a_rank_holds_gathered():
    ds = deepspeed_config(load_config(None, ["deepspeed.zero_stage=3", "deepspeed.stage3_max_reuse_distance=0"]))
    zero = ds["zero_optimization"]
    assert zero["stage3_max_reuse_distance"] == 0 and zero["stage3_max_live_parameters"] == 2 * 10**7
    assert zero["stage3_prefetch_bucket_size"] == 10**7
    assert "stage3_max_live_parameters" not in deepspeed_config(load_config(None, []))["zero_optimization"]


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


@pytest.mark.parametrize("val_blocks, ok", [(0, False), (1, False), (2, True)])
def test_every_worker_needs_a_validation_block(val_blocks, ok):
    """Ray Train splits the val set equally over 2 workers: 1 block leaves both shards empty."""
    from types import SimpleNamespace

    from raylm.config import InputError
    from raylm.train.driver import check_data_fits

    cfg = load_config(None, ["train.num_workers=2", "train.micro_batch_size=2"])
    prepared = SimpleNamespace(stats=SimpleNamespace(blocks=100 + val_blocks, train_blocks=100, val_blocks=val_blocks))
    if ok:
        check_data_fits(cfg, prepared)
    else:
        with pytest.raises(InputError, match="data.val_fraction"):
            check_data_fits(cfg, prepared)


def test_a_resumed_run_continues_the_schedule_of_its_own_config():
    """A run saved at step 20 of 20 and resumed with max_steps 30 and a new lr: what the
    checkpoint restores (the optimizer's lr, the scheduler's state) is the old run's; step 21
    must train at the new run's lr for step 21, as an uninterrupted 30-step run would."""
    from types import SimpleNamespace

    from raylm.train.deepspeed import continue_schedule

    old = load_config(None, ["train.max_steps=20", "train.warmup_steps=5", "train.lr=0.003"])
    new = load_config(None, ["train.max_steps=30", "train.warmup_steps=5", "train.lr=0.002"])
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=old.train.lr)
    sched = lr_scheduler(old)(opt)
    for _ in range(20):
        opt.step()
        sched.step()
    # the resumed run: DeepSpeed restores the optimizer (its param_groups' lr) and the scheduler
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=new.train.lr)
    sched2 = lr_scheduler(new)(opt2)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.003 * old.train.min_lr_ratio)  # the old run's last lr
    continue_schedule(SimpleNamespace(lr_scheduler=sched2), new)
    seen = []
    for _ in range(10):
        seen.append(opt2.param_groups[0]["lr"])
        opt2.step()
        sched2.step()
    assert seen == pytest.approx([0.002 * lr_factor(k, new.train) for k in range(20, 30)])


def test_deepspeed_is_imported_without_mlflow_and_never_builds_its_shm_op():
    """Every training worker imports DeepSpeed; its autotuner would import MLflow too (~1 s), and
    its CPU process group would compile the shared-memory inference all-reduce op (~100 s on a
    fresh machine), which training does not use. MLflow stays importable afterwards."""
    import os
    import subprocess
    import sys

    code = ("import sys; from raylm.train.deepspeed import import_deepspeed; ds = import_deepspeed(); "
            "print('deepspeed' in sys.modules, any(m.split('.')[0] == 'mlflow' for m in sys.modules)); "
            "import mlflow; print(hasattr(mlflow, 'log_metric')); "
            "from deepspeed.comm.torch import build_shm_op; print(build_shm_op() is None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-4:] == ["True", "False", "True", "True"], out.stdout
    # a process that imported DeepSpeed some other way first still never builds the op
    first = ("import deepspeed; from raylm.train.deepspeed import import_deepspeed; import_deepspeed(); "
             "from deepspeed.comm.torch import build_shm_op; print(build_shm_op() is None)")
    out = subprocess.run([sys.executable, "-c", first], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert out.returncode == 0 and out.stdout.split()[-1:] == ["True"], out.stdout + out.stderr[-2000:]


def test_dpo_reference_under_zero3_keeps_the_runs_live_parameter_limits():
    """DPO's frozen full-fine-tuning reference is sharded with the run's own ZeRO-3 limits (it once
    had its own dict, with DeepSpeed's defaults: every gathered layer kept alive), no optimizer."""
    from raylm.train.deepspeed import inference_config

    cfg = load_config(None, ["deepspeed.zero_stage=3", "deepspeed.stage3_max_live_parameters=12345",
                             "deepspeed.offload_params=true", "deepspeed.offload_optimizer=true"])
    ds, run = inference_config(cfg), deepspeed_config(cfg)
    assert "optimizer" not in ds and "offload_optimizer" not in ds["zero_optimization"]
    for key in ("stage", "stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_prefetch_bucket_size",
                "stage3_param_persistence_threshold", "offload_param"):
        assert ds["zero_optimization"][key] == run["zero_optimization"][key], key
    assert ds["zero_optimization"]["stage3_max_live_parameters"] == 12345
    assert ds["train_batch_size"] == run["train_batch_size"]
