"""Data stage: tokens/s of raylm's Ray Data tokenize-and-pack versus a single-process loop.

Both sides read the same corpus (tinyshakespeare repeated to tens of MB, cut into files),
use the same tokenizer (a BPE trained once with raylm's trainer, then passed by path, so no
tokenizer training is timed) and produce the same thing: documents + EOS, packed into blocks
of seq_len + 1 tokens, shuffled, split into train / val.

- raylm: `raylm.data.prepare_data` on a local Ray cluster with as many CPUs as the machine has;
  cold build (no cache) time = `DataStats.seconds` (read -> tokenize -> pack -> split -> Parquet
  cache), Ray start-up excluded; then the cached rerun (the same call: fingerprint + open), and
  the object store's peak during the build and during one epoch of two ranks' streams.
- capped store: tests/reliability/small_store_run.py in its own Ray with an 80 MiB object store,
  on a corpus whose packed tokens are 3.1x (--quick) or 5x that: the store's peak, and the bytes
  that went through it and were spilled.
- loop: one Python process reads each file, splits paragraphs, `encode_batch`es 256 documents
  at a time with the same `tokenizers.Tokenizer`, packs with numpy, shuffles and splits.
  Run twice in fresh processes: with one thread (TOKENIZERS_PARALLELISM=false, what raylm's
  workers use) and with the tokenizer's own Rust thread pool (the library default).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_tokenizer, repeated_corpus, stage_main  # noqa: E402
from report import ratio  # noqa: E402

SEQ_LEN = 128


def baseline_loop(corpus_dir: str, tokenizer_dir: str, seq_len: int = SEQ_LEN, seed: int = 0) -> dict:
    """What a user would write without Ray: read, tokenize, pack, shuffle, split in one process."""
    import numpy as np
    from tokenizers import Tokenizer

    from raylm.data import load_tokenizer, split_text

    t0 = time.perf_counter()
    hf = load_tokenizer(tokenizer_dir)
    tok = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    eos = hf.eos_token_id
    pieces, documents, tokenize_s = [], 0, 0.0
    for path in sorted(Path(corpus_dir).glob("*.txt")):
        docs = split_text(path.read_text(), "paragraph")
        documents += len(docs)
        t1 = time.perf_counter()
        for i in range(0, len(docs), 256):
            for enc in tok.encode_batch(docs[i:i + 256], add_special_tokens=False):
                pieces.append(np.asarray(enc.ids + [eos], dtype=np.int32))
        tokenize_s += time.perf_counter() - t1
    flat = np.concatenate(pieces)
    block = seq_len + 1
    n = len(flat) // block
    blocks = flat[: n * block].reshape(n, block)
    blocks = blocks[np.random.default_rng(seed).permutation(n)]
    n_val = max(1, round(n * 0.05))
    train, val = blocks[: n - n_val], blocks[n - n_val:]
    seconds = time.perf_counter() - t0
    return {"documents": documents, "tokens": int(len(flat)), "blocks": n, "train_blocks": len(train),
            "val_blocks": len(val), "seconds": seconds, "tokenize_seconds": tokenize_s}


def _run_baseline(corpus_dir: str, tokenizer_dir: str, parallel: bool) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true" if parallel else "false")
    code = ("import json, sys; sys.path.insert(0, 'bench'); from data_bench import baseline_loop; "
            f"print('RESULT', json.dumps(baseline_loop({corpus_dir!r}, {tokenizer_dir!r})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    line = next(l for l in out.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


class RayDataTimes:
    """Collects Ray Data's own per-execution log lines ("Execution plan of Dataset X: ...",
    "Dataset X execution finished in N seconds") to show where prepare_data spends its time."""

    def __init__(self):
        import logging

        self.plans: dict[str, str] = {}
        self.rows: list[list] = []
        outer = self

        class _Handler(logging.Handler):
            def emit(self, record):
                msg = record.getMessage()
                m = re.search(r"Execution plan of Dataset (\S+): (.*)", msg)
                if m:
                    outer.plans[m.group(1)] = m.group(2)
                m = re.search(r"Dataset (\S+) execution finished in ([0-9.]+) seconds", msg)
                if m:
                    plan = outer.plans.get(m.group(1), "?")
                    ops = re.findall(r"(?:Operator|Op)\[([^\]]+)\]", plan) or [plan]
                    outer.rows.append([" -> ".join(o[:60] for o in ops), float(m.group(2))])

        self.handler = _Handler()
        self.logger = logging.getLogger("ray.data")

    def __enter__(self):
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)


def object_store_used_bytes() -> int:
    """Bytes in the object store of every alive node (the raylets' own store stats)."""
    import ray
    from ray._private.internal_api import node_stats

    return sum(node_stats(n["NodeManagerAddress"], n["NodeManagerPort"], include_memory_info=False)
               .store_stats.object_store_bytes_used for n in ray.nodes() if n["Alive"])


class StorePeak:
    """The peak of `object_store_used_bytes` while the block runs (sampled every 0.2 s), and
    what was in the store when it started (`start`: a build's blocks not yet released)."""

    def __enter__(self):
        import threading

        self.start = object_store_used_bytes()
        self.peak, self._done = self.start, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._done.wait(0.2):
            self.peak = max(self.peak, object_store_used_bytes())

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()


def read_epoch(uri: str, manifest: dict, world: int) -> int:
    """One epoch of every rank's stream, each rank in its own Ray task (as Train workers read)."""
    import ray

    @ray.remote(num_cpus=1)
    def rank_epoch(rank: int) -> int:
        from raylm.data import CacheStream

        stream = CacheStream(uri, manifest, "train", rank, world)
        return sum(len(b["input_ids"]) for b in stream.train_batches(0, 0, 8, 1024))

    return sum(ray.get([rank_epoch.remote(r) for r in range(world)]))


def capped_store_run(workdir: str, store_mb: int, times: float) -> dict:
    """tests/reliability/small_store_run.py (its own Ray, the object store capped at `store_mb`) on
    a corpus whose packed tokens are `times` the store: build the cache, stream an epoch."""
    root = Path(__file__).resolve().parent.parent
    out = os.path.join(workdir, "capped.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    subprocess.run([sys.executable, str(root / "tests" / "reliability" / "small_store_run.py"), "--workdir",
                    os.path.join(workdir, "capped"), "--store-mb", str(store_mb), "--times", str(times), "--out", out],
                   env=env, cwd=root, check=True, capture_output=True, text=True)
    return json.loads(Path(out).read_text())


