"""Token-weighted loss under a real DeepSpeed engine: the gradient of a step does not depend on
how its global batch is cut into ranks and micro-batches.

Four SFT examples with very uneven answers (1 to 40 trained tokens) go through raylm's own step
(`loop.backward_global_batch`) on a real DeepSpeed engine (ZeRO 0 to 3; gloo process groups of
1 and 2 ranks started with torch.multiprocessing, no Ray needed) as `1 worker x micro 4`,
`1 worker x micro 1 x accum 4` and `2 workers x micro 1 x accum 2`. DeepSpeed's full gradients
(deepspeed.utils.safe_get_full_grad) must all equal a plain-PyTorch reference: the summed token
loss of the 4 examples / their trained tokens.

The chunked loss (`train.loss_chunk_tokens`, objectives/logprobs.py) under ZeRO-3 at 2 ranks: the
loss and gradients of two steps equal the unchunked ones within 1e-6, for a tied and an untied
head, trained in full (the head trains) and with LoRA (the head is frozen).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from raylm.cluster import listen_port
from raylm.data import IGNORE

STAGES = (0, 1, 2, 3)
LAYOUTS = [(1, 4, 1), (1, 1, 4), (2, 1, 2)]  # (workers, micro_batch_size, grad_accum_steps)
# (prompt tokens, answer tokens): one 1-token answer beside long ones
EXAMPLES = [(6, 1), (4, 40), (10, 3), (3, 25)]
VOCAB = 64


def examples() -> list[dict]:
    """One unpacked SFT row each (what data prep writes with packing off): prompt masked."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for prompt, answer in EXAMPLES:
        n = prompt + answer
        ids = torch.randint(3, VOCAB, (n,), generator=g)
        labels = ids.clone()
        labels[:prompt] = IGNORE
        # next-token labels: position i predicts token i + 1 (the last one predicts nothing)
        labels = torch.cat([labels[1:], torch.tensor([IGNORE])])
        rows.append({"input_ids": ids, "labels": labels, "position_ids": torch.arange(n), "tokens": n})
    return rows


def collate(rows: list[dict]) -> dict:
    """Rows padded to the longest, then cut to it by loop.trim, as micro_batches hands them out."""
    from raylm.train.batches import trim

    width = max(r["tokens"] for r in rows) + 7  # padding beyond the longest: trim must drop it
    out = {"input_ids": torch.zeros(len(rows), width, dtype=torch.long),
           "labels": torch.full((len(rows), width), IGNORE, dtype=torch.long),
           "position_ids": torch.zeros(len(rows), width, dtype=torch.long),
           "tokens": torch.tensor([r["tokens"] for r in rows])}
    for i, r in enumerate(rows):
        for k in ("input_ids", "labels", "position_ids"):
            out[k][i, :r["tokens"]] = r[k]
    return trim(out)


def tiny_model(tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=tied))


def reference_grads() -> tuple[dict, dict, float]:
    """Plain PyTorch: (sum of every trained token's loss / their count) gradients, and the
    gradients of the mean of per-example means (the weighting this replaced), and the loss."""
    model = tiny_model()
    sums, counts = [], []
    for row in examples():
        logits = model(input_ids=row["input_ids"][None], position_ids=row["position_ids"][None], use_cache=False).logits
        sums.append(torch.nn.functional.cross_entropy(logits[0], row["labels"], ignore_index=IGNORE, reduction="sum"))
        counts.append(int((row["labels"] != IGNORE).sum()))
    loss = torch.stack(sums).sum() / sum(counts)
    token_weighted = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)))
    per_example = torch.stack([s / c for s, c in zip(sums, counts)]).mean()
    example_weighted = dict(zip(token_weighted, torch.autograd.grad(per_example, list(model.parameters()))))
    return token_weighted, example_weighted, float(loss.detach())


