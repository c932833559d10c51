"""Data stage: tokens/s of raylm's Ray Data tokenize-and-pack versus a single-process loop.

Both sides read the same corpus (tinyshakespeare repeated to tens of MB, cut into files),
use the same tokenizer (a BPE trained once with raylm's trainer, then passed by path, so no
tokenizer training is timed) and produce the same thing: documents + EOS, packed into blocks
of seq_len + 1 tokens, shuffled, split into train / val.

- raylm: `raylm.data.prepare_data` on a local Ray cluster with as many CPUs as the machine has;
  time = `DataStats.seconds` (read -> split, all materialized), Ray start-up excluded.
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


def run(args) -> dict:
    from common import start_ray

    megabytes, files = (10, 4) if args.quick else (32, 8)
    corpus_dir, size = repeated_corpus(os.path.join(args.workdir, "corpus"), megabytes, files)
    tokenizer_dir = bench_tokenizer(os.path.join(args.workdir, "tok"))

    loop_1 = _run_baseline(corpus_dir, tokenizer_dir, parallel=False)
    loop_n = _run_baseline(corpus_dir, tokenizer_dir, parallel=True)

    ray = start_ray(num_cpus=os.cpu_count())
    from raylm.config import DataConfig
    from raylm.data import prepare_data

    cfg = DataConfig(source=corpus_dir, tokenizer=tokenizer_dir, seq_len=SEQ_LEN, val_fraction=0.05)
    prepare_data(DataConfig(source=corpus_dir, tokenizer=tokenizer_dir, seq_len=SEQ_LEN, max_documents=64),
                 verbose=False)  # warm-up: Ray Data's first use imports and starts things once per cluster
    with RayDataTimes() as phases:
        prepared = prepare_data(cfg, verbose=False)
    s = prepared.stats
    ray.shutdown()

    ray_tps = s.tokens / s.seconds
    rows = [
        ["raylm prepare_data (Ray Data, %d CPUs)" % os.cpu_count(), s.documents, s.tokens, s.blocks, s.seconds,
         ray_tps, 1.0],
        ["single-process loop, 1 thread", loop_1["documents"], loop_1["tokens"], loop_1["blocks"], loop_1["seconds"],
         loop_1["tokens"] / loop_1["seconds"], ratio(ray_tps, loop_1["tokens"] / loop_1["seconds"])],
        ["single-process loop, tokenizer threads", loop_n["documents"], loop_n["tokens"], loop_n["blocks"],
         loop_n["seconds"], loop_n["tokens"] / loop_n["seconds"], ratio(ray_tps, loop_n["tokens"] / loop_n["seconds"])],
    ]
    same = s.tokens == loop_1["tokens"] and s.documents == loop_1["documents"]
    return {
        "title": "1. Data: tokenize and pack",
        "note": (f"Corpus: tinyshakespeare repeated to {size / 1e6:.1f} MB in {files} files; BPE vocab 2048, "
                 f"seq_len {SEQ_LEN}. Time covers read -> tokenize -> pack -> shuffle -> split (Ray start-up "
                 f"and tokenizer training excluded; one small warm-up prepare_data ran first). "
                 f"'raylm / this' = raylm tokens/s divided by this row's tokens/s. Both sides produced "
                 f"{'the same' if same else 'DIFFERENT'} document and token counts."),
        "tables": [{"columns": ["pipeline", "documents", "tokens", "blocks", "seconds", "tokens/s", "raylm / this"],
                    "rows": rows},
                   {"name": "where prepare_data's time goes (Ray Data's own per-execution timings)",
                    "columns": ["Ray Data execution (operators)", "seconds"], "rows": phases.rows}],
        "goals": [],
        "raw": {"raylm": s.__dict__, "ray_data_executions": phases.rows, "loop_1_thread": loop_1, "loop_tokenizer_threads": loop_n,
                "corpus_bytes": size, "files": files},
    }


if __name__ == "__main__":
    stage_main(run)