def run(args) -> dict:
    import shutil

    from common import start_ray

    megabytes, files = (10, 4) if args.quick else (32, 8)
    corpus_dir, size = repeated_corpus(os.path.join(args.workdir, "corpus"), megabytes, files)
    tokenizer_dir = bench_tokenizer(os.path.join(args.workdir, "tok"))

    loop_1 = _run_baseline(corpus_dir, tokenizer_dir, parallel=False)
    loop_n = _run_baseline(corpus_dir, tokenizer_dir, parallel=True)

    ray = start_ray(num_cpus=os.cpu_count())
    from raylm.config import DataConfig
    from raylm.data import prepare_data

    storage = os.path.join(args.workdir, "storage")
    shutil.rmtree(storage, ignore_errors=True)  # a cold build: no cache from an earlier run
    cfg = DataConfig(source=corpus_dir, tokenizer=tokenizer_dir, seq_len=SEQ_LEN, val_fraction=0.05)
    prepare_data(DataConfig(source=corpus_dir, tokenizer=tokenizer_dir, seq_len=SEQ_LEN, max_documents=64),
                 verbose=False, storage_path=storage)  # warm-up: Ray Data's first use starts things once
    with RayDataTimes() as phases, StorePeak() as build_store:
        prepared = prepare_data(cfg, verbose=False, storage_path=storage)
    s = prepared.stats
    t0 = time.perf_counter()
    cached = prepare_data(cfg, verbose=False, storage_path=storage)
    cached_s = time.perf_counter() - t0
    assert not cached.built
    with StorePeak() as epoch_store:
        epoch_rows = read_epoch(prepared.uri, prepared.manifest, world=2)
    ray.shutdown()
    capped = capped_store_run(args.workdir, 80, 3.1 if args.quick else 5.0)
    cache_bytes = sum(f["bytes"] for split in ("train", "val") for f in prepared.manifest[split]["files"])

    ray_tps = s.tokens / s.seconds
    rows = [
        ["raylm cold build (Ray Data actor pool, %d CPUs) -> cache" % os.cpu_count(), s.documents, s.tokens, s.blocks,
         s.seconds, ray_tps, 1.0],
        ["raylm cached rerun (fingerprint check + open)", s.documents, s.tokens, s.blocks, cached_s,
         s.tokens / cached_s, ratio(s.tokens / cached_s, ray_tps)],
        ["single-process loop, 1 thread", loop_1["documents"], loop_1["tokens"], loop_1["blocks"], loop_1["seconds"],
         loop_1["tokens"] / loop_1["seconds"], ratio(ray_tps, loop_1["tokens"] / loop_1["seconds"])],
        ["single-process loop, tokenizer threads", loop_n["documents"], loop_n["tokens"], loop_n["blocks"],
         loop_n["seconds"], loop_n["tokens"] / loop_n["seconds"], ratio(ray_tps, loop_n["tokens"] / loop_n["seconds"])],
    ]
    memory = [["corpus (text)", size / 2**20], ["packed cache (Parquet, zstd)", cache_bytes / 2**20],
              ["packed tokens (int32, in memory)", s.blocks * (SEQ_LEN + 1) * 4 / 2**20],
              ["object store peak: cold build", build_store.peak / 2**20],
              [f"object store peak: a training epoch, 2 ranks ({epoch_rows} rows)", epoch_store.peak / 2**20],
              ["object store in use when that epoch started (the build's blocks not yet released)",
               epoch_store.start / 2**20]]
    mib = 2**20
    memory += [[f"capped store ({capped['capacity_bytes'] / mib:.0f} MiB), corpus {capped['text_bytes'] / 1e6:.0f} MB "
                f"-> {capped['tokens']} tokens: packed tokens (int32)", capped["packed_bytes"] / mib],
               ["capped store: object store peak, cold build", capped["build_peak_bytes"] / mib],
               ["capped store: object store peak, a training epoch (2 ranks, data only)", capped["epoch_peak_bytes"] / mib],
               ["capped store: bytes that went through the store / spilled to disk",
                f"{capped['created_bytes'] / mib:.0f} / {capped['spilled_bytes'] / mib:.0f}"]]
    same = s.tokens == loop_1["tokens"] and s.documents == loop_1["documents"]
    vs_threads = ray_tps / (loop_n["tokens"] / loop_n["seconds"])
    return {
        "title": "1. Data: tokenize and pack",
        "note": (f"Corpus: tinyshakespeare repeated to {size / 1e6:.1f} MB in {files} files; BPE vocab 2048, "
                 f"seq_len {SEQ_LEN}. Cold build: read -> tokenize -> pack -> split -> Parquet cache + manifest "
                 f"(Ray start-up and tokenizer training excluded; one small warm-up build ran first). Cached "
                 f"rerun: the same call again (fingerprint, manifest check, open). 'raylm / this' = raylm "
                 f"cold-build tokens/s divided by this row's (cached row: cold-build time / cached time). Both "
                 f"sides produced {'the same' if same else 'DIFFERENT'} document and token counts."),
        "tables": [{"columns": ["pipeline", "documents", "tokens", "blocks", "seconds", "tokens/s", "raylm / this"],
                    "rows": rows},
                   {"name": "memory (MiB)", "columns": ["what", "MiB"], "rows": memory},
                   {"name": "where the cold build's time goes (Ray Data's own per-execution timings)",
                    "columns": ["Ray Data execution (operators)", "seconds"], "rows": phases.rows}],
        "goals": [{"goal": "cold build >= 1.2x the loop with tokenizer threads", "value": f"{vs_threads:.2f}x",
                   "met": vs_threads >= 1.2},
                  {"goal": "cached rerun >= 20x faster than the cold build", "value": f"{s.seconds / cached_s:.0f}x",
                   "met": s.seconds / cached_s >= 20}],
        "raw": {"raylm": s.__dict__, "cached_s": cached_s, "ray_data_executions": phases.rows,
                "loop_1_thread": loop_1, "loop_tokenizer_threads": loop_n, "corpus_bytes": size, "files": files,
                "cache_bytes": cache_bytes, "build_store_peak": build_store.peak, "epoch_store_peak": epoch_store.peak,
                "epoch_store_start": epoch_store.start, "capped_store": capped},
    }


if __name__ == "__main__":
    stage_main(run)
