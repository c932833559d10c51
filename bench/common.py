"""Pieces every stage shares: its command line, the local Ray cluster, the corpus, and a sampler
of the peak memory of Ray Train's worker processes."""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO.parent / "shared" / "corpora" / "tinyshakespeare.txt"


def stage_main(run: Callable[[argparse.Namespace], dict]) -> None:
    """`python bench/<stage>_bench.py --out result.json [--quick] [--workdir DIR]`."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    args.workdir = args.workdir or os.path.join("/tmp", f"raylm-bench-{os.getpid()}")
    os.makedirs(args.workdir, exist_ok=True)
    try:
        result = run(args)
    except Exception as exc:  # noqa: BLE001 - the report records the failure
        import traceback

        traceback.print_exc()
        result = {"error": f"{type(exc).__name__}: {exc}"}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=str)


def start_ray(num_cpus: Optional[int] = None, **overrides: Any) -> Any:
    """The platform's own way to start Ray (token auth on), quiet."""
    from raylm.cluster import init_ray
    from raylm.config import load_config

    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    init_ray(cfg, num_cpus=num_cpus)
    import ray

    return ray


def repeated_corpus(out_dir: str, megabytes: int, files: int) -> tuple[str, int]:
    """tinyshakespeare repeated to about `megabytes` MB, cut into `files` .txt files (a corpus
    folder, as data usually comes). Returns the folder and its size in bytes."""
    text = CORPUS.read_text()
    copies = max(1, round(megabytes * 1e6 / len(text.encode())))
    os.makedirs(out_dir, exist_ok=True)
    per_file = [copies // files + (1 if i < copies % files else 0) for i in range(files)]
    total = 0
    for i, n in enumerate(c for c in per_file if c):
        body = "\n\n".join([text] * n)
        Path(out_dir, f"part-{i:03d}.txt").write_text(body)
        total += len(body.encode())
    return out_dir, total


def bench_tokenizer(cache_dir: str, vocab_size: int = 2048) -> str:
    """A byte-level BPE trained on tinyshakespeare with raylm's own trainer (cached per workdir)."""
    from raylm.data import split_text, train_tokenizer

    out = os.path.join(cache_dir, f"bpe-shakespeare-{vocab_size}")
    if not os.path.isdir(out):
        os.makedirs(cache_dir, exist_ok=True)
        train_tokenizer(split_text(CORPUS.read_text(), "paragraph"), vocab_size, out)
    return out


def _peak_rss_kib(pid: int) -> Optional[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class WorkerMemory:
    """Peak resident memory (VmHWM, the kernel's high-water mark) of every process whose command
    line contains `marker` (Ray sets the process title of Train workers to ray::RayTrainWorker...)."""

    def __init__(self, marker: str = "RayTrainWorker", interval_s: float = 0.5):
        self.marker, self.interval_s = marker, interval_s
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _ours(proc) -> bool:
        """Only workers of the Ray cluster this process started (its raylet is our child): other
        users' Ray Train workers on a shared machine carry the same process title."""
        try:
            return any(p.pid == os.getpid() for p in proc.parents())
        except Exception:  # noqa: BLE001 - the process is gone
            return False

    def _loop(self) -> None:
        import psutil

        while not self._stop.is_set():
            for proc in psutil.process_iter(["pid", "cmdline"]):
                try:
                    cmd = " ".join(proc.info["cmdline"] or [])
                except Exception:  # noqa: BLE001
                    continue
                if self.marker in cmd and self._ours(proc):
                    peak = _peak_rss_kib(proc.info["pid"])
                    if peak:
                        self.peaks[proc.info["pid"]] = max(peak, self.peaks.get(proc.info["pid"], 0))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "WorkerMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def per_worker_mib(self) -> list[float]:
        return sorted((round(v / 1024, 1) for v in self.peaks.values()), reverse=True)


def own_peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0
