"""The mixed-length workload of bench/batching_bench.py: fixed by its seed, inside 1..256, and
prompts of exactly the drawn lengths, so every run and both sides of the comparison get the same
requests."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "batching_bench.py"


def _bench():
    spec = importlib.util.spec_from_file_location("batching_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_workload_is_seeded_and_bounded():
    bench = _bench()
    work = bench.mixed_workload(500)
    assert work == bench.mixed_workload(500)
    assert work != bench.mixed_workload(500, seed=1)
    lengths = [n for pair in work for n in pair]
    assert min(lengths) >= 1 and max(lengths) <= 256
    # uniform over the whole range, not a narrow band of it
    assert min(lengths) <= 5 and max(lengths) >= 250
    assert len({p for p, _ in work}) > 100 and len({m for _, m in work}) > 100


def test_prompts_have_the_drawn_lengths():
    bench = _bench()
    work = bench.mixed_workload(50)
    corpus = list(range(1000, 3000))
    prompts = bench.prompt_ids(work, corpus)
    assert [len(p) for p in prompts] == [p for p, _ in work]
    assert prompts == bench.prompt_ids(work, corpus)
    for p in prompts:  # each is a contiguous window of the corpus
        assert p == list(range(p[0], p[0] + len(p)))
