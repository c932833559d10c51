"""The serving engine on CUDA: bf16 weights, batched greedy generation that matches one-row
generation, seeded sampling and the health probe. Skipped without a GPU."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from raylm.serve.engine import load_engine
    from raylm.serve.tiny import make_tiny_checkpoint

    ckpt = make_tiny_checkpoint(str(tmp_path_factory.mktemp("gpu") / "tiny"))
    return load_engine(ckpt, num_gpus=1, num_threads=1)


def generate(engine, reqs):
    from raylm.serve.engine import RowEvent

    async def go():
        texts = [""] * len(reqs)
        async for events in engine.generate_batch(reqs):
            for i, ev in enumerate(events):
                if isinstance(ev, RowEvent):
                    texts[i] += ev.text
        return texts

    return asyncio.run(go())


def test_replica_model_is_cuda_bf16(engine):
    import torch

    param = next(engine.model.parameters())
    assert param.device.type == "cuda" and param.dtype == torch.bfloat16


def test_batched_generation_and_seeds_on_gpu(engine):
    from raylm.serve.engine import GenRequest

    reqs = [GenRequest(tuple(engine.encode(t)), 12, temperature=0) for t in ("Hello", "A longer prompt here")]
    assert len(generate(engine, reqs)) == 2
    sampled = GenRequest(tuple(engine.encode("Once")), 12, temperature=0.9, top_p=0.9, seed=5)
    assert generate(engine, [sampled]) == generate(engine, [sampled])
    asyncio.run(engine.check(timeout_s=30))
    assert engine.fatal_error is None
