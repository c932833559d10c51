"""Rollout: how long `raylm promote` takes to put a new checkpoint into a live endpoint, and what
clients see meanwhile. One run, side by side: a closed-loop client (`--clients` concurrent, each
alternating streaming and non-streaming completions) measures latency for a steady-state window
on v1, then through a forced promotion to v2 (Serve's rolling update with surge: the new replica
starts while the old one serves, then the old one drains), then steady state on v2.

    python bench/rollout_bench.py --out /tmp/rollout.json [--quick]
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))

from common import stage_main, start_ray  # noqa: E402

PORT, MODEL_ID, KEY = 8177, "bench-rollout", "sk-bench-rollout"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Clients:
    """`n` closed-loop clients; every request's (start, latency_s, ok, version)."""

    def __init__(self, url: str, n: int, varied: bool = False):
        """`varied`: every request a new conversation (its own prompt), as a canary's split needs;
        else all of them one prompt."""
        self.url, self.records, self.stop, self.varied = url, [], threading.Event(), varied
        self.threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(n)]

    def _loop(self, i: int) -> None:
        import httpx

        stream, sent = bool(i % 2), 0
        with httpx.Client(timeout=120) as client:
            while not self.stop.is_set():
                sent += 1
                prompt = f"The king said ({i}.{sent})" if self.varied else "The king said"
                body = {"model": MODEL_ID, "prompt": prompt, "max_tokens": 16, "stream": stream}
                t0 = time.monotonic()
                try:
                    if stream:
                        with client.stream("POST", f"{self.url}/v1/completions", json=body,
                                           headers={"Authorization": f"Bearer {KEY}"}) as r:
                            lines = [line for line in r.iter_lines() if line]
                        ok = r.status_code == 200 and lines[-1:] == ["data: [DONE]"]
                    else:
                        r = client.post(f"{self.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
                        ok = r.status_code == 200
                    version = r.headers.get("x-raylm-model-version")
                except Exception:  # noqa: BLE001 - a failed request is what we count
                    ok, version = False, None
                self.records.append((t0, time.monotonic() - t0, ok, version))
                stream = not stream

    def __enter__(self) -> "Clients":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=120)

    def window(self, t0: float, t1: float) -> dict:
        inside = [r for r in self.records if t0 <= r[0] < t1]
        lat = [r[1] * 1000 for r in inside if r[2]]
        return {"requests": len(inside), "failed": sum(not r[2] for r in inside),
                "p50_ms": round(pct(lat, 0.5), 1), "p99_ms": round(pct(lat, 0.99), 1),
                "versions": sorted({str(r[3]) for r in inside})}


def run(args) -> dict:
    from raylm.config import load_config
    from raylm.lifecycle import rollout
    from raylm.serve.tiny import make_tiny_checkpoint

    work = Path(args.workdir)
    (work / "keys").write_text(KEY + "\n")
    a = make_tiny_checkpoint(str(work / "a"), seed=0)
    b = make_tiny_checkpoint(str(work / "b"), seed=1)
    steady_s = 10 if args.quick else 30
    clients = 4 if args.quick else 8
    cfg = load_config(None, [f"serve.port={PORT}", f"serve.model_id={MODEL_ID}", f"serve.api_key_file={work / 'keys'}",
                             "serve.api_key_env=RAYLM_BENCH_NO_SUCH_VAR", f"train.storage_path={work / 'storage'}",
                             "serve.kv_cache_memory_gib=0.25", "serve.graceful_shutdown_timeout_s=30"])
    start_ray(num_cpus=4)
    t = time.monotonic()
    url, _ = rollout.deploy_recorded(cfg, a)
    cold_start_s = time.monotonic() - t
    with Clients(url, clients) as load:
        time.sleep(steady_s)
        t_promote = time.monotonic()
        rollout.promote(cfg, b, force=True)
        t_done = time.monotonic()
        time.sleep(steady_s)
        t_end = time.monotonic()
    from ray import serve

    serve.shutdown()
    steady, during, after = (load.window(t_promote - steady_s, t_promote), load.window(t_promote, t_done),
                             load.window(t_done, t_end))
    return {"clients": clients, "steady_window_s": steady_s, "first_deploy_s": round(cold_start_s, 1),
            "rollout_s": round(t_done - t_promote, 1), "steady_v1": steady, "during_rollout": during,
            "steady_v2": after,
            "p50_ratio_during_vs_steady": round(during["p50_ms"] / steady["p50_ms"], 2),
            "p99_ratio_during_vs_steady": round(during["p99_ms"] / steady["p99_ms"], 2),
            "first_v2_response_s": _first(load.records, "v2", t_promote),
            "last_v1_request_start_s": _last(load.records, "v1", t_promote),
            "failed_total": sum(not r[2] for r in load.records), "cpus": os.cpu_count()}


def _first(records: list, version: str, t0: float):
    """Seconds from the promotion's start until the new version answered first (its replica took traffic)."""
    starts = [r[0] + r[1] for r in records if r[3] == version and r[0] >= t0]
    return round(min(starts) - t0, 1) if starts else None


def _last(records: list, version: str, t0: float):
    """Seconds from the promotion's start until the last request the old version answered was sent."""
    starts = [r[0] for r in records if r[3] == version and r[0] >= t0]
    return round(max(starts) - t0, 1) if starts else None


if __name__ == "__main__":
    stage_main(run)