def global_step(engine, batches: list, objective=None) -> dict:
    """One optimizer step of a DeepSpeed engine over this rank's micro-batches: the global batch's
    loss (summed over ranks, per token), its token count and the full gradient of every trainable
    parameter before engine.step()."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from raylm.train.step import backward_global_batch

    loss_sum, tokens = backward_global_batch(engine, batches, *([objective] if objective is not None else []))
    total = torch.tensor([loss_sum], dtype=torch.float64)
    dist.all_reduce(total)
    grads = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters() if p.requires_grad}
    engine.step()
    return {"loss": float(total) / tokens, "tokens": tokens, "grads": grads}


def _worker(rank: int, world: int, port: int, out_dir: str, layouts: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from raylm.config import RaylmConfig
    from raylm.train.deepspeed import deepspeed_config, import_deepspeed, lr_scheduler

    deepspeed = import_deepspeed()  # as training imports it (no shm op build)
    deepspeed.init_distributed(dist_backend="gloo")
    rows = examples()
    for stage in STAGES:
        for workers, micro, accum in layouts:
            cfg = RaylmConfig.model_validate({
                "train": {"num_workers": workers, "micro_batch_size": micro, "grad_accum_steps": accum, "grad_clip": 0},
                "deepspeed": {"zero_stage": stage}})
            model = tiny_model()
            engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()),
                                              config=deepspeed_config(cfg), lr_scheduler=lr_scheduler(cfg))
            mine = rows[rank * micro * accum:(rank + 1) * micro * accum]  # this rank's part of the global batch
            batches = [collate(mine[i:i + micro]) for i in range(0, len(mine), micro)]
            record = global_step(engine, batches)
            if rank == 0:
                torch.save(record, os.path.join(out_dir, f"zero{stage}_w{workers}_m{micro}_a{accum}.pt"))
            engine.destroy()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def step_grads(tmp_path_factory) -> Path:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("grads")
    for world in (1, 2):
        layouts = [lay for lay in LAYOUTS if lay[0] == world]
        mp.spawn(_worker, args=(world, listen_port(), str(out), layouts), nprocs=world, join=True)
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_step_gradient_does_not_depend_on_how_the_batch_is_cut(stage, step_grads):
    reference, example_weighted, ref_loss = reference_grads()
    # the examples are uneven enough that weighting by example instead of token is visible
    assert max(float((reference[n] - example_weighted[n]).abs().max()) for n in reference) > 1e-3
    for workers, micro, accum in LAYOUTS:
        got = torch.load(step_grads / f"zero{stage}_w{workers}_m{micro}_a{accum}.pt")
        assert got["tokens"] == sum(answer for _, answer in EXAMPLES)
        assert got["loss"] == pytest.approx(ref_loss, rel=1e-5)  # the logged quantity: sum / global count
        assert set(got["grads"]) == set(reference)
        for name, grad in reference.items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"ZeRO-{stage} {workers}x{micro}x{accum} {name}: {m}")


CHUNK_VARIANTS = [(tied, lora) for tied in (False, True) for lora in (False, True)]
# In the suite: the two paths, a trainable untied head (DeepSpeed's hooks every chunk) and a frozen
# tied one (LoRA: gathered once per micro-batch); the other two are opt-in (RAYLM_EXTENDED=1): each
# variant is two ZeRO-3 engines in the spawned ranks.
SUITE_CHUNK_VARIANTS = [(False, False), (True, True)]
CHUNK = 5  # tokens per chunk: every micro-batch here has several chunks, the last one short


def _chunk_worker(rank: int, world: int, port: int, out_dir: str, variants: list) -> None:
    """ZeRO-3, 2 ranks x micro 1 x accum 2, two steps, unchunked (0) and chunked: the loss, and
    the full gradients before each engine.step()."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import torch.distributed as dist

    from raylm.config import RaylmConfig
    from raylm.config.train import LoraConfig
    from raylm.train.deepspeed import deepspeed_config, import_deepspeed, lr_scheduler, optimizer_groups
    from raylm.train.lora import apply_lora
    from raylm.train.objectives.lm import NextToken
    from raylm.train.objectives.logprobs import chunkable

    deepspeed = import_deepspeed()
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = RaylmConfig.model_validate({"train": {"num_workers": 2, "micro_batch_size": 1, "grad_accum_steps": 2,
                                                "grad_clip": 0}, "deepspeed": {"zero_stage": 3}})
    mine = examples()[rank * 2:(rank + 1) * 2]
    batches = [collate(mine[:1]), collate(mine[1:])]
    for tied, lora in variants:
        for chunk in (0, CHUNK):
            model = tiny_model(tied)
            if lora:
                model = apply_lora(model, LoraConfig())
                torch.manual_seed(1)
                for name, p in model.named_parameters():  # adapters start at B = 0: make them matter
                    if "lora_B" in name:
                        torch.nn.init.normal_(p, std=0.1)
            engine, *_ = deepspeed.initialize(model=model, model_parameters=optimizer_groups(model, 0.0),
                                              config=deepspeed_config(cfg), lr_scheduler=lr_scheduler(cfg))
            steps = []
            for _ in range(2):  # the second step runs on DeepSpeed's recorded trace (prefetch, release)
                steps.append(global_step(engine, batches, NextToken(engine, chunk)))
            if rank == 0:
                torch.save({"steps": steps, "chunked": chunkable(engine)},
                           os.path.join(out_dir, f"tied{int(tied)}_lora{int(lora)}_chunk{chunk}.pt"))
            engine.destroy()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def chunk_grads(tmp_path_factory) -> Path:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("chunk_grads")
    variants = CHUNK_VARIANTS if os.environ.get("RAYLM_EXTENDED") == "1" else SUITE_CHUNK_VARIANTS
    mp.spawn(_chunk_worker, args=(2, listen_port(), str(out), variants), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("tied,lora", [v if v in SUITE_CHUNK_VARIANTS else pytest.param(*v, marks=pytest.mark.extended)
                                       for v in CHUNK_VARIANTS])
def test_chunked_loss_under_zero3_equals_the_unchunked(tied, lora, chunk_grads):
    full = torch.load(chunk_grads / f"tied{int(tied)}_lora{int(lora)}_chunk0.pt")
    chunked = torch.load(chunk_grads / f"tied{int(tied)}_lora{int(lora)}_chunk{CHUNK}.pt")
    assert chunked["chunked"]  # the ZeRO-3 engine takes the chunked path (it used to fall back)
    for step, (a, b) in enumerate(zip(full["steps"], chunked["steps"]), 1):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-6), step
        assert a["grads"].keys() == b["grads"].keys() and a["grads"]
        assert ("lm_head.weight" in a["grads"]) == (not lora and not tied)  # what trains: tied, it is the embedding
        for name, grad in a["grads"].items():
            assert float(grad.abs().max()) > 0, name
            torch.testing.assert_close(b["grads"][name], grad, rtol=1e-6, atol=1e-6,
                                       msg=lambda m: f"step {step} {name}: {m}")
