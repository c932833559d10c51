"""What a ZeRO-3 rank holds on CPU (bench/RESULTS.md section 8): raylm's DeepSpeed dict bounds the
gradient bucket and the optimizer's piece, the fp32 master shares the rank's fp32 partition instead
of DeepSpeed's clone (and trains the same), and the malloc threshold is set where asked."""

import pytest
import torch

from raylm.config import load_config
from raylm.train.deepspeed import cpu_mmap_threshold, deepspeed_config, share_fp32_master



def test_zero3_dict_bounds_the_gradient_bucket_and_the_optimizer_piece():
    zero = deepspeed_config(load_config(None, ["deepspeed.zero_stage=3"]))["zero_optimization"]
    assert zero["reduce_bucket_size"] == 10**7 and zero["sub_group_size"] == 10**7
    zero = deepspeed_config(load_config(None, ["deepspeed.zero_stage=3", "deepspeed.stage3_reduce_bucket_size=123",
                                               "deepspeed.stage3_sub_group_size=456"]))["zero_optimization"]
    assert zero["reduce_bucket_size"] == 123 and zero["sub_group_size"] == 456
    assert "sub_group_size" not in deepspeed_config(load_config(None, ["deepspeed.zero_stage=2"]))["zero_optimization"]


def test_cpu_mmap_threshold_defaults_to_zero3_only():
    assert load_config(None, ["deepspeed.zero_stage=3"]).cpu_mmap_kib == 128
    assert load_config(None, ["deepspeed.zero_stage=2"]).cpu_mmap_kib == 0
    assert load_config(None, ["deepspeed.zero_stage=2", "train.cpu_mmap_threshold_kib=64"]).cpu_mmap_kib == 64
    assert load_config(None, ["deepspeed.zero_stage=3", "train.cpu_mmap_threshold_kib=0"]).cpu_mmap_kib == 0
    assert load_config(None, ["deepspeed.zero_stage=3", "train.use_gpu=true"]).cpu_mmap_kib == 0
    assert cpu_mmap_threshold(0) is False


def _train(share: bool, steps: int = 3):
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = load_config(None, ["deepspeed.zero_stage=3", "train.num_workers=1", "train.micro_batch_size=2",
                             "train.grad_accum_steps=1", "deepspeed.stage3_sub_group_size=3000",
                             "deepspeed.stage3_reduce_bucket_size=2000"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=deepspeed_config(cfg))
    opt = engine.optimizer
    assert len(opt.fp32_partitioned_groups_flat) > 1  # sub_group_size split the partition
    cloned = [m.data_ptr() != p.data_ptr() for m, p in zip(opt.fp32_partitioned_groups_flat,
                                                            opt.fp16_partitioned_groups_flat)]
    clones = sum(4 * m.numel() for m in opt.fp32_partitioned_groups_flat)
    freed = share_fp32_master(opt) if share else clones
    ids = torch.randint(0, 64, (steps, 2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for step in range(steps):
        loss = engine(input_ids=ids[step], labels=ids[step]).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    shared = [m.data_ptr() == p.data_ptr() for m, p in zip(opt.fp32_partitioned_groups_flat,
                                                            opt.fp16_partitioned_groups_flat)]
    params = torch.cat([p.ds_tensor.detach().clone().flatten() for p in engine.module.parameters()])
    return losses, params, freed, cloned, shared


def test_fp32_master_shares_the_partition_and_trains_the_same(single_rank):
    losses, params, freed, cloned, shared = _train(share=True)
    assert all(cloned)  # DeepSpeed 0.19.8 clones an fp32 partition: what share_fp32_master undoes
    assert all(shared) and freed > 0
    base_losses, base_params, _, _, base_shared = _train(share=False)
    assert not any(base_shared)
    assert losses == pytest.approx(base_losses, abs=1e-6) and losses[-1] < losses[0]
    torch.testing.assert_close(params, base_params)
